"""metrics.jsonl -> summary.json: the last evaluated round and the best, labelled.

Reporting only the best round flatters (it picks the test-set maximum); we give
the last evaluated round first and the best round beside it, named as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _headline(row: dict[str, Any]) -> dict[str, Any]:
    dev = row.get("devices") or {}
    return {
        "round": row["round"],
        "global_test_acc": row.get("global_test_acc"),
        "device_global_acc": (dev.get("global_acc") or {}).get("weighted_mean"),
        "device_personal_acc": (dev.get("personal_acc") or {}).get("weighted_mean"),
        "share_personal_worse": dev.get("share_personal_worse"),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    evaluated = [r for r in rows if r.get("evaluated")]
    out: dict[str, Any] = {
        "rounds": len(rows),
        "bytes_up": sum(float(r.get("bytes_up", 0)) for r in rows),
        "bytes_down": sum(float(r.get("bytes_down", 0)) for r in rows),
        "failed_updates": sum(int(r.get("num_failed", 0)) for r in rows),
        "rejected_updates": sum(int(r.get("num_rejected", 0)) for r in rows),
    }
    if evaluated:
        out["last"] = _headline(evaluated[-1])
        best = max(evaluated, key=lambda r: float(r.get("global_test_acc") or 0.0))
        out["best_global"] = _headline(best)
        with_dev = [r for r in evaluated if r.get("devices", {}).get("personal_acc")]
        if with_dev:
            best_p = max(with_dev, key=lambda r: r["devices"]["personal_acc"]["weighted_mean"])
            out["best_personal"] = _headline(best_p)
    return out
