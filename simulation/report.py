"""Human-facing views of a run: one progress line per round and the accuracy plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.rundir import METRICS_FILE, PLOT_FILE, read_jsonl


def _pct(x: Any) -> str:
    return "   -  " if x is None else f"{100 * float(x):5.1f}%"


def progress_line(row: dict[str, Any], timing: dict[str, Any], rounds: int) -> str:
    """``round  3/10  global 84.2%  devices: global 80.1% personal 93.5% ...``."""
    dev = row.get("devices") or {}
    parts = [f"round {row['round']:>3}/{rounds}"]
    parts.append(f"updates {row.get('num_updates', 0)}/{row.get('num_sampled', 0)}")
    if row.get("num_failed") or row.get("num_rejected"):
        parts.append(f"failed {row.get('num_failed', 0)} rejected {row.get('num_rejected', 0)}")
    parts.append(f"loss {float(row.get('train_loss', float('nan'))):.3f}")
    if row.get("evaluated"):
        parts.append(f"global test {_pct(row.get('global_test_acc'))}")
        if dev.get("num_devices"):
            parts.append(
                f"on devices: global {_pct(dev['global_acc']['weighted_mean'])} "
                f"personal {_pct(dev['personal_acc']['weighted_mean'])} "
                f"worse {100 * dev['share_personal_worse']:.0f}%"
            )
    if timing.get("elapsed_s") is not None:
        parts.append(f"{float(timing['elapsed_s']):6.1f}s")
    return "  ".join(parts)


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path | None:
    """accuracy.png: global test accuracy and device-level global vs personalized."""
    rows = [r for r in read_jsonl(run_dir / METRICS_FILE) if r.get("evaluated")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [int(r["round"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(
        rounds, [r["global_test_acc"] for r in rows], "k-", label="global model, global test set"
    )
    dev = [r for r in rows if (r.get("devices") or {}).get("num_devices")]
    if dev:
        dr = [int(r["round"]) for r in dev]
        g = [r["devices"]["global_acc"]["weighted_mean"] for r in dev]
        p = [r["devices"]["personal_acc"]["weighted_mean"] for r in dev]
        p10 = [r["devices"]["personal_acc"]["p10"] for r in dev]
        p90 = [r["devices"]["personal_acc"]["p90"] for r in dev]
        ax.plot(dr, g, "C0--", label="global model, devices' own test splits")
        ax.plot(dr, p, "C1-", label="personalized models, same splits")
        ax.fill_between(dr, p10, p90, color="C1", alpha=0.15, label="personalized p10-p90")
    ax.set_xlabel("round")
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
