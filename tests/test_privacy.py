"""Devices send weights and scalar metrics only: inspect the ClientApp's real replies.

The ClientApp is called exactly as Flower calls it (a Message and a Context), on a
real prepared run folder; the reply is serialised with Flower's own protobuf
codec and searched for the device's samples and labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from client.app import app
from client.runtime import device_data, device_env
from common.config import load_config
from common.data import load_dataset
from common.models import ModelSpec, build_model
from common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, RoundInstructions
from common.records import to_record
from common.rundir import STATE_DIR, prepare_run_dir
from common.weights import model_to_arrays


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """What Flower's runtime sets in a ClientApp process before calling the app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("privacy")
    cfg = load_config(None, ["partition.num_devices=4", "model.name=mlp2nn"])
    prepare_run_dir(cfg, d)
    return d


def _call(run_dir: Path, algorithm: str, kind: str, device: int) -> tuple[Message, dict]:
    cfg = load_config(run_dir / "config.toml")
    ds = load_dataset(cfg.data)
    spec = ModelSpec(name=cfg.model.name, input_shape=ds.input_shape, num_classes=ds.num_classes)
    arrays = model_to_arrays(build_model(spec, seed=0))
    instr = RoundInstructions(
        round=1, seed=0, algorithm=algorithm, model_spec=spec.model_dump_json()
    )
    config = ConfigRecord(instr.to_flat())
    content = RecordDict({ARRAYS_KEY: to_record(arrays), CONFIG_KEY: config})
    msg = Message(content, dst_node_id=100 + device, message_type=kind)
    ctx = Context(
        1, 100 + device, {"partition-id": device}, RecordDict(), {"run-dir": str(run_dir)}
    )
    return app(msg, ctx), arrays


@pytest.mark.parametrize("algorithm", ["fedavg", "fedper"])
def test_train_reply_holds_only_weights_and_scalars(run_dir: Path, algorithm: str) -> None:
    device = {"fedavg": 1, "fedper": 3}[algorithm]  # each device trains once per round
    reply, global_arrays = _call(run_dir, algorithm, "train", device=device)
    assert not reply.has_error()
    c = reply.content
    assert set(c.array_records) == {ARRAYS_KEY}
    assert set(c.metric_records) == {METRICS_KEY}
    assert not c.config_records
    sent = c[ARRAYS_KEY]
    for name, arr in sent.items():
        assert name in global_arrays
        assert tuple(arr.shape) == global_arrays[name].shape
    if algorithm == "fedper":
        assert not any(k.startswith("head.") for k in sent)
    for key, value in c[METRICS_KEY].items():
        assert isinstance(value, (int, float)), key

    ctx = Context(1, 1, {"partition-id": device}, RecordDict(), {"run-dir": str(run_dir)})
    data = device_data(device_env(ctx))
    wire = recorddict_to_proto(c).SerializeToString()
    for i in range(min(5, data.x_train.shape[0])):
        sample = data.x_train[i].numpy().tobytes()
        assert sample not in wire, "a training sample appears in the reply"
    labels = data.y_train.numpy()
    for dtype in (np.int64, np.int32, np.uint8):
        assert labels.astype(dtype).tobytes() not in wire, "the label vector appears in the reply"
    # The personal state stays on the device's disk.
    assert (run_dir / STATE_DIR / f"device-{device:06d}.safetensors").is_file()


def test_a_late_train_message_never_overwrites_newer_state(run_dir: Path) -> None:
    reply, _ = _call(run_dir, "fedavg", "train", device=0)
    assert not reply.has_error()
    state_file = run_dir / STATE_DIR / "device-000000.safetensors"
    before = state_file.read_bytes()
    with pytest.raises(Exception, match="already trained in round 1"):
        _call(run_dir, "fedavg", "train", device=0)
    assert state_file.read_bytes() == before


def test_evaluate_and_hello_replies_are_scalars(run_dir: Path) -> None:
    for kind in ("evaluate", "query.hello"):
        reply, _ = _call(run_dir, "fedavg", kind, device=2)
        assert not reply.has_error()
        assert not reply.content.array_records and not reply.content.config_records
        for value in reply.content[METRICS_KEY].values():
            assert isinstance(value, (int, float))
