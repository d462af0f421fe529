"""Shared test helpers: where the workplace's datasets are, and process-leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("HYBRIDFL_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_shared(name: str) -> Path:
    """Path of a dataset file in ../shared/data, or skip with the reason."""
    p = shared_data_dir() / name
    if not p.exists():
        pytest.skip(f"../shared/data not present: {p} missing (set HYBRIDFL_SHARED_DATA)")
    return p


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line or environment mentions ``text`` (leak detection)."""
    found = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            blob = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(d.name))
    return found
