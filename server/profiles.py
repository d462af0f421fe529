"""Device profiles for the virtual clock: how fast each device trains and talks.

Why sampled per attribute stream in device order: device ``i``'s speed is the
``i``-th draw of a stream seeded by (seed, "profile-speed"), so it depends on the
seed and the id only, never on the population's size, and a million profiles are
one vectorised draw. A user's file (CSV or JSON, never pickle) replaces the sampled
speeds and bandwidths, and gives ``trace`` availability its online intervals.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import atomic_write_text
from common.config_clock import ClockConfig
from common.seeding import numpy_rng

PROFILE_COLUMNS = ("device", "speed", "down_mbps", "up_mbps")
"""Required columns of a profile file; ``online`` (intervals) is optional."""


class ProfileFileError(ValueError):
    """A profile file that cannot be used: names the file, row and column."""


@dataclass
class Profiles:
    """Per-device arrays indexed by device id."""

    speed: np.ndarray
    """Training samples per second."""
    down_mbps: np.ndarray
    up_mbps: np.ndarray
    offset_h: np.ndarray
    """Local time minus UTC, in hours (diurnal availability)."""
    window_start_h: np.ndarray
    """Local hour each device's daily online window opens (diurnal availability)."""
    intervals: list[np.ndarray] | None = None
    """``trace`` availability: per device an (m, 2) array of [on, off) virtual seconds."""
    source: str = "sampled"

    @property
    def size(self) -> int:
        return int(self.speed.size)


def _lognormal(seed: int, purpose: str, n: int, median: float, sigma: float) -> np.ndarray:
    z = numpy_rng(seed, purpose).standard_normal(n)
    return median * np.exp(sigma * z)


def _diurnal(clock: ClockConfig, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    offset = numpy_rng(seed, "profile-offset").random(n) * clock.diurnal_spread_h
    jitter = numpy_rng(seed, "profile-jitter").standard_normal(n) * clock.diurnal_jitter_h
    return offset, np.mod(clock.diurnal_start_h + jitter, 24.0)


def sample_profiles(clock: ClockConfig, seed: int, num_devices: int) -> Profiles:
    """Lognormal speed and bandwidths (medians and sigmas from ``[clock]``)."""
    offset, start = _diurnal(clock, seed, num_devices)
    return Profiles(
        speed=_lognormal(seed, "profile-speed", num_devices, clock.speed_median, clock.speed_sigma),
        down_mbps=_lognormal(
            seed, "profile-down", num_devices, clock.down_mbps_median, clock.down_mbps_sigma
        ),
        up_mbps=_lognormal(
            seed, "profile-up", num_devices, clock.up_mbps_median, clock.up_mbps_sigma
        ),
        offset_h=offset,
        window_start_h=start,
    )


class ProfileRow(BaseModel):
    """One device's row of a user's profile file."""

    model_config = ConfigDict(extra="forbid")

    device: int = Field(ge=0)
    speed: float = Field(gt=0.0, allow_inf_nan=False)
    down_mbps: float = Field(gt=0.0, allow_inf_nan=False)
    up_mbps: float = Field(gt=0.0, allow_inf_nan=False)
    online: list[tuple[float, float]] = Field(default_factory=list)
    """[on, off) intervals in virtual seconds, increasing and not overlapping."""


def _parse_intervals(text: str) -> list[tuple[float, float]]:
    """``"0-3600;7200-10800"`` -> [(0, 3600), (7200, 10800)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        on, sep, off = part.partition("-")
        if not sep:
            raise ValueError(f"interval '{part}' is not 'on-off' (seconds, e.g. 0-3600)")
        out.append((float(on), float(off)))
    return out


def _raw_rows(path: Path) -> list[dict[str, object]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ProfileFileError(f"{path}: expected a JSON list of device objects")
        return data
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in PROFILE_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ProfileFileError(
            f"{path}: missing column(s) {missing}; a profile CSV has the header "
            f"{','.join(PROFILE_COLUMNS)}[,online]"
        )
    rows: list[dict[str, object]] = []
    for i, raw in enumerate(reader, start=2):
        row: dict[str, object] = {k: v for k, v in raw.items() if k in PROFILE_COLUMNS}
        try:
            row["online"] = _parse_intervals(raw.get("online") or "")
        except ValueError as err:
            raise ProfileFileError(f"{path}: line {i}, column 'online': {err}") from None
        rows.append(row)
    return rows


def _check_intervals(iv: list[tuple[float, float]]) -> str | None:
    last = -math.inf
    for on, off in iv:
        if not (math.isfinite(on) and math.isfinite(off)) or on < 0 or off <= on:
            return f"interval ({on:g}, {off:g}) must have 0 <= on < off"
        if on < last:
            return f"interval ({on:g}, {off:g}) overlaps or precedes the one before it"
        last = off
    return None


def load_profiles(path: Path, clock: ClockConfig, seed: int, num_devices: int) -> Profiles:
    """A user's profile file: one row per device 0..num_devices-1 (CSV line or JSON index
    named in every error, with the column)."""
    if not path.is_file():
        raise ProfileFileError(
            f"clock.profiles_file = '{path}' is not a file: give a CSV or JSON profile "
            "file, or leave clock.profiles_file empty to sample profiles"
        )
    where = "line" if path.suffix.lower() != ".json" else "item"
    first = 2 if where == "line" else 0
    try:
        raw_rows = _raw_rows(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileFileError(f"{path}: not readable as CSV/JSON ({err})") from None
    rows: dict[int, ProfileRow] = {}
    for i, raw in enumerate(raw_rows, start=first):
        try:
            row = ProfileRow.model_validate(raw)
        except ValidationError as err:
            e = err.errors()[0]
            col = ".".join(str(p) for p in e["loc"]) or "?"
            raise ProfileFileError(
                f"{path}: {where} {i}, column '{col}': {e['msg']} (got {e.get('input')!r})"
            ) from None
        problem = _check_intervals(row.online)
        if problem:
            raise ProfileFileError(f"{path}: {where} {i}, column 'online': {problem}")
        if row.device in rows:
            raise ProfileFileError(f"{path}: {where} {i}, column 'device': {row.device} repeated")
        if row.device >= num_devices:
            raise ProfileFileError(
                f"{path}: {where} {i}, column 'device': {row.device} is not a device of this "
                f"run (partition.num_devices = {num_devices})"
            )
        rows[row.device] = row
    lacking = [d for d in range(num_devices) if d not in rows]
    if lacking:
        raise ProfileFileError(
            f"{path}: no row for device(s) {lacking[:5]}{' ...' if len(lacking) > 5 else ''}: "
            f"the file must profile every device 0..{num_devices - 1}"
        )
    ordered = [rows[d] for d in range(num_devices)]
    offset, start = _diurnal(clock, seed, num_devices)
    return Profiles(
        speed=np.array([r.speed for r in ordered]),
        down_mbps=np.array([r.down_mbps for r in ordered]),
        up_mbps=np.array([r.up_mbps for r in ordered]),
        offset_h=offset,
        window_start_h=start,
        intervals=[np.array(r.online, dtype=np.float64).reshape(-1, 2) for r in ordered],
        source=str(path),
    )


def profiles_for(clock: ClockConfig, seed: int, num_devices: int) -> Profiles:
    if clock.profiles_file:
        return load_profiles(Path(clock.profiles_file), clock, seed, num_devices)
    return sample_profiles(clock, seed, num_devices)


def write_profiles(p: Profiles, path: Path) -> None:
    """``profiles.csv``: the profile every device ran with (the same columns a user's file
    has, so a run's profiles can be edited and fed back through clock.profiles_file)."""
    ids = np.arange(p.size)
    with io.StringIO() as f:
        if p.intervals is None:
            f.write("device,speed,down_mbps,up_mbps,offset_h,window_start_h\n")
            table = np.column_stack(
                [ids, p.speed, p.down_mbps, p.up_mbps, p.offset_h, p.window_start_h]
            )
            np.savetxt(f, table, fmt=["%d", "%.6g", "%.6g", "%.6g", "%.4f", "%.4f"], delimiter=",")
        else:
            f.write("device,speed,down_mbps,up_mbps,online\n")
            for d in range(p.size):
                online = ";".join(f"{a:g}-{b:g}" for a, b in p.intervals[d])
                f.write(f"{d},{p.speed[d]:.6g},{p.down_mbps[d]:.6g},{p.up_mbps[d]:.6g},{online}\n")
        atomic_write_text(path, f.getvalue())
