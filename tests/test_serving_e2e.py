"""Hybrid serving end to end: a run serves each global version while it trains, and the
model fetched over HTTP afterwards reproduces the run's reported global test accuracy.

Both read the shared real run (``served_run`` in conftest.py): a ``simulate --serve``
whose model server was fetched from while rounds were still going on.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

from client.fetch import fetch_model, load_fetched_model
from common.config import load_config
from common.data import load_dataset
from common.rundir import read_jsonl
from simulation.runner import free_port
from tests.conftest import (
    HYBRIDFL,
    SERVED_RUN_ROUNDS,
    ServedRun,
    accuracy,
    assert_no_leftovers,
)


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server process exited"
        try:
            if httpx.get(url, timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def test_a_version_is_fetched_while_the_run_trains(served_run: ServedRun) -> None:
    assert served_run.returncode == 0, served_run.output[-3000:]
    assert f"model server: {served_run.url}" in served_run.output
    during = served_run.during
    assert during is not None, served_run.during_error
    assert during.downloaded and during.bytes > 0
    # Served before the last round's version existed, while the CLI was still running.
    assert 1 <= during.manifest.version < SERVED_RUN_ROUNDS
    assert served_run.still_running_after_fetch
    # What was served then is the model of that round, as the run recorded it.
    run_dir = served_run.run_dir
    rounds = {int(r["round"]): r for r in read_jsonl(run_dir / "metrics.jsonl")}  # type: ignore[call-overload]
    assert during.manifest.round in rounds
    model = load_fetched_model(during)
    ds = load_dataset(load_config(run_dir / "config.toml").data)
    assert rounds[during.manifest.round]["global_test_acc"] == accuracy(model, ds.x_test, ds.y_test)
    # The run's own server stopped with the run.
    try:
        httpx.get(f"{served_run.url}/healthz", timeout=2)
        raise AssertionError("the run's model server still answers after the run")
    except httpx.TransportError:
        pass


def test_serve_the_finished_run_and_fetch_what_it_reported(
    served_run: ServedRun, tmp_path: Path
) -> None:
    assert served_run.returncode == 0, served_run.output[-3000:]
    run_dir = served_run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    final_sha = json.loads((run_dir / "final_model.json").read_text())["sha256"]
    port = free_port()
    serve = subprocess.Popen(
        [*HYBRIDFL, "serve", str(run_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cache = tmp_path / "cache"
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/readyz", serve)
        after = fetch_model(url, alias="serving", cache_dir=cache)
        assert after.sha256 == final_sha and after.manifest.version == SERVED_RUN_ROUNDS
        again = fetch_model(url, alias="serving", cache_dir=cache)
        assert not again.downloaded and again.bytes == 0
    finally:
        serve.terminate()
        serve.wait(timeout=10)
    model = load_fetched_model(after)
    ds = load_dataset(load_config(run_dir / "config.toml").data)
    assert accuracy(model, ds.x_test, ds.y_test) == summary["last"]["global_test_acc"]
    assert_no_leftovers(run_dir)
