"""FastAPI model server over a run's registry: read API public, write API token-gated.

``create_app(run_dir, token)`` builds the app; ``hybridfl serve`` (or
``uvicorn --factory server.http:create_app_from_env``) runs it. Middlewares are
plain ASGI (not ``BaseHTTPMiddleware``), because the hot path, a 304
revalidation, must stay in the thousands of requests per second.
"""

from __future__ import annotations

import html
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.rundir import METRICS_FILE, REGISTRY_DIR
from server import http_events, http_models, http_predict, http_rounds, http_signatures
from server.http_deps import TOKEN_ENV, ServerMetrics, Settings, SettingsDep, check_token
from server.registry import Registry, RegistryError

__all__ = ["create_app", "create_app_from_env", "load_token"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_CACHE = 256 << 20
MAX_BODY_BYTES = 4096
MAX_PREDICT_BYTES = 16 << 20
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def load_token(env: str = TOKEN_ENV, file: Path | None = None) -> str | None:
    """The write-API token: from ``file`` when given, else from env var ``env``.

    Returns None when neither is set (writes disabled). Raises ``ValueError``
    for an unreadable/empty file, a file other users can read or write, or a
    weak token, so a typo never silently turns auth off or on. A group-readable
    file is accepted with a warning (some secret mounts are 0640).
    """
    if file is not None:
        file = Path(file)
        try:
            mode = file.stat().st_mode
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read token file {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"token file {file} is not UTF-8 text") from None
        if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise ValueError(
                f"token file {file} is readable or writable by other users "
                f"(mode {stat.S_IMODE(mode):04o}); restrict it with `chmod 600 {file}`"
            )
        if mode & stat.S_IRGRP:
            log.warning(
                "token file %s is readable by its group (mode %04o); `chmod 600 %s` keeps "
                "it to its owner",
                file,
                stat.S_IMODE(mode),
                file,
            )
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
            metrics.count(scope["method"], getattr(scope.get("route"), "path", "other"), status)


class BodyLimitMiddleware:
    """413 for request bodies over the limit, declared or streamed: ``limit`` bytes,
    ``predict_limit`` for the predict endpoints (their body is a batch of inputs)."""

    def __init__(self, app: ASGIApp, limit: int, predict_limit: int) -> None:
        self.app = app
        self.default_limit = limit
        self.predict_limit = predict_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        predict = scope["method"] == "POST" and scope["path"].endswith("/predict")
        limit = self.predict_limit if predict else self.default_limit
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await self._reject(scope, receive, send, limit)
                    return
        received = 0

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

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = JSONResponse(
            {"detail": f"request body over {limit} bytes"},
            status_code=413,
            headers={"connection": "close"},
        )
        await response(scope, receive, send)


# ------------------------------------------------------------- error handlers
def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: echo such inputs as strings in error bodies."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body, safe for inputs such as ``NaN`` (its own handler fails
    to encode them and answers 500)."""
    assert isinstance(exc, RequestValidationError)
    errors = _finite(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": errors}, status_code=422)


def _template_matches(template: str, path: str) -> bool:
    """``/v1/x/{version}`` matches ``/v1/x/7``: a ``{param}`` segment takes any one segment."""
    want, have = template.split("/"), path.split("/")
    return len(want) == len(have) and all(
        w == h or (w.startswith("{") and w.endswith("}") and h)
        for w, h in zip(want, have, strict=True)
    )


def _allowed_methods(app: FastAPI, path: str) -> str | None:
    """The methods the documented API serves at ``path`` (from the OpenAPI paths,
    which list every route, so the answer cannot drift from the routes)."""
    allowed = {
        method.upper()
        for template, operations in app.openapi().get("paths", {}).items()
        if _template_matches(template, path)
        for method in operations
    }
    return ", ".join(sorted(allowed)) if allowed else None


async def _method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """405 whose ``Allow`` lists every method of the path (Starlette names only the
    first route's, e.g. GET where GET and HEAD both work)."""
    assert isinstance(exc, StarletteHTTPException)
    allow = _allowed_methods(request.app, get_route_path(request.scope))
    if allow is None:
        allow = (exc.headers or {}).get("Allow", "")
    return JSONResponse(
        {"detail": f"method {request.method} is not allowed here; allowed: {allow}"},
        status_code=405,
        headers={"Allow": allow},
    )


# ----------------------------------------------------------------------- routes
class Health(BaseModel):
    status: str
    serving_version: int | None = None
    detail: str | None = None


def _swagger_assets() -> Path | None:
    """Swagger UI's files from the optional ``swagger-ui-bundle`` package, if installed."""
    try:
        import swagger_ui_bundle  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


_NO_DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head><body>
<h1>{title}</h1>
<p>The interactive API page (Swagger UI) is not served: it would load its scripts
from a CDN, and this server loads nothing from elsewhere. Install the
<code>swagger-ui-bundle</code> package next to hybridfl to serve it offline.</p>
<p>The API description is at <a href="{openapi}">{openapi}</a> (OpenAPI 3).</p>
</body></html>
"""


def _add_docs(app: FastAPI) -> None:
    """``/docs`` without a CDN: Swagger UI from local files when a package provides
    them, else a plain page pointing at ``/openapi.json``."""
    assets = _swagger_assets()
    if assets is not None:
        from starlette.staticfiles import StaticFiles

        app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        openapi = f"{root}{app.openapi_url}"
        if assets is None:
            return HTMLResponse(
                _NO_DOCS_PAGE.format(title=html.escape(app.title), openapi=html.escape(openapi))
            )
        return get_swagger_ui_html(
            openapi_url=openapi,
            title=f"{app.title} - docs",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        )


def create_app(
    run_dir: Path,
    token: str | None = None,
    *,
    memory_cache_bytes: int = DEFAULT_MEMORY_CACHE,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_predict_bytes: int = MAX_PREDICT_BYTES,
) -> FastAPI:
    """The model server of one run folder (its registry and metrics log).

    ``token`` enables the write API (``None``: writes answer 403 with how to
    enable them). ``memory_cache_bytes`` bounds the verified blobs kept in RAM.
    Request bodies are limited to ``max_body_bytes``, predict bodies (a batch
    of inputs) to ``max_predict_bytes``.
    """
    run_dir = Path(run_dir)
    if token is not None:
        token = check_token(token)
    registry = Registry(run_dir / REGISTRY_DIR)
    settings = Settings(
        run_dir=run_dir,
        registry=registry,
        token=token,
        blobs=http_models.BlobCache(registry, memory_cache_bytes),
        models=http_predict.ModelCache(registry),
        rounds=http_rounds.RoundsLog(run_dir / METRICS_FILE),
        metrics=ServerMetrics(registry),
    )
    app = FastAPI(
        title="hybridfl model server",
        version="1",
        description=(
            "Global-model versions of a hybridfl run. Reads are public; "
            "`PUT /v1/models/global/aliases/serving` needs `Authorization: Bearer <token>`."
        ),
        docs_url=None,  # FastAPI's page loads Swagger UI from a CDN: ours does not
        redoc_url=None,
    )
    app.state.settings = settings
    settings.metrics.model_builds = lambda: settings.models.builds
    app.include_router(http_models.router)
    app.include_router(http_predict.router)
    app.include_router(http_rounds.router)
    app.include_router(http_signatures.router)
    app.include_router(http_events.router)
    weights_routes = http_models.add_weights_routes(app)
    _add_docs(app)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(405, _method_not_allowed)

    @app.get(
        "/healthz",
        response_model=Health,
        response_model_exclude_none=True,
        tags=["ops"],
        summary="Process is up (answers whatever state the registry is in)",
    )
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        response_model_exclude_none=True,
        responses={503: {"model": Health}},
        tags=["ops"],
        summary="Ready when 'serving' points at a verified version (503 says why not)",
    )
    async def readyz(settings: SettingsDep) -> Any:
        reg = settings.registry
        version: int | None = None
        try:
            version = reg.resolve_alias("serving")
            problem = await http_models.current_problem(reg, version)
        except RegistryError as exc:
            problem = str(exc)
        if problem is not None:
            body = Health(status="unavailable", serving_version=version, detail=problem)
            return JSONResponse(body.model_dump(exclude_none=True), status_code=503)
        return Health(status="ready", serving_version=version)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {METRICS_CONTENT_TYPE: {}}}},
        tags=["ops"],
        summary="Prometheus metrics",
    )
    def metrics(settings: SettingsDep) -> Response:
        return Response(
            generate_latest(settings.metrics.collectors), media_type=METRICS_CONTENT_TYPE
        )

    # add_middleware wraps: the last added runs first (metrics see every request).
    app.add_middleware(http_models.HotRoutes, routes=weights_routes, settings=settings)
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes, predict_limit=max_predict_bytes)
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
