"""Cross-device rounds: 100 of 10,000 MNIST devices per round, four ways.

Run: ``python bench/cross_device.py [--rounds 5] [--warmup 1] [--variants a,b,c,d,e]``.

The workload (McMahan et al.'s 2NN on MNIST, IID split over ``--devices`` devices,
``--per-round`` devices per round, E=1, B=10, plain SGD lr 0.05, FedAvg) run four
ways, one after the other on the same machine, each as its own process tree:

(a) floor: one process, no FL framework: the same devices (hybridfl's seeded
    selection), the same data (hybridfl's partition), the same SGD steps, on a pool of
    one thread per core with one torch thread each; then the weighted average.
(b) Flower quickstart style: ``bench/flower_cross_device_app`` (ClientApp/ServerApp as
    in Flower's examples/quickstart-pytorch, ``FedAvg`` + ``strategy.start``) with one
    virtual SuperNode per device (``num-supernodes`` = the population), under a fresh
    SuperLink in simulation mode. ``--flower-devices`` measures it at a smaller
    population when Flower cannot start the full one in reasonable time.
(c) hybridfl default: ``hybridfl simulate configs/mcmahan_2nn_iid.toml`` with the
    population, cohort and evaluation set by ``--set``.
(d) (c) with ``simulation.preaggregate=true``.
(e) (c) on the virtual clock (``clock.mode=sync``, diurnal availability, 1.3x
    over-commitment): the same training work (only the kept devices train), so e/c
    is the cost of the clock itself (target <= 1.05).

Round time: (a) global weights -> averaged weights; (b) ``configure_train`` -> end of
``aggregate_train``; (c), (d) ``train_s`` of timings.jsonl. Steady = median of the
rounds after ``--warmup``. Time to first round: from the launch of the variant's
process (SuperLink and Ray start included) to the end of round 1. Framework overhead
per device: (x - a) / per-round. Evaluation: hybridfl evaluates only the last round
(``evaluation.every`` = rounds) on its participants (``evaluation.devices =
"participants"``) without fine-tuning; (b) has no federated evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import round_overhead as ro  # noqa: E402

from simulation.procs import Processes  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist.npz"
FLOWER_APP = BENCH / "flower_cross_device_app"
CONFIG = ROOT / "configs" / "mcmahan_2nn_iid.toml"
RESULTS = BENCH / "results" / "cross_device.md"
LR = 0.05  # configs/mcmahan_2nn_iid.toml
BATCH_SIZE = 10
LOCAL_EPOCHS = 1
TARGETS = {"c/a": 1.3, "b/c": 3.0, "overhead_ms": 2.0, "e/c": 1.05}
CLOCK_SETS = ["clock.mode=sync", "clock.availability=diurnal", "clock.overcommit=1.3"]


def hybridfl_sets(args: argparse.Namespace, n_devices: int) -> list[str]:
    """The ``--set`` overrides that turn configs/mcmahan_2nn_iid.toml into this workload."""
    rounds = args.warmup + args.rounds
    return [
        f"partition.num_devices={n_devices}",
        f"strategy.fraction_train={args.per_round / n_devices}",
        f"strategy.min_train_devices={args.per_round}",
        f"rounds={rounds}",
        f"evaluation.every={rounds}",
        'evaluation.devices="participants"',
        "evaluation.finetune_steps=0",
        f'data.path="{Path(args.data).resolve()}"',
        "output.plot=false",
    ]


# ------------------------------------------------------------------ shared bits
def build_partition_file(args: argparse.Namespace, n_devices: int, path: Path) -> None:
    """hybridfl's own partition of this config, for (a) and (b) to use the same data."""
    from common.config import load_config
    from common.data.loaders import load_dataset
    from common.data.partition import build_partition, save_partition

    sets = hybridfl_sets(args, n_devices)
    cfg = load_config(CONFIG, sets)
    save_partition(build_partition(load_dataset(cfg.data), cfg), path)


# ------------------------------------------------------------------ (a) floor
def floor_child(args: argparse.Namespace) -> dict[str, Any]:
    """Variant (a): the same devices, data and SGD steps in one process, no framework."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from torch.nn import functional as F

    from common.data.loaders import load_npz
    from common.data.partition import device_arrays, load_partition
    from common.models import ModelSpec, build_model
    from common.seeding import derive_seed, sample_devices, torch_generator

    torch.set_num_threads(1)
    dataset = load_npz(Path(args.data))
    partition = load_partition(Path(args.partition))
    n = partition.num_devices
    spec = ModelSpec(name="mlp2nn", input_shape=(1, 28, 28), num_classes=10)
    global_sd = {
        k: v.clone() for k, v in build_model(spec, seed=derive_seed(0, "init")).state_dict().items()
    }
    local = threading.local()

    def train_device(device: int, rnd: int) -> tuple[dict[str, torch.Tensor], int, int]:
        model = getattr(local, "model", None)
        if model is None:
            model = local.model = build_model(spec)
        model.load_state_dict(global_sd)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        gen = torch_generator(0, "train", rnd, device)
        x_np, y_np, _, _ = device_arrays(dataset, partition, device)
        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np).long()
        m = int(y.shape[0])
        model.train()
        steps = 0
        for _ in range(LOCAL_EPOCHS):
            order = torch.randperm(m, generator=gen)
            for start in range(0, m, BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                float(loss.detach())
                steps += 1
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, m, steps

    rounds, steps_total = [], 0
    pool_ids = np.arange(n)
    with ThreadPoolExecutor(max_workers=args.slots) as pool:
        for rnd in range(1, args.warmup + args.rounds + 1):
            t0, start = time.perf_counter(), time.time()
            chosen = sample_devices(0, rnd, pool_ids, args.per_round / n, args.per_round)
            results = list(pool.map(lambda d, r=rnd: train_device(d, r), chosen))
            total = sum(m for _, m, _ in results)
            avg = {k: torch.zeros_like(v) for k, v in global_sd.items()}
            for sd, m, _ in results:
                for k, acc in avg.items():
                    acc.add_(sd[k], alpha=m / total)
            global_sd = avg
            dt = time.perf_counter() - t0
            steps_total = sum(s for _, _, s in results)
            rounds.append({"round": rnd, "train_s": dt, "start": start, "end": start + dt})
            print(f"floor round {rnd}: {dt:.3f}s ({len(chosen)} devices)", flush=True)
    return {"rounds": rounds, "steps_per_round": steps_total, "samples": total}


# ------------------------------------------------------------------ (b) Flower app
def flower_child(args: argparse.Namespace) -> dict[str, Any]:
    """Variant (b): the quickstart-style app, one virtual SuperNode per device."""
    work = Path(args.workdir).resolve()
    n = args.n_devices
    total_rounds = args.warmup + args.rounds
    run_config: dict[str, str | int | float | bool] = {
        "num-server-rounds": total_rounds,
        "fraction-train": args.per_round / n,
        "min-train-nodes": args.per_round,
        "learning-rate": LR,
        "batch-size": BATCH_SIZE,
        "local-epochs": LOCAL_EPOCHS,
        "num-devices": n,
        "data-path": str(Path(args.data).resolve()),
        "partition-path": str(Path(args.partition).resolve()),
        "rounds-file": str(work / "rounds.jsonl"),
        "keep-personal": False,
    }
    fed = {"num-supernodes": n, "client-resources-num-cpus": 1}
    status, run_id, rows = ro.drive_flower_app(
        work, FLOWER_APP, run_config, fed, total_rounds, args.timeout
    )
    rounds = [
        {
            "round": r["round"],
            "train_s": float(r["end"]) - float(r["start"]),
            "start": r["start"],
            "end": r["end"],
            "replies": r["replies"],
            "errors": r["errors"],
        }
        for r in rows
    ]
    return {"status": status, "run_id": run_id, "rounds": rounds}


# ------------------------------------------------------------------ parent
@dataclass
class Result:
    """One variant's measurement, beyond ``ro.Variant``: population and first round."""

    v: ro.Variant
    population: int
    first_round_s: float | None = None
    """Launch -> end of round 1 (SuperLink and Ray start included)."""
    extra: dict[str, Any] = field(default_factory=dict)


def _first_round(v: ro.Variant, launch: float) -> float | None:
    ends = [float(r["end"]) for r in v.rounds if r.get("end") is not None]
    return (min(ends) - launch) if ends else None


def measure(
    v: ro.Variant,
    cmd: list[str],
    log: Path,
    args: argparse.Namespace,
    watch: Path | None = None,
    timeout_s: float | None = None,
) -> tuple[ro.TreeSampler | None, float]:
    """``ro.measure`` plus the launch instant (time.time())."""
    launch: list[float] = []  # time.time() when ro.measure starts the process
    orig = Processes.start

    def start(self: Processes, *a: Any, **kw: Any) -> Any:
        if not launch:
            launch.append(time.time())
        return orig(self, *a, **kw)

    Processes.start = start  # type: ignore[method-assign]
    try:
        sampler = ro.measure(v, cmd, log, args, watch=watch, timeout_s=timeout_s)
    finally:
        Processes.start = orig  # type: ignore[method-assign]
    return sampler, (launch[0] if launch else time.time())


def run_floor(args: argparse.Namespace, tmp: Path, partition: Path) -> Result:
    v = ro.Variant("a", f"floor: plain PyTorch, {args.slots} thread slots x 1 torch thread")
    result = tmp / "a.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "floor",
        "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--data", str(args.data),
        "--partition", str(partition), "--per-round", str(args.per_round),
        "--slots", str(args.slots), "--result", str(result),
    ]  # fmt: skip
    sampler, launch = measure(v, cmd, tmp / "logs" / "a.log", args)
    if result.exists():
        data = json.loads(result.read_text())
        v.rounds = data["rounds"]
        v.notes.append(f"{data['steps_per_round']} SGD steps over {data['samples']} samples")
    if sampler is not None:
        v.add_round_cpu(sampler)
    return Result(v, args.devices, _first_round(v, launch))


def run_flower(args: argparse.Namespace, tmp: Path, partition: Path, n: int) -> Result:
    v = ro.Variant("b", f"Flower quickstart style, {n:,} SuperNodes (FedAvg + strategy.start)")
    work = tmp / "b"
    result = tmp / "b.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "flower",
        "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--data", str(args.data),
        "--partition", str(partition), "--per-round", str(args.per_round),
        "--n-devices", str(n), "--workdir", str(work), "--timeout", str(args.flower_timeout),
        "--result", str(result),
    ]  # fmt: skip
    sampler, launch = measure(
        v, cmd, tmp / "logs" / "b.log", args, timeout_s=args.flower_timeout + 120
    )
    if result.exists():
        data = json.loads(result.read_text())
        v.rounds = data["rounds"]
        if data["status"] != "finished:completed":
            v.error = f"run status {data['status']}; see {work / 'logs'}"
        bad = [r["round"] for r in v.rounds if r["replies"] != args.per_round or r["errors"]]
        if bad:
            v.error = f"rounds {bad} without {args.per_round} good replies"
    if sampler is not None:
        v.add_round_cpu(sampler)
    return Result(v, n, _first_round(v, launch))


def run_hybridfl(
    key: str,
    title: str,
    config: Path,
    sets: list[str],
    args: argparse.Namespace,
    tmp: Path,
    expect_updates: int,
    timeout_s: float | None = None,
) -> tuple[ro.Variant, float | None, dict[str, Any]]:
    """One ``hybridfl simulate`` run: rounds from timings.jsonl, instants from the sampler."""
    from common.rundir import METRICS_FILE, TIMINGS_FILE, read_jsonl

    v = ro.Variant(key, title)
    run_dir = tmp / key
    cmd = [*ro._hybridfl_cmd(), "simulate", str(config), "--out", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    sampler, launch = measure(
        v, cmd, tmp / "logs" / f"{key}.log", args, watch=run_dir / TIMINGS_FILE, timeout_s=timeout_s
    )
    v.rounds = [dict(r) for r in read_jsonl(run_dir / TIMINGS_FILE)]
    extra: dict[str, Any] = {}
    first = None
    if sampler is not None:
        for r, seen in zip(v.rounds, sampler.line_seen_at, strict=False):
            end = seen - (float(r["round_s"]) - float(r["train_s"]))
            r["start"], r["end"] = end - float(r["train_s"]), end
        v.add_round_cpu(sampler)
        if sampler.line_seen_at:
            first = sampler.line_seen_at[0] - launch
            # before the round loop: launch -> the loop's t_start (elapsed_s counts from it)
            extra["before_loop_s"] = first - float(v.rounds[0]["elapsed_s"])
    metrics = read_jsonl(run_dir / METRICS_FILE)
    bad = [m["round"] for m in metrics if m.get("num_updates") != expect_updates]
    if bad and v.error is None:
        v.error = f"rounds {bad} had not {expect_updates} valid updates"
    if len(v.rounds) < args.warmup + args.rounds and v.error is None:
        v.error = f"only {len(v.rounds)} rounds recorded"
    return v, first, extra


def run_c(args: argparse.Namespace, tmp: Path, key: str) -> Result:
    sets = hybridfl_sets(args, args.devices)
    title = "hybridfl simulate (defaults)"
    if key == "d":
        sets.append("simulation.preaggregate=true")
        title = "hybridfl simulate, simulation.preaggregate=true"
    if key == "e":
        sets += CLOCK_SETS
        title = "hybridfl simulate on the virtual clock (" + ", ".join(CLOCK_SETS) + ")"
    sets += args.hybridfl_set
    v, first, extra = run_hybridfl(key, title, CONFIG, sets, args, tmp, args.per_round)
    return Result(v, args.devices, first, extra)


def _fmt(x: float | None, unit: str = "s", nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f} {unit}"


def report(results: list[Result], args: argparse.Namespace, command: str) -> str:
    w = args.warmup
    mach = ro.machine()
    by = {r.v.key: r for r in results}
    steady = {k: r.v.steady(w) for k, r in by.items() if r.v.error is None}
    lines = [
        "# Cross-device rounds: floor vs Flower (one SuperNode per device) vs hybridfl",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()),
        "",
        f"hybridfl code: {ro.code_version(ROOT)}",
        "",
        f"Workload: MNIST ({args.data.name}), IID split over {args.devices:,} devices "
        f"(hybridfl's partitioner, test_fraction 0.01: ~5 training samples per device, so one "
        f"SGD step per device), McMahan 2NN, {args.per_round} devices per round "
        f"(fraction {args.per_round / args.devices:g}), E={LOCAL_EPOCHS}, B={BATCH_SIZE}, "
        f"SGD lr {LR}, FedAvg; {w} warm-up + {args.rounds} measured rounds (steady = median "
        f"of rounds {w + 1}..{w + args.rounds}). hybridfl: evaluation only in the last round, "
        "on its participants, no fine-tuning (`evaluation.every` = rounds, "
        '`evaluation.devices="participants"`, `evaluation.finetune_steps=0`); compared '
        "time is `train_s`.",
        "",
        "| variant | population | steady round (median) | best | all rounds (s) "
        "| overhead per device vs (a) | time to first round | CPU-s per round (tree) "
        "| others' cores in rounds | peak RSS, tree (sum VmRSS) | peak private (RssAnon) "
        "| processes | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    a = steady.get("a")
    for r in results:
        v = r.v
        s = v.steady(w)
        over = (s - a) / args.per_round * 1000 if (a is not None and s is not None) else None
        times = ", ".join(f"{float(x['train_s']):.2f}" for x in v.rounds) or "-"
        others = v.steady(w, "others_cores")
        lines.append(
            f"| ({v.key}) {v.title} | {r.population:,} | {_fmt(s, nd=3)} "
            f"| {_fmt(v.steady(w, best=True), nd=3)} | {times} "
            f"| {'-' if v.key == 'a' else _fmt(over, 'ms', 1)} | {_fmt(r.first_round_s, nd=1)} "
            f"| {_fmt(v.steady(w, 'cpu_s'))} | {'n/a' if others is None else f'{others:.2f}'} "
            f"| {ro._mb(v.peak_rss_kb)} | {ro._mb(v.peak_anon_kb)} | {v.max_procs} "
            f"| {v.wall_s:.0f} s |"
        )
    lines += ["", "Ratios of steady round times, and targets:", ""]

    def ratio(x: str, y: str) -> float | None:
        return (steady[x] / steady[y]) if steady.get(x) and steady.get(y) else None

    for name, val, tgt, le in (
        ("c/a", ratio("c", "a"), TARGETS["c/a"], True),
        ("d/a", ratio("d", "a"), TARGETS["c/a"], True),
        ("b/c", ratio("b", "c"), TARGETS["b/c"], False),
        ("b/d", ratio("b", "d"), TARGETS["b/c"], False),
        ("b/a", ratio("b", "a"), None, True),
        ("e/c", ratio("e", "c"), TARGETS["e/c"], True),
    ):
        if val is None:
            continue
        verdict = ""
        if tgt is not None:
            ok = val <= tgt if le else val >= tgt
            verdict = f" (target {'<=' if le else '>='} {tgt}: {'meets' if ok else 'MISSES'})"
        lines.append(f"- {name} = {val:.2f}{verdict}")
    if a is not None:
        for k in ("b", "c", "d", "e"):
            if steady.get(k) is not None:
                ms = (steady[k] - a) / args.per_round * 1000
                ok = "meets" if ms <= TARGETS["overhead_ms"] else "MISSES"
                lines.append(
                    f"- ({k}) framework overhead per device = {ms:.1f} ms "
                    f"(target <= {TARGETS['overhead_ms']} ms: {ok})"
                )
    if "b" in by and by["b"].population != args.devices:
        lines.append(
            f"- (b) ran with {by['b'].population:,} SuperNodes, not {args.devices:,} (see notes)"
        )
    lines += ["", "Per round (time; tree CPU-s; others' cores):", ""]
    for r in results:
        cells = [
            f"r{x['round']} {float(x['train_s']):.2f}s; {float(x.get('cpu_s') or 0):.2f}; "
            f"{float(x.get('others_cores') or 0):.2f}"
            for x in r.v.rounds
        ]
        lines.append(f"- ({r.v.key}) " + " | ".join(cells))
    lines += ["", "CPU-s per steady round by process (median):", ""]
    for r in results:
        parts = [f"{n} {x:.2f}" for n, x in r.v.cpu_by_name(w).items() if x >= 0.02]
        lines.append(f"- ({r.v.key}) " + (", ".join(parts) or "n/a"))
    lines.append("")
    for r in results:
        v = r.v
        for note in v.notes:
            lines.append(f"- ({v.key}) {note}")
        for k, x in r.extra.items():
            lines.append(f"- ({v.key}) {k}: {x:.1f}" if isinstance(x, float) else f"- {k}: {x}")
        lines.append(
            f"- ({v.key}) others' cores just before: {v.busy_before:.2f}; load average "
            f"before / after: {v.load_before} / {v.load_after}"
        )
        if v.error:
            lines.append(f"- ({v.key}) FAILED: {v.error}")
        if v.at_peak:
            top = ", ".join(f"{name} {kb / 1024:.0f}" for name, kb in v.at_peak[:6])
            lines.append(f"- ({v.key}) largest processes at the RSS peak (MB): {top}")
    lines += [
        "",
        "Notes:",
        "- Overhead per device = (steady round of x - steady round of (a)) / devices per round.",
        "- Time to first round: launch of the variant's process -> end of round 1 ((b): the "
        "rounds file line; (c), (d): the timings.jsonl line seen by the sampler; (a): the "
        "floor's own clock). `before_loop_s`: launch -> start of hybridfl's round loop "
        "(CLI, SuperLink, Ray, partition, ServerApp set-up).",
        "- CPU-s, others' cores and peak RSS as in bench/round_overhead.py (sum of VmRSS over "
        "the process tree sampled every 0.2 s; shared pages counted once per process).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="measured rounds after warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (left out)")
    p.add_argument("--devices", type=int, default=10_000, help="population")
    p.add_argument("--per-round", type=int, default=100, help="devices per round")
    p.add_argument(
        "--flower-devices",
        type=int,
        default=0,
        help="(b) SuperNodes (0 = the population); smaller when Flower cannot start that many",
    )
    p.add_argument("--flower-timeout", type=float, default=900, help="(b) seconds for its run")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mnist.npz")
    p.add_argument("--variants", default="a,b,c,d")
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="(a) threads")
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    p.add_argument("--quiet-wait", type=float, default=45, help="wait for a quiet machine (s)")
    p.add_argument("--quiet-cores", type=float, default=0.3)
    p.add_argument(
        "--hybridfl-set",
        action="append",
        default=[],
        help="extra --set for (c) and (d), e.g. simulation.devices_per_message=50",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument("--child", choices=("floor", "flower"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--partition", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n-devices", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(f"error: MNIST not found: {args.data} (pass --data PATH)", file=sys.stderr)
        return 2
    if args.child:
        fn = floor_child if args.child == "floor" else flower_child
        args.result.write_text(json.dumps(fn(args)))
        return 0
    wanted = [k.strip() for k in args.variants.split(",") if k.strip()]
    if not wanted or any(k not in "abcde" for k in wanted):
        print(f"error: --variants must list a, b, c, d and/or e, got {args.variants!r}")
        return 2
    command = "python bench/cross_device.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in ro.machine().items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hfl-xdev-"))
    results: list[Result] = []
    try:
        partition = tmp / "partition.npz"
        build_partition_file(args, args.devices, partition)
        flower_n = args.flower_devices or args.devices
        flower_partition = partition
        if flower_n != args.devices:
            flower_partition = tmp / "partition_flower.npz"
            build_partition_file(args, flower_n, flower_partition)
        for key in wanted:
            print(f"running ({key}) ...", flush=True)
            work = tmp / key
            (work / "logs").mkdir(parents=True)
            if key == "a":
                r = run_floor(args, work, partition)
            elif key == "b":
                r = run_flower(args, work, flower_partition, flower_n)
            else:
                r = run_c(args, work, key)
            status = (
                "FAILED: " + r.v.error
                if r.v.error
                else f"steady {_fmt(r.v.steady(args.warmup), nd=3)}"
            )
            print(
                f"({key}) {status}, first round {_fmt(r.first_round_s, nd=1)}, "
                f"peak RSS {ro._mb(r.v.peak_rss_kb)}, wall {r.v.wall_s:.0f}s",
                flush=True,
            )
            results.append(r)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            with contextlib.suppress(OSError):
                ro._cleanup(tmp)
    text = report(results, args, command)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 1 if any(r.v.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
