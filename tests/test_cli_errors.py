"""The CLI as a newcomer meets it: every user error is one clear line, nothing starts.

Real processes (the README's own commands), each a second or two: none of these
gets as far as starting a SuperLink or Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from simulation.flwr_cli import free_port
from simulation.runner import cause_from_logs
from tests.conftest import REPO

HYBRIDFL = [sys.executable, "-m", "simulation.cli"]


def hybridfl(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HYBRIDFL, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=env,
    )


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    both = proc.stdout + proc.stderr
    assert proc.returncode == code, both
    assert "Traceback" not in both
    for n in needles:
        assert n in proc.stderr, proc.stderr


# -- 13.4: a failed start leaves no run folder ------------------------------------------
@pytest.mark.parametrize("pre_existing", [False, True])
def test_failed_start_leaves_out_reusable(tmp_path: Path, pre_existing: bool) -> None:
    out = tmp_path / "OUT"
    if pre_existing:
        out.mkdir()  # an empty folder the user made: allowed, and left empty
    bad = ["--set", 'data.dataset="npz"', "--set", 'data.path="/nope.npz"']
    proc = hybridfl("simulate", "--out", str(out), *bad)
    assert_clean_error(proc, 2, "/nope.npz")
    assert not out.exists() or list(out.iterdir()) == []
    # the corrected retry gets past the --out check (and fails only on the next error)
    again = hybridfl("simulate", "--out", str(out), "--set", "client.lrr=1")
    assert_clean_error(again, 2, "client.lrr")
    assert "exists and is not empty" not in again.stderr


# -- 13.6: impossible resources fail before anything starts, naming the key ------------
def test_impossible_cpus_per_client_fail_before_start(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    out = tmp_path / "r"
    proc = hybridfl(
        "simulate", "--out", str(out), "--set", f"simulation.num_cpus_per_client={cores + 2}"
    )
    assert_clean_error(proc, 2, "simulation.num_cpus_per_client", f"at most {cores}")
    assert not out.exists()  # refused before anything was written or started


def test_cause_of_a_failed_run_comes_from_the_logs(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "run.log").write_text(
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "ValueError: ActorPool is empty. Check resources: CPUs=2.0\n"
        "\x1b[92mINFO \x1b[0m:      \n"
    )
    assert cause_from_logs(logs) == "ValueError: ActorPool is empty. Check resources: CPUs=2.0"
    (logs / "run.log").write_text("INFO :  nothing wrong\n")
    (logs / "superlink.log").write_text("\x1b[91mERROR \x1b[0m:     Run 7 failed: disk full\n")
    assert cause_from_logs(logs) == "Run 7 failed: disk full"


# -- 13.7 / 13.8: fetch to a missing folder, impossible ports ---------------------------
def test_fetch_out_in_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    proc = hybridfl(
        "fetch", "http://127.0.0.1:9", "--out", "no-such-dir/sub/v.safetensors", cwd=tmp_path
    )
    assert_clean_error(proc, 2, "no-such-dir/sub", "does not exist")


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "RUN", "--port", "99999"],
        ["serve", "RUN", "--port", "-1"],
        ["simulate", "--serve", "--port", "70000"],
        ["superlink", "--insecure", "--port", "65536"],
        ["device", "--superlink", "x:1", "--device-id", "0", "--port", "100000"],
    ],
)
def test_ports_outside_range_are_refused(tmp_path: Path, args: list[str]) -> None:
    (tmp_path / "RUN" / "registry").mkdir(parents=True)
    proc = hybridfl(*args, cwd=tmp_path)
    assert_clean_error(proc, 2, "is not a TCP port")


# -- 13.2: --serve on a busy port fails naming the port, before anything is written ----
def test_simulate_serve_on_a_busy_port_names_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tmp_path / "r"
        proc = hybridfl("simulate", "--serve", "--port", str(port), "--out", str(out))
    assert_clean_error(proc, 2, f"--port {port}", "already in use")
    assert not out.exists()


# -- 12.H3: `serve` ends cleanly on TERM and HUP, like Ctrl-C --------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_serve_stops_on_term_and_hup(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "registry").mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [*HYBRIDFL, "serve", str(tmp_path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        proc.send_signal(sig)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 128 + signal.SIGTERM, out  # HUP is passed on as TERM
    assert "interrupted (SIGTERM): the model server is stopped" in out
    assert "Traceback" not in out
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))


# -- 13.9 / 13.16: help, version, bare command ------------------------------------------
def test_bare_command_prints_help_and_exits_0() -> None:
    proc = hybridfl()
    assert proc.returncode == 0, proc.stderr
    assert "simulate" in proc.stdout and "Usage" in proc.stdout


def test_version() -> None:
    proc = hybridfl("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("hybridfl ")


def test_every_positional_argument_is_explained() -> None:
    import typer.main

    from simulation.cli import cli

    group = typer.main.get_command(cli)
    missing = []
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        for param in cmd.params:
            if param.param_type_name == "argument" and not getattr(param, "help", None):
                missing.append(f"{name} {param.name}")
            if param.param_type_name == "option" and not param.hidden and not param.help:
                missing.append(f"{name} --{param.name}")
    assert missing == []
    env = {**os.environ, "COLUMNS": "120"}
    proc = hybridfl("simulate", "--help", env=env)
    assert "Experiment TOML" in proc.stdout
    proc = hybridfl("serve", "--help", env=env)
    assert "A run folder" in proc.stdout


def test_devices_overriding_num_devices_says_so(tmp_path: Path) -> None:
    # a bad key stops it right after the warning, before anything starts
    proc = hybridfl(
        "deploy", "--devices", "3", "--insecure", "--out", str(tmp_path / "r"),
        "--set", "partition.num_devices=5", "--set", "client.lrr=1",
    )  # fmt: skip
    assert_clean_error(proc, 2, "--devices 3 overrides --set partition.num_devices")


# -- 13.14: certs and runs stay out of the repository -----------------------------------
def test_certs_and_runs_are_ignored_by_git() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        ["git", "check-ignore", "certs/ca.key", "runs/quickstart/config.toml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.split() == ["certs/ca.key", "runs/quickstart/config.toml"]


def test_certs_default_outside_the_tree_and_warn_inside(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = hybridfl("certs", "--devices", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    default = tmp_path / "cfg" / "hybridfl" / "certs"
    assert (default / "ca.crt").is_file()
    assert (default.stat().st_mode & 0o777) == 0o700
    tree = tmp_path / "clone"
    (tree / ".git").mkdir(parents=True)
    proc = hybridfl("certs", "certs", "--devices", "0", cwd=tree, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "inside the git work tree" in proc.stderr
