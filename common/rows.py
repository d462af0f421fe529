"""The typed rows of ``metrics.jsonl`` and ``timings.jsonl``: one schema, every reader.

Why in common: the server writes these rows, and the CLI's progress line, the
summary, ``hybridfl report`` and the HTTP rounds API read them. Reading through one
pydantic model means a renamed field breaks loudly in one place, and
``schema_version`` lets a reader refuse a run folder from a future format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.rows_serving import Analysis, VersionCount

SCHEMA_VERSION = 2
"""1: untyped rows before this schema (no ``schema_version`` field); 2: this schema."""


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Row):
    """Across devices: mean, sample-weighted mean and 10/50/90th percentiles."""

    mean: float
    weighted_mean: float
    p10: float
    p50: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float], weights: Sequence[float] | None = None) -> Distribution:
        v = np.asarray(values, dtype=np.float64)
        w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
        wmean = float((v * w).sum() / w.sum()) if w.sum() > 0 else float(v.mean())
        p10, p50, p90 = np.percentile(v, [10, 50, 90])
        return cls(mean=float(v.mean()), weighted_mean=wmean, p10=p10, p50=p50, p90=p90)


class DeviceIssue(_Row):
    """A device whose update failed (no usable reply) or was rejected (with why)."""

    device: int
    reason: str


class ColdStart(_Row):
    device: int
    acc: float
    version: int | None = None


class RoundCost(_Row):
    """What a round cost the devices that trained (distributions across them)."""

    steps: Distribution
    bytes_up: Distribution
    """Bytes each device sent (its update's arrays)."""
    bytes_down: float
    """Bytes each selected device received (the global model)."""


class ClockRow(_Row):
    """A round (or an asynchronous aggregation) on the virtual clock."""

    start_h: float
    """Virtual hours since the run started, when the round began."""
    duration_s: float
    """Virtual seconds the round took (K-th result, the deadline, or the last drop-out)."""
    end_h: float
    waited_s: float = 0.0
    """Virtual seconds spent waiting for enough devices to come online."""
    online: int
    """Devices of the training pool online when the round started."""
    selected: int
    finished: int
    """Results kept (aggregated if they pass validation)."""
    partial: int = 0
    """Of those, stragglers whose steps up to the deadline were used."""
    late: int = 0
    """Results that arrived after the K-th (over-commitment surplus): discarded."""
    dropped_offline: int = 0
    dropped_deadline: int = 0
    dropped: list[DeviceIssue] = Field(default_factory=list)
    """Each dropped device and why (offline before its work finished, or the deadline)."""
    download_s: Distribution | None = None
    compute_s: Distribution | None = None
    upload_s: Distribution | None = None
    """Virtual seconds each kept device spent downloading, training, uploading."""
    staleness: Distribution | None = None
    """Asynchronous: versions between the one a device started from and the one its
    update was aggregated into."""


class DeviceSummary(_Row):
    """Training devices: served, personalized and fine-tuned accuracy, gains."""

    num_devices: int
    num_personalized: int = 0
    global_acc: Distribution | None = None
    personal_acc: Distribution | None = None
    gain: Distribution | None = None
    share_personal_worse: float | None = None
    finetuned_acc: Distribution | None = None
    finetune_gain: Distribution | None = None
    share_finetuned_worse: float | None = None


class HoldoutSummary(_Row):
    """Held-out devices (never train): the served model and a fresh fine-tune of it."""

    num_devices: int
    global_acc: Distribution | None = None
    finetuned_acc: Distribution | None = None
    finetune_gain: Distribution | None = None
    share_finetuned_worse: float | None = None


class ServingRow(_Row):
    """Under a rollout policy: what devices served this round and what users got."""

    policy: str
    serving_version: int
    """``serving`` during the round (before the round's decision)."""
    candidate_version: int | None = None
    candidate_share: float = 0.0
    """Share of devices that served the candidate (0 under shadow)."""
    served_versions: list[VersionCount] = Field(default_factory=list)
    """Devices of the population serving each version."""
    served_acc: Distribution | None = None
    """Evaluation rounds: accuracy users got from the version each device serves."""
    analysis: Analysis | None = None
    """The round's candidate-vs-serving measurement (None when nothing was measured)."""
    decision: str | None = None
    """start, step, promote, abort or cancel (None: nothing changed)."""
    alert: str | None = None
    """The monitor fired this round: ``alert`` or ``rollback`` (``server.monitor``)."""


class RoundRow(_Row):
    """One line of ``metrics.jsonl``: deterministic for a seed (no wall-clock fields)."""

    schema_version: int = SCHEMA_VERSION
    round: int
    num_sampled: int
    num_updates: int
    num_failed: int
    num_rejected: int
    failed: list[DeviceIssue] = Field(default_factory=list)
    rejected: list[DeviceIssue] = Field(default_factory=list)
    train_loss: float | None = None
    """Sample-weighted mean of the accepted devices' training losses."""
    num_clipped: int | None = None
    """Accepted updates that ``strategy.clip_norm`` scaled down (only when it is set)."""
    bytes_up: float
    bytes_down: float
    cost: RoundCost | None = None
    cold_start: list[ColdStart] | None = None
    state_resets: list[DeviceIssue] | None = None
    """Devices whose personal state was unreadable: set aside, restarted from the served
    model (the round still used their update)."""
    evaluated: bool = False
    global_test_acc: float | None = None
    global_test_loss: float | None = None
    eval_mode: str | None = None
    """Which training devices were evaluated: participants, all or a seeded sample."""
    devices: DeviceSummary | None = None
    holdout: HoldoutSummary | None = None
    eval_failed: int | None = None
    eval_failures: list[DeviceIssue] | None = None
    eval_bytes_down: float | None = None
    clock: ClockRow | None = None
    """The virtual clock's view of the round (absent when ``clock.mode = "off"``)."""
    serving: ServingRow | None = None
    """The serving plane (None under the ``immediate`` rollout policy)."""

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True)


class TimingRow(_Row):
    """One line of ``timings.jsonl``: wall-clock figures, kept apart from the metrics."""

    round: int
    train_s: float
    round_s: float
    elapsed_s: float
    device_train_s: Distribution | None = None
    """Wall seconds each device took on its worker (a distribution across devices)."""


def read_rows(path: Path) -> list[RoundRow]:
    """``metrics.jsonl`` as typed rows (a torn last line, still being written, is skipped)."""
    from common.rundir import read_jsonl

    rows = []
    for raw in read_jsonl(path):
        version = int(raw.get("schema_version", 1))  # type: ignore[call-overload]
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{path} has schema_version {version}; this hybridfl reads up to "
                f"{SCHEMA_VERSION}: upgrade hybridfl"
            )
        rows.append(RoundRow.model_validate(raw))
    return rows


def read_timings(path: Path) -> list[TimingRow]:
    from common.rundir import read_jsonl

    return [TimingRow.model_validate(r) for r in read_jsonl(path)]
