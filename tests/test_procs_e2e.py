"""A real `hybridfl simulate`: every listener on 127.0.0.1, nothing left after `kill -9`.

One run serves several checks (each real run costs ~30 s of both cores). It starts
in a folder holding ``hybridfl/`` and ``hybridfl-superlink/`` apps (which used to
hang the Flower CLI) with its output piped, and its progress lines must arrive
while it runs. Once the first round is printed every process is up (SuperLink,
SuperExec, the simulation process, Ray's gcs_server, raylet, agents and workers),
so we list their listening sockets; then we kill the CLI with SIGKILL, so no
``finally`` of ours runs, and expect the children's parent-death signal and the
watchdog to stop all of them. The run's log must hold no terminal colour codes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

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


def _start_simulate(out: Path, cwd: Path) -> subprocess.Popen[str]:
    """``hybridfl simulate`` piped, in a session of its own (like a terminal's job)."""
    return subprocess.Popen(
        [*HYBRIDFL, "simulate", "--out", str(out), *LONG],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        start_new_session=True,
    )


def _lines_until_round(proc: subprocess.Popen[str], timeout_s: float) -> list[str]:
    """Lines read from the pipe while the CLI runs, up to the first round line."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("round"):
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert proc.poll() is None, f"simulate exited ({proc.returncode}):\n{''.join(lines)[-3000:]}"
    assert lines and lines[-1].startswith("round"), f"no round line within {timeout_s:.0f}s"
    return lines


@pytest.mark.slow  # a second SuperLink + Ray of its own (the kill ends it): ~45 s quiet;
# the default run keeps test_procs.py's kill -9 of a process tree (watchdog, no Ray)
def test_local_simulation_listens_on_loopback_and_dies_with_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for app in ("hybridfl", "hybridfl-superlink"):
        (tmp_path / app).mkdir()
        (tmp_path / app / "pyproject.toml").write_text('[project]\nname = "x"\n')
    proc = _start_simulate(out, tmp_path)
    try:
        lines = _lines_until_round(proc, 240)
        assert lines[0].startswith("run folder:"), lines
        pids = processes_mentioning(str(out))
        names = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in pids}
        assert any("raylet" in n for n in names.values()), names
        sockets = listening_sockets(pids)
        assert sockets, f"no listening socket found among {names}"
        exposed = [(names.get(p), ip, port) for p, ip, port in sockets if ip not in LOOPBACK]
        assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        t_kill = time.monotonic()
        deadline = t_kill + 15
        while processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.25)
        print(f"all {len(pids)} processes gone {time.monotonic() - t_kill:.1f}s after kill -9")
        left = {
            p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in processes_mentioning(str(out))
        }
        assert left == {}, f"still running {15}s after kill -9 of the CLI: {left}"
        for log in (out / "logs").glob("*.log"):
            assert "\x1b[" not in log.read_text(errors="replace"), f"colour codes in {log}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in processes_mentioning(str(out)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_term_and_hup_stop_simulate_like_ctrl_c(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = _start_simulate(out, tmp_path)
    try:
        lines = _lines_until_round(proc, 240)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, "".join(lines) + rest
    assert f"interrupted ({sig.name}): all processes stopped" in rest
    deadline = time.monotonic() + 15
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert processes_mentioning(str(out)) == []
