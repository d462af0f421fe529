"""Datasets and their split across simulated devices.

``load_dataset`` turns a ``DataConfig`` into one in-memory :class:`Dataset`;
``build_partition`` decides which samples each device holds (indices only), and
``save_partition``/``load_partition`` carry that decision from the run setup to the
Ray workers, which slice their device's arrays with ``device_arrays``. Importing
this package is cheap: scikit-learn and flwr-datasets load only when needed.
"""

from .dataset import DataError, Dataset
from .loaders import load_dataset
from .partition import (
    Partition,
    build_partition,
    device_arrays,
    load_partition,
    partition_stats,
    save_partition,
)
from .source import DeviceSource, PartitionSource, SyntheticSource, open_source

__all__ = [
    "DataError",
    "Dataset",
    "DeviceSource",
    "Partition",
    "PartitionSource",
    "SyntheticSource",
    "build_partition",
    "device_arrays",
    "load_dataset",
    "load_partition",
    "open_source",
    "partition_stats",
    "save_partition",
]
