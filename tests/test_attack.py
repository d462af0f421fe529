"""Poisoned devices (``[attack]``) and the server's defences (issue 12, finding M1).

Device side: each attack kind changes what a malicious device sends (or trains on,
or claims), and only for the seeded malicious devices, only from ``start_round``.
Server side, over the real ClientApp in-process: inflated counts and NaN are
rejected with the reason recorded, ``strategy.clip_norm`` bounds what a scaled
update can do to the global model, Bulyan trains and says when it has too few
updates, and ``attack.kind = "none"`` leaves ``metrics.jsonl`` byte-identical.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from client.attack import poison_data
from client.cohort import train_cohort
from client.runtime import DeviceEnv, device_data
from common.config import ConfigError, ExperimentConfig, load_config
from common.config_attack import AttackConfig, malicious_devices
from common.data import open_source
from common.models import ModelSpec
from common.protocol import CohortReply, RoundInstructions, task_for
from common.rundir import ATTACK_FILE, METRICS_FILE, PARTITION_FILE, prepare_run_dir
from common.weights import Arrays
from server.aggregation import AggregationError, Aggregator, clip_to_norm
from server.loop import ServerLoop
from tests.inprocess_grid import InProcessGrid

N = 8
"""Devices in these tests; attack.fraction = 0.25 makes two of them malicious."""
SEED = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread, as a device's ClientApp runs (threads only contend here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"seed={SEED}",
            "rounds=2",
            f"partition.num_devices={N}",
            "strategy.fraction_train=1.0",
            "model.name=logistic",
            "evaluation.finetune_steps=0",
            *overrides,
        ],
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]


def _run(run_dir: Path, *overrides: str) -> tuple[ServerLoop, Arrays]:
    cfg = _cfg(*overrides)
    prepare_run_dir(cfg, run_dir)
    loop = ServerLoop(
        InProcessGrid(run_dir, 2), cfg, run_dir, open_source(cfg, run_dir / PARTITION_FILE)
    )
    return loop, loop.run()


# -- device side -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def device_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExperimentConfig]:
    run_dir = tmp_path_factory.mktemp("attack-devices")
    cfg = _cfg()
    prepare_run_dir(cfg, run_dir)
    return run_dir, cfg


# -- config --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["attack.fraction=1.0"], r"attack\.fraction"),
        (["attack.fraction=-0.1"], r"attack\.fraction"),
        (["attack.kind=scale", "attack.fraction=0.2", "attack.scale=0"], r"attack\.scale = 0"),
        (["attack.kind=inflate_count", "attack.fraction=0.2", "attack.scale=1"], "above 1"),
        (["attack.kind=scale"], r"attack\.fraction = 0 attacks nobody"),
        (["attack.kind=scale", "attack.fraction=0.05"], r"attack\.fraction = 0.05 of .* 8 is no"),
        (["attack.scale=inf"], r"attack\.scale"),
        (["attack.kind=poison"], r"attack\.kind"),
        (["attack.noise_std=0"], r"attack\.noise_std"),
        (["attack.start_round=0"], r"attack\.start_round"),
        (["attack.budget=3"], r"attack\.budget: unknown key"),
        (["strategy.clip_norm=-1"], r"strategy\.clip_norm"),
        (
            ["strategy.name=bulyan", "strategy.num_malicious=1"],
            r"needs at least 4 \* num_malicious \+ 3 = 7 updates per round, but a round "
            r"selects 4 devices: raise strategy\.fraction_train",
        ),
        (
            ["strategy.name=bulyan", "strategy.num_malicious=2", "strategy.devices_per_round=8"],
            r"= 11 updates.*raise strategy\.devices_per_round",
        ),
        (
            ["strategy.clip_norm=1", "simulation.preaggregate=true"],
            r"strategy\.clip_norm.*set simulation\.preaggregate = false",
        ),
        (
            ["attack.kind=inflate_count", "attack.fraction=0.2", "simulation.preaggregate=true"],
            r"inflate_count.*set simulation\.preaggregate = false",
        ),
    ],
)
def test_nonsense_is_refused_naming_the_key(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["partition.num_devices=8", *sets])


def test_malicious_devices_are_seeded_fixed_and_recorded(
    tmp_path: Path, device_run: tuple[Path, ExperimentConfig]
) -> None:
    a = AttackConfig(kind="scale", fraction=0.25)
    chosen = a.malicious(SEED, 1000)
    assert len(chosen) == 250 and chosen == malicious_devices(SEED, 0.25, 1000)
    assert chosen != a.malicious(SEED + 1, 1000)
    assert all(a.attacks(SEED, 1000, r, d) for r in (1, 7) for d in chosen)
    assert not any(a.attacks(SEED, 1000, 1, d) for d in set(range(1000)) - chosen)
    late = a.model_copy(update={"start_round": 3})
    d = min(chosen)
    assert [late.attacks(SEED, 1000, r, d) for r in (1, 2, 3, 4)] == [False, False, True, True]
    assert AttackConfig().malicious(SEED, 1000) == frozenset()

    cfg = _cfg("attack.kind=sign_flip", "attack.fraction=0.25")
    prepare_run_dir(cfg, tmp_path)
    record = json.loads((tmp_path / ATTACK_FILE).read_text())
    assert record["kind"] == "sign_flip" and record["num_malicious"] == 2
    assert record["devices"] == sorted(malicious_devices(SEED, 0.25, N))
    assert not (device_run[0] / ATTACK_FILE).exists()  # an honest run has none


def _train(
    run_dir: Path, cfg: ExperimentConfig, state: str, attack: dict[str, object], round_: int = 1
) -> tuple[dict[int, tuple[int, Arrays]], Arrays]:
    """Every device trains once (own state folder); per device: (claimed count, update)."""
    cfg = cfg.model_copy(update={"attack": AttackConfig(**attack)})  # type: ignore[arg-type]
    src = open_source(cfg, run_dir / PARTITION_FILE)
    loop_model = ServerLoop(InProcessGrid(run_dir, 1), cfg, run_dir, src)
    g = loop_model.global_arrays
    task = task_for(cfg, round_, loop_model.spec.model_dump_json(), str(run_dir), list(range(N)))
    env = DeviceEnv(None, run_dir, state_dir=run_dir / state)
    reply, stacked = train_cohort(env, task, g)
    assert isinstance(reply, CohortReply) and not reply.failures
    out = {
        r.device: (r.num_examples, {k: v[i] for k, v in stacked.items()})
        for i, r in enumerate(reply.train)
    }
    return out, g


@pytest.fixture(scope="module")
def honest(
    device_run: tuple[Path, ExperimentConfig],
) -> tuple[dict[int, tuple[int, Arrays]], Arrays]:
    run_dir, cfg = device_run
    return _train(run_dir, cfg, "state-honest", {})


@pytest.mark.parametrize("kind", ["scale", "sign_flip", "noise", "nan", "inflate_count"])
def test_each_attack_changes_what_only_malicious_devices_send(
    device_run: tuple[Path, ExperimentConfig],
    honest: tuple[dict[int, tuple[int, Arrays]], Arrays],
    kind: str,
) -> None:
    run_dir, cfg = device_run
    clean, g = honest
    attack = {"kind": kind, "fraction": 0.25, "scale": 4.0, "noise_std": 0.5}
    got, _ = _train(run_dir, cfg, f"state-{kind}", attack)
    bad = malicious_devices(SEED, 0.25, N)
    assert len(bad) == 2
    for d, (count, arrays) in got.items():
        want_count, want = clean[d]
        if d not in bad:
            assert count == want_count
            for k in want:
                assert arrays[k].tobytes() == want[k].tobytes()
            continue
        if kind == "inflate_count":
            assert count == 4 * want_count  # the update itself is honest
            assert all(np.array_equal(arrays[k], want[k]) for k in want)
            continue
        assert count == want_count
        if kind == "noise":  # the honest update is replaced by N(0, 0.5^2) around g
            sent = np.concatenate([(arrays[k] - g[k]).ravel() for k in want])
            assert sent.size > 500 and abs(float(sent.std()) - 0.5) < 0.05
            assert abs(float(sent.mean())) < 0.05
            continue
        for k in want:
            delta = want[k] - g[k]
            if kind == "scale":
                np.testing.assert_allclose(arrays[k], g[k] + 4.0 * delta, rtol=1e-5, atol=1e-6)
            elif kind == "sign_flip":
                np.testing.assert_allclose(arrays[k], g[k] - 4.0 * delta, rtol=1e-5, atol=1e-6)
            else:
                assert np.isnan(arrays[k]).all()


def test_an_attack_starts_at_its_round(
    device_run: tuple[Path, ExperimentConfig],
    honest: tuple[dict[int, tuple[int, Arrays]], Arrays],
) -> None:
    run_dir, cfg = device_run
    attack = {"kind": "nan", "fraction": 0.25, "start_round": 2}
    got, _ = _train(run_dir, cfg, "state-late", attack)
    for d, (_, arrays) in got.items():
        assert all(arrays[k].tobytes() == v.tobytes() for k, v in honest[0][d][1].items())


def test_label_flip_changes_training_labels_only_on_malicious_devices(
    device_run: tuple[Path, ExperimentConfig],
    honest: tuple[dict[int, tuple[int, Arrays]], Arrays],
) -> None:
    run_dir, cfg = device_run
    attack = AttackConfig(kind="label_flip", fraction=0.25)
    spec = ModelSpec(name="logistic", input_shape=(1, 8, 8), num_classes=10)
    task = RoundInstructions(
        round=1,
        seed=SEED,
        model_spec=spec.model_dump_json(),
        client=cfg.client,
        evaluation=cfg.evaluation,
        attack=attack,
        num_devices=N,
    )
    env = DeviceEnv(None, run_dir)
    bad = malicious_devices(SEED, 0.25, N)
    for d in range(N):
        data = device_data(env, d)
        seen = poison_data(task, d, data)
        if d in bad:
            assert bool((seen.y_train == 9 - data.y_train).all())
        else:
            assert seen.y_train is data.y_train
        assert seen.y_test is data.y_test and seen.x_train is data.x_train
    got, _ = _train(run_dir, cfg, "state-label-flip", attack.model_dump())
    for d, (_, arrays) in got.items():
        same = all(arrays[k].tobytes() == v.tobytes() for k, v in honest[0][d][1].items())
        assert same == (d not in bad)


# -- server side -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("inflate_count", r"reported \d+ training examples; the server knows \d+ for this device"),
        ("nan", "NaN"),
    ],
)
def test_inflated_counts_and_nan_are_rejected_and_recorded(
    tmp_path: Path, kind: str, reason: str
) -> None:
    _run(tmp_path, f"attack.kind={kind}", "attack.fraction=0.25")
    bad = sorted(malicious_devices(SEED, 0.25, N))
    for row in _metrics(tmp_path):
        assert row["num_updates"] == N - 2 and row["num_rejected"] == 2
        assert [r["device"] for r in row["rejected"]] == bad
        assert all(re.search(reason, r["reason"]) for r in row["rejected"])


def test_clip_to_norm_bounds_the_distance_and_keeps_the_direction() -> None:
    ref = {"w": np.ones((3, 4), np.float32), "n": np.array([5], np.int64)}
    up = {"w": ref["w"] + np.float32(2.0), "n": np.array([7], np.int64)}  # distance sqrt(48)
    out = clip_to_norm(up, ref, 1.0)
    delta = out["w"].astype(np.float64) - ref["w"]
    assert math.isclose(float(np.linalg.norm(delta)), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(delta, np.full((3, 4), 1 / math.sqrt(12)), rtol=1e-6)
    assert out["w"].dtype == np.float32 and out["n"] is up["n"]
    assert clip_to_norm(up, ref, 100.0) is up


def _distance(a: Arrays, b: Arrays) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


def test_clip_norm_bounds_what_a_scaled_update_does(tmp_path: Path) -> None:
    attack = ("attack.kind=scale", "attack.fraction=0.25", "attack.scale=1000", "rounds=1")
    moved = {}
    for clip in (0.0, 0.5):
        d = tmp_path / f"clip{clip}"
        loop, final = _run(d, *attack, f"strategy.clip_norm={clip}")
        initial = ServerLoop(
            InProcessGrid(d, 1), loop.cfg, d, open_source(loop.cfg, d / PARTITION_FILE)
        ).global_arrays
        moved[clip] = _distance(final, initial)
        clipped = [r.get("num_clipped") for r in _metrics(d)]
        assert (clipped[0] >= 2) if clip else clipped == [None]  # the two attackers at least
    assert moved[0.0] > 50.0  # two devices x1000 drag FedAvg far away
    assert moved[0.5] <= 0.5 + 1e-5  # a mean of bounded moves is bounded


def test_bulyan_says_when_too_few_updates_were_accepted(tmp_path: Path) -> None:
    # 8 devices, f = 1: Bulyan needs 7; two NaN devices are rejected, leaving 6.
    with pytest.raises(AggregationError, match=r"needs at least 7 updates.*6 were accepted"):
        _run(
            tmp_path,
            "strategy.name=bulyan",
            "strategy.num_malicious=1",
            "attack.kind=nan",
            "attack.fraction=0.25",
        )


def test_bulyan_trains_under_attack(tmp_path: Path) -> None:
    loop, final = _run(
        tmp_path,
        "strategy.name=bulyan",
        "strategy.num_malicious=1",
        "attack.kind=sign_flip",
        "attack.fraction=0.125",
        "rounds=1",  # Flower's Bulyan runs gc.collect() per selected update: ~0.3 s each
    )
    assert isinstance(loop.aggregator, Aggregator)
    assert all(np.isfinite(v).all() for v in final.values())
    assert [r["num_updates"] for r in _metrics(tmp_path)] == [N]


def test_attack_none_leaves_metrics_byte_identical(tmp_path: Path) -> None:
    """The default, ``none`` with every other attack knob set, and an attack that would
    start after the last round: the same bytes (the machinery passes honest updates
    through untouched)."""
    _run(tmp_path / "default")
    _run(tmp_path / "none", "attack.fraction=0.5", "attack.scale=3", "attack.noise_std=2")
    _run(tmp_path / "late", "attack.kind=sign_flip", "attack.fraction=0.5", "attack.start_round=3")
    base = (tmp_path / "default" / METRICS_FILE).read_bytes()
    assert base == (tmp_path / "none" / METRICS_FILE).read_bytes()
    assert base == (tmp_path / "late" / METRICS_FILE).read_bytes()


def test_multikrum_averages_all_but_the_assumed_malicious(tmp_path: Path) -> None:
    """n - f best-scored updates, not Flower's default of one (which is Krum)."""
    InProcessGrid(tmp_path, 1)  # sets the task identity that Flower's Message needs
    cfg = _cfg("strategy.name=multikrum", "strategy.num_malicious=1")
    agg = Aggregator(cfg)
    updates = [(10.0, {"w": np.array([v], np.float32)}) for v in (0.0, 1.0, 3.0, 100.0)]
    assert agg.aggregate(1, updates)["w"][0] == pytest.approx(4 / 3)
    krum = Aggregator(_cfg("strategy.name=krum", "strategy.num_malicious=1"))
    assert krum.aggregate(1, updates)["w"][0] in (0.0, 1.0)


def test_a_diverged_device_reply_stays_readable() -> None:
    """A poisoned global model can make honest training diverge: the reply must still
    parse, so that the server rejects the NaN update with its reason (not the cohort)."""
    from common.protocol import TrainReport

    body = CohortReply(
        kind="train",
        train=[TrainReport(device=1, num_examples=5, train_loss=float("nan"), steps=2)],
        layout="stacked",
    )
    back = CohortReply.from_record_fields(body.to_record_fields())
    assert math.isnan(back.train[0].train_loss) and back.train[0].device == 1
