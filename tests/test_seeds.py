"""Seeds and spread: ``simulate --seeds`` (sibling run folders) and mean ± std in ``report``."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.rundir import SUMMARY_FILE
from simulation.cli import cli
from simulation.report import load_runs, run_row
from tests.conftest import REPO
from tests.test_compare import _make_run, _table_rows


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--seeds", "0,x"], "'x' is not a seed"),
        (["--seeds", "1,1"], "seed 1 is listed twice"),
        (["--seeds", "0,1", "--set", "seed=3"], "drop --set seed="),
        (["--seeds", "0,1", "--serve"], "--serve serves one run: not with --seeds"),
    ],
)
def test_bad_seed_sweeps_stop_before_anything_starts(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(cli, ["simulate", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_never_writes_into_an_existing_run_folder(tmp_path: Path) -> None:
    (tmp_path / "x-s1").mkdir()
    result = CliRunner().invoke(cli, ["simulate", "--seeds", "0,1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert f"exist already: {tmp_path / 'x-s1'}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-s1"]  # nothing else started


def test_report_gives_mean_and_std_over_runs_that_differ_only_in_seed(tmp_path: Path) -> None:
    small = ("rounds=2", "evaluation.finetune_steps=0", "model.name=logistic")
    seeds = [_make_run(tmp_path / f"fedavg-s{s}", *small, f"seed={s}") for s in (0, 1, 2)]
    other = _make_run(tmp_path / "lr", *small, "seed=0", "client.lr=0.3")  # not a seed twin
    result = CliRunner().invoke(cli, ["report", *map(str, [*seeds, other]), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output, "runs | seeds")
    assert [r[:2] for r in rows] == [["fedavg", "0, 1, 2"]]  # the lr run is in no group
    personal = [run_row(r)["device_personal_acc"] for r in load_runs(seeds)]
    want = f"{100 * statistics.mean(personal):.1f}% ± {100 * statistics.stdev(personal):.1f}"
    assert rows[0][4] == want
    assert rows[0][6].endswith(tuple("0123456789")) and " pp ± " in rows[0][6]  # gain, in points


@pytest.mark.slow
def test_simulate_seeds_runs_one_real_simulation_per_seed(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "simulate", "--seeds", "3,4",
         "--set", "rounds=1", "--set", "partition.num_devices=4", "--set", "model.name=logistic",
         "--set", "output.plot=false", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dirs = [tmp_path / "sweep-s3", tmp_path / "sweep-s4"]
    assert f"into {dirs[0]}, {dirs[1]}" in proc.stdout
    for seed, d in zip((3, 4), dirs, strict=True):
        assert (d / SUMMARY_FILE).is_file()
        text = (d / "config.toml").read_text()
        assert f"seed = {seed}\n" in text and f'name = "sweep-s{seed}"' in text
    assert f"hybridfl report {dirs[0]} {dirs[1]}" in proc.stdout
