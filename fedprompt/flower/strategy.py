"""The server side of fedprompt as a Flower message strategy: Flower carries the bytes, fedprompt decides.

Every decision a round needs is made by fedprompt's :class:`~fedprompt.federation.server.Server`, exactly as
in the in-process runtime: which clients take part (``Server.sample``, seeded by the run, never
Flower's unseeded node sampling), the downlink bytes and fit instructions, the validation of
every uplink payload, aggregation by the configured strategy in client-id order, and the
checkpoint. This module only maps fedprompt client ids (data partitions) to Flower node ids,
wraps the bytes in messages, and turns replies, errors and missing replies into accepted or
rejected updates.

A client that fails (an error reply), sends a bad payload, or does not answer before the round
timeout is logged and left out. The round is aggregated when at least ``federation.min_clients``
valid updates arrived ("enough"; a Poisson-sampled round with no client at all is aggregated too,
as differential privacy needs); with fewer, :class:`NotEnoughClientsError` stops the run and
the checkpoint of the last complete round stays on disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprompt.config import SecureAggregationConfig
from fedprompt.errors import PayloadError
from fedprompt.execution.metrics import client_evaluation_row, round_metrics, summarize_client_evaluations
from fedprompt.federation.payload import encode_state
from fedprompt.federation.server import RoundRecord, Server
from fedprompt.flower.bindings import NodeIdentity, PartitionBindings
from fedprompt.flower.records import (
    EVAL_INSTRUCTIONS_RECORD,
    EVAL_RECORD,
    INSTRUCTIONS_RECORD,
    evaluation_record,
    instructions_record,
    payload_content,
    payload_record,
    read_node_reply,
    read_payload,
)
from fedprompt.flower.rounds import NotEnoughClientsError, match_replies
from fedprompt.flower.secure_round import SecureRound

log = logging.getLogger("fedprompt.flower")

EVAL_WIRE_DTYPE = "float32"
"""Local evaluation gets the global state in fp32, as the in-process runtime evaluates it."""


class FedPromptStrategy(Strategy):
    """A Flower ``Strategy`` whose server-side logic is a fedprompt :class:`Server`.

    Owns the map from fedprompt client ids (data partitions) to the Flower nodes that host them,
    learnt by asking each new node for its ``partition-id`` (a query message) and held to the
    run's partition bindings (a partition stays with the node that first claimed it; the example
    count it declared then bounds its weight: the server's example bounds read them), and the
    messages of the round in progress. ``configure_train``/``aggregate_train`` and
    ``configure_evaluate``/``aggregate_evaluate`` follow Flower's strategy interface, so once
    ``map_nodes`` has run the strategy also runs under Flower's own ``Strategy.start`` loop (the
    fedprompt ServerApp uses its own loop, which also writes the run folder and can resume). The
    ``arrays`` Flower passes around hold the global prompt as fp32 payload bytes; the
    authoritative global state is the Server's.
    """

    def __init__(
        self,
        server: Server,
        *,
        num_rounds: int,
        evaluate_every: int = 1,
        local_evaluation: bool = True,
        message_ttl: float | None = None,
        bindings: PartitionBindings | None = None,
        secure: SecureAggregationConfig | None = None,
    ) -> None:
        self.server = server
        self.secure = secure
        """Secure aggregation's settings; when enabled, rounds run through ``train_round`` only."""
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        self.local_evaluation = local_evaluation
        self.message_ttl = message_ttl
        bounds = server.example_bounds
        self.bindings = bindings if bindings is not None else PartitionBindings(bounds.cap, bounds.max_ratio)
        """Which node each partition is bound to for the run, and the example count it declared."""
        server.example_bounds = replace(bounds, declared=self.bindings.declared)
        self.nodes: dict[int, int] = {}
        """fedprompt client id -> Flower node id of the connected SuperNode hosting that partition."""
        self._keys: dict[int, bytes] = {}
        self.last_record: RoundRecord | None = None
        self.before_uploads: Callable[[int], None] | None = None
        """Called with the round before it asks for uploads that sites answer once per round (masked
        inputs, local-DP updates; see ``flower.rounds``)."""
        """What happened to each sampled client in the last aggregated round."""
        self.last_evaluations: list[dict[str, Any]] = []
        """One clients.jsonl row per client evaluated in the last ``aggregate_evaluate``."""
        self._answered: set[int] = set()
        self._train: tuple[RoundRecord, dict[int, Message]] | None = None
        self._evaluate: dict[int, Message] = {}

    # ------------------------------------------------------------------ nodes <-> partitions

    def configure_query(self, grid: Grid) -> list[Message]:
        """Query messages asking each connected node not yet asked which partition it hosts.

        A partition whose node left the grid stays bound to it (see ``fedprompt.flower.bindings``)
        but is hosted by no one until that node comes back; a node that comes back is asked again.
        """
        self._keys = {int(info.node_id): bytes(info.public_key) for info in grid.get_nodes()}
        connected = set(self._keys)
        for cid, node in list(self.nodes.items()):
            if node not in connected:
                log.warning("node %d (client %d) left the federation; its partition waits for it", node, cid)
                del self.nodes[cid]
        self._answered &= connected
        return [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY, ttl=self.message_ttl)
            for node in sorted(connected - self._answered)
        ]

    def aggregate_query(self, replies: Iterable[Message]) -> None:
        """Record the partition each replying node claims, when the run's bindings allow it (in
        node-id order, so "first" is the same whatever order the replies came in); log and ignore
        claims of unknown partitions and claims the bindings refuse."""
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say which partition it hosts: %s", node, reply.error.reason)
                continue
            self._answered.add(node)
            try:
                cid, num_examples = read_node_reply(reply.content)
            except PayloadError as exc:
                log.warning("node %d sent a bad partition reply: %s", node, exc)
                continue
            if cid not in self.server.client_ids:
                log.warning(
                    "node %d hosts partition %d, which this run does not have (ids %d..%d); ignored",
                    node,
                    cid,
                    self.server.client_ids[0],
                    self.server.client_ids[-1],
                )
                continue
            refused = self.bindings.claim(cid, NodeIdentity(node, self._keys.get(node, b"")), num_examples)
            if refused is not None:
                log.warning(refused)
            else:
                self.nodes[cid] = node
        self.bindings.report_outliers()

    def map_nodes(self, grid: Grid, *, wait_for: int, timeout: float, reply_timeout: float) -> None:
        """Query new nodes until ``wait_for`` partitions are hosted or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.configure_query(grid)
            if messages:
                self.aggregate_query(grid.send_and_receive(messages, timeout=reply_timeout))
            if len(self.nodes) >= wait_for or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        log.info("partitions hosted: %s", dict(sorted(self.nodes.items())))
        if len(self.nodes) < self.server.min_clients:
            raise NotEnoughClientsError(
                f"after {timeout:.0f} s only {len(self.nodes)} SuperNodes name a partition of this run, "
                f"fewer than federation.min_clients={self.server.min_clients}; start one SuperNode per "
                "partition with --node-config 'partition-id=<id>'"
            )

    # ------------------------------------------------------------------ training

    def train_round(self, grid: Grid, server_round: int, timeout: float) -> RoundRecord:
        """Run and aggregate one training round through ``grid``: one message per sampled client, or
        the four stages of secure aggregation when it is enabled (``fedprompt.flower.secure_round``).
        Raises NotEnoughClientsError when too few clients remain."""
        if self.secure is not None and self.secure.enabled:
            return SecureRound(self, grid, server_round, self.secure, timeout).run()
        messages = self.configure_train(server_round, self.global_arrays(), ConfigRecord(), grid)
        if self.before_uploads is not None:
            self.before_uploads(server_round)
        self.aggregate_train(server_round, grid.send_and_receive(messages, timeout=timeout))
        assert self.last_record is not None
        return self.last_record

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per sampled client: the downlink bytes and its fit instructions.

        A sampled client whose partition no node hosts is rejected at once. Not for rounds with
        secure aggregation, which take several messages per client (``train_round``).
        """
        if self.secure is not None and self.secure.enabled:
            raise RuntimeError("a securely aggregated round has four stages; run it with train_round")
        record = self.server.begin_round(server_round)
        messages: dict[int, Message] = {}
        for cid in record.sampled:
            node = self.nodes.get(cid)
            if node is None:
                self.server.reject(record, cid, f"no SuperNode hosts partition {cid}")
                continue
            content = payload_content(
                self.server.downlink(server_round, cid),
                {INSTRUCTIONS_RECORD: instructions_record(cid, self.server.instructions(server_round, cid))},
            )
            messages[cid] = Message(
                content,
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
                ttl=self.message_ttl,
            )
        self._train = (record, messages)
        return list(messages.values())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply's bytes with the Server, reject failures, aggregate when enough remain.

        Raises NotEnoughClientsError when fewer than ``federation.min_clients`` updates (or than the
        clients sampled, when fewer were) are valid.
        """
        if self._train is None or self._train[0].round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        record, messages = self._train
        self._train = None
        for cid, reply in sorted(match_replies(messages, replies).items()):
            if reply is None:
                self.server.reject(record, cid, "no reply before the round timeout")
            elif reply.has_error():
                self.server.reject(record, cid, f"client failed: {reply.error.reason}")
            else:
                try:
                    data = read_payload(reply.content, self.server.max_bytes)
                except PayloadError as exc:
                    self.server.reject(record, cid, f"invalid payload: {exc}")
                else:
                    self.server.receive(record, cid, data)
        self.last_record = record
        if len(record.accepted) < min(self.server.min_clients, len(record.sampled)):
            raise NotEnoughClientsError(
                f"round {server_round}: {len(record.accepted)} valid updates from {len(record.sampled)} "
                f"sampled clients, fewer than federation.min_clients={self.server.min_clients}; "
                f"rejected: {record.rejected}"
            )
        self.server.aggregate(record)
        return self.global_arrays(), MetricRecord(numeric_metrics(round_metrics(self.server, record)))

    def global_arrays(self) -> ArrayRecord:
        """The global prompt state as an ArrayRecord of fp32 safetensors bytes."""
        return payload_record(encode_state(self.server.global_state, EVAL_WIRE_DTYPE))

    # ------------------------------------------------------------------ local evaluation

    def evaluation_due(self, server_round: int) -> bool:
        """Whether round ``server_round`` ends with an evaluation (round 0: the initial prompt)."""
        return server_round == 0 or server_round % self.evaluate_every == 0 or server_round == self.num_rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """When local evaluation is due: the fp32 global state to every node that hosts a partition."""
        self._evaluate = {}
        if not (self.local_evaluation and self.evaluation_due(server_round)):
            return []
        data = encode_state(self.server.global_state, EVAL_WIRE_DTYPE)
        self._evaluate = {
            cid: Message(
                payload_content(
                    data, {EVAL_INSTRUCTIONS_RECORD: evaluation_record(cid, self.server.accepted_round(cid))}
                ),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
                group_id=str(server_round),
                ttl=self.message_ttl,
            )
            for cid, node in sorted(self.nodes.items())
        }
        return list(self._evaluate.values())

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' evaluations summarised as the in-process runtime does (example-weighted
        local accuracy and loss, mean and worst client of each per-client accuracy), in client-id
        order; each client's row is kept in ``last_evaluations``."""
        messages, self._evaluate = self._evaluate, {}
        rows = []
        for cid, reply in sorted(match_replies(messages, replies).items()):
            if reply is None or reply.has_error():
                reason = "no reply" if reply is None else reply.error.reason
                log.warning("round %d: local evaluation of client %d failed: %s", server_round, cid, reason)
                continue
            try:
                metrics = _read_eval_metrics(reply.content)
            except PayloadError as exc:
                log.warning("round %d: client %d sent bad evaluation metrics: %s", server_round, cid, exc)
                continue
            if metrics is not None:
                rows.append(client_evaluation_row(server_round, cid, metrics))
        self.last_evaluations = rows
        summary = summarize_client_evaluations(rows)
        return MetricRecord(summary) if summary else None

    def summary(self) -> None:
        """Log what this strategy runs."""
        log.info(
            "fedprompt strategy %s over %d clients (fraction %g, min_clients %d, seed %d), %d rounds",
            type(self.server.strategy).__name__,
            len(self.server.client_ids),
            self.server.fraction,
            self.server.min_clients,
            self.server.seed,
            self.num_rounds,
        )


_EVAL_KEYS = ("accuracy", "loss", "num-examples")
_OPTIONAL_EVAL_KEYS = ("personal-accuracy", "finetuned-accuracy")


def _read_eval_metrics(content: RecordDict) -> dict[str, float] | None:
    """A local evaluation's accuracy, loss, example count and, when present, personal and fine-tuned
    accuracies (as ``personal_accuracy``, ...); None when the client has no held-out split."""
    if EVAL_RECORD not in content.metric_records:
        raise PayloadError(f"message has no {EVAL_RECORD!r} MetricRecord")
    record = content.metric_records[EVAL_RECORD]
    if not record:
        return None
    missing = [key for key in _EVAL_KEYS if key not in record]
    unexpected = sorted(set(record) - set(_EVAL_KEYS) - set(_OPTIONAL_EVAL_KEYS))
    if missing or unexpected:
        raise PayloadError(f"{EVAL_RECORD!r} misses {missing} or has unexpected keys {unexpected}")
    values = dict(record.items())
    bad = [k for k, v in values.items() if not isinstance(v, int | float) or not math.isfinite(v)]
    if bad or values["num-examples"] <= 0:
        raise PayloadError(f"{EVAL_RECORD!r} values must be finite with num-examples > 0, got {values}")
    accuracies = [k for k in values if k.endswith("accuracy") and not 0 <= values[k] <= 1]
    if accuracies:
        raise PayloadError(f"{EVAL_RECORD!r}: {accuracies} must lie in [0, 1]")
    return {key.replace("-", "_"): float(value) for key, value in values.items()}


def numeric_metrics(row: dict[str, Any]) -> dict[str, int | float]:
    """The numbers of a round's metrics row, what a Flower MetricRecord holds (a skipped round's
    ``aggregation_error`` text stays in the run's own history, which the ServerApp writes)."""
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
