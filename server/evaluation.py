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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from common.atomic import atomic_write_text
from common.config import ExperimentConfig
from common.seeding import numpy_rng

DEVICES_FILE = "devices.jsonl"
"""Per-device results of the latest evaluation, one JSON line per device."""

Role = Literal["train", "holdout"]
DeviceRow = dict[str, object]


def holdout_devices(cfg: ExperimentConfig) -> list[int]:
    """The held-out device ids: a seeded choice, the same for every run with this seed.

    Drawn over the partition's ids (not the devices that happened to register), so a
    device that is slow to connect cannot change who is held out.
    """
    n = cfg.partition.num_devices
    k = cfg.evaluation.num_holdout(n)
    if k == 0:
        return []
    chosen = numpy_rng(cfg.seed, "eval").choice(n, size=k, replace=False)
    return sorted(int(i) for i in chosen)


def distribution(values: Sequence[float], weights: Sequence[float]) -> dict[str, float]:
    """Mean, sample-weighted mean and 10/50/90th percentiles across devices."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if v.size == 0:
        return {}
    wmean = float((v * w).sum() / w.sum()) if w.sum() > 0 else float(v.mean())
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {
        "mean": float(v.mean()),
        "weighted_mean": wmean,
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
    }


def device_row(device: int, role: Role, metrics: Mapping[str, float]) -> DeviceRow:
    """One device's line of ``devices.jsonl`` from its evaluate reply's metrics.

    ``gain`` is personalized minus global (None for held-out devices, which have no
    personalized model); ``finetune_gain`` is fine-tuned minus global.
    """
    g = float(metrics["global-acc"])
    p = float(metrics["personal-acc"]) if role == "train" else None
    f = float(metrics["finetuned-acc"]) if "finetuned-acc" in metrics else None
    return {
        "device": int(device),
        "role": role,
        "num_test": int(metrics["num-examples"]),
        "num_train": int(metrics.get("num-train", 0)),
        "personalized": bool(metrics.get("has-personal", 0)) if role == "train" else False,
        "global_acc": g,
        "personal_acc": p,
        "finetuned_acc": f,
        "gain": None if p is None else p - g,
        "finetune_gain": None if f is None else f - g,
    }


def _values(rows: Sequence[DeviceRow], key: str) -> list[float]:
    return [float(r[key]) for r in rows]  # type: ignore[arg-type]


def _finetuned(rows: Sequence[DeviceRow], g: list[float], n: list[float]) -> dict[str, object]:
    """Fine-tuned accuracy, its gain over global and the share it hurts (if measured)."""
    if not all(r["finetuned_acc"] is not None for r in rows):
        return {}
    f = _values(rows, "finetuned_acc")
    return {
        "finetuned_acc": distribution(f, n),
        "finetune_gain": distribution([fi - gi for gi, fi in zip(g, f, strict=True)], n),
        "share_finetuned_worse": sum(1 for gi, fi in zip(g, f, strict=True) if fi < gi) / len(rows),
    }


def device_summary(rows: Sequence[DeviceRow]) -> dict[str, object]:
    """Summarise training devices: global, personalized and fine-tuned accuracy, gains."""
    if not rows:
        return {"num_devices": 0}
    n = _values(rows, "num_test")
    g = _values(rows, "global_acc")
    p = _values(rows, "personal_acc")
    return {
        "num_devices": len(rows),
        "num_personalized": sum(1 for r in rows if r["personalized"]),
        "global_acc": distribution(g, n),
        "personal_acc": distribution(p, n),
        "gain": distribution([pi - gi for gi, pi in zip(g, p, strict=True)], n),
        "share_personal_worse": sum(1 for gi, pi in zip(g, p, strict=True) if pi < gi) / len(rows),
        **_finetuned(rows, g, n),
    }


def holdout_summary(rows: Sequence[DeviceRow]) -> dict[str, object]:
    """Summarise held-out devices: the served model and a fresh fine-tune of it."""
    if not rows:
        return {"num_devices": 0}
    n = _values(rows, "num_test")
    g = _values(rows, "global_acc")
    return {
        "num_devices": len(rows),
        "global_acc": distribution(g, n),
        **_finetuned(rows, g, n),
    }


def write_device_rows(path: Path, round_: int, rows: Sequence[DeviceRow]) -> None:
    """Replace ``devices.jsonl`` atomically: a reader sees one whole evaluation."""
    ordered = sorted(rows, key=lambda r: int(r["device"]))  # type: ignore[call-overload]
    text = "".join(json.dumps({"round": round_, **r}, sort_keys=True) + "\n" for r in ordered)
    atomic_write_text(path, text)
