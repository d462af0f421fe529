"""Real runs: `hybridfl simulate` starts a SuperLink, Ray and the apps; we read the run folder.

The default run shares one real run (``served_run`` in conftest.py) and checks what it
left against values computed here, independently of hybridfl's own evaluation code.
Checks that need runs of their own (a rerun, Ctrl-C, a failing ClientApp) are slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.config import load_config
from common.data import device_arrays, load_dataset, load_partition
from common.rundir import STATE_DIR, prepare_run_dir, read_jsonl
from common.weights import sha256_hex
from simulation.runner import simulate
from tests.conftest import (
    HYBRIDFL,
    SERVED_RUN_ROUNDS,
    SERVED_RUN_SETS,
    ServedRun,
    accuracy,
    assert_no_leftovers,
    model_from,
)

ROUNDS = SERVED_RUN_ROUNDS
SMALL = [
    "--set", "rounds=2",
    "--set", "partition.num_devices=6",
    "--set", "strategy.fraction_train=0.5",
    "--set", 'model.name="mlp2nn"',
    "--set", "seed=7",
]  # fmt: skip


def _ok(run: ServedRun) -> Path:
    assert run.returncode == 0, run.output[-3000:]
    return run.run_dir


def test_the_run_fills_its_folder_and_leaves_no_process(served_run: ServedRun) -> None:
    run_dir = _ok(served_run)
    for r in range(1, ROUNDS + 1):
        assert f"round {r:>3}/{ROUNDS}" in served_run.output
    for name in (
        "config.toml",
        "partition.json",
        "metrics.jsonl",
        "devices.jsonl",
        "summary.json",
        "accuracy.png",
        "final_model.safetensors",
        "final_model.json",
        "logs/superlink.log",
    ):
        assert (run_dir / name).is_file(), name
    cfg = load_config(run_dir / "config.toml")
    assert (cfg.rounds, cfg.partition.num_devices, cfg.seed) == (ROUNDS, 6, 7)
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, ROUNDS + 1))
    manifest = json.loads((run_dir / "final_model.json").read_text())
    assert manifest["sha256"] == sha256_hex((run_dir / "final_model.safetensors").read_bytes())
    assert manifest["round"] == ROUNDS and manifest["model"]["name"] == "mlp2nn"
    arrays = load_file(run_dir / "final_model.safetensors")
    assert sum(a.size for a in arrays.values()) == manifest["parameter_count"]
    assert len(json.loads((run_dir / "partition.json").read_text())["devices"]) == 6
    # The same config and seed give the same partition in a folder of our own.
    again = run_dir.parent / "partition-again"
    prepare_run_dir(cfg, again)
    assert (again / "partition.npz").read_bytes() == (run_dir / "partition.npz").read_bytes()
    assert_no_leftovers(run_dir)


def test_reported_accuracies_are_those_of_the_saved_models(served_run: ServedRun) -> None:
    """Global test accuracy and every device's global/personal accuracy, recomputed here
    from the final model, the devices' state files and their test splits."""
    run_dir = _ok(served_run)
    cfg = load_config(run_dir / "config.toml")
    assert cfg.client.algorithm == "fedavg"  # its personal model is its whole trained copy
    ds = load_dataset(cfg.data)
    spec = json.loads((run_dir / "final_model.json").read_text())["model"]
    final = model_from(load_file(run_dir / "final_model.safetensors"), spec)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = accuracy(final, ds.x_test, ds.y_test)
    assert rows[-1]["global_test_acc"] == expected
    assert summary["last"]["global_test_acc"] == expected

    partition = load_partition(run_dir / "partition.npz")
    lines = read_jsonl(run_dir / "devices.jsonl")
    assert [x["device"] for x in lines] == list(range(6))  # evaluation.devices = "all"
    g, p, n = [], [], []
    for x in lines:
        d = int(x["device"])  # type: ignore[call-overload]
        _, _, x_test, y_test = device_arrays(ds, partition, d)
        state_file = run_dir / STATE_DIR / f"device-{d:06d}.safetensors"
        personal = model_from(load_file(state_file), spec) if state_file.exists() else final
        g.append(accuracy(final, x_test, y_test))
        p.append(accuracy(personal, x_test, y_test))
        n.append(len(y_test))
        assert x["round"] == ROUNDS and x["num_test"] == n[-1]
        assert x["personalized"] == state_file.exists()
        assert (x["global_acc"], x["personal_acc"]) == pytest.approx((g[-1], p[-1]), abs=1e-12)
    # At least one round's sample trained, and a trained copy is not the global model.
    assert sum(x["personalized"] for x in lines) >= 3  # type: ignore[misc]
    assert p != g
    dev = rows[-1]["devices"]
    w = np.array(n, dtype=float)
    assert dev["global_acc"]["weighted_mean"] == pytest.approx(float(np.dot(g, w) / w.sum()))  # type: ignore[index]
    assert dev["personal_acc"]["weighted_mean"] == pytest.approx(float(np.dot(p, w) / w.sum()))  # type: ignore[index]
    assert dev["global_acc"]["p50"] == pytest.approx(float(np.median(g)))  # type: ignore[index]
    worse = sum(pi < gi for gi, pi in zip(g, p, strict=True)) / len(g)
    assert dev["share_personal_worse"] == pytest.approx(worse)  # type: ignore[index]


@pytest.mark.slow
def test_same_seed_same_metrics(served_run: ServedRun, tmp_path: Path) -> None:
    """A second run with the same config and seed (no --serve) writes identical metrics."""
    run_dir = _ok(served_run)
    sets = [a for s in SERVED_RUN_SETS for a in ("--set", s)]
    again = subprocess.run(
        [*HYBRIDFL, "simulate", "--out", str(tmp_path / "again"), *sets],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    first = (run_dir / "metrics.jsonl").read_bytes()
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == first
    a = json.loads((run_dir / "final_model.json").read_text())
    b = json.loads((tmp_path / "again" / "final_model.json").read_text())
    assert a["sha256"] == b["sha256"]


@pytest.mark.slow
def test_failing_clientapp_fails_the_run_with_its_cause(tmp_path: Path) -> None:
    """No device can keep its state (the state folder is a file): every device's training
    raises in its ClientApp; the run fails with that cause. (An unreadable state *file*
    no longer fails a device: it is set aside and the device restarts, issue 12.)"""
    cfg = load_config(None, ["rounds=2", "partition.num_devices=3", "model.name=logistic"])
    run_dir = tmp_path / "broken"
    prepare_run_dir(cfg, run_dir)
    (run_dir / STATE_DIR).write_bytes(b"not a folder")
    result = simulate(cfg, run_dir)
    assert not result.ok
    assert result.status == "finished:failed"
    assert result.failure and "0 usable updates" in result.failure, result.failure
    assert STATE_DIR in result.failure, result.failure
    assert_no_leftovers(run_dir)


@pytest.mark.slow
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [*HYBRIDFL, "simulate", "--out", str(out), *SMALL, "--set", "rounds=200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith("round"):
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert_no_leftovers(out.resolve())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # The CLI's two error paths: the config (load_config) and the data (prepare_run_dir).
        (["--set", "client.lrr=0.1"], "client.lrr: unknown key"),
        (["--set", 'data.dataset="npz"', "--set", 'data.path="/no/x.npz"'], "/no/x.npz"),
        # The same paths again (each validator is also tested in-process in test_config).
        pytest.param(["--set", "partition.alpha=0"], "partition.alpha", marks=pytest.mark.slow),
        pytest.param(
            ["--set", "partition.num_devices=100000"],
            "partition.num_devices",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_input_fails_fast_without_traceback(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    proc = subprocess.run(
        [*HYBRIDFL, "simulate", "--out", str(tmp_path / "r"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
