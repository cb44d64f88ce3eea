"""Export a run's trained decoder soft prompt as the tensor a vLLM client sends as ``prompt_embeds``.

vLLM (started with ``--enable-prompt-embeds``) takes a prompt as the base64 of a ``torch.save``d
dense float tensor [tokens, hidden]: the client embeds its input with the model's input-embedding
table and puts the trained prompt vectors before it, exactly as fedprompt did in training. The
export writes:

- ``prompt_embeds.safetensors`` (``prompt_embeds`` [m, h], float32) and ``prompt_embeds.pt`` (the
  same tensor, ``torch.save``d: what goes before the input's embeddings in every request);
- ``vllm_prompt.json``: the template, the label words and their token ids, the tokenizer and the
  input-embedding table to use, and how fedprompt scores a class from them;
- ``check.json``: the first test inputs of the run and fedprompt's own class log-probabilities for
  them (the log-softmax over the classes of the label words' scores), computed here with the
  run's backbone;
- ``send_to_vllm.py``: a runnable example (torch, transformers, safetensors, httpx; no fedprompt)
  that sends each input of ``check.json`` to a vLLM server and checks its answer against
  fedprompt's.

Soft prompts (``prompt.kind: soft``) and intrinsic ones (``A z + p0`` rebuilt from the run's
seed) of decoders export; encoder prompts, deep and discrete prompts do not (vLLM serves decoders,
and ``prompt_embeds`` holds input embeddings only).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedprompt.config import (
    HFTextBackboneConfig,
    IntrinsicPromptConfig,
    LlamaCppBackboneConfig,
    RunConfig,
    SoftPromptConfig,
    VerbalizerHeadConfig,
    VLLMBackboneConfig,
    load_config,
)
from fedprompt.errors import ExportError, RunFolderError
from fedprompt.execution.results import FINAL_PROMPT_FILE, RunDirectory

PROMPT_FILE = "prompt_embeds.safetensors"
PROMPT_PT_FILE = "prompt_embeds.pt"
DESCRIPTION_FILE = "vllm_prompt.json"
CHECK_FILE = "check.json"
EXAMPLE_FILE = "send_to_vllm.py"
CHECK_INPUTS = 8
"""Test inputs whose class log-probabilities the export computes for the example to check."""


@dataclass(frozen=True)
class VLLMExport:
    """What an export wrote: the folder, the prompt's shape, and the tokenizer and embedding table a
    client needs."""

    folder: Path
    num_tokens: int
    hidden_size: int
    tokenizer: str
    embeddings: str

    def instructions(self) -> str:
        return (
            f"vLLM prompt written to {self.folder}: {self.num_tokens} prompt vectors of width "
            f"{self.hidden_size} ({PROMPT_PT_FILE}, also as {PROMPT_FILE}), to put before each input's "
            f"embeddings in prompt_embeds (vLLM with --enable-prompt-embeds). Embed inputs with "
            f"the tokenizer {self.tokenizer!r} and the input-embedding table {self.embeddings!r}.\n"
            f"Check it against a server: python {self.folder / EXAMPLE_FILE} --url http://HOST:PORT "
            f"--model SERVED_NAME (compares its answers with fedprompt's in {CHECK_FILE})."
        )


def export_vllm(run_dir: Path, out: Path) -> VLLMExport:
    """Write the final prompt of ``run_dir`` for vLLM clients into ``out`` (a new or empty folder)."""
    folder = RunDirectory.existing(run_dir)
    config = load_config(folder.read_config())
    tokenizer, embeddings = _sources(config)
    state = _final_state(folder)
    experiment, texts = _experiment_and_texts(config)
    model = experiment.model
    model.load_state_dict(
        {name: t.to(next(iter(model.state_dict().values())).device) for name, t in state.items()}
    )
    prompt = model.prompt().input.detach().float().cpu().contiguous()
    check = _fedprompt_answers(experiment, texts)
    words = _label_words(model, tokenizer)
    tokenization = _tokenization(model)

    _prepare_folder(out)
    save_file({"prompt_embeds": prompt}, str(out / PROMPT_FILE), {"format": "pt"})
    torch.save(prompt.clone(), out / PROMPT_PT_FILE)
    description = {
        "num_tokens": prompt.shape[0],
        "hidden_size": prompt.shape[1],
        "dtype": "float32",
        "placement": "before the input's token embeddings (before everything, as a decoder's prompt)",
        "tokenizer": tokenizer.path,
        "tokenizer_gguf_file": tokenizer.gguf_file,
        "embeddings": embeddings.path,
        "embeddings_gguf_file": embeddings.gguf_file,
        "template": config.head.template,
        "max_length": config.backbone.max_length,
        **tokenization,
        "labels": experiment.label_names,
        "label_words": words,
        "scoring": "a class's score is the mean, over its label words, of the log-probability of the "
        "word's first token (encoded with a leading space) as the next token; the class distribution is "
        "the softmax of the scores over the classes",
    }
    (out / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n")
    (out / CHECK_FILE).write_text(json.dumps(check, indent=1, ensure_ascii=False) + "\n")
    shutil.copyfile(Path(__file__).with_name("vllm_example.py"), out / EXAMPLE_FILE)
    return VLLMExport(out, prompt.shape[0], prompt.shape[1], tokenizer.path, embeddings.path)


@dataclass(frozen=True)
class _Source:
    """A tokenizer or an input-embedding table as a path the example reads without fedprompt (a
    bundled alias resolved), and the GGUF file in it, if any."""

    path: str
    gguf_file: str | None = None


def _sources(config: RunConfig) -> tuple[_Source, _Source]:
    """(tokenizer, input-embedding table) of an exportable run; ExportError for runs vLLM cannot serve."""
    from prompt_modules.bundled import resolve_model_name

    backbone, prompt = config.backbone, config.prompt
    if not isinstance(config.head, VerbalizerHeadConfig):
        raise ExportError(
            "vLLM answers next-token log-probabilities: export runs whose head is a verbaliser (label "
            "words); this one scores classes by similarity"
        )
    if not isinstance(prompt, SoftPromptConfig | IntrinsicPromptConfig):
        raise ExportError(
            f"prompt.kind {prompt.kind!r} is not a set of input vectors; vLLM's prompt_embeds takes soft "
            "(and intrinsic) prompts of decoders"
        )
    if isinstance(backbone, VLLMBackboneConfig):
        tokenizer = _Source(*resolve_model_name(backbone.tokenizer, None))
        return tokenizer, _Source(
            *resolve_model_name(backbone.embeddings, None)
        ) if backbone.embeddings else tokenizer
    if isinstance(backbone, HFTextBackboneConfig) and backbone.random_config is not None:
        raise ExportError("a randomly initialised backbone has no published model for vLLM to serve")
    if isinstance(backbone, HFTextBackboneConfig):
        from fedprompt.tasks.preflight import text_model_config
        from prompt_modules.hf_text import is_decoder_config

        model_config = text_model_config(backbone)
        if model_config is None or not is_decoder_config(model_config):
            raise ExportError(
                "vLLM serves decoders; this run's backbone.model is not one (or cannot be read here)"
            )
    if isinstance(backbone, HFTextBackboneConfig | LlamaCppBackboneConfig):
        model = _Source(*resolve_model_name(backbone.model, backbone.gguf_file))
        tokenizer = _Source(*resolve_model_name(backbone.tokenizer, None)) if backbone.tokenizer else model
        return tokenizer, model
    raise ExportError(
        f"backbone.kind {backbone.kind!r} has no published model for vLLM; export runs on hf-text decoders, "
        "llama-cpp or vllm backbones"
    )


def _final_state(folder: RunDirectory) -> dict[str, torch.Tensor]:
    file = folder.path / FINAL_PROMPT_FILE
    if not file.is_file():
        raise RunFolderError(
            f"{str(folder.path)!r} has no {FINAL_PROMPT_FILE}: the run has not finished (resume it with "
            f"fedprompt run --resume {folder.path})"
        )
    return load_file(str(file))


def _experiment_and_texts(config: RunConfig) -> tuple[Any, list[str]]:
    """The run's prompt module on its backbone (no client built) and the first test inputs' text."""
    from fedprompt.data.loading import load_text_classification
    from fedprompt.seeding import derive_seed
    from fedprompt.tasks.registry import build_experiment

    experiment = build_experiment(config, client_ids=set())
    data = load_text_classification(config.data, seed=derive_seed(config.seed, "data"))
    return experiment, list(data.test["text"][:CHECK_INPUTS])


@torch.inference_mode()
def _fedprompt_answers(experiment: Any, texts: list[str]) -> dict[str, Any]:
    rows = experiment.test_data.subset(list(range(len(texts))))
    batch = next(rows.batches(len(texts), device=experiment.device))
    experiment.model.eval()
    log_probs = torch.log_softmax(experiment.model(batch).float(), dim=-1).cpu()
    return {
        "texts": texts,
        "labels": experiment.label_names,
        "class_log_probs": log_probs.tolist(),
        "tolerance": 1e-3,
    }


def _tokenization(model: Any) -> dict[str, Any]:
    """How the run tokenised an input: the whole templated string (language-model backbones, as a
    server does) or the template's parts and the text apart (local backbones), and the special token
    ids it put around it."""
    specials = getattr(model, "_specials", None)
    if specials is not None:
        return {"tokenization": "whole", "special_ids_before": specials[0], "special_ids_after": specials[1]}
    backbone = model.backbone
    return {
        "tokenization": "parts",
        "special_ids_before": list(backbone.prefix_special_ids),
        "special_ids_after": list(backbone.suffix_special_ids),
    }


def _label_words(model: Any, tokenizer_name: str) -> dict[str, Any]:
    """Each class's label-word token ids (what the example asks vLLM for by id)."""
    labels = getattr(model, "labels", None)
    if labels is not None:  # a language-model backbone's module
        return {"token_ids": list(labels.ids), "classes": [list(c) for c in labels.classes]}
    head = model.head  # a local verbaliser head: word_ids [C, W] with weights
    ids, classes = [], []
    for row, weights in zip(head.word_ids.tolist(), head.word_weights.tolist(), strict=True):
        mine = []
        for token, weight in zip(row, weights, strict=True):
            if weight > 0:
                if token not in ids:
                    ids.append(token)
                mine.append(ids.index(token))
        classes.append(mine)
    return {"token_ids": ids, "classes": classes}


def _prepare_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{str(out)!r} is not an empty folder; choose a new one or remove it")
    out.mkdir(parents=True, exist_ok=True)
