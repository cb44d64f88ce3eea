"""The inference service on loopback: authentication, limits, validation, no weights; the remote client."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from fedprompt.serving import InferenceService, ServiceLimits, create_app, parse_tokens, serve_in_thread
from fedprompt.serving.app import ROUTES
from prompt_modules.heads import VerbalizerHeadSpec, build_head
from prompt_modules.hf_text import load_tokenizer
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier, ProjectionSpec
from prompt_modules.remote import RemoteBackbone, RemoteBackboneError, RemoteIntrinsicClassifier

from conftest import TINY_BERT, tiny_backbone

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
SPEC = ProjectionSpec(seed=5, dim=24, num_tokens=3, scale=1.0)
HEAD = VerbalizerHeadSpec(label_words=(("bad",), ("good",)))
TEMPLATE = "{text} It was [MASK]."
TEXTS = ["a fine film", "awful", "what a movie it was"]


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(TINY_BERT)


@pytest.fixture(scope="module")
def service(backbone):
    limits = ServiceLimits(max_candidates=8, max_examples=16, max_queries=64, max_request_bytes=64 * 1024)
    return InferenceService(backbone, "tiny-bert", limits, chunk_size=3)


@pytest.fixture(scope="module")
def url(service):
    with serve_in_thread(create_app(service, {"alice": ALICE, "bob": BOB})) as base:
        yield base


def _remote(url: str, token: str = ALICE) -> RemoteIntrinsicClassifier:
    tokenizer = load_tokenizer("bundled:all-MiniLM-L6-v2")
    return RemoteIntrinsicClassifier(RemoteBackbone(url, token, retries=0), tokenizer, TEMPLATE, HEAD, SPEC)


def _body(remote: RemoteIntrinsicClassifier, **changes) -> bytes:
    batch = remote.encode_texts(TEXTS[:1])
    request = {
        "projection": SPEC.model_dump(),
        "head": HEAD.model_dump(),
        "z": [[0.0] * SPEC.dim],
        "input_ids": [batch["input_ids"][0].tolist()],
    }
    return json.dumps({**request, **changes}).encode()  # json.dumps writes NaN, as a careless client might


def _post(url: str, body: bytes, token: str | None = ALICE, path: str = "/v1/logits") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(url + path, content=body, headers=headers)


def test_remote_logits_and_losses_equal_the_local_backbones(url, backbone):
    remote = _remote(url)
    local = IntrinsicTextClassifier(
        backbone, IntrinsicPrompt.from_backbone(backbone, SPEC), build_head(backbone, HEAD), TEMPLATE
    )
    batch = remote.encode_texts(TEXTS)
    assert torch.equal(batch["input_ids"], local.encode_texts(TEXTS)["input_ids"])
    candidates = torch.randn(4, SPEC.dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        remote.population_logits(candidates, batch), local.population_logits(candidates, batch)
    )
    batch["labels"] = torch.tensor([1, 0, 1])
    torch.testing.assert_close(
        remote.population_losses(candidates, batch), local.population_losses(candidates, batch)
    )
    assert list(remote.state_dict()) == ["prompt.z"]
    torch.testing.assert_close(remote(batch), local(batch))


def test_each_client_has_its_own_query_counter(url):
    alice, bob = _remote(url, ALICE), _remote(url, BOB)
    before_alice, before_bob = alice.backbone.usage(), bob.backbone.usage()
    batch = {**alice.encode_texts(TEXTS), "labels": torch.tensor([0, 1, 0])}
    alice.population_losses(torch.zeros(5, SPEC.dim), batch)
    bob.population_logits(torch.zeros(2, SPEC.dim), batch)
    after_alice, after_bob = alice.backbone.usage(), bob.backbone.usage()
    assert after_alice.client == "alice" and after_bob.client == "bob"
    assert after_alice.queries - before_alice.queries == 5 * 3
    assert after_alice.requests - before_alice.requests == 1
    assert (
        after_bob.queries - before_bob.queries == 2 * 3 and after_bob.candidates - before_bob.candidates == 2
    )


def test_a_wrong_or_missing_token_is_refused(url):
    remote = _remote(url)
    assert _post(url, _body(remote), token="not-a-token-000000000").json() == {
        "detail": "the bearer token is not valid"
    }
    response = _post(url, _body(remote), token=None)
    assert response.status_code == 401 and "missing Authorization header" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url + "/v1/info", headers={"Authorization": "Basic abc"}).status_code == 401
    with pytest.raises(RemoteBackboneError, match=r"refused \(401\): the bearer token is not valid"):
        RemoteBackbone(url, "wrong-token-0000000000")


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"z": [[0.0] * 23]}, 422, "z[0] has 23 values; projection.dim is 24"),
        ({"z": [[0.0] * 23 + [math.nan]]}, 422, "z[0][23]: Input should be a finite number"),
        ({"z": [[0.0] * 24] * 9}, 422, "z holds 9 candidates; the limit is 8 per request"),
        (
            {"input_ids": [[101, 999_999, 103, 102]]},
            422,
            "input_ids[0] holds token id 999999; the vocabulary",
        ),
        ({"input_ids": [[101] * 40]}, 422, "input_ids[0] has 40 tokens; the model takes 1 to 32"),
        ({"input_ids": [[101, 2000, 102]]}, 422, "input_ids[0] has no mask token (id 103)"),
        (
            {"head": {"kind": "verbalizer", "label_words": [["good"], ["good"]]}},
            422,
            "head: label word 'good'",
        ),
        ({"weights": True}, 422, "weights: Extra inputs are not permitted"),
        ({"projection": {**SPEC.model_dump(), "dim": 1}}, 422, "projection.dim: Input should be greater"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_what_is_wrong(url, changes, status, message):
    response = _post(url, _body(_remote(url), **changes))
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_oversized_and_malformed_bodies_are_refused(url):
    remote = _remote(url)
    response = _post(url, _body(remote, z=[[0.5] * SPEC.dim] * 4000))
    assert response.status_code == 413 and "the limit is 65536" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"z": ['
        for _ in range(5000):
            yield b"[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],"

    streamed = httpx.post(url + "/v1/logits", content=chunks(), headers={"Authorization": f"Bearer {ALICE}"})
    assert streamed.status_code == 413 and "over the limit of 65536 bytes" in streamed.json()["detail"]
    bad = _post(url, b"{not json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["detail"]
    losses = _post(url, _body(remote, labels=[2]), path="/v1/losses")
    assert losses.status_code == 422 and "labels[0] is 2; the head has 2 classes" in losses.json()["detail"]
    with pytest.raises(RemoteBackboneError, match=r"refused \(422\): .*z holds 9 candidates"):
        remote.population_logits(torch.zeros(9, SPEC.dim), remote.encode_texts(TEXTS))


def test_no_route_exposes_weights_or_gradients(url, service, backbone):
    app_routes = {route.path for route in create_app(service, {"alice": ALICE}).routes}
    assert app_routes == set(ROUTES)
    headers = {"Authorization": f"Bearer {ALICE}"}
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/weights", "/v1/gradients"):
        assert httpx.get(url + path, headers=headers).status_code == 404
    info = httpx.get(url + "/v1/info", headers=headers).json()
    assert all(isinstance(value, int | str | bool) for value in info.values())
    assert info["backbone_bytes"] == backbone.num_bytes() and info["max_length"] == 32
    answer = _post(url, _body(_remote(url))).json()
    assert set(answer) == {"logits", "queries"} and torch.tensor(answer["logits"]).shape == (1, 1, 2)
    assert httpx.get(url + "/v1/health").json() == {"status": "ok"}


def test_client_retries_connection_errors_and_5xx_but_not_4xx():
    answers = iter([503, 502, 200])
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        code = next(answers)
        return httpx.Response(code, json={"detail": "busy"} if code != 200 else _INFO)

    RemoteBackbone("http://service", ALICE, retries=2, backoff=0.0, transport=httpx.MockTransport(flaky))
    assert calls == ["/v1/info"] * 3

    refused = httpx.MockTransport(lambda request: httpx.Response(422, json={"detail": "z[0] is wrong"}))
    calls.clear()
    with pytest.raises(RemoteBackboneError, match=r"refused \(422\): z\[0\] is wrong"):
        RemoteBackbone("http://service", ALICE, retries=3, backoff=0.0, transport=refused)

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RemoteBackboneError, match="failed after 3 attempts; last: ConnectError"):
        RemoteBackbone(f"http://127.0.0.1:{port}", ALICE, retries=2, backoff=0.0)


_INFO = {
    "model": "m",
    "hidden_size": 4,
    "vocab_size": 10,
    "max_length": 8,
    "is_decoder": False,
    "has_lm_head": True,
    "tokenizer_sha256": "0" * 64,
    "backbone_bytes": 1,
    "max_candidates": 1,
    "max_examples": 1,
    "max_queries": 1,
    "max_request_bytes": 1024,
}


def test_a_tokenizer_that_differs_from_the_served_models_is_refused(url):
    other = load_tokenizer("bundled:all-MiniLM-L6-v2")
    other.add_tokens(["brand-new-token"])
    with pytest.raises(RemoteBackboneError, match="vocabulary differs"):
        RemoteIntrinsicClassifier(RemoteBackbone(url, ALICE), other, TEMPLATE, HEAD, SPEC)


def test_token_parsing_names_the_problem():
    assert parse_tokens(f"alice:{ALICE}, bob:{BOB}", "X") == {"alice": ALICE, "bob": BOB}
    with pytest.raises(ValueError, match="X holds no tokens"):
        parse_tokens("", "X")
    with pytest.raises(ValueError, match="shorter than 16 characters"):
        parse_tokens("alice:short", "X")
    with pytest.raises(ValueError, match="entries are name:token"):
        parse_tokens(ALICE, "X")
    with pytest.raises(ValueError, match="share a token"):
        parse_tokens(f"a:{ALICE},b:{ALICE}", "X")


def test_the_serve_command_answers_and_refuses_to_start_without_tokens(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-c", "from fedprompt.cli import main; main()", "serve", "--port", str(port)]
    env = {**os.environ, "FEDPROMPT_API_TOKENS": f"alice:{ALICE}"}
    no_tokens = subprocess.run(
        command, env={**os.environ, "FEDPROMPT_API_TOKENS": ""}, capture_output=True, text=True, timeout=120
    )
    assert no_tokens.returncode == 2 and "FEDPROMPT_API_TOKENS holds no tokens" in no_tokens.stderr
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                info = httpx.get(
                    f"http://127.0.0.1:{port}/v1/info", headers={"Authorization": f"Bearer {ALICE}"}
                )
                break
            except httpx.ConnectError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.5)
        assert info.status_code == 200 and info.json()["hidden_size"] == 384
    finally:
        server.terminate()
        server.wait(timeout=30)
