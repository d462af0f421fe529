"""M3: the model server over TLS, verified against our CA, and bounded waits.

One real ``hybridfl serve --certfile/--keyfile`` process (module fixture) with a
1 s header deadline and 1 s keep-alive; real TLS sockets play slow clients.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from client.fetch import FetchError, fetch_model, load_fetched_model
from common.rundir import REGISTRY_DIR
from server.registry import Registry
from simulation.certs import CertFiles, make_certs
from simulation.flwr_cli import free_port, wait_http_ok
from simulation.procs import Processes
from tests.conftest import HYBRIDFL, assert_no_leftovers
from tests.serving_fixtures import publish_many

HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1
SLACK_S = 3.0
"""Beyond the deadline, for a loaded 2-core CI machine; without the deadline these
connections stay open until the test gives up (never closed)."""


@dataclass
class TlsServer:
    url: str
    port: int
    certs: CertFiles
    run_dir: Path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    root = tmp_path_factory.mktemp("tls_serve")
    run_dir = root / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 2)
    certs = make_certs(root / "certs", 0)
    port, procs = free_port(), Processes()
    log = root / "serve.log"
    cmd = [*HYBRIDFL, "serve", str(run_dir), "--port", str(port)]
    cmd += ["--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key)]
    cmd += ["--header-timeout", str(HEADER_TIMEOUT_S), "--keep-alive", str(KEEP_ALIVE_S)]
    proc = procs.start(cmd, None, log)
    url = f"https://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/healthz", proc, log, "hybridfl serve", 60, str(certs.ca_cert))
        yield TlsServer(url, port, certs, run_dir)
    finally:
        procs.stop_all(grace_s=5)
    assert_no_leftovers(run_dir)


def test_fetch_over_tls_verifies_against_our_ca(tls_server: TlsServer, tmp_path: Path) -> None:
    res = fetch_model(tls_server.url, cache_dir=tmp_path / "c", ca_cert=tls_server.certs.ca_cert)
    assert res.downloaded and res.manifest.version == 1
    load_fetched_model(res)
    # Without our CA (the system's) or with another CA: refused, and the message says why.
    other = make_certs(tmp_path / "other", 0)
    for ca in (None, other.ca_cert):
        with pytest.raises(FetchError, match=r"did not verify.*--ca-cert"):
            fetch_model(tls_server.url, cache_dir=tmp_path / "d", ca_cert=ca)
    assert not list((tmp_path / "d").glob("*.safetensors"))
    # A CA only makes sense with https: a plain URL is refused before any request.
    with pytest.raises(FetchError, match="not https://"):
        fetch_model("http://127.0.0.1:1", cache_dir=tmp_path / "e", ca_cert=other.ca_cert)


@pytest.mark.slow
def test_fetch_command_takes_the_ca(tls_server: TlsServer, tmp_path: Path) -> None:
    out = subprocess.run(
        [*HYBRIDFL, "fetch", tls_server.url, "--ca-cert", str(tls_server.certs.ca_cert),
         "--cache-dir", str(tmp_path / "c"), "--version", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "version 0 (round 0)" in out.stdout


def _tls_connect(server: TlsServer) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(server.certs.ca_cert))
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.settimeout(0.02)
    return sock


def _closed(sock: ssl.SSLSocket) -> bool:
    """True once the server has closed ``sock`` (reads EOF or the connection broke)."""
    try:
        return sock.recv(4096) == b""
    except (TimeoutError, ssl.SSLWantReadError):
        return False
    except OSError:
        return True


def _wait_all_closed(
    socks: list[ssl.SSLSocket], within_s: float, trickle: bool
) -> dict[int, float]:
    """Seconds until each socket was closed by the server; ``trickle``: keep sending a
    header byte every 0.3 s, as a slowloris client does."""
    t0 = time.monotonic()
    closed: dict[int, float] = {}
    last_send = t0
    while len(closed) < len(socks) and time.monotonic() - t0 < within_s:
        send_now = trickle and time.monotonic() - last_send > 0.3
        for i, s in enumerate(socks):
            if i in closed:
                continue
            if send_now:
                try:
                    s.sendall(b"x")
                except OSError:
                    closed[i] = time.monotonic() - t0
                    continue
            if _closed(s):
                closed[i] = time.monotonic() - t0
        if send_now:
            last_send = time.monotonic()
    return closed


def test_slow_headers_idle_and_kept_alive_connections_are_closed(tls_server: TlsServer) -> None:
    """A slowloris client (partial header, one byte now and then), a silent one and an
    idle keep-alive one: the server closes all of them, and still serves."""
    trickling = [_tls_connect(tls_server) for _ in range(40)]
    for s in trickling:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    silent = [_tls_connect(tls_server) for _ in range(10)]
    kept = _tls_connect(tls_server)
    kept.settimeout(10)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert kept.recv(4096).startswith(b"HTTP/1.1 200")
    kept.settimeout(0.02)
    try:
        closed = _wait_all_closed(trickling, HEADER_TIMEOUT_S + SLACK_S + 2, trickle=True)
        closed_silent = _wait_all_closed([*silent, kept], HEADER_TIMEOUT_S + SLACK_S, False)
    finally:
        for s in [*trickling, *silent, kept]:
            s.close()
    assert len(closed) == len(trickling), f"{len(trickling) - len(closed)} slow clients kept"
    assert max(closed.values()) < HEADER_TIMEOUT_S + SLACK_S
    assert len(closed_silent) == len(silent) + 1
    # Still serving: a normal client is answered at once.
    r = httpx.get(f"{tls_server.url}/healthz", verify=str(tls_server.certs.ca_cert), timeout=10)
    assert r.status_code == 200


def test_serve_refuses_half_a_tls_setting(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / REGISTRY_DIR).mkdir(parents=True)
    out = subprocess.run(
        [*HYBRIDFL, "serve", str(run_dir), "--certfile", str(tmp_path / "x.crt")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert "both --certfile and --keyfile" in out.stdout + out.stderr
