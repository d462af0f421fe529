"""How an HTTP server of ours listens: TLS, keep-alive and a deadline for request headers.

Why a protocol subclass: uvicorn has a keep-alive timeout (idle *after* a response)
but none for the request *headers*: a client that opens a connection and sends a
partial header, or one byte now and then (slowloris), holds a connection and a
file descriptor forever. ``HeaderDeadlineProtocol`` closes a connection whose
request headers are not complete within ``header_timeout_s`` of the connection
opening or of the previous response. A request whose headers arrived is left to
the application (bodies are size-limited there). Over TLS the handshake itself is
bounded by asyncio's ``ssl_handshake_timeout`` (60 s).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_KEEP_ALIVE_S",
    "header_deadline_protocol",
    "protocol_with",
    "server_config",
]

log = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5


@functools.cache
def header_deadline_protocol() -> type[Any]:
    """uvicorn's httptools protocol plus a deadline on each request's headers.

    Built on first use so that importing this module (the CLI does, for its
    defaults) does not import uvicorn.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.info(
                    "closing %s: request headers not complete within %.1fs",
                    self.client,
                    self.header_timeout_s,
                )
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            pipelined = bool(self.pipeline)  # its headers are in: no new deadline for it
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def protocol_with(header_timeout_s: float) -> type[Any]:
    """A protocol class with its own deadline (uvicorn takes a class, not an instance)."""
    if header_timeout_s <= 0:
        raise ValueError(f"header timeout must be > 0 seconds, got {header_timeout_s}")
    base = header_deadline_protocol()
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s})


def server_config(
    app: object,
    host: str,
    port: int,
    *,
    certfile: Path | str | None = None,
    keyfile: Path | str | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    keep_alive_s: int = DEFAULT_KEEP_ALIVE_S,
    log_level: str | None = "warning",
    http_protocol: type[Any] | None = None,
    **extra: object,
) -> uvicorn.Config:
    """uvicorn settings for our servers: TLS when both files are given, bounded waits.

    ``http_protocol``: a subclass of ``protocol_with(...)`` (default: that class).

    ``proxy_headers`` is off: a client must not choose the address we see by
    sending ``X-Forwarded-For``.
    """
    if (certfile is None) != (keyfile is None):
        raise ValueError("TLS needs both a certificate file and its key file")
    for what, path in (("certificate", certfile), ("key", keyfile)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"TLS {what} file {path} does not exist")
    if keep_alive_s < 1:
        raise ValueError(f"keep-alive timeout must be >= 1 second, got {keep_alive_s}")
    import uvicorn

    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        http=http_protocol or protocol_with(header_timeout_s),
        timeout_keep_alive=keep_alive_s,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        proxy_headers=False,
        log_level=log_level,
        **extra,  # type: ignore[arg-type]
    )
