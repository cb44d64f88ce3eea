"""Each CLIP method as its paper and reference code run it: FedTPG's per-client class sets and pooled
datasets, CoOp's init phrase and class-name cleaning, MaPLe's placement before ln_pre, VPT's prompt
dropout, ATPFL's contrast over the text features, the random patch's seeded positions, and CoOp's
augmentation (cached views for text-side prompts, on the fly for visual ones)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from clip_support import clip_run_config

from fedprompt.config import ConfigError, load_config
from fedprompt.data.images import clean_class_name, load_image_task
from fedprompt.errors import DataError
from fedprompt.federation.instructions import FitInstructions
from fedprompt.seeding import derive_seed
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.augment import VIEWS, CropFlip, SeededTrainData
from fedprompt.training.batching import TensorData
from fedprompt.training.contrastive import NEGATIVE, POSITIVE, ContrastiveTrainer
from fedprompt.training.gradient import GradientTrainer, LocalRound
from optimizers.gradient import GradientOptimizer, GradientSettings
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import TextContext
from prompt_modules.visual_prompts import BATCH_SEED, PixelPrompt, VisualTokenPrompt, vpt_features, vpt_init

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["zero", "one", "two", "three"]
DIGITS = {
    "source": "builtin",
    "name": "digits",
    "test_split": None,
    "max_per_class": 20,
    "max_test_examples": 100,
}


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- FedTPG: per-client class sets


def _two_digit_clients(tiny_clip, **sections) -> dict:
    """Digits pooled as one dataset: FedTPG's rule cuts its 10 classes into clients of 5: 0-4 and 5-9."""
    return clip_run_config(
        tiny_clip,
        {"kind": "generator", "num_tokens": 4, "heads": 2},
        {"source": "datasets", "datasets": [DIGITS]},
        partition={"kind": "classes", "num_clients": 2, "classes_per_client": 5},
        federation={"min_clients": 2},
        **sections,
    )


def test_clients_with_disjoint_classes_get_their_own_generator_input_and_logits(tiny_clip, monkeypatch):
    experiment = build_experiment(load_config(_two_digit_clients(tiny_clip, optimizer={"max_steps": 2})))
    first, second = experiment.clients[0], experiment.clients[1]
    assert first.class_names == ("zero", "one", "two", "three", "four")
    assert second.class_names == ("five", "six", "seven", "eight", "nine")
    for client in (first, second):  # labels renumbered within the client's own classes
        assert sorted(set(client.train_data.labels.tolist())) == [0, 1, 2, 3, 4]

    model = experiment.model
    generator = model.text
    inputs = {c.client_id: generator.class_inputs(model.backbone, c.class_names)[0] for c in (first, second)}
    assert inputs[0].shape == inputs[1].shape == (5, 32) and not torch.allclose(inputs[0], inputs[1])
    with torch.no_grad():
        assert not torch.allclose(generator.context(inputs[0]), generator.context(inputs[1]))

    scored: list[tuple[tuple[str, ...], int]] = []
    objective = GradientTrainer.objective

    def spy(self, model, batch):
        scored.append((model.class_names, model(batch).shape[1]))
        return objective(self, model, batch)

    monkeypatch.setattr(GradientTrainer, "objective", spy)
    state = model.prompt_state()
    for client in (first, second):
        scored.clear()
        client.fit(state, FitInstructions(round=1, seed=derive_seed(0, "client-train", client.client_id, 1)))
        assert scored and all(names == client.class_names and width == 5 for names, width in scored)
    assert model.class_names == tuple(experiment.label_names)  # the server still scores every class


def test_client_classes_all_keeps_one_shared_class_set(tiny_clip):
    config = load_config(_two_digit_clients(tiny_clip, vision={"client_classes": "all"}))
    experiment = build_experiment(config)
    assert all(c.class_names is None for c in experiment.clients.values())
    assert sorted(set(experiment.clients[1].train_data.labels.tolist())) == [5, 6, 7, 8, 9]
    assert load_config(_two_digit_clients(tiny_clip)).client_classes == "own"  # the generator's default
    coop = _two_digit_clients(tiny_clip)
    coop["prompt"] = {"kind": "coop", "num_tokens": 4}
    assert load_config(coop).client_classes == "all"


@pytest.mark.slow
def test_pooled_datasets_report_each_dataset_and_their_mean(tiny_clip):
    generated = {"source": "image-folder", "name": str(tiny_clip.generated)}
    config = clip_run_config(
        tiny_clip,
        {"kind": "generator", "num_tokens": 4, "heads": 2},
        {"source": "datasets", "datasets": [DIGITS, generated], "novel_class_fraction": 0.5},
        partition={"kind": "classes", "num_clients": 2, "classes_per_client": 5},
        federation={"rounds": 1, "min_clients": 2},
        optimizer={"max_steps": 2},
        strategy={"kind": "fedavg", "weighting": "uniform"},
    )
    task = load_image_task(load_config(config).data, seed=0)
    assert task.class_names == ["zero", "one", "two", "three", "four", "blue", "green"]
    assert task.novel_names == ["five", "six", "seven", "eight", "nine", "red", "yellow"]
    assert [(d.label, d.classes, d.novel_classes) for d in task.datasets] == [
        ("digits", (0, 5), (0, 5)),
        ("generated", (5, 7), (5, 7)),
    ]
    from fedprompt.api import run

    result = run(config, write=False)
    row = result.history[-1]
    for part in ("base", "novel"):
        per_dataset = [row[f"digits_{part}_accuracy"], row[f"generated_{part}_accuracy"]]
        assert row[f"{part}_accuracy"] == pytest.approx(sum(per_dataset) / 2)  # FedTPG: mean over datasets
    base, novel = row["base_accuracy"], row["novel_accuracy"]
    assert row["harmonic_mean"] == pytest.approx(2 * base * novel / (base + novel))
    assert result.summary["final_generated_novel_accuracy"] == row["generated_novel_accuracy"]

    resolved = load_config(config).model_dump(mode="json")  # as a run folder or a Flower app keeps it
    assert load_config(resolved) == load_config(config)
    wrong = copy.deepcopy(config)
    wrong["partition"]["num_clients"] = 3
    with pytest.raises(ConfigError, match=r"make 2 clients .* set partition.num_clients: 2"):
        build_experiment(load_config(wrong))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"prompt": {"kind": "coop", "class_specific": True}, "data": {"novel_class_fraction": 0.5}},
            r"prompt.class_specific: class-specific context \(CSC\) .* cannot be evaluated base-to-novel",
        ),
        (
            {
                "prompt": {"kind": "twin", "text": {"class_specific": True}},
                "data": {"novel_class_fraction": 0.5},
            },
            r"prompt.text.class_specific: class-specific context",
        ),
        (
            {"prompt": {"kind": "coop", "class_specific": True}, "vision": {"client_classes": "own"}},
            r"with vision.client_classes: own every client has another one",
        ),
        ({"data": {"source": "datasets"}}, r"source: datasets needs `datasets`"),
        (
            {"data": {"source": "datasets", "datasets": [{"source": "builtin", "name": "digits"}]}},
            r"partition.kind: 'dirichlet' with data.source datasets; use kind: classes",
        ),
        (
            {"data": {"source": "datasets", "test_split": None, "datasets": [{"name": "digits"}]}},
            r"\['test_split'\] belong in each entry of `datasets`",
        ),
        ({"vision": {"augment": {"crop_scale": [0.5, 0.2]}}}, r"crop_scale \[0.5, 0.2\] must satisfy"),
        (
            {"prompt": {"kind": "vpt", "placement": "before-ln-pre", "start_layer": 1}},
            r"needs start_layer: 0",
        ),
        (
            {"prompt": {"kind": "pixel", "random_at_eval": True}},
            r"random_at_eval applies to method: random-patch",
        ),
        (
            {"prompt": {"kind": "coop", "init_text": "a photo of a"}},
            r"init_text is given but init is 'random'",
        ),
    ],
)
def test_clip_fidelity_config_errors_name_the_field_and_the_fix(change, expected):
    raw = {
        "backbone": {"kind": "open-clip", "model": "ViT-B-32", "pretrained": "openai"},
        "prompt": {"kind": "coop"},
        "data": {"source": "builtin", "name": "digits", "test_split": None},
    }
    for section, values in change.items():
        replaces = "kind" in values or "source" in values  # a new section, else a change of the base one
        raw[section] = values if replaces else {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=expected):
        load_config(raw)


def test_vision_section_is_refused_for_text_runs():
    with pytest.raises(ConfigError, match="vision: applies to open-clip backbones only"):
        load_config(overrides=["vision.client_classes=own"])


# --------------------------------------------------------------------------- CoOp: init phrase, class names


def test_init_phrase_sets_the_number_of_context_vectors_without_repeating_it(tiny_clip):
    from fedprompt.tasks.clip.parts import build_text_context

    backbone = OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint))
    config = load_config(
        clip_run_config(tiny_clip, {"kind": "coop", "init": "text", "init_text": "a photo of a"}, DIGITS)
    )
    context = build_text_context(config.prompt, backbone, NAMES, 0, "prompt")
    phrase = backbone.tokenize(["a photo of a"])[0, 1:5]
    assert context.num_tokens == 4  # CoOp: M from the phrase, not the default 16
    assert torch.equal(context.context, backbone.token_embeddings(phrase))

    contradicting = clip_run_config(
        tiny_clip, {"kind": "coop", "init": "text", "init_text": "a photo of a", "num_tokens": 16}, DIGITS
    )
    with pytest.raises(
        ConfigError,
        match=r"prompt.num_tokens: 16 contradicts prompt.init_text 'a photo of a', "
        r"which is 4 tokens; .* set it to 4",
    ):
        build_experiment(load_config(contradicting))  # refused before any weights load
    assert load_config(clip_run_config(tiny_clip, {"kind": "coop"}, DIGITS)).prompt.default_num_tokens == 16


def test_class_names_are_cleaned_for_clip_whatever_the_source(tmp_path, tiny_clip):
    assert clean_class_name("aquarium_fish") == "aquarium fish"
    assert clean_class_name("  maple__tree ") == "maple tree"
    folder = tmp_path / "images"
    for name in ("aquarium_fish", "sea_lion"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            (folder / name / f"{i}.png").write_bytes(
                (tiny_clip.generated / "train" / "red" / f"{i}.png").read_bytes()
            )
    from fedprompt.config import DataConfig
    from fedprompt.data.images import load_image_classification

    data = load_image_classification(
        DataConfig(source="image-folder", name=str(folder), test_fraction=0.34), 0
    )
    assert data.label_names == ["aquarium fish", "sea lion"]
    given = DataConfig(
        source="builtin", name="digits", test_split=None, label_names=[f"digit_{i}" for i in range(10)]
    )
    assert load_image_classification(given, 0).label_names[:2] == ["digit 0", "digit 1"]
    clash = DataConfig(
        source="builtin", name="digits", test_split=None, label_names=["a_b", "a b", *"cdefghij"]
    )
    with pytest.raises(DataError, match=r"class names 'a_b' and 'a b' both read 'a b'"):
        load_image_classification(clash, 0)


# --------------------------------------------------------------------------- MaPLe placement, VPT dropout


def test_prompts_before_ln_pre_follow_maples_equation(backbone):
    """MaPLe appends its visual prompts to the embedded patches and normalises them with ln_pre;
    fedprompt inserts them after the class token instead, which attention cannot tell apart."""
    prompts = vpt_init(backbone, 1, 3, _gen(0)) * 10  # far from unit scale: ln_pre changes them
    pixels = torch.randn(2, 3, 32, 32, generator=_gen(1))
    visual = backbone.model.visual
    with torch.no_grad():
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), patches], dim=1) + visual.positional_embedding
        x = visual.ln_pre(torch.cat([x, prompts[0].expand(2, -1, -1)], dim=1))  # MaPLe: [x; P] -> ln_pre
        expected = backbone.image_head(backbone.vision_layers(x, 0)[:, :-3])
        before = VisualTokenPrompt(prompts, 0, placement="before-ln-pre").eval()
        after = VisualTokenPrompt(prompts, 0).eval()
        torch.testing.assert_close(
            before.features(backbone, {"pixels": pixels}), expected, atol=1e-5, rtol=1e-5
        )
        assert not torch.allclose(after.features(backbone, {"pixels": pixels}), expected, atol=1e-3)
    with pytest.raises(ValueError, match="before ln_pre only when they start at layer 0"):
        VisualTokenPrompt(prompts, 1, placement="before-ln-pre")


def test_prompt_dropout_draws_its_masks_from_the_step_seed(backbone):
    prompts = vpt_init(backbone, 2, 3, _gen(0))
    vpt = VisualTokenPrompt(prompts, 0, dropout=0.25)
    pixels = torch.randn(1, 3, 32, 32, generator=_gen(2))
    hidden = vpt.prepare(backbone, pixels)
    with torch.no_grad():
        masks = _gen(5)
        first, second = (torch.rand(1, 3, 64, generator=masks) >= 0.25 for _ in range(2))
        dropped = torch.stack([prompts[0] * first[0], prompts[1] * second[0]]) / 0.75  # inverted dropout
        expected = vpt_features(backbone, hidden, 0, dropped)
        vpt.train()
        got = vpt.features(backbone, {"image_tokens": hidden, BATCH_SEED: torch.tensor([5])})
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="VPT prompt dropout needs the training step's seed"):
            vpt.features(backbone, {"image_tokens": hidden})
        vpt.eval()  # no dropout at evaluation
        torch.testing.assert_close(
            vpt.features(backbone, {"image_tokens": hidden}), vpt_features(backbone, hidden, 0, prompts)
        )


# ------------------------------------------------------------------- ATPFL: the text side of the contrast


def test_contrast_covers_the_class_text_features_beside_a_pixel_patch(backbone):
    text = TextContext(torch.randn(4, 64, generator=_gen(0)) * 0.02)
    model = CLIPPromptClassifier(backbone, text, PixelPrompt("patch", 8, backbone.image_size), NAMES)
    optimizer = GradientOptimizer(GradientSettings(algorithm="adamw", lr=0.05, epochs=1, grad_clip=None))
    trainer = ContrastiveTrainer(optimizer, 4, "cpu", ce_weight=0.2, temperature=2.0, text_contrast=True)
    data = TensorData({"pixels": torch.randn(8, 3, 32, 32, generator=_gen(6)), "labels": torch.arange(8) % 4})
    batch = dict(data.tensors)
    with torch.no_grad():
        z = model.image_features(batch)
        g = model.class_features()
        z_g, z_p = F.normalize(z + 0.3, dim=-1), F.normalize(z - 0.3, dim=-1)
        g_g, g_p = F.normalize(g + 0.2, dim=-1), F.normalize(g.flip(0), dim=-1)
        trainer._class_targets = (g_g, g_p)
        ce = F.cross_entropy(model(batch), batch["labels"])

        def softplus_mean(a, pos, neg):
            return sum(
                math.log1p(math.exp(((a[i] @ neg[i]) - (a[i] @ pos[i])).item() / 2)) for i in range(len(a))
            ) / len(a)

        expected = 0.2 * ce.item() + softplus_mean(z, z_g, z_p) + softplus_mean(g, g_g, g_p)
        got = trainer.objective(model, {**batch, POSITIVE: z_g, NEGATIVE: z_p})
        assert got.item() == pytest.approx(expected, rel=1e-5)

    global_state = model.prompt_state()
    first = LocalRound(FitInstructions(round=1, seed=0))
    trainer.train(model, data, first)
    positive, negative = trainer._class_targets
    assert positive.shape == (4, 32) and torch.equal(positive, negative)  # first round: no previous prompt
    model.load_state_dict(global_state)
    trainer.train(model, data, LocalRound(FitInstructions(round=2, seed=0), carried=first.carry_out))
    positive, negative = trainer._class_targets
    model.load_state_dict(global_state)
    with torch.no_grad():
        torch.testing.assert_close(positive, model.class_features())  # the positive: the global context
    assert not torch.allclose(positive, negative)  # the negative: the text context of round 1


# --------------------------------------------------------------------------- random patch: seeded positions


def test_random_patch_gives_the_same_update_whatever_ran_before(tiny_clip):
    config = load_config(
        clip_run_config(
            tiny_clip,
            {"kind": "pixel", "method": "random-patch", "size": 8},
            {"source": "image-folder", "name": str(tiny_clip.generated)},
            optimizer={"max_steps": 3, "lr": 0.05},
        )
    )

    def fit(experiment, client: int, round_num: int) -> dict[str, torch.Tensor]:
        instructions = FitInstructions(
            round=round_num, seed=derive_seed(0, "client-train", client, round_num)
        )
        return experiment.clients[client].fit(initial, instructions).update.state

    alone = build_experiment(config)
    initial = alone.model.prompt_state()
    reference = fit(alone, 1, 2)
    busy = build_experiment(config)
    fit(busy, 0, 1), fit(busy, 1, 1), fit(busy, 2, 2)  # other clients and rounds first, in one process
    again = fit(busy, 1, 2)
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    other_round = fit(busy, 1, 3)
    assert not torch.equal(reference["image.patch"], other_round["image.patch"])  # seeded by round too


# --------------------------------------------------------------------------- augmentation


def test_crop_flip_is_torchvisions_random_resized_crop_and_flip_from_the_seed():
    image = torch.randn(3, 32, 32, generator=_gen(0))
    augment = CropFlip(scale=(0.08, 1.0))
    out = augment(image, 7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        top, left, height, width = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
    expected = TF.resized_crop(image, top, left, height, width, [32, 32], antialias=True)
    assert torch.equal(out, expected.flip(-1) if flip else expected)
    assert torch.equal(augment(image, 7), out) and not torch.equal(augment(image, 8), out)
    flips = [CropFlip(scale=(1.0, 1.0), ratio=(1.0, 1.0))(image, s) for s in range(20)]
    assert {bool(torch.equal(f, image)) for f in flips} == {True, False}  # whole image, flipped or not


def test_training_batches_draw_one_cached_view_per_example_from_the_step_seed():
    views = torch.arange(6 * 4 * 2, dtype=torch.float32).reshape(6, 4, 2)  # 6 images, K = 4 views
    data = SeededTrainData({VIEWS: views, "labels": torch.arange(6)})
    first = list(data.batches(3, generator=_gen(0)))
    again = list(data.batches(3, generator=_gen(0)))
    for batch, same in zip(first, again, strict=True):
        assert torch.equal(batch["image_features"], same["image_features"]) and VIEWS not in batch
        rows = batch["labels"]
        picked = [
            (views[r] == f).all(-1).nonzero().item()
            for r, f in zip(rows, batch["image_features"], strict=True)
        ]
        seed = int(batch[BATCH_SEED])
        assert picked == torch.randint(4, (3,), generator=_gen(derive_seed(seed, "augment"))).tolist()
    plain = next(iter(data.batches(6)))
    assert torch.equal(plain["image_features"], views[:, 0]) and BATCH_SEED not in plain


def test_text_prompts_train_on_cached_views_and_visual_prompts_augment_on_the_fly(tiny_clip):
    data = {"source": "image-folder", "name": str(tiny_clip.generated)}
    augment = {"augment": {"views": 3}}
    coop = build_experiment(
        load_config(clip_run_config(tiny_clip, {"kind": "coop", "num_tokens": 4}, data, vision=augment))
    )
    client = coop.clients[0]
    assert isinstance(client.train_data, SeededTrainData)
    views = client.train_data.tensors[VIEWS]
    assert views.shape[1:] == (3, 32) and "image_features" not in client.train_data.tensors
    plain = build_experiment(load_config(clip_run_config(tiny_clip, {"kind": "coop", "num_tokens": 4}, data)))
    features = plain.clients[0].train_data.tensors["image_features"]
    assert not torch.allclose(views[:, 0], features) and not torch.allclose(views[:, 0], views[:, 1])
    assert torch.equal(coop.test_data.tensors["image_features"], plain.test_data.tensors["image_features"])

    vpt = build_experiment(
        load_config(clip_run_config(tiny_clip, {"kind": "vpt", "num_tokens": 2}, data, vision=augment))
    )
    train = vpt.clients[0].train_data
    assert isinstance(train, SeededTrainData) and train.augment is not None
    assert "pixels" in train.tensors and "image_tokens" not in train.tensors
    batch = next(iter(train.batches(4, generator=_gen(0))))
    assert batch["pixels"].shape == (4, 3, 32, 32)
    assert not any(torch.equal(batch["pixels"][0], p) for p in train.tensors["pixels"])  # augmented
    assert "image_tokens" in vpt.test_data.tensors  # evaluation keeps the cached states
    state = vpt.model.prompt_state()
    update = vpt.clients[0].fit(state, FitInstructions(round=1, seed=1)).update
    assert not torch.equal(update.state["image.prompts"], state["image.prompts"])
    assert np.isfinite(update.metrics["train_loss"])


@pytest.mark.slow
def test_one_dataset_reports_base_and_novel_against_their_own_class_names(tiny_clip):
    from fedprompt.api import run

    config = clip_run_config(
        tiny_clip,
        {"kind": "generator", "num_tokens": 4, "heads": 2},
        {**DIGITS, "novel_class_fraction": 0.5},
        federation={"rounds": 1},
        optimizer={"max_steps": 1},
    )
    experiment = build_experiment(load_config(config))
    assert experiment.eval_sets["base"].class_names == ["zero", "one", "two", "three", "four"]
    assert experiment.eval_sets["novel"].class_names == ["five", "six", "seven", "eight", "nine"]
    assert experiment.eval_sets["base"].group is None
    row = run(config, write=False).history[-1]
    assert row["global_accuracy"] == row["base_accuracy"]  # the server's test set is the base classes'
    assert "dataset_mean_accuracy" not in row
