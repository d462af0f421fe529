"""Rollout policies over the real round loop, ClientApp and registry (in-process transport).

A bad candidate is made by devices that send noise from a given round on; the
analysis must catch it at the first step and never move ``serving`` to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from flwr.app import Message

from common.config import ConfigError, load_config
from common.config_rollout import RolloutConfig
from common.data import open_source
from common.protocol import ARRAYS_KEY, CONFIG_KEY, RoundInstructions
from common.records import from_record, to_record
from common.rundir import METRICS_FILE, PARTITION_FILE, REGISTRY_DIR, prepare_run_dir
from server.app import registry_publisher
from server.loop import ServerLoop
from server.registry import Registry
from server.rollout import analyse, assignment_order, on_candidate, share_count
from server.rollout_state import read_state
from tests.inprocess_grid import InProcessGrid
from tests.serving_fixtures import TOKEN, ServerProcess, running_servers

Hook = Callable[[int, Message, Message], Message | None]


# ------------------------------------------------------------------ pure parts
def test_step_shares_are_exact_and_devices_keep_their_assignment() -> None:
    ids = np.setdiff1d(np.arange(1000), [3, 500, 999])  # held-out gaps: any id set
    steps = [0.05, 0.25, 0.5, 1.0]
    order = assignment_order(7, 4, ids)
    sets = [on_candidate(order, s) for s in steps]
    assert [len(s) for s in sets] == [math.ceil(s * ids.size) for s in steps]
    assert all(a < b for a, b in pairwise(sets))  # a device stays on
    assert sets[-1] == {int(i) for i in ids}
    assert on_candidate(assignment_order(7, 4, ids[::-1]), 0.25) == sets[1]  # id order moot
    assert on_candidate(assignment_order(8, 4, ids), 0.25) != sets[1]  # seed matters
    assert share_count(0.05, 10) == 1  # a small step still has a device


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("rollout.steps=[0.5, 0.25, 1.0]", "strictly increasing"),
        ("rollout.steps=[0.25, 0.5]", "last share must be 1.0"),
        ("rollout.steps=[0.0, 1.0]", "every share must be in (0, 1]"),
        ("rollout.window=0", "rollout.window"),
        ('rollout.metric="f1"', "rollout.metric"),
        ('rollout.policy="blue-green"', "rollout.policy"),
    ],
)
def test_impossible_rollout_settings_stop_with_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)
    if "steps" in override:
        assert "rollout.steps" in str(err.value)


def test_analysis_success_condition_and_share_hurt() -> None:
    cfg = RolloutConfig(tolerance=0.05, hurt_margin=0.0, max_share_hurt=0.5)
    serving = {d: (0.8, 0.5) for d in range(4)}
    slightly_worse = {d: (0.77, 0.6) for d in range(4)}
    a = analyse(cfg, slightly_worse, serving, share=0.25, failures=0)
    assert (a.devices, a.share_hurt, a.passed, a.failures) == (4, 1.0, False, 1)
    mixed = {0: (0.9, 0.4), 1: (0.9, 0.4), 2: (0.7, 0.7), 3: (0.8, 0.5)}
    b = analyse(cfg, mixed, serving | {9: (0.1, 3.0)}, share=0.25, failures=1)
    assert (b.devices, b.share_hurt, b.passed, b.failures) == (4, 0.25, True, 1)
    assert b.candidate_acc == pytest.approx(0.825) and b.serving_acc == pytest.approx(0.8)
    loss = analyse(cfg.model_copy(update={"metric": "loss"}), mixed, serving, share=1, failures=0)
    assert loss.passed is True and analyse(cfg, {}, serving, share=1, failures=0).passed is False


# ------------------------------------------------------------- loop, end to end
def _setup(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = load_config(
        None,
        [
            "partition.num_devices=8",
            "strategy.fraction_train=1.0",
            "model.name=logistic",
            "evaluation.finetune_steps=0",
            *overrides,
        ],
    )
    prepare_run_dir(cfg, tmp_path)
    return cfg, open_source(cfg, tmp_path / PARTITION_FILE)


def _run(tmp_path: Path, *overrides: str, hook: Hook | None = None) -> list[dict]:
    cfg, src = _setup(tmp_path, *overrides)
    loop = ServerLoop(InProcessGrid(tmp_path, 2, hook), cfg, tmp_path, src)
    loop.on_version = registry_publisher(
        tmp_path, loop.spec, cfg.rounds, 1, move_serving=cfg.rollout.policy == "immediate"
    )
    loop.run()
    return [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]


def _round_of(msg: Message) -> int:
    return RoundInstructions.from_record_fields(msg.content[CONFIG_KEY]).round


def noise_from(first_bad: int) -> Hook:
    """Devices send large noise instead of their update from round ``first_bad`` on."""

    def tamper(node: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type != "train" or reply.has_error():
            return None
        if _round_of(msg) < first_bad:
            return None
        arrays = from_record(reply.content[ARRAYS_KEY])
        rng = np.random.default_rng(node)
        bad = {k: (rng.normal(size=v.shape) * 10).astype(v.dtype) for k, v in arrays.items()}
        reply.content[ARRAYS_KEY] = to_record(bad)
        return None

    return tamper


def test_failing_canary_rolls_back_and_never_serves_it_to_all(tmp_path: Path) -> None:
    rows = _run(
        tmp_path,
        "rounds=4",
        'rollout.policy="canary"',
        "rollout.steps=[0.25, 1.0]",
        "rollout.window=1",
        hook=noise_from(2),
    )
    reg = Registry(tmp_path / REGISTRY_DIR)
    events = reg.events()
    rejects = [e for e in events if e.kind == "reject"]
    assert rejects, [e.model_dump() for e in events]
    rejected = {e.from_version for e in rejects}
    for e in rejects:
        assert e.actor == "policy:canary" and e.analysis is not None
        assert not e.analysis.passed and e.analysis.share == 0.25 and e.analysis.devices == 2
        assert e.analysis.candidate_acc < e.analysis.serving_acc
        assert e.to_version == reg.resolve_alias("serving")  # devices back to the last good
    serving_moves = [e.to_version for e in events if e.alias == "serving" and e.kind == "move"]
    assert not rejected & set(serving_moves)
    assert reg.resolve_alias("serving") in (0, 1) and reg.resolve_alias("latest") == 4
    for r in rows:
        s = r["serving"]
        served = {c["version"]: c["devices"] for c in s["served_versions"]}
        assert sum(served.values()) == 8
        if s.get("candidate_version") in rejected:  # only the first step ever got it
            assert served.get(s["candidate_version"], 0) <= 2 and s["decision"] == "abort"
        assert "served_acc" in s and s["served_acc"]["mean"] >= 0
    state = read_state(tmp_path / REGISTRY_DIR)
    assert state is not None and set(state.rejected) == rejected


def test_shadow_measures_the_candidate_but_never_serves_it(tmp_path: Path) -> None:
    rows = _run(
        tmp_path,
        "rounds=4",
        'rollout.policy="shadow"',
        "rollout.steps=[0.5, 1.0]",
        "rollout.window=1",
        "rollout.tolerance=1.0",
        "rollout.max_share_hurt=1.0",
    )
    measured = [r["serving"] for r in rows if r["serving"].get("candidate_version") is not None]
    assert measured and all(s["analysis"]["devices"] > 0 for s in measured)
    for s in measured:
        assert s["candidate_share"] == 0.0
        assert [c["version"] for c in s["served_versions"]] == [s["serving_version"]]
    promotions = [
        e for e in Registry(tmp_path / REGISTRY_DIR).events() if e.actor == "policy:shadow"
    ]
    assert promotions and all(e.kind == "move" for e in promotions)


@pytest.fixture
def model_server() -> Iterator[Callable[..., ServerProcess]]:
    with running_servers() as start:
        yield start


def test_a_human_rollback_during_a_canary_is_recorded_and_wins(
    tmp_path: Path, model_server: Callable[..., ServerProcess]
) -> None:
    (tmp_path / REGISTRY_DIR).mkdir(parents=True)
    server = model_server(tmp_path, token=TOKEN)
    answers: list[httpx.Response] = []

    def operator(node: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type == "train" and _round_of(msg) == 3 and not answers:
            answers.append(
                httpx.put(
                    f"{server.url}/v1/models/global/aliases/serving",
                    json={"version": 0, "reason": "operator: back to v0"},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=10,
                )
            )
        return None

    rows = _run(
        tmp_path,
        "rounds=5",
        'rollout.policy="canary"',
        "rollout.steps=[0.25, 0.5, 1.0]",
        "rollout.window=2",
        "rollout.tolerance=1.0",  # every measurement passes: only the human stops it
        "rollout.max_share_hurt=1.0",
        hook=operator,
    )
    assert answers and answers[0].status_code == 200, answers[0].text
    decisions = [r["serving"].get("decision") for r in rows]
    assert decisions[0] == "start" and decisions[2] == "cancel"
    assert all(d is None for d in decisions[3:])  # held: nothing new started
    assert [r["serving"]["serving_version"] for r in rows[2:]] == [0, 0, 0]
    assert all(len(r["serving"]["served_versions"]) == 1 for r in rows[2:])
    events = httpx.get(f"{server.url}/v1/models/global/events?alias=serving").json()["items"]
    human = [e for e in events if e["actor"] == "human"]
    assert len(human) == 1 and human[0]["reason"] == "operator: back to v0"
    assert not [e for e in events if e["seq"] > human[0]["seq"] and e["kind"] == "move"]
    assert Registry(tmp_path / REGISTRY_DIR).resolve_alias("serving") == 0
    answer = httpx.get(f"{server.url}/v1/models/global/rollout")
    assert answer.status_code == 404 and "held: a human pinned serving" in answer.json()["detail"]


def test_immediate_keeps_the_metrics_rows_byte_for_byte(tmp_path: Path) -> None:
    """The default and an explicit ``immediate`` (other rollout knobs changed) write the
    same bytes, without the serving-plane fields; ``serving`` follows ``latest``."""
    a, b = tmp_path / "default", tmp_path / "immediate"
    _run(a, "rounds=2")
    _run(b, "rounds=2", 'rollout.policy="immediate"', "rollout.steps=[0.5, 1.0]")
    assert (a / METRICS_FILE).read_bytes() == (b / METRICS_FILE).read_bytes()
    assert b"serving" not in (a / METRICS_FILE).read_bytes()
    assert Registry(b / REGISTRY_DIR).resolve_alias("serving") == 2
    assert read_state(b / REGISTRY_DIR) is None


def test_lr_spike_scenario_changes_that_round_only() -> None:
    from common.protocol import task_for

    cfg = load_config(None, ["scenario.lr_spike_round=3", "scenario.lr_spike_factor=20"])
    lrs = [task_for(cfg, r, "{}", "").client.lr for r in (2, 3, 4)]
    assert lrs == [cfg.client.lr, cfg.client.lr * 20, cfg.client.lr]
    assert task_for(load_config(None), 0, "{}", "").client == load_config(None).client


# ------------------------------------------------------------ monitoring, drift
def test_drop_detector_fires_once_per_lasting_drop() -> None:
    from server.monitor import DropDetector

    d = DropDetector(window=2, drop=0.15)
    fired = [d.update(v) for v in [0.5, 0.7, 0.8, 0.8, 0.6, 0.5, 0.5, 0.5, 0.2, 0.25]]
    hits = [(i, round(f[0], 3), round(f[1], 3)) for i, f in enumerate(fired) if f]
    assert hits == [(5, 0.55, 0.8), (8, 0.35, 0.55)]  # the baseline restarts after each


def test_monitor_needs_a_policy() -> None:
    with pytest.raises(ConfigError, match=r"rollout\.monitor_window"):
        load_config(None, ["rollout.monitor_window=2"])


def test_drift_is_seeded_per_device_and_changes_labels_from_its_round() -> None:
    from client.algorithms.loop import DeviceData
    from client.drift import with_drift
    from common.drift import DriftSpec, is_drifted
    from common.protocol import task_for

    spec = DriftSpec(from_round=3, share=0.5, seed=1)
    drifted = [d for d in range(2000) if is_drifted(spec, d)]
    assert 900 < len(drifted) < 1100 and drifted == [d for d in range(2000) if is_drifted(spec, d)]
    cfg = load_config(None, ["scenario.drift_round=3", "scenario.drift_share=0.5", "seed=1"])
    y = torch.arange(10)
    data = DeviceData(torch.zeros(10, 1), y, torch.zeros(10, 1), y)
    spec_json = json.dumps({"num_classes": 10})
    before, after = task_for(cfg, 2, spec_json, ""), task_for(cfg, 3, spec_json, "")
    assert before.drift is None and after.drift == spec
    moved = with_drift(data, after, drifted[0])
    assert moved.y_test.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert with_drift(data, before, drifted[0]) is data
    kept = next(d for d in range(100) if not is_drifted(spec, d))
    assert with_drift(data, after, kept) is data


def test_drift_under_a_canary_is_detected_and_recorded(tmp_path: Path) -> None:
    rows = _run(
        tmp_path,
        "rounds=4",
        "seed=3",
        'rollout.policy="canary"',
        "rollout.steps=[0.5, 1.0]",
        "rollout.monitor_window=1",
        "rollout.monitor_drop=0.05",
        "scenario.drift_round=3",
        "scenario.drift_share=1.0",
    )
    alerts = [e for e in Registry(tmp_path / REGISTRY_DIR).events() if e.kind == "alert"]
    assert alerts and alerts[0].actor == "monitor" and alerts[0].round == 3
    assert [r["serving"].get("alert") for r in rows][2] == "alert"
    assert all(r["serving"].get("alert") is None for r in rows[:2])
