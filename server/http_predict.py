"""``POST .../versions/{v}/predict`` and ``.../aliases/{alias}/predict``: the server
half of hybrid serving (MLflow's ``/invocations``, TF Serving's ``:predict``).

Why a module of its own: predictions build torch models (lazily, once per version)
and validate input batches; the weights API never needs either.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from common.manifest import VersionManifest
from server.http_deps import Settings, SettingsDep
from server.http_models import (
    _ERR,
    PREFIX,
    AliasName,
    ErrorBody,
    ParameterErrors,
    VersionParam,
    alias_or_404,
    manifest_or_404,
)
from server.registry import (
    NotVerified,
    Registry,
)

__all__ = ["ModelCache", "router"]

router = APIRouter(prefix=PREFIX, tags=["predictions"])


# -------------------------------------------------------------------- predictions
MAX_BATCH = 1024
"""Most inputs in one predict request (the body limit bounds the bytes as well)."""
NPY_TYPES = ("application/x-npy", "application/octet-stream")


class ModelCache:
    """Torch models built from verified versions, kept by sha256 (bounded LRU).

    Why: building a model and loading its weights costs milliseconds to seconds,
    a prediction microseconds; each version is built once and reused by every
    request (and by every version that shares its bytes). torch is imported on
    the first prediction only, so a server that only serves weights stays small.
    """

    def __init__(self, registry: Registry, max_models: int = 4) -> None:
        self.registry = registry
        self.max_models = max_models
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = asyncio.Lock()
        self.builds = 0

    async def get(self, manifest: VersionManifest) -> Any:
        """The eval-mode model of ``manifest``; raises ``NotVerified`` for bad bytes."""
        model = self._models.get(manifest.sha256)
        if model is not None:
            self._models.move_to_end(manifest.sha256)
            return model
        async with self._lock:  # one build per version, however many requests wait
            model = self._models.get(manifest.sha256)
            if model is None:
                model = await anyio.to_thread.run_sync(self._build, manifest)
                self._models[manifest.sha256] = model
                self.builds += 1
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return model

    def _build(self, manifest: VersionManifest) -> Any:
        from common.models import ModelSpec, build_model
        from common.weights import from_safetensors, load_arrays

        data, _ = self.registry.read_blob(manifest.version)  # the verified bytes
        model = build_model(ModelSpec.model_validate(manifest.model))
        load_arrays(model, from_safetensors(data), strict=True)
        model.eval()
        return model


class PredictRequest(BaseModel):
    """JSON body of a predict call (or send the same batch as a ``.npy`` array)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(
        description="A batch of inputs, each shaped like the model's input_shape "
        "(channels, height, width), or flat (channels*height*width values), or "
        "(height, width) for one-channel models.",
        min_length=1,
        max_length=MAX_BATCH,
    )


class Prediction(BaseModel):
    classes: list[int] = Field(description="The top-k classes, most probable first.")
    probabilities: list[float] = Field(description="Their softmax probabilities.")


class PredictResponse(BaseModel):
    version: int = Field(description="The version that answered (an alias resolved).")
    sha256: str
    predictions: list[Prediction]


def _shapes_accepted(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    c, h, w = shape
    accepted = [(c, h, w), (c * h * w,)]
    if c == 1:
        accepted.append((h, w))
    return accepted


def _batch_from_body(body: bytes, content_type: str, input_shape: tuple[int, ...]) -> Any:
    """The request's inputs as a float32 array ``(n, c, h, w)``; HTTPException otherwise."""
    import io
    import json

    import numpy as np

    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            request = PredictRequest.model_validate(json.loads(body))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HTTPException(422, detail=f"{where}: {first['msg']}") from None
        except ValueError as exc:  # not JSON, or not UTF-8
            raise HTTPException(422, detail=f"body is not JSON: {exc}") from None
        try:
            batch = np.asarray(request.inputs, dtype=np.float32)
        except (ValueError, TypeError):
            raise HTTPException(
                422, detail="inputs must be numbers in equally shaped nested lists"
            ) from None
    elif kind in NPY_TYPES:
        try:
            batch = np.load(io.BytesIO(body), allow_pickle=False)
        except ValueError as exc:
            reason = (
                "it holds Python objects (never unpickled here); send a numeric array"
                if "allow_pickle" in str(exc)
                else str(exc)
            )
            raise HTTPException(422, detail=f"body is not a .npy array: {reason}") from None
        except (OSError, EOFError) as exc:
            raise HTTPException(422, detail=f"body is not a .npy array: {exc}") from None
        if not isinstance(batch, np.ndarray) or batch.dtype.kind not in "biuf":
            raise HTTPException(422, detail="the .npy array must hold real numbers")
        if batch.ndim == 0 or not 1 <= batch.shape[0] <= MAX_BATCH:
            raise HTTPException(
                422, detail=f"send a batch of 1 to {MAX_BATCH} inputs along the first axis"
            )
        batch = batch.astype(np.float32)
    else:
        raise HTTPException(
            415,
            detail=f'send application/json ({{"inputs": [...]}}) or a .npy array as '
            f"{' or '.join(NPY_TYPES)}; got {kind or 'no content type'}",
        )
    accepted = _shapes_accepted(input_shape)
    if tuple(batch.shape[1:]) not in accepted:
        spelled = " or ".join(str(s) for s in accepted)
        raise HTTPException(
            422,
            detail=f"each input must have shape {spelled} for this model; "
            f"the batch has shape {tuple(batch.shape)}",
        )
    if not np.isfinite(batch).all():
        raise HTTPException(422, detail="inputs must be finite numbers (no NaN or Infinity)")
    return batch.reshape((batch.shape[0], *input_shape))


def _top_k(model: Any, batch: Any, k: int) -> tuple[list[list[int]], list[list[float]]]:
    import torch

    with torch.inference_mode():
        probabilities = torch.softmax(model(torch.from_numpy(batch)), dim=1)
        top = torch.topk(probabilities, k, dim=1)
    return top.indices.tolist(), top.values.tolist()


_PREDICT_DOC: dict[str, Any] = {
    "response_model": PredictResponse,
    "responses": {
        404: _ERR,
        413: _ERR,
        415: _ERR,
        422: {
            # FastAPI's list for bad path/query parameters; one sentence for bad inputs.
            "model": ParameterErrors | ErrorBody,
            "description": "Invalid parameters, or inputs that do not fit the model",
        },
        503: {"model": ErrorBody, "description": "Version not servable (the reason)"},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": PredictRequest.model_json_schema()},
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}

TopK = Annotated[
    int | None,
    Query(ge=1, le=1000, description="Classes per input (default 5, at most num_classes)."),
]


async def _predict(
    settings: Settings, manifest: VersionManifest, request: Request, top_k: int | None
) -> PredictResponse:
    spec = manifest.model
    input_shape = tuple(spec.get("input_shape", ()))
    num_classes = int(spec.get("num_classes", 0))
    if len(input_shape) != 3 or num_classes < 1:
        raise HTTPException(503, detail=f"version {manifest.version}: model spec is unusable")
    k = min(top_k or 5, num_classes)
    body = await request.body()
    batch = _batch_from_body(body, request.headers.get("content-type", ""), input_shape)
    try:
        model = await settings.models.get(manifest)
    except NotVerified as exc:
        raise HTTPException(503, detail=f"{exc}; not served") from None
    classes, probabilities = await anyio.to_thread.run_sync(_top_k, model, batch, k)
    return PredictResponse(
        version=manifest.version,
        sha256=manifest.sha256,
        predictions=[
            Prediction(classes=c, probabilities=p)
            for c, p in zip(classes, probabilities, strict=True)
        ],
    )


@router.post(
    "/versions/{version}/predict",
    summary="Top-k classes for a batch of inputs (JSON or .npy), from one version",
    **_PREDICT_DOC,
)
async def predict_version(
    version: VersionParam, request: Request, settings: SettingsDep, top_k: TopK = None
) -> PredictResponse:
    manifest = manifest_or_404(settings.registry, version)
    return await _predict(settings, manifest, request, top_k)


@router.post(
    "/aliases/{alias}/predict",
    summary="Top-k classes for a batch of inputs, from the version an alias points at",
    **_PREDICT_DOC,
)
async def predict_alias(
    alias: AliasName, request: Request, settings: SettingsDep, top_k: TopK = None
) -> PredictResponse:
    _, manifest = alias_or_404(settings.registry, alias)
    return await _predict(settings, manifest, request, top_k)
