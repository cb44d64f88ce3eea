"""Reliability-weighted personalised aggregation, after the prompt-based personalised FL method for
medical VQA (Zhu et al.; see METHODS.md, "Personalisation"), with its client side.

Each client t keeps its own prompt p_t (its carried state) and sends it up with its validation
accuracy acc_t. The server keeps every client's last prompt and accuracy, and sends client t the
shared prompt

    p_t^s = Σ_{i≠t} η_i p_i,   η_i = acc_i · c(p_i, p_t) / Σ_{j≠t} acc_j · c(p_j, p_t),

with c(a, b) = max(0, cos(a, b)). The client trains p_t with α · (1 − cos(p_t, p_t^s)) added to its
loss. Clients that are poor (low acc) or irrelevant (a prompt pointing elsewhere) count little in
everyone's shared prompt.

The cosines compare the *prompt tensors* only: the module's context vectors, visual tokens and
pixel prompts (``PromptModule.prompt_tensor_names``; for the VQA twin prompt ``question.context``,
``answer.context`` and ``image.*``), never a network trained beside them (the VQA fusion head,
FedAPT's adaptive network), whose many weights would otherwise decide who agrees with whom. The
weights η then mix every tensor the clients send: a fusion head that is not kept local
(``personalization.local: ["fusion.*"]``) is shared with the prompts' weights, and a client pulls
its own head toward that mix by a second cosine term of its own weight (``head_alpha``; 0: each
client trains its head alone, as if it were local).

The server's *global* prompt (what it evaluates on its own test set, and what a new client would
start from) is Σ_i w_i p_i with w_i ∝ acc_i · (1/(K−1)) Σ_{j≠i} c(p_i, p_j): reliability is accuracy
times agreement with the others. Those weights are reported every round.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from fedprompt.federation.client_rules import ClientRule, Penalty, RoundInputs, RoundOutput
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.server_tensors import flatten, unflatten
from optimizers.base import OptimizationStats

log = logging.getLogger("fedprompt.strategies.reliability")

VAL_ACCURACY = "val_accuracy"
PERSONAL = "personal/"


def _clipped_cosines(prompts: torch.Tensor) -> torch.Tensor:
    """[K, K] max(0, cos(p_i, p_j)), with 0 on the diagonal."""
    norms = prompts.norm(dim=1).clamp_min(1e-12)
    unit = prompts / norms[:, None]
    cos = (unit @ unit.T).clamp_min(0.0)
    cos.fill_diagonal_(0.0)
    return cos


def compared_names(state: Mapping[str, torch.Tensor], prompt_tensors: Collection[str] | None) -> list[str]:
    """The tensors of ``state`` the cosines compare, in name order: the prompt tensors among them
    (all of them when ``prompt_tensors`` is None). ValueError when none is left."""
    names = sorted(state) if prompt_tensors is None else sorted(set(state) & set(prompt_tensors))
    if not names:
        raise ValueError(
            f"reliability weighting compares prompt tensors, and the aggregated state {sorted(state)} holds "
            f"none of {sorted(prompt_tensors or [])}; keep fewer tensors local (personalization.local)"
        )
    return names


def head_names(state: Mapping[str, torch.Tensor], prompt_tensors: Collection[str] | None) -> list[str]:
    """The tensors of ``state`` that are not prompt tensors (none when ``prompt_tensors`` is None,
    where every tensor counts as a prompt), in name order."""
    return [] if prompt_tensors is None else sorted(set(state) - set(prompt_tensors))


def _cosine_pull(names: Sequence[str], target_state: Mapping[str, torch.Tensor], alpha: float) -> Penalty:
    """α · (1 − cos(own, target)) over the named tensors, flattened together."""
    target = flatten({name: target_state[name] for name in names}).to(torch.float32)

    def pull(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        own = torch.cat([params[name].reshape(-1) for name in names])
        return alpha * (
            1 - torch.nn.functional.cosine_similarity(own, target.to(own.device, own.dtype), dim=0)
        )

    return pull


class ReliabilityWeighted(Strategy):
    """The server side: owns every client's last state (flattened in name order, float32) and
    validation accuracy, which coordinates of it are prompt tensors (the cosines read those), the
    weights of the last round, and the rules above. Unweighted by example counts: a client's say
    comes from its accuracy and agreement, not from what it claims to hold."""

    def __init__(self, prompt_tensors: Collection[str] | None = None, pulls_head: bool = False) -> None:
        self.prompt_tensors = None if prompt_tensors is None else frozenset(prompt_tensors)
        self.pulls_head = pulls_head
        self._prompts: dict[int, torch.Tensor] = {}
        self._accuracy: dict[int, float] = {}
        self._mask: torch.Tensor | None = None
        self.last_weights: dict[int, float] = {}

    def initialize(self, global_state: State) -> None:
        """Learn which coordinates of the flattened state belong to the compared tensors; refuse a
        head pull when nothing but prompts travels."""
        compared = set(compared_names(global_state, self.prompt_tensors))
        head = head_names(global_state, self.prompt_tensors)
        if head and not self.pulls_head:
            log.warning(
                "reliability: %s travel beside the prompts but strategy.head_alpha is 0, so no client reads "
                "them; keep them local (personalization.local) or pull them (head_alpha > 0)",
                ", ".join(head),
            )
        if self.pulls_head and not head:
            raise ValueError(
                f"strategy.head_alpha pulls the tensors that travel beside the prompts, and the aggregated "
                f"state {sorted(global_state)} holds prompts only (the prompt has nothing beside them, or "
                "personalization.local keeps it): set head_alpha 0"
            )
        self._mask = torch.cat(
            [torch.full((global_state[name].numel(),), name in compared) for name in sorted(global_state)]
        )

    def _compared(self, vectors: torch.Tensor) -> torch.Tensor:
        """The prompt-tensor coordinates of flattened states [..., D]."""
        return vectors if self._mask is None else vectors[..., self._mask]

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
            agreement = _clipped_cosines(self._compared(prompts)).sum(dim=1) / (len(ids) - 1)
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
        prompts = torch.stack([self._prompts[i].double() for i in others])
        own, compared = self._compared(self._prompts[client_id].double()), self._compared(prompts)
        cos = (compared @ own / (compared.norm(dim=1) * own.norm()).clamp_min(1e-12)).clamp_min(0.0)
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
        if self._mask is not None and state["prompts"].shape[1] != len(self._mask):
            raise ValueError(
                f"reliability state holds prompts of {state['prompts'].shape[1]} values; this prompt has "
                f"{len(self._mask)}"
            )
        self._prompts = {cid: state["prompts"][k].clone() for k, cid in enumerate(ids)}
        self._accuracy = {cid: float(state["accuracy"][k]) for k, cid in enumerate(ids)}
        self.last_weights = {cid: float(state["weights"][k]) for k, cid in enumerate(ids)}


class ReliabilityRule(ClientRule):
    """The client side: trains its own prompt p_t (carried as ``personal/<name>``; the global
    prompt before its first round) with α · (1 − cos(p_t, p_t^s)) added to the loss, over the
    prompt tensors only, p_t^s being what the server sent, and α_h · (1 − cos) over the other
    tensors that travel (a shared head), when α_h > 0; sends p_t and its validation accuracy."""

    uses_validation = True

    def __init__(
        self, alpha: float, prompt_tensors: Collection[str] | None = None, head_alpha: float = 0.0
    ) -> None:
        if alpha < 0 or head_alpha < 0:
            raise ValueError(f"reliability alpha and head_alpha must be >= 0, got {alpha} and {head_alpha}")
        self.alpha = alpha
        self.head_alpha = head_alpha
        self.prompt_tensors = None if prompt_tensors is None else frozenset(prompt_tensors)

    def start(self, inputs: RoundInputs) -> State:
        own = {k.removeprefix(PERSONAL): v for k, v in inputs.carried.items() if k.startswith(PERSONAL)}
        return own or inputs.downlink

    def penalty(self, inputs: RoundInputs) -> Penalty | None:
        pulls = []
        if self.alpha > 0:
            pulls.append(
                _cosine_pull(
                    compared_names(inputs.downlink, self.prompt_tensors), inputs.downlink, self.alpha
                )
            )
        head = head_names(inputs.downlink, self.prompt_tensors)
        if self.head_alpha > 0 and head:
            pulls.append(_cosine_pull(head, inputs.downlink, self.head_alpha))
        if not pulls:
            return None
        return lambda params: sum(pull(params) for pull in pulls)

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        return RoundOutput(trained, {}, {PERSONAL + name: t.detach().clone() for name, t in trained.items()})
