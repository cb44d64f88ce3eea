"""Local optimisation by gradient: torch optimisers, device and precision through accelerate."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator

from optimizers.base import OptimizationStats

LossFn = Callable[[Any], tuple[torch.Tensor, int]]
"""Maps a batch to (mean loss over the batch, number of examples in it)."""

LrFactor = Callable[[int], float]
"""Maps a step (counted from 0 within a run) to the factor of each group's base learning rate it uses."""


@dataclass(frozen=True)
class GradientSettings:
    """The knobs of a gradient run; one parameter group may override ``lr``/``weight_decay``."""

    algorithm: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 1
    max_steps: int | None = None
    grad_clip: float | None = 1.0
    keep_state: bool = False
    """Whether runs carry the optimiser's state from one to the next (``run(resume=...)``), as a
    client keeps its moments across rounds."""


class GradientOptimizer:
    """Owns the local training loop by gradient.

    Each ``run`` builds a fresh torch optimiser over the given parameters (local optimiser state
    does not outlive a round, as in FedAvg), runs ``epochs`` passes over the batches (or stops at
    ``max_steps``), and uses the accelerate ``Accelerator`` for autocast, loss scaling and
    gradient clipping. It sees parameters and a loss closure, nothing about prompts or models.

    ``steps`` counts the steps taken: a step that fp16 loss scaling skips (inf or NaN gradients)
    leaves the parameters and the momentum where they were, so it counts neither there nor in
    ``gradient_scale`` (it is reported as ``skipped_steps``); ``max_steps`` caps the batches run.

    ``run`` takes an optional ``lr_factor`` (a schedule, e.g. one factor per federated round) and
    reports ``gradient_scale`` for SGD: Σ_k η_k·(1 − β^(k+1))/(1 − β) over the steps k, η_k the
    step's learning rate and β the momentum. Each gradient g_j moves the parameters by
    Σ_{k≥j} η_k·β^(k−j)·g_j, so a gradient held constant moves them by exactly gradient_scale·g,
    and (start − end)/gradient_scale is a weighted average of the run's gradients (gradient_scale
    is Kη for plain SGD at a constant learning rate, FedNova's a_i·η with momentum). AdamW's step
    is not linear in the gradient, and reports none.
    """

    def __init__(self, settings: GradientSettings, accelerator: Accelerator | None = None) -> None:
        self.settings = settings
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())

    def _build(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        s = self.settings
        if s.algorithm == "adamw":
            return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)
        if s.algorithm == "sgd":
            return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        raise ValueError(f"unknown algorithm {s.algorithm!r}; use 'adamw' or 'sgd'")

    def run(
        self,
        parameters: Iterable[torch.nn.Parameter] | Sequence[dict[str, Any]],
        loss_fn: LossFn,
        batches: Callable[[int], Iterable[Any]],
        lr_factor: LrFactor | None = None,
        resume: Mapping[str, torch.Tensor] | None = None,
    ) -> OptimizationStats:
        """Train ``parameters`` in place; ``batches(epoch)`` yields that epoch's batches; step k
        runs at ``lr_factor(k)`` times each group's learning rate (1 without a schedule).

        With ``resume`` (a mapping, possibly empty: a first run), the torch optimiser starts from that
        state (``optimizer_state`` of an earlier run over parameters of the same shapes, keyed
        ``<parameter index>/<state name>``) and this run's end state comes back as
        ``OptimizationStats.optimizer_state``: AdamW's moments and step counts, or SGD's momentum,
        carried from run to run (FedPepTAO's clients keep theirs across rounds)."""
        items = list(parameters)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        params = [p for g in groups for p in g["params"]]
        if not params or not all(p.requires_grad for p in params):
            raise ValueError("GradientOptimizer needs a non-empty list of parameters that require grad")
        acc = self.accelerator
        optimizer = self._build(groups)
        if resume:
            load_optimizer_state(optimizer, params, resume)
        raw = optimizer
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        scales = [0.0] * len(base_lrs)
        scaled = acc.scaler is not None  # fp16 loss scaling works through accelerate's wrapped optimiser
        if scaled:
            optimizer = acc.prepare_optimizer(optimizer, device_placement=False)
        stats = OptimizationStats()
        total, batches_run, skipped = 0.0, 0, 0
        try:
            for epoch in range(self.settings.epochs):
                for batch in batches(epoch):
                    if self.settings.max_steps is not None and batches_run >= self.settings.max_steps:
                        break
                    factor = 1.0 if lr_factor is None else float(lr_factor(stats.steps))
                    for k, group in enumerate(optimizer.param_groups):
                        group["lr"] = base_lrs[k] * factor
                    optimizer.zero_grad(set_to_none=True)
                    with acc.autocast():
                        loss, n = loss_fn(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"local loss became {loss.item()} at step {stats.steps}")
                    acc.backward(loss)
                    if self.settings.grad_clip is not None:
                        acc.clip_grad_norm_(params, self.settings.grad_clip)
                    optimizer.step()
                    batches_run += 1
                    stats.examples += n
                    stats.final_loss = loss.item()
                    total += stats.final_loss * n
                    if scaled and optimizer.step_was_skipped:
                        skipped += 1  # the loss scaler found inf/NaN gradients: the parameters did not move
                        continue
                    for k, group in enumerate(optimizer.param_groups):
                        beta = group.get("momentum", 0.0)
                        scales[k] += group["lr"] * (1 - beta ** (stats.steps + 1)) / (1 - beta)
                    stats.steps += 1
        finally:
            if scaled:
                acc.free_memory()  # forget the wrapped optimiser so rounds and clients do not pile up
        stats.mean_loss = total / stats.examples if stats.examples else math.nan
        if skipped:
            stats.extra["skipped_steps"] = float(skipped)
        if resume is not None:
            stats.optimizer_state = optimizer_state(raw, params)
        if self.settings.algorithm == "sgd" and len(set(scales)) == 1:
            stats.gradient_scale = scales[0]
        return stats


def optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """A torch optimiser's per-parameter state as detached CPU tensors keyed ``<index>/<name>``
    (index: the parameter's place in ``params``; 0-d tensors such as AdamW's step as shape [1])."""
    out: dict[str, torch.Tensor] = {}
    for index, param in enumerate(params):
        for name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{index}/{name}"] = value.detach().to("cpu").clone().reshape(value.shape or (1,))
    return out


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], state: Mapping[str, torch.Tensor]
) -> None:
    """Set a torch optimiser's per-parameter state from ``optimizer_state``'s output, checking that each
    tensor belongs to a parameter of this run and has its shape (a step count: one value)."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index_text, _, name = key.partition("/")
        if not index_text.isdigit() or not name or int(index_text) >= len(params):
            raise ValueError(
                f"optimizer state {key!r} names no parameter of this run ({len(params)} of them)"
            )
        param = params[int(index_text)]
        if name == "step":
            if value.numel() != 1:
                raise ValueError(
                    f"optimizer state {key!r} must hold one step count, got {tuple(value.shape)}"
                )
            value = value.reshape(())
        elif tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"optimizer state {key!r} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
            )
        else:
            value = value.to(param.device, param.dtype)
        per_param.setdefault(int(index_text), {})[name] = value.clone()
    for index, values in per_param.items():
        optimizer.state[params[index]] = values
