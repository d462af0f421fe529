"""Predictions from the served model (issue 13): a real uvicorn server, real models.

The answers must equal the model loaded the way a device loads it
(``load_fetched_model``'s path: build from the manifest's spec, load the arrays),
inputs are validated against the manifest's input shape, bodies are limited, and
each version's model is built once and reused.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from common.models import ModelSpec, build_model
from common.rundir import REGISTRY_DIR
from common.weights import load_arrays
from server.registry import Registry
from tests.serving_fixtures import SPEC, ServerProcess, model_arrays, start_model_server_process

API = "/v1/models/global"
CNN = {"name": "cnn", "input_shape": [1, 28, 28], "num_classes": 10, "batch_norm": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """v0, v1: the small MLP (1x8x8); v2 (latest, serving): a batch-norm CNN (1x28x28)."""
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    registry = Registry(run_dir / REGISTRY_DIR)
    for seed in (0, 1):
        registry.publish(model_arrays(seed), round=seed, model=SPEC)
    registry.publish(model_arrays(2, CNN), round=2, model=CNN)
    started = start_model_server_process(run_dir)
    yield started
    started.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def reference(seed: int, spec: dict, batch: np.ndarray, k: int) -> tuple[list, np.ndarray]:
    model = build_model(ModelSpec.model_validate(spec))
    load_arrays(model, model_arrays(seed, spec))
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(batch)), dim=1)
        top = torch.topk(probs, k, dim=1)
    return top.indices.tolist(), top.values.numpy()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def builds(client: httpx.Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "hybridfl_predict_model_builds_total":
                return sample.value
    raise AssertionError("no hybridfl_predict_model_builds_total")


def test_json_and_npy_give_the_models_own_answers(client: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((5, 1, 8, 8), dtype=np.float32)
    want_classes, want_probs = reference(1, SPEC, batch, 3)

    r = client.post(f"{API}/versions/1/predict?top_k=3", json={"inputs": batch.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and len(body["predictions"]) == 5
    assert [p["classes"] for p in body["predictions"]] == want_classes
    got = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(got, want_probs, rtol=1e-5, atol=1e-7)

    as_npy = client.post(
        f"{API}/versions/1/predict?top_k=3",
        content=npy(batch),
        headers={"content-type": "application/x-npy"},
    ).json()
    assert as_npy["predictions"] == body["predictions"]
    flat = client.post(  # flat inputs (64 values) are the same inputs
        f"{API}/versions/1/predict?top_k=3", json={"inputs": batch.reshape(5, 64).tolist()}
    ).json()
    assert flat["predictions"] == body["predictions"]


def test_alias_predict_uses_the_version_it_points_at(client: httpx.Client) -> None:
    batch = np.random.default_rng(1).random((64, 28, 28), dtype=np.float32)  # (h, w) for 1 ch
    r = client.post(
        f"{API}/aliases/serving/predict",
        content=npy(batch),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 2 and len(body["predictions"]) == 64
    want, probs = reference(2, CNN, batch.reshape(64, 1, 28, 28), 5)
    assert [p["classes"] for p in body["predictions"]] == want
    np.testing.assert_allclose(
        [p["probabilities"] for p in body["predictions"]], probs, rtol=1e-4, atol=1e-6
    )


def test_each_version_is_built_once_and_reused(client: httpx.Client) -> None:
    x = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
    client.post(f"{API}/versions/0/predict", json=x)
    before = builds(client)
    for _ in range(5):
        assert client.post(f"{API}/versions/0/predict", json=x).status_code == 200
    assert builds(client) == before


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (
            json.dumps({"inputs": np.zeros((2, 1, 8, 7)).tolist()}),
            "application/json",
            422,
            "shape (1, 8, 8) or (64,) or (8, 8)",
        ),
        ('{"inputs": [[NaN]]}', "application/json", 422, "shape"),
        (
            json.dumps({"inputs": [np.full((1, 8, 8), 1.0).tolist()]}).replace("1.0", "NaN", 1),
            "application/json",
            422,
            "finite",
        ),
        ('{"inputs": []}', "application/json", 422, "at least 1"),
        ('{"inputs": [[1, 2], [3]]}', "application/json", 422, "equally shaped"),
        ('{"inputs": [[0]], "x": 1}', "application/json", 422, "x: Extra inputs"),
        ("not json", "application/json", 422, "not JSON"),
        ("a,b", "text/csv", 415, "application/json"),
        (npy(np.array(["a", "b"])), "application/x-npy", 422, "real numbers"),
        (b"\x93NUMPY garbage", "application/x-npy", 422, "not a .npy"),
    ],
)
def test_bad_inputs_are_clear_4xx(
    client: httpx.Client, body: str | bytes, content_type: str, status: int, words: str
) -> None:
    r = client.post(
        f"{API}/versions/0/predict", content=body, headers={"content-type": content_type}
    )
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_pickled_npy_is_never_loaded(client: httpx.Client) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    r = client.post(
        f"{API}/versions/0/predict",
        content=buf.getvalue(),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 422 and "Python objects" in r.json()["detail"]
    assert "allow_pickle" not in r.json()["detail"]


def test_size_limits_and_unknown_versions(client: httpx.Client) -> None:
    too_many = np.zeros((1025, 1, 8, 8), dtype=np.float32)
    r = client.post(
        f"{API}/versions/0/predict",
        content=npy(too_many),
        headers={"content-type": "application/x-npy"},
    )
    assert r.status_code == 422 and "1 to 1024" in r.json()["detail"]
    huge = b"\0" * (17 << 20)
    r = client.post(
        f"{API}/versions/0/predict", content=huge, headers={"content-type": "application/x-npy"}
    )
    assert r.status_code == 413
    assert client.post(f"{API}/versions/9/predict", json={"inputs": [[0]]}).status_code == 404
    assert client.post(f"{API}/versions/01/predict", json={"inputs": [[0]]}).status_code == 422
    assert client.post(f"{API}/aliases/nope/predict", json={"inputs": [[0]]}).status_code == 422
    assert (
        client.post(f"{API}/versions/0/predict?top_k=0", json={"inputs": [[0]]}).status_code == 422
    )
    r = client.post(
        f"{API}/versions/0/predict?top_k=50", json={"inputs": np.zeros((1, 64)).tolist()}
    )
    assert r.status_code == 200 and len(r.json()["predictions"][0]["classes"]) == 10
