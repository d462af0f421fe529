"""``hybridfl data get NAME --to DIR``: a public dataset into the user's data folder.

Registered on the main app by ``register(cli)`` (a command group of its own, so
``simulation/cli.py`` only gains one line); the work is ``simulation.data_get``.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from common.data.paths import DATA_ENV
from simulation.cli_common import echo, fail

data_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Public datasets for configs that need more than the bundled digits.",
)


class DatasetChoice(StrEnum):
    mnist = "mnist"
    fashion_mnist = "fashion-mnist"
    femnist = "femnist"


@data_app.command("get")
def get_cmd(
    name: Annotated[
        DatasetChoice,
        typer.Argument(
            help="Dataset: mnist, fashion-mnist (downloaded) or femnist (converted from "
            "LEAF's preprocessing output: --from-leaf).",
            show_default=False,
        ),
    ],
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            help=f"Data folder to fill (default: ${DATA_ENV}); configs find files under it "
            f"when ${DATA_ENV} (or data.root) names it.",
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="Download from this base URL instead of the dataset's own source and "
            "mirrors (also env HYBRIDFL_DATA_URL); the pinned sha256 checksums still apply.",
        ),
    ] = None,
    from_leaf: Annotated[
        Path | None,
        typer.Option(
            "--from-leaf",
            help="femnist only: LEAF's data/femnist/data folder (train/ and test/ JSON "
            "written by LEAF's preprocess.sh) to convert.",
        ),
    ] = None,
) -> None:
    """Download a dataset from its canonical source (sha256-pinned, resumable) as an .npz."""
    from simulation.data_get import DATA_URL_ENV, SOURCES, DataGetError, get_dataset

    if to is None:
        env = os.environ.get(DATA_ENV, "")
        if not env:
            fail(f"give the data folder: --to DIR (or set {DATA_ENV}=DIR)")
        to = Path(env)
    to = to.expanduser()
    if to.exists() and not to.is_dir():
        fail(f"--to {to} is a file: give a folder")
    if name is DatasetChoice.femnist or from_leaf is not None:
        _femnist(name, to, from_leaf)
        return
    url = base_url or os.environ.get(DATA_URL_ENV, "")
    if url and not url.startswith(("http://", "https://")):
        where = "--base-url" if base_url else DATA_URL_ENV
        fail(f"{where} {url!r} is not an http:// or https:// URL")
    source = SOURCES[name.value]
    try:
        res = get_dataset(source, to, base_url=base_url, say=echo)
    except DataGetError as err:
        fail(str(err), code=1)
    echo(
        f"wrote {res.path} ({res.num_train} train / {res.num_test} test images; "
        f"{source.about})\n"
        f'use it with data.dataset = "npz", data.path = "{res.path.name}" and '
        f"{DATA_ENV}={to.resolve()} (or data.root)"
    )


def _femnist(name: DatasetChoice, to: Path, from_leaf: Path | None) -> None:
    """FEMNIST has no pinned download: convert LEAF's own output (see data_leaf)."""
    from simulation.data_leaf import LeafError, convert_leaf_femnist

    if name is not DatasetChoice.femnist:
        fail(f"--from-leaf converts LEAF's FEMNIST only, not {name.value}")
    if from_leaf is None:
        fail(
            "femnist is built by LEAF from NIST SD19's archives (about 1 GB each, no "
            "published sha256 to pin), so hybridfl does not download it: run LEAF's "
            "data/femnist/preprocess.sh (e.g. -s niid --sf 0.05 -k 0 -t sample), then "
            "hybridfl data get femnist --from-leaf LEAF/data/femnist/data --to DIR"
        )
    assert from_leaf is not None
    try:
        out, writers, n_train, n_test = convert_leaf_femnist(from_leaf, to)
    except LeafError as err:
        fail(str(err))
    echo(
        f"wrote {out} ({writers} writers with both splits, {n_train} train / {n_test} test "
        f'images)\nuse it with data.dataset = "femnist", data.path = "{out.name}", '
        f'partition.method = "natural", partition.num_devices <= {writers} and '
        f"{DATA_ENV}={to.resolve()} (or data.root)"
    )


def register(cli: typer.Typer) -> None:
    """Add ``hybridfl data ...`` to the main app."""
    cli.add_typer(data_app, name="data")


__all__ = ["register"]
