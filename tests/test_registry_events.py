"""The registry's event history: every alias move logged, crash-safe, served over HTTP."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.rundir import REGISTRY_DIR
from server.registry import Analysis, Registry
from server.registry_events import EVENTS_FILE
from server.rollout_state import RolloutState, write_state
from simulation.history import history_text
from tests.serving_fixtures import (
    SPEC,
    TOKEN,
    ServerProcess,
    model_arrays,
    publish_and_kill,
    publish_many,
    running_servers,
)

API = "/v1/models/global"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "run" / REGISTRY_DIR)


def _file_state(reg: Registry, alias: str) -> dict:
    return json.loads((reg.aliases_dir / alias).read_text())


def assert_alias_agrees_with_log(reg: Registry) -> None:
    """Each alias (as readers see it) is the target of its last logged move."""
    for alias in ("latest", "serving"):
        moves = [e for e in reg.events() if e.alias == alias and e.kind == "move"]
        state = reg.alias(alias)
        assert state is not None and moves
        assert (state.version, state.pinned, state.event_seq) == (
            moves[-1].to_version,
            moves[-1].pinned,
            moves[-1].seq,
        )


def test_publish_and_human_moves_are_events(registry: Registry) -> None:
    publish_many(registry, 3)
    registry.set_alias("serving", 1, actor="human", reason="rollback: v2 hurts users", round=7)
    analysis = Analysis(
        devices=4,
        candidate_acc=0.5,
        serving_acc=0.8,
        candidate_loss=1.0,
        serving_loss=0.5,
        share_hurt=1.0,
        passed=False,
        share=0.25,
    )
    registry.record(
        "reject", "serving", 1, from_version=2, actor="policy:canary", analysis=analysis
    )

    events = registry.events()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    moves = [(e.alias, e.from_version, e.to_version, e.actor) for e in events]
    assert moves[:2] == [("latest", None, 0, "publish"), ("serving", None, 0, "publish")]
    assert moves[-3:] == [
        ("serving", 1, 2, "publish"),
        ("serving", 2, 1, "human"),
        ("serving", 2, 1, "policy:canary"),
    ]
    human = events[-2]
    assert human.pinned and human.round == 7 and human.reason == "rollback: v2 hurts users"
    assert events[-1].kind == "reject" and events[-1].analysis == analysis
    assert_alias_agrees_with_log(registry)
    # A pinned serving no longer follows: the publish logs 'latest' only.
    registry.publish(model_arrays(9), round=9, model=SPEC)
    assert [(e.alias, e.to_version) for e in registry.events()[-1:]] == [("latest", 3)]
    assert registry.resolve_alias("serving") == 1
    # The history as the CLI prints it.
    text = history_text(registry.root.parent)
    assert "serving v2 -> v1" in text and "by human (pinned): rollback: v2 hurts users" in text
    assert "rejected v2, devices back to v1" in text and "candidate 0.500 vs serving 0.800" in text


def test_publish_without_moving_serving_leaves_it_to_the_policy(registry: Registry) -> None:
    registry.publish(model_arrays(0), round=0, model=SPEC, move_serving=False)
    registry.publish(model_arrays(1), round=1, model=SPEC, move_serving=False)
    assert registry.resolve_alias("serving") == 0 and registry.resolve_alias("latest") == 1
    assert [e.alias for e in registry.events()] == ["latest", "serving", "latest"]


def _set_alias_until(root: str, stage: str, conn: multiprocessing.connection.Connection) -> None:
    """Child: move serving to version 0, stopping at ``stage`` to be killed there."""
    import time

    import server.registry as registry_module

    def hook(reached: str) -> None:
        if reached == stage:
            conn.send("paused")
            time.sleep(60)

    registry_module._checkpoint = hook
    registry_module.Registry(Path(root)).set_alias("serving", 0, reason="killed mid-move")
    conn.send("finished")


def _kill_at(root: Path, stage: str, target: Callable[..., None]) -> None:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(str(root), stage, child))
    proc.start()
    try:
        assert parent.poll(30), f"writer never reached {stage}"
        assert parent.recv() == "paused"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(10)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["event-appended", "alias-temp-written", "alias-committed"])
def test_kill_9_during_an_alias_move_leaves_alias_and_log_agreeing(
    registry: Registry, stage: str
) -> None:
    publish_many(registry, 2)
    _kill_at(registry.root, stage, _set_alias_until)

    reader = Registry(registry.root)  # a fresh process's view, before any repair
    last = reader.events()[-1]
    assert (last.alias, last.to_version, last.reason) == ("serving", 0, "killed mid-move")
    assert reader.resolve_alias("serving") == 0  # the logged move is the commit point
    assert_alias_agrees_with_log(reader)
    behind = _file_state(reader, "serving").get("event_seq") != last.seq
    assert behind == (stage != "alias-committed")

    reader.set_alias("serving", 1, reason="after the crash")  # the next writer repairs
    assert_alias_agrees_with_log(Registry(registry.root))
    assert [e.seq for e in reader.events()] == list(range(1, len(reader.events()) + 1))


@pytest.mark.parametrize("stage", ["blob-temp-written", "manifest-committed"])
def test_kill_9_during_a_publish_keeps_alias_and_log_agreeing(
    registry: Registry, stage: str
) -> None:
    publish_many(registry, 2)
    publish_and_kill(registry.root, stage)
    reader = Registry(registry.root)
    assert_alias_agrees_with_log(reader)
    reader.publish(model_arrays(5), round=5, model=SPEC)
    assert_alias_agrees_with_log(reader)
    assert reader.resolve_alias("serving") == reader.version_numbers()[-1]


def test_torn_last_event_is_ignored_then_cut(registry: Registry) -> None:
    publish_many(registry, 2)
    log_path = registry.root / EVENTS_FILE
    whole = log_path.read_bytes()
    n = len(registry.events())
    with open(log_path, "ab") as f:
        f.write(b'{"seq": 99, "time": "2026-01-01T00:00:00Z", "alias": "serving", "to_ver')

    reader = Registry(registry.root)
    assert len(reader.events()) == n and reader.resolve_alias("serving") == 1
    reader.set_alias("serving", 0)
    assert log_path.read_bytes().startswith(whole)
    assert [e.seq for e in Registry(registry.root).events()] == list(range(1, n + 2))
    assert_alias_agrees_with_log(reader)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    with running_servers() as start:
        yield start


def test_http_history_matches_the_files_and_metrics(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    run_dir = tmp_path / "run"
    reg = Registry(run_dir / REGISTRY_DIR)
    publish_many(reg, 3)
    server = server_factory(run_dir, token=TOKEN)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get(f"{API}/rollout").status_code == 404
        assert "no rollout is active" in c.get(f"{API}/rollout").json()["detail"]
        put = c.put(
            f"{API}/aliases/serving",
            json={"version": 0, "reason": "operator rollback"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert put.status_code == 200, put.text
        pages, offset = [], 0
        while offset is not None:
            page = c.get(f"{API}/events", params={"offset": offset, "limit": 2}).json()
            pages += page["items"]
            offset = page["next_offset"]
        lines = [json.loads(line) for line in (reg.root / EVENTS_FILE).read_text().splitlines()]
        assert pages == json.loads(
            json.dumps([e.model_dump(mode="json") for e in Registry(reg.root).events()])
        )
        assert [p["seq"] for p in pages] == [line["seq"] for line in lines]
        assert pages[-1]["actor"] == "human" and pages[-1]["reason"] == "operator rollback"
        serving = c.get(f"{API}/events", params={"alias": "serving"}).json()
        assert serving["total"] == 4 and {e["alias"] for e in serving["items"]} == {"serving"}
        assert c.get(f"{API}/events", params={"alias": "nope"}).status_code == 422

        state = RolloutState(
            policy="canary",
            phase="analysing",
            serving_version=0,
            candidate_version=2,
            steps=[0.1, 0.5, 1.0],
            step=1,
            share=0.5,
            serves_candidate=True,
        )
        write_state(reg.root, state)
        got = c.get(f"{API}/rollout")
        assert got.status_code == 200 and RolloutState.model_validate(got.json()) == state
        gauges = {
            (s.name, tuple(s.labels.items())): s.value
            for fam in text_string_to_metric_families(c.get("/metrics").text)
            for s in fam.samples
        }
        assert gauges[("hybridfl_serving_version", ())] == 0
        assert gauges[("hybridfl_rollout_candidate_version", ())] == 2
        assert gauges[("hybridfl_rollout_candidate_share", ())] == 0.5
