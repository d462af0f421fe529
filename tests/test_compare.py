"""`hybridfl report`: one table row per run, last and best rounds apart, PNGs written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.atomic import atomic_write_text
from common.config import load_config
from common.data import open_source
from common.rows import read_rows
from common.rundir import METRICS_FILE, PARTITION_FILE, SUMMARY_FILE, prepare_run_dir
from server.loop import ServerLoop
from server.summary import summarize
from simulation.cli import cli
from simulation.report import CURVES_PNG, GAIN_PNG, REPORT_MD, load_runs, markdown, run_row
from tests.inprocess_grid import InProcessGrid

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(run_dir: Path, *overrides: str) -> Path:
    """What server/app.py does, with the in-process grid: run folder, rounds, summary."""
    cfg = load_config(
        None,
        [
            "rounds=3",
            "partition.num_devices=6",
            "strategy.fraction_train=0.5",
            "model.name=logistic",
            f"name={run_dir.name}",
            *overrides,
        ],
    )
    prepare_run_dir(cfg, run_dir)
    ServerLoop(
        InProcessGrid(run_dir, 2), cfg, run_dir, open_source(cfg, run_dir / PARTITION_FILE)
    ).run()
    summary = summarize(read_rows(run_dir / METRICS_FILE))
    atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [
        _make_run(root / "fedavg-holdout", "evaluation.holdout_fraction=0.34"),
        _make_run(
            root / "fedper", 'model.name="mlp2nn"', "client.algorithm=fedper", "evaluation.every=2"
        ),
    ]


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    """Rows of the markdown table whose header starts with ``first_cell``."""
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"| {first_cell} |"))
    body = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_report_prints_one_row_per_run_and_writes_pngs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    header = next(x for x in text.splitlines() if x.startswith("| run | algorithm"))
    for col in ("personalized", "fine-tuned", "gain", "hurt", "held-out: fine-tuned", "bytes"):
        assert col in header
    rows = _table_rows(text, "run | algorithm")
    assert [r[0] for r in rows] == ["fedavg-holdout", "fedper"]
    assert rows[0][1:4] == ["fedavg", "fedavg", "3"] and rows[1][1] == "fedper"
    assert all(c.endswith("%") for c in rows[0][4:8])
    # The fedper run has no held-out devices: its held-out cells are empty.
    assert rows[1][header.strip("|").split("|").index(" held-out: global ")] == "-"
    assert "Last evaluated round (round 3)" in text
    assert "Best round" in text and "flatters" in text
    best = _table_rows(text, "run | best global test")
    assert [r[0] for r in best] == ["fedavg-holdout", "fedper"]
    assert all("(round " in c for c in best[0][1:])
    for name in (CURVES_PNG, GAIN_PNG):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000
    assert (out / REPORT_MD).read_text().strip() in text


def test_report_defaults_to_the_first_run_folder(runs: list[Path]) -> None:
    result = CliRunner().invoke(cli, ["report", str(runs[1])])
    assert result.exit_code == 0, result.output
    assert (runs[1] / CURVES_PNG).is_file() and (runs[1] / GAIN_PNG).is_file()
    assert "held-out" not in result.output.split("### Best")[0].split("\n|")[1]


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a run folder" in result.output
    assert "Traceback" not in result.output


def test_rows_quote_the_last_round_and_keep_best_apart(runs: list[Path]) -> None:
    loaded = load_runs(runs)
    rows = [run_row(r) for r in loaded]
    summary = json.loads((runs[0] / SUMMARY_FILE).read_text())
    assert rows[0]["device_personal_acc"] == summary["last"]["device_personal_acc"]
    assert rows[0]["holdout_num_devices"] == 2 and rows[1]["holdout_num_devices"] is None
    assert rows[1]["evaluations"] == 2  # every 2 rounds, and the last one
    assert set(rows[0]["best"]) >= {"best_global", "best_personal", "best_finetuned"}
    assert rows[0]["bytes_up_per_update"] > 0 and rows[0]["bytes_total"] > 0
    assert len(loaded[0].devices) == 6
    text = markdown(rows)
    assert text.count("| fedavg-holdout |") == 2  # once in each table


def test_same_folder_names_are_told_apart(runs: list[Path], tmp_path: Path) -> None:
    twin = _make_run(tmp_path / "fedper", "rounds=1")
    names = [r.name for r in load_runs([runs[1], twin])]
    assert len(set(names)) == 2 and all(n.endswith("fedper") for n in names)
