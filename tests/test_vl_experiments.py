"""apps.vl_experiments: every CLIP prompt method and zero-shot CLIP on the same data, partition and
seeds; the table equals the runs' metrics files; reproducible; bad experiments refused before a model
loads. End to end on the tiny CLIP and the generated colour squares (tests/clip_support.py)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from apps.vl_experiments.cli import main
from apps.vl_experiments.config import default_experiment_dict, load_experiment
from apps.vl_experiments.methods import METHOD_SETTINGS, METHOD_TITLES, SECTIONS
from apps.vl_experiments.runner import run_comparison, select
from fedprompt.config import ConfigError, load_config
from fedprompt.tasks.registry import build_experiment
from fedprompt.training.gradient import evaluate
from prompt_modules.clip_backbone import OpenCLIPBackbone
from prompt_modules.clip_classifier import CLIPPromptClassifier
from prompt_modules.clip_text_context import FixedClassText
from prompt_modules.visual_prompts import FrozenImage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = list(default_experiment_dict()["methods"])
TRAINED = [m for m in METHODS if m != "zero-shot"]
ACCURACIES = ("base_accuracy", "novel_accuracy", "harmonic_mean", "local_accuracy_mean")


def tiny_overrides(tiny_clip) -> list[str]:
    """The embedded experiment on the tiny CLIP: colour squares (2 base and 2 novel colours), 3 clients,
    2 rounds, few images; VPT from the tiny tower's second layer, PromptFL with 2 cached views."""
    data = {
        "source": "image-folder",
        "name": str(tiny_clip.generated),
        "test_split": "test",
        "max_per_class": 12,
        "max_test_examples": 40,
        "novel_class_fraction": 0.5,
    }
    return [
        f"backbone.model={tiny_clip.config}",
        f"backbone.pretrained={tiny_clip.checkpoint}",
        f"data={json.dumps(data)}",
        'class_template="{}"',  # the tiny CLIP's image projection was fitted to the bare class names
        "partition={kind: iid, num_clients: 3, local_val_fraction: 0.25}",
        "federation.rounds=2",
        "federation.min_clients=3",
        "methods.vpt.prompt.start_layer=1",
        "methods.promptfl.vision.augment.views=2",
        "output.plot=false",
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def value(cell: str) -> float | None:
    return None if cell == "" else float(cell)


@pytest.fixture(scope="module")
def compared(tiny_clip, tmp_path_factory, one_intra_op_thread):
    """The command run once: every method, seeds 0 and 1."""
    out = tmp_path_factory.mktemp("compared") / "out"
    argv = ["--seeds", "0", "1", "--out", str(out)]
    for item in tiny_overrides(tiny_clip):
        argv += ["--set", item]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_the_command_runs_every_method_with_every_seed_into_one_folder(compared, capsys):
    for method in METHODS:
        for seed in (0, 1):
            folder = compared / "runs" / f"{method}-seed{seed}"
            assert (folder / "metrics.jsonl").is_file() and (folder / "summary.json").is_file()
            assert load_config(yaml.safe_load((folder / "config.yaml").read_text())).seed == seed
    runs = read_csv(compared / "runs.csv")
    assert [(r["method"], int(r["seed"])) for r in runs] == [(m, s) for s in (0, 1) for m in METHODS]
    rows = read_csv(compared / "comparison.csv")
    assert [r["method"] for r in rows] == METHODS and all(r["seeds"] == "0 1" for r in rows)
    markdown = (compared / "comparison.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| method | seeds | base | novel | HM | local (client mean) |")
    titles = [line.split(" | ")[0].removeprefix("| ") for line in table[1:]]
    assert titles == [METHOD_TITLES[m] for m in METHODS]
    assert "class template '{}'" in markdown and "base-to-novel" in markdown
    for key in ("harmonic_mean", "base_accuracy", "novel_accuracy", "local_accuracy_mean"):
        assert (compared / "plots" / f"{key}.png").read_bytes().startswith(PNG_SIGNATURE)
    experiment = yaml.safe_load((compared / "experiment.yaml").read_text())
    assert experiment["seeds"] == [0, 1] and list(experiment["methods"]) == METHODS


@pytest.mark.slow
def test_the_table_holds_the_values_of_the_runs_metrics_files(compared):
    runs = read_csv(compared / "runs.csv")
    for run in runs:
        folder = compared / "runs" / run["folder"]
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for key in ACCURACIES:
            assert value(run[key]) == [row[key] for row in history if key in row][-1]
        trained = [row for row in history if row["round"] > 0]
        assert len(trained) == (0 if run["method"] == "zero-shot" else 2)
        for way in ("up", "down"):
            per_round = [row[f"bytes_{way}_per_client"] for row in trained]
            assert value(run[f"bytes_{way}_per_client_round"]) == (sum(per_round) / 2 if trained else 0.0)
        summary = json.loads((folder / "summary.json").read_text())
        assert value(run["wall_time_s"]) == summary["wall_time_s"] > 0

    markdown = (compared / "comparison.md").read_text()
    for row in read_csv(compared / "comparison.csv"):
        mine = [r for r in runs if r["method"] == row["method"]]
        for key in (*ACCURACIES, "bytes_up_per_client_round", "wall_time_s"):
            numbers = [value(r[key]) for r in mine]
            assert value(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(numbers), abs=1e-15)
            assert value(row[f"{key}_std"]) == pytest.approx(statistics.stdev(numbers), abs=1e-15)
        mean, std = value(row["harmonic_mean_mean"]), value(row["harmonic_mean_std"])
        assert f"| {mean:.4f} ± {std:.4f} |" in markdown
    bytes_up = {r["method"]: value(r["bytes_up_per_client_round"]) for r in runs}
    assert bytes_up["zero-shot"] == 0 and all(bytes_up[m] > 0 for m in TRAINED)


@pytest.mark.slow
def test_every_method_trains_on_the_same_data_partition_and_seed(compared):
    for seed in (0, 1):
        configs = {
            m: yaml.safe_load((compared / "runs" / f"{m}-seed{seed}" / "config.yaml").read_text())
            for m in METHODS
        }
        for section in ("seed", "backbone", "data", "partition", "federation", "payload", "runtime"):
            assert all(c[section] == configs["promptfl"][section] for c in configs.values()), section
        examples = {}
        for method in METHODS:
            clients = compared / "runs" / f"{method}-seed{seed}" / "clients.jsonl"
            rows = [json.loads(line) for line in clients.read_text().splitlines()]
            held_out = {(r["client_id"], r["num_examples"]) for r in rows if r["event"] == "evaluate"}
            trained = {(r["client_id"], r["num_examples"]) for r in rows if r["event"] == "fit"}
            examples[method] = (held_out, trained)
        assert len({frozenset(held) for held, _ in examples.values()}) == 1  # the same held-out splits
        assert len({frozenset(fit) for m, (_, fit) in examples.items() if m != "zero-shot"}) == 1


@pytest.mark.slow
def test_zero_shot_is_the_untrained_template_model(compared, tiny_clip):
    folder = compared / "runs" / "zero-shot-seed0"
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in history] == [0] and not (folder / "checkpoint.safetensors").exists()

    experiment = build_experiment(load_config(yaml.safe_load((folder / "config.yaml").read_text())))
    backbone = OpenCLIPBackbone.load(str(tiny_clip.config), str(tiny_clip.checkpoint))
    names = experiment.label_names
    template = CLIPPromptClassifier(backbone, FixedClassText("{}"), FrozenImage(), names).eval()
    base = evaluate(template, experiment.test_data, 64, "cpu")["accuracy"]
    novel_set = experiment.eval_sets["novel"]
    with template.scoring(novel_set.class_names):
        novel = evaluate(template, novel_set.data, 64, "cpu")["accuracy"]
    assert (history[0]["base_accuracy"], history[0]["novel_accuracy"]) == (base, novel)
    assert base > 0.5 and novel > 0.5  # the tiny CLIP knows the colour names: above chance


@pytest.mark.slow
def test_the_same_seed_gives_the_same_table_bit_for_bit(compared, tiny_clip, tmp_path):
    methods = ["zero-shot", "atpfl", "fedtpg"]
    config = select(load_experiment(None, tiny_overrides(tiny_clip)), seeds=[1], methods=methods)
    again = run_comparison(config, tmp_path / "again")
    first = {r["method"]: r for r in read_csv(compared / "runs.csv") if r["seed"] == "1"}
    for row in read_csv(again.folder / "runs.csv"):
        kept = {k: v for k, v in row.items() if k != "wall_time_s"}
        assert kept == {k: v for k, v in first[row["method"]].items() if k != "wall_time_s"}
    for method in methods[1:]:
        a = load_file(compared / "runs" / f"{method}-seed1" / "final_prompt.safetensors")
        b = load_file(again.folder / "runs" / f"{method}-seed1" / "final_prompt.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seedz=[1]", "seedz: is not a known field; allowed: name, seeds, class_template, backbone"),
        ("methods.vpt.promt={}", "methods.vpt.promt: is not a known field; allowed: base, prompt, optimizer"),
        ("methods.vpt.prompt.num_tokens=0", "methods.vpt: prompt.vpt.num_tokens: Input should be greater"),
        ("methods.tpfl.optimizer.algorithm=adam", "methods.tpfl: optimizer.gradient.algorithm: Input should"),
        ("methods.coop={}", "methods.coop: unknown method; name one of ['zero-shot', 'promptfl'"),
        ("methods.zero-shot.prompt={num_tokens: 4}", "methods.zero-shot: zero-shot CLIP trains nothing"),
        ("data.novel_class_fraction=null", "data.novel_class_fraction: the comparison evaluates base-to"),
        ("class_template=a photo", "class_template: the class template needs '{}' exactly once"),
        ("backbone.kind=hf-text", "backbone.kind: Input should be 'open-clip'"),
        ("seeds=[0, 0]", "seeds must be distinct non-negative integers"),
    ],
)
def test_a_bad_experiment_is_refused_with_its_field_and_fix(override, expected, tiny_clip):
    with pytest.raises(ConfigError) as error:
        load_experiment(None, [*tiny_overrides(tiny_clip), override])
    assert expected in str(error.value)


def test_mistakes_stop_the_command_before_any_model_loads(tiny_clip, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(OpenCLIPBackbone, "load", no_loading)
    base = [item for override in tiny_overrides(tiny_clip) for item in ("--set", override)]
    out = tmp_path / "out"

    assert main([*base, "--set", "methods.vpt.prompt.start_layer=2", "--out", str(out)]) == 2
    assert "error: invalid experiment configuration: methods.vpt: prompt.start_layer: 2 is past the last " \
        "vision layer (0..1)" in capsys.readouterr().err  # fmt: skip
    assert main([*base, "--methods", "promptfl", "maple", "--out", str(out)]) == 2
    assert "--methods ['maple']: not in the experiment" in capsys.readouterr().err
    (out / "earlier").mkdir(parents=True)
    assert main([*base, "--out", str(out)]) == 2
    assert "is not a new or empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["earlier"]


def test_a_missing_bundled_backbone_is_named_with_the_way_out(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("apps.vl_experiments.config.bundled_clip_available", lambda: False)
    assert load_experiment().backbone.model == "bundled:demo-clip"  # the default, validated
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "backbone.model 'bundled:demo-clip': this fedprompt has no bundled CLIP" in err
    assert "--set backbone.model=ViT-B-16 --set backbone.pretrained=openai" in err
    assert not (tmp_path / "out").exists()


def test_method_settings_merge_over_the_method_configs_and_share_the_rest(tiny_clip):
    overrides = [
        *tiny_overrides(tiny_clip),
        "methods.vpt.optimizer.lr=0.5",
        "methods.tpfl.prompt.visual={kind: vpt, num_tokens: 2}",
        "methods.maple={base: tpfl, prompt: {visual: {kind: vpt, num_tokens: 16}, coupled: true}}",
    ]
    config = load_experiment(None, overrides)
    vpt = config.run_config("vpt", 3)
    assert (vpt.optimizer.lr, vpt.optimizer.algorithm, vpt.optimizer.momentum) == (0.5, "sgd", 0.9)
    assert (vpt.prompt.num_tokens, vpt.prompt.dropout, vpt.prompt.start_layer) == (8, 0.1, 1)
    assert vpt.prompt.class_template == "{}" and vpt.seed == 3 and vpt.name == "vl-experiments-vpt"
    tpfl = config.run_config("tpfl", 0)
    assert tpfl.prompt.visual.kind == "vpt" and tpfl.prompt.visual.num_tokens == 2
    assert tpfl.prompt.text_optimizer.lr == 0.002 and tpfl.prompt.visual_optimizer.lr == 40.0
    maple = config.run_config("maple", 0)
    assert maple.prompt.coupled and maple.prompt.visual.num_tokens == 16 and not maple.prompt.contrastive
    assert config.run_config("atpfl", 0).prompt.contrastive
    assert config.run_config("fedtpg", 0).client_classes == "own"
    assert config.run_config("promptfl", 0).data == config.run_config("fedtpg", 0).data == config.data


@pytest.mark.parametrize("method", ["promptfl", "vpt", "tpfl", "fedtpg", "fedapt", "fed-dpt"])
def test_method_settings_are_those_of_the_method_configs(method):
    ready = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())
    for section in SECTIONS:
        assert METHOD_SETTINGS[method].get(section) == ready.get(section), section
    assert METHOD_SETTINGS["atpfl"] == {
        **METHOD_SETTINGS["tpfl"],
        "prompt": {**METHOD_SETTINGS["tpfl"]["prompt"], "contrastive": True},
    }
    for personal, section in (("split", {"shared_tokens": 8}), ("finetuned", {"finetune_steps": 20})):
        assert METHOD_SETTINGS[personal] == {**METHOD_SETTINGS["promptfl"], "personalization": section}


def test_configs_vl_experiments_is_the_embedded_default():
    assert yaml.safe_load((CONFIGS / "vl-experiments.yaml").read_text()) == default_experiment_dict()
    assert load_experiment(CONFIGS / "vl-experiments.yaml") == load_experiment()


def domain_overrides(tiny_clip) -> list[str]:
    """configs/vl-domains.yaml on the tiny CLIP: the digit-domains at a few images per class, 2 rounds."""
    data = {
        "source": "builtin",
        "name": "digit-domains",
        "domains": {"include": ["plain", "inverted", "rotated"], "held_out": "rotated"},
        "max_per_class": 4,
        "max_test_examples": 30,
    }
    return [
        f"backbone.model={tiny_clip.config}",
        f"backbone.pretrained={tiny_clip.checkpoint}",
        f"data={json.dumps(data)}",
        'class_template="{}"',
        "partition.num_clients=2",
        "federation.rounds=2",
        "federation.min_clients=2",
        "methods.promptfl.vision.augment.views=2",
        "methods.split.vision.augment.views=2",
        "methods.finetuned.vision.augment.views=2",
        "methods.finetuned.personalization.finetune_steps=2",
        "methods.fedapt.prompt.context.num_tokens=4",
        "methods.fed-dpt.prompt.text.num_tokens=4",
    ]


@pytest.mark.slow
def test_the_comparison_across_domains_reports_each_domain_the_worst_and_the_held_out(
    tiny_clip, tmp_path, one_intra_op_thread
):
    methods = ["zero-shot", "promptfl", "split", "finetuned", "fedapt", "fed-dpt"]
    config = select(
        load_experiment(CONFIGS / "vl-domains.yaml", domain_overrides(tiny_clip)), methods=methods
    )
    assert config.across_domains
    comparison = run_comparison(config, tmp_path / "out")
    table = [line for line in comparison.markdown.splitlines() if line.startswith("| ")]
    assert table[0].startswith(
        "| method | seeds | plain | inverted | domain mean | worst domain | held-out domain | local (client "
        "mean) | personal (client mean) | fine-tuned (client mean) | up B/client/round |"
    )
    assert "across domains" in comparison.markdown and "'rotated' is held out" in comparison.markdown
    runs = read_csv(tmp_path / "out" / "runs.csv")
    for run in runs:
        history = [
            json.loads(line)
            for line in (tmp_path / "out" / "runs" / run["folder"] / "metrics.jsonl").read_text().splitlines()
        ]
        last = [row for row in history if "domain_mean_accuracy" in row][-1]
        for key in ("domain_plain_accuracy", "domain_inverted_accuracy", "held_out_accuracy"):
            assert value(run[key]) == last[key]
        assert last["domain_mean_accuracy"] == pytest.approx(
            (last["domain_plain_accuracy"] + last["domain_inverted_accuracy"]) / 2
        )
        assert last["domain_worst_accuracy"] == min(
            last["domain_plain_accuracy"], last["domain_inverted_accuracy"]
        )
    by_method = {r["method"]: r for r in runs}
    assert value(by_method["split"]["personal_accuracy_mean"]) is not None
    assert value(by_method["finetuned"]["finetuned_accuracy_mean"]) is not None
    assert value(by_method["promptfl"]["personal_accuracy_mean"]) is None
    for key in ("domain_mean_accuracy", "domain_worst_accuracy", "held_out_accuracy"):
        assert (tmp_path / "out" / "plots" / f"{key}.png").read_bytes().startswith(PNG_SIGNATURE)
