"""The registry's event log: every alias move (and rollout verdict), append-only.

``<registry>/events.jsonl`` holds one JSON event per line. It is the registry's
write-ahead log for aliases: a move is first appended here and fsynced, then the
alias file is replaced and records the ``event_seq`` it reflects. A crash between
the two leaves an event whose move is not applied yet: readers derive the alias
from the newer event, and the next writer rewrites the alias file (roll forward).
A crash during the append leaves at most a torn last line (no newline):
readers ignore it, the next writer cuts it off before appending. So the
alias and its last event always agree, whatever instant a writer dies.

Why JSON lines and not one file per event: one fsynced ``write`` per move, and a
reader tails the file from its last offset (one ``stat`` when nothing changed).
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import fsync_dir
from common.rows_serving import Analysis

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
_TAIL_BYTES = 1 << 16
"""How much of the log's end a writer checks for a torn line (events are < 4 KiB)."""

EventKind = Literal["move", "reject", "alert"]
"""``move``: an alias now points elsewhere. ``reject``: a rollout aborted; the
candidate's devices went back to ``to_version`` (no alias file changes).
``alert``: a monitor fired (no alias file changes)."""


class RegistryEvent(BaseModel):
    """One line of ``events.jsonl``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seq: int = Field(ge=1, description="1, 2, ... in file order; never reused.")
    time: datetime
    round: int | None = Field(None, description="Training round, when the run knew it.")
    kind: EventKind = "move"
    alias: str
    from_version: int | None = None
    to_version: int
    pinned: bool = False
    actor: str = Field(description="'human', 'publish', 'repair' or 'policy:<name>'.")
    reason: str = ""
    analysis: Analysis | None = None


class EventLog:
    """Reader and appender of one ``events.jsonl``; safe across processes.

    Appends must happen under the registry's writer lock (the caller holds it).
    Reads take no lock: they parse whole lines only and cache what they parsed,
    keyed by the file's inode, so polling an unchanged log costs one ``stat``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._inode = -1
        self._offset = 0
        self._events: list[RegistryEvent] = []

    def events(self) -> list[RegistryEvent]:
        """Every whole, readable event in file order (a torn last line is ignored;
        an unreadable line in the middle is logged and skipped)."""
        with self._lock:
            self._refresh()
            return list(self._events)

    def last(self, alias: str | None = None, kind: EventKind | None = None) -> RegistryEvent | None:
        with self._lock:
            self._refresh()
            for event in reversed(self._events):
                if (alias is None or event.alias == alias) and (kind is None or event.kind == kind):
                    return event
        return None

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._inode, self._offset, self._events = -1, 0, []
            return
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset, self._events = st.st_ino, 0, []
        if st.st_size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines: the tail may still be written
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                self._events.append(RegistryEvent.model_validate_json(line))
            except (ValidationError, ValueError) as exc:
                log.error("%s: unreadable event line skipped: %s", self.path, exc)
        self._offset += end

    def cut_torn_tail(self) -> None:
        """Writer side: drop a last line without a newline (an append cut short), so
        the next append starts on a line of its own. A whole line that does not
        parse stays (readers skip it): cutting it would move bytes under readers'
        cached offsets."""
        try:
            with open(self.path, "r+b") as f:
                size = f.seek(0, os.SEEK_END)
                base = max(size - _TAIL_BYTES, 0)
                f.seek(base)
                data = f.read()
                keep = base + data.rfind(b"\n") + 1
                if keep < size:
                    log.warning("%s: cutting a torn last line (%d bytes)", self.path, size - keep)
                    f.truncate(keep)
                    os.fsync(f.fileno())
        except FileNotFoundError:
            return

    def next_seq(self) -> int:
        last = self.last()
        return 1 if last is None else last.seq + 1

    def append(self, event: RegistryEvent) -> int:
        """Append one event and make it durable before returning (the commit point).

        Returns the log's size before the append (for ``truncate``)."""
        line = event.model_dump_json(exclude_none=True).encode() + b"\n"
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.lseek(fd, 0, os.SEEK_END)
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(28, "short write to the event log")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        return before

    def truncate(self, size: int) -> None:
        """Writer side: take back the last append (its alias could not be written)."""
        with open(self.path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())
