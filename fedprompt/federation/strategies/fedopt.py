"""Server optimisers on the pseudo-gradient: FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fedavg import weighted_mean

FedOptVariant = Literal["adam", "yogi", "adagrad"]


class FedOpt(Strategy):
    """A server optimiser applied to the example-weighted pseudo-gradient; owns the moments m and v.

    Each round, with w_k = n_k / Σn and θ the global state:

    - Δ = Σ_k w_k (θ_k − θ)
    - m ← β1·m + (1 − β1)·Δ
    - v ← β2·v + (1 − β2)·Δ² (adam); v − (1 − β2)·Δ²·sign(v − Δ²) (yogi); v + Δ² (adagrad,
      which ignores β2)
    - θ ← θ + η·m / (√v + τ)

    m and v start at zero and there is no bias correction, exactly as METHODS.md states it.
    (Flower's FedAdam also scales η by √(1 − β2ᵗ) / (1 − β1ᵗ); its FedYogi and FedAdagrad do not.)

    The moments are kept as float32 CPU tensors, which is what ``state_dict`` hands out; each step
    is computed in float64 from those stored values, so a run resumed from a checkpoint continues
    bit-identically. ``state_dict`` names them ``m/<tensor>`` and ``v/<tensor>``; it is empty until
    the first round (fresh moments are zero).
    """

    def __init__(
        self,
        variant: FedOptVariant = "adam",
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        if variant not in get_args(FedOptVariant):
            raise ValueError(
                f"FedOpt variant must be one of {list(get_args(FedOptVariant))}, got {variant!r}"
            )
        if server_lr <= 0:
            raise ValueError(f"FedOpt server_lr must be > 0, got {server_lr}")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"FedOpt {label} must be in [0, 1), got {beta}")
        if tau <= 0:
            raise ValueError(f"FedOpt tau must be > 0, got {tau}")
        self.variant = variant
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._m: State = {}
        self._v: State = {}

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        if self._m:
            self._check_moments_match(global_state)
        delta = weighted_mean(updates, reference=global_state)
        new_m: State = {}
        new_v: State = {}
        out: State = {}
        for name, theta in global_state.items():
            d = delta[name]
            m = self._m[name].double() if self._m else torch.zeros_like(d)
            v = self._v[name].double() if self._v else torch.zeros_like(d)
            m = self.beta1 * m + (1 - self.beta1) * d
            if self.variant == "adam":
                v = self.beta2 * v + (1 - self.beta2) * d.square()
            elif self.variant == "yogi":
                v = v - (1 - self.beta2) * d.square() * torch.sign(v - d.square())
            else:
                v = v + d.square()
            new_m[name] = m.to(torch.float32)
            new_v[name] = v.to(torch.float32)
            step = self.server_lr * new_m[name].double() / (new_v[name].double().sqrt() + self.tau)
            out[name] = (theta.detach().to("cpu", torch.float64) + step).to(torch.float32)
        self._m, self._v = new_m, new_v
        return out

    def _check_moments_match(self, global_state: State) -> None:
        if set(self._m) != set(global_state):
            raise ValueError(
                f"FedOpt moments are for tensors {sorted(self._m)}, but the global state has "
                f"{sorted(global_state)}; load the checkpoint that matches this prompt or start fresh"
            )
        for name, tensor in global_state.items():
            if self._m[name].shape != tensor.shape:
                raise ValueError(
                    f"FedOpt moment for {name!r} has shape {tuple(self._m[name].shape)}, but the global "
                    f"state's is {tuple(tensor.shape)}; load the checkpoint that matches this prompt"
                )

    def state_dict(self) -> State:
        """The moments as ``m/<tensor>`` and ``v/<tensor>`` float32 copies (empty before round one)."""
        out = {f"m/{name}": t.clone() for name, t in self._m.items()}
        out.update({f"v/{name}": t.clone() for name, t in self._v.items()})
        return out

    def load_state_dict(self, state: State) -> None:
        """Restore the moments from ``state_dict``'s output; an empty dict resets them to zero."""
        m: State = {}
        v: State = {}
        for key, tensor in state.items():
            prefix, sep, name = key.partition("/")
            if not sep or prefix not in ("m", "v") or not name:
                raise ValueError(f"FedOpt state key {key!r} is not of the form 'm/<tensor>' or 'v/<tensor>'")
            if tensor.dtype != torch.float32:
                raise ValueError(f"FedOpt state {key!r} has dtype {tensor.dtype}, expected torch.float32")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"FedOpt state {key!r} holds non-finite values")
            if prefix == "v" and (tensor < 0).any():
                raise ValueError(
                    f"FedOpt state {key!r} holds negative values; a second moment is never negative"
                )
            (m if prefix == "m" else v)[name] = tensor.detach().to("cpu").clone()
        if set(m) != set(v):
            raise ValueError(
                f"FedOpt state needs m/ and v/ for the same tensors; only m/: {sorted(set(m) - set(v))}, "
                f"only v/: {sorted(set(v) - set(m))}"
            )
        for name in m:
            if m[name].shape != v[name].shape:
                raise ValueError(
                    f"FedOpt state has m/{name} of shape {tuple(m[name].shape)} but v/{name} of shape "
                    f"{tuple(v[name].shape)}"
                )
        self._m, self._v = m, v
