"""End to end: FedAvg of the VQA prompts on a small generated VQA set (SLAKE's file format, one client
per organ) with the tiny CLIP, in process; the report beside the majority-answer baseline."""

from __future__ import annotations

import pytest
import torch
from clip_support import clip_run_config
from vqa_support import write_slake

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.tasks.registry import build_experiment


@pytest.fixture(scope="module")
def slake_set(tmp_path_factory):
    return write_slake(tmp_path_factory.mktemp("slake"), {"train": 48, "test": 24})


def vqa_config(tiny_clip, slake_set, prompt=None, **sections):
    config = clip_run_config(
        tiny_clip,
        prompt or {"kind": "vqa-twin", "visual": None, "question": {"num_tokens": 4}, "fusion_hidden": 64},
        {"source": "vqa", "vqa": {"format": "slake", "path": str(slake_set), "client_field": "organ"}},
        partition={"kind": "iid", "num_clients": 2, "local_val_fraction": 0.0},
        federation={"rounds": 4, "min_clients": 2, "local_evaluation": False},
        optimizer={"kind": "gradient", "algorithm": "adamw", "lr": 0.01, "epochs": 2, "batch_size": 16},
    )
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def test_fedavg_vqa_learns_above_the_majority_baseline(tiny_clip, slake_set):
    result = fedprompt.run(vqa_config(tiny_clip, slake_set), write=False)
    baseline = result.summary["majority_baseline"]
    assert result.summary["clients"] == {"0": "Chest", "1": "Head"}
    last = result.history[-1]
    assert {"closed_accuracy", "open_accuracy", "type_color_accuracy"} <= last.keys()
    assert last["global_accuracy"] > baseline["global"] + 0.15, (last, baseline)
    assert last["open_accuracy"] > baseline["open"] + 0.25
    # overall accuracy is the question-weighted mean of the closed and open accuracies (24 each)
    assert last["global_accuracy"] == pytest.approx((last["closed_accuracy"] + last["open_accuracy"]) / 2)
    assert result.summary["final_closed_accuracy"] == last["closed_accuracy"]
    assert result.summary["data_rows"] == {"train": 96, "test": 48, "skipped": 0}


def test_closed_questions_of_a_trained_model_answer_yes_or_no(tiny_clip, slake_set):
    config = load_config(vqa_config(tiny_clip, slake_set, federation={"rounds": 1}))
    experiment = build_experiment(config)
    model, test = experiment.model, experiment.test_data
    with torch.no_grad():
        predicted = [model.answers[i] for i in model(next(test.batches(len(test)))).argmax(1).tolist()]
    closed = test.tensors["closed"].tolist()
    assert sum(closed) == 24
    assert all(p in ("yes", "no") for p, c in zip(predicted, closed, strict=True) if c)
    assert not any(p in ("yes", "no") for p, c in zip(predicted, closed, strict=True) if not c)


def test_vpt_and_answer_context_run_and_travel_as_prompt_state(tiny_clip, slake_set):
    prompt = {
        "kind": "vqa-twin",
        "question": {"num_tokens": 2},
        "answer": {"kind": "coop", "num_tokens": 2},
        "visual": {"kind": "vpt", "num_tokens": 2},
        "fusion": "sum",
    }
    config = vqa_config(tiny_clip, slake_set, prompt, federation={"rounds": 1}, optimizer={"epochs": 1})
    result = fedprompt.run(config, write=False)
    assert set(result.final_state) == {"question.context", "answer.context", "image.prompts"}
    assert result.history[-1]["clients_accepted"] == 2


def test_client_field_must_match_the_number_of_clients(tiny_clip, slake_set):
    config = load_config(vqa_config(tiny_clip, slake_set, partition={"num_clients": 3}))
    with pytest.raises(ConfigError, match=r"has 2 values \['Chest', 'Head'\]: set partition.num_clients: 2"):
        build_experiment(config)
