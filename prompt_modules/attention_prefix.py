"""Key/value prefixes in a Hugging Face model's self-attention (P-tuning v2, prefix tuning).

A prefix for layer ℓ is a pair (K_ℓ, V_ℓ) of shape [kv_heads, m, head_dim]: the layer's
self-attention attends over [K_ℓ; K(x)] and [V_ℓ; V(x)] instead of K(x) and V(x); queries,
the input sequence, its positions and everything outside attention are unchanged.

transformers 5 routes every attention of BERT-, GPT-2- and Llama-family models through one
pluggable attention function (``AttentionInterface``); ``attention_prefixes`` switches a model to
``PREFIX_ATTENTION`` for the duration of a forward pass. That function concatenates the prefix of
the calling module's layer (``module.layer_idx``) to its keys and values, widens the attention
mask to match (every query may attend every prefix slot), and runs PyTorch's scaled-dot-product
attention as transformers' ``sdpa`` does. Layers without a prefix run plain ``sdpa``.

(Neither transformers' ``Cache`` objects nor PEFT's prefix tuning do this for every family:
a cache shifts positions and gets one mask for all layers, so layers without a prefix cannot be
mixed with layers with one; and PEFT 0.21 refuses encoders under transformers 5, whose models
take ``cache`` instead of ``past_key_values``.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PREFIX_ATTENTION = "fedprompt_prefix"


@dataclass
class _Active:
    """What the attention function reads during one forward pass: each layer's prefix (keys, values),
    and, when ``capture`` is set, where it records each layer's own keys and values."""

    prefixes: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None)


_ACTIVE: ContextVar[_Active | None] = ContextVar("fedprompt_attention_prefixes", default=None)


def prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention over [prefix; keys] and [prefix; values] for prefixed layers."""
    active = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if active is None or getattr(module, "is_cross_attention", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer is None:
        raise RuntimeError(
            f"{type(module).__name__} has no layer_idx; key/value prefixes cannot find their layer"
        )
    if active.capture is not None:
        active.capture[layer] = (key.detach(), value.detach())
    prefix = active.prefixes.get(layer)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    keys, values = (p.to(key.dtype).expand(key.shape[0], -1, -1, -1) for p in prefix)
    if keys.shape[1] != key.shape[1] or keys.shape[3] != key.shape[3]:
        raise ValueError(
            f"layer {layer}'s prefix has {keys.shape[1]} heads of width {keys.shape[3]}; "
            f"the model's keys have {key.shape[1]} of width {key.shape[3]}"
        )
    mask = _widened_mask(attention_mask, module, query.shape[2], keys.shape[2], key.device)
    kwargs.pop("is_causal", None)  # the widened mask carries causality
    return sdpa_attention_forward(
        module, query, torch.cat([keys, key], 2), torch.cat([values, value], 2), mask, **kwargs
    )


def _widened_mask(
    mask: torch.Tensor | None, module: nn.Module, q_length: int, prefix_length: int, device: torch.device
) -> torch.Tensor | None:
    """The attention mask with ``prefix_length`` leading key columns every query may attend."""
    if mask is None:
        if not (getattr(module, "is_causal", True) and q_length > 1):
            return None  # bidirectional without padding: everything attends everything
        causal = torch.ones(q_length, q_length, dtype=torch.bool, device=device).tril()
        mask = causal.view(1, 1, q_length, q_length)
    if mask.dtype == torch.bool:
        ones = mask.new_ones(*mask.shape[:-1], prefix_length)
        return torch.cat([ones, mask], -1)
    return torch.cat([mask.new_zeros(*mask.shape[:-1], prefix_length), mask], -1)  # additive mask


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


@contextmanager
def _attention_active(model: nn.Module, active: _Active) -> Iterator[None]:
    config = model.config
    previous = config._attn_implementation
    token = _ACTIVE.set(active)
    config._attn_implementation = PREFIX_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.reset(token)


@contextmanager
def attention_prefixes(
    model: nn.Module, prefixes: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[None]:
    """Within the block, layer ℓ's self-attention attends ``prefixes[ℓ]`` (keys, values), each
    [kv_heads, m, head_dim], before the sequence; other layers are unchanged."""
    with _attention_active(model, _Active(dict(prefixes))):
        yield


@contextmanager
def captured_key_values(model: nn.Module) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, every self-attention records its keys and values [B, kv_heads, L, head_dim]
    (after rotary embeddings, as attention sees them) in the yielded dict, by layer."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with _attention_active(model, _Active({}, captured)):
        yield captured
