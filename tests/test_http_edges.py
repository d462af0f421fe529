"""Edges a hostile tester found (issue 12 L1-L9) and a newcomer met (issue 13 items 5, 16).

Each against a real uvicorn model server: oversized Range numbers, NaN in JSON,
non-canonical version spellings, 405 ``Allow``, the token file's mode, /docs
without a CDN, following ``latest`` again, rounds of a finished run, and the
reasons given for a damaged blob.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from common.rundir import FAILURE_FILE, METRICS_FILE, REGISTRY_DIR, SUMMARY_FILE
from server.http import load_token
from server.registry import Registry
from tests.serving_fixtures import (
    TOKEN,
    ServerProcess,
    publish_many,
    running_servers,
    start_model_server_process,
)

API = "/v1/models/global"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
StartServer = Callable[..., ServerProcess]


@pytest.fixture
def server_factory() -> Iterator[StartServer]:
    with running_servers() as start:
        yield start


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    run_dir = tmp_path_factory.mktemp("edges") / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 3)
    started = start_model_server_process(run_dir, token=TOKEN)
    yield started
    started.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


# ----------------------------------------------------------------- L: protocol
def test_range_numbers_of_any_length(client: httpx.Client) -> None:
    url = f"{API}/versions/1/weights"
    full = client.get(url).content
    huge = "9" * 5000  # Python refuses int() of more than 4,300 digits
    start_too_far = client.get(url, headers={"Range": f"bytes={huge}-"})
    assert start_too_far.status_code == 416
    assert start_too_far.headers["content-range"] == f"bytes */{len(full)}"
    open_end = client.get(url, headers={"Range": f"bytes=10-{huge}"})
    assert open_end.status_code == 206 and open_end.content == full[10:]
    suffix = client.get(url, headers={"Range": f"bytes=-{huge}"})
    assert suffix.status_code == 206 and suffix.content == full
    padded = client.get(url, headers={"Range": f"bytes={'0' * 5000}1-"})
    assert padded.status_code == 206 and padded.content == full[1:]


@pytest.mark.parametrize(
    "body",
    [
        b'{"version": NaN}',
        b'{"version": Infinity}',
        b'{"version": -Infinity}',
        b'{"version": 1, "pinned": NaN}',
        b'{"version": 1, "extra": Infinity}',
    ],
)
def test_non_finite_json_numbers_are_422(client: httpx.Client, body: bytes) -> None:
    r = client.put(
        f"{API}/aliases/serving",
        content=body,
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)
    assert client.get(f"{API}/aliases/serving").json()["version"] == 2  # nothing moved


@pytest.mark.parametrize("spelling", ["01", "+1", "1.0", "-0", "1_0", "1e0", "%2B1", "%C2%B9"])
def test_only_canonical_version_spellings(client: httpx.Client, spelling: str) -> None:
    for path in (f"{API}/versions/{spelling}", f"{API}/versions/{spelling}/weights"):
        r = client.get(path)
        assert r.status_code == 422, (path, r.status_code)
        assert "non-negative integer written plainly" in r.text
    assert client.get(f"/v1/rounds/{spelling}").status_code == 422
    assert client.get(f"{API}/versions/1/weights").status_code == 200
    assert client.get(f"{API}/versions/10").status_code == 404  # 1_0 was never 10


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", f"{API}/versions/1/weights", "GET, HEAD"),
        ("POST", f"{API}/versions/1/weights", "GET, HEAD"),
        ("DELETE", f"{API}/aliases/serving", "GET, PUT"),
        ("DELETE", f"{API}/aliases/serving/weights", "GET, HEAD"),
        ("POST", f"{API}/versions/1", "GET"),
        ("PUT", "/healthz", "GET"),
    ],
)
def test_405_lists_the_real_allowed_methods(
    client: httpx.Client, method: str, path: str, allow: str
) -> None:
    r = client.request(method, path)
    assert r.status_code == 405
    assert r.headers["allow"] == allow
    assert allow in r.json()["detail"]


# ------------------------------------------------------------------ L: secrets
def test_token_file_readable_by_others_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o644)
    with pytest.raises(ValueError, match=r"readable or writable by other users \(mode 0644\)"):
        load_token(file=token_file)
    with pytest.raises(ValueError, match="chmod 600"):
        load_token(file=token_file)
    os.chmod(token_file, 0o620)  # group-writable: someone else could swap the token
    with pytest.raises(ValueError, match="other users"):
        load_token(file=token_file)
    os.chmod(token_file, 0o600)
    assert load_token(file=token_file) == TOKEN
    os.chmod(token_file, 0o640)
    with caplog.at_level(logging.WARNING, logger="server.http"):
        assert load_token(file=token_file) == TOKEN
    assert "readable by its group" in caplog.text


# --------------------------------------------------------------------- L: docs
def test_docs_load_nothing_from_a_cdn(client: httpx.Client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    page = docs.text
    assert "<script" not in page and "https://" not in page and "http://" not in page
    assert "/openapi.json" in page and "swagger-ui-bundle" in page
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code == 404


def test_docs_served_offline_when_a_package_provides_swagger_ui(
    tmp_path: Path, server_factory: StartServer
) -> None:
    """A stand-in for the ``swagger-ui-bundle`` package: its files are served locally."""
    package = tmp_path / "site" / "swagger_ui_bundle"
    assets = package / "vendor"
    assets.mkdir(parents=True)
    (assets / "swagger-ui-bundle.js").write_text("window.SwaggerUIBundle = function () {};\n")
    (assets / "swagger-ui.css").write_text("body {}\n")
    (package / "__init__.py").write_text(
        "from pathlib import Path\nswagger_ui_path = str(Path(__file__).parent / 'vendor')\n"
    )
    run_dir = tmp_path / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 1)
    server = server_factory(run_dir, extra_path=tmp_path / "site")
    page = httpx.get(f"{server.url}/docs").text
    assert "/docs/assets/swagger-ui-bundle.js" in page and "https://" not in page
    js = httpx.get(f"{server.url}/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text


# ---------------------------------------------------- issue 13: follow latest
def test_unpinning_makes_serving_follow_latest_now(
    tmp_path: Path, server_factory: StartServer
) -> None:
    """The README's ``{"version": 2, "pinned": false}`` after a pin to v2 follows latest."""
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    publish_many(registry, 5)  # latest: 4
    server = server_factory(run_dir, token=TOKEN)
    c = httpx.Client(base_url=server.url, timeout=10)
    url = f"{API}/aliases/serving"

    pinned = c.put(url, json={"version": 2}, headers=AUTH).json()
    assert (pinned["version"], pinned["pinned"]) == (2, True)
    publish_many(registry, 1, start=5)
    assert c.get(url).json()["version"] == 2  # a pin holds across publishes

    followed = c.put(url, json={"version": 2, "pinned": False}, headers=AUTH)
    assert followed.status_code == 200
    assert (followed.json()["version"], followed.json()["pinned"]) == (5, False)
    assert c.get(f"{url}/weights").headers["location"].endswith("/versions/5/weights")
    publish_many(registry, 1, start=6)
    assert c.get(url).json()["version"] == 6  # and keeps following

    c.put(url, json={"version": 1}, headers=AUTH)
    short = c.put(url, json={"pinned": False}, headers=AUTH)  # the short spelling
    assert (short.json()["version"], short.json()["pinned"]) == (6, False)
    missing = c.put(url, json={}, headers=AUTH)
    assert missing.status_code == 422
    assert '{"pinned": false}' in missing.json()["detail"][0]["msg"]


# ---------------------------------------------- issue 13: rounds and reasons
def test_rounds_of_a_finished_run_do_not_say_not_yet(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 1)
    (run_dir / METRICS_FILE).write_text(
        "".join(f'{{"round": {r}, "accuracy": 0.5}}\n' for r in range(1, 4))
    )
    server = server_factory(run_dir)
    running = httpx.get(f"{server.url}/v1/rounds/99").json()["detail"]
    assert "yet" in running and "still going" in running and "1..3" in running
    for marker in (SUMMARY_FILE, FAILURE_FILE):
        (run_dir / marker).write_text("{}\n")
        finished = httpx.get(f"{server.url}/v1/rounds/99")
        assert finished.status_code == 404
        detail = finished.json()["detail"]
        assert "does not exist" in detail and "finished" in detail and "yet" not in detail
        assert httpx.get(f"{server.url}/v1/rounds/2").json()["round"] == 2
        (run_dir / marker).unlink()


def test_a_damaged_blob_gives_its_real_reason_and_never_says_verified(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    manifests = publish_many(registry, 2)
    server = server_factory(run_dir)
    c = httpx.Client(base_url=server.url, timeout=10)
    good = c.get(f"{API}/versions/0").json()
    assert (good["status"], good["servable"], good["reason"]) == ("verified", True, None)

    blob = registry.blob_path(0)
    data = bytearray(blob.read_bytes())
    data[200] ^= 0xFF  # same size, other bytes
    blob.write_bytes(bytes(data))
    altered = c.get(f"{API}/versions/0").json()
    assert altered["servable"] is False and altered["status"] == "unavailable"
    assert "right size but other bytes: sha256" in altered["reason"]
    assert "bytes, expected" not in altered["reason"]
    weights = c.get(f"{API}/versions/0/weights").json()["detail"]
    assert "other bytes" in weights

    blob = registry.blob_path(1)
    blob.write_bytes(blob.read_bytes()[:1000])
    truncated = c.get(f"{API}/versions/1").json()
    assert truncated["status"] == "unavailable"
    expected = f"truncated: 1000 bytes, the manifest says {manifests[1].size}"
    assert expected in truncated["reason"]
    assert expected in c.get("/readyz").json()["detail"]
