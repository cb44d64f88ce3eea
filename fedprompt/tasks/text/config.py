"""Settings of text tasks: Hugging Face and remote backbones, class heads (verbaliser,
similarity), and the text prompts (soft, deep, intrinsic)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from fedprompt.config_base import StrictModel, WireDtype
from fedprompt.tasks.config import PromptInitConfig

SPSA_PROMPT_KINDS = ("soft", "deep", "intrinsic")


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


class SoftPromptConfig(PromptInitConfig):
    """Prompt tuning: `num_tokens` virtual token embeddings placed in the input."""

    kind: Literal["soft"] = "soft"
    placement: Literal["after-cls", "before-all"] = Field(
        "after-cls",
        description="Encoders: after the leading special token(s) such as [CLS], or before everything as "
        "PEFT places virtual tokens (needed to export to PEFT with the same logits). Decoders put the "
        "prompt before everything either way.",
    )


class DeepPromptConfig(PromptInitConfig):
    """Deep prompt: its own prompt at every layer from `start_layer` up, or at the `layers` given,
    or at the `select_layers` layers of highest FedPepTAO score.

    mode ``prefix`` (P-tuning v2): each layer's attention attends `num_tokens` trained key/value
    vectors before the sequence; the sequence is unchanged. ``init`` vocab/text start the prefixes
    at the frozen model's own keys and values of those tokens (Li & Liang), random at
    N(0, init_std²). mode ``replace`` (VPT-deep style): `num_tokens` positions enter the sequence
    at the first prompted layer and each prompted layer's prompt replaces them at its input. In
    both modes the layers below the first prompted layer compute the unprompted model, so their
    output is cached per dataset. The backbone stays in eval mode (its own dropout off, as the
    frozen-layer cache needs); `prefix_dropout` is P-tuning v2's dropout on the prefixes.
    """

    kind: Literal["deep"] = "deep"
    mode: Literal["prefix", "replace"] = Field(
        "prefix", description="prefix: key/value prefixes in attention (P-tuning v2); replace: hidden states."
    )
    start_layer: int = Field(0, ge=0, description="First layer that gets a prompt (0: the input layer).")
    layers: list[int] | None = Field(
        None,
        description="The layers that get a prompt, any ascending set (not necessarily contiguous); "
        "null: every layer from start_layer up. Only these layers' prompts are trained and sent.",
    )
    select_layers: int | None = Field(
        None,
        ge=1,
        description="FedPepTAO's layer selection: before round 1, each client scores every layer from "
        "start_layer on `score_batch_size` of its examples (Σ log λ + 1/λ over the eigenvalues λ of the "
        "cosine-similarity matrix of the layer's outputs), the server weights the scores by example "
        "count and prompts the k layers of highest score. In-process runs only (on Flower, set `layers`).",
    )
    score_batch_size: int = Field(
        32, ge=2, description="select_layers: examples per client the layer scores are computed on."
    )
    prefix_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="mode prefix: dropout on the prefixes while training (P-tuning v2 uses the model's "
        "hidden dropout, 0.1); the backbone's own dropout stays off.",
    )
    cache_frozen_layers: bool = Field(
        True,
        description="First prompted layer > 0: compute the states entering it once per dataset (kept in "
        "memory, N × length × hidden floats) and run only the layers from it at each step.",
    )

    @model_validator(mode="after")
    def _one_layer_choice(self) -> DeepPromptConfig:
        if self.layers is not None and self.select_layers is not None:
            raise ValueError("give the prompted layers as `layers` or pick them by `select_layers`, not both")
        if self.layers is not None:
            if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError(
                    f"layers must be a non-empty ascending list of distinct layers; got {self.layers}"
                )
            if self.layers[0] < 0:
                raise ValueError(f"layers must be layer indices >= 0; got {self.layers}")
            if "start_layer" in self.model_fields_set and self.start_layer != self.layers[0]:
                raise ValueError(f"start_layer {self.start_layer} is not the first of layers {self.layers}")
        if self.prefix_dropout > 0 and self.mode != "prefix":
            raise ValueError("prefix_dropout applies to mode: prefix")
        return self

    @property
    def first_layer(self) -> int:
        """The first layer that may get a prompt (what bounds the frozen-layer cache)."""
        return self.layers[0] if self.layers is not None else self.start_layer


class ZGeneratorConfig(StrictModel):
    """Fed-BBPT's prompt generator: a small network that writes z, z = W₂·tanh(W₁c + b₁) + b₂ from a
    fixed code c; its weights are all that trains and travels."""

    code_dim: int = Field(16, ge=1, le=1024, description="The length of the fixed code c.")
    hidden: int = Field(32, ge=1, le=4096, description="The width of the generator's hidden layer.")


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
    generator: ZGeneratorConfig | None = Field(
        None,
        description="Fed-BBPT: a prompt generator writes z and its weights are trained (by SPSA against a "
        "black box, or by gradient on a local backbone) and aggregated; null: z itself is.",
    )


class ZooPFLPromptConfig(StrictModel):
    """ZooPFL: the frozen text model used as a black box (input embeddings in, its pooled output
    embedding out, no gradients), adapted by an input surgery on the input embeddings,
    e' = e + D·tanh(E·e) (rank `rank`), trained by SPSA from the black box's outputs; a semantic
    re-mapping of its output embedding (a linear map) and a personal linear head per client, both
    trained by gradient (`optimizer`). The surgery and the re-mapping are aggregated, the head stays
    on its client (`personalization.local` defaults to `head.*`); `head.template` shapes the input.
    """

    kind: Literal["zoo-pfl"] = "zoo-pfl"
    rank: int = Field(8, ge=1, le=1024, description="r, the surgery's bottleneck width (E is r × h).")
    zo_lr: float = Field(0.01, gt=0, description="SPSA's η for the surgery: θ ← θ − η·ĝ·u.")
    zo_epsilon: float = Field(0.01, gt=0, description="SPSA's ε for the surgery.")
    zo_budget: int = Field(
        640, ge=2, description="Black-box queries per client per round for the surgery's SPSA steps."
    )
    zo_batch_size: int = Field(16, ge=1, description="Examples each SPSA candidate is scored on.")


HeadConfig = Annotated[VerbalizerHeadConfig | SimilarityHeadConfig, Field(discriminator="kind")]
