"""A user's mistake on the command line: one `error:` line, exit status 2, no results folder left;
a traceback (never with locals) only with --debug; genuine bugs keep their traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedprompt.cli import app
from fedprompt.errors import ConfigError, DataError

from conftest import tiny_run_config, write_keyword_dataset


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    return write_keyword_dataset(tmp_path_factory.mktemp("data") / "keywords.jsonl", n=120)


@pytest.fixture(scope="module")
def sentence_csv(tmp_path_factory):
    """A CSV task of one's own whose text column is called `sentence`, not `text`."""
    path = tmp_path_factory.mktemp("csv") / "reviews.csv"
    rows = ["sentence,label"] + [f"review number {i},{'pos' if i % 2 else 'neg'}" for i in range(12)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _config_file(folder: Path, config: dict) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if "error:" in line]
    assert line.startswith("error: "), result.output  # (datasets' progress lines may come before it)
    for fragment in fragments:
        assert fragment in line, result.output


def _data(keyword_file: Path, **fields) -> dict:
    return {"source": "files", "files": {"train": str(keyword_file)}, "test_split": None, **fields}


MISTAKES = {
    "missing data file": (
        lambda kw, csv, tmp: {"data": _data(tmp / "nowhere.csv")},
        ["data.files.train", "nowhere.csv", "does not exist"],
    ),
    "wrong text column": (
        lambda kw, csv, tmp: {"data": _data(csv)},
        ["data.text_column 'text' is not a column", "['sentence', 'label']"],
    ),
    "wrong label column": (
        lambda kw, csv, tmp: {"data": _data(csv, text_column="sentence", label_column="class")},
        ["data.label_column 'class'"],
    ),
    "too few examples for the clients": (
        lambda kw, csv, tmp: {"partition": {"kind": "iid", "num_clients": 200}},
        ["cannot split 90 examples among 200 clients", "partition.num_clients"],
    ),
    "unknown model folder": (
        lambda kw, csv, tmp: {"backbone": {"model": str(tmp / "no-model"), "random_config": None}},
        ["could not load the text model", "no-model"],
    ),
    "masked-LM template without [MASK]": (
        lambda kw, csv, tmp: {"head": {"template": "{text} !"}},
        ["head.template", "[MASK]"],
    ),
    "label words sharing a first token": (
        lambda kw, csv, tmp: {"head": {"label_words": {"fruit": ["red"], "nature": ["red"]}}},
        ["head:", "same token"],
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_in_a_run_is_one_error_line_and_leaves_no_run_folder(
    mistake, keyword_file, sentence_csv, tmp_path
):
    sections, fragments = MISTAKES[mistake]
    config = tiny_run_config(keyword_file, federation={"rounds": 1})
    for name, values in sections(keyword_file, sentence_csv, tmp_path).items():
        config[name] = {**config[name], **values}
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(_config_file(tmp_path, config)), "--output-dir", str(runs)])
    _assert_one_error_line(result, *fragments)
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["run", "{bad_yaml}"], ["is not valid YAML: line 2, column 13", "expected ',' or '}'"]),
        (["run", "--set", "data.label_names=[a"], ["override 'data.label_names=[a'", "not valid YAML"]),
        (["run", "--resume", "{plain}"], ["is not a fedprompt run folder: it has no config.yaml"]),
        (["run", "--resume", "{missing}"], ["is not a fedprompt run folder: it does not exist"]),
        (["show-config", "--set", "head.description_template=about {{lbl}}"], ["description_template"]),
        (["plot", "{missing}"], ["is not a fedprompt run folder: it does not exist"]),
        (["report", "{plain}"], ["is not a fedprompt run folder: it has no config.yaml"]),
        (["export", "{missing}", "{plain}/adapter"], ["is not a fedprompt run folder: it does not exist"]),
        (["serve", "--client-quota", "site-0"], ["--client-quota 'site-0' is not NAME=QUERIES"]),
        (["serve", "--ssl-certfile", "{missing}"], ["TLS needs both --ssl-certfile and --ssl-keyfile"]),
        (["serve", "--tokens-env", "FEDPROMPT_TEST_NO_TOKENS"], ["FEDPROMPT_TEST_NO_TOKENS holds no tokens"]),
    ],
    ids=[
        "yaml-syntax",
        "override-yaml",
        "resume-not-a-run",
        "resume-missing",
        "description-template",
        "plot-missing",
        "report-not-a-run",
        "export-missing",
        "serve-quota",
        "serve-tls",
        "serve-tokens",
    ],
)
def test_mistakes_before_anything_loads_are_one_error_line(arguments, fragments, tmp_path, monkeypatch):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nfederation: {rounds: 1\n")
    (tmp_path / "plain").mkdir()
    places = {"bad_yaml": bad_yaml, "plain": tmp_path / "plain", "missing": tmp_path / "missing"}
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [a.format(**places) for a in arguments])
    _assert_one_error_line(result, *fragments)
    assert not (tmp_path / "runs").exists()


def test_debug_lets_the_mistake_through_and_a_bug_is_not_a_user_error(keyword_file, tmp_path, monkeypatch):
    config = _config_file(tmp_path, tiny_run_config(keyword_file, data=_data(tmp_path / "nowhere.csv")))
    result = CliRunner().invoke(app, ["--debug", "run", str(config), "--output-dir", str(tmp_path / "r")])
    assert isinstance(result.exception, DataError) and result.exit_code == 1
    served = CliRunner().invoke(app, ["--debug", "serve", "--client-quota", "site-0"])
    assert isinstance(served.exception, ConfigError) and served.exit_code == 1  # serve, like every command

    def bug(*args, **kwargs):
        raise KeyError("a genuine bug")

    monkeypatch.setattr("fedprompt.api.build_experiment", bug)
    result = CliRunner().invoke(app, ["run", str(config), "--output-dir", str(tmp_path / "r")])
    assert isinstance(result.exception, KeyError) and result.exit_code == 1
    assert "error:" not in result.output


def test_the_installed_command_prints_no_locals(tmp_path):
    """The real entry point: one line without --debug; with --debug a traceback, but no frame's locals."""
    command = [sys.executable, "-c", "from fedprompt.cli import main; main()"]
    missing = str(tmp_path / "secret-token-folder" / "job.yaml")
    plain = subprocess.run([*command, "show-config", missing], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"error: config file {missing!r} does not exist"]
    debug = subprocess.run(
        [*command, "--debug", "show-config", missing], capture_output=True, text=True, timeout=120
    )
    assert debug.returncode == 1 and "ConfigError" in debug.stderr
    assert "locals" not in debug.stderr and "overrides =" not in debug.stderr
