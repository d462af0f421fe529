"""Per-process resources of a device: its data, its state store, a model.

Why caches: in simulation one Ray worker process serves many devices, one
message at a time. Loading the dataset or building the model per message would
dominate the round time, so each process loads the dataset once (bounded caches,
keyed by what identifies them) and only slices out the device's rows per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context

from client.algorithms.loop import DeviceData
from client.state import PersonalStateStore
from common.config import ExperimentConfig, load_config
from common.data import Dataset, Partition, device_arrays, load_dataset, load_partition
from common.models import ModelSpec, SplitModel, build_model
from common.rundir import CONFIG_FILE, PARTITION_FILE, STATE_DIR

RUN_DIR_KEY = "run-dir"
DATA_KEY = "data"
STATE_DIR_KEY = "state-dir"
MODEL_SERVER_KEY = "model-server"
DEVICE_FILE_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""Arrays of a device data file (``hybridfl device-data``): one device's split only."""


class DeviceSetupError(RuntimeError):
    """The node cannot act as a device (no id, no data, no run folder)."""


@dataclass(frozen=True)
class DeviceEnv:
    """Where one device's data and state live.

    ``run_dir`` alone is the one-machine case (data and ``devices/`` state in the run
    folder, as in simulation). A real device names its own ``data`` (a device data
    file or a folder with ``config.toml`` + ``partition.npz``) and ``state_dir``.
    """

    device_id: int
    run_dir: Path | None
    data: Path | None = None
    state_dir: Path | None = None
    model_server: str = ""
    """Model server URL for the cold-start fetch (deployment only; empty: none)."""


def device_env(context: Context, server_run_dir: str = "") -> DeviceEnv:
    """Map this node to its device id, its data and its personal-state folder.

    In simulation Flower gives each node ``partition-id``; a real SuperNode is
    started with ``device-id`` in its node config, plus ``run-dir`` (one machine) or
    ``data`` and ``state-dir`` (its own disk). Node config wins over run config,
    which wins over ``server_run_dir`` (the folder the ServerApp announced: what a
    bare ``flwr run .`` in simulation has to go on).
    """
    nc = context.node_config
    raw_id = nc.get("device-id", nc.get("partition-id"))
    if raw_id is None:
        raise DeviceSetupError(
            "node_config has neither 'device-id' nor 'partition-id': start the "
            "SuperNode with --node-config 'device-id=K'"
        )
    run_dir = str(nc.get(RUN_DIR_KEY) or context.run_config.get(RUN_DIR_KEY, "") or server_run_dir)
    data = str(nc.get(DATA_KEY, "") or "")
    state = str(nc.get(STATE_DIR_KEY, "") or "")
    if not run_dir and not (data and state):
        raise DeviceSetupError(
            "no run folder: the run config key 'run-dir' is empty. Start runs with "
            "`hybridfl simulate`, or pass --run-config 'run-dir=\"/abs/path\"' to flwr run; "
            "a real device needs node config 'run-dir' or both 'data' and 'state-dir'"
        )
    return DeviceEnv(
        int(raw_id),
        Path(run_dir) if run_dir else None,
        Path(data) if data else None,
        Path(state) if state else None,
        str(nc.get(MODEL_SERVER_KEY, "") or ""),
    )


@lru_cache(maxsize=2)
def _source(run_dir: Path) -> tuple[ExperimentConfig, Dataset, Partition]:
    cfg = load_config(run_dir / CONFIG_FILE)
    dataset = load_dataset(cfg.data)
    partition = load_partition(run_dir / PARTITION_FILE)
    return cfg, dataset, partition


@lru_cache(maxsize=2)
def _device_file(path: Path) -> tuple[np.ndarray, ...]:
    """A device data file: plain arrays (``allow_pickle=False``: never unpickle)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in DEVICE_FILE_KEYS if k not in z.files]
        if missing:
            raise DeviceSetupError(f"device data file {path} lacks arrays {missing}")
        return tuple(z[k] for k in DEVICE_FILE_KEYS)


def device_data(env: DeviceEnv) -> DeviceData:
    """The device's own train/test split (sliced from the cached dataset)."""
    if env.data is not None and env.data.is_file():
        x_tr, y_tr, x_te, y_te = _device_file(env.data)
    else:
        source = env.data if env.data is not None else env.run_dir
        assert source is not None  # device_env guarantees one of them
        _, dataset, partition = _source(source)
        if not 0 <= env.device_id < partition.num_devices:
            raise DeviceSetupError(
                f"device id {env.device_id} is outside the partition "
                f"(0..{partition.num_devices - 1}): check partition.num_devices"
            )
        x_tr, y_tr, x_te, y_te = device_arrays(dataset, partition, env.device_id)
    return DeviceData(
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr)).long(),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te)).long(),
    )


@lru_cache(maxsize=4)
def state_store(root: Path) -> PersonalStateStore:
    return PersonalStateStore(root)


def device_store(env: DeviceEnv) -> PersonalStateStore:
    """``state-dir`` when the node names one (its own disk), else the run folder's."""
    if env.state_dir is not None:
        return state_store(env.state_dir)
    assert env.run_dir is not None  # device_env guarantees it
    return state_store(env.run_dir / STATE_DIR)


@lru_cache(maxsize=2)
def model_for(spec_json: str) -> SplitModel:
    """One model object per architecture per process; weights are loaded per call."""
    return build_model(ModelSpec.model_validate_json(spec_json))


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
