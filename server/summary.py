"""metrics.jsonl -> summary.json: the last evaluated round and the best, labelled.

Reporting only the best round flatters (it picks the test-set maximum); we give
the last evaluated round first and the best rounds beside it, each named as such,
and keep the served (global), personalized, fine-tuned and held-out numbers apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from common.rows import DeviceSummary, Distribution, HoldoutSummary, RoundRow
from server.device_summary import DeviceRow

LAST_LABEL = "last evaluated round (quote this one)"
BEST_NOTE = "best round by {} over all evaluations: a test-set maximum, which flatters"


def _wmean(dist: Distribution | None) -> float | None:
    """The sample-weighted mean of a distribution, or None when not measured."""
    return None if dist is None else dist.weighted_mean


def _headline(row: RoundRow, label: str) -> dict[str, Any]:
    """The numbers a reader compares, from one evaluated metrics row."""
    dev = row.devices or DeviceSummary(num_devices=0)
    held = row.holdout or HoldoutSummary(num_devices=0)
    return {
        "label": label,
        "round": row.round,
        "global_test_acc": row.global_test_acc,
        "num_devices": dev.num_devices if row.devices else None,
        "device_global_acc": _wmean(dev.global_acc),
        "device_personal_acc": _wmean(dev.personal_acc),
        "device_finetuned_acc": _wmean(dev.finetuned_acc),
        "device_gain": _wmean(dev.gain),
        "device_gain_p10": dev.gain.p10 if dev.gain else None,
        "share_personal_worse": dev.share_personal_worse,
        "share_finetuned_worse": dev.share_finetuned_worse,
        "holdout_num_devices": held.num_devices if row.holdout else None,
        "holdout_global_acc": _wmean(held.global_acc),
        "holdout_finetuned_acc": _wmean(held.finetuned_acc),
    }


def _best(
    rows: Sequence[RoundRow], name: str, key: Callable[[RoundRow], float | None]
) -> dict[str, Any] | None:
    """The earliest row with the highest ``key`` (rows without a value are skipped)."""
    scored = [(v, -r.round, r) for r in rows if (v := key(r)) is not None]
    if not scored:
        return None
    _, _, row = max(scored, key=lambda t: (t[0], t[1]))
    return _headline(row, BEST_NOTE.format(name))


def personalization_verdict(devices: Sequence[DeviceRow]) -> dict[str, Any] | None:
    """What personalization did for the training devices of the last evaluation, in
    counts a newcomer reads at once (and one plain sentence saying it)."""
    rows = [d for d in devices if d.role == "train" and d.gain is not None]
    if not rows:
        return None
    helped = [d for d in rows if (d.gain or 0.0) > 0]
    hurt = [d for d in rows if (d.gain or 0.0) < 0]
    n = [float(d.num_test) for d in rows]
    served = sum(d.global_acc * w for d, w in zip(rows, n, strict=True)) / sum(n)
    mean_gain = 100 * sum(d.gain or 0.0 for d in rows) / len(rows)
    trained = sum(d.personalized for d in rows)
    sentence = (
        f"personalization helped {len(helped)} of {len(rows)} devices "
        f"({mean_gain:+.1f} points on average), hurt {len(hurt)}; "
        f"the served model alone gives {100 * served:.1f}%"
    )
    if trained < len(rows):
        sentence += (
            f" ({len(rows) - trained} of the devices never trained: theirs is the served model)"
        )
    return {
        "devices": len(rows),
        "helped": len(helped),
        "hurt": len(hurt),
        "mean_gain_points": mean_gain,
        "served_acc": served,
        "never_trained": len(rows) - trained,
        "sentence": sentence,
    }


def _personal(r: RoundRow) -> float | None:
    return _wmean(r.devices.personal_acc) if r.devices else None


def time_to_accuracy(
    rows: Sequence[RoundRow], target: float, score: Callable[[RoundRow], float | None]
) -> dict[str, Any]:
    """Virtual hours (and round) at which ``score`` first reaches ``target``; FedScale's
    time-to-accuracy. ``None`` hours: not reached within the run."""
    for r in rows:
        s = score(r) if r.evaluated else None
        if s is not None and r.clock is not None and s >= target:
            return {"target": target, "virtual_hours": r.clock.end_h, "round": r.round}
    return {"target": target, "virtual_hours": None, "round": None}


def clock_summary(
    rows: Sequence[RoundRow], targets: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any] | None:
    """The virtual clock's totals: hours, drop-outs by cause, staleness, time to targets."""
    timed = [r.clock for r in rows if r.clock is not None]
    if not timed:
        return None
    stale = [c.staleness.mean for c in timed if c.staleness is not None]
    out: dict[str, Any] = {
        "virtual_hours": timed[-1].end_h,
        "selected": sum(c.selected for c in timed),
        "finished": sum(c.finished for c in timed),
        "partial": sum(c.partial for c in timed),
        "late": sum(c.late for c in timed),
        "dropped_offline": sum(c.dropped_offline for c in timed),
        "dropped_deadline": sum(c.dropped_deadline for c in timed),
        "mean_staleness": float(sum(stale) / len(stale)) if stale else None,
    }
    global_target, personal_target = targets
    if global_target > 0:
        out["time_to_global_accuracy"] = time_to_accuracy(
            rows, global_target, lambda r: r.global_test_acc
        )
    if personal_target > 0:
        out["time_to_personal_accuracy"] = time_to_accuracy(rows, personal_target, _personal)
    return out


def summarize(
    rows: Sequence[RoundRow], clock_targets: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any]:
    """Totals (bytes, failures) plus the last and best evaluated rounds, labelled; with
    the virtual clock, its totals and time-to-accuracy for ``clock_targets``
    (global, personalized; 0 = not asked)."""
    evaluated = [r for r in rows if r.evaluated]
    updates = sum(r.num_updates for r in rows)
    sampled = sum(r.num_sampled for r in rows)
    bytes_up = sum(r.bytes_up for r in rows)
    bytes_down = sum(r.bytes_down for r in rows)
    out: dict[str, Any] = {
        "rounds": len(rows),
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "eval_bytes_down": sum(r.eval_bytes_down or 0.0 for r in rows),
        "bytes_up_per_update": bytes_up / updates if updates else None,
        "bytes_down_per_sampled_device": bytes_down / sampled if sampled else None,
        "num_sampled": sampled,
        "num_updates": updates,
        "failed_updates": sum(r.num_failed for r in rows),
        "rejected_updates": sum(r.num_rejected for r in rows),
        "eval_failed": sum(r.eval_failed or 0 for r in rows),
    }
    clock = clock_summary(rows, clock_targets)
    if clock is not None:
        out["clock"] = clock
    if not evaluated:
        return out
    out["last"] = _headline(evaluated[-1], LAST_LABEL)
    candidates: dict[str, tuple[str, Callable[[RoundRow], float | None]]] = {
        "best_global": ("global test accuracy", lambda r: r.global_test_acc),
        "best_personal": ("device personalized accuracy", _personal),
        "best_finetuned": (
            "device fine-tuned accuracy",
            lambda r: _wmean(r.devices.finetuned_acc) if r.devices else None,
        ),
        "best_holdout_finetuned": (
            "held-out fine-tuned accuracy",
            lambda r: _wmean(r.holdout.finetuned_acc) if r.holdout else None,
        ),
    }
    for key, (name, score) in candidates.items():
        best = _best(evaluated, name, score)
        if best is not None:
            out[key] = best
    return out
