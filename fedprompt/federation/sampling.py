"""Which clients take part in a round: seeded by the run, never by the engine, except under central
differential privacy, where the sample comes from the operating system's randomness."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedprompt.federation.randomness import system_sample, system_uniform
from fedprompt.seeding import derive_seed


def sample_clients(
    client_ids: Sequence[int],
    fraction: float,
    min_clients: int,
    run_seed: int,
    round_num: int,
    *,
    system: bool = False,
) -> list[int]:
    """``max(min_clients, ceil(fraction · N))`` distinct clients (capped at N), sorted by id.

    The draw depends only on the run seed, the round and the id list, so every runtime
    (in-process or Flower) samples the same clients. With ``system`` it comes from the operating
    system's CSPRNG instead (central DP: the amplification by sampling that the accountant counts
    needs a sample that holders of the run seed cannot predict).
    """
    ids = sorted(client_ids)
    if not ids:
        raise ValueError("no clients to sample from")
    count = min(len(ids), max(min_clients, math.ceil(fraction * len(ids))))
    if count == len(ids):
        return ids
    if system:
        return system_sample(ids, count)
    rng = np.random.default_rng(derive_seed(run_seed, "sampling", round_num))
    return sorted(int(i) for i in rng.choice(ids, size=count, replace=False))


def poisson_sample_clients(
    client_ids: Sequence[int], rate: float, run_seed: int, round_num: int, *, system: bool = False
) -> list[int]:
    """Each client independently with probability ``rate`` (Poisson sampling), sorted by id.

    What DP-FedAvg's privacy accountant assumes: the round may have any number of clients, none
    included. One uniform draw per client in id order, seeded by the run and the round only, so
    every runtime samples the same clients; with ``system``, drawn from the operating system's
    CSPRNG (what a private run does by default: see :func:`sample_clients`).
    """
    if not 0 < rate <= 1:
        raise ValueError(f"a Poisson sampling rate lies in (0, 1], got {rate}")
    ids = sorted(client_ids)
    if not ids:
        raise ValueError("no clients to sample from")
    if system:
        draws = system_uniform(len(ids))
    else:
        draws = np.random.default_rng(derive_seed(run_seed, "poisson-sampling", round_num)).random(len(ids))
    return [cid for cid, u in zip(ids, draws, strict=True) if u < rate]
