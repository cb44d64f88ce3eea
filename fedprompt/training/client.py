"""A federated client: one party's data, its local training of the shared prompt module, and what
it carries from round to round."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch

from fedprompt.federation.client_rules import ClientRule, Penalty, RoundInputs
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import PayloadSpec, decode_state, encode_update
from fedprompt.federation.personalization import PromptSplit
from fedprompt.federation.state import State, Update, unpack
from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import LocalRound, LocalTrainer, evaluate
from prompt_modules.base import PromptModule


@dataclass
class FitResult:
    """One local round: the update to send, and the state the client carries forward if the server
    uses that update."""

    update: Update
    carried: State


@dataclass(frozen=True)
class FineTuning:
    """The fine-tune-after-federation baseline: ``steps`` local steps from the global prompt (its
    own trainer and seed), then evaluated on the client's held-out split."""

    steps: int
    trainer: LocalTrainer
    seed: int


class Client:
    """One party: its id, its local training and validation data, its local trainer, and the
    client side of the strategy (``rule``) and of a split prompt (``split``).

    The prompt module (and its frozen backbone) is shared by every client of a process; a client
    loads its starting prompt into it before each fit or evaluation, so memory grows by one data
    partition per client, not by one model. What a client keeps between rounds (the local part of
    a split prompt, a personal prompt, control variates) is its *carried* state: ``fit`` takes it
    and returns the next one, and the runtime keeps it in a client-state store, committed only
    when the server used the update. ``class_names``, when given, are the classes this client
    scores (its labels index them): it trains and evaluates inside the model's
    ``scoring(class_names)`` (FedTPG: each client's softmax over its own classes).
    ``unlabelled_data``: a few-shot client's unlabelled examples (FeS), which its trainer may
    pseudo-label; they never leave the client and do not count in its example count.
    """

    def __init__(
        self,
        client_id: int,
        train_data: TensorData,
        val_data: TensorData | None,
        model: PromptModule,
        trainer: LocalTrainer,
        eval_batch_size: int = 64,
        rule: ClientRule | None = None,
        split: PromptSplit | None = None,
        class_names: Sequence[str] | None = None,
        unlabelled_data: TensorData | None = None,
    ) -> None:
        if len(train_data) == 0:
            raise ValueError(f"client {client_id} has no training examples")
        self.client_id = client_id
        self.train_data = train_data
        self.val_data = val_data
        self.model = model
        self.trainer = trainer
        self.eval_batch_size = eval_batch_size
        self.rule = rule or ClientRule()
        self.split = split or PromptSplit(model.prompt_state())
        self.class_names = tuple(class_names) if class_names is not None else None
        self.unlabelled_data = unlabelled_data

    def _own_classes(self) -> AbstractContextManager:
        """The model scores this client's classes inside (no change without ``class_names``)."""
        return nullcontext() if self.class_names is None else self.model.scoring(self.class_names)

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.state_dict().values())).device

    def fit(self, downlink: State, instructions: FitInstructions, carried: State | None = None) -> FitResult:
        """Train from the downlink (and the carried state) on local data; return the update and the
        state to carry forward."""
        inputs = RoundInputs(downlink, carried or {}, instructions, self.client_id)
        start = self.rule.start(inputs)
        self.model.load_state_dict(self.split.join(start, inputs.carried), strict=True)
        local = LocalRound(
            instructions, inputs.carried, self._penalty(inputs), unlabelled=self.unlabelled_data
        )
        with self._own_classes():
            stats = self.trainer.train(self.model, self.train_data, local)
        full = self.model.prompt_state()
        output = self.rule.finish(inputs, self.split.wire(full), stats)
        metrics = stats.as_metrics()
        if self.rule.uses_validation:
            if self.val_data is None or len(self.val_data) == 0:
                raise ValueError(
                    f"client {self.client_id} has no held-out split to report val_accuracy on; "
                    "set partition.local_val_fraction > 0"
                )
            metrics["val_accuracy"] = self._accuracy()
        update = Update(
            self.client_id,
            {name: t.detach().clone() for name, t in output.state.items()},
            len(self.train_data),
            metrics,
            {**stats.tensors, **output.extras},
        )
        return FitResult(update, {**output.carried, **local.carry_out, **self.split.local(full)})

    def _penalty(self, inputs: RoundInputs) -> Penalty | None:
        """The rule's loss term on the wire part of the module's parameters."""
        rule_penalty = self.rule.penalty(inputs)
        if rule_penalty is None:
            return None
        split = self.split
        return lambda params: rule_penalty(split.wire(params))

    def evaluate(self, global_state: State, carried: State | None = None) -> dict[str, float] | None:
        """Metrics on this client's held-out split (None without one): ``accuracy``/``loss`` of the
        global prompt (with the initial local part of a split prompt), and, when the client carries
        a personal prompt, ``personal_accuracy``."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.load_state_dict(self.split.join(global_state, {}), strict=True)
        with self._own_classes():
            metrics = evaluate(self.model, self.val_data, self.eval_batch_size, self.device)
        personal = self.personal_state(global_state, carried or {})
        if personal is not None:
            self.model.load_state_dict(personal, strict=True)
            metrics["personal_accuracy"] = self._accuracy()
        return metrics

    def personal_state(self, global_state: State, carried: State) -> State | None:
        """The client's personalised full prompt state, or None when it keeps nothing personal:
        the global part joined with its local part (split prompts), or its own prompt (rules that
        carry one as ``personal/<name>``)."""
        own = {k.removeprefix("personal/"): v for k, v in carried.items() if k.startswith("personal/")}
        if own:
            return self.split.join(own, carried)
        if not self.split.is_identity:
            return self.split.join(global_state, carried)
        return None

    def fine_tuned_accuracy(self, global_state: State, carried: State, tuning: FineTuning) -> float | None:
        """Accuracy on the held-out split after ``tuning.steps`` local steps from the global prompt
        (with this client's local part), the fine-tune-after-federation baseline."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.load_state_dict(self.split.join(global_state, carried), strict=True)
        instructions = FitInstructions(round=0, seed=tuning.seed)
        with self._own_classes():
            tuning.trainer.train(self.model, self.train_data, LocalRound(instructions, carried))
        return self._accuracy()

    def _accuracy(self) -> float:
        """Accuracy of the loaded prompt on the held-out split, over this client's classes."""
        with self._own_classes():
            return evaluate(self.model, self.val_data, self.eval_batch_size, self.device)["accuracy"]

    def fit_payload(
        self,
        downlink: bytes,
        spec: PayloadSpec,
        instructions: FitInstructions,
        wire_dtype: str,
        carried: State | None = None,
        extra_metrics: dict[str, float] | None = None,
    ) -> tuple[bytes, State]:
        """The client's side of a round on bytes: validate what it receives against ``spec`` (the
        server's downlink spec), fit, and encode its update (with ``extra_metrics`` added to its
        metrics); also the state to carry forward."""
        tensors, _ = decode_state(downlink, spec)
        global_state, extras = unpack(tensors)
        result = self.fit(global_state, replace(instructions, extras=extras), carried)
        result.update.metrics.update(extra_metrics or {})
        return encode_update(result.update, wire_dtype), result.carried
