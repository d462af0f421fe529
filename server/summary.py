"""metrics.jsonl -> summary.json: the last evaluated round and the best, labelled.

Reporting only the best round flatters (it picks the test-set maximum); we give
the last evaluated round first and the best rounds beside it, each named as such,
and keep the served (global), personalized, fine-tuned and held-out numbers apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

LAST_LABEL = "last evaluated round (quote this one)"
BEST_NOTE = "best round by {} over all evaluations: a test-set maximum, which flatters"


def _wmean(section: dict[str, Any] | None, key: str) -> float | None:
    """The sample-weighted mean of ``section[key]``, or None when not measured."""
    return ((section or {}).get(key) or {}).get("weighted_mean")


def _headline(row: dict[str, Any], label: str) -> dict[str, Any]:
    """The numbers a reader compares, from one evaluated metrics row."""
    dev = row.get("devices") or {}
    held = row.get("holdout") or {}
    return {
        "label": label,
        "round": row["round"],
        "global_test_acc": row.get("global_test_acc"),
        "num_devices": dev.get("num_devices"),
        "device_global_acc": _wmean(dev, "global_acc"),
        "device_personal_acc": _wmean(dev, "personal_acc"),
        "device_finetuned_acc": _wmean(dev, "finetuned_acc"),
        "device_gain": _wmean(dev, "gain"),
        "device_gain_p10": (dev.get("gain") or {}).get("p10"),
        "share_personal_worse": dev.get("share_personal_worse"),
        "share_finetuned_worse": dev.get("share_finetuned_worse"),
        "holdout_num_devices": held.get("num_devices"),
        "holdout_global_acc": _wmean(held, "global_acc"),
        "holdout_finetuned_acc": _wmean(held, "finetuned_acc"),
    }


def _best(
    rows: Sequence[dict[str, Any]], name: str, key: Callable[[dict[str, Any]], float | None]
) -> dict[str, Any] | None:
    """The earliest row with the highest ``key`` (rows without a value are skipped)."""
    scored = [(v, -int(r["round"]), r) for r in rows if (v := key(r)) is not None]
    if not scored:
        return None
    _, _, row = max(scored, key=lambda t: (t[0], t[1]))
    return _headline(row, BEST_NOTE.format(name))


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals (bytes, failures) plus the last and best evaluated rounds, labelled."""
    evaluated = [r for r in rows if r.get("evaluated")]
    updates = sum(int(r.get("num_updates", 0)) for r in rows)
    sampled = sum(int(r.get("num_sampled", 0)) for r in rows)
    bytes_up = sum(float(r.get("bytes_up", 0)) for r in rows)
    bytes_down = sum(float(r.get("bytes_down", 0)) for r in rows)
    out: dict[str, Any] = {
        "rounds": len(rows),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "eval_bytes_down": sum(float(r.get("eval_bytes_down", 0)) for r in rows),
        "bytes_up_per_update": bytes_up / updates if updates else None,
        "bytes_down_per_sampled_device": bytes_down / sampled if sampled else None,
        "num_updates": updates,
        "failed_updates": sum(int(r.get("num_failed", 0)) for r in rows),
        "rejected_updates": sum(int(r.get("num_rejected", 0)) for r in rows),
    }
    if not evaluated:
        return out
    out["last"] = _headline(evaluated[-1], LAST_LABEL)
    candidates = {
        "best_global": ("global test accuracy", lambda r: r.get("global_test_acc")),
        "best_personal": (
            "device personalized accuracy",
            lambda r: _wmean(r.get("devices"), "personal_acc"),
        ),
        "best_finetuned": (
            "device fine-tuned accuracy",
            lambda r: _wmean(r.get("devices"), "finetuned_acc"),
        ),
        "best_holdout_finetuned": (
            "held-out fine-tuned accuracy",
            lambda r: _wmean(r.get("holdout"), "finetuned_acc"),
        ),
    }
    for key, (name, score) in candidates.items():
        best = _best(evaluated, name, score)
        if best is not None:
            out[key] = best
    return out
