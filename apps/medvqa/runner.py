"""Run each method on the same data, partition and seed, score every client's test questions, and
write the table."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from apps.medvqa.methods import METHODS, PERSONAL_METHODS, method_configs
from apps.medvqa.report import write_results
from apps.medvqa.scoring import MEAN, Scored, client_questions, majority_scores, score_run, table_rows
from fedprompt.config import RunConfig
from fedprompt.execution.results import RunDirectory
from fedprompt.execution.simulation import check_in_process, run_in_process
from fedprompt.tasks.experiment import Experiment
from fedprompt.tasks.registry import build_experiment

log = logging.getLogger("apps.medvqa")


@dataclass
class MedVQAReport:
    """What the app measured: the accuracy rows, one summary row per run, and the files written."""

    rows: list[dict[str, object]]
    runs: list[dict[str, object]]
    header: list[str]
    markdown: Path
    csv: Path

    def mean_accuracy(self, method: str) -> float:
        """The unweighted mean over clients of ``method``'s accuracy."""
        row = next(r for r in self.rows if r["method"] == method and r["client"] == MEAN)
        return float(row["accuracy"])  # type: ignore[arg-type]


def run_methods(config: RunConfig, out_dir: Path, methods: Sequence[str] = tuple(METHODS)) -> MedVQAReport:
    """Every method of ``methods`` in turn (each a run folder under ``out_dir``), then the majority
    baselines from the same partition, the table in ``out_dir/results.md`` and ``results.csv``."""
    configs = method_configs(config, methods)
    for cfg in configs.values():
        check_in_process(cfg)
    scores: dict[str, Scored] = {}
    runs: list[dict[str, object]] = []
    experiment: Experiment | None = None
    for method, cfg in configs.items():
        start = time.perf_counter()
        experiment = build_experiment(cfg)
        run_dir = RunDirectory.create(out_dir, cfg.name)
        run_dir.write_config(cfg)
        result = run_in_process(experiment, cfg, run_dir)
        scores[method] = score_run(
            experiment, result, method in PERSONAL_METHODS, cfg.runtime.eval_batch_size
        )
        summary = result.summary
        runs.append(
            {
                "method": method,
                "what": METHODS[method],
                "rounds": cfg.federation.rounds,
                # local-only needs no traffic (its run sends prompts that nothing reads)
                "bytes up/client/round": 0 if method == "local" else summary.get("bytes_up_per_client_round"),
                "time s": round(time.perf_counter() - start, 1),
                "run folder": run_dir.path.name,
            }
        )
        log.info("%s: done in %.1f s (%s)", method, time.perf_counter() - start, run_dir.path)
    assert experiment is not None  # method_configs refuses an empty list
    scores.update(majority_scores(experiment))
    questions = client_questions(experiment)
    rows = table_rows(scores, questions, experiment.notes["question_types"])
    header = _header(config, experiment, questions)
    markdown, csv_file = write_results(out_dir, rows, runs, header)
    return MedVQAReport(rows, runs, header, markdown, csv_file)


def _header(config: RunConfig, experiment: Experiment, questions: dict) -> list[str]:
    vqa = config.data.vqa
    assert vqa is not None  # method_configs checked it
    counts = ", ".join(f"{name}: {len(qs.rows)}" for name, qs in questions.items())
    data_rows = experiment.notes["data_rows"]
    lines = [
        f"- config: `{config.name}`, seed {config.seed}, {config.federation.rounds} rounds, "
        f"{config.optimizer.epochs} local epoch(s) per round",
        f"- data: {vqa.format}, {data_rows['train']} training and {data_rows['test']} test questions "
        f"({data_rows['skipped']} bad rows skipped); clients by `{vqa.client_field}`; test questions per "
        f"client: {counts}",
        f"- backbone: `{config.backbone.model}` (frozen); prompt: {config.prompt.kind}",
        "- each client is scored on its own test questions (the test questions whose "
        f"`{vqa.client_field}` names it): personalised and local with its own prompt, fedavg with the "
        "global one; `all clients` pools the questions, `mean over clients` averages the clients",
        "- majority (pooled): each question gets the commonest training answer of its question type "
        "(closed/open without one) over all clients; majority (own client): over its client's alone",
    ]
    if "backbone" in experiment.notes:
        lines.append(f"- {experiment.notes['backbone']['note']}")
    return lines
