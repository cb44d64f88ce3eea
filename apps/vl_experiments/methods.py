"""The methods the comparison runs, and each one's prompt, optimiser, strategy, vision and
personalisation settings.

The settings are those of the method's config in ``configs/`` (``promptfl.yaml``, ``vpt.yaml``,
``tpfl.yaml``, ``fedtpg.yaml``, ``fedapt.yaml``, ``fed-dpt.yaml``; ATPFL is ``tpfl.yaml`` with
``contrastive: true``; split prompts and the fine-tuned baseline are PromptFL with a
``personalization`` section), copied here so that the app runs from an installed package too;
``tests/test_vl_experiments.py`` checks that they agree. An experiment's own settings for a method
are merged over these, field by field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

MethodName = Literal[
    "zero-shot", "promptfl", "vpt", "tpfl", "atpfl", "fedtpg", "fedapt", "fed-dpt", "split", "finetuned"
]
ZERO_SHOT = "zero-shot"
SECTIONS = ("prompt", "optimizer", "strategy", "vision", "personalization")
"""The parts of a run that belong to a method; everything else is shared by all of them."""

_COSINE_AFTER_WARMUP: dict[str, Any] = {"kind": "cosine", "warmup_rounds": 1, "warmup_lr": 1.0e-5}
"""CoOp's and FedTPG's schedule: one round at 1e-5, then a cosine from lr down to 0 over the rest."""
_TPFL_PROMPT: dict[str, Any] = {
    "kind": "twin",
    "text": {"kind": "coop", "num_tokens": 16, "init": "random"},
    "visual": {"kind": "pixel", "method": "patch", "size": 10},
    "text_optimizer": {"lr": 0.002},
    "visual_optimizer": {"lr": 40.0},
    "contrastive": False,
    "contrast": "image-and-text",
    "ce_weight": 0.2,
    "temperature": 2.0,
}
_TPFL_OPTIMIZER: dict[str, Any] = {
    "kind": "gradient",
    "algorithm": "sgd",
    "lr": 0.002,
    "momentum": 0.9,
    "epochs": 1,
    "batch_size": 32,
    "grad_clip": None,
}

_PROMPTFL: dict[str, dict[str, Any]] = {
    "prompt": {
        "kind": "coop",
        "num_tokens": 16,
        "init": "random",
        "init_std": 0.02,
        "class_position": "end",
    },
    "optimizer": {
        "kind": "gradient",
        "algorithm": "sgd",
        "lr": 0.001,
        "momentum": 0.9,
        "epochs": 1,
        "batch_size": 32,
        "schedule": _COSINE_AFTER_WARMUP,
    },
    "strategy": {"kind": "fedavg", "weighting": "uniform"},
    "vision": {"augment": {"views": 8, "crop_scale": [0.08, 1.0], "flip": True}},
}

METHOD_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    ZERO_SHOT: {},
    "promptfl": _PROMPTFL,
    "vpt": {
        "prompt": {
            "kind": "vpt",
            "num_tokens": 8,
            "deep": True,
            "start_layer": 6,
            "dropout": 0.1,
            "placement": "after-ln-pre",
            "class_template": "a photo of a {}.",
        },
        "optimizer": {
            "kind": "gradient",
            "algorithm": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "epochs": 1,
            "batch_size": 32,
        },
        "strategy": {"kind": "fedavg"},
    },
    "tpfl": {"prompt": _TPFL_PROMPT, "optimizer": _TPFL_OPTIMIZER, "strategy": {"kind": "fedavg"}},
    "atpfl": {
        "prompt": {**_TPFL_PROMPT, "contrastive": True},
        "optimizer": _TPFL_OPTIMIZER,
        "strategy": {"kind": "fedavg"},
    },
    "fedtpg": {
        "prompt": {
            "kind": "generator",
            "num_tokens": 4,
            "heads": 4,
            "ff_mult": 4,
            "self_attention_layers": 0,
            "name_template": "{}",
        },
        "optimizer": {
            "kind": "gradient",
            "algorithm": "sgd",
            "lr": 0.003,
            "momentum": 0.9,
            "weight_decay": 0.00001,
            "epochs": 1,
            "batch_size": 32,
            "schedule": _COSINE_AFTER_WARMUP,
        },
        "strategy": {"kind": "fedavg", "weighting": "uniform"},
        "vision": {"client_classes": "own"},
    },
    "fedapt": {
        "prompt": {
            "kind": "fedapt",
            "context": {
                "kind": "coop",
                "num_tokens": 16,
                "init": "random",
                "init_std": 0.02,
                "class_specific": True,
            },
            "temperature": 0.01,
            "domain_loss_weight": 1.0,
            "test_mixture": "prompt",
        },
        "optimizer": {
            "kind": "gradient",
            "algorithm": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 0.00001,
            "epochs": 1,
            "batch_size": 32,
        },
        "strategy": {"kind": "fedavg", "weighting": "uniform"},
    },
    "fed-dpt": {
        "prompt": {
            "kind": "fed-dpt",
            "text": {"kind": "coop", "num_tokens": 16, "init": "random", "init_std": 0.02},
            "visual_start_layer": 0,
        },
        "optimizer": {
            "kind": "gradient",
            "algorithm": "adamw",
            "lr": 0.002,
            "weight_decay": 0.01,
            "epochs": 1,
            "batch_size": 32,
        },
        "strategy": {"kind": "fed-dpt", "momentum": 0.9, "weighting": "examples"},
    },
    "split": {**_PROMPTFL, "personalization": {"shared_tokens": 8}},
    "finetuned": {**_PROMPTFL, "personalization": {"finetune_steps": 20}},
}
"""Each method's sections, as in its config under ``configs/``."""

BASE_TO_NOVEL_METHODS = ("zero-shot", "promptfl", "vpt", "tpfl", "atpfl", "fedtpg")
"""The methods of an experiment that names none (the base-to-novel comparison's)."""

METHOD_TITLES = {
    ZERO_SHOT: "zero-shot CLIP",
    "promptfl": "PromptFL (CoOp)",
    "vpt": "VPT",
    "tpfl": "TPFL",
    "atpfl": "ATPFL",
    "fedtpg": "FedTPG",
    "fedapt": "FedAPT",
    "fed-dpt": "Fed-DPT",
    "split": "split prompt (8 shared + 8 local)",
    "finetuned": "PromptFL + fine-tune 20 steps",
}


def merge_settings(base: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` over ``base``, field by field; a section whose ``kind`` differs from the base's
    (another prompt kind, say) replaces it whole, since the base's fields would not fit it."""
    out = dict(base)
    for key, value in given.items():
        previous = out.get(key)
        same_kind = isinstance(value, Mapping) and value.get("kind", None) in (None, _kind(previous))
        if isinstance(previous, Mapping) and same_kind:
            out[key] = merge_settings(previous, value)
        else:
            out[key] = value
    return out


def _kind(section: Any) -> Any:
    return section.get("kind") if isinstance(section, Mapping) else None
