"""The prompt module of a run whose backbone is a remote inference service (``backbone.kind: remote``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from fedprompt.blackbox import projection_spec, search_sigma
from fedprompt.config import ConfigError, IntrinsicPromptConfig, RemoteBackboneConfig, RunConfig
from fedprompt.text_task import head_spec
from prompt_modules.hf_text import load_tokenizer
from prompt_modules.remote import RemoteBackbone, RemoteIntrinsicClassifier


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
        backbone.url, token, timeout=backbone.timeout, retries=backbone.retries, backoff=backbone.backoff
    )
    model = RemoteIntrinsicClassifier(
        client,
        load_tokenizer(backbone.tokenizer),
        config.head.template,
        head_spec(config.head, label_names),
        projection_spec(config.prompt, config.seed, search_sigma(config.optimizer)),
    )
    return model, client.info.backbone_bytes
