"""``python -m apps.blackbox_api``: the one-process demo (no command), or one party's role of the
deployed app (``server``, ``client``), or a finished run's cost report (``report``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from apps.blackbox_api.processes import ProcessError
from apps.blackbox_api.report import cost_report, format_report, read_usage
from fedprompt.config import ConfigError

if TYPE_CHECKING:  # the roles need Flower (the `flower` extra); the demo does not
    from apps.blackbox_api.roles import FlowerTLS

app = typer.Typer(add_completion=False, help="Black-box prompt tuning of a model reached only over HTTP.")

Config = Annotated[Path, typer.Option(help="The fedprompt configuration (backbone.kind: remote).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a field (repeatable).")]
REPORT_FILE = "cost_report.json"


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """Without a command: the one-process demo (service, server and clients in this process)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("apps.blackbox_api").setLevel(logging.INFO)
    if ctx.invoked_subcommand is None:
        demo()


@app.command()
def demo(rounds: Annotated[int, typer.Option(min=1)] = 3) -> None:
    """The inference service on loopback and a small FedBPT federation querying it, in this process."""
    from apps.blackbox_api.demo import run_demo

    for key, value in run_demo(rounds).items():
        typer.echo(f"{key}: {value}")


@app.command()
def server(
    config: Config,
    set_: Sets = None,
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The SuperLink's port.")] = 9093,
    insecure: Annotated[bool, typer.Option(help="Flower without TLS (trials only).")] = False,
    ssl_ca_certfile: Annotated[Path | None, typer.Option(help="CA certificate the parties trust.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="The SuperLink's certificate.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="The SuperLink's private key.")] = None,
    results: Annotated[Path, typer.Option(help="Folder that receives the run folder.")] = Path("runs"),
    workdir: Annotated[Path, typer.Option(help="Flower's files and logs.")] = Path(
        ".fedprompt-blackbox/server"
    ),
    round_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for a round's replies.")
    ] = 600.0,
    node_wait_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait at the start for every client.")
    ] = 600.0,
    usage: Annotated[
        Path | None,
        typer.Option(help="The service's usage file (fedprompt serve --usage-file), for the report."),
    ] = None,
) -> None:
    """The federation server: a Flower SuperLink and the run; prints what each client's rounds cost."""
    from apps.blackbox_api.roles import run_server

    try:
        tls = _flower_tls(insecure, ssl_ca_certfile, ssl_certfile, ssl_keyfile)
        run_dir = run_server(
            config,
            set_ or [],
            host=host,
            port=port,
            tls=tls,
            results=results,
            workdir=workdir,
            round_timeout=round_timeout,
            node_wait_timeout=node_wait_timeout,
        )
        _report(run_dir, usage)
    except (ConfigError, ProcessError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@app.command()
def client(
    config: Config,
    partition_id: Annotated[int, typer.Option(min=0, help="The data partition this party hosts.")],
    superlink: Annotated[str, typer.Option(help="The SuperLink's HOST:PORT.")],
    set_: Sets = None,
    insecure: Annotated[bool, typer.Option(help="Flower without TLS (trials only).")] = False,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate of the SuperLink's certificate.")
    ] = None,
    workdir: Annotated[Path, typer.Option(help="Logs of this site's processes.")] = Path(
        ".fedprompt-blackbox"
    ),
) -> None:
    """A data owner: a site worker and a Flower SuperNode for one partition, until interrupted."""
    from apps.blackbox_api.roles import run_client

    try:
        if insecure == (root_certificates is not None):
            raise ValueError(
                "give --root-certificates (TLS) or --insecure (trials only), not both or neither"
            )
        run_client(
            config,
            set_ or [],
            partition_id=partition_id,
            superlink=superlink,
            root_certificates=root_certificates,
            workdir=workdir,
        )
    except (ConfigError, ProcessError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from None


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A finished run's folder.")],
    usage: Annotated[Path | None, typer.Option(help="The service's usage file.")] = None,
) -> None:
    """Print (and write to the run folder) the query budget and what each client's rounds cost."""
    try:
        _report(run_dir, usage)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from None


@app.command("publish-embeddings")
def publish_embeddings_command(
    model: Annotated[str, typer.Argument(help="A GGUF file, a model folder or a bundled alias.")],
    out: Annotated[Path, typer.Argument(help="The safetensors file to write.")],
) -> None:
    """The model owner: write the model's input-embedding table for vLLM clients (backbone.embeddings)."""
    from apps.blackbox_api.model_files import publish_embeddings
    from prompt_modules.bundled import resolve_model_name

    try:
        path, gguf = resolve_model_name(model, None)
        vocab, hidden = publish_embeddings(path, out, gguf)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{out}: the input-embedding table [{vocab}, {hidden}] (float32), for backbone.embeddings")


@app.command("gguf-to-hf")
def gguf_to_hf_command(
    gguf: Annotated[Path, typer.Argument(help="The GGUF file.")],
    out: Annotated[Path, typer.Argument(help="A new folder for the Hugging Face model.")],
) -> None:
    """The model owner: the GGUF model as a Hugging Face folder (float32) for vLLM to serve."""
    from apps.blackbox_api.model_files import gguf_to_hf_folder

    try:
        typer.echo(f"written {gguf_to_hf_folder(gguf, out)}")
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        raise _fail(exc) from None


def _flower_tls(insecure: bool, ca: Path | None, cert: Path | None, key: Path | None) -> FlowerTLS | None:
    from apps.blackbox_api.roles import FlowerTLS

    if insecure:
        if ca or cert or key:
            raise ValueError("--insecure and the --ssl-* files exclude each other")
        return None
    if not (ca and cert and key):
        raise ValueError(
            "give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile (TLS) or --insecure (trials)"
        )
    return FlowerTLS(ca, cert, key)


def _report(run_dir: Path, usage: Path | None) -> None:
    data = cost_report(run_dir, read_usage(usage) if usage else None)
    (run_dir / REPORT_FILE).write_text(json.dumps(data, indent=1))
    typer.echo(format_report(data))


if __name__ == "__main__":
    app()
