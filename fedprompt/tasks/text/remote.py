"""The prompt module of a run whose backbone is a remote inference service (``backbone.kind: remote``)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence

from fedprompt.config import (
    ConfigError,
    EndpointConfig,
    IntrinsicPromptConfig,
    RemoteBackboneConfig,
    RunConfig,
)
from fedprompt.tasks.text.parts import head_spec, z_generator
from fedprompt.training.blackbox import projection_spec, search_sigma
from prompt_modules.hf_text import load_tokenizer
from prompt_modules.remote import RemoteBackbone, RemoteIntrinsicClassifier, tls_context
from prompt_modules.remote_generator import RemoteGeneratedClassifier


def build_remote_model(
    config: RunConfig, backbone: RemoteBackboneConfig, label_names: Sequence[str]
) -> tuple[RemoteIntrinsicClassifier, int]:
    """Connect to the service (the token from ``backbone.token_env``), check that the local
    tokenizer matches the served model's, and build the intrinsic prompt module that queries it;
    also return the served backbone's size in bytes (as the service reports it)."""
    token = os.environ.get(backbone.token_env, "").strip()
    if not token:
        raise ConfigError(
            f"backbone.token_env: the environment variable {backbone.token_env} is empty or unset; "
            "put this party's bearer token for the inference service in it"
        )
    assert isinstance(config.prompt, IntrinsicPromptConfig)  # RunConfig guarantees it for remote backbones
    client = RemoteBackbone(
        backbone.url,
        token,
        timeout=backbone.timeout,
        retries=backbone.retries,
        backoff=backbone.backoff,
        tls=configured_tls(backbone) if backbone.url.startswith("https://") else None,
    )
    parts = (
        client,
        load_tokenizer(backbone.tokenizer),
        config.head.template,
        head_spec(config.head, label_names),
        projection_spec(config.prompt, config.seed, search_sigma(config.optimizer)),
    )
    if config.prompt.generator is not None:  # Fed-BBPT: the client's generator writes the z it sends
        return RemoteGeneratedClassifier(
            *parts, z_generator(config.prompt, config.seed)
        ), client.info.backbone_bytes
    return RemoteIntrinsicClassifier(*parts), client.info.backbone_bytes


def configured_tls(backbone: RemoteBackboneConfig | EndpointConfig) -> ssl.SSLContext:
    """The TLS trust (and client certificate) the configuration names; ConfigError naming the field
    whose file is missing or does not load."""
    files = {
        "ca_file": backbone.ca_file,
        "client_certfile": backbone.client_certfile,
        "client_keyfile": backbone.client_keyfile,
    }
    for name, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"backbone.{name}: {path} is not a file")
    cert = None
    if backbone.client_certfile is not None and backbone.client_keyfile is not None:
        cert = (backbone.client_certfile, backbone.client_keyfile)
    try:
        return tls_context(backbone.ca_file, cert)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"backbone.ca_file / client_certfile: the TLS files do not load: {exc}") from None
