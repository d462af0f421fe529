"""Buffered asynchronous aggregation (FedBuff, Nguyen et al., AISTATS 2022) on the
virtual clock.

The server keeps C devices training at once; every K arrivals it aggregates, with
each update weighted down by its staleness (1/(1+s)^exponent; FedBuff's
1/sqrt(1+s) by default), and every arrival immediately frees a place for a new
device. Why a discrete-event loop: arrivals are processed in *virtual-time* order
(profile-derived, known before training), whatever order Ray finishes the real
work in, so an asynchronous run is byte-identical for a seed. A device's training
runs when its arrival is due to be aggregated, from the version it received at
its start (kept until no device in flight needs it).

Aggregation goes through the configured Flower strategy: an update from version v
becomes the pseudo-model ``g_now + w(s) * (update - g_v)``, so FedAvg over them is
FedBuff's ``g_now + sum_i p_i w(s_i) delta_i`` and robust strategies see updates on
one common base.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from common.rows import ClockRow, DeviceIssue, Distribution, RoundRow
from common.seeding import sample_devices
from common.weights import Arrays
from server.clock import ClockError, DeviceClock
from server.dispatch import nbytes
from server.validation import Screened, screen

if TYPE_CHECKING:
    from server.loop import ServerLoop

ARRIVE, DROP, TICK = 0, 1, 2
"""Event kinds; at equal times an arrival is processed before a drop or a tick."""


@dataclass(frozen=True)
class Flight:
    device: int
    version: int
    start_s: float
    download_s: float
    compute_s: float
    upload_s: float


def staleness_weight(staleness: int, exponent: float) -> float:
    return float((1.0 + staleness) ** -exponent)


@dataclass
class Window:
    """What happened between two aggregations."""

    start_s: float
    started: int = 0
    arrivals: list[Flight] = field(default_factory=list)
    dropped: list[DeviceIssue] = field(default_factory=list)


class BufferedRun:
    """The asynchronous run: ``cfg.rounds`` aggregations of K arrivals each."""

    def __init__(self, loop: ServerLoop, clock: DeviceClock) -> None:
        self.loop = loop
        self.clock = clock
        self.c = loop.cfg.clock
        self.now_s = 0.0
        self.version = 0
        self.events: list[tuple[float, int, int, int, str]] = []  # time, kind, seq, device
        self.seq = 0
        self.flights: dict[int, Flight] = {}
        self.busy: set[int] = set()
        """In flight, or arrived and waiting for its aggregation."""
        self.versions: dict[int, Arrays] = {0: _copy(loop.global_arrays)}
        self.fills = 0
        self.tick_armed = False
        self.model_bytes = float(nbytes(loop.global_arrays))
        self.update_bytes = float(nbytes({k: loop.global_arrays[k] for k in loop.shared}))

    # -- events ------------------------------------------------------------------
    def _push(self, t: float, kind: int, device: int, reason: str = "") -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, device, reason))

    def _start(self, device: int, window: Window) -> None:
        devs = np.array([device], dtype=np.int64)
        w = self.clock.work(devs, self.model_bytes, self.update_bytes)
        total = float(w.total_s[0])
        until = float(self.clock.availability.online_until(devs, self.now_s)[0])
        flight = Flight(
            device,
            self.version,
            self.now_s,
            float(w.download_s[0]),
            float(w.compute_s[0]),
            float(w.upload_s[0]),
        )
        self.flights[device] = flight
        self.busy.add(device)
        window.started += 1
        deadline = self.c.deadline_s
        if deadline > 0 and total > deadline and self.now_s + deadline <= until:
            self._push(
                self.now_s + deadline,
                DROP,
                device,
                f"deadline: needs {total:.0f} s of {deadline:g} s",
            )
        elif until < self.now_s + total:
            self._push(
                until,
                DROP,
                device,
                f"offline after {until - self.now_s:.0f} s, before its work finished "
                f"({total:.0f} s)",
            )
        else:
            self._push(self.now_s + total, ARRIVE, device)

    def _fill(self, window: Window) -> None:
        """Start devices until C are in flight (online, not busy); re-check later if short."""
        need = self.c.concurrency - len(self.flights)
        if need > 0:
            pool = self.loop.population.train_pool()
            online = pool[self.clock.availability.online(pool, self.now_s)]
            free = np.setdiff1d(online, np.fromiter(self.busy, np.int64, len(self.busy)))
            if free.size:
                self.fills += 1
                chosen = sample_devices(
                    self.loop.cfg.seed,
                    self.fills,
                    free,
                    0.0,
                    min(need, int(free.size)),
                    purpose="async-select",
                )
                for d in chosen:
                    self._start(d, window)
        if len(self.flights) < self.c.concurrency and not self.tick_armed:
            self.tick_armed = True
            self._push(self.now_s + self.c.wait_s, TICK, -1)

    def _collect(self, window: Window) -> None:
        """Advance virtual time until K arrivals are in hand."""
        last_progress = self.now_s
        while len(window.arrivals) < self.c.buffer_size:
            t, kind, _, device, reason = heapq.heappop(self.events)
            self.now_s = t
            if kind == TICK:
                self.tick_armed = False
                if t - last_progress > self.c.max_wait_h * 3600.0:
                    raise ClockError(
                        f"no device arrived for clock.max_wait_h = {self.c.max_wait_h:g} "
                        f"virtual hours (at {t / 3600:.1f} h, {len(self.flights)} in flight): "
                        "loosen the availability or raise clock.max_wait_h"
                    )
                self._fill(window)
                continue
            flight = self.flights.pop(device)
            if kind == DROP:
                self.busy.discard(device)
                window.dropped.append(DeviceIssue(device=device, reason=reason))
            else:
                window.arrivals.append(flight)
                last_progress = t
            if len(window.arrivals) < self.c.buffer_size:
                self._fill(window)

    # -- the run -----------------------------------------------------------------
    def run(self, t_start: float) -> None:
        loop = self.loop
        window = Window(start_s=0.0)
        self._fill(window)
        for agg in range(1, loop.cfg.rounds + 1):
            t0 = time.perf_counter()
            try:
                self._collect(window)
            except ClockError as err:
                from server.loop import RunFailed

                raise RunFailed(f"aggregation {agg}: {err}") from None
            row, trained, device_s = self._aggregate(agg, window)
            loop.finish_round(agg, row, trained, device_s, t0, t_start)
            window = Window(start_s=self.now_s)
            self._fill(window)  # the K-th arrival's place, from the new version

    def _aggregate(self, agg: int, window: Window) -> tuple[RoundRow, list[int], list[float]]:
        loop = self.loop
        shared_now = {k: loop.global_arrays[k] for k in sorted(loop.shared)}
        loop.aggregator.configure(agg, shared_now)
        by_version: dict[int, list[int]] = {}
        for f in window.arrivals:
            by_version.setdefault(f.version, []).append(f.device)
        merged = Screened()
        failed: list[DeviceIssue] = []
        updates: list[tuple[float, Arrays]] = []
        staleness: list[float] = []
        for v in sorted(by_version):
            devices = sorted(by_version[v])
            got = loop.dispatcher.exchange(
                "train",
                agg,
                loop.population.routes(devices),
                lambda ds: loop.task(agg, ds),
                self.versions[v],
            )
            ok = screen(got, loop.expected, loop.shared, loop.population.num_examples)
            failed += got.failed
            merged.accepted += ok.accepted
            merged.partials += ok.partials
            merged.rejected += ok.rejected
            s = self.version - v
            weight = staleness_weight(s, self.c.staleness_exponent)
            base = self.versions[v]
            for w, arrays in loop.updates(ok):
                updates.append((w, _pseudo(shared_now, base, arrays, s, weight)))
            staleness += [float(s)] * len(ok.devices)
        merged.accepted.sort(key=lambda r: r.report.device)
        merged.rejected.sort(key=lambda r: r.device)
        failed.sort(key=lambda f: f.device)
        chosen = sorted(f.device for f in window.arrivals)
        loop.require_enough(agg, chosen, merged, failed)
        loop.global_arrays.update(loop.aggregate(agg, updates))
        row, trained, device_s = loop.round_row(agg, chosen, merged, failed, shared_now)
        self.version += 1
        self.versions[self.version] = _copy(loop.global_arrays)
        self.busy.difference_update(chosen)
        needed = {f.version for f in self.flights.values()} | {self.version}
        self.versions = {v: a for v, a in self.versions.items() if v in needed}
        row = row.model_copy(update={"clock": self._row(window, staleness)})
        return row, trained, device_s

    def _row(self, window: Window, staleness: list[float]) -> ClockRow:
        arr = window.arrivals

        def dist(values: list[float]) -> Distribution | None:
            return Distribution.of(values) if values else None

        pool = self.loop.population.train_pool()
        return ClockRow(
            start_h=window.start_s / 3600.0,
            duration_s=self.now_s - window.start_s,
            end_h=self.now_s / 3600.0,
            online=int(self.clock.availability.online(pool, self.now_s).sum()),
            selected=window.started,
            finished=len(arr),
            dropped_offline=sum(1 for d in window.dropped if d.reason.startswith("offline")),
            dropped_deadline=sum(1 for d in window.dropped if d.reason.startswith("deadline")),
            dropped=sorted(window.dropped, key=lambda d: d.device),
            download_s=dist([f.download_s for f in arr]),
            compute_s=dist([f.compute_s for f in arr]),
            upload_s=dist([f.upload_s for f in arr]),
            staleness=dist(staleness),
        )


def _copy(arrays: Arrays) -> Arrays:
    return {k: v.copy() for k, v in arrays.items()}


def _pseudo(now: Arrays, base: Arrays, update: Arrays, staleness: int, weight: float) -> Arrays:
    """``now + weight * (update - base)`` on the shared keys, in float64 (a fresh update
    is itself: its base is the current model)."""
    if staleness == 0:
        return update
    return {
        k: now[k].astype(np.float64) + weight * (v.astype(np.float64) - base[k].astype(np.float64))
        for k, v in update.items()
    }
