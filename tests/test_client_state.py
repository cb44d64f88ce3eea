"""Client states: versioned by round, committed only when the server used the update, kept in
memory (checkpointed with the run), in a folder, or in a Flower node's context."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict

from fedprompt.federation.client_state import (
    NEVER,
    ClientStateError,
    DirectoryClientStates,
    MemoryClientStates,
)
from fedprompt.flower.context_states import ContextClientStates


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"local/p": torch.full((2, 3), value), "control/p": torch.tensor([value, -value])}


def _equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["memory", "directory", "context"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryClientStates()
    if request.param == "directory":
        return DirectoryClientStates(tmp_path / "states")
    return ContextClientStates(RecordDict())


def test_a_new_client_starts_empty(store):
    assert store.resolve(3, NEVER) == {}
    assert store.committed(3) == (NEVER, {})


def test_staged_state_counts_only_once_the_server_used_the_update(store):
    store.stage(1, 1, _state(1.0))
    assert store.resolve(1, NEVER) == {}  # round 1's update was rejected: the client starts afresh
    store.stage(1, 2, _state(2.0))
    assert _equal(store.resolve(1, 2), _state(2.0))  # the server used round 2's update
    assert store.committed(1)[0] == 2
    store.stage(1, 3, _state(3.0))
    assert _equal(store.resolve(1, 2), _state(2.0))  # round 3's was not used: still round 2's
    assert _equal(store.resolve(1, 3), _state(3.0))


def test_a_client_state_that_is_not_here_is_an_error_naming_the_rounds(store):
    store.stage(0, 1, _state(1.0))
    store.resolve(0, 1)
    with pytest.raises(ClientStateError, match=r"round 4, but this site holds its state of round 1"):
        store.resolve(0, 4)


def test_clients_are_kept_apart(store):
    store.stage(0, 1, _state(1.0))
    store.stage(1, 1, _state(5.0))
    assert _equal(store.resolve(0, 1), _state(1.0))
    assert _equal(store.resolve(1, 1), _state(5.0))


def test_directory_states_survive_a_new_store_on_the_same_folder(tmp_path):
    first = DirectoryClientStates(tmp_path)
    first.stage(2, 1, _state(1.0))
    first.stage(2, 2, _state(2.0))
    second = DirectoryClientStates(tmp_path)  # e.g. the site worker restarted
    assert _equal(second.resolve(2, 2), _state(2.0))
    assert sorted(p.name for p in (tmp_path / "client-2").iterdir()) == ["committed.safetensors"]


def test_memory_states_round_trip_through_a_checkpoint():
    store = MemoryClientStates()
    store.stage(0, 1, _state(1.0))
    store.commit(0, 1)
    store.stage(4, 2, _state(4.0))
    store.commit(4, 2)
    store.stage(4, 3, _state(9.0))  # staged only: not part of the checkpoint
    tensors, metadata = store.checkpoint()
    assert sorted(tensors) == [
        "client/0/control/p",
        "client/0/local/p",
        "client/4/control/p",
        "client/4/local/p",
    ]
    restored = MemoryClientStates()
    restored.restore(tensors, metadata)
    assert restored.committed(0)[0] == 1 and _equal(restored.committed(0)[1], _state(1.0))
    assert restored.committed(4)[0] == 2 and _equal(restored.resolve(4, 2), _state(4.0))
    with pytest.raises(ClientStateError):
        restored.resolve(4, 3)
