"""Weights in transit and at rest: numpy dicts, safetensors bytes, validation.

Why no pickle anywhere: weights cross process and network boundaries, and
unpickling (or ``torch.load``) received bytes runs arbitrary code. safetensors is
a flat header plus raw buffers, so loading it can only ever yield arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

Arrays = dict[str, np.ndarray]


def model_to_arrays(model: torch.nn.Module, keys: set[str] | None = None) -> Arrays:
    """Copy a model's state (parameters and buffers) to numpy, optionally a subset."""
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in model.state_dict().items()
        if keys is None or k in keys
    }


def load_arrays(
    model: torch.nn.Module, arrays: Mapping[str, np.ndarray], strict: bool = True
) -> None:
    """Load numpy arrays into a model in place (a subset when ``strict`` is False)."""
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing):
        raise ValueError(f"arrays do not fit the model: missing={missing} unexpected={unexpected}")


def to_safetensors(
    arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> bytes:
    """Serialise arrays (sorted by name, so equal weights give equal bytes)."""
    ordered = {k: np.ascontiguousarray(arrays[k]) for k in sorted(arrays)}
    return st_save(ordered, metadata=metadata)


def from_safetensors(blob: bytes) -> Arrays:
    return dict(st_load(blob))


def sha256_hex(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


def spec_of(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    return {k: ArraySpec(tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}


def validate_update(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, ArraySpec],
    required: set[str] | None = None,
) -> str | None:
    """Return why an update is unacceptable, or None when it is fine.

    Checked before aggregation: unknown or missing names, shape, dtype, and
    finiteness. One NaN would poison the global model of every device.
    """
    if not arrays:
        return "the update carries no arrays"
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        return f"unknown array names {unknown[:3]}"
    need = set(expected) if required is None else required
    missing = sorted(need - set(arrays))
    if missing:
        return f"missing arrays {missing[:3]}"
    for name, arr in arrays.items():
        spec = expected[name]
        if tuple(arr.shape) != spec.shape:
            return f"array '{name}' has shape {tuple(arr.shape)}, expected {spec.shape}"
        if str(arr.dtype) != spec.dtype:
            return f"array '{name}' has dtype {arr.dtype}, expected {spec.dtype}"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"array '{name}' contains NaN or Inf"
    return None
