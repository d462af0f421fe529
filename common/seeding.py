"""One seed -> independent generators per (purpose, round, device).

Why not a global RNG: Ray runs devices in any order and on any worker, so a
shared generator would make results depend on scheduling. Deriving each stream
from (seed, purpose, round, device) makes every device's randomness the same
whatever order the simulation engine happens to run them in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_PURPOSES = {
    "sampling": 1,
    "train": 2,
    "init": 3,
    "eval": 5,
    "synthetic": 6,
    "eval-sample": 10,
    "profile-speed": 11,
    "profile-down": 12,
    "profile-up": 13,
    "profile-offset": 14,
    "profile-jitter": 15,
    "availability": 16,
    "async-select": 17,
    "rollout": 18,
    "drift": 19,
    "attack": 20,
    "attack-noise": 21,
}
"""Numbers are part of every derived seed: never renumber (4, "partition", was unused)."""


def derive_seed(seed: int, purpose: str, round_: int = 0, device: int = 0) -> int:
    """A 63-bit seed unique to (seed, purpose, round, device)."""
    key = f"{seed}:{_PURPOSES[purpose]}:{round_}:{device}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def numpy_rng(seed: int, purpose: str, round_: int = 0, device: int = 0) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, round_, device))


def torch_generator(seed: int, purpose: str, round_: int = 0, device: int = 0) -> torch.Generator:
    import torch  # lazily: the CLI and the model server import this module without torch

    g = torch.Generator()
    g.manual_seed(derive_seed(seed, purpose, round_, device))
    return g


def sample_devices(
    seed: int,
    round_: int,
    device_ids: Sequence[int] | np.ndarray,
    fraction: float,
    minimum: int,
    purpose: str = "sampling",
) -> list[int]:
    """Pick a seeded subset of ``fraction`` (at least ``minimum``), in device-id order.

    Seeded by (seed, purpose, round) over the sorted ids, so the choice never depends
    on the order devices were listed in; ``choice`` without replacement costs O(k) for
    k << n, so a million-device pool costs what a small one does.
    """
    ids = np.sort(np.asarray(device_ids, dtype=np.int64))
    k = min(int(ids.size), max(minimum, round(fraction * ids.size)))
    rng = numpy_rng(seed, purpose, round_)
    chosen = rng.choice(int(ids.size), size=k, replace=False)
    return sorted(int(ids[i]) for i in chosen)
