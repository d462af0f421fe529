"""Registry on disk: publish, aliases, verification, dedup, crash safety."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import server.registry as registry_module
from common.rundir import REGISTRY_DIR
from server.registry import NotVerified, Registry, VersionNotFound
from tests.serving_fixtures import SPEC, model_arrays, publish_and_kill, publish_many


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "run" / REGISTRY_DIR)


def test_publish_writes_manifest_blob_and_aliases(registry: Registry) -> None:
    arrays = model_arrays(0)
    m0 = registry.publish(arrays, round=0, model=SPEC, metrics={"accuracy": 0.1})
    m1 = registry.publish(model_arrays(1), round=1, model=SPEC, metrics={"loss": float("nan")})

    assert (m0.version, m0.parent_version, m1.version, m1.parent_version) == (0, None, 1, 0)
    assert m0.status == "verified" and m0.metrics == {"accuracy": 0.1}
    assert m1.metrics == {}  # NaN has no JSON form: dropped, not a broken manifest
    assert m0.parameter_count == sum(a.size for a in arrays.values())
    assert m0.model["name"] == "mlp2nn" and m0.model["hidden"] == 32
    blob = registry.blob_path(0)
    assert blob.name == f"{m0.sha256}.safetensors" and blob.stat().st_size == m0.size
    on_disk = json.loads((registry.root / "versions" / "0.json").read_text())
    assert on_disk["sha256"] == m0.sha256 and on_disk["status"] == "verified"
    assert registry.resolve_alias("latest") == 1 and registry.resolve_alias("serving") == 1
    assert [m.version for m in registry.versions(0, 10)] == [0, 1]
    assert [m.version for m in registry.versions(1, 10)] == [1]
    loaded = registry.load_arrays(0)
    assert sorted(loaded) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(loaded[k], arrays[k])


def test_same_weights_share_one_blob(registry: Registry) -> None:
    arrays = model_arrays(0)
    a = registry.publish(arrays, round=0, model=SPEC)
    b = registry.publish(arrays, round=1, model=SPEC)
    assert a.sha256 == b.sha256 and a.version != b.version
    assert len(list((registry.root / "blobs").iterdir())) == 1


def test_invalid_model_spec_is_not_published(registry: Registry) -> None:
    with pytest.raises(ValueError):
        registry.publish(model_arrays(0), round=0, model={"name": "resnet"})
    assert registry.count() == 0


def test_pin_survives_restart_and_unpin_follows_latest(registry: Registry) -> None:
    publish_many(registry, 3)
    state = registry.set_alias("serving", 0)
    assert state.pinned
    publish_many(registry, 1, start=3)
    assert registry.resolve_alias("latest") == 3
    again = Registry(registry.root)  # a restarted process reads the pin from its file
    assert again.resolve_alias("serving") == 0 and again.alias("serving").pinned
    again.set_alias("serving", 3, pinned=False)
    publish_many(again, 1, start=4)
    assert again.resolve_alias("serving") == 4


def test_set_alias_refuses_unknown_and_unverified(registry: Registry) -> None:
    publish_many(registry, 2)
    with pytest.raises(VersionNotFound):
        registry.set_alias("serving", 7)
    with pytest.raises(ValueError):
        registry.set_alias("../etc", 0)
    blob = registry.blob_path(0)
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(NotVerified):
        registry.set_alias("serving", 0)
    assert registry.resolve_alias("serving") == 1


def test_verify_detects_truncation_corruption_and_missing(registry: Registry) -> None:
    publish_many(registry, 3)
    fresh = Registry(registry.root)
    assert all(fresh.verify(v) for v in range(3))
    time.sleep(0.05)  # let the coarse file-timestamp clock tick past the publish
    truncated = fresh.blob_path(0)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    corrupted = fresh.blob_path(1)
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = corrupted.stat()
    corrupted.write_bytes(bytes(data))
    os.utime(corrupted, ns=(st.st_atime_ns, st.st_mtime_ns))  # forge mtime back: ctime tells
    fresh.blob_path(2).unlink()
    assert [fresh.verify(v) for v in range(3)] == [False, False, False]
    with pytest.raises(NotVerified):
        fresh.load_arrays(1)


def test_verification_is_cached_per_file_identity(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_many(registry, 1)
    fresh = Registry(registry.root)
    calls = 0
    real = registry_module.hashlib.sha256

    def counting(*args: object) -> object:
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(registry_module.hashlib, "sha256", counting)
    assert fresh.verify(0) and fresh.verify(0) and fresh.is_verified_cached(0)
    assert calls == 1
    blob = fresh.blob_path(0)
    copy = blob.with_name("copy")
    copy.write_bytes(blob.read_bytes())
    os.replace(copy, blob)  # same bytes, new identity (inode): hashed again
    assert fresh.is_verified_cached(0) is None
    assert fresh.verify(0) and calls == 2


@pytest.mark.parametrize("stage", ["blob-temp-written", "manifest-temp-written"])
def test_publish_killed_midway_leaves_previous_versions(registry: Registry, stage: str) -> None:
    before = publish_many(registry, 2)
    publish_and_kill(registry.root, stage)

    reader = Registry(registry.root)
    assert reader.version_numbers() == [0, 1]
    assert reader.resolve_alias("latest") == 1 and reader.resolve_alias("serving") == 1
    for m in before:
        assert reader.verify(m.version)
        assert reader.load_arrays(m.version)
    leftovers = [
        p.name for d in ("blobs", "versions", "aliases") for p in (reader.root / d).iterdir()
    ]
    assert any(name.startswith(".tmp-") for name in leftovers)  # the killed writer's temp
    for blob in (reader.root / "blobs").glob("*.safetensors"):  # visible blobs are whole
        assert registry_module.hashlib.sha256(blob.read_bytes()).hexdigest() == blob.stem

    after = reader.publish(model_arrays(2), round=2, model=SPEC)
    assert after.version == 2 and after.parent_version == 1
    assert not [
        p for d in ("blobs", "versions", "aliases") for p in (reader.root / d).glob(".tmp-*")
    ]
    assert reader.resolve_alias("serving") == 2 and reader.verify(2)


# ------------------------------------------------------------ manifest schema
BN_CNN = {"name": "cnn", "input_shape": [1, 28, 28], "num_classes": 10, "batch_norm": True}


def test_one_manifest_schema_counts_parameters_and_values(registry: Registry) -> None:
    """The registry and final_model.json share one definition: trainable parameters
    (``num_parameters``) and every array element, buffers included (``num_values``)."""
    from common.manifest import ModelManifest, model_manifest
    from common.models import ModelSpec, build_model, count_parameters
    from common.weights import sha256_hex, to_safetensors

    model = build_model(ModelSpec.model_validate(BN_CNN), seed=0)
    arrays = model_arrays(0, BN_CNN)
    published = registry.publish(arrays, round=4, model=BN_CNN, metrics={"acc": 0.5})
    assert published.num_parameters == count_parameters(model)
    assert published.num_values == sum(a.size for a in arrays.values())
    assert published.num_values > published.num_parameters  # batch-norm running stats
    assert published.parameter_count == published.num_values  # older clients' field

    blob = to_safetensors(arrays)
    final = model_manifest(
        arrays,
        BN_CNN,
        round=4,
        sha256=sha256_hex(blob),
        size=len(blob),
        metrics={"acc": 0.5, "devices": {"p50": 0.4}, "loss": float("nan"), "ok": True},
    )
    assert final.metrics == {"acc": 0.5}  # finite top-level numbers, as the registry keeps
    same = {k: getattr(published, k) for k in ModelManifest.model_fields}
    assert final.model_dump() == same
    assert (
        final.to_json()
        == model_manifest(
            arrays, BN_CNN, round=4, sha256=final.sha256, size=final.size, metrics={"acc": 0.5}
        ).to_json()
    )  # deterministic: same-seed reruns write the same final_model.json


def test_manifests_written_before_the_two_counts_still_read(registry: Registry) -> None:
    (m,) = publish_many(registry, 1)
    legacy = json.loads(m.model_dump_json())
    del legacy["num_parameters"], legacy["num_values"]
    (registry.root / "versions" / "0.json").write_text(json.dumps(legacy))
    old = Registry(registry.root).get(0)
    assert (old.num_parameters, old.num_values) == (m.num_parameters, m.num_values)
