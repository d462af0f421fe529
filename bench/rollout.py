"""A bad global version under ``immediate`` and under ``canary``: what users get, per round.

Run: ``PYTHONPATH=. python bench/rollout.py [--out FILE] [--set KEY=VALUE ...]``.

Two real ``hybridfl simulate`` runs of ``configs/rollout_canary.toml`` (same seed,
same training: the policy changes what is *served*, never what is trained), one with
``rollout.policy = "immediate"``. In round ``scenario.lr_spike_round`` devices train
with a spiked learning rate, so that round's aggregate, and what is trained from it,
is bad. Per round the table gives the accuracy users get from the version their
device serves (mean and 10th percentile over all devices' own test splits: under
``immediate`` that is the newest aggregate, under ``canary`` the version each device
was assigned), how many devices served a version from the spike round on, and the
canary's decision. Accuracies are deterministic for the seed; the wall times are not.

``--drift ROUND`` runs the second demonstration instead: no spike, a canary with the
monitor on, and from ``ROUND`` half of the devices see permuted labels; it reports
when the monitor fired and what users got before, meanwhile and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "rollout_canary.toml"


def simulate(out: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "simulation.cli", "simulate", str(CONFIG), "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def per_round(run: Path, spike: int) -> list[dict[str, Any]]:
    """User-facing accuracy per round, from the run's metrics rows."""
    from common.rows import read_rows
    from common.rundir import METRICS_FILE

    out = []
    for row in read_rows(run / METRICS_FILE):
        assert row.devices is not None and row.devices.global_acc is not None
        n = row.devices.num_devices
        if row.serving is None:  # immediate: every device serves the newest aggregate
            acc, bad = row.devices.global_acc, n if row.round >= spike else 0
            decision, served = "", f"v{row.round} x{n}"
        else:
            s = row.serving
            assert s.served_acc is not None
            acc = s.served_acc
            bad = sum(c.devices for c in s.served_versions if c.version >= spike)
            decision = s.decision or ""
            served = ", ".join(f"v{c.version} x{c.devices}" for c in s.served_versions)
        out.append(
            {
                "round": row.round,
                "mean": acc.mean,
                "p10": acc.p10,
                "bad": bad,
                "served": served,
                "decision": decision,
                "trained": row.devices.global_acc.mean,
            }
        )
    return out


def table(imm: list[dict[str, Any]], can: list[dict[str, Any]], spike: int) -> str:
    lines = [
        "| round | newest aggregate (training plane) | immediate: users mean / p10 | "
        "immediate: devices on a bad version | canary: users mean / p10 | "
        "canary: devices on a bad version | canary: served | canary decision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(imm, can, strict=True):
        mark = " (spike)" if a["round"] == spike else ""
        lines.append(
            f"| {a['round']}{mark} | {a['trained']:.1%} | {a['mean']:.1%} / {a['p10']:.1%} | "
            f"{a['bad']} | {b['mean']:.1%} / {b['p10']:.1%} | {b['bad']} | {b['served']} | "
            f"{b['decision']} |"
        )
    after = [r for r in imm if r["round"] >= spike]
    after_c = [r for r in can if r["round"] >= spike]
    lines += [
        "",
        f"From the spike round on ({len(after)} rounds): users' mean accuracy "
        f"{sum(r['mean'] for r in after) / len(after):.1%} under immediate, "
        f"{sum(r['mean'] for r in after_c) / len(after_c):.1%} under canary; "
        f"device-rounds on a bad version: {sum(r['bad'] for r in after)} vs "
        f"{sum(r['bad'] for r in after_c)}; most devices on a bad version in one round: "
        f"{max(r['bad'] for r in after)} vs {max(r['bad'] for r in after_c)}.",
    ]
    return "\n".join(lines)


DRIFT_SETS = [
    "scenario.lr_spike_round=0",
    "scenario.drift_share=0.5",
    "rollout.monitor_window=2",
    "rollout.monitor_drop=0.1",
]


def drift_table(run: Path, drift: int) -> str:
    from common.rows import read_rows
    from common.rundir import METRICS_FILE

    rows = read_rows(run / METRICS_FILE)
    lines = [
        "| round | users mean / p10 | serving | decision | monitor |",
        "|---|---|---|---|---|",
    ]
    fired = None
    for r in rows:
        s = r.serving
        assert s is not None and s.served_acc is not None
        if s.alert and fired is None and r.round >= drift:
            fired = r.round
        mark = " (drift)" if r.round == drift else ""
        lines.append(
            f"| {r.round}{mark} | {s.served_acc.mean:.1%} / {s.served_acc.p10:.1%} | "
            f"v{s.serving_version} | {s.decision or ''} | {s.alert or ''} |"
        )
    acc = {r.round: r.serving.served_acc.mean for r in rows if r.serving and r.serving.served_acc}
    before = acc.get(drift - 1, float("nan"))
    if fired is None:
        lines += ["", f"The monitor did not fire after the drift in round {drift}."]
        return "\n".join(lines)
    meanwhile = [acc[k] for k in acc if drift <= k <= fired]
    lines += [
        "",
        f"Drift from round {drift}; the monitor fired in round {fired} "
        f"(after {fired - drift + 1} evaluated round(s) of drift). Users' mean served "
        f"accuracy: {before:.1%} in the round before the drift, "
        f"{sum(meanwhile) / len(meanwhile):.1%} on average from the drift to the alert "
        f"({100 * (before - sum(meanwhile) / len(meanwhile)):.1f} points lost per user and "
        "round), "
        f"{acc[max(acc)]:.1%} in the last round.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="Write the markdown here (else print).")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Override a key.")
    ap.add_argument("--drift", type=int, default=0, help="Drift demonstration from this round.")
    args = ap.parse_args()
    from common.config import load_config
    from simulation.history import history_text

    if args.drift:
        with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
            sets = [*DRIFT_SETS, f"scenario.drift_round={args.drift}", *args.sets]
            took = simulate(Path(tmp) / "drift", sets)
            body = drift_table(Path(tmp) / "drift", args.drift)
            events = history_text(Path(tmp) / "drift", last=100).splitlines()
        load = os.getloadavg()
        text = "\n".join(
            [
                f"Overrides: `{' '.join(sets)}`",
                "",
                body,
                "",
                "```",
                *events,
                "```",
                "",
                f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; load average at the "
                f"end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; wall time {took:.0f} s.",
            ]
        )
        if args.out:
            args.out.write_text(text + "\n")
        print(text)
        return

    spike = load_config(CONFIG, args.sets).scenario.lr_spike_round
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        t_imm = simulate(Path(tmp) / "immediate", [*args.sets, 'rollout.policy="immediate"'])
        t_can = simulate(Path(tmp) / "canary", args.sets)
        imm = per_round(Path(tmp) / "immediate", spike)
        can = per_round(Path(tmp) / "canary", spike)
        events = history_text(Path(tmp) / "canary", last=100).splitlines()
    load = os.getloadavg()
    text = "\n".join(
        [
            table(imm, can, spike),
            "",
            "Canary history (`hybridfl report`, serving events):",
            "",
            "```",
            *events,
            "```",
            "",
            f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; load average at the end {load[0]:.1f} / "
            f"{load[1]:.1f} / {load[2]:.1f}. Wall time: immediate {t_imm:.0f} s, canary "
            f"{t_can:.0f} s (the canary evaluates the candidate and the serving version on "
            "the step's devices every round).",
        ]
    )
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
