"""A frozen open_clip CLIP model and the seams prompts plug into, without copying its model code."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from prompt_modules.hf_text import BackboneLoadError

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]
"""Called before each transformer block with (layer index, hidden states [B, T, d]); returns the
hidden states the block sees. Deep prompts use it to insert or overwrite their positions."""

PRECISIONS = ("fp32", "fp16", "bf16")
_INDEX_POOLS = ("argmax", "eos")


class OpenCLIPBackbone:
    """Owns one frozen open_clip CLIP model, its tokenizer and its evaluation image transform.

    Every parameter has ``requires_grad=False`` and the model stays in eval mode. Like
    ``HFTextBackbone`` it is not an ``nn.Module``: prompt modules hold it by reference, so their
    state_dict is the prompt alone. The seams:

    - text tower: ``tokenize``, ``token_embeddings`` (the token lookup), ``text_features`` (the
      text transformer with its attention mask and end-of-text pooling, then the projection; a
      ``LayerHook`` lets deep prompts reach every block). When the tower is causal and pools at
      the end-of-text token (``short_text``), the pass runs only up to the longest end-of-text
      position: no later token can change the pooled output.
    - vision tower: ``encode_image`` (the whole tower), and for ViT towers ``image_embeddings``
      (patch embedding, class token, positional embedding, pre-norm), ``vision_pre_norm`` (that
      pre-norm alone), ``vision_layers`` (a slice of
      the block stack, with a ``LayerHook``) and ``image_head`` (the tower's pooling and projection).
    - ``logit_scale`` (exp of CLIP's learned scale) and ``logit_bias`` (SigLIP-style models only).
    """

    def __init__(
        self, model: nn.Module, preprocess: Callable, tokenizer: Any, name: str, weights: str
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.weights = weights
        self._text = _text_tower(model, name)
        visual = model.visual
        self.is_vit = isinstance(visual, VisionTransformer) and all(
            hasattr(visual, attr) for attr in ("_embeds", "_pool")
        )
        self.short_text = self._text["pool_type"] in _INDEX_POOLS and _is_causal(self._text["attn_mask"])

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model_name: str,
        pretrained: str | None,
        *,
        precision: str = "fp32",
        image_size: int | None = None,
        seed: int = 0,
    ) -> OpenCLIPBackbone:
        """Build an open_clip model and load its weights once.

        ``model_name``: an open_clip model name (``ViT-B-32``) or a path to an open_clip model
        config ``.json`` file (registered with open_clip under the file's stem). ``pretrained``: an
        open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``), a local checkpoint file
        (``.safetensors``, ``.bin``, ``.pt``), or None for seeded random weights (tests, timing).
        Raises BackboneLoadError naming the model, the tag and how to give a local file.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        name = register_model_config(model_name)
        if name not in open_clip.list_models():
            raise BackboneLoadError(
                f"open_clip has no model {name!r}; use one of open_clip.list_models() "
                f"(e.g. ViT-B-32, ViT-B-16) or a path to an open_clip model config .json file"
            )
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
        if pretrained and not tag_cfg and not Path(pretrained).expanduser().is_file():
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneLoadError(
                f"pretrained={pretrained!r} is neither a pretrained tag of open_clip model {name!r} "
                f"(its tags: {tags}) nor an existing checkpoint file; give a tag or the path of a local "
                "checkpoint file (.safetensors, .bin or .pt)"
            )
        source = str(Path(pretrained).expanduser()) if pretrained and not tag_cfg else pretrained
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name,
                    pretrained=source,
                    precision=precision,
                    device="cpu",
                    force_image_size=image_size,
                    force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                )
        except Exception as exc:  # open_clip raises RuntimeError, OSError or hub errors: say what to do
            raise BackboneLoadError(
                f"could not load open_clip model {name!r} with pretrained={pretrained!r}: {exc}\n"
                "Without network access, download the checkpoint once where there is (e.g. "
                f"open_clip.create_model({name!r}, pretrained={pretrained!r}) fills the Hugging Face "
                "cache, which HF_HUB_OFFLINE=1 then reads), or save it as a file and set "
                "backbone.pretrained to that file's path (.safetensors, .bin or .pt)."
            ) from exc
        weights = _weights_id(pretrained, source, tag_cfg, seed)
        return cls(model, preprocess, open_clip.get_tokenizer(name), name, weights)

    # ------------------------------------------------------------------ facts

    @property
    def device(self) -> torch.device:
        return self._text["token_embedding"].weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the text tower computes in (open_clip's cast dtype: bf16/fp16 under that precision)."""
        return self._text["blocks"][0].get_weight_dtype()

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype of the image tower's input and blocks."""
        visual = self.model.visual
        conv = getattr(visual, "conv1", None)
        return conv.weight.dtype if conv is not None else next(visual.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        """Size of the joint image-text feature space (the text projection's output)."""
        projection = self._text["projection"]
        if projection is None:
            return self.text_width
        return projection.out_features if isinstance(projection, nn.Linear) else int(projection.shape[1])

    @property
    def text_width(self) -> int:
        return self._text["token_embedding"].embedding_dim

    @property
    def context_length(self) -> int:
        return int(self._text["positional_embedding"].shape[0])

    @property
    def num_text_layers(self) -> int:
        return len(self._text["blocks"])

    @property
    def vision_width(self) -> int:
        self._require_vit("VPT prompts")
        return int(self.model.visual.class_embedding.shape[0])

    @property
    def num_vision_layers(self) -> int:
        self._require_vit("VPT prompts")
        return len(self.model.visual.transformer.resblocks)

    @property
    def patch_size(self) -> tuple[int, int]:
        self._require_vit("VPT prompts")
        return tuple(self.model.visual.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """Height and width of the preprocessed images the tower takes."""
        size = open_clip.get_model_preprocess_cfg(self.model)["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def token_embedding_matrix(self) -> torch.Tensor:
        return self._text["token_embedding"].weight

    @property
    def special_token_ids(self) -> list[int]:
        return [int(i) for i in getattr(self.tokenizer, "all_special_ids", [])]

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().float()

    @property
    def logit_bias(self) -> torch.Tensor | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else bias.detach().float()

    def num_bytes(self) -> int:
        """Bytes of every parameter and buffer of the model (what a prompt never sends)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def to(self, device: torch.device | str) -> OpenCLIPBackbone:
        self.model.to(device)
        return self

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images as the model's input [B, 3, H, W], through its own evaluation transform (RGB)."""
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    # ------------------------------------------------------------------ text seams

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] with start and end-of-text tokens, zero-padded."""
        with constant_tensors():
            return self.tokenizer(list(texts)).to(self.device)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The token lookup of the text tower, before positional embeddings: [N, L, d_text]."""
        return self._text["token_embedding"](ids)

    def pooled_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Per row, the position the text tower pools at (the end-of-text token)."""
        pool = self._text["pool_type"]
        if pool == "argmax":
            return ids.argmax(dim=-1)
        if pool == "eos":
            return (ids == self._text["eos_id"]).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)

    def text_features(
        self,
        embeddings: torch.Tensor,
        ids: torch.Tensor,
        layer_hook: LayerHook | None = None,
        full_length: bool = False,
    ) -> torch.Tensor:
        """Projected text features [N, D] for token embeddings [N, L, d] (prompt vectors already in).

        ``ids`` [N, L] are the token ids the embeddings stand for (they locate the pooled token).
        With ``short_text`` and not ``full_length``, the pass is cut after the last end-of-text
        position, with positional embeddings and the causal mask sliced to match: the same output.
        """
        tower = self._text
        positions = self.pooled_positions(ids)
        length = embeddings.shape[1]
        if self.short_text and not full_length:
            length = int(positions.max()) + 1
        x = embeddings[:, :length].to(self.dtype) + tower["positional_embedding"][:length].to(self.dtype)
        mask = tower["attn_mask"]
        mask = None if mask is None else mask[:length, :length].to(x.dtype)
        x = _run_blocks(tower["blocks"], x, mask, tower["batch_first"], layer_hook, first_index=0)
        x = tower["ln_final"](x)
        pooled = x[torch.arange(x.shape[0], device=x.device), positions]
        return _project(pooled, tower["projection"]).float()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text features [N, D] of plain texts (no prompt), as constants (no gradient)."""
        with constant_tensors():
            ids = self.tokenize(texts)
            return self.text_features(self.token_embeddings(ids), ids)

    # ------------------------------------------------------------------ vision seams

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image features [B, D] of preprocessed images [B, 3, H, W] (the whole tower)."""
        return self.model.encode_image(pixels.to(self.device, self.image_dtype)).float()

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Input of the first vision block [B, 1 + patches, d_vis]: patch embedding, class token,
        positional embedding and the tower's pre-norm (patch dropout is off in eval mode)."""
        self._require_vit("VPT prompts")
        return self.model.visual._embeds(pixels.to(self.device, self.image_dtype))

    def vision_pre_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's pre-norm ``ln_pre`` (per token) on vision tokens [..., d_vis] (MaPLe puts its
        visual prompts in before it)."""
        self._require_vit("VPT prompts")
        return self.model.visual.ln_pre(x.to(self.image_dtype))

    def vision_layers(
        self, x: torch.Tensor, start: int, stop: int | None = None, layer_hook: LayerHook | None = None
    ) -> torch.Tensor:
        """Run vision blocks ``start``..``stop - 1`` (to the last when None) on hidden states x."""
        self._require_vit("VPT prompts")
        transformer = self.model.visual.transformer
        blocks = transformer.resblocks[start:stop]
        return _run_blocks(blocks, x.to(self.image_dtype), None, transformer.batch_first, layer_hook, start)

    def vision_class_attention(self, layer: int, x: torch.Tensor, keys: slice) -> torch.Tensor:
        """How vision block ``layer``'s class token (position 0) attends to the tokens at ``keys``:
        per head, the softmax of its attention logits over those tokens alone (its attention
        probabilities restricted to them and renormalised), [B, heads, K]. ``x`` is the block's
        input [B, T, d_vis], as a ``LayerHook`` sees it; the block's pre-norm and query/key
        projections are applied here, as the block applies them."""
        self._require_vit("attention of the class token")
        block = self.model.visual.transformer.resblocks[layer]
        attention = getattr(block, "attn", None)
        if not isinstance(attention, nn.MultiheadAttention) or not attention._qkv_same_embed_dim:
            raise ValueError(
                f"vision block {layer} of {self.name!r} has no standard multi-head attention "
                "(one input projection for queries, keys and values)"
            )
        normed = block.ln_1(x.to(self.image_dtype))
        width, heads = normed.shape[-1], attention.num_heads
        w_query, w_key, _ = attention.in_proj_weight.chunk(3)
        b_query, b_key = (
            (None, None) if attention.in_proj_bias is None else attention.in_proj_bias.chunk(3)[:2]
        )
        query = nn.functional.linear(normed[:, :1], w_query, b_query).reshape(len(x), 1, heads, -1)
        key = nn.functional.linear(normed[:, keys], w_key, b_key)
        key = key.reshape(len(x), key.shape[1], heads, -1)
        logits = torch.einsum("bqhd,bkhd->bhk", query, key).float() / math.sqrt(width // heads)
        return logits.softmax(dim=-1)

    def image_head(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's pooling (class token, mean or attention pool, with its norm) and projection."""
        self._require_vit("VPT prompts")
        visual = self.model.visual
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.float()

    def _require_vit(self, what: str) -> None:
        if not self.is_vit:
            raise ValueError(
                f"{what} need an open_clip VisionTransformer image tower; {self.name!r} has "
                f"{type(self.model.visual).__name__} (text-side and pixel-space prompts work with it)"
            )


# ---------------------------------------------------------------------- helpers


@contextmanager
def constant_tensors() -> Iterator[None]:
    """Tensors made inside are constants (no gradient) that later training may still use: ordinary
    tensors even when the caller runs in ``torch.inference_mode`` (an evaluation computing them first)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def register_model_config(model_name: str) -> str:
    """A model config file is registered with open_clip under its stem; a name passes through."""
    path = Path(model_name).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise BackboneLoadError(f"open_clip model config file {str(path)!r} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    return model_name


def _text_tower(model: nn.Module, name: str) -> dict[str, Any]:
    """The parts of the text tower prompts need, for CLIP (tower on the model) and CustomTextCLIP."""
    text = getattr(model, "text", model)
    if not hasattr(text, "token_embedding"):
        raise BackboneLoadError(
            f"open_clip model {name!r} has a {type(text).__name__} text tower; prompt learning needs "
            "open_clip's own text transformer (token embedding, blocks, end-of-text pooling)"
        )
    if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
        raise BackboneLoadError(
            f"open_clip model {name!r} has a text tower with a class token or padding mask (CoCa-style); "
            "prompt learning supports towers that pool at a token position"
        )
    pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    if pool not in (*_INDEX_POOLS, "first", "last"):
        raise BackboneLoadError(f"open_clip model {name!r} pools its text tower by {pool!r}, not at a token")
    return {
        "token_embedding": text.token_embedding,
        "positional_embedding": text.positional_embedding,
        "blocks": text.transformer.resblocks,
        "batch_first": getattr(text.transformer, "batch_first", True),
        "ln_final": text.ln_final,
        "projection": text.text_projection,
        "attn_mask": text.attn_mask,
        "pool_type": pool,
        "eos_id": getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None),
    }


def _is_causal(mask: torch.Tensor | None) -> bool:
    """Whether an additive mask is the causal one (-inf above the diagonal, 0 elsewhere)."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    causal = torch.full(mask.shape, float("-inf"), device=mask.device).triu(1)
    return bool(torch.equal(mask.float(), causal))


def _run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    mask: torch.Tensor | None,
    batch_first: bool,
    layer_hook: LayerHook | None,
    first_index: int,
) -> torch.Tensor:
    for offset, block in enumerate(blocks):
        if layer_hook is not None:
            x = layer_hook(first_index + offset, x)
        if batch_first:
            x = block(x, attn_mask=mask)
        else:
            x = block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    return x


def _project(pooled: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return pooled
    if isinstance(projection, nn.Linear):
        return projection(pooled)
    return pooled @ projection


def _weights_id(pretrained: str | None, source: str | None, tag_cfg: dict, seed: int) -> str:
    """What identifies the weights in cache keys: the tag, the checkpoint file's hash, or the seed."""
    if pretrained is None:
        return f"random-seed-{seed}"
    if tag_cfg:
        return f"tag-{pretrained}"
    digest = hashlib.sha256()
    with open(str(source), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"file-sha256-{digest.hexdigest()}"
