"""Versioned, content-addressed, append-only registry of global-model versions.

Layout inside ``<run_dir>/registry/``::

    blobs/<sha256>.safetensors   weight bytes, named by their hash (dedup for free)
    versions/<n>.json            one manifest per version (the commit point)
    aliases/latest               {"version": n, "pinned": false, ...}
    aliases/serving              the version devices get; pinned when an operator chose it
    events.jsonl                 every alias move, append-only (``server.registry_events``)
    .lock                        flock held by writers (publish, set_alias)

Why this shape: the HTTP server reads the folder while the ServerApp writes it,
from another process. Every file is written to a hidden temp file in the same
folder, fsynced, renamed over its name and the folder fsynced, and the manifest
is written only after its blob: a reader sees a version whole or not at all, a
crash mid-publish leaves earlier versions intact and at most a blob nobody
references (invisible) or a hidden temp file (cleaned by the next writer).
Bytes are never rewritten: rollback and promotion move an alias. An alias move
is logged first (the event log is the aliases' write-ahead log) and the alias
file records the event it reflects, so the two agree after a crash at any point.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.atomic import TMP_PREFIX, atomic_write_bytes
from common.crashpoint import crash_point
from common.manifest import ALIASES, VersionManifest, model_manifest
from server.registry_events import EVENTS_FILE, Analysis, EventKind, EventLog, RegistryEvent

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ALIASES",
    "AliasDamaged",
    "AliasNotSet",
    "AliasState",
    "Analysis",
    "ManifestDamaged",
    "NotVerified",
    "Registry",
    "RegistryError",
    "RegistryEvent",
    "RegistryWriteError",
    "VersionManifest",
    "VersionNotFound",
]

log = logging.getLogger(__name__)

_VERSION_FILE = re.compile(r"^(0|[1-9][0-9]*)\.json$")
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


class ManifestDamaged(RegistryError):
    """A version's manifest file exists but cannot be read as a manifest (truncated, edited)."""

    def __init__(self, version: int, reason: str) -> None:
        super().__init__(
            f"version {version}: manifest versions/{version}.json is damaged: {reason}"
        )
        self.version = version
        self.reason = reason


class AliasDamaged(RegistryError):
    """An alias file exists but cannot be read (truncated, edited): where it points is unknown."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"alias '{name}': file aliases/{name} is damaged: {reason}")
        self.name = name
        self.reason = reason


class RegistryWriteError(RegistryError):
    """The registry folder cannot be written (read-only, full, no permission)."""

    def __init__(self, what: str, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "unknown error")
        super().__init__(f"{what}: {exc.strerror or exc} ({name})")
        self.errno = exc.errno


def _reason(exc: Exception) -> str:
    """One line saying why a registry file did not parse (pydantic's first error)."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "file"
        return f"{first.get('msg', 'invalid')} at {where}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class AliasState(BaseModel):
    """Content of an alias file."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = Field(ge=0)
    pinned: bool = Field(
        default=False,
        description="True when an operator set it; a pinned 'serving' no longer follows 'latest'.",
    )
    updated_at: datetime
    event_seq: int | None = Field(
        default=None, description="The event this file reflects (None: written before events)."
    )


def _state_of(event: RegistryEvent) -> AliasState:
    return AliasState(
        version=event.to_version, pinned=event.pinned, updated_at=event.time, event_seq=event.seq
    )


def _checkpoint(stage: str) -> None:
    """Test seam: called between the steps of a publish (crash-injection tests patch it)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _write_atomic(path: Path, data: bytes, stage: str | None = None) -> None:
    """``common.atomic`` write; ``stage`` names the crash-test checkpoint reached once
    the temp file is durable but not yet visible."""
    hook = (lambda: _checkpoint(stage)) if stage is not None else None
    atomic_write_bytes(path, data, before_rename=hook)


def _size_reason(path: Path, have: int, want: int) -> str:
    kind = "truncated" if have < want else "longer than published"
    return f"blob {path.name} is {kind}: {have} bytes, the manifest says {want}"


def _hash_reason(path: Path, have: str, want: str) -> str:
    """ "" when the digests agree, else the reason (the size was already checked)."""
    if have == want:
        return ""
    return (
        f"blob {path.name} has the right size but other bytes: sha256 {have[:12]}..., "
        f"the manifest says {want[:12]}..."
    )


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
        self.event_log = EventLog(self.root / EVENTS_FILE)
        self._manifests: dict[int, VersionManifest] = {}
        self._verified: dict[tuple[str, int, int, int, int], str] = {}
        """Verification outcome per blob identity: "" when it verified, else the reason."""
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
        """The manifest of ``version``.

        Raises ``VersionNotFound``, or ``ManifestDamaged`` (with the reason) for a
        manifest file that does not parse; a damaged manifest is not cached, so a
        repaired file is picked up.
        """
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        if version < 0:
            raise VersionNotFound(version)
        try:
            raw = (self.versions_dir / f"{int(version)}.json").read_bytes()
        except FileNotFoundError:
            raise VersionNotFound(version) from None
        except OSError as exc:
            raise ManifestDamaged(version, _reason(exc)) from None
        try:
            manifest = VersionManifest.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            raise ManifestDamaged(version, _reason(exc)) from None
        if manifest.version != version:
            raise ManifestDamaged(version, f"it claims to be version {manifest.version}")
        with self._lock:
            self._manifests[version] = manifest
        return manifest

    def page(
        self, offset: int = 0, limit: int = 100
    ) -> tuple[list[VersionManifest], dict[int, str]]:
        """A page of versions in ascending order: the readable manifests, and the
        damaged ones as ``{version: reason}`` (one bad file never hides the rest)."""
        numbers = self.version_numbers()[max(offset, 0) : max(offset, 0) + max(limit, 0)]
        out: list[VersionManifest] = []
        damaged: dict[int, str] = {}
        for n in numbers:
            try:
                out.append(self.get(n))
            except VersionNotFound:
                continue  # deleted between the listing and the read
            except ManifestDamaged as exc:
                damaged[n] = exc.reason
        return out, damaged

    def versions(self, offset: int = 0, limit: int = 100) -> list[VersionManifest]:
        """A page of readable manifests in ascending version order (see ``page``)."""
        return self.page(offset, limit)[0]

    def alias(self, name: str) -> AliasState | None:
        """The state of alias ``name`` (None when not set yet).

        A move already in the event log but not yet in the alias file (a writer
        between the two steps, or killed there) is the alias's state: the log is
        the commit point. Raises ``AliasDamaged`` (with the reason) when the file
        does not parse.
        """
        state = self._alias_file(name)
        logged = self.event_log.last(name, "move")
        if logged is not None and (state is None or (state.event_seq or 0) < logged.seq):
            return _state_of(logged)
        return state

    def events(self) -> list[RegistryEvent]:
        """The audit history: every alias move and rollout verdict, oldest first."""
        return self.event_log.events()

    def _alias_file(self, name: str) -> AliasState | None:
        if name not in ALIASES:
            raise ValueError(f"unknown alias '{name}'; aliases are {', '.join(ALIASES)}")
        try:
            raw = (self.aliases_dir / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AliasDamaged(name, _reason(exc)) from None
        try:
            return AliasState.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            raise AliasDamaged(name, _reason(exc)) from None

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
    def problem(self, version: int) -> str | None:
        """Why ``version`` cannot be served now (None when its blob verifies).

        The reason names the real cause: missing, a size that differs from the
        manifest's, or same size but other bytes (sha256 mismatch). Hashing
        happens once per process per file identity (path, size, mtime, ctime,
        inode); every later call costs one ``stat``. Raises ``VersionNotFound`` /
        ``ManifestDamaged`` for a version without a readable manifest.
        """
        manifest = self.get(version)
        path = self.blob_path_for(manifest.sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"blob {path.name} is missing"
        if st.st_size != manifest.size:
            return _size_reason(path, st.st_size, manifest.size)
        key = _stat_key(path, st)
        known = self._verified.get(key)
        if known is not None:
            return known or None
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_READ_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return f"blob {path.name} is missing"
        reason = _hash_reason(path, digest.hexdigest(), manifest.sha256)
        self._remember(path, st, reason)
        if reason:
            log.error("version %d: %s", version, reason)
        return reason or None

    def verify(self, version: int) -> bool:
        """True when the blob exists, has the manifest's size and sha256 (see ``problem``)."""
        return self.problem(version) is None

    def cached_problem(self, version: int) -> tuple[bool, str | None]:
        """``(known, reason)`` without hashing (one ``stat``: for callers on an event
        loop). ``known`` is False when the blob still has to be hashed; ``reason``
        is None when the version verified."""
        manifest = self.get(version)
        path = self.blob_path_for(manifest.sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return True, f"blob {path.name} is missing"
        if st.st_size != manifest.size:
            return True, _size_reason(path, st.st_size, manifest.size)
        known = self._verified.get(_stat_key(path, st))
        if known is None:
            return False, None
        return True, known or None

    def is_verified_cached(self, version: int) -> bool | None:
        """Verification result if already known for the blob's current identity, else None."""
        known, reason = self.cached_problem(version)
        return reason is None if known else None

    def read_blob(self, version: int) -> tuple[bytes, tuple[str, int, int, int, int]]:
        """The verified bytes of ``version`` and the stat identity they were read at.

        Raises ``NotVerified`` (with the real reason) when the blob is missing,
        has another size or other bytes than its manifest says.
        """
        manifest = self.get(version)
        path = self.blob_path_for(manifest.sha256)
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            raise NotVerified(f"version {version}: blob {path.name} is missing") from None
        if len(data) != manifest.size:
            reason = _size_reason(path, len(data), manifest.size)
        else:
            reason = _hash_reason(path, hashlib.sha256(data).hexdigest(), manifest.sha256)
        self._remember(path, before, reason)
        if reason:
            raise NotVerified(f"version {version}: {reason}")
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

    def _remember(self, path: Path, st: os.stat_result, reason: str) -> None:
        """Record the outcome for this file identity ("" = verified)."""
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[_stat_key(path, st)] = reason

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
                    if name.startswith(TMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            (d / name).unlink()
            self._roll_forward()
            yield
        finally:
            os.close(fd)

    def publish(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        round: int,
        model: Mapping[str, Any] | BaseModel,
        metrics: Mapping[str, object] | None = None,
        move_serving: bool = True,
    ) -> VersionManifest:
        """Store ``arrays`` as the next version, atomically; move ``latest`` (and
        ``serving`` unless pinned) to it.

        ``move_serving=False``: a rollout policy owns ``serving``; it is set here
        only when nothing serves yet (the first version).

        ``model`` is the ModelSpec (or its dict), validated here so that a version
        that devices cannot rebuild is never published. Metrics that are not
        finite numbers are dropped (JSON has no NaN) with a warning.
        """
        from common.weights import sha256_hex, to_safetensors

        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        blob = to_safetensors(arrays)
        sha = sha256_hex(blob)
        described = model_manifest(
            arrays, model, round=round, sha256=sha, size=len(blob), metrics=metrics
        )
        dropped = sorted(set(map(str, metrics or {})) - set(described.metrics))
        if dropped:
            log.warning("publish: dropping metrics %s (not finite numbers)", ", ".join(dropped))

        with self._writer_lock():
            existing = self.version_numbers()
            self._repair_latest(existing, move_serving)
            again = self._already_published(existing, round, sha)
            if again is not None:
                return again
            version = existing[-1] + 1 if existing else 0
            parent = existing[-1] if existing else None

            path = self.blob_path_for(sha)
            if not self._blob_intact(path, sha, len(blob)):
                _write_atomic(path, blob, stage="blob-temp-written")
            _checkpoint("blob-committed")
            crash_point("publish-blob", round)
            with contextlib.suppress(FileNotFoundError):
                self._remember(path, path.stat(), "")

            manifest = VersionManifest(
                **described.model_dump(),
                version=version,
                created_at=_now(),
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
            crash_point("publish-manifest", round)
            self._move_with_latest(version, round=round, move_serving=move_serving)
        return manifest

    def _already_published(
        self, existing: list[int], round_: int, sha: str
    ) -> VersionManifest | None:
        """The version holding exactly these bytes for ``round_``, if there is one.

        A resumed run re-publishes the round it lost in a crash: the same bytes are the
        same version (nothing registered twice); other bytes for a published round mean
        the run did not reproduce itself, which is an error, never a silent new version.
        Versions ascend with rounds, so only the newest few are read.
        """
        for v in reversed(existing):
            m = self.get(v)
            if m.round < round_:
                return None
            if m.round == round_:
                if m.sha256 != sha:
                    raise RegistryError(
                        f"round {round_} is already published as version {v} with other "
                        f"bytes (sha256 {m.sha256[:12]}..., now {sha[:12]}...): a resumed run "
                        "must reproduce the rounds it repeats (same config, same seed)"
                    )
                return m
        return None

    def set_alias(
        self,
        name: str,
        version: int | None,
        *,
        pinned: bool = True,
        actor: str = "human",
        reason: str = "",
        round: int | None = None,
        analysis: Analysis | None = None,
    ) -> AliasState:
        """Point alias ``name`` at ``version`` (promotion or rollback), as an event.

        ``actor`` says who moved it (``human`` through the API, ``policy:<name>``
        for a rollout policy); ``reason``, ``round`` and ``analysis`` go into the
        event so the history says why.

        With ``pinned`` (the default for an operator) ``serving`` stays at
        ``version`` when new versions are published. ``pinned=False`` means
        "follow latest": ``serving`` moves to the newest version now and with
        every publish (``version`` is then not used; pass None).

        Only verified versions can be targeted (raises ``NotVerified``,
        ``VersionNotFound``). Raises ``RegistryWriteError`` when the folder
        cannot be written (read-only, full); the alias file is then unchanged.
        """
        if name not in ALIASES:
            raise ValueError(f"unknown alias '{name}'; aliases are {', '.join(ALIASES)}")
        if pinned and version is None:
            raise ValueError("a pinned alias needs a version")
        target = version
        try:
            with self._writer_lock():
                if not pinned:
                    numbers = self.version_numbers()
                    if not numbers:
                        raise AliasNotSet("latest")
                    target = numbers[-1]
                assert target is not None
                problem = self.problem(target)  # raises VersionNotFound / ManifestDamaged
                if problem is not None:
                    raise NotVerified(f"version {target}: {problem}; alias not moved")
                state = self._move(
                    name,
                    target,
                    pinned=pinned,
                    actor=actor,
                    reason=reason,
                    round=round,
                    analysis=analysis,
                )
        except OSError as exc:
            raise RegistryWriteError(
                f"cannot move alias '{name}' to version {target}: the registry {self.root} "
                f"is not writable; the alias is unchanged",
                exc,
            ) from None
        return state

    def record(
        self,
        kind: EventKind,
        alias: str,
        to_version: int,
        *,
        from_version: int | None = None,
        actor: str,
        reason: str = "",
        round: int | None = None,
        analysis: Analysis | None = None,
    ) -> RegistryEvent:
        """Append an event that moves no alias (a rejected candidate, an alert)."""
        if kind == "move":
            raise ValueError("a move goes through set_alias, which also writes the alias")
        try:
            with self._writer_lock():
                current = self.alias(alias) if alias in ALIASES else None
                event = RegistryEvent(
                    seq=self.event_log.next_seq(),
                    time=_now(),
                    round=round,
                    kind=kind,
                    alias=alias,
                    from_version=from_version,
                    to_version=to_version,
                    pinned=current.pinned if current is not None else False,
                    actor=actor,
                    reason=reason,
                    analysis=analysis,
                )
                self.event_log.append(event)
        except OSError as exc:
            raise RegistryWriteError(f"cannot record a {kind} event in {self.root}", exc) from None
        return event

    def _move(
        self,
        name: str,
        version: int,
        *,
        pinned: bool,
        actor: str,
        reason: str = "",
        round: int | None = None,
        analysis: Analysis | None = None,
    ) -> AliasState:
        """Log the move (fsynced: the commit point), then write the alias file.

        Called under the writer lock."""
        try:
            before = self.alias(name)
        except AliasDamaged:
            before = None
        event = RegistryEvent(
            seq=self.event_log.next_seq(),
            time=_now(),
            round=round,
            alias=name,
            from_version=before.version if before is not None else None,
            to_version=version,
            pinned=pinned,
            actor=actor,
            reason=reason,
            analysis=analysis,
        )
        undo = self.event_log.append(event)
        _checkpoint("event-appended")
        state = _state_of(event)
        try:
            _write_atomic(
                self.aliases_dir / name, state.model_dump_json().encode(), "alias-temp-written"
            )
        except OSError:
            # The caller reports "alias unchanged" (a full disk): take the move back out
            # of the log so that it stays true.
            self.event_log.truncate(undo)
            raise
        _checkpoint("alias-committed")
        return state

    def _roll_forward(self) -> None:
        """Under the writer lock: cut a torn last event line, then apply every logged
        move whose alias file is behind (a writer killed between the two steps)."""
        self.event_log.cut_torn_tail()
        for name in ALIASES:
            logged = self.event_log.last(name, "move")
            if logged is None:
                continue
            try:
                state = self._alias_file(name)
            except AliasDamaged:
                continue  # an operator's to fix: never guess over a damaged file
            if state is None or (state.event_seq or 0) < logged.seq:
                log.warning("registry: alias %s behind event %d; applying it", name, logged.seq)
                _write_atomic(self.aliases_dir / name, _state_of(logged).model_dump_json().encode())

    def _move_with_latest(
        self, version: int, *, round: int | None = None, move_serving: bool = True
    ) -> None:
        self._move("latest", version, pinned=False, actor="publish", round=round)
        try:
            serving = self.alias("serving")
        except AliasDamaged as exc:
            # Whether an operator pinned it is unknown: never guess over a pin.
            log.error("%s; 'serving' left as is until an operator sets it", exc)
            return
        if serving is None or (move_serving and not serving.pinned):
            reason = "first version" if serving is None else "serving follows latest"
            self._move(
                "serving", version, pinned=False, actor="publish", reason=reason, round=round
            )

    def _repair_latest(self, existing: list[int], move_serving: bool = True) -> None:
        """After a crash between manifest and alias files (or a damaged ``latest``
        file), catch the aliases up: ``latest`` is derived, never chosen."""
        if not existing:
            return
        try:
            latest = self.alias("latest")
        except AliasDamaged as exc:
            log.warning("%s; rewriting it", exc)
            latest = None
        if latest is None or latest.version < existing[-1]:
            log.warning("registry: aliases behind version %d; repairing", existing[-1])
            self._move_with_latest(existing[-1], move_serving=move_serving)

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
