"""Byzantine-robust rules: coordinate-wise median, coordinate-wise trimmed mean, and Krum.

All three are unweighted: every update counts once, whatever its ``num_examples``, since a
client that lies about its state can lie about its count just as easily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import flatten


def _sorted_stack(updates: Sequence[Update], name: str) -> torch.Tensor:
    """The updates' values of one tensor stacked on dim 0 in float64, sorted per coordinate."""
    stacked = torch.stack([update.state[name].detach().to("cpu", torch.float64) for update in updates])
    return torch.sort(stacked, dim=0).values


class CoordinateMedian(Strategy):
    """Coordinate-wise median of the client states (unweighted). Owns no server state.

    For an even number of updates a coordinate's median is the mean of its two middle values
    (NumPy's convention, which Flower's FedMedian uses), not torch.median's lower middle.
    """

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        n = len(updates)
        out: State = {}
        for name in global_state:
            values = _sorted_stack(updates, name)
            median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
            out[name] = median.to(torch.float32)
        return out


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (unweighted); owns ``beta``, the share trimmed at each end.

    Per coordinate, the floor(beta·n) largest and the floor(beta·n) smallest values are dropped
    and the rest averaged. ``beta`` = 0 is the plain unweighted mean. Requiring beta < 0.5 keeps
    at least one value for every n, even after floating-point rounding of beta·n.
    """

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(
                f"TrimmedMean beta must be in [0, 0.5), got {beta}; from 0.5 on, nothing would remain "
                "of an even number of updates"
            )
        self.beta = beta

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        n = len(updates)
        k = math.floor(self.beta * n)
        out: State = {}
        for name in global_state:
            kept = _sorted_stack(updates, name)[k : n - k]
            out[name] = (kept.sum(dim=0) / (n - 2 * k)).to(torch.float32)
        return out


class Krum(Strategy):
    """Krum (Blanchard et al., 2017) and Multi-Krum: the client states closest to their neighbours.

    Owns ``num_byzantine`` (f) and ``keep`` (m). Each update is scored by the sum of squared
    Euclidean distances, over all its tensors flattened together, to its n − f − 2 nearest other
    updates; Krum (m = 1) returns the state with the lowest score, Multi-Krum the unweighted mean
    of the m lowest-scored states (ties going to the lowest client id). Unweighted.

    Krum's resilience guarantee needs n ≥ 2f + 3 (the paper's n > 2f + 2), so fewer updates are
    rejected with ``ValueError`` rather than aggregated without the guarantee (the server then
    skips the round with that reason); m may not exceed n − f.
    """

    def __init__(self, num_byzantine: int = 0, keep: int = 1) -> None:
        if num_byzantine < 0:
            raise ValueError(f"Krum num_byzantine must be >= 0, got {num_byzantine}")
        if keep < 1:
            raise ValueError(f"Multi-Krum keep must be >= 1, got {keep}")
        self.num_byzantine = num_byzantine
        self.keep = keep

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        n, f = len(updates), self.num_byzantine
        if n < 2 * f + 3:
            raise ValueError(
                f"Krum with num_byzantine={f} needs at least 2f + 3 = {2 * f + 3} updates, got {n}; "
                "sample more clients or lower num_byzantine"
            )
        flat = torch.stack([flatten(update.state) for update in updates])
        distances = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n - 1):
            row = (flat[i + 1 :] - flat[i]).square().sum(dim=1)
            distances[i, i + 1 :] = row
            distances[i + 1 :, i] = row
        if self.keep > n - f:
            raise ValueError(f"Multi-Krum keeps {self.keep} updates, more than n − f = {n - f}")
        scores = []
        for i in range(n):
            others = torch.cat([distances[i, :i], distances[i, i + 1 :]])
            scores.append(torch.sort(others).values[: n - f - 2].sum().item())
        ranked = sorted(range(n), key=lambda i: (scores[i], updates[i].client_id))[: self.keep]
        out: State = {}
        for name in global_state:
            chosen = [updates[i].state[name].detach().to("cpu", torch.float64) for i in sorted(ranked)]
            out[name] = (sum(chosen) / len(chosen)).to(torch.float32)
        return out
