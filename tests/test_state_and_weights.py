"""Personal state store (atomic, per device), weights codec and update validation."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from client.state import PersonalState, PersonalStateStore, StateCorruptError
from common.atomic import TMP_PREFIX
from common.models import ModelSpec, build_model, count_parameters
from common.weights import (
    from_safetensors,
    load_arrays,
    model_to_arrays,
    sha256_hex,
    spec_of,
    to_safetensors,
    validate_update,
)


def test_store_round_trip(tmp_path: Path) -> None:
    store = PersonalStateStore(tmp_path)
    assert store.load(3) is None
    arrays = {"head.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    store.save(3, PersonalState(arrays, {"rounds_trained": 2, "alpha": 0.5}))
    got = store.load(3)
    assert got is not None
    np.testing.assert_array_equal(got.arrays["head.weight"], arrays["head.weight"])
    assert got.meta == {"rounds_trained": 2, "alpha": 0.5}
    assert store.load(4) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_corrupt_state_is_reported(tmp_path: Path) -> None:
    store = PersonalStateStore(tmp_path)
    store.path(1).write_bytes(b"not a safetensors file at all")
    with pytest.raises(StateCorruptError, match="device-000001"):
        store.load(1)


def _save_until_killed(root: str, conn: multiprocessing.connection.Connection) -> None:
    """Child: save version 1 of device 0's state, but stop once its temp file is written
    and fsynced, just before the rename that would publish it, and wait to be killed."""
    import client.state as state_module
    from common import atomic

    def pause() -> None:
        conn.send("paused")
        time.sleep(60)

    def hooked(path: Path, data: bytes, before_rename: object = None, **kw: object) -> None:
        atomic.atomic_write_bytes(path, data, pause, **kw)  # type: ignore[arg-type]

    state_module.atomic_write_bytes = hooked  # type: ignore[assignment]
    store = PersonalStateStore(Path(root))
    store.save(0, PersonalState({"w": np.full(200_000, 1, np.float32)}, {"v": 1}))
    conn.send("finished")


def test_writer_killed_before_the_rename_leaves_the_previous_state(tmp_path: Path) -> None:
    """SIGKILL at a fixed point of a save (new bytes durable, not yet renamed): the
    device's file is still the previous state, whole; the next save works."""
    store = PersonalStateStore(tmp_path)
    store.save(0, PersonalState({"w": np.zeros(1000, np.float32)}, {"v": 0}))
    before = store.path(0).read_bytes()
    ctx = multiprocessing.get_context("fork")  # starts in ms, numpy already imported
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_save_until_killed, args=(str(tmp_path), child))
    proc.start()
    try:
        assert parent.poll(30), "the writer never reached the kill point"
        assert parent.recv() == "paused"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    # The crash landed mid-save: the new bytes sit in a hidden temp file, complete.
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 800_000
    assert store.path(0).read_bytes() == before
    got = store.load(0)
    assert got is not None and got.meta == {"v": 0}
    np.testing.assert_array_equal(got.arrays["w"], np.zeros(1000, np.float32))
    assert [p.name for p in tmp_path.glob("device-*.safetensors")] == ["device-000000.safetensors"]
    store.save(0, PersonalState({"w": np.full(10, 2, np.float32)}, {"v": 2}))
    again = store.load(0)
    assert again is not None and again.meta == {"v": 2}


def test_safetensors_round_trip_is_byte_stable() -> None:
    spec = ModelSpec(name="cnn", input_shape=(1, 8, 8), num_classes=10)
    a = model_to_arrays(build_model(spec, seed=1))
    b = model_to_arrays(build_model(spec, seed=1))
    assert sha256_hex(to_safetensors(a)) == sha256_hex(to_safetensors(b))
    back = from_safetensors(to_safetensors(a))
    assert set(back) == set(a)
    model = build_model(spec, seed=2)
    load_arrays(model, back)
    for k, v in model_to_arrays(model).items():
        np.testing.assert_array_equal(v, a[k])


@pytest.mark.parametrize(
    ("name", "shape", "params"),
    [
        ("mlp2nn", (1, 28, 28), 199_210),  # McMahan et al. 2017
        ("cnn", (1, 28, 28), 1_663_370),
        ("logistic", (1, 28, 28), 7_850),
    ],
)
def test_model_sizes_match_the_paper(name: str, shape: tuple[int, int, int], params: int) -> None:
    model = build_model(ModelSpec(name=name, input_shape=shape, num_classes=10))
    assert count_parameters(model) == params
    assert all(k.startswith(("body.", "head.")) for k in model.state_dict())


def test_validate_update_catches_bad_updates() -> None:
    good = {"a": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
    spec = spec_of(good)
    assert validate_update(good, spec) is None
    assert "shape" in str(validate_update({**good, "a": np.zeros((2, 3), np.float32)}, spec))
    assert "dtype" in str(validate_update({**good, "a": np.zeros((2, 2), np.float64)}, spec))
    nan = {**good, "b": np.array([1, np.nan, 2], np.float32)}
    assert "NaN" in str(validate_update(nan, spec))
    inf = {**good, "b": np.array([1, np.inf, 2], np.float32)}
    assert "NaN or Inf" in str(validate_update(inf, spec))
    assert "missing" in str(validate_update({"a": good["a"]}, spec))
    assert validate_update({"a": good["a"]}, spec, required={"a"}) is None
    assert "unknown" in str(validate_update({**good, "c": good["b"]}, spec))
    assert "no arrays" in str(validate_update({}, spec))
