"""A population of 100,000 synthetic devices costs what its round's work costs.

The run uses the real ServerLoop and ClientApp (in-process transport): the
population comes from the generator (no partition file, no message per device),
each round trains 100 devices in cohort messages, evaluation samples devices, and
only devices that trained leave personal state on disk.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

from common.config import load_config
from common.data import open_source
from common.rundir import METRICS_FILE, PARTITION_FILE, STATE_DIR, prepare_run_dir
from server.loop import ServerLoop
from tests.inprocess_grid import InProcessGrid


def test_a_100k_device_synthetic_population_runs_two_rounds(tmp_path: Path) -> None:
    n = 100_000
    cfg = load_config(
        None,
        [
            "rounds=2",
            f"partition.num_devices={n}",
            'partition.method="natural"',
            'data.dataset="synthetic"',
            'model.name="logistic"',
            "strategy.fraction_train=0.001",
            "strategy.min_train_devices=100",
            "evaluation.sample_devices=40",
            "evaluation.holdout_fraction=0.01",
            "evaluation.finetune_steps=1",
            "client.batch_size=50",
        ],
    )
    prepare_run_dir(cfg, tmp_path)
    assert not (tmp_path / PARTITION_FILE).exists()  # generated per device, nothing stored
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grid = InProcessGrid(tmp_path, 4)
    loop = ServerLoop(grid, cfg, tmp_path, open_source(cfg, None))
    assert loop.population.size == n and loop.population.holdout().size == 1000
    loop.run()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["num_updates"] for r in rows] == [100, 100]
    assert rows[-1]["eval_mode"] == "sample"
    assert rows[-1]["devices"]["num_devices"] == 40
    assert rows[-1]["holdout"]["num_devices"] == 40
    assert all(0 < r["train_loss"] < 10 for r in rows)
    # 4 messages per round (one per slot), not 100; no hello, no per-device message.
    per_round = [m for m in grid.sent if m.metadata.group_id == "1"]
    assert sum(m.metadata.message_type == "train" for m in per_round) == 4
    states = list((tmp_path / STATE_DIR).glob("*.safetensors"))
    assert 100 <= len(states) <= 200  # only devices that trained
    assert (rss1 - rss0) < 400 * 1024  # KiB: far below what 10^5 devices of state would take


def test_iid_split_is_flwr_datasets_iid_partitioner_without_its_cost() -> None:
    """``_iid`` is np.array_split of the seeded pool order: the same partitions as
    flwr-datasets' IidPartitioner over that order (checked here), without one HF
    ``select`` per device (~20 s at 10,000 devices)."""
    import numpy as np
    from flwr_datasets.partitioner import IidPartitioner

    from common.config import PartitionConfig
    from common.data.partition import _iid, _pool_dataset, _read_flwr

    y = np.random.default_rng(0).integers(0, 10, size=503)
    for n in (1, 7, 50):
        part = IidPartitioner(num_partitions=n)
        part.dataset = _pool_dataset(y, 42)
        want = _read_flwr(part, n)
        got = _iid(y, PartitionConfig(method="iid", num_devices=n), 42)
        assert len(got) == n and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
