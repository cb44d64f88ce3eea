"""Language-model backbones (llama-cpp, vllm, openai) and BDPL, without a server: the configuration
they accept and refuse, the floor rule, the retry policy against a real loopback HTTP server that
answers 429 with Retry-After, the PMI vocabulary, and BDPL's update arithmetic by hand."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import torch

from fedprompt.config import ConfigError, load_config
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.state import Update
from fedprompt.federation.strategies.fedavg import FedAvg
from fedprompt.seeding import derive_seed
from fedprompt.tasks.text.ngrams import pmi_ngrams
from fedprompt.training.batching import TensorData
from fedprompt.training.discrete import PolicyGradientTrainer, policy_gradient, project_to_simplex
from fedprompt.training.gradient import LocalRound
from fedprompt.training.metering import MeteredTrainer
from prompt_modules.label_scores import LabelScores, LabelWords, floor_logprob, match_listed
from prompt_modules.llm_classifier import DiscretePromptClassifier
from prompt_modules.openai_client import EndpointSettings, OpenAICompatibleClient, ServerError
from prompt_modules.openai_scorer import VLLMScorer, encode_prompt_embeds, top_logprobs_of

VERBALIZER = {
    "kind": "verbalizer",
    "template": "{text} Sentiment:",
    "label_words": {"negative": ["negative"], "positive": ["positive"]},
}
DATA = {"source": "builtin", "name": "chatterbot-topics"}


def _config(**sections):
    base = {
        "backbone": {"kind": "openai", "url": "http://127.0.0.1:8080", "model": "smollm2"},
        "head": VERBALIZER,
        "prompt": {"kind": "discrete", "num_tokens": 4},
        "optimizer": {"kind": "bdpl"},
        "strategy": {"kind": "fedavg"},
    }
    return load_config({**base, **sections})


def test_language_model_sections_validate():
    cfg = _config()
    assert cfg.backbone.endpoint == "completions" and cfg.backbone.top_logprobs == 20
    assert cfg.prompt.vocabulary.size == 50 and cfg.prompt.parametrization == "softmax"
    assert cfg.optimizer.samples == 20 and cfg.optimizer.grad_clip == 3.0
    vllm = _config(
        backbone={"kind": "vllm", "model": "smollm2"},
        prompt={"kind": "intrinsic", "dim": 50},
        optimizer={"kind": "cmaes", "generations": 2},
        strategy={"kind": "fedbpt"},
    )
    assert vllm.backbone.logprob_token_ids and vllm.backbone.tokenizer == "bundled:smollm2-135m"
    llama = _config(backbone={"kind": "llama-cpp"}, prompt={"kind": "soft"}, optimizer={"kind": "spsa"})
    assert llama.backbone.model == "bundled:smollm2-135m" and llama.backbone.parity_tolerance > 0


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"prompt": {"kind": "soft"}, "optimizer": {"kind": "spsa"}},
            r"backbone\.kind openai takes text only",
        ),
        ({"optimizer": {"kind": "cmaes"}}, r"prompt\.kind discrete trains by optimizer\.kind bdpl"),
        ({"head": {"kind": "similarity"}}, r"set head\.kind: verbalizer"),
        (
            {"head": {**VERBALIZER, "template": "{text} It was [MASK]."}},
            r"head\.template: backbone\.kind openai is a decoder",
        ),
        (
            {"backbone": {"kind": "hf-text"}},
            r"prompt\.kind discrete sends text to a language model",
        ),
        (
            {
                "backbone": {"kind": "vllm", "model": "m"},
                "prompt": {"kind": "soft"},
                "optimizer": {"kind": "gradient"},
            },
            r"backbone\.kind vllm returns outputs only, never gradients",
        ),
        (
            {"backbone": {"kind": "openai", "model": "m", "ca_file": "ca.pem"}},
            r"ca_file apply to https urls",
        ),
        (
            {"prompt": {"kind": "discrete", "vocabulary": {"source": "file"}}},
            r"vocabulary\.file goes with source: file",
        ),
    ],
)
def test_language_model_misconfigurations_are_named(sections, message):
    with pytest.raises(ConfigError, match=message):
        _config(**sections)


# ---------------------------------------------------------------- the floor rule


def test_floor_is_the_largest_probability_an_unlisted_token_can_have():
    listed = {" a": math.log(0.5), " b": math.log(0.3), " c": math.log(0.15)}
    # the rest of the mass is 0.05, below the smallest listed 0.15: the floor is log(0.05)
    assert floor_logprob(list(listed.values())) == pytest.approx(math.log(0.05))
    thin = {" a": math.log(0.4), " b": math.log(0.02)}  # rest 0.58 > 0.02: the floor is log(0.02)
    assert floor_logprob(list(thin.values())) == pytest.approx(math.log(0.02))
    labels = LabelWords(ids=(7, 9), texts=(" b", " z"), classes=((0,), (1,)))
    values, floored = match_listed(listed, labels)
    assert values == pytest.approx([math.log(0.3), math.log(0.05)]) and floored == [False, True]


def test_label_words_are_found_by_id_text_or_prefix():
    by_id = LabelWords(ids=(11, 12), texts=(" yes", " no"), classes=((0,), (1,)))
    values, floored = match_listed({"token_id:12": -0.5, "token_id:11": -2.0, " yes": -9.0}, by_id)
    assert values == [-2.0, -0.5] and floored == [False, False]
    words = LabelWords.from_words([["terrible"], ["great"]])
    values, floored = match_listed({" ter": -1.0, " gr": -3.0, " great": -2.0, "\n": -0.5}, words)
    assert values == [-1.0, -2.0] and floored == [False, False]  # " ter" starts "terrible"; " great" exact


def test_class_scores_average_each_class_words_log_probabilities():
    labels = LabelWords(ids=(1, 2, 3), texts=(" a", " b", " c"), classes=((0, 1), (2,)))
    scores = labels.class_scores(torch.tensor([[-1.0, -3.0, -0.5]], dtype=torch.float64))
    assert scores.tolist() == [[-2.0, -0.5]]


def test_answers_of_completions_and_chat_are_read():
    completions = {
        "choices": [
            {"logprobs": {"top_logprobs": [{" x": -0.1}], "tokens": [" y"], "token_logprobs": [-3.0]}}
        ]
    }
    assert top_logprobs_of(completions, "here") == {" x": -0.1, " y": -3.0}
    chat = {
        "choices": [
            {
                "logprobs": {
                    "content": [
                        {"token": "a", "logprob": -0.2, "top_logprobs": [{"token": "b", "logprob": -2}]}
                    ]
                }
            }
        ]
    }
    assert top_logprobs_of(chat, "here") == {"b": -2.0, "a": -0.2}
    with pytest.raises(ServerError, match="without the next token's log-probabilities"):
        top_logprobs_of({"choices": [{"text": "x"}]}, "here")


def test_prompt_embeds_are_dense_checked_tensors():
    payload = encode_prompt_embeds(torch.ones(3, 4), 4)
    import base64
    import io

    tensor = torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 4) and tensor.is_contiguous()
    with pytest.raises(ValueError, match="dense"):
        encode_prompt_embeds(torch.ones(3, 4).to_sparse(), 4)
    with pytest.raises(ValueError, match=r"\[tokens, 4\]"):
        encode_prompt_embeds(torch.ones(3, 5), 4)
    with pytest.raises(ValueError, match="finite"):
        encode_prompt_embeds(torch.tensor([[float("nan")] * 4]), 4)


# ---------------------------------------------------------------- retries against a real HTTP server


class _Busy(BaseHTTPRequestHandler):
    """Answers the first ``refusals`` POSTs 429 with ``Retry-After``, then a completion."""

    refusals = 2
    retry_after = "1"
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if len(type(self).seen) <= type(self).refusals:
            self._answer(429, {"error": "rate limited"}, {"Retry-After": type(self).retry_after})
            return
        logprobs = {"top_logprobs": [{" positive": -0.25, " negative": -1.5}]}
        self._answer(
            200, {"choices": [{"logprobs": logprobs}], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
        )

    def _answer(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        return None


@pytest.fixture
def busy_server():
    _Busy.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_429_with_retry_after_is_waited_out_and_retried(busy_server):
    waits: list[float] = []
    _Busy.refusals, _Busy.retry_after = 2, "3"
    client = OpenAICompatibleClient(
        EndpointSettings(busy_server, api_key="k", retries=3, backoff=0.25), sleep=waits.append
    )
    scorer = VLLMScorer(client, "m", hidden_size=4, by_id=False)
    labels = LabelWords(ids=(5, 6), texts=(" negative", " positive"), classes=((0,), (1,)))
    scores = scorer.score_texts(["great film"], labels)
    assert waits == [3.0, 3.0]  # the server's Retry-After, not the client's backoff
    assert scores.logprobs.tolist() == [[-1.5, -0.25]] and not bool(scores.floored.any())
    assert len(_Busy.seen) == 3 and _Busy.seen[-1]["prompt"] == "great film"
    assert client.usage.snapshot() == {
        "requests": 1,
        "prompt_tokens": 7,
        "completion_tokens": 1,
        "retries": 2,
    }
    client.close()


def test_a_retry_after_over_max_wait_fails_at_once_and_backoff_doubles(busy_server):
    _Busy.refusals, _Busy.retry_after = 5, "600"
    client = OpenAICompatibleClient(
        EndpointSettings(busy_server, retries=3, max_wait=60), sleep=lambda s: None
    )
    with pytest.raises(
        ServerError, match=r"told to wait 600 s, over the 60 s this client waits \(backbone\.max_wait\)"
    ):
        client.post("/v1/completions", {"prompt": "x"})
    assert len(_Busy.seen) == 1
    _Busy.seen, _Busy.refusals, _Busy.retry_after = [], 10, "not a number"  # no usable Retry-After: backoff
    waits: list[float] = []
    client = OpenAICompatibleClient(
        EndpointSettings(busy_server, retries=3, backoff=0.5, max_backoff=1.5), sleep=waits.append
    )
    with pytest.raises(ServerError, match="failed after 4 attempts; last: HTTP 429"):
        client.post("/v1/completions", {"prompt": "x"})
    assert waits == [0.5, 1.0, 1.5]


class _Flaky(_Busy):
    """Answers the first ``refusals`` POSTs with ``status`` (no Retry-After), then echoes the prompt;
    counts the requests it is handling at once."""

    status = 503
    lock = threading.Lock()
    in_flight = 0
    most_in_flight = 0

    def do_POST(self) -> None:
        cls = type(self)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with cls.lock:
            cls.seen.append(body)
            refused = len(cls.seen) <= cls.refusals
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        if not refused:
            threading.Event().wait(0.02)  # a little work, so requests overlap when allowed to
        # Out of the count before the answer is written: once the client reads it, it may send its
        # next request at once, and this thread may not have run again by then on a busy machine.
        with cls.lock:
            cls.in_flight -= 1
        if refused:
            self._answer(cls.status, {"error": {"message": "model is loading"}})
        else:
            self._answer(200, {"echo": body["prompt"], "usage": {"prompt_tokens": 3}})


@pytest.fixture
def flaky_server():
    _Flaky.seen, _Flaky.in_flight, _Flaky.most_in_flight = [], 0, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_is_retried_with_backoff_and_other_4xx_fail_at_once(flaky_server):
    _Flaky.refusals, _Flaky.status = 2, 503
    waits: list[float] = []
    client = OpenAICompatibleClient(
        EndpointSettings(flaky_server, retries=3, backoff=0.5), sleep=waits.append
    )
    assert client.post("/v1/completions", {"prompt": "x"})["echo"] == "x"
    assert waits == [0.5, 1.0] and len(_Flaky.seen) == 3
    assert client.usage.snapshot()["retries"] == 2
    client.close()
    _Flaky.seen, _Flaky.refusals, _Flaky.status = [], 1, 400
    client = OpenAICompatibleClient(EndpointSettings(flaky_server, retries=3), sleep=waits.append)
    with pytest.raises(ServerError, match=r"was refused \(400\): model is loading$"):
        client.post("/v1/completions", {"prompt": "x"})
    assert len(_Flaky.seen) == 1  # never retried
    client.close()


def test_requests_in_flight_never_exceed_the_concurrency_limit(flaky_server):
    _Flaky.refusals = 0
    client = OpenAICompatibleClient(EndpointSettings(flaky_server, concurrency=2))
    prompts = [f"text {i}" for i in range(12)]
    answers = client.post_many("/v1/completions", [{"prompt": p} for p in prompts])
    assert [a["echo"] for a in answers] == prompts  # in the bodies' order
    assert 1 <= _Flaky.most_in_flight <= 2 and len(_Flaky.seen) == 12
    assert client.usage.snapshot()["requests"] == 12
    client.close()


class _Refusing(BaseHTTPRequestHandler):
    """Answers every request with ``status``, ``body`` (bytes) and ``content_type``."""

    status = 400
    body = b""
    content_type = "application/json"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        cls = type(self)
        self.send_response(cls.status)
        self.send_header("Content-Type", cls.content_type)
        self.send_header("Content-Length", str(len(cls.body)))
        self.end_headers()
        self.wfile.write(cls.body)

    def log_message(self, *args) -> None:
        return None


LONG_PAGE = "<html><body><h1>502 Bad Gateway</h1>\n\n" + "<p>upstream   down</p>\n" * 40 + "</body></html>"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "shown"),
    [
        (  # vLLM ≥ 0.11 (ErrorResponse: error.code is the status number)
            404,
            {"error": {"message": "The model `gpt-9` does not exist.", "type": "NotFoundError", "code": 404}},
            "application/json",
            "was refused (404): The model `gpt-9` does not exist. (type NotFoundError, code 404)",
        ),
        (  # llama.cpp's server and hosted APIs: a string code, a param
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 1024 tokens",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            "application/json",
            "was refused (400): This model's maximum context length is 1024 tokens "
            "(type invalid_request_error, code context_length_exceeded)",
        ),
        (  # vLLM before 0.11: the error's fields at the top level
            400,
            {"object": "error", "message": "max_tokens must be at least 1", "type": "BadRequestError"},
            "application/json",
            "was refused (400): max_tokens must be at least 1 (type BadRequestError)",
        ),
        (  # a hosted API that answers a bare string
            403,
            {"error": "key revoked"},
            "application/json",
            "was refused (403) (check backbone.token_env): key revoked",
        ),
        (  # FastAPI: a string, and request validation by field
            422,
            {"detail": [{"loc": ["body", "logprobs"], "msg": "Input should be a valid integer"}]},
            "application/json",
            "was refused (422): body.logprobs: Input should be a valid integer",
        ),
        (404, {"detail": "no such route"}, "application/json", "was refused (404): no such route"),
        (  # a proxy's HTML page: its start, whitespace folded, cut at 300 characters
            413,
            LONG_PAGE,
            "text/html",
            "was refused (413): " + " ".join(LONG_PAGE.split())[:299] + "…",
        ),
        (400, "", "text/plain", "was refused (400): Bad Request"),  # nothing said: the status phrase
    ],
    ids=["vllm", "llama-cpp", "vllm-flat", "bare-string", "fastapi-fields", "fastapi", "html", "empty"],
)
def test_a_refusal_shows_the_server_s_own_reason_in_every_error_shape(status, body, content_type, shown):
    _Refusing.status, _Refusing.content_type = status, content_type
    _Refusing.body = (json.dumps(body) if isinstance(body, dict) else body).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = OpenAICompatibleClient(
        EndpointSettings(f"http://127.0.0.1:{server.server_address[1]}", retries=2), sleep=lambda s: None
    )
    try:
        with pytest.raises(ServerError) as refused:
            client.post("/v1/completions", {"prompt": "x"})
        message = str(refused.value)
        assert message.endswith(shown) and message.startswith("POST http://127.0.0.1:")
        assert '{"' not in message  # never the raw JSON
    finally:
        client.close()
        server.shutdown()
        server.server_close()


class _StopsAtOnce(_Busy):
    """Generates nothing (the end-of-sequence token first) unless asked for min_tokens."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        if body.get("min_tokens", 0) < 1:
            empty = {"text": "", "logprobs": {"tokens": [], "token_logprobs": [], "top_logprobs": []}}
            self._answer(200, {"choices": [{**empty, "finish_reason": "stop"}]})
            return
        self._answer(200, {"choices": [{"logprobs": {"top_logprobs": [{" positive": -2.0, " x": -0.5}]}}]})


def test_a_server_that_stops_at_once_is_asked_again_with_min_tokens():
    _StopsAtOnce.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StopsAtOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = OpenAICompatibleClient(EndpointSettings(f"http://127.0.0.1:{server.server_address[1]}"))
        labels = LabelWords(ids=(5, 6), texts=(" negative", " positive"), classes=((0,), (1,)))
        scores = VLLMScorer(client, "m", 4, by_id=False).score_texts(["a text"], labels)
        assert [b.get("min_tokens") for b in _StopsAtOnce.seen] == [None, 1]
        assert scores.logprobs[0, 1] == -2.0 and scores.floored.tolist() == [[True, False]]
        client.close()
    finally:
        server.shutdown()
        server.server_close()


class _Models(BaseHTTPRequestHandler):
    """Lists one served model; refuses a request without the right key."""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Bearer right":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps({"data": [{"id": "smollm2"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        return None


def test_the_served_model_and_the_key_are_checked_before_any_query(monkeypatch):
    from fedprompt.tasks.text.language_model import endpoint_client

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.setenv("MY_KEY", "right")
        wrong_model = _config(
            backbone={"kind": "openai", "url": url, "model": "gpt-9", "token_env": "MY_KEY"}
        )
        with pytest.raises(
            ConfigError, match=r"backbone\.model: the server at .* serves \['smollm2'\], not 'gpt-9'"
        ):
            endpoint_client(wrong_model.backbone)
        monkeypatch.setenv("MY_KEY", "wrong")
        wrong_key = _config(
            backbone={"kind": "openai", "url": url, "model": "smollm2", "token_env": "MY_KEY"}
        )
        with pytest.raises(ConfigError, match=r"backbone\.token_env: the server refused this party's key"):
            endpoint_client(wrong_key.backbone)
        monkeypatch.setenv("MY_KEY", "")
        with pytest.raises(ConfigError, match=r"the environment variable MY_KEY is empty or unset"):
            endpoint_client(wrong_key.backbone)
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- BDPL


def test_pmi_ngrams_join_strong_pairs_and_rank_by_count():
    texts = ["i like new york", "i like the city", "you like the city", "you like new york"] * 6
    # 72 pairs; c(new, york) = c(the, city) = 12 with every word 12 times: PMI = log(72·12/144) = log 6;
    # like-pairs: log(72·12/(24·12)) = log 3 < 1.5, so "like" stands alone and "new york" is one n-gram
    grams = pmi_ngrams(texts, 10, min_count=1, min_pmi=1.5, min_frequency=1)
    assert grams == ["like", "you", "the city", "new york", "i"]  # by count (24, then 12s), then n-gram
    assert pmi_ngrams(texts, 2, min_count=1, min_pmi=1.5, min_frequency=1) == ["like", "you"]


def test_policy_gradient_matches_a_hand_computation():
    samples = torch.tensor([[0, 1], [1, 1], [0, 0]])  # I = 3 prompts over n = 2 positions, K = 2
    losses = torch.tensor([1.0, 2.0, 3.0])  # L̄ = 2: advantages (L_k − L̄)/(I − 1) = −0.5, 0, 0.5
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    # softmax: g_i = Σ_k a_k (onehot(s_ki) − p_i); Σ_k a_k = 0 so the p term cancels:
    # position 0: −0.5·[1,0] + 0.5·[1,0] = [0, 0]; position 1: −0.5·[0,1] + 0.5·[1,0] = [0.5, −0.5]
    soft = policy_gradient(logits, samples, losses, "softmax")
    assert torch.allclose(soft, torch.tensor([[0.0, 0.0], [0.5, -0.5]], dtype=torch.float64))
    # simplex (the reference's derivative ±1/p): position 1, p = [0.25, 0.75]:
    # k=0 (s=1): −0.5·[−4, 4/3]; k=2 (s=0): 0.5·[4, −4/3] -> [4, −4/3]
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    simplex = policy_gradient(probs, samples, losses, "simplex")
    assert torch.allclose(simplex, torch.tensor([[0.0, 0.0], [4.0, -4 / 3]], dtype=torch.float64))


def test_simplex_projection_is_exact():
    projected = project_to_simplex(torch.tensor([[0.6, 0.6, -0.2], [0.2, 0.3, 0.5], [2.0, 0.0, 0.0]]))
    assert torch.allclose(projected, torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]))


class _KeywordModel:
    """A language model as a pure function of the text: the positive label's log-odds are the
    number of times "good" occurs minus those of "bad". A stand-in for the seam, not a server."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def score_texts(self, texts, labels):
        self.texts.extend(texts)
        rows = []
        for text in texts:
            margin = text.split().count("good") - text.split().count("bad")
            rows.append([-math.log1p(math.exp(margin)), -math.log1p(math.exp(-margin))])
        return LabelScores(
            torch.tensor(rows, dtype=torch.float64), torch.zeros(len(rows), 2, dtype=torch.bool)
        )

    def usage(self):
        return {"requests": len(self.texts)}


def _discrete(parametrization="softmax"):
    labels = LabelWords(ids=(0, 1), texts=(" negative", " positive"), classes=((0,), (1,)))
    module = DiscretePromptClassifier(
        _KeywordModel(), ["good", "bad", "okay"], 2, "{text}", labels, " ", parametrization
    )
    data = TensorData({**module.encode_texts(["a film"] * 4), "labels": torch.ones(4, dtype=torch.long)})
    return module, data


def test_one_bdpl_step_matches_a_hand_computation():
    module, data = _discrete()
    trainer = PolicyGradientTrainer(samples=4, lr=0.5, steps=1, batch_size=4, algorithm="sgd", grad_clip=None)
    seed = 11
    draws = torch.Generator().manual_seed(derive_seed(seed, "bdpl-samples"))
    samples = torch.multinomial(
        torch.full((2, 3), 1 / 3, dtype=torch.float64), 4, replacement=True, generator=draws
    ).T
    losses = []
    for s in samples.tolist():  # every example is positive: loss = log(1 + e^{−margin})
        margin = sum({0: 1, 1: -1, 2: 0}[i] for i in s)
        losses.append(math.log1p(math.exp(-margin)))
    mean = sum(losses) / 4
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for s, loss in zip(samples.tolist(), losses, strict=True):
        for position, choice in enumerate(s):
            expected[position, choice] += (loss - mean) / 3
            expected[position] -= (loss - mean) / 3 / 3  # − p = 1/3 each: sums to zero over k
    stats = trainer.train(module, data, LocalRound(FitInstructions(round=1, seed=seed)))
    assert torch.allclose(module.prompt.logits.detach().double(), -0.5 * expected, atol=1e-6)
    assert stats.queries == 16 and stats.steps == 1 and stats.final_loss == pytest.approx(mean)
    assert len(module.backbone.texts) == 16 and module.backbone.texts[0].endswith(" a film")


def test_bdpl_learns_the_keyword_and_reports_its_cost():
    module, data = _discrete()
    trainer = MeteredTrainer(PolicyGradientTrainer(samples=8, lr=0.3, steps=30, batch_size=4))
    stats = trainer.train(module, data, LocalRound(FitInstructions(round=1, seed=3)))
    assert module.prompt_text(module.prompt.most_likely()) == "good good"
    assert stats.extra["api_requests"] == 30 * 8 * 4 and stats.extra["floored_share"] == 0.0
    assert stats.final_loss < stats.mean_loss


def test_simplex_bdpl_stays_on_the_simplex():
    module, data = _discrete("simplex")
    trainer = PolicyGradientTrainer(samples=6, lr=0.05, steps=10, batch_size=4)
    trainer.train(module, data, LocalRound(FitInstructions(round=1, seed=5)))
    probs = module.prompt.probs.detach()
    assert bool((probs >= 0).all()) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert module.prompt.most_likely().tolist() == [0, 0]


def test_fedone_averages_the_clients_distributions_by_examples():
    """FedOne's server: the clients' distribution parameters averaged by example counts."""
    first = {"prompt.logits": torch.tensor([[1.0, 0.0, -1.0]])}
    second = {"prompt.logits": torch.tensor([[0.0, 3.0, 0.0]])}
    new = FedAvg().aggregate(
        {"prompt.logits": torch.zeros(1, 3)},
        [Update(0, first, 30, {}), Update(1, second, 10, {})],
    )
    assert torch.allclose(new["prompt.logits"], torch.tensor([[0.75, 0.75, -0.75]]))


# ---------------------------------------------------------------- export for vLLM


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({}, r"whose head is a verbaliser \(label words\); this one scores classes by similarity"),
        (
            {
                "head": VERBALIZER,
                "backbone": {"kind": "openai", "model": "m"},
                "prompt": {"kind": "discrete"},
                "optimizer": {"kind": "bdpl"},
            },
            r"prompt\.kind 'discrete' is not a set of input vectors",
        ),
        (
            {"head": VERBALIZER, "backbone": {"kind": "hf-text", "random_config": {"model_type": "gpt2"}}},
            r"a randomly initialised backbone has no published model",
        ),
    ],
)
def test_vllm_export_refuses_what_vllm_cannot_serve(tmp_path, sections, message):
    import yaml

    from fedprompt.errors import ExportError
    from fedprompt.execution.vllm_export import export_vllm

    config = load_config({"prompt": {"kind": "soft"}, **sections})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with pytest.raises(ExportError, match=message):
        export_vllm(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
