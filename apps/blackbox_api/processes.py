"""The child processes a role starts (Flower's SuperLink or SuperNode, a site worker, ``flwr run``):
each in its own session with its log file, waited for by polling what it serves, stopped with
its session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class ProcessError(RuntimeError):
    """A child process could not start, exited early, or was not ready in time; says which, with the
    end of its log."""


def executable(name: str) -> str:
    """The path of a console script (``flower-superlink``, ``flwr``): beside this interpreter first."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ProcessError(f"{name} is not installed; pip install 'fedprompt[flower]'")
    return found


FEDPROMPT = [sys.executable, "-c", "from fedprompt.cli import main; main()"]
"""The ``fedprompt`` command, run by this interpreter."""


class Processes:
    """Owns the child processes of one role: starts each in its own session with its output in
    ``log_dir/<name>.log``, and stops them all (SIGTERM to each session, then SIGKILL), last first."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env or dict(os.environ)
        self.children: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: Sequence[str], cwd: Path | None = None) -> subprocess.Popen:
        with self.log(name).open("w") as log:
            child = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=cwd,
                start_new_session=True,
            )
        self.children[name] = child
        return child

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, name: str, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` (every half second) until it is true; ProcessError if ``name`` exits first
        or ``timeout`` seconds pass."""
        child = self.children[name]
        deadline = time.monotonic() + timeout
        while not ready():
            if child.poll() is not None:
                raise ProcessError(f"{name} exited ({child.returncode}) before {what}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{name}: not {what} after {timeout:.0f} s:\n{self.tail(name)}")
            time.sleep(0.5)

    def first_exit(self) -> tuple[str, int] | None:
        """The name and exit status of a child that has exited, if any."""
        for name, child in self.children.items():
            if child.poll() is not None:
                return name, child.returncode
        return None

    def stop(self, name: str, grace: float = 15.0) -> None:
        """End a child and its session: SIGTERM, then SIGKILL after ``grace`` seconds."""
        child = self.children.pop(name)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, sig)
            try:
                child.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)  # what the child itself started

    def stop_all(self) -> None:
        for name in reversed(list(self.children)):
            self.stop(name)


def interrupted_by_signals() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so a role stops its children however it is ended."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
