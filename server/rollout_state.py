"""The current rollout, as a small JSON file the ServerApp writes and the model server reads.

Why a file and not the event log alone: the log says what moved and why; "which
step is the canary at, how many measurements failed so far" is state that changes
every round without moving an alias. The ServerApp replaces
``<registry>/rollout.json`` atomically after each round; the HTTP server and the
Prometheus collector read it (a missing or damaged file means "no rollout").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import atomic_write_bytes
from server.registry_events import Analysis

log = logging.getLogger(__name__)

ROLLOUT_FILE = "rollout.json"

Phase = Literal["idle", "analysing", "held"]
"""``idle``: nothing to roll out; ``analysing``: a candidate is at a step;
``held``: a human pinned ``serving``, the policy starts nothing until released."""


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str
    phase: Phase = "idle"
    round: int = Field(0, ge=0, description="Round of the last update.")
    serving_version: int | None = None
    candidate_version: int | None = None
    step: int = Field(0, ge=0, description="Index into steps.")
    steps: list[float] = Field(default_factory=list)
    share: float = Field(0.0, ge=0.0, le=1.0, description="Share of devices on the candidate.")
    serves_candidate: bool = Field(
        False, description="False for shadow: the candidate is measured, never served."
    )
    measurements: int = Field(0, ge=0, description="Measurements in the current step.")
    failures: int = Field(0, ge=0, description="Failed measurements in the current step.")
    last_analysis: Analysis | None = None
    rejected: list[int] = Field(default_factory=list)
    note: str = ""

    @property
    def active(self) -> bool:
        return self.phase == "analysing" and self.candidate_version is not None


def write_state(registry_root: Path, state: RolloutState) -> None:
    atomic_write_bytes(registry_root / ROLLOUT_FILE, state.model_dump_json(indent=1).encode())


def read_state(registry_root: Path) -> RolloutState | None:
    """The state file, or None when there is none or it does not parse (logged)."""
    try:
        raw = (registry_root / ROLLOUT_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("%s unreadable: %s", registry_root / ROLLOUT_FILE, exc)
        return None
    try:
        return RolloutState.model_validate_json(raw)
    except (ValidationError, ValueError) as exc:
        log.error("%s damaged: %s", registry_root / ROLLOUT_FILE, exc)
        return None


class RolloutCollector(Collector):
    """Rollout gauges at scrape time (-1 where nothing is known)."""

    def __init__(self, registry_root: Path) -> None:
        self.root = Path(registry_root)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = read_state(self.root)
        active = state is not None and state.active
        analysis = state.last_analysis if state is not None else None
        yield GaugeMetricFamily(
            "hybridfl_rollout_active", "1 while a candidate is being rolled out.", value=active
        )
        yield GaugeMetricFamily(
            "hybridfl_rollout_candidate_version",
            "Version being rolled out (-1: none).",
            value=state.candidate_version if active and state is not None else -1,
        )
        yield GaugeMetricFamily(
            "hybridfl_rollout_candidate_share",
            "Share of devices serving the candidate (0 under shadow).",
            value=state.share if active and state is not None and state.serves_candidate else 0.0,
        )
        last = GaugeMetricFamily(
            "hybridfl_rollout_last_analysis",
            "Last analysis: candidate vs serving on the same devices.",
            labels=["field"],
        )
        if analysis is not None:
            for field in ("candidate_acc", "serving_acc", "share_hurt", "devices"):
                last.add_metric([field], float(getattr(analysis, field)))
            last.add_metric(["passed"], float(analysis.passed))
        yield last
