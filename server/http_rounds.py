"""``/v1/rounds``: per-round metrics from the run's ``metrics.jsonl``.

The ServerApp appends one JSON object per round while this server reads the file,
so the last line may be half written: the file is read with the run folder's one
reader (``common.rundir.read_jsonl``, a torn last line ignored), and rows without
an integer ``round`` are skipped. The parse is cached by the file's stat identity.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, BeforeValidator

from common.rundir import FAILURE_FILE, SUMMARY_FILE, read_jsonl
from server.http_deps import SettingsDep
from server.http_models import MAX_VERSION, parse_canonical

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
            rows = [
                _json_safe(row)
                for row in read_jsonl(self.path)
                if isinstance(row, dict) and type(row.get("round")) is int
            ]
            self._key, self._rows = key, rows
            return rows

    def get(self, round_: int) -> dict[str, Any] | None:
        """The last record of a round (a resumed run may log a round twice)."""
        for row in reversed(self.rows()):
            if row["round"] == round_:
                return row
        return None


def _canonical_round(value: Any) -> Any:
    if isinstance(value, str):
        number = parse_canonical(value)
        if number is None:
            raise ValueError(
                "a round is a non-negative integer written plainly (0, 1, 42): no sign, "
                f"leading zero, decimal point or underscore; got {value[:40]!r}"
            )
        return number
    return value


RoundParam = Annotated[int, PathParam(ge=0, le=MAX_VERSION), BeforeValidator(_canonical_round)]


def run_finished(run_dir: Path) -> bool:
    """A run is over once the ServerApp wrote its summary or its failure record."""
    return (run_dir / SUMMARY_FILE).exists() or (run_dir / FAILURE_FILE).exists()


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
def get_round(round: RoundParam, settings: SettingsDep) -> dict[str, Any]:
    row = settings.rounds.get(round)
    if row is not None:
        return row
    rounds = [r["round"] for r in settings.rounds.rows()]
    have = f"rounds {min(rounds)}..{max(rounds)}" if rounds else "no rounds"
    if run_finished(settings.run_dir):
        raise HTTPException(
            404, detail=f"round {round} does not exist: the run is finished and logged {have}"
        )
    raise HTTPException(
        404, detail=f"no metrics for round {round} yet: the run is still going ({have} so far)"
    )
