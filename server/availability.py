"""When devices are online, on the virtual clock.

Every model answers two vectorised questions for a set of devices at virtual time
``t``: who is online now, and until when each online device stays online (a device
whose work ends after that drops out). Deterministic: a device's availability is a
function of (seed, device id, time), never of the order anything ran in.

* ``always``: online for ever (today's behaviour).
* ``bernoulli``: time is cut into periods; a device is online in a period with
  probability p, independently (a stateless hash of (seed, device, period)).
* ``diurnal``: each device has a local-time offset and a daily window (e.g. on the
  charger at night) with a per-device jitter of its start.
* ``trace``: the [on, off) intervals of a user's profile file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.config_clock import ClockConfig
from common.seeding import derive_seed
from server.profiles import Profiles

LOOKAHEAD_PERIODS = 2000
"""``bernoulli``: how far ``online_until`` looks ahead (beyond it a device counts as
online long enough)."""


class Availability(Protocol):
    def online(self, devices: np.ndarray, t: float) -> np.ndarray:
        """Boolean mask: which of ``devices`` are online at ``t``."""
        ...

    def online_until(self, devices: np.ndarray, t: float) -> np.ndarray:
        """For devices online at ``t``: when their current online stretch ends (inf: never)."""
        ...


@dataclass(frozen=True)
class Always:
    def online(self, devices: np.ndarray, t: float) -> np.ndarray:
        return np.ones(devices.shape, dtype=bool)

    def online_until(self, devices: np.ndarray, t: float) -> np.ndarray:
        return np.full(devices.shape, np.inf)


_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def hash_uniform(key: int, devices: np.ndarray, period: np.ndarray | int) -> np.ndarray:
    """A uniform [0, 1) value per (key, device, period): splitmix64, vectorised."""
    with np.errstate(over="ignore"):
        z = np.asarray(devices, dtype=np.uint64) * _M1
        z ^= np.asarray(period, dtype=np.uint64) * _M2
        z ^= np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class Bernoulli:
    key: int
    p: float
    period_s: float

    def _on(self, devices: np.ndarray, period: np.ndarray | int) -> np.ndarray:
        return hash_uniform(self.key, devices, period) < self.p

    def online(self, devices: np.ndarray, t: float) -> np.ndarray:
        return self._on(devices, int(t // self.period_s))

    def online_until(self, devices: np.ndarray, t: float) -> np.ndarray:
        first = int(t // self.period_s)
        until = np.full(devices.shape, np.inf)
        active = np.arange(devices.size)
        for k in range(1, LOOKAHEAD_PERIODS + 1):
            if active.size == 0:
                break
            off = ~self._on(devices[active], first + k)
            until[active[off]] = (first + k) * self.period_s
            active = active[~off]
        return until


@dataclass(frozen=True)
class Diurnal:
    offset_h: np.ndarray
    window_start_h: np.ndarray
    window_h: float
    start_hour_utc: float

    def _into_window_h(self, devices: np.ndarray, t: float) -> np.ndarray:
        local = (t / 3600.0 + self.start_hour_utc + self.offset_h[devices]) % 24.0
        return (local - self.window_start_h[devices]) % 24.0

    def online(self, devices: np.ndarray, t: float) -> np.ndarray:
        if self.window_h >= 24.0:
            return np.ones(devices.shape, dtype=bool)
        return self._into_window_h(devices, t) < self.window_h

    def online_until(self, devices: np.ndarray, t: float) -> np.ndarray:
        if self.window_h >= 24.0:
            return np.full(devices.shape, np.inf)
        return t + (self.window_h - self._into_window_h(devices, t)) * 3600.0


@dataclass(frozen=True)
class Trace:
    intervals: list[np.ndarray]

    def _interval_end(self, device: int, t: float) -> float | None:
        iv = self.intervals[device]
        i = int(np.searchsorted(iv[:, 0], t, side="right")) - 1
        if i >= 0 and t < iv[i, 1]:
            return float(iv[i, 1])
        return None

    def online(self, devices: np.ndarray, t: float) -> np.ndarray:
        return np.array([self._interval_end(int(d), t) is not None for d in devices], dtype=bool)

    def online_until(self, devices: np.ndarray, t: float) -> np.ndarray:
        ends = [self._interval_end(int(d), t) for d in devices]
        return np.array([t if e is None else e for e in ends], dtype=np.float64)


def availability_for(clock: ClockConfig, seed: int, profiles: Profiles) -> Availability:
    if clock.availability == "always":
        return Always()
    if clock.availability == "bernoulli":
        return Bernoulli(
            derive_seed(seed, "availability"), clock.online_probability, clock.bernoulli_period_s
        )
    if clock.availability == "diurnal":
        return Diurnal(
            profiles.offset_h, profiles.window_start_h, clock.diurnal_window_h, clock.start_hour_utc
        )
    if profiles.intervals is None:
        raise ValueError(
            "clock.availability = 'trace' needs online intervals: give them in the "
            "'online' column of clock.profiles_file"
        )
    return Trace(profiles.intervals)
