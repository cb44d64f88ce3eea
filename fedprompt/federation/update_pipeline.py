"""What happens to a client update between its arrival and aggregation, in one ordered pipeline
shared by every strategy and runtime.

1. the payload is decoded and validated (``fedprompt.federation.payload``: names, shapes, dtypes,
   finiteness, size, metadata and a cap on the metrics);
2. the client-reported metrics are range-checked (:func:`check_metrics`);
3. the strategy checks what it alone can (``Strategy.validate_update``);
4. the example count, the update's aggregation weight, is bounded by what the server knows of
   the client (:class:`ExampleBounds`), and clamping is reported; once the round's updates are in,
   a client of unknown size is also bounded relative to the round's median count;
5. the delta from the global prompt is clipped to a norm bound (:func:`clip_delta`), the bound
   that robustness and differential privacy share.

Then the strategy aggregates the accepted updates, and aggregation stages (server-side noise, a
privacy accountant) run on its result. A check that fails rejects that update with its reason;
the round goes on without it.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from fedprompt.federation.state import State, Update

RESERVED_METRICS = frozenset(
    {"round", "client_id", "accepted", "reason", "event", "bytes_up", "bytes_down", "num_examples"}
)
"""Names the server writes into a client's row of clients.jsonl; a client may not report them."""
_COUNT_METRICS = frozenset({"steps", "examples_seen", "queries", "generations"})


class UpdateRejected(ValueError):
    """An update that fails a pipeline check; the message says why."""


def check_metrics(metrics: Mapping[str, float]) -> None:
    """Raise UpdateRejected when a client metric uses a reserved name or is out of its range:
    accuracies in [0, 1], counts (steps, examples, queries) non-negative, losses and everything
    else finite (payload decoding already refused non-finite values)."""
    reserved = sorted(set(metrics) & RESERVED_METRICS)
    if reserved:
        raise UpdateRejected(f"metrics {reserved} are names the server writes; a client may not send them")
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise UpdateRejected(f"metric {name!r} is {value}, not a finite number")
        if re.search(r"accuracy$", name) and not 0 <= value <= 1:
            raise UpdateRejected(f"metric {name!r} is {value}; an accuracy lies in [0, 1]")
        if name in _COUNT_METRICS and value < 0:
            raise UpdateRejected(f"metric {name!r} is {value}; a count is never negative")


DEFAULT_MAX_WEIGHT_RATIO = 5.0
"""A client of unknown size weighs at most this many times the median count of its round (the
default of ``robustness.max_weight_ratio``)."""


@dataclass(frozen=True)
class ExampleBounds:
    """Owns what the server knows of each client's example count: the training-set sizes it knows
    itself (``known``: in-process, the partition sizes), what sites declared when they registered
    (``declared``, on Flower: a bound, not a fact), a cap for every client (``cap``:
    ``robustness.max_examples``), and how far a client of unknown size may outweigh its round
    (``max_ratio``). A client's weight is its claimed count clamped to its bound
    (:meth:`apply`), then, unless its size is ``known``, to ``max_ratio`` times the median count of
    the round's updates (:meth:`bound_round`), so no client of unknown size decides the global
    prompt by what it claims, even with nothing configured."""

    known: Mapping[int, int] | None = None
    cap: int | None = None
    declared: Mapping[int, int] | None = None
    max_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO

    def bound(self, client_id: int) -> int | None:
        """The largest count ``client_id`` may be weighted by before the round's relative bound."""
        bounds = [self.cap]
        for source in (self.known, self.declared):
            if source is not None and client_id in source:
                bounds.append(source[client_id])
        given = [b for b in bounds if b is not None]
        return min(given) if given else None

    def apply(self, update: Update) -> tuple[Update, int | None]:
        """(the update with its count clamped, the claimed count when it was clamped, else None)."""
        bound = self.bound(update.client_id)
        if bound is None or update.num_examples <= bound:
            return update, None
        return replace(update, num_examples=bound), update.num_examples

    def relative_limit(self, counts: Sequence[int]) -> int | None:
        """``max_ratio`` times the (lower) median of a round's counts, at least 1; None without a ratio."""
        if self.max_ratio is None or not counts:
            return None
        return max(1, math.floor(self.max_ratio * statistics.median_low(counts)))

    def bound_round(self, updates: Sequence[Update]) -> tuple[list[Update], dict[int, int]]:
        """(the round's updates with the count of each client of unknown size clamped to
        :meth:`relative_limit` of the round's counts, {client id: count before} of those clamped)."""
        limit = self.relative_limit([u.num_examples for u in updates])
        out, clamped = [], {}
        for update in updates:
            trusted = self.known is not None and update.client_id in self.known
            if limit is not None and not trusted and update.num_examples > limit:
                clamped[update.client_id] = update.num_examples
                update = replace(update, num_examples=limit)
            out.append(update)
        return out, clamped


def delta_norm(update: State, reference: State) -> float:
    """‖θ_k − θ‖₂ over every tensor together, in float64."""
    total = 0.0
    for name, tensor in update.items():
        diff = tensor.detach().to("cpu", torch.float64) - reference[name].detach().to("cpu", torch.float64)
        total += float(diff.square().sum())
    return math.sqrt(total)


def clip_delta(update: State, reference: State, bound: float) -> tuple[State, float]:
    """(θ + min(1, C/‖Δ‖)·Δ with Δ = θ_k − θ, ‖Δ‖). A delta within the bound comes back unchanged
    (bit for bit); a longer one is scaled onto the sphere of radius C and returned in float64, so
    its distance from θ is C to float64 rounding (strategies aggregate in float64)."""
    norm = delta_norm(update, reference)
    if norm <= bound:
        return update, norm
    scale = bound / norm
    clipped = {}
    for name, tensor in update.items():
        base = reference[name].detach().to("cpu", torch.float64)
        delta = tensor.detach().to("cpu", torch.float64) - base
        clipped[name] = base + scale * delta
    return clipped, norm
