"""Partitioners on real data: sizes, determinism, label skew, files and error messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import DataConfig, ExperimentConfig
from common.data import (
    DataError,
    Dataset,
    Partition,
    build_partition,
    device_arrays,
    load_dataset,
    load_partition,
    partition_stats,
    save_partition,
)

SHARED = Path(
    os.environ.get("HYBRIDFL_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
SPLIT_METHODS = ["iid", "dirichlet", "pathological", "shards"]
FAST_METHODS = ["iid", "dirichlet", "shards"]
"""pathological goes through datasets.select (~3 s on MNIST): checked on digits only."""


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"../shared/data not present: {path} (set HYBRIDFL_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(DataConfig())


@pytest.fixture(scope="module")
def femnist() -> Dataset:
    path = shared_file("femnist_105writers.npz")
    return load_dataset(DataConfig(dataset="femnist", path=str(path)))


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset(DataConfig(dataset="npz", path=str(shared_file("mnist.npz"))))


def make_cfg(
    method: str, seed: int = 0, dataset: str = "digits", **partition: Any
) -> ExperimentConfig:
    data = {"dataset": dataset, "path": "" if dataset == "digits" else "unused-here"}
    return ExperimentConfig(seed=seed, data=data, partition={"method": method, **partition})


def tiny_dataset(labels: list[int]) -> Dataset:
    """A hand-built dataset with exactly the label counts a test needs."""
    y = np.asarray(labels, dtype=np.int64)
    x = np.zeros((len(y), 1, 2, 2), dtype=np.float32)
    return Dataset("tiny", x, y, x[:1], y[:1], num_classes=int(y.max()) + 1)


def assert_valid(ds: Dataset, part: Partition, num_devices: int) -> None:
    """Every device has train and test samples; indices are valid and never shared."""
    assert part.num_devices == num_devices
    test_pool = len(ds.y_train) if part.test_source == "train" else len(ds.y_test)
    for tr, te in zip(part.train_idx, part.test_idx, strict=True):
        assert tr.dtype == np.int64 and te.dtype == np.int64
        assert len(tr) >= 1 and len(te) >= 1
        assert tr.min() >= 0 and tr.max() < len(ds.y_train)
        assert te.min() >= 0 and te.max() < test_pool
    all_train = np.concatenate(part.train_idx)
    all_test = np.concatenate(part.test_idx)
    assert len(np.unique(all_train)) == len(all_train)  # no sample on two devices
    assert len(np.unique(all_test)) == len(all_test)
    if part.test_source == "train":  # test slices come from the same pool: disjoint
        assert len(np.intersect1d(all_train, all_test)) == 0


def device_labels(ds: Dataset, part: Partition, d: int) -> np.ndarray:
    """Distinct labels of device ``d``'s train and test samples together."""
    _, y_tr, _, y_te = device_arrays(ds, part, d)
    return np.unique(np.concatenate([y_tr, y_te]))


def same(a: Partition, b: Partition) -> bool:
    return all(
        np.array_equal(x, y)
        for xs, ys in ((a.train_idx, b.train_idx), (a.test_idx, b.test_idx))
        for x, y in zip(xs, ys, strict=True)
    )


def mean_label_entropy(ds: Dataset, part: Partition) -> float:
    out = []
    for d in range(part.num_devices):
        counts = np.bincount(ds.y_train[part.train_idx[d]], minlength=ds.num_classes)
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(out))


# --------------------------------------------------------------------------- all methods


@pytest.mark.parametrize("method", SPLIT_METHODS)
def test_sizes_and_determinism(digits: Dataset, method: str) -> None:
    part = build_partition(digits, make_cfg(method, seed=3, num_devices=20))
    assert part.method == method and part.test_source == "train"
    assert_valid(digits, part, 20)
    assert same(part, build_partition(digits, make_cfg(method, seed=3, num_devices=20)))
    assert not same(part, build_partition(digits, make_cfg(method, seed=4, num_devices=20)))


@pytest.mark.parametrize("method", ["iid", "shards"])
def test_iid_and_shards_cover_the_pool_exactly(digits: Dataset, method: str) -> None:
    part = build_partition(digits, make_cfg(method, num_devices=7, shards_per_device=3))
    used = np.sort(np.concatenate(part.train_idx + part.test_idx))
    np.testing.assert_array_equal(used, np.arange(len(digits.y_train)))
    sizes = [len(tr) + len(te) for tr, te in zip(part.train_idx, part.test_idx, strict=True)]
    assert max(sizes) - min(sizes) <= (1 if method == "iid" else 3)


def test_device_test_fraction_and_stratification(digits: Dataset) -> None:
    cfg = make_cfg("iid", num_devices=10)
    cfg.data.test_fraction = 0.3
    part = build_partition(digits, cfg)
    for d in range(10):
        n_tr, n_te = len(part.train_idx[d]), len(part.test_idx[d])
        assert n_te == round(0.3 * (n_tr + n_te))
        _, y_tr, _, y_te = device_arrays(digits, part, d)
        assert set(y_tr) == set(y_te) == set(range(10))  # stratified: every label in both


def test_two_sample_devices_get_one_train_one_test(digits: Dataset) -> None:
    part = build_partition(digits, make_cfg("iid", num_devices=700, min_samples_per_device=2))
    assert_valid(digits, part, 700)
    assert min(len(te) for te in part.test_idx) >= 1


# --------------------------------------------------------------------------- label skew


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_exactly_k_labels_balanced(digits: Dataset, k: int) -> None:
    part = build_partition(digits, make_cfg("pathological", num_devices=15, classes_per_device=k))
    assert_valid(digits, part, 15)
    held = [device_labels(digits, part, d) for d in range(15)]
    assert all(len(labels) == k for labels in held)
    uses = np.bincount(np.concatenate(held), minlength=10)
    assert uses.max() - uses.min() <= k  # each class on roughly the same number of devices


def test_pflib_class_assignment_pairs_classes_as_pflib_does(digits: Dataset) -> None:
    """PFLlib's separate_data('pat'), 20 clients, 10 classes, 2 per client: each class
    goes to the first ceil(20/10*2) = 4 clients by id with room left, so clients 0-3
    hold {0, 1}, clients 4-7 hold {2, 3}, ... whatever the seed."""
    parts = {
        seed: build_partition(
            digits,
            make_cfg("pathological", seed=seed, num_devices=20, class_assignment="pflib"),
        )
        for seed in (0, 7)
    }
    for part in parts.values():
        assert_valid(digits, part, 20)
        for d in range(20):
            first = 2 * (d // 4)
            assert device_labels(digits, part, d).tolist() == [first, first + 1], d
        # Each class's samples are split evenly among its four devices.
        for c in range(10):
            owners = [d for d in range(20) if c in device_labels(digits, part, d)]
            shares = [np.concatenate([part.train_idx[d], part.test_idx[d]]) for d in owners]
            counts = [int((digits.y_train[share] == c).sum()) for share in shares]
            assert sum(counts) == int((digits.y_train == c).sum())
            assert max(counts) - min(counts) <= 1
    assert not same(parts[0], parts[7])  # the seed still picks which samples go where


def test_pflib_class_assignment_with_fewer_devices_than_classes(digits: Dataset) -> None:
    """6 clients: ceil(6/10*2) = 2 per class; classes 6-9 find no client with room."""
    part = build_partition(
        digits, make_cfg("pathological", num_devices=6, class_assignment="pflib")
    )
    held = [device_labels(digits, part, d).tolist() for d in range(6)]
    assert held == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]]


def test_default_class_assignment_is_unchanged_and_pflib_is_pathological_only(
    digits: Dataset,
) -> None:
    default = make_cfg("pathological", num_devices=20)
    assert default.partition.class_assignment == "seeded"
    pflib = make_cfg("pathological", num_devices=20, class_assignment="pflib")
    assert not same(build_partition(digits, default), build_partition(digits, pflib))
    with pytest.raises(ValueError, match=r"class_assignment = 'pflib' applies to .*pathological"):
        make_cfg("dirichlet", class_assignment="pflib")


def test_shards_are_mcmahan_style(digits: Dataset) -> None:
    part = build_partition(digits, make_cfg("shards", num_devices=20, shards_per_device=2))
    n_labels = [len(device_labels(digits, part, d)) for d in range(20)]
    # A shard may straddle a class boundary, so a device has at most 2 labels per shard.
    assert max(n_labels) <= 4 and np.mean(n_labels) <= 2.6


def test_dirichlet_alpha_controls_skew(digits: Dataset) -> None:
    skewed = build_partition(digits, make_cfg("dirichlet", num_devices=10, alpha=0.05))
    uniform = build_partition(digits, make_cfg("dirichlet", num_devices=10, alpha=100.0))
    assert_valid(digits, skewed, 10)
    assert mean_label_entropy(digits, skewed) < 0.5 * mean_label_entropy(digits, uniform)
    assert mean_label_entropy(digits, uniform) > 0.95 * np.log(10)


def test_dirichlet_guarantees_minimum_size(digits: Dataset) -> None:
    """Tiny alpha and many devices leave devices empty in every draw: they get topped up."""
    cfg = make_cfg("dirichlet", num_devices=150, alpha=0.01, min_samples_per_device=6)
    part = build_partition(digits, cfg)
    assert_valid(digits, part, 150)
    assert min(len(tr) + len(te) for tr, te in zip(part.train_idx, part.test_idx, strict=True)) >= 6
    assert mean_label_entropy(digits, part) < 0.3  # still strongly label-skewed


def test_natural_one_writer_per_device(femnist: Dataset) -> None:
    assert femnist.writer_train is not None and femnist.writer_test is not None
    part = build_partition(femnist, make_cfg("natural", dataset="femnist", num_devices=105))
    assert part.test_source == "test"
    assert_valid(femnist, part, 105)
    writers = np.unique(femnist.writer_train)
    for d in range(105):
        w = writers[d]
        assert set(femnist.writer_train[part.train_idx[d]]) == {w}
        np.testing.assert_array_equal(part.train_idx[d], np.flatnonzero(femnist.writer_train == w))
        np.testing.assert_array_equal(part.test_idx[d], np.flatnonzero(femnist.writer_test == w))
    # Every sample of both splits is used once.
    assert sum(map(len, part.train_idx)) == len(femnist.y_train)
    assert sum(map(len, part.test_idx)) == len(femnist.y_test)
    x_tr, _, x_te, y_te = device_arrays(femnist, part, 4)
    np.testing.assert_array_equal(x_te, femnist.x_test[femnist.writer_test == writers[4]])
    np.testing.assert_array_equal(y_te, femnist.y_test[femnist.writer_test == writers[4]])
    assert len(x_tr) == len(part.train_idx[4])


def test_natural_fewer_devices_takes_first_writers(femnist: Dataset) -> None:
    assert femnist.writer_train is not None
    part = build_partition(femnist, make_cfg("natural", dataset="femnist", num_devices=10))
    first = np.unique(femnist.writer_train)[:10]
    got = [int(femnist.writer_train[tr[0]]) for tr in part.train_idx]
    assert got == first.tolist()
    # No randomness in a natural split: the seed changes nothing.
    other = build_partition(femnist, make_cfg("natural", seed=9, dataset="femnist", num_devices=10))
    assert same(part, other)


# --------------------------------------------------------------------------- MNIST scale


@pytest.mark.parametrize("method", FAST_METHODS)
def test_mnist_100_devices(mnist: Dataset, method: str) -> None:
    cfg = make_cfg(method, dataset="npz", num_devices=100, alpha=0.1)
    part = build_partition(mnist, cfg)
    assert_valid(mnist, part, 100)
    if method == "shards":  # McMahan et al.: 200 shards of 300, mostly 2 labels per device
        sizes = {len(tr) + len(te) for tr, te in zip(part.train_idx, part.test_idx, strict=True)}
        assert sizes == {600}
        assert np.mean([len(device_labels(mnist, part, d)) for d in range(100)]) <= 2.3


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("method", [*SPLIT_METHODS, "natural"])
def test_save_load_round_trip(
    tmp_path: Path, digits: Dataset, request: pytest.FixtureRequest, method: str
) -> None:
    if method == "natural":
        ds: Dataset = request.getfixturevalue("femnist")  # skips without shared data
        cfg = make_cfg("natural", dataset="femnist", num_devices=30)
    else:
        ds, cfg = digits, make_cfg(method, num_devices=12)
    part = build_partition(ds, cfg)
    path = tmp_path / "run" / "partition.npz"
    save_partition(part, path)
    assert [p.name for p in path.parent.iterdir()] == ["partition.npz"]  # no temp left
    with np.load(path, allow_pickle=False) as raw:  # loads without pickle
        assert all(raw[k] is not None for k in raw.files)
    back = load_partition(path)
    assert back.method == part.method and back.test_source == part.test_source
    assert same(part, back)
    for a, b in zip(device_arrays(ds, part, 5), device_arrays(ds, back, 5), strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_replaces_existing_file(tmp_path: Path, digits: Dataset) -> None:
    path = tmp_path / "partition.npz"
    save_partition(build_partition(digits, make_cfg("iid", num_devices=3)), path)
    save_partition(build_partition(digits, make_cfg("shards", num_devices=4)), path)
    assert load_partition(path).num_devices == 4


def test_load_partition_errors(tmp_path: Path, digits: Dataset) -> None:
    with pytest.raises(DataError, match="partition file not found") as err:
        load_partition(tmp_path / "absent.npz")
    assert "absent.npz" in str(err.value)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_partition(junk)
    other = tmp_path / "other.npz"
    np.savez(other, idx=np.arange(3))
    with pytest.raises(DataError, match="lacks keys"):
        load_partition(other)
    good = tmp_path / "good.npz"
    save_partition(build_partition(digits, make_cfg("iid", num_devices=3)), good)
    with np.load(good, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    arrays["train_offsets"] = arrays["train_offsets"][::-1].copy()
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match="inconsistent"):
        load_partition(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- use


def test_device_arrays_and_stats(digits: Dataset) -> None:
    part = build_partition(digits, make_cfg("dirichlet", num_devices=8, alpha=0.5))
    x_tr, y_tr, x_te, y_te = device_arrays(digits, part, 3)
    assert x_tr.shape == (len(part.train_idx[3]), 1, 8, 8) and x_tr.dtype == np.float32
    np.testing.assert_array_equal(y_tr, digits.y_train[part.train_idx[3]])
    np.testing.assert_array_equal(x_te, digits.x_train[part.test_idx[3]])
    x_tr[:] = -1.0  # a copy: the shared dataset is untouched
    assert digits.x_train.min() >= 0.0
    with pytest.raises(DataError, match=r"device id 8 is outside the partition \(0..7\)"):
        device_arrays(digits, part, 8)

    stats = partition_stats(digits, part)
    json.dumps(stats)
    assert stats["method"] == "dirichlet" and stats["num_devices"] == 8
    dev = stats["devices"][3]
    assert dev["num_train"] == len(y_tr) and dev["num_test"] == len(y_te)
    assert dev["classes"] == {
        int(c): int(n) for c, n in zip(*np.unique(y_tr, return_counts=True), strict=True)
    }
    summary = stats["summary"]
    assert summary["total_train"] + summary["total_test"] == len(digits.y_train)
    assert summary["min_samples"] <= summary["median_samples"] <= summary["max_samples"]
    assert 1.0 <= summary["mean_classes_per_device"] <= 10.0


def test_partition_for_other_data_is_refused(digits: Dataset) -> None:
    small = tiny_dataset([0, 1] * 10)
    part = build_partition(digits, make_cfg("iid", num_devices=2))
    with pytest.raises(DataError, match="the partition was built for other data"):
        device_arrays(small, part, 0)


# --------------------------------------------------------------------------- impossible


@pytest.mark.parametrize(
    ("method", "partition", "match"),
    [
        (
            "iid",
            {"num_devices": 5000},
            "partition.num_devices=5000 but the training pool has 1437 samples: "
            "lower partition.num_devices",
        ),
        ("iid", {"num_devices": 500, "min_samples_per_device": 3}, "needs 1500 samples"),
        ("pathological", {"classes_per_device": 11}, "partition.classes_per_device=11"),
        ("shards", {"num_devices": 600, "shards_per_device": 3}, "1800 shards"),
    ],
)
def test_impossible_requests(
    digits: Dataset, method: str, partition: dict[str, Any], match: str
) -> None:
    with pytest.raises(DataError, match=re.escape(match)):
        build_partition(digits, make_cfg(method, **partition))


def test_pathological_class_too_small() -> None:
    # Both classes go to all 4 devices, but class 1 has only 2 samples.
    with pytest.raises(DataError, match=r"partition\.classes_per_device=2 is impossible"):
        build_partition(
            tiny_dataset([0] * 40 + [1] * 2),
            make_cfg("pathological", num_devices=4, classes_per_device=2),
        )
    # One class per device: class 1's 3 samples split 2 + 1, leaving a device too small.
    with pytest.raises(DataError, match=r"below partition\.min_samples_per_device=2"):
        build_partition(
            tiny_dataset([0] * 40 + [1] * 3),
            make_cfg("pathological", num_devices=4, classes_per_device=1),
        )


def test_natural_needs_writer_ids(digits: Dataset) -> None:
    cfg = make_cfg("natural", dataset="femnist", num_devices=5)
    with pytest.raises(DataError, match="needs writer ids, but dataset 'digits' has none"):
        build_partition(digits, cfg)


def test_natural_more_devices_than_writers(femnist: Dataset) -> None:
    with pytest.raises(DataError, match=r"partition\.num_devices=200 but the data has 105 writers"):
        build_partition(femnist, make_cfg("natural", dataset="femnist", num_devices=200))


def test_natural_writer_without_test_samples() -> None:
    x = np.zeros((6, 1, 2, 2), dtype=np.float32)
    y = np.array([0, 1, 0, 1, 0, 1], dtype=np.int64)
    writers = np.array([0, 0, 0, 1, 1, 1], dtype=np.int64)
    ds = Dataset("w", x, y, x[:2], y[:2], 2, writers, np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match=r"writer 1 \(device 1\) has 3 training and 0 test"):
        build_partition(ds, make_cfg("natural", dataset="femnist", num_devices=2))
