"""Client partitions of a training set, made by Flower Datasets' partitioners.

Each function takes the training labels and returns, per client, a sorted int64 array of indices
into the training set. The rows are put in a seeded random order before the partitioner sees them
(as ``flwr_datasets.FederatedDataset`` does with ``shuffle=True``), so every kind, IID included,
is seeded: the same seed gives the same partition, another seed another one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import datasets
import numpy as np
import numpy.typing as npt
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from fedprompt.config import PartitionConfig
from fedprompt.errors import DataError

Labels = Sequence[int] | npt.NDArray[np.integer]


def partition_indices(labels: Labels, config: PartitionConfig, seed: int) -> list[npt.NDArray[np.int64]]:
    """Split the examples with these labels among `config.num_clients` clients.

    - ``iid``: ``IidPartitioner``, equal shares (sizes differ by at most one), disjoint and complete.
    - ``dirichlet``: ``DirichletPartitioner(alpha, partition_by="label", min_partition_size,
      self_balancing=False)``: each class is divided among clients in Dirichlet(alpha) shares,
      redrawn until every client has `min_partition_size` examples; disjoint and complete. Client
      sizes vary; with few classes among many clients at small alpha (2 classes, 50 clients, alpha
      0.1) almost every draw leaves some client empty, and the partition fails.
    - ``dirichlet_per_client``: ``InnerDirichletPartitioner`` (Hsu et al. 2019; FedDyn's split):
      each client draws its class mix from Dirichlet(alpha) and is filled to an equal size
      (n // num_clients, one more for the first n mod num_clients) one example at a time from the
      classes in that mix; a class that runs out is dropped from every mix. Disjoint and complete;
      every client holds data at any alpha, so it splits few classes among many clients.
    - ``shards``: ``ShardPartitioner(num_shards_per_partition=shards_per_client)``: the label-sorted
      examples are cut into k = num_clients * shards_per_client shards of floor(n / k) examples and
      each client gets shards_per_client random shards. Disjoint, but not complete: the n mod k
      examples that fill no shard are left out (every client gets exactly
      shards_per_client * floor(n / k) examples).
    - ``classes``: ``partition_by_class`` with `classes_per_client`: each client sees only the
      examples of its classes.
    - ``domains`` needs each example's domain, not its label: ``partition_by_domain``.

    Raises DataError when the examples cannot be split so (more clients than examples or shards
    than examples, or Dirichlet draws that never give every client `min_partition_size` examples).
    """
    if config.kind == "classes":
        return partition_by_class(labels, config.num_clients, config.classes_per_client, seed)
    if config.kind == "domains":
        raise DataError("partition.kind domains splits by each example's domain: use partition_by_domain")
    label_array = _as_labels(labels)
    n, clients = len(label_array), config.num_clients
    if clients > n:
        raise DataError(f"cannot split {n} examples among {clients} clients; lower partition.num_clients")
    partitioner: Partitioner
    if config.kind == "iid":
        partitioner = IidPartitioner(num_partitions=clients)
    elif config.kind == "dirichlet":
        if clients * config.min_partition_size > n:
            raise DataError(
                f"{clients} clients of at least partition.min_partition_size={config.min_partition_size} "
                f"examples need {clients * config.min_partition_size}, but there are {n}; "
                "lower min_partition_size or num_clients"
            )
        partitioner = DirichletPartitioner(
            num_partitions=clients,
            partition_by="label",
            alpha=float(config.alpha),
            min_partition_size=config.min_partition_size,
            self_balancing=False,
            seed=seed,
        )
    elif config.kind == "dirichlet_per_client":
        sizes = [n // clients + (i < n % clients) for i in range(clients)]
        partitioner = InnerDirichletPartitioner(
            partition_sizes=sizes, partition_by="label", alpha=float(config.alpha), seed=seed
        )
        # the partitioner reads classes as 0..C-1: number the classes present in order
        label_array = np.unique(label_array, return_inverse=True)[1].astype(np.int64)
    else:
        shards = clients * config.shards_per_client
        if shards > n:
            raise DataError(
                f"{clients} clients x {config.shards_per_client} shards need at least {shards} examples, "
                f"but there are {n}; lower partition.shards_per_client or num_clients"
            )
        partitioner = ShardPartitioner(
            num_partitions=clients,
            partition_by="label",
            num_shards_per_partition=config.shards_per_client,
            seed=seed,
        )
    try:
        return _partition(partitioner, label_array, clients, seed)
    except ValueError as exc:
        if config.kind == "dirichlet":
            raise DataError(
                f"Dirichlet partitioning (alpha={config.alpha}) of {n} examples among {clients} clients "
                f"never gave every client min_partition_size={config.min_partition_size} examples: {exc} "
                "Lower partition.min_partition_size or raise partition.alpha, or use kind: "
                "dirichlet_per_client (equal clients, each with its own Dirichlet class mix)."
            ) from exc
        raise DataError(f"cannot make {clients} {config.kind} partitions of {n} examples: {exc}") from exc


def partition_by_class(
    labels: Labels, num_clients: int, classes_per_client: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Give each client the examples of `classes_per_client` classes only (``PathologicalPartitioner``).

    Classes are assigned as in the paper the partitioner follows ("first-deterministic"): client i
    gets class i mod C and a seeded random choice of further classes; each class's examples are
    divided evenly among the clients that have it. Disjoint; complete when every class is drawn by
    some client, which is sure when num_clients >= C. Examples of a class no client draws are left
    out. Raises DataError when a class has fewer examples than clients that need it, or when
    `classes_per_client` exceeds the number of classes.
    """
    label_array = _as_labels(labels)
    if num_clients < 1 or classes_per_client < 1:
        raise DataError(
            f"need num_clients >= 1 and classes_per_client >= 1, got {num_clients}, {classes_per_client}"
        )
    if num_clients > len(label_array):
        raise DataError(f"cannot split {len(label_array)} examples among {num_clients} clients")
    partitioner = PathologicalPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=seed,
    )
    try:
        return _partition(partitioner, label_array, num_clients, seed)
    except ValueError as exc:
        raise DataError(
            f"cannot give {num_clients} clients {classes_per_client} classes each: {exc}"
        ) from exc


def partition_class_ranges(
    labels: Labels, class_ranges: Sequence[tuple[int, int]], classes_per_client: int, num_clients: int
) -> list[npt.NDArray[np.int64]]:
    """FedTPG's clients: each dataset's classes (a range [start, stop) of labels) are cut, in label
    order, into max(1, round(m / classes_per_client)) runs of `classes_per_client` classes, the
    last run taking the rest (m: the dataset's classes); each run is one client, which holds every
    example of its classes. Clients are numbered dataset by dataset.

    Raises DataError when that gives another number of clients than `num_clients` (the message
    says which number to set).
    """
    label_array = _as_labels(labels)
    runs: list[tuple[int, int]] = []
    for start, stop in class_ranges:
        count = max(1, round((stop - start) / classes_per_client))
        for i in range(count):
            runs.append(
                (
                    start + i * classes_per_client,
                    stop if i == count - 1 else start + (i + 1) * classes_per_client,
                )
            )
    if len(runs) != num_clients:
        sizes = [stop - start for start, stop in class_ranges]
        raise DataError(
            f"partition.num_clients is {num_clients}, but datasets of {sizes} training classes cut into "
            f"runs of classes_per_client={classes_per_client} make {len(runs)} clients (FedTPG: "
            f"round(classes / classes_per_client) per dataset, at least one); set partition.num_clients: "
            f"{len(runs)}"
        )
    return [
        np.flatnonzero((label_array >= start) & (label_array < stop)).astype(np.int64) for start, stop in runs
    ]


def partition_by_domain(
    domains: Labels, num_domains: int, clients_per_domain: int, num_clients: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Each domain its own clients (``partition.kind: domains``): the examples of domain d (its index
    in ``domains``, 0..num_domains-1) go to clients d·k .. d·k + k - 1 (k = clients_per_domain), in
    k near-equal seeded random shares (IID within the domain). Disjoint and complete: a client holds
    examples of one domain only, and every example of a domain is on one of its clients.

    Raises DataError when that gives another number of clients than ``num_clients`` (naming the
    number to set) or a domain has fewer examples than clients.
    """
    domain_array = _as_labels(domains)
    if num_clients != num_domains * clients_per_domain:
        raise DataError(
            f"partition.num_clients is {num_clients}, but {num_domains} domains × clients_per_domain "
            f"{clients_per_domain} make {num_domains * clients_per_domain} clients; set "
            f"partition.num_clients: {num_domains * clients_per_domain}"
        )
    parts: list[npt.NDArray[np.int64]] = []
    for domain in range(num_domains):
        rows = np.flatnonzero(domain_array == domain)
        if len(rows) < clients_per_domain:
            raise DataError(
                f"domain {domain} has {len(rows)} training examples for {clients_per_domain} clients; "
                "lower partition.clients_per_domain"
            )
        order = np.random.default_rng([seed, domain]).permutation(rows)
        parts.extend(np.sort(share).astype(np.int64) for share in np.array_split(order, clients_per_domain))
    return parts


def split_local(
    indices: npt.NDArray[np.integer], val_fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Split a client's indices into (train, validation), both sorted; a seeded random choice.

    Validation gets round(val_fraction * n) of the n indices (none when val_fraction is 0).
    Raises DataError when train would be empty.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    index_array = np.asarray(indices, dtype=np.int64)
    n_val = int(val_fraction * len(index_array) + 0.5)
    if n_val >= len(index_array):
        raise DataError(
            f"a client with {len(index_array)} examples has none left to train on after keeping {n_val} "
            "for validation; lower partition.local_val_fraction or give clients more data"
        )
    shuffled = np.random.default_rng(seed).permutation(index_array)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def _as_labels(labels: Labels) -> npt.NDArray[np.int64]:
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise DataError(f"labels must be a flat sequence of ints, got shape {array.shape} of {array.dtype}")
    return array.astype(np.int64)


def _partition(
    partitioner: Partitioner, labels: npt.NDArray[np.int64], clients: int, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Run a partitioner on the labels in a seeded random row order; read each partition's indices."""
    order = np.random.default_rng([seed, 1]).permutation(len(labels))  # a stream apart from the partitioner's
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    with warnings.catch_warnings():
        # Dirichlet warns on every redraw and Pathological on classes no client drew: both behaviours
        # are documented above, and a Dirichlet run that gives up raises, which is turned into DataError.
        warnings.simplefilter("ignore", UserWarning)
        parts = [partitioner.load_partition(i) for i in range(clients)]
    return [
        np.sort(np.asarray(part.with_format("arrow")["index"].to_numpy(), dtype=np.int64)) for part in parts
    ]


def few_labels(labels: Labels, per_class: int, seed: int) -> npt.NDArray[np.bool_]:
    """Which of a client's training examples keep their label when it holds ``per_class`` labels
    per class (FeS's few-shot clients): a seeded choice of min(per_class, n_c) examples of each class
    c, the rest unlabelled. A boolean mask over ``labels``."""
    label_array = _as_labels(labels)
    if per_class < 1:
        raise DataError(f"labelled_per_class must be at least 1, got {per_class}")
    order = np.random.default_rng(seed).permutation(len(label_array))
    kept = np.zeros(len(label_array), dtype=bool)
    taken: dict[int, int] = {}
    for position in order:
        label = int(label_array[position])
        if taken.get(label, 0) < per_class:
            kept[position] = True
            taken[label] = taken.get(label, 0) + 1
    return kept


def held_out_split(
    labels: Labels, per_class: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The rows a server keeps back to score candidate global prompts (``per_class`` of each class, a
    seeded choice) and the rest, which are partitioned among the clients: (held out, rest), each
    ascending. Every class must keep at least one example for the clients."""
    label_array = _as_labels(labels)
    classes, counts = np.unique(label_array, return_counts=True)
    short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n <= per_class}
    if short:
        raise DataError(
            f"federation.acceptance.held_out_per_class is {per_class}, which leaves no training example "
            f"for the clients in classes {sorted(short)} (examples per class: {short}); lower it"
        )
    kept = few_labels(label_array, per_class, seed)
    return np.flatnonzero(kept).astype(np.int64), np.flatnonzero(~kept).astype(np.int64)
