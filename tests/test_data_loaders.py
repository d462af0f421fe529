"""Dataset loaders on real files: bundled digits, tmp .npz/IDX files, shared MNIST/FEMNIST."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig
from common.data import DataError, Dataset, load_dataset
from common.data.loaders import load_idx, load_npz, read_idx

SHARED = Path(
    os.environ.get("HYBRIDFL_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def shared_file(name: str) -> Path:
    """A file of the shared test data, or skip (the product must not need it)."""
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"../shared/data not present: {path} (set HYBRIDFL_SHARED_DATA)")
    return path


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    """Write an IDX file by the spec, independently of the reader under test."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    data = header + array.astype(dtype).tobytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray], gz: bool) -> None:
    ext = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", arrays["x_train"])
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", arrays["y_train"])
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", arrays["x_test"])
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", arrays["y_test"])


def small_arrays(seed: int = 0, n_train: int = 40, n_test: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(n_train, 5, 4), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 5, 4), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test).astype(np.uint8),
    }


def assert_layout(ds: Dataset) -> None:
    """The contract every loader must meet."""
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and x.ndim == 4
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.flags.c_contiguous
    assert ds.input_shape == ds.x_train.shape[1:] == ds.x_test.shape[1:]
    assert ds.num_classes == max(ds.y_train.max(), ds.y_test.max()) + 1


# --------------------------------------------------------------------------- digits


def test_digits_layout_and_stratified_holdout() -> None:
    ds = load_dataset(DataConfig())
    assert_layout(ds)
    assert ds.name == "digits"
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.x_train.max() == 1.0  # 16/16: scaled, not clipped
    assert ds.writer_train is None and ds.writer_test is None
    # Stratified: each class holds ~20% of its samples in the global test set.
    test_share = np.bincount(ds.y_test) / (np.bincount(ds.y_train) + np.bincount(ds.y_test))
    assert np.all(np.abs(test_share - 0.2) < 0.01)
    # Fixed split: the same in every process, whatever the experiment seed.
    again = load_dataset(DataConfig())
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    np.testing.assert_array_equal(ds.x_test, again.x_test)


# --------------------------------------------------------------------------- npz


def test_npz_from_tmp_file(tmp_path: Path) -> None:
    arrays = small_arrays()
    path = tmp_path / "small.npz"
    np.savez(path, **arrays)
    ds = load_dataset(DataConfig(dataset="npz", path=str(path)))
    assert_layout(ds)
    assert ds.x_train.shape == (40, 1, 5, 4)
    np.testing.assert_allclose(ds.x_train[:, 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.num_classes == max(arrays["y_train"].max(), arrays["y_test"].max()) + 1


def test_npz_channels_first_and_last(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, size=(6, 3, 5, 4), dtype=np.uint8)
    labels = np.arange(6) % 3
    np.savez(tmp_path / "a.npz", x_train=nchw, y_train=labels, x_test=nchw, y_test=labels)
    np.savez(
        tmp_path / "b.npz",
        x_train=nchw.transpose(0, 2, 3, 1),
        y_train=labels,
        x_test=nchw.transpose(0, 2, 3, 1),
        y_test=labels,
    )
    a, b = load_npz(tmp_path / "a.npz"), load_npz(tmp_path / "b.npz")
    assert a.input_shape == b.input_shape == (3, 5, 4)
    np.testing.assert_array_equal(a.x_train, b.x_train)


def test_npz_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "y.npz"
    with pytest.raises(DataError, match="file not found") as err:
        load_dataset(DataConfig(dataset="npz", path=str(missing)))
    assert str(missing) in str(err.value)
    assert "x_train, y_train, x_test, y_test" in str(err.value)


def test_npz_missing_keys_lists_found_and_expected(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError) as err:
        load_npz(path)
    msg = str(err.value)
    assert "['y_train', 'x_test', 'y_test']" in msg and "labels" in msg and str(path) in msg


def test_npz_refuses_pickled_arrays(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = dict(small_arrays())
    arrays["y_train"] = np.array([{"evil": 1}] * 40, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays when saving
    with pytest.raises(DataError, match="'y_train' cannot be read without pickle"):
        load_npz(path)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("y_train", np.zeros(39, np.int64), "expected one integer per image"),
        ("y_test", np.zeros(12, np.float32), "expected integer ids"),
        ("x_train", np.full((40, 5, 4), 2.0, np.float32), r"outside \[0, 1\]"),
        ("x_test", np.zeros((12, 4), np.uint8), "expected images"),
        ("y_train", -np.ones(40, np.int64), "negative"),
    ],
)
def test_npz_bad_arrays_name_the_key(
    tmp_path: Path, key: str, value: np.ndarray, match: str
) -> None:
    arrays = dict(small_arrays())
    arrays[key] = value
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as err:
        load_npz(path)
    assert key in str(err.value)


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_npz(path)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_folder_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = small_arrays(seed=2)
    write_idx_folder(tmp_path / "mnist", arrays, gz=gz)
    ds = load_dataset(DataConfig(dataset="idx", path=str(tmp_path / "mnist")))
    assert_layout(ds)
    assert ds.x_train.shape == (40, 1, 5, 4) and ds.x_test.shape == (12, 1, 5, 4)
    np.testing.assert_array_equal(np.rint(ds.x_train[:, 0] * 255), arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def test_idx_other_dtypes_and_names(tmp_path: Path) -> None:
    """int32/float32 IDX payloads are big-endian; 'test' works in place of 't10k'."""
    labels = np.array([3, 1, 70000, 2], dtype=np.int64)
    write_idx(tmp_path / "x-labels-idx1-ubyte", labels, code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-labels-idx1-ubyte"), labels)
    floats = np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    write_idx(tmp_path / "f-images-idx3-ubyte", floats, code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f-images-idx3-ubyte"), floats)

    arrays = small_arrays(seed=3)
    folder = tmp_path / "named"
    folder.mkdir()
    write_idx(folder / "emnist-train-images-idx3-ubyte.gz", arrays["x_train"])
    write_idx(folder / "emnist-train-labels-idx1-ubyte.gz", arrays["y_train"])
    write_idx(folder / "emnist-test-images-idx3-ubyte", arrays["x_test"])
    write_idx(folder / "emnist-test-labels-idx1-ubyte", arrays["y_test"])
    (folder / "README.txt").write_text("not an IDX file, ignored")
    assert len(load_idx(folder).y_test) == 12


def test_idx_plain_and_gz_side_by_side_prefers_plain(tmp_path: Path) -> None:
    arrays = small_arrays(seed=4)
    write_idx_folder(tmp_path, arrays, gz=True)
    write_idx_folder(tmp_path, arrays, gz=False)
    np.testing.assert_array_equal(load_idx(tmp_path).y_train, arrays["y_train"])


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_corrupted_magic(tmp_path: Path, gz: bool) -> None:
    write_idx_folder(tmp_path, small_arrays(), gz=gz)
    ext = ".gz" if gz else ""
    target = tmp_path / f"train-images-idx3-ubyte{ext}"
    raw = bytearray(gzip.decompress(target.read_bytes()) if gz else target.read_bytes())
    raw[0:4] = b"\x12\x34\x08\x03"
    target.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    with pytest.raises(DataError, match="bad IDX magic number 0x12340803") as err:
        load_idx(tmp_path)
    assert str(target) in str(err.value)


def test_idx_truncated_and_bad_gzip(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, small_arrays(), gz=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated or corrupted"):
        load_idx(tmp_path)
    labels = tmp_path / "x-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DataError, match="corrupted gzip"):
        read_idx(labels)


def test_idx_wrong_rank_and_count_mismatch(tmp_path: Path) -> None:
    arrays = small_arrays()
    write_idx_folder(tmp_path, arrays, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["x_train"])  # 3-d as labels
    with pytest.raises(DataError, match="3-d IDX array, expected 1-d"):
        load_idx(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", arrays["y_train"][:-1])
    with pytest.raises(DataError, match=r"holds 40 images but .* holds 39 labels"):
        load_idx(tmp_path)


def test_idx_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="folder not found") as err:
        load_dataset(DataConfig(dataset="idx", path=str(tmp_path / "absent")))
    assert str(tmp_path / "absent") in str(err.value)
    write_idx_folder(tmp_path, small_arrays(), gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no file for test labels") as err:
        load_idx(tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(err.value)  # lists what it found


# --------------------------------------------------------------------------- shared data


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset(DataConfig(dataset="npz", path=str(shared_file("mnist.npz"))))


def test_mnist_npz_layout(mnist: Dataset) -> None:
    assert_layout(mnist)
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.num_classes == 10


def test_mnist_slice_round_trips_through_idx(tmp_path: Path, mnist: Dataset) -> None:
    with np.load(shared_file("mnist.npz"), allow_pickle=False) as raw:
        arrays = {
            "x_train": raw["x_train"][:600],
            "y_train": raw["y_train"][:600],
            "x_test": raw["x_test"][:100],
            "y_test": raw["y_test"][:100],
        }
    write_idx_folder(tmp_path, arrays, gz=True)
    ds = load_idx(tmp_path)
    np.testing.assert_array_equal(ds.x_train, mnist.x_train[:600])
    np.testing.assert_array_equal(ds.y_test, mnist.y_test[:100])


def test_femnist_layout_and_writers() -> None:
    path = shared_file("femnist_105writers.npz")
    ds = load_dataset(DataConfig(dataset="femnist", path=str(path)))
    assert_layout(ds)
    assert ds.name == "femnist" and ds.num_classes == 62
    assert ds.x_train.shape == (14708, 1, 28, 28) and ds.x_test.shape == (1685, 1, 28, 28)
    assert ds.writer_train is not None and ds.writer_test is not None
    assert ds.writer_train.dtype == np.int64 and ds.writer_test.dtype == np.int64
    assert len(np.unique(ds.writer_train)) == 105
    assert set(np.unique(ds.writer_test)) <= set(np.unique(ds.writer_train))
    assert np.median(ds.x_train) == 0.0  # pixel 0 = background, most of the image


def test_femnist_without_writer_ids(tmp_path: Path) -> None:
    path = tmp_path / "nowriters.npz"
    np.savez(path, **small_arrays())
    with pytest.raises(DataError, match=r"lacks keys \['writer_train', 'writer_test'\]"):
        load_dataset(DataConfig(dataset="femnist", path=str(path)))
