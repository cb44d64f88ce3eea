"""A site's own ledger of what it released: a second release for one round is refused, local DP's
σ and rounds are fixed at a run's first upload, and the ε a site spends over all its runs stays
within its budget, whatever the server asks."""

from __future__ import annotations

import pytest
from flower_support import tiny_config, write_dataset

from fedprompt.config import ConfigError, load_config
from fedprompt.federation.instructions import FitInstructions
from fedprompt.federation.payload import encode_state
from fedprompt.federation.privacy.accounting import plan_privacy
from fedprompt.federation.privacy.ledger import (
    FileLedger,
    LedgerRefusal,
    MemoryLedger,
    Release,
    local_epsilon,
)
from fedprompt.flower.app_config import check_deployable
from fedprompt.flower.site import HostedExperiment, fit_partition


def _dp(run: str, round_num: int, sigma: float = 4.0, rounds: int = 3) -> Release:
    return Release("local-dp", run, round_num, 0, sigma, rounds, 1e-5)


def test_a_second_release_for_one_round_is_refused():
    ledger = MemoryLedger()
    ledger.record(Release("masked", "run-a", 1, 0))
    ledger.record(Release("masked", "run-a", 1, 1))  # another partition
    ledger.record(Release("masked", "run-a", 2, 0))
    with pytest.raises(LedgerRefusal, match="already sent its masked input for round 1 of run 'run-a'"):
        ledger.record(Release("masked", "run-a", 1, 0))
    ledger.record(_dp("run-a", 1))
    with pytest.raises(LedgerRefusal, match="already sent its noised update for round 1"):
        ledger.record(_dp("run-a", 1))


def test_local_dp_noise_and_rounds_are_fixed_at_a_runs_first_upload():
    ledger = MemoryLedger()
    ledger.record(_dp("run-a", 1, sigma=4.0, rounds=3))
    with pytest.raises(
        LedgerRefusal, match=r"started with noise_multiplier 4.0 over 3 rounds .* asks for 2.0 over 1"
    ):
        ledger.record(_dp("run-a", 2, sigma=2.0, rounds=1))  # the server cut the rounds: σ would shrink
    with pytest.raises(
        LedgerRefusal, match="round 4 of run 'run-a', which this site's noise was planned for 3"
    ):
        ledger.record(_dp("run-a", 4))
    ledger.record(_dp("run-b", 1, sigma=2.0, rounds=1))  # a new run may choose its own


def test_the_budget_covers_every_run_in_the_ledger(tmp_path):
    budget = local_epsilon([4.0] * 3, 1e-5) * 1.0001  # three uploads fit, a fourth does not
    ledger = FileLedger(tmp_path)
    for round_num in (1, 2, 3):
        spent = ledger.record(_dp("run-a", round_num), budget)
    assert spent == pytest.approx(local_epsilon([4.0] * 3, 1e-5))
    reopened = FileLedger(tmp_path)  # the site restarted: the file remembers
    with pytest.raises(LedgerRefusal, match=r"over 4 uploads in all runs .* over its budget"):
        reopened.record(_dp("run-b", 1), budget)
    assert len(reopened.releases()) == 3  # the refused upload is not written
    (tmp_path / "site-ledger.json").write_text("{not json")
    with pytest.raises(LedgerRefusal, match="is not a site ledger"):
        FileLedger(tmp_path).record(Release("masked", "x", 1, 0))


def test_local_dp_on_flower_needs_a_budget(tmp_path):
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"))
    config["strategy"] = {"kind": "fedavg"}
    config["privacy"] = {"kind": "local", "clip_norm": 1.0, "noise_multiplier": 3.0}
    with pytest.raises(ConfigError, match=r"set privacy.site_epsilon_budget"):
        check_deployable(load_config(config))
    config["privacy"]["site_epsilon_budget"] = 5.0
    check_deployable(load_config(config))
    with pytest.raises(ConfigError, match="site_epsilon_budget applies to kind local"):
        load_config(
            {
                **config,
                "privacy": {
                    "kind": "central",
                    "clip_norm": 1.0,
                    "noise_multiplier": 1.0,
                    "site_epsilon_budget": 1.0,
                },
            }
        )


@pytest.mark.slow
def test_a_sites_ledger_refuses_an_over_budget_round_across_two_runs(tmp_path):
    # Local DP at ε = 6 over 2 rounds: run A spends it; run B, the same job under another name
    # (what a server may start at will today), is refused by the site at its first round.
    data = write_dataset(tmp_path / "data.jsonl")
    config = tiny_config(data, rounds=2)
    config["strategy"] = {"kind": "fedavg"}
    config["privacy"] = {"kind": "local", "clip_norm": 0.5, "target_epsilon": 6.0}
    runs = {name: load_config({**config, "name": name}) for name in ("run-a", "run-b")}
    hosted = HostedExperiment.build(runs["run-a"])
    downlink = encode_state(hosted.experiment.initial_state(), "float32")
    ledger = FileLedger(tmp_path)
    from fedprompt.federation.client_state import MemoryClientStates

    states = MemoryClientStates()
    for round_num in (1, 2):
        fit_partition(hosted, 0, FitInstructions(round_num, 7), downlink, states, ledger)
    plan = plan_privacy(runs["run-a"])
    assert plan.epsilon(2) <= 6.0
    hosted.config = runs["run-b"]
    with pytest.raises(LedgerRefusal, match=r"over its budget of 6 \(privacy.site_epsilon_budget"):
        fit_partition(hosted, 0, FitInstructions(1, 7), downlink, states, ledger)
    assert [(r.run, r.round) for r in ledger.releases()] == [("run-a", 1), ("run-a", 2)]


def test_local_dp_on_a_site_without_a_lasting_ledger_is_refused(tmp_path):
    from fedprompt.flower.site import record_release

    config = tiny_config(write_dataset(tmp_path / "data.jsonl"))
    config["strategy"] = {"kind": "fedavg"}
    config["privacy"] = {
        "kind": "local",
        "clip_norm": 0.5,
        "noise_multiplier": 3.0,
        "site_epsilon_budget": 50,
    }
    with pytest.raises(LedgerRefusal, match="client-state-dir='<folder>'"):
        record_release(load_config(config), 0, 1, MemoryLedger())
    assert record_release(load_config(config), 0, 1, FileLedger(tmp_path)) is None


def test_secure_aggregation_with_local_dp_records_both_releases(tmp_path):
    from fedprompt.flower.site import record_release

    config = tiny_config(write_dataset(tmp_path / "data.jsonl"))
    config["strategy"] = {"kind": "fedavg"}
    config["secure_aggregation"] = {"enabled": True}
    config["privacy"] = {
        "kind": "local",
        "clip_norm": 0.5,
        "noise_multiplier": 3.0,
        "site_epsilon_budget": 50,
    }
    ledger = FileLedger(tmp_path)
    record_release(load_config(config), 1, 1, ledger)
    assert [(r.kind, r.round, r.client_id) for r in ledger.releases()] == [
        ("local-dp", 1, 1),
        ("masked", 1, 1),
    ]
    with pytest.raises(LedgerRefusal, match="already sent its noised update for round 1"):
        record_release(load_config(config), 1, 1, ledger)


def test_differential_privacy_on_flower_needs_registered_node_keys(tmp_path):
    from fedprompt.flower.app_config import AppSettings
    from fedprompt.flower.server_app import node_keys

    config = tiny_config(write_dataset(tmp_path / "data.jsonl"))
    config["strategy"] = {"kind": "fedavg"}
    config["federation"]["min_clients"] = 1
    config["privacy"] = {"kind": "central", "clip_norm": 1.0, "noise_multiplier": 1.0}
    with pytest.raises(ConfigError, match="need SuperNode authentication"):
        node_keys(load_config(config), AppSettings())
    assert node_keys(load_config(config), AppSettings(node_keys="trust-on-first-use")) is None
    assert node_keys(load_config({**config, "privacy": {"kind": "none"}}), AppSettings()) is None


@pytest.mark.slow
def test_local_dp_on_flower_keeps_each_sites_ledger_and_a_resume_skips_a_round_already_answered(
    tmp_path, monkeypatch
):
    # Local DP through the Flower runtime: each site records its uploads in its own folder. Round
    # 2's updates are computed and sent, but never reach the server, which stops; the sites will
    # not answer round 2 again, so the resumed run counts it as abandoned and goes on with round 3.
    from flower_support import InMemoryGrid, client_app_nodes, write_app
    from flwr.app import Error, Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedprompt.flower import run_server
    from fedprompt.flower.app_config import AppSettings
    from fedprompt.flower.client_app import build_client_app
    from fedprompt.flower.records import INSTRUCTIONS_RECORD, read_instructions
    from fedprompt.flower.rounds import NotEnoughClientsError

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as a ServerApp process has
        monkeypatch.setattr(TaskIdentity, name, value)
    config = tiny_config(write_dataset(tmp_path / "data.jsonl"), rounds=3)
    config["strategy"] = {"kind": "fedavg"}
    config["privacy"] = {
        "kind": "local",
        "clip_norm": 0.5,
        "noise_multiplier": 3.0,
        "site_epsilon_budget": 100,
    }
    app = write_app(tmp_path / "app", config)
    cfg = load_config(app / "fedprompt.yaml")
    folders = {p: tmp_path / f"site{p}" for p in range(3)}
    for folder in folders.values():
        folder.mkdir()
    sites = {p: {"client-state-dir": str(folder)} for p, folder in folders.items()}
    client_app = build_client_app(app / "fedprompt.yaml")

    def as_flower(handler, lose_round=None):
        def handle(message, node):
            try:
                reply = handler(message, node)
            except Exception as exc:
                return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            instructions = INSTRUCTIONS_RECORD in message.content.config_records
            if instructions and read_instructions(message.content)[1].round == lose_round:
                return None  # computed and sent, lost on the way
            return reply

        return handle

    nodes = client_app_nodes(client_app, range(3), {}, partition_configs=sites)
    losing = {node: as_flower(h, lose_round=2) for node, h in nodes.items()}
    settings = AppSettings(results_dir=tmp_path / "runs", node_keys="trust-on-first-use")
    with pytest.raises(NotEnoughClientsError, match="round 2: 0 valid updates"):
        run_server(InMemoryGrid(losing), cfg, settings)
    (run_dir,) = (tmp_path / "runs").iterdir()
    resumed = run_server(
        InMemoryGrid({node: as_flower(h) for node, h in nodes.items()}),
        cfg,
        AppSettings(resume=run_dir, node_keys="trust-on-first-use"),
    )
    assert resumed.history[2]["aggregation_error"].startswith("round abandoned")
    assert resumed.history[3]["clients_accepted"] == 3
    for p, folder in folders.items():
        assert [(r.round, r.client_id) for r in FileLedger(folder).releases()] == [(1, p), (2, p), (3, p)]
