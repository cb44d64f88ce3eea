"""One greedy token cannot starve the inference service: the model's turns go round-robin between
clients with a bounded number of requests each, /v1/health never waits for the model, projection
builds count by their size, and the failed-token lockout sees the client behind a trusted proxy.

No test here races a clock: threads are held at the model by an event and released by the test,
and every wait is for a state the test names (with a generous limit)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from test_serving_hardening import ALICE, BOB, SPEC, TOKENS, _auth, _request

from fedprompt.config import ConfigError
from fedprompt.serving import InferenceService, ServiceLimits, create_app, serve_in_thread
from fedprompt.serving.admission import Admission, AdmissionSettings, Refused
from fedprompt.serving.service import QueryQuotas
from fedprompt.serving.turns import FairTurns
from prompt_modules.hf_text import load_tokenizer

from conftest import TINY_BERT, tiny_backbone

CAROL = "carol-token-0123456789ab"


def wait_for(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Until ``condition()`` holds (threads reach the state the test set up); fail after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(TINY_BERT)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled:all-MiniLM-L6-v2")


@pytest.fixture
def serve():
    """Start an app on a free loopback port; returns an HTTP client for it (both closed at the end)."""
    with contextlib.ExitStack() as stack:

        def start(app) -> httpx.Client:
            url = stack.enter_context(serve_in_thread(app))
            return stack.enter_context(httpx.Client(base_url=url))

        yield start


def _held(turns: FairTurns, client: str = "operator") -> tuple[threading.Event, threading.Thread]:
    """A thread that takes the compute slot and holds it until the returned event is set."""
    release, taken = threading.Event(), threading.Event()

    def hold() -> None:
        with turns.turn(client):
            taken.set()
            release.wait(60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(30)
    return release, thread


def test_turns_go_round_robin_and_each_client_has_a_bounded_queue():
    turns = FairTurns(max_pending=3)
    release, holder = _held(turns, "alice")
    served: list[str] = []

    def request(client: str) -> threading.Thread:
        def run() -> None:
            with turns.turn(client):
                served.append(client)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    threads = [request("alice"), request("alice")]
    wait_for(lambda: turns.pending("alice") == 3, "alice's two requests waiting")
    with (
        pytest.raises(Refused, match="has 3 requests in progress or waiting, the most it may have") as busy,
        turns.turn("alice"),
    ):
        pass
    assert busy.value.status == 429 and busy.value.headers() == {"Retry-After": "1"}
    threads.append(request("bob"))
    wait_for(lambda: turns.pending("bob") == 1, "bob's request waiting")
    release.set()
    for thread in [holder, *threads]:
        thread.join(30)
    assert served == ["bob", "alice", "alice"]  # bob waited for the one request in progress only
    assert turns.pending("alice") == turns.pending("bob") == 0


def test_one_tokens_flood_leaves_another_tokens_requests_and_health_served(backbone, tokenizer, serve):
    # Today: one compute lock and no bound per token, so alice's waiting requests took the lock in
    # whatever order it woke them, bob's request queued behind all of them, and alice could queue
    # without limit.
    limits = ServiceLimits(max_candidates=8, max_examples=16, max_queries=64, max_pending=2)
    service = InferenceService(backbone, "tiny-bert", limits, chunk_size=3)
    client = serve(create_app(service, TOKENS))
    order: list[str] = []
    build = service._classifier
    service._classifier = lambda who, projection, head: (order.append(who), build(who, projection, head))[1]
    release, holder = _held(service.turns)
    results: dict[str, list[int]] = {"alice": [], "bob": []}

    def post(token: str, who: str) -> threading.Thread:
        def run() -> None:
            with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
                response = own.post("/v1/logits", json=_request(tokenizer, 2, 2), headers=_auth(token))
                results[who].append(response.status_code)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    threads = [post(ALICE, "alice"), post(ALICE, "alice")]
    wait_for(lambda: service.turns.pending("alice") == 2, "alice's two requests admitted")
    flooded = client.post("/v1/logits", json=_request(tokenizer, 2, 2), headers=_auth(ALICE))
    assert flooded.status_code == 429 and flooded.headers["retry-after"] == "1"
    assert "the most it may have at once (2)" in flooded.json()["detail"]
    threads.append(post(BOB, "bob"))
    wait_for(lambda: service.turns.pending("bob") == 1, "bob's request admitted")
    assert client.get("/v1/health").json() == {"status": "ok"}  # while the model is held
    assert client.get("/v1/usage", headers=_auth(BOB)).status_code == 200
    release.set()
    for thread in [holder, *threads]:
        thread.join(60)
    assert results == {"alice": [200, 200], "bob": [200]}
    assert order == ["bob", "alice", "alice"]


def test_projection_builds_count_by_their_size(backbone, tokenizer, serve):
    floats = SPEC.num_tokens * backbone.hidden_size * SPEC.dim
    quotas = QueryQuotas(projection_floats=floats * 2)
    service = InferenceService(backbone, "tiny-bert", ServiceLimits(), chunk_size=3, quotas=quotas)
    client = serve(create_app(service, TOKENS))
    post = lambda body: client.post("/v1/logits", json=body, headers=_auth(ALICE))  # noqa: E731
    assert post(_request(tokenizer, 1, 1)).status_code == 200
    assert post(_request(tokenizer, 1, 1)).status_code == 200  # built once, kept
    assert client.get("/v1/usage", headers=_auth(ALICE)).json()["projection_floats"] == floats
    other = {**SPEC.model_dump(), "seed": 6}
    assert post(_request(tokenizer, 1, 1, projection=other)).status_code == 200
    third = post(_request(tokenizer, 1, 1, projection={**SPEC.model_dump(), "seed": 7}))
    assert third.status_code == 429
    assert f"has had {2 * floats} projection floats drawn of its {2 * floats}" in third.json()["detail"]
    assert service.usage("bob").projection_floats == 0  # counted to whoever asked


def test_defaults_limit_rate_quota_and_queue(backbone):
    settings, quotas, limits = AdmissionSettings(), QueryQuotas(), ServiceLimits()
    assert settings.rate > 0 and quotas.default is not None and quotas.projection_floats is not None
    assert limits.max_pending >= 1
    assert QueryQuotas.from_options(0, [], 0) == QueryQuotas(default=None, projection_floats=None)


def test_behind_a_trusted_proxy_the_lockout_is_keyed_on_the_forwarded_client(backbone, serve):
    settings = AdmissionSettings(max_failures=2, lockout=30.0, trusted_proxies=("127.0.0.0/8",))
    assert settings.client_address("127.0.0.1", "198.51.100.1, 203.0.113.5") == "203.0.113.5"
    assert settings.client_address("127.0.0.1", "203.0.113.5, 127.0.0.2") == "203.0.113.5"
    assert settings.client_address("192.0.2.9", "203.0.113.5") == "192.0.2.9"  # not a trusted proxy
    assert settings.client_address("127.0.0.1", None) == "127.0.0.1"
    service = InferenceService(backbone, "tiny-bert", ServiceLimits(), chunk_size=3)
    client = serve(create_app(service, {**TOKENS, "carol": CAROL}, Admission(settings)))
    bad = {**_auth("not-a-valid-token-0000"), "X-Forwarded-For": "203.0.113.5"}
    assert [client.get("/v1/info", headers=bad).status_code for _ in range(2)] == [401, 401]
    locked = client.get("/v1/info", headers={**_auth(ALICE), "X-Forwarded-For": "203.0.113.5"})
    assert locked.status_code == 429 and "from 203.0.113.5" in locked.json()["detail"]
    other = client.get("/v1/info", headers={**_auth(BOB), "X-Forwarded-For": "198.51.100.7"})
    assert other.status_code == 200  # another client behind the same proxy is not locked out
    untrusted = create_app(service, TOKENS, Admission(AdmissionSettings(max_failures=2, lockout=30.0)))
    plain = serve(untrusted)
    for forged in ("192.0.2.1", "192.0.2.2"):  # a forged header does not escape the lockout
        assert (
            plain.get("/v1/info", headers={**_auth("x" * 20), "X-Forwarded-For": forged}).status_code == 401
        )
    assert plain.get("/v1/info", headers={**_auth(ALICE), "X-Forwarded-For": "192.0.2.3"}).status_code == 429
    with pytest.raises(ConfigError, match="--trusted-proxy"):
        AdmissionSettings(trusted_proxies=("not-an-address",))
