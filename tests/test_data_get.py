"""``hybridfl data get``: against a real HTTP server on 127.0.0.1 serving small IDX files.

This machine has no internet and tests never reach the real sources: the server
stands in for them (``--base-url`` / ``$HYBRIDFL_DATA_URL``). The pinned checksums
are of the real files, so the command run as a user runs it must refuse these
bytes; the success and resume paths run ``get_dataset`` with a source whose pins
are the test files' own.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig
from common.data import load_dataset
from common.data.paths import DATA_ENV
from simulation.data_get import (
    DATA_URL_ENV,
    RAW_DIR,
    SOURCES,
    DataGetError,
    RemoteFile,
    Source,
    get_dataset,
)
from tests.conftest import HYBRIDFL, REPO
from tests.test_data_loaders import small_arrays, write_idx

ROLES = {
    "train-images-idx3-ubyte.gz": "x_train",
    "train-labels-idx1-ubyte.gz": "y_train",
    "t10k-images-idx3-ubyte.gz": "x_test",
    "t10k-labels-idx1-ubyte.gz": "y_test",
}


class FileServer:
    """A real threaded HTTP server: GET with Range, a request log, files by name."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                folder, _, name = self.path.rpartition("/")
                body = outer.files.get(name) if folder == "/mnist" else None
                if body is None:
                    self.send_error(404, "no such file")
                    return
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def file_requests(self, name: str) -> list[str | None]:
        return [rng for path, rng in self.requests if path.endswith("/" + name)]


@pytest.fixture(scope="module")
def idx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Small valid gzip IDX files with MNIST's file names (written by the test's own writer)."""
    folder = tmp_path_factory.mktemp("idx")
    arrays = small_arrays(n_train=300, n_test=40)
    out = {}
    for name, role in ROLES.items():
        write_idx(folder / name, arrays[role])
        out[name] = (folder / name).read_bytes()
    return out


@pytest.fixture
def server(idx_files: dict[str, bytes]) -> Iterator[FileServer]:
    srv = FileServer(idx_files)
    yield srv
    srv.stop()


def pinned_to(files: dict[str, bytes], url: str) -> Source:
    """MNIST's source with the test files' own sizes and sha256s (and the test server)."""
    pins = tuple(
        RemoteFile(name, len(files[name]), hashlib.sha256(files[name]).hexdigest())
        for name in ROLES
    )
    return replace(SOURCES["mnist"], urls=(url,), files=pins)


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_get_writes_an_npz_the_npz_loader_reads_under_the_data_root(
    server: FileServer, idx_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    res = get_dataset(pinned_to(idx_files, server.url), tmp_path, say=lines.append)
    assert res.path == tmp_path / "mnist.npz"
    assert res.downloaded == sum(len(b) for b in idx_files.values())
    assert (res.num_train, res.num_test) == (300, 40)
    want = small_arrays(n_train=300, n_test=40)
    # A config names the file relative to the data folder: data.root, or $HYBRIDFL_DATA.
    monkeypatch.chdir(REPO)
    by_root = load_dataset(DataConfig(dataset="npz", path="mnist.npz", root=str(tmp_path)))
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    by_env = load_dataset(DataConfig(dataset="npz", path="mnist.npz"))
    for ds in (by_root, by_env):
        np.testing.assert_array_equal(ds.y_train, want["y_train"].astype(np.int64))
        np.testing.assert_array_equal(ds.x_test[:, 0], want["x_test"] / np.float32(255.0))
    assert leftovers(tmp_path) == ["mnist.npz", *(f"{RAW_DIR}/mnist/{n}" for n in sorted(ROLES))]
    # Run again: everything verifies on disk, nothing is downloaded.
    server.requests.clear()
    again = get_dataset(pinned_to(idx_files, server.url), tmp_path, say=lines.append)
    assert again.downloaded == 0 and server.requests == []
    assert sum("already downloaded and verified" in line for line in lines) == 4


def test_a_partial_download_is_resumed_with_a_range_request(
    server: FileServer, idx_files: dict[str, bytes], tmp_path: Path
) -> None:
    name = "train-images-idx3-ubyte.gz"
    body = idx_files[name]
    half = len(body) // 2
    raw = tmp_path / RAW_DIR / "mnist"
    raw.mkdir(parents=True)
    (raw / f"{name}.incomplete").write_bytes(body[:half])
    lines: list[str] = []
    res = get_dataset(pinned_to(idx_files, server.url), tmp_path, say=lines.append)
    assert server.file_requests(name) == [f"bytes={half}-"]
    assert res.downloaded == sum(len(b) for b in idx_files.values()) - half
    assert (raw / name).read_bytes() == body
    assert any(f"resuming at byte {half}" in line for line in lines)
    assert not list(tmp_path.rglob("*.incomplete"))


def test_a_bad_partial_is_discarded_and_fetched_again_from_byte_zero(
    server: FileServer, idx_files: dict[str, bytes], tmp_path: Path
) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / RAW_DIR / "mnist"
    raw.mkdir(parents=True)
    (raw / f"{name}.incomplete").write_bytes(b"\xff" * 10)  # not a prefix of the file
    get_dataset(pinned_to(idx_files, server.url), tmp_path, say=lambda _: None)
    assert server.file_requests(name) == ["bytes=10-", None]
    assert (raw / name).read_bytes() == idx_files[name]


def test_a_failing_source_falls_back_to_the_next_mirror(
    server: FileServer, idx_files: dict[str, bytes], tmp_path: Path
) -> None:
    dead = server.url.replace("/mnist", "/gone")  # answers 404 for every file
    src = pinned_to(idx_files, server.url)
    with pytest.raises(DataGetError, match="not found on") as info:
        get_dataset(replace(src, urls=(dead,)), tmp_path, say=lambda _: None)
    assert dead in str(info.value) and "--base-url" in str(info.value)
    res = get_dataset(replace(src, urls=(dead, server.url)), tmp_path, say=lambda _: None)
    assert res.num_train == 300
    assert len(server.file_requests("t10k-labels-idx1-ubyte.gz")) == 2  # /gone, then /mnist


@pytest.mark.parametrize("how", ["--base-url", DATA_URL_ENV])
def test_the_command_refuses_bytes_that_do_not_match_the_pinned_checksum(
    server: FileServer, tmp_path: Path, how: str
) -> None:
    """The README's command, pointed at a server whose files are not the real MNIST."""
    to = tmp_path / "data"
    cmd = [*HYBRIDFL, "data", "get", "mnist", "--to", str(to)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(DATA_URL_ENV, None)
    if how == "--base-url":
        cmd += ["--base-url", server.url]
    else:
        env[DATA_URL_ENV] = server.url
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "error: could not download train-images-idx3-ubyte.gz" in err
    assert SOURCES["mnist"].files[0].sha256 in err  # the pinned checksum, named
    assert server.url in err and "not the expected file" in err
    assert "Traceback" not in err
    # The size differs from the pinned one, so the transfer stops before the hash; either
    # way nothing half-written is left: no .incomplete, no raw file, no npz.
    assert leftovers(to) == []
    assert server.file_requests("train-images-idx3-ubyte.gz")  # it did ask our server


def test_same_size_but_wrong_bytes_is_a_checksum_error_and_leaves_nothing(
    server: FileServer, idx_files: dict[str, bytes], tmp_path: Path
) -> None:
    src = pinned_to(idx_files, server.url)
    name = "train-labels-idx1-ubyte.gz"
    good = idx_files[name]
    server.files[name] = bytes(b ^ 1 for b in good)  # same size, other bytes
    with pytest.raises(DataGetError) as info:
        get_dataset(src, tmp_path, say=lambda _: None)
    msg = str(info.value)
    assert f"could not download {name}" in msg and "corrupt download" in msg
    assert "file deleted" in msg and hashlib.sha256(good).hexdigest() in msg
    assert not list(tmp_path.rglob(f"{name}*"))
    assert not (tmp_path / "mnist.npz").exists()


def test_configs_name_their_data_under_the_users_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No config points at a machine's folder; with $HYBRIDFL_DATA set, every file is found."""
    from common.config import load_config
    from common.data.paths import resolve_data_path
    from tests.conftest import shared_data_dir

    monkeypatch.chdir(tmp_path)  # relative paths must not depend on where you stand
    named = {}
    for toml in sorted((REPO / "configs").glob("*.toml")):
        data = load_config(toml).data
        if data.path:
            assert not Path(data.path).is_absolute() and ".." not in data.path, toml.name
            named[toml.name] = data
    assert {"mcmahan_2nn_iid.toml", "femnist_cnn.toml"} <= set(named)
    shared = shared_data_dir()
    if not shared.is_dir():
        pytest.skip(f"../shared/data not present: {shared} (set HYBRIDFL_SHARED_DATA)")
    monkeypatch.setenv(DATA_ENV, str(shared))
    for name, data in named.items():
        assert resolve_data_path(data).is_file(), f"{name}: {data.path} not in {shared}"


def test_a_missing_relative_path_says_where_it_looked_and_how_to_get_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.data import DataError

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="npz", path="mnist.npz"))
    msg = str(info.value)
    assert f"file not found: {tmp_path / 'mnist.npz'}" in msg
    assert f"under ${DATA_ENV} = {tmp_path}" in msg and "hybridfl data get mnist --to DIR" in msg
    with pytest.raises(DataError, match=r"under data\.root = /nowhere"):
        load_dataset(DataConfig(dataset="npz", path="mnist.npz", root="/nowhere"))


def test_the_command_fills_the_data_folder_named_by_the_env_and_says_how_to_use_it(
    server: FileServer, idx_files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's success path, in-process, with the test files pinned instead of MNIST's."""
    from typer.testing import CliRunner

    from simulation import data_get
    from simulation.cli import cli

    monkeypatch.setitem(data_get.SOURCES, "mnist", pinned_to(idx_files, server.url))
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    monkeypatch.delenv(DATA_URL_ENV, raising=False)
    result = CliRunner().invoke(cli, ["data", "get", "mnist"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'data' / 'mnist.npz'} (300 train / 40 test images" in result.output
    assert 'data.path = "mnist.npz"' in result.output
    again = CliRunner().invoke(cli, ["data", "get", "mnist", "--to", str(tmp_path / "data")])
    assert again.output.count("already downloaded and verified") == 4
    bad = CliRunner().invoke(cli, ["data", "get", "mnist", "--base-url", "ftp://x"])
    assert bad.exit_code == 2 and "not an http:// or https:// URL" in bad.output


def _leaf_json(path: Path, users: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    """A file in LEAF's data_to_json.py layout (pixels gray/255: 1.0 = white background)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {
            w: {"x": x.reshape(len(y), -1).tolist(), "y": y} for w, (x, y) in users.items()
        },
    }
    path.write_text(json.dumps(data))


def test_femnist_is_converted_from_leafs_own_output(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulation.cli import cli

    rng = np.random.default_rng(0)
    ink = {w: rng.integers(0, 256, size=(n, 28, 28)) for w, n in (("f1", 6), ("f2", 4), ("f3", 2))}
    leaf = tmp_path / "leaf"
    split = {"f1": (4, 2), "f2": (3, 1)}  # f3 has no test split: left out
    _leaf_json(leaf / "train" / "a.json", {
        "f2": (1 - ink["f2"][:3] / 255, [10, 61, 0]),
        "f1": (1 - ink["f1"][:4] / 255, [1, 2, 3, 4]),
        "f3": (1 - ink["f3"] / 255, [5, 5]),
    })  # fmt: skip
    _leaf_json(leaf / "test" / "b.json", {
        "f1": (1 - ink["f1"][4:] / 255, [1, 9]),
        "f2": (1 - ink["f2"][3:] / 255, [61]),
    })  # fmt: skip
    out = tmp_path / "data"
    result = CliRunner().invoke(
        cli, ["data", "get", "femnist", "--from-leaf", str(leaf), "--to", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "2 writers with both splits, 7 train / 3 test images" in result.output
    with np.load(out / "femnist.npz", allow_pickle=False) as npz:
        assert npz["writers"].tolist() == ["f1", "f2"]
        np.testing.assert_array_equal(npz["x_train"][:4], ink["f1"][:4])  # 0 = background
        assert npz["writer_train"].tolist() == [0] * split["f1"][0] + [1] * split["f2"][0]
        assert npz["y_test"].tolist() == [1, 9, 61]
    ds = load_dataset(DataConfig(dataset="femnist", path="femnist.npz", root=str(out)))
    assert ds.num_classes == 62 and len(ds.y_train) == 7


def test_femnist_without_leaf_output_says_how_to_get_it(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulation.cli import cli

    result = CliRunner().invoke(cli, ["data", "get", "femnist", "--to", str(tmp_path)])
    assert result.exit_code == 2
    assert "preprocess.sh" in result.output and "--from-leaf" in result.output
    assert list(tmp_path.iterdir()) == []
    bad = CliRunner().invoke(
        cli, ["data", "get", "femnist", "--from-leaf", str(tmp_path), "--to", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "no LEAF JSON files in" in bad.output
