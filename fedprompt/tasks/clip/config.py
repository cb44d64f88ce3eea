"""Settings of CLIP tasks: the open_clip backbone, the CLIP prompts (CoOp context, VPT tokens, pixel
prompts, twin prompts, the prompt generator, the VQA prompt, FedAPT's and Fed-DPT's domain-aware
prompts) and the ``vision`` section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from fedprompt.config_base import StrictModel
from fedprompt.tasks.config import PromptInitConfig
from fedprompt.training.config import AugmentConfig, PartOptimizerConfig

BUNDLED_CLIP_MODELS = ("demo-clip",)


BUNDLED_WEIGHTS = "bundled"


CLIP_PROMPT_KINDS = (
    "coop",
    "vpt",
    "pixel",
    "twin",
    "generator",
    "vqa-twin",
    "fedapt",
    "fed-dpt",
    "visual-generator",
)


DOMAIN_PROMPT_KINDS = ("fedapt", "fed-dpt")
"""Prompt kinds that train one prompt per client or domain and weigh them per image at test time."""
BLACK_BOX_CLIP_KINDS = ("visual-generator",)
"""CLIP prompt kinds trained through CLIP's logits alone (by SPSA)."""


DEFAULT_COOP_TOKENS = 16


class OpenCLIPBackboneConfig(StrictModel):
    """A frozen open_clip CLIP model, for vision-language prompts (CoOp, VPT, twin, generator)."""

    kind: Literal["open-clip"] = "open-clip"
    model: str = Field(
        "ViT-B-32",
        description="An open_clip model name (open_clip.list_models()), a path to an open_clip model "
        "config .json file, or 'bundled:demo-clip' (a small CLIP pre-trained offline on first use: "
        "a demo backbone, not a real CLIP).",
    )
    pretrained: str | None = Field(
        "openai",
        description="An open_clip pretrained tag of `model` (openai, laion2b_s34b_b79k, ...), a local "
        "checkpoint file (.safetensors/.bin/.pt), or null for seeded random weights (tests and timing); "
        "'bundled' (the default with a bundled model) for the bundled model's own weights.",
    )
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    image_size: int | None = Field(None, ge=8, description="Override the model's input image size.")
    feature_cache_dir: Path | None = Field(
        None,
        description="Folder for cached image features (safetensors keyed by model, weights and data); "
        "null keeps them in memory only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _bundled_weights(cls, data: Any) -> Any:
        """A bundled model brings its weights: ``pretrained`` defaults to 'bundled' for it (another
        value is ignored with a warning when the model loads, as a builtin dataset's columns are)."""
        if isinstance(data, dict) and str(data.get("model", "")).startswith("bundled:"):
            alias = str(data["model"]).removeprefix("bundled:")
            if alias not in BUNDLED_CLIP_MODELS:
                raise ValueError(
                    f"model: unknown bundled CLIP model {alias!r}; known: "
                    f"{[f'bundled:{name}' for name in BUNDLED_CLIP_MODELS]}"
                )
            data = {**data, "pretrained": data.get("pretrained", BUNDLED_WEIGHTS)}
        elif isinstance(data, dict) and data.get("pretrained") == BUNDLED_WEIGHTS:
            raise ValueError(
                "pretrained: 'bundled' names a bundled model's own weights; set model to one of "
                f"{[f'bundled:{name}' for name in BUNDLED_CLIP_MODELS]} or give a tag or checkpoint file"
            )
        return data


class CoOpPromptConfig(PromptInitConfig):
    """CLIP learned context (CoOp, as PromptFL trains it): M vectors around the class-name tokens.

    M (``num_tokens``) is 16 by default; with ``init: text`` it is the token count of
    ``init_text``, as CoOp takes it from its ``CTX_INIT`` phrase (each vector starts as one of the
    phrase's token embeddings, none repeated or cut). A ``num_tokens`` given beside ``init: text``
    must equal that count.
    """

    kind: Literal["coop"] = "coop"
    num_tokens: int | None = Field(  # type: ignore[assignment]  # None: from init_text, or 16
        None,
        ge=1,
        le=64,
        description="M, the context vectors: 16 when null, or the token count of init_text with init: text.",
    )
    init: Literal["text", "vocab", "random"] = Field(
        "random", description="text: from `init_text` (e.g. 'a photo of a'); random: N(0, init_std²)."
    )
    class_specific: bool = Field(False, description="One context per class instead of one shared by all.")
    class_position: Literal["end", "middle", "front"] = Field(
        "end",
        description="Where the class name sits (CoOp's CLASS_TOKEN_POSITION): after the context, between "
        "its halves, or before it.",
    )
    depth: int = Field(
        1, ge=1, description="Text layers with prompts: 1 is CoOp; more adds MaPLe-style deep text prompts."
    )

    @model_validator(mode="after")
    def _phrase_is_used(self) -> CoOpPromptConfig:
        if self.init_text and self.init != "text":
            raise ValueError(
                f"init_text is given but init is {self.init!r}; set init: text to start the context from "
                "the phrase (CoOp), or remove init_text"
            )
        return self

    @property
    def default_num_tokens(self) -> int | None:
        """M when it does not depend on the tokenizer (None: the token count of init_text)."""
        if self.num_tokens is not None:
            return self.num_tokens
        return None if self.init == "text" else DEFAULT_COOP_TOKENS


class VPTPromptConfig(StrictModel):
    """Visual prompt tuning: learned tokens in the image tower's sequence (shallow or deep)."""

    kind: Literal["vpt"] = "vpt"
    num_tokens: int = Field(8, ge=1, le=512)
    deep: bool = Field(False, description="Own tokens at every layer from `start_layer` up (else one set).")
    start_layer: int = Field(0, ge=0, description="First vision layer with prompts; layers below are cached.")
    depth: int | None = Field(
        None, ge=1, description="Deep only: prompted layers from `start_layer` (null: up to the last)."
    )
    class_template: str = Field("a photo of a {}.", description="Fixed class text when VPT is used alone.")
    placement: Literal["after-ln-pre", "before-ln-pre"] = Field(
        "after-ln-pre",
        description="Where the first prompts enter the sequence: after the tower's ln_pre (VPT) or before "
        "it, so ln_pre normalises them too (MaPLe; start_layer 0 only).",
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="VPT's prompt dropout while training (its paper: 0.1); 0: none."
    )

    @model_validator(mode="after")
    def _depth_is_deep(self) -> VPTPromptConfig:
        if self.depth is not None and not self.deep:
            raise ValueError("depth applies to deep VPT only; set deep: true or remove depth")
        if self.placement == "before-ln-pre" and self.start_layer != 0:
            raise ValueError(
                f"placement: before-ln-pre puts the prompts in before the tower's first layer; it needs "
                f"start_layer: 0 (got {self.start_layer})"
            )
        return self


class PixelPromptConfig(StrictModel):
    """A pixel-space visual prompt added to the preprocessed image (visual prompting, TPFL)."""

    kind: Literal["pixel"] = "pixel"
    method: Literal["patch", "frame", "random-patch"] = Field(
        "patch", description="patch: top-left corner; frame: the outer `size` pixels; random-patch."
    )
    size: int = Field(10, ge=1, description="Patch side or frame width in pixels (s).")
    init_std: float = Field(1.0, ge=0, description="Initial values N(0, init_std²) (visual prompting: 1).")
    class_template: str = Field("a photo of a {}.", description="Fixed class text when used alone.")
    random_at_eval: bool = Field(
        False,
        description="random-patch only: random positions at evaluation too (fixed by the run seed, as "
        "Bahng et al.'s random prompter), instead of the image centre.",
    )

    @model_validator(mode="after")
    def _random_at_eval_is_random(self) -> PixelPromptConfig:
        if self.random_at_eval and self.method != "random-patch":
            raise ValueError(f"random_at_eval applies to method: random-patch, not {self.method!r}")
        return self


VisualPromptConfig = Annotated[VPTPromptConfig | PixelPromptConfig, Field(discriminator="kind")]


class VisualGeneratorPromptConfig(StrictModel):
    """Fed-BBPT on CLIP: each client's small generator writes a visual prompt per image (BlackVIP's
    idea, light): the image pooled to `grid` × `grid` → tanh layer of `hidden` units → a 3 × p × p
    prompt (p = `prompt_size`) upsampled to the image and scaled by `scale`, added to the pixels.
    Trained by SPSA (`optimizer.kind: spsa`) from the logits of CLIP used as a black box (every image
    scored counts as a query), or by gradient as the white-box baseline; only its weights are
    aggregated. The class text is fixed (`class_template`)."""

    kind: Literal["visual-generator"] = "visual-generator"
    grid: int = Field(8, ge=1, le=64, description="The side of the low-resolution view the generator reads.")
    hidden: int = Field(32, ge=1, le=1024, description="The generator's hidden width.")
    prompt_size: int = Field(8, ge=1, le=224, description="The side of the prompt before upsampling.")
    scale: float = Field(1.0, gt=0, description="The prompt's scale in units of the preprocessed pixels.")
    class_template: str = Field("a photo of a {}.", description="The fixed class text.")


class TwinPromptConfig(StrictModel):
    """Twin prompts (TPFL): a text context and a visual prompt trained together, both aggregated."""

    kind: Literal["twin"] = "twin"
    text: CoOpPromptConfig = Field(default_factory=CoOpPromptConfig)
    visual: VisualPromptConfig = Field(default_factory=PixelPromptConfig)
    coupled: bool = Field(
        False, description="MaPLe coupling: visual prompt at layer l = W_l · text prompt at layer l (vpt)."
    )
    text_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)
    visual_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)
    contrastive: bool = Field(
        False,
        description="ATPFL: loss = ce_weight·CE + contrast to the global and the previous local prompts.",
    )
    contrast: Literal["image", "image-and-text"] = Field(
        "image-and-text",
        description="ATPFL's contrast on the image features only (the text context then learns from the "
        "cross-entropy alone when the visual prompt is a pixel patch), or also on the class text features.",
    )
    ce_weight: float = Field(0.2, gt=0, description="ATPFL's η, the weight of the cross-entropy.")
    temperature: float = Field(2.0, gt=0, description="ATPFL's contrastive temperature T.")

    @model_validator(mode="after")
    def _coupling(self) -> TwinPromptConfig:
        if not self.coupled:
            return self
        if not isinstance(self.visual, VPTPromptConfig):
            raise ValueError(
                "coupled: true needs visual.kind: vpt (token prompts made from the text prompts)"
            )
        text_tokens = self.text.default_num_tokens
        if text_tokens is not None and self.visual.num_tokens != text_tokens:
            raise ValueError(
                f"coupled: visual.num_tokens ({self.visual.num_tokens}) must equal text.num_tokens "
                f"({text_tokens}): each visual token is made from one text token"
            )
        if self.text.class_specific:
            raise ValueError("coupled: needs text.class_specific: false (one text prompt to map per layer)")
        return self


class GeneratorPromptConfig(StrictModel):
    """FedTPG's prompt generator: a small network writes the context from the class names."""

    kind: Literal["generator"] = "generator"
    num_tokens: int = Field(4, ge=1, le=64, description="M, the context vectors (learned queries).")
    heads: int = Field(4, ge=1, description="Cross-attention heads.")
    ff_mult: int = Field(4, ge=1, description="GEGLU feed-forward width, in multiples of the text width.")
    self_attention_layers: int = Field(0, ge=0)
    name_template: str = Field("{}", description="Text whose CLIP features describe a class (bare names).")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the initial queries.")


class VQAPromptConfig(StrictModel):
    """Prompted CLIP for visual question answering: a learned context before the question tokens, a
    visual prompt on the image (or none), a joint query from the two, scored against every candidate
    answer's text features (with a learned answer-side context, or a fixed template)."""

    kind: Literal["vqa-twin"] = "vqa-twin"
    question: CoOpPromptConfig = Field(
        default_factory=lambda: CoOpPromptConfig(num_tokens=8),
        description="Context vectors before the question tokens (shared, depth 1).",
    )
    answer: CoOpPromptConfig | None = Field(
        default_factory=lambda: CoOpPromptConfig(num_tokens=4),
        description="Learned context before each answer's tokens; null: `answer_template` text, fixed.",
    )
    answer_template: str = Field("{}", description="Fixed answer text when `answer` is null.")
    visual: VisualPromptConfig | None = Field(
        default_factory=lambda: VPTPromptConfig(num_tokens=4),
        description="Visual prompt (vpt tokens or a pixel patch); null: frozen, cached image features.",
    )
    fusion: Literal["sum", "mlp"] = Field(
        "mlp",
        description="Joint query: sum = normalise(î + q̂); mlp = normalise(î + q̂ + MLP([î, q̂, î⊙q̂])), "
        "the MLP's output layer zero at the start (it begins as the sum).",
    )
    fusion_hidden: int = Field(256, ge=1, description="Hidden width of the mlp fusion.")
    text_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)
    visual_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)
    fusion_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)

    @model_validator(mode="after")
    def _question_context_is_shared(self) -> VQAPromptConfig:
        if self.question.class_specific or self.question.depth != 1:
            raise ValueError(
                "question: the question context is one shared set of input vectors; "
                "set class_specific: false and depth: 1"
            )
        if self.answer is None and self.answer_template.count("{}") != 1:
            raise ValueError(f"answer_template needs '{{}}' exactly once, got {self.answer_template!r}")
        return self


class FedAPTPromptConfig(StrictModel):
    """FedAPT (Su et al., AAAI 2024, "Federated Adaptive Prompt Tuning for Multi-Domain Collaborative
    Learning"; reference code leondada/FedAPT): a meta context ctx, a fixed random key k_i per client
    (uniform in [0, 1), M × d, made from the run seed and the client: nothing to send), and a global
    adaptive network a (linear, no bias) on CLIP's frozen image features. Client i trains ctx with
    the prompt ctx + ctx ⊙ k_i and a with a cross-entropy toward i; both are aggregated like any
    prompt. At test time an image of unknown domain gets ctx + ctx ⊙ Σ_i w_i(x) k_i, with
    w(x) = softmax(standardise(a(x)) / temperature) over the clients.
    """

    kind: Literal["fedapt"] = "fedapt"
    context: CoOpPromptConfig = Field(
        default_factory=lambda: CoOpPromptConfig(num_tokens=16, class_specific=True),
        description="The meta context ctx (the reference: 16 to 24 class-specific vectors, N(0, 0.02²)).",
    )
    temperature: float = Field(
        0.01, gt=0, description="t of the test-time weights softmax(standardise(a(x)) / t) (reference: 0.01)."
    )
    domain_loss_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the adaptive network's cross-entropy toward the client (reference: 1).",
    )
    test_mixture: Literal["prompt", "features"] = Field(
        "prompt",
        description="prompt: every test image's own context through the text tower (exact, as the "
        "reference); features: the clients' keyed class features computed once and mixed by w(x) (cheap; "
        "exact only for one-hot weights).",
    )

    @model_validator(mode="after")
    def _input_context(self) -> FedAPTPromptConfig:
        if self.context.depth != 1:
            raise ValueError("context.depth: FedAPT keys the input context; set depth: 1")
        return self


class FedDPTPromptConfig(StrictModel):
    """Fed-DPT (Wei et al., "Dual Prompt Tuning for Domain-Aware Federated Learning"): a CoOp text
    prompt per domain (kept apart on the server, ``strategy.kind: fed-dpt``) and one visual prompt
    token per domain in the image tower ([CLS, P_1 … P_D, patches]). The class token's attention to
    the D visual tokens in the tower's last block weighs the domains' predictions:
    logit_c = s · Σ_d w_d(x) cos(f(x), g_{d,c}). A client trains its own domain's text prompt and
    the visual tokens; the domain is unknown at test time.
    """

    kind: Literal["fed-dpt"] = "fed-dpt"
    text: CoOpPromptConfig = Field(
        default_factory=lambda: CoOpPromptConfig(num_tokens=16),
        description="Each domain's text prompt (shared by the classes, depth 1; the paper: 16 vectors).",
    )
    visual_start_layer: int = Field(
        0, ge=0, description="Vision layer where the D visual tokens enter (the paper: 0, the input)."
    )
    placement: Literal["after-ln-pre", "before-ln-pre"] = Field(
        "after-ln-pre",
        description="Where the visual tokens enter at layer 0: after the tower's ln_pre or before.",
    )
    text_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)
    visual_optimizer: PartOptimizerConfig = Field(default_factory=PartOptimizerConfig)

    @model_validator(mode="after")
    def _one_prompt_per_domain(self) -> FedDPTPromptConfig:
        if self.text.class_specific or self.text.depth != 1:
            raise ValueError(
                "text: each domain's prompt is one shared context; set class_specific: false, depth: 1"
            )
        if self.placement == "before-ln-pre" and self.visual_start_layer != 0:
            raise ValueError("placement: before-ln-pre needs visual_start_layer: 0")
        return self


class VisionConfig(StrictModel):
    """Settings of image classification with CLIP prompts (open-clip backbones only)."""

    client_classes: Literal["own", "all"] | None = Field(
        None,
        description="own: each client's softmax (and a prompt generator's input) runs over the classes in "
        "its own data, its labels re-indexed within them (FedTPG); all: over every training class. "
        "null: own for prompt.kind generator, all otherwise.",
    )
    augment: AugmentConfig | None = Field(
        None, description="Training augmentation (CoOp's crops and flips); null: the plain images."
    )
