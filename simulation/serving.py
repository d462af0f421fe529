"""The model server as a child process of ``hybridfl simulate --serve``.

A separate process, so serving never competes with the ServerApp's round loop
for the GIL, and it is stopped with everything else the run started.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.rundir import LOG_DIR
from simulation.procs import Processes
from simulation.runner import RunnerError, free_port


@dataclass
class ModelServer:
    url: str
    procs: Processes

    def stop(self) -> None:
        self.procs.stop_all(grace_s=5)


def start_model_server(run_dir: Path, host: str = "127.0.0.1", port: int = 0) -> ModelServer:
    """Start ``hybridfl serve`` on the run folder and wait until it answers."""
    port = port or free_port()
    (run_dir / "registry").mkdir(parents=True, exist_ok=True)
    procs = Processes()
    log = run_dir / LOG_DIR / "model-server.log"
    cmd = [sys.executable, "-m", "simulation.cli", "serve", str(run_dir)]
    proc = procs.start([*cmd, "--host", host, "--port", str(port)], env=None, log=log)
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunnerError(f"model server exited: {log.read_text(errors='replace')[-1000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).is_success:
                return ModelServer(url, procs)
        time.sleep(0.2)
    procs.stop_all()
    raise RunnerError(f"model server did not start within 30 s; see {log}")


__all__ = ["ModelServer", "start_model_server"]
