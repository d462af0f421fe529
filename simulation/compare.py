"""What tells compared runs apart, and gains measured against a reference run.

Why apart from ``report.py``: the report lays out tables and plots; this module
answers two questions about runs as data. Which config keys differ (two runs must
not be told apart by folder name only)? And how much better are a run's
personalized models than a *reference* run's served model on the same devices (the
PFLlib-style comparison: under FedPer/FedRep a run's own global head is never
trained, so a gain against it flatters)?
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.data import DataError, load_partition
from common.rundir import PARTITION_FILE

if TYPE_CHECKING:
    from simulation.report import Run

BOOKKEEPING_KEYS = frozenset({"name", "output.root", "output.plot"})
"""Keys that never change what a run measures: not listed as differences."""


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """``{"client": {"lr": 0.1}}`` -> ``{"client.lr": 0.1}`` (sections one level deep)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def config_differences(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keys whose values are not the same in every config, each with one value per run
    (None where a run's config lacks the key), sorted by key."""
    flats = [flat_config(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - BOOKKEEPING_KEYS)
    diffs: dict[str, list[Any]] = {}
    for key in keys:
        values = [f.get(key) for f in flats]
        if any(v != values[0] for v in values[1:]):
            diffs[key] = values
    return diffs


def describe_partition(config: dict[str, Any]) -> str:
    """The split in a few words, with the parameter that shapes it."""
    p = config.get("partition") or {}
    method = str(p.get("method", "?"))
    detail = {
        "dirichlet": f"alpha={p.get('alpha')}",
        "pathological": f"{p.get('classes_per_device')} classes/device",
        "shards": f"{p.get('shards_per_device')} shards/device",
    }.get(method)
    assignment = p.get("class_assignment")
    if method == "pathological" and assignment:
        detail = f"{detail}, {assignment}"
    n = p.get("num_devices")
    return f"{method}" + (f" ({detail})" if detail else "") + (f", {n} devices" if n else "")


def describe_data(config: dict[str, Any]) -> str:
    d = config.get("data") or {}
    dataset = str(d.get("dataset", "?"))
    path = str(d.get("path") or "")
    return f"{dataset} ({Path(path).name})" if path else dataset


def describe_model(config: dict[str, Any]) -> str:
    m = config.get("model") or {}
    name = str(m.get("name", "?"))
    if name == "mlp2nn":
        name += f" (hidden {m.get('hidden')})"
    if m.get("batch_norm"):
        name += " + batch norm"
    return name


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return '""' if value == "" else str(value).replace("|", "\\|")


def runs_markdown(runs: list[Run]) -> str:
    """A table naming each run's data, partition, model and seed, then the config keys
    whose values differ across the runs."""
    rows = [
        [
            r.name,
            describe_data(r.config),
            describe_partition(r.config),
            describe_model(r.config),
            _cell(r.config.get("seed")),
        ]
        for r in runs
    ]
    parts = ["### The runs", _table(["run", "data", "partition", "model", "seed"], rows)]
    if len(runs) > 1:
        diffs = config_differences([r.config for r in runs])
        if diffs:
            body = [[f"`{k}`", *(_cell(v) for v in vals)] for k, vals in diffs.items()]
            parts += [
                "### Config keys that differ",
                _table(["key", *(r.name for r in runs)], body),
            ]
        else:
            parts.append("Every config key has the same value in all runs (apart from names).")
    return "\n\n".join(parts)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


@dataclass(frozen=True)
class BaselineGain:
    """A run's personalized accuracy minus a reference run's served (global) accuracy."""

    gain: float | None
    """Sample-weighted over the common devices; None when not comparable (see reason)."""
    num_devices: int
    reason: str = ""


_SAME_DATA_KEYS = ("data.dataset", "data.path", "data.test_fraction", "seed")


def same_devices(run: Run, baseline: Run) -> str:
    """Empty when the two runs split the same data the same way, else why not.

    Device ids mean the same samples only then: the partition files must hold the
    same indices (runs without one, synthetic, must agree on data, partition and seed).
    """
    a, b = flat_config(run.config), flat_config(baseline.config)
    keys = [k for k in _SAME_DATA_KEYS if k != "seed"]
    pa, pb = run.path / PARTITION_FILE, baseline.path / PARTITION_FILE
    if not (pa.is_file() and pb.is_file()):
        split = sorted(k for k in a.keys() | b.keys() if k.startswith(("data.", "partition.")))
        keys = [*_SAME_DATA_KEYS, *split]
    differ = [k for k in dict.fromkeys(keys) if a.get(k) != b.get(k)]
    if differ:
        return "different data: " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ)
    if pa.is_file() and pb.is_file():
        try:
            x, y = load_partition(pa), load_partition(pb)
        except DataError as err:
            return f"partition unreadable ({err})"
        same = (
            x.test_source == y.test_source
            and len(x.train_idx) == len(y.train_idx)
            and all(np.array_equal(i, j) for i, j in zip(x.train_idx, y.train_idx, strict=True))
            and all(np.array_equal(i, j) for i, j in zip(x.test_idx, y.test_idx, strict=True))
        )
        if not same:
            return "different partition (another split, seed or number of devices)"
    return ""


def baseline_gain(run: Run, baseline: Run) -> BaselineGain:
    """``run``'s personalized models vs ``baseline``'s served model on the same devices,
    both from their last evaluation (``devices.jsonl``), weighted by test samples."""
    why = same_devices(run, baseline)
    if why:
        return BaselineGain(None, 0, why)
    served = {
        int(d["device"]): float(d["global_acc"])
        for d in baseline.devices
        if d.get("global_acc") is not None
    }
    pairs = [
        (float(d["personal_acc"]), served[int(d["device"])], float(d.get("num_test") or 1))
        for d in run.devices
        if d.get("role") == "train"
        and d.get("personal_acc") is not None
        and int(d["device"]) in served
    ]
    if not pairs:
        return BaselineGain(None, 0, "no device evaluated in both runs (devices.jsonl)")
    weight = sum(w for _, _, w in pairs)
    gain = sum((p - g) * w for p, g, w in pairs) / weight
    return BaselineGain(gain if math.isfinite(gain) else None, len(pairs))


SPREAD_COLUMNS = (
    ("global_test_acc", "global test"),
    ("device_global_acc", "devices: global"),
    ("device_personal_acc", "personalized"),
    ("device_finetuned_acc", "fine-tuned"),
    ("gain", "gain"),
)


def seed_groups(runs: list[Run]) -> list[list[int]]:
    """Indices of runs that differ only in ``seed`` (and bookkeeping), two or more with
    distinct seeds per group, in the order the runs were given."""
    groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, run in enumerate(runs):
        flat = flat_config(run.config)
        ignored = BOOKKEEPING_KEYS | {"seed"}
        key = tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in ignored))
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        seeds = {runs[i].config.get("seed") for i in members}
        if len(members) > 1 and len(seeds) == len(members):
            out.append(members)
    return out


def _mean_std(values: list[float], points: bool) -> str:
    """Accuracies as ``93.1% ± 0.4``, gains as ``+5.2 pp ± 0.4`` (std in points)."""
    mean = 100 * float(np.mean(values))
    std = 100 * float(np.std(values, ddof=1))
    return f"{mean:+.1f} pp ± {std:.1f}" if points else f"{mean:.1f}% ± {std:.1f}"


def spread_markdown(runs: list[Run], rows: list[dict[str, Any]]) -> str:
    """Mean ± sample std over seeds for each group of runs that differ only in seed
    (empty when there is none)."""
    groups = seed_groups(runs)
    if not groups:
        return ""
    columns = list(SPREAD_COLUMNS)
    if any(r.get("baseline_gain") is not None for r in rows):
        base = next(r["baseline"] for r in rows if r.get("baseline") is not None)
        columns.append(("baseline_gain", f"gain vs {base.name}'s global"))
    body = []
    for members in groups:
        label = re.sub(r"-s\d+$", "", runs[members[0]].name)
        seeds = ", ".join(str(runs[i].config.get("seed")) for i in members)
        cells = [label, seeds]
        for key, _ in columns:
            vals = [_value(rows[i].get(key)) for i in members]
            present = [v for v in vals if v is not None]
            ok = len(present) == len(vals)
            cells.append(_mean_std(present, "gain" in key) if ok else "-")
        body.append(cells)
    header = ["runs", "seeds", *(title for _, title in columns)]
    intro = (
        "### Mean ± std over seeds (runs whose configs differ only in seed)\n\n"
        "Last evaluated round of each run; std is the sample standard deviation across "
        "seeds, in points; a cell is `-` when a run lacks the number."
    )
    return "\n\n".join([intro, _table(header, body)])


def _value(x: Any) -> float | None:
    if isinstance(x, BaselineGain):
        return x.gain
    return None if x is None or not math.isfinite(float(x)) else float(x)
