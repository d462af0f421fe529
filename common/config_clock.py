"""``[clock]``: device profiles, availability and the virtual clock (FedScale's idea).

Why a virtual clock: the host's wall clock says how fast *this machine* simulates,
not how long a federation of phones would take. Each device gets a profile (compute
speed, down/up bandwidth, when it is online); a round lasts as long as its devices
would, on their hardware, and the run reports time-to-accuracy in virtual hours.

The default numbers are phone-class and sourced in ``configs/cross_device_sync.toml``.
``mode = "off"`` (the default) changes nothing: the clock only adds columns.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ClockMode = Literal["off", "sync", "async"]
AvailabilityModel = Literal["always", "bernoulli", "diurnal", "trace"]


class ClockConfig(BaseModel):
    """Profiles, availability, synchronous deadlines/over-commitment and FedBuff."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: ClockMode = "off"
    """``off``: no clock (today's runs); ``sync``: rounds on a virtual clock with
    over-commitment and an optional deadline; ``async``: buffered asynchronous
    aggregation (FedBuff) in virtual-time order."""
    profiles_file: str = ""
    """CSV or JSON with each device's speed, bandwidths and (for ``trace``) online
    intervals; replaces the sampled profiles. Empty: sample them from (seed, device)."""
    speed_median: float = Field(40.0, gt=0.0)
    """Training samples per second of the median device (lognormal)."""
    speed_sigma: float = Field(0.8, ge=0.0)
    """Lognormal sigma of the speed (0: every device equally fast)."""
    down_mbps_median: float = Field(20.0, gt=0.0)
    down_mbps_sigma: float = Field(0.9, ge=0.0)
    up_mbps_median: float = Field(5.0, gt=0.0)
    up_mbps_sigma: float = Field(0.9, ge=0.0)
    availability: AvailabilityModel = "always"
    online_probability: float = Field(0.5, gt=0.0, le=1.0)
    """``bernoulli``: chance a device is online in each period."""
    bernoulli_period_s: float = Field(900.0, gt=0.0)
    """``bernoulli``: length of the periods a device is on or off for."""
    diurnal_start_h: float = Field(22.0, ge=0.0, lt=24.0)
    """``diurnal``: local hour the daily window opens (e.g. on the charger at night)."""
    diurnal_window_h: float = Field(8.0, gt=0.0, le=24.0)
    diurnal_jitter_h: float = Field(1.0, ge=0.0)
    """``diurnal``: per-device normal jitter of the window's start."""
    diurnal_spread_h: float = Field(24.0, ge=0.0, le=24.0)
    """``diurnal``: devices' local-time offsets are uniform over this many hours
    (24: a world-wide population; 0: one time zone)."""
    start_hour_utc: float = Field(0.0, ge=0.0, lt=24.0)
    """Virtual time 0 is this hour of the day (UTC)."""
    overcommit: float = Field(1.3, ge=1.0)
    """``sync``: select ceil(overcommit x K) online devices, keep the first K results
    (Bonawitz et al. 2019 select 130%)."""
    deadline_s: float = Field(0.0, ge=0.0)
    """``sync``: results after this many virtual seconds are discarded (0: no deadline);
    ``async``: a device that needs longer is dropped."""
    wait_s: float = Field(300.0, gt=0.0)
    """When too few devices are online, the clock advances by this and looks again."""
    max_wait_h: float = Field(48.0, gt=0.0)
    """Give up (run fails) after waiting this long for enough online devices."""
    concurrency: int = Field(100, ge=1)
    """``async``: C, devices training at once."""
    buffer_size: int = Field(10, ge=1)
    """``async``: K, arrivals per aggregation."""
    staleness_exponent: float = Field(0.5, ge=0.0)
    """``async``: an update ``s`` versions stale is weighted 1/(1+s)^exponent (0.5 is
    FedBuff's 1/sqrt(1+s); 0 ignores staleness)."""
    target_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    """Time-to-accuracy target for the global model's test accuracy (0: not reported)."""
    target_personal_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    """Time-to-accuracy target for the devices' personalized accuracy (0: not reported)."""

    @model_validator(mode="after")
    def _consistent(self) -> ClockConfig:
        if self.mode == "async" and self.buffer_size > self.concurrency:
            raise ValueError(
                f"clock.buffer_size = {self.buffer_size} is more than clock.concurrency = "
                f"{self.concurrency}: FedBuff aggregates every K arrivals out of C devices "
                "in flight, so K <= C; lower clock.buffer_size or raise clock.concurrency"
            )
        if self.availability == "trace" and not self.profiles_file:
            raise ValueError(
                "clock.availability = 'trace' reads each device's online intervals from "
                "clock.profiles_file: set clock.profiles_file (CSV or JSON)"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "off"
