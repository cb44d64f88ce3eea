"""The checks that a task's parts fit together: prompt kinds and data with the backbone (CLIP or
text, language models and their verbalizer template), class-specific CoOp context with the classes
it is evaluated on, multi-domain data with domain partitions, prompts and strategies, and few-shot
clients with pseudo-labelling. Each takes the validated ``RunConfig`` and raises ``ValueError``
naming the fields and the fix.
"""

from __future__ import annotations

from typing import Any

from fedprompt.config_checks.strategy_kinds import kinds_declaring
from fedprompt.data.config import BUILTIN_IMAGE_DATASETS, MULTI_DOMAIN_BUILTINS
from fedprompt.tasks.clip.config import (
    CLIP_PROMPT_KINDS,
    DOMAIN_PROMPT_KINDS,
    CoOpPromptConfig,
    TwinPromptConfig,
    VisionConfig,
)
from fedprompt.tasks.text.config import (
    LLM_BACKBONE_KINDS,
    DeepPromptConfig,
    DiscretePromptConfig,
    SimilarityHeadConfig,
    VerbalizerHeadConfig,
)
from fedprompt.training.config import GradientOptimizerConfig, PolicyGradientOptimizerConfig


def few_shot_fits(run: Any) -> None:
    """Few-shot clients and pseudo-labels (FeS) are text classification by gradient."""
    if run.data.labelled_per_class is not None and run.backbone.kind == "open-clip":
        raise ValueError("data.labelled_per_class (few-shot clients) applies to text backbones")
    if run.pseudo_labels is None:
        return
    if run.data.labelled_per_class is None:
        raise ValueError(
            "pseudo_labels labels each client's unlabelled examples; set data.labelled_per_class, the "
            "labels each client keeps per class (the rest of its training split is unlabelled)"
        )
    if run.backbone.kind != "hf-text" or not isinstance(run.optimizer, GradientOptimizerConfig):
        raise ValueError(
            "pseudo_labels trains by gradient on a local text backbone; use backbone.kind hf-text and "
            "optimizer.kind gradient"
        )
    plan = run.pseudo_labels.co_planning
    if plan is None:
        return
    if not isinstance(run.prompt, DeepPromptConfig):
        raise ValueError(
            "pseudo_labels.co_planning plans which of a deep prompt's layers train; with "
            f"prompt.kind {run.prompt.kind} there are no layers to choose from. Use prompt.kind deep or "
            "remove co_planning"
        )
    rows = len(run.prompt.layers) if run.prompt.layers is not None else run.prompt.select_layers
    if rows is not None and max(plan.depths) > rows:
        raise ValueError(
            f"pseudo_labels.co_planning.depths: {max(plan.depths)} layers cannot train in a prompt of "
            f"{rows} layers; keep the depths at most {rows}"
        )


def parts_fit_the_backbone(run: Any) -> None:
    """CLIP prompt kinds and image data go with an open-clip backbone, text ones with text backbones."""
    clip = run.backbone.kind == "open-clip"
    image_builtin = run.data.source == "builtin" and run.data.name in BUILTIN_IMAGE_DATASETS
    if clip and run.prompt.kind not in CLIP_PROMPT_KINDS:
        raise ValueError(
            f"prompt.kind {run.prompt.kind!r} is for text backbones; with backbone.kind open-clip "
            f"choose one of {list(CLIP_PROMPT_KINDS)}"
        )
    if not clip and run.prompt.kind in CLIP_PROMPT_KINDS:
        raise ValueError(
            f"prompt.kind {run.prompt.kind!r} needs backbone.kind: open-clip "
            f"(backbone.kind is {run.backbone.kind!r})"
        )
    if clip and "head" in run.model_fields_set and run.head != SimilarityHeadConfig():
        raise ValueError(
            "head: applies to text backbones only; an open-clip backbone scores classes by CLIP's "
            "image-text similarity, so remove the head section"
        )
    if clip and run.data.source in ("builtin", "files") and not image_builtin:
        raise ValueError(
            f"data: backbone.kind open-clip needs images; use source: builtin with name one of "
            f"{list(BUILTIN_IMAGE_DATASETS)}, source: hub, or source: image-folder "
            f"(got source {run.data.source!r}, name {run.data.name!r})"
        )
    if not clip and (image_builtin or run.data.source in ("image-folder", "domain-folder", "vqa")):
        raise ValueError("data: image datasets need backbone.kind: open-clip")
    if (run.prompt.kind == "vqa-twin") != (run.data.source == "vqa"):
        raise ValueError(
            "prompt.kind vqa-twin answers questions and goes with data.source: vqa (and only it); "
            f"got prompt.kind {run.prompt.kind!r} with data.source {run.data.source!r}"
        )
    if not clip and run.data.novel_class_fraction is not None:
        raise ValueError(
            "data.novel_class_fraction (base-to-novel evaluation) needs backbone.kind: open-clip"
        )
    if not clip and run.data.source == "datasets":
        raise ValueError("data.source datasets pools image datasets; it needs backbone.kind: open-clip")
    if not clip and run.vision != VisionConfig():
        raise ValueError("vision: applies to open-clip backbones only; remove the vision section")
    for index, entry in enumerate(run.data.datasets or []):
        not_images = entry.source == "builtin" and entry.name not in BUILTIN_IMAGE_DATASETS
        if entry.source == "files" or not_images:
            raise ValueError(
                f"data.datasets.{index}: needs images; use source: builtin with name one of "
                f"{list(BUILTIN_IMAGE_DATASETS)}, source: hub, or source: image-folder"
            )


def clip_class_sets(run: Any) -> None:
    """Class-specific CoOp context knows only its training classes; several datasets need
    clients that hold classes of one dataset each."""
    prompt = run.prompt
    text = prompt.text if isinstance(prompt, TwinPromptConfig) else prompt
    field = "prompt.text.class_specific" if text is not prompt else "prompt.class_specific"
    if isinstance(text, CoOpPromptConfig) and text.class_specific:
        if run.data.novel_class_fraction is not None:
            raise ValueError(
                f"{field}: class-specific context (CSC) learns one context per training class and has "
                "none for novel classes, so it cannot be evaluated base-to-novel; set class_specific: "
                "false (one context shared by all classes) or remove data.novel_class_fraction"
            )
        if run.data.source == "datasets":
            raise ValueError(
                f"{field}: class-specific context cannot score each dataset's own classes; set "
                "class_specific: false or use one dataset"
            )
        if run.client_classes == "own":
            raise ValueError(
                f"{field}: class-specific context is learned for one class set; with "
                "vision.client_classes: own every client has another one. Set vision.client_classes: all "
                "or class_specific: false"
            )
    if run.data.source == "datasets" and run.partition.kind != "classes":
        raise ValueError(
            f"partition.kind: {run.partition.kind!r} with data.source datasets; use kind: classes, "
            "which gives each client classes_per_client classes of one dataset (FedTPG)"
        )


def language_model_fits(run: Any) -> None:
    """Language-model backbones (llama-cpp, vllm, openai) score label words after a decoder's
    template; discrete prompts train by BDPL, through such a backbone, and only there."""
    kind, prompt, opt = run.backbone.kind, run.prompt, run.optimizer
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
        return
    allowed = ("discrete",) if kind == "openai" else ("soft", "intrinsic", "discrete")
    if prompt.kind not in allowed:
        why = "takes text only" if kind == "openai" else "takes input embeddings or text"
        raise ValueError(
            f"backbone.kind {kind} {why}: prompt.kind must be one of {list(allowed)} "
            f"(prompt.kind is {prompt.kind!r})"
        )
    if not isinstance(run.head, VerbalizerHeadConfig):
        raise ValueError(
            f"backbone.kind {kind} scores each class by its label words' next-token log-probabilities; "
            "set head.kind: verbalizer with label_words and a template that ends where the label "
            "word follows, e.g. '{text} Sentiment:'"
        )
    if "[MASK]" in run.head.template:
        raise ValueError(
            f"head.template: backbone.kind {kind} is a decoder that predicts the next token; leave "
            f"[MASK] out and end the template where the label word follows (got {run.head.template!r})"
        )


def domains_fit(run: Any) -> None:
    """``partition.kind: domains`` needs images from several domains and, where their domains are
    known before loading (the builtin sets), one client or group per trained domain."""
    data, partition = run.data, run.partition
    if partition.kind == "domains" and not data.multi_domain:
        raise ValueError(
            "partition.kind domains gives each domain its own clients; it needs multi-domain images "
            "(data.source: domain-folder, or source: builtin with name one of "
            f"{list(MULTI_DOMAIN_BUILTINS)})"
        )
    if partition.kind != "domains" and partition.clients_per_domain != 1:
        raise ValueError("partition.clients_per_domain applies to partition.kind domains only")
    strategy, prompt = run.strategy, run.prompt
    if strategy.prompt_kind is not None and prompt.kind != strategy.prompt_kind:
        raise ValueError(
            f"strategy.kind {strategy.kind} aggregates prompt.kind {strategy.prompt_kind} only; set "
            f"prompt.kind: {strategy.prompt_kind} (prompt.kind is {prompt.kind!r})"
        )
    owners = kinds_declaring(lambda c: c.prompt_kind == prompt.kind)
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
        if run.client_classes == "own":
            raise ValueError(f"prompt.kind {prompt.kind} scores every class; set vision.client_classes: all")
        if run.personalization.splits:
            raise ValueError(
                f"prompt.kind {prompt.kind} already keeps what is per client or per domain; remove "
                "personalization.local/shared_tokens"
            )
    known = data.known_domains
    if known is None:
        return
    trained = data.trained_domains(known)
    if partition.kind == "domains" and partition.num_clients != len(trained) * partition.clients_per_domain:
        raise ValueError(
            f"partition.num_clients is {partition.num_clients}, but {len(trained)} domains "
            f"({', '.join(trained)}) × clients_per_domain {partition.clients_per_domain} make "
            f"{len(trained) * partition.clients_per_domain} clients; set partition.num_clients: "
            f"{len(trained) * partition.clients_per_domain}"
        )
