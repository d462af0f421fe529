"""``/v1/models/global``: versions, aliases and weight bytes of the global model.

Why weights are served by hand instead of Starlette's ``FileResponse``: the ETag
must be the sha256 (clients verify against it), ``If-None-Match`` must give 304
(``FileResponse`` ignores it), and 64 KiB chunks halve throughput. Verified
blobs are kept in a bounded in-memory LRU and sent in 1 MiB slices; bigger blobs
are streamed from disk in 1 MiB reads. Every request re-``stat``s the blob, so a
truncated or rewritten file is re-verified (and refused) instead of served.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)
from starlette.datastructures import Headers
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from common.manifest import ALIASES as ALIAS_NAMES
from common.manifest import VersionManifest
from server.http_deps import Settings, SettingsDep, require_token
from server.registry import (
    AliasDamaged,
    AliasNotSet,
    AliasState,
    ManifestDamaged,
    NotVerified,
    Registry,
    RegistryWriteError,
    VersionNotFound,
)

log = logging.getLogger(__name__)

PREFIX = "/v1/models/global"
CHUNK = 1 << 20
IMMUTABLE = "public, max-age=31536000, immutable"
MAX_VERSION = 2**31 - 1

AliasName = Literal["latest", "serving"]
WritableAlias = Literal["serving"]

_CANONICAL = re.compile(r"0|[1-9][0-9]{0,9}")
VERSION_RULE = (
    "a version is a non-negative integer written plainly (0, 1, 42): "
    "no sign, leading zero, decimal point, exponent or underscore"
)


def parse_canonical(raw: str) -> int | None:
    """The number a path segment spells canonically, else None.

    Why so strict: ``int()`` reads ``01``, ``+1``, ``-0`` and ``1_0`` (as 10), so
    several URLs would name one version, and a typo would fetch the wrong model.
    """
    if _CANONICAL.fullmatch(raw) is None:
        return None
    number = int(raw)
    return number if number <= MAX_VERSION else None


def _canonical_version(value: Any) -> Any:
    if isinstance(value, str):
        number = parse_canonical(value)
        if number is None:
            raise ValueError(f"{VERSION_RULE}, at most {MAX_VERSION}; got {value[:40]!r}")
        return number
    return value


VersionParam = Annotated[
    int,
    # PathParam first: after the validator its bounds would not reach the OpenAPI schema.
    PathParam(ge=0, le=MAX_VERSION, description="Version number (0 = initial model)."),
    BeforeValidator(_canonical_version),
]

router = APIRouter(prefix=PREFIX, tags=["models"])


# ---------------------------------------------------------------- response models
class AliasView(BaseModel):
    version: int
    pinned: bool
    updated_at: datetime


class ModelSummary(BaseModel):
    name: str = "global"
    version_count: int
    latest_version: int | None
    serving_version: int | None
    aliases: dict[str, AliasView | None]
    problems: dict[str, str] = Field(
        default_factory=dict, description="Aliases whose file is damaged, with the reason."
    )


class UnavailableVersion(BaseModel):
    version: int
    reason: str = Field(description="Why this version cannot be read or served.")


class VersionPage(BaseModel):
    items: list[VersionManifest] = Field(description="Versions whose manifest reads.")
    unavailable: list[UnavailableVersion] = Field(
        default_factory=list,
        description="Versions of this page whose manifest file is damaged, with the reason.",
    )
    total: int
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class VersionDetail(VersionManifest):
    servable: bool = Field(description="Blob present and its size and sha256 verified now.")
    reason: str | None = Field(
        default=None, description="Why the version is not servable (null when it is)."
    )
    weights_url: str


class AliasInfo(BaseModel):
    alias: str
    version: int
    pinned: bool
    updated_at: datetime
    weights_url: str
    manifest: VersionManifest


def _json_integer(value: Any) -> Any:
    """JSON-Schema integers: 3 and 3.0 yes; true, "3" no (pydantic's lax mode takes them)."""
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be a JSON integer")
    return value


class AliasUpdate(BaseModel):
    """Body of ``PUT /aliases/{alias}``: where the alias should point.

    ``{"version": 2}`` pins ``serving`` to version 2. ``{"pinned": false}`` makes
    it follow ``latest``: it moves to the newest version now and with every
    publish. ``{"version": 2, "pinned": false}`` (the README's older spelling) is
    accepted and means the same: the answer's ``version`` says where it went.
    ``{"version": false}`` or ``"1"`` must not silently become version 0 or 1.
    """

    model_config = ConfigDict(
        extra="forbid",
        # The rule _version_when_pinned checks, stated for clients and fuzzers.
        json_schema_extra={
            "anyOf": [
                {"required": ["version"], "properties": {"version": {"type": "integer"}}},
                {"required": ["pinned"], "properties": {"pinned": {"const": False}}},
            ]
        },
    )

    version: Annotated[int | None, BeforeValidator(_json_integer)] = Field(
        default=None,
        ge=0,
        le=MAX_VERSION,
        description="Version to pin (required unless pinned is false; "
        "with pinned false serving takes latest's version).",
    )
    pinned: StrictBool = Field(
        default=True,
        description="true: keep 'serving' at this version when new versions are published. "
        "false: follow 'latest' (now and from every publish).",
    )
    reason: str = Field(
        default="",
        max_length=500,
        description="Why (kept in the event history, e.g. 'rollback: accuracy drop').",
    )

    @model_validator(mode="after")
    def _version_when_pinned(self) -> AliasUpdate:
        if self.pinned and self.version is None:
            raise ValueError(
                'give the version to pin, e.g. {"version": 2}, or {"pinned": false} '
                "to follow latest"
            )
        return self


class ErrorBody(BaseModel):
    detail: str


class ParameterErrors(BaseModel):
    """FastAPI's 422 body: one entry per invalid parameter."""

    detail: list[dict[str, Any]]


_ERR = {"model": ErrorBody}


# ------------------------------------------------------------------- blob serving
async def current_problem(registry: Registry, version: int) -> str | None:
    """Why ``version`` is not servable now (None: it verifies); hashes off the event loop."""
    known, problem = registry.cached_problem(version)
    if not known:
        problem = await anyio.to_thread.run_sync(registry.problem, version)
    return problem


class BlobCache:
    """Verified blobs in memory (bounded LRU by bytes), keyed by sha256.

    An entry is used only while the file on disk still has the stat identity it
    had when it was read and hashed; otherwise it is read and verified again.
    """

    def __init__(self, registry: Registry, max_bytes: int) -> None:
        self.registry = registry
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[tuple[str, int, int, int, int], bytes]] = (
            OrderedDict()
        )
        self._total = 0
        self._load_lock = asyncio.Lock()

    async def source(self, manifest: VersionManifest) -> bytes | Path:
        """The bytes (or, for big blobs, the verified file) of a version; raises NotVerified."""
        version = manifest.version
        key = self.registry.stat_key(version)
        if key is None:
            raise NotVerified(f"version {version}: blob is missing")
        entry = self._entries.get(manifest.sha256)
        if entry is not None and entry[0] == key:
            self._entries.move_to_end(manifest.sha256)
            return entry[1]
        if manifest.size <= self.max_bytes:
            async with self._load_lock:
                entry = self._entries.get(manifest.sha256)
                if entry is not None and entry[0] == self.registry.stat_key(version):
                    return entry[1]
                data, key = await anyio.to_thread.run_sync(self.registry.read_blob, version)
                self._put(manifest.sha256, key, data)
                return data
        problem = await current_problem(self.registry, version)
        if problem is not None:
            raise NotVerified(f"version {version}: {problem}")
        return self.registry.blob_path_for(manifest.sha256)

    def _put(self, sha: str, key: tuple[str, int, int, int, int], data: bytes) -> None:
        old = self._entries.pop(sha, None)
        if old is not None:
            self._total -= len(old[1])
        self._entries[sha] = (key, data)
        self._total += len(data)
        while self._total > self.max_bytes and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._total -= len(evicted)


class BlobResponse(Response):
    """Bytes ``[start, end)`` of a blob in memory or on disk, in 1 MiB pieces."""

    def __init__(
        self,
        source: bytes | Path,
        start: int,
        end: int,
        status_code: int,
        headers: dict[str, str],
        send_body: bool,
    ) -> None:
        self.source = source
        self.start = start
        self.end = end
        self.status_code = status_code
        self.send_body = send_body
        self.background = None
        self.body = b""
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.raw_headers.append((b"content-length", str(end - start).encode()))
        self.raw_headers.append((b"content-type", b"application/octet-stream"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start_message = {"type": "http.response.start", "status": self.status_code}
        await send({**start_message, "headers": self.raw_headers})
        if not self.send_body or self.start >= self.end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if isinstance(self.source, bytes):
            view = memoryview(self.source)
            pos = self.start
            while pos < self.end:
                nxt = min(pos + CHUNK, self.end)
                await send(
                    {
                        "type": "http.response.body",
                        "body": view[pos:nxt],
                        "more_body": nxt < self.end,
                    }
                )
                pos = nxt
            return
        async with await anyio.open_file(self.source, "rb") as f:
            await f.seek(self.start)
            pos = self.start
            while pos < self.end:
                chunk = await f.read(min(CHUNK, self.end - pos))
                if not chunk:  # the file shrank under us: end the response short
                    raise RuntimeError(f"{self.source} shrank while being served")
                pos += len(chunk)
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": pos < self.end}
                )


def etag_matches(header: str, etag: str) -> bool:
    """``If-None-Match`` semantics: ``*`` or any listed tag, weak comparison."""
    for raw in header.split(","):
        tag = raw.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


class RangeNotSatisfiable(Exception):
    pass


_HUGE = 1 << 62
"""Stands for any byte position with more digits than a file size can have."""


def _position(digits: str) -> int:
    """A Range number; absurdly long ones (Python refuses to parse over 4,300 digits)
    are read as "beyond any file" instead of raising."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _HUGE


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=`` range as ``[start, end)``; None means "ignore it, send 200".

    Multi-range and malformed headers are ignored (RFC 9110 allows it); a range
    that starts past the end raises ``RangeNotSatisfiable``.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if first == "":
        if not last.isdigit() or not last.isascii():
            return None
        n = _position(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - n, 0), size
    if not first.isdigit() or not first.isascii():
        return None
    start = _position(first)
    if last == "":
        end = size - 1
    elif last.isdigit() and last.isascii():
        end = _position(last)
        if end < start:
            return None
    else:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1) + 1


def _missing(registry: Registry, version: int) -> str:
    numbers = registry.version_numbers()
    hint = f"versions are 0..{numbers[-1]}" if numbers else "nothing is published yet"
    return f"version {version} does not exist ({hint})"


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Same body shape as FastAPI's HTTPException responses."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def weights_response(
    settings: Settings, version: int, method: str, request_headers: Headers
) -> Response:
    """The whole weights protocol: 404, 304, 503 (not verified), 416, 206, 200.

    A 304 needs no disk access: the client's copy is the content named by the
    hash, valid forever, whatever state our disk is in.
    """
    registry = settings.registry
    try:
        manifest = registry.get(version)
    except VersionNotFound:
        return _error(404, _missing(registry, version))
    except ManifestDamaged as exc:
        return _error(503, f"{exc}; the version is not served")
    etag = f'"{manifest.sha256}"'
    headers = {
        "etag": etag,
        "cache-control": IMMUTABLE,
        "accept-ranges": "bytes",
        "x-model-version": str(version),
    }
    inm = request_headers.get("if-none-match")
    if inm is not None and etag_matches(inm, etag):
        return Response(status_code=304, headers=headers)
    try:
        source = await settings.blobs.source(manifest)
    except NotVerified as exc:
        log.error("refusing to serve: %s", exc)
        return _error(503, f"version {version} failed verification and is not served: {exc}")
    size = manifest.size
    start, end, status = 0, size, 200
    range_header = request_headers.get("range")
    if_range = request_headers.get("if-range")
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        try:
            parsed = parse_range(range_header, size)
        except RangeNotSatisfiable:
            return _error(
                416,
                f"range not satisfiable: {range_header!r} (size {size})",
                {"content-range": f"bytes */{size}", **headers},
            )
        if parsed is not None:
            start, end = parsed
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    return BlobResponse(source, start, end, status, headers, method != "HEAD")


def _version_422(raw: str) -> JSONResponse:
    """The body FastAPI gives a path parameter that fails validation."""
    detail = [
        {
            "type": "value_error",
            "loc": ["path", "version"],
            "msg": f"Value error, {VERSION_RULE}, at most {MAX_VERSION}",
            "input": raw[:100],
        }
    ]
    return JSONResponse({"detail": detail}, status_code=422)


WEIGHTS_PATH = f"{PREFIX}/versions/{{version}}/weights"


class WeightsRoute(APIRoute):
    """The weights route: documented by FastAPI, answered by a plain ASGI function.

    Why: FastAPI's per-request dependency solving and validation cost more than
    the response itself, and a device revalidating its model (304) is the
    hottest request there is. So the route stays a normal ``APIRoute`` (path,
    methods, OpenAPI, 405s), but a matched request goes straight to
    ``weights_response``; the version is checked by hand with the same rule as
    ``VersionParam`` (canonical integer, else FastAPI's 422 body).
    """

    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = self._serve

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self.methods:
            raise HTTPException(405, headers={"Allow": ", ".join(sorted(self.methods))})
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope["path_params"]["version"]
        response = await self.respond(scope, raw, scope["app"].state.settings)
        await response(scope, receive, send)

    @staticmethod
    async def respond(scope: Scope, raw: str, settings: Settings) -> Response:
        """The answer to a request this route matched (``raw``: the version segment)."""
        version = parse_canonical(raw)
        if version is None:
            return _version_422(raw)
        return await weights_response(settings, version, scope["method"], Headers(scope=scope))

    def claim(self, scope: Scope) -> str | None:
        """The version segment when this route matches fully (method and path, by
        the route's own regex), else None; marks the scope as the router would."""
        if scope["method"] not in self.methods:
            return None
        match = self.path_regex.match(get_route_path(scope))
        if match is None:
            return None
        scope["route"] = self
        return match["version"]


class HotRoutes:
    """ASGI middleware: requests for a ``WeightsRoute`` are handed to that route
    before FastAPI's exception and exit-stack middlewares and its router.

    Why one route is dispatched early: those layers and the router's matching
    cost about as much as a whole 304 answer (measured in-process: 27 us per
    request through them, 13 us without; bench/serve_throughput.py). This is
    not a second route: there is one path, one regex (the route's own, compiled
    by Starlette) and one handler; the router still knows the route for the
    OpenAPI document, 405 answers, and apps built without this middleware.
    """

    def __init__(self, app: ASGIApp, routes: list[WeightsRoute], settings: Settings) -> None:
        self.app = app
        self.routes = routes
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                raw = route.claim(scope)
                if raw is not None:
                    response = await route.respond(scope, raw, self.settings)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _weights_url(request: Request, version: int) -> str:
    """Path-only URL (never built from the Host header: no cache-poisoning redirects)."""
    return f"{request.scope.get('root_path', '')}{PREFIX}/versions/{version}/weights"


def manifest_or_404(registry: Registry, version: int) -> VersionManifest:
    """404 for an unknown version, 503 (with the reason) for a damaged manifest."""
    try:
        return registry.get(version)
    except VersionNotFound:
        raise HTTPException(404, detail=_missing(registry, version)) from None
    except ManifestDamaged as exc:
        raise HTTPException(503, detail=f"{exc}; the version is not served") from None


def _alias_state(registry: Registry, alias: str) -> AliasState:
    """404 when not set yet, 503 (with the reason) when its file is damaged."""
    try:
        state = registry.alias(alias)
    except AliasDamaged as exc:
        raise HTTPException(
            503, detail=f"{exc}; set it again with PUT {PREFIX}/aliases/{alias}"
        ) from None
    if state is None:
        raise HTTPException(404, detail=f"alias '{alias}' is not set: nothing is published yet")
    return state


def alias_or_404(registry: Registry, alias: str) -> tuple[AliasState, VersionManifest]:
    state = _alias_state(registry, alias)
    return state, manifest_or_404(registry, state.version)


_UNAVAILABLE = {"model": ErrorBody, "description": "A registry file is damaged (the reason)"}


# ------------------------------------------------------------------------ routes
@router.get("", response_model=ModelSummary, summary="Aliases and version count")
def model_summary(settings: SettingsDep) -> ModelSummary:
    reg = settings.registry
    numbers = reg.version_numbers()
    views: dict[str, AliasView | None] = {}
    problems: dict[str, str] = {}
    for name in ALIAS_NAMES:
        try:
            state = reg.alias(name)
        except AliasDamaged as exc:
            state, problems[name] = None, exc.reason
        views[name] = (
            AliasView(version=state.version, pinned=state.pinned, updated_at=state.updated_at)
            if state
            else None
        )
    serving = views.get("serving")
    return ModelSummary(
        version_count=len(numbers),
        latest_version=numbers[-1] if numbers else None,
        serving_version=serving.version if serving else None,
        aliases=views,
        problems=problems,
    )


@router.get("/versions", response_model=VersionPage, summary="List versions (paginated)")
def list_versions(
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_VERSION)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> VersionPage:
    reg = settings.registry
    total = reg.count()
    items, damaged = reg.page(offset, limit)
    nxt = offset + limit if offset + limit < total else None
    return VersionPage(
        items=items,
        unavailable=[UnavailableVersion(version=v, reason=r) for v, r in damaged.items()],
        total=total,
        offset=offset,
        limit=limit,
        next_offset=nxt,
    )


@router.get(
    "/versions/{version}",
    response_model=VersionDetail,
    responses={404: _ERR, 503: _UNAVAILABLE},
    summary="Manifest of one version, and whether its blob verifies now",
)
async def get_version(version: VersionParam, settings: SettingsDep, request: Request) -> Any:
    reg = settings.registry
    manifest = manifest_or_404(reg, version)
    problem = await current_problem(reg, version)
    fields = manifest.model_dump()
    if problem is not None:  # never "verified" beside "servable: false"
        fields["status"] = "unavailable"
    return VersionDetail(
        **fields,
        servable=problem is None,
        reason=problem,
        weights_url=_weights_url(request, version),
    )


_WEIGHTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {}},
        "description": "safetensors bytes; ETag is the quoted sha256",
    },
    206: {"description": "Partial content (Range)"},
    304: {"description": "Not modified (If-None-Match matched)"},
    404: _ERR,
    416: _ERR,
    503: {"model": ErrorBody, "description": "Blob failed verification; not served"},
}


async def get_weights(version: VersionParam, settings: SettingsDep, request: Request) -> Response:
    """Weights of one version: the signature documents the route's parameters;
    ``WeightsRoute`` answers requests without calling it (same rules, by hand)."""
    return await weights_response(settings, version, request.method, request.headers)


def add_weights_routes(app: FastAPI) -> list[WeightsRoute]:
    """Add ``GET|HEAD .../versions/{version}/weights`` to ``app``, first in its route
    list; returns them (for ``HotRoutes``).

    Why on the app and not on ``router``: FastAPI 0.13x rebuilds the request
    handler of an *included* route on every request, and would bypass
    ``WeightsRoute``'s own handler; a top-level route is handled by it directly.
    First, because the router tries routes in order and devices hit this most.
    """
    for method, operation_id, summary in (
        ("GET", "get_version_weights", "Weights (safetensors) of one version"),
        ("HEAD", "head_version_weights", "Headers (ETag, size) of one version's weights"),
    ):
        app.router.add_api_route(
            WEIGHTS_PATH,
            get_weights,
            methods=[method],
            operation_id=operation_id,
            summary=summary,
            tags=["models"],
            response_class=Response,
            responses=_WEIGHTS_RESPONSES,
            route_class_override=WeightsRoute,
        )
    routes = app.router.routes
    weights = [r for r in routes if isinstance(r, WeightsRoute)]
    routes[:] = weights + [r for r in routes if not isinstance(r, WeightsRoute)]
    return weights


@router.get(
    "/aliases/{alias}",
    response_model=AliasInfo,
    responses={404: _ERR, 503: _UNAVAILABLE},
    summary="Which version an alias points at",
)
def get_alias(alias: AliasName, settings: SettingsDep, request: Request) -> AliasInfo:
    state, manifest = alias_or_404(settings.registry, alias)
    return AliasInfo(
        alias=alias,
        version=state.version,
        pinned=state.pinned,
        updated_at=state.updated_at,
        weights_url=_weights_url(request, state.version),
        manifest=manifest,
    )


_ALIAS_WEIGHTS_DOC = {
    "status_code": 302,
    "response_class": Response,
    "responses": {
        302: {"description": "Redirect to the versioned weights URL"},
        404: _ERR,
        503: _UNAVAILABLE,
    },
}


@router.get(
    "/aliases/{alias}/weights",
    operation_id="get_alias_weights",
    summary="Redirect to the weights of the version an alias points at",
    **_ALIAS_WEIGHTS_DOC,
)
@router.head(
    "/aliases/{alias}/weights",
    operation_id="head_alias_weights",
    summary="Redirect (HEAD) to the weights of the version an alias points at",
    **_ALIAS_WEIGHTS_DOC,
)
def get_alias_weights(alias: AliasName, settings: SettingsDep, request: Request) -> Response:
    state = _alias_state(settings.registry, alias)
    return Response(
        status_code=302,
        headers={
            "location": _weights_url(request, state.version),
            "cache-control": "no-cache",
            "x-model-version": str(state.version),
        },
    )


def _write_failure(exc: RegistryWriteError) -> HTTPException:
    """507 when the disk is full, 503 when the registry is read-only or not ours to write."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return HTTPException(507 if full else 503, detail=str(exc))


@router.put(
    "/aliases/{alias}",
    response_model=AliasInfo,
    dependencies=[Depends(require_token)],
    responses={
        400: {"model": ErrorBody, "description": "Body is not decodable (e.g. not UTF-8)"},
        401: _ERR,
        403: _ERR,
        409: _ERR,
        413: _ERR,
        503: {"model": ErrorBody, "description": "Registry read-only; the alias is unchanged"},
        507: {"model": ErrorBody, "description": "Registry disk full; the alias is unchanged"},
    },
    summary="Promote, roll back (pin a verified version) or follow latest (token required)",
)
def put_alias(
    alias: WritableAlias, body: AliasUpdate, settings: SettingsDep, request: Request
) -> AliasInfo:
    reg = settings.registry
    what = "latest" if not body.pinned else f"version {body.version}"
    try:
        state = reg.set_alias(
            alias, body.version, pinned=body.pinned, actor="human", reason=body.reason
        )
        manifest = reg.get(state.version)
    except VersionNotFound as exc:
        raise HTTPException(409, detail=f"{exc}; alias not moved") from None
    except (NotVerified, ManifestDamaged, AliasNotSet) as exc:
        raise HTTPException(409, detail=f"cannot point '{alias}' at {what}: {exc}") from None
    except RegistryWriteError as exc:
        log.error("alias %s not moved: %s", alias, exc)
        raise _write_failure(exc) from None
    log.warning("alias %s -> version %d (pinned=%s)", alias, state.version, state.pinned)
    return AliasInfo(
        alias=alias,
        version=state.version,
        pinned=state.pinned,
        updated_at=state.updated_at,
        weights_url=_weights_url(request, state.version),
        manifest=manifest,
    )
