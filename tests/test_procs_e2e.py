"""A real `hybridfl simulate`: every listener on 127.0.0.1, nothing left after `kill -9`.

One run serves both checks (each real run costs ~30 s of both cores): once the
first round is recorded every process is up (SuperLink, SuperExec, the simulation
process, Ray's gcs_server, raylet, agents and workers), so we list their listening
sockets; then we kill the CLI with SIGKILL, so no ``finally`` of ours runs, and
expect the children's parent-death signal and the watchdog to stop all of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from simulation.procs import listening_sockets
from tests.conftest import processes_mentioning

HYBRIDFL = [sys.executable, "-m", "simulation.cli"]
LONG = [
    "--set", "rounds=40",
    "--set", "partition.num_devices=4",
    "--set", "strategy.fraction_train=0.5",
    "--set", 'model.name="logistic"',
    "--set", "evaluation.every=40",
]  # fmt: skip
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _wait_for(path: Path, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"simulate exited early ({proc.returncode}):\n{out[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{path} did not appear within {timeout_s:.0f}s")


def test_local_simulation_listens_on_loopback_and_dies_with_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*HYBRIDFL, "simulate", "--out", str(out), *LONG],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # like a terminal's job: not pytest's process group
    )
    try:
        _wait_for(out / "metrics.jsonl", 240, proc)
        pids = processes_mentioning(str(out))
        names = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
        assert any("raylet" in n for n in names.values()), names
        sockets = listening_sockets(pids)
        assert sockets, f"no listening socket found among {names}"
        exposed = [(names.get(p), ip, port) for p, ip, port in sockets if ip not in LOOPBACK]
        assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.25)
        left = {
            p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in processes_mentioning(str(out))
        }
        assert left == {}, f"still running {15}s after kill -9 of the CLI: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in processes_mentioning(str(out)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
