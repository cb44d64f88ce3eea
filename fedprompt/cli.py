"""The ``fedprompt`` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedprompt.config import ConfigError, load_config
from fedprompt.results import RunResult

app = typer.Typer(
    add_completion=False, no_args_is_help=False, help="Federated prompt learning on frozen backbones."
)
console = Console(stderr=True)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every round.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; the embedded default when left out.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: --set federation.rounds=3 (repeatable)."),
    ] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Parent folder of the results folder.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this results folder from its last round.")
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bars.")] = False,
) -> None:
    """Run a federated prompt-tuning job in this process."""
    from fedprompt.api import run as run_job

    overrides = list(set_ or [])
    if no_progress:
        overrides.append("runtime.progress=false")
    try:
        if resume is None:
            load_config(config, overrides)  # fail on a bad config before anything loads
        result = run_job(config, overrides, output_dir=output_dir, resume=resume)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _print_summary(result)


@app.command("show-config")
def show_config(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; the embedded default when left out.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field (repeatable).")] = None,
) -> None:
    """Print the resolved configuration (defaults filled in) as YAML."""
    import yaml

    try:
        cfg = load_config(config, list(set_ or []))
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _print_summary(result: RunResult) -> None:
    table = Table(title=f"fedprompt run: {result.config.name}")
    for column in (
        "round",
        "global acc",
        "local acc",
        "train loss",
        "clients ok",
        "bytes up/client",
        "time s",
    ):
        table.add_column(column, justify="right")
    for row in result.history:
        table.add_row(
            str(row["round"]),
            _fmt(row.get("global_accuracy")),
            _fmt(row.get("local_accuracy")),
            _fmt(row.get("train_loss")),
            f"{row['clients_accepted']}/{row['clients_sampled']}" if "clients_sampled" in row else "",
            f"{row['bytes_up_per_client']:.0f}" if "bytes_up_per_client" in row else "",
            _fmt(row.get("time_s"), 1),
        )
    out = Console()
    out.print(table)
    s = result.summary
    if s.get("bytes_up_over_backbone") is not None:
        out.print(
            f"bytes up per client per round: {s['bytes_up_per_client_round']:.0f} "
            f"({s['bytes_up_over_backbone']:.2e} of the backbone's {s['backbone_bytes']:,} bytes)"
        )
    if result.run_dir:
        out.print(f"results: {result.run_dir}")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    app()
