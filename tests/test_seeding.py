"""Per-device randomness depends on (seed, round, device) only, never on call order."""

from __future__ import annotations

from common.seeding import derive_seed, sample_devices, torch_generator


def test_streams_are_independent_and_reproducible() -> None:
    seeds = {derive_seed(1, "train", r, d) for r in range(5) for d in range(50)}
    assert len(seeds) == 250
    assert derive_seed(1, "train", 2, 3) == derive_seed(1, "train", 2, 3)
    assert derive_seed(1, "train", 2, 3) != derive_seed(2, "train", 2, 3)
    a = torch_generator(0, "train", 1, 7)
    b = torch_generator(0, "train", 1, 7)
    assert a.initial_seed() == b.initial_seed()


def test_sampling_is_seeded_sorted_and_sized() -> None:
    ids = list(range(100))
    s1 = sample_devices(3, 1, ids, 0.1, 1)
    assert s1 == sample_devices(3, 1, list(reversed(ids)), 0.1, 1)
    assert s1 == sorted(s1) and len(s1) == 10 and len(set(s1)) == 10
    assert s1 != sample_devices(3, 2, ids, 0.1, 1)
    assert len(sample_devices(3, 1, ids, 0.01, 5)) == 5
    assert sample_devices(3, 1, ids, 1.0, 1) == ids
