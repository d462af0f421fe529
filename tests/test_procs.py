"""Process plumbing without Flower or Ray: parent-death cleanup, flwr in its own home,
waits that end.

The watchdog test mirrors what the SuperLink does (a child that starts a grandchild
in a session of its own, which a process-tree walk loses once the child is gone)
with ``sleep``, so it runs in a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import simulation.runner as runner
from simulation.flwr_cli import (
    RunnerError,
    flwr_env,
    free_port,
    parse_json_output,
    run_status,
    write_connection,
)
from simulation.procs import listening_sockets
from tests.conftest import processes_mentioning

CLI = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from simulation.procs import Processes
    tag, log = sys.argv[1], Path(sys.argv[2])
    procs = Processes()
    # a child, and a grandchild in a session of its own (like flower-superexec)
    env = {**os.environ, "HFL_TEST_TAG": tag}
    procs.start(["sh", "-c", "setsid sleep 300 & exec sleep 301"], env, log)
    print("started", flush=True)
    time.sleep(600)
    """
)


def test_kill_9_of_the_parent_stops_children_and_own_session_grandchildren(
    tmp_path: Path,
) -> None:
    tag = f"hfl-test-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, tag, str(tmp_path / "child.log")],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 10
        while len(processes_mentioning(tag)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(processes_mentioning(tag)) == 3  # the parent (argv), child, grandchild
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        deadline = time.monotonic() + 8
        while processes_mentioning(tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(tag) == []
    finally:
        proc.kill()
        for pid in processes_mentioning(tag):
            os.kill(pid, signal.SIGKILL)


def test_flwr_ignores_an_app_folder_named_like_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H4: a ``hybridfl*/pyproject.toml`` in the working directory used to turn the
    connection name into an app path; flwr now runs in FLWR_HOME and reaches the
    SuperLink address (none is listening here, so it says so, within seconds)."""
    for name in ("hybridfl", "hybridfl-superlink"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pyproject.toml").write_text('[project]\nname = "x"\n')
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    write_connection(home, f"127.0.0.1:{free_port()}")
    with pytest.raises(RunnerError, match="Connection to the SuperLink is unavailable"):
        run_status(1, flwr_env(home))  # returns (no hang): flwr got the address, not an app


def test_following_a_run_gives_up_when_the_status_stays_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_status(run_id: int, env: dict[str, str]) -> str:
        raise RunnerError("flwr ls failed: connection refused")

    monkeypatch.setattr(runner, "run_status", no_status)
    monkeypatch.setattr(runner, "STATUS_UNKNOWN_LIMIT_S", 0.3)
    with pytest.raises(RunnerError, match=r"did not report the status of run 7.*refused"):
        runner.follow_run(7, tmp_path, {}, poll_s=0.05, status_every_s=0.1)


def test_following_a_run_gives_up_when_it_never_finishes_after_its_end_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "summary.json").write_text("{}")
    monkeypatch.setattr(runner, "run_status", lambda run_id, env: "running")
    monkeypatch.setattr(runner, "ENDED_LIMIT_S", 0.3)
    with pytest.raises(RunnerError, match="still reports run 7 as 'running'"):
        runner.follow_run(7, tmp_path, {}, poll_s=0.05)


def test_parse_json_output_skips_notices() -> None:
    assert parse_json_output('Using SuperLink: x\n{"run-id": "5"}\n') == {"run-id": "5"}
    with pytest.raises(ValueError):
        parse_json_output("no json here")


def test_listening_sockets_sees_our_own_listener() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert (os.getpid(), "127.0.0.1", port) in listening_sockets([os.getpid()])
