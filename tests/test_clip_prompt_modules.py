"""CLIP prompt modules: shapes, state, gradients, cached = uncached, generator, pixel prompts, trainers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedprompt.federation.instructions import FitInstructions
from fedprompt.training.batching import TensorData
from fedprompt.training.contrastive import NEGATIVE, POSITIVE, PREVIOUS, ContrastiveTrainer
from fedprompt.training.gradient import GradientTrainer, LocalRound
from optimizers.gradient import GradientOptimizer, GradientSettings
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import FixedClassText, TextContext, tokenize_classes
from prompt_modules.prompt_generator import PromptGenerator
from prompt_modules.twin_prompt import CoupledVisualPrompt
from prompt_modules.visual_prompts import BATCH_SEED, FrozenImage, PixelPrompt, VisualTokenPrompt, vpt_init

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _text(shape: tuple[int, ...], seed: int = 0, **kw) -> TextContext:
    return TextContext(torch.randn(*shape, generator=_gen(seed)) * 0.02, **kw)


MODULES = {
    "coop": lambda b: (_text((4, 64)), FrozenImage()),
    "coop-class-specific": lambda b: (_text((4, 3, 64), class_names=NAMES), FrozenImage()),
    "coop-deep-text": lambda b: (_text((3, 64), deep=torch.randn(1, 3, 64) * 0.02), FrozenImage()),
    "vpt-shallow": lambda b: (FixedClassText(), VisualTokenPrompt(vpt_init(b, 1, 3, _gen()), 0)),
    "vpt-deep-from-1": lambda b: (FixedClassText(), VisualTokenPrompt(vpt_init(b, 1, 3, _gen()), 1)),
    "vpt-deep-from-0": lambda b: (FixedClassText(), VisualTokenPrompt(vpt_init(b, 2, 3, _gen()), 0)),
    "pixel-patch": lambda b: (FixedClassText(), PixelPrompt("patch", 6, b.image_size)),
    "pixel-frame": lambda b: (FixedClassText(), PixelPrompt("frame", 4, b.image_size)),
    "twin-pixel": lambda b: (_text((4, 64)), PixelPrompt("patch", 8, b.image_size)),
    "twin-vpt": lambda b: (_text((4, 64)), VisualTokenPrompt(vpt_init(b, 2, 3, _gen()), 0)),
    "twin-coupled": lambda b: (
        _text((2, 64), deep=torch.randn(1, 2, 64) * 0.02),
        CoupledVisualPrompt(64, 64, 2),
    ),
    "generator": lambda b: (PromptGenerator(4, 64, 32, heads=2), FrozenImage()),
}
STATE_KEYS = {
    "coop": ["text.context"],
    "coop-class-specific": ["text.context"],
    "coop-deep-text": ["text.context", "text.deep"],
    "vpt-shallow": ["image.prompts"],
    "vpt-deep-from-1": ["image.prompts"],
    "vpt-deep-from-0": ["image.prompts"],
    "pixel-patch": ["image.patch"],
    "pixel-frame": ["image.top", "image.bottom", "image.left", "image.right"],
    "twin-pixel": ["text.context", "image.patch"],
    "twin-vpt": ["text.context", "image.prompts"],
    "twin-coupled": [
        "text.context",
        "text.deep",
        *(f"image.maps.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
    ],
}


def _model(backbone: OpenCLIPBackbone, kind: str) -> CLIPPromptClassifier:
    text, image = MODULES[kind](backbone)
    return CLIPPromptClassifier(backbone, text, image, NAMES)


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_logits_state_and_gradients_reach_only_the_prompt(backbone, kind):
    model = _model(backbone, kind)
    pixels = torch.randn(5, 3, 32, 32, generator=_gen(1))
    logits = model({"pixels": pixels})
    assert logits.shape == (5, len(NAMES)) and torch.isfinite(logits).all()
    if kind in STATE_KEYS:
        assert list(model.state_dict()) == STATE_KEYS[kind]
    assert all(not n.startswith("backbone") for n in model.state_dict())
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in backbone.model.parameters())


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_cached_input_gives_the_same_logits_as_pixels(backbone, kind):
    model = _model(backbone, kind).eval()
    pixels = torch.randn(6, 3, 32, 32, generator=_gen(2))
    cached = {model.image_input.key: model.prepare_images(pixels)}
    assert model.image_input.key == (
        "pixels"
        if "pixel" in kind
        else "image_features"
        if kind.startswith(("coop", "gen"))
        else "image_tokens"
    )
    with torch.no_grad():
        torch.testing.assert_close(model(cached), model({"pixels": pixels}), atol=1e-5, rtol=1e-5)


def test_deep_vpt_cache_holds_the_states_below_the_first_prompted_layer(backbone):
    model = _model(backbone, "vpt-deep-from-1").eval()
    pixels = torch.randn(4, 3, 32, 32, generator=_gen(3))
    hidden = model.prepare_images(pixels)
    assert hidden.shape == (4, 17, 64)  # [CLS + 16 patches] at the input of layer 1, no prompt positions
    before = model({"image_tokens": hidden})
    with torch.no_grad():
        model.image.prompts.add_(torch.randn(1, 3, 64, generator=_gen(9)))  # not a constant: LN
    torch.testing.assert_close(model.prepare_images(pixels), hidden)  # still prompt-independent
    assert not torch.allclose(before, model({"image_tokens": hidden}))


def test_class_prompts_put_the_context_before_the_name(backbone):
    tokens = tokenize_classes(backbone, ["zero", "sea lion"], 4)
    x_id = backbone.tokenize(["X"])[0, 1]
    assert tokens.num_context == 4 and tokens.positions.tolist() == [[1, 2, 3, 4], [1, 2, 3, 4]]
    assert (tokens.ids[:, 1:5] == x_id).all()
    ends = backbone.pooled_positions(tokens.ids)
    assert ends.tolist() == [7, 8]  # [SOS] X X X X zero . [EOS] / ... sea lion . [EOS]
    with pytest.raises(ValueError, match="do not fit the text tower's 77 tokens"):
        tokenize_classes(backbone, ["word " * 80], 4)


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        ("front", [[2, 3, 4, 5], [3, 4, 5, 6]]),  # [SOS] zero X X X X . / [SOS] sea lion X X X X .
        ("middle", [[1, 2, 4, 5], [1, 2, 5, 6]]),  # [SOS] X X zero X X . / [SOS] X X sea lion X X .
    ],
)
def test_class_position_places_the_context_around_the_name(backbone, position, expected):
    tokens = tokenize_classes(backbone, ["zero", "sea lion"], 4, position)
    assert tokens.positions.tolist() == expected
    x_id = backbone.tokenize(["X"])[0, 1]
    assert (tokens.ids.gather(1, tokens.positions) == x_id).all()


@pytest.mark.parametrize(
    ("position", "sentences"),
    [
        ("end", ["a photo of a zero.", "a photo of a sea lion."]),
        ("front", ["zero a photo of a.", "sea lion a photo of a."]),
        ("middle", ["a photo zero of a.", "a photo sea lion of a."]),
    ],
)
def test_context_of_word_embeddings_gives_clips_encoding_of_the_sentence(backbone, position, sentences):
    """CoOp's equation: with the context set to the embeddings of "a photo of a", the class prompt is
    that sentence with the class name at ``position``, and CLIP's own text encoder must agree."""
    phrase = backbone.tokenize(["a photo of a"])[0, 1:5]
    context = TextContext(backbone.token_embeddings(phrase).detach(), class_position=position)
    with torch.no_grad():
        ours = context.class_features(backbone, ["zero", "sea lion"])
        reference = backbone.model.encode_text(backbone.tokenize(sentences))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_class_specific_context_scores_only_its_own_classes(backbone):
    model = _model(backbone, "coop-class-specific")
    with (
        pytest.raises(ValueError, match="class-specific context was learned for 4 classes"),
        model.scoring(["five", "six"]),
    ):
        model({"image_features": torch.randn(2, 32)})


def test_scoring_switches_the_class_set_and_reuses_class_features_without_gradients(backbone):
    model = _model(backbone, "coop").eval()
    features = {"image_features": torch.randn(3, 32, generator=_gen(4))}
    with torch.no_grad():
        with model.scoring(["five", "six"]):
            assert model(features).shape == (3, 2)
        assert model(features).shape == (3, 4) and model.class_names == tuple(NAMES)
        first = model.class_features()
        assert model.class_features() is first  # unchanged prompt state: computed once
        model.text.context.add_(0.5)
        assert not torch.equal(model.class_features(), first)  # a new state is recomputed
    assert model.class_features().requires_grad  # with gradients: always a fresh graph


def test_generator_has_fedtpg_size_at_vit_b16_and_writes_context_for_unseen_names(backbone):
    reference = PromptGenerator(4, 512, 512, heads=4, ff_mult=4)
    assert sum(p.numel() for p in reference.parameters()) == 4_206_080  # ~4.2 M as FedTPG's
    model = _model(backbone, "generator").eval()
    seen, unseen = backbone.encode_text(NAMES), backbone.encode_text(["seven", "eight", "nine"])
    with torch.no_grad():
        context_seen = model.text.context(F.normalize(seen, dim=-1))
        context_unseen = model.text.context(F.normalize(unseen, dim=-1))
        assert context_unseen.shape == (4, 64) and torch.isfinite(context_unseen).all()
        assert not torch.allclose(context_seen, context_unseen)  # the context depends on the class names
        with model.scoring(["seven", "eight", "nine"]):
            logits = model({"image_features": torch.randn(2, 32)})
    assert logits.shape == (2, 3)
    assert all(name.startswith("text.") for name in model.state_dict())


def test_pixel_prompts_cover_their_region_only():
    patch = PixelPrompt("patch", 4, (16, 16), seed=0)
    image = patch.prompt_image()
    assert image.shape == (3, 16, 16) and image[:, :4, :4].abs().sum() > 0
    assert image[:, 4:, :].abs().sum() == 0 and image[:, :, 4:].abs().sum() == 0
    frame = PixelPrompt("frame", 3, (16, 20), seed=0).prompt_image()
    assert frame.shape == (3, 16, 20) and frame[:, 3:13, 3:17].abs().sum() == 0
    assert (frame[:, :3] != 0).all() and (frame[:, :, -3:] != 0).all()
    moving = PixelPrompt("random-patch", 4, (16, 16), seed=0)
    corners = torch.tensor([[0, 0], [12, 5]])
    placed = moving.prompt_image(corners)
    assert placed.shape == (2, 3, 16, 16)
    assert (
        torch.equal(placed[1, :, 12:16, 5:9], moving.patch)
        and placed[1].abs().sum() == moving.patch.abs().sum()
    )
    assert moving.prompt_image()[0, 0].nonzero()[0].tolist() == [6, 6]  # no positions: the centre
    with pytest.raises(ValueError, match="a frame prompt of size 9 does not fit 16x16 images"):
        PixelPrompt("frame", 9, (16, 16))
    with pytest.raises(ValueError, match="unknown pixel prompt 'ring'"):
        PixelPrompt("ring", 4, (16, 16))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="random_at_eval applies to random-patch prompts only"):
        PixelPrompt("patch", 4, (16, 16), random_at_eval=True)


def _spy_encode(backbone, monkeypatch) -> list[torch.Tensor]:
    """Record the pixels the image tower receives."""
    seen: list[torch.Tensor] = []
    encode = backbone.encode_image

    def spy(pixels):
        seen.append(pixels.detach().clone())
        return encode(pixels)

    monkeypatch.setattr(backbone, "encode_image", spy)
    return seen


def test_random_patch_positions_come_from_the_batch_seed_and_evaluation_is_fixed(backbone, monkeypatch):
    seen = _spy_encode(backbone, monkeypatch)
    prompt = PixelPrompt("random-patch", 8, backbone.image_size, seed=3)
    model = CLIPPromptClassifier(backbone, FixedClassText(), prompt, NAMES)
    zeros = torch.zeros(4, 3, 32, 32)

    def corners() -> list[list[int]]:  # where the patch landed on each image (its top-left corner)
        return [image[0].ne(0).nonzero().min(0).values.tolist() for image in seen[-1]]

    with torch.no_grad():
        model.train()
        with pytest.raises(ValueError, match="a random-patch prompt needs the training step's seed"):
            model({"pixels": zeros})
        model({"pixels": zeros, BATCH_SEED: torch.tensor([11])})
        first = corners()
        model({"pixels": zeros, BATCH_SEED: torch.tensor([12])})
        model({"pixels": zeros, BATCH_SEED: torch.tensor([11])})
        assert corners() == first and len({tuple(c) for c in first}) > 1  # per image, from the seed alone
        uniform = torch.rand(4, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        assert first == (uniform * 25).long().tolist()  # 32 - 8 + 1 = 25 places per axis
        model.eval()
        model({"pixels": zeros})
        assert corners() == [[12, 12]] * 4  # the centre at evaluation
        prompt.random_at_eval = True
        model({"pixels": zeros})
        at_eval = corners()
        model({"pixels": zeros[:2]})
        assert len({tuple(c) for c in at_eval}) > 1 and corners() == at_eval[:2]  # random, and repeatable


def test_coupled_visual_prompts_are_maps_of_the_text_prompts(backbone):
    model = _model(backbone, "twin-coupled")
    visual = model.image.visual_prompts(model.text)
    expected = model.image.maps[1](model.text.deep[0])
    assert visual.shape == (2, 2, 64) and torch.equal(visual[1], expected)
    too_deep = CoupledVisualPrompt(64, 64, 2, start_layer=1)
    with pytest.raises(ValueError, match="need text prompts in those layers"):
        too_deep.visual_prompts(model.text)


def _trainer(cls=GradientTrainer, **kw):
    optimizer = GradientOptimizer(GradientSettings(algorithm="adamw", lr=0.05, epochs=1, grad_clip=None))
    return cls(optimizer, batch_size=4, device="cpu", **kw)


def test_param_groups_give_each_part_its_own_settings(backbone):
    text, image = MODULES["twin-pixel"](backbone)
    model = CLIPPromptClassifier(backbone, text, image, NAMES, {"image": {"lr": 0.0}})
    groups = model.param_groups()
    assert [len(g["params"]) for g in groups] == [1, 1] and groups[1]["lr"] == 0.0 and "lr" not in groups[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorData({"pixels": torch.randn(8, 3, 32, 32, generator=_gen(5)), "labels": torch.arange(8) % 4})
    _trainer().train(model, data, LocalRound(FitInstructions(round=1, seed=0)))
    assert not torch.equal(model.state_dict()["text.context"], before["text.context"])
    assert torch.equal(model.state_dict()["image.patch"], before["image.patch"])  # lr 0: unchanged
    with pytest.raises(ValueError, match="unknown parts"):
        CLIPPromptClassifier(backbone, text, image, NAMES, {"vision": {"lr": 1.0}})


def test_contrastive_objective_and_the_previous_prompts_it_keeps(backbone):
    model = _model(backbone, "twin-pixel")
    trainer = _trainer(ContrastiveTrainer, ce_weight=0.2, temperature=2.0)
    data = TensorData({"pixels": torch.randn(8, 3, 32, 32, generator=_gen(6)), "labels": torch.arange(8) % 4})
    batch = dict(data.tensors)
    with torch.no_grad():
        features = model.image_features(batch)
        logits = model(batch)
        same = {**batch, POSITIVE: features, NEGATIVE: features}
        ce = F.cross_entropy(logits, batch["labels"])
        assert trainer.objective(model, same).item() == pytest.approx(0.2 * ce.item() + math.log(2), rel=1e-5)
        flipped = {**batch, POSITIVE: -features, NEGATIVE: features}  # closer to the negative: larger loss
        assert trainer.objective(model, flipped) > trainer.objective(model, same)

    global_state = model.prompt_state()
    first = LocalRound(FitInstructions(round=1, seed=0))  # no previous prompt: the global one stands in
    trainer.train(model, data, first)
    local = {k.removeprefix(PREVIOUS): v for k, v in first.carry_out.items()}
    assert set(first.carry_out) == {PREVIOUS + k for k in global_state}  # carried as previous/<name>
    assert all(torch.equal(local[k], v) for k, v in model.prompt_state().items())
    model.load_state_dict(global_state)
    second = LocalRound(FitInstructions(round=2, seed=0), first.carry_out)  # negative: the round-1 prompt
    trainer.train(model, data, second)
    assert not torch.equal(second.carry_out[PREVIOUS + "image.patch"], local["image.patch"])
    replay = LocalRound(FitInstructions(round=2, seed=0))  # no carried prompt: it trains differently
    model.load_state_dict(global_state)
    trainer.train(model, data, replay)
    assert not torch.equal(
        replay.carry_out[PREVIOUS + "text.context"], second.carry_out[PREVIOUS + "text.context"]
    )
