"""The inference service behind ``fedprompt serve``, without HTTP: checks, compute, usage counters.

It owns one frozen backbone. For each (projection, head) pair that clients ask for it builds an
``IntrinsicTextClassifier`` once (A, p0 from the projection seed; the head from its spec) and
keeps the most recent few. A request is checked against the model and the limits before any
compute; a check that fails raises ``RequestError`` naming the field. No method returns a weight
or a gradient: only logits, losses and counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prompt_modules.heads import SimilarityHeadSpec, VerbalizerHeadSpec, build_head
from prompt_modules.hf_text import HFTextBackbone
from prompt_modules.intrinsic import IntrinsicPrompt, IntrinsicTextClassifier, ProjectionSpec
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


class RequestError(ValueError):
    """A request the service will not run; the message names the field and the limit or fix."""


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for, and how many classifiers the service keeps built."""

    max_candidates: int = 64
    max_examples: int = 256
    max_queries: int = 8192
    max_request_bytes: int = 4 * 2**20
    max_projection_floats: int = 16 * 2**20
    cache_size: int = 4

    def __post_init__(self) -> None:
        bad = {name: value for name, value in vars(self).items() if value < 1}
        if bad:
            raise ValueError(f"service limits must be positive, got {bad}")


class InferenceService:
    """Owns a frozen backbone, the classifiers built on it for clients' specs (LRU), the limits,
    and each client's usage (requests, queries = candidates × inputs, candidates, inputs).
    Thread-safe: one forward pass at a time."""

    def __init__(
        self,
        backbone: HFTextBackbone,
        model_name: str,
        limits: ServiceLimits | None = None,
        chunk_size: int = 10,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.backbone = backbone
        self.limits = limits or ServiceLimits()
        self.chunk_size = chunk_size
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
        )
        self._classifiers: OrderedDict[tuple, IntrinsicTextClassifier] = OrderedDict()
        self._usage: dict[str, Usage] = {}
        self._compute = threading.Lock()
        self._counters = threading.Lock()

    def logits(self, client: str, request: LogitsRequest) -> LogitsResponse:
        """Class logits [P][B][C] of the request's inputs under each candidate."""
        candidates, batch = self._checked(request)
        with self._compute:
            logits = self._classifier(request.projection, request.head).population_logits(candidates, batch)
        self._count(client, len(request.z), len(request.input_ids))
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
        with self._compute:
            losses = self._classifier(request.projection, request.head).population_losses(candidates, batch)
        self._count(client, len(request.z), len(request.input_ids))
        return LossResponse(
            losses=losses.float().cpu().tolist(), queries=len(request.z) * len(request.input_ids)
        )

    def usage(self, client: str) -> Usage:
        """One client's counters (zeros before its first request)."""
        with self._counters:
            return self._usage.get(
                client, Usage(client=client, requests=0, queries=0, candidates=0, examples=0)
            )

    def _count(self, client: str, candidates: int, examples: int) -> None:
        with self._counters:
            base = self._usage.get(client) or Usage(
                client=client, requests=0, queries=0, candidates=0, examples=0
            )
            self._usage[client] = Usage(
                client=client,
                requests=base.requests + 1,
                queries=base.queries + candidates * examples,
                candidates=base.candidates + candidates,
                examples=base.examples + examples,
            )

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
                f"{floats} floats; the limit is {limits.max_projection_floats}"
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
        self, projection: ProjectionSpec, head: SimilarityHeadSpec | VerbalizerHeadSpec
    ) -> IntrinsicTextClassifier:
        """The classifier for a (projection, head) pair, built on first use; least recently used
        ones are dropped beyond ``cache_size``. Call with the compute lock held."""
        key = (projection, head)
        if key in self._classifiers:
            self._classifiers.move_to_end(key)
            return self._classifiers[key]
        try:
            built = build_head(self.backbone, head)
        except ValueError as exc:
            raise RequestError(f"head: {exc}") from None
        # The client applied its template before tokenising; this one only marks where a masked-LM
        # verbaliser reads its prediction ([MASK]), which every input must then contain.
        masked = isinstance(head, VerbalizerHeadSpec) and not self.backbone.is_decoder
        template = "{text}[MASK]" if masked else "{text}"
        prompt = IntrinsicPrompt.from_backbone(self.backbone, projection).to(self.backbone.device)
        classifier = IntrinsicTextClassifier(self.backbone, prompt, built, template, self.chunk_size)
        classifier.to(self.backbone.device).eval()
        self._classifiers[key] = classifier
        while len(self._classifiers) > self.limits.cache_size:
            self._classifiers.popitem(last=False)
        return classifier
