"""Builtin datasets, built in memory from installed packages: nothing is downloaded or copied into the repo.

``chatterbot-corpus`` comes from the BSD-licensed ``chatterbot_corpus`` package: each English topic file
(``data/english/<topic>.yml``, with ``categories`` and ``conversations``) becomes one class, and every
statement of its conversations one example of that class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any

import datasets
import numpy as np
import yaml

CHATTERBOT_MAX_PER_TOPIC = 150
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_builtin(name: str, seed: int) -> datasets.Dataset:
    """Build the builtin dataset `name` (one split, columns ``text`` and ``label`` as a ClassLabel)."""
    try:
        loader = BUILTIN_LOADERS[name]
    except KeyError:
        raise ValueError(
            f"unknown builtin dataset {name!r}; choose one of {sorted(BUILTIN_LOADERS)}"
        ) from None
    return loader(seed)


def load_chatterbot_corpus(
    seed: int, max_per_topic: int | None = CHATTERBOT_MAX_PER_TOPIC
) -> datasets.Dataset:
    """The English chatterbot corpus as topic classification: one class per topic file.

    Each statement of a topic's conversations is one example labelled with the topic (the file stem,
    underscores as spaces: ``tech_support`` -> ``tech support``). Statements that are empty or not
    strings are dropped, whitespace is stripped and identical (text, label) pairs are kept once, in
    file order. A topic with more than `max_per_topic` examples keeps a seeded random choice of them
    (None keeps all). Classes are ordered by file name.

    Raises ModuleNotFoundError naming the package to install when ``chatterbot_corpus`` is missing.
    """
    try:
        root = resources.files("chatterbot_corpus") / "data" / "english"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the builtin dataset 'chatterbot-corpus' needs the chatterbot-corpus package: "
            "pip install chatterbot-corpus"
        ) from exc
    topic_files = sorted((f for f in root.iterdir() if f.name.endswith(".yml")), key=lambda f: f.name)
    rng = np.random.default_rng(seed)
    names: list[str] = []
    texts: list[str] = []
    labels: list[int] = []
    for label, topic_file in enumerate(topic_files):
        names.append(topic_file.name.removesuffix(".yml").replace("_", " "))
        document = yaml.load(topic_file.read_text(encoding="utf-8"), Loader=_YAML_LOADER) or {}
        statements = list(dict.fromkeys(_statements(document.get("conversations") or [])))
        if max_per_topic is not None and len(statements) > max_per_topic:
            keep = np.sort(rng.choice(len(statements), size=max_per_topic, replace=False))
            statements = [statements[i] for i in keep]
        texts.extend(statements)
        labels.extend([label] * len(statements))
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _statements(conversations: Iterable[Any]) -> Iterator[str]:
    """The stripped, non-empty string statements of a topic's conversations (a bare string is one)."""
    for conversation in conversations:
        for statement in conversation if isinstance(conversation, list) else [conversation]:
            if isinstance(statement, str) and statement.strip():
                yield statement.strip()


BUILTIN_LOADERS: dict[str, Callable[[int], datasets.Dataset]] = {"chatterbot-corpus": load_chatterbot_corpus}
BUILTIN_COLUMNS: dict[str, dict[str, str]] = {
    "chatterbot-corpus": {"text_column": "text", "label_column": "label"}
}
"""The columns each builtin text dataset has (the config's column fields are set to these)."""
