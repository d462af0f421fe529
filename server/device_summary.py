"""Summaries of per-device results: what a typical, a weak and a lucky user gets.

A mean alone hides the devices that personalization hurts, so every summary has
percentiles and the share of devices whose personalized model is worse. Results
are kept apart by role: devices that train (global, personalized, fine-tuned) and
held-out devices that never train (global, fine-tuned), the honest stand-in for a
brand-new user. Mixing the two, or global with personalized accuracy, is how
benchmark tables end up flattering a method.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from common.atomic import atomic_write_text
from common.config import ExperimentConfig
from common.protocol import EvalReport
from common.rows import DeviceSummary, Distribution, HoldoutSummary
from common.seeding import numpy_rng

Role = Literal["train", "holdout"]


class DeviceRow(BaseModel):
    """One device's line of ``devices.jsonl``: what the latest evaluation measured."""

    model_config = ConfigDict(extra="forbid")

    device: int
    role: Role
    num_test: int
    num_train: int
    personalized: bool
    global_acc: float
    personal_acc: float | None
    finetuned_acc: float | None
    gain: float | None
    """Personalized minus served accuracy (None for held-out devices)."""
    finetune_gain: float | None


def holdout_devices(cfg: ExperimentConfig) -> np.ndarray:
    """The held-out device ids (sorted int64): a seeded choice, the same for every run
    with this seed, drawn over the whole population (not over who happens to connect)."""
    n = cfg.partition.num_devices
    k = cfg.evaluation.num_holdout(n)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    chosen = numpy_rng(cfg.seed, "eval").choice(n, size=k, replace=False)
    return np.sort(chosen.astype(np.int64))


def device_row(role: Role, report: EvalReport) -> DeviceRow:
    """A device's row from its evaluation report (held-out devices have no personal model)."""
    g = report.global_acc
    p = report.personal_acc if role == "train" else None
    f = report.finetuned_acc
    return DeviceRow(
        device=report.device,
        role=role,
        num_test=report.num_test,
        num_train=report.num_train,
        personalized=report.has_personal if role == "train" else False,
        global_acc=g,
        personal_acc=p,
        finetuned_acc=f,
        gain=None if p is None else p - g,
        finetune_gain=None if f is None else f - g,
    )


def _finetuned(rows: Sequence[DeviceRow], g: list[float], n: list[float]) -> dict[str, object]:
    """Fine-tuned accuracy, its gain over served and the share it hurts (if measured)."""
    f = [r.finetuned_acc for r in rows]
    if any(x is None for x in f):
        return {}
    ft = [float(x) for x in f if x is not None]
    return {
        "finetuned_acc": Distribution.of(ft, n),
        "finetune_gain": Distribution.of([fi - gi for gi, fi in zip(g, ft, strict=True)], n),
        "share_finetuned_worse": sum(fi < gi for gi, fi in zip(g, ft, strict=True)) / len(rows),
    }


def device_summary(rows: Sequence[DeviceRow]) -> DeviceSummary:
    """Summarise training devices: served, personalized and fine-tuned accuracy, gains."""
    if not rows:
        return DeviceSummary(num_devices=0)
    n = [float(r.num_test) for r in rows]
    g = [r.global_acc for r in rows]
    p = [float(r.personal_acc or 0.0) for r in rows]
    return DeviceSummary(
        num_devices=len(rows),
        num_personalized=sum(r.personalized for r in rows),
        global_acc=Distribution.of(g, n),
        personal_acc=Distribution.of(p, n),
        gain=Distribution.of([pi - gi for gi, pi in zip(g, p, strict=True)], n),
        share_personal_worse=sum(pi < gi for gi, pi in zip(g, p, strict=True)) / len(rows),
        **_finetuned(rows, g, n),  # type: ignore[arg-type]
    )


def holdout_summary(rows: Sequence[DeviceRow]) -> HoldoutSummary:
    """Summarise held-out devices: the served model and a fresh fine-tune of it."""
    if not rows:
        return HoldoutSummary(num_devices=0)
    n = [float(r.num_test) for r in rows]
    g = [r.global_acc for r in rows]
    return HoldoutSummary(
        num_devices=len(rows),
        global_acc=Distribution.of(g, n),
        **_finetuned(rows, g, n),  # type: ignore[arg-type]
    )


def write_device_rows(path: Path, round_: int, rows: Sequence[DeviceRow]) -> None:
    """Replace ``devices.jsonl`` atomically: a reader sees one whole evaluation."""
    ordered = sorted(rows, key=lambda r: r.device)
    text = "".join(
        json.dumps({"round": round_, **r.model_dump()}, sort_keys=True) + "\n" for r in ordered
    )
    atomic_write_text(path, text)
