"""Every update is checked before it can touch the global model.

Names, shapes, dtypes and finiteness (one NaN would poison every device's model),
that personal weights never arrive, and that the example count a device reports is
the one the server knows: the server weights an update by the partition's (or the
registration's) count, and a device that claims another count is rejected, so a
device cannot buy weight by inflating its ``num_examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.protocol import TrainReport
from common.rows import DeviceIssue
from common.weights import ArraySpec, validate_update
from server.dispatch import Collected, PartialSum, TrainResult


@dataclass
class Screened:
    """A round's accepted updates (weight, arrays) in device-id order, and what was not."""

    accepted: list[TrainResult] = field(default_factory=list)
    partials: list[PartialSum] = field(default_factory=list)
    rejected: list[DeviceIssue] = field(default_factory=list)

    @property
    def devices(self) -> list[int]:
        ids = [r.report.device for r in self.accepted]
        ids += [r.device for p in self.partials for r in p.reports if r.valid]
        return sorted(ids)

    def reports(self) -> list[TrainReport]:
        out = [r.report for r in self.accepted]
        out += [r for p in self.partials for r in p.reports if r.valid]
        return sorted(out, key=lambda r: r.device)


def check_update(
    result: TrainResult,
    expected: Mapping[str, ArraySpec],
    shared: set[str],
    known_examples: int,
) -> str | None:
    """Why this device's update is unacceptable, or None."""
    reason = validate_update(result.arrays, expected, required=shared)
    if reason is None and set(result.arrays) != shared:
        extra = sorted(set(result.arrays) - shared)[:3]
        reason = f"sent {extra}, which must stay personal"
    if reason is None and result.report.num_examples != known_examples:
        reason = (
            f"reported {result.report.num_examples} training examples; the server knows "
            f"{known_examples} for this device"
        )
    return reason


def check_partial(
    partial: PartialSum,
    expected: Mapping[str, ArraySpec],
    shared: set[str],
    known: Callable[[int], int],
) -> str | None:
    """Why a pre-aggregated cohort is unacceptable (then all its devices are), or None."""
    valid = [r for r in partial.reports if r.valid]
    for r in valid:
        if r.num_examples != known(r.device):
            return (
                f"device {r.device} reported {r.num_examples} training examples; the server "
                f"knows {known(r.device)}"
            )
    want = float(sum(known(r.device) for r in valid))
    if partial.weight_total != want:
        return f"partial sum claims weight {partial.weight_total:g}, the server knows {want:g}"
    if not valid:
        return None if not partial.sums else "partial sum without valid devices"
    if set(partial.sums) != shared:
        return f"partial sum has arrays {sorted(partial.sums)[:3]}, expected the shared ones"
    for k, v in partial.sums.items():
        if tuple(v.shape) != expected[k].shape:
            return f"partial sum '{k}' has shape {tuple(v.shape)}, expected {expected[k].shape}"
        if not np.isfinite(v).all():
            return f"partial sum '{k}' contains NaN or Inf"
    return None


def screen(
    got: Collected,
    expected: Mapping[str, ArraySpec],
    shared: set[str],
    known: Callable[[int], int],
) -> Screened:
    out = Screened(rejected=list(got.rejected))
    for r in got.train:
        reason = check_update(r, expected, shared, known(r.report.device))
        if reason is None:
            out.accepted.append(r)
        else:
            out.rejected.append(DeviceIssue(device=r.report.device, reason=reason))
    for p in got.partials:
        reason = check_partial(p, expected, shared, known)
        if reason is None:
            out.partials.append(p)
            out.rejected.extend(
                DeviceIssue(device=r.device, reason="update contains NaN or Inf")
                for r in p.reports
                if not r.valid
            )
        else:
            out.rejected.extend(DeviceIssue(device=r.device, reason=reason) for r in p.reports)
    out.rejected.sort(key=lambda f: f.device)
    return out
