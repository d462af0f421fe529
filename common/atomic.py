"""Atomic file replacement, shared by the personal-state store and the registry."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

TMP_PREFIX = ".tmp-"
"""Temp files start with this (hidden, never matching a real file's glob)."""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry itself)."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(
    path: Path,
    data: bytes,
    before_rename: Callable[[], None] | None = None,
    *,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file whole.

    Temp file in the same folder (so the rename cannot cross filesystems), fsync,
    rename, fsync the folder. A crash at any point leaves the old file intact and
    at most a hidden ``.tmp-*`` file behind. ``before_rename`` runs once the temp
    file is durable but not yet visible (crash-injection tests hook in there).
    ``durable=False`` keeps the rename's atomicity (a reader never sees half a file)
    but skips both fsyncs: for simulated devices' state, where a machine crash means
    rerunning the simulation and fsync per device dominated small-model rounds.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A compressed ``.npz`` (plain arrays, no pickle) written atomically and durably."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
