"""Fetch a global-model version from the model server, verified, into a local cache.

One call (``fetch_model``) resolves an alias (or takes a version), revalidates a
cached copy with ``If-None-Match`` (a current cache downloads nothing), streams
new bytes to ``<sha256>.safetensors.incomplete``, resumes an interrupted
transfer with ``Range`` + ``If-Range``, checks the sha256 and only then renames
the file into place, the way huggingface_hub's cache does. A device therefore
never loads bytes that do not hash to what the server's manifest promised.

What the hash does not give: protection from a malicious server (it sends the
manifest too); that is TLS's job (``ca_cert``: the server must hold a certificate
from that CA) and the signatures' (``verify_key``: the manifest must be signed by
the publisher's Ed25519 key, whoever serves it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from common.atomic import fsync_dir
from common.manifest import ALIASES, VersionManifest, is_sha256_hex
from common.signing import (
    SignatureError,
    SignatureRecord,
    load_public_key,
    verified_manifest_bytes,
)

if TYPE_CHECKING:
    import torch
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "Expected",
    "FetchError",
    "FetchResult",
    "download_verified",
    "fetch_model",
    "file_lock",
    "hash_file",
    "load_fetched_model",
    "tls_context",
]

API = "/v1/models/global"
CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0

ProgressFn = Callable[[int, int], None]
"""progress(bytes_on_disk, total_bytes), called after every chunk written."""


class FetchError(RuntimeError):
    """The model could not be fetched or did not verify; the message says why."""


class _RangeRefused(Exception):
    """416 on a resume: the partial file is not a prefix the server can continue."""


@dataclass(frozen=True)
class FetchResult:
    path: Path
    """The verified safetensors file in the cache."""
    manifest: VersionManifest
    sha256: str
    downloaded: bool
    """False when the cached copy was current (nothing downloaded)."""
    bytes: int
    """Body bytes received over the network by this call."""


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Two processes fetching into one cache must not write the same .incomplete.

    The lock file is removed when done, so the cache holds only models (no
    zero-byte ``.lock`` per version ever fetched). Removing a lock file others
    may wait on is safe only with a check: whoever gets the lock makes sure the
    path still names the file it locked, else it locked a removed file and
    tries again on the current one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                continue  # the holder before us removed it: lock the new one
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # still holding the lock
            return
        finally:
            os.close(fd)


def _validation_message(response: httpx.Response) -> str:
    """The first message of a FastAPI 422 body, as a sentence (not raw JSON)."""
    try:
        first = response.json()["detail"][0]
        return str(first["msg"])
    except (ValueError, KeyError, IndexError, TypeError):
        return response.text[:300]


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.reason_phrase


class _Fetcher:
    def __init__(
        self, client: httpx.Client, base_url: str, cache_dir: Path, progress: ProgressFn | None
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.cache_dir = cache_dir
        self.progress = progress

    def _get(self, path: str, **kwargs: object) -> httpx.Response:
        try:
            return self.client.get(path, **kwargs)  # type: ignore[arg-type]
        except httpx.ConnectError as exc:
            raise self._unreachable(exc) from exc
        except httpx.TimeoutException as exc:
            raise FetchError(f"timed out talking to the model server at {self.base_url}") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"request to {self.base_url}{path} failed: {exc}") from exc

    def _unreachable(self, exc: Exception) -> FetchError:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc) or isinstance(exc.__context__, ssl.SSLError):
            return FetchError(
                f"the TLS certificate of {self.base_url} did not verify ({exc}); pass the CA "
                "that signed it (--ca-cert, node config model-server-ca), e.g. CERTS/ca.crt "
                "from `hybridfl certs`"
            )
        return FetchError(
            f"cannot reach the model server at {self.base_url} ({exc}); "
            "is `hybridfl serve` running?"
        )

    def manifest(self, version: int | None, alias: str) -> VersionManifest:
        if version is not None:
            if version < 0:
                raise FetchError(f"version must be >= 0, got {version}")
            r = self._get(f"{API}/versions/{version}")
            what = f"version {version}"
            payload_key = None
        else:
            r = self._get(f"{API}/aliases/{alias}")
            what = f"alias '{alias}'"
            payload_key = "manifest"
        if r.status_code == 404:
            raise FetchError(f"{what} not found on {self.base_url}: {_detail(r)}")
        if r.status_code == 422:
            raise FetchError(f"{what} is not valid on {self.base_url}: {_validation_message(r)}")
        if r.status_code != 200:
            raise FetchError(f"{what}: HTTP {r.status_code} from {self.base_url}: {_detail(r)}")
        try:
            data = r.json()
            return VersionManifest.model_validate(data[payload_key] if payload_key else data)
        except (ValueError, KeyError, TypeError) as exc:
            raise FetchError(f"{what}: malformed manifest from {self.base_url}: {exc}") from exc

    def signed(self, manifest: VersionManifest, public: Ed25519PublicKey) -> VersionManifest:
        """The manifest as its signature vouches for it; FetchError when it does not."""
        what = f"version {manifest.version}"
        r = self._get(f"{API}/versions/{manifest.version}/signature")
        if r.status_code == 404:
            raise FetchError(f"{what} on {self.base_url} is not signed: {_detail(r)}")
        if r.status_code != 200:
            raise FetchError(f"{what} signature: HTTP {r.status_code}: {_detail(r)}")
        try:
            record = SignatureRecord.model_validate_json(r.content)
            data = verified_manifest_bytes(record, public, manifest.version)
            signed = VersionManifest.model_validate_json(data)
        except SignatureError as exc:
            raise FetchError(f"{what} from {self.base_url}: {exc}") from None
        except ValueError as exc:
            raise FetchError(f"{what}: malformed signature record: {exc}") from None
        if (signed.version, signed.sha256, signed.size) != (
            manifest.version,
            manifest.sha256,
            manifest.size,
        ):
            raise FetchError(
                f"{what} from {self.base_url}: the served manifest names other weights "
                f"({manifest.sha256[:16]}…) than the signed one ({signed.sha256[:16]}…)"
            )
        return signed

    def fetch(self, manifest: VersionManifest) -> FetchResult:
        sha = manifest.sha256
        if not is_sha256_hex(sha):  # it becomes a file name: never trust it blindly
            raise FetchError(f"manifest has an invalid sha256 {sha!r}")
        final = self.cache_dir / f"{sha}.safetensors"
        weights = f"{API}/versions/{manifest.version}/weights"
        with file_lock(self.cache_dir / f"{sha}.lock"):
            if final.exists():
                if final.stat().st_size == manifest.size and hash_file(final) == sha:
                    received = self._revalidate(weights, sha)
                    if received is None:
                        return FetchResult(final, manifest, sha, downloaded=False, bytes=0)
                else:
                    final.unlink()  # damaged on our disk: fetch it again
            received = self._download(weights, manifest, final)
            return FetchResult(final, manifest, sha, downloaded=True, bytes=received)

    def _revalidate(self, url: str, sha: str) -> int | None:
        """Conditional GET for a verified cached copy; None when it is current."""
        etag = f'"{sha}"'
        try:
            with self.client.stream("GET", url, headers={"If-None-Match": etag}) as r:
                if r.status_code == 304 or (r.status_code == 200 and r.headers.get("etag") == etag):
                    return None  # a 200 with our ETag: same bytes, no need to read them
                if r.status_code == 404:
                    raise FetchError(f"{self.base_url}{url}: not found ({_detail_stream(r)})")
                raise FetchError(
                    f"{self.base_url}{url}: unexpected HTTP {r.status_code} on revalidation"
                )
        except httpx.ConnectError as exc:
            raise self._unreachable(exc) from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"revalidating {self.base_url}{url} failed: {exc}") from exc

    def _download(self, url: str, manifest: VersionManifest, final: Path) -> int:
        expected = Expected(
            size=manifest.size,
            sha256=manifest.sha256,
            what=f"version {manifest.version}",
            etag=f'"{manifest.sha256}"',
        )
        try:
            return download_verified(
                self.client, url, expected, final, where=self.base_url, progress=self.progress
            )
        except httpx.ConnectError as exc:
            raise self._unreachable(exc) from exc


@dataclass(frozen=True)
class Expected:
    """What a download must turn out to be; ``what`` names it in messages."""

    size: int
    sha256: str
    what: str
    etag: str | None = None
    """The strong validator the server sends for these bytes (sent as ``If-Range``
    on a resume and checked on every reply); None when the server has none we know."""


def download_verified(
    client: httpx.Client,
    url: str,
    expected: Expected,
    final: Path,
    *,
    where: str,
    progress: ProgressFn | None = None,
) -> int:
    """Download ``url`` into ``final``: ``.incomplete`` (resumed by Range), sha256, rename.

    Shared by the model fetch and ``hybridfl data get``: one place that never leaves
    a file at ``final`` that does not hash to ``expected.sha256``. A partial
    ``.incomplete`` from an interrupted call is resumed; bytes that do not verify
    are deleted. Returns the body bytes received. ``httpx.ConnectError`` is left to
    the caller, which knows what to suggest.
    """
    part = final.with_name(final.name + ".incomplete")
    what = expected.what
    try:
        received = _transfer(client, url, expected, part, where, progress)
        have = hash_file(part)
        if have != expected.sha256:
            resumed = received < expected.size  # a resume received only the tail
            part.unlink()
            if not resumed:
                raise FetchError(
                    f"corrupt download of {what} from {where}: sha256 {have} != expected "
                    f"{expected.sha256}; file deleted"
                )
            # The old partial may have been bad: one clean retry from byte 0.
            received += _transfer(client, url, expected, part, where, progress)
            have = hash_file(part)
            if have != expected.sha256:
                part.unlink()
                raise FetchError(
                    f"corrupt download of {what} from {where}: sha256 {have} != expected "
                    f"{expected.sha256}; file deleted"
                )
    except httpx.ConnectError:
        raise
    except httpx.TimeoutException as exc:
        raise FetchError(f"download of {what} from {where} timed out; run again to resume") from exc
    except httpx.HTTPError as exc:
        raise FetchError(
            f"download of {what} from {where} failed ({exc}); run again to resume"
        ) from exc
    os.replace(part, final)
    fsync_dir(final.parent)
    return received


def _transfer(
    client: httpx.Client,
    url: str,
    expected: Expected,
    part: Path,
    where: str,
    progress: ProgressFn | None,
) -> int:
    """Fill ``part`` up to ``expected.size`` bytes, resuming what is there.

    Returns the bytes received; fewer than the size means it was a resume.
    """
    try:
        return _transfer_once(client, url, expected, part, where, progress)
    except _RangeRefused:
        part.unlink(missing_ok=True)  # the server disagrees about the partial: restart
        return _transfer_once(client, url, expected, part, where, progress)


def _transfer_once(
    client: httpx.Client,
    url: str,
    expected: Expected,
    part: Path,
    where: str,
    progress: ProgressFn | None,
) -> int:
    size, etag, what = expected.size, expected.etag, expected.what
    offset = part.stat().st_size if part.exists() else 0
    if offset >= size:  # a complete (or oversized) leftover: start over
        part.unlink(missing_ok=True)
        offset = 0
    headers: dict[str, str] = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if etag is not None:
            headers["If-Range"] = etag
    received = 0
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code == 206:
            want = f"bytes {offset}-{size - 1}/{size}"
            if r.headers.get("content-range") != want:
                raise FetchError(
                    f"bad Content-Range {r.headers.get('content-range')!r}, expected {want!r}"
                )
            mode = "ab"
        elif r.status_code == 200:
            offset, mode = 0, "wb"
            length = r.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != size:
                part.unlink(missing_ok=True)  # another file than the expected one: keep nothing
                raise FetchError(
                    f"{where}{url} sends {what} as {int(length)} bytes, but {size} are expected: "
                    "not the expected file; nothing kept"
                )
        elif r.status_code == 416 and offset:
            raise _RangeRefused
        elif r.status_code == 404:
            raise FetchError(f"{what} not found on {where}: {_detail_stream(r)}")
        elif r.status_code == 503:
            raise FetchError(f"the server at {where} refuses to serve {what}: {_detail_stream(r)}")
        else:
            raise FetchError(f"{where}{url}: HTTP {r.status_code}: {_detail_stream(r)}")
        got_etag = r.headers.get("etag")
        if etag is not None and got_etag is not None and got_etag != etag:
            raise FetchError(f"server sent ETag {got_etag} for {what}, but expected {etag}")
        with open(part, mode) as f:
            pos = offset
            for chunk in r.iter_raw(CHUNK):
                if pos + len(chunk) > size:
                    raise FetchError(f"server sent more than the {size} bytes of {what}")
                f.write(chunk)
                pos += len(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(pos, size)
            f.flush()
            os.fsync(f.fileno())
        if pos != size:
            raise FetchError(
                f"download of {what} ended at {pos} of {size} bytes; run again to resume"
            )
    return received


def _detail_stream(response: httpx.Response) -> str:
    response.read()
    return _detail(response)


def fetch_model(
    base_url: str,
    *,
    version: int | None = None,
    alias: str = "serving",
    cache_dir: Path,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    progress: ProgressFn | None = None,
    client: httpx.Client | None = None,
    ca_cert: Path | None = None,
    verify_key: Path | None = None,
) -> FetchResult:
    """Fetch a verified global-model version into ``cache_dir``.

    ``version`` picks one exactly; otherwise ``alias`` ("serving" or "latest")
    is resolved. Raises ``FetchError`` for an unreachable server, an unknown
    version or alias, or bytes that do not verify (the bad file is deleted). An
    interrupted transfer leaves ``<sha>.safetensors.incomplete``; the next call
    resumes it. ``client`` lets a caller reuse a connection pool (its base_url
    must be ``base_url``). ``ca_cert``: the server's certificate must be signed by
    this CA (an ``https://`` URL is required then); without it, the system's CAs.
    ``verify_key``: an Ed25519 public key (``models-signing.pub``); the version's
    manifest must carry a signature by it (``hybridfl sign``), which makes the
    weights trusted whoever served them.
    """
    base_url = base_url.rstrip("/")
    if version is None and alias not in ALIASES:  # it goes into a URL path: known names only
        raise FetchError(
            f"unknown alias {alias!r}: the model server's aliases are "
            f"{' and '.join(repr(a) for a in ALIASES)} (or give a version number)"
        )
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    verify = tls_context(base_url, ca_cert)
    try:
        public = load_public_key(verify_key) if verify_key is not None else None
    except SignatureError as exc:
        raise FetchError(str(exc)) from None
    own = client is None
    session = client or httpx.Client(
        base_url=base_url, timeout=timeout, follow_redirects=False, verify=verify
    )
    try:
        fetcher = _Fetcher(session, base_url, cache_dir, progress)
        manifest = fetcher.manifest(version, alias)
        if public is not None:
            manifest = fetcher.signed(manifest, public)
        return fetcher.fetch(manifest)
    finally:
        if own:
            session.close()


def tls_context(base_url: str, ca_cert: Path | None) -> ssl.SSLContext | bool:
    """What verifies the server: our CA when given (https only), else the system's."""
    if ca_cert is None:
        return True
    if not base_url.startswith("https://"):
        raise FetchError(
            f"a CA certificate ({ca_cert}) was given but {base_url} is not https://: "
            "use the https:// URL of a model server started with --certfile/--keyfile"
        )
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise FetchError(f"CA certificate {ca_cert} cannot be loaded: {exc}") from exc


def load_fetched_model(result: FetchResult) -> torch.nn.Module:
    """Build the manifest's model and load the fetched weights (safetensors only).

    The file is hashed again as it is read, so what is loaded is exactly what
    was verified (not something a later writer put at that path).
    """
    from common.models import ModelSpec, build_model
    from common.weights import from_safetensors, load_arrays, sha256_hex

    blob = Path(result.path).read_bytes()
    if sha256_hex(blob) != result.sha256:
        raise FetchError(f"{result.path} changed since it was verified; fetch it again")
    spec = ModelSpec.model_validate(result.manifest.model)
    model = build_model(spec)
    load_arrays(model, from_safetensors(blob), strict=True)
    model.eval()
    return model
