"""The one manifest schema of a global model: the registry's versions and ``final_model.json``.

Why here: the server's registry writes it, the ServerApp writes the final model's
manifest, and a device's fetch client reads it; ``server`` and ``client`` must not
import each other. The module imports no torch at import time, so the HTTP model
server starts fast and small (counting parameters builds the model lazily).

Two counts, named for what they count, because they differ whenever a model has
buffers (the CNN with batch norm: 189,002 parameters, 189,196 values):

* ``num_parameters``: elements of the model's ``nn.Parameter`` tensors, what an
  optimizer trains (``sum(p.numel() for p in model.parameters())``);
* ``num_values``: elements of every array in the weights file, parameters plus
  buffers such as batch-norm running statistics and ``num_batches_tracked``.

``parameter_count`` is kept, equal to ``num_values`` (what the registry always
wrote there), so that devices running an older fetch client, which require the
field, still accept manifests from this server.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import numpy as np

SHA256_PATTERN = r"^[0-9a-f]{64}$"
_SHA256_RE = re.compile(SHA256_PATTERN)

ALIASES: tuple[str, ...] = ("latest", "serving")
"""The only alias names a registry has (the server and the fetch client agree on them)."""


def is_sha256_hex(value: str) -> bool:
    """True for a lowercase 64-digit hex digest (safe to put in a file name)."""
    return bool(_SHA256_RE.fullmatch(value))


class ModelManifest(BaseModel):
    """What a weights file is and where it came from (``final_model.json``).

    ``extra="ignore"``: a device with an older client must still accept manifests
    from a newer server that added fields.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    round: int = Field(ge=0, description="Training round that produced these weights.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the safetensors blob.")
    size: int = Field(ge=0, description="Blob size in bytes.")
    num_parameters: int = Field(
        ge=0, description="Elements of the model's trainable parameters (nn.Parameter)."
    )
    num_values: int = Field(
        ge=0, description="Elements of every array in the blob (parameters and buffers)."
    )
    parameter_count: int = Field(
        ge=0, description="Deprecated: equals num_values; kept for older clients."
    )
    model: dict[str, Any] = Field(
        description="The ModelSpec (common.models) to rebuild the architecture."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Finite top-level numbers of the round's metrics row."
    )

    @model_validator(mode="before")
    @classmethod
    def _upgrade_legacy(cls, data: Any) -> Any:
        """Manifests written before the two counts existed had only ``parameter_count``
        (= every array element); their trainable count is not known: rebuild it."""
        if not isinstance(data, dict) or "parameter_count" not in data:
            return data
        if "num_values" in data and "num_parameters" in data:
            return data
        data = dict(data)
        data.setdefault("num_values", data["parameter_count"])
        if "num_parameters" not in data:
            try:
                data["num_parameters"] = _parameter_elements(
                    json.dumps(data.get("model"), sort_keys=True)
                )
            except Exception:  # an unknown spec: report it as the value count
                data["num_parameters"] = data["num_values"]
        return data

    def to_json(self) -> str:
        """Deterministic text (sorted keys): the same weights give the same file."""
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True)


class VersionManifest(ModelManifest):
    """One immutable global-model version in the registry (``versions/<n>.json``)."""

    version: int = Field(ge=0, description="Sequential version number, 0 = initial model.")
    created_at: datetime
    parent_version: int | None = Field(default=None, ge=0)
    status: str = Field(
        default="verified",
        description="'verified': size and sha256 were checked when published. Whether the "
        "bytes on disk still match is the version detail's 'servable'.",
    )


@functools.lru_cache(maxsize=32)
def _parameter_sizes(spec_json: str) -> dict[str, int]:
    """Element count of each ``nn.Parameter`` of the model a spec builds (cached per spec)."""
    from common.models import ModelSpec, build_model

    model = build_model(ModelSpec.model_validate_json(spec_json))
    return {name: p.numel() for name, p in model.named_parameters()}


def _parameter_elements(spec_json: str) -> int:
    return sum(_parameter_sizes(spec_json).values())


def count_values(
    arrays: Mapping[str, np.ndarray], spec: Mapping[str, Any] | BaseModel
) -> tuple[int, int]:
    """``(num_parameters, num_values)`` of ``arrays`` for the model ``spec`` describes.

    The parameter names come from building the model once per spec (cached), so
    buffers are told from parameters by what torch says, not by name patterns.
    """
    spec_dict = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else dict(spec)
    names = _parameter_sizes(json.dumps(spec_dict, sort_keys=True))
    num_values = 0
    num_parameters = 0
    for name, array in arrays.items():
        n = int(array.size)
        num_values += n
        if name in names:
            num_parameters += n
    return num_parameters, num_values


def manifest_metrics(metrics: Mapping[str, object] | None) -> dict[str, float]:
    """The finite top-level numbers of a metrics row (JSON has no NaN; nested
    summaries stay in ``metrics.jsonl``). Booleans are not numbers here."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool):
            continue
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def model_manifest(
    arrays: Mapping[str, np.ndarray],
    spec: Mapping[str, Any] | BaseModel,
    *,
    round: int,
    sha256: str,
    size: int,
    metrics: Mapping[str, object] | None = None,
) -> ModelManifest:
    """The manifest of a weights file: ``final_model.json`` is ``model_manifest(...).to_json()``.

    ``spec`` is validated as a ``ModelSpec`` (a manifest that devices cannot
    rebuild is never written); ``size`` is the safetensors blob's length.
    """
    from common.models import ModelSpec

    model_spec = ModelSpec.model_validate(
        spec.model_dump() if isinstance(spec, BaseModel) else dict(spec)
    )
    num_parameters, num_values = count_values(arrays, model_spec)
    return ModelManifest(
        round=round,
        sha256=sha256,
        size=size,
        num_parameters=num_parameters,
        num_values=num_values,
        parameter_count=num_values,
        model=model_spec.model_dump(mode="json"),
        metrics=manifest_metrics(metrics),
    )
