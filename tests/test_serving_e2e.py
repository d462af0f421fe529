"""Hybrid serving end to end: a run serves each global version while it trains, and the
model fetched over HTTP afterwards reproduces the run's reported global test accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common.evaluation import evaluate

from client.fetch import fetch_model, load_fetched_model
from common.config import load_config
from common.data import load_dataset
from simulation.runner import free_port
from tests.conftest import processes_mentioning

CLI = [sys.executable, "-m", "simulation.cli"]


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


def test_fetch_during_and_after_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    port = free_port()
    sim = subprocess.Popen(
        [
            *CLI, "simulate", "--out", str(run_dir), "--serve", "--port", str(port),
            "--set", "rounds=25", "--set", "partition.num_devices=6",
            "--set", 'model.name="mlp2nn"', "--set", "evaluation.every=5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/healthz", sim)
        # During training: wait for the first aggregate, fetch it while rounds go on.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            info = httpx.get(f"{url}/v1/models/global", timeout=5).json()
            if (info.get("latest_version") or 0) >= 1:
                break
            time.sleep(0.3)
        during = fetch_model(url, alias="serving", cache_dir=tmp_path / "cache")
        assert during.manifest.version >= 1 and during.downloaded
        assert sim.poll() is None, "the run should still be training"
        load_fetched_model(during)
        out, _ = sim.communicate(timeout=300)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    assert sim.returncode == 0, out.decode(errors="replace")[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    final_sha = json.loads((run_dir / "final_model.json").read_text())["sha256"]

    # After training: serve the finished run folder and fetch what it serves.
    port2 = free_port()
    serve = subprocess.Popen(
        [*CLI, "serve", str(run_dir), "--port", str(port2)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url2 = f"http://127.0.0.1:{port2}"
        _wait_http(f"{url2}/readyz", serve)
        after = fetch_model(url2, alias="serving", cache_dir=tmp_path / "cache")
        assert after.sha256 == final_sha
        again = fetch_model(url2, alias="serving", cache_dir=tmp_path / "cache")
        assert not again.downloaded and again.bytes == 0
    finally:
        serve.terminate()
        serve.wait(timeout=10)

    model = load_fetched_model(after)
    ds = load_dataset(load_config(run_dir / "config.toml").data)
    x = torch.from_numpy(np.ascontiguousarray(ds.x_test))
    y = torch.from_numpy(ds.y_test).long()
    _, acc = evaluate(model, x, y)
    assert acc == summary["last"]["global_test_acc"]
    assert processes_mentioning(str(run_dir)) == []
