"""Helpers of the Flower tests: a tiny job, a Flower app for it, and an in-memory Flower grid."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from conftest import TINY_BERT

WORDS = {
    "fruit": ["apple", "banana", "cherry"],
    "nature": ["river", "mountain", "forest"],
    "transport": ["car", "train", "plane"],
}


def write_dataset(path: Path, n: int = 240, seed: int = 0) -> Path:
    """A jsonl file of short keyword texts whose label the keywords name."""
    rng = random.Random(seed)
    labels = list(WORDS)
    with path.open("w") as out:
        for i in range(n):
            label = labels[i % len(labels)]
            words = rng.choices(WORDS[label], k=rng.randint(1, 3))
            out.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def tiny_config(data_file: Path, num_clients: int = 3, rounds: int = 2, **sections: dict) -> dict[str, Any]:
    """A seconds-long job on a tiny random BERT: Dirichlet partitions, fraction < 1, FedAdam."""
    config: dict[str, Any] = {
        "name": "flower-tiny",
        "seed": 3,
        "backbone": {
            "model": "random",
            "random_config": {**TINY_BERT, "initializer_range": 0.3},
            "max_length": 16,
        },
        "head": {
            "kind": "verbalizer",
            "template": "{text} [MASK]",
            "label_words": {"fruit": ["red"], "nature": ["green"], "transport": ["blue"]},
        },
        "prompt": {"kind": "soft", "num_tokens": 4, "init": "random", "init_std": 0.9},
        "data": {"source": "files", "files": {"train": str(data_file)}, "test_split": None},
        "partition": {"kind": "iid", "num_clients": num_clients, "local_val_fraction": 0.2},
        "federation": {"rounds": rounds, "fraction": 1.0, "min_clients": 2, "local_evaluation": False},
        "optimizer": {"lr": 0.05, "epochs": 1, "batch_size": 16, "max_steps": 2},
        "strategy": {"kind": "fedadam", "server_lr": 0.1},
        "runtime": {"progress": False, "device": "cpu"},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_app(directory: Path, config: dict[str, Any]) -> Path:
    """A Flower app for ``config``, written by fedprompt's own template."""
    from fedprompt.flower.template import new_app

    config_file = directory.parent / f"{directory.name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return new_app(directory, config_file)


Handler = Callable[[Message, int], Message | None]
"""(message, destination node id) -> its reply, or None for a node that never answers."""


class InMemoryGrid(Grid):
    """A Grid whose nodes are functions in this process, as Flower's strategy tests fake one.

    ``push_messages`` gives each message its id as Flower's grids do; ``send_and_receive`` returns
    the replies of the destination handlers (in reverse order, so no test relies on order).
    """

    def __init__(self, nodes: dict[int, Handler]) -> None:
        self.nodes = nodes
        self.sent: list[Message] = []

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.push_messages(messages)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            reply = self.nodes[node](message, node) if node in self.nodes else None
            if reply is not None:
                replies.append(reply)
        return replies[::-1]


def client_app_nodes(
    client_app: Any,
    partitions: Iterable[int],
    run_config: dict[str, Any],
    node_config: dict[str, Any] | None = None,
) -> dict[int, Handler]:
    """Node id -> a handler that runs ``client_app`` as the SuperNode hosting that partition
    (with ``node_config`` added to each node's config)."""
    node_ids = itertools.count(1001, 7)
    nodes: dict[int, Handler] = {}
    for pid in partitions:
        context = Context(
            run_id=1,
            node_id=next(node_ids),
            node_config={"partition-id": pid, **(node_config or {})},
            state=RecordDict(),
            run_config=run_config,
        )
        nodes[context.node_id] = lambda message, node, context=context: client_app(message, context)
    return nodes
