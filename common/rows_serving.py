"""Serving-plane records shared by metrics rows and registry events.

Why in common: the server writes them (``server.rollout``, the registry's event
log) and the CLI and HTTP server read them; one schema for all.
``common.rows.ServingRow`` (the metrics row's part) is built from these.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Analysis(BaseModel):
    """What a rollout analysis measured: candidate vs serving on the same devices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: int = Field(ge=0, description="Devices measured on both versions.")
    candidate_acc: float
    serving_acc: float
    candidate_loss: float
    serving_loss: float
    share_hurt: float = Field(description="Share of devices the candidate made worse.")
    passed: bool
    failures: int = Field(0, ge=0, description="Failed measurements in this step so far.")
    share: float = Field(0.0, ge=0.0, le=1.0, description="Candidate share of the step.")


class VersionCount(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    devices: int
