"""Human-facing views of a run: one progress line per round and the accuracy plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import ExperimentConfig
from common.rows import Distribution, RoundRow, TimingRow, read_rows
from common.rundir import METRICS_FILE, PLOT_FILE


def _pct(x: Distribution | float | None) -> str:
    if isinstance(x, Distribution):
        x = x.weighted_mean
    return "   -  " if x is None else f"{100 * float(x):5.1f}%"


def progress_line(row: RoundRow, timing: TimingRow | None, rounds: int) -> str:
    """``round  3/10  global 84.2%  devices: global 80.1% personal 93.5% ...``."""
    parts = [f"round {row.round:>3}/{rounds}"]
    parts.append(f"updates {row.num_updates}/{row.num_sampled}")
    if row.num_failed or row.num_rejected:
        parts.append(f"failed {row.num_failed} rejected {row.num_rejected}")
    loss = float("nan") if row.train_loss is None else row.train_loss
    parts.append(f"loss {loss:.3f}")
    if row.evaluated:
        parts.append(f"global test {_pct(row.global_test_acc)}")
        dev = row.devices
        if dev is not None and dev.num_devices:
            text = f"on devices: global {_pct(dev.global_acc)} personal {_pct(dev.personal_acc)} "
            if dev.finetuned_acc is not None:
                text += f"finetuned {_pct(dev.finetuned_acc)} "
            parts.append(text + f"worse {100 * (dev.share_personal_worse or 0):.0f}%")
        held = row.holdout
        if held is not None and held.num_devices:
            text = f"held-out: global {_pct(held.global_acc)}"
            if held.finetuned_acc is not None:
                text += f" finetuned {_pct(held.finetuned_acc)}"
            parts.append(text)
    c = row.clock
    if c is not None:
        dropped = c.dropped_offline + c.dropped_deadline
        text = f"virtual {virtual_time(c.end_h)}"
        if dropped:
            text += f" dropped {dropped}"
        if c.staleness is not None:
            text += f" staleness {c.staleness.mean:.1f}"
        parts.append(text)
    if timing is not None:
        parts.append(f"{timing.elapsed_s:6.1f}s")
    return "  ".join(parts)


def evaluation_plan(cfg: ExperimentConfig) -> str:
    """Which devices each evaluation measures, said once at the start (the default
    depends on the population size, so the user is told which one applies)."""
    e, n = cfg.evaluation, cfg.partition.num_devices
    mode = e.mode(n)
    held = e.num_holdout(n)
    train = n - held
    what = {
        "all": f"all {train} training devices",
        "participants": "the devices that trained that round",
        "sample": f"a seeded sample of {min(e.sample_devices, train)} of {train} training devices",
    }[mode]
    if e.devices == "auto":
        what += f" (evaluation.devices = auto: {'up to' if mode == 'all' else 'above'} 1,000)"
    if held:
        what += f", and {min(held, e.sample_devices) if mode == 'sample' else held} held-out"
    return f"evaluation every {e.every} round(s) and at the end: {what}"


def done_line(summary: dict[str, Any], wall_s: float, run_dir: Path) -> str:
    """The last lines of a finished run: what personalization did for the devices in one
    plain sentence, the accuracies, what did not go as asked, and where the results are."""
    last = summary.get("last") or {}
    lines = []
    verdict = summary.get("personalization") or {}
    if verdict.get("sentence"):
        lines.append(f"{verdict['sentence']}.")
    problems = [
        f"{summary[k]} {what}"
        for k, what in (
            ("failed_updates", "updates failed"),
            ("rejected_updates", "updates were rejected"),
            ("eval_failed", "device evaluations failed"),
        )
        if summary.get(k)
    ]
    if problems:
        lines.append(f"of {summary.get('num_sampled', 0)} selected devices: " + ", ".join(problems))
    clock = summary.get("clock")
    if clock:
        lines.append(clock_line(clock))
    lines.append(
        f"done in {wall_s:.1f}s: global test accuracy {last.get('global_test_acc') or 0:.4f}, "
        f"personalized on devices {last.get('device_personal_acc') or 0:.4f} "
        f"(global on devices {last.get('device_global_acc') or 0:.4f}); results in {run_dir}"
    )
    return "\n".join(lines)


def virtual_time(hours: float) -> str:
    """``42.0 s``, ``12.5 min`` or ``5.20 h``: small federations finish rounds in seconds."""
    if hours < 1 / 60:
        return f"{hours * 3600:.1f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    return f"{hours:.2f} h"


def clock_line(clock: dict[str, Any]) -> str:
    """``virtual time 5.20 h; 1,204 results used, 96 dropped (80 offline, 16 deadline)...``"""
    dropped = clock["dropped_offline"] + clock["dropped_deadline"]
    text = (
        f"virtual time {virtual_time(clock['virtual_hours'])}: {clock['finished']:,} results used, "
        f"{dropped:,} devices dropped ({clock['dropped_offline']:,} went offline, "
        f"{clock['dropped_deadline']:,} missed the deadline), {clock['late']:,} late"
    )
    if clock.get("partial"):
        text += f", {clock['partial']:,} partial"
    if clock.get("mean_staleness") is not None:
        text += f", mean staleness {clock['mean_staleness']:.2f}"
    for key, what in (
        ("time_to_global_accuracy", "global test"),
        ("time_to_personal_accuracy", "personalized"),
    ):
        t = clock.get(key)
        if t:
            when = (
                f"{virtual_time(t['virtual_hours'])} (round {t['round']})"
                if t["virtual_hours"] is not None
                else "not reached"
            )
            text += f"; {what} {100 * t['target']:.0f}%: {when}"
    return text


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path | None:
    """accuracy.png: global test accuracy, and on devices global vs personalized vs
    fine-tuned (plus held-out devices when there are any)."""
    rows = [r for r in read_rows(run_dir / METRICS_FILE) if r.evaluated]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    virtual = all(r.clock is not None for r in rows)

    def x(r: RoundRow) -> float:
        return r.clock.end_h if virtual and r.clock is not None else float(r.round)

    rounds = [x(r) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(rounds, [r.global_test_acc for r in rows], "k-", label="global model, global test set")
    dev = [(x(r), r.devices) for r in rows if r.devices and r.devices.global_acc]
    if dev:
        dr = [d for d, _ in dev]
        g = [s.global_acc.weighted_mean for _, s in dev]  # type: ignore[union-attr]
        p = [s.personal_acc.weighted_mean for _, s in dev]  # type: ignore[union-attr]
        p10 = [s.personal_acc.p10 for _, s in dev]  # type: ignore[union-attr]
        p90 = [s.personal_acc.p90 for _, s in dev]  # type: ignore[union-attr]
        ax.plot(dr, g, "C0--", label="global model, devices' own test splits")
        ax.plot(dr, p, "C1-", label="personalized models, same splits")
        ax.fill_between(dr, p10, p90, color="C1", alpha=0.15, label="personalized p10-p90")
        ft = [(d, s.finetuned_acc) for d, s in dev if s.finetuned_acc is not None]
        if ft:
            ax.plot(
                [d for d, _ in ft],
                [f.weighted_mean for _, f in ft],
                "C2-.",
                label="global fine-tuned on device, same splits",
            )
    held = [(x(r), r.holdout) for r in rows if r.holdout and r.holdout.global_acc]
    if held:
        hr = [d for d, _ in held]
        ax.plot(
            hr,
            [h.global_acc.weighted_mean for _, h in held],  # type: ignore[union-attr]
            "C3:",
            label="global model, held-out devices",
        )
        if all(h.finetuned_acc is not None for _, h in held):
            ax.plot(
                hr,
                [h.finetuned_acc.weighted_mean for _, h in held],  # type: ignore[union-attr]
                "C3-",
                label="global fine-tuned, held-out devices",
            )
    ax.set_xlabel("virtual hours" if virtual else "round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(run_dir.name)
    fig.tight_layout()
    path = out or run_dir / PLOT_FILE
    fig.savefig(path)
    plt.close(fig)
    return path
