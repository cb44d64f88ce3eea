"""Run configuration: one pydantic model per part of a run, validated before any work starts.

A configuration is plain YAML; ``load_config`` reads it, applies ``key=value`` overrides and
validates it. Every model forbids unknown fields, so a typo fails at once with the field's
name and the fields that are allowed there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedprompt.errors import UserError

BUILTIN_DATASETS = ("chatterbot-corpus",)
BUILTIN_IMAGE_DATASETS = ("digits",)
BUNDLED_CLIP_MODELS = ("demo-clip",)
BUNDLED_WEIGHTS = "bundled"
CLIP_PROMPT_KINDS = ("coop", "vpt", "pixel", "twin", "generator", "vqa-twin")
VQA_FORMATS = ("vqa-rad", "slake", "pathvqa", "easy-vqa")
DEFAULT_COOP_TOKENS = 16
SPSA_PROMPT_KINDS = ("soft", "deep", "intrinsic")
WireDtype = Literal["float32", "float16", "bfloat16"]


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names each bad field and what is allowed."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- backbone


class HFTextBackboneConfig(StrictModel):
    """A frozen Hugging Face text model (encoder or decoder)."""

    kind: Literal["hf-text"] = "hf-text"
    model: str = Field(
        "bundled:all-MiniLM-L6-v2",
        description="A Hub name, a local model folder, or a bundled alias "
        "('bundled:all-MiniLM-L6-v2', 'bundled:smollm2-135m').",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside `model` (needs the gguf package).")
    revision: str | None = None
    random_config: dict[str, Any] | None = Field(
        None,
        description="Build a randomly initialised model from this transformers config instead of "
        "loading weights, e.g. {model_type: bert, hidden_size: 32, ...}. For tests and mechanics.",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer to load; defaults to `model` (the bundled MiniLM one for random configs).",
    )
    dtype: WireDtype = "float32"
    max_length: int = Field(64, ge=8, le=8192, description="Tokens kept per input, before the prompt.")


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


class RemoteBackboneConfig(StrictModel):
    """A frozen text model behind a ``fedprompt serve`` HTTP service: clients get its outputs only.

    The tokenizer is public and runs on the client: inputs travel as token ids, which the service
    validates (range, length). The bearer token is read from the environment variable named by
    ``token_env``, never written in the configuration.
    """

    kind: Literal["remote"] = "remote"
    url: str = Field(
        "http://127.0.0.1:8000", pattern=r"^https?://\S+$", description="Base URL of the inference service."
    )
    token_env: str = Field(
        "FEDPROMPT_API_TOKEN",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding this party's bearer token.",
    )
    tokenizer: str = Field(
        "bundled:all-MiniLM-L6-v2",
        description="The served model's tokenizer (Hub name, folder or bundled alias), loaded locally.",
    )
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for one answer.")
    retries: int = Field(3, ge=0, description="Retries after a connection error or a 5xx answer.")
    backoff: float = Field(0.5, ge=0, description="Seconds before the first retry; doubles each retry.")
    ca_file: Path | None = Field(
        None,
        description="CA certificate (PEM) to trust for an https url (a private or self-signed CA); "
        "by default the system's CAs.",
    )
    client_certfile: Path | None = Field(
        None, description="This party's certificate (PEM), for a service that requires one (mutual TLS)."
    )
    client_keyfile: Path | None = Field(None, description="The private key (PEM) of `client_certfile`.")

    @model_validator(mode="after")
    def _tls_fits(self) -> RemoteBackboneConfig:
        if (self.client_certfile is None) != (self.client_keyfile is None):
            raise ValueError("client_certfile and client_keyfile go together; give both or neither")
        tls_fields = [name for name in ("ca_file", "client_certfile") if getattr(self, name) is not None]
        if tls_fields and not self.url.startswith("https://"):
            raise ValueError(f"{', '.join(tls_fields)} apply to https urls; url is {self.url!r}")
        return self


BackboneConfig = Annotated[
    HFTextBackboneConfig | OpenCLIPBackboneConfig | RemoteBackboneConfig, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- classification head


def _one_text_slot(template: str) -> str:
    """An input template holds ``{text}`` exactly once."""
    if template.count("{text}") != 1:
        raise ValueError("the template must contain '{text}' exactly once, e.g. 'Review: {text}'")
    return template


class VerbalizerHeadConfig(StrictModel):
    """Classify with the backbone's language-model head: the logit of each class's label words."""

    kind: Literal["verbalizer"] = "verbalizer"
    template: str = Field(
        "{text} It was [MASK].",
        description="Input template. Masked LMs predict at [MASK]; decoders predict the next token after it "
        "(leave [MASK] out for decoders).",
    )
    label_words: dict[str, list[str]] | None = Field(
        None, description="Label name -> words whose logits score the class; defaults to the label's name."
    )

    _template = field_validator("template")(_one_text_slot)


class SimilarityHeadConfig(StrictModel):
    """Classify with a sentence encoder: cosine similarity to encoded label descriptions."""

    kind: Literal["similarity"] = "similarity"
    template: str = "{text}"
    description_template: str = "This is about {label}."
    label_descriptions: dict[str, str] | None = Field(
        None, description="Label name -> description; defaults to `description_template`."
    )
    temperature: float = Field(0.05, gt=0)
    pooling: Literal["mean", "cls"] = "mean"

    _template = field_validator("template")(_one_text_slot)

    @field_validator("description_template")
    @classmethod
    def _label_slot(cls, template: str) -> str:
        try:
            template.format(label="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"the description template may hold '{{label}}' only ({exc!r})") from None
        return template


HeadConfig = Annotated[VerbalizerHeadConfig | SimilarityHeadConfig, Field(discriminator="kind")]


# --------------------------------------------------------------------------- prompt


class _PromptInit(StrictModel):
    num_tokens: int = Field(8, ge=1, le=1024)
    init: Literal["text", "vocab", "random"] = "vocab"
    init_text: str | None = Field(
        None, description="Phrase whose token embeddings start the prompt (init: text)."
    )
    init_std: float = Field(0.02, gt=0, description="Standard deviation of a random init.")

    @model_validator(mode="after")
    def _text_init_needs_text(self) -> _PromptInit:
        if self.init == "text" and not self.init_text:
            raise ValueError("init: text needs `init_text`, the phrase whose embeddings start the prompt")
        return self


class SoftPromptConfig(_PromptInit):
    """Prompt tuning: `num_tokens` virtual token embeddings placed in the input."""

    kind: Literal["soft"] = "soft"
    placement: Literal["after-cls", "before-all"] = Field(
        "after-cls",
        description="Encoders: after the leading special token(s) such as [CLS], or before everything as "
        "PEFT places virtual tokens (needed to export to PEFT with the same logits). Decoders put the "
        "prompt before everything either way.",
    )


class DeepPromptConfig(_PromptInit):
    """Deep prompt: its own prompt at every layer from `start_layer` up.

    mode ``prefix`` (P-tuning v2): each layer's attention attends `num_tokens` trained key/value
    vectors before the sequence; the sequence is unchanged. ``init`` vocab/text start the prefixes
    at the frozen model's own keys and values of those tokens (Li & Liang), random at
    N(0, init_std²). mode ``replace`` (VPT-deep style): `num_tokens` positions enter the sequence
    at `start_layer` and each layer's prompt replaces them at its input. In both modes the layers
    below `start_layer` compute the unprompted model, so their output is cached per dataset.
    """

    kind: Literal["deep"] = "deep"
    mode: Literal["prefix", "replace"] = Field(
        "prefix", description="prefix: key/value prefixes in attention (P-tuning v2); replace: hidden states."
    )
    start_layer: int = Field(0, ge=0, description="First layer that gets a prompt (0: the input layer).")
    cache_frozen_layers: bool = Field(
        True,
        description="start_layer > 0: compute the states entering start_layer once per dataset (kept in "
        "memory, N × length × hidden floats) and run only the layers from start_layer at each step.",
    )


class CoOpPromptConfig(_PromptInit):
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


class PartOptimizerConfig(StrictModel):
    """Optimiser settings of one part of a twin prompt; unset ones keep the `optimizer` section's."""

    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd only.")


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


class IntrinsicPromptConfig(StrictModel):
    """Black-Box Tuning's intrinsic prompt: P = reshape(A z) + p0, only z (length ``dim``) trained.

    A is N(0, σ_A²) with σ_A = α·σ̂_emb/(√d·σ) (σ̂_emb: std of the input embeddings; σ:
    optimizer.sigma for cmaes, else 1), drawn from a seed derived from the run seed and
    ``projection_seed_offset``: every party rebuilds it, so it never travels.
    """

    kind: Literal["intrinsic"] = "intrinsic"
    dim: int = Field(500, ge=2, le=100_000, description="d, the length of z (what travels).")
    num_tokens: int = Field(5, ge=1, le=1024, description="m, the prompt vectors (BBT: 50).")
    alpha: float = Field(1.0, gt=0, description="BBT's α in the projection's standard deviation.")
    projection_seed_offset: int = Field(0, ge=0, description="Another offset draws another projection A.")
    p0: Literal["none", "vocab"] = Field(
        "none", description="The fixed offset: zeros, or embeddings of sampled vocabulary tokens."
    )


PromptConfig = Annotated[
    SoftPromptConfig
    | DeepPromptConfig
    | CoOpPromptConfig
    | VPTPromptConfig
    | PixelPromptConfig
    | TwinPromptConfig
    | GeneratorPromptConfig
    | VQAPromptConfig
    | IntrinsicPromptConfig,
    Field(discriminator="kind"),
]


# --------------------------------------------------------------------------- data


class VQADataConfig(StrictModel):
    """Visual question answering data (``data.source: vqa``): a public format read from local files
    or the Hugging Face Hub, or the easy-vqa package's set (offline)."""

    format: Literal["vqa-rad", "slake", "pathvqa", "easy-vqa"] = Field(
        "easy-vqa",
        description="vqa-rad: one json (image_name, question, answer, answer_type, image_organ) and an "
        "image folder; slake: train/test json files (img_name, question, answer, answer_type, location, "
        "modality, q_lang) and imgs/; pathvqa: <split>.jsonl/.csv/.parquet tables (image, question, "
        "answer); easy-vqa: the easy-vqa package's shapes.",
    )
    path: Path | None = Field(None, description="Local folder of the dataset (vqa-rad: or its json file).")
    hub: str | None = Field(
        None, description="A Hugging Face dataset name with image, question and answer columns."
    )
    image_dir: Path | None = Field(
        None, description="Folder the image names are relative to, if not the format's usual one."
    )
    language: str | None = Field("en", description="slake: keep questions in this q_lang (null: all).")
    on_bad_row: Literal["skip", "error"] = Field(
        "skip",
        description="A row with no image, an empty question, or an answer that cannot be scored: skip it "
        "(counted and logged with its file and row) or stop with an error naming them.",
    )
    client_field: str | None = Field(
        None,
        description="One client per value of this field (vqa-rad: organ; slake: organ, modality; easy-vqa: "
        "question_type, shape, color); partition.num_clients must equal the number of values. "
        "null: the partition section splits the questions.",
    )
    max_train_questions: int | None = Field(
        None,
        ge=1,
        description="A seeded choice of this many training questions (made before rows are checked).",
    )
    max_test_questions: int | None = Field(
        None, ge=1, description="A seeded choice of this many test questions (made before rows are checked)."
    )

    @model_validator(mode="after")
    def _where_from(self) -> VQADataConfig:
        if self.format == "easy-vqa" and (self.path or self.hub):
            raise ValueError("format easy-vqa is read from the easy-vqa package; remove path and hub")
        if self.format != "easy-vqa" and (self.path is None) == (self.hub is None):
            raise ValueError(
                f"format {self.format} needs exactly one of path (a local folder) and hub (a dataset name)"
            )
        return self


class DataConfig(StrictModel):
    """Where the labelled examples come from and which columns hold text and label.

    ``source: datasets`` pools several image datasets (FedTPG's setting): each entry of
    ``datasets`` is a data section of its own (source, name, columns, splits, caps), and
    ``novel_class_fraction`` applies to each of them. ``source: vqa`` reads visual question
    answering data (the ``vqa`` section).
    """

    source: Literal["builtin", "hub", "files", "image-folder", "datasets", "vqa"] = "builtin"
    name: str | None = Field(
        "chatterbot-corpus",
        description="builtin: one of "
        + ", ".join(BUILTIN_DATASETS + BUILTIN_IMAGE_DATASETS)
        + "; hub: a dataset name or local folder; image-folder: a local folder of images in one "
        "subfolder per class (datasets' imagefolder).",
    )
    subset: str | None = Field(None, description="Dataset configuration name (hub).")
    files: dict[str, str | list[str]] | None = Field(
        None, description="Split -> local .csv/.tsv/.json/.jsonl/.parquet file(s) (source: files)."
    )
    text_column: str = Field("text", description="Column of the texts (builtin datasets name their own).")
    label_column: str = Field("label", description="Column of the labels (builtin datasets name their own).")
    train_split: str = "train"
    test_split: str | None = Field("test", description="None: hold out `test_fraction` of train.")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_per_class: int | None = Field(None, ge=1, description="Cap on training examples per class (seeded).")
    max_test_examples: int | None = Field(None, ge=1)
    label_names: list[str] | None = Field(
        None, description="Class names in label order (overrides the data's)."
    )
    image_column: str = Field(
        "image", description="Column of the images (open-clip backbones; builtin datasets name their own)."
    )
    novel_class_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Base-to-novel evaluation (open-clip): this last share of the classes, in label order, "
        "is novel: kept out of training and reported as novel_accuracy beside base_accuracy (FedTPG: 0.5).",
    )
    vqa: VQADataConfig | None = Field(
        None, description="source: vqa: the question answering data (its columns come from its format)."
    )

    datasets: list[DataConfig] | None = Field(
        None,
        description="source: datasets: the image datasets pooled, each a data section (open-clip; partition "
        "kind classes gives each client some classes of one of them).",
    )

    @model_validator(mode="after")
    def _several_datasets(self) -> DataConfig:
        if self.source != "datasets":
            if self.datasets is not None:
                raise ValueError("`datasets` goes with source: datasets; remove it or set source: datasets")
            return self
        if not self.datasets:
            raise ValueError("source: datasets needs `datasets`, a list of data sections, one per dataset")
        shared = {"source", "datasets", "novel_class_fraction"}
        own = sorted(
            name  # set and not the default (a resolved configuration repeats every default)
            for name, field in type(self).model_fields.items()
            if name not in shared and getattr(self, name) != field.get_default(call_default_factory=True)
        )
        if own:
            raise ValueError(
                f"with source: datasets, {own} belong in each entry of `datasets` (only novel_class_fraction "
                "applies to all of them)"
            )
        for index, entry in enumerate(self.datasets):
            if entry.source == "datasets":
                raise ValueError(f"datasets.{index}: an entry cannot itself be source: datasets")
            if entry.novel_class_fraction is not None:
                raise ValueError(
                    f"datasets.{index}.novel_class_fraction: set it once, beside `datasets`, for all of them"
                )
        return self

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "datasets":
            return self
        if self.source == "builtin" and self.name not in BUILTIN_DATASETS + BUILTIN_IMAGE_DATASETS:
            raise ValueError(
                f"builtin dataset {self.name!r} is unknown; choose one of "
                f"{list(BUILTIN_DATASETS + BUILTIN_IMAGE_DATASETS)}"
            )
        if self.source == "hub" and not self.name:
            raise ValueError("source: hub needs `name`, a dataset name or a local dataset folder")
        if self.source == "image-folder" and not self.name:
            raise ValueError("source: image-folder needs `name`, the folder with one subfolder per class")
        if self.source == "vqa" and self.vqa is None:
            raise ValueError("source: vqa needs a `vqa` section, e.g. {format: easy-vqa}")
        if self.source != "vqa" and self.vqa is not None:
            raise ValueError("the `vqa` section applies to source: vqa only")
        if self.source == "vqa" and self.novel_class_fraction is not None:
            raise ValueError("novel_class_fraction (base-to-novel) applies to image classification, not vqa")
        if self.source == "files" and (not self.files or self.train_split not in self.files):
            raise ValueError(
                f"source: files needs `files` with a {self.train_split!r} entry, e.g. {{train: a.csv}}"
            )
        return self


class PartitionConfig(StrictModel):
    """How the training examples are split among clients."""

    kind: Literal["iid", "dirichlet", "dirichlet_per_client", "shards", "classes"] = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(
        0.5,
        gt=0,
        description="Dirichlet concentration (dirichlet: of each class over clients; dirichlet_per_client: "
        "of each client's class mix); smaller means more label skew.",
    )
    min_partition_size: int = Field(
        5,
        ge=0,
        description="dirichlet: resample until each client has this many (dirichlet_per_client: equal sizes)",
    )
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards given to each client.")
    classes_per_client: int = Field(2, ge=1, description="classes: the classes each client sees.")
    local_val_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of each client's data kept for local eval."
    )


# --------------------------------------------------------------------------- vision (open-clip runs)


class AugmentConfig(StrictModel):
    """CoOp's training augmentation: a random resized crop (area share in ``crop_scale``, aspect
    ratio in [3/4, 4/3]) resized to the model's input, then a horizontal flip with probability 1/2.

    Text-side prompts (coop, generator) read cached image features: ``views`` augmented views of
    each training image are encoded once and cached, and each training step draws one of them
    per example. Visual prompts (vpt, pixel, twin), which run the image tower anyway, augment
    each batch on the fly. Evaluation always sees the plain images.
    """

    views: int = Field(8, ge=1, le=64, description="K, the augmented views cached per training image.")
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Range of the crop's share of the image area (CoOp: 0.08 to 1)."
    )
    flip: bool = Field(True, description="Flip horizontally with probability 1/2.")

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
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


# --------------------------------------------------------------------------- training


class FederationConfig(StrictModel):
    """Rounds and client sampling."""

    rounds: int = Field(5, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients sampled each round.")
    min_clients: int = Field(2, ge=1, description="Fewest clients sampled in a round.")
    evaluate_every: int = Field(1, ge=1, description="Evaluate the global prompt every this many rounds.")
    local_evaluation: bool = Field(True, description="Also evaluate on each client's own held-out split.")

    def clients_per_round(self, num_clients: int) -> int:
        """How many of ``num_clients`` clients every round samples (``fedprompt.sampling.sample_clients``):
        max(min_clients, ⌈fraction · N⌉), at most N."""
        return min(num_clients, max(self.min_clients, math.ceil(self.fraction * num_clients)))


class LRScheduleConfig(StrictModel):
    """How the clients' learning rate changes from round to round (constant within a round, the
    same for every client): a factor of `optimizer.lr` that is a pure function of the round."""

    kind: Literal["constant", "step", "exponential", "cosine"] = Field(
        "constant",
        description="step: ×gamma every `step_rounds` rounds; exponential: ×gamma every round; cosine: "
        "from lr down to `min_lr` over `rounds` rounds (torch's CosineAnnealingLR, per round).",
    )
    gamma: float = Field(0.5, gt=0, le=1, description="step/exponential: the decay factor.")
    step_rounds: int = Field(1, ge=1, description="step: rounds between two decays.")
    min_lr: float = Field(0.0, ge=0, description="cosine: the learning rate it decays to.")
    rounds: int | None = Field(
        None,
        ge=1,
        description="cosine: the rounds it spans; null: federation.rounds (so a resume that adds rounds "
        "stretches the rest of the cosine; pin it to keep the schedule).",
    )
    warmup_rounds: int = Field(
        0, ge=0, description="Rounds at the warmup learning rate first; the decay counts from after them."
    )
    warmup: Literal["constant", "linear"] = Field(
        "constant", description="constant: `warmup_lr` (CoOp); linear: from `warmup_lr` up to lr."
    )
    warmup_lr: float = Field(1e-5, gt=0, description="The warmup's learning rate (CoOp: 1e-5).")


class GradientOptimizerConfig(StrictModel):
    """Local training by gradient (torch optimisers; device and precision through accelerate)."""

    kind: Literal["gradient"] = "gradient"
    algorithm: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only.")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Cap on steps per round, whatever the epochs.")
    batch_size: int = Field(16, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)

    @model_validator(mode="after")
    def _schedule_below_lr(self) -> GradientOptimizerConfig:
        if self.schedule.min_lr > self.lr:
            raise ValueError(
                f"schedule.min_lr ({self.schedule.min_lr}) exceeds lr ({self.lr}); a cosine decays to min_lr"
            )
        return self


ScoreOn = Literal["batch", "local-set"]
SCORE_ON_HELP = (
    "batch: each generation/step scores its candidates on a fresh random batch of batch_size local "
    "examples; local-set: on the whole local training set (Black-Box Tuning, FedBPT), batch_size then "
    "only splits it into forward passes"
)


class CMAESOptimizerConfig(StrictModel):
    """Black-box local search over an intrinsic prompt's z by CMA-ES (nevergrad ParametrizedCMA).

    A round's length: ``budget`` in model queries per client, one query being one candidate scored
    on one example, so a round runs budget // (popsize · examples per candidate) generations; or a
    fixed number of ``generations`` (FedBPT's 8 local iterations), whatever they cost.
    """

    kind: Literal["cmaes"] = "cmaes"
    popsize: int = Field(10, ge=2, description="λ, candidates per generation (BBT: 20; FedBPT: 5).")
    sigma: float = Field(1.0, gt=0, description="Initial step size σ; with strategy fedbpt, the server's.")
    budget: int | None = Field(
        1280, ge=1, description="Model queries per client per round (null when `generations` is given)."
    )
    generations: int | None = Field(
        None, ge=1, description="Local generations per round whatever they cost (FedBPT: 8); replaces budget."
    )
    score_on: ScoreOn = Field("batch", description=SCORE_ON_HELP)
    batch_size: int = Field(32, ge=1, description="Examples scored per candidate in each generation.")
    chunk_size: int = Field(10, ge=1, description="Candidates per forward pass (local backbones).")

    @model_validator(mode="before")
    @classmethod
    def _generations_replace_the_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("generations") is not None and "budget" not in data:
            return {**data, "budget": None}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> CMAESOptimizerConfig:
        if (self.budget is None) == (self.generations is None):
            raise ValueError(
                "give the length of a local round as `budget` (model queries) or `generations`, not both"
            )
        return self


class SPSAOptimizerConfig(StrictModel):
    """Zeroth-order local search by SPSA: two seeded-perturbation queries per step (MeZO-style).

    Works on an intrinsic prompt's z (through one population call, also against a remote backbone)
    and on any text prompt whose parameters can be perturbed in place (soft and deep prompts on a
    local backbone: MeZO's case). Budget in model queries per client per round: each step scores
    2 candidates on ``batch_size`` examples (or on the whole local set).
    """

    kind: Literal["spsa"] = "spsa"
    lr: float = Field(1.0, gt=0, description="η in θ ← θ − η·ĝ·u.")
    epsilon: float = Field(0.1, gt=0, description="ε, the perturbation size in units of the prompt entries.")
    budget: int = Field(1280, ge=1, description="Model queries per client per round.")
    score_on: ScoreOn = Field("batch", description=SCORE_ON_HELP)
    batch_size: int = Field(32, ge=1, description="Examples scored per candidate in each step.")
    chunk_size: int = Field(
        2, ge=1, le=2, description="Candidates per forward pass of an intrinsic z (1: a loop, 2: stacked)."
    )


OptimizerConfig = Annotated[
    GradientOptimizerConfig | CMAESOptimizerConfig | SPSAOptimizerConfig, Field(discriminator="kind")
]


class FedAvgConfig(StrictModel):
    """Average of client states, weighted by their example counts or uniform."""

    kind: Literal["fedavg"] = "fedavg"
    weighting: Literal["examples", "uniform"] = Field(
        "examples",
        description="examples: w_k = n_k (FedAvg); uniform: every client counts once (FedTPG's and "
        "PromptFL's reference code).",
    )
    server_lr: float = Field(
        1.0, gt=0, description="η_g, the server's step along the average update: θ ← θ + η·(average − θ)."
    )


class FedProxConfig(StrictModel):
    """FedAvg on the server; clients add (mu/2)·||θ - θ_global||² to their loss."""

    kind: Literal["fedprox"] = "fedprox"
    mu: float = Field(0.01, ge=0)


class FedOptConfig(StrictModel):
    """Server optimiser on the pseudo-gradient (FedAdam, FedYogi, FedAdagrad)."""

    kind: Literal["fedadam", "fedyogi", "fedadagrad"] = "fedadam"
    server_lr: float = Field(1e-2, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class MedianConfig(StrictModel):
    """Coordinate-wise median."""

    kind: Literal["median"] = "median"


class TrimmedMeanConfig(StrictModel):
    """Coordinate-wise mean after dropping the `beta` largest and smallest shares."""

    kind: Literal["trimmed-mean"] = "trimmed-mean"
    beta: float = Field(0.1, ge=0, lt=0.5)


class KrumConfig(StrictModel):
    """Krum: the update closest to its n - f - 2 nearest neighbours; Multi-Krum: the mean of the
    `keep` closest."""

    kind: Literal["krum"] = "krum"
    num_byzantine: int = Field(0, ge=0, description="f, the number of clients that may be adversarial.")
    keep: int = Field(1, ge=1, description="m: 1 is Krum; more averages the m best-scored (Multi-Krum).")


class FedBPTConfig(StrictModel):
    """FedBPT: clients search z by CMA-ES from the server's mean and σ; the server aggregates.

    rule ``cma`` (the reference's): one global CMA-ES is told every client's final mean and its local
    loss as injected solutions (repaired as pycma repairs solutions it did not sample), from the
    step size σ_g the clients' local step sizes give; the σ sent down is then scaled by the global
    CMA-ES's step-size change, σ ← max(sigma_floor, σ · σ_after/σ_g). rule ``mean``: the
    example-weighted mean of the clients' z; σ ← max(sigma_floor, min(σ, the clients' RMS final σ)).
    A client's report is rejected when its loss is not in [0, max_loss] or its step sizes are not
    within a factor max_sigma_ratio of the σ it was sent.
    """

    kind: Literal["fedbpt"] = "fedbpt"
    rule: Literal["cma", "mean"] = "cma"
    sigma_floor: float = Field(
        0.5, ge=0, description="Lowest step size sent to clients (0.5 as the reference intends; 0: none)."
    )
    max_loss: float = Field(
        100.0, gt=0, description="Largest local cross-entropy a client may report (p = e^-100 for its class)."
    )
    max_sigma_ratio: float = Field(
        10.0,
        gt=1,
        description="A client's final σ and √(Σ_t σ_t²/μ) must lie within this factor of the σ it was sent "
        "(honest: about √(generations/μ), 2 in the reference's setting).",
    )


class ReliabilityConfig(StrictModel):
    """Reliability-weighted personalised aggregation (prompt-based personalised FL for medical VQA).

    Each client keeps its own prompt p_t. The server sends client t the shared prompt
    p_t^s = Σ_{i≠t} η_i p_i, η_i ∝ acc_i · max(0, cos(p_i, p_t)) over the other clients' last
    prompts (acc_i: their reported validation accuracy), and the client adds
    α · (1 − cos(p_t, p_t^s)) to its loss. The global prompt (the server's evaluation) is the
    mean of the clients' prompts weighted by acc_i · (mean clipped cosine to the others).
    """

    kind: Literal["reliability"] = "reliability"
    alpha: float = Field(1.0, ge=0, description="α, the weight of the pull toward the shared prompt.")


class FedKSeedConfig(StrictModel):
    """FedKSeed (Qin et al. 2024): zeroth-order steps along a shared pool of K seeds; clients send
    (seed index, projected gradient ĝ) pairs instead of the prompt, and every party rebuilds the
    prompt by replaying them: θ ← θ − η·w_k·ĝ·u(seed), the clients' pairs in client-id order, each
    client's in step order, w_k its aggregation weight. Needs optimizer.kind spsa (η = optimizer.lr,
    ε = optimizer.epsilon; the paper's ε is 5e-4), a round of budget // (2·batch_size) steps.
    """

    kind: Literal["fedkseed"] = "fedkseed"
    num_seeds: int = Field(
        4096, ge=1, le=2**24, description="K, the seeds in the shared pool (the paper's 4096)."
    )
    weighting: Literal["examples", "equal"] = Field(
        "examples", description="A client's weight w_k in the replay: by its example count, or 1/(clients)."
    )
    max_projected_grad: float = Field(
        1000.0,
        gt=0,
        description="Largest |ĝ| the server accepts; a client skips (sends ĝ = 0 for) a step above it, as "
        "the reference's loss-gap clip does.",
    )
    downlink: Literal["prompt", "seed-pool"] = Field(
        "prompt",
        description="What clients are sent: the global prompt, or the K accumulated ĝ per seed since "
        "round 0, from which every client replays the prompt (the paper's downlink: 4·K bytes whatever "
        "the prompt).",
    )


# ---- drift correction for skewed data (SCAFFOLD, FedDyn, FedAvgM, FedNova)


class ScaffoldConfig(StrictModel):
    """SCAFFOLD (option II): server and client control variates, the size of the prompt, correct
    each client's local gradient (g + c − c_i); they travel with the prompt both ways. Clients
    train by SGD (`optimizer.algorithm: sgd`)."""

    kind: Literal["scaffold"] = "scaffold"
    server_lr: float = Field(1.0, gt=0, description="η_g: x ← x + η_g·(weighted mean of y_i − x).")


class FedDynConfig(StrictModel):
    """FedDyn: each client adds −⟨g_k, θ⟩ + (α/2)‖θ − θ_server‖² to its loss (g_k carried from round to
    round); the server keeps h and sends mean(θ_k) − h/α."""

    kind: Literal["feddyn"] = "feddyn"
    alpha: float = Field(0.01, gt=0, description="α, the dynamic regulariser's weight (paper: 0.01-0.1).")


class FedAvgMConfig(StrictModel):
    """Server momentum: v ← β·v + Δ, θ ← θ + η·v, with Δ the example-weighted average update."""

    kind: Literal["fedavgm"] = "fedavgm"
    server_lr: float = Field(1.0, gt=0, description="η, the server learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="β, the server momentum.")


class FedNovaConfig(StrictModel):
    """FedNova: each client's update is divided by its a_i (from its local steps and the SGD
    momentum) and the average rescaled by τ_eff = Σ p_i a_i."""

    kind: Literal["fednova"] = "fednova"


DRIFT_CORRECTION_KINDS = ("scaffold", "feddyn", "fednova")
"""Strategies whose clients change their local training or report their steps: gradient only."""


StrategyConfig = Annotated[
    FedAvgConfig
    | FedProxConfig
    | FedOptConfig
    | MedianConfig
    | TrimmedMeanConfig
    | KrumConfig
    | FedBPTConfig
    | ReliabilityConfig
    | FedKSeedConfig
    | ScaffoldConfig
    | FedDynConfig
    | FedAvgMConfig
    | FedNovaConfig,
    Field(discriminator="kind"),
]


class RobustnessConfig(StrictModel):
    """Bounds the server puts on every client update before any strategy sees it."""

    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="Clip each client's delta from the global prompt to this L2 norm (over all sent "
        "tensors); null: no bound. Differential privacy sets its own clipping norm.",
    )
    max_examples: int | None = Field(
        None,
        ge=1,
        description="Cap on the example count (aggregation weight) a client may claim. In-process runs "
        "also bound each client by its known training-set size; on Flower this cap (and the size a "
        "site declared when it registered) is all the server knows.",
    )


class AdaptiveClippingConfig(StrictModel):
    """Adaptive clipping (Andrew et al. 2021): the clipping norm C follows a quantile of the
    clients' update norms, C ← C·exp(−η·(b̃ − γ)), b̃ the share of updates within C estimated from a
    noised count. Its noise takes part of the privacy budget (the noise split of the paper)."""

    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="γ, the share of updates meant to lie within C."
    )
    learning_rate: float = Field(0.2, gt=0, description="η, the step of the geometric update of C.")
    count_stddev: float | None = Field(
        None,
        gt=0,
        description="σ_b, the standard deviation of the noise on the count of updates within C; null: the "
        "expected clients per round / 20 (the paper's choice). Must exceed noise_multiplier / 2.",
    )


class PrivacyConfig(StrictModel):
    """Client-level differential privacy of the prompt updates (DP-FedAvg, McMahan et al. 2018).

    central: the server (trusted) clips each client's delta to ``clip_norm``, averages the clipped
    deltas with uniform weights over the expected number of clients K, and adds N(0, (σC/K)²) to
    each coordinate; an RDP accountant (dp-accounting) reports ε at ``delta`` every round.
    local: each client clips its own delta and adds N(0, σ²C²) before upload (no trusted server).
    """

    kind: Literal["none", "central", "local"] = "none"
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="C, the L2 bound on each client's delta (the initial C with adaptive clipping).",
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="σ, the noise standard deviation in units of C (null: from target_epsilon)."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="The ε at `delta` the whole run (federation.rounds) may spend: σ is computed from it, "
        "or a given noise_multiplier too small for it is refused at start.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")
    sampling: Literal["poisson", "fixed"] = Field(
        "poisson",
        description="central: poisson samples each client independently with probability federation.fraction "
        "(what DP-FedAvg's accountant assumes; a round may have any number of clients); fixed samples "
        "federation.min_clients/fraction clients without replacement, accounted for replace-one neighbours.",
    )
    adaptive_clipping: AdaptiveClippingConfig | None = Field(
        None, description="central only: let C track a quantile of the update norms."
    )
    server_lr: float = Field(1.0, gt=0, description="central only: η of the server step θ ← θ + η·v.")
    server_momentum: float = Field(
        0.0, ge=0, lt=1, description="central only: β of the server momentum v ← β·v + (noised mean delta)."
    )
    noise_seed: Literal["run", "secret"] = Field(
        "run",
        description="run: noise drawn from the run seed and round (bit-identical runs and resumes; whoever "
        "knows the seed can subtract it); secret: from the operating system's entropy.",
    )

    @model_validator(mode="after")
    def _complete(self) -> PrivacyConfig:
        given = [  # fields off their defaults (a dumped config sets every field)
            name
            for name, field in type(self).model_fields.items()
            if name != "kind" and getattr(self, name) != field.get_default(call_default_factory=True)
        ]
        if self.kind == "none":
            if given:
                raise ValueError(
                    f"{', '.join(given)} apply to a differentially private run; set kind: central or "
                    "local, or remove them"
                )
            return self
        if self.clip_norm is None:
            raise ValueError(
                f"kind {self.kind} needs clip_norm, the L2 bound C on each client's delta (about a typical "
                "update norm; see update_norm in clients.jsonl of a non-private run)"
            )
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                f"kind {self.kind} needs noise_multiplier (σ, in units of clip_norm) or target_epsilon "
                "(the ε at delta the run may spend; σ is then computed)"
            )
        if self.kind == "local":
            central = ("adaptive_clipping", "server_lr", "server_momentum", "sampling")
            central_only = [name for name in central if name in given]
            if central_only:
                raise ValueError(
                    f"{', '.join(central_only)} apply to kind central; local DP noises each upload on its "
                    "client, so sampling gives no amplification against the server and any strategy is "
                    "post-processing (e.g. strategy.kind fedadam for a server optimiser); remove them"
                )
        return self


class PersonalizationConfig(StrictModel):
    """Personal prompts: a split prompt whose local part never leaves its client, and the
    fine-tune-after-federation baseline."""

    local: list[str] = Field(
        default_factory=list,
        description="Prompt tensors kept whole on each client (shell patterns over the prompt state's "
        "names, e.g. 'image.*' for a twin prompt's visual side).",
    )
    shared_tokens: int | None = Field(
        None,
        ge=1,
        description="Token tensors (soft/deep prompts, CoOp context, VPT tokens) share their first k "
        "vectors and keep the rest on each client.",
    )
    finetune_steps: int | None = Field(
        None,
        ge=1,
        description="Also report each client's accuracy after this many local steps from the global "
        "prompt (fine-tune-after-federation), at every evaluation.",
    )

    @property
    def splits(self) -> bool:
        return bool(self.local) or self.shared_tokens is not None


SECURE_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
"""Strategy kinds whose server step needs only the weighted mean of the updates (what secure
aggregation gives the server)."""
_NEEDS_EACH_UPDATE = {
    "median": "the coordinate-wise median of the updates",
    "trimmed-mean": "the coordinate-wise order of the updates",
    "krum": "the distances between the updates",
    "reliability": "each client's prompt and its agreement with the others",
    "fedbpt": "each client's CMA-ES search state and losses (its CMA rule)",
    "fedkseed": "each client's (seed, projected gradient) pairs",
    "scaffold": "each client's control-variate update beside its prompt",
    "feddyn": "each client's prompt for its dynamic regulariser's state",
    "fednova": "each client's local step count",
}


class SecureAggregationConfig(StrictModel):
    """Secure aggregation (Flower runtime): the server learns only the weighted sum of the sampled
    clients' prompt updates, masked pairwise by the clients (``fedprompt.secagg``)."""

    enabled: bool = False
    threshold: int | None = Field(
        None,
        ge=2,
        description="t: the fewest clients of a round whose shares unmask its sum (dropouts beyond n - t "
        "fail the round). null: a majority of the clients sampled per round, floor(n/2) + 1; more than "
        "n/2 either way.",
    )
    clip_range: float = Field(
        1.0,
        gt=0,
        description="Each client clips every coordinate of its delta from the global prompt to [-c, c] "
        "before quantisation (the server cannot clip what it never sees).",
    )
    bits: int = Field(
        32,
        ge=8,
        le=48,
        description="The ring Z_2^bits of the masked sums; each client's weighted delta gets "
        "(2^(bits-1) - 1) / n levels per side of [-c, c] (quantisation error c / (2 L) per coordinate).",
    )
    weights: Literal["uniform", "declared"] = Field(
        "uniform",
        description="Client weights, public before masking: uniform, or the example count each site "
        "declared when it registered (node config num-examples, capped by robustness.max_examples).",
    )

    def threshold_for(self, sampled: int) -> int:
        """The threshold of a round that samples ``sampled`` clients."""
        return self.threshold if self.threshold is not None else sampled // 2 + 1


class PayloadConfig(StrictModel):
    """What crosses the wire: tensor dtype and the largest payload accepted."""

    wire_dtype: WireDtype = "float32"
    max_bytes: int = Field(64 * 2**20, ge=1024)


class RuntimeConfig(StrictModel):
    """Where the process computes."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_batch_size: int = Field(64, ge=1)
    progress: bool = True


class OutputConfig(StrictModel):
    """Where a run writes its results folder, and whether it plots its curves there."""

    dir: Path = Path("runs")
    plot: bool = Field(
        True, description="Write plot.png (accuracy per round and per byte) at the end (needs matplotlib)."
    )


class RunConfig(StrictModel):
    """A whole run: backbone, prompt, data, federation, local optimiser, strategy."""

    name: str = Field("fedprompt", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(0, ge=0)
    backbone: BackboneConfig = Field(default_factory=HFTextBackboneConfig)
    head: HeadConfig = Field(default_factory=SimilarityHeadConfig)
    prompt: PromptConfig = Field(default_factory=SoftPromptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    optimizer: OptimizerConfig = Field(default_factory=GradientOptimizerConfig)
    strategy: StrategyConfig = Field(default_factory=FedAvgConfig)
    payload: PayloadConfig = Field(default_factory=PayloadConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)

    @property
    def client_classes(self) -> Literal["own", "all"]:
        """What each client's softmax runs over (``vision.client_classes`` with its default filled in)."""
        if self.vision.client_classes is not None:
            return self.vision.client_classes
        return "own" if self.prompt.kind == "generator" else "all"

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """A section given without ``kind`` means the default kind of that section."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            section = data.get(name)
            if isinstance(section, dict) and "kind" not in section and field.default_factory is not None:
                default_kind = getattr(field.default_factory(), "kind", None)
                if default_kind is not None:
                    data[name] = {"kind": default_kind, **section}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
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
    def _secure_aggregation_fits(self) -> RunConfig:
        """Secure aggregation gives the server the weighted sum of the updates and nothing else:
        refuse what needs single updates, and thresholds that are unsafe or cannot be met."""
        secure = self.secure_aggregation
        if not secure.enabled:
            return self
        kind = self.strategy.kind
        if kind not in SECURE_STRATEGIES:
            needs = _NEEDS_EACH_UPDATE.get(kind, "single client updates")
            raise ValueError(
                f"secure_aggregation: strategy.kind {kind} needs {needs}, but the server sees only the "
                f"sum of the updates; use one of {', '.join(SECURE_STRATEGIES)}, or disable secure "
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
    def _personal_fits(self) -> RunConfig:
        """Personal prompts need gradients and held-out splits to report on."""
        black_box = isinstance(self.optimizer, CMAESOptimizerConfig | SPSAOptimizerConfig)
        personal = self.personalization.splits or isinstance(self.strategy, ReliabilityConfig)
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
        if isinstance(self.strategy, ReliabilityConfig) and self.personalization.splits:
            raise ValueError(
                "strategy.kind reliability keeps a whole personal prompt per client; remove "
                "personalization.local/shared_tokens"
            )
        return self

    @model_validator(mode="after")
    def _drift_correction_fits(self) -> RunConfig:
        """SCAFFOLD, FedDyn and FedNova change the clients' gradient steps or count them."""
        kind, opt = self.strategy.kind, self.optimizer
        if kind not in DRIFT_CORRECTION_KINDS:
            return self
        if not isinstance(opt, GradientOptimizerConfig):
            raise ValueError(
                f"strategy.kind {kind} corrects or counts the clients' gradient steps; black-box optimisers "
                f"take none (optimizer.kind is {opt.kind!r}): use optimizer.kind gradient"
            )
        if kind == "scaffold":
            if opt.algorithm != "sgd":
                raise ValueError(
                    "strategy.kind scaffold needs optimizer.algorithm: sgd; its control-variate update "
                    "c_i + (x − y_i)/(K·η_l) − c reads the local steps as η_l times the corrected gradient, "
                    "which AdamW's per-coordinate scaling breaks"
                )
            if isinstance(self.prompt, TwinPromptConfig):
                parts = [self.prompt.text_optimizer, self.prompt.visual_optimizer]
                rates = {(p.lr or opt.lr, opt.momentum if p.momentum is None else p.momentum) for p in parts}
                if len(rates) > 1:
                    raise ValueError(
                        "strategy.kind scaffold needs one learning rate and momentum for the whole prompt; "
                        "remove prompt.text_optimizer/visual_optimizer lr and momentum"
                    )
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> RunConfig:
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
            if not isinstance(strategy, FedAvgConfig | FedProxConfig):
                raise ValueError(
                    f"privacy.kind central averages the clipped deltas with uniform weights and adds "
                    f"noise (DP-FedAvg); strategy.kind {strategy.kind!r} would see each update unnoised. "
                    "Use strategy.kind fedavg or fedprox (privacy.server_momentum/server_lr give a server "
                    "optimiser)"
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
        unprotected = ReliabilityConfig | FedBPTConfig | FedKSeedConfig | ScaffoldConfig | FedNovaConfig
        if privacy.kind == "local" and isinstance(strategy, unprotected):
            raise ValueError(
                f"privacy.kind local noises the prompt tensors only; strategy.kind {strategy.kind!r} also "
                "uses what clients send beside them (validation accuracy, CMA-ES losses, seed-gradient "
                "pairs, control variates, step counts), unprotected. Use "
                "fedavg, fedprox, fedadam/fedyogi/fedadagrad, median, trimmed-mean or krum"
            )
        return self

    @model_validator(mode="after")
    def _parts_fit_the_backbone(self) -> RunConfig:
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
        if not clip and (image_builtin or self.data.source in ("image-folder", "vqa")):
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
    def _clip_class_sets(self) -> RunConfig:
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
    def _black_box_fits(self) -> RunConfig:
        """CMA-ES searches an intrinsic prompt; SPSA an intrinsic prompt or a text soft/deep prompt;
        FedBPT needs CMA-ES; a remote backbone gives no gradients and scores intrinsic prompts only."""
        opt, strategy = self.optimizer, self.strategy
        black_box = isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)
        if isinstance(opt, CMAESOptimizerConfig) and self.prompt.kind != "intrinsic":
            raise ValueError(
                f"optimizer.kind 'cmaes' searches an intrinsic prompt's z; set prompt.kind: intrinsic "
                f"(prompt.kind is {self.prompt.kind!r}), or use optimizer.kind: spsa for a "
                f"{self.prompt.kind} prompt"
            )
        if isinstance(opt, SPSAOptimizerConfig) and self.prompt.kind not in SPSA_PROMPT_KINDS:
            raise ValueError(
                f"optimizer.kind spsa perturbs a text prompt ({', '.join(SPSA_PROMPT_KINDS)}); "
                f"prompt.kind {self.prompt.kind!r} trains by gradient (optimizer.kind: gradient)"
            )
        if self.backbone.kind == "remote" and not black_box:
            raise ValueError(
                "backbone.kind remote returns outputs only, never gradients; "
                "set optimizer.kind: cmaes or spsa"
            )
        if self.backbone.kind == "remote" and self.prompt.kind != "intrinsic":
            raise ValueError(
                "backbone.kind remote scores intrinsic prompts only (the service rebuilds A z + p0); "
                f"set prompt.kind: intrinsic (prompt.kind is {self.prompt.kind!r})"
            )
        if isinstance(strategy, FedBPTConfig):
            if not isinstance(opt, CMAESOptimizerConfig):
                raise ValueError(
                    f"strategy.kind fedbpt aggregates CMA-ES searches; set optimizer.kind: cmaes "
                    f"(optimizer.kind is {opt.kind!r})"
                )
            if strategy.sigma_floor > opt.sigma:
                raise ValueError(
                    f"strategy.sigma_floor ({strategy.sigma_floor}) exceeds optimizer.sigma ({opt.sigma}); "
                    "the floor must not lie above the initial step size"
                )
        if isinstance(strategy, FedKSeedConfig):
            self._kseed_fits(strategy)
        if black_box and isinstance(strategy, FedProxConfig):
            raise ValueError("strategy.kind fedprox adds a gradient term; black-box optimisers ignore it")
        if black_box and opt.budget is not None and opt.score_on == "batch":
            candidates = opt.popsize if isinstance(opt, CMAESOptimizerConfig) else 2
            if opt.budget < candidates * opt.batch_size:
                raise ValueError(
                    f"optimizer.budget ({opt.budget} queries) is less than one {opt.kind} iteration: "
                    f"{candidates} candidates × batch_size {opt.batch_size} = {candidates * opt.batch_size}"
                )
        return self

    def _kseed_fits(self, strategy: FedKSeedConfig) -> None:
        """FedKSeed's pairs come from SPSA steps, a fixed number per round, and travel exactly."""
        opt = self.optimizer
        if not isinstance(opt, SPSAOptimizerConfig):
            raise ValueError(
                f"strategy.kind fedkseed replays SPSA steps; set optimizer.kind: spsa (optimizer.kind is "
                f"{opt.kind!r})"
            )
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


# --------------------------------------------------------------------------- loading


def default_config_dict() -> dict[str, Any]:
    """The embedded default configuration (runs offline on the bundled MiniLM)."""
    text = resources.files("fedprompt").joinpath("defaults/default.yaml").read_text()
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (numbers, booleans, lists)."""
    out = yaml.safe_load(yaml.safe_dump(raw, sort_keys=False))  # deep copy of plain data, order kept
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. federation.rounds=3)")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: not valid YAML: {_yaml_problem(exc)}") from None
    return out


def format_validation_error(error: ValidationError, root: type[BaseModel] | None = None) -> str:
    """A pydantic error as ``invalid configuration: <field>: <problem>`` lines; an unknown field's
    line lists the fields allowed there, found by walking ``root`` (default: RunConfig)."""
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known field" + _allowed_fields_hint(err["loc"], root or RunConfig)
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        lines.append(f"{where or '<root>'}: {msg}")
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)


def _allowed_fields_hint(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    """Walk an error location through the models (and tagged unions) to list the allowed fields."""
    model = root
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return ""
        annotation = field.annotation
        if getattr(annotation, "__origin__", None) is dict and parts:  # a mapping: the next part is a key
            annotation = annotation.__args__[1]
            parts.pop(0)
        members = _models_in(annotation)
        if len(members) > 1 and parts:  # tagged union: the next location part is the tag
            tag = parts.pop(0)
            members = [m for m in members if tag in _models_in_kind(m)]
        if len(members) != 1:
            return ""
        model = members[0]
    return "; allowed: " + ", ".join(model.model_fields)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    args = getattr(annotation, "__args__", (annotation,))
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _models_in_kind(model: type[BaseModel]) -> tuple[Any, ...]:
    kind = model.model_fields.get("kind")
    return getattr(kind.annotation, "__args__", ()) if kind is not None else ()


def validate_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping into a RunConfig, raising ConfigError with readable messages."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: where, and what the parser expected there."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return " ".join(str(error).split())
    mark = error.context_mark or error.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    parts = [part for part in (error.context, error.problem) if part]
    return where + ": ".join(parts)


def load_config(
    source: str | Path | Mapping[str, Any] | RunConfig | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Read a YAML file (or a mapping, or the embedded default when None), apply overrides, validate."""
    if isinstance(source, RunConfig):
        raw: dict[str, Any] = source.model_dump(mode="json")
    elif source is None:
        raw = default_config_dict()
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return validate_config(apply_overrides(raw, overrides))


DataConfig.model_rebuild()
