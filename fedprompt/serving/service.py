"""The inference service behind ``fedprompt serve``, without HTTP: checks, compute, usage counters.

It owns one frozen backbone: a transformers model, or a GGUF model run by llama.cpp (the second
engine, ``LlamaCppBackbone``: verbaliser heads only). For each (projection, head) pair that clients
ask for it builds an ``IntrinsicTextClassifier`` (or ``LlamaCppIntrinsicClassifier``) once and keeps
the ``cache_size`` most recently used. Building one draws the projection A (m·h × d fp32, from the
projection seed on a CPU generator, then moved to the backbone's device) and p0; A is the only large
part, so the projections held never take more than ``cache_size × max_projection_floats × 4`` bytes
(the defaults: 4 × 32 Mi floats, 512 MiB; BBT's 50 tokens × 1,024 wide × d = 500 is 25.6 M floats,
102 MB). A request is checked against the model, the limits and the client's query quota before any
compute; a check that fails raises ``RequestError`` naming the field (``QuotaExhausted`` for the
quota). Building a projection counts its floats to the client that asked, within its projection
quota. The model computes for one request at a time, the turns handed round-robin between clients,
each with a bounded number of requests admitted (``fedprompt.serving.turns``), so one greedy token
cannot starve the others. No method returns a weight or a gradient: only logits, losses and counts.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedprompt.errors import ConfigError
from fedprompt.serving.turns import FairTurns
from prompt_modules.heads import SimilarityHeadSpec, VerbalizerHeadSpec, build_head
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier, ProjectionSpec
from prompt_modules.llama_cpp_backbone import LlamaCppBackbone, LlamaCppIntrinsicClassifier
from prompt_modules.remote import tokenizer_fingerprint
from prompt_modules.remote_schema import (
    LogitsRequest,
    LogitsResponse,
    LossRequest,
    LossResponse,
    ServiceInfo,
    Usage,
)
from prompt_modules.text_classifier import pad_right

PopulationClassifier = IntrinsicTextClassifier | LlamaCppIntrinsicClassifier
"""What the service scores candidates with: transformers' classifier, or llama.cpp's (``--engine``)."""


class RequestError(ValueError):
    """A request the service will not run; the message names the field and the limit or fix."""


class QuotaExhausted(RequestError):
    """A request that would take its client over its query quota (refused whole, nothing counted)."""


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for, and how many classifiers the service keeps built."""

    max_candidates: int = 64
    max_examples: int = 256
    max_queries: int = 8192
    max_request_bytes: int = 4 * 2**20
    max_projection_floats: int = 32 * 2**20
    cache_size: int = 4
    max_pending: int = 4
    """Requests of one client admitted at once (computing or waiting for the model); more: 429."""

    def __post_init__(self) -> None:
        bad = {name: value for name, value in vars(self).items() if value < 1}
        if bad:
            raise ConfigError(f"service limits must be positive, got {bad}")


DEFAULT_QUERY_QUOTA = 10_000_000
"""Model queries a client may use while the service runs, unless told otherwise (FedBPT's reference
run, 200 rounds of 8 generations of 5 candidates on 32 examples, is 256,000 per client)."""
DEFAULT_PROJECTION_QUOTA = 2**30
"""Floats of projections a client may have the service draw while it runs, unless told otherwise
(BBT's 50 tokens × 1,024 wide × d = 500 is 25.6 M floats: about 40 such builds)."""


@dataclass(frozen=True)
class QueryQuotas:
    """Total model queries each client may use while the service runs: ``per_client`` by name,
    else ``default`` (None: no quota, asked for by name); and the floats of projections the service
    may draw for each client (``projection_floats``; None: no limit), since building a projection
    costs compute in proportion to its size whoever asks."""

    default: int | None = DEFAULT_QUERY_QUOTA
    per_client: Mapping[str, int] = field(default_factory=dict)
    projection_floats: int | None = DEFAULT_PROJECTION_QUOTA

    def __post_init__(self) -> None:
        given = {"default": self.default} if self.default is not None else {}
        if self.projection_floats is not None:
            given["projection_floats"] = self.projection_floats
        bad = {name: q for name, q in {**given, **self.per_client}.items() if q < 1}
        if bad:
            raise ConfigError(f"query quotas must be positive, got {bad}")

    @classmethod
    def from_options(
        cls, default: int, items: Sequence[str], projection_floats: int = DEFAULT_PROJECTION_QUOTA
    ) -> QueryQuotas:
        """From ``--query-quota`` (0: none), ``--client-quota NAME=QUERIES`` items and
        ``--projection-quota`` (0: none); ConfigError naming a bad one."""
        per_client: dict[str, int] = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or not value.strip().isdigit():
                raise ConfigError(f"--client-quota {item!r} is not NAME=QUERIES (e.g. site-0=200000)")
            per_client[name] = int(value)
        return cls(default or None, per_client, projection_floats or None)

    def of(self, client: str) -> int | None:
        return self.per_client.get(client, self.default)


class InferenceService:
    """Owns a frozen backbone, the classifiers built on it for clients' specs (LRU), the limits,
    each client's query quota and usage (requests, queries = candidates × inputs, candidates,
    inputs, projection floats drawn for it), and the usage file it keeps current when given one.
    Thread-safe: one forward pass at a time, handed fairly between clients (:class:`FairTurns`:
    round-robin, at most ``limits.max_pending`` requests per client admitted); quota checks and
    counts are atomic."""

    def __init__(
        self,
        backbone: HFTextBackbone | LlamaCppBackbone,
        model_name: str,
        limits: ServiceLimits | None = None,
        chunk_size: int = 10,
        quotas: QueryQuotas | None = None,
        usage_file: Path | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.backbone = backbone
        self.limits = limits or ServiceLimits()
        self.chunk_size = chunk_size
        self.quotas = quotas or QueryQuotas()
        self.usage_file = usage_file
        self.info = ServiceInfo(
            model=model_name,
            hidden_size=backbone.hidden_size,
            vocab_size=backbone.embedding_matrix.shape[0],
            max_length=backbone.max_length,
            is_decoder=backbone.is_decoder,
            has_lm_head=backbone.has_lm_head,
            tokenizer_sha256=tokenizer_fingerprint(backbone.tokenizer),
            backbone_bytes=backbone.num_bytes(),
            max_candidates=self.limits.max_candidates,
            max_examples=self.limits.max_examples,
            max_queries=self.limits.max_queries,
            max_request_bytes=self.limits.max_request_bytes,
            max_projection_floats=self.limits.max_projection_floats,
        )
        self._classifiers: OrderedDict[tuple, PopulationClassifier] = OrderedDict()
        self._usage: dict[str, Usage] = {}
        self._reserved: dict[str, int] = {}
        self.turns = FairTurns(self.limits.max_pending)
        self._counters = threading.Lock()

    def logits(self, client: str, request: LogitsRequest) -> LogitsResponse:
        """Class logits [P][B][C] of the request's inputs under each candidate."""
        candidates, batch = self._checked(request)
        logits = self._scored(client, request, lambda model: model.population_logits(candidates, batch))
        return LogitsResponse(
            logits=logits.float().cpu().tolist(), queries=len(request.z) * len(request.input_ids)
        )

    def losses(self, client: str, request: LossRequest) -> LossResponse:
        """Mean cross-entropy [P] of each candidate on the request's labelled inputs."""
        candidates, batch = self._checked(request)
        classes = request.head.num_classes
        if len(request.labels) != len(request.input_ids):
            raise RequestError(
                f"labels has {len(request.labels)} entries for {len(request.input_ids)} inputs"
            )
        for i, label in enumerate(request.labels):
            if label >= classes:
                raise RequestError(
                    f"labels[{i}] is {label}; the head has {classes} classes (0..{classes - 1})"
                )
        batch["labels"] = torch.tensor(request.labels, dtype=torch.long, device=self.backbone.device)
        losses = self._scored(client, request, lambda model: model.population_losses(candidates, batch))
        return LossResponse(
            losses=losses.float().cpu().tolist(), queries=len(request.z) * len(request.input_ids)
        )

    def usage(self, client: str) -> Usage:
        """One client's counters (zeros before its first request) and its quota."""
        with self._counters:
            return self._usage.get(client) or self._zero_usage(client)

    def all_usage(self) -> dict[str, Usage]:
        """Every client's counters that has sent a counted request, by client name."""
        with self._counters:
            return dict(sorted(self._usage.items()))

    def record_transfer(self, client: str, received: int, sent: int) -> None:
        """Count the bytes of an answered request's body (``received``) and its answer (``sent``)."""
        with self._counters:
            base = self._usage.get(client) or self._zero_usage(client)
            totals = {"bytes_received": base.bytes_received + received, "bytes_sent": base.bytes_sent + sent}
            self._usage[client] = base.model_copy(update=totals)
            self._write_usage()

    def _zero_usage(self, client: str) -> Usage:
        return Usage(
            client=client, requests=0, queries=0, candidates=0, examples=0, query_quota=self.quotas.of(client)
        )

    def _write_usage(self) -> None:
        """Replace the usage file (if any) by every client's counters. Call with the counters lock held."""
        if self.usage_file is not None:
            _write_json(self.usage_file, {n: u.model_dump() for n, u in sorted(self._usage.items())})

    def _scored(
        self,
        client: str,
        request: LogitsRequest,
        compute: Callable[[PopulationClassifier], torch.Tensor],
    ) -> torch.Tensor:
        """Run ``compute`` on the request's classifier within the client's quota, count its queries
        (once computed, whatever follows), and refuse outputs that are not finite."""
        candidates, examples = len(request.z), len(request.input_ids)
        self._reserve(client, candidates * examples)
        try:
            with self.turns.turn(client):
                out = compute(self._classifier(client, request.projection, request.head))
        except BaseException:
            self._reserve(client, -candidates * examples)
            raise
        self._count(client, candidates, examples)
        finite = torch.isfinite(out.reshape(candidates, -1)).all(dim=1)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            raise RequestError(
                f"z[{first}] gives non-finite outputs: its values are too large for the model "
                "(the queries were computed and are counted)"
            )
        return out

    def _reserve(self, client: str, queries: int) -> None:
        """Hold ``queries`` of the client's quota for a request in progress (negative: give them back);
        ``QuotaExhausted`` when they do not fit."""
        with self._counters:
            pending = self._reserved.get(client, 0)
            quota = self.quotas.of(client)
            if queries > 0 and quota is not None:
                used = (self._usage.get(client) or self._zero_usage(client)).queries
                if used + pending + queries > quota:
                    raise QuotaExhausted(
                        f"client {client!r} has used {used} of its {quota} queries"
                        + (f" ({pending} more in requests in progress)" if pending else "")
                        + f"; this request needs {queries}: the query quota is exhausted"
                    )
            self._reserved[client] = pending + queries

    def _count(self, client: str, candidates: int, examples: int) -> None:
        """Move a computed request's queries from reserved to used, and update the usage file."""
        with self._counters:
            self._reserved[client] -= candidates * examples
            base = self._usage.get(client) or self._zero_usage(client)
            self._usage[client] = base.model_copy(
                update={
                    "requests": base.requests + 1,
                    "queries": base.queries + candidates * examples,
                    "candidates": base.candidates + candidates,
                    "examples": base.examples + examples,
                }
            )
            self._write_usage()

    def _count_projection(self, client: str, floats: int) -> None:
        """Count a projection build of ``floats`` to ``client``; ``QuotaExhausted`` beyond its quota."""
        quota = self.quotas.projection_floats
        with self._counters:
            base = self._usage.get(client) or self._zero_usage(client)
            if quota is not None and base.projection_floats + floats > quota:
                raise QuotaExhausted(
                    f"client {client!r} has had {base.projection_floats} projection floats drawn of its "
                    f"{quota}; this projection needs {floats}: the projection quota is exhausted (reuse a "
                    "projection seed, or ask the service's operator for --projection-quota)"
                )
            self._usage[client] = base.model_copy(
                update={"projection_floats": base.projection_floats + floats}
            )
            self._write_usage()

    def _checked(self, request: LogitsRequest) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The candidates [P, d] and the padded batch, after every check against model and limits."""
        limits, info, spec = self.limits, self.info, request.projection
        count, rows = len(request.z), len(request.input_ids)
        if count > limits.max_candidates:
            raise RequestError(
                f"z holds {count} candidates; the limit is {limits.max_candidates} per request"
            )
        if rows > limits.max_examples:
            raise RequestError(
                f"input_ids holds {rows} inputs; the limit is {limits.max_examples} per request"
            )
        if count * rows > limits.max_queries:
            raise RequestError(
                f"{count} candidates × {rows} inputs = {count * rows} queries; the limit is "
                f"{limits.max_queries} per request: split it"
            )
        floats = spec.num_tokens * info.hidden_size * spec.dim
        if floats > limits.max_projection_floats:
            raise RequestError(
                f"projection num_tokens {spec.num_tokens} × hidden {info.hidden_size} × dim {spec.dim} = "
                f"{floats} floats; the limit is {limits.max_projection_floats} "
                "(the service's --max-projection-floats)"
            )
        for i, row in enumerate(request.z):
            if len(row) != spec.dim:
                raise RequestError(f"z[{i}] has {len(row)} values; projection.dim is {spec.dim}")
        for i, ids in enumerate(request.input_ids):
            if not 1 <= len(ids) <= info.max_length:
                raise RequestError(
                    f"input_ids[{i}] has {len(ids)} tokens; the model takes 1 to {info.max_length}"
                )
            top = max(ids)
            if top >= info.vocab_size:
                raise RequestError(
                    f"input_ids[{i}] holds token id {top}; the vocabulary has ids 0..{info.vocab_size - 1}"
                )
        if isinstance(request.head, VerbalizerHeadSpec):
            self._check_verbalizer_inputs(request.input_ids)
        device = self.backbone.device
        ids, mask = pad_right(request.input_ids, self.backbone.tokenizer.pad_token_id)
        candidates = torch.tensor(request.z, dtype=torch.float32)
        return candidates, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def _check_verbalizer_inputs(self, input_ids: list[list[int]]) -> None:
        """A verbaliser needs the LM head, and a masked-LM one a [MASK] token in every input."""
        if not self.info.has_lm_head:
            raise RequestError(
                "head.kind verbalizer needs a language-model head; this service was started without one "
                "(fedprompt serve --lm-head)"
            )
        if self.backbone.is_decoder:
            return
        mask_id = self.backbone.tokenizer.mask_token_id
        for i, ids in enumerate(input_ids):
            if mask_id not in ids:
                raise RequestError(
                    f"input_ids[{i}] has no mask token (id {mask_id}); a masked-LM verbaliser reads its "
                    "prediction there: keep [MASK] in the template and the inputs within max_length"
                )

    def _classifier(
        self, client: str, projection: ProjectionSpec, head: SimilarityHeadSpec | VerbalizerHeadSpec
    ) -> PopulationClassifier:
        """The classifier for a (projection, head) pair, built on first use (its projection's floats
        counted to ``client``, within its projection quota); least recently used ones are dropped
        beyond ``cache_size``. Call in a compute turn."""
        key = (projection, head)
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        llama = isinstance(self.backbone, LlamaCppBackbone)
        if llama and not isinstance(head, VerbalizerHeadSpec):
            raise RequestError(
                "head: this service runs the llama-cpp engine, which scores label words; use head.kind "
                "verbalizer"
            )
        self._count_projection(client, projection.num_tokens * self.info.hidden_size * projection.dim)
        try:
            built = build_head(self.backbone, head)
        except ValueError as exc:
            raise RequestError(f"head: {exc}") from None
        # The client applied its template before tokenising; this one only marks where a masked-LM
        # verbaliser reads its prediction ([MASK]), which every input must then contain.
        masked = isinstance(head, VerbalizerHeadSpec) and not self.backbone.is_decoder
        template = "{text}[MASK]" if masked else "{text}"
        prompt = IntrinsicPrompt.from_backbone(self.backbone, projection).to(self.backbone.device)
        if llama:
            classifier: PopulationClassifier = LlamaCppIntrinsicClassifier(self.backbone, prompt, built)
        else:
            classifier = IntrinsicTextClassifier(self.backbone, prompt, built, template, self.chunk_size)
        classifier.to(self.backbone.device).eval()
        self._classifiers[key] = classifier
        while len(self._classifiers) > self.limits.cache_size:
            self._classifiers.popitem(last=False)
        return classifier


def _write_json(path: Path, data: object) -> None:
    """Replace ``path`` by ``data`` as JSON atomically (a reader sees the old file or the new one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
