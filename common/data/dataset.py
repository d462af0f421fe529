"""The in-memory dataset every loader returns and every partitioner reads.

One small, fixed layout (float32 NCHW in [0, 1], int64 labels) so models, partitioners
and the training loop never branch on where the samples came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """A data problem, already phrased for the user: which path or key, and the fix."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A training pool for the devices plus the server's global test set.

    ``eq=False``: comparing numpy arrays field by field has no single truth value, so
    datasets compare (and hash) by identity.
    """

    name: str
    x_train: np.ndarray
    """float32 (N, C, H, W), values in [0, 1]: the pool the partitioners split."""
    y_train: np.ndarray
    """int64 (N,)."""
    x_test: np.ndarray
    """float32 (M, C, H, W): the server's global test set."""
    y_test: np.ndarray
    """int64 (M,)."""
    num_classes: int
    writer_train: np.ndarray | None = None
    """int64 (N,) natural group id per training sample (FEMNIST writer), else None."""
    writer_test: np.ndarray | None = None
    """int64 (M,) natural group id per test sample, else None."""

    def __post_init__(self) -> None:
        # Cheap shape checks here catch a bad loader (or a hand-built test dataset) at
        # construction instead of as an index error deep inside a Ray worker.
        for split, x, y, w in (
            ("train", self.x_train, self.y_train, self.writer_train),
            ("test", self.x_test, self.y_test, self.writer_test),
        ):
            if x.ndim != 4 or x.dtype != np.float32:
                raise DataError(
                    f"dataset '{self.name}': x_{split} must be float32 (N, C, H, W), "
                    f"got {x.dtype} {x.shape}"
                )
            if y.ndim != 1 or y.dtype != np.int64 or len(y) != len(x):
                raise DataError(
                    f"dataset '{self.name}': y_{split} must be int64 with one label per "
                    f"image ({len(x)}), got {y.dtype} {y.shape}"
                )
            if w is not None and (w.shape != y.shape or w.dtype != np.int64):
                raise DataError(
                    f"dataset '{self.name}': writer_{split} must be int64 with one id per "
                    f"image ({len(x)}), got {w.dtype} {w.shape}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"dataset '{self.name}': train images {self.x_train.shape[1:]} and test "
                f"images {self.x_test.shape[1:]} differ in shape"
            )
        if (self.writer_train is None) != (self.writer_test is None):
            raise DataError(
                f"dataset '{self.name}': writer ids must be given for both splits or neither"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample: what the model zoo needs to build its first layer."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)
