"""``[rollout]``: how a new global version reaches the devices' users (the serving plane).

Why a policy at all: the training plane moves every round, but a version that
aggregated badly (an lr spike, poisoned devices) should not reach every user at
once. ``canary`` gives the candidate to a seeded, growing share of devices and
compares it with the serving version on the same devices' test data each round of
a step's window (Argo Rollouts' analysis: a success condition and a failure limit);
``shadow`` measures the same way but never serves the candidate before promotion;
``ab`` holds two versions at a fixed share; ``immediate`` is the old behaviour.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RolloutPolicy = Literal["immediate", "canary", "shadow", "ab"]
RolloutMetric = Literal["accuracy", "loss"]
MonitorAction = Literal["alert", "rollback"]


class RolloutConfig(BaseModel):
    """The rollout policy and its analysis (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    policy: RolloutPolicy = "immediate"
    steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 1.0])
    """Canary/shadow: shares of devices on (or measured with) the candidate, increasing,
    ending at 1.0. A device keeps its assignment across steps."""
    ab_share: float = Field(0.5, gt=0.0, lt=1.0)
    """``ab``: the candidate's fixed share of devices."""
    window: int = Field(2, ge=1)
    """Rounds each step is held; one measurement per round."""
    metric: RolloutMetric = "accuracy"
    """What the success condition compares (mean over the step's devices)."""
    tolerance: float = Field(0.01, ge=0.0)
    """Pass needs candidate >= serving - tolerance (accuracy), <= serving + tolerance (loss)."""
    hurt_margin: float = Field(0.02, ge=0.0)
    """A device is hurt when the candidate's accuracy is this much below the serving one's."""
    max_share_hurt: float = Field(0.5, ge=0.0, le=1.0)
    """Pass also needs the share of hurt devices <= this."""
    failure_limit: int = Field(0, ge=0)
    """Failed measurements a step tolerates; one more aborts the rollout."""
    monitor_window: int = Field(0, ge=0)
    """Monitoring (0: off): the mean served accuracy over the last ``monitor_window``
    evaluated rounds, compared with the best such mean before (``server.monitor``)."""
    monitor_drop: float = Field(0.1, gt=0.0, le=1.0)
    """An alert fires when the windowed mean falls this far below the best one."""
    monitor_action: MonitorAction = "alert"
    """``rollback``: also move ``serving`` back when a promotion happened within the
    window (else the drop is the data's, not a version's: alert only)."""

    @model_validator(mode="after")
    def _steps_make_sense(self) -> RolloutConfig:
        s = self.steps
        if not s:
            raise ValueError("rollout.steps is empty: give increasing shares ending at 1.0")
        if any(not 0.0 < x <= 1.0 for x in s):
            raise ValueError(
                f"rollout.steps {s}: every share must be in (0, 1], e.g. [0.05, 0.25, 1.0]"
            )
        if any(b <= a for a, b in pairwise(s)):
            raise ValueError(
                f"rollout.steps {s}: shares must be strictly increasing, e.g. [0.05, 0.25, 1.0]"
            )
        if self.monitor_window and self.policy == "immediate":
            raise ValueError(
                "rollout.monitor_window watches what devices serve under a rollout policy: "
                "set rollout.policy to canary, shadow or ab, or rollout.monitor_window = 0"
            )
        if s[-1] != 1.0:
            raise ValueError(
                f"rollout.steps {s}: the last share must be 1.0 (promotion reaches every device)"
            )
        return self
