"""The ``[attack]`` section: poisoned devices, simulated where a real attacker sits.

Why in the config: a robustness claim ("Krum survives 20% sign-flippers") is only
worth something if the attack is as reproducible as the training. Which devices are
malicious follows from (seed, population size) alone, so the same devices attack in
every round, on every worker, whatever order Ray runs them in, and the run folder
records the set (``attack.json``). The section travels to devices inside the round
task (``common.protocol.task_for``), as the ``client`` section does.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.seeding import sample_devices

if TYPE_CHECKING:
    from common.config import ExperimentConfig

AttackKind = Literal["none", "scale", "sign_flip", "noise", "label_flip", "inflate_count", "nan"]
"""What a malicious device does (``client.attack`` implements each)."""

UPDATE_ATTACKS = frozenset({"scale", "sign_flip", "noise", "nan"})
"""Kinds that rewrite the update a device sends (the others poison its data or report)."""


class AttackConfig(BaseModel):
    """Who attacks, how, and from which round. ``kind = "none"`` changes nothing."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: AttackKind = "none"
    """``scale``: sends ``global + scale * delta`` (delta = its honest update minus the
    global model); ``sign_flip``: ``global - scale * delta``; ``noise``: ``global +
    N(0, noise_std^2)`` instead of its update; ``label_flip``: trains on labels ``C-1-y``;
    ``inflate_count``: claims ``scale`` times its training examples; ``nan``: sends NaN."""
    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the population that is malicious (``round(fraction * num_devices)``
    devices, a seeded choice)."""
    scale: float = Field(10.0, allow_inf_nan=False)
    """Factor of ``scale``, ``sign_flip`` and ``inflate_count`` (above 1 for the last)."""
    noise_std: float = Field(1.0, gt=0.0)
    """Standard deviation of the ``noise`` attack's Gaussian, per weight."""
    start_round: int = Field(1, ge=1)
    """First round in which malicious devices attack (before it they are honest)."""

    @field_validator("kind", mode="before")
    @classmethod
    def _nan_is_a_name(cls, v: object) -> object:
        """``--set attack.kind=nan`` parses as the TOML float nan: it means the kind."""
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    @model_validator(mode="after")
    def _sensible(self) -> AttackConfig:
        if self.kind != "none" and self.fraction == 0.0:
            raise ValueError(
                f"attack.kind = '{self.kind}' with attack.fraction = 0 attacks nobody: set "
                "attack.fraction (e.g. 0.2) or attack.kind = 'none'"
            )
        if self.scale == 0.0:
            raise ValueError(
                "attack.scale = 0 would erase the update rather than poison it: use a "
                "non-zero factor (e.g. 10), or attack.kind = 'nan' / 'noise'"
            )
        if self.kind == "inflate_count" and self.scale <= 1.0:
            raise ValueError(
                f"attack.kind = 'inflate_count' claims attack.scale times the examples, "
                f"but attack.scale = {self.scale:g} does not inflate: set it above 1"
            )
        return self

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def malicious(self, seed: int, num_devices: int) -> frozenset[int]:
        """The malicious devices of a population of ``num_devices`` (ids 0..n-1)."""
        if not self.active:
            return frozenset()
        return malicious_devices(seed, self.fraction, num_devices)

    def attacks(self, seed: int, num_devices: int, round_: int, device: int) -> bool:
        """Whether ``device`` attacks in ``round_``."""
        return (
            self.active
            and round_ >= self.start_round
            and device in self.malicious(seed, num_devices)
        )


@lru_cache(maxsize=8)
def malicious_devices(seed: int, fraction: float, num_devices: int) -> frozenset[int]:
    """``round(fraction * num_devices)`` devices, seeded by (seed, "attack") only: a fixed
    set for the whole run. Cached: every device of every message asks."""
    if num_devices <= 0 or fraction <= 0.0:
        return frozenset()
    chosen = sample_devices(seed, 0, range(num_devices), fraction, 0, purpose="attack")
    return frozenset(chosen)


def robustness_checks(cfg: ExperimentConfig, pool: int) -> None:
    """Bulyan's cohort size, and the defences that need every single update.

    Called by ``ExperimentConfig``'s cross-checks with the training pool's size (the
    population minus held-out devices): a misfit stops before anything starts."""
    s, a, n = cfg.strategy, cfg.attack, cfg.partition.num_devices
    if a.active and not a.malicious(cfg.seed, n):
        raise ValueError(
            f"attack.fraction = {a.fraction:g} of partition.num_devices = {n} is no device: "
            f"raise attack.fraction to at least {1 / n:.3g}"
        )
    if s.name == "bulyan":
        need = 4 * s.num_malicious + 3
        k = s.devices_per_round or min(
            pool, max(s.min_train_devices, round(s.fraction_train * pool))
        )
        if k < need:
            key = "strategy.devices_per_round" if s.devices_per_round else "strategy.fraction_train"
            raise ValueError(
                f"strategy.name = 'bulyan' with strategy.num_malicious = {s.num_malicious} "
                f"needs at least 4 * num_malicious + 3 = {need} updates per round, but a "
                f"round selects {k} devices: raise {key} (or add devices) or lower "
                "strategy.num_malicious"
            )
    if cfg.simulation.preaggregate and s.clip_norm > 0:
        raise ValueError(
            "strategy.clip_norm bounds each device's update, but simulation.preaggregate "
            "= true sums them on the workers first: set simulation.preaggregate = false"
        )
    if cfg.simulation.preaggregate and cfg.attack.kind == "inflate_count":
        raise ValueError(
            "attack.kind = 'inflate_count' is rejected per device by the server, but "
            "simulation.preaggregate = true would reject the inflater's whole cohort: set "
            "simulation.preaggregate = false"
        )
