"""The wire and disk schema of one global-model version (registry manifest).

Why here: the server's registry writes it and a device's fetch client reads it,
and ``server`` and ``client`` must not import each other. It deliberately imports
no torch, so the HTTP model server starts fast and small.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SHA256_PATTERN = r"^[0-9a-f]{64}$"
_SHA256_RE = re.compile(SHA256_PATTERN)


def is_sha256_hex(value: str) -> bool:
    """True for a lowercase 64-digit hex digest (safe to put in a file name)."""
    return bool(_SHA256_RE.fullmatch(value))


class VersionManifest(BaseModel):
    """One immutable global-model version: what the bytes are and where they came from.

    ``extra="ignore"``: a device with an older client must still accept manifests
    from a newer server that added fields.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = Field(ge=0, description="Sequential version number, 0 = initial model.")
    round: int = Field(ge=0, description="Training round that produced this version.")
    created_at: datetime
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the safetensors blob.")
    size: int = Field(ge=0, description="Blob size in bytes.")
    parameter_count: int = Field(ge=0)
    model: dict[str, Any] = Field(
        description="The ModelSpec (common.models) to rebuild the architecture."
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    parent_version: int | None = Field(default=None, ge=0)
    status: str = Field(default="verified", description="'verified' when published.")
