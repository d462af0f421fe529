"""Devices send weights and scalar metrics only: inspect the ClientApp's real replies.

The ClientApp is called exactly as Flower calls it (a Message and a Context), on a
real prepared run folder; the reply (a cohort of one or several devices) is
serialised with Flower's own protobuf codec and searched for the devices' samples
and labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto

from client.app import app
from client.runtime import device_data, device_env
from common.config import load_config
from common.data import open_source
from common.models import ModelSpec, build_model
from common.protocol import ARRAYS_KEY, CONFIG_KEY, REPORT_KEY, CohortReply, task_for
from common.records import to_record
from common.rundir import PARTITION_FILE, STATE_DIR, prepare_run_dir
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


def _call(
    run_dir: Path, algorithm: str, kind: str, devices: list[int], node: dict | None = None
) -> tuple[Message, dict]:
    cfg = load_config(run_dir / "config.toml", [f"client.algorithm={algorithm}"])
    src = open_source(cfg, run_dir / PARTITION_FILE)
    spec = ModelSpec(name=cfg.model.name, input_shape=src.input_shape, num_classes=src.num_classes)
    arrays = model_to_arrays(build_model(spec, seed=0))
    task = task_for(cfg, 1, spec.model_dump_json(), str(run_dir), devices)
    content = RecordDict(
        {ARRAYS_KEY: to_record(arrays), CONFIG_KEY: ConfigRecord(task.to_record_fields())}
    )
    msg = Message(content, dst_node_id=100, message_type=kind)
    ctx = Context(1, 100, node or {"partition-id": 0}, RecordDict(), {"run-dir": str(run_dir)})
    return app(msg, ctx), arrays


def _assert_no_data(run_dir: Path, wire: bytes, device: int) -> None:
    ctx = Context(1, 1, {"partition-id": 0}, RecordDict(), {"run-dir": str(run_dir)})
    data = device_data(device_env(ctx), device)
    for i in range(min(5, data.x_train.shape[0])):
        sample = data.x_train[i].numpy().tobytes()
        assert sample not in wire, "a training sample appears in the reply"
    labels = data.y_train.numpy()
    for dtype in (np.int64, np.int32, np.uint8):
        assert labels.astype(dtype).tobytes() not in wire, "the label vector appears in the reply"


def _scalars_only(value: object) -> None:
    """A report holds numbers, booleans, None and short strings (failure reasons)."""
    if isinstance(value, dict):
        for v in value.values():
            _scalars_only(v)
    elif isinstance(value, list):
        for v in value:
            _scalars_only(v)
    else:
        assert value is None or isinstance(value, (int, float, bool, str)), value
        assert not isinstance(value, str) or len(value) < 400


@pytest.mark.parametrize(("algorithm", "devices"), [("fedavg", [1]), ("fedper", [2, 3])])
def test_train_reply_holds_only_weights_and_scalars(
    run_dir: Path, algorithm: str, devices: list[int]
) -> None:
    reply, global_arrays = _call(run_dir, algorithm, "train", devices)
    assert not reply.has_error()
    c = reply.content
    assert set(c.array_records) == {ARRAYS_KEY}
    assert set(c.config_records) == {REPORT_KEY} and not c.metric_records
    body = CohortReply.from_record_fields(c[REPORT_KEY])
    assert [r.device for r in body.train] == devices and not body.failures
    _scalars_only(json.loads(body.model_dump_json()))
    for name, arr in c[ARRAYS_KEY].items():
        assert name in global_arrays
        assert tuple(arr.shape) == (len(devices), *global_arrays[name].shape)
    if algorithm == "fedper":
        assert not any(k.startswith("head.") for k in c[ARRAYS_KEY])
    wire = recorddict_to_proto(c).SerializeToString()
    for device in devices:
        _assert_no_data(run_dir, wire, device)
        # The personal state stays on the device's disk.
        assert (run_dir / STATE_DIR / f"device-{device:06d}.safetensors").is_file()


def test_a_late_train_message_never_overwrites_newer_state(run_dir: Path) -> None:
    reply, _ = _call(run_dir, "fedavg", "train", [0])
    assert not reply.has_error()
    state_file = run_dir / STATE_DIR / "device-000000.safetensors"
    before = state_file.read_bytes()
    again, _ = _call(run_dir, "fedavg", "train", [0])
    body = CohortReply.from_record_fields(again.content[REPORT_KEY])
    assert not body.train and "already trained in round 1" in body.failures[0].reason
    assert state_file.read_bytes() == before


def test_evaluate_and_hello_replies_are_scalars(run_dir: Path) -> None:
    reply, _ = _call(run_dir, "fedavg", "evaluate", [0, 2])
    assert not reply.has_error() and not reply.content.array_records
    body = CohortReply.from_record_fields(reply.content[REPORT_KEY])
    assert [r.device for r in body.evaluate] == [0, 2]
    _scalars_only(json.loads(body.model_dump_json()))
    hello, _ = _call(run_dir, "fedavg", "query.hello", [], node={"device-id": 2})
    assert not hello.has_error() and not hello.content.array_records
    assert dict(hello.content[REPORT_KEY])["device-id"] == 2
    for value in hello.content[REPORT_KEY].values():
        assert isinstance(value, (int, float))
