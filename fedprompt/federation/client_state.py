"""What a client carries from round to round besides the global prompt, versioned by round.

A client's carried state is one named set of tensors: the local part of a split prompt, a
personal prompt, control variates, ATPFL's previous local prompt. It changes only when the
server used that client's update: a fit *stages* the state it would carry forward under its
round, and the state is *committed* once the server says (directly in-process, or through the
next round's instructions on Flower: ``accepted_round``) that the update of that round went into
the global prompt. A fit the server rejected, or a round whose aggregation failed, leaves the
client exactly as it was, so a resumed run replays it bit for bit.

Stores: :class:`MemoryClientStates` (in-process runs and Flower simulation; checkpointed with
the run) and :class:`DirectoryClientStates` (a site's own folder, for the Flower site worker and
for SuperNodes that must survive a restart). Both share the versioning rules of
:class:`ClientStateStore`.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedprompt.federation.state import State
from fedprompt.files import write_atomically

log = logging.getLogger("fedprompt.client_state")

NEVER = 0
"""``accepted_round`` of a client whose update the server never used (rounds count from 1)."""

_CHECKPOINT_PREFIX = "client/"


class ClientStateError(RuntimeError):
    """The state a client must start a round from is not on this site (e.g. lost with a process)."""


@dataclass
class Versions:
    """One client's carried state: the committed state and its round, and fits not yet confirmed."""

    committed_round: int = NEVER
    committed: State = field(default_factory=dict)
    staged: dict[int, State] = field(default_factory=dict)


class ClientStateStore(ABC):
    """Owns the carried state of the clients a process hosts, by client id, versioned by round.

    ``resolve(cid, accepted_round)`` gives the state a fit starts from: the server's view of the
    client (the state staged at ``accepted_round`` is committed first). ``stage`` keeps a fit's
    outgoing state until the server confirms it; ``commit`` promotes it.
    """

    @abstractmethod
    def _versions(self, client_id: int) -> Versions:
        """The stored versions of one client (empty when it has none)."""

    @abstractmethod
    def _put_staged(self, client_id: int, round_num: int, state: State) -> None:
        """Store a staged state."""

    @abstractmethod
    def _put_committed(self, client_id: int, round_num: int, state: State, drop: list[int]) -> None:
        """Store the committed state and forget the staged rounds ``drop``."""

    def resolve(self, client_id: int, accepted_round: int) -> State:
        """The state client ``client_id`` starts from when the server last used its update of
        round ``accepted_round`` (``NEVER``: none yet). Raises ClientStateError when that state
        is not here."""
        versions = self._versions(client_id)
        if accepted_round == versions.committed_round:
            return versions.committed
        if accepted_round in versions.staged:
            state = versions.staged[accepted_round]
            self.commit(client_id, accepted_round)
            return state
        if accepted_round == NEVER:  # the server used none of its updates: back to the start
            return {}
        raise ClientStateError(
            f"client {client_id}: the server used its update of round {accepted_round}, but this site "
            f"holds its state of round {versions.committed_round} (staged: {sorted(versions.staged)}); "
            "the state was lost with its process. Keep client state in a folder (site worker "
            "--state-dir, or the SuperNode's client-state-dir) so it survives restarts"
        )

    def stage(self, client_id: int, round_num: int, state: State) -> None:
        """Keep the state a fit of ``round_num`` would carry forward, until the server confirms it."""
        self._put_staged(client_id, round_num, {n: t.detach().to("cpu").clone() for n, t in state.items()})

    def commit(self, client_id: int, round_num: int) -> None:
        """The server used the update of ``round_num``: its staged state becomes the committed one."""
        versions = self._versions(client_id)
        if round_num not in versions.staged:
            if round_num == versions.committed_round:
                return
            raise ClientStateError(f"client {client_id} has no staged state of round {round_num}")
        drop = [r for r in versions.staged if r <= round_num]
        self._put_committed(client_id, round_num, versions.staged[round_num], drop)

    def committed(self, client_id: int) -> tuple[int, State]:
        """(round, state) of the client's committed state."""
        versions = self._versions(client_id)
        return versions.committed_round, versions.committed


class MemoryClientStates(ClientStateStore):
    """Carried states in this process's memory; ``checkpoint``/``restore`` put the committed ones
    into the run's checkpoint (in-process runs), so a resumed run starts every client as it was."""

    def __init__(self) -> None:
        self._clients: dict[int, Versions] = {}

    def _versions(self, client_id: int) -> Versions:
        return self._clients.setdefault(client_id, Versions())

    def _put_staged(self, client_id: int, round_num: int, state: State) -> None:
        self._versions(client_id).staged[round_num] = state

    def _put_committed(self, client_id: int, round_num: int, state: State, drop: list[int]) -> None:
        versions = self._versions(client_id)
        versions.committed_round, versions.committed = round_num, state
        for r in drop:
            versions.staged.pop(r, None)

    def checkpoint(self) -> tuple[State, dict[str, str]]:
        """Tensors ``client/<id>/<name>`` of every committed state, and each client's round."""
        tensors: State = {}
        rounds: dict[str, int] = {}
        for cid, versions in sorted(self._clients.items()):
            if versions.committed_round == NEVER:
                continue
            rounds[str(cid)] = versions.committed_round
            for name, tensor in versions.committed.items():
                tensors[f"{_CHECKPOINT_PREFIX}{cid}/{name}"] = tensor
        return tensors, {"fedprompt.client_state_rounds": json.dumps(rounds, sort_keys=True)}

    def restore(self, tensors: State, metadata: dict[str, str]) -> None:
        """Replace every client's state with the committed states of a checkpoint (staged ones go)."""
        rounds = json.loads(metadata.get("fedprompt.client_state_rounds", "{}"))
        clients: dict[int, Versions] = {int(cid): Versions(int(r), {}) for cid, r in rounds.items()}
        for key, tensor in tensors.items():
            if not key.startswith(_CHECKPOINT_PREFIX):
                continue
            cid, _, name = key.removeprefix(_CHECKPOINT_PREFIX).partition("/")
            if int(cid) not in clients:
                raise ValueError(f"checkpoint holds client state {key} but no round for client {cid}")
            clients[int(cid)].committed[name] = tensor.clone()
        self._clients = clients


_STAGED_FILE = re.compile(r"staged-(\d+)\.safetensors")


class DirectoryClientStates(ClientStateStore):
    """Carried states in a folder of the site, one subfolder per client: ``committed.safetensors``
    (its round in the metadata) and ``staged-<round>.safetensors``. Every write is atomic and
    fsynced, so a site that dies mid-write keeps its last good state."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _client_dir(self, client_id: int) -> Path:
        return self.folder / f"client-{client_id}"

    def _versions(self, client_id: int) -> Versions:
        folder = self._client_dir(client_id)
        versions = Versions()
        if not folder.is_dir():
            return versions
        committed = folder / "committed.safetensors"
        if committed.is_file():
            versions.committed, metadata = _read(committed)
            versions.committed_round = int(metadata["round"])
        for file in folder.iterdir():
            match = _STAGED_FILE.fullmatch(file.name)
            if match:
                versions.staged[int(match.group(1))] = _read(file)[0]
        return versions

    def _put_staged(self, client_id: int, round_num: int, state: State) -> None:
        folder = self._client_dir(client_id)
        folder.mkdir(exist_ok=True)
        _write(folder / f"staged-{round_num}.safetensors", state, round_num)

    def _put_committed(self, client_id: int, round_num: int, state: State, drop: list[int]) -> None:
        folder = self._client_dir(client_id)
        _write(folder / "committed.safetensors", state, round_num)
        for r in drop:
            (folder / f"staged-{r}.safetensors").unlink(missing_ok=True)


def _read(path: Path) -> tuple[State, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def _write(path: Path, state: State, round_num: int) -> None:
    tensors = {name: t.contiguous() for name, t in state.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), {"round": str(round_num)}))
