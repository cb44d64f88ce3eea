"""Fed-BBPT: a prompt generator per client, trained by SPSA against a model it only queries (the
served backbone over HTTP), only the generator's weights aggregated, every query counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.serving import InferenceService, create_app, serve_in_thread
from fedprompt.tasks.text.parts import load_backbone
from prompt_modules.intrinsic_generator import ZGenerator

from conftest import tiny_run_config, write_keyword_dataset

TOKEN = "simulation-token-0123456789"
GENERATOR = {"kind": "intrinsic", "dim": 50, "num_tokens": 4, "generator": {"code_dim": 8, "hidden": 16}}
SPSA = {"kind": "spsa", "lr": 0.2, "epsilon": 0.1, "budget": 2 * 16 * 20, "batch_size": 16}


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl")


def test_the_generator_writes_z_by_hand():
    g = ZGenerator(dim=2, code_dim=3, hidden=2, seed=0)
    assert g.num_weights == 2 * 3 + 2 + 2 * 2 + 2
    assert torch.equal(g.z, torch.zeros(2))  # W₂ = b₂ = 0: z starts at 0, as Black-Box Tuning's
    weights = torch.arange(14, dtype=torch.float32) / 10
    w1, b1 = weights[:6].reshape(2, 3), weights[6:8]
    w2, b2 = weights[8:12].reshape(2, 2), weights[12:]
    expected = w2 @ torch.tanh(w1 @ g.code + b1) + b2
    assert torch.allclose(g.z_of(weights), expected, rtol=1e-6, atol=0)
    both = g.z_of(torch.stack([weights, torch.zeros(14)]))
    assert torch.allclose(both[0], expected, rtol=1e-6) and torch.equal(both[1], torch.zeros(2))
    assert list(g.state_dict()) == ["weights"]  # the code is fixed and never travels


def test_generator_configurations_are_checked(keywords):
    base = {**tiny_run_config(keywords), "prompt": GENERATOR}
    with pytest.raises(ConfigError, match="searched by SPSA or trained by gradient"):
        load_config({**base, "optimizer": {"kind": "cmaes"}})
    with pytest.raises(ConfigError, match="searches z itself"):
        load_config({**base, "optimizer": SPSA, "strategy": {"kind": "fedkseed"}})


def test_fed_bbpt_through_the_service_learns_with_every_query_counted(keywords, monkeypatch):
    """Clients query the served model (weights behind HTTP) with the z their generators write,
    train the generators by SPSA, and the server averages the generators: the global accuracy
    rises above its start, only the generator's weights travel, and the service counted exactly the
    queries the clients report (plus the server's evaluations)."""
    local_config = tiny_run_config(
        keywords, federation={"rounds": 3, "min_clients": 2, "local_evaluation": False}
    )
    local_config.update(prompt=GENERATOR, optimizer=SPSA)
    cfg = load_config(local_config)
    service = InferenceService(load_backbone(cfg.backbone, cfg.head.kind, cfg.seed), "tiny")
    monkeypatch.setenv("FEDPROMPT_API_TOKEN", TOKEN)
    with serve_in_thread(create_app(service, {"simulation": TOKEN})) as url:
        remote = fedprompt.run({**local_config, "backbone": {"kind": "remote", "url": url}}, write=False)
    accuracy = remote.metric("global_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.05, accuracy
    weights = 8 * 16 + 16 + 50 * 16 + 50
    assert set(remote.final_state) == {"prompt.weights"} and remote.final_state["prompt.weights"].shape == (
        weights,
    )
    trained = [row for row in remote.client_history if row.get("event") == "fit" and row.get("accepted")]
    assert trained and all(row["queries"] == 20 * 2 * 16 for row in trained)
    evaluation = 4 * round(600 * 0.25)  # the server's test set, scored at rounds 0 to 3
    assert service.usage("simulation").queries == sum(row["queries"] for row in trained) + evaluation
    local = fedprompt.run(local_config, write=False)  # the same generator on a backbone in this process
    assert torch.equal(local.final_state["prompt.weights"], remote.final_state["prompt.weights"])


def test_the_same_generator_trains_by_gradient_on_a_local_backbone(keywords):
    raw = tiny_run_config(keywords, federation={"rounds": 2}, optimizer={"lr": 0.01})
    config = {**raw, "prompt": GENERATOR}
    result = fedprompt.run(config, write=False)
    accuracy = result.metric("global_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.05, accuracy
    assert set(result.final_state) == {"prompt.weights"}


# ----------------------------------------------------------------------------- CLIP behind its logits


def test_the_visual_generator_writes_a_prompt_per_image_and_starts_at_none():
    from prompt_modules.visual_generator import VisualPromptGenerator

    g = VisualPromptGenerator(grid=2, hidden=3, prompt_size=2, scale=0.5, seed=0)
    assert g.num_weights == 3 * 12 + 3 + 12 * 3 + 12 and list(g.state_dict()) == ["weights"]
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g.prompts(pixels), torch.zeros(2, 3, 8, 8))  # W₂ = b₂ = 0: no prompt yet
    weights = torch.randn(g.num_weights, generator=torch.Generator().manual_seed(2))
    prompts = g.prompts(pixels, weights)
    w1, b1 = weights[:36].reshape(3, 12), weights[36:39]
    w2, b2 = weights[39:75].reshape(12, 3), weights[75:]
    small = torch.tanh(torch.nn.functional.adaptive_avg_pool2d(pixels, 2).flatten(1) @ w1.T + b1) @ w2.T + b2
    expected = 0.5 * torch.nn.functional.interpolate(small.reshape(2, 3, 2, 2), size=(8, 8), mode="bilinear")
    assert torch.allclose(prompts, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(prompts[0], prompts[1])  # one prompt per image


DIGITS = {
    "source": "builtin",
    "name": "digits",
    "test_split": None,
    "max_per_class": 30,
    "max_test_examples": 200,
}
VISUAL = {"kind": "visual-generator", "grid": 4, "hidden": 16, "prompt_size": 4, "class_template": "{}"}


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_fed_bbpt_on_clip_learns_through_its_logits_alone(tiny_clip):
    """The tiny CLIP is reached only through CLIPLogitsAPI (prompted pixels in, logits out, no graph):
    clients train their generators by SPSA from those logits, the server averages the generators,
    the global accuracy rises above the start, and the API counted exactly the queries the clients
    report."""
    from clip_support import clip_run_config

    from fedprompt.execution.simulation import run_in_process
    from fedprompt.tasks.registry import build_experiment

    raw = clip_run_config(tiny_clip, VISUAL, DIGITS)
    raw["optimizer"] = {"kind": "spsa", "lr": 0.002, "epsilon": 0.01, "budget": 2 * 16 * 40, "batch_size": 16}
    config = load_config(raw)
    experiment = build_experiment(config)
    result = run_in_process(experiment, config)
    accuracy = result.metric("global_accuracy")
    assert accuracy[-1] > accuracy[0] + 0.05, accuracy
    assert set(result.final_state) == {"image.weights"}
    fits = [row for row in result.client_history if row.get("event") == "fit"]
    assert fits and all(row["queries"] == 2 * 16 * 40 for row in fits)
    assert experiment.model.api.queries == sum(row["queries"] for row in fits)
    with pytest.raises(ConfigError, match="searches a text prompt"):
        load_config({**raw, "strategy": {"kind": "fedkseed"}})


def _tensor_bytes(payload: bytes) -> dict[str, tuple[str, list[int], int]]:
    """Each tensor of safetensors bytes: (dtype, shape, bytes of its data), from the header."""
    header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    header.pop("__metadata__", None)
    return {
        name: (t["dtype"], t["shape"], t["data_offsets"][1] - t["data_offsets"][0])
        for name, t in header.items()
    }


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_fed_bbpt_on_clip_runs_on_flower_as_in_process_sending_only_the_generator(
    tiny_clip, tmp_path, monkeypatch
):
    """The CLIP Fed-BBPT job through the Flower runtime (ServerApp and ClientApps exchanging Flower
    messages in memory): every train message down and every update up holds the generator's weights
    and nothing else (the tensor bytes are the generator's parameter bytes, float32, and the bytes
    the run records per client and round are those messages' payloads, header included), and the
    global prompt and every recorded number equal the in-process run's, bit for bit."""
    from clip_support import clip_run_config
    from flower_support import InMemoryGrid, assert_same_history, client_app_nodes, write_app
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.flower import run_server
    from fedprompt.flower.app_config import AppSettings
    from fedprompt.flower.client_app import build_client_app
    from fedprompt.flower.records import read_instructions, read_payload
    from prompt_modules.visual_generator import VisualPromptGenerator

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as a ServerApp process has
        monkeypatch.setattr(TaskIdentity, name, value)
    data = {"source": "image-folder", "name": str(tiny_clip.generated)}
    raw = clip_run_config(tiny_clip, VISUAL, data, federation={"rounds": 2, "min_clients": 2})
    raw["optimizer"] = {"kind": "spsa", "lr": 0.002, "epsilon": 0.01, "budget": 2 * 16 * 8, "batch_size": 16}
    app = write_app(tmp_path / "app", raw)
    cfg = load_config(app / "fedprompt.yaml")
    expected = fedprompt.run(cfg, write=False)

    sent: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # (round, client) -> (down, up) payloads

    def recording(handler):
        def handle(message, node):
            reply = handler(message, node)
            if message.metadata.message_type == "train":
                client, instructions = read_instructions(message.content)
                down, up = (read_payload(m.content, cfg.payload.max_bytes) for m in (message, reply))
                sent[(instructions.round, client)] = (down, up)
            return reply

        return handle

    nodes = client_app_nodes(build_client_app(app / "fedprompt.yaml"), range(3), {})
    grid = InMemoryGrid({node: recording(handler) for node, handler in nodes.items()})
    result = run_server(grid, cfg, AppSettings(results_dir=tmp_path / "runs"))

    assert set(result.final_state) == {"image.weights"}
    assert torch.equal(result.final_state["image.weights"], expected.final_state["image.weights"])
    assert_same_history(result.history, expected.history)
    assert result.client_history == expected.client_history

    generator = VisualPromptGenerator(VISUAL["grid"], VISUAL["hidden"], VISUAL["prompt_size"], 1.0, seed=0)
    weights = ("F32", [generator.num_weights], 4 * generator.num_weights)
    assert sorted(sent) == [(r, c) for r in (1, 2) for c in range(3)]
    for down, up in sent.values():
        assert _tensor_bytes(down) == _tensor_bytes(up) == {"image.weights": weights}
    fits = {(r["round"], r["client_id"]): r for r in result.client_history if r.get("event") == "fit"}
    assert all(row["accepted"] and row["queries"] == 2 * 16 * 8 for row in fits.values())
    for key, (down, up) in sent.items():
        assert (fits[key]["bytes_down"], fits[key]["bytes_up"]) == (len(down), len(up))
        assert 4 * generator.num_weights < len(up) < 4 * generator.num_weights + 600  # the header's metadata
