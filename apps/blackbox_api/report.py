"""What a black-box run cost each data owner: model queries (as the client reported them and as the
inference service counted them for its token), and bytes per round, on the federation link and
to the service; against a language-model server (vLLM, llama.cpp's, a hosted API), its requests,
prompt tokens and completion tokens as that server counted them in its answers (``usage``), with
an estimated price where the configuration gives one per token, and the share of label words that
were the floor (left out of the server's top log-probabilities).

The service counts per token, so the report joins its usage (``fedprompt serve --usage-file``,
kept by the model owner) to the run's clients by the token names this app uses: ``site-<N>`` for
the client hosting partition N and ``server`` for the federation server's global evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedprompt.config import CMAESOptimizerConfig, EndpointConfig, FedBPTConfig, load_config
from fedprompt.execution.results import CLIENTS_FILE, CONFIG_FILE, SUMMARY_FILE, RunDirectory
from fedprompt.execution.tables import format_number, text_table
from prompt_modules.remote_schema import Usage

SERVER_TOKEN = "server"


def site_token(partition_id: int) -> str:
    """The token name of the data owner hosting partition ``partition_id``."""
    return f"site-{partition_id}"


def read_usage(path: Path) -> dict[str, Usage]:
    """The service's usage file: token name -> counters."""
    return {name: Usage.model_validate(row) for name, row in json.loads(path.read_text()).items()}


def cost_report(run_dir: Path, usage: Mapping[str, Usage] | None = None) -> dict[str, Any]:
    """The run's query budget and each client's costs, as plain data (see ``format_report``)."""
    run = RunDirectory(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    rows = run.read(CLIENTS_FILE)
    optimizer = config.optimizer
    budget: dict[str, Any] = {"queries_per_client_round": getattr(optimizer, "budget", None)}
    if isinstance(optimizer, CMAESOptimizerConfig):
        budget |= {"popsize": optimizer.popsize, "batch_size": optimizer.batch_size}
        budget["final_loss_pass"] = isinstance(config.strategy, FedBPTConfig)
    clients = []
    for cid in sorted({row["client_id"] for row in rows}):
        mine = [row for row in rows if row["client_id"] == cid]
        accepted = [row for row in mine if row["accepted"]]
        sampled = len(mine)
        service = usage.get(site_token(cid)) if usage else None
        clients.append(
            {
                "client_id": cid,
                "rounds_sampled": sampled,
                "rounds_accepted": len(accepted),
                "queries_reported": int(sum(row.get("queries", 0) for row in accepted)),
                "federation_bytes_up_per_round": sum(row["bytes_up"] for row in mine) / sampled,
                "federation_bytes_down_per_round": sum(row["bytes_down"] for row in mine) / sampled,
                "service": None if service is None else _per_round(service, sampled),
                "api": _api_usage(mine, config.backbone),
                "failures": [row.get("reason", "") for row in mine if not row["accepted"]],
            }
        )
    server = usage.get(SERVER_TOKEN) if usage else None
    return {
        "run_dir": str(run_dir),
        "rounds": summary["rounds"],
        "initial_accuracy": summary["initial_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        "prompt": config.prompt.model_dump(),
        "budget": budget,
        "clients": clients,
        "server": None if server is None else server.model_dump(),
    }


API_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "retries")
"""What a client's rounds asked of a language-model server, in the server's units (metrics ``api_*``)."""


def _api_usage(rows: list[dict[str, Any]], backbone: Any) -> dict[str, Any] | None:
    """A client's use of a language-model server over its rounds (None when it reported none):
    totals and per round of each counter, the share of floored label words, and the estimated price."""
    reported = [row for row in rows if any(f"api_{name}" in row for name in API_COUNTERS)]
    if not reported:
        return None
    totals = {name: int(sum(row.get(f"api_{name}", 0) or 0 for row in reported)) for name in API_COUNTERS}
    scored = sum(row.get("api_scored_words", 0) or 0 for row in reported)
    floored = sum(row.get("api_floored_words", 0) or 0 for row in reported)
    out: dict[str, Any] = {
        **totals,
        **{f"{name}_per_round": totals[name] / len(reported) for name in API_COUNTERS},
        "floored_share": floored / scored if scored else 0.0,
        "price": None,
    }
    if isinstance(backbone, EndpointConfig):
        prices = (backbone.price_per_prompt_token, backbone.price_per_completion_token)
        if any(price is not None for price in prices):
            out["price"] = totals["prompt_tokens"] * (prices[0] or 0.0) + totals["completion_tokens"] * (
                prices[1] or 0.0
            )
    return out


def _per_round(usage: Usage, rounds: int) -> dict[str, Any]:
    return {
        **usage.model_dump(),
        "queries_per_round": usage.queries / rounds,
        "bytes_received_per_round": usage.bytes_received / rounds,
        "bytes_sent_per_round": usage.bytes_sent / rounds,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text: the budget, one row per client, then the server's evaluation."""
    budget, prompt = report["budget"], report["prompt"]
    plan = f"query budget per client per round: {budget['queries_per_client_round']}"
    if "popsize" in budget:
        plan += f" (CMA-ES generations of {budget['popsize']} candidates x {budget['batch_size']} examples)"
    if budget.get("final_loss_pass"):
        plan += ", plus FedBPT's loss of the final mean on each of the client's examples"
    rows = []
    for c in report["clients"]:
        s = c["service"] or {}
        rows.append(
            [
                str(c["client_id"]),
                f"{c['rounds_accepted']}/{c['rounds_sampled']}",
                str(c["queries_reported"]),
                _cell(s.get("queries")),
                _cell(s.get("query_quota")),
                f"{c['federation_bytes_up_per_round']:.0f}",
                f"{c['federation_bytes_down_per_round']:.0f}",
                _cell(s.get("bytes_received_per_round")),
                _cell(s.get("bytes_sent_per_round")),
            ]
        )
    headers = [
        "client",
        "rounds ok",
        "queries (client)",
        "queries (service)",
        "quota",
        "fed B up/round",
        "fed B down/round",
        "service B up/round",
        "service B down/round",
    ]
    lines = [
        f"run {report['run_dir']}: {report['rounds']} rounds, global accuracy "
        f"{report['initial_accuracy']:.4f} -> {report['final_accuracy']:.4f}",
        f"prompt: {prompt['kind']}, dim {prompt.get('dim')}, {prompt.get('num_tokens')} tokens",
        plan,
        text_table(headers, rows),
    ]
    api_rows = [[str(c["client_id"]), *_api_cells(c["api"])] for c in report["clients"] if c["api"]]
    if api_rows:
        api_headers = ["client", "requests", "prompt tok", "completion tok", "req/round", "prompt tok/round"]
        lines += [
            "language-model server (its own counts):",
            text_table([*api_headers, "floored", "price"], api_rows),
        ]
    lines += [f"client {c['client_id']} failed: {r}" for c in report["clients"] for r in c["failures"]]
    if report["server"]:
        server = report["server"]
        lines.append(
            f"server (global evaluation): {server['queries']} queries in {server['requests']} requests"
        )
    return "\n".join(lines)


def _api_cells(api: Mapping[str, Any]) -> list[str]:
    price = api["price"]
    return [
        str(api["requests"]),
        str(api["prompt_tokens"]),
        str(api["completion_tokens"]),
        f"{api['requests_per_round']:.0f}",
        f"{api['prompt_tokens_per_round']:.0f}",
        f"{api['floored_share']:.3f}",
        "-" if price is None else f"{price:.4g}",
    ]


def _cell(value: float | None) -> str:
    return format_number(value, 0, missing="-")
