"""The table from each strategy configuration to its server rule and its client side, and
``build_strategy`` / ``build_client_rule``, which read it.

A new strategy is its module (the rule, and its client rule if clients change what they do), its
configuration class in ``strategies.config`` (its settings and what it can do), and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from fedprompt.config import GradientOptimizerConfig, RunConfig
from fedprompt.federation.client_rules import ClientRule, ProximalRule
from fedprompt.federation.state import State
from fedprompt.federation.strategies.base import Strategy
from fedprompt.federation.strategies.config import (
    STRATEGY_CONFIGS,
    FedAvgConfig,
    FedAvgMConfig,
    FedBPTConfig,
    FedDPTConfig,
    FedDynConfig,
    FedKSeedConfig,
    FedNovaConfig,
    FedOptConfig,
    FedPepTAOConfig,
    FedProxConfig,
    GeometricMedianConfig,
    KrumConfig,
    MedianConfig,
    ReliabilityConfig,
    ScaffoldConfig,
    StrategyConfig,
    StrategySettings,
    TrimmedMeanConfig,
)
from fedprompt.federation.strategies.fed_dpt import FedDPT, FedDPTRule
from fedprompt.federation.strategies.fedavg import FedAvg, FedProx
from fedprompt.federation.strategies.fedavgm import FedAvgM
from fedprompt.federation.strategies.fedbpt import FedBPT
from fedprompt.federation.strategies.feddyn import FedDyn, FedDynRule
from fedprompt.federation.strategies.fedkseed import FedKSeed, KSeedRule, KSeedSetup
from fedprompt.federation.strategies.fednova import FedNova, LocalStepBound
from fedprompt.federation.strategies.fedopt import FedOpt, FedOptVariant
from fedprompt.federation.strategies.fedpeptao import FedPepTAO
from fedprompt.federation.strategies.geometric_median import GeometricMedian
from fedprompt.federation.strategies.reliability import ReliabilityRule, ReliabilityWeighted
from fedprompt.federation.strategies.robust import CoordinateMedian, Krum, TrimmedMean
from fedprompt.federation.strategies.scaffold import Scaffold, ScaffoldRule


@dataclass(frozen=True)
class StrategySetup:
    """What building a strategy or its client side may read beyond the strategy's own section:
    the whole run (the number of clients, the local optimiser), the clients' initial CMA-ES step
    (FedBPT's first downlink), FedKSeed's setup, and the initial prompt (FedKSeed's seed-pool
    downlink replays from it), each client's domain (Fed-DPT), and which of the state's tensors are
    prompts (reliability weighting compares those; None: all)."""

    run: RunConfig | None = None
    search_sigma: float | None = None
    kseed: KSeedSetup | None = None
    initial_state: State | None = None
    client_domains: Mapping[int, int] | None = None
    prompt_tensors: Collection[str] | None = None

    def need_domains(self, kind: str) -> Mapping[int, int]:
        if self.client_domains is None:
            raise ValueError(f"strategy {kind} needs each client's domain (partition.kind: domains)")
        return self.client_domains

    def need_run(self, kind: str) -> RunConfig:
        if self.run is None:
            raise ValueError(f"strategy {kind} needs the run configuration (clients, local optimiser)")
        return self.run

    def need_kseed(self) -> KSeedSetup:
        if self.kseed is None:
            raise ValueError(
                "FedKSeed needs its setup (fedprompt.federation.strategies.fedkseed.kseed_setup(config))"
            )
        return self.kseed


Builder = Callable[[Any, StrategySetup], Strategy]
RuleBuilder = Callable[[Any, StrategySetup], ClientRule]


def _plain_rule(config: StrategySettings, setup: StrategySetup) -> ClientRule:
    """FedAvg's client side: the rule of every strategy that changes nothing on its clients."""
    return ClientRule()


def _fedavg(config: FedAvgConfig, setup: StrategySetup) -> Strategy:
    """FedAvg, or FedAvgM without momentum when a server learning rate is set."""
    if config.server_lr == 1:
        return FedAvg(weighting=config.weighting)
    return FedAvgM(server_lr=config.server_lr, momentum=0.0, weighting=config.weighting)


_FEDOPT_VARIANTS: dict[str, FedOptVariant] = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


def _fedopt(config: FedOptConfig, setup: StrategySetup) -> Strategy:
    return FedOpt(
        variant=_FEDOPT_VARIANTS[config.kind],
        server_lr=config.server_lr,
        beta1=config.beta1,
        beta2=config.beta2,
        tau=config.tau,
    )


def _fedbpt(config: FedBPTConfig, setup: StrategySetup) -> Strategy:
    if setup.search_sigma is None:
        raise ValueError("FedBPT needs search_sigma, the clients' initial CMA-ES step (optimizer.sigma)")
    return FedBPT(
        initial_sigma=setup.search_sigma,
        sigma_floor=config.sigma_floor,
        rule=config.rule,
        max_loss=config.max_loss,
        max_sigma_ratio=config.max_sigma_ratio,
        sigma_decay=config.sigma_decay,
    )


def _fednova(config: FedNovaConfig, setup: StrategySetup) -> Strategy:
    opt = setup.need_run(config.kind).optimizer
    if not isinstance(opt, GradientOptimizerConfig):
        raise ValueError("FedNova counts gradient steps; use optimizer.kind gradient")
    bound = LocalStepBound(epochs=opt.epochs, batch_size=opt.batch_size, max_steps=opt.max_steps)
    return FedNova(bound, momentum=opt.momentum if opt.algorithm == "sgd" else 0.0)


def _fedpeptao(config: FedPepTAOConfig, setup: StrategySetup) -> Strategy:
    run = setup.need_run(config.kind)
    opt = run.optimizer
    if not isinstance(opt, GradientOptimizerConfig):
        raise ValueError("FedPepTAO counts gradient steps; use optimizer.kind gradient")
    return FedPepTAO(
        run.partition.num_clients,
        LocalStepBound(epochs=opt.epochs, batch_size=opt.batch_size, max_steps=opt.max_steps),
        local_lr=opt.lr,
        server_lr=config.server_lr,
        momentum=config.momentum,
        server_lr_decay=config.server_lr_decay,
        min_server_lr=config.min_server_lr,
        drift_correction=config.drift_correction,
    )


@dataclass(frozen=True)
class StrategyParts:
    """A strategy's server rule and its client side, each built from the configuration."""

    server: Builder
    client: RuleBuilder = _plain_rule


STRATEGIES: dict[type[StrategySettings], StrategyParts] = {
    FedAvgConfig: StrategyParts(_fedavg),
    FedProxConfig: StrategyParts(lambda c, s: FedProx(mu=c.mu), lambda c, s: ProximalRule()),
    FedOptConfig: StrategyParts(_fedopt),
    MedianConfig: StrategyParts(lambda c, s: CoordinateMedian()),
    TrimmedMeanConfig: StrategyParts(lambda c, s: TrimmedMean(beta=c.beta)),
    KrumConfig: StrategyParts(lambda c, s: Krum(num_byzantine=c.num_byzantine, keep=c.keep)),
    GeometricMedianConfig: StrategyParts(
        lambda c, s: GeometricMedian(c.iterations, c.nu, c.weighting, c.ftol)
    ),
    FedBPTConfig: StrategyParts(_fedbpt),
    FedDPTConfig: StrategyParts(
        lambda c, s: FedDPT(s.need_domains(c.kind), c.weighting),
        lambda c, s: FedDPTRule(s.need_domains(c.kind), c.momentum),
    ),
    ReliabilityConfig: StrategyParts(
        lambda c, s: ReliabilityWeighted(s.prompt_tensors, pulls_head=c.head_alpha > 0),
        lambda c, s: ReliabilityRule(c.alpha, s.prompt_tensors, c.head_alpha),
    ),
    FedKSeedConfig: StrategyParts(
        lambda c, s: FedKSeed(s.need_kseed()), lambda c, s: KSeedRule(s.need_kseed(), s.initial_state)
    ),
    ScaffoldConfig: StrategyParts(
        lambda c, s: Scaffold(s.need_run(c.kind).partition.num_clients, server_lr=c.server_lr),
        lambda c, s: ScaffoldRule(),
    ),
    FedDynConfig: StrategyParts(
        lambda c, s: FedDyn(s.need_run(c.kind).partition.num_clients, alpha=c.alpha),
        lambda c, s: FedDynRule(),
    ),
    FedAvgMConfig: StrategyParts(lambda c, s: FedAvgM(server_lr=c.server_lr, momentum=c.momentum)),
    FedNovaConfig: StrategyParts(_fednova),
    FedPepTAOConfig: StrategyParts(_fedpeptao),
}
assert set(STRATEGIES) == set(STRATEGY_CONFIGS), "every strategy configuration needs its line in STRATEGIES"


def _parts(config: StrategyConfig) -> StrategyParts:
    parts = STRATEGIES.get(type(config))
    if parts is None:
        raise TypeError(f"build_strategy got {type(config).__name__}, which is not a strategy configuration")
    return parts


def build_strategy(
    config: StrategyConfig,
    search_sigma: float | None = None,
    kseed: KSeedSetup | None = None,
    run: RunConfig | None = None,
    client_domains: Mapping[int, int] | None = None,
    prompt_tensors: Collection[str] | None = None,
) -> Strategy:
    """The strategy a validated strategy configuration describes, with its settings.

    ``search_sigma`` is the clients' initial CMA-ES step size (optimizer.sigma), which FedBPT
    sends down in its first round; ``kseed`` is FedKSeed's setup (``fedkseed.kseed_setup``). ``run``
    is the whole configuration, which SCAFFOLD and FedDyn (the number of clients) and FedNova (the
    local steps and momentum) need; ``client_domains`` each client's domain (Fed-DPT);
    ``prompt_tensors`` the names of the state's prompt tensors (reliability weighting compares those).
    """
    setup = StrategySetup(
        run=run,
        search_sigma=search_sigma,
        kseed=kseed,
        client_domains=client_domains,
        prompt_tensors=prompt_tensors,
    )
    return _parts(config).server(config, setup)


def build_client_rule(
    config: StrategyConfig,
    kseed: KSeedSetup | None = None,
    initial_state: State | None = None,
    client_domains: Mapping[int, int] | None = None,
    prompt_tensors: Collection[str] | None = None,
) -> ClientRule:
    """The client side of the configured strategy (FedAvg's plain one for server-only rules);
    FedKSeed's needs its setup and, for its seed-pool downlink, the initial prompt; Fed-DPT's each
    client's domain; reliability weighting's the names of the prompt tensors."""
    setup = StrategySetup(
        kseed=kseed,
        initial_state=initial_state,
        client_domains=client_domains,
        prompt_tensors=prompt_tensors,
    )
    return _parts(config).client(config, setup)
