"""The virtual clock: profiles, availability, synchronous rounds and FedBuff.

Loop-level tests run the real ServerLoop and ClientApp in-process (tests.inprocess_grid)
with a tiny logistic model, so each costs a second or two.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, load_config
from common.config_clock import ClockConfig
from common.data import open_source
from common.personalization import ALGORITHMS, local_steps
from common.protocol import CONFIG_KEY, RoundInstructions
from common.rundir import METRICS_FILE, PARTITION_FILE, PROFILES_FILE, prepare_run_dir
from server.availability import Bernoulli, Diurnal, Trace, hash_uniform
from server.clock import DeviceClock, pass_cap
from server.fedbuff import staleness_weight
from server.loop import RunFailed, ServerLoop
from server.profiles import ProfileFileError, load_profiles, sample_profiles
from tests.inprocess_grid import InProcessGrid

BASE = [
    "partition.num_devices=12",
    "partition.method=iid",
    "model.name=logistic",
    "evaluation.every=100",
    "evaluation.finetune_steps=0",
    "simulation.devices_per_message=1",
]


def _run(run_dir: Path, *overrides: str, grid_hold: dict[int, int] | None = None):  # type: ignore[no-untyped-def]
    cfg = load_config(None, [*BASE, *overrides])
    prepare_run_dir(cfg, run_dir)
    src = open_source(cfg, run_dir / PARTITION_FILE)
    grid = InProcessGrid(run_dir, 3)
    grid.hold = dict(grid_hold or {})
    loop = ServerLoop(grid, cfg, run_dir, src)
    final = loop.run()
    rows = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    return rows, final, grid, loop


def _trained(grid: InProcessGrid, round_: int) -> list[int]:
    out = []
    for m in grid.sent:
        if m.metadata.message_type == "train" and m.metadata.group_id == str(round_):
            out += RoundInstructions.from_record_fields(m.content[CONFIG_KEY]).devices
    return sorted(out)


def _profile_csv(
    path: Path, n: int, slow: dict[int, float] | None = None, online: str = ""
) -> Path:
    lines = ["device,speed,down_mbps,up_mbps,online"]
    for d in range(n):
        lines.append(f"{d},{(slow or {}).get(d, 1000.0)},100,100,{online}")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- profiles and the formula ------------------------------------------------------
def test_the_clock_formula_on_a_hand_computed_example(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("device,speed,down_mbps,up_mbps\n0,50,8,2\n1,10,16,4\n")
    cfg = load_config(
        None, ["partition.num_devices=2", "client.batch_size=10", "client.local_epochs=1"]
    )
    profiles = load_profiles(f, cfg.clock, 0, 2)
    from server.availability import Always

    clock = DeviceClock(cfg, profiles, Always(), lambda d: 95)  # 95 samples: 10 steps/epoch
    w = clock.work(np.array([0, 1]), model_bytes=2_000_000, update_bytes=1_000_000)
    # device 0: 2 MB at 8 Mbit/s = 2 s; 10 steps x 10 / 50 per s = 2 s; 1 MB at 2 Mbit/s = 4 s
    np.testing.assert_allclose(w.download_s, [2.0, 1.0])
    np.testing.assert_allclose(w.compute_s, [2.0, 10.0])
    np.testing.assert_allclose(w.upload_s, [4.0, 2.0])
    np.testing.assert_allclose(w.total_s, [8.0, 13.0])


def test_profiles_depend_on_seed_and_device_only() -> None:
    c = ClockConfig()
    small, large = sample_profiles(c, 3, 10), sample_profiles(c, 3, 1000)
    np.testing.assert_array_equal(small.speed, large.speed[:10])
    np.testing.assert_array_equal(small.up_mbps, large.up_mbps[:10])
    assert not np.array_equal(sample_profiles(c, 4, 10).speed, small.speed)
    assert abs(np.median(large.speed) / c.speed_median - 1) < 0.15


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device,speed,down_mbps\n0,1,1\n", r"missing column\(s\) \['up_mbps'\]"),
        ("device,speed,down_mbps,up_mbps\n0,1,1,1\n1,-3,1,1\n", r"line 3, column 'speed'"),
        (
            "device,speed,down_mbps,up_mbps\n0,1,1,1\n0,1,1,1\n",
            r"line 3, column 'device'.*repeated",
        ),
        ("device,speed,down_mbps,up_mbps\n0,1,1,1\n", r"no row for device\(s\) \[1\]"),
        ("device,speed,down_mbps,up_mbps,online\n0,1,1,1,5-2\n1,1,1,1,\n", r"line 2.*'online'"),
        ("device,speed,down_mbps,up_mbps\n0,1,x,1\n1,1,1,1\n", r"line 2, column 'down_mbps'"),
    ],
)
def test_a_bad_profile_file_names_the_row_and_column(
    tmp_path: Path, text: str, message: str
) -> None:
    f = tmp_path / "p.csv"
    f.write_text(text)
    with pytest.raises(ProfileFileError, match=message):
        load_profiles(f, ClockConfig(), 0, 2)


def test_json_profiles_with_intervals(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    rows = [
        {"device": d, "speed": 5, "down_mbps": 1, "up_mbps": 1, "online": [[0, 60]]}
        for d in range(2)
    ]
    f.write_text(json.dumps(rows))
    p = load_profiles(f, ClockConfig(), 0, 2)
    assert p.intervals is not None and p.intervals[1].tolist() == [[0.0, 60.0]]
    rows[1]["online"] = [[0, 60], [30, 90]]
    f.write_text(json.dumps(rows))
    with pytest.raises(ProfileFileError, match=r"item 1, column 'online': .*overlaps"):
        load_profiles(f, ClockConfig(), 0, 2)


# -- availability ---------------------------------------------------------------------
def test_bernoulli_shares_online_match_p_and_stretches_end_where_a_period_is_off() -> None:
    devices = np.arange(20_000)
    model = Bernoulli(key=123, p=0.3, period_s=600.0)
    for t in (0.0, 601.0, 86_400.0):
        assert abs(model.online(devices, t).mean() - 0.3) < 0.015
    on = devices[model.online(devices, 0.0)][:200]
    until = model.online_until(on, 0.0)
    for d, u in zip(on.tolist(), until.tolist(), strict=True):
        k = int(u // 600)
        assert hash_uniform(123, np.array([d]), k)[0] >= 0.3  # off in the period it ends at
        assert all(hash_uniform(123, np.array([d]), j)[0] < 0.3 for j in range(k))


def test_diurnal_windows_are_respected() -> None:
    offset = np.array([0.0, 5.0, 23.0])
    start = np.array([22.0, 22.0, 1.0])
    model = Diurnal(offset, start, window_h=8.0, start_hour_utc=0.0)
    devices = np.arange(3)
    for hour in np.arange(0, 48, 0.5):
        t = hour * 3600.0
        local = (hour + offset) % 24
        expect = ((local - start) % 24) < 8.0
        np.testing.assert_array_equal(model.online(devices, t), expect)
    # device 0 at UTC 23:00 (local 23:00, window 22-06): online until 06:00 = 7 h later.
    assert model.online_until(np.array([0]), 23 * 3600.0)[0] == pytest.approx(30 * 3600.0)


def test_trace_intervals_are_honoured() -> None:
    model = Trace([np.array([[0.0, 10.0], [20.0, 30.0]]), np.zeros((0, 2))])
    devices = np.array([0, 1])
    assert model.online(devices, 5.0).tolist() == [True, False]
    assert model.online(devices, 10.0).tolist() == [False, False]
    assert model.online(devices, 25.0).tolist() == [True, False]
    assert model.online_until(np.array([0]), 21.0).tolist() == [30.0]


def test_server_step_count_matches_what_devices_report(tmp_path: Path) -> None:
    """The clock charges a device for the steps its real loop takes, for every algorithm."""
    for algo in ("fedavg", "fedrep", "ditto"):  # one pass, head-then-body, two models
        assert algo in ALGORITHMS
        d = tmp_path / algo
        _, _, grid, loop = _run(
            d,
            "rounds=1",
            "partition.num_devices=3",
            "strategy.fraction_train=1.0",
            f"client.algorithm={algo}",
            "model.name=mlp2nn",
            "client.batch_size=7",
        )
        c = loop.cfg.client
        for reply in grid.replies:
            if reply.metadata.message_type != "train":
                continue
            from common.protocol import REPORT_KEY, CohortReply

            for r in CohortReply.from_record_fields(reply.content[REPORT_KEY]).train:
                n = loop.population.num_examples(r.device)
                want = sum(local_steps(algo, n, c.local_epochs, c.head_epochs, c.batch_size))
                assert r.steps == want, algo


# -- synchronous rounds ---------------------------------------------------------------
def test_always_without_deadline_reproduces_todays_metrics(tmp_path: Path) -> None:
    plain, final_plain, _, _ = _run(tmp_path / "off", "rounds=3", "strategy.fraction_train=0.5")
    timed, final_timed, _, _ = _run(
        tmp_path / "on",
        "rounds=3",
        "strategy.fraction_train=0.5",
        "clock.mode=sync",
        "clock.overcommit=1.0",
    )
    assert [{k: v for k, v in r.items() if k != "clock"} for r in timed] == plain
    assert all(r["clock"]["duration_s"] > 0 for r in timed)
    assert timed[-1]["clock"]["end_h"] > timed[0]["clock"]["end_h"]
    for k, v in final_plain.items():
        np.testing.assert_array_equal(final_timed[k], v)
    assert (tmp_path / "on" / PROFILES_FILE).read_text().startswith("device,speed")


def test_overcommitment_selects_ceil_1_3_k_and_keeps_the_first_k(tmp_path: Path) -> None:
    rows, _, grid, loop = _run(
        tmp_path, "rounds=2", "strategy.devices_per_round=5", "clock.mode=sync"
    )
    for row in rows:
        c = row["clock"]
        assert c["selected"] == math.ceil(1.3 * 5) == 7
        assert c["finished"] == 5 and c["late"] == 2 and row["num_updates"] == 5
        assert len(_trained(grid, row["round"])) == 5  # the late two never train
    # The kept five are the five fastest of the seven (always online, no deadline).
    assert loop.sync is not None


def test_stragglers_work_is_discarded_unless_partial_work_is_on(tmp_path: Path) -> None:
    slow = {d: 1.0 for d in range(12) if d % 2}  # odd devices: 1 sample/s (~hours)
    f = _profile_csv(tmp_path / "p.csv", 12, slow)
    common = [
        "rounds=1",
        "strategy.fraction_train=1.0",
        "clock.mode=sync",
        "clock.overcommit=1.0",
        "clock.deadline_s=60",
        f"clock.profiles_file={f}",
    ]
    rows, _, grid, _ = _run(tmp_path / "drop", *common)
    c = rows[0]["clock"]
    assert c["dropped_deadline"] == 6 and c["finished"] == 6
    assert {d["device"] for d in c["dropped"]} == set(slow)
    assert all(d["reason"].startswith("deadline") for d in c["dropped"])
    assert _trained(grid, 1) == [0, 2, 4, 6, 8, 10]
    rows, _, grid, _ = _run(tmp_path / "partial", *common, "client.partial_work=true")
    c = rows[0]["clock"]
    assert c["partial"] == 6 and c["finished"] == 12 and c["dropped_deadline"] == 0
    assert _trained(grid, 1) == list(range(12))
    limits = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            limits.update(RoundInstructions.from_record_fields(m.content[CONFIG_KEY]).step_limits)
    assert set(limits) == set(slow) and all(v > 0 for v in limits.values())
    # 60 s at 1 sample/s with batch 10 minus transfer: 5 steps at most.
    assert max(limits.values()) <= 6


def test_a_device_that_goes_offline_mid_round_drops_with_its_reason(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    lines = ["device,speed,down_mbps,up_mbps,online"]
    for d in range(12):
        online = "0-1" if d == 3 else "0-100000"  # device 3 leaves after 1 s
        lines.append(f"{d},10,100,100,{online}")
    f.write_text("\n".join(lines) + "\n")
    rows, _, grid, _ = _run(
        tmp_path,
        "rounds=1",
        "strategy.fraction_train=1.0",
        "clock.mode=sync",
        "clock.overcommit=1.0",
        "clock.availability=trace",
        f"clock.profiles_file={f}",
    )
    c = rows[0]["clock"]
    assert c["dropped_offline"] == 1
    assert c["dropped"][0]["device"] == 3 and c["dropped"][0]["reason"].startswith(
        "offline after 1 s"
    )
    assert 3 not in _trained(grid, 1)


def test_impossible_clock_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"clock.buffer_size = 8 is more than clock.concurrency = 4"
    ):
        load_config(None, ["clock.mode=async", "clock.concurrency=4", "clock.buffer_size=8"])
    with pytest.raises(ConfigError, match=r"client.partial_work.*clock.deadline_s"):
        load_config(None, ["client.partial_work=true"])
    with pytest.raises(ConfigError, match=r"clock.profiles_file"):
        load_config(None, ["clock.availability=trace"])
    f = _profile_csv(tmp_path / "p.csv", 12)
    f.write_text(f.read_text().replace(",100,100,", ",0.0001,100,"))
    with pytest.raises(RunFailed, match=r"clock.deadline_s = 5 is shorter than the fastest"):
        _run(tmp_path / "r", "clock.mode=sync", "clock.deadline_s=5", f"clock.profiles_file={f}")


def test_pass_cap_splits_a_step_budget_over_passes() -> None:
    assert pass_cap((10,), 4) == 4
    assert pass_cap((3, 10), 9) == 6  # 3 + 6
    assert pass_cap((10, 10), 1) == 0


# -- FedBuff ---------------------------------------------------------------------------
ASYNC = ["rounds=3", "clock.mode=async", "clock.concurrency=6", "clock.buffer_size=3"]


def test_async_is_byte_identical_and_ignores_real_completion_order(tmp_path: Path) -> None:
    rows, final, grid_a, loop = _run(tmp_path / "a", *ASYNC)
    assert [r["clock"]["finished"] for r in rows] == [3, 3, 3]
    assert max(r["clock"]["staleness"]["p90"] for r in rows[1:]) >= 1
    again = tmp_path / "b" / METRICS_FILE
    _, final_b, _, _ = _run(tmp_path / "b", *ASYNC)
    assert again.read_bytes() == (tmp_path / "a" / METRICS_FILE).read_bytes()
    # The virtually fastest device that trained finishes last in real time: same result.
    speed = loop.clock.profiles.speed  # type: ignore[union-attr]
    trained = sorted({d for r in range(1, 4) for d in _trained(grid_a, r)})
    fastest = max(trained, key=lambda d: speed[d])
    _, final_c, grid_c, _ = _run(tmp_path / "c", *ASYNC, grid_hold={fastest: 6})
    group = next(g for g, ds in grid_c.pulled if fastest in ds and g.startswith("train"))
    order = [ds for g, ds in grid_c.pulled if g == group]
    assert len(order) > 1 and fastest in order[-1]  # its reply really came in last
    assert (tmp_path / "c" / METRICS_FILE).read_bytes() == again.read_bytes()
    for k, v in final.items():
        np.testing.assert_array_equal(final_b[k], v)
        np.testing.assert_array_equal(final_c[k], v)


def test_staleness_weights_are_applied(tmp_path: Path) -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    _, a, _, _ = _run(tmp_path / "half", *ASYNC)
    _, b, _, _ = _run(tmp_path / "none", *ASYNC, "clock.staleness_exponent=0")
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    # The first aggregation's updates all started from version 0: no staleness, no effect.
    same = ["rounds=1", "clock.mode=async", "clock.concurrency=6", "clock.buffer_size=3"]
    rows, c, _, _ = _run(tmp_path / "c", *same)
    _, d, _, _ = _run(tmp_path / "d", *same, "clock.staleness_exponent=0")
    assert all(r["clock"]["staleness"]["p90"] == 0 for r in rows)
    for k in c:
        np.testing.assert_array_equal(c[k], d[k])


# -- what it reports ----------------------------------------------------------------
def _row(round_: int, acc: float, end_h: float, dropped: int = 0):  # type: ignore[no-untyped-def]
    from common.rows import ClockRow, RoundRow

    clock = ClockRow(
        start_h=end_h - 0.5,
        duration_s=1800.0,
        end_h=end_h,
        online=100,
        selected=13,
        finished=10,
        dropped_offline=dropped,
    )
    return RoundRow(
        round=round_,
        num_sampled=10,
        num_updates=10,
        num_failed=0,
        num_rejected=0,
        bytes_up=1.0,
        bytes_down=1.0,
        evaluated=True,
        global_test_acc=acc,
        clock=clock,
    )


def test_summary_gives_time_to_accuracy_in_virtual_hours() -> None:
    from server.summary import summarize
    from simulation.progress import clock_line

    rows = [_row(1, 0.3, 0.5, 1), _row(2, 0.65, 1.0, 2), _row(3, 0.7, 1.5)]
    s = summarize(rows, (0.6, 0.0))["clock"]
    assert s["virtual_hours"] == 1.5 and s["dropped_offline"] == 3
    assert s["time_to_global_accuracy"] == {"target": 0.6, "virtual_hours": 1.0, "round": 2}
    assert summarize(rows, (0.9, 0.0))["clock"]["time_to_global_accuracy"]["round"] is None
    assert "personal" not in json.dumps(s)
    line = clock_line(summarize(rows, (0.9, 0.0))["clock"])
    assert "3 devices dropped (3 went offline" in line and "global test 90%: not reached" in line
