"""``/v1/rounds``: per-round metrics from ``<run_dir>/metrics.jsonl``.

The ServerApp appends one JSON object per round while this server reads the file,
so the last line may be half written: lines that do not parse, or carry no
integer ``round``, are skipped. The parse is cached by the file's (size, mtime).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import BaseModel

from server.http_deps import SettingsDep

router = APIRouter(prefix="/v1/rounds", tags=["rounds"])


def _json_safe(value: Any) -> Any:
    """NaN/Inf are not JSON: report them as null instead of failing the response."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class RoundsLog:
    """Parsed view of metrics.jsonl, re-read only when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def rows(self) -> list[dict[str, Any]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            if key == self._key:
                return self._rows
            rows: list[dict[str, Any]] = []
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue  # a line being written right now
                    if isinstance(obj, dict) and type(obj.get("round")) is int:
                        rows.append(_json_safe(obj))
            self._key, self._rows = key, rows
            return rows

    def get(self, round_: int) -> dict[str, Any] | None:
        """The last record of a round (a resumed run may log a round twice)."""
        for row in reversed(self.rows()):
            if row["round"] == round_:
                return row
        return None


class RoundPage(BaseModel):
    items: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


@router.get("", response_model=RoundPage, summary="Per-round metrics (paginated)")
def list_rounds(
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> RoundPage:
    rows = settings.rounds.rows()
    return RoundPage(
        items=rows[offset : offset + limit], total=len(rows), offset=offset, limit=limit
    )


@router.get(
    "/{round}",
    response_model=dict[str, Any],
    responses={404: {"description": "No record for this round"}},
    summary="Metrics of one round",
)
def get_round(
    round: Annotated[int, PathParam(ge=0, le=2**31 - 1)], settings: SettingsDep
) -> dict[str, Any]:
    row = settings.rounds.get(round)
    if row is None:
        raise HTTPException(404, detail=f"no metrics for round {round} yet")
    return row
