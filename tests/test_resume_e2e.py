"""``hybridfl simulate --resume``: the CLI refuses what it cannot resume, naming why,
and a real run killed with ``kill -9`` (the CLI, or the simulation process under the
SuperLink) resumes to the same bytes as an uninterrupted run.

The refusals are real CLI processes that stop before any SuperLink starts (a second
or two each); the kill runs start real SuperLinks and Ray and are slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from common.config import load_config
from common.crashpoint import CRASH_ENV, PAUSE_ENV
from common.rundir import METRICS_FILE, SUMMARY_FILE, prepare_run_dir
from tests.conftest import HYBRIDFL, assert_no_leftovers
from tests.test_cli_errors import assert_clean_error, hybridfl

SETS = [
    "rounds=3",
    "partition.num_devices=4",
    "model.name=logistic",
    "output.plot=false",
    "simulation.max_workers=1",
]
ARGS = [a for s in SETS for a in ("--set", s)]


def test_resume_refuses_another_config_naming_the_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(load_config(None, SETS), run_dir)
    proc = hybridfl("simulate", "--resume", str(run_dir), "--set", "rounds=5", "--set", "seed=3")
    assert_clean_error(proc, 2, "rounds: run 3, given 5", "seed: run 42, given 3")
    assert not (run_dir / METRICS_FILE).exists()  # nothing started


def test_resume_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    proc = hybridfl("simulate", "--resume", str(tmp_path))
    assert_clean_error(proc, 2, "no config.toml there")


def test_a_resumed_run_gets_its_short_ray_folder_again(tmp_path: Path) -> None:
    """Ray's socket paths are limited to 107 bytes: a long run folder links ``ray`` to a
    short folder, and a resumed run must use that folder, not the long path through it."""
    from simulation.runner import ray_tmpdir

    run_dir = tmp_path / ("x" * 60)
    run_dir.mkdir()
    first = ray_tmpdir(run_dir)
    try:
        assert len(str(first)) <= 40
        assert ray_tmpdir(run_dir) == first
    finally:
        shutil.rmtree(first, ignore_errors=True)


def _simulate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HYBRIDFL, "simulate", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )


def _results(run_dir: Path) -> tuple[bytes, str]:
    return (
        (run_dir / METRICS_FILE).read_bytes(),
        json.loads((run_dir / SUMMARY_FILE).read_text())["model_sha256"],
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = _simulate("--out", str(out), *ARGS)
    assert done.returncode == 0, done.stdout + done.stderr
    return _results(out)


def _resume_and_compare(run_dir: Path, reference: tuple[bytes, str]) -> None:
    done = _simulate("--resume", str(run_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming after round" in done.stdout
    assert _results(run_dir) == reference
    assert_no_leftovers(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["publish-manifest@2", "checkpoint-arrays@3"])
def test_cli_killed_then_resumed_is_identical(
    tmp_path: Path, reference: tuple[bytes, str], point: str
) -> None:
    """kill -9 of the CLI while the ServerApp waits at ``point``: the watchdog stops the
    rest, ``--resume`` finishes the run."""
    run_dir = tmp_path / "run"
    pause = tmp_path / "paused"
    env = {**os.environ, CRASH_ENV: point, PAUSE_ENV: str(pause)}
    proc = subprocess.Popen(
        [*HYBRIDFL, "simulate", "--out", str(run_dir), *ARGS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not pause.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pause.exists(), f"the run never reached {point} (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert_no_leftovers(run_dir.resolve(), within_s=30)
    _resume_and_compare(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["round-trained@2", "write-metrics.jsonl@3"])
def test_simulation_process_killed_then_resumed_is_identical(
    tmp_path: Path, reference: tuple[bytes, str], point: str
) -> None:
    """kill -9 of the simulation process (ServerApp and Ray driver): the CLI reports a
    failed run (exit 1), ``--resume`` finishes it."""
    run_dir = tmp_path / "run"
    crashed = _simulate("--out", str(run_dir), *ARGS, env={**os.environ, CRASH_ENV: point})
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    assert "finished:failed" in crashed.stderr
    _resume_and_compare(run_dir, reference)
