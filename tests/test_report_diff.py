"""`hybridfl report`: what tells runs apart, rounds in numeric order, gain vs a baseline run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.rundir import DEVICES_FILE
from simulation.cli import cli
from simulation.compare import config_differences
from simulation.report import load_runs, markdown, run_row
from tests.test_compare import _make_run, _table_rows


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """FedAvg and FedPer on the same devices, and FedAvg on another seed's split."""
    root = tmp_path_factory.mktemp("trio")
    small = ("rounds=2", 'model.name="mlp2nn"', "model.hidden=16", "evaluation.finetune_steps=0")
    return {
        "fedavg": _make_run(root / "fedavg", *small),
        "fedper": _make_run(root / "fedper", *small, "client.algorithm=fedper"),
        "seed1": _make_run(root / "seed1", *small, "seed=1"),
    }


def _report(*args: str) -> str:
    result = CliRunner().invoke(cli, ["report", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_report_says_what_each_run_is_and_which_keys_differ(
    trio: dict[str, Path], tmp_path: Path
) -> None:
    text = _report(*(str(p) for p in trio.values()), "--out", str(tmp_path))
    runs = {r[0]: r[1:] for r in _table_rows(text, "run | data")}
    p = "pathological (2 classes/device, seeded), 6 devices"
    assert runs["fedper"] == ["digits", p, "mlp2nn (hidden 16)", "42"]
    assert runs["seed1"][3] == "1"
    diffs = {r[0]: r[1:] for r in _table_rows(text, "key | fedavg")}
    assert diffs == {
        "`client.algorithm`": ["fedavg", "fedper", "fedavg"],
        "`seed`": ["42", "42", "1"],
    }  # not `name`: every run has its own, and it says nothing about what was measured


def test_identical_configs_say_so() -> None:
    same = {"seed": 0, "name": "a", "client": {"lr": 0.1}}
    assert config_differences([same, {**same, "name": "b"}]) == {}
    assert config_differences([same, {"seed": 0, "client": {}}]) == {"client.lr": [0.1, None]}


def test_rounds_are_listed_in_numeric_order(trio: dict[str, Path]) -> None:
    base = run_row(load_runs([trio["fedavg"]])[0])
    text = markdown([{**base, "last_round": n} for n in (30, 5, 50)])
    assert "### Last evaluated round (round 5, 30, 50)" in text


def _served_and_personal(run: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run / DEVICES_FILE).read_text().splitlines()]
    return {int(r["device"]): r for r in rows}


def test_baseline_gain_is_against_the_reference_runs_served_model_on_the_same_devices(
    trio: dict[str, Path], tmp_path: Path
) -> None:
    text = _report(
        str(trio["fedper"]), str(trio["seed1"]), "--baseline", str(trio["fedavg"]),
        "--out", str(tmp_path),
    )  # fmt: skip
    header = next(x for x in text.splitlines() if x.startswith("| run | algorithm"))
    assert header.rstrip(" |").endswith("gain vs fedavg's global (devices)")
    assert "*gain* above is against the run's own global model" in text
    rows = {r[0]: r for r in _table_rows(text, "run | algorithm")}
    # By hand from the two devices.jsonl files: fedper's personalized minus fedavg's served.
    mine, ref = _served_and_personal(trio["fedper"]), _served_and_personal(trio["fedavg"])
    common = [d for d in mine if d in ref and mine[d]["role"] == "train"]
    w = sum(mine[d]["num_test"] for d in common)
    want = sum(
        (mine[d]["personal_acc"] - ref[d]["global_acc"]) * mine[d]["num_test"] for d in common
    )
    assert rows["fedper"][-1] == f"{100 * want / w:+.1f} pp ({len(common)})"
    own_gain = rows["fedper"][8].split(" (")[0]
    assert own_gain != rows["fedper"][-1].split(" (")[0]  # the two gains are different numbers
    # Another seed splits the data differently: device 3 is not the same user there.
    assert rows["seed1"][-1] == "-"
    assert "seed1: no gain vs fedavg: different partition" in text


def test_a_baseline_that_is_not_a_run_is_refused(trio: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(trio["fedper"]), "--baseline", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
