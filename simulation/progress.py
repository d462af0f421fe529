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
            text = (
                f"on devices: global {_pct(dev['global_acc']['weighted_mean'])} "
                f"personal {_pct(dev['personal_acc']['weighted_mean'])} "
            )
            if dev.get("finetuned_acc"):
                text += f"finetuned {_pct(dev['finetuned_acc']['weighted_mean'])} "
            parts.append(text + f"worse {100 * dev['share_personal_worse']:.0f}%")
        held = row.get("holdout") or {}
        if held.get("num_devices"):
            text = f"held-out: global {_pct(held['global_acc']['weighted_mean'])}"
            if held.get("finetuned_acc"):
                text += f" finetuned {_pct(held['finetuned_acc']['weighted_mean'])}"
            parts.append(text)
    if timing.get("elapsed_s") is not None:
        parts.append(f"{float(timing['elapsed_s']):6.1f}s")
    return "  ".join(parts)


def done_line(summary: dict[str, Any], wall_s: float, run_dir: Path) -> str:
    """The last line of a finished run: its accuracy summary and where the results are."""
    last = summary.get("last") or {}
    return (
        f"done in {wall_s:.1f}s: global test accuracy {last.get('global_test_acc') or 0:.4f}, "
        f"personalized on devices {last.get('device_personal_acc') or 0:.4f} "
        f"(global on devices {last.get('device_global_acc') or 0:.4f}); results in {run_dir}"
    )


def plot_accuracy(run_dir: Path, out: Path | None = None) -> Path | None:
    """accuracy.png: global test accuracy, and on devices global vs personalized vs
    fine-tuned (plus held-out devices when there are any)."""
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
        ft = [r for r in dev if r["devices"].get("finetuned_acc")]
        if ft:
            ax.plot(
                [int(r["round"]) for r in ft],
                [r["devices"]["finetuned_acc"]["weighted_mean"] for r in ft],
                "C2-.",
                label="global fine-tuned on device, same splits",
            )
    held = [r for r in rows if (r.get("holdout") or {}).get("num_devices")]
    if held:
        hr = [int(r["round"]) for r in held]
        ax.plot(
            hr,
            [r["holdout"]["global_acc"]["weighted_mean"] for r in held],
            "C3:",
            label="global model, held-out devices",
        )
        if all(r["holdout"].get("finetuned_acc") for r in held):
            ax.plot(
                hr,
                [r["holdout"]["finetuned_acc"]["weighted_mean"] for r in held],
                "C3-",
                label="global fine-tuned, held-out devices",
            )
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
