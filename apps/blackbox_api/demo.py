"""One-process demo: the inference service on loopback, and a FedBPT federation that queries it."""

from __future__ import annotations

import os
import secrets
from typing import Any

import fedprompt
from fedprompt.config import load_config
from fedprompt.serving import InferenceService, create_app, serve_in_thread
from fedprompt.tasks.text.parts import load_backbone

TOKEN_ENV = "FEDPROMPT_DEMO_TOKEN"


def demo_config(rounds: int = 3) -> dict[str, Any]:
    """The embedded default task (chatterbot topics, bundled MiniLM) tuned black-box by FedBPT."""
    return {
        "name": "blackbox-api-demo",
        "backbone": {"kind": "hf-text", "model": "bundled:all-MiniLM-L6-v2", "max_length": 48},
        "prompt": {"kind": "intrinsic", "dim": 500, "num_tokens": 5},
        "partition": {"kind": "iid", "num_clients": 3, "local_val_fraction": 0.0},
        "federation": {"rounds": rounds, "min_clients": 3, "local_evaluation": False},
        "optimizer": {"kind": "cmaes", "popsize": 8, "budget": 8 * 16 * 2, "batch_size": 16},
        "strategy": {"kind": "fedbpt"},
        "runtime": {"progress": False},
    }


def run_demo(rounds: int = 3) -> dict[str, Any]:
    """Serve the backbone in this process, run the federation against it over HTTP, and report."""
    local = load_config(demo_config(rounds))
    backbone = load_backbone(local.backbone, local.head.kind, local.seed)
    service = InferenceService(backbone, local.backbone.model)
    token = secrets.token_hex(16)
    os.environ[TOKEN_ENV] = token
    with serve_in_thread(create_app(service, {"demo-federation": token})) as url:
        remote = {**demo_config(rounds), "backbone": {"kind": "remote", "url": url, "token_env": TOKEN_ENV}}
        result = fedprompt.run(remote, write=False)
    usage = service.usage("demo-federation")
    return {
        "accuracy_by_round": result.metric("global_accuracy"),
        "queries_counted_by_the_service": usage.queries,
        "requests": usage.requests,
        "bytes_down_per_client_round": result.summary["bytes_down_per_client_round"],
        "bytes_up_per_client_round": result.summary["bytes_up_per_client_round"],
        "backbone_bytes": result.summary["backbone_bytes"],
    }
