"""Numpy arrays <-> Flower ArrayRecords (the only way weights enter a message)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from common.weights import Arrays


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Arrays in name order, so byte-identical weights give identical records."""
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in sorted(arrays)})


def from_record(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}
