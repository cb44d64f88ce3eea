"""CLIP prompt learning: what the image-feature cache, the shortened text pass and the cache of layers
below the first prompted layer buy, and how many bytes each prompt module sends per round.

Run: ``python benchmarks/clip_speed.py`` (random weights of ViT-B-32's shapes; nothing downloaded).
Timings are the best of ``--repeats`` rounds in which baseline and fast path take turns. On a
machine other processes share, pass ``--threads 1`` (or set ``OMP_WAIT_POLICY=PASSIVE``): two
OpenMP threads that lose their cores spin and stall each other, and times then vary several-fold.

1. Text context (CoOp / PromptFL): one local epoch of a client, batches of 32 images, 10 classes.
   Baseline, as PromptFL's reference code trains: every step re-encodes its images through the
   image tower and runs the class prompts through the text tower at the full 77 tokens.
   fedprompt: image features come from the cache (computed once per client dataset, before its
   first round; that one-off cost is printed apart) and the causal text pass stops at the last
   end-of-text token. Both run the same GradientTrainer and optimiser.
2. Deep VPT from layer k: every step runs the whole image tower, against a step that starts from
   the cached hidden states at the input of layer k.
3. Bytes each module sends per round (its safetensors payload) against the CLIP model's bytes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import encode_state
from fedprompt.training.batching import TensorData
from fedprompt.training.gradient import GradientTrainer, LocalRound
from optimizers.gradient import GradientOptimizer, GradientSettings
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import FixedClassText, TextContext, tokenize_classes
from prompt_modules.prompt_generator import PromptGenerator
from prompt_modules.twin_prompt import CoupledVisualPrompt
from prompt_modules.visual_prompts import FrozenImage, PixelPrompt, VisualTokenPrompt, vpt_init

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class FullLengthText(CLIPPromptClassifier):
    """The baseline's text pass: the class prompts run at the tower's full context length."""

    def class_features(self, full_length: bool = False) -> torch.Tensor:
        return super().class_features(full_length=True)


def once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(*fns: Callable[[], object], repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds (after one warm-up call each).

    The functions take turns within each round, so a change of machine load between rounds hits
    the baseline and the fast path alike.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(max(repeats, 1)):
        best = [min(b, once(fn)) for b, fn in zip(best, fns, strict=True)]
    return best


def epoch(model: CLIPPromptClassifier, data: TensorData, batch_size: int) -> Callable[[], object]:
    """One local epoch of the real trainer (AdamW, as a client runs it)."""
    trainer = GradientTrainer(GradientOptimizer(GradientSettings(lr=1e-3, epochs=1)), batch_size, "cpu")
    return lambda: trainer.train(model, data, LocalRound(FitInstructions(round=1, seed=0)))


def train_step(model: CLIPPromptClassifier, batch: dict[str, torch.Tensor]) -> Callable[[], object]:
    """One optimiser step (forward, backward, AdamW update) on a fixed batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(batch), batch["labels"]).backward()
        optimizer.step()

    return step


def text_context(backbone: OpenCLIPBackbone, images: int, batch_size: int, repeats: int) -> None:
    pixels = torch.randn(images, 3, *backbone.image_size)
    labels = torch.randint(len(CLASSES), (images,))
    context = torch.randn(16, backbone.text_width) * 0.02
    ours = CLIPPromptClassifier(backbone, TextContext(context), FrozenImage(), CLASSES)
    baseline = FullLengthText(backbone, TextContext(context), FrozenImage(), CLASSES)
    encode_s = once(lambda: ours.prepare_images(pixels))
    features = ours.prepare_images(pixels)
    length = int(backbone.pooled_positions(tokenize_classes(backbone, CLASSES, 16).ids).max()) + 1

    baseline.train()
    ours.train()
    image_s, full_s, short_s = timed(
        lambda: backbone.encode_image(pixels[:batch_size]),
        lambda: baseline.class_features().sum().backward(),
        lambda: ours.class_features().sum().backward(),
        repeats=repeats,
    )
    text_s = {"full": full_s, "short": short_s}
    first = {"labels": labels[:batch_size]}
    base_step, our_step = timed(
        train_step(baseline, {**first, "pixels": pixels[:batch_size]}),
        train_step(ours, {**first, "image_features": features[:batch_size]}),
        repeats=repeats,
    )
    raw = TensorData({"pixels": pixels, "labels": labels})
    cached = TensorData({"image_features": features, "labels": labels})
    base_epoch, our_epoch = timed(
        epoch(baseline, raw, batch_size), epoch(ours, cached, batch_size), repeats=repeats
    )
    steps = -(-images // batch_size)
    print(f"\n== text context (CoOp, M=16, {len(CLASSES)} classes), batches of {batch_size} images")
    print(f"image tower forward, {batch_size} images:             {image_s:8.3f} s")
    print(f"text forward+backward, 77 tokens:              {text_s['full']:8.3f} s")
    print(f"text forward+backward, {length} tokens (shortened): {text_s['short']:8.3f} s")
    print(f"step, re-encoding images, 77 tokens:           {base_step:8.3f} s")
    print(f"step, cached features, {length} tokens:             {our_step:8.3f} s")
    print(f"ratio per step:                                {base_step / our_step:8.1f}x")
    print(
        f"local epoch of {images} images ({steps} steps, GradientTrainer), re-encoding: {base_epoch:8.3f} s"
    )
    print(f"local epoch of {images} images ({steps} steps, GradientTrainer), cached:      {our_epoch:8.3f} s")
    print(f"ratio per local epoch:                         {base_epoch / our_epoch:8.1f}x")
    print(f"one-off feature cache of the {images} images:     {encode_s:8.3f} s (before the first round)")


def deep_vpt(backbone: OpenCLIPBackbone, images: int, batch_size: int, repeats: int, start: int) -> None:
    pixels = torch.randn(images, 3, *backbone.image_size)
    labels = torch.randint(len(CLASSES), (images,))
    layers = backbone.num_vision_layers - start
    prompts = vpt_init(backbone, layers, 8, torch.Generator().manual_seed(0))
    model = CLIPPromptClassifier(backbone, FixedClassText(), VisualTokenPrompt(prompts, start), CLASSES)
    encode_s = once(lambda: model.prepare_images(pixels))
    hidden = model.prepare_images(pixels)
    first = {"labels": labels[:batch_size]}
    full, ours = timed(
        train_step(model, {**first, "pixels": pixels[:batch_size]}),
        train_step(model, {**first, "image_tokens": hidden[:batch_size]}),
        repeats=repeats,
    )
    print(
        f"\n== deep VPT, 8 tokens in layers {start}..{backbone.num_vision_layers - 1}, "
        f"batches of {batch_size}"
    )
    print(f"step, whole image tower:                      {full:8.3f} s")
    print(f"step, from cached layer-{start} hidden states:     {ours:8.3f} s")
    print(f"ratio per step:                               {full / ours:8.2f}x")
    print(f"one-off cache of layers 0..{start - 1}, {images} images: {encode_s:8.3f} s")


def payload_bytes(backbone: OpenCLIPBackbone) -> None:
    text, vis = backbone.text_width, backbone.vision_width
    generator = torch.Generator().manual_seed(0)
    n_layers = backbone.num_vision_layers

    def coop(m: int, depth: int = 1) -> TextContext:
        deep = torch.zeros(depth - 1, m, text) if depth > 1 else None
        return TextContext(torch.zeros(m, text), deep)

    modules = {
        "coop (PromptFL, M=16)": (coop(16), FrozenImage()),
        "coop class-specific (M=16, 10 classes)": (
            TextContext(torch.zeros(10, 16, text), class_names=CLASSES),
            FrozenImage(),
        ),
        "vpt shallow (8 tokens)": (FixedClassText(), VisualTokenPrompt(vpt_init(backbone, 1, 8, generator))),
        "vpt deep (8 tokens x 12 layers)": (
            FixedClassText(),
            VisualTokenPrompt(vpt_init(backbone, n_layers, 8, generator)),
        ),
        "pixel patch (s=10)": (FixedClassText(), PixelPrompt("patch", 10, backbone.image_size)),
        "pixel frame (s=30)": (FixedClassText(), PixelPrompt("frame", 30, backbone.image_size)),
        "twin TPFL (coop 16 + patch 10)": (coop(16), PixelPrompt("patch", 10, backbone.image_size)),
        "twin tokens (coop 16 + deep vpt 8)": (
            coop(16),
            VisualTokenPrompt(vpt_init(backbone, n_layers, 8, generator)),
        ),
        "twin coupled (MaPLe, M=2, depth 9)": (coop(2, 9), CoupledVisualPrompt(text, vis, 9)),
        "generator (FedTPG, M=4, 4 heads)": (PromptGenerator(4, text, backbone.embed_dim), FrozenImage()),
    }
    model_bytes = backbone.num_bytes()
    print(
        f"\n== bytes sent per client per round (float32 safetensors) "
        f"vs the CLIP model ({model_bytes:,} bytes)"
    )
    for name, (text_side, image_side) in modules.items():
        state = CLIPPromptClassifier(backbone, text_side, image_side, CLASSES).prompt_state()
        sent = len(encode_state(state, "float32"))
        print(f"{name:42s} {sent:>12,} bytes  {sent / model_bytes:9.2e} of the model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (random weights)")
    parser.add_argument("--images", type=int, default=64, help="images of the client")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    parser.add_argument("--vpt-start", type=int, default=6, help="first prompted layer of the deep VPT")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--parts", default="text,vpt,bytes", help="comma-separated: text (CoOp), vpt (deep VPT), bytes"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = OpenCLIPBackbone.load(args.model, None)
    print(f"{args.model}, random weights, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    parts = set(args.parts.split(","))
    if "text" in parts:
        text_context(backbone, args.images, args.batch_size, args.repeats)
    if "vpt" in parts:
        deep_vpt(backbone, args.images, args.batch_size, args.repeats, args.vpt_start)
    if "bytes" in parts:
        payload_bytes(backbone)


if __name__ == "__main__":
    main()
