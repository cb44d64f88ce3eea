"""Reliability-weighted personalised aggregation, after the prompt-based personalised FL method for
medical VQA (Zhu et al.; see METHODS.md, "Personalisation"), with its client side.

Each client t keeps its own prompt p_t (its carried state) and sends it up with its validation
accuracy acc_t. The server keeps every client's last prompt and accuracy, and sends client t the
shared prompt

    p_t^s = Σ_{i≠t} η_i p_i,   η_i = acc_i · c(p_i, p_t) / Σ_{j≠t} acc_j · c(p_j, p_t),

with c(a, b) = max(0, cos(a, b)) over the whole flattened prompt. The client trains p_t with
α · (1 − cos(p_t, p_t^s)) added to its loss. Clients that are poor (low acc) or irrelevant (a
prompt pointing elsewhere) count little in everyone's shared prompt.

The server's *global* prompt (what it evaluates on its own test set, and what a new client would
start from) is Σ_i w_i p_i with w_i ∝ acc_i · (1/(K−1)) Σ_{j≠i} c(p_i, p_j): reliability is accuracy
times agreement with the others. Those weights are reported every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedprompt.federation.client_rules import ClientRule, Penalty, RoundInputs, RoundOutput
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import flatten, unflatten
from optimizers.base import OptimizationStats

VAL_ACCURACY = "val_accuracy"
PERSONAL = "personal/"


def _clipped_cosines(prompts: torch.Tensor) -> torch.Tensor:
    """[K, K] max(0, cos(p_i, p_j)), with 0 on the diagonal."""
    norms = prompts.norm(dim=1).clamp_min(1e-12)
    unit = prompts / norms[:, None]
    cos = (unit @ unit.T).clamp_min(0.0)
    cos.fill_diagonal_(0.0)
    return cos


class ReliabilityWeighted(Strategy):
    """The server side: owns every client's last prompt (flattened, float32) and validation
    accuracy, the weights of the last round, and the rules above. Unweighted by example counts:
    a client's say comes from its accuracy and agreement, not from what it claims to hold."""

    def __init__(self) -> None:
        self._prompts: dict[int, torch.Tensor] = {}
        self._accuracy: dict[int, float] = {}
        self.last_weights: dict[int, float] = {}

    def validate_update(self, update: Update) -> None:
        """An update must report its validation accuracy (in [0, 1], checked by the pipeline)."""
        if VAL_ACCURACY not in update.metrics:
            raise ValueError(f"reliability weighting needs the client's {VAL_ACCURACY!r} metric")

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        for update in updates:
            self._prompts[update.client_id] = flatten(update.state).to(torch.float32)
            self._accuracy[update.client_id] = float(update.metrics[VAL_ACCURACY])
        ids = sorted(self._prompts)
        prompts = torch.stack([self._prompts[i].double() for i in ids])
        acc = torch.tensor([self._accuracy[i] for i in ids], dtype=torch.float64)
        if len(ids) == 1:
            weights = torch.ones(1, dtype=torch.float64)
        else:
            agreement = _clipped_cosines(prompts).sum(dim=1) / (len(ids) - 1)
            weights = acc * agreement
        if float(weights.sum()) <= 0:  # no accuracy or no agreement anywhere: plain mean
            weights = torch.ones(len(ids), dtype=torch.float64)
        weights = weights / weights.sum()
        self.last_weights = {cid: float(w) for cid, w in zip(ids, weights, strict=True)}
        return unflatten(weights @ prompts, global_state)

    def downlink_state(self, client_id: int, global_state: State) -> State:
        """Client t's shared prompt p_t^s; the global prompt until t and another client are known."""
        others = [i for i in sorted(self._prompts) if i != client_id]
        if client_id not in self._prompts or not others:
            return global_state
        own = self._prompts[client_id].double()
        prompts = torch.stack([self._prompts[i].double() for i in others])
        cos = (prompts @ own / (prompts.norm(dim=1) * own.norm()).clamp_min(1e-12)).clamp_min(0.0)
        eta = torch.tensor([self._accuracy[i] for i in others], dtype=torch.float64) * cos
        if float(eta.sum()) <= 0:
            return global_state
        return unflatten((eta / eta.sum()) @ prompts, global_state)

    def report(self) -> dict[str, Any]:
        """The weights of the last aggregation, by client id."""
        return {"reliability_weights": {str(cid): w for cid, w in self.last_weights.items()}}

    def state_dict(self) -> State:
        """``ids`` [K], ``accuracy`` [K], ``prompts`` [K, D] (empty before the first round)."""
        if not self._prompts:
            return {}
        ids = sorted(self._prompts)
        return {
            "ids": torch.tensor(ids, dtype=torch.int64),
            "accuracy": torch.tensor([self._accuracy[i] for i in ids], dtype=torch.float64),
            "prompts": torch.stack([self._prompts[i] for i in ids]),
            "weights": torch.tensor([self.last_weights.get(i, 0.0) for i in ids], dtype=torch.float64),
        }

    def load_state_dict(self, state: State) -> None:
        if not state:
            self._prompts, self._accuracy, self.last_weights = {}, {}, {}
            return
        if set(state) != {"ids", "accuracy", "prompts", "weights"}:
            raise ValueError(
                f"reliability state holds {sorted(state)}; expected ids, accuracy, prompts, weights"
            )
        ids = [int(i) for i in state["ids"]]
        if not (len(ids) == len(state["accuracy"]) == len(state["prompts"]) == len(state["weights"])):
            raise ValueError("reliability state: ids, accuracy, prompts and weights differ in length")
        self._prompts = {cid: state["prompts"][k].clone() for k, cid in enumerate(ids)}
        self._accuracy = {cid: float(state["accuracy"][k]) for k, cid in enumerate(ids)}
        self.last_weights = {cid: float(state["weights"][k]) for k, cid in enumerate(ids)}


class ReliabilityRule(ClientRule):
    """The client side: trains its own prompt p_t (carried as ``personal/<name>``; the global
    prompt before its first round) with α · (1 − cos(p_t, p_t^s)) added to the loss, p_t^s being
    what the server sent; sends p_t and its validation accuracy."""

    uses_validation = True

    def __init__(self, alpha: float) -> None:
        if alpha < 0:
            raise ValueError(f"reliability alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def start(self, inputs: RoundInputs) -> State:
        own = {k.removeprefix(PERSONAL): v for k, v in inputs.carried.items() if k.startswith(PERSONAL)}
        return own or inputs.downlink

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        if self.alpha == 0:
            return None
        shared = flatten(inputs.downlink).to(torch.float32)
        alpha = self.alpha

        def pull(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
            own = torch.cat([params[name].reshape(-1) for name in sorted(params)])
            target = shared.to(own.device, own.dtype)
            return alpha * (1 - torch.nn.functional.cosine_similarity(own, target, dim=0))

        return pull

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        return RoundOutput(trained, {}, {PERSONAL + name: t.detach().clone() for name, t in trained.items()})
