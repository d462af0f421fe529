"""Split a dataset's training pool across simulated devices.

Methods (``partition.method``), all deterministic for a given ``seed``:

- ``iid``: Flower Datasets' ``IidPartitioner`` over a seeded permutation of the pool
  (it cuts contiguous blocks, so the permutation is what makes it random).
- ``dirichlet``: hand-written, the same draw as Flower Datasets'
  ``DirichletPartitioner`` (per class, proportions ~ Dir(alpha) over devices, no
  self-balancing). Flower's gives up with an error after 10 draws that leave a device
  below its minimum size, keeping none of them, which for small alpha and many devices
  is almost certain (MNIST, 100 devices, alpha=0.05: every draw leaves a few devices
  empty); and reading a draw back through ``datasets.select`` (which hashes every index
  list) takes 0.5-3 s on MNIST x 100 devices (28 s for 10 draws at alpha=0.05). In numpy
  a draw takes milliseconds, so we draw up to 10 times, keep the draw with the smallest
  shortfall and top up each short device with samples of the largest device's most
  common label: the minimum size is guaranteed and the label skew is kept.
- ``pathological``: Flower Datasets' ``PathologicalPartitioner`` in its
  ``deterministic`` class-assignment mode (device i holds sorted classes i..i+k-1,
  wrapping around), so every class is held by about the same number of devices; the
  classes are relabelled by a seeded permutation first, so which device holds which
  classes (and which samples) still depends on the seed. The slowest method (~3.5 s on
  MNIST x 100 devices, nearly all in ``datasets.select`` hashing), paid once per run.
  With ``partition.class_assignment = "pflib"``, hand-written instead: PFLlib's own
  assignment (classes in label order to the lowest-numbered devices with room), so
  the class pairs match PFLlib's published protocol whatever the seed.
- ``shards``: hand-written (McMahan et al. 2017). Flower's ``ShardPartitioner`` cuts
  shards of ``floor(N / (devices * shards))`` samples and drops the remainder (37 of
  the 1437 digits for 20 devices x 2 shards); here the label-sorted pool is cut into
  shards whose sizes differ by at most one, so the devices cover the pool exactly.
- ``natural``: hand-written, one device per writer in sorted writer-id order (the
  order Flower's ``NaturalIdPartitioner`` uses); with fewer devices than writers, the
  first ``num_devices`` writers. Flower's version groups only one split, loops in
  Python and draws a tqdm bar on stderr; two ``np.flatnonzero`` calls group both the
  writer's training samples and the writer's own test samples (``test_source="test"``).
  There is nothing random in it: the seed has no effect.

For every method but ``natural`` each device's share is then split into the device's
own train and test sets (``data.test_fraction``, at least one of each, stratified by
label, seeded per device); ``test_source="train"`` then says both index ``x_train``.

``flwr_datasets`` (and ``datasets``) are imported inside :func:`build_partition`
only: Ray workers import this package and only need :func:`load_partition`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from common.atomic import atomic_write_bytes

from .dataset import DataError, Dataset

if TYPE_CHECKING:
    from common.config import ExperimentConfig, PartitionConfig

IndexSource = Literal["train", "test"]
METHODS = ("iid", "dirichlet", "pathological", "shards", "natural")
DIRICHLET_DRAWS = 10
"""Same budget as flwr-datasets' DirichletPartitioner before it gives up."""
_FORMAT_VERSION = 1
_FILE_KEYS = (
    "format",
    "method",
    "test_source",
    "train_concat",
    "train_offsets",
    "test_concat",
    "test_offsets",
)

# Stream tags for np.random.SeedSequence([seed, tag, ...]): independent generators
# per purpose, so adding a draw in one place never shifts another.
_TAG_POOL, _TAG_FLWR, _TAG_SPLIT, _TAG_TOPUP = 1, 2, 3, 4


@dataclass(frozen=True, eq=False)
class Partition:
    """Which samples each device holds. Indices only: the arrays stay in the Dataset."""

    method: str
    train_idx: list[np.ndarray]
    """Per device, int64 indices into ``dataset.x_train``: the device's training split."""
    test_idx: list[np.ndarray]
    """Per device, int64 indices into the pool named by ``test_source``."""
    test_source: IndexSource
    """``"train"``: test_idx index x_train (a held-out slice of the device's share);
    ``"test"``: they index x_test (natural split: the writer's own test samples)."""

    def __post_init__(self) -> None:
        if len(self.train_idx) != len(self.test_idx):
            raise DataError(
                f"partition: {len(self.train_idx)} train index lists but "
                f"{len(self.test_idx)} test index lists; there must be one of each per device"
            )
        if self.test_source not in ("train", "test"):
            raise DataError(
                f"partition: test_source must be 'train' or 'test', got {self.test_source!r}"
            )

    @property
    def num_devices(self) -> int:
        """Number of devices (one train and one test index list each)."""
        return len(self.train_idx)


# --------------------------------------------------------------------------- build


def build_partition(dataset: Dataset, cfg: ExperimentConfig) -> Partition:
    """Partition ``dataset`` as ``cfg.partition`` says, seeded by ``cfg.seed``."""
    p = cfg.partition
    if p.method == "natural":
        return _natural(dataset, p)
    y = dataset.y_train
    n, pool, m = p.num_devices, len(y), p.min_samples_per_device
    if n > pool:
        raise DataError(
            f"partition.num_devices={n} but the training pool has {pool} samples: "
            "lower partition.num_devices"
        )
    if n * m > pool:
        raise DataError(
            f"partition.num_devices={n} x partition.min_samples_per_device={m} needs "
            f"{n * m} samples but the training pool has {pool}: lower "
            "partition.num_devices or partition.min_samples_per_device"
        )
    if p.method == "iid":
        shares = _iid(y, p, cfg.seed)
    elif p.method == "dirichlet":
        shares = _dirichlet(y, p, cfg.seed)
    elif p.method == "pathological" and p.class_assignment == "pflib":
        shares = _pathological_pflib(y, p, cfg.seed)
    elif p.method == "pathological":
        shares = _pathological(y, p, cfg.seed)
    elif p.method == "shards":
        shares = _shards(y, p, cfg.seed)
    else:
        raise DataError(f"partition.method: unknown method '{p.method}' (expected {METHODS})")
    _check_min_size(shares, p)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for device_id, share in enumerate(shares):
        rng = np.random.default_rng([cfg.seed, _TAG_SPLIT, device_id])
        tr, te = _split_share(share, y, cfg.data.test_fraction, rng)
        train_idx.append(tr)
        test_idx.append(te)
    return Partition(method=p.method, train_idx=train_idx, test_idx=test_idx, test_source="train")


def _check_min_size(shares: list[np.ndarray], p: PartitionConfig) -> None:
    sizes = np.array([len(s) for s in shares])
    short = np.flatnonzero(sizes < p.min_samples_per_device)
    if len(short):
        d = int(short[0])
        hint = {
            "pathological": ", or raise partition.classes_per_device",
            "shards": ", or raise partition.shards_per_device",
        }.get(p.method, "")
        raise DataError(
            f"partition.method='{p.method}' left {len(short)} device(s) (e.g. device {d}, "
            f"{sizes[d]} samples) below partition.min_samples_per_device="
            f"{p.min_samples_per_device}: lower partition.num_devices or "
            f"partition.min_samples_per_device{hint}"
        )


def _split_share(
    share: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split one device's share into its own train/test sets, stratified by label.

    Systematic sampling over the share sorted by (label, random): evenly spaced
    positions from a random offset give each label its proportional test count
    (within one), and exactly ``round(k * fraction)`` test samples (clipped to
    1..k-1) without any special case for rare labels.
    """
    k = len(share)
    n_test = min(max(round(k * fraction), 1), k - 1)
    shuffled = rng.permutation(share)
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    step = k / n_test  # > 1, so the positions below are distinct and < k
    pos = np.floor(rng.random() * step + step * np.arange(n_test)).astype(np.int64)
    mask = np.zeros(k, dtype=bool)
    mask[pos] = True
    return np.sort(by_label[~mask]).astype(np.int64), np.sort(by_label[mask]).astype(np.int64)


def _flwr_seed(seed: int, *tags: int) -> int:
    """An int seed for a flwr-datasets partitioner, derived from (seed, tags)."""
    return int(np.random.SeedSequence([seed, _TAG_FLWR, *tags]).generate_state(1)[0])


def _pool_dataset(labels: np.ndarray, seed: int) -> Any:
    """A tiny HF dataset of (label, idx) rows in seeded random order.

    flwr-datasets partitioners take classes' samples in row order, so a shuffled
    row order makes which samples go where depend on the seed.
    """
    from datasets import Dataset as HFDataset  # lazy: heavy import

    perm = np.random.default_rng([seed, _TAG_POOL]).permutation(len(labels))
    return HFDataset.from_dict({"label": labels[perm], "idx": perm.astype(np.int64)})


def _read_flwr(partitioner: Any, n: int) -> list[np.ndarray]:
    return [
        np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64).reshape(-1)
        for i in range(n)
    ]


def _iid(y: np.ndarray, p: PartitionConfig, seed: int) -> list[np.ndarray]:
    """flwr-datasets' IidPartitioner takes contiguous shards of the seeded pool order
    (the first ``len % n`` shards one row longer): ``np.array_split`` of the same
    permutation gives byte-identical partitions (a test pins it) in milliseconds
    instead of ~20 s at 10,000 devices (one HF ``select`` per device)."""
    perm = np.random.default_rng([seed, _TAG_POOL]).permutation(len(y)).astype(np.int64)
    return list(np.array_split(perm, p.num_devices))


def _dirichlet(y: np.ndarray, p: PartitionConfig, seed: int) -> list[np.ndarray]:
    """Label skew: per class, proportions ~ Dir(alpha) over the devices.

    The same draw as flwr-datasets' DirichletPartitioner (without self-balancing),
    in numpy; see the module docstring for why it is not used directly.
    """
    rng = np.random.default_rng([seed, _TAG_POOL, 3])
    n, m = p.num_devices, p.min_samples_per_device
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    alpha = np.full(n, float(p.alpha))
    best: list[np.ndarray] = []
    best_short = -1
    for _draw in range(DIRICHLET_DRAWS):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
        for members in by_class:
            props = rng.dirichlet(alpha)
            cuts = np.clip((np.cumsum(props) * len(members)).astype(np.int64), 0, len(members))
            for d, chunk in enumerate(np.split(members, cuts[:-1])):
                chunks[d].append(chunk)
        shares = [np.concatenate(c) for c in chunks]
        short = sum(max(0, m - len(s)) for s in shares)
        if best_short < 0 or short < best_short:
            best, best_short = shares, short
        if short == 0:
            break
    if best_short > 0:
        best = _top_up(best, y, m, np.random.default_rng([seed, _TAG_TOPUP]))
    return best


def _top_up(
    shares: list[np.ndarray], y: np.ndarray, m: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give each device below ``m`` samples from the largest device's commonest label.

    Moving whole-label samples from the biggest device keeps both devices' label
    skew; it always finishes because the caller checked ``num_devices * m <= pool``.
    """
    shares = [s.copy() for s in shares]
    for d in range(len(shares)):
        while len(shares[d]) < m:
            sizes = np.array([len(s) for s in shares])
            sizes[d] = -1
            donor = int(np.argmax(sizes))
            labels, counts = np.unique(y[shares[donor]], return_counts=True)
            label = labels[int(np.argmax(counts))]
            members = np.flatnonzero(y[shares[donor]] == label)
            take = min(m - len(shares[d]), len(members), len(shares[donor]) - m)
            moved = rng.choice(members, size=take, replace=False)
            shares[d] = np.concatenate([shares[d], shares[donor][moved]])
            shares[donor] = np.delete(shares[donor], moved)
    return shares


def _pathological(y: np.ndarray, p: PartitionConfig, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import PathologicalPartitioner

    present = np.unique(y)
    k = p.classes_per_device
    if k > len(present):
        raise DataError(
            f"partition.classes_per_device={k} but the training pool has only "
            f"{len(present)} distinct labels: lower partition.classes_per_device to at "
            f"most {len(present)}"
        )
    # Relabel classes by a seeded permutation: the deterministic assignment then
    # balances class use across devices while the seed still picks the classes.
    relabel = np.random.default_rng([seed, _TAG_POOL, 1]).permutation(len(present))
    part = PathologicalPartitioner(
        num_partitions=p.num_devices,
        partition_by="label",
        num_classes_per_partition=k,
        class_assignment_mode="deterministic",
        shuffle=True,
        seed=_flwr_seed(seed),
    )
    part.dataset = _pool_dataset(relabel[np.searchsorted(present, y)], seed)
    try:
        with warnings.catch_warnings():
            # "Classes ... will NOT be used": expected with fewer devices than classes.
            warnings.simplefilter("ignore", UserWarning)
            return _read_flwr(part, p.num_devices)
    except ValueError as err:  # a class must go to more devices than it has samples
        raise DataError(
            f"partition.method='pathological' with partition.num_devices={p.num_devices} "
            f"and partition.classes_per_device={k} is impossible for this pool ({err}); "
            "lower partition.num_devices or partition.classes_per_device"
        ) from None


def _pathological_pflib(y: np.ndarray, p: PartitionConfig, seed: int) -> list[np.ndarray]:
    """PFLlib's ``pat`` split (``dataset/utils/dataset_utils.py``, ``separate_data``).

    Classes in label order; each goes to the first ``ceil(devices / classes * k)``
    devices, by id, that still hold fewer than ``k`` classes, and its samples are split
    evenly among them (PFLlib's ``balance=True``; its default draws unequal sizes). With
    20 devices and k=2: devices 0-3 hold classes 0 and 1, devices 4-7 classes 2 and 3,
    and so on. Classes reached when no device has room are not used (as in PFLlib).
    Only which samples of a class go to which device depends on the seed.
    """
    present = np.unique(y)
    n, k = p.num_devices, p.classes_per_device
    if k > len(present):
        raise DataError(
            f"partition.classes_per_device={k} but the training pool has only "
            f"{len(present)} distinct labels: lower partition.classes_per_device to at "
            f"most {len(present)}"
        )
    per_class = int(np.ceil((n / len(present)) * k))
    room = [k] * n
    rng = np.random.default_rng([seed, _TAG_POOL, 5])
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label in present:
        owners = [d for d in range(n) if room[d] > 0][:per_class]
        if not owners:
            break
        members = rng.permutation(np.flatnonzero(y == label))
        for d, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[d].append(chunk)
            room[d] -= 1
    return [
        np.sort(np.concatenate(ps)).astype(np.int64) if ps else np.zeros(0, dtype=np.int64)
        for ps in parts
    ]


def _shards(y: np.ndarray, p: PartitionConfig, seed: int) -> list[np.ndarray]:
    n, s = p.num_devices, p.shards_per_device
    total = n * s
    if total > len(y):
        raise DataError(
            f"partition.num_devices={n} x partition.shards_per_device={s} = {total} "
            f"shards but the training pool has {len(y)} samples: lower "
            "partition.num_devices or partition.shards_per_device"
        )
    rng = np.random.default_rng([seed, _TAG_POOL, 2])
    perm = rng.permutation(len(y))
    by_label = perm[np.argsort(y[perm], kind="stable")]  # random order within a label
    shards = np.array_split(by_label, total)
    owners = rng.permutation(total).reshape(n, s)
    return [np.concatenate([shards[j] for j in row]) for row in owners]


def _natural(dataset: Dataset, p: PartitionConfig) -> Partition:
    w_train, w_test = dataset.writer_train, dataset.writer_test
    if w_train is None or w_test is None:
        raise DataError(
            f"partition.method='natural' needs writer ids, but dataset '{dataset.name}' "
            "has none: set data.dataset='femnist' (or an .npz with writer_train/"
            "writer_test) or choose another partition.method"
        )
    writers = np.unique(w_train)
    n = p.num_devices
    if n > len(writers):
        raise DataError(
            f"partition.num_devices={n} but the data has {len(writers)} writers and "
            f"partition.method='natural' makes one device per writer: set "
            f"partition.num_devices to at most {len(writers)}"
        )
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for d, w in enumerate(writers[:n]):
        tr = np.flatnonzero(w_train == w).astype(np.int64)
        te = np.flatnonzero(w_test == w).astype(np.int64)
        if len(te) == 0 or len(tr) + len(te) < p.min_samples_per_device:
            raise DataError(
                f"partition.method='natural': writer {int(w)} (device {d}) has {len(tr)} "
                f"training and {len(te)} test samples; every device needs at least one "
                f"test sample and partition.min_samples_per_device="
                f"{p.min_samples_per_device} in all: lower partition.min_samples_per_device "
                "or use data where every writer has both splits"
            )
        train_idx.append(tr)
        test_idx.append(te)
    return Partition(method="natural", train_idx=train_idx, test_idx=test_idx, test_source="test")


# --------------------------------------------------------------------------- use


def device_arrays(
    dataset: Dataset, partition: Partition, device_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of one device, as copies."""
    if not 0 <= device_id < partition.num_devices:
        raise DataError(
            f"device id {device_id} is outside the partition (0..{partition.num_devices - 1}): "
            "check partition.num_devices"
        )
    tr = partition.train_idx[device_id]
    te = partition.test_idx[device_id]
    if partition.test_source == "train":
        x_pool, y_pool = dataset.x_train, dataset.y_train
    else:
        x_pool, y_pool = dataset.x_test, dataset.y_test
    for what, idx, size in (("train", tr, len(dataset.y_train)), ("test", te, len(y_pool))):
        if len(idx) and (idx.min() < 0 or idx.max() >= size):
            raise DataError(
                f"partition device {device_id}: {what} index {int(idx.max())} is outside "
                f"the dataset '{dataset.name}' ({size} samples): the partition was built "
                "for other data; rebuild it from this config"
            )
    return dataset.x_train[tr], dataset.y_train[tr], x_pool[te], y_pool[te]


def partition_stats(dataset: Dataset, partition: Partition) -> dict[str, Any]:
    """JSON-able summary: sizes and training label counts per device, plus totals."""
    y_test_pool = dataset.y_train if partition.test_source == "train" else dataset.y_test
    devices = []
    for d in range(partition.num_devices):
        labels, counts = np.unique(dataset.y_train[partition.train_idx[d]], return_counts=True)
        devices.append(
            {
                "device_id": d,
                "num_train": len(partition.train_idx[d]),
                "num_test": len(partition.test_idx[d]),
                "classes": {int(c): int(k) for c, k in zip(labels, counts, strict=True)},
                "num_test_classes": len(np.unique(y_test_pool[partition.test_idx[d]])),
            }
        )
    train = np.array([dv["num_train"] for dv in devices])
    test = np.array([dv["num_test"] for dv in devices])
    total = train + test
    n_classes = np.array([len(dv["classes"]) for dv in devices])
    return {
        "method": partition.method,
        "test_source": partition.test_source,
        "num_devices": partition.num_devices,
        "devices": devices,
        "summary": {
            "total_train": int(train.sum()),
            "total_test": int(test.sum()),
            "min_samples": int(total.min()),
            "median_samples": float(np.median(total)),
            "max_samples": int(total.max()),
            "min_train": int(train.min()),
            "median_train": float(np.median(train)),
            "max_train": int(train.max()),
            "mean_classes_per_device": float(n_classes.mean()),
        },
    }


# --------------------------------------------------------------------------- files


def _ragged(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(a) for a in arrays])
    concat = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
    return concat, offsets


def save_partition(partition: Partition, path: Path) -> None:
    """Write a partition to ``.npz`` (no pickle: strings as unicode arrays), atomically.

    Ragged per-device lists are stored as one concatenated index array plus offsets.
    """
    path = Path(path)
    train_concat, train_offsets = _ragged(partition.train_idx)
    test_concat, test_offsets = _ragged(partition.test_idx)
    buf = io.BytesIO()
    np.savez(
        buf,
        format=np.array(_FORMAT_VERSION, dtype=np.int64),
        method=np.array(partition.method),
        test_source=np.array(partition.test_source),
        train_concat=train_concat,
        train_offsets=train_offsets,
        test_concat=test_concat,
        test_offsets=test_offsets,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_partition(path: Path) -> Partition:
    """Read a partition written by :func:`save_partition`, validating its structure."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"partition file not found: {path} (expected the partition.npz written when "
            "the run was set up; set up the run again)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _FILE_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"partition file {path} lacks keys {missing} (found {list(npz.files)}): "
                    "it was not written by save_partition; set up the run again"
                )
            arrays = {k: npz[k] for k in _FILE_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as err:
        raise DataError(
            f"partition file {path} is not a readable .npz ({err}); set up the run again"
        ) from None
    if int(arrays["format"]) != _FORMAT_VERSION:
        raise DataError(
            f"partition file {path} has format {int(arrays['format'])}, this code reads "
            f"format {_FORMAT_VERSION}: set up the run again with this version"
        )
    method, source = str(arrays["method"]), str(arrays["test_source"])
    if method not in METHODS or source not in ("train", "test"):
        raise DataError(
            f"partition file {path} names method {method!r} / test_source {source!r}; "
            f"expected one of {METHODS} / 'train' or 'test'"
        )
    lists: dict[str, list[np.ndarray]] = {}
    for split in ("train", "test"):
        concat, offsets = arrays[f"{split}_concat"], arrays[f"{split}_offsets"]
        ok = (
            concat.ndim == 1
            and offsets.ndim == 1
            and np.issubdtype(concat.dtype, np.integer)
            and len(offsets) >= 1
            and offsets[0] == 0
            and offsets[-1] == len(concat)
            and bool(np.all(np.diff(offsets) >= 0))
        )
        if not ok:
            raise DataError(
                f"partition file {path}: {split}_concat/{split}_offsets are inconsistent "
                "(the file is corrupted); set up the run again"
            )
        concat = concat.astype(np.int64)
        lists[split] = [concat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    if len(lists["train"]) != len(lists["test"]):
        raise DataError(
            f"partition file {path}: {len(lists['train'])} train but {len(lists['test'])} "
            "test device lists (the file is corrupted); set up the run again"
        )
    return Partition(
        method=method,
        train_idx=lists["train"],
        test_idx=lists["test"],
        test_source=cast(IndexSource, source),
    )
