"""Reading only a personal state's metadata gives what a full read gives, and no less care."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.state import PersonalState, PersonalStateStore, StateCorruptError


def test_metadata_only_read_matches_the_full_read(tmp_path: Path) -> None:
    store = PersonalStateStore(tmp_path)
    assert store.load_meta(3) is None
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    store.save(3, PersonalState(arrays, {"last_round": 7, "rounds_trained": 2}), durable=False)
    full, meta = store.load(3), store.load_meta(3)
    assert full is not None and meta is not None
    assert meta.meta == full.meta == {"last_round": 7, "rounds_trained": 2}
    assert meta.arrays == {} and set(full.arrays) == {"w"}


def test_a_damaged_header_is_reported_not_guessed(tmp_path: Path) -> None:
    store = PersonalStateStore(tmp_path)
    store.path(1).write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(StateCorruptError, match="unreadable"):
        store.load_meta(1)
    store.path(2).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(StateCorruptError, match="unreadable"):
        store.load_meta(2)
