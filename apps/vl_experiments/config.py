"""The experiment's configuration: the parts every method shares, and each method's own settings.

One YAML file describes the whole comparison. Its shared sections (``backbone``, ``data``,
``partition``, ``federation``, ``payload``, ``robustness``, ``runtime``) are fedprompt's own; each
entry of ``methods`` names a method and, optionally, its ``prompt``, ``optimizer``, ``strategy`` and
``vision`` settings, merged over that method's (``methods.METHOD_SETTINGS``, the settings of its
config in ``configs/``). Every method's run configuration is built and validated when the file
loads, so a mistake in any of them stops the experiment before a model loads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apps.vl_experiments.methods import (
    BASE_TO_NOVEL_METHODS,
    METHOD_SETTINGS,
    SECTIONS,
    ZERO_SHOT,
    MethodName,
    merge_settings,
)
from fedprompt.config import (
    ConfigError,
    DataConfig,
    FederationConfig,
    OpenCLIPBackboneConfig,
    PartitionConfig,
    PayloadConfig,
    RobustnessConfig,
    RunConfig,
    RuntimeConfig,
    apply_overrides,
    format_validation_error,
    load_config,
)

DEMO_BACKBONE = "bundled:demo-clip"
"""fedprompt's offline demo CLIP (``fedprompt demo-backbone``), the default backbone."""
DEFAULT_CONFIG = "default.yaml"
"""The embedded default experiment (the digits, base-to-novel), the same as configs/vl-experiments.yaml."""
ZERO_SHOT_DATA_PROMPT: dict[str, Any] = {"kind": "coop"}
"""The prompt of the zero-shot run's configuration: it only selects cached image features (the
zero-shot model itself has no prompt)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MethodSettings(_Strict):
    """One method of the comparison: which method it runs and its settings over that method's own."""

    base: MethodName | None = Field(
        None,
        description="The method this entry runs (zero-shot, promptfl, vpt, tpfl, atpfl, fedtpg, fedapt, "
        "fed-dpt, split, finetuned); default: the entry's name. Two entries of one base compare two "
        "settings of a method.",
    )
    prompt: dict[str, Any] | None = Field(None, description="Over the method's prompt section.")
    optimizer: dict[str, Any] | None = Field(None, description="Over the method's optimizer section.")
    strategy: dict[str, Any] | None = Field(None, description="Over the method's strategy section.")
    vision: dict[str, Any] | None = Field(None, description="Over the method's vision section.")
    personalization: dict[str, Any] | None = Field(
        None, description="Over the method's personalization section (split prompts, fine-tuning)."
    )

    def given(self) -> dict[str, Any]:
        """The sections this entry sets."""
        return {name: getattr(self, name) for name in SECTIONS if getattr(self, name) is not None}


class ExperimentOutput(_Strict):
    """Where the experiment's folder goes (``<dir>/<name>-<time>``, unless ``--out`` names one)."""

    dir: Path = Path("runs")
    plot: bool = Field(True, description="Each method's run folder also gets its own plot.png.")


def _all_methods() -> dict[str, MethodSettings | None]:
    return {name: MethodSettings() for name in BASE_TO_NOVEL_METHODS}


def _digits() -> DataConfig:
    return DataConfig(source="builtin", name="digits", test_split=None, novel_class_fraction=0.3)


class ExperimentConfig(_Strict):
    """A comparison of vision-language prompt methods on one backbone, one dataset, one partition.

    Each method of ``methods`` runs once per seed of ``seeds`` with the shared sections as they are
    and the run seed set to that seed; zero-shot CLIP scores ``class_template`` with the frozen
    backbone, no training (and the VPT entry's fixed class text is the same template unless it sets
    ``prompt.class_template``). The comparison is base-to-novel (``data.novel_class_fraction``) or
    across domains (multi-domain images: accuracy per domain, their mean and worst, the held-out
    domain).
    """

    name: str = Field("vl-experiments", pattern=r"^[A-Za-z0-9._-]+$")
    seeds: list[int] = Field([0], min_length=1, description="Run seeds; several give mean ± std.")
    class_template: str = Field(
        "a photo of a {}.",
        description="The backbone's class text: zero-shot CLIP's, and VPT's fixed text by default.",
    )
    backbone: OpenCLIPBackboneConfig = Field(
        default_factory=lambda: OpenCLIPBackboneConfig(model=DEMO_BACKBONE)
    )
    data: DataConfig = Field(default_factory=_digits)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    payload: PayloadConfig = Field(default_factory=PayloadConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: ExperimentOutput = Field(default_factory=ExperimentOutput)
    methods: dict[str, MethodSettings | None] = Field(
        default_factory=_all_methods,
        description="The methods compared, in table order: name -> settings (null or {}: the method's "
        "own). Names other than the methods' need `base`. Default: the base-to-novel comparison's six.",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct non-negative integers (got {seeds})")
        return seeds

    @field_validator("class_template")
    @classmethod
    def _one_slot(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError(
                f"the class template needs '{{}}' exactly once, e.g. 'a photo of a {{}}.' (got {template!r})"
            )
        return template

    @model_validator(mode="after")
    def _methods_known(self) -> ExperimentConfig:
        if not self.methods:
            raise ValueError("methods: name at least one method to run")
        for name, settings in self.methods.items():
            base = (settings.base if settings else None) or name
            if base not in METHOD_SETTINGS:
                raise ValueError(
                    f"methods.{name}: unknown method; name one of {list(METHOD_SETTINGS)}, or set its "
                    "`base` to one of them"
                )
            if base == ZERO_SHOT and settings is not None and settings.given():
                raise ValueError(
                    f"methods.{name}: zero-shot CLIP trains nothing; remove {sorted(settings.given())} "
                    "(its class text is the top-level class_template)"
                )
        if self.data.novel_class_fraction is None and not self.data.multi_domain:
            raise ValueError(
                "data.novel_class_fraction: the comparison evaluates base-to-novel or across domains; set "
                "the share of classes held out as novel (e.g. 0.5; 0.3 on the digits: seven, eight and "
                "nine), or use multi-domain images (data.source: domain-folder, or builtin digit-domains)"
            )
        return self

    @property
    def across_domains(self) -> bool:
        """Whether the comparison is across domains (multi-domain images) rather than base-to-novel."""
        return self.data.multi_domain

    def base_of(self, method: str) -> str:
        """The method an entry runs."""
        settings = self.methods[method]
        return (settings.base if settings else None) or method

    def run_config(self, method: str, seed: int) -> RunConfig:
        """The fedprompt run of ``method`` with ``seed``: the shared sections, the method's settings
        merged over its base method's, run name ``<name>-<method>``. Raises ConfigError naming the
        method."""
        base = self.base_of(method)
        settings = self.methods[method]
        if base == ZERO_SHOT:
            sections: dict[str, Any] = {"prompt": ZERO_SHOT_DATA_PROMPT}
        else:
            given = settings.given() if settings else {}
            sections = merge_settings(METHOD_SETTINGS[base], given)
            prompt = sections["prompt"]
            if prompt.get("kind") in ("vpt", "pixel") and "class_template" not in given.get("prompt", {}):
                sections["prompt"] = {**prompt, "class_template": self.class_template}
        shared = self.model_dump(
            mode="json",
            include={"backbone", "data", "partition", "federation", "payload", "robustness", "runtime"},
        )
        raw = {
            "name": f"{self.name}-{method}",
            "seed": seed,
            **shared,
            **sections,
            "output": {"dir": str(self.output.dir), "plot": self.output.plot},
        }
        try:
            return load_config(raw)
        except ConfigError as exc:
            detail = str(exc).removeprefix("invalid configuration:").strip()
            raise ConfigError(f"invalid experiment configuration: methods.{method}: {detail}") from None

    def check_backbone_available(self) -> None:
        """A bundled backbone this fedprompt does not have is refused with the way out."""
        if self.backbone.model.startswith("bundled:") and not bundled_clip_available():
            raise ConfigError(
                f"backbone.model {self.backbone.model!r}: this fedprompt has no bundled CLIP (its demo "
                "backbone, built by `fedprompt demo-backbone`, is not installed). Name an open_clip model "
                "and its weights instead, e.g. --set backbone.model=ViT-B-16 --set backbone.pretrained="
                "openai (a tag downloads once; offline, a local checkpoint file)"
            )


def bundled_clip_available() -> bool:
    """Whether this fedprompt has its bundled demo CLIP (``fedprompt.tasks.clip.demo_backbone``)."""
    return importlib.util.find_spec("fedprompt.tasks.clip.demo_backbone") is not None


def default_experiment_dict() -> dict[str, Any]:
    """The embedded default experiment: every method on the digits, base-to-novel, demo backbone."""
    text = resources.files("apps.vl_experiments").joinpath(DEFAULT_CONFIG).read_text()
    return yaml.safe_load(text)


def load_experiment(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Read the experiment (a YAML file, a mapping, or the embedded default when None), apply
    ``key=value`` overrides, validate it and every method's run configuration. Raises ConfigError."""
    if source is None:
        raw = default_experiment_dict()
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"experiment file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"experiment file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"experiment file {str(path)!r} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides)
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(exc, ExperimentConfig)
        raise ConfigError(
            message.replace("invalid configuration", "invalid experiment configuration", 1)
        ) from None
    for method in config.methods:
        config.run_config(method, config.seeds[0])
    return config
