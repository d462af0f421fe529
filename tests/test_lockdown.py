"""H1: who can reach the SuperLink's APIs. Only the Fleet API faces the network; the
Control and Runtime APIs answer only on 127.0.0.1, to the SuperLink's own user.

The cheap tests run ``ListenerGuard`` in a real uvicorn on two real sockets; the slow
one starts a real ``hybridfl superlink`` and plays an attacker who holds ``ca.crt``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from server.http_transport import protocol_with, server_config
from simulation.certs import device_key_pair, make_certs
from simulation.flwr_cli import flwr_env, free_port, parse_json_output, write_connection
from simulation.procs import Processes, descendants, listening_sockets, tcp_peer_uid
from simulation.superlink_guard import ListenerGuard, peer_uid_protocol, public_path_allowed
from tests.conftest import HYBRIDFL, assert_no_leftovers

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
"""A stdlib-only interpreter another user may execute (our venv may be private)."""


def _other_user_can_run() -> str | None:
    """Why a request cannot be made as another user here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to open a connection as another user"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    return None


def _as_nobody(url: str) -> tuple[int, str]:
    """POST ``url`` from a process of user ``nobody``: (status, body).

    The server certificate is not checked: our test CA sits in a private tmp folder,
    and only the server's answer matters here.
    """
    code = textwrap.dedent(
        """
        import ssl, sys, urllib.request, urllib.error
        ctx = ssl._create_unverified_context()
        req = urllib.request.Request(sys.argv[1], data=b"", method="POST")
        try:
            r = urllib.request.urlopen(req, timeout=10, context=ctx)
            print(r.status, r.read().decode())
        except urllib.error.HTTPError as e:
            print(e.code, e.read().decode())
        """
    )
    out = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", code, url],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    status, _, body = out.stdout.partition(" ")
    return int(status), body


# -- the guard alone, in a real uvicorn ----------------------------------------------
async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Stands in for Flower's app: says which path it was asked for."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"inner {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[str, str]]:
    """ListenerGuard on two loopback listeners: (public URL, private URL)."""
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        socks.append(s)
    public, private = (s.getsockname()[1] for s in socks)
    app = ListenerGuard(_echo, private)
    protocol = peer_uid_protocol(protocol_with(10.0), private)  # as the SuperLink runs it
    server = uvicorn.Server(
        server_config(app, "127.0.0.1", 0, http_protocol=protocol, lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": socks}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{public}", f"http://127.0.0.1:{private}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for s in socks:
            s.close()


def test_public_listener_serves_the_fleet_api_only(guarded: tuple[str, str]) -> None:
    public, _ = guarded
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/register-node", "/health"):
        r = httpx.post(public + path)
        assert (r.status_code, r.text) == (200, f"inner {path}")
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/pull-messages",
                 "/docs", "/v1/fleet", "/v1/fleetx/a", "/"):  # fmt: skip
        r = httpx.post(public + path)
        assert r.status_code == 403, path
        assert "only on the SuperLink machine" in r.json()["detail"]


def test_private_listener_serves_everything_to_our_own_user(guarded: tuple[str, str]) -> None:
    _, private = guarded
    for path in ("/v1/control/list-runs", "/v1/runtime/pull-messages", "/v1/fleet/get-run"):
        r = httpx.post(private + path)
        assert (r.status_code, r.text) == (200, f"inner {path}")


def test_private_listener_refuses_another_local_user(guarded: tuple[str, str]) -> None:
    if why := _other_user_can_run():
        pytest.skip(why)
    _, private = guarded
    status, body = _as_nobody(private + "/v1/control/list-runs")
    assert status == 403 and "own user" in json.loads(body)["detail"]


def test_peer_uid_of_a_real_loopback_connection() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as cli:
            conn, addr = srv.accept()
            with conn:
                assert tcp_peer_uid(addr, srv.getsockname()) == os.getuid()
                # A peer that is not connected to us is unknown (e.g. another machine).
                assert tcp_peer_uid(("127.0.0.1", 1), srv.getsockname()) is None
                assert cli.fileno() >= 0


def test_public_path_allowed() -> None:
    assert public_path_allowed("/v1/fleet/push-messages") and public_path_allowed("/health")
    assert not public_path_allowed("/v1/control/list-runs")
    assert not public_path_allowed("/v1/runtime/get-run")
    assert not public_path_allowed("/health/x")
    for sneaky in ("/v1/fleet/../control/list-runs", "/v1/fleet//x", "/v1/fleet/./x"):
        assert not public_path_allowed(sneaky), sneaky


# -- a real SuperLink and an attacker who has ca.crt ---------------------------------
def _flwr(env: dict[str, str], *args: str) -> dict[str, object]:
    """``flwr ARGS --format json`` in ``env``: the parsed JSON answer."""
    out = subprocess.run(
        ["flwr", *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return parse_json_output(out.stdout)


def _evil_app(root: Path) -> Path:
    """A Flower app an attacker would like to run on the server and every device."""
    root.mkdir()
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "evil"
            version = "1.0.0"
            dependencies = []

            [tool.hatch.build.targets.wheel]
            packages = ["."]

            [tool.flwr.app]
            publisher = "mallory"

            [tool.flwr.app.components]
            serverapp = "mallory_app:server"
            clientapp = "mallory_app:client"
            """
        )
    )
    marker = root / "EVIL_CODE_RAN"
    (root / "mallory_app.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from flwr.clientapp import ClientApp
            from flwr.serverapp import ServerApp

            server = ServerApp()
            client = ClientApp()

            @server.main()
            def main(grid, context):
                Path({str(marker)!r}).write_text("ran on the server")
            """
        )
    )
    return root


@pytest.mark.slow
def test_attacker_with_ca_cert_cannot_register_list_or_run(tmp_path: Path) -> None:
    """The issue's repro against a real ``hybridfl superlink``: every attempt refused.

    A SuperLink start and six ``flwr`` calls (each imports Flower): 60 s at load 10.
    """
    certs = make_certs(tmp_path / "certs", 1)
    device_key_pair(tmp_path / "mallory.key", tmp_path / "mallory.pub")
    port = free_port()
    control = next(p for p in iter(free_port, None) if p != port)
    home, procs = tmp_path / "home", Processes()
    log = tmp_path / "superlink.out"
    cmd = [*HYBRIDFL, "superlink", "--certs", str(certs.root), "--port", str(port)]
    proc = procs.start([*cmd, "--control-port", str(control), "--home", str(home)], None, log)
    # The attacker: ca.crt, network reach to the port devices use, own FLWR_HOME.
    mallory = flwr_env(tmp_path / "mallory_home")
    write_connection(tmp_path / "mallory_home", f"127.0.0.1:{port}", certs.ca_cert)
    operator = flwr_env(home)
    evil = _evil_app(tmp_path / "evil")
    try:
        deadline = time.monotonic() + 90
        while "registered device-0.pub" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.3)
        assert "registered device-0.pub" in log.read_text(), log.read_text()
        listeners = {(a, p) for _, a, p in listening_sockets([proc.pid, *descendants(proc.pid)])}
        attempts = {
            "register": _flwr(mallory, "supernode", "register", str(tmp_path / "mallory.pub")),
            "nodes": _flwr(mallory, "supernode", "ls"),
            "runs": _flwr(mallory, "ls"),
            "run": _flwr(mallory, "run", str(evil)),
        }
        nodes = _flwr(operator, "supernode", "ls")
        runs = _flwr(operator, "ls")
        control_url = f"https://127.0.0.1:{control}/v1/control/list-runs"
        nobody = None if _other_user_can_run() else _as_nobody(control_url)
    finally:
        procs.stop_all()
    assert listeners == {("127.0.0.1", port), ("127.0.0.1", control)}
    for what, answer in attempts.items():
        assert answer.get("success") is False, (what, answer)
        assert "only on the SuperLink machine" in str(answer.get("error-message")), (what, answer)
    # The operator (same machine, same user) sees one node, ours, and no run at all.
    assert nodes.get("success") is True, nodes
    assert len(nodes["nodes"]) == 1  # type: ignore[arg-type]
    assert runs.get("success") is True and runs["runs"] == [], runs
    assert not (evil / "EVIL_CODE_RAN").exists()
    if nobody is not None:  # another local user on the control port: refused too
        assert nobody[0] == 403, nobody
    assert_no_leftovers(tmp_path)
