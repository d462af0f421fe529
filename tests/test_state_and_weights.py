"""Personal state store (atomic, per device), weights codec and update validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from client.state import PersonalState, PersonalStateStore, StateCorruptError
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


def test_killed_writer_leaves_previous_state(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of many saves: the file is always whole."""
    store = PersonalStateStore(tmp_path)
    store.save(0, PersonalState({"w": np.zeros(1000, np.float32)}, {"v": 0}))
    code = textwrap.dedent(
        f"""
        import numpy as np, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from client.state import PersonalState, PersonalStateStore
        s = PersonalStateStore({str(tmp_path)!r})
        print("ready", flush=True)
        i = 0
        while True:
            i += 1
            s.save(0, PersonalState({{"w": np.full(200_000, i, np.float32)}}, {{"v": i}}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    import time

    time.sleep(0.5)
    os.kill(proc.pid, 9)
    proc.wait()
    got = store.load(0)
    assert got is not None
    w = got.arrays["w"]
    assert np.all(w == w[0]) and int(got.meta["v"]) == int(w[0])


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
