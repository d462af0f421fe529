"""Flower's SuperLink with its APIs split by listener: only the Fleet API faces the network.

Why: Flower 1.42 serves the Fleet API (devices), the Control API (``flwr run``,
``flwr ls``, ``flwr supernode register``) and the Runtime API (the ServerApp) on one
host and port, and open-source Flower has no authentication for the Control and
Runtime APIs (account login is an Enterprise plugin). With only ``ca.crt`` anyone who
reaches that port could register a device key or submit an app, which then runs on
the SuperLink and on every device.

So we start Flower's own app (``flwr.superlink.main.create_app``, the very one
``flower-superlink`` runs) on two listeners:

* the public one (``--host``/``--port``): ``/v1/fleet/*`` and ``/health`` only;
  everything else answers 403. Devices still authenticate with their registered
  keys (``--enable-supernode-auth``).
* a private one on ``127.0.0.1:--control-port``: Control and Runtime APIs, and only
  for connections opened by this process's own user (the kernel's socket table says
  who opened the client end; see ``procs.tcp_peer_uid``). The ServerApp's SuperExec
  is pointed at this listener.

Run as ``python -m simulation.superlink_guard --control-port N <flower-superlink
arguments>``; ``simulation.deploy.superlink_command`` builds that line.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import posixpath
import socket
import sys
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from simulation.procs import tcp_peer_uid

__all__ = [
    "CONTROL_PORT_FLAG",
    "PEER_UID_KEY",
    "ListenerGuard",
    "main",
    "peer_uid_protocol",
    "public_path_allowed",
]

CONTROL_PORT_FLAG = "--control-port"
PUBLIC_PREFIX = "/v1/fleet/"
PUBLIC_EXACT = frozenset({"/health"})
PRIVATE_HOST = "127.0.0.1"
PEER_UID_KEY = "hybridfl.peer_uid"
"""Scope key: owner of the client socket, looked up once per connection (private listener)."""


def public_path_allowed(path: str) -> bool:
    """Whether ``path`` may be served on the network-facing listener (Fleet API only).

    Only normal paths: ``/v1/fleet/../control/x`` must not pass as a Fleet path,
    whatever a router behind us would make of it.
    """
    if path != posixpath.normpath(path):
        return False
    return path.startswith(PUBLIC_PREFIX) or path in PUBLIC_EXACT


class ListenerGuard:
    """ASGI wrapper: what a request may reach depends on the listener it came in on."""

    def __init__(self, app: ASGIApp, private_port: int, uid: int | None = None) -> None:
        self.app = app
        self.private_port = private_port
        self.uid = os.getuid() if uid is None else uid

    def refusal(self, scope: Scope) -> str | None:
        """Why this request is refused, or None."""
        server = scope.get("server") or ("", 0)
        path = scope.get("path", "")
        if server[1] != self.private_port:
            if public_path_allowed(path):
                return None
            return (
                f"{path} is not served on this address: the Control and Runtime APIs "
                "are reachable only on the SuperLink machine (its --control-port on "
                "127.0.0.1)"
            )
        if PEER_UID_KEY in scope:
            owner = scope[PEER_UID_KEY]
        else:  # a server without peer_uid_protocol: look it up per request
            client = scope.get("client")
            owner = tcp_peer_uid(tuple(client), tuple(server)) if client else None  # type: ignore[arg-type]
        if owner == self.uid:
            return None
        return "the Control API accepts connections only from the SuperLink's own user"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        why = self.refusal(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": why}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def peer_uid_protocol(base: type[Any], private_port: int) -> type[Any]:
    """``base`` (a uvicorn httptools protocol) that notes, once per connection to the
    private listener, which user opened the client socket (``PEER_UID_KEY``)."""

    class PeerUidProtocol(base):  # type: ignore[misc, valid-type]
        _peer_uid: int | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if self.server and self.client and self.server[1] == private_port:
                self._peer_uid = tcp_peer_uid(tuple(self.client), tuple(self.server))

        def on_headers_complete(self) -> None:
            self.scope[PEER_UID_KEY] = self._peer_uid  # before the request task starts
            super().on_headers_complete()

    return PeerUidProtocol


def _split_args(argv: list[str]) -> tuple[int, list[str]]:
    """Our ``--control-port N`` out of Flower's arguments."""
    rest, port = [], 0
    it = iter(argv)
    for a in it:
        if a == CONTROL_PORT_FLAG:
            port = int(next(it, "0"))
        elif a.startswith(CONTROL_PORT_FLAG + "="):
            port = int(a.split("=", 1)[1])
        else:
            rest.append(a)
    if not 1 <= port <= 65535:
        sys.exit(f"{CONTROL_PORT_FLAG} must be a port 1-65535, got {port}")
    return port, rest


def _listen(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        sys.exit(f"cannot listen on {host}:{port} ({err.strerror}); choose another port")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    """Parse Flower's arguments as ``flower-superlink`` does, then serve on two listeners."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    from server.http_transport import DEFAULT_HEADER_TIMEOUT_S, protocol_with, server_config

    # The package re-exports a function of the same name: import the module itself.
    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")
    control_port, flower_args = _split_args(sys.argv[1:] if argv is None else argv)
    sys.argv = ["flower-superlink", *flower_args]
    config = fs._parse_superlink_lifespan_config()  # Flower's own checks and messages
    public = (config.host, config.port)
    if public[1] == control_port:
        sys.exit(f"--port and {CONTROL_PORT_FLAG} must differ (both {control_port})")
    # SuperExec (which starts the ServerApp) talks to the Runtime API: the private listener.
    config.host, config.port = PRIVATE_HOST, control_port
    app = ListenerGuard(create_app(config, fs.SuperLinkLifespan), control_port)
    sockets = [_listen(*public), _listen(PRIVATE_HOST, control_port)]
    cfg = server_config(
        app,
        public[0],
        public[1],
        certfile=config.ssl_certfile,
        keyfile=config.ssl_keyfile,
        log_level=None,
        http_protocol=peer_uid_protocol(protocol_with(DEFAULT_HEADER_TIMEOUT_S), control_port),
        log_config=get_uvicorn_log_config(console_handler.level),
        access_log=True,
        lifespan="on",
    )
    print(
        f"SuperLink: Fleet API on {public[0]}:{public[1]}, Control and Runtime APIs on "
        f"{PRIVATE_HOST}:{control_port} (this user only)",
        flush=True,
    )
    uvicorn.Server(cfg).run(sockets=sockets)


if __name__ == "__main__":
    main()
