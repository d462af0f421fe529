"""``GET /v1/models/global/versions/{n}/signature``: the detached signature of a manifest.

Why a route of its own: signatures are optional (``hybridfl sign``), and a record is a
static file a mirror can copy; the server only hands it out, it cannot make one.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from common.signing import SignatureError, SignatureRecord, read_signature
from server.http_deps import SettingsDep
from server.http_models import PREFIX, ErrorBody, VersionParam

__all__ = ["router"]

router = APIRouter(prefix=PREFIX, tags=["models"])


@router.get(
    "/versions/{version}/signature",
    response_model=SignatureRecord,
    summary="Ed25519 signature over the version's manifest file (404 when unsigned)",
    responses={
        404: {"model": ErrorBody, "description": "The version is not signed"},
        503: {"model": ErrorBody, "description": "The signature file is damaged (the reason)"},
    },
)
def get_signature(version: VersionParam, settings: SettingsDep) -> SignatureRecord:
    try:
        record = read_signature(settings.registry.root, version)
    except SignatureError as exc:
        raise HTTPException(503, str(exc)) from None
    if record is None:
        raise HTTPException(
            404,
            f"version {version} is not signed; sign the run's versions with "
            "`hybridfl sign RUN_DIR --key models-signing.key`",
        )
    return record
