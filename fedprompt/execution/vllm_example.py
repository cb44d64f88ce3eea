"""Send a fedprompt soft prompt to a vLLM server as ``prompt_embeds`` and check its answers.

Written next to the prompt by ``fedprompt export RUN OUT --format vllm``; needs torch,
transformers, safetensors and httpx, not fedprompt. For each input of ``check.json`` it embeds the
templated text with the model's input-embedding table, puts the trained prompt vectors before it,
sends the base64 of the ``torch.save``d dense tensor to ``/v1/completions`` (one next token, the
label words' log-probabilities asked for by id), scores each class as fedprompt does, and compares
the class log-probabilities with fedprompt's. Exit status 1 when they differ by more than the
tolerance or a prediction differs.

    python send_to_vllm.py --url http://127.0.0.1:8000 --model smollm2 [--text "a new input"]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def input_embedding_table(source: str, gguf_file: str | None) -> torch.Tensor:
    """The model's input-embedding table [vocab, hidden] from a safetensors file, a GGUF file or a
    Hugging Face model folder."""
    path = Path(source) / gguf_file if gguf_file else Path(source)
    if path.suffix == ".safetensors":
        (table,) = [t for t in load_file(str(path)).values() if t.dim() == 2]
        return table.float()
    if path.suffix == ".gguf":
        import gguf
        import numpy as np

        tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path)).get_input_embeddings().weight.detach().float()


def template_ids(tokenizer, spec: dict, text: str) -> list[int]:
    """The ids fedprompt fed: its special tokens around the templated input, tokenised whole (as a
    server would) or in parts (the template's and the text's apart), the text cut so that the whole
    fits ``max_length``."""
    before, after = spec["special_ids_before"], spec["special_ids_after"]
    prefix, suffix = spec["template"].split("{text}")
    budget = spec["max_length"] - len(before) - len(after)
    if spec["tokenization"] == "parts":
        prefix_ids, suffix_ids = tokenizer([prefix, suffix], add_special_tokens=False)["input_ids"]
        room = budget - len(prefix_ids) - len(suffix_ids)
        text_ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        return [*before, *prefix_ids, *text_ids, *suffix_ids, *after]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for keep in range(len(ids), 0, -1):
        piece = text if keep == len(ids) else tokenizer.decode(ids[:keep])
        whole = tokenizer(prefix + piece + suffix, add_special_tokens=False)["input_ids"]
        if len(whole) <= budget:
            return [*before, *whole, *after]
    raise ValueError(f"the template leaves no room for text within max_length={spec['max_length']}")


def prompt_embeds(tensor: torch.Tensor) -> str:
    """The base64 of ``torch.save`` of a dense, contiguous float tensor (what vLLM decodes)."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().to(torch.float32).contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def class_log_probs(answer: dict, token_ids: list[int], classes: list[list[int]]) -> list[float]:
    """The softmax over classes of each class's mean label-word log-probability."""
    top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
    words = [float(top[f"token_id:{token}"]) for token in token_ids]
    scores = torch.tensor([sum(words[i] for i in members) / len(members) for members in classes])
    return torch.log_softmax(scores, dim=-1).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the vLLM server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the served model's name")
    parser.add_argument("--text", action="append", help="score these inputs instead of check.json's")
    parser.add_argument("--embeddings", help="the input-embedding table, if not where the export says")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    spec = json.loads((HERE / "vllm_prompt.json").read_text())
    check = json.loads((HERE / "check.json").read_text())
    prompt = load_file(str(HERE / "prompt_embeds.safetensors"))["prompt_embeds"]
    gguf_file = None if args.embeddings else spec["embeddings_gguf_file"]
    table = input_embedding_table(args.embeddings or spec["embeddings"], gguf_file)
    gguf = {"gguf_file": spec["tokenizer_gguf_file"]} if spec["tokenizer_gguf_file"] else {}
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"], **gguf)
    token_ids, classes = spec["label_words"]["token_ids"], spec["label_words"]["classes"]
    texts = args.text or check["texts"]
    worst, disagree = 0.0, 0
    with httpx.Client(base_url=args.url, timeout=600) as http:
        for i, text in enumerate(texts):
            ids = template_ids(tokenizer, spec, text)
            body = {
                "model": args.model,
                "prompt_embeds": prompt_embeds(torch.cat([prompt, table[ids]])),
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": 1,
                "logprob_token_ids": token_ids,
                "return_tokens_as_token_ids": True,
            }
            answer = http.post("/v1/completions", json=body)
            answer.raise_for_status()
            mine = class_log_probs(answer.json(), token_ids, classes)
            label = spec["labels"][max(range(len(mine)), key=mine.__getitem__)]
            line = {"text": text, "prediction": label, "class_log_probs": mine}
            if not args.text:
                theirs = check["class_log_probs"][i]
                gap = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
                worst = max(worst, gap)
                disagree += int(label != check["labels"][max(range(len(theirs)), key=theirs.__getitem__)])
                line["fedprompt_class_log_probs"], line["difference"] = theirs, gap
            print(json.dumps(line))
    if args.text:
        return 0
    ok = worst <= check["tolerance"] and disagree == 0
    print(
        json.dumps({"inputs": len(texts), "max_difference": worst, "predictions_differ": disagree, "ok": ok})
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
