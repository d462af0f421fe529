"""Lifecycle of one simulated run: SuperLink up, app submitted, progress, teardown.

Why a child SuperLink per run: the run gets its own ``FLWR_HOME``, ports, Ray temp
folder and logs inside its run folder, so runs never share state, and every
process we start is ours to stop (also on Ctrl-C).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common.config import ExperimentConfig
from common.rows import RoundRow, TimingRow, read_rows, read_timings
from common.rundir import (
    FAILURE_FILE,
    FLWR_HOME_DIR,
    LOG_DIR,
    METRICS_FILE,
    RAY_DIR,
    SUMMARY_FILE,
    TIMINGS_FILE,
)
from simulation.flwr_cli import (
    RunnerError,
    flwr_env,
    free_port,
    run_status,
    stream_log_cmd,
    submit,
    wait_superlink,
    write_connection,
)
from simulation.procs import Processes

ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("common", "client", "server", "simulation")
STATUS_POLL_S = 30.0
STATUS_UNKNOWN_LIMIT_S = 120.0
"""How long ``flwr ls`` may fail in a row before following the run gives up."""
ENDED_LIMIT_S = 120.0
"""How long after the ServerApp's end marker the SuperLink may take to say "finished"."""
SUPERLINK_LOG = "superlink.log"
RUN_LOG = "run.log"
SUBMIT_LOG = "flwr-run.log"


def superlink_sim_command(port: int) -> list[str]:
    """``flower-superlink`` in simulation mode, every API on 127.0.0.1 only."""
    return [
        "flower-superlink", "--insecure", "--simulation",
        "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


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
        '[tool.flwr.app.config]\nconfig = ""\nrun-dir = ""\npopulation = "partition"\n'
        "resume = false\n"
    )
    return dst


def ray_tmpdir(run_dir: Path) -> Path:
    """Ray's temp folder inside the run folder.

    Ray puts Unix sockets under it, and socket paths are limited to 107 bytes;
    when the run folder's path is too long we use a short folder under /tmp and
    leave a symlink to it in the run folder.
    """
    target = run_dir / RAY_DIR
    if target.is_symlink():  # a resumed run: the short folder of its first start
        short = target.resolve()
        if len(str(short)) <= 40:
            short.mkdir(parents=True, exist_ok=True)
            return short
    elif len(str(target.resolve())) <= 40:
        target.mkdir(parents=True, exist_ok=True)
        return target
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


def submit_simulation(
    app: Path,
    run_dir: Path,
    cfg: ExperimentConfig,
    env: dict[str, str],
    log: Path,
    resume: bool = False,
) -> int:
    """``flwr run`` in simulation mode: the run id.

    The federation has ``simulation.num_slots`` virtual SuperNodes (execution slots,
    not devices: a message to a slot carries several device ids), and the ServerApp
    learns that its population is the partition, not the SuperNodes.
    """
    sim = cfg.simulation
    fed: dict[str, str | int | float | bool] = {
        "num-supernodes": sim.num_slots(os.cpu_count() or 1),
        "client-resources-num-cpus": sim.num_cpus_per_client,
        "client-resources-num-gpus": float(sim.num_gpus_per_client),
    }
    if sim.max_workers > 0 and not sim.ray_address:
        fed["init-args-num-cpus"] = sim.max_workers
    rc: dict[str, str | int | float | bool] = {
        "run-dir": str(run_dir),
        "population": "partition",
        "resume": resume,
    }
    return submit(app, env, log, rc, fed)


ProgressFn = Callable[[RoundRow, TimingRow | None], None]


def _follow(run_dir: Path, seen: int) -> Iterator[RoundRow]:
    yield from read_rows(run_dir / METRICS_FILE)[seen:]


def _timing(run_dir: Path, round_: int) -> TimingRow | None:
    return next((t for t in read_timings(run_dir / TIMINGS_FILE) if t.round == round_), None)


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
    Never waits without a deadline on the SuperLink: when ``flwr ls`` keeps failing
    for ``STATUS_UNKNOWN_LIMIT_S``, or the run does not finish within
    ``ENDED_LIMIT_S`` of the ServerApp's end marker, it raises ``RunnerError``.
    """
    seen, last_check = 0, 0.0
    unknown_since: float | None = None
    ended_at: float | None = None
    while True:
        for row in _follow(run_dir, seen):
            seen += 1
            if on_round:
                on_round(row, _timing(run_dir, row.round))
        if alive is not None:
            alive()
        now = time.monotonic()
        if ended_at is None and (
            (run_dir / SUMMARY_FILE).exists() or (run_dir / FAILURE_FILE).exists()
        ):
            ended_at = now
        if now - last_check > (1.0 if ended_at is not None else status_every_s):
            last_check = now
            try:
                status = run_status(run_id, env)
                unknown_since = None
            except RunnerError as err:
                unknown_since = unknown_since or now
                if now - unknown_since > STATUS_UNKNOWN_LIMIT_S:
                    raise RunnerError(
                        f"the SuperLink did not report the status of run {run_id} for "
                        f"{STATUS_UNKNOWN_LIMIT_S:.0f}s: {err}"
                    ) from None
                status = "unknown"
            if status.startswith("finished"):
                for row in _follow(run_dir, seen):
                    seen += 1
                    if on_round:
                        on_round(row, _timing(run_dir, row.round))
                return status
            if ended_at is not None and now - ended_at > ENDED_LIMIT_S:
                raise RunnerError(
                    f"the ServerApp ended but the SuperLink still reports run {run_id} as "
                    f"'{status}' after {ENDED_LIMIT_S:.0f}s"
                )
        time.sleep(poll_s)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_ERROR_LINE = re.compile(r"^(ERROR\b.*|\w*(Error|Exception)\b.*)$")


def cause_from_logs(logs: Path, limit: int = 600) -> str | None:
    """The last error a run's logs name (run log first, then the SuperLink's)."""
    for name in (RUN_LOG, SUPERLINK_LOG):
        path = logs / name
        if not path.exists():
            continue
        lines = [_ANSI.sub("", x).strip() for x in path.read_text(errors="replace").splitlines()]
        hits = [x for x in lines if _ERROR_LINE.match(x)]
        if hits:
            last = hits[-1]
            if last.startswith("ERROR") and ":" in last:
                last = last.split(":", 1)[1].strip()
            return last[:limit]
    return None


def failure_of(run_dir: Path) -> str | None:
    """Why a run failed: the ServerApp's ``failure.json``, else the logs' last error."""
    if (run_dir / FAILURE_FILE).exists():
        with_error = json.loads((run_dir / FAILURE_FILE).read_text()).get("error")
        if with_error:
            return str(with_error)
    return cause_from_logs(run_dir / LOG_DIR)


def simulate(
    cfg: ExperimentConfig,
    run_dir: Path,
    on_round: ProgressFn | None = None,
    poll_s: float = 0.5,
    resume: bool = False,
) -> RunResult:
    """Run a prepared run folder under a fresh SuperLink in simulation mode (``resume``:
    continue its run from the last checkpoint)."""
    run_dir = run_dir.resolve()
    logs = run_dir / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / FLWR_HOME_DIR
    port = free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}")
    env = flwr_env(flwr_home, ray_tmpdir(run_dir), cfg.simulation.ray_address)
    procs = Processes()
    t0 = time.perf_counter()
    try:
        link_log = logs / SUPERLINK_LOG
        link = procs.start(superlink_sim_command(port), env, link_log, cwd=run_dir, plain=True)
        wait_superlink(port, link, link_log)
        run_id = submit_simulation(app_dir(run_dir), run_dir, cfg, env, logs / SUBMIT_LOG, resume)
        procs.start(stream_log_cmd(run_id), env, logs / RUN_LOG, cwd=flwr_home, plain=True)

        def superlink_alive() -> None:
            if link.poll() is not None:
                raise RunnerError(
                    f"SuperLink exited unexpectedly (code {link.returncode}); see {link_log}"
                )

        # The ServerApp writes summary.json or failure.json as it ends; until then
        # follow_run asks the SuperLink rarely (each `flwr ls` costs ~1 s of CPU that
        # the devices would otherwise use), in case the ServerApp died without a word.
        status = follow_run(run_id, run_dir, env, on_round, superlink_alive, poll_s)
        failure = None if status == "finished:completed" else failure_of(run_dir)
        return RunResult(run_id, status, time.perf_counter() - t0, run_dir, failure)
    finally:
        procs.stop_all()


__all__ = [
    "RunResult",
    "RunnerError",
    "app_dir",
    "cause_from_logs",
    "failure_of",
    "follow_run",
    "ray_tmpdir",
    "simulate",
    "submit_simulation",
    "superlink_sim_command",
]
