"""Shared test helpers: the workplace's datasets, process-leak checks, and the real
runs that the default run's end-to-end tests share.

The shared run (``served_run``, session scope) is one ``hybridfl simulate --serve``
(``SERVED_RUN_SETS``): a real SuperLink, Ray workers, the ServerApp/ClientApp and the
model server. Starting them costs ~20 s of a 2-core machine, so the test session
starts them once, in the background as soon as collection shows that a selected test
needs them, and several tests read what that run left: its exit code and output, its
run folder, and one model fetched over HTTP while it was still training. The one real
deployment over TLS (``tls_deployment``, see ``tests/tls_deployment.py``) starts the
same way.

To add an end-to-end assertion, take ``served_run`` as a fixture and assert on those
user-visible things (files in the run folder, CLI lines, the HTTP API), never on the
run's timing. A check that needs a run of its own (another config, Ctrl-C, a second
run to compare) belongs behind ``@pytest.mark.slow``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    import numpy as np
    import torch

    from client.fetch import FetchResult
    from tests.tls_deployment import TlsDeployment

REPO = Path(__file__).resolve().parents[1]
HYBRIDFL = [sys.executable, "-m", "simulation.cli"]


def shared_data_dir() -> Path:
    env = os.environ.get("HYBRIDFL_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_shared(name: str) -> Path:
    """Path of a dataset file in ../shared/data, or skip with the reason."""
    p = shared_data_dir() / name
    if not p.exists():
        pytest.skip(f"../shared/data not present: {p} missing (set HYBRIDFL_SHARED_DATA)")
    return p


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions ``text`` (leak detection)."""
    found = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(d.name))
    return found


def assert_no_leftovers(path: Path, within_s: float = 15.0) -> None:
    """No process that mentions ``path`` survives (give teardown ``within_s`` to finish)."""
    deadline = time.monotonic() + within_s
    while processes_mentioning(str(path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(path)) == []


# -- independent scoring (no hybridfl evaluation code) --------------------------------
def model_from(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a model from its manifest spec and load ``arrays`` (all keys)."""
    from common.models import ModelSpec, build_model
    from common.weights import load_arrays

    model = build_model(ModelSpec.model_validate(spec))
    load_arrays(model, arrays, strict=True)
    return model.eval()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` that ``model`` labels as ``y``: correct / n, computed here."""
    import numpy as np
    import torch

    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(np.ascontiguousarray(x)))
    correct = int((logits.argmax(dim=1).numpy() == np.asarray(y)).sum())
    return correct / len(y)


# -- the shared real run ---------------------------------------------------------------
SERVED_RUN_ROUNDS = 4
SERVED_RUN_SETS = (
    f"rounds={SERVED_RUN_ROUNDS}",
    "partition.num_devices=6",
    "strategy.fraction_train=0.5",
    'model.name="mlp2nn"',
    "seed=7",
    "simulation.max_workers=1",  # one Ray worker: 6 small devices need no more
)
"""What ``served_run`` runs; a slow test reruns the same sets to compare."""


@dataclass(frozen=True)
class ServedRun:
    """What one ``hybridfl simulate --serve`` left behind (see the module docstring)."""

    run_dir: Path
    returncode: int
    output: str
    """The CLI's stdout and stderr, interleaved."""
    url: str
    """The run's model server (stopped when the run ended)."""
    during: FetchResult | None
    """``serving`` fetched over HTTP once version 1 existed, while rounds went on."""
    during_error: str
    still_running_after_fetch: bool
    """The CLI had not exited when that fetch returned."""
    cache_dir: Path


def _fetch_while_training(
    url: str, proc: subprocess.Popen[bytes], cache: Path
) -> tuple[FetchResult | None, str, bool]:
    """Wait for the server, then for version >= 1; fetch ``serving``. Never raises."""
    import httpx

    from client.fetch import fetch_model

    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                info = httpx.get(f"{url}/v1/models/global", timeout=2).json()
                if (info.get("latest_version") or 0) >= 1:
                    got = fetch_model(url, alias="serving", cache_dir=cache)
                    return got, "", proc.poll() is None
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return None, f"no version >= 1 served (CLI exit code {proc.poll()})", False
    except Exception as err:  # reported by the test that needs it, not here
        return None, f"{type(err).__name__}: {err}", False


class _ServedRunJob:
    """The shared run in the background: the CLI process and a thread that fetches from
    its model server while it trains, then waits for it to exit."""

    def __init__(self, root: Path) -> None:
        from simulation.runner import free_port

        self.root = root
        self.run_dir, self.cache, self.log = root / "run", root / "cache", root / "cli.out"
        self.url = f"http://127.0.0.1:{free_port()}"
        sets = [a for s in SERVED_RUN_SETS for a in ("--set", s)]
        port = self.url.rsplit(":", 1)[1]
        cmd = [*HYBRIDFL, "simulate", "--out", str(self.run_dir), "--serve", "--port", port]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, *sets], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )
        self.fetched: tuple[FetchResult | None, str, bool] = (None, "not fetched yet", False)
        self.thread = threading.Thread(target=self._follow, name="served-run", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        self.fetched = _fetch_while_training(self.url, self.proc, self.cache)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=SERVED_RUN_TIMEOUT_S)

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> ServedRun:
        self.thread.join(timeout=SERVED_RUN_TIMEOUT_S)
        if self.proc.poll() is None:
            self.stop()
            raise AssertionError(f"the shared run did not finish in {SERVED_RUN_TIMEOUT_S} s")
        during, error, running = self.fetched
        return ServedRun(
            run_dir=self.run_dir.resolve(),
            returncode=self.proc.returncode,
            output=self.log.read_text(errors="replace"),
            url=self.url,
            during=during,
            during_error=error,
            still_running_after_fetch=running,
            cache_dir=self.cache,
        )

    def stop(self) -> None:
        """Ctrl-C (the CLI then stops everything it started), SIGKILL if that hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


SERVED_RUN_TIMEOUT_S = 600


class _Job(Protocol):
    def running(self) -> bool: ...
    def result(self) -> Any: ...
    def stop(self) -> None: ...


def _job_kinds() -> dict[str, Callable[[Path], _Job]]:
    """Session fixtures whose real processes run in the background, in this order."""
    from tests.tls_deployment import TlsDeploymentJob

    return {"served_run": _ServedRunJob, "tls_deployment": TlsDeploymentJob}


_jobs: dict[str, _Job] = {}
_queued: dict[str, Callable[[], Path]] = {}
"""Jobs a selected test needs, not started yet: name -> how to make its folder."""


def _start_job(name: str, root: Callable[[], Path]) -> _Job:
    """The job ``name``, started now in a new folder ``root()`` unless it already runs."""
    if name not in _jobs:
        _queued.pop(name, None)
        _jobs[name] = _job_kinds()[name](root())
    return _jobs[name]


def _start_next() -> None:
    """Start the next queued job once no other runs.

    Why one at a time: each keeps about one of CI's two cores busy, and the unit
    tests need the other; two at once would slow all three down, not finish sooner.
    """
    if _queued and not any(job.running() for job in _jobs.values()):
        name = next(iter(_queued))
        _start_job(name, _queued[name])


def _job_order(item: pytest.Item) -> int:
    """0 for a test that needs no background run, else 1 + the position of its run."""
    used = set(getattr(item, "fixturenames", ()))
    return next((i + 1 for i, name in enumerate(_job_kinds()) if name in used), 0)


def pytest_collection_modifyitems(session: pytest.Session, items: list[pytest.Item]) -> None:
    """Tests that read a background run go last, in the order the runs finish (stable
    order otherwise), so the unit tests run meanwhile instead of waiting halfway."""
    items.sort(key=_job_order)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Queue the shared real runs that a selected test needs, and start the first.

    Why in the background: they mostly wait on process start-ups (SuperLink, Ray,
    ServerApp, ClientApp processes), so on 2 cores the unit tests run alongside
    instead of after; the fixture then just collects the result.
    """
    if session.config.option.collectonly:
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's tmp_path root
    for name in _job_kinds():
        if name in wanted and name not in _jobs:

            def root(name: str = name) -> Path:
                return Path(factory.mktemp(name) if factory else tempfile.mkdtemp(prefix=name))

            _queued[name] = root
    _start_next()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _start_next()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for job in _jobs.values():
        job.stop()


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> ServedRun:
    """One real ``hybridfl simulate --serve`` run, shared by the default e2e tests."""
    job = _start_job("served_run", lambda: tmp_path_factory.mktemp("served_run"))
    result: ServedRun = job.result()  # selected in a way collection did not show: started now
    return result


@pytest.fixture(scope="session")
def tls_deployment(tmp_path_factory: pytest.TempPathFactory) -> TlsDeployment:
    """One real deployment over TLS with node auth (``tests/tls_deployment.py``)."""
    job = _start_job("tls_deployment", lambda: tmp_path_factory.mktemp("tls_deployment"))
    result: TlsDeployment = job.result()
    return result
