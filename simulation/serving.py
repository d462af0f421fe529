"""The model server as a child process of ``hybridfl simulate --serve`` and ``deploy``.

A separate process, so serving never competes with the ServerApp's round loop
for the GIL, and it is stopped with everything else the run started.

Why check who listens: a readiness probe on a port another server already holds is
answered by that server (e.g. ``hybridfl serve`` of another run), so "it answers"
proves nothing. A busy port is refused before starting, and the server counts as up
only once our child process itself holds the listening socket.
"""

from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from common.rundir import LOG_DIR, REGISTRY_DIR
from simulation.certs import CertFiles
from simulation.flwr_cli import RunnerError, free_port, wait_http_ok
from simulation.procs import Processes, descendants, listening_sockets

MODEL_SERVER_LOG = "model-server.log"
START_TIMEOUT_S = 30.0


@dataclass
class ModelServer:
    url: str
    procs: Processes

    def stop(self) -> None:
        self.procs.stop_all(grace_s=5)


def check_port_free(host: str, port: int) -> None:
    """Raise ``RunnerError`` naming the port when ``host:port`` cannot be bound now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as err:
            why = (
                "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err})"
            )
            raise RunnerError(
                f"--port {port}: {host}:{port} {why}; choose another --port (0 picks a free one)"
            ) from None


def start_model_server(
    run_dir: Path, host: str = "127.0.0.1", port: int = 0, certs: CertFiles | None = None
) -> ModelServer:
    """Start ``hybridfl serve`` on the run folder and wait until it answers, as itself.

    ``certs``: HTTPS with the certificate folder's server certificate (its hosts),
    checked against its CA while waiting.
    """
    if port:
        check_port_free(host, port)
    else:
        port = free_port()
    (run_dir / REGISTRY_DIR).mkdir(parents=True, exist_ok=True)
    procs = Processes()
    log = run_dir / LOG_DIR / MODEL_SERVER_LOG
    cmd = [sys.executable, "-m", "simulation.cli", "serve", str(run_dir)]
    cmd += ["--host", host, "--port", str(port)]
    if certs is not None:
        cmd += ["--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key)]
    proc = procs.start(cmd, env=None, log=log)
    scheme = "https" if certs is not None else "http"
    url = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    verify: str | bool = str(certs.ca_cert) if certs is not None else False

    def ours(_: httpx.Response) -> bool:
        pids = [proc.pid, *descendants(proc.pid)]
        return any(p == port for _, _, p in listening_sockets(pids))

    try:
        wait_http_ok(
            f"{url}/healthz", proc, log, "the model server", START_TIMEOUT_S, verify, accept=ours
        )
    except RunnerError:
        procs.stop_all(grace_s=2)
        raise
    return ModelServer(f"{scheme}://{host}:{port}", procs)


__all__ = ["ModelServer", "check_port_free", "start_model_server"]
