"""Split prompts: a global part that is aggregated and a local part that never leaves its client.

``personalization: {kind: split, local: [...], shared_tokens: k}`` divides the prompt state:

- tensors whose names match a ``local`` pattern (shell-style, e.g. ``"image.*"``) stay on the
  client whole (a twin prompt with one modality shared and the other local);
- with ``shared_tokens: k``, every *token tensor* (whose second-to-last axis indexes prompt
  vectors: soft prompts, deep prompts in both modes, P-tuning v2's key/value prefixes included,
  CoOp context, VPT tokens) shares its first k vectors and keeps the rest local: partial
  personalisation (Pillutla et al. 2022) applied to the prompt. FedPrompt itself averages the
  whole prompt; its "split aggregation" is the split of the model into the frozen backbone, which
  never travels, and the prompt, which is aggregated.

The wire state (what travels and what the server aggregates) keeps each tensor's name, with the
shared rows only. The local part is carried by the client as ``local/<name>`` (the local rows),
starting from the initial prompt's values, the same for every client. The server's "global
prompt" for its own evaluation is the shared part joined with that initial local part.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch

from fedprompt.config import PersonalizationConfig
from fedprompt.federation.state import State

LOCAL_PREFIX = "local/"
TOKEN_TENSORS = ("embeddings", "layers", "prefix", "context", "deep", "prompts")
"""Last name parts of the prompt modules' token tensors (prompt vectors on the second-to-last axis):
soft prompt ``embeddings``, deep prompt ``layers`` (mode replace) and ``prefix`` ([layers, 2,
kv_heads, m, head_dim], mode prefix: k of the m key/value slots of every layer are shared), CoOp
``context`` and ``deep``, VPT ``prompts``."""


class PromptSplit:
    """Owns how one prompt state divides into its wire (aggregated) part and its local part, and
    the initial local part a client starts with. The identity split (no personalisation) sends the
    whole state and keeps nothing local."""

    def __init__(
        self,
        initial: State,
        local_names: Iterable[str] = (),
        shared_rows: Mapping[str, int] | None = None,
    ) -> None:
        self.local_names = frozenset(local_names)
        self.shared_rows = dict(shared_rows or {})
        unknown = sorted((self.local_names | set(self.shared_rows)) - set(initial))
        if unknown:
            raise ValueError(f"personalization names {unknown}, which the prompt state does not have")
        for name, rows in self.shared_rows.items():
            total = initial[name].shape[-2] if initial[name].dim() >= 2 else 0
            if not 0 < rows < total:
                raise ValueError(
                    f"personalization.shared_tokens: {name!r} has {total} prompt vectors; sharing {rows} "
                    "must leave at least one shared and one local"
                )
        self.names = list(initial)
        self.initial_local = self.local(initial)

    @property
    def is_identity(self) -> bool:
        return not self.local_names and not self.shared_rows

    def wire(self, full: Mapping[str, torch.Tensor]) -> State:
        """The aggregated part of a full prompt state (differentiable: slices, not copies)."""
        out: State = {}
        for name in self.names:
            if name in self.local_names:
                continue
            rows = self.shared_rows.get(name)
            out[name] = full[name] if rows is None else full[name][..., :rows, :]
        return out

    def local(self, full: Mapping[str, torch.Tensor]) -> State:
        """The local part of a full prompt state, as ``local/<name>`` detached copies."""
        out: State = {}
        for name in self.names:
            rows = self.shared_rows.get(name)
            if name in self.local_names:
                out[LOCAL_PREFIX + name] = full[name].detach().clone()
            elif rows is not None:
                out[LOCAL_PREFIX + name] = full[name][..., rows:, :].detach().clone()
        return out

    def join(self, wire: State, carried: State) -> State:
        """The full prompt state from a wire state and the client's carried local part (the
        initial local part when the client carries none yet)."""
        local = {k: v for k, v in carried.items() if k.startswith(LOCAL_PREFIX)} or self.initial_local
        out: State = {}
        for name in self.names:
            if name in self.local_names:
                out[name] = local[LOCAL_PREFIX + name]
            elif name in self.shared_rows:
                out[name] = torch.cat([wire[name], local[LOCAL_PREFIX + name].to(wire[name].device)], dim=-2)
            else:
                out[name] = wire[name]
        return out


def build_split(
    initial: State, token_tensors: Iterable[str], local_patterns: Iterable[str], shared_tokens: int | None
) -> PromptSplit:
    """The split a ``personalization`` section describes for a prompt whose state is ``initial``
    and whose token tensors are ``token_tensors``. Raises ValueError naming what does not fit."""
    patterns = list(local_patterns)
    local = {name for name in initial if any(fnmatch.fnmatchcase(name, p) for p in patterns)}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in initial)]
    if unmatched:
        raise ValueError(
            f"personalization.local: {unmatched} match no prompt tensor; "
            f"the prompt's tensors are {sorted(initial)}"
        )
    shared: dict[str, int] = {}
    if shared_tokens is not None:
        tokens = [name for name in token_tensors if name in initial and name not in local]
        if not tokens:
            raise ValueError(
                "personalization.shared_tokens: this prompt has no token tensors to split "
                f"(its tensors: {sorted(initial)}); use personalization.local instead"
            )
        shared = dict.fromkeys(tokens, shared_tokens)
    if len(local) == len(initial):
        raise ValueError("personalization.local keeps every prompt tensor local: nothing would be aggregated")
    return PromptSplit(initial, local, shared)


def prompt_split(config: PersonalizationConfig, initial: State) -> PromptSplit:
    """The split a run's ``personalization`` section asks for on a prompt whose state is
    ``initial`` (the identity split when it asks for none)."""
    if not config.splits:
        return PromptSplit(initial)
    tokens = [
        name for name in initial if name.rsplit(".", 1)[-1] in TOKEN_TENSORS and initial[name].dim() >= 2
    ]
    return build_split(initial, tokens, config.local, config.shared_tokens)
