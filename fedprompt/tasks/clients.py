"""The clients of a task, built the same way for every task kind: which partitions a process
hosts, the training rows those need (encode only them), each client's seeded split into
training and held-out rows, and the ``Client`` on the one shared prompt module."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedprompt.config import RunConfig
from fedprompt.data.partition import few_labels, split_local
from fedprompt.seeding import derive_seed
from fedprompt.training.batching import TensorData
from fedprompt.training.client import Client
from fedprompt.training.gradient import LocalTrainer
from fedprompt.training.pseudo_labels import UNLABELLED
from prompt_modules.base import PromptModule


@dataclass(frozen=True)
class HostedRows:
    """The partitions a process builds clients for and the training rows they read: ``needed``,
    the sorted rows of the whole training set to encode, and each hosted client's rows as
    positions in ``needed`` (the encoded subset)."""

    needed: np.ndarray
    positions: dict[int, np.ndarray]

    @classmethod
    def of(cls, parts: Sequence[np.ndarray], client_ids: Collection[int] | None) -> HostedRows:
        """The clients of ``client_ids`` (all when None) and only the rows they hold."""
        hosted = [cid for cid in range(len(parts)) if client_ids is None or cid in client_ids]
        needed = np.unique(np.concatenate([parts[cid] for cid in hosted] or [np.zeros(0, np.int64)]))
        return cls(needed, {cid: np.searchsorted(needed, parts[cid]) for cid in hosted})

    @classmethod
    def of_all_rows(
        cls, parts: Sequence[np.ndarray], client_ids: Collection[int] | None, size: int
    ) -> HostedRows:
        """The clients of ``client_ids`` (all when None) on the whole training set of ``size`` rows."""
        hosted = [cid for cid in range(len(parts)) if client_ids is None or cid in client_ids]
        return cls(np.arange(size), {cid: np.asarray(parts[cid]) for cid in hosted})


@dataclass
class ClientData:
    """One client's share: its training and held-out data, and the class names its labels index
    when it scores only its own classes (None: the task's classes)."""

    train: TensorData
    val: TensorData | None
    class_names: list[str] | None = None
    unlabelled: TensorData | None = None


Prepare = Callable[[int, np.ndarray, np.ndarray], ClientData]
"""(client id, its training positions, its held-out positions) -> its data, for tasks that
relabel or augment a client's share; by default the rows of the encoded data as they are."""


def build_clients(
    config: RunConfig,
    model: PromptModule,
    data: TensorData | None,
    rows: HostedRows,
    trainer: Callable[[int], LocalTrainer],
    prepare: Prepare | None = None,
) -> dict[int, Client]:
    """A ``Client`` per hosted partition, its rows split (seeded by the run and the client) into
    training and held-out rows, on the shared ``model``; ``trainer(client_id)`` gives its local
    trainer. ``data`` is the encoded training subset (None only when no client is hosted). With
    ``data.labelled_per_class`` a client keeps that many labels per class of its training rows (a
    seeded choice) and holds the rest as unlabelled examples."""

    def plain(cid: int, train: np.ndarray, val: np.ndarray) -> ClientData:
        assert data is not None
        held_out = data.subset(val) if len(val) else None
        per_class = config.data.labelled_per_class
        if per_class is None:
            return ClientData(data.subset(train), held_out)
        labels = data.labels[torch.as_tensor(train)].numpy()
        kept = few_labels(labels, per_class, seed=derive_seed(config.seed, "labelled", cid))
        unlabelled = data.subset(train[~kept])
        unlabelled.tensors["labels"] = torch.full((len(unlabelled),), UNLABELLED, dtype=torch.long)
        return ClientData(data.subset(train[kept]), held_out, unlabelled=unlabelled)

    clients = {}
    for cid, positions in rows.positions.items():
        seed = derive_seed(config.seed, "local-split", cid)
        train, val = split_local(positions, config.partition.local_val_fraction, seed=seed)
        share = (prepare or plain)(cid, train, val)
        clients[cid] = Client(
            cid,
            share.train,
            share.val,
            model,
            trainer(cid),
            eval_batch_size=config.runtime.eval_batch_size,
            class_names=share.class_names,
            unlabelled_data=share.unlabelled,
        )
    return clients
