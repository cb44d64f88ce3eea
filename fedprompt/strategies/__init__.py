"""Server-side aggregation strategies, and ``build_strategy`` to make one from its configuration."""

from __future__ import annotations

from fedprompt.client_rules import ClientRule, ProximalRule
from fedprompt.config import (
    FedAvgConfig,
    FedAvgMConfig,
    FedBPTConfig,
    FedDynConfig,
    FedKSeedConfig,
    FedNovaConfig,
    FedOptConfig,
    FedProxConfig,
    GradientOptimizerConfig,
    KrumConfig,
    MedianConfig,
    ReliabilityConfig,
    RunConfig,
    ScaffoldConfig,
    StrategyConfig,
    TrimmedMeanConfig,
)
from fedprompt.state import State
from fedprompt.strategies.base import Strategy
from fedprompt.strategies.fedavg import FedAvg, FedProx
from fedprompt.strategies.fedavgm import FedAvgM
from fedprompt.strategies.fedbpt import FedBPT
from fedprompt.strategies.feddyn import FedDyn, FedDynRule
from fedprompt.strategies.fedkseed import FedKSeed, KSeedRule, KSeedSetup
from fedprompt.strategies.fednova import FedNova, LocalStepBound
from fedprompt.strategies.fedopt import FedOpt, FedOptVariant
from fedprompt.strategies.reliability import ReliabilityRule, ReliabilityWeighted
from fedprompt.strategies.robust import CoordinateMedian, Krum, TrimmedMean
from fedprompt.strategies.scaffold import Scaffold, ScaffoldRule

__all__ = [
    "CoordinateMedian",
    "FedAvg",
    "FedAvgM",
    "FedBPT",
    "FedDyn",
    "FedKSeed",
    "FedNova",
    "FedOpt",
    "FedOptVariant",
    "FedProx",
    "Krum",
    "ReliabilityWeighted",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "build_client_rule",
    "build_strategy",
]

_FEDOPT_VARIANTS: dict[str, FedOptVariant] = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad"}


def build_strategy(
    config: StrategyConfig,
    search_sigma: float | None = None,
    kseed: KSeedSetup | None = None,
    run: RunConfig | None = None,
) -> Strategy:
    """The strategy a validated strategy configuration describes, with its settings.

    ``search_sigma`` is the clients' initial CMA-ES step size (optimizer.sigma), which FedBPT
    sends down in its first round; ``kseed`` is FedKSeed's setup (``fedkseed.kseed_setup``). ``run``
    is the whole configuration, which SCAFFOLD and FedDyn (the number of clients) and FedNova (the
    local steps and momentum) need.
    """
    if isinstance(config, FedAvgConfig):
        if config.server_lr == 1:
            return FedAvg(weighting=config.weighting)
        return FedAvgM(server_lr=config.server_lr, momentum=0.0, weighting=config.weighting)
    if isinstance(config, FedAvgMConfig):
        return FedAvgM(server_lr=config.server_lr, momentum=config.momentum)
    if isinstance(config, ScaffoldConfig | FedDynConfig | FedNovaConfig):
        return _drift_correction(config, run)
    if isinstance(config, FedProxConfig):
        return FedProx(mu=config.mu)
    if isinstance(config, FedOptConfig):
        return FedOpt(
            variant=_FEDOPT_VARIANTS[config.kind],
            server_lr=config.server_lr,
            beta1=config.beta1,
            beta2=config.beta2,
            tau=config.tau,
        )
    if isinstance(config, MedianConfig):
        return CoordinateMedian()
    if isinstance(config, TrimmedMeanConfig):
        return TrimmedMean(beta=config.beta)
    if isinstance(config, KrumConfig):
        return Krum(num_byzantine=config.num_byzantine, keep=config.keep)
    if isinstance(config, ReliabilityConfig):
        return ReliabilityWeighted()
    if isinstance(config, FedBPTConfig):
        if search_sigma is None:
            raise ValueError("FedBPT needs search_sigma, the clients' initial CMA-ES step (optimizer.sigma)")
        return FedBPT(
            initial_sigma=search_sigma,
            sigma_floor=config.sigma_floor,
            rule=config.rule,
            max_loss=config.max_loss,
            max_sigma_ratio=config.max_sigma_ratio,
        )
    if isinstance(config, FedKSeedConfig):
        return FedKSeed(_need_kseed(kseed))
    raise TypeError(f"build_strategy got {type(config).__name__}, which is not a strategy configuration")


def _drift_correction(
    config: ScaffoldConfig | FedDynConfig | FedNovaConfig, run: RunConfig | None
) -> Strategy:
    if run is None:
        raise ValueError(f"strategy {config.kind} needs the run configuration (clients, local optimiser)")
    if isinstance(config, ScaffoldConfig):
        return Scaffold(num_clients=run.partition.num_clients, server_lr=config.server_lr)
    if isinstance(config, FedDynConfig):
        return FedDyn(num_clients=run.partition.num_clients, alpha=config.alpha)
    opt = run.optimizer
    if not isinstance(opt, GradientOptimizerConfig):
        raise ValueError("FedNova counts gradient steps; use optimizer.kind gradient")
    bound = LocalStepBound(epochs=opt.epochs, batch_size=opt.batch_size, max_steps=opt.max_steps)
    return FedNova(bound, momentum=opt.momentum if opt.algorithm == "sgd" else 0.0)


def build_client_rule(
    config: StrategyConfig, kseed: KSeedSetup | None = None, initial_state: State | None = None
) -> ClientRule:
    """The client side of the configured strategy (FedAvg's plain one for server-only rules);
    FedKSeed's needs its setup and, for its seed-pool downlink, the initial prompt."""
    if isinstance(config, FedKSeedConfig):
        return KSeedRule(_need_kseed(kseed), initial_state)
    if isinstance(config, FedProxConfig):
        return ProximalRule()
    if isinstance(config, ScaffoldConfig):
        return ScaffoldRule()
    if isinstance(config, FedDynConfig):
        return FedDynRule()
    if isinstance(config, ReliabilityConfig):
        return ReliabilityRule(alpha=config.alpha)
    return ClientRule()


def _need_kseed(kseed: KSeedSetup | None) -> KSeedSetup:
    if kseed is None:
        raise ValueError("FedKSeed needs its setup (fedprompt.strategies.fedkseed.kseed_setup(config))")
    return kseed
