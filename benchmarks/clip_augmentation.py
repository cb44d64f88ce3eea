"""CoOp's augmentation with the feature cache: K cached augmented views per image against one.

Run: ``python benchmarks/clip_augmentation.py`` (the tiny CLIP of tests/clip_support.py, built in
a temporary folder; nothing downloaded).

A text-side prompt (CoOp context) never runs the image tower while it trains: image features are
cached. CoOp trains with random resized crops and flips, which one cached feature per image would
remove; fedprompt caches K augmented views of each training image and draws one per example and
step. On a few-shot split of scikit-learn's digits (``--shots`` images per class, 2 clients) it
trains the same CoOp context three ways, with the same rounds, steps and seeds:

- no augmentation (the plain image's feature, as before);
- K = 1 (one augmented view per image, fixed for the whole run);
- K = 8 (a view drawn from eight per step),

and prints test accuracy (mean over ``--seeds``) and what building the cache costs: the time to
encode the training images once (plain), with K = 1 and with K = 8, and the ratio K = 8 / K = 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clip_support import build_tiny_clip, clip_run_config

from fedprompt.api import run
from fedprompt.config import load_config
from fedprompt.data.images import load_image_task
from fedprompt.seeding import derive_seed
from fedprompt.tasks.clip.classification import augmented_views, image_tensors
from fedprompt.tasks.clip.feature_cache import FeatureCache
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.augment import CropFlip


def config(tiny, views: int | None, seed: int, args: argparse.Namespace) -> dict:
    if args.dataset == "digits":
        data = {"source": "builtin", "name": "digits", "test_split": None, "max_per_class": args.shots}
    else:
        data = {"source": "image-folder", "name": str(tiny.generated), "max_per_class": args.shots}
    augment = {"views": views, "crop_scale": [args.crop_min, 1.0]}
    raw = clip_run_config(
        tiny,
        {"kind": "coop", "num_tokens": 4},
        data,
        partition={"kind": "iid", "num_clients": 2},
        federation={"rounds": args.rounds, "min_clients": 2, "evaluate_every": args.rounds},
        optimizer={
            "algorithm": "sgd",
            "lr": args.lr,
            "momentum": 0.9,
            "epochs": args.epochs,
            "batch_size": 8,
        },
        vision={"augment": None if views is None else augment},
    )
    return {**raw, "seed": seed}


def build_times(tiny, args: argparse.Namespace) -> dict[str, float]:
    """Seconds to encode the training images: once, plain; and as K = 1 and K = 8 augmented views."""
    run_config = load_config(config(tiny, None, 0, args))
    model = build_experiment(run_config).model
    train = load_image_task(run_config.data, derive_seed(0, "data")).train
    rows = np.arange(len(train))
    times = {}
    for name, views in (("plain", None), ("K=1", 1), ("K=8", 8)):
        best = float("inf")
        for _ in range(args.repeats):
            cache = FeatureCache(None)  # nothing cached: every call encodes
            start = time.perf_counter()
            if views is None:
                image_tensors(model, train, cache, 256)
            else:
                augment = CropFlip(scale=(args.crop_min, 1.0))
                augmented_views(model, train, rows, augment, views, 0, cache, 256)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "colours"], default="digits")
    parser.add_argument("--crop-min", type=float, default=0.08, help="smallest crop area share (CoOp: 0.08)")
    parser.add_argument("--shots", type=int, default=4, help="training images per class (few-shot)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        tiny = build_tiny_clip(Path(folder))
        accuracy: dict[str, list[float]] = {"none": [], "K=1": [], "K=8": []}
        for seed in args.seeds:
            for name, views in (("none", None), ("K=1", 1), ("K=8", 8)):
                result = run(config(tiny, views, seed, args), write=False)
                accuracy[name].append(result.summary["final_accuracy"])
                print(f"seed {seed} {name:>4}: test accuracy {accuracy[name][-1]:.3f}", flush=True)
        times = build_times(tiny, args)
    means = {name: sum(values) / len(values) for name, values in accuracy.items()}
    print(
        f"{args.dataset}, {args.shots} training images per class, crops of {args.crop_min}-1 of the area; "
        f"mean test accuracy over seeds {args.seeds}:"
    )
    for name, value in means.items():
        print(f"  {name:>4}: {value:.3f}")
    print(
        f"accuracy K=8 / K=1: {means['K=8'] / means['K=1']:.3f}   "
        f"K=8 / none: {means['K=8'] / means['none']:.3f}"
    )
    print(
        f"cache build: plain {times['plain']:.3f} s, K=1 {times['K=1']:.3f} s, K=8 {times['K=8']:.3f} s; "
        f"K=8 / K=1: {times['K=8'] / times['K=1']:.2f}x, K=8 / plain: {times['K=8'] / times['plain']:.2f}x"
    )


if __name__ == "__main__":
    main()
