"""Run configuration: one pydantic model per part of a run, validated before any work starts.

A configuration is plain YAML; ``load_config`` reads it, applies ``key=value`` overrides and
validates it. Every model forbids unknown fields, so a typo fails at once with the field's
name and the fields that are allowed there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

BUILTIN_DATASETS = ("chatterbot-corpus",)
BUILTIN_IMAGE_DATASETS = ("digits",)
BUNDLED_CLIP_MODELS = ("demo-clip",)
BUNDLED_WEIGHTS = "bundled"
CLIP_PROMPT_KINDS = ("coop", "vpt", "pixel", "twin", "generator", "vqa-twin")
VQA_FORMATS = ("vqa-rad", "slake", "pathvqa", "easy-vqa")
WireDtype = Literal["float32", "float16", "bfloat16"]


class ConfigError(ValueError):
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


BackboneConfig = Annotated[
    HFTextBackboneConfig | OpenCLIPBackboneConfig | RemoteBackboneConfig, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- classification head


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


class DeepPromptConfig(_PromptInit):
    """Deep prompt (P-tuning v2 style): its own prompt at every layer from `start_layer` up."""

    kind: Literal["deep"] = "deep"
    start_layer: int = Field(0, ge=0, description="First layer that gets a prompt (0: the input layer).")


class CoOpPromptConfig(_PromptInit):
    """CLIP learned context (CoOp, as PromptFL trains it): M vectors before the class-name tokens."""

    kind: Literal["coop"] = "coop"
    num_tokens: int = Field(16, ge=1, le=64, description="M, the context vectors.")
    init: Literal["text", "vocab", "random"] = Field(
        "random", description="text: from `init_text` (e.g. 'a photo of a'); random: N(0, init_std²)."
    )
    class_specific: bool = Field(False, description="One context per class instead of one shared by all.")
    depth: int = Field(
        1, ge=1, description="Text layers with prompts: 1 is CoOp; more adds MaPLe-style deep text prompts."
    )


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

    @model_validator(mode="after")
    def _depth_is_deep(self) -> VPTPromptConfig:
        if self.depth is not None and not self.deep:
            raise ValueError("depth applies to deep VPT only; set deep: true or remove depth")
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
        if self.visual.num_tokens != self.text.num_tokens:
            raise ValueError(
                f"coupled: visual.num_tokens ({self.visual.num_tokens}) must equal text.num_tokens "
                f"({self.text.num_tokens}): each visual token is made from one text token"
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
    """Where the labelled examples come from and which columns hold text and label."""

    source: Literal["builtin", "hub", "files", "image-folder", "vqa"] = "builtin"
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

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
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

    kind: Literal["iid", "dirichlet", "shards", "classes"] = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller means more label skew.")
    min_partition_size: int = Field(
        5, ge=0, description="Dirichlet: resample until each client has this many."
    )
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards given to each client.")
    classes_per_client: int = Field(2, ge=1, description="classes: the classes each client sees.")
    local_val_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of each client's data kept for local eval."
    )


# --------------------------------------------------------------------------- training


class FederationConfig(StrictModel):
    """Rounds and client sampling."""

    rounds: int = Field(5, ge=1)
    fraction: float = Field(1.0, gt=0, le=1, description="Share of clients sampled each round.")
    min_clients: int = Field(2, ge=1, description="Fewest clients sampled in a round.")
    evaluate_every: int = Field(1, ge=1, description="Evaluate the global prompt every this many rounds.")
    local_evaluation: bool = Field(True, description="Also evaluate on each client's own held-out split.")


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


class CMAESOptimizerConfig(StrictModel):
    """Black-box local search over an intrinsic prompt's z by CMA-ES (nevergrad ParametrizedCMA).

    Budget in model queries per client per round, one query being one candidate scored on one
    example: each generation scores ``popsize`` candidates on a fresh batch of ``batch_size``
    local examples, so a round runs budget // (popsize · batch_size) generations.
    """

    kind: Literal["cmaes"] = "cmaes"
    popsize: int = Field(10, ge=2, description="λ, candidates per generation (BBT: 20).")
    sigma: float = Field(1.0, gt=0, description="Initial step size σ; with strategy fedbpt, the server's.")
    budget: int = Field(1280, ge=1, description="Model queries per client per round.")
    batch_size: int = Field(32, ge=1, description="Examples scored per candidate in each generation.")
    chunk_size: int = Field(10, ge=1, description="Candidates per forward pass (local backbones).")


class SPSAOptimizerConfig(StrictModel):
    """Black-box local search over z by SPSA: two seeded-perturbation queries per step (MeZO-style).

    Budget in model queries per client per round: each step scores 2 candidates on ``batch_size``.
    """

    kind: Literal["spsa"] = "spsa"
    lr: float = Field(1.0, gt=0, description="η in z ← z − η·ĝ·u.")
    epsilon: float = Field(0.1, gt=0, description="ε, the perturbation size in units of z.")
    budget: int = Field(1280, ge=1, description="Model queries per client per round.")
    batch_size: int = Field(32, ge=1, description="Examples scored per candidate in each step.")
    chunk_size: int = Field(2, ge=1, le=2, description="Candidates per forward pass (1: a loop, 2: stacked).")


OptimizerConfig = Annotated[
    GradientOptimizerConfig | CMAESOptimizerConfig | SPSAOptimizerConfig, Field(discriminator="kind")
]


class FedAvgConfig(StrictModel):
    """Example-weighted average of client states."""

    kind: Literal["fedavg"] = "fedavg"


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
    """Krum: the update closest to its n - f - 2 nearest neighbours."""

    kind: Literal["krum"] = "krum"
    num_byzantine: int = Field(0, ge=0, description="f, the number of clients that may be adversarial.")


class FedBPTConfig(StrictModel):
    """FedBPT: clients search z by CMA-ES from the server's mean and σ; the server aggregates.

    rule ``cma``: one global CMA-ES is told every client's final mean and its local loss, with σ
    set from the clients' local step sizes; ``mean``: the example-weighted mean of the clients' z.
    The σ sent down never grows and never drops below ``sigma_floor``.
    """

    kind: Literal["fedbpt"] = "fedbpt"
    rule: Literal["cma", "mean"] = "cma"
    sigma_floor: float = Field(0.5, gt=0, description="Lowest step size sent to clients (reference: 0.5).")


StrategyConfig = Annotated[
    FedAvgConfig
    | FedProxConfig
    | FedOptConfig
    | MedianConfig
    | TrimmedMeanConfig
    | KrumConfig
    | FedBPTConfig,
    Field(discriminator="kind"),
]


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
    """Where a run writes its results folder."""

    dir: Path = Path("runs")


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
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

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
        return self

    @model_validator(mode="after")
    def _black_box_fits(self) -> RunConfig:
        """Black-box optimisers search an intrinsic prompt; FedBPT needs CMA-ES; a remote backbone
        gives no gradients."""
        opt, strategy = self.optimizer, self.strategy
        black_box = isinstance(opt, CMAESOptimizerConfig | SPSAOptimizerConfig)
        if black_box and self.prompt.kind != "intrinsic":
            raise ValueError(
                f"optimizer.kind {opt.kind!r} searches an intrinsic prompt's z; set prompt.kind: intrinsic "
                f"(prompt.kind is {self.prompt.kind!r})"
            )
        if self.backbone.kind == "remote" and not black_box:
            raise ValueError(
                "backbone.kind remote returns outputs only, never gradients; "
                "set optimizer.kind: cmaes or spsa"
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
        if black_box and isinstance(strategy, FedProxConfig):
            raise ValueError("strategy.kind fedprox adds a gradient term; black-box optimisers ignore it")
        if black_box:
            candidates = opt.popsize if isinstance(opt, CMAESOptimizerConfig) else 2
            if opt.budget < candidates * opt.batch_size:
                raise ValueError(
                    f"optimizer.budget ({opt.budget} queries) is less than one {opt.kind} iteration: "
                    f"{candidates} candidates × batch_size {opt.batch_size} = {candidates * opt.batch_size}"
                )
        return self


# --------------------------------------------------------------------------- loading


def default_config_dict() -> dict[str, Any]:
    """The embedded default configuration (runs offline on the bundled MiniLM)."""
    text = resources.files("fedprompt").joinpath("defaults/default.yaml").read_text()
    return yaml.safe_load(text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (numbers, booleans, lists)."""
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
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
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _format_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known field" + _allowed_fields_hint(err["loc"])
        elif "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
        lines.append(f"  {where or '<root>'}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _allowed_fields_hint(loc: tuple[Any, ...]) -> str:
    """Walk an error location through the models (and tagged unions) to list the allowed fields."""
    model: type[BaseModel] = RunConfig
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts.pop(0)))
        if field is None:
            return ""
        members = _models_in(field.annotation)
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
        raise ConfigError(_format_errors(exc)) from None


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
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return validate_config(apply_overrides(raw, overrides))
