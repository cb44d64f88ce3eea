"""Visual question answering with prompts on a frozen open_clip CLIP: config -> data, model, clients.

The sibling of ``tasks.clip.classification``. Each distinct image is encoded once into what the
prompt module's image side reads (features, hidden states below the first prompted layer, or
pixels), through the ``FeatureCache``; questions share their image's row of that table
(``QuestionData``), so an image asked about ten times is stored once. Questions are tokenised once,
with placeholders where the learned question context goes. Clients are the values of a field (organ,
modality, question type, shape, ...) or a partition of the questions; the server reports accuracy
overall, on closed and on open questions, and per question type, beside the majority-answer baseline
of each.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch

from fedprompt.config import ConfigError, RunConfig, VQAPromptConfig
from fedprompt.data.partition import partition_indices
from fedprompt.data.vqa import VQAData, load_vqa
from fedprompt.errors import DataError
from fedprompt.federation.strategies.registry import build_strategy
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.clients import HostedRows, build_clients
from fedprompt.tasks.clip.demo_backbone import backbone_notes
from fedprompt.tasks.clip.feature_cache import FeatureCache
from fedprompt.tasks.clip.parts import (
    build_text_context,
    build_visual_side,
    encoded_images,
    load_clip_backbone,
    part_settings,
)
from fedprompt.tasks.experiment import EvalSet, Experiment
from fedprompt.tasks.preflight import context_phrase
from fedprompt.training.batching import TensorData
from fedprompt.training.device import make_accelerator
from fedprompt.training.gradient import GradientTrainer, gradient_optimizer, round_schedule
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_text_context import FixedClassText
from prompt_modules.clip_vqa import CLIPVQAModel, JointQuery, QuestionContext
from prompt_modules.soft_prompt import init_prompt_embeddings
from prompt_modules.visual_prompts import FrozenImage


@dataclass
class QuestionData(TensorData):
    """Questions as aligned tensors (``question_ids``, ``closed``, ``labels``, ``image_index``) plus
    the image side's input of each distinct image, ``images`` (key -> [N_images, ...]), which a
    question reads through its ``image_index``. Subsets share the image tables."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)

    def subset(self, indices: Sequence[int] | np.ndarray) -> QuestionData:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return QuestionData({name: t[index] for name, t in self.tensors.items()}, self.images)

    def batches(self, batch_size: int, *, generator=None, device="cpu"):
        for batch in super().batches(batch_size, generator=generator, device=device):
            rows = batch["image_index"].cpu()
            batch.update({key: table[rows].to(device) for key, table in self.images.items()})
            yield batch


NO_VALUE = "(none)"
"""The client of rows whose client field is empty."""

# --------------------------------------------------------------------------- model


def build_vqa_model(config: RunConfig, backbone: OpenCLIPBackbone, data: VQAData) -> CLIPVQAModel:
    """The VQA prompt module the config asks for, scoring ``data``'s answer vocabulary."""
    prompt, seed = config.prompt, config.seed
    assert isinstance(prompt, VQAPromptConfig)  # the caller dispatches on the prompt kind
    generator = torch_generator(derive_seed(seed, "prompt-init", "question"))
    num_tokens, phrase = context_phrase(prompt.question, backbone.tokenizer, "prompt.question")
    question = QuestionContext(
        init_prompt_embeddings(
            backbone.token_embedding_matrix,
            num_tokens,
            prompt.question.init,
            generator=generator,
            text_ids=phrase,
            excluded_ids=backbone.special_token_ids,
            std=prompt.question.init_std,
        )
    )
    answers = data.answers
    if prompt.answer is None:
        answer = FixedClassText(prompt.answer_template)
    else:
        answer = build_text_context(
            prompt.answer, backbone, answers, derive_seed(seed, "answer"), "prompt.answer"
        )
    image = (
        FrozenImage()
        if prompt.visual is None
        else build_visual_side(prompt.visual, backbone, seed, "prompt.visual")
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "prompt-init", "fusion"))
        fusion = JointQuery(prompt.fusion, backbone.embed_dim, prompt.fusion_hidden)
    open_answers = sorted(
        {a for a, c in zip(data.train["answer"], data.train["closed"], strict=True) if not c}
    )
    settings = {
        "text": part_settings(prompt.text_optimizer),
        "image": part_settings(prompt.visual_optimizer),
        "fusion": part_settings(prompt.fusion_optimizer),
    }
    return CLIPVQAModel(
        backbone, question, answer, image, fusion, answers, data.closed_answers, open_answers, settings
    )


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class QuestionGroups:
    """Owns the groups each question belongs to, as indices a ``QuestionData`` carries: its question
    type (``types``, the training questions' types, sorted) and its client (``clients``, the values of
    the client field ``field``, when clients are formed from one). -1: none (no type, no field, or a
    test question whose value names no client)."""

    types: list[str]
    field: str | None = None
    clients: list[str] | None = None

    def type_index(self, split: datasets.Dataset) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.types)}
        return torch.tensor([index.get(t, -1) for t in split["question_type"]], dtype=torch.long)

    def client_index(self, split: datasets.Dataset) -> torch.Tensor:
        if self.field is None or self.clients is None:
            return torch.full((len(split),), -1, dtype=torch.long)
        index = {name: i for i, name in enumerate(self.clients)}
        values = [v if v is not None else NO_VALUE for v in split[self.field]]
        return torch.tensor([index.get(v, -1) for v in values], dtype=torch.long)


def question_data(
    model: CLIPVQAModel,
    split: datasets.Dataset,
    labels: np.ndarray,
    image_rows: dict[str, int],
    images: dict,
    groups: QuestionGroups,
) -> QuestionData:
    """A split's questions as tensors, reading images from the shared tables through ``image_rows``;
    ``question_type`` and ``client`` index ``groups``' types and clients (what per-client and per-type
    reports slice by; the model does not read them)."""
    return QuestionData(
        {
            "question_ids": model.tokenize_questions(split["question"]),
            "closed": torch.tensor(split["closed"], dtype=torch.bool),
            "labels": torch.as_tensor(labels, dtype=torch.long),
            "image_index": torch.tensor([image_rows[key] for key in split["image_key"]], dtype=torch.long),
            "question_type": groups.type_index(split),
            "client": groups.client_index(split),
        },
        images,
    )


def client_groups(
    data: VQAData, config: RunConfig, labels: np.ndarray
) -> tuple[list[np.ndarray], list[str] | None]:
    """Each client's training rows, and the field value that names each client (or None)."""
    field_name = config.data.vqa.client_field if config.data.vqa else None
    if field_name is None:
        return partition_indices(labels, config.partition, seed=derive_seed(config.seed, "partition")), None
    values = [v if v is not None else NO_VALUE for v in data.train[field_name]]
    names = sorted(set(values))
    if len(names) != config.partition.num_clients:
        raise ConfigError(
            f"partition.num_clients: data.vqa.client_field {field_name!r} has {len(names)} values "
            f"{names[:12]}: set partition.num_clients: {len(names)} (one client per value)"
        )
    array = np.asarray(values, dtype=object)
    return [np.flatnonzero(array == name) for name in names], names


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "none"


def evaluation_subsets(data: VQAData) -> dict[str, np.ndarray]:
    """Test rows of each reported subset: closed, open, and each question type (``type_<name>``)."""
    closed = np.asarray(data.test["closed"], dtype=bool)
    subsets = {"closed": np.flatnonzero(closed), "open": np.flatnonzero(~closed)}
    types = np.asarray([t if t is not None else "" for t in data.test["question_type"]], dtype=object)
    for name in sorted(set(types) - {""}):
        subsets[f"type_{_slug(name)}"] = np.flatnonzero(types == name)
    return {name: rows for name, rows in subsets.items() if len(rows)}


def majority_baselines(data: VQAData) -> dict[str, float]:
    """Accuracy of always giving the most common training answer of each subset (closed, open,
    each question type); ``global``: each test question gets its type's majority answer (its
    closed/open kind's when it has no type)."""
    train_types = _kinds(data.train)
    test_types = _kinds(data.test)
    majority = {
        kind: Counter(a for a, k in zip(data.train["answer"], train_types, strict=True) if k == kind)
        for kind in set(train_types)
    }
    top = {kind: counts.most_common(1)[0][0] for kind, counts in majority.items()}
    closed_top = _top(data.train, True)
    open_top = _top(data.train, False)
    answers, closed = data.test["answer"], data.test["closed"]
    results: dict[str, float] = {}
    correct = [a == top.get(k) for a, k in zip(answers, test_types, strict=True)]
    results["global"] = float(np.mean(correct)) if correct else 0.0
    for name, wanted in (("closed", True), ("open", False)):
        guess = closed_top if wanted else open_top
        rows = [a == guess for a, c in zip(answers, closed, strict=True) if c == wanted]
        if rows:
            results[name] = float(np.mean(rows))
    for kind in sorted(set(test_types)):
        if kind.startswith("type:"):
            rows = [a == top.get(kind) for a, k in zip(answers, test_types, strict=True) if k == kind]
            results[f"type_{_slug(kind.removeprefix('type:'))}"] = float(np.mean(rows))
    return results


def _kinds(split: datasets.Dataset) -> list[str]:
    return [
        f"type:{t}" if t is not None else ("closed" if c else "open")
        for t, c in zip(split["question_type"], split["closed"], strict=True)
    ]


def _top(split: datasets.Dataset, closed: bool) -> str | None:
    counts = Counter(a for a, c in zip(split["answer"], split["closed"], strict=True) if c == closed)
    return counts.most_common(1)[0][0] if counts else None


# --------------------------------------------------------------------------- experiment


def build_vqa_experiment(config: RunConfig, client_ids: Collection[int] | None = None) -> Experiment:
    """Load the questions and CLIP, build the VQA prompt module, encode each image once, make the clients."""
    accelerator = make_accelerator(config.runtime)
    data = load_vqa(config.data, seed=derive_seed(config.seed, "data"))
    backbone = load_clip_backbone(config.backbone, config.seed).to(accelerator.device)
    model = build_vqa_model(config, backbone, data)
    model.to(accelerator.device).eval()

    train_labels = data.labels(data.train)
    parts, names = client_groups(data, config, train_labels)
    rows = HostedRows.of(parts, client_ids)
    needed = rows.needed
    train = data.train.select(needed) if len(needed) != len(data.train) else data.train
    keys = list(dict.fromkeys([*train["image_key"], *data.test["image_key"]]))
    image_rows = {key: row for row, key in enumerate(keys)}
    distinct = _distinct_images(train, data.test, keys)
    cache = FeatureCache(config.backbone.feature_cache_dir)
    table = encoded_images(model, distinct, cache, config.runtime.eval_batch_size)
    images = {model.image_input.key: table}
    types = sorted({t for t in data.train["question_type"] if t is not None})
    field_name = config.data.vqa.client_field if config.data.vqa else None
    groups = QuestionGroups(types, field_name, names)
    train_data = question_data(model, train, train_labels[needed], image_rows, images, groups)
    test_data = question_data(model, data.test, data.labels(data.test), image_rows, images, groups)
    eval_sets = {
        name: EvalSet(test_data.subset(rows), list(data.answers))
        for name, rows in evaluation_subsets(data).items()
    }

    optimizer = gradient_optimizer(config.optimizer, accelerator)
    schedule = round_schedule(config.optimizer, config.federation.rounds)
    trainer = GradientTrainer(optimizer, config.optimizer.batch_size, accelerator.device, schedule)
    clients = build_clients(config, model, train_data, rows, lambda cid: trainer)
    notes: dict[str, Any] = {
        **backbone_notes(config.backbone),
        "majority_baseline": majority_baselines(data),
        "data_rows": {"train": len(data.train), "test": len(data.test), "skipped": len(data.bad_rows)},
        "question_types": types,
    }
    if names is not None:
        notes["clients"] = {str(cid): name for cid, name in enumerate(names)}
    return Experiment(
        model=model,
        clients=clients,
        test_data=test_data,
        strategy=build_strategy(config.strategy, run=config, prompt_tensors=model.prompt_tensor_names()),
        device=accelerator.device,
        backbone_bytes=backbone.num_bytes(),
        label_names=list(data.answers),
        eval_sets=eval_sets,
        notes=notes,
    )


def _distinct_images(train: datasets.Dataset, test: datasets.Dataset, keys: list[str]) -> datasets.Dataset:
    """One row per image key, in ``keys`` order, with the ``image`` column only."""
    both = datasets.concatenate_datasets(
        [train.select_columns(["image", "image_key"]), test.select_columns(["image", "image_key"])]
    )
    first: dict[str, int] = {}
    for row, key in enumerate(both["image_key"]):
        first.setdefault(key, row)
    if set(first) != set(keys):
        raise DataError("image keys disagree between the questions and their images")
    return both.select([first[key] for key in keys]).select_columns(["image"])
