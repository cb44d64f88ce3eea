"""Which SuperNode hosts which partition, for the whole run: the first node that claims a partition
keeps it (trust on first use), bound to the node's public key when the grid reports one.

Flower 1.42's SuperLink knows every SuperNode by a public key (``NodeInfo.public_key``, which a
ServerApp reads with ``Grid.get_nodes()``):

- with SuperNode authentication (``flower-superlink --enable-supernode-auth``), the key is the one
  an account registered with ``flwr supernode register``; the SuperLink admits only nodes that
  prove they hold its private key, and maps it to a stable node id. A partition bound to that key
  is the registered site's: a node that restarts with its key gets its partition back (even under
  a new node id), and no other node can take it over, also not after the first one left;
- without authentication each SuperNode start makes a fresh key pair and registers itself, so the
  key says only "the same SuperNode process". The binding is then trust on first use: the first
  node to claim a partition keeps it for the run, a later claim by another node is refused and
  logged, and a node that drops off and comes back (the same process, so the same node id and
  key) gets it back. A restarted SuperNode is a new node and cannot reclaim its partition: use
  authentication where sites must restart, or release the partition by deleting its entry from
  the run folder's ``partitions.json`` before resuming.

With differential privacy or secure aggregation, trust on first use is not enough (a node that joins
first could squat a partition and its weight): the ServerApp then needs the run config ``node-keys``,
each partition's registered key, and binds a partition to the node with that key only; with
``--enable-supernode-auth`` only the holder of its private key connects with it. A grid that
reports no keys (tests, old simulations) binds to node ids. The binding also holds
the example count the site declared when it first claimed the partition (capped by
``robustness.max_examples``), which bounds that client's aggregation weight for the whole run; a
later, different declaration is ignored. A declaration far above the others' is reported at
registration: whatever a site declares, each round weighs it at most ``robustness.max_weight_ratio``
times the round's median count (``fedprompt.federation.update_pipeline.ExampleBounds``). The
bindings are kept with the run (``partitions.json`` in the run folder, rewritten atomically on every
change), so a resumed ServerApp keeps them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedprompt.files import write_text_atomically

log = logging.getLogger("fedprompt.flower")

BINDINGS_FILE = "partitions.json"
"""The run-folder file that keeps the partition bindings of a Flower run."""


@dataclass(frozen=True)
class NodeIdentity:
    """A SuperNode as the ServerApp sees it: its node id and its public key (empty when unknown)."""

    node_id: int
    public_key: bytes = b""

    def __str__(self) -> str:
        if not self.public_key:
            return f"node {self.node_id}"
        return f"node {self.node_id} (key {hashlib.sha256(self.public_key).hexdigest()[:16]})"

    def same_node(self, other: NodeIdentity) -> bool:
        """The same key when both have one, else the same node id."""
        if self.public_key and other.public_key:
            return self.public_key == other.public_key
        return self.node_id == other.node_id


@dataclass
class Binding:
    """The node a partition is bound to, and the example count it declared when it claimed it."""

    node: NodeIdentity
    num_examples: int | None


TRUST_ON_FIRST_USE = "trust-on-first-use"
"""The run config ``node-keys`` value that binds each partition to the first node claiming it."""


def load_node_keys(path: str | Path) -> dict[int, bytes]:
    """Partition -> the registered SuperNode public key (as the SuperLink reports it: PEM
    SubjectPublicKeyInfo) from a JSON file of OpenSSH public-key lines; ValueError naming what is
    wrong."""
    from cryptography.hazmat.primitives import serialization

    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict) or not raw:
            raise ValueError("it must map partition ids to OpenSSH public keys")
        keys = {}
        for partition, line in raw.items():
            key = serialization.load_ssh_public_key(str(line).strip().encode())
            keys[int(partition)] = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"node-keys {path}: {exc}") from None
    return keys


class PartitionBindings:
    """Owns the run's partition -> node bindings, the example counts declared at registration
    (``declared``: partition -> count, the live mapping the server's example bounds read), and the
    file they are kept in once the run has a folder."""

    def __init__(
        self,
        max_examples: int | None = None,
        max_ratio: float | None = None,
        pinned: dict[int, bytes] | None = None,
    ) -> None:
        self.max_examples = max_examples
        self.pinned = pinned
        """Partition -> its registered SuperNode public key (``node-keys``); None: trust on first use."""
        self.max_ratio = max_ratio
        """``robustness.max_weight_ratio``: what a declaration far above the others' is reported against."""
        self._reported: set[int] = set()
        self.bindings: dict[int, Binding] = {}
        self.declared: dict[int, int] = {}
        self.path: Path | None = None

    def claim(self, partition: int, node: NodeIdentity, num_examples: int | None) -> str | None:
        """Bind ``partition`` to ``node`` if it is free, or confirm the node it is bound to (whose
        node id may have changed); None when the claim holds, else why it is refused."""
        if self.pinned is not None and self.pinned.get(partition) != node.public_key:
            why = "is not in node-keys" if partition not in self.pinned else "is registered to another key"
            return f"{node} claims partition {partition}, which {why}; refused"
        for other, binding in self.bindings.items():
            if other != partition and binding.node.same_node(node):
                return f"{node} claims partition {partition} but already hosts partition {other}; refused"
        binding = self.bindings.get(partition)
        if binding is None:
            count = num_examples
            if count is not None and self.max_examples is not None:
                count = min(count, self.max_examples)
            self.bindings[partition] = Binding(node, count)
            if count is not None:
                self.declared[partition] = count
            log.info("partition %d bound to %s (declared examples: %s)", partition, node, count)
            self._save()
            return None
        if not binding.node.same_node(node):
            return (
                f"{node} claims partition {partition}, which is bound to {binding.node} since its first "
                "claim in this run; refused"
            )
        if num_examples != binding.num_examples and num_examples is not None:
            log.warning(
                "partition %d now declares %d examples; it keeps the %s it declared when it registered",
                partition,
                num_examples,
                binding.num_examples,
            )
        if binding.node != node:
            binding.node = node
            self._save()
        return None

    def report_outliers(self) -> None:
        """Warn once for each declaration beyond ``max_ratio`` times the median of the other
        declarations (or above it when there is no relative bound): each round weighs that partition
        at most the ratio times the round's median count."""
        for partition, count in sorted(self.declared.items()):
            others = [c for p, c in self.declared.items() if p != partition]
            if partition in self._reported or not others:
                continue
            median = statistics.median_low(others)
            if count <= (median if self.max_ratio is None else self.max_ratio * median):
                continue
            self._reported.add(partition)
            bound = (
                "robustness.max_weight_ratio is off, so max_examples alone bounds its weight"
                if self.max_ratio is None
                else f"each round weighs it at most {self.max_ratio:g} x the round's median count "
                "(robustness.max_weight_ratio)"
            )
            log.warning(
                "partition %d declared %d examples, %.3g x the median of the other declarations (%d); %s",
                partition,
                count,
                count / median,
                median,
                bound,
            )

    def attach(self, path: Path) -> None:
        """Keep the bindings in ``path`` from now on (written now, and on every change)."""
        self.path = path
        self._save()

    @classmethod
    def load(
        cls,
        path: Path,
        max_examples: int | None = None,
        max_ratio: float | None = None,
        pinned: dict[int, bytes] | None = None,
    ) -> PartitionBindings:
        """The bindings kept in ``path`` (a resumed run's), attached to it; ValueError names what is
        wrong with a damaged file."""
        bindings = cls(max_examples, max_ratio, pinned)
        try:
            raw = json.loads(path.read_text())
            for key, entry in raw["partitions"].items():
                node = NodeIdentity(int(entry["node_id"]), bytes.fromhex(entry["public_key"]))
                count = entry["num_examples"]
                if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                    raise ValueError(f"num_examples {count!r} of partition {key} is not a positive integer")
                bindings.bindings[int(key)] = Binding(node, count)
                if count is not None:
                    bindings.declared[int(key)] = count
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path} is not a partition-bindings file: {exc}") from None
        bindings.path = path
        return bindings

    def _save(self) -> None:
        if self.path is None:
            return
        entries = {
            str(partition): {
                "node_id": binding.node.node_id,
                "public_key": binding.node.public_key.hex(),
                "num_examples": binding.num_examples,
            }
            for partition, binding in sorted(self.bindings.items())
        }
        write_text_atomically(self.path, json.dumps({"partitions": entries}, indent=2) + "\n")
