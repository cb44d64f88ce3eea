"""``python -m apps.medvqa --config configs/medvqa-easyvqa.yaml``: personalised federated VQA and its
FedAvg and local-only baselines in one command (see ``apps.medvqa``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from apps.medvqa.methods import METHODS
from apps.medvqa.report import format_cell
from apps.medvqa.runner import run_methods
from fedprompt.config import load_config
from fedprompt.errors import UserError

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    config: Annotated[Path, typer.Option(help="A fedprompt VQA config (strategy.kind: reliability).")] = Path(
        "configs/medvqa-easyvqa.yaml"
    ),
    out: Annotated[Path, typer.Option(help="Folder for the run folders and results.md/.csv.")] = Path(
        "runs/medvqa"
    ),
    method: Annotated[
        list[str] | None, typer.Option("--method", help=f"Run only these (repeatable): {list(METHODS)}.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field, key=value.")] = None,
) -> None:
    """Run the personalised method and its baselines, print and write the results table."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("apps.medvqa").setLevel(logging.INFO)
    try:
        run_config = load_config(config, set_ or [])
        report = run_methods(run_config, out, method or list(METHODS))
    except (UserError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    console = Console()
    for line in report.header:
        console.print(line)
    table = Table(title="accuracy on each client's test questions")
    for column in report.rows[0]:
        table.add_column(column, justify="left" if column in ("method", "client") else "right")
    for row in report.rows:
        table.add_row(*(format_cell(column, value) for column, value in row.items()))
    console.print(table)
    console.print(f"results: {report.markdown} and {report.csv}")


if __name__ == "__main__":
    app()
