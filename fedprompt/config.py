"""Run configuration: the entry point that assembles ``RunConfig`` from the sections each package
keeps beside its code, checks the sections against each other (the checks live in
``fedprompt.config_checks``), and loads configurations.

Every section is a pydantic model that forbids unknown fields, validated before any work starts.
The sections live with what they configure (``fedprompt.data.config``, ``fedprompt.federation.config``,
``fedprompt.federation.strategies.config``, ``fedprompt.federation.privacy.config``,
``fedprompt.training.config``, ``fedprompt.tasks.text.config``, ``fedprompt.tasks.clip.config``,
``fedprompt.execution.config``); every class is re-exported here, so ``from fedprompt.config import
...`` names them all. Like those modules, this one imports without torch. A configuration is plain
YAML; ``load_config`` reads it, applies ``key=value`` overrides and validates it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, model_validator

from fedprompt.config_base import StrictModel, WireDtype
from fedprompt.config_checks.cross_section import CrossSectionChecks
from fedprompt.config_loading import apply_overrides, format_validation_error, yaml_problem
from fedprompt.data.config import (
    BUILTIN_DATASETS,
    BUILTIN_IMAGE_DATASETS,
    DIGIT_DOMAINS,
    MULTI_DOMAIN_BUILTINS,
    DataConfig,
    DomainsConfig,
    PartitionConfig,
    VQADataConfig,
)
from fedprompt.errors import ConfigError
from fedprompt.execution.config import OutputConfig
from fedprompt.federation.config import (
    AcceptanceConfig,
    FederationConfig,
    PayloadConfig,
    PersonalizationConfig,
    RobustnessConfig,
    SecureAggregationConfig,
)
from fedprompt.federation.privacy.config import AdaptiveClippingConfig, PrivacyConfig
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
    KrumConfig,
    MedianConfig,
    ReliabilityConfig,
    ScaffoldConfig,
    StrategyConfig,
    StrategySettings,
    TrimmedMeanConfig,
)
from fedprompt.tasks.clip.config import (
    BUNDLED_CLIP_MODELS,
    BUNDLED_WEIGHTS,
    CLIP_PROMPT_KINDS,
    DEFAULT_COOP_TOKENS,
    DOMAIN_PROMPT_KINDS,
    CoOpPromptConfig,
    FedAPTPromptConfig,
    FedDPTPromptConfig,
    GeneratorPromptConfig,
    OpenCLIPBackboneConfig,
    PixelPromptConfig,
    TwinPromptConfig,
    VisionConfig,
    VisualGeneratorPromptConfig,
    VisualPromptConfig,
    VPTPromptConfig,
    VQAPromptConfig,
)
from fedprompt.tasks.config import PromptInitConfig
from fedprompt.tasks.text.config import (
    LLM_BACKBONE_KINDS,
    SPSA_PROMPT_KINDS,
    DeepPromptConfig,
    DiscretePromptConfig,
    EndpointConfig,
    HeadConfig,
    HFTextBackboneConfig,
    IntrinsicPromptConfig,
    LlamaCppBackboneConfig,
    OpenAIBackboneConfig,
    RemoteBackboneConfig,
    SimilarityHeadConfig,
    SoftPromptConfig,
    VerbalizerHeadConfig,
    VLLMBackboneConfig,
    VocabularyConfig,
    ZGeneratorConfig,
    ZooPFLPromptConfig,
)
from fedprompt.training.config import (
    BLACK_BOX_OPTIMIZERS,
    SCORE_ON_HELP,
    AugmentConfig,
    CMAESOptimizerConfig,
    CoPlanningConfig,
    GradientOptimizerConfig,
    LRScheduleConfig,
    OptimizerConfig,
    PartOptimizerConfig,
    PolicyGradientOptimizerConfig,
    PseudoLabelConfig,
    RuntimeConfig,
    ScoreOn,
    SPSAOptimizerConfig,
)

__all__ = [
    "BLACK_BOX_OPTIMIZERS",
    "BUILTIN_DATASETS",
    "BUILTIN_IMAGE_DATASETS",
    "BUNDLED_CLIP_MODELS",
    "BUNDLED_WEIGHTS",
    "CLIP_PROMPT_KINDS",
    "DEFAULT_COOP_TOKENS",
    "DIGIT_DOMAINS",
    "DOMAIN_PROMPT_KINDS",
    "LLM_BACKBONE_KINDS",
    "MULTI_DOMAIN_BUILTINS",
    "SCORE_ON_HELP",
    "SPSA_PROMPT_KINDS",
    "STRATEGY_CONFIGS",
    "AcceptanceConfig",
    "AdaptiveClippingConfig",
    "AugmentConfig",
    "BackboneConfig",
    "CMAESOptimizerConfig",
    "CoOpPromptConfig",
    "CoPlanningConfig",
    "ConfigError",
    "DataConfig",
    "DeepPromptConfig",
    "DiscretePromptConfig",
    "DomainsConfig",
    "EndpointConfig",
    "FedAPTPromptConfig",
    "FedAvgConfig",
    "FedAvgMConfig",
    "FedBPTConfig",
    "FedDPTConfig",
    "FedDPTPromptConfig",
    "FedDynConfig",
    "FedKSeedConfig",
    "FedNovaConfig",
    "FedOptConfig",
    "FedPepTAOConfig",
    "FedProxConfig",
    "FederationConfig",
    "GeneratorPromptConfig",
    "GradientOptimizerConfig",
    "HFTextBackboneConfig",
    "HeadConfig",
    "IntrinsicPromptConfig",
    "KrumConfig",
    "LRScheduleConfig",
    "LlamaCppBackboneConfig",
    "MedianConfig",
    "OpenAIBackboneConfig",
    "OpenCLIPBackboneConfig",
    "OptimizerConfig",
    "OutputConfig",
    "PartOptimizerConfig",
    "PartitionConfig",
    "PayloadConfig",
    "PersonalizationConfig",
    "PixelPromptConfig",
    "PolicyGradientOptimizerConfig",
    "PrivacyConfig",
    "PromptConfig",
    "PromptInitConfig",
    "PseudoLabelConfig",
    "ReliabilityConfig",
    "RemoteBackboneConfig",
    "RobustnessConfig",
    "RunConfig",
    "RuntimeConfig",
    "SPSAOptimizerConfig",
    "ScaffoldConfig",
    "ScoreOn",
    "SecureAggregationConfig",
    "SimilarityHeadConfig",
    "SoftPromptConfig",
    "StrategyConfig",
    "StrategySettings",
    "StrictModel",
    "TrimmedMeanConfig",
    "TwinPromptConfig",
    "VLLMBackboneConfig",
    "VPTPromptConfig",
    "VQADataConfig",
    "VQAPromptConfig",
    "VerbalizerHeadConfig",
    "VisionConfig",
    "VisualGeneratorPromptConfig",
    "VisualPromptConfig",
    "VocabularyConfig",
    "WireDtype",
    "ZGeneratorConfig",
    "ZooPFLPromptConfig",
    "apply_overrides",
    "default_config_dict",
    "format_validation_error",
    "load_config",
    "validate_config",
]

BackboneConfig = Annotated[
    HFTextBackboneConfig
    | OpenCLIPBackboneConfig
    | RemoteBackboneConfig
    | LlamaCppBackboneConfig
    | VLLMBackboneConfig
    | OpenAIBackboneConfig,
    Field(discriminator="kind"),
]

PromptConfig = Annotated[
    SoftPromptConfig
    | DeepPromptConfig
    | CoOpPromptConfig
    | VPTPromptConfig
    | PixelPromptConfig
    | TwinPromptConfig
    | GeneratorPromptConfig
    | VQAPromptConfig
    | IntrinsicPromptConfig
    | DiscretePromptConfig
    | FedAPTPromptConfig
    | FedDPTPromptConfig
    | ZooPFLPromptConfig
    | VisualGeneratorPromptConfig,
    Field(discriminator="kind"),
]


class RunConfig(CrossSectionChecks):
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
    pseudo_labels: PseudoLabelConfig | None = Field(
        None,
        description="FeS's pseudo-labelling of few-shot clients' unlabelled examples (needs "
        "data.labelled_per_class).",
    )

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
        return _with_personal_zoo_pfl_head(_with_strategy_optimizer_defaults(data))


def _strategy_class(kind: Any) -> type[StrategySettings] | None:
    """The configuration class of a ``strategy.kind``, or None for an unknown one."""
    for config in STRATEGY_CONFIGS:
        if kind in get_args(config.model_fields["kind"].annotation):
            return config
    return None


def _with_strategy_optimizer_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the gradient optimiser's fields the raw configuration leaves unset with the strategy's
    ``optimizer_defaults`` (SCAFFOLD's plain SGD steps)."""
    strategy, optimizer = data.get("strategy"), data.get("optimizer", {})
    kind = strategy.get("kind") if isinstance(strategy, dict) else getattr(strategy, "kind", None)
    config = _strategy_class(kind) if kind is not None else None
    if config is None or not config.optimizer_defaults:
        return data
    if isinstance(optimizer, GradientOptimizerConfig):
        given = {name: getattr(optimizer, name) for name in optimizer.model_fields_set}
        optimizer = {**given, "kind": "gradient"}
    if not isinstance(optimizer, dict) or optimizer.get("kind", "gradient") != "gradient":
        return data
    return {**data, "optimizer": {"kind": "gradient", **config.optimizer_defaults, **optimizer}}


def _with_personal_zoo_pfl_head(data: dict[str, Any]) -> dict[str, Any]:
    """A ZooPFL prompt keeps its head on each client unless ``personalization.local`` says otherwise."""
    prompt, personal = data.get("prompt"), data.get("personalization", {})
    kind = prompt.get("kind") if isinstance(prompt, dict) else getattr(prompt, "kind", None)
    if kind != "zoo-pfl" or not isinstance(personal, dict) or "local" in personal:
        return data
    return {**data, "personalization": {**personal, "local": ["head.*"]}}


def default_config_dict() -> dict[str, Any]:
    """The embedded default configuration (runs offline on the bundled MiniLM)."""
    text = resources.files("fedprompt").joinpath("defaults/default.yaml").read_text()
    return yaml.safe_load(text)


def validate_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping into a RunConfig, raising ConfigError with readable messages."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig)) from None


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
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return validate_config(apply_overrides(raw, overrides))
