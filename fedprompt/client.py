"""A federated client: one party's data and its local training of the shared prompt module."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

from fedprompt.batching import TensorData
from fedprompt.payload import PayloadSpec, decode_state, encode_update
from fedprompt.state import State, Update, unpack
from fedprompt.training import FitInstructions, LocalTrainer, evaluate
from prompt_modules.base import PromptModule


class Client:
    """One party: its id, its local training and validation data, and its local trainer.

    The prompt module (and its frozen backbone) is shared by every client of a process; a client
    loads the global prompt state into it before each fit or evaluation, so memory grows by one
    data partition per client, not by one model. ``class_names``, when given, are the classes this
    client scores (its labels index them): it trains and evaluates inside the model's
    ``scoring(class_names)`` (FedTPG: each client's softmax over its own classes).
    """

    def __init__(
        self,
        client_id: int,
        train_data: TensorData,
        val_data: TensorData | None,
        model: PromptModule,
        trainer: LocalTrainer,
        eval_batch_size: int = 64,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if len(train_data) == 0:
            raise ValueError(f"client {client_id} has no training examples")
        if class_names is not None and not callable(getattr(model, "scoring", None)):
            raise ValueError(
                f"client {client_id} has its own class names, but the model cannot score a class set"
            )
        self.client_id = client_id
        self.train_data = train_data
        self.val_data = val_data
        self.model = model
        self.trainer = trainer
        self.eval_batch_size = eval_batch_size
        self.class_names = tuple(class_names) if class_names is not None else None

    def _own_classes(self) -> AbstractContextManager:
        """The model scores this client's classes inside (no change without ``class_names``)."""
        return nullcontext() if self.class_names is None else self.model.scoring(self.class_names)

    def fit(self, global_state: State, instructions: FitInstructions) -> Update:
        """Train from the global state on local data; return the new state and what it took."""
        self.model.load_state_dict(global_state, strict=True)
        with self._own_classes():
            stats = self.trainer.train(self.model, self.train_data, instructions)
        return Update(
            self.client_id, self.model.prompt_state(), len(self.train_data), stats.as_metrics(), stats.tensors
        )

    def evaluate(self, global_state: State) -> dict[str, float] | None:
        """Metrics of the global state on this client's held-out split (None without one)."""
        if self.val_data is None or len(self.val_data) == 0:
            return None
        self.model.load_state_dict(global_state, strict=True)
        device = next(iter(self.model.state_dict().values())).device
        with self._own_classes():
            return evaluate(self.model, self.val_data, self.eval_batch_size, device)

    def fit_payload(
        self, downlink: bytes, spec: PayloadSpec, instructions: FitInstructions, wire_dtype: str
    ) -> bytes:
        """The client's side of a round on bytes: validate what it receives against ``spec`` (the
        server's downlink spec), fit, and encode its update."""
        tensors, _ = decode_state(downlink, spec)
        global_state, extras = unpack(tensors)
        return encode_update(self.fit(global_state, replace(instructions, extras=extras)), wire_dtype)
