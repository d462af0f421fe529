"""M3 (optional part): signed manifests. A fetch with the publisher's key accepts a
version only with a valid signature by that key, from the origin server or a mirror.

Real ``hybridfl sign`` (CLI), real uvicorn servers (the origin and a mirror serving a
copied registry), real files tampered with on disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.fetch import FetchError, fetch_model
from common.rundir import REGISTRY_DIR
from common.signing import SIGNATURES_DIR, generate_signing_key
from server.registry import Registry
from tests.conftest import HYBRIDFL
from tests.serving_fixtures import ServerProcess, publish_many, start_model_server_process


@dataclass
class Signed:
    origin: ServerProcess
    run_dir: Path
    key: Path
    pub: Path
    sign_output: str


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signed]:
    root = tmp_path_factory.mktemp("signed")
    run_dir = root / "run"
    publish_many(Registry(run_dir / REGISTRY_DIR), 2)
    key, pub = root / "models-signing.key", root / "models-signing.pub"
    generate_signing_key(key, pub)
    server = start_model_server_process(run_dir)
    try:
        # Served before signing: a device that asks for signatures refuses it.
        with pytest.raises(FetchError, match="is not signed"):
            fetch_model(server.url, cache_dir=root / "c0", verify_key=pub)
        out = subprocess.run(
            [*HYBRIDFL, "sign", str(run_dir), "--key", str(key)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        yield Signed(server, run_dir, key, pub, out.stdout)
    finally:
        server.stop()


def test_sign_command_signs_each_version_once(signed: Signed) -> None:
    assert "signed 2 version(s): [0, 1]" in signed.sign_output
    from common.signing import load_private_key, sign_registry

    assert sign_registry(signed.run_dir / REGISTRY_DIR, load_private_key(signed.key)) == []


def test_signed_versions_fetch_from_origin_and_mirror(signed: Signed, tmp_path: Path) -> None:
    res = fetch_model(signed.origin.url, cache_dir=tmp_path / "a", verify_key=signed.pub)
    registry = Registry(signed.run_dir / REGISTRY_DIR)
    assert res.manifest == registry.get(1) and res.downloaded
    mirror_dir = tmp_path / "mirror"
    shutil.copytree(signed.run_dir, mirror_dir)
    mirror = start_model_server_process(mirror_dir)
    try:
        got = fetch_model(mirror.url, cache_dir=tmp_path / "b", version=0, verify_key=signed.pub)
    finally:
        mirror.stop()
    assert got.manifest == registry.get(0)


def test_wrong_key_and_altered_records_are_refused(signed: Signed, tmp_path: Path) -> None:
    other_key, other_pub = tmp_path / "other.key", tmp_path / "other.pub"
    generate_signing_key(other_key, other_pub)
    with pytest.raises(FetchError, match="signed by key"):
        fetch_model(signed.origin.url, cache_dir=tmp_path / "a", verify_key=other_pub)
    sig_file = signed.run_dir / REGISTRY_DIR / SIGNATURES_DIR / "1.json"
    original = sig_file.read_text()
    record = json.loads(original)
    v0 = json.loads((signed.run_dir / REGISTRY_DIR / SIGNATURES_DIR / "0.json").read_text())
    try:
        # The manifest text altered (another blob's sha256): the signature fails.
        manifest = json.loads(record["manifest"])
        manifest["sha256"] = json.loads(v0["manifest"])["sha256"]
        sig_file.write_text(json.dumps({**record, "manifest": json.dumps(manifest)}))
        with pytest.raises(FetchError, match="does not verify"):
            fetch_model(signed.origin.url, cache_dir=tmp_path / "b", verify_key=signed.pub)
        # A valid signature of another version passed off as version 1: refused too.
        sig_file.write_text(json.dumps({**v0, "version": 1}))
        with pytest.raises(FetchError, match="other weights"):
            fetch_model(signed.origin.url, cache_dir=tmp_path / "c", verify_key=signed.pub)
    finally:
        sig_file.write_text(original)
    for cache in ("b", "c"):
        assert not list((tmp_path / cache).glob("*.safetensors"))
