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


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="Hub name, local folder or bundled alias.")
    ] = "bundled:all-MiniLM-L6-v2",
    lm_head: Annotated[bool, typer.Option("--lm-head", help="Load the LM head (verbaliser heads).")] = False,
    max_length: Annotated[int, typer.Option(min=8, help="Longest input, in tokens.")] = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    tokens_env: Annotated[
        str, typer.Option(help="Variable holding the clients' tokens: name:token[,name:token...].")
    ] = "FEDPROMPT_API_TOKENS",
    chunk_size: Annotated[int, typer.Option(min=1, help="Candidates per forward pass.")] = 10,
    max_request_bytes: Annotated[int, typer.Option(min=1024)] = 4 * 2**20,
    max_candidates: Annotated[int, typer.Option(min=1)] = 64,
    max_examples: Annotated[int, typer.Option(min=1)] = 256,
    max_queries: Annotated[int, typer.Option(min=1, help="Candidates × inputs per request.")] = 8192,
) -> None:
    """Serve a frozen backbone over HTTP to black-box clients: logits and losses, never weights."""
    from fedprompt.serving.launch import ServeSettings
    from fedprompt.serving.launch import serve as serve_forever
    from fedprompt.serving.service import ServiceLimits
    from prompt_modules.hf_text import BackboneLoadError

    limits = ServiceLimits(
        max_candidates=max_candidates,
        max_examples=max_examples,
        max_queries=max_queries,
        max_request_bytes=max_request_bytes,
    )
    settings = ServeSettings(model, lm_head, max_length, device, host, port, tokens_env, chunk_size, limits)
    try:
        serve_forever(settings)
    except (BackboneLoadError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command("demo-backbone")
def demo_backbone(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache folder (default: $FEDPROMPT_CACHE_DIR or ~/.cache/fedprompt).")
    ] = None,
) -> None:
    """Build (once) or show bundled:demo-clip, the small CLIP pre-trained offline for the demos."""
    from fedprompt.data.loading import DataError
    from fedprompt.demo_backbone import demo_clip

    logging.getLogger("fedprompt.demo_backbone").setLevel(logging.INFO)
    try:
        demo = demo_clip(cache_dir=cache_dir)
    except DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    out = Console()
    out.print(demo.note)
    out.print(
        f"{'built' if demo.built else 'cached'}: {demo.folder} (built in {demo.metadata['build_seconds']} s)"
    )
    table = Table(title="zero-shot accuracy on what pre-training never showed")
    table.add_column("evaluation")
    table.add_column("accuracy", justify="right")
    for name, value in demo.metadata["zero_shot"].items():
        table.add_row(name, f"{value:.4f}")
    out.print(table)


flower_cli = typer.Typer(no_args_is_help=True, help="Run fedprompt jobs on Flower (the `flower` extra).")
app.add_typer(flower_cli, name="flower")


@flower_cli.command("new-app")
def flower_new_app(
    directory: Annotated[Path, typer.Argument(help="New (or empty) folder for the Flower app.")],
    config: Annotated[
        Path | None, typer.Option(help="YAML config; the embedded default when left out.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field (repeatable).")] = None,
    name: Annotated[str | None, typer.Option(help="Flower app name; from the run name by default.")] = None,
) -> None:
    """Write a Flower app (pyproject.toml, fedprompt.yaml, its ServerApp and ClientApp) for a config."""
    from fedprompt.flower.template import new_app

    try:
        path = new_app(directory, config, list(set_ or []), name=name)
    except (ConfigError, FileExistsError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"Flower app written to {path}; see {path / 'README.md'} to run it")


@flower_cli.command("site-worker")
def flower_site_worker(
    socket_path: Annotated[
        Path, typer.Option("--socket", help="Unix socket path; name it in the SuperNode's node config.")
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="The app's fedprompt.yaml: build its experiment now, before the first round."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field (repeatable).")] = None,
) -> None:
    """Keep one site's backbone and data loaded across rounds for Flower's per-message ClientApp processes.

    Start the SuperNode with --node-config "partition-id=<id> site-worker='<socket>'".
    """
    from fedprompt.flower.site_worker import serve as serve_site

    logging.getLogger("fedprompt.flower").setLevel(logging.INFO)  # builds and rejections, always
    try:
        resolved = load_config(config, list(set_ or [])) if config is not None else None
        serve_site(socket_path, resolved)
    except (ConfigError, FileExistsError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass


_EXTRA_COLUMNS = (
    ("base acc", "base_accuracy"),
    ("novel acc", "novel_accuracy"),
    ("HM", "harmonic_mean"),
    ("closed acc", "closed_accuracy"),
    ("open acc", "open_accuracy"),
)
"""Columns of base-to-novel and VQA runs, when their history has them: (header, history key)."""


def _print_summary(result: RunResult) -> None:
    table = Table(title=f"fedprompt run: {result.config.name}")
    extra = [(header, key) for header, key in _EXTRA_COLUMNS if any(key in row for row in result.history)]
    for column in ("round", "global acc", *(h for h, _ in extra), "local acc", "train loss", "clients ok"):
        table.add_column(column, justify="right")
    for column in ("bytes up/client", "time s"):
        table.add_column(column, justify="right")
    for row in result.history:
        table.add_row(
            str(row["round"]),
            _fmt(row.get("global_accuracy")),
            *(_fmt(row.get(key)) for _, key in extra),
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
    if "majority_baseline" in s:
        _print_baselines(out, s)
    if "backbone" in s:
        out.print(s["backbone"]["note"])
    if result.run_dir:
        out.print(f"results: {result.run_dir}")


def _print_baselines(out: Console, summary: dict) -> None:
    """Final accuracy overall and per question set beside the majority-answer baseline."""
    table = Table(title="final accuracy vs the majority-answer baseline")
    for column in ("questions", "accuracy", "majority baseline"):
        table.add_column(column, justify="left" if column == "questions" else "right")
    for name, baseline in summary["majority_baseline"].items():
        key = "final_accuracy" if name == "global" else f"final_{name}_accuracy"
        label = "all" if name == "global" else name.replace("type_", "type: ").replace("_", " ")
        table.add_row(label, _fmt(summary.get(key)), _fmt(baseline))
    out.print(table)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def main() -> None:
    app()
