"""What a model owner prepares from a GGUF model to serve it with vLLM and let clients send soft
prompts: the model as a Hugging Face folder (vLLM loads those), and the input-embedding table
that clients embed their inputs with (published; the rest of the weights stay private)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from prompt_modules.embedding_table import load_embedding_table

EMBEDDINGS_KEY = "embeddings"


def gguf_to_hf_folder(gguf: Path, out: Path) -> Path:
    """Write the GGUF model as a Hugging Face folder (weights dequantised to float32 by transformers,
    and its tokenizer) into ``out``; return ``out``. Needs the ``gguf`` package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # the dequantised weights are plain float32: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new folder")
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.replace(out)  # whole or not at all
    return out


def publish_embeddings(model: str | Path, out: Path, gguf_file: str | None = None) -> tuple[int, int]:
    """Write a model's input-embedding table [vocab, hidden] (float32) as a safetensors file with one
    tensor, ``embeddings``: what ``backbone.embeddings`` of a vllm client reads. Returns its shape."""
    table = load_embedding_table(model, gguf_file)
    save_file({EMBEDDINGS_KEY: table.contiguous()}, str(out), {"format": "pt"})
    return int(table.shape[0]), int(table.shape[1])
