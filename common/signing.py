"""Detached Ed25519 signatures over version manifests: weights trusted even from a mirror.

Why the manifest file and not the weights: the manifest names the weights' sha256 and
size, and every fetch already checks those, so one signature over the manifest's exact
bytes vouches for the weights too. The signature record carries those bytes, so a
device verifies what was signed, not a re-serialisation by whatever server (or mirror,
or proxy) answered; a server without the private key cannot make a record that
verifies.

Files: ``REGISTRY/signatures/<n>.json`` (a ``SignatureRecord``), written by
``hybridfl sign`` with a key from ``hybridfl certs`` (``models-signing.key``, PEM,
chmod 600; ``models-signing.pub``, OpenSSH one-liner).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from common.atomic import atomic_write_bytes

__all__ = [
    "SIGNATURES_DIR",
    "SIGNING_KEY",
    "SIGNING_PUB",
    "SignatureError",
    "SignatureRecord",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_signature",
    "sign_registry",
    "verified_manifest_bytes",
]

SIGNATURES_DIR = "signatures"
SIGNING_KEY = "models-signing.key"
SIGNING_PUB = "models-signing.pub"


class SignatureError(ValueError):
    """A key or a signature record is unusable; the message says which and why."""


class SignatureRecord(BaseModel):
    """What ``GET .../versions/<n>/signature`` returns and ``signatures/<n>.json`` holds."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    manifest: str = Field(description="The manifest file's exact text, as signed.")
    signature: str = Field(description="Ed25519 signature of the manifest's UTF-8 bytes, base64.")
    key_id: str = Field(description="First 16 hex digits of the public key's sha256.")


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(key_path: Path, pub_path: Path) -> None:
    """A new Ed25519 key pair; the private key is created chmod 600."""
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub + b"\n")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {path} cannot be read: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an Ed25519 key (use `hybridfl certs`)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key, OpenSSH one-liner or PEM."""
    try:
        data = Path(path).read_bytes()
        key = (
            serialization.load_ssh_public_key(data)
            if data.startswith(b"ssh-")
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"public key {path} cannot be read: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"public key {path} is not an Ed25519 key")
    return key


def _record_path(registry_root: Path, version: int) -> Path:
    return Path(registry_root) / SIGNATURES_DIR / f"{int(version)}.json"


def sign_registry(registry_root: Path, key: Ed25519PrivateKey) -> list[int]:
    """Sign every version of the registry that has no signature by ``key`` yet.

    Idempotent and safe while a run publishes (a manifest is immutable once it
    exists); returns the versions signed now.
    """
    root = Path(registry_root)
    versions_dir = root / "versions"
    kid = key_id(key.public_key())
    out_dir = root / SIGNATURES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    signed = []
    for path in sorted(versions_dir.glob("*.json"), key=lambda p: p.stem):
        if not path.stem.isdigit():
            continue
        version = int(path.stem)
        existing = read_signature(root, version)
        if existing is not None and existing.key_id == kid:
            continue
        text = path.read_text(encoding="utf-8")
        sig = base64.b64encode(key.sign(text.encode("utf-8"))).decode()
        record = SignatureRecord(version=version, manifest=text, signature=sig, key_id=kid)
        atomic_write_bytes(_record_path(root, version), record.model_dump_json().encode())
        signed.append(version)
    return sorted(signed)


def read_signature(registry_root: Path, version: int) -> SignatureRecord | None:
    """The stored record of ``version``; None when it was never signed."""
    try:
        raw = _record_path(registry_root, version).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return SignatureRecord.model_validate_json(raw)
    except ValueError as exc:
        raise SignatureError(f"signature record of version {version} is damaged: {exc}") from None


def verified_manifest_bytes(
    record: SignatureRecord, public: Ed25519PublicKey, version: int | None = None
) -> bytes:
    """The signed manifest bytes once the signature verifies with ``public``.

    Raises ``SignatureError`` naming what failed (wrong key, bad signature, a record
    for another version).
    """
    if version is not None and record.version != version:
        raise SignatureError(f"signature record is for version {record.version}, not {version}")
    if record.key_id != key_id(public):
        raise SignatureError(
            f"version {record.version} is signed by key {record.key_id}, not by the "
            f"trusted key {key_id(public)}"
        )
    data = record.manifest.encode("utf-8")
    try:
        public.verify(base64.b64decode(record.signature, validate=True), data)
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"the signature of version {record.version} does not verify: the manifest "
            "or its signature was altered"
        ) from None
    return data
