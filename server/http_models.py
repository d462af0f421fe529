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
import logging
import re
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool
from starlette.datastructures import Headers
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from common.manifest import VersionManifest
from server.http_deps import Settings, SettingsDep, require_token
from server.registry import NotVerified, Registry, VersionNotFound

log = logging.getLogger(__name__)

PREFIX = "/v1/models/global"
CHUNK = 1 << 20
IMMUTABLE = "public, max-age=31536000, immutable"
MAX_VERSION = 2**31 - 1

AliasName = Literal["latest", "serving"]
WritableAlias = Literal["serving"]
VersionParam = Annotated[
    int, PathParam(ge=0, le=MAX_VERSION, description="Version number (0 = initial model).")
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


class VersionPage(BaseModel):
    items: list[VersionManifest]
    total: int
    offset: int
    limit: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class VersionDetail(VersionManifest):
    servable: bool = Field(description="Blob present and its size and sha256 verified now.")
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

    ``{"version": false}`` or ``"1"`` must not silently become version 0 or 1.
    """

    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, BeforeValidator(_json_integer)] = Field(ge=0, le=MAX_VERSION)
    pinned: StrictBool = Field(
        default=True,
        description="Keep 'serving' here when new versions are published "
        "(false: follow 'latest' again from the next publish).",
    )


class ErrorBody(BaseModel):
    detail: str


_ERR = {"model": ErrorBody}


# ------------------------------------------------------------------- blob serving
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
        ok = self.registry.is_verified_cached(version)
        if ok is None:
            ok = await anyio.to_thread.run_sync(self.registry.verify, version)
        if not ok:
            raise NotVerified(f"version {version}: blob is truncated or corrupt")
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
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - n, 0), size
    if not first.isdigit() or not first.isascii():
        return None
    start = int(first)
    if last == "":
        end = size - 1
    elif last.isdigit() and last.isascii():
        end = int(last)
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


WEIGHTS_ROUTE = f"{PREFIX}/versions/{{version}}/weights"
_WEIGHTS_PATH = re.compile(rf"^{re.escape(PREFIX)}/versions/(0|[1-9][0-9]{{0,9}})/weights$")


class WeightsFastPath:
    """ASGI shortcut for ``GET|HEAD .../versions/{n}/weights`` ahead of FastAPI's router.

    Why: FastAPI's per-request routing, dependency solving and validation cost
    ~4x more than the response itself; a device revalidating its model (304) is
    the hottest request there is. Anything the regex does not take (non-integer,
    out of range) falls through to the documented FastAPI route and its 422.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            match = _WEIGHTS_PATH.match(get_route_path(scope))
            if match is not None and int(match.group(1)) <= MAX_VERSION:
                scope["hybridfl.route"] = WEIGHTS_ROUTE
                response = await weights_response(
                    self.settings, int(match.group(1)), scope["method"], Headers(scope=scope)
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _weights_url(request: Request, version: int) -> str:
    """Path-only URL (never built from the Host header: no cache-poisoning redirects)."""
    return f"{request.scope.get('root_path', '')}{PREFIX}/versions/{version}/weights"


def _manifest_or_404(registry: Registry, version: int) -> VersionManifest:
    try:
        return registry.get(version)
    except VersionNotFound:
        raise HTTPException(404, detail=_missing(registry, version)) from None


def _alias_or_404(registry: Registry, alias: str) -> tuple[Any, VersionManifest]:
    state = registry.alias(alias)
    if state is None:
        raise HTTPException(404, detail=f"alias '{alias}' is not set: nothing is published yet")
    return state, _manifest_or_404(registry, state.version)


# ------------------------------------------------------------------------ routes
@router.get("", response_model=ModelSummary, summary="Aliases and version count")
def model_summary(settings: SettingsDep) -> ModelSummary:
    reg = settings.registry
    numbers = reg.version_numbers()
    aliases = reg.aliases()
    serving = aliases.get("serving")
    return ModelSummary(
        version_count=len(numbers),
        latest_version=numbers[-1] if numbers else None,
        serving_version=serving.version if serving else None,
        aliases={
            k: AliasView(version=v.version, pinned=v.pinned, updated_at=v.updated_at) if v else None
            for k, v in aliases.items()
        },
    )


@router.get("/versions", response_model=VersionPage, summary="List versions (paginated)")
def list_versions(
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_VERSION)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> VersionPage:
    reg = settings.registry
    total = reg.count()
    items = reg.versions(offset, limit)
    nxt = offset + limit if offset + limit < total else None
    return VersionPage(items=items, total=total, offset=offset, limit=limit, next_offset=nxt)


@router.get(
    "/versions/{version}",
    response_model=VersionDetail,
    responses={404: _ERR},
    summary="Manifest of one version",
)
async def get_version(version: VersionParam, settings: SettingsDep, request: Request) -> Any:
    reg = settings.registry
    manifest = _manifest_or_404(reg, version)
    ok = reg.is_verified_cached(version)
    if ok is None:
        ok = await anyio.to_thread.run_sync(reg.verify, version)
    return VersionDetail(
        **manifest.model_dump(), servable=ok, weights_url=_weights_url(request, version)
    )


_WEIGHTS_DOC = {
    "response_class": Response,
    "responses": {
        200: {
            "content": {"application/octet-stream": {}},
            "description": "safetensors bytes; ETag is the quoted sha256",
        },
        206: {"description": "Partial content (Range)"},
        304: {"description": "Not modified (If-None-Match matched)"},
        404: _ERR,
        416: _ERR,
        503: {"model": ErrorBody, "description": "Blob failed verification; not served"},
    },
}


@router.get(
    "/versions/{version}/weights",
    operation_id="get_version_weights",
    summary="Weights (safetensors) of one version",
    **_WEIGHTS_DOC,
)
@router.head(
    "/versions/{version}/weights",
    operation_id="head_version_weights",
    summary="Headers (ETag, size) of one version's weights",
    **_WEIGHTS_DOC,
)
async def get_weights(version: VersionParam, settings: SettingsDep, request: Request) -> Response:
    """Documents the route; in a running app ``WeightsFastPath`` answers it first."""
    return await weights_response(settings, version, request.method, request.headers)


@router.get(
    "/aliases/{alias}",
    response_model=AliasInfo,
    responses={404: _ERR},
    summary="Which version an alias points at",
)
def get_alias(alias: AliasName, settings: SettingsDep, request: Request) -> AliasInfo:
    state, manifest = _alias_or_404(settings.registry, alias)
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
    "responses": {302: {"description": "Redirect to the versioned weights URL"}, 404: _ERR},
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
    state, _ = _alias_or_404(settings.registry, alias)
    return Response(
        status_code=302,
        headers={
            "location": _weights_url(request, state.version),
            "cache-control": "no-cache",
            "x-model-version": str(state.version),
        },
    )


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
    },
    summary="Promote or roll back: point an alias at a verified version (token required)",
)
def put_alias(
    alias: WritableAlias, body: AliasUpdate, settings: SettingsDep, request: Request
) -> AliasInfo:
    reg = settings.registry
    try:
        state = reg.set_alias(alias, body.version, pinned=body.pinned)
    except VersionNotFound:
        raise HTTPException(409, detail=f"version {body.version} does not exist") from None
    except NotVerified as exc:
        raise HTTPException(409, detail=f"version {body.version} is not verified: {exc}") from None
    log.warning("alias %s -> version %d (pinned=%s)", alias, state.version, state.pinned)
    return AliasInfo(
        alias=alias,
        version=state.version,
        pinned=state.pinned,
        updated_at=state.updated_at,
        weights_url=_weights_url(request, state.version),
        manifest=reg.get(state.version),
    )
