"""Each language-model backbone against its real server, on loopback, on the bundled SmolLM2-135M:
BDPL/FedOne through llama.cpp's OpenAI-compatible server; FedBPT, and BBT and MeZO with FedAvg,
through llama.cpp's low-level embeddings input; FedBPT with vLLM's prompt_embeds and
logprob_token_ids, BDPL through its text route, the floor rule on its top-k; the pre-flight parity
check, and its failure on a template the server tokenises otherwise and on an embedding table that
is not the model's; each server's refusal read as its message; the llama.cpp engine of ``fedprompt
serve``; and the vLLM export round trip. The servers start once per session
(``conftest.llama_server``, ``conftest.vllm_server``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from llm_servers import SERVED_NAME, need_llama_cpp, smollm2_gguf, smollm2_hf_folder

import fedprompt
from fedprompt.config import ConfigError, load_config
from fedprompt.tasks.registry import build_experiment
from prompt_modules.openai_client import EndpointSettings, OpenAICompatibleClient, ServerError

pytestmark = pytest.mark.slow
FEDPROMPT = [sys.executable, "-c", "from fedprompt.cli import main; main()"]

POSITIVE = [
    "I loved this film, it was wonderful.",
    "A great movie with a brilliant cast.",
    "What a delightful and moving story.",
    "Fantastic acting and a beautiful script.",
    "One of the best films I have seen.",
    "An excellent, charming and funny movie.",
]
NEGATIVE = [
    "I hated this film, it was awful.",
    "A terrible movie with a boring cast.",
    "What a dull and painful story.",
    "Bad acting and a stupid script.",
    "One of the worst films I have seen.",
    "A horrible, tedious and unfunny movie.",
]
HEAD = {
    "kind": "verbalizer",
    "template": "Review: {text}\nSentiment:",
    "label_words": {"negative": ["negative"], "positive": ["positive"]},
}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A small sentiment task as local files, of which a run reads 8 training and 4 test reviews
    (every decode costs a fraction of a second on a busy CPU)."""
    folder = tmp_path_factory.mktemp("reviews")
    rows = [{"text": t, "label": "positive"} for t in POSITIVE] + [
        {"text": t, "label": "negative"} for t in NEGATIVE
    ]
    for name, copies in (("train", 2), ("test", 1)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * copies))
    return {
        "source": "files",
        "files": {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")},
        "max_per_class": 4,
        "max_test_examples": 4,
    }


def _config(reviews, backbone, prompt, optimizer, strategy, **extra):
    return {
        "name": "llm-server-test",
        "seed": 0,
        "backbone": backbone,
        "head": HEAD,
        "prompt": prompt,
        "optimizer": optimizer,
        "strategy": strategy,
        "data": reviews,
        "partition": {"kind": "iid", "num_clients": 2, "local_val_fraction": 0.0},
        "federation": {"rounds": 1, "min_clients": 2, "local_evaluation": False},
        "runtime": {"progress": False, "eval_batch_size": 4},
        **extra,
    }


BDPL_PROMPT = {
    "kind": "discrete",
    "num_tokens": 3,
    "vocabulary": {"size": 8, "min_count": 0, "min_frequency": 0, "min_pmi": 100.0},  # unigrams
}
BDPL = {"kind": "bdpl", "samples": 2, "steps": 2, "batch_size": 2, "lr": 0.5}


def _client_rows(result):
    return [row for row in result.client_history if row["accepted"]]


def test_fedone_bdpl_round_through_llama_cpp_server(llama_server, reviews, tmp_path):
    """FedOne: one client a round trains BDPL through llama.cpp's server; the server takes its α;
    the app's cost report gives each client's requests and tokens as the server counted them, and
    the price they come to."""
    from apps.blackbox_api.report import cost_report, format_report

    backbone = {
        "kind": "openai",
        "url": llama_server,
        "model": SERVED_NAME,
        "tokenizer": "bundled:smollm2-135m",
        "price_per_prompt_token": 2e-7,
        "price_per_completion_token": 1e-6,
    }
    config = _config(
        reviews,
        backbone,
        BDPL_PROMPT,
        BDPL,
        {"kind": "fedavg"},
        federation={"rounds": 2, "min_clients": 1, "fraction": 0.5, "local_evaluation": False},
        output={"dir": str(tmp_path), "plot": False},
    )
    result = fedprompt.run(config)
    rows = _client_rows(result)
    assert len(rows) == 2 and sorted(r["round"] for r in rows) == [1, 2]  # one client a round
    for row in rows:  # steps × samples × batch texts, one request each (and a retry if one stops at once)
        assert row["queries"] == 2 * 2 * 2 and row["api_requests"] >= row["queries"]
        assert row["api_prompt_tokens"] > row["api_requests"] * 5 and row["api_completion_tokens"] >= 0
        assert 0.0 <= row["floored_share"] < 1.0
    logits = result.final_state["prompt.logits"]
    assert logits.shape == (3, 8) and float(logits.abs().sum()) > 0
    assert 0.0 <= result.metric("global_accuracy")[-1] <= 1.0

    report = cost_report(result.run_dir)
    for client in report["clients"]:
        mine = [r for r in rows if r["client_id"] == client["client_id"]]
        api = client["api"]
        assert api["requests"] == sum(r["api_requests"] for r in mine)
        assert api["prompt_tokens"] == sum(r["api_prompt_tokens"] for r in mine)
        expected = api["prompt_tokens"] * 2e-7 + api["completion_tokens"] * 1e-6
        assert api["price"] == pytest.approx(expected)
    assert "language-model server (its own counts):" in format_report(report)


def test_a_refusal_of_llama_cpp_s_server_reads_as_its_message(llama_server):
    """llama.cpp's server refuses a prompt longer than its context with an OpenAI-style error body:
    the client's error gives its message, type and code, not the JSON."""
    client = OpenAICompatibleClient(EndpointSettings(llama_server, retries=0))
    try:
        with pytest.raises(ServerError) as refused:
            client.post("/v1/completions", {"model": SERVED_NAME, "prompt": "word " * 1100, "max_tokens": 1})
    finally:
        client.close()
    message = str(refused.value)
    assert "was refused (400): This model's maximum context length is 1024 tokens" in message
    assert (
        message.endswith("(type invalid_request_error, code context_length_exceeded)") and '{"' not in message
    )


def test_fedbpt_round_through_llama_cpp_low_level(reviews):
    need_llama_cpp()
    smollm2_gguf()
    config = _config(
        reviews,
        {"kind": "llama-cpp", "max_length": 32},
        {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
        {"kind": "cmaes", "popsize": 3, "generations": 1, "score_on": "local-set", "batch_size": 4},
        {"kind": "fedbpt"},
    )
    result = fedprompt.run(config, write=False)
    parity = result.summary["parity"]
    assert parity["max_abs_difference"] <= parity["tolerance"] and parity["inputs"] == 4
    rows = _client_rows(result)
    assert len(rows) == 2
    for row in rows:  # 3 candidates on 4 examples, then the final mean on the 4: one decode each
        assert row["queries"] == 3 * 4 + 4 and row["api_requests"] == row["queries"]
        assert row["floored_share"] == 0.0  # llama.cpp gives the full vocabulary: never a floor
    assert result.final_state["prompt.z"].shape == (16,)


LOCAL_BLACK_BOX = {
    # BBT: CMA-ES on z, the clients' z averaged by examples (no FedBPT search distribution);
    # 3 candidates on the 4 local examples, one generation
    "bbt": (
        {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
        {"kind": "cmaes", "popsize": 3, "generations": 1, "score_on": "local-set", "batch_size": 4},
        3 * 4,
    ),
    # MeZO: SPSA on the whole soft prompt, averaged by FedAvg; budget // (2 · batch) = 2 steps of
    # 2 candidates on 2 examples
    "mezo": (
        {"kind": "soft", "num_tokens": 2, "init": "vocab"},
        {"kind": "spsa", "lr": 0.01, "epsilon": 0.001, "budget": 8, "batch_size": 2},
        8,
    ),
}


@pytest.mark.parametrize("method", sorted(LOCAL_BLACK_BOX))
def test_bbt_and_mezo_with_fedavg_through_llama_cpp_low_level(reviews, method):
    """The black-box local optimisers beside FedBPT and FedKSeed, on llama.cpp's embeddings input,
    with plain FedAvg: each client spends exactly its budget, every query is one decode."""
    need_llama_cpp()
    smollm2_gguf()
    prompt, optimizer, queries = LOCAL_BLACK_BOX[method]
    config = _config(reviews, {"kind": "llama-cpp", "max_length": 32}, prompt, optimizer, {"kind": "fedavg"})
    result = fedprompt.run(config, write=False)
    assert result.summary["parity"]["max_abs_difference"] <= result.summary["parity"]["tolerance"]
    rows = _client_rows(result)
    assert len(rows) == 2
    for row in rows:
        assert row["queries"] == queries and row["api_requests"] == queries and row["floored_share"] == 0.0
    (name, state), *rest = result.final_state.items()
    assert not rest and bool(torch.isfinite(state).all())
    if prompt["kind"] == "intrinsic":
        assert (
            name == "prompt.z" and state.shape == (16,) and float(state.abs().sum()) > 0
        )  # moved from z = 0
    else:
        assert name == "prompt.embeddings" and state.shape == (2, 576)  # SmolLM2's hidden size
    assert 0.0 <= result.metric("global_accuracy")[-1] <= 1.0


def test_fedkseed_spsa_soft_prompt_round_through_llama_cpp_low_level(reviews):
    """SPSA/MeZO on a whole soft prompt, sent as FedKSeed's (seed, projected gradient) pairs, through
    llama.cpp's embeddings input: two candidates a step on a batch of 2, 8 queries a client."""
    need_llama_cpp()
    smollm2_gguf()
    config = _config(
        reviews,
        {"kind": "llama-cpp", "max_length": 32},
        {"kind": "soft", "num_tokens": 2, "init": "vocab"},
        {"kind": "spsa", "lr": 0.01, "epsilon": 0.001, "budget": 8, "batch_size": 2},
        {"kind": "fedkseed", "num_seeds": 16},
    )
    result = fedprompt.run(config, write=False)
    rows = _client_rows(result)
    assert len(rows) == 2
    for row in rows:  # budget // (2 · batch) = 2 steps of 2 candidates on 2 examples
        assert row["queries"] == 8 and row["api_requests"] >= 8 and row["floored_share"] == 0.0
    assert 0.0 <= result.metric("global_accuracy")[-1] <= 1.0


def test_parity_fails_on_a_template_the_server_reads_otherwise(reviews):
    """A client that puts a beginning-of-sequence token before its inputs, which the server does not
    add to text (SmolLM2's GGUF says add_bos_token: false): the pre-flight names the field before
    any training query; with the server's rule it passes."""
    need_llama_cpp()
    smollm2_gguf()
    sections = (
        {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
        {"kind": "cmaes", "popsize": 4, "generations": 1},
        {"kind": "fedbpt"},
    )
    wrong = load_config(_config(reviews, {"kind": "llama-cpp", "max_length": 32, "add_bos": True}, *sections))
    with pytest.raises(ConfigError, match=r"backbone\.parity_tolerance: the plain template's label log-prob"):
        build_experiment(wrong, client_ids=[])
    right = load_config(
        _config(reviews, {"kind": "llama-cpp", "max_length": 32, "add_bos": False}, *sections)
    )
    assert build_experiment(right, client_ids=[]).notes["parity"]["max_abs_difference"] <= 1e-3


WRONG_TABLES = {
    # a table in another vocabulary's order: every token embedded as its neighbour
    "permuted": lambda table: table.roll(1, dims=0),
    # the right table, off by 0.1% of its spread (a table from another quantisation or checkpoint)
    "perturbed": lambda table: (
        table + 1e-3 * table.std() * torch.randn(table.shape, generator=torch.Generator().manual_seed(0))
    ),
}


@pytest.mark.parametrize("wrong", sorted(WRONG_TABLES))
def test_parity_fails_on_an_embedding_table_that_is_not_the_model_s(reviews, monkeypatch, wrong):
    """The client embeds its inputs with a table other than the one llama.cpp computes with: the
    pre-flight names the parity field and the table before any training query."""
    need_llama_cpp()
    smollm2_gguf()
    import fedprompt.tasks.text.language_model as language_model

    right = language_model.load_embedding_table
    monkeypatch.setattr(
        language_model, "load_embedding_table", lambda *source: WRONG_TABLES[wrong](right(*source))
    )
    config = load_config(
        _config(
            reviews,
            {"kind": "llama-cpp", "max_length": 32},
            {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
            {"kind": "cmaes", "popsize": 4, "generations": 1},
            {"kind": "fedbpt"},
        )
    )
    with pytest.raises(ConfigError) as refused:
        build_experiment(config, client_ids=[])
    message = str(refused.value)
    assert message.startswith("backbone.parity_tolerance: the plain template's label log-probabilities")
    assert "the input-embedding table is not the served model's" in message
    assert message.endswith(
        "Fix head.template, backbone.tokenizer or backbone.add_bos (the table is backbone.model's)"
    )
    gap = float(message.split("differ by ")[1].split(" nats")[0])
    assert gap > 100 * config.backbone.parity_tolerance  # far past the tolerance, not a rounding effect


def test_llama_cpp_engine_behind_fedprompt_serve_scores_like_the_client_adapter(reviews):
    """The model owner's second engine: the same population, through the service's llama.cpp
    classifier (logits) and the client's llama-cpp adapter (log-probabilities), gives the same losses."""
    need_llama_cpp()
    gguf = smollm2_gguf()
    from fedprompt.serving import InferenceService
    from fedprompt.training.blackbox import projection_spec, search_sigma
    from prompt_modules.heads import VerbalizerHeadSpec
    from prompt_modules.llama_cpp_backbone import LlamaCppBackbone
    from prompt_modules.remote_schema import LossRequest

    config = load_config(
        _config(
            reviews,
            {"kind": "llama-cpp", "max_length": 32},
            {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
            {"kind": "cmaes", "popsize": 4, "generations": 1},
            {"kind": "fedbpt"},
        )
    )
    experiment = build_experiment(config, client_ids=[0])
    client_side = experiment.model
    batch = next(experiment.test_data.batches(4))
    population = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    mine = client_side.population_losses(population, batch)
    service = InferenceService(LlamaCppBackbone(gguf, max_length=32), "smollm2-gguf")
    request = LossRequest(
        projection=projection_spec(config.prompt, config.seed, search_sigma(config.optimizer)),
        head=VerbalizerHeadSpec(label_words=(("negative",), ("positive",))),
        z=population.tolist(),
        input_ids=[
            row[mask.bool()].tolist()
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ],
        labels=batch["labels"].tolist(),
    )
    theirs = torch.tensor(service.losses("owner", request).losses)
    assert torch.allclose(mine.float(), theirs, atol=1e-4)


def test_vllm_fedbpt_with_prompt_embeds_and_label_ids(vllm_server, reviews):
    folder = smollm2_hf_folder()
    backbone = {
        "kind": "vllm",
        "url": vllm_server,
        "model": SERVED_NAME,
        "tokenizer": str(folder),
        "max_length": 32,
    }
    config = _config(
        reviews,
        backbone,
        {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
        {"kind": "cmaes", "popsize": 3, "generations": 1, "score_on": "local-set", "batch_size": 4},
        {"kind": "fedbpt"},
    )
    result = fedprompt.run(config, write=False)
    parity = result.summary["parity"]
    assert parity["max_abs_difference"] <= parity["tolerance"]
    for row in _client_rows(result):
        assert row["api_requests"] == 3 * 4 + 4 and row["api_prompt_tokens"] > 0
        assert row["floored_share"] == 0.0  # logprob_token_ids: every label word by id


def test_vllm_parity_fails_on_a_published_table_that_is_not_the_served_model_s(
    vllm_server, reviews, tmp_path
):
    """The table a model owner published (``backbone.embeddings``) is in another vocabulary's order:
    the pre-flight against the real server names the parity field and the table."""
    from safetensors.torch import save_file

    from prompt_modules.embedding_table import load_embedding_table

    folder = smollm2_hf_folder()
    published = tmp_path / "embed_tokens.safetensors"
    save_file({"embed_tokens": load_embedding_table(folder).roll(1, dims=0).contiguous()}, str(published))
    backbone = {
        "kind": "vllm",
        "url": vllm_server,
        "model": SERVED_NAME,
        "tokenizer": str(folder),
        "embeddings": str(published),
        "max_length": 32,
    }
    config = load_config(
        _config(
            reviews,
            backbone,
            {"kind": "intrinsic", "dim": 16, "num_tokens": 2},
            {"kind": "cmaes", "popsize": 3, "generations": 1},
            {"kind": "fedbpt"},
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"^backbone\.parity_tolerance: .* differ by .* input-embedding table is not the served "
        r"model's\. Fix head\.template, backbone\.tokenizer, backbone\.add_bos or backbone\.embeddings$",
    ):
        build_experiment(config, client_ids=[])


def test_a_refusal_of_vllm_reads_as_its_message(vllm_server):
    client = OpenAICompatibleClient(EndpointSettings(vllm_server, retries=0))
    try:
        with pytest.raises(ServerError) as refused:
            client.post("/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 1})
    finally:
        client.close()
    message = str(refused.value)
    assert "was refused (404): The model `no-such-model` does not exist" in message
    assert message.endswith("(type NotFoundError, code 404)") and '{"' not in message


def test_vllm_bdpl_through_text_and_the_floor_of_its_top_k(vllm_server, reviews):
    folder = smollm2_hf_folder()
    backbone = {
        "kind": "vllm",
        "url": vllm_server,
        "model": SERVED_NAME,
        "tokenizer": str(folder),
        "logprob_token_ids": False,
        "top_logprobs": 1,
    }
    result = fedprompt.run(_config(reviews, backbone, BDPL_PROMPT, BDPL, {"kind": "fedavg"}), write=False)
    rows = _client_rows(result)
    assert all(row["api_requests"] == 2 * 2 * 2 for row in rows)
    # one log-probability a text: at least one of the two label words is always the floor
    assert all(row["floored_share"] >= 0.5 for row in rows)


def test_vllm_export_round_trip(vllm_server, reviews, tmp_path):
    """A decoder soft prompt trained here (transformers, the GGUF dequantised) and exported for vLLM:
    the example sends it as prompt_embeds and gets fedprompt's class probabilities back."""
    folder = smollm2_hf_folder()
    config = _config(
        reviews,
        {"kind": "hf-text", "model": str(folder), "max_length": 32},
        {"kind": "soft", "num_tokens": 3},
        {"kind": "gradient", "lr": 0.01, "max_steps": 2, "batch_size": 4},
        {"kind": "fedavg"},
        output={"dir": str(tmp_path / "runs")},
    )
    result = fedprompt.run(config)
    out = tmp_path / "vllm-prompt"
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [*FEDPROMPT, "export", str(result.run_dir), str(out), "--format", "vllm"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    check = subprocess.run(
        [sys.executable, str(out / "send_to_vllm.py"), "--url", vllm_server, "--model", SERVED_NAME],
        capture_output=True,
        text=True,
        env=env,
    )
    summary = json.loads(check.stdout.strip().splitlines()[-1])
    print(check.stdout)
    assert check.returncode == 0 and summary["ok"], check.stdout + check.stderr
    assert summary["inputs"] == 4 and summary["max_difference"] <= 1e-3, summary  # the run's 4 test inputs
