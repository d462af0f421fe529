"""Synchronous rounds with a deadline vs FedBuff, on one population and one clock.

Run: ``python bench/clock.py [--data ../shared/data/mnist.npz] [--rounds 30]``.

The workload is ``configs/cross_device_sync.toml``: MNIST split over 1,000 devices
(Dirichlet(0.5) label skew, about 60 examples each), McMahan et al.'s 2NN, E=1, B=10,
lr 0.05; every device has a sampled phone-class profile (the config gives the sources)
and a nightly availability window in its own time zone. Variants, all on the same
profiles (the config itself is sync-1.3; configs/cross_device_async.toml is
fedbuff-100/10):

* ``sync-wait``: 50 devices per round, no over-commitment, no deadline (waits for the
  slowest device of each round);
* ``sync-1.0``: the same with a deadline (stragglers dropped, fewer than 50 results);
* ``sync-1.3``: 65 selected, the first 50 results before the deadline kept;
* ``fedbuff-65/50``: FedBuff with 65 devices in flight, aggregating every 50 arrivals;
* ``fedbuff-100/10``: FedBuff as in its paper's setting (K=10), 5x the aggregations, so
  every variant aggregates the same number of updates.

What is reported: virtual time to the global and the personalized accuracy targets,
devices dropped (offline / deadline), results discarded as late, mean staleness, the
final accuracies, and the host's wall time. The runs use the real ServerLoop and
ClientApp with an in-process transport (``tests/inprocess_grid.py``), not Ray: the
comparison is between aggregation schemes on the virtual clock, and the clock's cost
in a real Flower/Ray run is variant (e) of ``bench/cross_device.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import round_overhead as ro  # noqa: E402

from common.config import load_config  # noqa: E402
from common.data import open_source  # noqa: E402
from common.rows import read_rows  # noqa: E402
from common.rundir import METRICS_FILE, PARTITION_FILE, prepare_run_dir  # noqa: E402
from server.loop import ServerLoop  # noqa: E402
from server.summary import summarize  # noqa: E402
from simulation.progress import virtual_time  # noqa: E402
from tests.inprocess_grid import InProcessGrid  # noqa: E402

RESULTS = BENCH / "results" / "clock.md"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist.npz"
CONFIG = ROOT / "configs" / "cross_device_sync.toml"
TARGETS = (0.75, 0.70)
"""The config's clock.target_accuracy and clock.target_personal_accuracy (checked)."""


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Overrides of ``configs/cross_device_sync.toml`` (whose own settings are sync-1.3)."""
    r, d = args.rounds, args.deadline
    sync = [f"rounds={r}", f"clock.deadline_s={d}"]
    fedbuff = ["clock.mode=async", "clock.deadline_s=0"]
    return {
        "sync-wait": [f"rounds={r}", "clock.overcommit=1.0", "clock.deadline_s=0"],
        "sync-1.0": [*sync, "clock.overcommit=1.0"],
        "sync-1.3": [*sync, "clock.overcommit=1.3"],
        "fedbuff-65/50": [
            f"rounds={r}",
            *fedbuff,
            "clock.concurrency=65",
            "clock.buffer_size=50",
        ],
        "fedbuff-100/10": [
            f"rounds={5 * r}",
            *fedbuff,
            "clock.concurrency=100",
            "clock.buffer_size=10",
            "evaluation.every=10",
        ],
    }


def run_variant(name: str, sets: list[str], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cfg = load_config(CONFIG, ["name=clock", f"data.path={args.data}", *sets])
    run_dir = tmp / name.replace("/", "-")
    prepare_run_dir(cfg, run_dir)
    source = open_source(cfg, run_dir / PARTITION_FILE)
    t0 = time.perf_counter()
    ServerLoop(InProcessGrid(run_dir, 4), cfg, run_dir, source).run()
    wall = time.perf_counter() - t0
    rows = read_rows(run_dir / METRICS_FILE)
    s = summarize(rows, (cfg.clock.target_accuracy, cfg.clock.target_personal_accuracy))
    last = s.get("last") or {}
    return {
        "name": name,
        "sets": sets,
        "wall_s": wall,
        "clock": s["clock"],
        "updates": s["num_updates"],
        "global": last.get("global_test_acc"),
        "personal": last.get("device_personal_acc"),
    }


def _reached(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    if t["virtual_hours"] is None:
        return "not reached"
    return f"{virtual_time(t['virtual_hours'])} (agg. {t['round']})"


def report(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    load = os.getloadavg()
    lines = [
        "# Virtual clock: synchronous rounds with a deadline vs FedBuff",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in ro.machine().items()),
        f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(virtual times do not depend on it; wall times do).",
        "",
        f"MNIST, {args.devices:,} devices (Dirichlet(0.5)), 2NN, E=1, B=10; profiles sampled "
        "from (seed 0, device id) with median speed 100 samples/s, 20 / 5 Mbit/s down / up "
        f"(lognormal); diurnal availability (8 h nightly window, time zones over 24 h); "
        f"deadline {args.deadline:g} s where set; targets: global test "
        f"{100 * TARGETS[0]:.0f}%, personalized on devices {100 * TARGETS[1]:.0f}%. "
        "In-process transport (real ServerLoop and ClientApp, no Ray).",
        "",
        "| variant | updates | virtual time | to global target | to personalized target "
        "| dropped offline / deadline | late (discarded) | mean staleness | final global "
        "| final personalized | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["clock"]
        stale = "-" if c["mean_staleness"] is None else f"{c['mean_staleness']:.2f}"
        lines.append(
            f"| {r['name']} | {r['updates']:,} | {virtual_time(c['virtual_hours'])} "
            f"| {_reached(c.get('time_to_global_accuracy'))} "
            f"| {_reached(c.get('time_to_personal_accuracy'))} "
            f"| {c['dropped_offline']} / {c['dropped_deadline']} | {c['late']} | {stale} "
            f"| {100 * (r['global'] or 0):.1f}% | {100 * (r['personal'] or 0):.1f}% "
            f"| {r['wall_s']:.0f} s |"
        )
    lines += ["", "Settings of each variant (overrides of configs/cross_device_sync.toml):", ""]
    lines += [f"- {r['name']}: `{' '.join(r['sets'])}`" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--deadline", type=float, default=8.0)
    p.add_argument("--variants", default="")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cfg = load_config(CONFIG, [])
    assert (cfg.clock.target_accuracy, cfg.clock.target_personal_accuracy) == TARGETS
    if not args.data.is_file():
        print(f"error: MNIST not found at {args.data} (pass --data PATH)", file=sys.stderr)
        return 2
    command = "python bench/clock.py " + " ".join(sys.argv[1:] if argv is None else argv)
    wanted = [v for v in args.variants.split(",") if v] or list(variants(args))
    results = []
    with tempfile.TemporaryDirectory(prefix="hfl-clock-") as tmp:
        for name in wanted:
            sets = variants(args)[name]
            print(f"running {name} ...", flush=True)
            r = run_variant(name, sets, args, Path(tmp))
            print(json.dumps({k: r[k] for k in ("name", "wall_s", "global", "personal")}))
            results.append(r)
    text = report(results, args, command)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
