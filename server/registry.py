"""Versioned, content-addressed, append-only registry of global-model versions.

Layout inside ``<run_dir>/registry/``::

    blobs/<sha256>.safetensors   weight bytes, named by their hash (dedup for free)
    versions/<n>.json            one manifest per version (the commit point)
    aliases/latest               {"version": n, "pinned": false, ...}
    aliases/serving              the version devices get; pinned when an operator chose it
    .lock                        flock held by writers (publish, set_alias)

Why this shape: the HTTP server reads the folder while the ServerApp writes it,
from another process. Every file is written to a hidden temp file in the same
folder, fsynced, renamed over its name and the folder fsynced, and the manifest
is written only after its blob: a reader sees a version whole or not at all, a
crash mid-publish leaves earlier versions intact and at most a blob nobody
references (invisible) or a hidden temp file (cleaned by the next writer).
Bytes are never rewritten: rollback and promotion move an alias.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from common.atomic import TMP_PREFIX, atomic_write_bytes
from common.manifest import VersionManifest

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ALIASES",
    "AliasNotSet",
    "AliasState",
    "NotVerified",
    "Registry",
    "RegistryError",
    "VersionManifest",
    "VersionNotFound",
]

log = logging.getLogger(__name__)

ALIASES: tuple[str, ...] = ("latest", "serving")
"""The only alias names: file names are never built from request strings."""

_VERSION_FILE = re.compile(r"^(0|[1-9][0-9]*)\.json$")
_TMP_PREFIX = TMP_PREFIX
_READ_CHUNK = 1 << 20


class RegistryError(Exception):
    """Base class of registry errors (messages are meant for operators)."""


class VersionNotFound(RegistryError):
    def __init__(self, version: int) -> None:
        super().__init__(f"version {version} does not exist")
        self.version = version


class AliasNotSet(RegistryError):
    def __init__(self, name: str) -> None:
        super().__init__(f"alias '{name}' is not set (nothing published yet)")
        self.name = name


class NotVerified(RegistryError):
    """The version's blob is missing, truncated or does not hash to its manifest."""


class AliasState(BaseModel):
    """Content of an alias file."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = Field(ge=0)
    pinned: bool = Field(
        default=False,
        description="True when an operator set it; a pinned 'serving' no longer follows 'latest'.",
    )
    updated_at: datetime


def _checkpoint(stage: str) -> None:
    """Test seam: called between the steps of a publish (crash-injection tests patch it)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _write_atomic(path: Path, data: bytes, stage: str | None = None) -> None:
    """``common.atomic`` write; ``stage`` names the crash-test checkpoint reached once
    the temp file is durable but not yet visible."""
    hook = (lambda: _checkpoint(stage)) if stage is not None else None
    atomic_write_bytes(path, data, before_rename=hook)


def _stat_key(path: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    """Identity of a file's current content, cheap to compute on every request.

    (path, size, mtime, ctime, inode): any rewrite, truncation or replacement
    changes at least one of them (ctime even when mtime is forged back).
    """
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class Registry:
    """The registry folder of one run; safe to use from several processes at once.

    Readers take no lock. Writers (``publish``, ``set_alias``) serialise on an
    ``flock`` so that "serving follows latest unless pinned" cannot lose a pin.
    Parsed manifests and verification results are cached per process; manifests
    are immutable, and verification is keyed by the blob's stat identity.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.versions_dir = self.root / "versions"
        self.aliases_dir = self.root / "aliases"
        self._manifests: dict[int, VersionManifest] = {}
        self._verified: dict[tuple[str, int, int, int, int], bool] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def version_numbers(self) -> list[int]:
        """All committed versions, ascending (a version exists once its manifest does)."""
        try:
            names = os.listdir(self.versions_dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_FILE.match(n)))

    def count(self) -> int:
        return len(self.version_numbers())

    def get(self, version: int) -> VersionManifest:
        """The manifest of ``version``; raises ``VersionNotFound``."""
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        if version < 0:
            raise VersionNotFound(version)
        try:
            raw = (self.versions_dir / f"{int(version)}.json").read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(version) from None
        manifest = VersionManifest.model_validate_json(raw)
        if manifest.version != version:
            raise RegistryError(f"manifest {version}.json claims version {manifest.version}")
        with self._lock:
            self._manifests[version] = manifest
        return manifest

    def versions(self, offset: int = 0, limit: int = 100) -> list[VersionManifest]:
        """A page of manifests in ascending version order."""
        numbers = self.version_numbers()[max(offset, 0) : max(offset, 0) + max(limit, 0)]
        out: list[VersionManifest] = []
        for n in numbers:
            with contextlib.suppress(VersionNotFound):
                out.append(self.get(n))
        return out

    def latest(self) -> VersionManifest | None:
        numbers = self.version_numbers()
        return self.get(numbers[-1]) if numbers else None

    def alias(self, name: str) -> AliasState | None:
        """The state of alias ``name`` (None when not set yet)."""
        if name not in ALIASES:
            raise ValueError(f"unknown alias '{name}'; aliases are {', '.join(ALIASES)}")
        try:
            raw = (self.aliases_dir / name).read_bytes()
        except FileNotFoundError:
            return None
        return AliasState.model_validate_json(raw)

    def aliases(self) -> dict[str, AliasState | None]:
        return {name: self.alias(name) for name in ALIASES}

    def resolve_alias(self, name: str) -> int:
        """The version alias ``name`` points at; raises ``AliasNotSet``."""
        state = self.alias(name)
        if state is None:
            raise AliasNotSet(name)
        return state.version

    def blob_path(self, version: int) -> Path:
        return self.blob_path_for(self.get(version).sha256)

    def blob_path_for(self, sha256: str) -> Path:
        return self.blobs_dir / f"{sha256}.safetensors"

    # ------------------------------------------------------------- verification
    def verify(self, version: int) -> bool:
        """True when the blob exists, has the manifest's size and sha256.

        Hashing happens once per process per file identity (path, size, mtime,
        ctime, inode); every later call costs one ``stat``. Raises
        ``VersionNotFound`` for an unknown version.
        """
        manifest = self.get(version)
        path = self.blob_path_for(manifest.sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != manifest.size:
            return False
        key = _stat_key(path, st)
        known = self._verified.get(key)
        if known is not None:
            return known
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return False
        ok = digest.hexdigest() == manifest.sha256
        self._remember(path, st, ok)
        if not ok:
            log.error("version %d: blob %s does not match its sha256", version, path)
        return ok

    def is_verified_cached(self, version: int) -> bool | None:
        """Verification result if already known for the blob's current identity, else None.

        For callers on an event loop: a ``stat``, never a hash.
        """
        manifest = self.get(version)
        path = self.blob_path_for(manifest.sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != manifest.size:
            return False
        return self._verified.get(_stat_key(path, st))

    def read_blob(self, version: int) -> tuple[bytes, tuple[str, int, int, int, int]]:
        """The verified bytes of ``version`` and the stat identity they were read at.

        Raises ``NotVerified`` when the blob is missing, truncated or corrupt.
        """
        manifest = self.get(version)
        path = self.blob_path_for(manifest.sha256)
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            raise NotVerified(f"version {version}: blob {path.name} is missing") from None
        ok = len(data) == manifest.size and hashlib.sha256(data).hexdigest() == manifest.sha256
        self._remember(path, before, ok)
        if not ok:
            raise NotVerified(
                f"version {version}: blob {path.name} is truncated or corrupt "
                f"({len(data)} bytes, expected {manifest.size})"
            )
        return data, _stat_key(path, before)

    def load_arrays(self, version: int) -> dict[str, np.ndarray]:
        """Verified weights of ``version`` as numpy arrays (safetensors, never pickle)."""
        from common.weights import from_safetensors

        data, _ = self.read_blob(version)
        return from_safetensors(data)

    def stat_key(self, version: int) -> tuple[str, int, int, int, int] | None:
        """Current stat identity of the version's blob (None when missing)."""
        path = self.blob_path(version)
        try:
            return _stat_key(path, path.stat())
        except FileNotFoundError:
            return None

    def _remember(self, path: Path, st: os.stat_result, ok: bool) -> None:
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[_stat_key(path, st)] = ok

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.blobs_dir, self.versions_dir, self.aliases_dir):
            d.mkdir(exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Whoever held the lock before us is done or dead: its temp files are junk.
            for d in (self.blobs_dir, self.versions_dir, self.aliases_dir):
                for name in os.listdir(d):
                    if name.startswith(_TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            (d / name).unlink()
            yield
        finally:
            os.close(fd)

    def publish(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        round: int,
        model: Mapping[str, Any] | BaseModel,
        metrics: Mapping[str, float] | None = None,
    ) -> VersionManifest:
        """Store ``arrays`` as the next version, atomically; move ``latest`` (and
        ``serving`` unless pinned) to it.

        ``model`` is the ModelSpec (or its dict), validated here so that a version
        that devices cannot rebuild is never published. Non-finite metrics are
        dropped (JSON has no NaN) with a warning.
        """
        import numpy as np

        from common.models import ModelSpec
        from common.weights import sha256_hex, to_safetensors

        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        spec = ModelSpec.model_validate(
            model.model_dump() if isinstance(model, BaseModel) else dict(model)
        )
        clean_metrics: dict[str, float] = {}
        for k, v in (metrics or {}).items():
            if isinstance(v, int | float | np.floating | np.integer) and math.isfinite(float(v)):
                clean_metrics[str(k)] = float(v)
            else:
                log.warning("publish: dropping metric %r=%r (not a finite number)", k, v)
        blob = to_safetensors(arrays)
        sha = sha256_hex(blob)
        parameter_count = int(sum(int(np.asarray(a).size) for a in arrays.values()))

        with self._writer_lock():
            existing = self.version_numbers()
            self._repair_latest(existing)
            version = existing[-1] + 1 if existing else 0
            parent = existing[-1] if existing else None

            path = self.blob_path_for(sha)
            if not self._blob_intact(path, sha, len(blob)):
                _write_atomic(path, blob, stage="blob-temp-written")
            _checkpoint("blob-committed")
            with contextlib.suppress(FileNotFoundError):
                self._remember(path, path.stat(), True)

            manifest = VersionManifest(
                version=version,
                round=round,
                created_at=_now(),
                sha256=sha,
                size=len(blob),
                parameter_count=parameter_count,
                model=spec.model_dump(mode="json"),
                metrics=clean_metrics,
                parent_version=parent,
                status="verified",
            )
            target = self.versions_dir / f"{version}.json"
            if target.exists():  # cannot happen under the lock; never overwrite a version
                raise RegistryError(f"version {version} already exists")
            _write_atomic(
                target, manifest.model_dump_json(indent=2).encode(), stage="manifest-temp-written"
            )
            _checkpoint("manifest-committed")
            self._move_with_latest(version)
        return manifest

    def set_alias(self, name: str, version: int, *, pinned: bool = True) -> AliasState:
        """Point alias ``name`` at ``version`` (promotion or rollback).

        Only verified versions can be targeted (raises ``NotVerified``). With
        ``pinned`` (the default for an operator) ``serving`` stops following
        ``latest``; ``pinned=False`` makes it follow again from the next publish.
        """
        if name not in ALIASES:
            raise ValueError(f"unknown alias '{name}'; aliases are {', '.join(ALIASES)}")
        if not self.verify(version):  # raises VersionNotFound
            raise NotVerified(f"version {version} failed verification; alias not moved")
        state = AliasState(version=version, pinned=pinned, updated_at=_now())
        with self._writer_lock():
            _write_atomic(self.aliases_dir / name, state.model_dump_json().encode())
        return state

    def _move_with_latest(self, version: int) -> None:
        now = _now()
        latest = AliasState(version=version, pinned=False, updated_at=now)
        _write_atomic(self.aliases_dir / "latest", latest.model_dump_json().encode())
        serving = self.alias("serving")
        if serving is None or not serving.pinned:
            state = AliasState(version=version, pinned=False, updated_at=now)
            _write_atomic(self.aliases_dir / "serving", state.model_dump_json().encode())

    def _repair_latest(self, existing: list[int]) -> None:
        """After a crash between manifest and alias files, catch the aliases up."""
        if not existing:
            return
        latest = self.alias("latest")
        if latest is None or latest.version < existing[-1]:
            log.warning("registry: aliases behind version %d; repairing", existing[-1])
            self._move_with_latest(existing[-1])

    def _blob_intact(self, path: Path, sha: str, size: int) -> bool:
        """True when a blob with this content is already stored whole (dedup)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != size:
            return False
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return digest.hexdigest() == sha
