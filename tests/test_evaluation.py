"""The evaluation protocol: served, personalized and fine-tuned model per device, held-out
devices that never train, per-device results, labelled summaries, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from client.algorithms import get_algorithm
from client.algorithms.loop import DeviceData
from client.measure import evaluate_models, finetune
from common.config import ConfigError, ExperimentConfig, load_config, validate_config
from common.data import device_arrays, load_dataset, load_partition, open_source
from common.models import ModelSpec, build_model
from common.protocol import CONFIG_KEY, RoundInstructions
from common.rows import RoundRow, read_rows
from common.rundir import (
    DEVICES_FILE,
    METRICS_FILE,
    PARTITION_FILE,
    PARTITION_STATS_FILE,
    STATE_DIR,
    prepare_run_dir,
    read_jsonl,
)
from common.seeding import torch_generator
from common.weights import model_to_arrays
from server.device_summary import holdout_devices
from server.loop import ServerLoop
from server.summary import LAST_LABEL, summarize
from tests.conftest import accuracy, model_from
from tests.inprocess_grid import InProcessGrid
from tests.tasks import make_task

BASE = [
    "rounds=3",
    "partition.num_devices=8",
    "strategy.fraction_train=0.5",
    "model.name=logistic",
]


def _run(
    run_dir: Path, *overrides: str
) -> tuple[ExperimentConfig, ServerLoop, InProcessGrid, list[dict[str, Any]]]:
    cfg = load_config(None, [*BASE, *overrides])
    prepare_run_dir(cfg, run_dir)
    grid = InProcessGrid(run_dir, 3)
    loop = ServerLoop(grid, cfg, run_dir, open_source(cfg, run_dir / PARTITION_FILE))
    loop.run()
    rows: list[dict[str, Any]] = read_jsonl(run_dir / METRICS_FILE)  # type: ignore[assignment]
    return cfg, loop, grid, rows


def _targets(grid: InProcessGrid, kind: str) -> dict[int, set[int]]:
    """message type -> {round: devices it was sent to}."""
    out: dict[int, set[int]] = {}
    for m in grid.sent:
        if m.metadata.message_type == kind:
            rnd = int(m.metadata.group_id)
            task = RoundInstructions.from_record_fields(m.content[CONFIG_KEY])
            out.setdefault(rnd, set()).update(task.devices)
    return out


def _device_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / DEVICES_FILE).read_text().splitlines()]


def test_holdout_devices_never_train_and_are_always_evaluated(tmp_path: Path) -> None:
    cfg, loop, grid, rows = _run(
        tmp_path, "evaluation.holdout_fraction=0.25", "strategy.fraction_train=1.0"
    )
    held = set(holdout_devices(cfg))
    assert len(held) == 2 and held == set(loop.population.holdout().tolist())
    trained = _targets(grid, "train")
    assert sorted(trained) == [1, 2, 3]
    for devices in trained.values():
        assert devices == set(range(8)) - held  # fraction 1.0: every other device, never these
    evaluated = _targets(grid, "evaluate")
    for devices in evaluated.values():
        assert held <= devices
    for row in rows:
        assert row["holdout"]["num_devices"] == 2
        assert row["devices"]["num_devices"] == 6
        assert set(row["holdout"]) >= {"global_acc", "finetuned_acc", "finetune_gain"}
        assert "personal_acc" not in row["holdout"]
    # A held-out device never wrote personal state.
    for d in held:
        assert not (tmp_path / STATE_DIR / f"device-{d:06d}.safetensors").exists()


def test_holdout_choice_is_seeded() -> None:
    def pick(seed: int) -> list[int]:
        cfg = validate_config(
            {
                "seed": seed,
                "partition": {"num_devices": 50},
                "evaluation": {"holdout_fraction": 0.2},
            }
        )
        return holdout_devices(cfg).tolist()

    assert pick(3) == pick(3) and len(pick(3)) == 10
    assert pick(3) != pick(4)


def test_devices_jsonl_one_sorted_line_per_device_with_roles(tmp_path: Path) -> None:
    cfg, loop, _, rows = _run(tmp_path, "evaluation.holdout_fraction=0.25")
    lines = _device_lines(tmp_path)
    assert [x["device"] for x in lines] == list(range(8))
    held = set(holdout_devices(cfg))
    stats = json.loads((tmp_path / PARTITION_STATS_FILE).read_text())["devices"]
    ds = load_dataset(cfg.data)
    partition = load_partition(tmp_path / PARTITION_FILE)
    spec = loop.spec.model_dump()
    final = model_from(loop.global_arrays, spec)
    for x in lines:
        assert x["round"] == 3
        assert x["role"] == ("holdout" if x["device"] in held else "train")
        # Recomputed here: the final global model, and the device's own state file
        # (FedAvg keeps its whole trained copy), on the device's test split.
        _, _, x_test, y_test = device_arrays(ds, partition, x["device"])
        assert x["global_acc"] == accuracy(final, x_test, y_test)
        state = tmp_path / STATE_DIR / f"device-{x['device']:06d}.safetensors"
        assert x["personalized"] == state.exists()
        if state.exists():
            assert x["personal_acc"] == accuracy(model_from(load_file(state), spec), x_test, y_test)
        # The fine-tuned model was scored on the same examples: a whole number of them.
        assert x["finetuned_acc"] * x["num_test"] == pytest.approx(
            round(x["finetuned_acc"] * x["num_test"]), abs=1e-9
        )
        assert x["finetune_gain"] == pytest.approx(x["finetuned_acc"] - x["global_acc"])
        if x["role"] == "train":
            assert x["gain"] == pytest.approx(x["personal_acc"] - x["global_acc"])
        else:
            assert x["personal_acc"] is None and x["gain"] is None and not x["personalized"]
        # All three models were scored on the device's whole test split.
        assert x["num_test"] == stats[x["device"]]["num_test"]
    # The summary of the last row is the summary of these lines.
    train = [x for x in lines if x["role"] == "train"]
    n = np.array([x["num_test"] for x in train], dtype=float)
    g = np.array([x["global_acc"] for x in train])
    assert rows[-1]["devices"]["global_acc"]["weighted_mean"] == pytest.approx(
        float((g * n).sum() / n.sum())
    )
    assert [r.model_dump() for r in loop.last_device_rows] == [
        {k: v for k, v in x.items() if k != "round"} for x in lines
    ]


def test_all_versus_participants(tmp_path: Path) -> None:
    cfg, _, grid, rows = _run(
        tmp_path / "p", "evaluation.devices=participants", "evaluation.holdout_fraction=0.25"
    )
    held = set(holdout_devices(cfg))
    trained, evaluated = _targets(grid, "train"), _targets(grid, "evaluate")
    for rnd, row in zip((1, 2, 3), rows, strict=True):
        assert row["devices"]["num_devices"] == len(trained[rnd]) == 3
        assert evaluated[rnd] == trained[rnd] | held
        assert row["holdout"]["num_devices"] == 2
    _, _, grid_all, rows_all = _run(tmp_path / "a", "evaluation.holdout_fraction=0.25")
    assert all(r["devices"]["num_devices"] == 6 for r in rows_all)
    assert all(d == set(range(8)) for d in _targets(grid_all, "evaluate").values())
    # After round 1 only 3 devices have trained; the others' personal model is the served one.
    assert rows_all[0]["devices"]["num_personalized"] == 3


def test_finetune_scores_the_same_examples_and_takes_exact_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    data = DeviceData(
        torch.randn(23, 1, 8, 8),
        torch.randint(0, 10, (23,)),
        torch.randn(9, 1, 8, 8),
        torch.arange(9),
    )
    spec = ModelSpec(name="logistic", input_shape=(1, 8, 8), num_classes=10)
    model = build_model(spec, seed=1)
    arrays = model_to_arrays(model)
    before = {k: v.copy() for k, v in arrays.items()}
    instr = make_task("fedavg", spec, batch_size=5, evaluation={"finetune_steps": 7})
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    import client.measure as ce

    real = ce.evaluate

    def spy(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> tuple[float, float]:
        seen.append((x, y))
        return real(m, x, y, bs)

    monkeypatch.setattr(ce, "evaluate", spy)
    out = evaluate_models(
        model, get_algorithm("fedavg"), arrays, None, data, instr, torch_generator(0, "eval", 1)
    )
    assert len(seen) == 3  # global, personalized, fine-tuned
    assert all(x is data.x_test and y is data.y_test for x, y in seen)
    assert out["finetune_steps"] == 7  # 5 batches per epoch: one epoch + 2 steps
    assert out["num_test"] == 9
    # The served arrays are untouched (the fine-tune worked on the scratch model).
    for k, v in before.items():
        np.testing.assert_array_equal(arrays[k], v)

    for steps in (1, 4, 5, 6, 12):
        m = build_model(spec, seed=1)
        e = instr.evaluation.model_copy(update={"finetune_steps": steps})
        s = instr.model_copy(update={"evaluation": e})
        assert finetune(m, data, s, torch_generator(0, "eval", 1))[1] == steps


def test_finetune_is_seeded_and_respects_lr() -> None:
    data = DeviceData(
        torch.randn(30, 1, 8, 8),
        torch.randint(0, 10, (30,)),
        torch.randn(5, 1, 8, 8),
        torch.arange(5),
    )
    spec = ModelSpec(name="logistic", input_shape=(1, 8, 8), num_classes=10)
    instr = make_task("fedavg", spec, round_=2, seed=4, evaluation={"finetune_steps": 3})

    def tuned(i: RoundInstructions, device: int) -> dict[str, np.ndarray]:
        m = build_model(spec, seed=1)
        finetune(m, data, i, torch_generator(i.seed, "eval", i.round, device))
        return model_to_arrays(m)

    a, b, c = tuned(instr, 0), tuned(instr, 0), tuned(instr, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    e = instr.evaluation.model_copy(update={"finetune_lr": 1e-12})
    tiny = tuned(instr.model_copy(update={"evaluation": e}), 0)
    init = model_to_arrays(build_model(spec, seed=1))
    assert all(np.allclose(tiny[k], init[k], atol=1e-9) for k in init)


def test_evaluation_never_changes_state_or_training(tmp_path: Path) -> None:
    _, loop, _, rows = _run(tmp_path / "every", "evaluation.every=1")
    state_dir = tmp_path / "every" / STATE_DIR
    snapshot = {p.name: p.read_bytes() for p in sorted(state_dir.glob("*.safetensors"))}
    assert snapshot
    loop.evaluator.run(4, list(range(8)), loop.global_arrays)  # one more, every device
    assert {p.name: p.read_bytes() for p in sorted(state_dir.glob("*.safetensors"))} == snapshot
    # A run that evaluates only at the end trains exactly the same.
    _, loop_end, _, rows_end = _run(tmp_path / "end", "evaluation.every=100")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in rows_end]
    for k, v in loop.global_arrays.items():
        np.testing.assert_array_equal(v, loop_end.global_arrays[k])
    end_dir = tmp_path / "end" / STATE_DIR
    assert {p.name: p.read_bytes() for p in sorted(end_dir.glob("*.safetensors"))} == snapshot
    assert [r.get("evaluated", False) for r in rows_end] == [False, False, True]


def test_metrics_are_byte_identical_across_runs(tmp_path: Path) -> None:
    extra = ("evaluation.holdout_fraction=0.25", 'model.name="mlp2nn"', "client.algorithm=fedper")
    _run(tmp_path / "a", *extra)
    _run(tmp_path / "b", *extra)
    for name in (METRICS_FILE, DEVICES_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_finetune_steps_zero_reports_no_finetuned(tmp_path: Path) -> None:
    _, _, _, rows = _run(tmp_path, "evaluation.finetune_steps=0", "rounds=1")
    assert "finetuned_acc" not in rows[0]["devices"]
    assert all(x["finetuned_acc"] is None for x in _device_lines(tmp_path))


def test_instructions_carry_the_finetune_settings(tmp_path: Path) -> None:
    cfg = load_config(None, [*BASE, "evaluation.finetune_steps=9", "evaluation.finetune_lr=0.5"])
    prepare_run_dir(cfg, tmp_path)
    src = open_source(cfg, tmp_path / PARTITION_FILE)
    loop = ServerLoop(InProcessGrid(tmp_path, 8), cfg, tmp_path, src)
    fields = loop.task(2, [0, 1]).to_record_fields()
    task = RoundInstructions.from_record_fields(fields)
    assert task.evaluation.finetune_steps == 9 and task.evaluation.finetune_lr == 0.5


def test_summary_labels_last_and_best(tmp_path: Path) -> None:
    _, _, _, rows = _run(tmp_path, "evaluation.holdout_fraction=0.25")
    s = summarize(read_rows(tmp_path / METRICS_FILE))
    assert s["last"]["round"] == 3 and s["last"]["label"] == LAST_LABEL
    for key in ("best_global", "best_personal", "best_finetuned", "best_holdout_finetuned"):
        assert "best round" in s[key]["label"] and "flatters" in s[key]["label"]
    best = max(rows, key=lambda r: r["global_test_acc"])
    assert s["best_global"]["global_test_acc"] == best["global_test_acc"]
    last = s["last"]
    # The last evaluation's per-device lines, weighted by test examples, computed here.
    lines = _device_lines(tmp_path)
    for key, role, col in (
        ("device_global_acc", "train", "global_acc"),
        ("device_personal_acc", "train", "personal_acc"),
        ("device_finetuned_acc", "train", "finetuned_acc"),
        ("holdout_global_acc", "holdout", "global_acc"),
        ("holdout_finetuned_acc", "holdout", "finetuned_acc"),
    ):
        mine = [x for x in lines if x["role"] == role]
        n = sum(x["num_test"] for x in mine)
        assert mine and last[key] == pytest.approx(sum(x[col] * x["num_test"] for x in mine) / n)
    assert s["bytes_up"] > 0 and s["bytes_down"] > 0 and s["bytes_up_per_update"] > 0


def test_summary_best_is_the_earliest_maximum() -> None:
    base = {"num_sampled": 1, "num_updates": 1, "num_failed": 0, "num_rejected": 0}
    base |= {"bytes_up": 1.0, "bytes_down": 1.0, "evaluated": True}
    rows = [
        RoundRow.model_validate({**base, "round": r, "global_test_acc": a})
        for r, a in ((1, 0.5), (2, 0.7), (3, 0.7), (4, 0.6))
    ]
    s = summarize(rows)
    assert s["best_global"]["round"] == 2 and s["last"]["round"] == 4
    assert "best_personal" not in s


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"evaluation": {"holdout_fraction": 1.0}}, r"evaluation\.holdout_fraction"),
        ({"evaluation": {"holdout_fraction": -0.1}}, r"evaluation\.holdout_fraction"),
        (
            {
                "partition": {"num_devices": 4},
                "strategy": {"min_train_devices": 3},
                "evaluation": {"holdout_fraction": 0.5},
            },
            r"evaluation\.holdout_fraction.*strategy\.min_train_devices",
        ),
        (
            {"partition": {"num_devices": 1}, "evaluation": {"holdout_fraction": 0.1}},
            r"leaving 0 to train",
        ),
        ({"evaluation": {"finetune_steps": -1}}, r"evaluation\.finetune_steps"),
        ({"evaluation": {"finetune_steps": "five"}}, r"evaluation\.finetune_steps"),
        ({"evaluation": {"finetune_lr": -0.1}}, r"evaluation\.finetune_lr"),
        ({"evaluation": {"devices": "some"}}, r"evaluation\.devices"),
    ],
)
def test_bad_evaluation_config(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_config(raw)


def test_holdout_count() -> None:
    cfg = validate_config(
        {"partition": {"num_devices": 20}, "evaluation": {"holdout_fraction": 0.2}}
    )
    assert cfg.evaluation.num_holdout(20) == 4
    assert cfg.evaluation.num_holdout(3) == 1  # a positive fraction holds out at least one
    assert validate_config({}).evaluation.num_holdout(20) == 0
