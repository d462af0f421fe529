"""Shared state and FastAPI dependencies of the model server (settings, auth).

Why a module of its own: the routers (``http_models``, ``http_rounds``) and the
app factory (``http``) all need them, and the factory imports the routers.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.registry import ALIASES, AliasDamaged, Registry, RegistryError
from server.rollout_state import RolloutCollector

if TYPE_CHECKING:  # the routers import this module: no runtime import back
    from server.http_models import BlobCache
    from server.http_predict import ModelCache
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


_KNOWN_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})


class RegistryCollector(Collector):
    """Registry gauges computed at scrape time. Never raises: a damaged registry
    file is what monitoring must see, so it becomes -1 and a damage gauge."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reg = self.registry
        try:
            numbers = reg.version_numbers()
        except OSError:
            numbers = []
        damaged_versions = 0
        for n in numbers:
            try:
                reg.get(n)  # cached once read: one dict lookup per good version
            except RegistryError:
                damaged_versions += 1
        serving_version = serving_round = -1
        alias_damaged = GaugeMetricFamily(
            "hybridfl_registry_alias_damaged",
            "1 when the alias file cannot be read (see /readyz for the reason).",
            labels=["alias"],
        )
        for name in ALIASES:
            try:
                state = reg.alias(name)
                alias_damaged.add_metric([name], 0)
            except AliasDamaged:
                alias_damaged.add_metric([name], 1)
                continue
            if name == "serving" and state is not None:
                serving_version = state.version
                with contextlib.suppress(RegistryError):
                    serving_round = reg.get(state.version).round
        yield GaugeMetricFamily(
            "hybridfl_registry_versions", "Published global-model versions.", value=len(numbers)
        )
        yield GaugeMetricFamily(
            "hybridfl_registry_versions_damaged",
            "Versions whose manifest file cannot be read.",
            value=damaged_versions,
        )
        yield alias_damaged
        yield GaugeMetricFamily(
            "hybridfl_latest_version",
            "Newest published version (-1: none).",
            value=numbers[-1] if numbers else -1,
        )
        yield GaugeMetricFamily(
            "hybridfl_serving_version",
            "Version served to devices (-1: none or unreadable).",
            value=serving_version,
        )
        yield GaugeMetricFamily(
            "hybridfl_serving_round",
            "Training round of the serving version (-1: none).",
            value=serving_round,
        )


class ServerMetrics:
    """The app's Prometheus metrics, in a ``CollectorRegistry`` of its own.

    Why not the global registry: two apps in one process (tests, a benchmark)
    would share and double-register series. Why plain dict counts exposed by a
    collector instead of ``Counter.labels(...).inc()``: the counting runs on the
    event loop for every request (no threads, so no lock needed), and the two
    locked ``inc`` calls cost as much as a whole 304 answer; prometheus_client
    still writes the text, from ``CounterMetricFamily`` at scrape time.
    """

    def __init__(self, registry: Registry) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.bytes_sent = 0
        self.model_builds: Callable[[], int] = lambda: 0
        """Set by ``create_app`` to read the model cache's build count."""
        self.collectors = CollectorRegistry(auto_describe=True)
        self.collectors.register(_RequestCollector(self))
        self.collectors.register(RegistryCollector(registry))
        self.collectors.register(RolloutCollector(registry.root))

    def count(self, method: str, route: str, status: int) -> None:
        """One request; unknown methods share one label (clients choose them)."""
        key = (method if method in _KNOWN_METHODS else "other", route, status)
        self.requests[key] = self.requests.get(key, 0) + 1


class _RequestCollector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "hybridfl_http_requests",
            "HTTP requests by method, route template, status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), n in sorted(self.metrics.requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        yield CounterMetricFamily(
            "hybridfl_http_response_body_bytes",
            "Response body bytes sent.",
            value=self.metrics.bytes_sent,
        )
        yield CounterMetricFamily(
            "hybridfl_predict_model_builds",
            "Models built for predictions (once per version while it stays cached).",
            value=self.metrics.model_builds(),
        )


@dataclass
class Settings:
    """Everything a request handler needs, built once by ``create_app``."""

    run_dir: Path
    registry: Registry
    token: str | None
    blobs: BlobCache
    models: ModelCache
    rounds: RoundsLog
    metrics: ServerMetrics


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
