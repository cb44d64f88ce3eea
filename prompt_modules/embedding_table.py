"""A language model's input-embedding table [vocab, hidden] (float32), read without running the
model: from a GGUF file (dequantised by the ``gguf`` package exactly as llama.cpp's own lookup does),
a safetensors file holding that one tensor (what a model owner publishes for vLLM clients), or a
Hugging Face model folder."""

from __future__ import annotations

from pathlib import Path

import torch

GGUF_EMBEDDING = "token_embd.weight"


def load_embedding_table(path: str | Path, gguf_file: str | None = None) -> torch.Tensor:
    """The table from ``path``: a ``.gguf`` file (or a folder holding ``gguf_file``), a
    ``.safetensors`` file with one 2-D tensor, or a Hugging Face model folder. FileNotFoundError or
    ValueError say what is missing."""
    path = Path(path)
    if gguf_file is not None:
        path = path / gguf_file
    if not path.exists():
        raise FileNotFoundError(f"no input-embedding table at {path}")
    if path.suffix == ".gguf":
        return gguf_embedding_table(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        tables = [t for t in tensors.values() if t.dim() == 2]
        if len(tables) != 1:
            raise ValueError(
                f"{path} holds {len(tables)} 2-D tensors ({sorted(tensors)}); a table file holds one"
            )
        return tables[0].float().contiguous()
    if path.is_dir():
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        return model.get_input_embeddings().weight.detach().float().contiguous()
    raise ValueError(f"{path} is not a .gguf or .safetensors file or a model folder")


def gguf_embedding_table(path: str | Path) -> torch.Tensor:
    """``token_embd.weight`` of a GGUF file, dequantised to float32 [vocab, hidden]."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    tensor = next((t for t in reader.tensors if t.name == GGUF_EMBEDDING), None)
    if tensor is None:
        raise ValueError(f"{path} has no tensor {GGUF_EMBEDDING}")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
