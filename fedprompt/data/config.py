"""Settings of the data package: where labelled examples come from (``data``) and how they are
split among clients (``partition``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedprompt.config_base import StrictModel

BUILTIN_DATASETS = ("chatterbot-corpus",)


BUILTIN_IMAGE_DATASETS = ("digits", "digit-domains")


MULTI_DOMAIN_BUILTINS = ("digit-domains",)
"""Builtin image datasets whose images come from several domains (``data.domains`` applies)."""


DIGIT_DOMAINS = ("plain", "inverted", "textured", "rotated", "outline", "noisy")
"""The domains of the builtin ``digit-domains`` (``fedprompt.data.digit_domains``), in order."""


class DomainsConfig(StrictModel):
    """Images from several domains: a folder in a published multi-domain layout (``source:
    domain-folder``: DomainNet, Office-Caltech-10, PACS, Digits-5-style sets, one folder per domain
    and in it one per class) or the builtin ``digit-domains``. Which domains are used, which one is
    held out (leave-one-domain-out: never trained on, reported as ``held_out_accuracy``), and
    where each domain's test split comes from."""

    include: list[str] | None = Field(
        None, min_length=1, description="The domains used, by folder name (null: every domain)."
    )
    held_out: str | None = Field(
        None,
        description="A domain kept out of training: no client holds it, and its test split is reported "
        "as held_out_accuracy (the domain generalisation protocol).",
    )
    split: Literal["auto", "files", "fraction"] = Field(
        "auto",
        description="files: the dataset's split lists (DomainNet <domain>_train.txt/<domain>_test.txt, "
        "PACS <domain>_train_kfold.txt/<domain>_test_kfold.txt, beside the domain folders or in "
        "splits/); fraction: a seeded stratified test_fraction of each domain; auto: files when every "
        "domain has them.",
    )

    @model_validator(mode="after")
    def _held_out_is_used(self) -> DomainsConfig:
        if self.include is not None:
            if len(set(self.include)) != len(self.include):
                raise ValueError(f"include names a domain twice: {self.include}")
            if self.held_out is not None and self.held_out not in self.include:
                raise ValueError(f"held_out {self.held_out!r} is not among include {self.include}")
            if len(self.include) - (self.held_out is not None) < 1:
                raise ValueError("include leaves no domain to train on besides the held-out one")
        return self


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

    source: Literal["builtin", "hub", "files", "image-folder", "domain-folder", "datasets", "vqa"] = "builtin"
    name: str | None = Field(
        "chatterbot-corpus",
        description="builtin: one of "
        + ", ".join(BUILTIN_DATASETS + BUILTIN_IMAGE_DATASETS)
        + "; hub: a dataset name or local folder; image-folder: a local folder of images in one "
        "subfolder per class (datasets' imagefolder); domain-folder: a local folder with one subfolder per "
        "domain, each with one subfolder of images per class (DomainNet, Office-Caltech-10, PACS).",
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
    labelled_per_class: int | None = Field(
        None,
        ge=1,
        description="Few-shot clients (FeS): each client keeps the labels of this many of its training "
        "examples per class (a seeded choice) and the rest of its training split is unlabelled; clients "
        "train on their labelled examples (and, with `pseudo_labels`, on pseudo-labelled ones).",
    )
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

    domains: DomainsConfig | None = Field(
        None,
        description="Multi-domain images (source: domain-folder, builtin digit-domains): which domains, "
        "the held-out one, the test splits (null: every domain, none held out, split auto).",
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
            if entry.multi_domain:
                raise ValueError(
                    f"datasets.{index}: multi-domain images cannot be pooled with other datasets; use "
                    "them alone"
                )
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
        if self.domains is not None and not self.multi_domain:
            raise ValueError(
                "the `domains` section applies to multi-domain images: source: domain-folder, or source: "
                f"builtin with name one of {list(MULTI_DOMAIN_BUILTINS)}"
            )
        if self.multi_domain and self.novel_class_fraction is not None:
            raise ValueError(
                "novel_class_fraction (base-to-novel) and multi-domain images do not go together; evaluate "
                "an unseen domain with domains.held_out instead"
            )
        if self.source == "domain-folder" and not self.name:
            raise ValueError("source: domain-folder needs `name`, the folder with one subfolder per domain")
        if self.source == "vqa" and self.novel_class_fraction is not None:
            raise ValueError("novel_class_fraction (base-to-novel) applies to image classification, not vqa")
        if self.source == "files" and (not self.files or self.train_split not in self.files):
            raise ValueError(
                f"source: files needs `files` with a {self.train_split!r} entry, e.g. {{train: a.csv}}"
            )
        return self

    @property
    def multi_domain(self) -> bool:
        """Whether the images come from several domains (a domain folder or a multi-domain builtin)."""
        return self.source == "domain-folder" or (
            self.source == "builtin" and self.name in MULTI_DOMAIN_BUILTINS
        )

    @property
    def domain_settings(self) -> DomainsConfig:
        """The ``domains`` section with its defaults filled in (multi-domain images only)."""
        return self.domains or DomainsConfig()

    @property
    def known_domains(self) -> tuple[str, ...] | None:
        """The domains a builtin multi-domain set has (None: read from a folder when it loads)."""
        return DIGIT_DOMAINS if self.source == "builtin" and self.name == "digit-domains" else None

    def trained_domains(self, available: tuple[str, ...] | list[str]) -> list[str]:
        """The domains clients train on, in order: ``domains.include`` (or all of ``available``)
        without the held-out one. Raises ValueError naming an unknown domain."""
        settings = self.domain_settings
        unknown = [d for d in [*(settings.include or []), settings.held_out] if d and d not in available]
        if unknown:
            raise ValueError(
                f"data.domains names {unknown}, which the data does not have; its domains are "
                f"{list(available)}"
            )
        used = settings.include or list(available)
        return [d for d in used if d != settings.held_out]


class PartitionConfig(StrictModel):
    """How the training examples are split among clients."""

    kind: Literal["iid", "dirichlet", "dirichlet_per_client", "shards", "classes", "domains"] = "dirichlet"
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
    clients_per_domain: int = Field(
        1,
        ge=1,
        description="domains: each domain's training images split evenly (seeded, IID) among this many "
        "clients; num_clients must be (domains trained on) × clients_per_domain.",
    )
    local_val_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of each client's data kept for local eval."
    )


DataConfig.model_rebuild()
