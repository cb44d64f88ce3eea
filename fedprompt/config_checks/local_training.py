"""The checks of how clients train: strategies against local optimisers (gradient steps, SGD's
reading of them, one momentum), personal prompts and ZooPFL against black-box optimisers, and
black-box search (CMA-ES, SPSA, FedBPT, FedKSeed) against prompts, backbones and budgets; also the
settings that depart from a strategy's paper. Each check takes the validated ``RunConfig`` and
raises ``ValueError`` naming the fields and the fix.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import yaml

from fedprompt.federation.strategies.config import FedBPTConfig, FedKSeedConfig, ReliabilityConfig
from fedprompt.tasks.clip.config import BLACK_BOX_CLIP_KINDS, FedAPTPromptConfig, VQAPromptConfig
from fedprompt.tasks.text.config import (
    LLM_BACKBONE_KINDS,
    SPSA_PROMPT_KINDS,
    IntrinsicPromptConfig,
    ZooPFLPromptConfig,
)
from fedprompt.training.config import (
    BLACK_BOX_OPTIMIZERS,
    CMAESOptimizerConfig,
    GradientOptimizerConfig,
    PartOptimizerConfig,
    SPSAOptimizerConfig,
)


def personal_fits(run: Any) -> None:
    """Personal prompts need gradients and held-out splits to report on."""
    black_box = isinstance(run.optimizer, BLACK_BOX_OPTIMIZERS)
    personal = run.personalization.splits or run.strategy.personal_prompts
    if personal and black_box:
        raise ValueError(
            "personal prompts (personalization.local/shared_tokens, strategy.kind reliability) train by "
            "gradient; black-box optimisers search one shared vector"
        )
    if personal and run.partition.local_val_fraction == 0:
        raise ValueError(
            "personal prompts are evaluated on each client's held-out split; set "
            "partition.local_val_fraction > 0"
        )
    if run.personalization.finetune_steps is not None and black_box:
        raise ValueError("personalization.finetune_steps fine-tunes by gradient; use optimizer.kind gradient")
    if run.strategy.personal_prompts and run.personalization.shared_tokens is not None:
        raise ValueError(
            f"strategy.kind {run.strategy.kind} keeps a whole personal prompt per client; remove "
            "personalization.shared_tokens (personalization.local may keep whole tensors on each client, "
            "e.g. a fusion head)"
        )


HEAD_TENSORS = {VQAPromptConfig: "fusion.mlp.0.weight", FedAPTPromptConfig: "adaptive.weight"}
"""Prompt configs whose module trains a network beside its prompts, with one of that network's
tensor names (reliability's ``head_alpha`` pulls such a network when it travels)."""


def head_pull_fits(run: Any) -> None:
    """Reliability's head pull needs a network beside the prompts that travels: a prompt that has
    one (the VQA fusion head, FedAPT's adaptive network), not kept by ``personalization.local``."""
    strategy = run.strategy
    if not isinstance(strategy, ReliabilityConfig) or strategy.head_alpha == 0:
        return
    head = HEAD_TENSORS.get(type(run.prompt))
    if head is None:
        raise ValueError(
            f"strategy.head_alpha pulls a network trained beside the prompts, and prompt.kind "
            f"{run.prompt.kind!r} has none (every tensor is a prompt, pulled by alpha): set head_alpha 0"
        )
    keeping = [p for p in run.personalization.local if fnmatch.fnmatchcase(head, p)]
    if keeping:
        raise ValueError(
            f"strategy.head_alpha pulls the network beside the prompts toward the others', and "
            f"personalization.local {keeping} keeps it on each client: set head_alpha 0, or share it "
            "(remove the pattern)"
        )


def gradient_steps_fit(run: Any) -> None:
    """Strategies that change the clients' gradient steps or count them need gradient clients;
    SCAFFOLD reads the steps as SGD's."""
    strategy, opt = run.strategy, run.optimizer
    if strategy.gradient_steps is None:
        return
    if not isinstance(opt, GradientOptimizerConfig):
        raise ValueError(
            f"strategy.kind {strategy.kind} {strategy.gradient_steps}; black-box optimisers take none "
            f"(optimizer.kind is {opt.kind!r}): use optimizer.kind gradient"
        )
    if strategy.steps_as_sgd is not None and opt.algorithm != "sgd":
        raise ValueError(
            f"strategy.kind {strategy.kind} needs optimizer.algorithm: sgd; {strategy.steps_as_sgd}"
        )
    parts = _part_optimizers(run.prompt)
    if strategy.steps_as_sgd is not None:
        rates = {(p.lr or opt.lr, opt.momentum if p.momentum is None else p.momentum) for p in parts.values()}
        if len(rates) > 1:
            raise ValueError(
                f"strategy.kind {strategy.kind} needs one learning rate and momentum for the whole "
                f"prompt; remove the lr and momentum of prompt.{'/'.join(parts)}"
            )
    if strategy.one_momentum is not None and opt.algorithm == "sgd":
        momenta = {opt.momentum if p.momentum is None else p.momentum for p in parts.values()}
        if len(momenta) > 1:
            raise ValueError(
                f"strategy.kind {strategy.kind} needs one momentum for the whole prompt: "
                f"{strategy.one_momentum}; remove the momentum of prompt.{'/'.join(parts)}"
            )


def zoo_pfl_fits(run: Any) -> None:
    """ZooPFL wraps a local text model as its black box; its optimiser trains the parts after it."""
    if not isinstance(run.prompt, ZooPFLPromptConfig):
        return
    if run.backbone.kind != "hf-text":
        raise ValueError(
            "prompt.kind zoo-pfl wraps a local text model as its black box (input embeddings in, output "
            "embeddings out); use backbone.kind hf-text"
        )
    if not isinstance(run.optimizer, GradientOptimizerConfig):
        raise ValueError(
            "prompt.kind zoo-pfl trains its re-mapping and head by gradient (optimizer.kind gradient) "
            "and its input surgery by SPSA (prompt.zo_*)"
        )
    if run.strategy.gradient_steps is not None:
        raise ValueError(
            f"strategy.kind {run.strategy.kind} {run.strategy.gradient_steps}, which the input "
            "surgery's zeroth-order steps do not take; use a server-side rule (fedavg, fedadam, ...)"
        )


def black_box_fits(run: Any) -> None:
    """CMA-ES searches an intrinsic prompt; SPSA an intrinsic prompt or a text soft/deep prompt;
    FedBPT needs CMA-ES; a remote backbone gives no gradients and scores intrinsic prompts only."""
    opt, strategy = run.optimizer, run.strategy
    black_box = isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)
    generated = isinstance(run.prompt, IntrinsicPromptConfig) and run.prompt.generator is not None
    if isinstance(opt, CMAESOptimizerConfig) and generated:
        raise ValueError(
            "prompt.generator's weights are searched by SPSA or trained by gradient (CMA-ES's covariance "
            "over thousands of weights does not fit); set optimizer.kind: spsa or gradient"
        )
    if isinstance(strategy, FedKSeedConfig | FedBPTConfig) and generated:
        raise ValueError(f"strategy.kind {strategy.kind} searches z itself; remove prompt.generator")
    if isinstance(opt, CMAESOptimizerConfig) and run.prompt.kind != "intrinsic":
        raise ValueError(
            f"optimizer.kind 'cmaes' searches an intrinsic prompt's z; set prompt.kind: intrinsic "
            f"(prompt.kind is {run.prompt.kind!r}), or use optimizer.kind: spsa for a "
            f"{run.prompt.kind} prompt"
        )
    spsa_kinds = SPSA_PROMPT_KINDS + BLACK_BOX_CLIP_KINDS
    if isinstance(opt, SPSAOptimizerConfig) and run.prompt.kind not in spsa_kinds:
        raise ValueError(
            f"optimizer.kind spsa perturbs a text prompt ({', '.join(SPSA_PROMPT_KINDS)}) or a CLIP "
            f"visual-generator; prompt.kind {run.prompt.kind!r} trains by gradient "
            "(optimizer.kind: gradient)"
        )
    if (
        isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)
        and isinstance(strategy, FedKSeedConfig | FedBPTConfig)
        and run.prompt.kind in BLACK_BOX_CLIP_KINDS
    ):
        raise ValueError(
            f"strategy.kind {strategy.kind} searches a text prompt; use fedavg or another server rule"
        )
    outputs_only = run.backbone.kind in ("remote", *LLM_BACKBONE_KINDS)
    if outputs_only and not isinstance(opt, BLACK_BOX_OPTIMIZERS):
        raise ValueError(
            f"backbone.kind {run.backbone.kind} returns outputs only, never gradients; set "
            "optimizer.kind: cmaes or spsa (soft and intrinsic prompts) or bdpl (discrete prompts)"
        )
    if run.backbone.kind == "remote" and run.prompt.kind != "intrinsic":
        raise ValueError(
            "backbone.kind remote scores intrinsic prompts only (the service rebuilds A z + p0); "
            f"set prompt.kind: intrinsic (prompt.kind is {run.prompt.kind!r})"
        )
    needed = strategy.needs_optimizer
    if needed is not None and opt.kind != needed[0]:
        raise ValueError(
            f"strategy.kind {strategy.kind} {needed[1]}; set optimizer.kind: {needed[0]} "
            f"(optimizer.kind is {opt.kind!r})"
        )
    fedbpt = isinstance(strategy, FedBPTConfig) and isinstance(opt, CMAESOptimizerConfig)
    if fedbpt and strategy.sigma_floor > opt.sigma:
        raise ValueError(
            f"strategy.sigma_floor ({strategy.sigma_floor}) exceeds optimizer.sigma ({opt.sigma}); "
            "the floor must not lie above the initial step size"
        )
    if isinstance(strategy, FedKSeedConfig) and isinstance(opt, SPSAOptimizerConfig):
        _kseed_fits(run, opt)
    if black_box and opt.budget is not None and opt.score_on == "batch":
        candidates = opt.popsize if isinstance(opt, CMAESOptimizerConfig) else 2
        if opt.budget < candidates * opt.batch_size:
            raise ValueError(
                f"optimizer.budget ({opt.budget} queries) is less than one {opt.kind} iteration: "
                f"{candidates} candidates × batch_size {opt.batch_size} = {candidates * opt.batch_size}"
            )


def _kseed_fits(run: Any, opt: SPSAOptimizerConfig) -> None:
    """FedKSeed's pairs come from SPSA steps, a fixed number per round, and travel exactly."""
    if opt.score_on != "batch":
        raise ValueError(
            "strategy.kind fedkseed sends a fixed number of steps a round (budget // (2·batch_size)); "
            "set optimizer.score_on: batch"
        )
    if run.payload.wire_dtype != "float32":
        raise ValueError(
            f"strategy.kind fedkseed sends seed indices and projected gradients that every party "
            f"replays exactly; set payload.wire_dtype: float32 (it is {run.payload.wire_dtype!r})"
        )
    if run.robustness.max_update_norm is not None:
        raise ValueError(
            "strategy.kind fedkseed sends no prompt to clip; remove robustness.max_update_norm (the "
            "server bounds each projected gradient by strategy.max_projected_grad instead)"
        )


def paper_departures(run: Any) -> list[str]:
    """The settings given explicitly that depart from the strategy's paper (its
    ``optimizer_defaults``), one sentence each, which a run states at start and records."""
    defaults = run.strategy.optimizer_defaults
    if not defaults or not isinstance(run.optimizer, GradientOptimizerConfig):
        return []
    return [
        f"strategy.kind {run.strategy.kind} runs with optimizer.{name}: "
        f"{_yaml_value(getattr(run.optimizer, name))} where the paper's algorithm has "
        f"{_yaml_value(value)}: not the published method"
        for name, value in defaults.items()
        if getattr(run.optimizer, name) != value
    ]


def _yaml_value(value: Any) -> str:
    """A setting as it is written in a configuration (null, true, 0.9)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _part_optimizers(prompt: Any) -> dict[str, PartOptimizerConfig]:
    """The optimiser settings of each part of a prompt trained in parts (twin and VQA prompts), by
    field name; empty for a prompt trained as one."""
    return {
        name: getattr(prompt, name)
        for name in type(prompt).model_fields
        if name.endswith("_optimizer") and isinstance(getattr(prompt, name), PartOptimizerConfig)
    }
