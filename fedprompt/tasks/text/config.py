"""Settings of text tasks: Hugging Face and remote backbones, the language-model backbones reached
through label-word log-probabilities (llama-cpp, vllm, openai), class heads (verbaliser,
similarity), and the text prompts (soft, deep, intrinsic, BDPL's discrete)."""

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
        _check_tls_files(self)
        return self


def _check_tls_files(endpoint: RemoteBackboneConfig | EndpointConfig) -> None:
    """A client certificate comes with its key, and TLS files go with an https url only."""
    if (endpoint.client_certfile is None) != (endpoint.client_keyfile is None):
        raise ValueError("client_certfile and client_keyfile go together; give both or neither")
    tls_fields = [name for name in ("ca_file", "client_certfile") if getattr(endpoint, name) is not None]
    if tls_fields and not endpoint.url.startswith("https://"):
        raise ValueError(f"{', '.join(tls_fields)} apply to https urls; url is {endpoint.url!r}")


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


LLM_BACKBONE_KINDS = ("llama-cpp", "vllm", "openai")
"""Backbones reached as a language model that returns next-token log-probabilities: a local GGUF
through llama.cpp, a vLLM server, any OpenAI-compatible server. They score label words only."""


class EndpointConfig(StrictModel):
    """How a client reaches an OpenAI-compatible HTTP server (vLLM, llama.cpp's server, a hosted API):
    its URL and served model name, the bearer token (from an environment variable, never written in
    the configuration), TLS trust, and what the client does when the server is slow or busy."""

    url: str = Field(
        "http://127.0.0.1:8000",
        pattern=r"^https?://\S+$",
        description="Base URL of the server, without /v1 (e.g. http://127.0.0.1:8000).",
    )
    model: str = Field(
        ..., min_length=1, description="The served model's name, as the server's /v1/models lists it."
    )
    token_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the API key sent as a bearer token (null: none, for a "
        "server on loopback that asks for none).",
    )
    ca_file: Path | None = Field(
        None, description="CA certificate (PEM) to trust for an https url; by default the system's CAs."
    )
    client_certfile: Path | None = Field(
        None, description="This party's certificate (PEM), for a server that requires one (mutual TLS)."
    )
    client_keyfile: Path | None = Field(None, description="The private key (PEM) of `client_certfile`.")
    timeout: float = Field(60.0, gt=0, description="Seconds to wait for one answer (read timeout).")
    retries: int = Field(
        5, ge=0, description="Retries of a request after a connection error, a 429 or a 5xx answer."
    )
    backoff: float = Field(
        0.5, ge=0, description="Seconds before the first retry; doubles each retry, up to `max_backoff`."
    )
    max_backoff: float = Field(
        30.0, ge=0, description="Longest wait between two retries when the server gives no Retry-After."
    )
    max_wait: float = Field(
        300.0,
        ge=0,
        description="Longest Retry-After (seconds or an HTTP date) the client waits; a longer one fails the "
        "request at once, naming the wait.",
    )
    concurrency: int = Field(
        4, ge=1, le=256, description="Requests in flight at once (the server's and the quota's limit)."
    )
    top_logprobs: int = Field(
        20,
        ge=1,
        le=1000,
        description="Log-probabilities asked for per answer (hosted APIs: at most 20; vLLM: its "
        "--max-logprobs). A label word outside them gets the floor (see the docs).",
    )
    price_per_prompt_token: float | None = Field(
        None, ge=0, description="Price of one prompt token, for the cost report's estimate (null: none)."
    )
    price_per_completion_token: float | None = Field(
        None, ge=0, description="Price of one completion token, for the cost report's estimate."
    )

    @model_validator(mode="after")
    def _tls_fits(self) -> EndpointConfig:
        _check_tls_files(self)
        return self


PARITY_HELP = (
    "Largest difference (nats) between a label's log-probability with the plain template sent as "
    "embeddings and as text, in the pre-flight check every client runs before any training query"
)


class LlamaCppBackboneConfig(StrictModel):
    """A GGUF model run in this process by llama.cpp (llama-cpp-python's low-level API).

    Soft prompts go in as embeddings (``llama_batch.embd``); the client embeds the templated input
    with the model's own input-embedding table (dequantised from the GGUF) and scores each class by
    the exact log-softmax of its label words over the full vocabulary of the next-token logits.
    Discrete prompts go in as tokens (llama.cpp's own tokenizer).
    """

    kind: Literal["llama-cpp"] = "llama-cpp"
    model: str = Field(
        "bundled:smollm2-135m",
        description="A GGUF file, a folder holding `gguf_file`, or a bundled alias ('bundled:smollm2-135m').",
    )
    gguf_file: str | None = Field(None, description="The GGUF file inside a `model` folder.")
    tokenizer: str | None = Field(
        None,
        description="A Hugging Face tokenizer (Hub name, folder, bundled alias) for the client's own "
        "tokenisation; null: the GGUF's tokenizer, as transformers reads it.",
    )
    max_length: int = Field(64, ge=8, le=8192, description="Tokens kept per input, before the prompt.")
    add_bos: bool | None = Field(
        None,
        description="Put the beginning-of-sequence token before each input the client embeds (true), or "
        "none (false); null: as the tokenizer does. Must match how the server tokenises text (the "
        "pre-flight parity check tells).",
    )
    context_length: int = Field(
        512, ge=64, le=131072, description="llama.cpp's context (n_ctx): the longest prompted input."
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads llama.cpp computes with (null: llama.cpp's default)."
    )
    parity_tolerance: float = Field(1e-3, gt=0, description=PARITY_HELP + ".")


class VLLMBackboneConfig(EndpointConfig):
    """A model served by vLLM (started with ``--enable-prompt-embeds``): soft prompts travel as
    ``prompt_embeds``, the base64 of a ``torch.save``d dense float tensor [tokens, hidden] of the
    whole prompted input, so the client embeds its inputs itself with the model's input-embedding
    table (``embeddings``, which the model owner publishes; the rest of the weights stay private).
    Each class is scored by its label words' log-probabilities, asked for by id
    (``logprob_token_ids``) where the server has it, else read from the top ``top_logprobs``.
    Discrete prompts travel as text.
    """

    kind: Literal["vllm"] = "vllm"
    tokenizer: str = Field(
        "bundled:smollm2-135m",
        description="The served model's tokenizer (Hub name, folder, bundled alias), loaded locally.",
    )
    embeddings: str | None = Field(
        None,
        description="The served model's input-embedding table: a safetensors file holding one [vocab, "
        "hidden] tensor, a model folder or a GGUF file; null: read it from `tokenizer`'s model.",
    )
    logprob_token_ids: bool = Field(
        True,
        description="Ask for the label words' log-probabilities by token id (vLLM's logprob_token_ids); "
        "false for a vLLM without it: the top `top_logprobs` and the floor.",
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of the prompt_embeds tensors sent (the server's --dtype)."
    )
    max_length: int = Field(64, ge=8, le=8192, description="Tokens kept per input, before the prompt.")
    add_bos: bool | None = Field(
        None,
        description="Put the beginning-of-sequence token before each input the client embeds (true), or "
        "none (false); null: as the tokenizer does. Must match how the server tokenises text (the "
        "pre-flight parity check tells).",
    )
    parity_tolerance: float = Field(1e-3, gt=0, description=PARITY_HELP + " (the server's own tokenisation).")


class OpenAIBackboneConfig(EndpointConfig):
    """Any OpenAI-compatible server that takes text and returns top log-probabilities: llama.cpp's
    server, vLLM, a hosted API. Text in, the next token's ``top_logprobs`` out: it tunes discrete
    prompts (BDPL). A label word outside the returned top-k gets the floor (see the docs)."""

    kind: Literal["openai"] = "openai"
    endpoint: Literal["completions", "chat"] = Field(
        "completions",
        description="completions: /v1/completions with the text as the prompt (llama.cpp, vLLM); chat: "
        "/v1/chat/completions with the text as one user message (hosted chat models).",
    )
    tokenizer: str | None = Field(
        None,
        description="The served model's tokenizer (to name each label word's first token exactly); null: "
        "a returned token matches a label word when the word (stripped, lower-case) starts with it.",
    )


class VocabularyConfig(StrictModel):
    """BDPL's candidate vocabulary: the strings each prompt position chooses among.

    ``pmi`` builds it from the task's training texts as BDPL's reference does: adjacent word pairs
    whose pointwise mutual information log(N·c(a,b)/(c(a)·c(b))) is at least ``min_pmi`` join into
    n-grams (up to ``max_ngram`` words, seen more than ``min_count`` times), which are recounted
    over the texts and kept when seen more than ``min_frequency`` times; the ``size`` most frequent
    are the candidates. Every party computes the same list from the same configured data. ``file``
    reads one candidate a line instead (a list published by the federation, computed from no
    party's data).
    """

    source: Literal["pmi", "file"] = Field(
        "pmi", description="pmi: n-grams of the training texts (BDPL's); file: the lines of `file`."
    )
    file: Path | None = Field(None, description="source file: a text file, one candidate string a line.")
    size: int = Field(50, ge=2, le=100_000, description="K, the candidates each position chooses among.")
    max_ngram: int = Field(5, ge=1, le=20, description="Longest n-gram, in words.")
    min_count: int = Field(
        5, ge=0, description="Words, pairs and n-grams seen this often or less are dropped."
    )
    min_pmi: float = Field(1.0, description="Smallest PMI of a pair of words that join into one n-gram.")
    min_frequency: int = Field(5, ge=0, description="N-grams recounted this often or less are dropped.")

    @model_validator(mode="after")
    def _file_fits(self) -> VocabularyConfig:
        if (self.source == "file") != (self.file is not None):
            raise ValueError("vocabulary.file goes with source: file (and source: file needs it)")
        return self


class DiscretePromptConfig(StrictModel):
    """BDPL's discrete prompt: ``num_tokens`` positions, each a categorical distribution over the
    candidate vocabulary, sent before the input as text (the chosen candidates joined by spaces,
    then ``separator``, then the templated input). The trained state is one row per position:
    logits α (``softmax``, p = softmax(α)) or the probabilities themselves (``simplex``, as BDPL's
    and FedOne's reference code keep them). Evaluation uses each position's most likely candidate.
    """

    kind: Literal["discrete"] = "discrete"
    num_tokens: int = Field(6, ge=1, le=256, description="n, the prompt positions (BDPL: 6; FedOne: 20).")
    vocabulary: VocabularyConfig = Field(default_factory=VocabularyConfig)
    parametrization: Literal["softmax", "simplex"] = Field(
        "softmax",
        description="softmax: logits α, p = softmax(α), the exact score function; simplex: the "
        "probabilities, stepped and projected back onto the simplex (the reference code).",
    )
    separator: str = Field(
        " ", description="Text between the prompt and the templated input (FedOne's: a tab)."
    )
