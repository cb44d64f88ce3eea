"""Visual question answering through a frozen CLIP: a prompted question and a prompted image make a
joint query, scored against each candidate answer's text features.

For image i, question q and candidate answer a (METHODS.md, medical VQA with CLIP prompts):

- q̂ = normalise(g([SOS] v_1 … v_M <question tokens> [EOS])): the text tower with M learned
  context vectors before the question (CoOp's layout, the question in the class name's place);
- î = normalise(image tower on i with its visual prompt): VPT tokens, a pixel patch, or none
  (frozen features, cached);
- f(i, q) = normalise(î + q̂) (``sum``), or normalise(î + q̂ + MLP([î, q̂, î ⊙ q̂])) (``mlp``, a
  small fusion whose output layer starts at zero, so training starts from the sum; the product
  term lets a yes/no answer depend on whether image and question agree, which a sum cannot);
- t_a = normalise(g([SOS] u_1 … u_K <answer tokens> . [EOS])) with a learned answer-side context,
  or the text features of a fixed template;
- logit_a = τ · cos(f(i, q), t_a), τ = CLIP's logit scale. A closed question scores only the
  closed answers (yes/no), an open one only the open answers; the others get ``MASKED``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.base import Batch, PromptModule
from prompt_modules.clip_backbone import OpenCLIPBackbone, constant_tensors
from prompt_modules.clip_parts import FeatureMemo, checked_part_settings, part_param_groups
from prompt_modules.visual_prompts import ImageInput

MASKED = -1.0e4
"""The logit of an answer a question may not take (finite: a loss stays finite)."""
PARTS = ("text", "image", "fusion")
PLACEHOLDER = "X"


def context_start(backbone: OpenCLIPBackbone) -> int:
    """Where the first context vector goes: the first position a text changes (after [SOS])."""
    empty, placeholder = backbone.tokenize(["", PLACEHOLDER])
    differs = (empty != placeholder).nonzero()
    return int(differs[0]) if len(differs) else 0


def tokenize_questions(
    backbone: OpenCLIPBackbone, questions: Sequence[str], num_context: int
) -> torch.Tensor:
    """Token ids [N, L] of ``X … X <question>`` (``num_context`` placeholders where the learned context
    goes), cut after the longest question's end-of-text token. A question too long for the text tower
    is cut by the tokenizer, which keeps the end-of-text token."""
    placeholder = " ".join([PLACEHOLDER] * num_context)
    ids = backbone.tokenize([f"{placeholder} {question}".strip() for question in questions])
    start = context_start(backbone)
    expected = backbone.tokenize([PLACEHOLDER])[0, start]
    if num_context and not bool((ids[:, start : start + num_context] == expected).all()):
        raise ValueError(
            f"the tokenizer of {backbone.name!r} does not give one token per context placeholder"
        )
    length = int(backbone.pooled_positions(ids).max()) + 1
    return ids[:, :length].cpu()


class QuestionContext(nn.Module):
    """Owns the learned context [M, d] that goes before every question's tokens."""

    def __init__(self, context: torch.Tensor) -> None:
        super().__init__()
        if context.dim() != 2:
            raise ValueError(f"question context is [M, d]; got shape {tuple(context.shape)}")
        self.context = nn.Parameter(context.clone())

    @property
    def num_tokens(self) -> int:
        return self.context.shape[0]

    def features(self, backbone: OpenCLIPBackbone, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Text features [B, D] of tokenised questions (``tokenize_questions``) with the context in."""
        embeddings = backbone.token_embeddings(ids)
        rows = self.context.to(embeddings.dtype).expand(ids.shape[0], -1, -1)
        x = torch.cat([embeddings[:, :start], rows, embeddings[:, start + self.num_tokens :]], dim=1)
        return backbone.text_features(x, ids)


class JointQuery(nn.Module):
    """Owns the fusion of normalised image and question features into one query (see the module):
    nothing for ``sum``; for ``mlp`` a two-layer MLP on [î, q̂, î ⊙ q̂] added to the sum."""

    def __init__(self, kind: Literal["sum", "mlp"], dim: int, hidden: int = 256) -> None:
        super().__init__()
        if kind not in ("sum", "mlp"):
            raise ValueError(f"fusion is 'sum' or 'mlp', got {kind!r}")
        self.kind = kind
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, image: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        query = image + question
        if self.kind == "mlp":
            query = query + self.mlp(torch.cat([image, question, image * question], dim=-1))
        return F.normalize(query, dim=-1)


class CLIPVQAModel(PromptModule):
    """Owns the prompts of CLIP-based VQA: ``question`` (a ``QuestionContext``), ``answer`` (a
    ``TextContext`` or ``FixedClassText``: anything with ``class_features(backbone, names)``),
    ``image`` (``FrozenImage``, ``VisualTokenPrompt`` or ``PixelPrompt``) and ``fusion`` (a
    ``JointQuery``); logits [B, A] over the answer vocabulary ``answers``.

    Closed questions are scored against ``closed_answers``, open ones against ``open_answers`` (the
    answers each kind of training question has). A batch holds the image side's input
    (``image_features``, ``image_tokens`` or ``pixels``), ``question_ids`` (``tokenize_questions``)
    and ``closed`` (bool [B]). The state_dict holds the prompt state alone (under ``question.``,
    ``answer.``, ``image.``, ``fusion.``); the candidate masks are non-persistent buffers.
    ``part_settings`` gives the parts text (question and answer), image and fusion their own
    optimiser settings, read through ``param_groups``.
    """

    def __init__(
        self,
        backbone: OpenCLIPBackbone,
        question: QuestionContext,
        answer: nn.Module,
        image: nn.Module,
        fusion: JointQuery,
        answers: Sequence[str],
        closed_answers: Sequence[str],
        open_answers: Sequence[str],
        part_settings: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        super().__init__(backbone)
        if not answers:
            raise ValueError("a VQA model needs at least one answer")
        unknown = sorted((set(closed_answers) | set(open_answers)) - set(answers))
        if unknown:
            raise ValueError(f"candidate answers {unknown} are not among the answers")
        self._part_settings = checked_part_settings(part_settings, PARTS)
        self.question = question
        self.answer = answer
        self.image = image
        self.fusion = fusion
        self._answers = tuple(answers)
        self.register_buffer("closed_candidates", _members(answers, closed_answers), persistent=False)
        self.register_buffer("open_candidates", _members(answers, open_answers), persistent=False)
        self._start = context_start(backbone)
        self._memo = FeatureMemo()

    @property
    def num_classes(self) -> int:
        return len(self._answers)

    @property
    def answers(self) -> tuple[str, ...]:
        return self._answers

    @property
    def image_input(self) -> ImageInput:
        """What the image side reads from a batch (and what is worth caching for it)."""
        return self.image.input

    @torch.no_grad()
    def prepare_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image side's input for preprocessed images: prompt-independent, so cacheable."""
        return self.image.prepare(self.backbone, pixels)

    def tokenize_questions(self, questions: Sequence[str]) -> torch.Tensor:
        with constant_tensors():
            return tokenize_questions(self.backbone, questions, self.question.num_tokens)

    @contextmanager
    def scoring(self, class_names: Sequence[str]) -> Iterator[None]:
        """Evaluation sets score the same answers (the server's evaluation asks through this)."""
        if tuple(class_names) != self._answers:
            raise ValueError("a VQA model scores its own answer vocabulary only")
        yield

    def answer_features(self) -> torch.Tensor:
        """Normalised text features [A, D] of the answers (reused while the prompt is unchanged and
        no gradient is taken)."""
        key = (str(self.backbone.device), tuple((id(p), p._version) for p in self.answer.parameters()))
        return self._memo.get(
            key, lambda: F.normalize(self.answer.class_features(self.backbone, self._answers), dim=-1)
        )

    def query(self, batch: Batch) -> torch.Tensor:
        """The joint queries f(i, q) [B, D] of a batch."""
        image = F.normalize(self.image.features(self.backbone, batch), dim=-1)
        question = F.normalize(
            self.question.features(self.backbone, batch["question_ids"], self._start), dim=-1
        )
        return self.fusion(image, question)

    def forward(self, batch: Batch) -> torch.Tensor:
        logits = (
            self.backbone.logit_scale.to(self.closed_candidates.device)
            * self.query(batch)
            @ self.answer_features().T
        )
        closed = batch["closed"].to(torch.bool)[:, None]
        allowed = torch.where(closed, self.closed_candidates[None], self.open_candidates[None])
        return logits.masked_fill(~allowed, MASKED)

    def prompt_tensor_names(self) -> list[str]:
        """The question and answer contexts and the visual prompt: everything but the fusion head."""
        return [name for name in self.state_dict() if not name.startswith("fusion.")]

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimiser parameter group per part with trainable parameters, with its settings."""
        members = {"text": (self.question, self.answer), "image": (self.image,), "fusion": (self.fusion,)}
        return part_param_groups(members, self._part_settings)


def _members(answers: Sequence[str], chosen: Sequence[str]) -> torch.Tensor:
    wanted = set(chosen)
    return torch.tensor([answer in wanted for answer in answers], dtype=torch.bool)
