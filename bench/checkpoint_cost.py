"""What resuming costs a run that never crashes: the per-round checkpoint and the kept
personal-state generation.

Run: ``python bench/checkpoint_cost.py [--reps 20]`` (in-process, a few seconds; no
process is started, temp folders are removed).

Side by side, for the digits logistic model, McMahan's CNN on digits and on FEMNIST
(28x28, 62 classes), with FedAvg (no strategy state) and FedAdam (two moments):

- server, per round: ``save_checkpoint`` (global + strategy arrays, fsynced, then the
  JSON commit point) next to ``Registry.publish`` of the same weights, which every
  round already pays (both fsync);
- device, per training: ``PersonalStateStore.save`` (hard link to ``.prev`` + atomic
  write) next to the plain atomic write it was before (simulation: no fsync).

Medians over ``--reps``, the two sides called alternately (each first every other
time); the table goes to ``bench/results/checkpoint_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import round_overhead as ro  # noqa: E402

from client.state import PersonalState, PersonalStateStore  # noqa: E402
from common.atomic import atomic_write_bytes  # noqa: E402
from common.config import load_config  # noqa: E402
from common.models import ModelSpec, build_model  # noqa: E402
from common.rundir import CONFIG_FILE, REGISTRY_DIR  # noqa: E402
from common.weights import Arrays, model_to_arrays, to_safetensors  # noqa: E402
from server.aggregation import Aggregator  # noqa: E402
from server.checkpoint import save_checkpoint  # noqa: E402
from server.recording import Recorder  # noqa: E402
from server.registry import Registry  # noqa: E402

RESULTS = BENCH / "results" / "checkpoint_cost.md"
MODELS = {
    "logistic, digits": ModelSpec(name="logistic", input_shape=(1, 8, 8), num_classes=10),
    "cnn, digits": ModelSpec(name="cnn", input_shape=(1, 8, 8), num_classes=10),
    "cnn, femnist": ModelSpec(name="cnn", input_shape=(1, 28, 28), num_classes=62),
}


@dataclass
class _Loop:
    """What ``save_checkpoint`` reads of the round loop."""

    run_dir: Path
    global_arrays: Arrays
    aggregator: Aggregator
    recorder: Recorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = Recorder(self.run_dir)


def _paired_ms(
    fa: Callable[[int], object], fb: Callable[[int], object], reps: int
) -> tuple[float, float]:
    """Medians of ``fa`` and ``fb``, called alternately (load on a shared machine hits
    both alike)."""
    ta, tb = [], []
    for i in range(reps):
        pairs = ((fa, ta), (fb, tb))
        for fn, out in pairs if i % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            fn(i)
            out.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def _aggregator(strategy: str, arrays: Arrays) -> Aggregator:
    agg = Aggregator(load_config(None, [f"strategy.name={strategy}"]))
    agg.configure(1, arrays)
    noisy = {k: v + np.float32(0.01) for k, v in arrays.items()}
    agg.aggregate(1, [(1.0, noisy)])  # FedAdam's moments now exist
    return agg


def _server_row(label: str, spec: ModelSpec, arrays: Arrays, strategy: str, reps: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / CONFIG_FILE).write_text("name = 'bench'\n")
        loop = _Loop(run, arrays, _aggregator(strategy, arrays))
        reg = Registry(run / REGISTRY_DIR)

        def checkpoint(i: int) -> None:
            save_checkpoint(loop, i)  # type: ignore[arg-type]

        def publish(i: int) -> None:  # other bytes each time: a new blob, as every round
            reg.publish({**arrays, "_": np.array([i])}, round=i, model=spec)

        ck, pub = _paired_ms(checkpoint, publish, reps)
    size = len(to_safetensors(arrays))
    return [label, f"{size / 1e6:.2f} MB", strategy, f"{ck:.1f}", f"{pub:.1f}", f"{ck / pub:.2f}"]


def _device_row(label: str, arrays: Arrays, reps: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        store = PersonalStateStore(Path(tmp))
        state = PersonalState(arrays=arrays, meta={"last_round": 1})
        blob = to_safetensors(arrays)

        def plain(i: int) -> None:
            atomic_write_bytes(store.path(i % 8), blob, durable=False)

        def kept(i: int) -> None:
            store.save(i % 8, state, durable=False)

        a, b = _paired_ms(kept, plain, reps)
    size = len(blob)
    return [label, f"{size / 1e6:.2f} MB", "device save", f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}"]


def measure(reps: int) -> list[list[str]]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # as in a ServerApp
    rows = []
    for label, spec in MODELS.items():
        arrays = model_to_arrays(build_model(spec, seed=0))
        rows += [_server_row(label, spec, arrays, s, reps) for s in ("fedavg", "fedadam")]
        rows.append(_device_row(label, arrays, reps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows = measure(args.reps)
    head = ["model", "weights", "what", "with resume (ms)", "baseline (ms)", "ratio"]
    lines = [
        "# Checkpoint cost (bench/checkpoint_cost.py)",
        "",
        f"Machine: {ro.machine()}; load average before: {load}, after: "
        + " ".join(Path("/proc/loadavg").read_text().split()[:3])
        + f"; medians of {args.reps}.",
        "",
        "Server rows: `save_checkpoint` vs `Registry.publish` of the same weights (paid "
        "every round already). Device rows: `PersonalStateStore.save` (keeps `.prev`) vs the "
        "plain atomic write, no fsync (simulation).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
