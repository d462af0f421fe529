"""FastAPI model server over a run's registry: read API public, write API token-gated.

``create_app(run_dir, token)`` builds the app; ``hybridfl serve`` (or
``uvicorn --factory server.http:create_app_from_env``) runs it. Middlewares are
plain ASGI (not ``BaseHTTPMiddleware``), because the hot path, a 304
revalidation, must stay in the thousands of requests per second.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import http_models, http_rounds
from server.http_deps import TOKEN_ENV, ServerMetrics, Settings, SettingsDep, check_token
from server.registry import Registry, RegistryError

__all__ = ["create_app", "create_app_from_env", "load_token"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_CACHE = 256 << 20
MAX_BODY_BYTES = 4096


def load_token(env: str = TOKEN_ENV, file: Path | None = None) -> str | None:
    """The write-API token: from ``file`` when given, else from env var ``env``.

    Returns None when neither is set (writes disabled). Raises ``ValueError``
    for an unreadable/empty file or a weak token, so a typo never silently
    turns auth off or on.
    """
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read token file {file}: {exc.strerror}") from None
        if not text.strip():
            raise ValueError(f"token file {file} is empty")
        return check_token(text)
    value = os.environ.get(env, "")
    if not value.strip():
        return None
    return check_token(value)


# ------------------------------------------------------------------ middlewares
class MetricsMiddleware:
    """Counts requests by (method, route template, status) and response bytes."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        metrics = self.metrics

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                metrics.bytes_sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            label = scope.get("hybridfl.route") or getattr(scope.get("route"), "path", "other")
            key = (scope["method"], label, status)
            metrics.requests[key] = metrics.requests.get(key, 0) + 1


class BodyLimitMiddleware:
    """413 for request bodies over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send)
                    return
        received = 0
        limit = self.limit

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI's body reader re-raises it as is.
                    raise HTTPException(413, detail=f"request body over {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body over {self.limit} bytes"},
            status_code=413,
            headers={"connection": "close"},
        )
        await response(scope, receive, send)


# ----------------------------------------------------------------------- routes
class Health(BaseModel):
    status: str
    serving_version: int | None = None
    detail: str | None = None


def _metrics_text(settings: Settings) -> str:
    reg = settings.registry
    m = settings.metrics
    lines = [
        "# HELP hybridfl_http_requests_total HTTP requests by method, route template, status.",
        "# TYPE hybridfl_http_requests_total counter",
    ]
    for (method, route, status), n in sorted(m.requests.items()):
        route_label = route.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        lines.append(
            f'hybridfl_http_requests_total{{method="{method}",route="{route_label}",'
            f'status="{status}"}} {n}'
        )
    lines += [
        "# HELP hybridfl_http_response_body_bytes_total Response body bytes sent.",
        "# TYPE hybridfl_http_response_body_bytes_total counter",
        f"hybridfl_http_response_body_bytes_total {m.bytes_sent}",
    ]
    numbers = reg.version_numbers()
    serving_version, serving_round = -1, -1
    try:
        state = reg.alias("serving")
        if state is not None:
            serving_version = state.version
            serving_round = reg.get(state.version).round
    except RegistryError:
        pass
    lines += [
        "# HELP hybridfl_registry_versions Published global-model versions.",
        "# TYPE hybridfl_registry_versions gauge",
        f"hybridfl_registry_versions {len(numbers)}",
        "# HELP hybridfl_latest_version Newest published version (-1: none).",
        "# TYPE hybridfl_latest_version gauge",
        f"hybridfl_latest_version {numbers[-1] if numbers else -1}",
        "# HELP hybridfl_serving_version Version served to devices (-1: none).",
        "# TYPE hybridfl_serving_version gauge",
        f"hybridfl_serving_version {serving_version}",
        "# HELP hybridfl_serving_round Training round of the serving version (-1: none).",
        "# TYPE hybridfl_serving_round gauge",
        f"hybridfl_serving_round {serving_round}",
    ]
    return "\n".join(lines) + "\n"


def create_app(
    run_dir: Path,
    token: str | None = None,
    *,
    memory_cache_bytes: int = DEFAULT_MEMORY_CACHE,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The model server of one run folder (``<run_dir>/registry``, ``metrics.jsonl``).

    ``token`` enables the write API (``None``: writes answer 403 with how to
    enable them). ``memory_cache_bytes`` bounds the verified blobs kept in RAM.
    """
    run_dir = Path(run_dir)
    if token is not None:
        token = check_token(token)
    registry = Registry(run_dir / "registry")
    settings = Settings(
        run_dir=run_dir,
        registry=registry,
        token=token,
        blobs=http_models.BlobCache(registry, memory_cache_bytes),
        rounds=http_rounds.RoundsLog(run_dir / "metrics.jsonl"),
        max_body_bytes=max_body_bytes,
    )
    app = FastAPI(
        title="hybridfl model server",
        version="1",
        description=(
            "Global-model versions of a hybridfl run. Reads are public; "
            "`PUT /v1/models/global/aliases/serving` needs `Authorization: Bearer <token>`."
        ),
    )
    app.state.settings = settings
    app.include_router(http_models.router)
    app.include_router(http_rounds.router)

    @app.get(
        "/healthz",
        response_model=Health,
        response_model_exclude_none=True,
        tags=["ops"],
        summary="Process is up",
    )
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: {"model": Health}},
        tags=["ops"],
        summary="Ready when 'serving' points at a verified version",
    )
    async def readyz(settings: SettingsDep) -> Any:
        import anyio

        reg = settings.registry
        try:
            version = reg.resolve_alias("serving")
            ok = reg.is_verified_cached(version)
            if ok is None:
                ok = await anyio.to_thread.run_sync(reg.verify, version)
        except RegistryError as exc:
            return JSONResponse(
                Health(status="unavailable", detail=str(exc)).model_dump(exclude_none=True),
                status_code=503,
            )
        if not ok:
            body = Health(
                status="unavailable",
                serving_version=version,
                detail=f"serving version {version} failed verification",
            )
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        return Health(status="ready", serving_version=version)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        tags=["ops"],
        summary="Prometheus metrics",
    )
    def metrics(settings: SettingsDep) -> PlainTextResponse:
        return PlainTextResponse(
            _metrics_text(settings), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    # add_middleware wraps: the last added runs first (metrics see every request).
    app.add_middleware(http_models.WeightsFastPath, settings=settings)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=settings.metrics)
    log.info(
        "model server over %s (writes %s)", run_dir, "enabled" if token else "disabled: no token"
    )
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: ``HYBRIDFL_RUN_DIR``, ``HYBRIDFL_TOKEN``
    or ``HYBRIDFL_TOKEN_FILE``."""
    run_dir = os.environ.get("HYBRIDFL_RUN_DIR")
    if not run_dir:
        raise RuntimeError("set HYBRIDFL_RUN_DIR to the run folder to serve")
    token_file = os.environ.get("HYBRIDFL_TOKEN_FILE")
    return create_app(Path(run_dir), load_token(file=Path(token_file) if token_file else None))
