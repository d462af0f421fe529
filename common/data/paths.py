"""Where a config's data file is: ``data.path`` under a data folder the user sets once.

Why: configs name a file (``mnist.npz``), not a machine's folder; each user keeps
their datasets in one folder (``hybridfl data get mnist --to DIR``) and says where
it is once, in ``data.root`` or in the ``HYBRIDFL_DATA`` environment variable, instead
of editing every config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import DataConfig

DATA_ENV = "HYBRIDFL_DATA"
"""Environment variable naming the data folder when ``data.root`` is empty."""


def data_root(cfg: DataConfig) -> tuple[Path | None, str]:
    """The data folder and where it came from (``data.root``, ``$HYBRIDFL_DATA``, or none)."""
    if cfg.root:
        return Path(cfg.root).expanduser(), "data.root"
    env = os.environ.get(DATA_ENV, "")
    if env:
        return Path(env).expanduser(), f"${DATA_ENV}"
    return None, ""


def resolve_data_path(cfg: DataConfig) -> Path:
    """``data.path`` as an absolute path.

    Absolute paths are kept; a relative one is looked up under ``data.root``, else
    under ``$HYBRIDFL_DATA``, else under the current folder.
    """
    path = Path(cfg.path).expanduser()
    if path.is_absolute():
        return path
    root, _ = data_root(cfg)
    return ((root or Path.cwd()) / path).resolve()


def where_looked(cfg: DataConfig) -> str:
    """A hint for a missing relative ``data.path``: where it was looked up and how to fix it."""
    if Path(cfg.path).expanduser().is_absolute():
        return ""
    root, origin = data_root(cfg)
    base = f"under {origin} = {root}" if root else (
        f"under the current folder (neither data.root nor ${DATA_ENV} is set)"
    )  # fmt: skip
    return (
        f"; the relative data.path '{cfg.path}' was looked up {base}. Download a dataset "
        f"with `hybridfl data get mnist --to DIR`, then set ${DATA_ENV}=DIR (or data.root)"
    )
