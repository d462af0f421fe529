"""The server's round loop: bad updates are rejected with a reason and never aggregated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict

from common.config import load_config
from common.data import load_dataset
from common.protocol import ARRAYS_KEY, METRICS_KEY
from common.records import from_record, to_record
from common.rundir import METRICS_FILE, prepare_run_dir
from server.loop import RunFailed, ServerLoop
from tests.inprocess_grid import InProcessGrid


def _setup(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = load_config(
        None,
        [
            "rounds=2",
            "partition.num_devices=4",
            "strategy.fraction_train=1.0",
            "model.name=logistic",
            *overrides,
        ],
    )
    prepare_run_dir(cfg, tmp_path)
    return cfg, load_dataset(cfg.data)


def _replace_arrays(msg: Message, reply: Message, fn) -> Message:  # type: ignore[no-untyped-def]
    arrays = from_record(reply.content[ARRAYS_KEY])
    arrays = fn(arrays)
    content = RecordDict({ARRAYS_KEY: to_record(arrays), METRICS_KEY: reply.content[METRICS_KEY]})
    return Message(content, reply_to=msg)


def test_bad_updates_are_rejected_and_never_aggregated(tmp_path: Path) -> None:
    cfg, ds = _setup(tmp_path)
    good_updates: dict[int, dict[str, np.ndarray]] = {}

    def tamper(device: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type != "train":
            return None
        if device == 1:  # NaN in the weights
            return _replace_arrays(
                msg, reply, lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}
            )
        if device == 2:  # wrong shape
            return _replace_arrays(
                msg, reply, lambda a: {k: np.zeros((3, *v.shape), v.dtype) for k, v in a.items()}
            )
        if device == 3:  # the device crashed
            return Message(Error(code=1, reason="device 3 ran out of battery"), reply_to=msg)
        good_updates[int(msg.metadata.group_id)] = from_record(reply.content[ARRAYS_KEY])
        return None

    grid = InProcessGrid(tmp_path, 4, tamper)
    loop = ServerLoop(grid, cfg, tmp_path, ds)
    final = loop.run()
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    for row in rows:
        assert row["num_updates"] == 1 and row["num_rejected"] == 2 and row["num_failed"] == 1
        reasons = {r["device"]: r["reason"] for r in row["rejected"]}
        assert "NaN" in reasons[1] and "shape" in reasons[2]
        assert row["failed"] == [{"device": 3, "reason": "device 3 ran out of battery"}]
    # FedAvg over the single valid update is that update: the bad ones had no weight.
    for k, v in good_updates[2].items():
        np.testing.assert_array_equal(final[k], v)
    assert all(np.isfinite(v).all() for v in final.values())


def test_round_without_usable_updates_fails_the_run(tmp_path: Path) -> None:
    cfg, ds = _setup(tmp_path)

    def tamper(device: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type == "train":
            return _replace_arrays(msg, reply, lambda a: {k: v * np.inf for k, v in a.items()})
        return None

    loop = ServerLoop(InProcessGrid(tmp_path, 4, tamper), cfg, tmp_path, ds)
    with pytest.raises(RunFailed, match=r"round 1: 0 usable updates.*NaN or Inf"):
        loop.run()


def test_fedper_devices_never_send_heads_and_server_keeps_them_out(tmp_path: Path) -> None:
    cfg, ds = _setup(
        tmp_path, "client.algorithm=fedper", "strategy.name=fedadam", 'model.name="mlp2nn"'
    )
    grid = InProcessGrid(tmp_path, 4)
    loop = ServerLoop(grid, cfg, tmp_path, ds)
    initial_head = {k: v.copy() for k, v in loop.global_arrays.items() if k.startswith("head.")}
    final = loop.run()
    train_replies = [r for r in grid.replies if ARRAYS_KEY in r.content.array_records]
    assert train_replies
    for r in train_replies:
        assert not any(k.startswith("head.") for k in r.content[ARRAYS_KEY])
    for k, v in initial_head.items():
        np.testing.assert_array_equal(final[k], v)


def test_device_evaluation_summary(tmp_path: Path) -> None:
    cfg, ds = _setup(tmp_path, "evaluation.every=2")
    loop = ServerLoop(InProcessGrid(tmp_path, 4), cfg, tmp_path, ds)
    loop.run()
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert "devices" not in rows[0] and rows[1]["evaluated"]
    dev = rows[1]["devices"]
    assert dev["num_devices"] == 4
    g = dev["global_acc"]
    assert g["p10"] <= g["p50"] <= g["p90"]
    assert 0.0 <= dev["share_personal_worse"] <= 1.0


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"])
def test_every_strategy_trains(tmp_path: Path, strategy: str) -> None:
    cfg, ds = _setup(tmp_path, f"strategy.name={strategy}", "rounds=3")
    grid = InProcessGrid(tmp_path, 4)
    loop = ServerLoop(grid, cfg, tmp_path, ds)
    before = {k: v.copy() for k, v in loop.global_arrays.items()}
    final = loop.run()
    assert any(not np.array_equal(final[k], before[k]) for k in before)
    assert all(np.isfinite(v).all() and v.dtype == before[k].dtype for k, v in final.items())
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    mu = [float(m.content["config"].get("proximal-mu", 0.0)) for m in train_msgs]
    assert all(x == cfg.strategy.proximal_mu for x in mu) if strategy == "fedprox" else not any(mu)


ALGORITHM_SETS = {
    "fedavg": [],
    "fedprox": [],
    "fedper": ['model.name="mlp2nn"'],
    "fedrep": ['model.name="mlp2nn"'],
    "fedbn": ['model.name="cnn"', "model.batch_norm=true"],
    "ditto": [],
    "apfl": [],
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_SETS))
def test_every_algorithm_runs_through_server_and_devices(tmp_path: Path, algorithm: str) -> None:
    cfg, ds = _setup(tmp_path, f"client.algorithm={algorithm}", *ALGORITHM_SETS[algorithm])
    loop = ServerLoop(InProcessGrid(tmp_path, 4), cfg, tmp_path, ds)
    final = loop.run()
    assert all(np.isfinite(v).all() for v in final.values())
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert rows[-1]["num_updates"] == 4 and rows[-1]["num_rejected"] == 0
    assert rows[-1]["devices"]["num_devices"] == 4
