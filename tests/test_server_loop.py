"""The server's round loop over the real ClientApp (in-process transport).

Bad updates are rejected with a reason and never aggregated; the population comes
from the partition without any message; cohorts and pre-aggregation give the same
model as one device per message; every knob a user sets is what devices train with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict

from client.algorithms import ALGORITHMS as DEVICE_ALGORITHMS
from common.config import AlgorithmName, ClientConfig, ConfigError, StrategyName, load_config
from common.data import open_source
from common.personalization import ALGORITHMS
from common.protocol import ARRAYS_KEY, CONFIG_KEY, REPORT_KEY, CohortReply, RoundInstructions
from common.records import from_record, to_record
from common.rundir import METRICS_FILE, PARTITION_FILE, prepare_run_dir
from server.aggregation import STRATEGIES, AggregationError
from server.loop import RunFailed, ServerLoop
from server.population import PopulationError
from tests.inprocess_grid import InProcessGrid

Edit = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray] | str | None]


def _setup(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    cfg = load_config(
        None,
        [
            "rounds=2",
            "partition.num_devices=4",
            "strategy.fraction_train=1.0",
            "model.name=logistic",
            *overrides,
        ],
    )
    prepare_run_dir(cfg, tmp_path)
    return cfg, open_source(cfg, tmp_path / PARTITION_FILE)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]


def edit_train(edit: Edit):  # type: ignore[no-untyped-def]
    """A tamper hook that rewrites chosen devices' updates inside a cohort reply
    (an ``edit`` returning a string turns that device into a failure)."""

    def tamper(node: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type != "train" or reply.has_error():
            return None
        body = CohortReply.from_record_fields(reply.content[REPORT_KEY])
        arrays = from_record(reply.content[ARRAYS_KEY])
        rows, reports, failures = [], [], list(body.failures)
        for i, r in enumerate(body.train):
            row = {k: v[i] for k, v in arrays.items()}
            new = edit(r.device, row)
            if isinstance(new, str):
                failures.append({"device": r.device, "reason": new})  # type: ignore[arg-type]
                continue
            rows.append(row if new is None else new)
            reports.append(r)
        stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
        new_body = CohortReply.model_validate(
            {**body.model_dump(), "train": [r.model_dump() for r in reports], "failures": failures}
        )
        content = RecordDict(
            {ARRAYS_KEY: to_record(stacked), REPORT_KEY: ConfigRecord(new_body.to_record_fields())}
        )
        return Message(content, reply_to=msg)

    return tamper


def test_bad_updates_are_rejected_and_never_aggregated(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path)
    good: dict[int, dict[str, np.ndarray]] = {}

    def edit(device: int, a: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
        if device == 1:
            return {k: np.full_like(v, np.nan) for k, v in a.items()}
        if device == 2:
            return {k: np.zeros((3, *v.shape), v.dtype) for k, v in a.items()}
        if device == 3:
            return "device 3 ran out of battery"
        good[len(good)] = {k: v.copy() for k, v in a.items()}
        return None

    loop = ServerLoop(InProcessGrid(tmp_path, 2, edit_train(edit)), cfg, tmp_path, src)
    final = loop.run()
    for row in _rows(tmp_path):
        assert row["num_updates"] == 1 and row["num_rejected"] == 2 and row["num_failed"] == 1
        reasons = {r["device"]: r["reason"] for r in row["rejected"]}
        assert "NaN" in reasons[1] and "shape" in reasons[2]
        assert row["failed"] == [{"device": 3, "reason": "device 3 ran out of battery"}]
    # FedAvg over the single valid update is that update: the bad ones had no weight.
    for k, v in good[1].items():
        np.testing.assert_array_equal(final[k], v)


def test_inflated_example_count_is_rejected(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path)

    def tamper(node: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type != "train":
            return None
        body = CohortReply.from_record_fields(reply.content[REPORT_KEY])
        train = [
            r.model_copy(update={"num_examples": 10**6}) if r.device == 0 else r for r in body.train
        ]
        new = body.model_copy(update={"train": train})
        content = RecordDict(
            {
                ARRAYS_KEY: reply.content[ARRAYS_KEY],
                REPORT_KEY: ConfigRecord(new.to_record_fields()),
            }
        )
        return Message(content, reply_to=msg)

    ServerLoop(InProcessGrid(tmp_path, 2, tamper), cfg, tmp_path, src).run()
    row = _rows(tmp_path)[0]
    assert row["num_updates"] == 3
    known = len(src.partition.train_idx[0])  # type: ignore[attr-defined]
    reason = f"reported 1000000 training examples; the server knows {known} for this device"
    assert row["rejected"] == [{"device": 0, "reason": reason}]


def test_round_without_usable_updates_fails_the_run(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path)
    grid = InProcessGrid(
        tmp_path, 2, edit_train(lambda d, a: {k: v * np.inf for k, v in a.items()})
    )
    with pytest.raises(RunFailed, match=r"round 1: 0 usable updates.*NaN or Inf"):
        ServerLoop(grid, cfg, tmp_path, src).run()


def test_population_comes_from_the_partition_without_messages(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path, "partition.num_devices=10", "strategy.fraction_train=0.5")
    grid = InProcessGrid(tmp_path, 3)
    loop = ServerLoop(grid, cfg, tmp_path, src)
    assert loop.population.size == 10
    loop.run()
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {"train", "evaluate"}  # no hello round trip
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    per_round = [
        RoundInstructions.from_record_fields(m.content[CONFIG_KEY]).devices
        for m in trains
        if m.metadata.group_id == "1"
    ]
    assert len(per_round) == 3 and sum(len(d) for d in per_round) == 5
    row = _rows(tmp_path)[0]
    assert row["num_updates"] == 5 and row["devices"]["num_devices"] == 10


def test_deployment_population_registers_every_device_or_says_who_is_missing(
    tmp_path: Path,
) -> None:
    cfg, src = _setup(tmp_path)
    loop = ServerLoop(
        InProcessGrid(tmp_path, 4, devices=True), cfg, tmp_path, src, population="nodes"
    )
    loop.run()
    assert _rows(tmp_path)[-1]["num_updates"] == 4
    short = ServerLoop(
        InProcessGrid(tmp_path, 3, devices=True), cfg, tmp_path, src, population="nodes"
    )
    with pytest.raises(PopulationError, match=r"3 of partition.num_devices=4.*missing \[3\]"):
        short.population.connect(wait_s=0.1)  # type: ignore[attr-defined]


class _SilentNode(InProcessGrid):
    """Device ``silent``'s node takes the message but never answers."""

    def __init__(self, run_dir: Path, num_nodes: int, silent: int) -> None:
        super().__init__(run_dir, num_nodes, devices=True)
        self.silent = silent

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = super().pull_messages(message_ids)
        return [r for r in got if self.nodes[r.metadata.src_node_id] != self.silent]


def test_a_device_that_never_answers_hello_is_named_with_the_timeout(tmp_path: Path) -> None:
    """Registration pulls replies as they come and gives up on a silent node after
    ``strategy.round_timeout_s``, naming it; the others are registered."""
    cfg, src = _setup(tmp_path, "strategy.round_timeout_s=0.3")
    grid = _SilentNode(tmp_path, 4, silent=2)
    loop = ServerLoop(grid, cfg, tmp_path, src, population="nodes")
    with pytest.raises(PopulationError, match=r"missing \[2\]\).*node 1002: no answer to hello"):
        loop.population.connect(wait_s=0.1)
    assert sorted(loop.population.node_of) == [0, 1, 3]  # type: ignore[attr-defined]
    assert [m.metadata.message_type for m in grid.sent] == ["query.hello"] * 4


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam"])
def test_cohorts_and_preaggregation_give_the_same_model(tmp_path: Path, strategy: str) -> None:
    finals, metrics = {}, {}
    for name, extra in {
        "single": ["simulation.devices_per_message=1"],
        "cohort": ["simulation.devices_per_message=3"],
        "preagg": ["simulation.devices_per_message=3", "simulation.preaggregate=true"],
    }.items():
        d = tmp_path / name
        cfg, src = _setup(
            d, "partition.num_devices=7", "rounds=3", f"strategy.name={strategy}", *extra
        )
        finals[name] = ServerLoop(InProcessGrid(d, 2), cfg, d, src).run()
        metrics[name] = (d / METRICS_FILE).read_bytes()
    assert metrics["single"] == metrics["cohort"]
    for k, v in finals["single"].items():
        np.testing.assert_array_equal(finals["cohort"][k], v)
        np.testing.assert_allclose(finals["preagg"][k], v, atol=1e-6)


def test_preaggregation_is_refused_for_robust_strategies(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path, "strategy.name=fedmedian", "simulation.preaggregate=true")
    with pytest.raises(AggregationError, match="preaggregate = false"):
        ServerLoop(InProcessGrid(tmp_path, 2), cfg, tmp_path, src)


def test_fedper_devices_never_send_heads_and_server_keeps_them_out(tmp_path: Path) -> None:
    cfg, src = _setup(
        tmp_path, "client.algorithm=fedper", "strategy.name=fedadam", 'model.name="mlp2nn"'
    )
    grid = InProcessGrid(tmp_path, 2)
    loop = ServerLoop(grid, cfg, tmp_path, src)
    initial_head = {k: v.copy() for k, v in loop.global_arrays.items() if k.startswith("head.")}
    final = loop.run()
    train_replies = [r for r in grid.replies if ARRAYS_KEY in r.content.array_records]
    assert train_replies
    for r in train_replies:
        assert not any(k.startswith("head.") for k in r.content[ARRAYS_KEY])
    for k, v in initial_head.items():
        np.testing.assert_array_equal(final[k], v)


def test_device_evaluation_summary_matches_devices_jsonl(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path, "evaluation.every=2")
    ServerLoop(InProcessGrid(tmp_path, 2), cfg, tmp_path, src).run()
    rows = _rows(tmp_path)
    assert "devices" not in rows[0] and rows[1]["evaluated"]
    dev = rows[1]["devices"]
    per = [json.loads(x) for x in (tmp_path / "devices.jsonl").read_text().splitlines()]
    g = np.array([p["global_acc"] for p in per])
    p_acc = np.array([p["personal_acc"] for p in per])
    n = np.array([p["num_test"] for p in per], dtype=float)
    assert dev["num_devices"] == 4 == len(per)
    assert dev["global_acc"]["weighted_mean"] == pytest.approx(float((g * n).sum() / n.sum()))
    assert dev["global_acc"]["p50"] == pytest.approx(float(np.median(g)))
    assert dev["share_personal_worse"] == pytest.approx(float(np.mean(p_acc < g)))


def test_config_names_and_registries_agree() -> None:
    assert set(get_args(StrategyName)) == set(STRATEGIES)
    assert set(get_args(AlgorithmName)) == set(ALGORITHMS) == set(DEVICE_ALGORITHMS)
    for name, cls in DEVICE_ALGORITHMS.items():
        assert cls.spec is ALGORITHMS[name]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_trains(tmp_path: Path, strategy: str) -> None:
    extra = ["client.algorithm=fedprox"] if strategy == "fedprox" else []
    # Two rounds: the second runs on server state the first left (FedOpt moments, momentum).
    cfg, src = _setup(tmp_path, f"strategy.name={strategy}", "rounds=2", *extra)
    loop = ServerLoop(InProcessGrid(tmp_path, 2), cfg, tmp_path, src)
    before = {k: v.copy() for k, v in loop.global_arrays.items()}
    final = loop.run()
    assert any(not np.array_equal(final[k], before[k]) for k in before)
    assert all(np.isfinite(v).all() and v.dtype == before[k].dtype for k, v in final.items())
    assert [r["round"] for r in _rows(tmp_path)] == [1, 2]


KNOBS = {
    "local_epochs": 2,
    "batch_size": 7,
    "lr": 0.013,
    "momentum": 0.3,
    "weight_decay": 0.001,
    "proximal_mu": 0.3,
    "head_epochs": 3,
    "ditto_lambda": 0.7,
    "apfl_alpha": 0.25,
    "apfl_alpha_lr": 0.02,
    "partial_work": True,
}


def test_every_client_knob_reaches_the_devices_as_set(tmp_path: Path) -> None:
    assert set(KNOBS) == set(ClientConfig.model_fields) - {"algorithm"}
    for name, value in KNOBS.items():
        assert ClientConfig.model_fields[name].default != value
    overrides = [f"client.{k}={v}" for k, v in KNOBS.items()]
    # partial_work needs a deadline on the virtual clock (one long enough for everyone).
    clock = ["clock.mode=sync", "clock.deadline_s=100000", "clock.overcommit=1.0"]
    cfg, src = _setup(
        tmp_path, "client.algorithm=fedprox", "strategy.name=fedprox", *overrides, *clock
    )
    grid = InProcessGrid(tmp_path, 2)
    ServerLoop(grid, cfg, tmp_path, src).run()
    for m in grid.sent:
        got = RoundInstructions.from_record_fields(m.content[CONFIG_KEY]).client
        assert {k: getattr(got, k) for k in KNOBS} == KNOBS
        assert set(m.content[CONFIG_KEY]) == {"task"}  # nothing beside the one declaration


def test_fedprox_strategy_needs_the_fedprox_algorithm() -> None:
    with pytest.raises(ConfigError, match=r"set client\.algorithm = 'fedprox'"):
        load_config(None, ["strategy.name=fedprox", "client.algorithm=ditto"])


ALGORITHM_SETS = {
    "fedavg": [],
    "fedprox": [],
    "fedper": ['model.name="mlp2nn"'],
    "fedrep": ['model.name="mlp2nn"'],
    "fedbn": ['model.name="cnn"', "model.batch_norm=true"],
    "ditto": [],
    "apfl": [],
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_SETS))
def test_every_algorithm_runs_through_server_and_devices(tmp_path: Path, algorithm: str) -> None:
    cfg, src = _setup(tmp_path, f"client.algorithm={algorithm}", *ALGORITHM_SETS[algorithm])
    final = ServerLoop(InProcessGrid(tmp_path, 2), cfg, tmp_path, src).run()
    assert all(np.isfinite(v).all() for v in final.values())
    rows = _rows(tmp_path)
    assert rows[-1]["num_updates"] == 4 and rows[-1]["num_rejected"] == 0
    assert rows[-1]["devices"]["num_devices"] == 4
    assert rows[-1]["schema_version"] == 2


def test_a_device_error_reply_fails_its_whole_message(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path, "simulation.devices_per_message=2")

    def crash(node: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type == "train" and node == 0:
            return Message(Error(code=1, reason="worker died"), reply_to=msg)
        return None

    ServerLoop(InProcessGrid(tmp_path, 2, crash), cfg, tmp_path, src).run()
    row = _rows(tmp_path)[0]
    assert row["failed"] == [
        {"device": 0, "reason": "worker died"},
        {"device": 1, "reason": "worker died"},
    ]
    assert row["num_updates"] == 2


def test_repeated_failures_stop_the_run_with_the_cause(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path, "simulation.devices_per_message=1")

    def crash(node: int, msg: Message, reply: Message) -> Message | None:
        task = RoundInstructions.from_record_fields(msg.content[CONFIG_KEY])
        if msg.metadata.message_type == "train" and task.devices[0] != 0:
            return Message(Error(code=1, reason="ActorDiedError: worker died"), reply_to=msg)
        return None

    with pytest.raises(RunFailed, match=r"3 of 4 selected devices failed.*max_failed_fraction"):
        ServerLoop(InProcessGrid(tmp_path, 2, crash), cfg, tmp_path, src).run()


def test_devices_per_round_is_exact_and_checked() -> None:
    from server.selection import UniformSelection

    pool = np.arange(1_000_000, dtype=np.int64)
    sel = UniformSelection(seed=3, fraction=0.5, minimum=1, count=100)
    a = sel.select(1, pool)
    assert len(a) == 100 == len(set(a)) and a == sorted(a) and a == sel.select(1, pool)
    assert a != sel.select(2, pool)
    with pytest.raises(ConfigError, match=r"strategy\.devices_per_round \(5\) is below"):
        load_config(None, ["strategy.devices_per_round=5", "strategy.min_train_devices=6"])
    with pytest.raises(ConfigError, match=r"strategy\.devices_per_round \(30\) is more than"):
        load_config(None, ["strategy.devices_per_round=30"])


def test_personalization_verdict_counts_devices(tmp_path: Path) -> None:
    from server.summary import personalization_verdict

    cfg, src = _setup(tmp_path, "partition.num_devices=8", "evaluation.holdout_fraction=0.25")
    loop = ServerLoop(InProcessGrid(tmp_path, 2), cfg, tmp_path, src)
    loop.run()
    rows = [r for r in loop.last_device_rows if r.role == "train"]
    v = personalization_verdict(loop.last_device_rows)
    assert v is not None and v["devices"] == len(rows) == 6
    assert v["helped"] == sum((r.gain or 0) > 0 for r in rows)
    assert v["hurt"] == sum((r.gain or 0) < 0 for r in rows)
    assert v["mean_gain_points"] == pytest.approx(100 * np.mean([r.gain for r in rows]))
    assert f"helped {v['helped']} of 6 devices" in v["sentence"]
    assert personalization_verdict([]) is None


def test_every_config_name_list_has_one_registry() -> None:
    from common.config import DatasetName, ModelName, PartitionMethod
    from common.data.loaders import LOADERS
    from common.data.partition import METHODS
    from common.models import _BUILDERS

    assert set(get_args(DatasetName)) == {*LOADERS, "synthetic"}
    assert set(get_args(ModelName)) == set(_BUILDERS)
    assert set(get_args(PartitionMethod)) == set(METHODS)


def test_an_unreadable_personal_state_is_set_aside_not_a_life_ban(tmp_path: Path) -> None:
    cfg, src = _setup(tmp_path, "rounds=1")
    ServerLoop(InProcessGrid(tmp_path, 2), cfg, tmp_path, src).run()
    state = tmp_path / "devices" / "device-000002.safetensors"
    state.write_bytes(b"\x1b[31mnot a safetensors file")
    cfg2, _ = _setup(tmp_path, "rounds=2")
    loop = ServerLoop(InProcessGrid(tmp_path, 2), cfg2, tmp_path, src)
    loop.population.connect()  # type: ignore[attr-defined]
    row, trained, _ = loop.train_round(2, [0, 1, 2, 3])
    assert trained == [0, 1, 2, 3] and row.num_failed == 0
    assert row.state_resets is not None and [r.device for r in row.state_resets] == [2]
    assert "unreadable" in row.state_resets[0].reason and len(row.state_resets[0].reason) < 300
    assert state.is_file() and (state.parent / f"{state.name}.corrupt-r2").is_file()


def test_devices_joining_in_different_rounds_report_the_same_schema(tmp_path: Path) -> None:
    """Deployment (one node per device), half the devices per round: first-join replies
    carry cold-start numbers the others lack; rounds aggregate all the same (issue 12 D1)."""
    cfg, src = _setup(tmp_path, "rounds=3", "strategy.fraction_train=0.5")
    joined: set[int] = set()

    def cold_start(node: int, msg: Message, reply: Message) -> Message | None:
        if msg.metadata.message_type != "train" or reply.has_error():
            return None
        body = CohortReply.from_record_fields(reply.content[REPORT_KEY])
        train = [
            r.model_copy(update={"cold_start_acc": 0.5, "cold_start_version": 0})
            if r.device not in joined
            else r
            for r in body.train
        ]
        joined.update(r.device for r in body.train)
        new = body.model_copy(update={"train": train})
        content = RecordDict(
            {
                ARRAYS_KEY: reply.content[ARRAYS_KEY],
                REPORT_KEY: ConfigRecord(new.to_record_fields()),
            }
        )
        return Message(content, reply_to=msg)

    grid = InProcessGrid(tmp_path, 4, cold_start, devices=True)
    ServerLoop(grid, cfg, tmp_path, src, population="nodes").run()
    rows = _rows(tmp_path)
    assert [r["num_updates"] for r in rows] == [2, 2, 2]
    firsts = [d["device"] for r in rows for d in r.get("cold_start", [])]
    assert sorted(firsts) == sorted(set(firsts)) and len(firsts) >= 3
