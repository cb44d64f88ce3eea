"""Helpers for strategies that keep server state shaped like the prompt (a momentum buffer, a
control variate, FedDyn's h): checkpoint naming and validation, weighted sums of tensors, and a
state as one vector (for rules that measure distances or angles between whole states)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fedprompt.federation.state import State, Update


def zeros_like_state(state: State) -> State:
    """float32 CPU zeros of every tensor of ``state``."""
    return {name: torch.zeros(t.shape, dtype=torch.float32) for name, t in state.items()}


def with_prefix(state: State, prefix: str) -> State:
    """``<prefix><name>`` -> a copy of each tensor (what ``state_dict`` hands out)."""
    return {prefix + name: t.clone() for name, t in state.items()}


def load_with_prefix(state: State, prefixes: Sequence[str], owner: str) -> dict[str, State]:
    """Split a checkpointed strategy state into its ``prefix -> {name: tensor}`` parts, refusing
    keys of other prefixes, dtypes other than float32 and non-finite values."""
    parts: dict[str, State] = {prefix: {} for prefix in prefixes}
    for key, tensor in state.items():
        prefix = next((p for p in prefixes if key.startswith(p) and len(key) > len(p)), None)
        if prefix is None:
            forms = " or ".join(p + "<tensor>" for p in prefixes)
            raise ValueError(f"{owner} state key {key!r} is not of the form {forms}")
        if tensor.dtype != torch.float32:
            raise ValueError(f"{owner} state {key!r} has dtype {tensor.dtype}, expected torch.float32")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{owner} state {key!r} holds non-finite values")
        parts[prefix][key.removeprefix(prefix)] = tensor.detach().to("cpu").clone()
    return parts


def check_same_layout(owner: str, kept: State, global_state: State) -> None:
    """Raise ValueError when server state ``kept`` is for other tensors or shapes than the prompt."""
    if set(kept) != set(global_state) or any(kept[n].shape != global_state[n].shape for n in kept):
        raise ValueError(
            f"{owner} state is for tensors {sorted((n, tuple(t.shape)) for n, t in kept.items())}, but the "
            f"global state has {sorted((n, tuple(t.shape)) for n, t in global_state.items())}; load the "
            "checkpoint that matches this prompt"
        )


def weighted_sum(
    updates: Sequence[Update], weights: Sequence[float], tensors: Callable[[Update], State]
) -> State:
    """Σ_k weights[k]·tensors(update_k) in float64 on CPU, summed in the updates' order."""
    first = tensors(updates[0])
    sums = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in first.items()}
    for update, weight in zip(updates, weights, strict=True):
        values = tensors(update)
        for name in sums:
            sums[name] += weight * values[name].detach().to("cpu", torch.float64)
    return sums


def example_weights(updates: Sequence[Update]) -> list[float]:
    """n_k / Σ_j n_j for each update."""
    total = sum(update.num_examples for update in updates)
    return [update.num_examples / total for update in updates]


def flatten(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One float64 vector of every tensor, in name order."""
    return torch.cat([state[name].detach().to("cpu", torch.float64).reshape(-1) for name in sorted(state)])


def unflatten(vector: torch.Tensor, like: State) -> State:
    """``flatten``'s inverse: float32 tensors of ``like``'s names and shapes."""
    out: State = {}
    offset = 0
    for name in sorted(like):
        size = like[name].numel()
        out[name] = vector[offset : offset + size].reshape(like[name].shape).to(torch.float32)
        offset += size
    return out
