"""The checks of one section against another, run on every ``RunConfig`` after its sections are
each valid: secure aggregation against strategies, privacy against strategies and optimisers,
prompts against backbones, multi-domain data against partitions and strategies, black-box
optimisers against prompts, and the rest. ``RunConfig`` (``fedprompt.config``) inherits them from
``CrossSectionChecks``; each check raises ``ValueError`` naming the fields and the fix, which
pydantic reports as the configuration's error before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self, get_args

import yaml
from pydantic import model_validator

from fedprompt.config_base import StrictModel
from fedprompt.data.config import (
    BUILTIN_IMAGE_DATASETS,
    MULTI_DOMAIN_BUILTINS,
)
from fedprompt.federation.strategies.config import (
    STRATEGY_CONFIGS,
    FedBPTConfig,
    FedKSeedConfig,
    KrumConfig,
    StrategySettings,
)
from fedprompt.tasks.clip.config import (
    BLACK_BOX_CLIP_KINDS,
    CLIP_PROMPT_KINDS,
    DOMAIN_PROMPT_KINDS,
    CoOpPromptConfig,
    TwinPromptConfig,
    VisionConfig,
)
from fedprompt.tasks.text.config import (
    LLM_BACKBONE_KINDS,
    SPSA_PROMPT_KINDS,
    DeepPromptConfig,
    DiscretePromptConfig,
    IntrinsicPromptConfig,
    SimilarityHeadConfig,
    VerbalizerHeadConfig,
    ZooPFLPromptConfig,
)
from fedprompt.training.config import (
    BLACK_BOX_OPTIMIZERS,
    CMAESOptimizerConfig,
    GradientOptimizerConfig,
    PartOptimizerConfig,
    PolicyGradientOptimizerConfig,
    SPSAOptimizerConfig,
)


class CrossSectionChecks(StrictModel):
    """The cross-section checks ``RunConfig`` inherits, in the order they run; it owns no field
    (``RunConfig`` declares the sections these read)."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.federation.min_clients > self.partition.num_clients:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) exceeds partition.num_clients "
                f"({self.partition.num_clients}); lower it or add clients"
            )
        if isinstance(self.strategy, KrumConfig):
            f = self.strategy.num_byzantine
            need = max(2 * f + 3, self.strategy.keep + f)
            if self.federation.min_clients < need:
                raise ValueError(
                    f"strategy.kind krum with num_byzantine={f} and keep={self.strategy.keep} needs at least "
                    f"max(2f + 3, keep + f) = {need} updates a round; set federation.min_clients >= {need}"
                )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> Self:
        """Secure aggregation gives the server the weighted sum of the updates and nothing else:
        refuse what needs single updates, and thresholds that are unsafe or cannot be met."""
        secure = self.secure_aggregation
        if not secure.enabled:
            return self
        strategy = self.strategy
        if strategy.each_update is not None:
            sum_only = ", ".join(_kinds(lambda c: c.each_update is None))
            raise ValueError(
                f"secure_aggregation: strategy.kind {strategy.kind} needs {strategy.each_update}, but the "
                f"server sees only the sum of the updates; use one of {sum_only}, or disable secure "
                "aggregation"
            )
        if self.robustness.max_update_norm is not None:
            raise ValueError(
                "secure_aggregation: robustness.max_update_norm is a bound the server enforces on each "
                "update, which it never sees; remove it (each client clips its own delta to "
                "secure_aggregation.clip_range instead)"
            )
        sampled = self.federation.clients_per_round(self.partition.num_clients)
        if sampled < 2:
            raise ValueError(
                f"secure_aggregation: rounds sample {sampled} client, whose 'sum' is its update; sample at "
                "least 2 (federation.min_clients, federation.fraction)"
            )
        threshold = secure.threshold_for(sampled)
        if not sampled // 2 < threshold <= sampled:
            raise ValueError(
                f"secure_aggregation.threshold {threshold} must lie in {sampled // 2 + 1}..{sampled}: more "
                f"than half of the {sampled} clients sampled per round (fewer would let the server collect "
                "both secrets of a client), and no more than are sampled"
            )
        if (2 ** (secure.bits - 1) - 1) // sampled < 2**7:
            raise ValueError(
                f"secure_aggregation.bits {secure.bits} leaves fewer than 128 quantisation levels for "
                f"{sampled} clients a round; raise it"
            )
        return self

    @model_validator(mode="after")
    def _personal_fits(self) -> Self:
        """Personal prompts need gradients and held-out splits to report on."""
        black_box = isinstance(self.optimizer, BLACK_BOX_OPTIMIZERS)
        personal = self.personalization.splits or self.strategy.personal_prompts
        if personal and black_box:
            raise ValueError(
                "personal prompts (personalization.local/shared_tokens, strategy.kind reliability) train by "
                "gradient; black-box optimisers search one shared vector"
            )
        if personal and self.partition.local_val_fraction == 0:
            raise ValueError(
                "personal prompts are evaluated on each client's held-out split; set "
                "partition.local_val_fraction > 0"
            )
        if self.personalization.finetune_steps is not None and black_box:
            raise ValueError(
                "personalization.finetune_steps fine-tunes by gradient; use optimizer.kind gradient"
            )
        if self.strategy.personal_prompts and self.personalization.shared_tokens is not None:
            raise ValueError(
                f"strategy.kind {self.strategy.kind} keeps a whole personal prompt per client; remove "
                "personalization.shared_tokens (personalization.local may keep whole tensors on each client, "
                "e.g. a fusion head)"
            )
        return self

    @model_validator(mode="after")
    def _gradient_steps_fit(self) -> Self:
        """Strategies that change the clients' gradient steps or count them need gradient clients;
        SCAFFOLD reads the steps as SGD's."""
        strategy, opt = self.strategy, self.optimizer
        if strategy.gradient_steps is None:
            return self
        if not isinstance(opt, GradientOptimizerConfig):
            raise ValueError(
                f"strategy.kind {strategy.kind} {strategy.gradient_steps}; black-box optimisers take none "
                f"(optimizer.kind is {opt.kind!r}): use optimizer.kind gradient"
            )
        if strategy.steps_as_sgd is not None and opt.algorithm != "sgd":
            raise ValueError(
                f"strategy.kind {strategy.kind} needs optimizer.algorithm: sgd; {strategy.steps_as_sgd}"
            )
        parts = _part_optimizers(self.prompt)
        if strategy.steps_as_sgd is not None:
            rates = {
                (p.lr or opt.lr, opt.momentum if p.momentum is None else p.momentum) for p in parts.values()
            }
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
        return self

    @model_validator(mode="after")
    def _zoo_pfl_fits(self) -> Self:
        """ZooPFL wraps a local text model as its black box; its optimiser trains the parts after it."""
        if not isinstance(self.prompt, ZooPFLPromptConfig):
            return self
        if self.backbone.kind != "hf-text":
            raise ValueError(
                "prompt.kind zoo-pfl wraps a local text model as its black box (input embeddings in, output "
                "embeddings out); use backbone.kind hf-text"
            )
        if not isinstance(self.optimizer, GradientOptimizerConfig):
            raise ValueError(
                "prompt.kind zoo-pfl trains its re-mapping and head by gradient (optimizer.kind gradient) "
                "and its input surgery by SPSA (prompt.zo_*)"
            )
        if self.strategy.gradient_steps is not None:
            raise ValueError(
                f"strategy.kind {self.strategy.kind} {self.strategy.gradient_steps}, which the input "
                "surgery's zeroth-order steps do not take; use a server-side rule (fedavg, fedadam, ...)"
            )
        return self

    @model_validator(mode="after")
    def _few_shot_fits(self) -> Self:
        """Few-shot clients and pseudo-labels (FeS) are text classification by gradient."""
        if self.data.labelled_per_class is not None and self.backbone.kind == "open-clip":
            raise ValueError("data.labelled_per_class (few-shot clients) applies to text backbones")
        if self.pseudo_labels is None:
            return self
        if self.data.labelled_per_class is None:
            raise ValueError(
                "pseudo_labels labels each client's unlabelled examples; set data.labelled_per_class, the "
                "labels each client keeps per class (the rest of its training split is unlabelled)"
            )
        if self.backbone.kind != "hf-text" or not isinstance(self.optimizer, GradientOptimizerConfig):
            raise ValueError(
                "pseudo_labels trains by gradient on a local text backbone; use backbone.kind hf-text and "
                "optimizer.kind gradient"
            )
        plan = self.pseudo_labels.co_planning
        if plan is None:
            return self
        if not isinstance(self.prompt, DeepPromptConfig):
            raise ValueError(
                "pseudo_labels.co_planning plans which of a deep prompt's layers train; with "
                f"prompt.kind {self.prompt.kind} there are no layers to choose from. Use prompt.kind deep or "
                "remove co_planning"
            )
        rows = len(self.prompt.layers) if self.prompt.layers is not None else self.prompt.select_layers
        if rows is not None and max(plan.depths) > rows:
            raise ValueError(
                f"pseudo_labels.co_planning.depths: {max(plan.depths)} layers cannot train in a prompt of "
                f"{rows} layers; keep the depths at most {rows}"
            )
        return self

    @model_validator(mode="after")
    def _acceptance_fits(self) -> Self:
        """The held-out acceptance test is carved from a text task's training pool, and cannot undo
        a round whose release a privacy accountant has counted."""
        if self.federation.acceptance is None:
            return self
        if self.backbone.kind == "open-clip":
            raise ValueError(
                "federation.acceptance keeps a held-out set back from text classification's training "
                "pool; it is not built for open-clip tasks. Remove it"
            )
        if self.privacy.kind != "none":
            raise ValueError(
                f"federation.acceptance with privacy.kind {self.privacy.kind}: a rejected round's updates "
                "were still released to the server and spent privacy, which undoing the round would "
                "leave uncounted. Remove federation.acceptance or privacy"
            )
        return self

    @model_validator(mode="after")
    def _drift_state_unclipped(self) -> Self:
        """A client that keeps state from its own update (control variates, FedDyn's linear term)
        must be seen by the server as it trained: no bound may clip the update after it."""
        drift = self.strategy.drift_state
        if drift is None:
            return self
        if self.robustness.max_update_norm is not None:
            raise ValueError(
                f"robustness.max_update_norm clips each update on the server, but a strategy.kind "
                f"{self.strategy.kind} client keeps {drift}, so client and server state would disagree; "
                "remove robustness.max_update_norm (or use a strategy without client state)"
            )
        if self.privacy.kind == "local" and self.strategy.sent_beside_prompt is None:
            raise ValueError(
                f"privacy.kind local clips and noises each upload, but a strategy.kind {self.strategy.kind} "
                f"client keeps {drift}, so client and server state would disagree; use another strategy"
            )
        return self

    def paper_departures(self) -> list[str]:
        """The settings given explicitly that depart from the strategy's paper (its
        ``optimizer_defaults``), one sentence each, which a run states at start and records."""
        defaults = self.strategy.optimizer_defaults
        if not defaults or not isinstance(self.optimizer, GradientOptimizerConfig):
            return []
        return [
            f"strategy.kind {self.strategy.kind} runs with optimizer.{name}: "
            f"{_yaml_value(getattr(self.optimizer, name))} where the paper's algorithm has "
            f"{_yaml_value(value)}: not the published method"
            for name, value in defaults.items()
            if getattr(self.optimizer, name) != value
        ]

    @model_validator(mode="after")
    def _privacy_fits(self) -> Self:
        """Differential privacy holds only for what its accountant assumes: central DP replaces the
        strategy's mean by DP-FedAvg's, and local DP protects the prompt tensors alone."""
        privacy, strategy = self.privacy, self.strategy
        if privacy.kind == "central":
            if self.secure_aggregation.enabled:
                raise ValueError(
                    "privacy.kind central clips each client's update on the server, which secure aggregation "
                    "hides from it; with secure_aggregation use privacy.kind local (clients clip and noise "
                    "before masking), or disable one of the two"
                )
            if not strategy.dp_fedavg:
                raise ValueError(
                    f"privacy.kind central averages the clipped deltas with uniform weights and adds "
                    f"noise (DP-FedAvg); strategy.kind {strategy.kind!r} would see each update unnoised. "
                    f"Use strategy.kind {' or '.join(_kinds(lambda c: c.dp_fedavg))} "
                    "(privacy.server_momentum/server_lr give a server optimiser)"
                )
            if privacy.sampling == "poisson" and self.federation.min_clients > 1:
                raise ValueError(
                    f"privacy.sampling poisson samples each client with probability federation.fraction, "
                    f"so a round may have any number of clients, even none; federation.min_clients "
                    f"({self.federation.min_clients}) cannot be enforced: set federation.min_clients: 1, or "
                    "privacy.sampling: fixed"
                )
            if privacy.delta >= 1 / self.partition.num_clients:
                raise ValueError(
                    f"privacy.delta ({privacy.delta}) is not below 1 / partition.num_clients "
                    f"({1 / self.partition.num_clients:.3g}): a guarantee with that δ allows revealing a "
                    "whole client; lower privacy.delta"
                )
        if privacy.kind == "local" and strategy.sent_beside_prompt is not None:
            raise ValueError(
                f"privacy.kind local noises the prompt tensors only; strategy.kind {strategy.kind!r} also "
                f"uses what clients send beside them ({strategy.sent_beside_prompt}), unprotected. Use "
                f"one of {', '.join(_kinds(lambda c: c.sent_beside_prompt is None))}"
            )
        return self

    @model_validator(mode="after")
    def _parts_fit_the_backbone(self) -> Self:
        """CLIP prompt kinds and image data go with an open-clip backbone, text ones with text backbones."""
        clip = self.backbone.kind == "open-clip"
        image_builtin = self.data.source == "builtin" and self.data.name in BUILTIN_IMAGE_DATASETS
        if clip and self.prompt.kind not in CLIP_PROMPT_KINDS:
            raise ValueError(
                f"prompt.kind {self.prompt.kind!r} is for text backbones; with backbone.kind open-clip "
                f"choose one of {list(CLIP_PROMPT_KINDS)}"
            )
        if not clip and self.prompt.kind in CLIP_PROMPT_KINDS:
            raise ValueError(
                f"prompt.kind {self.prompt.kind!r} needs backbone.kind: open-clip "
                f"(backbone.kind is {self.backbone.kind!r})"
            )
        if clip and "head" in self.model_fields_set and self.head != SimilarityHeadConfig():
            raise ValueError(
                "head: applies to text backbones only; an open-clip backbone scores classes by CLIP's "
                "image-text similarity, so remove the head section"
            )
        if clip and self.data.source in ("builtin", "files") and not image_builtin:
            raise ValueError(
                f"data: backbone.kind open-clip needs images; use source: builtin with name one of "
                f"{list(BUILTIN_IMAGE_DATASETS)}, source: hub, or source: image-folder "
                f"(got source {self.data.source!r}, name {self.data.name!r})"
            )
        if not clip and (image_builtin or self.data.source in ("image-folder", "domain-folder", "vqa")):
            raise ValueError("data: image datasets need backbone.kind: open-clip")
        if (self.prompt.kind == "vqa-twin") != (self.data.source == "vqa"):
            raise ValueError(
                "prompt.kind vqa-twin answers questions and goes with data.source: vqa (and only it); "
                f"got prompt.kind {self.prompt.kind!r} with data.source {self.data.source!r}"
            )
        if not clip and self.data.novel_class_fraction is not None:
            raise ValueError(
                "data.novel_class_fraction (base-to-novel evaluation) needs backbone.kind: open-clip"
            )
        if not clip and self.data.source == "datasets":
            raise ValueError("data.source datasets pools image datasets; it needs backbone.kind: open-clip")
        if not clip and self.vision != VisionConfig():
            raise ValueError("vision: applies to open-clip backbones only; remove the vision section")
        for index, entry in enumerate(self.data.datasets or []):
            not_images = entry.source == "builtin" and entry.name not in BUILTIN_IMAGE_DATASETS
            if entry.source == "files" or not_images:
                raise ValueError(
                    f"data.datasets.{index}: needs images; use source: builtin with name one of "
                    f"{list(BUILTIN_IMAGE_DATASETS)}, source: hub, or source: image-folder"
                )
        return self

    @model_validator(mode="after")
    def _clip_class_sets(self) -> Self:
        """Class-specific CoOp context knows only its training classes; several datasets need
        clients that hold classes of one dataset each."""
        prompt = self.prompt
        text = prompt.text if isinstance(prompt, TwinPromptConfig) else prompt
        field = "prompt.text.class_specific" if text is not prompt else "prompt.class_specific"
        if isinstance(text, CoOpPromptConfig) and text.class_specific:
            if self.data.novel_class_fraction is not None:
                raise ValueError(
                    f"{field}: class-specific context (CSC) learns one context per training class and has "
                    "none for novel classes, so it cannot be evaluated base-to-novel; set class_specific: "
                    "false (one context shared by all classes) or remove data.novel_class_fraction"
                )
            if self.data.source == "datasets":
                raise ValueError(
                    f"{field}: class-specific context cannot score each dataset's own classes; set "
                    "class_specific: false or use one dataset"
                )
            if self.client_classes == "own":
                raise ValueError(
                    f"{field}: class-specific context is learned for one class set; with "
                    "vision.client_classes: own every client has another one. Set vision.client_classes: all "
                    "or class_specific: false"
                )
        if self.data.source == "datasets" and self.partition.kind != "classes":
            raise ValueError(
                f"partition.kind: {self.partition.kind!r} with data.source datasets; use kind: classes, "
                "which gives each client classes_per_client classes of one dataset (FedTPG)"
            )
        return self

    @model_validator(mode="after")
    def _language_model_fits(self) -> Self:
        """Language-model backbones (llama-cpp, vllm, openai) score label words after a decoder's
        template; discrete prompts train by BDPL, through such a backbone, and only there."""
        kind, prompt, opt = self.backbone.kind, self.prompt, self.optimizer
        discrete = isinstance(prompt, DiscretePromptConfig)
        if discrete != isinstance(opt, PolicyGradientOptimizerConfig):
            raise ValueError(
                "prompt.kind discrete trains by optimizer.kind bdpl, and bdpl trains discrete prompts only "
                f"(prompt.kind is {prompt.kind!r}, optimizer.kind {opt.kind!r})"
            )
        if discrete and kind not in LLM_BACKBONE_KINDS:
            raise ValueError(
                f"prompt.kind discrete sends text to a language model; set backbone.kind to one of "
                f"{list(LLM_BACKBONE_KINDS)} (backbone.kind is {kind!r})"
            )
        if kind not in LLM_BACKBONE_KINDS:
            return self
        allowed = ("discrete",) if kind == "openai" else ("soft", "intrinsic", "discrete")
        if prompt.kind not in allowed:
            why = "takes text only" if kind == "openai" else "takes input embeddings or text"
            raise ValueError(
                f"backbone.kind {kind} {why}: prompt.kind must be one of {list(allowed)} "
                f"(prompt.kind is {prompt.kind!r})"
            )
        if not isinstance(self.head, VerbalizerHeadConfig):
            raise ValueError(
                f"backbone.kind {kind} scores each class by its label words' next-token log-probabilities; "
                "set head.kind: verbalizer with label_words and a template that ends where the label "
                "word follows, e.g. '{text} Sentiment:'"
            )
        if "[MASK]" in self.head.template:
            raise ValueError(
                f"head.template: backbone.kind {kind} is a decoder that predicts the next token; leave "
                f"[MASK] out and end the template where the label word follows (got {self.head.template!r})"
            )
        return self

    @model_validator(mode="after")
    def _domains_fit(self) -> Self:
        """``partition.kind: domains`` needs images from several domains and, where their domains are
        known before loading (the builtin sets), one client or group per trained domain."""
        data, partition = self.data, self.partition
        if partition.kind == "domains" and not data.multi_domain:
            raise ValueError(
                "partition.kind domains gives each domain its own clients; it needs multi-domain images "
                "(data.source: domain-folder, or source: builtin with name one of "
                f"{list(MULTI_DOMAIN_BUILTINS)})"
            )
        if partition.kind != "domains" and partition.clients_per_domain != 1:
            raise ValueError("partition.clients_per_domain applies to partition.kind domains only")
        strategy, prompt = self.strategy, self.prompt
        if strategy.prompt_kind is not None and prompt.kind != strategy.prompt_kind:
            raise ValueError(
                f"strategy.kind {strategy.kind} aggregates prompt.kind {strategy.prompt_kind} only; set "
                f"prompt.kind: {strategy.prompt_kind} (prompt.kind is {prompt.kind!r})"
            )
        owners = _kinds(lambda c: c.prompt_kind == prompt.kind)
        if owners and strategy.kind not in owners:
            raise ValueError(
                f"prompt.kind {prompt.kind} keeps one prompt per domain, which only strategy.kind "
                f"{' or '.join(owners)} aggregates; set strategy.kind: {owners[0]}"
            )
        if strategy.needs_domains is not None and partition.kind != "domains":
            raise ValueError(
                f"strategy.kind {strategy.kind} {strategy.needs_domains}; set partition.kind: domains"
            )
        if prompt.kind in DOMAIN_PROMPT_KINDS:
            if data.source == "datasets" or data.novel_class_fraction is not None:
                raise ValueError(
                    f"prompt.kind {prompt.kind} is evaluated on the training classes of every domain; remove "
                    "data.novel_class_fraction and use one dataset"
                )
            if self.client_classes == "own":
                raise ValueError(
                    f"prompt.kind {prompt.kind} scores every class; set vision.client_classes: all"
                )
            if self.personalization.splits:
                raise ValueError(
                    f"prompt.kind {prompt.kind} already keeps what is per client or per domain; remove "
                    "personalization.local/shared_tokens"
                )
        known = data.known_domains
        if known is None:
            return self
        trained = data.trained_domains(known)
        if (
            partition.kind == "domains"
            and partition.num_clients != len(trained) * partition.clients_per_domain
        ):
            raise ValueError(
                f"partition.num_clients is {partition.num_clients}, but {len(trained)} domains "
                f"({', '.join(trained)}) × clients_per_domain {partition.clients_per_domain} make "
                f"{len(trained) * partition.clients_per_domain} clients; set partition.num_clients: "
                f"{len(trained) * partition.clients_per_domain}"
            )
        return self

    @model_validator(mode="after")
    def _black_box_fits(self) -> Self:
        """CMA-ES searches an intrinsic prompt; SPSA an intrinsic prompt or a text soft/deep prompt;
        FedBPT needs CMA-ES; a remote backbone gives no gradients and scores intrinsic prompts only."""
        opt, strategy = self.optimizer, self.strategy
        black_box = isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)
        generated = isinstance(self.prompt, IntrinsicPromptConfig) and self.prompt.generator is not None
        if isinstance(opt, CMAESOptimizerConfig) and generated:
            raise ValueError(
                "prompt.generator's weights are searched by SPSA or trained by gradient (CMA-ES's covariance "
                "over thousands of weights does not fit); set optimizer.kind: spsa or gradient"
            )
        if isinstance(strategy, FedKSeedConfig | FedBPTConfig) and generated:
            raise ValueError(f"strategy.kind {strategy.kind} searches z itself; remove prompt.generator")
        if isinstance(opt, CMAESOptimizerConfig) and self.prompt.kind != "intrinsic":
            raise ValueError(
                f"optimizer.kind 'cmaes' searches an intrinsic prompt's z; set prompt.kind: intrinsic "
                f"(prompt.kind is {self.prompt.kind!r}), or use optimizer.kind: spsa for a "
                f"{self.prompt.kind} prompt"
            )
        spsa_kinds = SPSA_PROMPT_KINDS + BLACK_BOX_CLIP_KINDS
        if isinstance(opt, SPSAOptimizerConfig) and self.prompt.kind not in spsa_kinds:
            raise ValueError(
                f"optimizer.kind spsa perturbs a text prompt ({', '.join(SPSA_PROMPT_KINDS)}) or a CLIP "
                f"visual-generator; prompt.kind {self.prompt.kind!r} trains by gradient "
                "(optimizer.kind: gradient)"
            )
        if (
            isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)
            and isinstance(strategy, FedKSeedConfig | FedBPTConfig)
            and self.prompt.kind in BLACK_BOX_CLIP_KINDS
        ):
            raise ValueError(
                f"strategy.kind {strategy.kind} searches a text prompt; use fedavg or another server rule"
            )
        outputs_only = self.backbone.kind in ("remote", *LLM_BACKBONE_KINDS)
        if outputs_only and not isinstance(opt, BLACK_BOX_OPTIMIZERS):
            raise ValueError(
                f"backbone.kind {self.backbone.kind} returns outputs only, never gradients; set "
                "optimizer.kind: cmaes or spsa (soft and intrinsic prompts) or bdpl (discrete prompts)"
            )
        if self.backbone.kind == "remote" and self.prompt.kind != "intrinsic":
            raise ValueError(
                "backbone.kind remote scores intrinsic prompts only (the service rebuilds A z + p0); "
                f"set prompt.kind: intrinsic (prompt.kind is {self.prompt.kind!r})"
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
            self._kseed_fits(opt)
        if black_box and opt.budget is not None and opt.score_on == "batch":
            candidates = opt.popsize if isinstance(opt, CMAESOptimizerConfig) else 2
            if opt.budget < candidates * opt.batch_size:
                raise ValueError(
                    f"optimizer.budget ({opt.budget} queries) is less than one {opt.kind} iteration: "
                    f"{candidates} candidates × batch_size {opt.batch_size} = {candidates * opt.batch_size}"
                )
        return self

    def _kseed_fits(self, opt: SPSAOptimizerConfig) -> None:
        """FedKSeed's pairs come from SPSA steps, a fixed number per round, and travel exactly."""
        if opt.score_on != "batch":
            raise ValueError(
                "strategy.kind fedkseed sends a fixed number of steps a round (budget // (2·batch_size)); "
                "set optimizer.score_on: batch"
            )
        if self.payload.wire_dtype != "float32":
            raise ValueError(
                f"strategy.kind fedkseed sends seed indices and projected gradients that every party "
                f"replays exactly; set payload.wire_dtype: float32 (it is {self.payload.wire_dtype!r})"
            )
        if self.robustness.max_update_norm is not None:
            raise ValueError(
                "strategy.kind fedkseed sends no prompt to clip; remove robustness.max_update_norm (the "
                "server bounds each projected gradient by strategy.max_projected_grad instead)"
            )


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


def _kinds(declares: Callable[[type[StrategySettings]], bool]) -> list[str]:
    """The ``strategy.kind`` values whose configuration class declares what ``declares`` asks."""
    kinds = []
    for config in STRATEGY_CONFIGS:
        if declares(config):
            kinds.extend(get_args(config.model_fields["kind"].annotation))
    return kinds
