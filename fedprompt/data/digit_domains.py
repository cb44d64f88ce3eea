"""``digit-domains``: a builtin multi-domain image set, made offline from scikit-learn's digits.

Six domains, in the spirit of Digits-5 (MNIST, MNIST-M, SVHN, ...) and of DomainNet's sketches,
made from the 1,797 bundled 8×8 digits by fixed, seeded transforms. Each digit image belongs to
exactly one domain (a seeded, class-stratified sixth of each class), so no handwritten digit appears
in two domains; every image is upsampled to 32×32 and then:

- ``plain``: as it is (a light digit on black);
- ``inverted``: dark on white;
- ``textured``: the stroke in a random bright colour over a random coloured texture (a smooth
  noise field plus stripes), as MNIST-M paints MNIST over photo patches;
- ``rotated``: turned by a random angle of 30° to 60°, either way;
- ``outline``: the stroke's edges only (the gradient magnitude of the digit), as a sketch draws it;
- ``noisy``: Gaussian pixel noise (σ = 64 of 255) on the plain digit.

The demo backbone (``bundled:demo-clip``) was pre-trained on a seeded tenth of the plain digits
(``digit_pretraining_split``): those images are never put in a test split (they stay in training,
in whatever domain they fall), so no test image of any domain is one the backbone has seen, in any
form. Each domain's test split is a seeded stratified ``test_fraction`` of its other images.

Everything here (domain assignment, transforms, test splits) is fixed by ``DATASET_SEED``, not by
the run seed: like a published dataset, it is the same set of images in every run.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fedprompt.config import DIGIT_DOMAINS
from fedprompt.data.images import DIGIT_NAMES, digit_arrays, digit_pretraining_split
from fedprompt.seeding import derive_seed

DATASET_SEED = 2024
"""The seed of every random choice of the builtin set (not the run's: the set is fixed)."""
SIZE = 32
"""Side of the images, in pixels (the demo backbone's input size)."""
NOISE_STD = 64.0


def domain_rows(seed: int = DATASET_SEED) -> list[np.ndarray]:
    """The sklearn digit rows of each domain (in ``DIGIT_DOMAINS`` order): each class's rows in a
    seeded order, cut into as many near-equal runs as there are domains. Disjoint and complete."""
    _, labels = digit_arrays()
    rng = np.random.default_rng(derive_seed(seed, "digit-domains", "assign"))
    parts: list[list[int]] = [[] for _ in DIGIT_DOMAINS]
    for label in range(len(DIGIT_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        for index, chunk in enumerate(np.array_split(members, len(DIGIT_DOMAINS))):
            parts[index].extend(chunk.tolist())
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def evaluation_rows(rows: np.ndarray, fraction: float, domain: str, seed: int = DATASET_SEED) -> np.ndarray:
    """The test rows of one domain: per class, a seeded round(fraction · n_class) of its rows that the
    demo backbone never saw (fewer when too few are left), sorted."""
    _, labels = digit_arrays()
    seen = set(digit_pretraining_split()[0])
    rng = np.random.default_rng(derive_seed(seed, "digit-domains", "test", domain))
    chosen: list[int] = []
    for label in range(len(DIGIT_NAMES)):
        members = rows[labels[rows] == label]
        eligible = rng.permutation([r for r in members.tolist() if r not in seen])
        chosen.extend(eligible[: round(fraction * len(members))].tolist())
    return np.sort(np.asarray(chosen, dtype=np.int64))


def render(digit: np.ndarray, domain: str, rng: np.random.Generator) -> Image.Image:
    """An 8×8 uint8 digit as a 32×32 RGB image of ``domain``, its random choices drawn from ``rng``."""
    grey = np.asarray(Image.fromarray(digit, mode="L").resize((SIZE, SIZE), Image.BILINEAR), np.float64)
    if domain == "plain":
        out = np.repeat(grey[..., None], 3, axis=2)
    elif domain == "inverted":
        out = np.repeat(255.0 - grey[..., None], 3, axis=2)
    elif domain == "textured":
        out = _textured(grey, rng)
    elif domain == "rotated":
        angle = float(rng.uniform(30.0, 60.0)) * (1 if rng.random() < 0.5 else -1)
        turned = Image.fromarray(grey.astype(np.uint8), mode="L").rotate(angle, Image.BILINEAR)
        out = np.repeat(np.asarray(turned, np.float64)[..., None], 3, axis=2)
    elif domain == "outline":
        rows, columns = np.gradient(grey)
        edges = np.hypot(rows, columns)
        out = np.repeat((edges * (255.0 / max(edges.max(), 1e-9)))[..., None], 3, axis=2)
    elif domain == "noisy":
        noisy = grey + rng.normal(0.0, NOISE_STD, size=grey.shape)
        out = np.repeat(noisy[..., None], 3, axis=2)
    else:
        raise ValueError(f"unknown digit domain {domain!r}; the domains are {list(DIGIT_DOMAINS)}")
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def domain_images(domain: str, rows: np.ndarray, seed: int = DATASET_SEED) -> list[Image.Image]:
    """The digits of ``rows`` rendered in ``domain``, each seeded by its row (the same image whatever
    else is rendered)."""
    pixels, _ = digit_arrays()
    return [
        render(
            pixels[row], domain, np.random.default_rng(derive_seed(seed, "digit-domains", domain, int(row)))
        )
        for row in rows.tolist()
    ]


def _textured(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The stroke (``grey`` as its opacity) in a bright colour over a coloured texture: a smooth random
    field (4×4 noise upsampled) times a base colour, plus faint stripes of random angle and period."""
    field = rng.uniform(0.3, 1.0, size=(4, 4))
    small = Image.fromarray((field * 255).astype(np.uint8), mode="L")
    smooth = np.asarray(small.resize((SIZE, SIZE), Image.BICUBIC), np.float64)
    base = rng.uniform(40, 200, size=3)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3, 8)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    background = (smooth[..., None] / 255.0) * base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    colour = rng.uniform(150, 255, size=3)
    opacity = (grey / 255.0)[..., None]
    return background * (1 - opacity) + colour[None, None, :] * opacity
