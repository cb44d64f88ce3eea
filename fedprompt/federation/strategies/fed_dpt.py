"""Fed-DPT's aggregation (Wei et al., "Dual Prompt Tuning for Domain-Aware Federated Learning"), with
its client side.

The prompt state holds one text prompt per domain, ``text.context`` [D, M, d], and the visual
prompt tokens (everything else). Each client holds one domain (``partition.kind: domains``);
which, the server knows from the partition (``client_domains``), never from what a client says.

Server: row d of ``text.context`` becomes the weighted mean of row d of the uploads of domain d's
clients in the round (a domain without clients in a round keeps its row): domains are kept apart,
never averaged into one another. Every other tensor is the weighted mean over all clients (FedAvg).
Weights: example counts, or 1 per client.

Client: it trains from its own domain's prompt as the server has it, S_d, and from its copy E of
the other domains' prompts, which follows the server's by momentum at the start of each of its
rounds, E_j ← α·E_j + (1 − α)·S_j (E = S before its first round): the paper's momentum update of
the "external" prompts, so that they do not change suddenly when reloaded. E is client state
(``fed-dpt/external``): committed only when the server used the client's update, checkpointed and
resumed with the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedprompt.federation.client_rules import ClientRule, RoundInputs, RoundOutput
from fedprompt.federation.state import State, Update
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.fedavg import WEIGHTINGS, Weighting
from optimizers.base import OptimizationStats

TEXT = "text.context"
"""The per-domain text prompts [D, M, d] in Fed-DPT's prompt state."""
EXTERNAL = "fed-dpt/external"
"""A client's carried copy of every domain's text prompt (its own row unused)."""


def _check_domains(client_domains: Mapping[int, int]) -> dict[int, int]:
    if not client_domains:
        raise ValueError("Fed-DPT needs each client's domain (partition.kind: domains)")
    bad = {cid: d for cid, d in client_domains.items() if d < 0}
    if bad:
        raise ValueError(f"clients {sorted(bad)} have no domain")
    return dict(client_domains)


class FedDPT(Strategy):
    """The server side: owns the client → domain map and the weighting; no server state beyond the
    global prompt, whose ``text.context`` rows are the per-domain prompts."""

    def __init__(self, client_domains: Mapping[int, int], weighting: Weighting = "examples") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"Fed-DPT weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.client_domains = _check_domains(client_domains)
        self.weighting = weighting

    def initialize(self, global_state: State) -> None:
        if TEXT not in global_state:
            raise ValueError(f"Fed-DPT aggregates a prompt with per-domain text prompts {TEXT!r}")
        rows = global_state[TEXT].shape[0]
        beyond = sorted(cid for cid, d in self.client_domains.items() if d >= rows)
        if beyond:
            raise ValueError(f"clients {beyond} have domains beyond the prompt's {rows} text prompts")

    def validate_update(self, update: Update) -> None:
        """An update must come from a client whose domain the server knows."""
        if update.client_id not in self.client_domains:
            raise ValueError(f"client {update.client_id} has no known domain")

    def _weight(self, update: Update) -> float:
        return float(update.num_examples) if self.weighting == "examples" else 1.0

    def _aggregate(self, global_state: State, updates: Sequence[Update]) -> State:
        total = sum(self._weight(u) for u in updates)
        out: State = {}
        for name, tensor in global_state.items():
            if name == TEXT:
                continue
            mean = torch.zeros(tensor.shape, dtype=torch.float64)
            for update in updates:
                mean += self._weight(update) * update.state[name].detach().to("cpu", torch.float64)
            out[name] = (mean / total).to(torch.float32)
        rows = global_state[TEXT].detach().to("cpu").clone()
        for domain in sorted({self.client_domains[u.client_id] for u in updates}):
            own = [u for u in updates if self.client_domains[u.client_id] == domain]
            mean = torch.zeros(rows.shape[1:], dtype=torch.float64)
            for update in own:
                mean += self._weight(update) * update.state[TEXT][domain].detach().to("cpu", torch.float64)
            rows[domain] = (mean / sum(self._weight(u) for u in own)).to(torch.float32)
        out[TEXT] = rows
        return out


class FedDPTRule(ClientRule):
    """The client side: owns the client → domain map and α. Starts from the server's state with the
    other domains' rows replaced by the carried copy moved toward the server's by momentum; carries
    that copy forward."""

    def __init__(self, client_domains: Mapping[int, int], momentum: float) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"Fed-DPT momentum must be in [0, 1), got {momentum}")
        self.client_domains = _check_domains(client_domains)
        self.momentum = momentum

    def _external(self, inputs: RoundInputs) -> torch.Tensor:
        """The other domains' prompts this round: α·E + (1 − α)·S (S before the first round)."""
        server = inputs.downlink[TEXT]
        carried = inputs.carried.get(EXTERNAL)
        if carried is None:
            return server.detach().clone()
        if carried.shape != server.shape:
            raise ValueError(
                f"carried {EXTERNAL} has shape {tuple(carried.shape)}, the prompt {tuple(server.shape)}"
            )
        carried = carried.to(server.device, server.dtype)
        return self.momentum * carried + (1 - self.momentum) * server

    def start(self, inputs: RoundInputs) -> State:
        if inputs.client_id is None or inputs.client_id not in self.client_domains:
            raise ValueError(f"client {inputs.client_id} has no known domain")
        rows = self._external(inputs)
        domain = self.client_domains[inputs.client_id]
        rows[domain] = inputs.downlink[TEXT][domain]
        return {**inputs.downlink, TEXT: rows}

    def finish(self, inputs: RoundInputs, trained: State, stats: OptimizationStats) -> RoundOutput:
        return RoundOutput(trained, {}, {EXTERNAL: self.start(inputs)[TEXT].detach().clone()})
