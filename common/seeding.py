"""One seed -> independent generators per (purpose, round, device).

Why not a global RNG: Ray runs devices in any order and on any worker, so a
shared generator would make results depend on scheduling. Deriving each stream
from (seed, purpose, round, device) makes every device's randomness the same
whatever order the simulation engine happens to run them in.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_PURPOSES = {"sampling": 1, "train": 2, "init": 3, "partition": 4, "eval": 5, "synthetic": 6}


def derive_seed(seed: int, purpose: str, round_: int = 0, device: int = 0) -> int:
    """A 63-bit seed unique to (seed, purpose, round, device)."""
    key = f"{seed}:{_PURPOSES[purpose]}:{round_}:{device}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def numpy_rng(seed: int, purpose: str, round_: int = 0, device: int = 0) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, round_, device))


def torch_generator(seed: int, purpose: str, round_: int = 0, device: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, purpose, round_, device))
    return g


def sample_devices(
    seed: int, round_: int, device_ids: list[int], fraction: float, minimum: int
) -> list[int]:
    """Pick this round's devices: a seeded subset, returned in device-id order."""
    ids = sorted(device_ids)
    k = min(len(ids), max(minimum, round(fraction * len(ids))))
    rng = numpy_rng(seed, "sampling", round_)
    chosen = rng.choice(len(ids), size=k, replace=False)
    return sorted(ids[i] for i in chosen)
