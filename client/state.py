"""Disk-backed personal state, one file per device.

Why not Flower's ``Context.state``: in simulation Flower keeps every node's Context
in the simulation process's memory and ships it to a worker on each call, so
memory grows with devices x model size. A file per device keeps memory flat in
the number of devices and mirrors a real device's own storage.

A device's state is one safetensors file (arrays plus a small JSON metadata
string), replaced atomically: a crash mid-write leaves the previous state. Each
save keeps the generation it replaces, so a resumed run can undo a round lost in
a crash (``common.state_files``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from common.atomic import atomic_write_bytes
from common.state_files import (
    META_KEY,
    ROUND_KEY,
    StateCorruptError,
    keep_previous,
    read_meta,
    rollback,
    state_path,
)
from common.weights import from_safetensors, to_safetensors

__all__ = ["ROUND_KEY", "PersonalState", "PersonalStateStore", "StateCorruptError"]


@dataclass
class PersonalState:
    """What a device keeps between rounds: personal arrays and small scalars."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, float | int | str] = field(default_factory=dict)


class PersonalStateStore:
    """Per-device state files under ``root`` (``device-<id>.safetensors``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, device_id: int) -> Path:
        return state_path(self.root, device_id)

    def load(self, device_id: int) -> PersonalState | None:
        """The device's state, or None for a device that has never trained."""
        p = self.path(device_id)
        try:
            blob = p.read_bytes()
        except FileNotFoundError:
            return None
        try:
            arrays = from_safetensors(blob)
            meta = json.loads(_read_metadata(blob).get(META_KEY, "{}"))
        except (SafetensorError, ValueError) as err:
            raise StateCorruptError(f"personal state {p} is unreadable: {err}") from err
        return PersonalState(arrays=arrays, meta=meta)

    def quarantine(self, device_id: int, round_: int) -> Path:
        """Move an unreadable state file aside (``.corrupt-r<round>``); return its new path."""
        p = self.path(device_id)
        dst = p.with_name(f"{p.name}.corrupt-r{round_}")
        p.replace(dst)
        return dst

    def load_meta(self, device_id: int) -> PersonalState | None:
        """The state's metadata only (its arrays left on disk), or None for a new device.

        Reads the safetensors header, not the weights: for algorithms that train from
        the global model alone, reading a whole stored model per device was wasted I/O.
        """
        meta = read_meta(self.path(device_id))
        return None if meta is None else PersonalState(arrays={}, meta=meta)

    def save(self, device_id: int, state: PersonalState, *, durable: bool = True) -> None:
        """Write atomically (temp file, rename), keeping the replaced generation;
        ``durable`` adds the fsyncs."""
        blob = to_safetensors(state.arrays, metadata={META_KEY: json.dumps(state.meta)})
        path = self.path(device_id)
        keep_previous(path)
        atomic_write_bytes(path, blob, durable=durable)

    def rollback(self, round_: int) -> list[int]:
        """Undo every state saved after ``round_`` (see ``common.state_files.rollback``)."""
        return rollback(self.root, round_)


def _read_metadata(blob: bytes) -> dict[str, str]:
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))
