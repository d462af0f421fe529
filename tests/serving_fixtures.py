"""Shared helpers for the registry / model-server / fetch tests.

Plain helpers, no fixtures (tests/conftest.py is the lead's): modules build their
own small fixtures on ``start_model_server_process`` / ``running_servers``. The model server runs as
a real uvicorn subprocess on a free 127.0.0.1 port (bound by the child itself,
so no port race), and every process started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from common.rundir import REGISTRY_DIR
from simulation.procs import guarded

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
SPEC = {"name": "mlp2nn", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": 32}
BIG_SPEC = {"name": "mlp2nn", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": 1024}
"""About 4.5 MB of float32: several 1 MiB chunks, so transfers can be cut midway."""

_LAUNCHER = """
import os, socket, sys
from pathlib import Path
import uvicorn
from server.http import create_app
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
app = create_app(
    Path(sys.argv[1]),
    token=os.environ.get("HYBRIDFL_TEST_TOKEN") or None,
    memory_cache_bytes=int(sys.argv[2]),
)
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
"""


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str
    run_dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_model_server_process(
    run_dir: Path,
    *,
    token: str | None = None,
    memory_cache_bytes: int = 64 << 20,
    extra_path: Path | None = None,
) -> ServerProcess:
    """Start ``create_app(run_dir, token)`` under uvicorn and wait for /healthz.

    ``extra_path`` goes on the child's ``PYTHONPATH`` (e.g. a stand-in package).
    """
    path = str(ROOT) if extra_path is None else f"{ROOT}{os.pathsep}{extra_path}"
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("HYBRIDFL_TEST_TOKEN", None)
    if token is not None:
        env["HYBRIDFL_TEST_TOKEN"] = token
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(run_dir), str(memory_cache_bytes)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        **guarded(env),
        text=True,
    )
    server = ServerProcess(proc, "", Path(run_dir))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"model server did not start (rc={proc.poll()})")
        server.url = f"http://127.0.0.1:{line}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("model server did not become healthy")
            time.sleep(0.02)
    except BaseException:
        server.stop()
        raise


@contextlib.contextmanager
def running_servers() -> Iterator[Callable[..., ServerProcess]]:
    """``start(run_dir, token=...)``; every server started is stopped on exit.

    Test modules wrap it in their own ``server_factory`` fixture.
    """
    started: list[ServerProcess] = []

    def start(run_dir: Path, **kwargs: object) -> ServerProcess:
        server = start_model_server_process(run_dir, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def model_arrays(seed: int, spec: dict | None = None) -> dict[str, np.ndarray]:
    """Real model weights (so fetched versions can be rebuilt and loaded)."""
    from common.models import ModelSpec, build_model
    from common.weights import model_to_arrays

    return model_to_arrays(build_model(ModelSpec.model_validate(spec or SPEC), seed=seed))


def publish_many(registry: object, count: int, spec: dict | None = None, start: int = 0) -> list:
    """Publish ``count`` versions with distinct weights; returns their manifests."""
    return [
        registry.publish(  # type: ignore[attr-defined]
            model_arrays(start + i, spec),
            round=start + i,
            model=spec or SPEC,
            metrics={"accuracy": 0.5 + 0.01 * i},
        )
        for i in range(count)
    ]


def blob_bytes(run_dir: Path, sha256: str) -> bytes:
    return (run_dir / REGISTRY_DIR / "blobs" / f"{sha256}.safetensors").read_bytes()


def _publish_until(root: str, stage: str, conn: multiprocessing.connection.Connection) -> None:
    """Child: publish, but stop at ``stage`` and wait there to be killed."""
    import time

    def hook(reached: str) -> None:
        if reached == stage:
            conn.send("paused")
            time.sleep(60)

    import server.registry as registry_module

    registry_module._checkpoint = hook
    registry_module.Registry(Path(root)).publish(model_arrays(99), round=99, model=SPEC)
    conn.send("finished")


def publish_and_kill(root: Path, stage: str) -> None:
    """Run a publish in a child process and SIGKILL it at ``stage``.

    fork: the child starts in milliseconds with numpy/torch already imported.
    """
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_publish_until, args=(str(root), stage, child))
    proc.start()
    try:
        assert parent.poll(30), "publisher never reached the kill point"
        assert parent.recv() == "paused"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
