"""FedTPG's prompt generator: a small network that writes CoOp context from the class names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prompt_modules.clip_backbone import OpenCLIPBackbone, constant_tensors
from prompt_modules.clip_text_context import ClassTokens, context_class_features, tokenize_classes


class _GEGLUFeedForward(nn.Module):
    """LayerNorm, Linear to 2·mult·d, GEGLU (x · GELU(gate)), Linear back to d."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, dim * mult * 2)
        self.down = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(value * F.gelu(gate))


class _SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mult: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.feed_forward = _GEGLUFeedForward(dim, mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.feed_forward(x)


class PromptGenerator(nn.Module):
    """Owns FedTPG's prompt-generation network; its weights are the whole trainable state.

    For a class set with frozen, normalised text features T [C, D] of ``template`` filled with
    each class name (the bare names by default, as FedTPG's code does), M learned queries
    Q [M, d_text] attend over T: x = CrossAttention(LN(Q), LN(T)) (``heads`` heads, keys and
    values of size D), then x ← x + FF(x) with a GEGLU feed-forward of width ``ff_mult``·d_text,
    then ``self_attention_layers`` optional self-attention blocks. x [M, d_text] is the CoOp
    context of every class of that set, so the generator writes context for class names it never
    saw in training. T is constant for a class set: it is computed once.
    """

    def __init__(
        self,
        num_tokens: int,
        text_width: int,
        embed_dim: int,
        heads: int = 4,
        ff_mult: int = 4,
        self_attention_layers: int = 0,
        template: str = "{}",
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if text_width % heads:
            raise ValueError(f"the text width {text_width} is not divisible by {heads} heads")
        if template.count("{}") != 1:
            raise ValueError(f"a class template needs '{{}}' exactly once, got {template!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.queries = nn.Parameter(torch.randn(num_tokens, text_width) * init_std)
            self.query_norm = nn.LayerNorm(text_width)
            self.name_norm = nn.LayerNorm(embed_dim)
            self.cross_attention = nn.MultiheadAttention(
                text_width, heads, kdim=embed_dim, vdim=embed_dim, batch_first=True
            )
            self.feed_forward = _GEGLUFeedForward(text_width, ff_mult)
            self.self_attention = nn.ModuleList(
                _SelfAttentionLayer(text_width, heads, ff_mult) for _ in range(self_attention_layers)
            )
        self.template = template
        self._names: dict[tuple, tuple[torch.Tensor, ClassTokens]] = {}

    @property
    def num_tokens(self) -> int:
        return self.queries.shape[0]

    def context(self, name_features: torch.Tensor) -> torch.Tensor:
        """Context vectors [M, d_text] for a class set with text features ``name_features`` [C, D]."""
        names = self.name_norm(name_features.to(self.queries.dtype)).unsqueeze(0)
        x = self.cross_attention(
            self.query_norm(self.queries).unsqueeze(0), names, names, need_weights=False
        )[0]
        x = x + self.feed_forward(x)
        for layer in self.self_attention:
            x = layer(x)
        return x[0]

    def class_inputs(
        self, backbone: OpenCLIPBackbone, names: Sequence[str]
    ) -> tuple[torch.Tensor, ClassTokens]:
        """The constant inputs of a class set: normalised name features T and tokenised class prompts."""
        key = (tuple(names), str(backbone.device))
        if key not in self._names:
            with constant_tensors():
                features = F.normalize(backbone.encode_text([self.template.format(n) for n in names]), dim=-1)
            self._names[key] = (features, tokenize_classes(backbone, names, self.num_tokens))
        return self._names[key]

    def class_features(
        self, backbone: OpenCLIPBackbone, names: Sequence[str], full_length: bool = False
    ) -> torch.Tensor:
        """Text features [C, D] of the classes ``names`` under the context generated for them."""
        features, tokens = self.class_inputs(backbone, names)
        return context_class_features(
            backbone, tokens, self.context(features.to(self.queries.device)), None, full_length
        )
