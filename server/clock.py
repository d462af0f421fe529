"""The virtual clock: what a round costs each device, and synchronous rounds on it.

A device's virtual time for a round is download (model bytes / its down bandwidth)
+ compute (steps x batch size / its speed) + upload (update bytes / its up
bandwidth). A synchronous round selects ceil(overcommit x K) of the devices online
at its start, keeps the first K results that arrive before the deadline, and lasts
until the K-th result (or the deadline, or the last drop-out). Everything is known
from the profiles *before* training, so only the kept devices are trained: the
clock costs the simulation nothing for the work it discards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.config import ExperimentConfig
from common.personalization import local_steps
from common.rows import ClockRow, DeviceIssue, Distribution
from common.seeding import sample_devices
from server.availability import Availability
from server.profiles import Profiles

BITS_PER_MBIT = 1e6 / 8.0
"""Bytes per second in one Mbit/s."""


class ClockError(RuntimeError):
    """The clock cannot run the round as configured (names the key and the fix)."""


@dataclass(frozen=True)
class Work:
    """Virtual seconds each device spends on its round, per phase."""

    download_s: np.ndarray
    compute_s: np.ndarray
    upload_s: np.ndarray

    @property
    def total_s(self) -> np.ndarray:
        return self.download_s + self.compute_s + self.upload_s


def transfer_s(nbytes: float, mbps: np.ndarray) -> np.ndarray:
    return nbytes / (mbps * BITS_PER_MBIT)


def pass_cap(passes: tuple[int, ...], budget: int) -> int:
    """The largest per-pass step cap whose passes fit in ``budget`` steps (0: none fits)."""
    lo, hi = 0, max(passes, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(p, mid) for p in passes) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class DeviceClock:
    """Profiles and availability of a population, and what its devices' work costs."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        profiles: Profiles,
        availability: Availability,
        num_examples: Callable[[int], int],
    ) -> None:
        self.cfg = cfg
        self.profiles = profiles
        self.availability = availability
        self.num_examples = num_examples

    def passes(self, device: int) -> tuple[int, ...]:
        c = self.cfg.client
        return local_steps(
            c.algorithm, self.num_examples(device), c.local_epochs, c.head_epochs, c.batch_size
        )

    def work(self, devices: np.ndarray, model_bytes: float, update_bytes: float) -> Work:
        p = self.profiles
        steps = np.array([sum(self.passes(int(d))) for d in devices], dtype=np.float64)
        return Work(
            download_s=transfer_s(model_bytes, p.down_mbps[devices]),
            compute_s=steps * self.cfg.client.batch_size / p.speed[devices],
            upload_s=transfer_s(update_bytes, p.up_mbps[devices]),
        )

    def check_deadline(self, model_bytes: float) -> None:
        """Refuse a deadline no device can meet even by downloading alone."""
        deadline = self.cfg.clock.deadline_s
        if deadline <= 0:
            return
        fastest = float(transfer_s(model_bytes, self.profiles.down_mbps).min())
        if deadline <= fastest:
            raise ClockError(
                f"clock.deadline_s = {deadline:g} is shorter than the fastest device's "
                f"download of the {model_bytes / 1e6:.2f} MB model ({fastest:.1f} s): no "
                "device could ever finish; raise clock.deadline_s (or set 0 for none)"
            )

    def wait_for_online(self, pool: np.ndarray, t: float, needed: int) -> tuple[np.ndarray, float]:
        """The devices of ``pool`` online at the first time >= ``t`` when at least
        ``needed`` are (checking every ``clock.wait_s``), and that time."""
        c = self.cfg.clock
        start = t
        while True:
            online = pool[self.availability.online(pool, t)]
            if online.size >= needed:
                return online, t
            if t - start >= c.max_wait_h * 3600.0:
                raise ClockError(
                    f"fewer than {needed} devices online for clock.max_wait_h = "
                    f"{c.max_wait_h:g} virtual hours (at {t / 3600:.1f} h: {online.size} of "
                    f"{pool.size}): loosen the availability (clock.availability, "
                    "clock.online_probability, clock.diurnal_window_h), lower "
                    "strategy.min_train_devices, or raise clock.max_wait_h"
                )
            t += c.wait_s


@dataclass
class SyncPlan:
    """One synchronous round, decided before any training."""

    start_s: float
    duration_s: float
    waited_s: float
    online: int
    selected: list[int]
    kept: list[int]
    """Devices whose result the round uses (sorted): the ones to train."""
    step_limits: dict[int, int] = field(default_factory=dict)
    """Partial work: per-pass step cap of each straggler kept with partial steps."""
    late: list[int] = field(default_factory=list)
    dropped: list[DeviceIssue] = field(default_factory=list)
    work: Work | None = None
    """Virtual seconds of the kept devices (in ``kept`` order)."""

    def row(self) -> ClockRow:
        w = self.work
        offline = sum(1 for d in self.dropped if d.reason.startswith("offline"))

        def dist(a: np.ndarray | None) -> Distribution | None:
            return Distribution.of(a.tolist()) if a is not None and a.size else None

        return ClockRow(
            start_h=self.start_s / 3600.0,
            duration_s=self.duration_s,
            end_h=(self.start_s + self.duration_s) / 3600.0,
            waited_s=self.waited_s,
            online=self.online,
            selected=len(self.selected),
            finished=len(self.kept),
            partial=len(self.step_limits),
            late=len(self.late),
            dropped_offline=offline,
            dropped_deadline=len(self.dropped) - offline,
            dropped=self.dropped,
            download_s=dist(w.download_s if w else None),
            compute_s=dist(w.compute_s if w else None),
            upload_s=dist(w.upload_s if w else None),
        )


class SyncClock:
    """Synchronous rounds with over-commitment, a deadline and optional partial work."""

    def __init__(self, clock: DeviceClock, target: Callable[[np.ndarray], int]) -> None:
        self.clock = clock
        self.target = target
        """Pool -> K, the results a round wants (the selection policy's cohort size)."""
        self.now_s = 0.0

    def plan(
        self, round_: int, pool: np.ndarray, model_bytes: float, update_bytes: float
    ) -> SyncPlan:
        cfg = self.clock.cfg
        c = cfg.clock
        k = self.target(pool)
        wanted = min(pool.size, math.ceil(c.overcommit * k - 1e-9))
        online, t0 = self.clock.wait_for_online(
            pool, self.now_s, min(wanted, cfg.strategy.min_train_devices)
        )
        selected = np.array(
            sample_devices(cfg.seed, round_, online, 0.0, min(wanted, online.size)),
            dtype=np.int64,
        )
        work = self.clock.work(selected, model_bytes, update_bytes)
        arrival = t0 + work.total_s
        until = self.clock.availability.online_until(selected, t0)
        deadline = t0 + c.deadline_s if c.deadline_s > 0 else math.inf
        dropped: list[DeviceIssue] = []
        limits: dict[int, int] = {}
        finish: list[tuple[float, int, int]] = []  # (arrival, device, index in selected)
        resolved = [t0]
        for i, d in enumerate(selected.tolist()):
            end = float(arrival[i])
            if end > deadline:
                cap = self._partial_cap(d, work, i, c.deadline_s) if cfg.client.partial_work else 0
                if cap == 0:
                    dropped.append(
                        DeviceIssue(
                            device=d,
                            reason=f"deadline: needs {work.total_s[i]:.0f} s of {c.deadline_s:g} s",
                        )
                    )
                    resolved.append(min(deadline, float(until[i])))
                    continue
                limits[d] = cap
                end = t0 + self._capped_total(d, work, i, cap)
            if until[i] < end:
                limits.pop(d, None)
                dropped.append(
                    DeviceIssue(
                        device=d,
                        reason=f"offline after {until[i] - t0:.0f} s, before its work "
                        f"finished ({end - t0:.0f} s)",
                    )
                )
                resolved.append(float(until[i]))
                continue
            finish.append((end, d, i))
        finish.sort()
        kept_f, late_f = finish[:k], finish[k:]
        if len(kept_f) == k:
            end_s = kept_f[-1][0]
        else:
            end_s = min(deadline, max(resolved + [f[0] for f in kept_f]))
        for _, d, _ in late_f:
            limits.pop(d, None)
        order = sorted(kept_f, key=lambda f: f[1])
        idx = np.array([f[2] for f in order], dtype=np.int64)
        kept_work = Work(work.download_s[idx], work.compute_s[idx], work.upload_s[idx])
        if limits:
            steps = np.array(
                [
                    sum(min(p, limits.get(int(d), p)) for p in self.clock.passes(int(d)))
                    for d in selected[idx]
                ],
                dtype=np.float64,
            )
            speed = self.clock.profiles.speed[selected[idx]]
            kept_work = Work(
                kept_work.download_s, steps * cfg.client.batch_size / speed, kept_work.upload_s
            )
        plan = SyncPlan(
            start_s=t0,
            duration_s=end_s - t0,
            waited_s=t0 - self.now_s,
            online=int(online.size),
            selected=selected.tolist(),
            kept=[f[1] for f in order],
            step_limits=limits,
            late=sorted(f[1] for f in late_f),
            dropped=sorted(dropped, key=lambda x: x.device),
            work=kept_work,
        )
        self.now_s = end_s
        return plan

    def _partial_cap(self, device: int, work: Work, i: int, deadline_s: float) -> int:
        """Per-pass step cap that lets a straggler report by the deadline (0: none)."""
        spare = deadline_s - float(work.download_s[i] + work.upload_s[i])
        if spare <= 0:
            return 0
        speed = float(self.clock.profiles.speed[device])
        budget = int(spare * speed // self.clock.cfg.client.batch_size)
        return pass_cap(self.clock.passes(device), budget)

    def _capped_total(self, device: int, work: Work, i: int, cap: int) -> float:
        steps = sum(min(p, cap) for p in self.clock.passes(device))
        speed = float(self.clock.profiles.speed[device])
        compute = steps * self.clock.cfg.client.batch_size / speed
        return float(work.download_s[i] + work.upload_s[i]) + compute
