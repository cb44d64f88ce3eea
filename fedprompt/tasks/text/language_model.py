"""The prompt module of a run whose backbone is a language model reached through label-word
log-probabilities (``backbone.kind`` llama-cpp, vllm or openai): the scorer that reaches it, the
public parts the client holds (tokenizer, input-embedding table, label words, candidate
vocabulary), the prompt, and the pre-flight parity check of the embedding route."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedprompt.config import (
    ConfigError,
    DiscretePromptConfig,
    EndpointConfig,
    IntrinsicPromptConfig,
    LlamaCppBackboneConfig,
    OpenAIBackboneConfig,
    RunConfig,
    SoftPromptConfig,
    VLLMBackboneConfig,
)
from fedprompt.seeding import derive_seed, torch_generator
from fedprompt.tasks.text.ngrams import pmi_ngrams
from fedprompt.tasks.text.parts import head_spec
from fedprompt.tasks.text.remote import configured_tls
from fedprompt.training.blackbox import projection_spec, search_sigma
from prompt_modules.bundled import resolve_model_name
from prompt_modules.embedding_table import load_embedding_table
from prompt_modules.hf_text import load_tokenizer
from prompt_modules.intrinsic import IntrinsicPrompt, make_projection
from prompt_modules.label_scores import EmbeddingScorer, LabelScorer, LabelWords
from prompt_modules.llm_classifier import (
    DiscretePromptClassifier,
    EmbeddedIntrinsicClassifier,
    EmbeddedPromptClassifier,
    parity_gap,
)
from prompt_modules.openai_client import EndpointSettings, OpenAICompatibleClient, ServerError
from prompt_modules.openai_scorer import OpenAIScorer, VLLMScorer
from prompt_modules.soft_prompt import SoftPrompt, init_prompt_embeddings

log = logging.getLogger("fedprompt.tasks.language_model")

PARITY_INPUTS = 4
"""Training inputs the pre-flight parity check scores both ways."""


@dataclass
class LanguageModelParts:
    """What building a language-model backbone gives the task: the prompt module, the backbone's
    size in bytes where the client knows it (a local GGUF; 0 for a server), and facts for the run
    summary (the parity check's result, the candidate vocabulary's size)."""

    model: EmbeddedPromptClassifier | DiscretePromptClassifier
    backbone_bytes: int
    notes: dict[str, Any] = field(default_factory=dict)


def build_language_model(
    config: RunConfig, label_names: Sequence[str], train_texts: Sequence[str]
) -> LanguageModelParts:
    """Connect to (or load) the configured language model, build the prompt module on it, and for
    embedded prompts run the pre-flight parity check on the first training inputs."""
    backbone = config.backbone
    head = head_spec(config.head, label_names)
    words = [list(w) for w in head.label_words]
    if isinstance(backbone, LlamaCppBackboneConfig):
        from prompt_modules.llama_cpp_engine import LlamaCppEngine

        path, gguf = resolve_model_name(backbone.model, backbone.gguf_file)
        file = Path(path) / gguf if gguf else Path(path)
        scorer: LabelScorer = LlamaCppEngine(
            file, context_length=backbone.context_length, threads=backbone.threads
        )
        tokenizer = load_tokenizer(backbone.tokenizer) if backbone.tokenizer else load_tokenizer(path, gguf)
        table_source: tuple[str | Path, str | None] | None = (file, None)
        size = file.stat().st_size
    elif isinstance(backbone, VLLMBackboneConfig):
        tokenizer = load_tokenizer(backbone.tokenizer)
        table_source = resolve_model_name(backbone.embeddings or backbone.tokenizer, None)
        size = 0
        scorer = None  # made once the table gives the hidden size
    else:
        assert isinstance(backbone, OpenAIBackboneConfig)
        tokenizer = load_tokenizer(backbone.tokenizer) if backbone.tokenizer else None
        scorer = OpenAIScorer(
            endpoint_client(backbone), backbone.model, backbone.endpoint, backbone.top_logprobs
        )
        table_source, size = None, 0
    with _model_checked("head.label_words"):
        labels = LabelWords.from_tokenizer(tokenizer, words) if tokenizer else LabelWords.from_words(words)
    prompt = config.prompt
    if isinstance(prompt, DiscretePromptConfig):
        if scorer is None:
            scorer = _vllm_scorer(backbone, hidden_size=0)
        candidates = candidate_vocabulary(prompt, train_texts)
        model = DiscretePromptClassifier(
            scorer,
            candidates,
            prompt.num_tokens,
            config.head.template,
            labels,
            prompt.separator,
            prompt.parametrization,
        )
        return LanguageModelParts(model, size, {"candidate_vocabulary": len(candidates)})
    assert table_source is not None  # openai backbones take discrete prompts only (RunConfig)
    table = _embedding_table(*table_source)
    if scorer is None:
        scorer = _vllm_scorer(backbone, hidden_size=table.shape[1])
    assert isinstance(scorer, EmbeddingScorer)
    with _model_checked("prompt"):
        module = _embedded_module(config, prompt, scorer, tokenizer, table, labels)
    notes = {
        "parity": preflight_parity(
            scorer,
            module,
            train_texts[:PARITY_INPUTS],
            backbone.parity_tolerance,
            PARITY_FIELDS[backbone.kind],
        )
    }
    return LanguageModelParts(module, size, notes)


def candidate_vocabulary(prompt: DiscretePromptConfig, train_texts: Sequence[str]) -> list[str]:
    """BDPL's candidates: the PMI n-grams of the training texts, or the configured file's lines."""
    vocab = prompt.vocabulary
    if vocab.source == "file":
        assert vocab.file is not None
        if not vocab.file.is_file():
            raise ConfigError(f"prompt.vocabulary.file: {vocab.file} is not a file")
        lines = [line.strip() for line in vocab.file.read_text().splitlines()]
        candidates = list(dict.fromkeys(line for line in lines if line))[: vocab.size]
    else:
        candidates = pmi_ngrams(
            train_texts,
            vocab.size,
            max_ngram=vocab.max_ngram,
            min_count=vocab.min_count,
            min_pmi=vocab.min_pmi,
            min_frequency=vocab.min_frequency,
        )
    if len(candidates) < 2:
        raise ConfigError(
            f"prompt.vocabulary: only {len(candidates)} candidate(s) found; lower min_count/min_frequency "
            "(the training texts are few) or give source: file"
        )
    return candidates


PARITY_FIELDS = {
    "llama-cpp": "head.template, backbone.tokenizer or backbone.add_bos (the table is backbone.model's)",
    "vllm": "head.template, backbone.tokenizer, backbone.add_bos or backbone.embeddings",
}
"""What to fix after a failed pre-flight, per backbone kind: the fields that decide the tokens and
the table."""


def preflight_parity(
    scorer: EmbeddingScorer,
    module: EmbeddedPromptClassifier,
    texts: Sequence[str],
    tolerance: float,
    fields: str,
) -> dict[str, Any]:
    """Score the plain templated inputs as embeddings and as text; ConfigError when they differ by
    more than ``tolerance`` nats (a template or tokenizer the server reads otherwise, or the wrong
    embedding table), naming the ``fields`` to fix, else what was measured."""
    gap, per_input = parity_gap(scorer, module, texts)
    result = {"max_abs_difference": gap, "tolerance": tolerance, "inputs": len(per_input)}
    log.info("pre-flight parity: label log-probabilities as embeddings and as text differ by %.3g nats", gap)
    if gap > tolerance:
        raise ConfigError(
            f"backbone.parity_tolerance: the plain template's label log-probabilities differ by {gap:.4g} "
            f"nats (over {tolerance:g}) between the input sent as embeddings and as text (per input: "
            f"{', '.join(f'{g:.3g}' for g in per_input)}): the server tokenises head.template otherwise "
            "than backbone.tokenizer does (special tokens, a beginning-of-sequence token, spaces), or the "
            f"input-embedding table is not the served model's. Fix {fields}"
        )
    return result


def _embedded_module(
    config: RunConfig,
    prompt: Any,
    scorer: EmbeddingScorer,
    tokenizer: Any,
    table: Any,
    labels: LabelWords,
) -> EmbeddedPromptClassifier:
    max_length, add_bos = config.backbone.max_length, config.backbone.add_bos
    excluded = tuple(tokenizer.all_special_ids)
    if isinstance(prompt, IntrinsicPromptConfig):
        spec = projection_spec(prompt, config.seed, search_sigma(config.optimizer))
        intrinsic = IntrinsicPrompt(*make_projection(spec, table, excluded))
        return EmbeddedIntrinsicClassifier(
            scorer, tokenizer, table, config.head.template, labels, intrinsic, max_length, add_bos
        )
    assert isinstance(prompt, SoftPromptConfig)
    text_ids = tokenizer(prompt.init_text, add_special_tokens=False)["input_ids"] if prompt.init_text else []
    init = init_prompt_embeddings(
        table,
        prompt.num_tokens,
        prompt.init,
        generator=torch_generator(derive_seed(config.seed, "prompt-init")),
        text_ids=text_ids,
        excluded_ids=excluded,
        std=prompt.init_std,
    )
    return EmbeddedPromptClassifier(
        scorer, tokenizer, table, config.head.template, labels, SoftPrompt(init), max_length, add_bos
    )


def _embedding_table(source: str | Path, gguf_file: str | None) -> Any:
    try:
        return load_embedding_table(source, gguf_file)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(f"backbone.embeddings: could not read the input-embedding table: {exc}") from None


def _vllm_scorer(backbone: Any, hidden_size: int) -> VLLMScorer:
    assert isinstance(backbone, VLLMBackboneConfig)
    return VLLMScorer(
        endpoint_client(backbone),
        backbone.model,
        hidden_size,
        top_logprobs=backbone.top_logprobs,
        by_id=backbone.logprob_token_ids,
        dtype=backbone.dtype,
    )


def endpoint_client(endpoint: EndpointConfig) -> OpenAICompatibleClient:
    """The HTTP client of an endpoint section: its token from ``token_env``, its TLS files."""
    key = None
    if endpoint.token_env is not None:
        key = os.environ.get(endpoint.token_env, "").strip()
        if not key:
            raise ConfigError(
                f"backbone.token_env: the environment variable {endpoint.token_env} is empty or unset; put "
                "this party's API key in it (or remove token_env for a server that asks for none)"
            )
    settings = EndpointSettings(
        url=endpoint.url,
        api_key=key,
        timeout=endpoint.timeout,
        retries=endpoint.retries,
        backoff=endpoint.backoff,
        max_backoff=endpoint.max_backoff,
        max_wait=endpoint.max_wait,
        concurrency=endpoint.concurrency,
        tls=configured_tls(endpoint) if endpoint.url.startswith("https://") else None,
    )
    client = OpenAICompatibleClient(settings)
    _check_served_model(client, endpoint.model)
    return client


def _check_served_model(client: OpenAICompatibleClient, name: str) -> None:
    """ConfigError when the server lists its models (``/v1/models``) and ``name`` is not one of them;
    nothing when it does not list them (some hosted APIs do not)."""
    try:
        listed = client.get("/v1/models")
    except ServerError as exc:
        if "refused (401)" in str(exc) or "refused (403)" in str(exc):
            raise ConfigError(f"backbone.token_env: the server refused this party's key: {exc}") from None
        if "refused (" not in str(exc):
            raise  # unreachable, or failing: nothing would work
        log.info("the server lists no models (%s); backbone.model is not checked", exc)
        return
    data = listed.get("data") if isinstance(listed, dict) else None
    names = [item.get("id") for item in data or [] if isinstance(item, dict)]
    if names and name not in names:
        raise ConfigError(f"backbone.model: the server at {client.url} serves {names}, not {name!r}")


@contextmanager
def _model_checked(field_name: str) -> Iterator[None]:
    """Report a setting only the model could check (label words sharing a first token, an init
    phrase of no tokens) as a ConfigError on ``field_name``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{field_name}: {exc}") from exc
