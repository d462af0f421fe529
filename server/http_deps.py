"""Shared state and FastAPI dependencies of the model server (settings, auth).

Why a module of its own: the routers (``http_models``, ``http_rounds``) and the
app factory (``http``) all need them, and the factory imports the routers.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.registry import Registry

if TYPE_CHECKING:  # the routers import this module: no runtime import back
    from server.http_models import BlobCache
    from server.http_rounds import RoundsLog

TOKEN_ENV = "HYBRIDFL_TOKEN"
MIN_TOKEN_LENGTH = 16


def check_token(token: str) -> str:
    """Reject tokens that are too weak or cannot travel in a header; return it stripped."""
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"the API token must have at least {MIN_TOKEN_LENGTH} characters; make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError("the API token may contain printable ASCII characters only (no spaces)")
    return token


@dataclass
class ServerMetrics:
    """Counters for ``/metrics``: cheap dict increments on the event loop (no lock needed)."""

    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)
    bytes_sent: int = 0


@dataclass
class Settings:
    """Everything a request handler needs, built once by ``create_app``."""

    run_dir: Path
    registry: Registry
    token: str | None
    blobs: BlobCache
    rounds: RoundsLog
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    max_body_bytes: int = 4096


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(
    auto_error=False,
    description="Token given to the server by HYBRIDFL_TOKEN or a token file.",
)


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Gate write endpoints: disabled without a configured token, then bearer auth.

    ``hmac.compare_digest`` so the comparison time does not leak the token.
    """
    if settings.token is None:
        raise HTTPException(
            status_code=403,
            detail=(
                "write endpoints are disabled because the server has no API token; restart it "
                f"with {TOKEN_ENV}=<secret> in its environment (or a token file) to enable them"
            ),
        )
    if credentials is None:
        raise HTTPException(
            status_code=401,
            detail="missing credentials: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": 'Bearer realm="hybridfl"'},
        )
    if not hmac.compare_digest(credentials.credentials.encode(), settings.token.encode()):
        raise HTTPException(status_code=403, detail="invalid token")
