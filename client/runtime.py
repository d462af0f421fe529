"""Per-process resources of a worker: device data, state stores, one resident model.

Why caches: in simulation one Ray worker process trains many devices, several per
message. Loading the dataset or building the model per device would dominate the
round time, so each process loads the data source once (bounded caches, keyed by
what identifies them) and only slices out (or generates) a device's rows per call.
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
from common.config import load_config
from common.data import DeviceSource, open_source
from common.models import ModelSpec, SplitModel, build_model
from common.rundir import CONFIG_FILE, PARTITION_FILE, STATE_DIR

RUN_DIR_KEY = "run-dir"
DATA_KEY = "data"
STATE_DIR_KEY = "state-dir"
MODEL_SERVER_KEY = "model-server"
MODEL_SERVER_CA_KEY = "model-server-ca"
MODEL_SERVER_KEY_KEY = "model-server-key"
DEVICE_FILE_KEYS = ("x_train", "y_train", "x_test", "y_test")
"""Arrays of a device data file (``hybridfl device-data``): one device's split only."""


class DeviceSetupError(RuntimeError):
    """The node cannot act as a device (no id, no data, no run folder)."""


@dataclass(frozen=True)
class DeviceEnv:
    """Where the devices a node runs keep their data and state.

    A simulation node is an execution slot (``device_id`` None): each message names
    the devices it runs, all with data and ``devices/`` state in the run folder. A real
    device is one device: its node config names its ``device-id`` and either the run
    folder (one machine) or its own ``data`` file/folder and ``state_dir``.
    """

    device_id: int | None
    run_dir: Path | None
    data: Path | None = None
    state_dir: Path | None = None
    model_server: str = ""
    """Model server URL for the cold-start fetch (deployment only; empty: none)."""
    model_server_ca: Path | None = None
    """CA that signed the model server's TLS certificate (None: the system's CAs)."""
    model_server_key: Path | None = None
    """Publisher's Ed25519 public key: served manifests must be signed by it (None: no check)."""

    def cohort(self, requested: list[int]) -> list[int]:
        """The devices to run for a message that names ``requested``."""
        if self.device_id is None:
            if not requested:
                raise DeviceSetupError(
                    "a simulation message must name its devices; the server runs an "
                    "older hybridfl than this worker"
                )
            return list(requested)
        if requested and requested != [self.device_id]:
            raise DeviceSetupError(
                f"this node is device {self.device_id} but the message is for devices "
                f"{requested[:5]}: check the SuperNode's --node-config device-id"
            )
        return [self.device_id]


def device_env(context: Context, server_run_dir: str = "") -> DeviceEnv:
    """What this node is: a simulation slot or one real device, and where its files are.

    A real SuperNode is started with ``device-id`` in its node config, plus ``run-dir``
    (one machine) or ``data`` and ``state-dir`` (its own disk); a simulation node has
    only Flower's ``partition-id`` (its slot number). Node config wins over run config,
    which wins over ``server_run_dir`` (the folder the ServerApp announced: what a bare
    ``flwr run .`` in simulation has to go on).
    """
    nc = context.node_config
    raw_id = nc.get("device-id")
    if raw_id is None and nc.get("partition-id") is None:
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
        None if raw_id is None else int(raw_id),
        Path(run_dir) if run_dir else None,
        Path(data) if data else None,
        Path(state) if state else None,
        str(nc.get(MODEL_SERVER_KEY, "") or ""),
        Path(str(ca)) if (ca := nc.get(MODEL_SERVER_CA_KEY)) else None,
        Path(str(pub)) if (pub := nc.get(MODEL_SERVER_KEY_KEY)) else None,
    )


@lru_cache(maxsize=2)
def _source(folder: Path) -> DeviceSource:
    """The run's device data, loaded once per process (a worker serves many devices)."""
    cfg = load_config(folder / CONFIG_FILE)
    return open_source(cfg, folder / PARTITION_FILE)


@lru_cache(maxsize=2)
def _device_file(path: Path) -> tuple[np.ndarray, ...]:
    """A device data file: plain arrays (``allow_pickle=False``: never unpickle)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in DEVICE_FILE_KEYS if k not in z.files]
        if missing:
            raise DeviceSetupError(f"device data file {path} lacks arrays {missing}")
        return tuple(z[k] for k in DEVICE_FILE_KEYS)


def device_data(env: DeviceEnv, device_id: int) -> DeviceData:
    """One device's own train/test split (sliced from the cached source, or its file)."""
    if env.data is not None and env.data.is_file():
        x_tr, y_tr, x_te, y_te = _device_file(env.data)
    else:
        folder = env.data if env.data is not None else env.run_dir
        assert folder is not None  # device_env guarantees one of them
        x_tr, y_tr, x_te, y_te = _source(folder).device(device_id)
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
    """One resident model per architecture per process; every device's weights are
    copied into it in place (``load_arrays``), so no device pays for a model build."""
    return build_model(ModelSpec.model_validate_json(spec_json))


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
