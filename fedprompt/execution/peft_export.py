"""Export a run's text soft prompt as a PEFT prompt-tuning adapter.

PEFT (``peft.PeftModel.from_pretrained``) reads ``adapter_config.json`` and
``adapter_model.safetensors``, whose one tensor ``prompt_embeddings`` [m, h] it puts before the
input embeddings of every row: before everything for decoders, as fedprompt does, and before
``[CLS]`` for encoders, as fedprompt does with ``prompt.placement: before-all``. The prompt then
gives the same hidden states and LM logits in PEFT as in fedprompt. The class head is not part of
a PEFT adapter: its label descriptions or label words go to ``fedprompt_head.json`` beside it.

Refused, with the reason: encoder prompts trained after ``[CLS]``, deep prompts, intrinsic prompts
and CLIP prompts, none of which PEFT's prompt tuning holds as they were trained. A GGUF backbone
exports too: transformers loads it as the base model with ``gguf_file=...``, dequantised as
fedprompt loads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from fedprompt.config import (
    HFTextBackboneConfig,
    RunConfig,
    SimilarityHeadConfig,
    SoftPromptConfig,
    load_config,
)
from fedprompt.errors import ExportError, RunFolderError
from fedprompt.execution.results import FINAL_PROMPT_FILE, SUMMARY_FILE, RunDirectory

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "fedprompt_head.json"
PROMPT_KEY = "prompt.embeddings"


@dataclass(frozen=True)
class PeftExport:
    """What an export wrote: the adapter's folder, its shape and task type, the base model to load it
    on (None for a random model), the transformers class to load that with, and the head file."""

    folder: Path
    num_tokens: int
    hidden_size: int
    task_type: str
    base_model: str | None
    auto_class: str
    head: dict[str, Any]

    def instructions(self) -> str:
        """What the user must keep and do, for the command's output."""
        base = self.base_model or "the same randomly initialised model (no name to load it by)"
        head = self.head
        gguf = f", gguf_file={head['gguf_file']!r}" if "gguf_file" in head else ""
        if head["kind"] == "similarity":
            kept = (
                f"the {len(head['labels'])} label descriptions, temperature {head['temperature']} and "
                f"{head['pooling']} pooling: encode the descriptions with the base model alone, score "
                "cosine similarity / temperature"
            )
        else:
            kept = (
                f"the label words of {len(head['labels'])} classes: score the mean LM logit of each "
                "class's words"
            )
        return (
            f"PEFT prompt-tuning adapter written to {self.folder}: {self.num_tokens} virtual tokens of "
            f"width {self.hidden_size}, task type {self.task_type}; load it with "
            f"PeftModel.from_pretrained({self.auto_class}.from_pretrained(<base>{gguf}), '{self.folder}') "
            f"on {base}.\n"
            f"Keep {self.folder / HEAD_FILE} with it: the class head is not part of a PEFT adapter, "
            f"and it holds {kept}."
        )


def export_peft(run_dir: Path, out: Path) -> PeftExport:
    """Write the final prompt of ``run_dir`` as a PEFT prompt-tuning adapter into ``out`` (a new or
    empty folder). Raises ExportError (or RunFolderError) saying why a run cannot be exported."""
    folder = RunDirectory.existing(run_dir)
    config = load_config(folder.read_config())
    backbone, soft_prompt = _exportable_parts(config)
    model_config = _model_config(backbone)
    decoder = _is_decoder(model_config)
    if not decoder and soft_prompt.placement != "before-all":
        raise ExportError(
            "this encoder prompt was trained after [CLS] (prompt.placement: after-cls); PEFT puts virtual "
            "tokens before [CLS], which would change every logit. Train with prompt.placement: before-all "
            "to export it"
        )
    prompt = _final_prompt(folder)
    labels = _label_names(folder)
    verbalizer = not isinstance(config.head, SimilarityHeadConfig)
    task_type = "CAUSAL_LM" if decoder and verbalizer else "FEATURE_EXTRACTION"
    auto_class = (
        "AutoModel" if not verbalizer else "AutoModelForCausalLM" if decoder else "AutoModelForMaskedLM"
    )
    base_model, gguf_file = _base_model(backbone)

    _prepare_folder(out)
    adapter_config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": backbone.revision,
        "inference_mode": True,
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": model_config.num_attention_heads,
        "num_layers": model_config.num_hidden_layers,
        "prompt_tuning_init": "RANDOM",  # PEFT initialises nothing in inference mode: the weights follow
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(
        {"prompt_embeddings": prompt.float().contiguous()}, str(out / ADAPTER_WEIGHTS_FILE), {"format": "pt"}
    )
    head = _head_description(config, backbone, labels, decoder, prompt.shape[0], auto_class)
    if gguf_file:
        head["gguf_file"] = gguf_file
    (out / HEAD_FILE).write_text(json.dumps(head, indent=2, ensure_ascii=False) + "\n")
    return PeftExport(out, prompt.shape[0], prompt.shape[1], task_type, base_model, auto_class, head)


def _exportable_parts(config: RunConfig) -> tuple[HFTextBackboneConfig, SoftPromptConfig]:
    """The run's Hugging Face backbone and soft prompt; ExportError for kinds PEFT's prompt tuning
    cannot hold."""
    kind = config.prompt.kind
    if kind == "deep":
        raise ExportError(
            "a deep prompt replaces the prompt positions at the input of every layer from start_layer; "
            "PEFT's prompt tuning holds input embeddings only, so it cannot hold this prompt"
        )
    if kind == "intrinsic":
        raise ExportError(
            "an intrinsic prompt is a vector z in a random projection that fedprompt rebuilds from the run "
            "seed; PEFT's prompt tuning holds soft prompts (prompt.kind: soft) only"
        )
    backbone, prompt = config.backbone, config.prompt
    if not isinstance(prompt, SoftPromptConfig) or not isinstance(backbone, HFTextBackboneConfig):
        raise ExportError(
            f"prompt.kind {kind!r} on a {backbone.kind} backbone has no PEFT counterpart; "
            "PEFT export takes text soft prompts (prompt.kind: soft) on Hugging Face models"
        )
    return backbone, prompt


def _model_config(backbone: HFTextBackboneConfig) -> Any:
    from fedprompt.tasks.preflight import text_model_config

    model_config = text_model_config(backbone)
    if model_config is None:
        raise ExportError(
            f"cannot read the configuration of backbone.model {backbone.model!r} here; the adapter needs "
            "its hidden size and layer count (run where the model folder or Hugging Face cache is)"
        )
    return model_config


def _is_decoder(model_config: Any) -> bool:
    from prompt_modules.hf_text import is_decoder_config

    return is_decoder_config(model_config)


def _final_prompt(folder: RunDirectory) -> torch.Tensor:
    file = folder.path / FINAL_PROMPT_FILE
    if not file.is_file():
        raise RunFolderError(
            f"{str(folder.path)!r} has no {FINAL_PROMPT_FILE}: the run has not finished (resume it with "
            f"fedprompt run --resume {folder.path})"
        )
    state = load_file(str(file))
    if set(state) != {PROMPT_KEY} or state[PROMPT_KEY].dim() != 2:
        raise ExportError(
            f"{file} holds {sorted(state)}, not one soft prompt {PROMPT_KEY!r} [tokens, hidden]"
        )
    return state[PROMPT_KEY]


def _label_names(folder: RunDirectory) -> list[str]:
    file = folder.path / SUMMARY_FILE
    labels = json.loads(file.read_text()).get("label_names") if file.is_file() else None
    if not labels:
        raise RunFolderError(
            f"{file} names no classes (label_names), so the head cannot be described; the run was made by "
            "an older fedprompt or has not finished"
        )
    return list(labels)


def _base_model(backbone: HFTextBackboneConfig) -> tuple[str | None, str | None]:
    """The name PEFT records as the base model (a Hub name or folder; a bundled model's folder) and
    the GGUF file in it that transformers loads (``from_pretrained(name, gguf_file=...)``)."""
    if backbone.random_config is not None:
        return None, None
    from prompt_modules.bundled import resolve_model_name

    return resolve_model_name(backbone.model, backbone.gguf_file)


def _head_description(
    config: RunConfig,
    backbone: HFTextBackboneConfig,
    labels: list[str],
    decoder: bool,
    num_tokens: int,
    auto_class: str,
) -> dict[str, Any]:
    """Everything besides the adapter that turns the model's outputs into the run's class scores."""
    from fedprompt.tasks.text.parts import head_spec

    spec = head_spec(config.head, labels)
    common = {
        "fedprompt_backbone": backbone.model,
        "load_with": auto_class,
        "labels": labels,
        "template": config.head.template,
        "max_length": backbone.max_length,
        "num_virtual_tokens": num_tokens,
    }
    if isinstance(config.head, SimilarityHeadConfig):
        return {
            "kind": "similarity",
            **common,
            "descriptions": dict(zip(labels, spec.descriptions, strict=True)),
            "temperature": config.head.temperature,
            "pooling": config.head.pooling,
            "cls_index": num_tokens,
            "scoring": "logit_c = cos(pool(h), pool(h_c)) / temperature; h: the adapter model's last "
            "hidden states over virtual tokens + input (mean: over all attended positions, virtual tokens "
            "included; cls: the [CLS] position, after the virtual tokens); h_c: description c encoded by "
            "the base model alone (model.get_base_model(), no virtual tokens)",
        }
    position = (
        "the next token after the input" if decoder else "the [MASK] position (after the virtual tokens)"
    )
    return {
        "kind": "verbalizer",
        **common,
        "label_words": dict(zip(labels, (list(words) for words in spec.label_words), strict=True)),
        "scoring": f"logit_c = mean over class c's words of the LM logit, at {position}, of the word's first "
        "sub-token (the word encoded with a leading space)",
    }


def _prepare_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{str(out)!r} is not an empty folder; choose a new one or remove it")
    out.mkdir(parents=True, exist_ok=True)
