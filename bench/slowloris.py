"""Slow clients against the model server: uvicorn's defaults versus ``hybridfl serve``'s.

Run: ``python bench/slowloris.py [--connections 1000] [--duration 30] [--trickle 5]``.

Side by side in one run, each server a child process on 127.0.0.1 serving the same
one-version registry: (a) ``uvicorn.Config(app)`` with its defaults (what ``hybridfl
serve`` ran before), (b) ``server.http_transport.server_config`` (header deadline
``--header-timeout``, default 10 s). Against each: ``--connections`` sockets send a
partial request header, then one more header byte every ``--trickle`` seconds (a
slowloris client), for ``--duration`` seconds. Reported: connections the server still
held at the end, when it closed the others, and the latency of a normal request made
in the middle of the attack. Plain HTTP: TLS only adds the handshake (bounded by
asyncio's 60 s) in front of the same protocol.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC = {"name": "logistic", "input_shape": [1, 8, 8], "num_classes": 10}


def serve(mode: str, run_dir: Path, port_file: Path, header_timeout: float) -> None:
    """Child process: the model server with uvicorn's defaults or with ours."""
    import uvicorn

    from server.http import create_app
    from server.http_transport import server_config

    app = create_app(run_dir, token=None)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port_file.write_text(str(sock.getsockname()[1]))
    if mode == "default":
        cfg = uvicorn.Config(app, log_level="warning", access_log=False)
    else:
        cfg = server_config(app, "127.0.0.1", 0, header_timeout_s=header_timeout, access_log=False)
    uvicorn.Server(cfg).run(sockets=[sock])


def _publish(run_dir: Path) -> None:
    from common.models import ModelSpec, build_model
    from common.rundir import REGISTRY_DIR
    from common.weights import model_to_arrays
    from server.registry import Registry

    arrays = model_to_arrays(build_model(ModelSpec.model_validate(SPEC)))
    Registry(run_dir / REGISTRY_DIR).publish(arrays, round=0, model=SPEC)


def _start(mode: str, run_dir: Path, header_timeout: float) -> tuple[subprocess.Popen[bytes], int]:
    port_file = run_dir.parent / f"port-{mode}"
    port_file.unlink(missing_ok=True)
    args = ["--serve", mode, "--run-dir", str(run_dir), "--port-file", str(port_file)]
    args += ["--header-timeout", str(header_timeout)]
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text():
            port = int(port_file.read_text())
            try:
                _request(port)
                return proc, port
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{mode} server did not start")


def _request(port: int) -> float:
    """Seconds for one complete GET /healthz on a fresh connection."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        raise OSError(f"unexpected answer {data[:40]!r}")
    return time.perf_counter() - t0


def attack(port: int, n: int, duration: float, trickle: float) -> dict[str, float]:
    socks: list[socket.socket] = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        socks.append(s)
    t0 = time.monotonic()
    closed: dict[int, float] = {}
    last_trickle, probe = t0, float("nan")
    while time.monotonic() - t0 < duration:
        now = time.monotonic()
        send = now - last_trickle >= trickle
        for i, s in enumerate(socks):
            if i in closed:
                continue
            try:
                if send:
                    s.send(b"x")
                if s.recv(1) == b"":
                    closed[i] = now - t0
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                closed[i] = now - t0
        if send:
            last_trickle = now
        if probe != probe and now - t0 >= duration / 2:  # nan: not yet measured
            probe = _request(port)
        time.sleep(0.05)
    for s in socks:
        s.close()
    times = sorted(closed.values())
    return {
        "held": n - len(closed),
        "median_close_s": statistics.median(times) if times else float("nan"),
        "max_close_s": times[-1] if times else float("nan"),
        "probe_s": probe,
    }


def _secs(x: float) -> str:
    return "never" if x != x else f"{x:.1f}s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--trickle", type=float, default=5.0)
    ap.add_argument("--header-timeout", type=float, default=10.0)
    ap.add_argument("--serve", choices=["default", "hybridfl"])
    ap.add_argument("--run-dir", type=Path)
    ap.add_argument("--port-file", type=Path)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.run_dir, args.port_file, args.header_timeout)
        return
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min)")
    print(
        f"{args.connections} slow clients, one header byte every {args.trickle:g}s, "
        f"for {args.duration:g}s; header timeout (b): {args.header_timeout:g}s\n"
    )
    print(
        f"{'server':<28} {'held at end':>11} {'median close':>13} {'last close':>11} {'probe':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _publish(run_dir)
        for mode, label in (
            ("default", "(a) uvicorn defaults"),
            ("hybridfl", "(b) hybridfl serve"),
        ):
            proc, port = _start(mode, run_dir, args.header_timeout)
            try:
                r = attack(port, args.connections, args.duration, args.trickle)
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            print(
                f"{label:<28} {r['held']:>11.0f} {_secs(r['median_close_s']):>13} "
                f"{_secs(r['max_close_s']):>11} {r['probe_s'] * 1000:>6.0f}ms",
                flush=True,
            )
    print(f"\nload after: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
