"""The run folder: one place for every file a run reads or writes.

Why a module: the CLI prepares a run folder before the SuperLink starts, and the
ServerApp prepares one itself when a Flower user calls ``flwr run .`` directly;
both must write the same files the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.atomic import atomic_write_text
from common.config import ExperimentConfig, dump_config
from common.data import (
    build_partition,
    load_dataset,
    open_source,
    partition_stats,
    save_partition,
)
from common.data.paths import resolve_data_path
from common.seeding import numpy_rng

CONFIG_FILE = "config.toml"
PARTITION_FILE = "partition.npz"
PARTITION_STATS_FILE = "partition.json"
METRICS_FILE = "metrics.jsonl"
TIMINGS_FILE = "timings.jsonl"
SUMMARY_FILE = "summary.json"
FAILURE_FILE = "failure.json"
STATE_DIR = "devices"
MODEL_FILE = "final_model.safetensors"
MANIFEST_FILE = "final_model.json"
PLOT_FILE = "accuracy.png"
LOG_DIR = "logs"
REGISTRY_DIR = "registry"
"""Every published global version (``server.registry``): what ``hybridfl serve`` serves."""
DEVICES_FILE = "devices.jsonl"
"""Per-device results of the latest evaluation, one JSON line per device."""
COLD_START_FILE = "cold_start.jsonl"
"""First-join devices: the served model's accuracy on their own test split."""
PROFILES_FILE = "profiles.csv"
"""Each device's virtual-clock profile (speed, bandwidths, availability), one row each."""
ATTACK_FILE = "attack.json"
"""Only under ``[attack]``: the kind, its settings, and which devices are malicious."""
FLWR_HOME_DIR = "flwr_home"
"""The run's own ``FLWR_HOME`` (Flower config, SuperLink database, FABs)."""
CHECKPOINT_DIR = "checkpoint"
"""Per-round checkpoint (``server.checkpoint``): what ``hybridfl simulate --resume`` reads."""
RAY_DIR = "ray"
"""The run's Ray temp folder (or a symlink to a short one, see ``runner.ray_tmpdir``)."""


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path) -> dict[str, object]:
    """Write the resolved config and the partition; return the partition stats.

    A relative ``data.path`` is resolved here, once (under ``data.root``,
    ``$HYBRIDFL_DATA`` or the current folder): the SuperLink, the ServerApp and the
    Ray workers all run elsewhere, maybe with another environment.
    """
    cfg = resolved(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    if cfg.attack.active:
        write_attack_record(cfg, run_dir)
    if cfg.data.dataset == "synthetic":
        stats = synthetic_stats(cfg)
        atomic_write_text(run_dir / PARTITION_STATS_FILE, json.dumps(stats, indent=1) + "\n")
        return stats
    dataset = load_dataset(cfg.data)
    partition = build_partition(dataset, cfg)
    save_partition(partition, run_dir / PARTITION_FILE)
    stats = partition_stats(dataset, partition)
    atomic_write_text(run_dir / PARTITION_STATS_FILE, json.dumps(stats, indent=1) + "\n")
    return stats


def resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` as a run folder stores it: a relative ``data.path`` made absolute (under
    ``data.root``, ``$HYBRIDFL_DATA`` or the current folder)."""
    if cfg.data.path and not Path(cfg.data.path).is_absolute():
        data = cfg.data.model_copy(update={"path": str(resolve_data_path(cfg.data))})
        cfg = cfg.model_copy(update={"data": data})
    return cfg


def config_differences(run: ExperimentConfig, given: ExperimentConfig) -> list[str]:
    """``key: run X, given Y`` for every dotted key whose value differs (for ``--resume``)."""

    def flat(d: dict[str, object], prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(run.model_dump()), flat(resolved(given).model_dump())
    return [
        f"{k}: run {a.get(k)!r}, given {b.get(k)!r}" for k in sorted(a | b) if a.get(k) != b.get(k)
    ]


def write_attack_record(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Which devices the devices themselves will decide are malicious (same function)."""
    devices = sorted(cfg.attack.malicious(cfg.seed, cfg.partition.num_devices))
    record = {**cfg.attack.model_dump(), "num_malicious": len(devices), "devices": devices}
    atomic_write_text(run_dir / ATTACK_FILE, json.dumps(record, indent=1) + "\n")


def synthetic_stats(cfg: ExperimentConfig) -> dict[str, object]:
    """Population summary of a synthetic run (no per-device list: it may be millions)."""
    source = open_source(cfg, None)
    sizes = source.train_sizes()
    # Label variety from a seeded sample of devices (all of them would cost O(population)).
    probe = numpy_rng(cfg.seed, "eval-sample", 0, 1).choice(
        sizes.size, size=min(100, sizes.size), replace=False
    )
    classes = [np.unique(source.device(int(d))[1]).size for d in probe]
    return {
        "method": "synthetic",
        "summary": {
            "num_devices": int(sizes.size),
            "min_train": int(sizes.min()),
            "median_train": float(np.median(sizes)),
            "max_train": int(sizes.max()),
            "total_train": int(sizes.sum()),
            "mean_classes_per_device": float(np.mean(classes)),
            "classes_measured_on_devices": int(probe.size),
        },
    }


def read_jsonl(path: Path) -> list[dict[str, object]]:
    """Read a JSON-lines file, ignoring a last line still being written."""
    rows: list[dict[str, object]] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def append_jsonl(path: Path, row: dict[str, object]) -> None:
    """Append one line and flush it to disk (readers tail this file live)."""
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
