"""Client states (and a site's ledger of releases) kept in a Flower node's ``Context.state``, which
Flower carries from message to message of a run (in its simulation engine and on a SuperNode alike,
whichever process runs the ClientApp). For state that must outlive the run (a resumed run is a new
Flower run), give the SuperNode a folder instead: ``--node-config "... client-state-dir='/path'"``.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load, save

from fedprompt.federation.client_state import ClientStateStore, Versions
from fedprompt.federation.privacy.ledger import SiteLedger
from fedprompt.federation.state import State

STATE_RECORD = "fedprompt.client-state"
"""The key of the ArrayRecord in ``Context.state`` that holds the carried states."""


class ContextClientStates(ClientStateStore):
    """Owns the carried states stored in one node's Flower context: an ArrayRecord whose arrays
    ``<client>/committed`` and ``<client>/staged-<round>`` are safetensors bytes (the round in their
    metadata). Never pickled."""

    def __init__(self, state: RecordDict) -> None:
        if STATE_RECORD not in state.array_records:
            state[STATE_RECORD] = ArrayRecord()
        self.record = state.array_records[STATE_RECORD]

    def _versions(self, client_id: int) -> Versions:
        versions = Versions()
        prefix = f"{client_id}/"
        for key in list(self.record):
            if not key.startswith(prefix):
                continue
            state, round_num = _decode(self.record[key].data)
            if key == prefix + "committed":
                versions.committed_round, versions.committed = round_num, state
            else:
                versions.staged[round_num] = state
        return versions

    def _put_staged(self, client_id: int, round_num: int, state: State) -> None:
        self.record[f"{client_id}/staged-{round_num}"] = _encode(state, round_num)

    def _put_committed(self, client_id: int, round_num: int, state: State, drop: list[int]) -> None:
        self.record[f"{client_id}/committed"] = _encode(state, round_num)
        for r in drop:
            key = f"{client_id}/staged-{r}"
            if key in self.record:
                del self.record[key]


def _encode(state: State, round_num: int) -> Array:
    data = save({k: v.contiguous() for k, v in state.items()}, metadata={"round": str(round_num)})
    return Array(dtype="uint8", shape=(len(data),), stype="safetensors", data=data)


def _decode(data: bytes) -> tuple[State, int]:
    raw = bytes(data)
    size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + size]).get("__metadata__", {})
    return load(raw), int(metadata["round"])


LEDGER_RECORD = "fedprompt.site-ledger"
"""The key of the ConfigRecord in ``Context.state`` that holds a site's ledger for one Flower run."""


class ContextLedger(SiteLedger):
    """A site's ledger in its node's Flower context: it outlives the ClientApp process but not the
    Flower run (a resumed run is a new Flower run), so it is not ``persistent``."""

    def __init__(self, state: RecordDict) -> None:
        if LEDGER_RECORD not in state.config_records:
            state[LEDGER_RECORD] = ConfigRecord({"releases": "[]"})
        self._entries_record = state.config_records[LEDGER_RECORD]

    def _load(self) -> list[dict[str, Any]]:
        return json.loads(str(self._entries_record["releases"]))

    def _save(self, entries: list[dict[str, Any]]) -> None:
        self._entries_record["releases"] = json.dumps(entries)
