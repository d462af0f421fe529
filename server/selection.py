"""Who trains this round: a selection policy over the population's training pool.

One method, ``select(round, pool)``, so the next policies (availability, a virtual
clock, over-commitment) replace this one without touching the round loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.seeding import sample_devices


class Selection(Protocol):
    def select(self, round_: int, pool: np.ndarray) -> list[int]:
        """This round's devices, in device-id order."""
        ...


@dataclass(frozen=True)
class UniformSelection:
    """A seeded uniform sample of ``fraction`` of the pool (at least ``minimum``), or of
    exactly ``count`` devices when ``count`` > 0 (a cross-device cohort size)."""

    seed: int
    fraction: float
    minimum: int
    count: int = 0

    def size(self, pool: np.ndarray) -> int:
        """How many devices a round wants from ``pool`` (the clock's K)."""
        if self.count > 0:
            return min(self.count, int(pool.size))
        return min(int(pool.size), max(self.minimum, round(self.fraction * pool.size)))

    def select(self, round_: int, pool: np.ndarray) -> list[int]:
        if self.count > 0:
            return sample_devices(self.seed, round_, pool, 0.0, min(self.count, pool.size))
        return sample_devices(self.seed, round_, pool, self.fraction, self.minimum)
