"""The command line of the comparison: options, logging, and user mistakes as one ``error:`` line.

It is a module of its own rather than a ``fedprompt`` subcommand because imports run one way
(``apps -> fedprompt``): the ``fedprompt`` command cannot reach an app.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedprompt.cli import is_user_error


def parser() -> argparse.ArgumentParser:
    """The options of ``python -m apps.vl_experiments``."""
    out = argparse.ArgumentParser(
        prog="python -m apps.vl_experiments",
        description="Compare zero-shot CLIP, PromptFL (CoOp), VPT, TPFL, ATPFL, FedTPG, FedAPT, Fed-DPT, "
        "split prompts and the fine-tuned baseline on one backbone, one dataset, one partition and the same "
        "seeds, base-to-novel or across domains (configs/vl-domains.yaml); write the table and the plots.",
    )
    out.add_argument(
        "--config",
        type=Path,
        help="Experiment YAML (default: the embedded digits experiment, configs/vl-experiments.yaml).",
    )
    out.add_argument("--seeds", type=int, nargs="+", help="Run seeds (default: the config's seeds).")
    out.add_argument("--methods", nargs="+", help="Run these methods of the config only, in this order.")
    out.add_argument(
        "--out", type=Path, help="New or empty folder for the results (default: <output.dir>/<name>-<time>)."
    )
    out.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a field, e.g. --set federation.rounds=3 or "
        "--set methods.vpt.prompt.start_layer=1 (repeatable).",
    )
    out.add_argument("--debug", action="store_true", help="Show a user mistake's full traceback.")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; print the table and where everything went. Exit status 2 on a user
    mistake (one ``error:`` line), 0 otherwise."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("apps.vl_experiments").setLevel(logging.INFO)
    import datasets

    datasets.disable_progress_bars()  # dozens of runs' data preparation; the app logs each run instead
    from apps.vl_experiments.config import load_experiment
    from apps.vl_experiments.runner import run_comparison, select

    try:
        config = select(load_experiment(args.config, args.overrides), args.seeds, args.methods)
        comparison = run_comparison(config, args.out)
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(comparison.markdown)
    print(f"results: {comparison.folder}")
    return 0
