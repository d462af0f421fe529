"""What a run leaves behind, row by row: metrics, timings, cold starts, device results.

``metrics.jsonl`` holds deterministic figures only (the same seed gives the same
bytes); wall-clock figures go to ``timings.jsonl``. Every row is a typed
``common.rows`` model; each line is appended and flushed, so live readers (the CLI,
the HTTP server) can tail the files while the run trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from common.rows import ColdStart, RoundRow, TimingRow
from common.rundir import COLD_START_FILE, DEVICES_FILE, METRICS_FILE, TIMINGS_FILE
from server.device_summary import DeviceRow, write_device_rows


class Recorder:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.last: RoundRow | None = None

    def start(self) -> None:
        """A fresh run: no rows from an earlier attempt in this folder."""
        for name in (METRICS_FILE, TIMINGS_FILE, COLD_START_FILE, DEVICES_FILE):
            (self.run_dir / name).unlink(missing_ok=True)

    def _append(self, name: str, line: str) -> None:
        with (self.run_dir / name).open("a") as f:
            f.write(line + "\n")
            f.flush()

    def round(self, row: RoundRow, timing: TimingRow) -> None:
        self.last = row
        self._append(TIMINGS_FILE, json.dumps(timing.model_dump(exclude_none=True), sort_keys=True))
        self._append(METRICS_FILE, row.to_json())

    def cold_starts(self, round_: int, devices: Sequence[ColdStart]) -> None:
        payload = {"round": round_, "devices": [d.model_dump(exclude_none=True) for d in devices]}
        self._append(COLD_START_FILE, json.dumps(payload, sort_keys=True))

    def devices(self, round_: int, rows: Sequence[DeviceRow]) -> None:
        write_device_rows(self.run_dir / DEVICES_FILE, round_, rows)
