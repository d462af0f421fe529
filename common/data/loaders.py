"""Dataset loaders: bundled digits, ``.npz`` files, MNIST IDX folders, FEMNIST.

Nothing here downloads: the simulator must run offline, and a silent download in
every Ray worker would be slow and racy. Files are read with ``allow_pickle=False``
because a pickled array in a data file is code execution. Every loader returns the
same :class:`Dataset` layout (float32 NCHW in [0, 1], int64 labels).
"""

from __future__ import annotations

import gzip
import math
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .dataset import DataError, Dataset
from .paths import resolve_data_path, where_looked

if TYPE_CHECKING:
    from common.config import DataConfig

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
FEMNIST_KEYS = (*NPZ_KEYS, "writer_train", "writer_test")
FEMNIST_NUM_CLASSES = 62
"""Digits, upper- and lower-case letters; a subset of writers may lack the last ones."""

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
"""Fixed, not ``cfg.seed``: the global test set must not move when the seed changes."""

_NPZ_EXPECTED = "expected an .npz with x_train, y_train, x_test, y_test"
_FEMNIST_EXPECTED = (
    "expected an .npz with x_train, y_train, writer_train, x_test, y_test, writer_test "
    "like femnist_105writers.npz"
)
_IDX_EXPECTED = (
    "expected a folder with MNIST IDX files: train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
    "(each optionally .gz)"
)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset a config names. Called once per process by the caller.

    ``synthetic`` is not loaded but generated per device (``common.data.source``).
    """
    if cfg.dataset == "synthetic":
        raise DataError(
            "data.dataset: 'synthetic' is generated per device, not loaded: use "
            "common.data.open_source(cfg, None)"
        )
    loader = LOADERS.get(cfg.dataset)
    if loader is None:
        raise DataError(
            f"data.dataset: unknown dataset '{cfg.dataset}' (expected one of "
            f"{sorted([*LOADERS, 'synthetic'])})"
        )
    path = resolve_data_path(cfg)
    try:
        return loader(path)
    except DataError as err:
        if path.exists():
            raise
        raise DataError(f"{err}{where_looked(cfg)}") from None  # say where it looked


# --------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, with a fixed stratified 20% global test set.

    The digits have no official test split, so one is held out here: stratified so
    every class is in it, seeded with a constant so it is the same in every process.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # lazy: ~1 s import

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    test_mask = _stratified_mask(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    x = images[:, None, :, :]
    return Dataset(
        name="digits",
        x_train=np.ascontiguousarray(x[~test_mask]),
        y_train=labels[~test_mask],
        x_test=np.ascontiguousarray(x[test_mask]),
        y_test=labels[test_mask],
        num_classes=int(labels.max()) + 1,
    )


def _stratified_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mark ``ceil(fraction * N)`` samples, per class in proportion (largest remainder)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    total = math.ceil(fraction * len(labels))
    exact = counts * (total / len(labels))
    take = np.floor(exact).astype(np.int64)
    short = total - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    mask = np.zeros(len(labels), dtype=bool)
    for c, k in zip(classes, take, strict=True):
        members = rng.permutation(np.flatnonzero(labels == c))
        mask[members[:k]] = True
    return mask


# --------------------------------------------------------------------------- npz


def load_npz(path: Path, name: str = "npz") -> Dataset:
    """An .npz with ``x_train, y_train, x_test, y_test`` (e.g. shared/data/mnist.npz).

    Optional ``writer_train``/``writer_test`` keys are kept as natural group ids.
    """
    arrays = _read_npz(path, NPZ_KEYS, _NPZ_EXPECTED, optional=("writer_train", "writer_test"))
    return _assemble(name, path, arrays)


def load_femnist(path: Path) -> Dataset:
    """LEAF FEMNIST as in shared/data/femnist_105writers.npz: 62 classes, writer ids.

    The ``writers`` key (writer names, a unicode array) is not needed: writer ids are
    indices into it, and devices are numbered by sorted id.
    """
    arrays = _read_npz(path, FEMNIST_KEYS, _FEMNIST_EXPECTED)
    return _assemble("femnist", path, arrays, min_classes=FEMNIST_NUM_CLASSES)


def _read_npz(
    path: Path, keys: tuple[str, ...], expected: str, optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    if not path.is_file():
        if path.is_dir():
            what = "is a folder, not a file"
        elif path.exists():
            what = "is not a regular file (a device or pipe)"
        else:
            what = "file not found"
        raise DataError(f"data.path: {what}: {path} ({expected})")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise DataError(
            f"data.path: {path} is not a readable .npz archive (no zip header; "
            f"{expected}); save the arrays with numpy.savez"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            found = list(npz.files)
            missing = [k for k in keys if k not in found]
            if missing:
                raise DataError(
                    f"data.path: {path} lacks keys {missing} (found {found}; {expected})"
                )
            wanted = [*keys, *(k for k in optional if k in found)]
            out: dict[str, np.ndarray] = {}
            for key in wanted:
                try:
                    out[key] = npz[key]
                except ValueError as err:  # object arrays need pickle: refuse them
                    raise DataError(
                        f"data.path: {path} key '{key}' cannot be read without pickle "
                        f"({err}); re-save it as a plain numeric array"
                    ) from None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"data.path: {path} is not a readable .npz ({err}); {expected}") from None
    return out


def _assemble(
    name: str, path: Path, arrays: dict[str, np.ndarray], min_classes: int = 0
) -> Dataset:
    """Convert raw arrays to the common layout, naming the offending key on errors."""
    x_train = _images(arrays["x_train"], f"{path} x_train")
    x_test = _images(arrays["x_test"], f"{path} x_test")
    y_train = _labels(arrays["y_train"], f"{path} y_train", len(x_train))
    y_test = _labels(arrays["y_test"], f"{path} y_test", len(x_test))
    writer_train = writer_test = None
    if "writer_train" in arrays and "writer_test" in arrays:
        writer_train = _labels(arrays["writer_train"], f"{path} writer_train", len(x_train))
        writer_test = _labels(arrays["writer_test"], f"{path} writer_test", len(x_test))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"data.path: {path}: x_train images {x_train.shape[1:]} and x_test images "
            f"{x_test.shape[1:]} differ in shape; both splits must hold the same kind of image"
        )
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=_num_classes(y_train, y_test, min_classes),
        writer_train=writer_train,
        writer_test=writer_test,
    )


MAX_CLASSES = 100_000
"""Labels are class indices; a larger one is a data error (a model head that wide would
need gigabytes), not a class."""


def _num_classes(y_train: np.ndarray, y_test: np.ndarray, min_classes: int = 0) -> int:
    """Max label + 1 over both splits (both are non-empty by now)."""
    return max(int(y_train.max()) + 1, int(y_test.max()) + 1, min_classes)


def _images(x: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) or (N,C,H,W) (or NHWC with 1/3 channels) -> float32 NCHW in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # NHWC, as Keras/TF save it
    else:
        raise DataError(
            f"data.path: {where} has shape {x.shape}; expected images (N, H, W) or (N, C, H, W)"
        )
    if len(x) == 0:
        raise DataError(f"data.path: {where} is empty; the split needs at least one image")
    if x.dtype == np.uint8:
        out = x.astype(np.float32)
        out /= np.float32(255.0)
    elif np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise DataError(
                f"data.path: {where} holds integers outside 0..255; store pixels as uint8"
            )
        out = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        out = x.astype(np.float32)
        if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
            raise DataError(
                f"data.path: {where} holds floats outside [0, 1] (or NaN); scale them to "
                "[0, 1] or store pixels as uint8"
            )
    else:
        raise DataError(f"data.path: {where} has dtype {x.dtype}; store pixels as uint8")
    return np.ascontiguousarray(out)


def _labels(y: np.ndarray, where: str, n: int) -> np.ndarray:
    """Integer class (or writer) ids, one per image, as int64."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise DataError(
            f"data.path: {where} has shape {y.shape}; expected one integer per image ({n},)"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"data.path: {where} has dtype {y.dtype}; expected integer ids (not one-hot or float)"
        )
    if len(y) and y.min() < 0:
        raise DataError(f"data.path: {where} has negative ids; expected 0, 1, 2, ...")
    if len(y) and int(y.max()) >= MAX_CLASSES and "writer" not in where:
        raise DataError(
            f"data.path: {where} has a label {int(y.max())}; class labels must be "
            f"0..{MAX_CLASSES - 1} (0, 1, 2, ... one per class)"
        )
    if y.dtype.kind == "u" and len(y) and int(y.max()) > np.iinfo(np.int64).max:
        raise DataError(f"data.path: {where} has ids beyond int64; expected 0, 1, 2, ...")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_NAME = re.compile(r"(images|labels)[-.]idx([13])[-.]ubyte(\.gz)?$", re.IGNORECASE)


def read_idx(path: Path, expected_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (plain or gzip), validating magic number and size.

    Format (LeCun): two zero bytes, a dtype code, the number of dims, then one
    big-endian uint32 per dim, then the data, big-endian, row-major.
    """
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"data.path: {path} has a bad IDX magic number 0x{raw[:4].hex()} (expected "
            "0x00000801 for labels or 0x00000803 for images): the file is not IDX or is "
            "corrupted; replace it with the original"
        )
    ndim = raw[3]
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataError(
            f"data.path: {path} holds a {ndim}-d IDX array, expected {expected_ndim}-d "
            "(labels are 1-d, images 3-d): check which file is which"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"data.path: {path} is truncated inside its IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[raw[2]]
    want = header + math.prod(dims) * dtype.itemsize
    if len(raw) != want:
        raise DataError(
            f"data.path: {path} has {len(raw)} bytes but its IDX header {dims} implies "
            f"{want}: the file is truncated or corrupted; replace it with the original"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # native byte order, and writable


def _read_maybe_gzip(path: Path) -> bytes:
    """Read bytes, gunzipping by content (a renamed or unzipped file still works)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"data.path: cannot read {path}: {err}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"data.path: {path} is a corrupted gzip file ({err}); replace it with the original"
        ) from None


def find_idx_files(folder: Path) -> dict[str, Path]:
    """Map ``train_images/train_labels/test_images/test_labels`` to files in ``folder``.

    Train files have ``train`` in the name, test files ``t10k`` or ``test``. Where a
    plain file and its ``.gz`` both exist, the plain one wins (no need to unzip).
    """
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "folder not found"
        raise DataError(f"data.path: {what}: {folder} ({_IDX_EXPECTED})")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        m = _IDX_NAME.search(p.name)
        if not m or not p.is_file():
            continue
        low = p.name.lower()
        split = "train" if "train" in low else "test" if ("t10k" in low or "test" in low) else ""
        if split:
            found.setdefault(f"{split}_{m.group(1).lower()}", []).append(p)
    out: dict[str, Path] = {}
    for role in ("train_images", "train_labels", "test_images", "test_labels"):
        cands = found.get(role, [])
        plain = [p for p in cands if not p.name.lower().endswith(".gz")]
        zipped = [p for p in cands if p.name.lower().endswith(".gz")]
        if len(plain) == 1 and len(zipped) == 1 and zipped[0].name[:-3] == plain[0].name:
            cands = plain
        if len(cands) != 1:
            names = sorted(p.name for ps in found.values() for p in ps)
            problem = "no file" if not cands else f"{len(cands)} files"
            raise DataError(
                f"data.path: {folder} has {problem} for {role.replace('_', ' ')} "
                f"(IDX files found: {names or 'none'}); {_IDX_EXPECTED}"
            )
        out[role] = cands[0]
    return out


def load_idx(folder: Path, name: str = "idx") -> Dataset:
    """A folder of MNIST-format IDX files (the official MNIST/Fashion-MNIST layout)."""
    files = find_idx_files(folder)
    arrays = {
        "x_train": read_idx(files["train_images"], expected_ndim=3),
        "y_train": read_idx(files["train_labels"], expected_ndim=1),
        "x_test": read_idx(files["test_images"], expected_ndim=3),
        "y_test": read_idx(files["test_labels"], expected_ndim=1),
    }
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            raise DataError(
                f"data.path: {files[f'{split}_images']} holds {n_x} images but "
                f"{files[f'{split}_labels']} holds {n_y} labels; use matching files"
            )
    return _assemble(name, folder, arrays)


LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "digits": lambda _path: load_digits(),
    "npz": load_npz,
    "idx": load_idx,
    "femnist": load_femnist,
}
"""Every file-backed ``data.dataset`` (``common.config.DatasetName`` adds ``synthetic``;
a test checks the two agree)."""
