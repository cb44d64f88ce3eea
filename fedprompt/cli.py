"""The ``fedprompt`` command."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from fedprompt.config import load_config
from fedprompt.errors import UserError

if TYPE_CHECKING:
    from fedprompt.execution.results import RunResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Federated prompt learning on frozen backbones.",
    pretty_exceptions_show_locals=False,  # locals can hold tokens and paths
)
console = Console(stderr=True)

_BACKBONE_ERRORS = (
    ("prompt_modules.hf_text", "BackboneLoadError"),
    ("prompt_modules.remote", "RemoteBackboneError"),
    ("prompt_modules.openai_client", "ServerError"),
    ("prompt_modules.llama_cpp_engine", "LlamaCppError"),
)
"""A model that cannot be loaded, a service that cannot be reached or refuses: user mistakes too
(looked up where already imported, so that `fedprompt --help` does not import torch's stack)."""

_debug = {"on": False}

P = ParamSpec("P")
R = TypeVar("R")


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every round.")] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="FEDPROMPT_DEBUG", help="Show a user mistake's full traceback."),
    ] = False,
) -> None:
    _debug["on"] = debug
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def fail(message: str) -> typer.Exit:
    """Print ``error: <message>`` (never wrapped, never read as markup); the Exit(2) to raise."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(2)


def user_errors(command: Callable[P, R]) -> Callable[P, R]:
    """A command whose user mistakes print one `error:` line and exit 2 (a traceback with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            if _debug["on"] or not is_user_error(exc):
                raise
            raise fail(str(exc)) from None

    return wrapper


def is_user_error(exc: BaseException) -> bool:
    """A user's mistake (configuration, data, model name, folder, an unreachable service), which
    gets one `error:` line and exit status 2; anything else is a bug and keeps its traceback."""
    if isinstance(exc, UserError):
        return True
    for module, name in _BACKBONE_ERRORS:
        kind = getattr(sys.modules.get(module), name, None)
        if kind is not None and isinstance(exc, kind):
            return True
    return False


@app.command()
@user_errors
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
    _print_summary(run_job(config, overrides, output_dir=output_dir, resume=resume))


@app.command("show-config")
@user_errors
def show_config(
    config: Annotated[
        Path | None, typer.Argument(help="YAML config; the embedded default when left out.")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field (repeatable).")] = None,
) -> None:
    """Print the resolved configuration (defaults filled in) as YAML."""
    import yaml

    cfg = load_config(config, list(set_ or []))
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
@user_errors
def serve(
    model: Annotated[
        str, typer.Option(help="Hub name, local folder or bundled alias.")
    ] = "bundled:all-MiniLM-L6-v2",
    lm_head: Annotated[bool, typer.Option("--lm-head", help="Load the LM head (verbaliser heads).")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="transformers (any text model; a GGUF dequantised) or llama-cpp (a GGUF on llama.cpp's "
            "quantised kernels, label words only; needs llama-cpp-python)."
        ),
    ] = "transformers",
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
    max_projection_floats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Largest projection A (num_tokens × hidden × dim floats, 4 bytes each); up to 4 are kept.",
        ),
    ] = 32 * 2**20,
    query_quota: Annotated[
        int, typer.Option(min=0, help="Model queries each client may use in all (0: no quota).")
    ] = 10_000_000,
    client_quota: Annotated[
        list[str] | None,
        typer.Option(help="One client's own quota: NAME=QUERIES (repeatable); overrides --query-quota."),
    ] = None,
    projection_quota: Annotated[
        int,
        typer.Option(min=0, help="Floats of projections the service may draw for each client (0: no limit)."),
    ] = 2**30,
    rate_limit: Annotated[
        float, typer.Option(min=0, help="Requests per second per client (0: no limit); over it: 429.")
    ] = 50.0,
    rate_burst: Annotated[int, typer.Option(min=1, help="Requests a client may send at once.")] = 100,
    max_pending: Annotated[
        int,
        typer.Option(
            min=1, help="Requests of one client admitted at once (computing or waiting); more: 429."
        ),
    ] = 4,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            help="Address or network of a reverse proxy whose X-Forwarded-For names the client for the "
            "failed-token lockout (repeatable)."
        ),
    ] = None,
    max_failed_tokens: Annotated[
        int, typer.Option(min=1, help="Invalid tokens in a row from one address before it is locked out.")
    ] = 5,
    lockout: Annotated[
        float, typer.Option(min=0.001, help="First lockout, in seconds; doubles with each further failure.")
    ] = 1.0,
    ssl_certfile: Annotated[Path | None, typer.Option(help="Server certificate (PEM): serve HTTPS.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    ssl_ca_certfile: Annotated[
        Path | None, typer.Option(help="CA of client certificates: require them (mutual TLS).")
    ] = None,
    usage_file: Annotated[
        Path | None, typer.Option(help="Keep every client's usage counters in this JSON file.")
    ] = None,
) -> None:
    """Serve a frozen backbone over HTTP to black-box clients: logits and losses, never weights."""
    from fedprompt.serving.admission import AdmissionSettings
    from fedprompt.serving.launch import ServeSettings
    from fedprompt.serving.launch import serve as serve_forever
    from fedprompt.serving.service import QueryQuotas, ServiceLimits
    from fedprompt.serving.tls import TLSFiles

    settings = ServeSettings(
        model,
        lm_head,
        max_length,
        device,
        host,
        port,
        tokens_env,
        chunk_size,
        limits=ServiceLimits(
            max_candidates=max_candidates,
            max_examples=max_examples,
            max_queries=max_queries,
            max_request_bytes=max_request_bytes,
            max_projection_floats=max_projection_floats,
            max_pending=max_pending,
        ),
        quotas=QueryQuotas.from_options(query_quota, client_quota or [], projection_quota),
        admission=AdmissionSettings(
            rate=rate_limit,
            burst=rate_burst,
            max_failures=max_failed_tokens,
            lockout=lockout,
            max_lockout=max(lockout, 300.0),
            trusted_proxies=tuple(trusted_proxy or ()),
        ),
        tls=TLSFiles.from_options(ssl_certfile, ssl_keyfile, ssl_ca_certfile),
        usage_file=usage_file,
        engine=engine,
    )
    serve_forever(settings)


@app.command("demo-backbone")
@user_errors
def demo_backbone(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache folder (default: $FEDPROMPT_CACHE_DIR or ~/.cache/fedprompt).")
    ] = None,
) -> None:
    """Build (once) or show bundled:demo-clip, the small CLIP pre-trained offline for the demos."""
    from fedprompt.tasks.clip.demo_backbone import demo_clip

    logging.getLogger("fedprompt.demo_backbone").setLevel(logging.INFO)
    demo = demo_clip(cache_dir=cache_dir)
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


class ExportFormat(str, Enum):
    """Formats ``fedprompt export`` writes."""

    peft = "peft"
    vllm = "vllm"


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Results folder of a finished run.")],
    out: Annotated[Path, typer.Argument(help="New (or empty) folder for the exported prompt.")],
    format_: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="peft: a PEFT prompt-tuning adapter; vllm: the tensor a vLLM client sends as prompt_embeds.",
        ),
    ] = ExportFormat.peft,
) -> None:
    """Export a run's trained prompt: a text soft prompt as a PEFT prompt-tuning adapter, or a decoder's
    soft prompt for vLLM's prompt_embeds."""
    if format_ is ExportFormat.vllm:
        from fedprompt.execution.vllm_export import export_vllm

        typer.echo(export_vllm(run_dir, out).instructions())
        return
    from fedprompt.execution.peft_export import export_peft

    typer.echo(export_peft(run_dir, out).instructions())


RunFolders = Annotated[list[Path], typer.Argument(help="Results folders of runs (runs/<name>-<time>).")]


@app.command()
@user_errors
def plot(
    run_dirs: RunFolders,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="PNG file (default: the run's plot.png; plot.png for several)."),
    ] = None,
) -> None:
    """Plot accuracy per round and against cumulative bytes (personalised curves and ε when present)."""
    from fedprompt.execution.plots import plot_runs
    from fedprompt.execution.report import load_run
    from fedprompt.execution.results import PLOT_FILE

    runs = [load_run(path) for path in run_dirs]
    if output is None:
        output = run_dirs[0] / PLOT_FILE if len(run_dirs) == 1 else Path(PLOT_FILE)
    typer.echo(f"plot written to {plot_runs(runs, output)}")


@app.command()
@user_errors
def report(
    run_dirs: RunFolders,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Write the table to OUTPUT.md and OUTPUT.csv.")
    ] = Path("report"),
) -> None:
    """Compare runs in one table: accuracy (final, best, base/novel/HM, personalised), bytes, time, ε."""
    from fedprompt.execution.report import comparison_rows, format_value, load_run, write_markdown
    from fedprompt.execution.tables import write_csv

    rows = comparison_rows([load_run(path) for path in run_dirs])
    table = Table(title="fedprompt runs")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*(format_value(column, value) for column, value in row.items()))
    Console().print(table)
    markdown, csv_file = output.with_name(output.name + ".md"), output.with_name(output.name + ".csv")
    write_markdown(rows, markdown)
    write_csv(rows, csv_file)
    typer.echo(f"table written to {markdown} and {csv_file}")


flower_cli = typer.Typer(no_args_is_help=True, help="Run fedprompt jobs on Flower (the `flower` extra).")
app.add_typer(flower_cli, name="flower")


@flower_cli.command("new-app")
@user_errors
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
    except (FileExistsError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"Flower app written to {path}; see {path / 'README.md'} to run it")


@flower_cli.command("site-worker")
@user_errors
def flower_site_worker(
    socket_path: Annotated[
        Path, typer.Option("--socket", help="Unix socket path; name it in the SuperNode's node config.")
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="The app's fedprompt.yaml: build its experiment now, before the first round."),
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field (repeatable).")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the clients' carried state (personal prompts, ...) here, across restarts."),
    ] = None,
) -> None:
    """Keep one site's backbone and data loaded across rounds for Flower's per-message ClientApp processes.

    Start the SuperNode with --node-config "partition-id=<id> site-worker='<socket>'".
    """
    from fedprompt.flower.site_worker import serve as serve_site

    logging.getLogger("fedprompt.flower").setLevel(logging.INFO)  # builds and rejections, always
    try:
        resolved = load_config(config, list(set_ or [])) if config is not None else None
        serve_site(socket_path, resolved, state_dir)
    except (FileExistsError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


_EXTRA_COLUMNS = (
    ("base acc", "base_accuracy"),
    ("novel acc", "novel_accuracy"),
    ("HM", "harmonic_mean"),
    ("closed acc", "closed_accuracy"),
    ("open acc", "open_accuracy"),
    ("ε", "epsilon"),
)
"""Columns of base-to-novel, VQA and differentially private runs (ε: the privacy spent so far), when
their history has them: (header, history key)."""


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
    if s.get("privacy") is not None:
        out.print(
            f"privacy ({s['privacy']}): ε = {s['final_epsilon']:.3f} at δ = {s['delta']:g}; noise multiplier "
            f"{s['noise_multiplier']:.4g}, sampling {s['sampling']}, rate {s['sampling_rate']:.4g}"
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
