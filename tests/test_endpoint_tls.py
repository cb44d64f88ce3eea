"""The OpenAI-compatible backbones (``openai``, ``vllm``) over TLS, against a real HTTPS server on
loopback (the standard library's, with a throwaway CA from ``tls_support``) that answers the two
routes the adapter needs, ``/v1/models`` and ``/v1/completions``: the configured ``ca_file`` is
trusted and the system's CAs are not; a server that requires a client certificate refuses a party
without one (or with one another CA signed) and answers one with ``client_certfile``/``client_keyfile``.
Each refusal is a ServerError that names the field to set, before any request reaches the server."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from tls_support import Certificates

from fedprompt.config import ConfigError, load_config
from fedprompt.tasks.text.language_model import endpoint_client
from prompt_modules.label_scores import LabelWords
from prompt_modules.openai_client import ServerError
from prompt_modules.openai_scorer import OpenAIScorer

SERVED = "smollm2"
LABELS = LabelWords(ids=(5, 6), texts=(" negative", " positive"), classes=((0,), (1,)))


class _Completions(BaseHTTPRequestHandler):
    """The two routes the openai adapter uses; records each request that got through TLS."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).seen.append(f"GET {self.path}")
        self._answer({"object": "list", "data": [{"id": SERVED, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(f"POST {self.path} {body['prompt']}")
        logprobs = {"tokens": [" positive"], "top_logprobs": [{" positive": -0.25, " negative": -1.75}]}
        self._answer(
            {"choices": [{"text": " positive", "logprobs": logprobs}], "usage": {"prompt_tokens": 4}}
        )

    def _answer(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        return None


@contextmanager
def https_server(certs: Certificates, require_client_certificate: bool = False) -> Iterator[str]:
    """Serve ``_Completions`` over HTTPS on loopback with the server certificate of ``certs`` (and,
    for mutual TLS, only to clients whose certificate ``certs.ca`` signed); yield the base URL."""
    _Completions.seen = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs.ca)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Completions)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _backbone(url: str, kind: str = "openai", **tls):
    """The backbone section of a validated run configuration (its TLS fields as a user writes them)."""
    sections = {
        "backbone": {"kind": kind, "url": url, "model": SERVED, "retries": 2, **tls},
        "head": {
            "kind": "verbalizer",
            "template": "{text} Sentiment:",
            "label_words": {"negative": ["negative"], "positive": ["positive"]},
        },
        "prompt": {"kind": "discrete", "num_tokens": 2},
        "optimizer": {"kind": "bdpl"},
        "strategy": {"kind": "fedavg"},
    }
    return load_config(sections).backbone


@pytest.fixture
def certs(tmp_path) -> Certificates:
    return Certificates.generate(tmp_path / "certs")


@pytest.mark.parametrize("kind", ["openai", "vllm"])
def test_the_configured_ca_is_trusted_and_the_answer_comes_back(certs, kind):
    with https_server(certs) as url:
        client = endpoint_client(_backbone(url, kind, ca_file=str(certs.ca)))  # checks /v1/models
        try:
            scores = OpenAIScorer(client, SERVED, "completions", 5).score_texts(["a fine film"], LABELS)
        finally:
            client.close()
        assert scores.logprobs.tolist() == [[-1.75, -0.25]] and not bool(scores.floored.any())
        assert _Completions.seen == ["GET /v1/models", "POST /v1/completions a fine film"]
        assert client.usage.snapshot()["prompt_tokens"] == 4


def test_without_ca_file_the_system_trust_refuses_a_private_ca_at_once(certs):
    with https_server(certs) as url:
        with pytest.raises(ServerError) as refused:
            endpoint_client(_backbone(url))
        message = str(refused.value)
        assert message.startswith(f"GET {url}/v1/models: the server's TLS certificate is not trusted")
        assert "CERTIFICATE_VERIFY_FAILED" in message and message.endswith(
            "set backbone.ca_file to the certificate of the CA that signed it"
        )
        assert _Completions.seen == []  # nothing went out, and no retry was made


def test_mutual_tls_refuses_a_party_without_a_client_certificate_and_answers_one_with_it(certs, tmp_path):
    with https_server(certs, require_client_certificate=True) as url:
        with pytest.raises(ServerError) as missing:
            endpoint_client(_backbone(url, ca_file=str(certs.ca)))
        assert "the server requires a client certificate (mutual TLS) and this party sent none" in str(
            missing.value
        )
        assert str(missing.value).endswith(
            "set backbone.client_certfile and backbone.client_keyfile to a certificate (and its key) "
            "signed by a CA the server trusts"
        )
        stranger = Certificates.generate(tmp_path / "another-ca")  # a client certificate of another CA
        with pytest.raises(ServerError, match=r"set backbone\.client_certfile and backbone\.client_keyfile"):
            endpoint_client(
                _backbone(
                    url,
                    ca_file=str(certs.ca),
                    client_certfile=str(stranger.client_cert),
                    client_keyfile=str(stranger.client_key),
                )
            )
        assert _Completions.seen == []
        client = endpoint_client(
            _backbone(
                url,
                ca_file=str(certs.ca),
                client_certfile=str(certs.client_cert),
                client_keyfile=str(certs.client_key),
            )
        )
        try:
            scores = OpenAIScorer(client, SERVED, "completions", 5).score_texts(["dull"], LABELS)
        finally:
            client.close()
        assert scores.logprobs.tolist() == [[-1.75, -0.25]]
        assert _Completions.seen == ["GET /v1/models", "POST /v1/completions dull"]


def test_tls_files_that_do_not_load_are_named_before_any_connection(certs, tmp_path):
    url = "https://127.0.0.1:9"  # nothing listens: a connection would fail otherwise
    with pytest.raises(ConfigError, match=r"backbone\.ca_file: .*absent\.crt is not a file"):
        endpoint_client(_backbone(url, ca_file=str(tmp_path / "absent.crt")))
    with pytest.raises(ConfigError, match=r"backbone\.ca_file / client_certfile: the TLS files do not load"):
        endpoint_client(
            _backbone(url, client_certfile=str(certs.client_cert), client_keyfile=str(certs.key))
        )  # another certificate's key
    with pytest.raises(ConfigError, match="client_certfile and client_keyfile go together"):
        _backbone(url, client_certfile=str(certs.client_cert))
