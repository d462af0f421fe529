"""The model server as a real uvicorn process: protocol, safety, auth, errors."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.rundir import METRICS_FILE, REGISTRY_DIR
from server.registry import Registry
from tests.serving_fixtures import (
    SPEC,
    TOKEN,
    ServerProcess,
    blob_bytes,
    model_arrays,
    publish_and_kill,
    publish_many,
    running_servers,
    start_model_server_process,
)

API = "/v1/models/global"
StartServer = Callable[..., ServerProcess]


@pytest.fixture
def server_factory() -> Iterator[StartServer]:
    with running_servers() as start:
        yield start


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A read-mostly server over 3 versions and a metrics log with a torn last line."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 3)
    lines = [json.dumps({"round": r, "accuracy": 0.5 + r / 10}) for r in range(3)]
    lines.append(json.dumps({"round": 3, "loss": float("nan")}))
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + '\n{"round": 4, "acc')
    server = start_model_server_process(run_dir, token=TOKEN)
    yield server
    server.stop()


@pytest.fixture
def client(shared: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared.url, timeout=10) as c:
        yield c


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------ read API
def test_summary_listing_and_manifest(client: httpx.Client) -> None:
    summary = client.get(API).json()
    assert summary["version_count"] == 3 and summary["latest_version"] == 2
    assert summary["serving_version"] == 2 and summary["aliases"]["serving"]["pinned"] is False

    page = client.get(f"{API}/versions", params={"offset": 1, "limit": 1}).json()
    assert [m["version"] for m in page["items"]] == [1]
    assert (page["total"], page["next_offset"]) == (3, 2)
    last = client.get(f"{API}/versions", params={"offset": 2, "limit": 5}).json()
    assert last["next_offset"] is None

    m = client.get(f"{API}/versions/1").json()
    assert m["version"] == 1 and m["servable"] is True and m["status"] == "verified"
    assert m["weights_url"] == f"{API}/versions/1/weights" and m["model"]["name"] == "mlp2nn"

    alias = client.get(f"{API}/aliases/latest").json()
    assert alias["version"] == 2 and alias["manifest"]["version"] == 2


def test_weights_etag_cache_headers_and_304(client: httpx.Client, shared: ServerProcess) -> None:
    manifest = client.get(f"{API}/versions/0").json()
    r = client.get(f"{API}/versions/0/weights")
    assert r.status_code == 200
    assert r.content == blob_bytes(shared.run_dir, manifest["sha256"])
    assert hashlib.sha256(r.content).hexdigest() == manifest["sha256"]
    assert r.headers["etag"] == f'"{manifest["sha256"]}"'
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == manifest["size"]

    head = client.head(f"{API}/versions/0/weights")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["etag"] == r.headers["etag"]
    assert head.headers["content-length"] == r.headers["content-length"]

    etag = r.headers["etag"]
    for inm in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        not_modified = client.get(f"{API}/versions/0/weights", headers={"If-None-Match": inm})
        assert not_modified.status_code == 304, inm
        assert not_modified.content == b"" and not_modified.headers["etag"] == etag
    stale = client.get(f"{API}/versions/0/weights", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.content == r.content


def test_ranges(client: httpx.Client) -> None:
    full = client.get(f"{API}/versions/1/weights").content
    size = len(full)
    url = f"{API}/versions/1/weights"
    etag = client.head(url).headers["etag"]
    for header, (start, end) in {
        "bytes=0-99": (0, 100),
        "bytes=100-": (100, size),
        "bytes=-50": (size - 50, size),
        f"bytes=10-{size + 1000}": (10, size),
    }.items():
        r = client.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == full[start:end]
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
    unsat = client.get(url, headers={"Range": f"bytes={size}-"})
    assert unsat.status_code == 416 and unsat.headers["content-range"] == f"bytes */{size}"
    assert "detail" in unsat.json()
    for ignored in ("bytes=5-1", "items=0-1", "bytes=0-1,4-5", "bytes=x-"):
        r = client.get(url, headers={"Range": ignored})
        assert r.status_code == 200 and r.content == full, ignored
    r = client.get(url, headers={"Range": "bytes=100-", "If-Range": etag})
    assert r.status_code == 206 and r.content == full[100:]
    r = client.get(url, headers={"Range": "bytes=100-", "If-Range": '"old"'})
    assert r.status_code == 200 and r.content == full


def test_alias_weights_redirect(client: httpx.Client) -> None:
    r = client.get(f"{API}/aliases/serving/weights")
    assert r.status_code == 302
    assert r.headers["location"] == f"{API}/versions/2/weights"
    assert r.headers["cache-control"] == "no-cache"
    followed = client.get(f"{API}/aliases/serving/weights", follow_redirects=True)
    assert followed.status_code == 200
    assert followed.headers["etag"] == client.head(f"{API}/versions/2/weights").headers["etag"]


def test_rounds_tolerate_a_torn_last_line(client: httpx.Client) -> None:
    page = client.get("/v1/rounds").json()
    assert [row["round"] for row in page["items"]] == [0, 1, 2, 3] and page["total"] == 4
    assert client.get("/v1/rounds/1").json()["accuracy"] == pytest.approx(0.6)
    assert client.get("/v1/rounds/3").json()["loss"] is None  # NaN -> null, not a 500
    assert client.get("/v1/rounds/4").status_code == 404


def test_errors_are_json_with_the_right_codes(client: httpx.Client) -> None:
    missing = client.get(f"{API}/versions/99")
    assert missing.status_code == 404 and "versions are 0..2" in missing.json()["detail"]
    assert client.get(f"{API}/versions/99/weights").status_code == 404
    for bad in ("abc", "1.5", "-1", "99999999999999999999", "%2e%2e"):
        for suffix in ("", "/weights"):
            r = client.get(f"{API}/versions/{bad}{suffix}")
            assert r.status_code in (404, 422), (bad, suffix)
            assert r.headers["content-type"].startswith("application/json")
    assert client.get(f"{API}/versions/abc").status_code == 422
    assert client.get(f"{API}/versions/-1/weights").status_code == 422
    assert client.get(f"{API}/aliases/stable").status_code == 422
    assert client.get(f"{API}/aliases/..%2f..%2fetc").status_code in (404, 422)
    assert client.get(f"{API}/versions", params={"limit": 0}).status_code == 422
    assert client.get("/v1/rounds/x").status_code == 422
    assert client.delete(f"{API}/versions/1").status_code == 405


def test_health_ready_metrics_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["serving_version"] == 2
    client.get(f"{API}/versions/0/weights", headers={"If-None-Match": "*"})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert "# TYPE hybridfl_http_requests_total counter" in text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = "/v1/models/global/versions/{version}/weights"
    key = (
        "hybridfl_http_requests_total",
        (("method", "GET"), ("route", route), ("status", "304")),
    )
    assert values[key] >= 1
    assert values[("hybridfl_serving_version", ())] == 2
    assert values[("hybridfl_serving_round", ())] == 2
    assert values[("hybridfl_http_response_body_bytes_total", ())] > 0
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert f"{API}/versions/{{version}}/weights" in spec["paths"]


# ----------------------------------------------------------------- write API
def test_write_api_auth(client: httpx.Client) -> None:
    url = f"{API}/aliases/serving"
    missing = client.put(url, json={"version": 1})
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert client.put(url, json={"version": 1}, headers=auth("x" * 26)).status_code == 403
    assert (
        client.put(url, json={"version": 1}, headers={"Authorization": "Basic abc"}).status_code
        == 401
    )
    big = client.put(url, content=b'{"version": 1, "pad": "' + b"x" * 5000 + b'"}', headers=auth())
    assert big.status_code == 413

    def chunks() -> Iterator[bytes]:
        yield b'{"version": 1, "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    streamed = client.put(
        url, content=chunks(), headers={**auth(), "content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert client.put(url, json={"version": 1, "extra": 1}, headers=auth()).status_code == 422
    assert client.put(url, json={"version": "one"}, headers=auth()).status_code == 422
    for coerced in (False, "1", 1.5):  # no silent coercion to a version
        assert client.put(url, json={"version": coerced}, headers=auth()).status_code == 422
    assert client.put(url, content=b"{not json", headers=auth()).status_code == 422
    assert (
        client.put(f"{API}/aliases/latest", json={"version": 1}, headers=auth()).status_code == 422
    )
    unknown = client.put(url, json={"version": 42}, headers=auth())
    assert unknown.status_code == 409 and "does not exist" in unknown.json()["detail"]
    assert client.get(f"{API}/aliases/serving").json()["version"] == 2  # nothing moved


def test_writes_disabled_without_token(tmp_path: Path, server_factory: StartServer) -> None:
    run_dir = tmp_path / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 1)
    server = server_factory(run_dir)
    r = httpx.put(f"{server.url}{API}/aliases/serving", json={"version": 0}, headers=auth())
    assert r.status_code == 403 and "HYBRIDFL_TOKEN" in r.json()["detail"]


def test_rollback_moves_serving_etag_and_readiness(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    manifests = publish_many(registry, 3)
    server = server_factory(run_dir, token=TOKEN)
    c = httpx.Client(base_url=server.url, timeout=10, follow_redirects=True)

    def served_etag() -> str:
        return c.head(f"{API}/aliases/serving/weights").headers["etag"]

    assert served_etag() == f'"{manifests[2].sha256}"'
    # The serving blob gets truncated on disk: not ready, not served.
    blob = registry.blob_path(2)
    good = blob.read_bytes()
    blob.write_bytes(good[: len(good) // 2])
    ready = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["serving_version"] == 2
    broken = c.get(f"{API}/versions/2/weights")
    assert broken.status_code == 503 and "verification" in broken.json()["detail"]
    assert c.get(f"{API}/versions/2").json()["servable"] is False
    refused = c.put(f"{API}/aliases/serving", json={"version": 2}, headers=auth())
    assert refused.status_code == 409

    rolled = c.put(f"{API}/aliases/serving", json={"version": 1}, headers=auth())
    assert rolled.status_code == 200 and rolled.json()["pinned"] is True
    assert served_etag() == f'"{manifests[1].sha256}"'
    assert c.get("/readyz").status_code == 200
    assert "hybridfl_serving_version 1.0" in c.get("/metrics").text

    # A pin survives a publish and a restart of the server (it is a file).
    publish_many(registry, 1, start=3)
    server.stop()
    server = server_factory(run_dir, token=TOKEN)
    c = httpx.Client(base_url=server.url, timeout=10, follow_redirects=True)
    alias = c.get(f"{API}/aliases/serving").json()
    assert (alias["version"], alias["pinned"]) == (1, True)
    assert c.get(f"{API}/aliases/latest").json()["version"] == 3
    # Unpinned promotion: serving follows latest again from the next publish.
    c.put(f"{API}/aliases/serving", json={"version": 3, "pinned": False}, headers=auth())
    publish_many(registry, 1, start=4)
    assert c.get(f"{API}/aliases/serving").json()["version"] == 4


def test_corruption_is_detected_even_after_verification(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    publish_many(registry, 2)
    server = server_factory(run_dir)
    c = httpx.Client(base_url=server.url, timeout=10)
    assert c.get(f"{API}/versions/0/weights").status_code == 200  # verified and cached
    blob = registry.blob_path(0)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    blob.write_bytes(bytes(data))
    assert c.get(f"{API}/versions/0/weights").status_code == 503
    assert c.get(f"{API}/versions/1/weights").status_code == 200  # the others still serve
    blob.unlink()
    assert c.get(f"{API}/versions/0/weights").status_code == 503


# --------------------------------------------------------------- concurrency
def test_publish_during_reads_serves_whole_versions(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    publish_many(registry, 1)
    server = server_factory(run_dir)
    published: dict[str, int] = {registry.get(0).sha256: 0}
    seen: list[tuple[str, str]] = []
    errors: list[str] = []
    done = threading.Event()

    def reader() -> None:
        with httpx.Client(base_url=server.url, timeout=10, follow_redirects=True) as c:
            while not done.is_set():
                r = c.get(f"{API}/aliases/latest/weights")
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}")
                    continue
                seen.append((r.headers["etag"].strip('"'), hashlib.sha256(r.content).hexdigest()))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:  # readers are running
            time.sleep(0.005)
        for i in range(1, 16):
            m = registry.publish(model_arrays(i), round=i, model=SPEC)
            published[m.sha256] = m.version
            time.sleep(0.01)  # let reads interleave with every publish
    finally:
        done.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert len(seen) > 10
    for etag, digest in seen:
        assert etag == digest and digest in published  # whole versions, never a mix
    assert len({d for _, d in seen}) > 1  # readers did observe new versions arriving


def test_publish_killed_midway_serves_nothing_partial(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    before = publish_many(registry, 2)
    server = server_factory(run_dir)
    c = httpx.Client(base_url=server.url, timeout=10)
    for stage in ("blob-temp-written", "blob-committed", "manifest-temp-written"):
        publish_and_kill(registry.root, stage)
        assert c.get(API).json()["version_count"] == 2, stage
        assert c.get(f"{API}/versions/2").status_code == 404
        assert c.get(f"{API}/versions/2/weights").status_code == 404
        for m in before:
            r = c.get(f"{API}/versions/{m.version}/weights")
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == m.sha256
        assert c.get("/readyz").status_code == 200
    after = registry.publish(model_arrays(7), round=7, model=SPEC)
    assert after.version == 2
    r = c.get(f"{API}/aliases/serving/weights", follow_redirects=True)
    assert hashlib.sha256(r.content).hexdigest() == after.sha256
