"""Lifecycle of one simulated run: SuperLink up, app submitted, progress, teardown.

Why a child SuperLink per run: the run gets its own ``FLWR_HOME``, ports, Ray temp
folder and logs inside its run folder, so runs never share state, and every
process we start is ours to stop (also on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.config import ExperimentConfig
from common.rundir import (
    FAILURE_FILE,
    LOG_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
    read_jsonl,
)
from simulation.procs import Processes

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("common", "client", "server", "simulation")
CONNECTION = "hybridfl"
STATUS_POLL_S = 30.0


class RunnerError(RuntimeError):
    """The run could not be started or did not finish successfully."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_env(flwr_home: Path, ray_tmp: Path | None = None, ray_address: str = "") -> dict[str, str]:
    """Environment for every Flower process of a run: isolated and quiet."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    else:
        env.pop("RAY_ADDRESS", None)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def write_flower_config(flwr_home: Path, address: str) -> None:
    """A Flower config with one connection, so ``flwr`` talks to our SuperLink only."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def app_dir(run_dir: Path) -> Path:
    """The Flower App to submit: the source tree, or a copy when installed as a wheel."""
    if (ROOT / "pyproject.toml").is_file() and "tool.flwr.app" in (
        ROOT / "pyproject.toml"
    ).read_text():
        return ROOT
    dst = run_dir / "app"
    if dst.exists():
        shutil.rmtree(dst)
    for pkg in APP_PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "hybridfl"\nversion = "0.1.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "hybridfl"\n\n[tool.flwr.app.components]\n'
        'serverapp = "server.app:app"\nclientapp = "client.app:app"\n\n'
        '[tool.flwr.app.config]\nconfig = ""\nrun-dir = ""\n'
    )
    return dst


def ray_tmpdir(run_dir: Path) -> Path:
    """Ray's temp folder inside the run folder.

    Ray puts Unix sockets under it, and socket paths are limited to 107 bytes;
    when the run folder's path is too long we use a short folder under /tmp and
    leave a symlink to it in the run folder.
    """
    target = run_dir / "ray"
    if len(str(target.resolve())) <= 40:
        target.mkdir(parents=True, exist_ok=True)
        return target
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="hfl-ray-"))
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(short, target_is_directory=True)
    return short


@dataclass
class RunResult:
    run_id: int
    status: str
    wall_s: float
    run_dir: Path
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def wait_healthy(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RunnerError(f"SuperLink exited with code {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        time.sleep(0.2)
    raise RunnerError(f"SuperLink did not become healthy within {timeout_s:.0f}s; see {log}")


def run_status(run_id: int, env: dict[str, str]) -> str:
    """The run's real status from the SuperLink (the ``flwr run`` exit code lacks it)."""
    out = subprocess.run(
        ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def _submit(app: Path, run_dir: Path, cfg: ExperimentConfig, env: dict[str, str], log: Path) -> int:
    sim = cfg.simulation
    fed = [
        f"num-supernodes={cfg.partition.num_devices}",
        f"client-resources-num-cpus={sim.num_cpus_per_client}",
        f"client-resources-num-gpus={float(sim.num_gpus_per_client)}",
    ]
    if sim.max_workers > 0 and not sim.ray_address:
        fed.append(f"init-args-num-cpus={sim.max_workers}")
    cmd = [
        "flwr", "run", str(app), CONNECTION,
        "--run-config", f'run-dir="{run_dir}"',
        "--federation-config", " ".join(fed),
        "--format", "json",
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    with log.open("a") as f:
        f.write(out.stdout + out.stderr)
    try:
        payload = json.loads(out.stdout[out.stdout.index("{") :])
        return int(payload["run-id"])
    except (ValueError, KeyError, TypeError):
        raise RunnerError(
            f"flwr run failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}"
        ) from None


ProgressFn = Callable[[dict[str, object], dict[str, object]], None]


def _follow(path: Path, seen: int) -> Iterator[dict[str, object]]:
    rows = read_jsonl(path)
    yield from rows[seen:]


def follow_run(
    run_id: int,
    run_dir: Path,
    env: dict[str, str],
    on_round: ProgressFn | None = None,
    alive: Callable[[], None] | None = None,
    poll_s: float = 0.5,
    status_every_s: float = STATUS_POLL_S,
) -> str:
    """Stream ``metrics.jsonl`` until the SuperLink says the run finished; its status.

    ``alive`` raises when a process the run depends on died (e.g. the SuperLink).
    """
    seen, last_check, status = 0, 0.0, "unknown"
    while True:
        for row in _follow(run_dir / METRICS_FILE, seen):
            seen += 1
            if on_round:
                timings = _follow(run_dir / TIMINGS_FILE, 0)
                on_round(row, next((t for t in timings if t.get("round") == row["round"]), {}))
        if alive is not None:
            alive()
        ended = (run_dir / SUMMARY_FILE).exists() or (run_dir / FAILURE_FILE).exists()
        now = time.monotonic()
        if now - last_check > (1.0 if ended else status_every_s):
            last_check = now
            status = run_status(run_id, env)
            if status.startswith("finished"):
                for row in _follow(run_dir / METRICS_FILE, seen):
                    seen += 1
                    if on_round:
                        on_round(row, {})
                return status
        time.sleep(poll_s)


def failure_of(run_dir: Path) -> str | None:
    if (run_dir / FAILURE_FILE).exists():
        return str(json.loads((run_dir / FAILURE_FILE).read_text()).get("error"))
    return None


def simulate(
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: ProgressFn | None = None,
    poll_s: float = 0.5,
) -> RunResult:
    """Run a prepared run folder under a fresh SuperLink in simulation mode."""
    run_dir = run_dir.resolve()
    logs = run_dir / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / "flwr_home"
    port = free_port()
    write_flower_config(flwr_home, f"127.0.0.1:{port}")
    env = flwr_env(flwr_home, ray_tmpdir(run_dir), cfg.simulation.ray_address)
    procs = Processes()
    t0 = time.perf_counter()
    try:
        link_log = logs / "superlink.log"
        link = procs.start(
            [
                "flower-superlink", "--insecure", "--simulation",
                "--isolation", "subprocess",
                "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation",
            ],
            env,
            link_log,
            cwd=run_dir,
        )  # fmt: skip
        wait_healthy(port, link, link_log)
        run_id = _submit(app_dir(run_dir), run_dir, cfg, env, logs / "flwr-run.log")
        procs.start(
            ["flwr", "log", str(run_id), CONNECTION, "--stream"], env, logs / "run.log", cwd=run_dir
        )

        def superlink_alive() -> None:
            if link.poll() is not None:
                raise RunnerError(
                    f"SuperLink exited unexpectedly (code {link.returncode}); see {link_log}"
                )

        # The ServerApp writes summary.json or failure.json as it ends; until then
        # follow_run asks the SuperLink rarely (each `flwr ls` costs ~1 s of CPU that
        # the devices would otherwise use), in case the ServerApp died without a word.
        status = follow_run(run_id, run_dir, env, on_round, superlink_alive, poll_s)
        failure = failure_of(run_dir)
        return RunResult(run_id, status, time.perf_counter() - t0, run_dir, failure)
    finally:
        procs.stop_all()
