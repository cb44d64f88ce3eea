"""Helpers of the Flower tests: a tiny job, a Flower app for it, and an in-memory Flower grid."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from flwr.app import Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from conftest import tiny_run_config, write_keyword_dataset


def write_dataset(path: Path) -> Path:
    """The keyword task of the other tests at 240 examples: enough for seconds-long Flower jobs."""
    return write_keyword_dataset(path, n=240)


FLOWER_SECTIONS: dict[str, dict[str, Any]] = {
    "prompt": {"num_tokens": 4},
    "data": {"test_fraction": 0.2},
    "federation": {"fraction": 1.0, "local_evaluation": False},
    "optimizer": {"lr": 0.05, "epochs": 1, "batch_size": 16, "max_steps": 2},
    "strategy": {"kind": "fedadam", "server_lr": 0.1},
    "runtime": {"device": "cpu"},
}
"""How the Flower jobs differ from the other tests' tiny run: smaller, all sampled, FedAdam."""


def tiny_config(data_file: Path, num_clients: int = 3, rounds: int = 2, **sections: dict) -> dict[str, Any]:
    """The tiny run of the other tests as a seconds-long Flower job (``FLOWER_SECTIONS``), with
    ``num_clients`` partitions, ``rounds`` rounds and ``sections`` merged on top."""
    merged = {name: dict(values) for name, values in FLOWER_SECTIONS.items()}
    merged["partition"] = {"num_clients": num_clients}
    merged["federation"]["rounds"] = rounds
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return {**tiny_run_config(data_file, **merged), "name": "flower-tiny", "seed": 3}


def assert_same_history(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Every per-round number of two runs is the same, but the wall-clock time."""
    for row, expected in zip(got, want, strict=True):
        assert {k: v for k, v in row.items() if k != "time_s"} == {
            k: v for k, v in expected.items() if k != "time_s"
        }


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
    the replies of the destination handlers (in reverse order, so no test relies on order);
    ``get_nodes`` reports each node's public key from ``keys`` (as a SuperLink does).
    """

    def __init__(self, nodes: dict[int, Handler], keys: dict[int, bytes] | None = None) -> None:
        self.nodes = nodes
        self.keys = keys or {}
        """Node id -> the public key the SuperLink knows it by (none: the grid reports no keys)."""
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

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=node, public_key=self.keys.get(node, b"")) for node in self.nodes]

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
    partition_configs: dict[int, dict[str, Any]] | None = None,
    first_node: int = 1001,
) -> dict[int, Handler]:
    """Node id -> a handler that runs ``client_app`` as the SuperNode hosting that partition
    (with ``node_config``, and ``partition_configs[partition]``, added to each node's config);
    node ids count from ``first_node`` in steps of 7."""
    node_ids = itertools.count(first_node, 7)
    nodes: dict[int, Handler] = {}
    for pid in partitions:
        context = Context(
            run_id=1,
            node_id=next(node_ids),
            node_config={
                "partition-id": pid,
                **(node_config or {}),
                **(partition_configs or {}).get(pid, {}),
            },
            state=RecordDict(),
            run_config=run_config,
        )
        nodes[context.node_id] = lambda message, node, context=context: client_app(message, context)
    return nodes


def as_flower_runtime(handler: Handler) -> Handler:
    """``handler`` answering as Flower's runtimes answer for a ClientApp that raises: an error reply
    whose reason is the exception's type and message (``flwr`` ``run_clientapp``), not a raise in
    the ServerApp's process."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    def handle(message: Message, node: int) -> Message | None:
        try:
            return handler(message, node)
        except Exception as exc:  # the runtime reports every failure of the app
            reason = f"{type(exc)}:<'{exc}'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)

    return handle
