"""What a run leaves behind, row by row: metrics, timings, cold starts, device results.

``metrics.jsonl`` holds deterministic figures only (the same seed gives the same
bytes); wall-clock figures go to ``timings.jsonl``. Every row is a typed
``common.rows`` model; each line is appended and flushed, so live readers (the CLI,
the HTTP server) can tail the files while the run trains. The appended files'
lengths at the end of a round are its checkpoint's positions: a resumed run cuts
them back there (a row of the lost round, a torn last line) and appends again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from common.crashpoint import write_line
from common.rows import ColdStart, RoundRow, TimingRow, read_rows
from common.rundir import COLD_START_FILE, DEVICES_FILE, METRICS_FILE, TIMINGS_FILE
from server.device_summary import DeviceRow, write_device_rows

APPENDED = (METRICS_FILE, TIMINGS_FILE, COLD_START_FILE)
"""The files rows are appended to (``devices.jsonl`` is replaced whole instead)."""


class RewindError(RuntimeError):
    """A recorded file is shorter than its checkpoint says: it was edited or lost."""


class Recorder:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.last: RoundRow | None = None

    def start(self) -> None:
        """A fresh run: no rows from an earlier attempt in this folder."""
        for name in (METRICS_FILE, TIMINGS_FILE, COLD_START_FILE, DEVICES_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    def _append(self, name: str, line: str, round_: int = -1) -> None:
        with (self.run_dir / name).open("a") as f:
            write_line(f, line, f"write-{name}", round_)
            f.flush()

    def round(self, row: RoundRow, timing: TimingRow) -> None:
        self.last = row
        t = json.dumps(timing.model_dump(exclude_none=True), sort_keys=True)
        self._append(TIMINGS_FILE, t, row.round)
        self._append(METRICS_FILE, row.to_json(), row.round)

    def positions(self) -> dict[str, int]:
        """Each appended file's length, made durable: where a resumed run cuts back to."""
        out: dict[str, int] = {}
        for name in APPENDED:
            try:
                with (self.run_dir / name).open("rb") as f:
                    os.fsync(f.fileno())
                    out[name] = os.fstat(f.fileno()).st_size
            except FileNotFoundError:
                out[name] = 0
        return out

    def rewind(self, positions: dict[str, int]) -> None:
        """Cut every appended file back to ``positions`` (rows after them belong to a
        round lost in a crash, possibly half written) and reload the last row."""
        for name in APPENDED:
            path, keep = self.run_dir / name, positions.get(name, 0)
            size = path.stat().st_size if path.exists() else 0
            if size < keep:
                raise RewindError(
                    f"{path} has {size} bytes, fewer than the {keep} its checkpoint recorded: "
                    "the run folder was changed after the crash; start a new run"
                )
            if size > keep:
                os.truncate(path, keep)
        rows = read_rows(self.run_dir / METRICS_FILE)
        self.last = rows[-1] if rows else None

    def cold_starts(self, round_: int, devices: Sequence[ColdStart]) -> None:
        payload = {"round": round_, "devices": [d.model_dump(exclude_none=True) for d in devices]}
        self._append(COLD_START_FILE, json.dumps(payload, sort_keys=True), round_)

    def devices(self, round_: int, rows: Sequence[DeviceRow]) -> None:
        write_device_rows(self.run_dir / DEVICES_FILE, round_, rows)
