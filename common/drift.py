"""A drift scenario: from a round on, a share of devices see permuted labels.

Why labels: it is the shift a served model cannot absorb (the same inputs now mean
another class, as when a new writer labels differently), so it shows what
monitoring must catch. Which devices drift is seeded per device, so the server,
the devices and a rerun agree without a list travelling anywhere.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from common.seeding import derive_seed


class DriftSpec(BaseModel):
    """What a device needs to know to apply the scenario's drift to its own data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_round: int = Field(ge=1)
    share: float = Field(gt=0.0, le=1.0)
    seed: int = Field(ge=0)


NUM_SHIFT = 1
"""The permutation drifted devices see: class ``c`` becomes ``(c + 1) % num_classes``."""


def is_drifted(spec: DriftSpec, device: int) -> bool:
    """Seeded per device: about ``share`` of the devices (each independently)."""
    return derive_seed(spec.seed, "drift", 0, device) / 2**63 < spec.share
