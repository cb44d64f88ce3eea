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


BackboneConfig = Annotated[HFTextBackboneConfig, Field(discriminator="kind")]


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


PromptConfig = Annotated[SoftPromptConfig | DeepPromptConfig, Field(discriminator="kind")]


# --------------------------------------------------------------------------- data


class DataConfig(StrictModel):
    """Where the labelled examples come from and which columns hold text and label."""

    source: Literal["builtin", "hub", "files"] = "builtin"
    name: str | None = Field(
        "chatterbot-corpus",
        description="builtin: one of "
        + ", ".join(BUILTIN_DATASETS)
        + "; hub: a dataset name or local folder.",
    )
    subset: str | None = Field(None, description="Dataset configuration name (hub).")
    files: dict[str, str | list[str]] | None = Field(
        None, description="Split -> local .csv/.tsv/.json/.jsonl/.parquet file(s) (source: files)."
    )
    text_column: str = "text"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str | None = Field("test", description="None: hold out `test_fraction` of train.")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_per_class: int | None = Field(None, ge=1, description="Cap on training examples per class (seeded).")
    max_test_examples: int | None = Field(None, ge=1)
    label_names: list[str] | None = Field(
        None, description="Class names in label order (overrides the data's)."
    )

    @model_validator(mode="after")
    def _source_fields(self) -> DataConfig:
        if self.source == "builtin" and self.name not in BUILTIN_DATASETS:
            raise ValueError(
                f"builtin dataset {self.name!r} is unknown; choose one of {list(BUILTIN_DATASETS)}"
            )
        if self.source == "hub" and not self.name:
            raise ValueError("source: hub needs `name`, a dataset name or a local dataset folder")
        if self.source == "files" and (not self.files or self.train_split not in self.files):
            raise ValueError(
                f"source: files needs `files` with a {self.train_split!r} entry, e.g. {{train: a.csv}}"
            )
        return self


class PartitionConfig(StrictModel):
    """How the training examples are split among clients."""

    kind: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller means more label skew.")
    min_partition_size: int = Field(
        5, ge=0, description="Dirichlet: resample until each client has this many."
    )
    shards_per_client: int = Field(2, ge=1, description="shards: label-sorted shards given to each client.")
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


OptimizerConfig = Annotated[GradientOptimizerConfig, Field(discriminator="kind")]


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


StrategyConfig = Annotated[
    FedAvgConfig | FedProxConfig | FedOptConfig | MedianConfig | TrimmedMeanConfig | KrumConfig,
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

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.federation.min_clients > self.partition.num_clients:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) exceeds partition.num_clients "
                f"({self.partition.num_clients}); lower it or add clients"
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
