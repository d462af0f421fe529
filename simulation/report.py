"""``hybridfl report``: compare finished runs in one markdown table and two plots.

The question a user brings: for my users, how much better is a personalized model
than the served global one, for whom is it worse, and what does it cost? So the
table quotes the *last* evaluated round (the best round, a test-set maximum, is in
a second table labelled as such), keeps served, personalized, fine-tuned and
held-out accuracy in separate columns, shows the low tail of the gain and the share
of devices personalization hurts, and the bytes a device sends and receives.

Pure functions (load -> rows -> markdown, plots) so tests and notebooks can use
them without the CLI; ``report`` is the typer command.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from common.atomic import atomic_write_text
from common.rows import RoundRow, read_rows
from common.rundir import CONFIG_FILE, DEVICES_FILE, METRICS_FILE, read_jsonl
from server.summary import summarize
from simulation.cli_common import fail
from simulation.history import history_markdown

CURVES_PNG = "report_accuracy.png"
GAIN_PNG = "report_gain.png"
REPORT_MD = "report.md"


class ReportError(ValueError):
    """A folder given to ``report`` is not a readable run folder."""


@dataclass
class Run:
    """One run folder, read: its config, metrics rows, summary and per-device rows."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[RoundRow]
    summary: dict[str, Any]
    devices: list[dict[str, Any]] = field(default_factory=list)

    def cfg(self, section: str, key: str, default: Any = None) -> Any:
        return (self.config.get(section) or {}).get(key, default)


def load_run(path: Path) -> Run:
    """Read a run folder; the summary is recomputed from metrics.jsonl (same function
    as the server's summary.json, so partial or older runs still compare)."""
    path = Path(path)
    if not (path / METRICS_FILE).is_file():
        raise ReportError(f"{path} is not a run folder: it has no {METRICS_FILE}")
    try:
        config = tomllib.loads((path / CONFIG_FILE).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    metrics = read_rows(path / METRICS_FILE)
    if not metrics:
        raise ReportError(f"{path / METRICS_FILE} has no rounds yet")

    devices: list[dict[str, Any]] = read_jsonl(path / DEVICES_FILE)  # type: ignore[assignment]
    return Run(path, path.name, config, metrics, summarize(metrics), devices)


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Read every run; folders with the same name are told apart by their parent."""
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    return runs


def run_row(run: Run) -> dict[str, Any]:
    """The numbers of one table row (fractions and bytes, unformatted)."""
    s = run.summary
    last = s.get("last") or {}
    evaluated_rounds = len([r for r in run.metrics if r.evaluated])
    return {
        "run": run.name,
        "algorithm": run.cfg("client", "algorithm", "?"),
        "strategy": run.cfg("strategy", "name", "?"),
        "rounds": s.get("rounds"),
        "planned_rounds": run.config.get("rounds"),
        "evaluations": evaluated_rounds,
        "last_round": last.get("round"),
        "global_test_acc": last.get("global_test_acc"),
        "num_devices": last.get("num_devices"),
        "device_global_acc": last.get("device_global_acc"),
        "device_personal_acc": last.get("device_personal_acc"),
        "device_finetuned_acc": last.get("device_finetuned_acc"),
        "gain": last.get("device_gain"),
        "gain_p10": last.get("device_gain_p10"),
        "share_hurt": last.get("share_personal_worse"),
        "holdout_num_devices": last.get("holdout_num_devices"),
        "holdout_global_acc": last.get("holdout_global_acc"),
        "holdout_finetuned_acc": last.get("holdout_finetuned_acc"),
        "bytes_up_per_update": s.get("bytes_up_per_update"),
        "bytes_down_per_device": s.get("bytes_down_per_sampled_device"),
        "bytes_total": float(s.get("bytes_up", 0.0)) + float(s.get("bytes_down", 0.0)),
        "best": {k: s[k] for k in s if k.startswith("best_")},
        "clock": s.get("clock"),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(float(x)) else f"{100 * float(x):.1f}%"


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * float(x):+.1f} pp"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table (last evaluated round) and the best-round table, labelled."""
    holdout = any(r.get("holdout_num_devices") for r in rows)
    header = [
        "run",
        "algorithm",
        "strategy",
        "rounds",
        "global test",
        "devices: global",
        "personalized",
        "fine-tuned",
        "gain (p10)",
        "hurt",
    ]
    if holdout:
        header += ["held-out: global", "held-out: fine-tuned"]
    timed = any(r.get("clock") for r in rows)
    if timed:
        header += ["virtual hours", "to global target", "to personalized target", "dropped"]
    header += ["per device-round up / down", "total bytes"]
    baseline = next((r["baseline"] for r in rows if r.get("baseline") is not None), None)
    if baseline is not None:
        header += [f"gain vs {baseline.name}'s global (devices)"]
    body = []
    for r in rows:
        rounds = f"{r['rounds']}" + (
            f"/{r['planned_rounds']}" if r.get("planned_rounds") not in (None, r["rounds"]) else ""
        )
        cells = [
            r["run"],
            str(r["algorithm"]),
            str(r["strategy"]),
            rounds,
            _pct(r["global_test_acc"]),
            _pct(r["device_global_acc"]),
            _pct(r["device_personal_acc"]),
            _pct(r["device_finetuned_acc"]),
            f"{_pp(r['gain'])} ({_pp(r['gain_p10'])})" if r["gain"] is not None else "-",
            _pct(r["share_hurt"]),
        ]
        if holdout:
            cells += [_pct(r["holdout_global_acc"]), _pct(r["holdout_finetuned_acc"])]
        if timed:
            cells += _clock_cells(r.get("clock"))
        cells += [
            f"{_bytes(r['bytes_up_per_update'])} / {_bytes(r['bytes_down_per_device'])}",
            _bytes(r["bytes_total"]),
        ]
        if baseline is not None:
            vs = r.get("baseline_gain")
            cells.append(
                f"{_pp(vs.gain)} ({vs.num_devices})" if vs and vs.gain is not None else "-"
            )
        body.append(cells)
    last_rounds = sorted({int(r["last_round"]) for r in rows if r.get("last_round") is not None})
    intro = (
        f"### Last evaluated round (round {', '.join(map(str, last_rounds)) or '-'})\n\n"
        "Accuracy: sample-weighted mean over devices' own test splits. *global*: the served "
        "model; *personalized*: each device's own model; *fine-tuned*: the served model after "
        "a few local steps (a new user's day one). *gain*: personalized - global "
        "(10th percentile in brackets); *hurt*: share of devices whose personalized model is "
        "worse than the served one."
        + (" *held-out*: devices that never trained." if holdout else "")
        + (
            f" *gain vs {baseline.name}'s global*: this run's personalized models minus the "
            f"baseline run {baseline.name}'s served global model, on the devices both "
            "evaluated (same data and partition; their number in brackets); *gain* above "
            "is against the run's own global model."
            if baseline is not None
            else ""
        )
    )
    best_header = ["run", "best global test", "best personalized", "best fine-tuned"]
    if holdout:
        best_header.append("best held-out fine-tuned")
    best_body = []
    for r in rows:
        b = r["best"]

        def cell(key: str, field_: str, b: dict[str, Any] = b) -> str:
            h = b.get(key)
            return "-" if not h else f"{_pct(h.get(field_))} (round {h['round']})"

        cells = [
            r["run"],
            cell("best_global", "global_test_acc"),
            cell("best_personal", "device_personal_acc"),
            cell("best_finetuned", "device_finetuned_acc"),
        ]
        if holdout:
            cells.append(cell("best_holdout_finetuned", "holdout_finetuned_acc"))
        best_body.append(cells)
    best_intro = (
        "### Best round (test-set maximum over all evaluations: flatters, do not quote alone)"
    )
    notes = [
        f"- {r['run']}: no gain vs {baseline.name}: {r['baseline_gain'].reason}"
        for r in rows
        if baseline is not None and r.get("baseline_gain") and r["baseline_gain"].gain is None
    ]
    main = [intro, _table(header, body), *(["\n".join(notes)] if notes else [])]
    return "\n\n".join([*main, best_intro, _table(best_header, best_body)])


def _clock_cells(clock: dict[str, Any] | None) -> list[str]:
    """Virtual hours, time to each target ("62% at 3.1 h", "not reached"), drop-outs."""
    if not clock:
        return ["-"] * 4

    def reached(key: str) -> str:
        t = clock.get(key)
        if not t:
            return "-"
        hours = t.get("virtual_hours")
        target = f"{100 * t['target']:.0f}%"
        return f"{target} at {hours:.2f} h" if hours is not None else f"{target} not reached"

    dropped = clock["dropped_offline"] + clock["dropped_deadline"]
    return [
        f"{clock['virtual_hours']:.2f}",
        reached("time_to_global_accuracy"),
        reached("time_to_personal_accuracy"),
        f"{dropped:,} of {clock['selected']:,}",
    ]


def _x(r: RoundRow, virtual: bool) -> float:
    """A row's position on the x axis: virtual hours when every run has a clock."""
    return r.clock.end_h if virtual and r.clock is not None else float(r.round)


def _series(
    rows: list[RoundRow], section: str, key: str, virtual: bool = False
) -> tuple[list[float], list[float]]:
    pts = [
        (_x(r, virtual), dist.weighted_mean)
        for r in rows
        if (part := getattr(r, section)) is not None
        and (dist := getattr(part, key, None)) is not None
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: Sequence[Run], out: Path) -> Path:
    """Accuracy per round, one panel per run: served global (server test set and devices),
    personalized, fine-tuned, and held-out devices when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(runs), 3)
    nrows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), dpi=100, squeeze=False, sharey=True
    )
    virtual = all(r.clock is not None for run in runs for r in run.metrics)
    for ax, run in zip(axes.flat, runs, strict=False):
        rows = [r for r in run.metrics if r.evaluated]
        ax.plot(
            [_x(r, virtual) for r in rows],
            [float(r.global_test_acc or 0.0) for r in rows],
            "k-",
            lw=1,
            label="global, server test set",
        )
        for section, key, style, label in (
            ("devices", "global_acc", "C0--", "global, devices"),
            ("devices", "personal_acc", "C1-", "personalized, devices"),
            ("devices", "finetuned_acc", "C2-.", "fine-tuned, devices"),
            ("holdout", "global_acc", "C3:", "global, held-out"),
            ("holdout", "finetuned_acc", "C3-", "fine-tuned, held-out"),
        ):
            x, y = _series(rows, section, key, virtual)
            if x:
                ax.plot(x, y, style, label=label)
        ax.set_title(run.name, fontsize=9)
        ax.set_xlabel("virtual hours" if virtual else "round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    for ax in list(axes.flat)[len(runs) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("accuracy (sample-weighted mean)")
    fig.tight_layout()
    path = out / CURVES_PNG
    fig.savefig(path)
    plt.close(fig)
    return path


def _ecdf(ax: Any, values: list[float], style: str, label: str) -> None:
    """Empirical CDF from 0 at the smallest value to 1 at the largest."""
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step([xs[0], *xs], [0.0, *ys], style, where="post", label=f"{label} (n={len(xs)})")


def plot_gain(runs: Sequence[Run], out: Path) -> Path | None:
    """ECDF of per-device gain over the served model (last evaluation, devices.jsonl):
    personalized - global for training devices, fine-tuned - global for all devices.
    Mass left of zero is the devices that are worse off."""
    if not any(run.devices for run in runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100, sharey=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        train = [d for d in run.devices if d.get("role") == "train"]
        held = [d for d in run.devices if d.get("role") == "holdout"]
        gains = [float(d["gain"]) for d in train if d.get("gain") is not None]
        if gains:
            _ecdf(left, gains, f"{color}-", run.name)
        ft = [float(d["finetune_gain"]) for d in train if d.get("finetune_gain") is not None]
        if ft:
            _ecdf(right, ft, f"{color}-", f"{run.name}, training devices")
        ft_h = [float(d["finetune_gain"]) for d in held if d.get("finetune_gain") is not None]
        if ft_h:
            _ecdf(right, ft_h, f"{color}:", f"{run.name}, held-out devices")
    for ax, title in (
        (left, "personalized - global (per device)"),
        (right, "fine-tuned - global (per device)"),
    ):
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("accuracy gain")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=7)
    left.set_ylabel("share of devices (ECDF)")
    fig.tight_layout()
    path = out / GAIN_PNG
    fig.savefig(path)
    plt.close(fig)
    return path


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run folders to compare (each with a metrics.jsonl).")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Folder for report.md and the PNGs (default: the first run folder)."
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="A reference run (e.g. runs/fedavg): also report each run's personalized "
            "accuracy against this run's served global model, on the same devices.",
        ),
    ] = None,
) -> None:
    """Compare runs: what each run is and which config keys differ; a markdown table of
    the last evaluated round (served, personalized, fine-tuned and held-out accuracy,
    gain, share hurt, bytes), the best rounds labelled apart, accuracy curves and the
    per-device gain distribution (PNG)."""
    from simulation.compare import baseline_gain, runs_markdown, spread_markdown

    try:
        runs = load_runs(run_dirs)
        ref = load_run(baseline) if baseline is not None else None
    except ReportError as err:
        fail(str(err))
    target = out if out is not None else run_dirs[0]
    target.mkdir(parents=True, exist_ok=True)
    rows = [run_row(r) for r in runs]
    if ref is not None:
        for row, run in zip(rows, runs, strict=True):
            row["baseline"] = ref
            row["baseline_gain"] = baseline_gain(run, ref)
    spread = spread_markdown(runs, rows)
    text = "\n\n".join([runs_markdown(runs), markdown(rows), *([spread] if spread else [])])
    sections = [history_markdown(r.name, r.path) for r in runs]
    text = "\n\n".join([text, *(s for s in sections if s)])
    typer.echo(text)
    atomic_write_text(target / REPORT_MD, text + "\n")
    written = [plot_curves(runs, target), plot_gain(runs, target)]
    for p in written:
        if p is not None:
            typer.echo(f"wrote {p}")
    typer.echo(f"wrote {target / REPORT_MD}")
