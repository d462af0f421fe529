"""Does hybridfl's cost grow with the population? Synthetic populations of 10^3..10^6.

Run: ``python bench/population.py [--sizes 1000,10000,100000,1000000] [--rounds 5]``.

For each population size n, one ``hybridfl simulate configs/synthetic_population.toml`` run
(Synthetic(1, 1) devices generated on demand, natural partition, logistic model,
FedAvg, 100 devices per round: ``strategy.fraction_train = 100/n`` and
``strategy.min_train_devices = 100``, E=1, B=10, evaluation only in the last round on
its participants), measured as a process tree:

- time to first round: launch of ``hybridfl simulate`` (CLI, SuperLink, Ray,
  ServerApp set-up included) -> end of round 1 (its timings.jsonl line appearing);
  split into "before the round loop" (launch -> the loop's start, from ``elapsed_s``)
  and round 1 itself;
- steady round time: median ``train_s`` of rounds 2..n (``--warmup`` rounds left out);
- peak RSS of the process tree (sum of VmRSS, and of RssAnon), and the largest
  processes at the peak.

Targets (issue 9): time to first round <= 30 s at 10^6; steady round time and peak
RSS within 25% of each other from 10^4 to 10^6.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import cross_device as xd  # noqa: E402
import round_overhead as ro  # noqa: E402

CONFIG = ROOT / "configs" / "synthetic_population.toml"
RESULTS = BENCH / "results" / "population.md"
PER_ROUND = 100
TARGET_FIRST_S = 30.0
TARGET_SPREAD = 0.25


def run_size(args: argparse.Namespace, tmp: Path, n: int) -> xd.Result:
    rounds = args.warmup + args.rounds
    sets = [
        f"partition.num_devices={n}",
        f"strategy.fraction_train={PER_ROUND / n}",
        f"strategy.min_train_devices={PER_ROUND}",
        f"rounds={rounds}",
        f"evaluation.every={rounds}",
        "output.plot=false",
        *args.hybridfl_set,
    ]
    key = f"n{n}"
    work = tmp / key
    (work / "logs").mkdir(parents=True)
    v, first, extra = xd.run_hybridfl(key, f"{n:,} devices", CONFIG, sets, args, work, PER_ROUND)
    return xd.Result(v, n, first, extra)


def _spread(values: list[float]) -> float | None:
    """(max - min) / min: how far apart the values are."""
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else None


def report(results: list[xd.Result], args: argparse.Namespace, command: str) -> str:
    w = args.warmup
    lines = [
        "# Population scaling: synthetic devices, 100 per round",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in ro.machine().items()),
        "",
        f"hybridfl code: {ro.code_version(ROOT)}",
        "",
        "Workload: `hybridfl simulate configs/synthetic_population.toml` (Synthetic(1, 1), "
        f"natural partition, logistic model, FedAvg, E=1, B=10, lr 0.05), {PER_ROUND} devices per "
        f"round (`strategy.fraction_train` = {PER_ROUND}/n, `strategy.min_train_devices` = "
        f"{PER_ROUND}), {w} warm-up + {args.rounds} rounds, evaluation in the last round "
        "only, on its participants, no fine-tuning. Simulation settings: defaults "
        f"{' '.join(args.hybridfl_set) or ''}.",
        "",
        "| population | time to first round | of which before the round loop | round 1 "
        "| steady round (median train_s) | all rounds train_s (s) | CPU-s per round (tree) "
        "| others' cores in rounds | peak RSS, tree (sum VmRSS) | peak private (RssAnon) "
        "| wall | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r.v
        times = ", ".join(f"{float(x['train_s']):.2f}" for x in v.rounds) or "-"
        others = v.steady(w, "others_cores")
        before = r.extra.get("before_loop_s")
        r1 = float(v.rounds[0]["train_s"]) if v.rounds else None
        lines.append(
            f"| {r.population:,} | {xd._fmt(r.first_round_s, nd=1)} | {xd._fmt(before, nd=1)} "
            f"| {xd._fmt(r1)} | {xd._fmt(v.steady(w), nd=3)} | {times} "
            f"| {xd._fmt(v.steady(w, 'cpu_s'))} | {'n/a' if others is None else f'{others:.2f}'} "
            f"| {ro._mb(v.peak_rss_kb)} | {ro._mb(v.peak_anon_kb)} | {v.wall_s:.0f} s "
            f"| {v.load_before} / {v.load_after} |"
        )
    ok = [r for r in results if r.v.error is None]
    big = [r for r in ok if r.population >= 10_000]
    lines += ["", "Targets:", ""]
    top = max(ok, key=lambda r: r.population) if ok else None
    if top is not None and top.first_round_s is not None:
        verdict = "meets" if top.first_round_s <= TARGET_FIRST_S else "MISSES"
        lines.append(
            f"- time to first round at {top.population:,}: {top.first_round_s:.1f} s "
            f"(target <= {TARGET_FIRST_S:.0f} s at 1,000,000: {verdict})"
        )
    for what, vals in (
        ("steady round", [r.v.steady(w) for r in big]),
        ("peak RSS (VmRSS sum)", [float(r.v.peak_rss_kb) for r in big]),
        ("peak private (RssAnon sum)", [float(r.v.peak_anon_kb) for r in big]),
    ):
        clean = [x for x in vals if x is not None]
        s = _spread(clean)
        if s is not None and len(clean) > 1:
            verdict = "meets" if s <= TARGET_SPREAD else "MISSES"
            sizes = ", ".join(f"{r.population:,}" for r in big)
            lines.append(
                f"- {what} over {sizes}: (max - min) / min = {s:.0%} "
                f"(target <= {TARGET_SPREAD:.0%}: {verdict})"
            )
    lines += ["", "Per size:", ""]
    for r in results:
        v = r.v
        parts = [f"{n} {x:.2f}" for n, x in v.cpu_by_name(w).items() if x >= 0.02]
        lines.append(f"- {r.population:,}: CPU-s per steady round: {', '.join(parts) or 'n/a'}")
        if v.at_peak:
            top6 = ", ".join(f"{name} {kb / 1024:.0f}" for name, kb in v.at_peak[:6])
            lines.append(f"- {r.population:,}: largest processes at the RSS peak (MB): {top6}")
        if v.error:
            lines.append(f"- {r.population:,}: FAILED: {v.error}")
    lines += [
        "",
        "Notes:",
        "- Time to first round: launch of `hybridfl simulate` -> its first timings.jsonl line "
        "(sampled every 0.2 s). 'before the round loop' = that minus round 1's `elapsed_s`.",
        "- Peak RSS sums VmRSS over the process tree (shared pages counted once per process "
        "that maps them); RssAnon sums private memory.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds after warm-up")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (left out)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per size")
    p.add_argument("--quiet-wait", type=float, default=45)
    p.add_argument("--quiet-cores", type=float, default=0.3)
    p.add_argument("--hybridfl-set", action="append", default=[], help="extra --set")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if any(n < PER_ROUND for n in sizes):
        print(f"error: every size must be >= {PER_ROUND}", file=sys.stderr)
        return 2
    command = "python bench/population.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in ro.machine().items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hfl-pop-"))
    results: list[xd.Result] = []
    try:
        for n in sizes:
            print(f"running {n:,} devices ...", flush=True)
            r = run_size(args, tmp, n)
            status = (
                "FAILED: " + r.v.error
                if r.v.error
                else f"steady {xd._fmt(r.v.steady(args.warmup), nd=3)}"
            )
            print(
                f"{n:,}: {status}, first round {xd._fmt(r.first_round_s, nd=1)}, "
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
