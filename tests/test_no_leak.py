"""Nothing leaks from one device to the next in one worker process.

In simulation one Ray worker process serves many devices: a message names a cohort
that ``client.cohort`` trains one after another, and ``client.runtime.model_for``
hands every one of them the same cached ``nn.Module``. A weight, a batch-norm buffer,
a ``requires_grad`` flag or optimiser state left behind by device A would silently
change device B's update. So: call the real ClientApp (as Flower does: a Message and a
Context) with A and B in one message, in this process, and compare everything B
produced with B alone on a freshly built model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors import safe_open

from client.algorithms import ALGORITHMS
from client.app import app
from client.runtime import model_for
from common.config import ExperimentConfig, load_config
from common.data import load_dataset
from common.models import ModelSpec, build_model
from common.protocol import ARRAYS_KEY, CONFIG_KEY, REPORT_KEY, CohortReply, task_for
from common.records import from_record, to_record
from common.rundir import prepare_run_dir
from common.weights import Arrays, model_to_arrays

A, B = 0, 1
VOLATILE = {"train_time_s"}
"""Report fields that measure the machine, not the device."""
SETTINGS = [
    "client.lr=0.05",
    "client.batch_size=32",
    "client.momentum=0.9",  # optimiser state that a reused optimiser would carry over
    "client.ditto_lambda=0.1",
    "evaluation.finetune_steps=2",  # evaluation trains the cached model too
]

Outcome = dict[str, Any]
"""One device's report (minus VOLATILE) and, for training, its update's arrays."""


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """What Flower's runtime sets in a ClientApp process before calling the app."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("noleak")
    # A CNN with batch norm: parameters, buffers, a head and a body to leak. Twenty
    # devices: ~70 training examples each, a few batches per epoch.
    sets = ["partition.num_devices=20", 'model.name="cnn"', "model.batch_norm=true"]
    prepare_run_dir(load_config(None, sets), d)
    return d


@pytest.fixture(scope="module")
def spec(run_dir: Path) -> ModelSpec:
    ds = load_dataset(load_config(run_dir / "config.toml").data)
    return ModelSpec(
        name="cnn", input_shape=ds.input_shape, num_classes=ds.num_classes, batch_norm=True
    )


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Iterator[None]:
    model_for.cache_clear()
    yield
    model_for.cache_clear()


def _call(
    run_dir: Path,
    state_dir: Path,
    kind: str,
    cfg: ExperimentConfig,
    devices: list[int],
    round_: int,
    spec: ModelSpec,
    global_arrays: Arrays,
) -> dict[int, Outcome]:
    """One message naming ``devices`` to the ClientApp of a simulation slot; per device,
    what came back. The only place this test knows the wire format."""
    task = task_for(cfg, round_, spec.model_dump_json(), str(run_dir), devices)
    content = RecordDict(
        {ARRAYS_KEY: to_record(global_arrays), CONFIG_KEY: ConfigRecord(task.to_record_fields())}
    )
    msg = Message(content, dst_node_id=100, message_type=kind)
    node_config = {"partition-id": 0, "state-dir": str(state_dir)}
    reply = app(msg, Context(1, 100, node_config, RecordDict(), {"run-dir": str(run_dir)}))
    assert not reply.has_error(), reply.error
    report = CohortReply.from_record_fields(reply.content[REPORT_KEY])
    assert report.failures == [], report.failures
    rows = report.train if kind == "train" else report.evaluate
    out = {r.device: r.model_dump(exclude=VOLATILE) for r in rows}
    if kind == "train":
        stacked = from_record(reply.content[ARRAYS_KEY])
        assert report.layout == "stacked"
        for i, r in enumerate(rows):
            out[r.device]["arrays"] = {k: v[i] for k, v in stacked.items()}
    assert sorted(out) == sorted(devices)
    return out


def _state_file(state_dir: Path, device: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(state_dir / f"device-{device:06d}.safetensors", "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def _assert_same(got: Outcome, alone: Outcome, what: str) -> None:
    assert set(got) == set(alone), what
    for key, value in alone.items():
        if key == "arrays":
            assert set(got["arrays"]) == set(value), what
            for name, arr in value.items():
                np.testing.assert_array_equal(got["arrays"][name], arr, err_msg=f"{what}: {name}")
        else:
            assert got[key] == value, f"{what}: {key}"


def _globals(spec: ModelSpec) -> list[Arrays]:
    """Two different served versions (rounds 1 and 2)."""
    return [model_to_arrays(build_model(spec, seed=s)) for s in (0, 1)]


def _b_story(
    run_dir: Path,
    state_dir: Path,
    algorithm: str,
    spec: ModelSpec,
    cohort: list[int],
    rounds: int = 2,
    between: Callable[[], None] | None = None,
) -> list[Outcome]:
    """B trains and is evaluated in rounds 1..``rounds`` (round 2 from its own state), in
    messages naming ``cohort``; ``between`` given: A's messages and B's are separate,
    and ``between`` runs in between. Returns B's outcomes in order."""
    cfg = load_config(run_dir / "config.toml", [*SETTINGS, f"client.algorithm={algorithm}"])
    seen: list[Outcome] = []
    for rnd, g in enumerate(_globals(spec)[:rounds], start=1):
        for kind in ("train", "evaluate"):
            if between is None:
                got = _call(run_dir, state_dir, kind, cfg, cohort, rnd, spec, g)
            else:
                _call(run_dir, state_dir, kind, cfg, [A], rnd, spec, g)
                between()
                got = _call(run_dir, state_dir, kind, cfg, [B], rnd, spec, g)
            seen.append(got[B])
    return seen


def _same_state(left: Path, right: Path) -> bool:
    arrays, meta = _state_file(left, B)
    ref_arrays, ref_meta = _state_file(right, B)
    return (
        meta == ref_meta
        and arrays.keys() == ref_arrays.keys()
        and all(np.array_equal(arrays[k], ref_arrays[k]) for k in ref_arrays)
    )


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_device_after_another_equals_device_alone(
    run_dir: Path, spec: ModelSpec, algorithm: str, tmp_path: Path
) -> None:
    alone = _b_story(run_dir, tmp_path / "alone", algorithm, spec, [B])
    model_for.cache_clear()
    after_a = _b_story(run_dir, tmp_path / "after-a", algorithm, spec, [A, B])
    assert model_for.cache_info().currsize == 1  # A and B shared one cached module
    for i, (got, ref) in enumerate(zip(after_a, alone, strict=True)):
        _assert_same(got, ref, f"{algorithm}: B's message #{i}")
    assert alone[0]["arrays"] and alone[1]["global_acc"] is not None  # B's results compared
    assert _same_state(tmp_path / "after-a", tmp_path / "alone")


def test_a_leaked_requires_grad_flag_would_be_caught(
    run_dir: Path, spec: ModelSpec, tmp_path: Path
) -> None:
    """The comparison above can fail: freeze the head of the cached model between A and B,
    as an algorithm that forgot to restore ``requires_grad`` would, and B's update differs."""
    alone = _b_story(run_dir, tmp_path / "alone", "fedavg", spec, [B], rounds=1)
    model_for.cache_clear()

    def leak() -> None:
        model_for(spec.model_dump_json()).head.weight.requires_grad_(False)

    leaky = _b_story(run_dir, tmp_path / "leaky", "fedavg", spec, [B], rounds=1, between=leak)
    head, g1 = "head.weight", _globals(spec)[0]
    np.testing.assert_array_equal(leaky[0]["arrays"][head], g1[head])  # it never trained
    assert not np.array_equal(alone[0]["arrays"][head], g1[head])
    with pytest.raises(AssertionError):
        _assert_same(leaky[0], alone[0], "leaky")


def test_a_leaked_batch_norm_setting_would_be_caught(
    run_dir: Path, spec: ModelSpec, tmp_path: Path
) -> None:
    """A module attribute outside the state dict (batch-norm momentum) changed after A:
    it moves only running statistics, which FedBN keeps; B's state and evaluation show it."""
    alone = _b_story(run_dir, tmp_path / "alone", "fedbn", spec, [B], rounds=1)
    model_for.cache_clear()

    def leak() -> None:
        for m in model_for(spec.model_dump_json()).modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.9

    leaky = _b_story(run_dir, tmp_path / "leaky", "fedbn", spec, [B], rounds=1, between=leak)
    _assert_same(leaky[0], alone[0], "train reply")  # the shared part is unaffected
    with pytest.raises(AssertionError):
        _assert_same(leaky[1], alone[1], "leaky")
    assert not _same_state(tmp_path / "leaky", tmp_path / "alone")
