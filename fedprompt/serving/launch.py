"""Start the inference service in the foreground (what ``fedprompt serve`` runs)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn

from fedprompt.errors import ConfigError
from fedprompt.serving.admission import Admission, AdmissionSettings
from fedprompt.serving.app import create_app
from fedprompt.serving.auth import parse_tokens
from fedprompt.serving.service import InferenceService, QueryQuotas, ServiceLimits
from fedprompt.serving.tls import TLSFiles, plain_http_warning
from prompt_modules.bundled import resolve_model_name
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.llama_cpp_backbone import LlamaCppBackbone

log = logging.getLogger("fedprompt.serving")


@dataclass(frozen=True)
class ServeSettings:
    """What ``fedprompt serve`` loads and where and how it listens; tokens come from the
    ``tokens_env`` variable. ``usage_file``: JSON of every client's counters, kept current."""

    model: str = "bundled:all-MiniLM-L6-v2"
    lm_head: bool = False
    max_length: int = 64
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    tokens_env: str = "FEDPROMPT_API_TOKENS"
    chunk_size: int = 10
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    quotas: QueryQuotas = field(default_factory=QueryQuotas)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    tls: TLSFiles | None = None
    usage_file: Path | None = None
    engine: str = "transformers"


def build_service(settings: ServeSettings) -> tuple[InferenceService, dict[str, str]]:
    """The service and its clients' tokens; ValueError (tokens, quotas, usage file) or
    BackboneLoadError (model) when they cannot be had, all checked before the model loads."""
    tokens = parse_tokens(
        os.environ.get(settings.tokens_env, ""), f"the environment variable {settings.tokens_env}"
    )
    unknown = sorted(set(settings.quotas.per_client) - set(tokens))
    if unknown:
        raise ConfigError(f"--client-quota names clients without a token: {unknown}; known: {sorted(tokens)}")
    if settings.usage_file is not None and not settings.usage_file.parent.is_dir():
        raise ConfigError(f"--usage-file {settings.usage_file}: its folder does not exist")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    backbone = _load_backbone(settings)
    service = InferenceService(
        backbone, settings.model, settings.limits, settings.chunk_size, settings.quotas, settings.usage_file
    )
    return service, tokens


def _load_backbone(settings: ServeSettings) -> HFTextBackbone | LlamaCppBackbone:
    """The frozen model on the asked engine: transformers (any Hugging Face text model, a GGUF
    dequantised), or llama.cpp (a GGUF file on its quantised kernels, CPU only)."""
    if settings.engine == "transformers":
        return HFTextBackbone.load(
            settings.model, head="lm" if settings.lm_head else "none", max_length=settings.max_length
        ).to(settings.device)
    if settings.engine != "llama-cpp":
        raise ConfigError(f"--engine must be transformers or llama-cpp, got {settings.engine!r}")
    if settings.device != "cpu":
        raise ConfigError("--engine llama-cpp computes on the CPU here; use --device cpu")
    path, gguf = resolve_model_name(settings.model, None)
    file = Path(path) / gguf if gguf else Path(path)
    if file.suffix != ".gguf" or not file.is_file():
        raise ConfigError(f"--engine llama-cpp needs a GGUF file as --model; {file} is not one")
    return LlamaCppBackbone(file, max_length=settings.max_length, context_length=settings.max_length + 1024)


def serve(settings: ServeSettings) -> None:
    """Load the backbone and answer requests until interrupted."""
    service, tokens = build_service(settings)
    warning = plain_http_warning(settings.host, settings.tls)
    if warning:
        log.warning(warning)
    log.warning(
        "serving %s on %s://%s:%d to %d clients (%s)",
        settings.model,
        "https" if settings.tls else "http",
        settings.host,
        settings.port,
        len(tokens),
        ", ".join(sorted(tokens)),
    )
    app = create_app(service, tokens, Admission(settings.admission))
    tls = settings.tls.uvicorn_options() if settings.tls else {}
    # proxy_headers off: uvicorn would trust X-Forwarded-For from 127.0.0.1 by default; the app
    # reads it only from the proxies the operator names (--trusted-proxy)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", proxy_headers=False, **tls)
