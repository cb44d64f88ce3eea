"""Prompts for clients from different domains on a frozen CLIP: FedAPT's keyed context with an
adaptive network, and Fed-DPT's per-domain text prompts weighted by a visual prompt's attention.

Both classifiers train, on a client, the prompt of that client's domain, which the batch names
(``DOMAIN``, an index per example; read in training mode only), and score an image of unknown
domain at evaluation with weights over the domains that the image itself gives. Logits are CLIP's
scaled cosine similarities, as ``CLIPPromptClassifier``'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.base import Batch
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import ClassSetClassifier
from prompt_modules.clip_parts import checked_part_settings, part_param_groups
from prompt_modules.clip_text_context import (
    ClassPosition,
    TextContext,
    context_class_features,
    repeat_tokens,
    tokenize_classes,
)
from prompt_modules.visual_prompts import FrozenImage, VisualTokenPrompt, vpt_features

DOMAIN = "domain"
"""Batch key of each example's domain (int64 [B]): the key (FedAPT) or text prompt (Fed-DPT) it trains."""
Mixture = Literal["prompt", "features"]
MIXTURE_CHUNK = 8192
"""Most text-tower sequences of one pass when every image of a batch has its own prompts."""


def batch_domains(batch: Batch, count: int) -> torch.Tensor:
    """The batch's domain indices [B]; ValueError when it has none or one is out of 0..count-1."""
    if DOMAIN not in batch:
        raise ValueError(
            f"training a domain-aware prompt needs each example's domain (batch key {DOMAIN!r}), which "
            "the client's training data adds"
        )
    domains = batch[DOMAIN].reshape(-1).long()
    if len(domains) and (int(domains.min()) < 0 or int(domains.max()) >= count):
        raise ValueError(f"batch domains {sorted(set(domains.tolist()))} are not all in 0..{count - 1}")
    return domains


def keyed_contexts(context: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """FedAPT's prompt for each row of ``weights`` [N, K]: ctx + ctx ⊙ Σ_k w_k·k_k, [N, M, d] for a
    shared context [M, d] or [N, C, M, d] for a class-specific one [C, M, d] (keys [K, M, d]; a
    one-hot row gives one client's ctx + ctx ⊙ k_k)."""
    mixed = torch.einsum("nk,kmd->nmd", weights.to(keys.dtype), keys)
    if context.dim() == 3:
        mixed = mixed[:, None]
    return context + context * mixed


class _DomainClassifier(ClassSetClassifier):
    """What both classifiers share beyond the class set and the image side: the memo's version key
    and CLIP's logit scale."""

    def _version_key(self) -> tuple:
        return (
            self._classes,
            str(self.backbone.device),
            tuple((id(p), p._version) for p in self.parameters()),
        )

    def _scale(self, device: torch.device) -> torch.Tensor:
        return self.backbone.logit_scale.to(device)


class AdaptivePromptClassifier(_DomainClassifier):
    """FedAPT (Su et al., AAAI 2024; reference code leondada/FedAPT): owns the meta context
    ``text.context`` (a ``TextContext``: [M, d], or [C, M, d] class-specific as the reference), the
    adaptive network ``adaptive`` (a linear map, no bias, from CLIP's image features to one score
    per key) and K fixed keys ``keys`` [K, M, d] (a non-persistent buffer: made from the run seed,
    never sent).

    Training on the client of key k: the context is ctx + ctx ⊙ k_k (the same for every image), and
    ``domain_logits`` are a(f(x)), trained toward k. Evaluation, domain unknown: the image's weights
    w(x) = softmax(standardise(a(f(x))) / t) over the keys (standardised over the keys, temperature
    t: the reference's server model) give it its own context ctx + ctx ⊙ Σ_k w_k(x) k_k.

    ``mixture`` says how evaluation gets each image's class features: ``prompt`` runs the text tower
    on every image's own context (exact, as the reference: B·C sequences per batch); ``features``
    mixes the normalised class features of the K keyed contexts, computed once, by w(x) and
    normalises again. The text tower is not linear in its input, so ``features`` is not the
    method's output: it equals it when w(x) is one-hot (t → 0), and approximates it otherwise.
    """

    def __init__(
        self,
        backbone: OpenCLIPBackbone,
        text: TextContext,
        keys: torch.Tensor,
        class_names: Sequence[str],
        temperature: float = 0.01,
        mixture: Mixture = "prompt",
    ) -> None:
        super().__init__(backbone, class_names)
        if text.depth != 1:
            raise ValueError("FedAPT keys the input context only; use a context of depth 1")
        if keys.dim() != 3 or keys.shape[1:] != text.context.shape[-2:]:
            raise ValueError(
                f"keys are [K, M, d] with the context's M, d {tuple(text.context.shape[-2:])}; "
                f"got {tuple(keys.shape)}"
            )
        if temperature <= 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        if mixture not in ("prompt", "features"):
            raise ValueError(f"mixture is 'prompt' or 'features', got {mixture!r}")
        self.text = text
        self.image = FrozenImage()
        self.adaptive = nn.Linear(backbone.embed_dim, keys.shape[0], bias=False)
        self.register_buffer("keys", keys.clone(), persistent=False)
        self.temperature = temperature
        self.mixture: Mixture = mixture

    @property
    def num_keys(self) -> int:
        return self.keys.shape[0]

    def prompt_tensor_names(self) -> list[str]:
        """The meta context (the adaptive network is not a prompt)."""
        return [name for name in self.state_dict() if not name.startswith("adaptive.")]

    def domain_logits(self, batch: Batch) -> torch.Tensor:
        """a(f(x)) [B, K]: the adaptive network on the raw image features (trained with a
        cross-entropy toward the client's key)."""
        features = self.image.features(self.backbone, batch)
        return self.adaptive(features.to(self.adaptive.weight.dtype))

    def domain_weights(self, batch: Batch) -> torch.Tensor:
        """w(x) [B, K] = softmax(standardise(a(f(x))) / t), standardised over the keys (one key: 1)."""
        scores = self.domain_logits(batch).float()
        if self.num_keys == 1:
            return torch.ones_like(scores)
        standard = (scores - scores.mean(1, keepdim=True)) / scores.var(1, keepdim=True).sqrt().clamp_min(
            1e-12
        )
        return torch.softmax(standard / self.temperature, dim=1)

    def keyed_class_features(self, weights: torch.Tensor) -> torch.Tensor:
        """Normalised class features [N, C, D] under the prompt ``keyed_contexts`` gives each row of
        ``weights`` [N, K]."""
        contexts = keyed_contexts(self.text.context, self.keys, weights)
        count, classes = len(weights), len(self._classes)
        if contexts.dim() == 3:  # shared: one context per row, the same for every class
            contexts = contexts[:, None].expand(-1, classes, -1, -1)
        tokens = self.text.tokens_for(self.backbone, self._classes)
        features = context_class_features(
            self.backbone,
            repeat_tokens(tokens, count),
            contexts.reshape(count * classes, *contexts.shape[-2:]),
        )
        return F.normalize(features, dim=-1).reshape(count, classes, -1)

    def forward(self, batch: Batch) -> torch.Tensor:
        image = F.normalize(self.image.features(self.backbone, batch), dim=-1)
        if self.training:
            domains = batch_domains(batch, self.num_keys)
            used, inverse = domains.unique(return_inverse=True)
            one_hot = F.one_hot(used, self.num_keys).to(self.keys.dtype)
            classes = self.keyed_class_features(one_hot)[inverse.to(image.device)]
        elif self.mixture == "features":
            weights = self.domain_weights(batch)
            per_key = self._memo.get(
                self._version_key(),
                lambda: self.keyed_class_features(torch.eye(self.num_keys, device=image.device)),
            )
            classes = F.normalize(torch.einsum("bk,kcd->bcd", weights, per_key), dim=-1)
        else:
            weights = self.domain_weights(batch)
            step = max(1, MIXTURE_CHUNK // self.num_classes)
            classes = torch.cat(
                [self.keyed_class_features(weights[i : i + step]) for i in range(0, len(weights), step)]
            )
        return self._scale(image.device) * torch.einsum("bd,bcd->bc", image, classes)


class DomainContexts(nn.Module):
    """Owns one CoOp context per domain, ``context`` [D, M, d] (each shared by the classes), and
    the class prompts' tokens."""

    def __init__(self, context: torch.Tensor, class_position: ClassPosition = "end") -> None:
        super().__init__()
        if context.dim() != 3:
            raise ValueError(f"domain contexts are [D, M, d]; got shape {tuple(context.shape)}")
        self.context = nn.Parameter(context.clone())
        self.class_position = class_position
        self._tokens: dict[tuple, Any] = {}

    @property
    def num_domains(self) -> int:
        return self.context.shape[0]

    def features(
        self, backbone: OpenCLIPBackbone, names: Sequence[str], domains: torch.Tensor
    ) -> torch.Tensor:
        """Normalised class features [len(domains), C, D] of ``names`` under the contexts of ``domains``."""
        key = (tuple(names), str(backbone.device))
        if key not in self._tokens:
            self._tokens[key] = tokenize_classes(backbone, names, self.context.shape[1], self.class_position)
        count, classes = len(domains), len(names)
        rows = self.context[domains][:, None].expand(-1, classes, -1, -1)
        features = context_class_features(
            backbone, repeat_tokens(self._tokens[key], count), rows.reshape(count * classes, *rows.shape[-2:])
        )
        return F.normalize(features, dim=-1).reshape(count, classes, -1)


class DualPromptClassifier(_DomainClassifier):
    """Fed-DPT (Wei et al., "Dual Prompt Tuning for Domain-Aware Federated Learning"): owns one text
    prompt per domain (``text``, a ``DomainContexts``: [D, M, d]) and D visual prompt tokens
    (``image``, a ``VisualTokenPrompt`` of [1, D, d_vis]: the input is [CLS, P_1 … P_D, patches]
    from ``start_layer``, shallow).

    The image's weights over the domains are its class token's attention to the D visual tokens in
    the tower's last block (per head, renormalised over the D tokens; mean over heads). Logits:
    s · Σ_d w_d(x) · cos(f(x), g_{d,c}), f(x) the prompted image features and g_{d,c} class c's text
    features under domain d's prompt. In training, only the prompts of the batch's domains take
    gradients (the other domains' text features are constants); the weights and features are the
    same in training and at evaluation, where the domain is unknown.
    """

    def __init__(
        self,
        backbone: OpenCLIPBackbone,
        text: DomainContexts,
        image: VisualTokenPrompt,
        class_names: Sequence[str],
        part_settings: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        super().__init__(backbone, class_names)
        prompts = image.prompts
        if prompts.shape[0] != 1 or prompts.shape[1] != text.num_domains:
            raise ValueError(
                f"Fed-DPT's visual prompt is one token per domain in one layer, [1, {text.num_domains}, d]; "
                f"got {tuple(prompts.shape)}"
            )
        self._part_settings = checked_part_settings(part_settings, ("text", "image"))
        self.text = text
        self.image = image

    @property
    def num_domains(self) -> int:
        return self.text.num_domains

    def image_features_and_weights(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompted image features [B, D_emb] (normalised) and the domain weights w(x) [B, D]."""
        backbone, image = self.backbone, self.image
        hidden = (
            batch["image_tokens"] if "image_tokens" in batch else image.prepare(backbone, batch["pixels"])
        )
        last = backbone.num_vision_layers - 1
        seen: dict[str, torch.Tensor] = {}

        def observe(layer: int, x: torch.Tensor) -> None:
            if layer == last:
                seen["input"] = x

        features = vpt_features(
            backbone, hidden, image.start_layer, image.prompts, placement=image.placement, observe=observe
        )
        attention = backbone.vision_class_attention(last, seen["input"], slice(1, 1 + self.num_domains))
        return F.normalize(features, dim=-1), attention.mean(dim=1)

    def domain_class_features(self, trainable: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised class features [D, C, D_emb] of every domain's prompt; with gradients only
        for the domains of ``trainable`` (the others computed without, as constants)."""
        everyone = torch.arange(self.num_domains, device=self.text.context.device)
        if trainable is None or not torch.is_grad_enabled():
            return self._memo.get(
                self._version_key(), lambda: self.text.features(self.backbone, self._classes, everyone)
            )
        trained = trainable.unique()
        rest = everyone[~torch.isin(everyone, trained)]
        out = self.text.features(self.backbone, self._classes, trained)
        if len(rest):
            with torch.no_grad():
                frozen = self.text.features(self.backbone, self._classes, rest)
            order = torch.argsort(torch.cat([trained, rest]))
            out = torch.cat([out, frozen])[order]
        return out

    def forward(self, batch: Batch) -> torch.Tensor:
        image, weights = self.image_features_and_weights(batch)
        trainable = batch_domains(batch, self.num_domains) if self.training else None
        classes = self.domain_class_features(trainable)
        similarities = torch.einsum("be,kce->bkc", image, classes)
        return self._scale(image.device) * torch.einsum("bk,bkc->bc", weights, similarities)

    def param_groups(self) -> list[dict[str, Any]]:
        """One optimiser parameter group per side (text, image), with its settings."""
        return part_param_groups({"text": (self.text,), "image": (self.image,)}, self._part_settings)
