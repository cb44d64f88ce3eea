"""The run summary table of `fedprompt run`: base-to-novel columns appear when the run has them."""

from __future__ import annotations

from types import SimpleNamespace

from fedprompt.cli import _print_summary


def _result(history: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(name="t"), history=history, summary={}, run_dir=None)


def test_summary_shows_base_novel_and_harmonic_mean_only_when_evaluated(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per row
    row = {"round": 1, "global_accuracy": 0.5, "base_accuracy": 0.625, "novel_accuracy": 0.375}
    row["harmonic_mean"] = 0.46875
    _print_summary(_result([{"round": 0, "global_accuracy": 0.25}, row]))
    out = capsys.readouterr().out
    assert "base acc" in out and "novel acc" in out and "HM" in out
    assert "0.6250" in out and "0.3750" in out and "0.4688" in out

    _print_summary(_result([{"round": 0, "global_accuracy": 0.25}]))
    out = capsys.readouterr().out
    assert "global acc" in out and "0.2500" in out and "novel acc" not in out


def test_summary_shows_epsilon_and_the_privacy_settings_of_a_private_run(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rows = [{"round": 0, "global_accuracy": 0.25}, {"round": 1, "global_accuracy": 0.5, "epsilon": 1.2345}]
    result = _result(rows)
    result.summary = {
        "privacy": "central",
        "final_epsilon": 1.2345,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "sampling": "poisson",
        "sampling_rate": 0.1,
    }
    _print_summary(result)
    out = capsys.readouterr().out
    assert "ε" in out and "1.2345" in out
    line = "privacy (central): ε = 1.234 at δ = 1e-05; noise multiplier 1.1, sampling poisson, rate 0.1"
    assert line in out
