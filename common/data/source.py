"""Where a device's data comes from: a partition of a loaded dataset, or a generator.

Why one interface: the server needs each device's training-set size (to weight its
update by what it knows, not by what the device claims) and a global test set; a
worker needs one device's arrays. A partitioned dataset answers from indices kept in
memory; the synthetic population answers from (seed, device id) alone, so a million
devices cost nothing until one is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from common.config import ExperimentConfig

from .dataset import Dataset
from .partition import Partition, device_arrays

DeviceArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""``(x_train, y_train, x_test, y_test)`` of one device."""


class DeviceSource(Protocol):
    num_devices: int

    @property
    def input_shape(self) -> tuple[int, int, int]: ...

    @property
    def num_classes(self) -> int: ...

    def device(self, device_id: int) -> DeviceArrays: ...

    def train_sizes(self) -> np.ndarray:
        """int64 per device: training samples (what the server weights updates by)."""
        ...

    def server_test(self) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True, eq=False)
class PartitionSource:
    dataset: Dataset
    partition: Partition

    @property
    def num_devices(self) -> int:
        return self.partition.num_devices

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.dataset.input_shape

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def device(self, device_id: int) -> DeviceArrays:
        return device_arrays(self.dataset, self.partition, device_id)

    def train_sizes(self) -> np.ndarray:
        return np.array([len(i) for i in self.partition.train_idx], dtype=np.int64)

    def server_test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.dataset.x_test, self.dataset.y_test


@dataclass(frozen=True, eq=False)
class SyntheticSource:
    """Synthetic(alpha, beta) devices generated on demand (``common.data.synthetic``)."""

    seed: int
    num_devices: int
    alpha: float
    beta: float
    test_fraction: float

    @property
    def input_shape(self) -> tuple[int, int, int]:
        from .synthetic import SYNTHETIC_INPUT_SHAPE

        return SYNTHETIC_INPUT_SHAPE

    @property
    def num_classes(self) -> int:
        from .synthetic import SYNTHETIC_CLASSES

        return SYNTHETIC_CLASSES

    def device(self, device_id: int) -> DeviceArrays:
        from .synthetic import synthetic_device

        if not 0 <= device_id < self.num_devices:
            from .dataset import DataError

            raise DataError(
                f"device id {device_id} is outside the population (0..{self.num_devices - 1}): "
                "check partition.num_devices"
            )
        return synthetic_device(
            self.seed, device_id, self.num_devices, self.alpha, self.beta, self.test_fraction
        )

    @cached_property
    def _train_sizes(self) -> np.ndarray:
        from .synthetic import synthetic_sizes

        total = synthetic_sizes(self.seed, self.num_devices)
        # As synthetic_device splits: round(n * test_fraction) test samples, in [1, n-1].
        test = np.clip(np.round(total * self.test_fraction).astype(np.int64), 1, total - 1)
        return (total - test).astype(np.int64)

    def train_sizes(self) -> np.ndarray:
        return self._train_sizes

    def server_test(self) -> tuple[np.ndarray, np.ndarray]:
        from .synthetic import synthetic_test_set

        return synthetic_test_set(
            self.seed, self.num_devices, self.alpha, self.beta, self.test_fraction
        )


def open_source(cfg: ExperimentConfig, partition_file: Path | None) -> DeviceSource:
    """The devices' data: generated for synthetic, else the dataset sliced by the
    partition saved in the run folder (``partition_file``)."""
    if cfg.data.dataset == "synthetic":
        return SyntheticSource(
            cfg.seed,
            cfg.partition.num_devices,
            cfg.data.synthetic_alpha,
            cfg.data.synthetic_beta,
            cfg.data.test_fraction,
        )
    from .loaders import load_dataset
    from .partition import load_partition

    if partition_file is None:
        raise ValueError("a partitioned dataset needs the run folder's partition file")
    return PartitionSource(load_dataset(cfg.data), load_partition(partition_file))
