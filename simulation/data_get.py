"""``hybridfl data get``: public datasets from their canonical source, verified, as .npz.

Why here and not in the loaders: the simulator itself never downloads (every Ray
worker would race for the same file); a user fetches a dataset once, into one data
folder, and configs name the file under it (``data.root`` / ``$HYBRIDFL_DATA``).

Every file is pinned by size and sha256 in this module, so a mirror, a proxy or a
test server can serve the bytes and nothing unverified is ever converted. The
transfer is ``client.fetch.download_verified``: ``.incomplete`` resumed by HTTP
Range, sha256 checked, then renamed; a file that does not verify is deleted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from client.fetch import Expected, FetchError, download_verified, file_lock, hash_file
from common.atomic import write_npz
from common.data.dataset import DataError
from common.data.loaders import find_idx_files, read_idx

DATA_URL_ENV = "HYBRIDFL_DATA_URL"
"""Base URL replacing every source's own (a local mirror, or the tests' server)."""
RAW_DIR = "raw"
"""Under the data folder: the downloaded originals, per dataset (kept for resuming)."""
TIMEOUT = httpx.Timeout(60.0, connect=15.0)


class DataGetError(RuntimeError):
    """The dataset could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """One dataset: where its files are published and what they must hash to."""

    name: str
    urls: tuple[str, ...]
    """Base URLs, the canonical one first; later ones are tried when one fails."""
    files: tuple[RemoteFile, ...]
    output: str
    """The .npz written into the data folder (``data.dataset = "npz"`` reads it)."""
    about: str


_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _idx_files(sizes: tuple[int, ...], hashes: tuple[str, ...]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(n, s, h) for n, s, h in zip(_IDX_NAMES, sizes, hashes, strict=True))


SOURCES: dict[str, Source] = {
    "mnist": Source(
        name="mnist",
        # LeCun's page is the canonical home; it often refuses downloads now, so the
        # mirrors torchvision and TensorFlow use follow (same bytes, same hashes).
        urls=(
            "http://yann.lecun.com/exdb/mnist",
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            "https://storage.googleapis.com/cvdf-datasets/mnist",
        ),
        files=_idx_files(
            (9912422, 28881, 1648877, 4542),
            (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
        output="mnist.npz",
        about="MNIST (LeCun, Cortes, Burges), CC BY-SA 3.0",
    ),
    "fashion-mnist": Source(
        name="fashion-mnist",
        urls=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion",
        ),
        files=_idx_files(
            (26421880, 29515, 4422102, 5148),
            (
                "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
                "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
                "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
                "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
            ),
        ),
        output="fashion-mnist.npz",
        about="Fashion-MNIST (Xiao, Rasul, Vollgraf; Zalando Research), MIT licence",
    ),
}

Say = Callable[[str], None]


@dataclass(frozen=True)
class GetResult:
    path: Path
    """The converted .npz."""
    downloaded: int
    """Body bytes received over the network by this call (0: everything was on disk)."""
    num_train: int
    num_test: int


def base_urls(source: Source, base_url: str | None) -> tuple[str, ...]:
    """``--base-url``, else ``$HYBRIDFL_DATA_URL``, else the source's own list."""
    chosen = base_url or os.environ.get(DATA_URL_ENV, "")
    return (chosen,) if chosen else source.urls


def get_dataset(
    source: Source, to: Path, *, base_url: str | None = None, say: Say = print
) -> GetResult:
    """Download ``source``'s files into ``to/raw/<name>/`` (verified) and write ``to/<output>``.

    Files already there and verified are not downloaded again; a partial one is
    resumed. Raises ``DataGetError`` naming the file, the URL and the fix.
    """
    raw = to / RAW_DIR / source.name
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataGetError(f"--to {to}: cannot create {raw} ({err.strerror or err})") from None
    received = 0
    for remote in source.files:
        received += _get_file(remote, raw, base_urls(source, base_url), say)
    out = to / source.output
    n_train, n_test = _convert_idx(raw, out)
    return GetResult(out, received, n_train, n_test)


def _get_file(remote: RemoteFile, raw: Path, urls: tuple[str, ...], say: Say) -> int:
    """One pinned file into ``raw``, from the first base URL that serves the right bytes."""
    final = raw / remote.name
    expected = Expected(size=remote.size, sha256=remote.sha256, what=remote.name)
    with file_lock(raw / f"{remote.name}.lock"):
        if final.is_file():
            if final.stat().st_size == remote.size and hash_file(final) == remote.sha256:
                say(f"{remote.name}: already downloaded and verified")
                return 0
            final.unlink()  # damaged on our disk: fetch it again
        failures: list[str] = []
        for base in urls:
            where = base.rstrip("/")
            t0 = time.monotonic()
            part = final.with_name(final.name + ".incomplete")
            resume = part.stat().st_size if part.is_file() else 0
            note = f", resuming at byte {resume}" if resume else ""
            say(f"{remote.name}: {remote.size:,} bytes from {where}{note}")
            try:
                with httpx.Client(base_url=where, timeout=TIMEOUT, follow_redirects=True) as c:
                    got = download_verified(c, f"/{remote.name}", expected, final, where=where)
            except (FetchError, httpx.HTTPError, httpx.InvalidURL) as err:
                failures.append(f"{where}: {err}")
                continue
            took = time.monotonic() - t0
            say(f"{remote.name}: {got:,} bytes received, sha256 verified ({took:.1f} s)")
            return got
        raise DataGetError(
            f"could not download {remote.name} (sha256 {remote.sha256}):\n  "
            + "\n  ".join(failures)
            + f"\nnothing unverified was kept; run the command again to retry (a partial "
            f"download is resumed), or point --base-url / ${DATA_URL_ENV} at a mirror"
        )


def _convert_idx(raw: Path, out: Path) -> tuple[int, int]:
    """The four IDX files -> one .npz (uint8 images and labels), written atomically."""
    try:
        files = find_idx_files(raw)
        arrays = {
            "x_train": read_idx(files["train_images"], expected_ndim=3),
            "y_train": read_idx(files["train_labels"], expected_ndim=1),
            "x_test": read_idx(files["test_images"], expected_ndim=3),
            "y_test": read_idx(files["test_labels"], expected_ndim=1),
        }
    except DataError as err:
        raise DataGetError(f"verified files in {raw} do not convert: {err}") from None
    for split in ("train", "test"):
        n_x, n_y = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if n_x != n_y:
            raise DataGetError(f"{raw}: {n_x} {split} images but {n_y} labels")
    try:
        write_npz(out, {k: v.astype(np.uint8) for k, v in arrays.items()})
    except OSError as err:
        raise DataGetError(f"cannot write {out} ({err.strerror or err})") from None
    return len(arrays["x_train"]), len(arrays["x_test"])
