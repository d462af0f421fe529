"""Real runs: `hybridfl simulate` starts a SuperLink, Ray and the apps; we read the run folder.

These start real processes (SuperLink, ServerApp, Ray workers) and check that
none is left afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from common.config import load_config
from common.rundir import STATE_DIR, prepare_run_dir
from common.weights import sha256_hex
from simulation.runner import simulate
from tests.conftest import processes_mentioning

HYBRIDFL = [sys.executable, "-m", "simulation.cli"]
SMALL = [
    "--set", "rounds=2",
    "--set", "partition.num_devices=6",
    "--set", "strategy.fraction_train=0.5",
    "--set", 'model.name="mlp2nn"',
    "--set", "seed=7",
]  # fmt: skip


def _simulate(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HYBRIDFL, "simulate", "--out", str(out), *SMALL, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _assert_no_leftovers(run_dir: Path) -> None:
    deadline = time.monotonic() + 15
    while processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(run_dir)) == []


@pytest.fixture(scope="module")
def first_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("sim") / "run"
    return out, _simulate(out)


def test_two_round_simulation_fills_the_run_folder(first_run) -> None:  # type: ignore[no-untyped-def]
    run_dir, proc = first_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round   1/2" in proc.stdout and "round   2/2" in proc.stdout
    for name in (
        "config.toml",
        "partition.json",
        "metrics.jsonl",
        "summary.json",
        "accuracy.png",
        "final_model.safetensors",
        "final_model.json",
        "logs/superlink.log",
    ):
        assert (run_dir / name).is_file(), name
    assert load_config(run_dir / "config.toml").rounds == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["num_sampled"] == 3 and r["num_updates"] == 3 and r["num_failed"] == 0
        assert 0.0 <= r["global_test_acc"] <= 1.0
        dev = r["devices"]
        assert dev["num_devices"] == 6  # evaluation.devices = "all"
        for key in ("global_acc", "personal_acc"):
            assert set(dev[key]) == {"mean", "weighted_mean", "p10", "p50", "p90"}
        assert 0.0 <= dev["share_personal_worse"] <= 1.0
    manifest = json.loads((run_dir / "final_model.json").read_text())
    blob = (run_dir / "final_model.safetensors").read_bytes()
    assert manifest["sha256"] == sha256_hex(blob)
    assert manifest["round"] == 2 and manifest["model"]["name"] == "mlp2nn"
    arrays = load_file(run_dir / "final_model.safetensors")
    assert sum(a.size for a in arrays.values()) == manifest["parameter_count"]
    stats = json.loads((run_dir / "partition.json").read_text())
    assert len(stats["devices"]) == 6
    # Every device that trained has its personal state on disk.
    assert len(list((run_dir / STATE_DIR).glob("device-*.safetensors"))) >= 3
    _assert_no_leftovers(run_dir)


def test_same_seed_same_metrics(first_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run_dir, proc = first_run
    assert proc.returncode == 0
    again = _simulate(tmp_path / "again")
    assert again.returncode == 0, again.stdout + again.stderr
    first = (run_dir / "metrics.jsonl").read_bytes()
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == first
    a = (run_dir / "final_model.json").read_text()
    b = (tmp_path / "again" / "final_model.json").read_text()
    assert json.loads(a)["sha256"] == json.loads(b)["sha256"]


def test_failing_clientapp_fails_the_run_with_its_cause(tmp_path: Path) -> None:
    """Unreadable personal state on every device: each ClientApp raises; the run fails."""
    cfg = load_config(None, ["rounds=2", "partition.num_devices=3", "model.name=logistic"])
    run_dir = tmp_path / "broken"
    prepare_run_dir(cfg, run_dir)
    (run_dir / STATE_DIR).mkdir()
    for d in range(3):
        (run_dir / STATE_DIR / f"device-{d:06d}.safetensors").write_bytes(b"garbage")
    result = simulate(cfg, run_dir)
    assert not result.ok
    assert result.status == "finished:failed"
    assert result.failure and "unreadable" in result.failure
    _assert_no_leftovers(run_dir)


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
    _assert_no_leftovers(out.resolve())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "client.lrr=0.1"], "client.lrr: unknown key"),
        (["--set", "partition.alpha=0"], "partition.alpha"),
        (["--set", 'data.dataset="npz"', "--set", 'data.path="/no/x.npz"'], "/no/x.npz"),
        (["--set", "partition.num_devices=100000"], "partition.num_devices"),
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
