"""``[scenario]``: faults injected on purpose, to watch what the serving plane does.

Why in the config: a rollout policy is only worth its cost if it stops a bad
version; a demonstration needs a bad version made the same way on every run (a
seeded config, not a hand-edited model). Off by default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ScenarioConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr_spike_round: int = Field(0, ge=0)
    """In this round (0: never) devices train with ``client.lr * lr_spike_factor``:
    the aggregate, a new global version, is then bad (an operator's typo, a bad
    hyper-parameter push)."""
    lr_spike_factor: float = Field(100.0, gt=0.0)
    drift_round: int = Field(0, ge=0)
    """From this round on (0: never) ``drift_share`` of the devices (seeded per device)
    see permuted labels in training and test data (``common.drift``)."""
    drift_share: float = Field(0.5, gt=0.0, le=1.0)
