"""kill -9 at named points of a real run, then resume: identical results.

The run is the real ServerApp body (``server.app.run_experiment``: round loop,
registry, checkpoint, final model, summary) over the real ClientApp through the
in-process grid; the crash is a real SIGKILL of a forked child at a named point
(``common.crashpoint``). Resuming must give a ``metrics.jsonl`` byte-identical to
an uninterrupted run, the same final sha256, the same registry versions, and the
same personal state on every device (a device that trained in the lost round must
not keep that training).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest

from common.config import load_config
from common.crashpoint import CRASH_ENV
from common.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DEVICES_FILE,
    METRICS_FILE,
    REGISTRY_DIR,
    STATE_DIR,
    SUMMARY_FILE,
    prepare_run_dir,
)
from server.app import run_experiment
from server.checkpoint import ResumeError, read_checkpoint
from server.registry import Registry, RegistryError
from tests.inprocess_grid import InProcessGrid

ROUNDS = 3
BASE = [
    f"rounds={ROUNDS}",
    "partition.num_devices=4",
    "strategy.fraction_train=0.5",  # devices skip rounds: older state generations matter
    "model.name=logistic",
    "evaluation.devices=all",  # every round measures every device's personal model
    "evaluation.finetune_steps=1",
    "output.plot=false",
]
VARIANTS = {
    "fedavg": [],
    "fedadam": ['strategy.name="fedadam"'],
    "ditto": ['client.algorithm="ditto"'],
    # The default run's second variant: FedAdam's moments and Ditto's personal state at once.
    "fedavgm": ['strategy.name="fedavgm"'],  # server momentum
    "fedadam-ditto": ['strategy.name="fedadam"', 'client.algorithm="ditto"'],
    # The synchronous virtual clock: its time must continue where the checkpoint left it.
    "clock": ['clock.mode="sync"', 'clock.availability="bernoulli"', "clock.overcommit=1.5"],
}


def _run(run_dir: Path, resume: bool = False) -> None:
    run_experiment(InProcessGrid(run_dir, 2), run_dir, resume=resume)


def _crash(run_dir: Path, point: str, resume: bool) -> None:
    """Run in a forked child that SIGKILLs itself at ``point``."""
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child, args=(run_dir, point, resume))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, f"the run did not reach {point}"


def _child(run_dir: Path, point: str, resume: bool) -> None:
    os.environ[CRASH_ENV] = point
    _run(run_dir, resume)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _outcome(run_dir: Path) -> dict[str, object]:
    """Everything that must not depend on a crash and a resume."""
    registry = Registry(run_dir / REGISTRY_DIR)
    states = sorted((run_dir / STATE_DIR).glob("device-*.safetensors"))
    return {
        "metrics": (run_dir / METRICS_FILE).read_bytes(),
        "devices": (run_dir / DEVICES_FILE).read_bytes(),
        "final": json.loads((run_dir / SUMMARY_FILE).read_text())["model_sha256"],
        "versions": [(m.version, m.round, m.sha256) for m in registry.versions(0, 100)],
        "states": {p.name: _sha(p) for p in states},
    }


class Runs:
    """Prepared run folders (config + partition) and uninterrupted runs, per variant,
    made on first use and shared by the module's tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prepared: dict[str, Path] = {}
        self._reference: dict[str, dict[str, object]] = {}

    def fresh(self, name: str, dst: Path) -> Path:
        if name not in self._prepared:
            src = self.root / f"prep-{name}"
            prepare_run_dir(load_config(None, BASE + VARIANTS[name]), src)
            self._prepared[name] = src
        shutil.copytree(self._prepared[name], dst)
        return dst

    def reference(self, name: str) -> dict[str, object]:
        if name not in self._reference:
            d = self.fresh(name, self.root / f"ref-{name}")
            _run(d)
            self._reference[name] = _outcome(d)
        return self._reference[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("resume"))


POINTS = [
    "round-trained",  # mid-round: devices trained and saved their state, nothing recorded
    "publish-blob",  # during publish: blob stored, no version yet
    "publish-manifest",  # during publish: the lost round's version is registered
    "write-metrics.jsonl",  # during the metrics write: a torn last line
    "checkpoint-arrays",  # during the checkpoint write: arrays stored, not committed
    "checkpoint-commit",  # the commit's temp file written, not renamed
]
CASES = (
    [  # the default run: crashes in a row (a resumed run crashes again), two variants
        ("fedavg", ["round-trained@2", "publish-manifest@2", "write-metrics.jsonl@3"]),
        ("fedadam-ditto", ["checkpoint-commit@1", "round-trained@2", "checkpoint-arrays@3"]),
        ("clock", ["write-metrics.jsonl@2"]),
    ]
    + [  # slow: every point alone for FedAvg, FedAdam and Ditto, at rounds 1-3
        pytest.param(n, [f"{p}@{1 + (i + j) % ROUNDS}"], marks=pytest.mark.slow)
        for i, n in enumerate(["fedavg", "fedadam", "ditto"])
        for j, p in enumerate(POINTS)
    ]
    + [pytest.param("fedavgm", ["round-trained@3"], marks=pytest.mark.slow)]
)


@pytest.mark.parametrize(("name", "points"), CASES)
def test_kill_then_resume_is_identical(
    runs: Runs, tmp_path: Path, name: str, points: list[str]
) -> None:
    want = runs.reference(name)  # first: forked children start with warm caches (~1 s, not ~6)
    d = runs.fresh(name, tmp_path / "run")
    for i, point in enumerate(points):
        _crash(d, point, resume=i > 0)
    _run(d, resume=True)
    got = _outcome(d)
    for key in want:
        assert got[key] == want[key], f"{key} differs after a crash at {points}"
    ck = read_checkpoint(d)
    assert ck is not None and ck.round == ROUNDS
    assert [p.name for p in (d / CHECKPOINT_DIR).glob("round-*")] == [ck.arrays_file]


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing(runs: Runs, tmp_path: Path) -> None:
    d = runs.fresh("fedavg", tmp_path / "run")
    _run(d)
    _run(d, resume=True)
    assert _outcome(d) == runs.reference("fedavg")


def test_edited_config_is_refused(runs: Runs, tmp_path: Path) -> None:
    runs.reference("fedavg")  # warm caches for the forked child
    d = runs.fresh("fedavg", tmp_path / "run")
    _crash(d, "round-trained@2", resume=False)
    with (d / CONFIG_FILE).open("a") as f:
        f.write("\n")
    with pytest.raises(ResumeError, match="changed after round 1"):
        _run(d, resume=True)


def test_other_bytes_for_a_published_round_are_refused(tmp_path: Path) -> None:
    from tests.serving_fixtures import SPEC, model_arrays

    registry = Registry(tmp_path / "reg")
    first = registry.publish(model_arrays(1), round=1, model=SPEC)
    assert registry.publish(model_arrays(1), round=1, model=SPEC) == first
    assert registry.count() == 1
    with pytest.raises(RegistryError, match="round 1 is already published as version 0"):
        registry.publish(model_arrays(2), round=1, model=SPEC)


def test_rollback_restores_the_checkpointed_generation(tmp_path: Path) -> None:
    """A device that trained after the checkpoint gets its earlier state back; one that
    had none loses the file; one untouched since keeps it; running it twice is a no-op."""
    import numpy as np

    from client.state import PersonalState, PersonalStateStore

    store = PersonalStateStore(tmp_path)

    def save(device: int, round_: int) -> None:
        arrays = {"w": np.full(3, round_, np.float32)}
        store.save(device, PersonalState(arrays, {"last_round": round_}), durable=False)

    save(0, 1)
    save(0, 3)  # trained again in the lost round 3
    save(1, 3)  # first trained in the lost round 3
    save(2, 1)
    save(2, 2)  # trained in round 2 (checkpointed)
    (tmp_path / ".tmp-device-000002.safetensors.x").write_bytes(b"killed mid-write")
    assert store.rollback(2) == [0, 1]
    assert store.rollback(2) == []
    state0, state2 = store.load(0), store.load(2)
    assert state0 is not None and state0.meta["last_round"] == 1
    assert state2 is not None and state2.meta["last_round"] == 2
    np.testing.assert_array_equal(state0.arrays["w"], np.full(3, 1, np.float32))
    assert store.load(1) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "device-000000.safetensors",
        "device-000002.safetensors",
        "device-000002.safetensors.prev",
    ]


def test_an_asynchronous_run_is_not_resumed(tmp_path: Path) -> None:
    d = tmp_path / "run"
    prepare_run_dir(
        load_config(
            None, [*BASE, 'clock.mode="async"', "clock.concurrency=2", "clock.buffer_size=1"]
        ),
        d,
    )
    with pytest.raises(ResumeError, match="asynchronous run cannot be resumed"):
        _run(d, resume=True)


def test_a_run_with_a_rollout_policy_is_not_resumed(tmp_path: Path) -> None:
    d = tmp_path / "run"
    prepare_run_dir(load_config(None, [*BASE, 'rollout.policy="shadow"']), d)
    with pytest.raises(ResumeError, match="rollout policy cannot be resumed"):
        _run(d, resume=True)
