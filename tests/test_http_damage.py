"""A damaged registry gives clear answers, never a 500 (issue 12, M2).

The damage is done to real files under a real uvicorn server: a truncated
manifest, a truncated alias file, and a rollback on a read-only or a full
filesystem (a real tmpfs, mounted when the test may mount; else skipped).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.rundir import REGISTRY_DIR
from server.registry import AliasDamaged, ManifestDamaged, Registry, RegistryWriteError
from tests.serving_fixtures import TOKEN, ServerProcess, publish_many, running_servers

API = "/v1/models/global"
StartServer = Callable[..., ServerProcess]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server_factory() -> Iterator[StartServer]:
    with running_servers() as start:
        yield start


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text: {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_manifest_is_listed_unavailable_and_the_rest_works(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    publish_many(registry, 3)
    truncate(registry.versions_dir / "1.json")
    server = server_factory(run_dir)
    c = httpx.Client(base_url=server.url, timeout=10)

    page = c.get(f"{API}/versions")
    assert page.status_code == 200
    body = page.json()
    assert [m["version"] for m in body["items"]] == [0, 2] and body["total"] == 3
    (bad,) = body["unavailable"]
    assert bad["version"] == 1 and "JSON" in bad["reason"]

    detail = c.get(f"{API}/versions/1")
    assert detail.status_code == 503 and "1.json is damaged" in detail.json()["detail"]
    weights = c.get(f"{API}/versions/1/weights")
    assert weights.status_code == 503 and "damaged" in weights.json()["detail"]
    assert c.get(f"{API}/versions/2/weights").status_code == 200
    assert c.get(API).status_code == 200
    assert c.get("/readyz").status_code == 200  # serving (2) is intact
    values = metric_values(c.get("/metrics").text)
    assert values[("hybridfl_registry_versions_damaged", ())] == 1
    assert values[("hybridfl_serving_version", ())] == 2
    # A publish after the damage still works and is listed.
    publish_many(registry, 1, start=3)
    assert [m["version"] for m in c.get(f"{API}/versions").json()["items"]] == [0, 2, 3]


def test_truncated_alias_file_makes_readyz_say_why_and_metrics_still_answer(
    tmp_path: Path, server_factory: StartServer
) -> None:
    run_dir = tmp_path / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    publish_many(registry, 3)
    truncate(registry.aliases_dir / "serving")
    server = server_factory(run_dir, token=TOKEN)
    c = httpx.Client(base_url=server.url, timeout=10)

    ready = c.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert "alias 'serving'" in ready.json()["detail"] and "damaged" in ready.json()["detail"]
    assert c.get("/healthz").json() == {"status": "ok"}
    metrics = c.get("/metrics")
    assert metrics.status_code == 200
    values = metric_values(metrics.text)
    assert values[("hybridfl_registry_alias_damaged", (("alias", "serving"),))] == 1
    assert values[("hybridfl_registry_alias_damaged", (("alias", "latest"),))] == 0
    assert values[("hybridfl_serving_version", ())] == -1
    assert values[("hybridfl_latest_version", ())] == 2

    for url in (f"{API}/aliases/serving", f"{API}/aliases/serving/weights"):
        r = c.get(url)
        assert r.status_code == 503 and "damaged" in r.json()["detail"], url
    assert c.get(f"{API}/aliases/latest").json()["version"] == 2
    summary = c.get(API).json()
    assert summary["aliases"]["serving"] is None and "serving" in summary["problems"]

    # A publish never guesses over a possible pin: serving stays damaged, latest moves.
    publish_many(registry, 1, start=3)
    assert c.get(f"{API}/aliases/latest").json()["version"] == 3
    assert c.get("/readyz").status_code == 503
    # An operator repairs it by setting it.
    fixed = c.put(f"{API}/aliases/serving", json={"version": 1}, headers=AUTH)
    assert fixed.status_code == 200 and fixed.json()["version"] == 1
    assert c.get("/readyz").json() == {"status": "ready", "serving_version": 1}


def test_registry_reports_damage_with_reasons(tmp_path: Path) -> None:
    registry = Registry(tmp_path / REGISTRY_DIR)
    publish_many(registry, 2)
    (registry.versions_dir / "0.json").write_text('{"version": 0')
    fresh = Registry(registry.root)
    with pytest.raises(ManifestDamaged, match=r"0\.json is damaged"):
        fresh.get(0)
    items, damaged = fresh.page()
    assert [m.version for m in items] == [1] and list(damaged) == [0]
    (registry.aliases_dir / "latest").write_text("")
    with pytest.raises(AliasDamaged):
        fresh.alias("latest")
    publish_many(fresh, 1, start=2)  # a damaged 'latest' is derived data: rewritten
    assert fresh.resolve_alias("latest") == 2


# ------------------------------------------------------- unwritable registries
def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    _mount_tmpfs(where, size)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path) -> None:
    """Write until the filesystem is full (ENOSPC), for real."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):  # small files may still fit in a partial page
        for i in range(1000):
            (folder / f"filler-{i}").write_bytes(b"\0" * 512)


@pytest.mark.parametrize("damage", ["read-only", "full"])
def test_rollback_on_an_unwritable_registry_says_why_and_changes_nothing(
    tmp_path: Path, server_factory: StartServer, damage: str
) -> None:
    with tmpfs(tmp_path / "mnt") as mnt:
        run_dir = mnt / "run"
        registry = Registry(run_dir / REGISTRY_DIR)
        publish_many(registry, 3)
        before = (registry.aliases_dir / "serving").read_bytes()
        server = server_factory(run_dir, token=TOKEN)
        c = httpx.Client(base_url=server.url, timeout=10)
        assert c.get("/readyz").status_code == 200  # verified while writable
        if damage == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:
            _fill(mnt)
        r = c.put(f"{API}/aliases/serving", json={"version": 1}, headers=AUTH)
        detail = r.json()["detail"]
        if damage == "read-only":
            assert r.status_code == 503 and "Read-only file system" in detail
        else:
            assert r.status_code == 507 and "No space left on device" in detail
        assert "unchanged" in detail and "serving" in detail
        assert (registry.aliases_dir / "serving").read_bytes() == before
        assert c.get(f"{API}/aliases/serving").json()["version"] == 2
        assert c.get("/readyz").status_code == 200 and c.get("/metrics").status_code == 200
        assert not [p for p in registry.aliases_dir.iterdir() if p.name.startswith(".tmp-")]
        with pytest.raises(RegistryWriteError):
            Registry(registry.root).set_alias("serving", 0)
        assert json.loads((registry.aliases_dir / "serving").read_bytes())["version"] == 2
        server.stop()
