"""Device-side fetch client against a real model server (and one lying fake)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from client.fetch import FetchError, FetchResult, fetch_model, load_fetched_model
from common.rundir import REGISTRY_DIR
from common.weights import model_to_arrays
from server.registry import Registry
from tests.serving_fixtures import (
    BIG_SPEC,
    SPEC,
    ServerProcess,
    model_arrays,
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
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """v0: small model; v1 (serving): ~4.5 MB, so a transfer can be cut midway."""
    run_dir = tmp_path_factory.mktemp("fetch") / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    publish_many(registry, 1)
    registry.publish(model_arrays(1, BIG_SPEC), round=1, model=BIG_SPEC)
    server = start_model_server_process(run_dir)
    yield server
    server.stop()


def count_304(url: str) -> int:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(
        r'route="/v1/models/global/versions/\{version\}/weights",status="304"} (\d+)', text
    )
    return int(m.group(1)) if m else 0


def assert_loads(result: FetchResult, seed: int, spec: dict) -> None:
    model = load_fetched_model(result)
    expected = model_arrays(seed, spec)
    got = model_to_arrays(model)
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_fetch_verifies_loads_and_revalidates(served: ServerProcess, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = fetch_model(served.url, cache_dir=cache)
    assert first.downloaded and first.manifest.version == 1
    assert first.bytes == first.manifest.size == first.path.stat().st_size
    assert first.path == cache / f"{first.sha256}.safetensors"
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256
    assert_loads(first, 1, BIG_SPEC)

    before = count_304(served.url)
    again = fetch_model(served.url, cache_dir=cache)
    assert (again.downloaded, again.bytes, again.path) == (False, 0, first.path)
    assert count_304(served.url) == before + 1  # one conditional GET, no body

    small = fetch_model(served.url, version=0, cache_dir=cache)
    assert small.downloaded and small.manifest.version == 0
    assert_loads(small, 0, SPEC)
    assert sorted(p.name for p in cache.glob("*.safetensors")) == sorted(
        [f"{first.sha256}.safetensors", f"{small.sha256}.safetensors"]
    )


class Interrupted(Exception):
    pass


def test_resume_after_interrupted_transfer(served: ServerProcess, tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    def cut(done: int, total: int) -> None:
        if done >= 1 << 20:
            raise Interrupted

    with pytest.raises(Interrupted):
        fetch_model(served.url, cache_dir=cache, progress=cut)
    (partial,) = cache.glob("*.incomplete")
    have = partial.stat().st_size
    assert 0 < have < 4 << 20
    assert not list(cache.glob("*.safetensors"))  # nothing unverified under the real name

    resumed = fetch_model(served.url, cache_dir=cache)
    assert resumed.downloaded and resumed.bytes == resumed.manifest.size - have
    full = httpx.get(f"{served.url}{API}/versions/1/weights").content
    assert resumed.path.read_bytes() == full
    assert not list(cache.glob("*.incomplete"))
    assert_loads(resumed, 1, BIG_SPEC)


def test_bad_partial_is_discarded_and_refetched(served: ServerProcess, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    manifest = httpx.get(f"{served.url}{API}/versions/1").json()
    cache.mkdir()
    (cache / f"{manifest['sha256']}.safetensors.incomplete").write_bytes(b"\0" * (1 << 20))
    result = fetch_model(served.url, version=1, cache_dir=cache)
    assert result.bytes == manifest["size"] - (1 << 20) + manifest["size"]  # tail, then clean
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == manifest["sha256"]


def test_damaged_cache_file_is_fetched_again(served: ServerProcess, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = fetch_model(served.url, version=0, cache_dir=cache)
    first.path.write_bytes(first.path.read_bytes()[:-5] + b"xxxxx")
    again = fetch_model(served.url, version=0, cache_dir=cache)
    assert again.downloaded and hashlib.sha256(again.path.read_bytes()).hexdigest() == again.sha256
    first.path.write_bytes(b"tampered after fetch")
    with pytest.raises(FetchError, match="changed since it was verified"):
        load_fetched_model(again)


def test_no_lock_files_stay_in_the_cache(served: ServerProcess, tmp_path: Path) -> None:
    """Concurrent fetches of one version serialise on a lock file that is then removed."""
    cache = tmp_path / "cache"
    results: list[FetchResult] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetch_model(served.url, version=0, cache_dir=cache))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 4
    assert sum(r.downloaded for r in results) >= 1
    assert len({r.sha256 for r in results}) == 1
    fetch_model(served.url, version=0, cache_dir=cache)  # a current cache: nothing fetched
    assert sorted(p.name for p in cache.iterdir()) == [f"{results[0].sha256}.safetensors"]


def test_clear_errors(served: ServerProcess, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"version 99 not found"):
        fetch_model(served.url, version=99, cache_dir=tmp_path)
    with pytest.raises(FetchError) as unknown:
        fetch_model(served.url, alias="nope", cache_dir=tmp_path)
    message = str(unknown.value)  # a sentence naming the valid aliases, not pydantic JSON
    assert "unknown alias 'nope'" in message and "'latest' and 'serving'" in message
    assert "{" not in message
    with pytest.raises(FetchError, match="unknown alias"):
        fetch_model(served.url, alias="../versions/1", cache_dir=tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(FetchError) as info:
        fetch_model(url, cache_dir=tmp_path, timeout=2)
    assert url in str(info.value) and "hybridfl serve" in str(info.value)


def test_server_side_corruption_and_new_versions(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    server = server_factory(run_dir)
    with pytest.raises(FetchError, match="not set"):
        fetch_model(server.url, cache_dir=tmp_path / "c")
    assert httpx.get(f"{server.url}/readyz").status_code == 503  # nothing to serve yet
    publish_many(registry, 2)
    first = fetch_model(server.url, cache_dir=tmp_path / "c")
    assert first.manifest.version == 1
    newer = registry.publish(model_arrays(5), round=5, model=SPEC)
    second = fetch_model(server.url, cache_dir=tmp_path / "c")
    assert second.downloaded and second.sha256 == newer.sha256 and first.path.exists()
    blob = registry.blob_path(0)
    size = blob.stat().st_size
    blob.write_bytes(blob.read_bytes()[:100])
    with pytest.raises(FetchError, match="refuses to serve version 0") as refused:
        fetch_model(server.url, version=0, cache_dir=tmp_path / "c")
    assert f"truncated: 100 bytes, the manifest says {size}" in str(refused.value)


# -------------------------------------------------------------- a lying server
class _LyingHandler(BaseHTTPRequestHandler):
    """Serves a real manifest but bytes that do not hash to it (same size and ETag)."""

    manifest: dict
    body: bytes

    def do_GET(self) -> None:
        if self.path == f"{API}/aliases/serving":
            payload = json.dumps(
                {"alias": "serving", "version": 0, "manifest": self.manifest}
            ).encode()
            self._send(200, payload, {"content-type": "application/json"})
        elif self.path == f"{API}/versions/0/weights":
            etag = f'"{self.manifest["sha256"]}"'
            self._send(200, self.body, {"etag": etag, "content-type": "application/octet-stream"})
        else:
            self._send(404, b'{"detail": "no"}', {"content-type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_refuses_bytes_that_do_not_match_the_manifest(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "run" / REGISTRY_DIR)
    (manifest,) = publish_many(registry, 1)
    good = registry.blob_path(0).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    handler = type(
        "Handler",
        (_LyingHandler,),
        {"manifest": json.loads(manifest.model_dump_json()), "body": bytes(bad)},
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cache = tmp_path / "cache"
        with pytest.raises(FetchError, match="corrupt download"):
            fetch_model(url, cache_dir=cache)
        assert not list(cache.glob("*.safetensors*"))  # bad bytes deleted, nothing to load
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
