"""Start the inference service in the foreground (what ``fedprompt serve`` runs)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import uvicorn

from fedprompt.serving.app import create_app
from fedprompt.serving.auth import parse_tokens
from fedprompt.serving.service import InferenceService, ServiceLimits
from prompt_modules.hf_text import HFTextBackbone

log = logging.getLogger("fedprompt.serving")


@dataclass(frozen=True)
class ServeSettings:
    """What ``fedprompt serve`` loads and where it listens; tokens come from the ``tokens_env`` variable."""

    model: str = "bundled:all-MiniLM-L6-v2"
    lm_head: bool = False
    max_length: int = 64
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    tokens_env: str = "FEDPROMPT_API_TOKENS"
    chunk_size: int = 10
    limits: ServiceLimits = field(default_factory=ServiceLimits)


def build_service(settings: ServeSettings) -> tuple[InferenceService, dict[str, str]]:
    """The service and its clients' tokens; ValueError (tokens) or BackboneLoadError (model) when they
    cannot be had, checked before the model loads for the tokens."""
    tokens = parse_tokens(
        os.environ.get(settings.tokens_env, ""), f"the environment variable {settings.tokens_env}"
    )
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    backbone = HFTextBackbone.load(
        settings.model, head="lm" if settings.lm_head else "none", max_length=settings.max_length
    ).to(settings.device)
    return InferenceService(backbone, settings.model, settings.limits, settings.chunk_size), tokens


def serve(settings: ServeSettings) -> None:
    """Load the backbone and answer requests until interrupted."""
    service, tokens = build_service(settings)
    log.warning(
        "serving %s on http://%s:%d to %d clients (%s)",
        settings.model,
        settings.host,
        settings.port,
        len(tokens),
        ", ".join(sorted(tokens)),
    )
    uvicorn.run(create_app(service, tokens), host=settings.host, port=settings.port, log_level="info")
