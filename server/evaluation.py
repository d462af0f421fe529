"""Summaries of per-device results: what a typical, a weak and a lucky user gets.

A mean alone hides the devices that personalization hurts, so every summary has
percentiles and the share of devices whose personalized model is worse.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def device_summary(rows: Sequence[dict[str, float]]) -> dict[str, object]:
    """Summarise per-device rows with global-acc, personal-acc and num-examples."""
    if not rows:
        return {"num_devices": 0}
    n = [r["num-examples"] for r in rows]
    g = [r["global-acc"] for r in rows]
    p = [r["personal-acc"] for r in rows]
    worse = sum(1 for gi, pi in zip(g, p, strict=True) if pi < gi)
    return {
        "num_devices": len(rows),
        "global_acc": distribution(g, n),
        "personal_acc": distribution(p, n),
        "gain": distribution([pi - gi for gi, pi in zip(g, p, strict=True)], n),
        "share_personal_worse": worse / len(rows),
    }
