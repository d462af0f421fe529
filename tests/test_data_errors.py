"""Bad data files stop with a message naming the file and the fix (issue 12 L-items)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data import DataError
from common.data.loaders import load_npz


def _npz(path: Path, y_train: np.ndarray) -> Path:
    x = np.zeros((len(y_train), 4, 4), np.uint8)
    np.savez(path, x_train=x, y_train=y_train, x_test=x[:2], y_test=np.array([0, 1]))
    return path


@pytest.mark.parametrize(
    "labels",
    [np.array([0, 999_999_999], dtype=np.int64), np.array([0, 2**63], dtype=np.uint64)],
    ids=["huge", "uint64"],
)
def test_labels_beyond_any_class_count_are_refused(tmp_path: Path, labels: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"y_train has a label \d+; class labels must be 0\.\."):
        load_npz(_npz(tmp_path / "d.npz", labels))


def test_a_file_that_is_not_npz_is_named_without_pickle_advice(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match=r"not a readable \.npz archive") as err:
        load_npz(p)
    assert "pickle" not in str(err.value)


def test_a_device_file_is_not_reported_missing() -> None:
    with pytest.raises(DataError, match="not a regular file"):
        load_npz(Path("/dev/zero"))
