"""Every algorithm from the CLI, through the SuperLink and Ray (slow: a run each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_shared

EXTRA = {
    "fedper": ['model.name="mlp2nn"'],
    "fedrep": ['model.name="mlp2nn"'],
    "fedbn": ["model.batch_norm=true"],
}
ALGORITHMS = ["fedavg", "fedprox", "fedper", "fedrep", "fedbn", "ditto", "apfl"]


def _run(out: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "simulation.cli", "simulate", "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_on_the_quickstart(tmp_path: Path, algorithm: str) -> None:
    proc = _run(
        tmp_path / "r", "rounds=3", f"client.algorithm={algorithm}", *EXTRA.get(algorithm, [])
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "r" / "devices.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_on_femnist(tmp_path: Path, algorithm: str) -> None:
    data = require_shared("femnist_105writers.npz")
    proc = _run(
        tmp_path / "r",
        "rounds=2",
        'data.dataset="femnist"',
        f'data.path="{data}"',
        'partition.method="natural"',
        "partition.num_devices=105",
        "strategy.fraction_train=0.1",
        'evaluation.devices="participants"',
        f"client.algorithm={algorithm}",
        *EXTRA.get(algorithm, []),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
