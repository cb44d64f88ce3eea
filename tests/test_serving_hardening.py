"""The inference service under pressure: TLS, quotas, request rates, failed tokens, replays, overflow.

Time is driven by a fake clock (no sleeping, no timing races); HTTPS runs on loopback with
certificates made in the test.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import torch
from tls_support import Certificates
from typer.testing import CliRunner

from fedprompt.cli import app as cli_app
from fedprompt.config import ConfigError, load_config
from fedprompt.serving import InferenceService, ServiceLimits, create_app, serve_in_thread
from fedprompt.serving.admission import Admission, AdmissionSettings, Refused, ReplayCache
from fedprompt.serving.service import QueryQuotas
from fedprompt.serving.tls import TLSFiles, plain_http_warning
from prompt_modules.heads import VerbalizerHeadSpec
from prompt_modules.hf_text import load_tokenizer
from prompt_modules.intrinsic import ProjectionSpec
from prompt_modules.remote import RemoteBackbone, RemoteBackboneError, RemoteIntrinsicClassifier, tls_context
from prompt_modules.remote_schema import LogitsRequest, LossRequest

from conftest import TINY_BERT, tiny_backbone

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
TOKENS = {"alice": ALICE, "bob": BOB}
SPEC = ProjectionSpec(seed=5, dim=24, num_tokens=3, scale=1.0)
HEAD = VerbalizerHeadSpec(label_words=(("bad",), ("good",)))
TEMPLATE = "{text} It was [MASK]."


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(TINY_BERT)


@pytest.fixture
def serve():
    """Start an app on a free loopback port; returns an HTTP client for it (both closed at the end)."""
    with contextlib.ExitStack() as stack:

        def start(app) -> httpx.Client:
            url = stack.enter_context(serve_in_thread(app))
            return stack.enter_context(httpx.Client(base_url=url))

        yield start


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled:all-MiniLM-L6-v2")


def _service(backbone, **kwargs) -> InferenceService:
    limits = ServiceLimits(max_candidates=8, max_examples=16, max_queries=64, max_request_bytes=64 * 1024)
    return InferenceService(backbone, "tiny-bert", kwargs.pop("limits", limits), chunk_size=3, **kwargs)


def _request(tokenizer, candidates: int, examples: int, value: float = 0.0, **changes) -> dict:
    ids = tokenizer(f"a fine film It was {tokenizer.mask_token}.")["input_ids"]
    body = {
        "projection": SPEC.model_dump(),
        "head": HEAD.model_dump(),
        "z": [[value] * SPEC.dim] * candidates,
        "input_ids": [ids] * examples,
    }
    return {**body, **changes}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------- TLS


def test_https_on_loopback_with_a_private_ca(tmp_path, backbone, tokenizer):
    certs = Certificates.generate(tmp_path / "certs")
    tls = TLSFiles.from_options(certs.cert, certs.key, None)
    with serve_in_thread(create_app(_service(backbone), TOKENS), tls=tls) as url:
        assert url.startswith("https://127.0.0.1:")
        remote = RemoteBackbone(url, ALICE, retries=0, tls=tls_context(certs.ca))
        model = RemoteIntrinsicClassifier(remote, tokenizer, TEMPLATE, HEAD, SPEC)
        logits = model.population_logits(torch.zeros(2, SPEC.dim), model.encode_texts(["fine", "awful"]))
        assert logits.shape == (2, 2, 2) and remote.usage().queries == 4
        remote.close()
        with pytest.raises(RemoteBackboneError, match=r"certificate is not trusted .*set backbone\.ca_file"):
            RemoteBackbone(url, ALICE, retries=3)  # the system's CAs do not know the test CA: no retry
        with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):
            httpx.get(url.replace("https", "http") + "/v1/health", verify=False)  # no plain HTTP


def test_mutual_tls_refuses_clients_without_a_certificate(tmp_path, backbone):
    certs = Certificates.generate(tmp_path / "certs")
    tls = TLSFiles.from_options(certs.cert, certs.key, certs.ca)
    with serve_in_thread(create_app(_service(backbone), TOKENS), tls=tls) as url:
        with_cert = RemoteBackbone(
            url, ALICE, retries=0, tls=tls_context(certs.ca, (certs.client_cert, certs.client_key))
        )
        assert with_cert.info.hidden_size == 32
        with_cert.close()
        with pytest.raises(
            RemoteBackboneError,
            match=r"requires a client certificate .*set backbone\.client_certfile and backbone\.client_keyf",
        ):
            RemoteBackbone(url, ALICE, retries=2, tls=tls_context(certs.ca))


def test_tls_options_are_checked_before_the_model_loads(tmp_path):
    certs = Certificates.generate(tmp_path / "certs")
    with pytest.raises(ValueError, match="TLS needs both --ssl-certfile and --ssl-keyfile"):
        TLSFiles.from_options(certs.cert, None, None)
    with pytest.raises(ValueError, match="--ssl-ca-certfile needs --ssl-certfile and --ssl-keyfile"):
        TLSFiles.from_options(None, None, certs.ca)
    with pytest.raises(ValueError, match=r"--ssl-keyfile .*absent\.key is not a file"):
        TLSFiles.from_options(certs.cert, tmp_path / "absent.key", None)
    with pytest.raises(ValueError, match="the TLS files do not load"):
        TLSFiles.from_options(certs.cert, certs.client_key, None)  # another certificate's key
    assert TLSFiles.from_options(None, None, None) is None


def test_plain_http_beyond_loopback_is_warned_about(tmp_path):
    for host in ("0.0.0.0", "::", "192.168.1.20", "model-host.example"):
        assert "plain HTTP on" in plain_http_warning(host, None)
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert plain_http_warning(host, None) is None
    certs = Certificates.generate(tmp_path / "certs")
    assert plain_http_warning("0.0.0.0", TLSFiles.from_options(certs.cert, certs.key, None)) is None


def test_remote_backbone_config_names_its_tls_files(tmp_path):
    with pytest.raises(ConfigError, match="ca_file apply to https urls"):
        load_config({"backbone": {"kind": "remote", "ca_file": "ca.crt"}})
    with pytest.raises(ConfigError, match="client_certfile and client_keyfile go together"):
        load_config({"backbone": {"kind": "remote", "url": "https://h:1", "client_certfile": "c.pem"}})


# --------------------------------------------------------------------------- admission


def test_request_rate_is_limited_per_client_with_retry_after(backbone, serve):
    clock = FakeClock()
    admission = Admission(AdmissionSettings(rate=2.0, burst=3), clock)
    client = serve(create_app(_service(backbone), TOKENS, admission))
    codes = [client.get("/v1/info", headers=_auth(ALICE)).status_code for _ in range(3)]
    refused = client.get("/v1/info", headers=_auth(ALICE))
    assert codes == [200, 200, 200] and refused.status_code == 429
    assert refused.headers["retry-after"] == "1"  # half a second, rounded up to whole seconds
    assert "over its rate of 2 requests per second" in refused.json()["detail"]
    assert client.get("/v1/info", headers=_auth(BOB)).status_code == 200  # each client its own bucket
    clock.advance(0.25)  # half a request back: still refused
    assert client.get("/v1/info", headers=_auth(ALICE)).status_code == 429
    clock.advance(0.25)
    assert client.get("/v1/info", headers=_auth(ALICE)).status_code == 200
    clock.advance(10.0)  # the bucket refills to its burst, no further
    codes = [client.get("/v1/usage", headers=_auth(ALICE)).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_repeated_invalid_tokens_lock_the_address_out_with_growing_delays(backbone, serve):
    clock = FakeClock()
    admission = Admission(AdmissionSettings(max_failures=3, lockout=2.0, max_lockout=5.0), clock)
    client = serve(create_app(_service(backbone), TOKENS, admission))
    bad = _auth("not-a-valid-token-0000")
    assert [client.get("/v1/info", headers=bad).status_code for _ in range(3)] == [401, 401, 401]
    locked = client.get("/v1/info", headers=_auth(ALICE))  # even a valid token, while locked out
    assert locked.status_code == 429 and locked.headers["retry-after"] == "2"
    assert "too many invalid tokens from 127.0.0.1" in locked.json()["detail"]
    clock.advance(2.0)
    assert client.get("/v1/info", headers=bad).status_code == 401  # the 4th failure: 4 s now
    assert client.get("/v1/info", headers=_auth(ALICE)).headers["retry-after"] == "4"
    clock.advance(4.0)
    assert client.get("/v1/info", headers=bad).status_code == 401  # the 5th: 8 s, capped at 5
    assert client.get("/v1/info", headers=_auth(ALICE)).headers["retry-after"] == "5"
    clock.advance(5.0)
    assert client.get("/v1/info", headers=_auth(ALICE)).status_code == 200  # a valid token clears it
    assert [client.get("/v1/info", headers=bad).status_code for _ in range(3)] == [401, 401, 401]
    assert client.get("/v1/info", headers=_auth(ALICE)).headers["retry-after"] == "2"


def test_query_quotas_are_exact_and_refuse_whole_requests(backbone, tokenizer, tmp_path, serve):
    usage_file = tmp_path / "usage.json"
    quotas = QueryQuotas(default=20, per_client={"bob": 100})
    client = serve(create_app(_service(backbone, quotas=quotas, usage_file=usage_file), TOKENS))
    post = lambda body, token=ALICE: client.post("/v1/logits", json=body, headers=_auth(token))  # noqa: E731
    assert post(_request(tokenizer, 3, 3)).json()["queries"] == 9
    assert post(_request(tokenizer, 3, 3)).status_code == 200
    refused = post(_request(tokenizer, 3, 3))
    assert refused.status_code == 429 and "retry-after" not in refused.headers
    assert refused.json()["detail"] == (
        "client 'alice' has used 18 of its 20 queries; this request needs 9: the query quota is exhausted"
    )
    assert post(_request(tokenizer, 2, 1)).status_code == 200  # exactly 20
    assert post(_request(tokenizer, 1, 1)).status_code == 429
    usage = client.get("/v1/usage", headers=_auth(ALICE)).json()
    assert (usage["queries"], usage["requests"], usage["query_quota"]) == (20, 3, 20)
    assert post(_request(tokenizer, 3, 3), BOB).status_code == 200  # bob's own quota
    assert client.get("/v1/usage", headers=_auth(BOB)).json()["query_quota"] == 100
    written = json.loads(usage_file.read_text())
    assert written["alice"]["queries"] == 20 and written["bob"]["queries"] == 9


def test_a_replayed_post_is_answered_from_memory_and_counted_once(backbone, tokenizer, serve):
    clock = FakeClock()
    admission = Admission(AdmissionSettings(replay_ttl=60.0), clock)
    service = _service(backbone)
    client = serve(create_app(service, TOKENS, admission))
    body = _request(tokenizer, 2, 3)
    headers = {**_auth(ALICE), "Idempotency-Key": "k-1"}
    first = client.post("/v1/logits", content=json.dumps(body), headers=headers)
    again = client.post("/v1/logits", content=json.dumps(body), headers=headers)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    usage = service.usage("alice")
    assert (usage.queries, usage.requests) == (6, 1)  # computed and counted once
    assert usage.bytes_received == 2 * len(json.dumps(body)) and usage.bytes_sent == 2 * len(first.content)
    other = client.post("/v1/logits", json=_request(tokenizer, 1, 3), headers=headers)
    assert other.status_code == 422 and "already used with another request body" in other.json()["detail"]
    bob = client.post("/v1/logits", json=body, headers={**_auth(BOB), "Idempotency-Key": "k-1"})
    assert bob.status_code == 200 and service.usage("bob").queries == 6  # keys are per client
    clock.advance(60.0)  # forgotten: the same key now runs (and counts) again
    assert client.post("/v1/logits", json=body, headers=headers).status_code == 200
    assert service.usage("alice").queries == 12


def test_replay_cache_refuses_a_key_in_progress_and_forgets_failed_requests():
    cache = ReplayCache(ttl=10.0, entries=2, clock=FakeClock())
    assert cache.begin("alice", "k", b"body") is None
    with pytest.raises(Refused) as in_progress:
        cache.begin("alice", "k", b"body")
    assert in_progress.value.status == 409 and in_progress.value.headers() == {"Retry-After": "1"}
    cache.finish("alice", "k", None)  # it failed: a retry runs it again
    assert cache.begin("alice", "k", b"body") is None
    cache.finish("alice", "k", {"queries": 1})
    assert cache.begin("alice", "k", b"body") == {"queries": 1}
    for key in ("a", "b"):  # at most 2 entries per client: the oldest goes
        cache.begin("alice", key, b"x")
    assert cache.begin("alice", "k", b"body") is None


# --------------------------------------------------------------------------- client side


def _mock(answers: list[httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    queue = iter(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return next(queue)

    return httpx.MockTransport(handle)


_INFO = {
    "model": "m",
    "hidden_size": 32,
    "vocab_size": 30522,
    "max_length": 32,
    "is_decoder": False,
    "has_lm_head": True,
    "tokenizer_sha256": "0" * 64,
    "backbone_bytes": 1,
    "max_candidates": 8,
    "max_examples": 16,
    "max_queries": 64,
    "max_request_bytes": 65536,
}


def test_client_waits_out_retry_after_and_repeats_its_idempotency_key(tokenizer):
    seen: list[httpx.Request] = []
    waits: list[float] = []
    answers = [
        httpx.Response(200, json=_INFO),
        httpx.Response(429, json={"detail": "over its rate"}, headers={"Retry-After": "3"}),
        httpx.Response(503, json={"detail": "busy"}),
        httpx.Response(200, json={"losses": [0.5], "queries": 1}),
    ]
    remote = RemoteBackbone(
        "http://service", ALICE, retries=2, backoff=0.25, transport=_mock(answers, seen), sleep=waits.append
    )
    request = LossRequest.model_validate(_request(tokenizer, 1, 1, labels=[1]))
    assert remote.losses(request).tolist() == [0.5]
    assert waits == [3.0, 0.5]  # Retry-After, then the backoff (0.25 doubled once)
    keys = {r.headers["idempotency-key"] for r in seen[1:]}
    assert len(keys) == 1 and len(next(iter(keys))) == 32


def test_client_reports_an_exhausted_quota_and_an_overlong_wait_at_once(tokenizer):
    request = LogitsRequest.model_validate(_request(tokenizer, 1, 1))
    for answer, message in [
        (httpx.Response(429, json={"detail": "has used 20 of its 20"}), "quota of this token is exhausted"),
        (
            httpx.Response(429, json={"detail": "locked out"}, headers={"Retry-After": "900"}),
            r"told to wait 900 s, over the 300 s this client waits",
        ),
    ]:
        waits: list[float] = []
        transport = _mock([httpx.Response(200, json=_INFO), answer], [])
        remote = RemoteBackbone("http://s", ALICE, retries=3, transport=transport, sleep=waits.append)
        with pytest.raises(RemoteBackboneError, match=message):
            remote.logits(request)
        assert waits == []
    seen: list[httpx.Request] = []
    limited = [httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "1"})] * 3
    remote = RemoteBackbone(
        "http://s",
        ALICE,
        retries=2,
        transport=_mock([httpx.Response(200, json=_INFO), *limited], seen),
        sleep=lambda s: None,
    )
    with pytest.raises(RemoteBackboneError, match=r"failed after 3 attempts; last: HTTP 429: slow down"):
        remote.logits(request)


class _LoseFirstAnswer(httpx.HTTPTransport):
    """Sends every request to the real service, but drops the connection after the first POST's
    answer arrived: the work was done, the client never saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and not self.dropped:
            response.read()
            self.dropped += 1
            raise httpx.RemoteProtocolError("the connection dropped before the answer", request=request)
        return response


def test_a_retried_post_whose_answer_was_lost_is_counted_once(backbone, tokenizer):
    service = _service(backbone)
    with serve_in_thread(create_app(service, TOKENS)) as url:
        transport = _LoseFirstAnswer()
        remote = RemoteBackbone(url, ALICE, retries=2, transport=transport, sleep=lambda s: None)
        model = RemoteIntrinsicClassifier(remote, tokenizer, TEMPLATE, HEAD, SPEC)
        batch = {**model.encode_texts(["fine", "awful", "so-so"]), "labels": torch.tensor([1, 0, 1])}
        losses = model.population_losses(torch.zeros(4, SPEC.dim), batch)
    assert transport.dropped == 1 and losses.shape == (4,)
    usage = service.usage("alice")
    assert (usage.requests, usage.queries) == (1, 4 * 3)


# --------------------------------------------------------------------------- values and sizes


def test_values_that_overflow_float32_are_refused_with_422(backbone, tokenizer, serve):
    service = _service(backbone)
    client = serve(create_app(service, TOKENS))
    body = json.dumps(_request(tokenizer, 1, 1)).replace("0.0, 0.0]", "0.0, 1e39]", 1)
    refused = client.post("/v1/logits", content=body, headers=_auth(ALICE))
    assert refused.status_code == 422
    assert refused.json()["detail"] == (
        "z[0][23]: 1e+39 overflows float32 (the largest magnitude is 3.4028235e+38)"
    )
    infinite = client.post("/v1/logits", content=body.replace("1e39", "1e400"), headers=_auth(ALICE))
    assert infinite.status_code == 422 and "z[0][23]: Input should be a finite number" in infinite.text
    assert service.usage("alice").queries == 0
    huge = client.post("/v1/logits", json=_request(tokenizer, 2, 1, value=3e38), headers=_auth(ALICE))
    assert huge.status_code == 422
    assert huge.json()["detail"].startswith("z[0] gives non-finite outputs")
    assert service.usage("alice").queries == 2  # computed, so counted


def test_the_projection_cap_is_configurable_and_named_when_exceeded(backbone, tokenizer, serve):
    assert ServiceLimits().max_projection_floats >= 50 * 1024 * 500  # BBT's reference setting fits
    cap = 50 * backbone.hidden_size * 500  # the reference shape on this model's width
    service = _service(backbone, limits=ServiceLimits(max_projection_floats=cap))
    client = serve(create_app(service, TOKENS))
    reference = {**SPEC.model_dump(), "num_tokens": 50, "dim": 500}
    fits = client.post(
        "/v1/logits",
        json=_request(tokenizer, 1, 1, projection=reference, z=[[0.01] * 500]),
        headers=_auth(ALICE),
    )
    assert fits.status_code == 200, fits.text
    over = client.post(
        "/v1/logits",
        json=_request(tokenizer, 1, 1, projection={**reference, "num_tokens": 51}, z=[[0.0] * 500]),
        headers=_auth(ALICE),
    )
    assert over.status_code == 422
    assert (
        f"= {51 * 32 * 500} floats; the limit is {cap} (the service's --max-projection-floats)"
        in (over.json()["detail"])
    )


def test_serve_refuses_bad_hardening_options_before_loading(monkeypatch):
    monkeypatch.setenv("FEDPROMPT_API_TOKENS", f"alice:{ALICE}")
    runner = CliRunner()
    for args, message in [
        (["--client-quota", "alice"], "--client-quota 'alice' is not NAME=QUERIES"),
        (["--client-quota", "carol=10"], "--client-quota names clients without a token: ['carol']"),
        (["--ssl-keyfile", "k.pem"], "TLS needs both --ssl-certfile and --ssl-keyfile"),
    ]:
        result = runner.invoke(cli_app, ["serve", "--model", "no-such-model-folder", *args])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
