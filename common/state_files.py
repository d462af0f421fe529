"""Personal-state files on disk: names, metadata, generations, rollback.

Why in common: devices write these files (``client.state``) and a resumed server
run must undo the ones written in a round lost in a crash (``server.checkpoint``);
neither side imports the other.

Each save keeps the generation it replaces as ``<file>.prev`` (a hard link, no
copy). The server checkpoints every round before the next one starts, so at most
one generation per device is newer than the last checkpoint, and ``rollback``
can always put the checkpointed one back. Every step is a rename or an unlink, so
``kill -9`` at any point leaves either generation whole, and a rollback that was
itself killed is finished by running it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from common.atomic import TMP_PREFIX

META_KEY = "hybridfl"
"""safetensors metadata key holding the state's JSON metadata."""
ROUND_KEY = "last_round"
"""Metadata key: the round the state was trained in."""
PREV_SUFFIX = ".prev"
"""The generation a save replaced: what ``rollback`` restores."""
_PREFIX, _SUFFIX = "device-", ".safetensors"

log = logging.getLogger(__name__)


class StateCorruptError(RuntimeError):
    """A state file exists but cannot be read (disk corruption, foreign file)."""


def state_path(root: Path, device_id: int) -> Path:
    return Path(root) / f"{_PREFIX}{int(device_id):06d}{_SUFFIX}"


def read_meta(path: Path) -> dict[str, float | int | str] | None:
    """A state file's metadata from its safetensors header (None when there is no file).

    Reads the header, not the weights."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < header_len < 100_000_000:
                raise ValueError(f"implausible header length {header_len}")
            header = json.loads(f.read(header_len))
        meta = json.loads(dict(header.get("__metadata__", {})).get(META_KEY, "{}"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise StateCorruptError(f"personal state {path} is unreadable: {err}") from err
    return dict(meta)


def keep_previous(path: Path) -> None:
    """Make ``<path>.prev`` the current generation of ``path`` (hard link, swapped in by
    rename) before ``path`` is replaced: a device never has neither."""
    if not path.exists():
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(path, tmp)
        os.replace(tmp, path.with_name(path.name + PREV_SUFFIX))
    except FileNotFoundError:  # replaced between the check and the link: nothing to keep
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _round_of(path: Path) -> int | None:
    try:
        meta = read_meta(path)
    except StateCorruptError as err:
        log.warning("rollback: %s (left for the device to quarantine)", err)
        return None
    return None if meta is None else int(meta.get(ROUND_KEY, -1))


def rollback(root: Path, round_: int) -> list[int]:
    """Undo every state saved after ``round_``; the devices rolled back, ascending.

    A device whose newer state replaced an older one gets the older one back; a
    device that had none before loses its file (it had not trained by ``round_``).
    Reads one header per state file: the cost of a resume, not of a round.
    """
    root = Path(root)
    undone: list[int] = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return undone
    for name in names:
        p = root / name
        if name.startswith(TMP_PREFIX):  # a write that was killed: never visible
            p.unlink(missing_ok=True)
            continue
        if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
            continue
        got = _round_of(p)
        if got is None or got <= round_:
            continue
        prev = p.with_name(name + PREV_SUFFIX)
        before = _round_of(prev)
        if before is not None and before <= round_:
            os.replace(prev, p)
        else:
            p.unlink()
            prev.unlink(missing_ok=True)
        undone.append(int(name[len(_PREFIX) : -len(_SUFFIX)]))
    return undone
