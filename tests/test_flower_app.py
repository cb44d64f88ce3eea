"""`fedprompt flower new-app`: a Flower app that Flower itself accepts, carrying the resolved config."""

from __future__ import annotations

import io
import zipfile

import tomli
import yaml
from flwr.cli.build import build_fab_from_disk
from typer.testing import CliRunner

from fedprompt.cli import app
from fedprompt.config import load_config


def test_new_app_writes_an_app_flower_builds_with_the_resolved_config(tmp_path):
    target = tmp_path / "my-app"
    runner = CliRunner()
    result = runner.invoke(
        app, ["flower", "new-app", str(target), "--set", "federation.rounds=3", "--set", "name=SST2_run.v1"]
    )
    assert result.exit_code == 0, result.output

    pyproject = tomli.loads((target / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "fedprompt-sst2-run-v1"
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedprompt_app.server:server_app",
        "clientapp": "fedprompt_app.client:client_app",
    }
    assert pyproject["tool"]["flwr"]["app"]["config"]["round-timeout"] == 600.0
    written = load_config(target / "fedprompt.yaml")
    assert written == load_config(None, ["federation.rounds=3", "name=SST2_run.v1"])

    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(target)))  # Flower validates the app here
    assert {
        "fedprompt.yaml",
        "fedprompt_app/server.py",
        "fedprompt_app/client.py",
        "fedprompt_app/__init__.py",
        "README.md",
    } <= set(fab.namelist())
    readme = (target / "README.md").read_text()
    assert "flower-supernode" in readme and "--node-config" in readme and "$name" not in readme
    assert "flower.ai" not in readme and "supergrid" not in readme  # no remote Flower service


def test_new_app_refuses_a_non_empty_folder_and_a_bad_config(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    runner = CliRunner()
    result = runner.invoke(app, ["flower", "new-app", str(tmp_path / "taken")])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    result = runner.invoke(app, ["flower", "new-app", str(tmp_path / "new"), "--set", "partition.alpah=1"])
    assert result.exit_code == 2 and "alpah" in result.output
    assert not (tmp_path / "new").exists()


def test_the_written_config_round_trips_through_yaml(tmp_path):
    from fedprompt.flower.template import new_app

    new_app(tmp_path / "a", None, ["strategy.kind=fedprox", "strategy.mu=0.1"])
    raw = yaml.safe_load((tmp_path / "a" / "fedprompt.yaml").read_text())
    assert raw["strategy"] == {"kind": "fedprox", "mu": 0.1}
