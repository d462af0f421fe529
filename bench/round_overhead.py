"""Per-round overhead of hybridfl against a plain PyTorch floor and a Flower quickstart app.

Run: ``python bench/round_overhead.py [--rounds 5] [--data PATH] [--keep]``.

One workload, three ways, one after the other on the same machine: FEMNIST's 105
writers (natural split, one device per writer), McMahan et al.'s CNN, FedAvg with
every device training every round (1 local epoch, batch 10, plain SGD lr 0.01).

(a) floor: one process, no FL framework: per device load the global weights, one
    epoch of minibatch SGD, collect the weights; then the weighted average. The
    devices run on a pool of ``--slots`` threads (default: one per core), each with
    one torch thread: the same total cores as Ray's one-CPU ClientApp actors.
(b) Flower quickstart style: ``bench/flower_quickstart_app`` (a ClientApp and a
    ServerApp written like Flower's examples/quickstart-pytorch, ``FedAvg`` run by
    ``strategy.start``) under a fresh SuperLink in simulation mode.
(c) hybridfl: ``hybridfl simulate configs/femnist_cnn.toml``.

Why each runs as a child process: so that the peak RSS of each is the sum over its
own process tree (the launched process and all its descendants, sampled every
0.2 s from /proc), and nothing of one variant lingers into the next.

Per-round time is the training phase of a round: (a) from the global weights to the
averaged weights; (b) from ``configure_train`` to the end of ``aggregate_train``;
(c) ``train_s`` of ``timings.jsonl`` (sampling, send, replies, validation,
aggregation; evaluation excluded). The steady value is the median over the rounds
after ``--warmup``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from simulation.procs import Processes, descendants  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "femnist_105writers.npz"
FLOWER_APP = ROOT / "bench" / "flower_quickstart_app"
CONFIG = ROOT / "configs" / "femnist_cnn.toml"
RESULTS = ROOT / "bench" / "results" / "round_overhead.md"

# The workload: the same numbers in every variant (and in configs/femnist_cnn.toml).
NUM_DEVICES = 105
LOCAL_EPOCHS = 1
BATCH_SIZE = 10
LR = 0.01
SEED = 0
NUM_CLASSES = 62
CPUS_PER_CLIENT = 1
TARGET_C_OVER_A = 1.3
SAMPLE_EVERY_S = 0.2
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ RSS sampling
def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in kB; zeros when it is gone."""
    rss = anon = 0
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1])
    return rss, anon


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process (clock ticks), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), to see other load."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


def _name(pid: int) -> str:
    """A short name: the script python runs (flwr-simulation, hybridfl), or argv[0]."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    if len(words) > 1 and Path(words[0]).name.startswith("python"):
        words = [w for w in words[1:] if w not in ("-u", "-m")]
    if not words:
        return "?"
    name = Path(words[0]).name
    if name.startswith(("ray::", "default_worker")):
        return "ray worker (ClientApp)"  # Ray renames its workers as they change role
    if name in ("flwr", "hybridfl") and len(words) > 1:
        return f"{name} {words[1]}"  # flwr ls / flwr log / flwr run, hybridfl simulate
    return name[:40]


@dataclass
class Sample:
    """One look at the tree: when, cumulative CPU seconds (tree, per name, machine)."""

    t: float
    cpu_s: float
    busy_s: float
    by_name: dict[str, float]


class TreeSampler(threading.Thread):
    """Peak summed RSS and CPU time of a process and all its descendants.

    Why RssAnon as well: Ray's shared-memory object store (and other shared pages)
    is counted in the VmRSS of every process that maps it, so the VmRSS sum
    over-counts shared memory; the RssAnon sum counts private memory only.
    Why CPU per process name: it says which part (ClientApps, the simulation
    process, ``flwr ls`` polls, ...) a round's CPU time went to.
    """

    def __init__(
        self, pid: int, every_s: float = SAMPLE_EVERY_S, watch: Path | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every_s = every_s
        self.watch = watch
        self.line_seen_at: list[float] = []
        """time.time() at which the k-th line of ``watch`` was first seen."""
        self.series: list[Sample] = []
        self.peak_rss_kb = 0
        self.peak_anon_kb = 0
        self.max_procs = 0
        self.at_peak: list[tuple[str, int]] = []
        self.procs: dict[int, tuple[str, int]] = {}
        """pid -> (name, CPU ticks last seen); dead processes keep their last value."""
        self._stop_event = threading.Event()

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the tree (a process living < one sample period may be missed)."""
        return sum(t for _, t in self.procs.values()) / CLK_TCK

    def _sample(self) -> None:
        pids = [self.pid, *descendants(self.pid)]
        mem = {p: _status_kb(p) for p in pids}
        for p in pids:
            ticks = _cpu_ticks(p)
            if ticks is not None:
                name = _name(p)
                if name == "?" and p in self.procs:  # a zombie has no cmdline: keep its name
                    name = self.procs[p][0]
                self.procs[p] = (name, ticks)
        rss = sum(r for r, _ in mem.values())
        self.max_procs = max(self.max_procs, sum(1 for r, _ in mem.values() if r))
        if rss > self.peak_rss_kb:
            self.peak_rss_kb = rss
            self.at_peak = sorted(
                ((_name(p), r) for p, (r, _) in mem.items() if r), key=lambda t: -t[1]
            )
        self.peak_anon_kb = max(self.peak_anon_kb, sum(a for _, a in mem.values()))
        by_name: dict[str, float] = {}
        for name, ticks in self.procs.values():
            by_name[name] = by_name.get(name, 0.0) + ticks / CLK_TCK
        now = time.time()
        self.series.append(Sample(now, self.cpu_s, _machine_busy_s(), by_name))
        if self.watch is not None:
            with contextlib.suppress(OSError):
                n = self.watch.read_text().count("\n")
                self.line_seen_at += [now] * (n - len(self.line_seen_at))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._sample()
            self._stop_event.wait(self.every_s)

    def window(self, t0: float, t1: float) -> tuple[float, float, dict[str, float]]:
        """(tree CPU s, machine busy CPU s, CPU s per name) between two time.time()s."""
        if not self.series:
            return 0.0, 0.0, {}
        times = [x.t for x in self.series]

        def near(t: float) -> Sample:
            i = min(bisect.bisect_left(times, t), len(times) - 1)
            if i > 0 and abs(times[i - 1] - t) < abs(times[i] - t):
                i -= 1
            return self.series[i]

        a, b = near(t0), near(t1)
        names = set(a.by_name) | set(b.by_name)
        by_name = {n: b.by_name.get(n, 0.0) - a.by_name.get(n, 0.0) for n in names}
        return b.cpu_s - a.cpu_s, b.busy_s - a.busy_s, by_name

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


# ------------------------------------------------------------------ (a) floor
def floor_child(args: argparse.Namespace) -> dict[str, Any]:
    """Variant (a): the same local training steps in one process, no FL framework."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from torch.nn import functional as F

    from common.data.loaders import load_femnist
    from common.models import ModelSpec, build_model

    torch.set_num_threads(1)
    ds = load_femnist(Path(args.data))
    assert ds.writer_train is not None
    writers = np.unique(ds.writer_train)[:NUM_DEVICES]
    devices = []
    for w in writers:
        idx = np.flatnonzero(ds.writer_train == w)
        devices.append((torch.from_numpy(ds.x_train[idx]), torch.from_numpy(ds.y_train[idx])))
    spec = ModelSpec(name="cnn", input_shape=(1, 28, 28), num_classes=NUM_CLASSES)
    global_sd = {k: v.clone() for k, v in build_model(spec, seed=SEED).state_dict().items()}
    local = threading.local()

    def train_device(device: int, rnd: int) -> tuple[dict[str, torch.Tensor], int, int]:
        model = getattr(local, "model", None)
        if model is None:
            model = local.model = build_model(spec)
        model.load_state_dict(global_sd)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        gen = torch.Generator()
        gen.manual_seed(SEED * 1_000_003 + rnd * 1009 + device)
        x, y = devices[device]
        n = int(y.shape[0])
        model.train()
        steps = 0
        for _ in range(LOCAL_EPOCHS):
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, BATCH_SIZE):
                idx = order[start : start + BATCH_SIZE]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                float(loss.detach())  # the per-step loss read every variant does
                steps += 1
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, n, steps

    rounds = []
    with ThreadPoolExecutor(max_workers=args.slots) as pool:
        for rnd in range(1, args.rounds + 1):
            t0, start = time.perf_counter(), time.time()
            results = list(pool.map(lambda d, r=rnd: train_device(d, r), range(len(devices))))
            total = sum(n for _, n, _ in results)
            avg = {k: torch.zeros_like(v) for k, v in global_sd.items()}
            for sd, n, _ in results:  # in place: new tensors per add cost page faults
                for k, acc in avg.items():
                    acc.add_(sd[k], alpha=n / total)
            global_sd = avg
            dt = time.perf_counter() - t0
            rounds.append({"round": rnd, "train_s": dt, "start": start, "end": start + dt})
            print(f"floor round {rnd}: {dt:.2f}s", flush=True)
    return {
        "rounds": rounds,
        "slots": args.slots,
        "torch_threads": torch.get_num_threads(),
        "steps_per_round": sum(r[2] for r in results),
        "samples": total,
    }


# ------------------------------------------------------------------ (b) Flower app
def drive_flower_app(
    work: Path,
    app: Path,
    run_config: dict[str, str | int | float | bool],
    federation: dict[str, str | int | float | bool],
    total_rounds: int,
    timeout_s: float,
) -> tuple[str, int, list[dict[str, Any]]]:
    """Run a Flower app under a fresh SuperLink in simulation mode until its rounds file
    (``rounds-file`` in ``run_config``, one line per round) has ``total_rounds`` lines;
    return (final status, run id, the rounds file's rows). Shared by the benchmarks'
    quickstart-style variants (this file's and cross_device.py's)."""
    from common.rundir import read_jsonl
    from simulation.flwr_cli import (
        CONNECTION,
        RunnerError,
        flwr_env,
        free_port,
        run_status,
        submit,
        wait_superlink,
        write_connection,
    )
    from simulation.runner import ray_tmpdir

    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    flwr_home = work / "flwr_home"
    port = free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}")
    env = flwr_env(flwr_home, ray_tmpdir(work))
    rounds_file = Path(str(run_config["rounds-file"]))
    procs = Processes()
    try:
        link_log = logs / "superlink.log"
        link = procs.start(
            [
                "flower-superlink", "--insecure", "--simulation",
                "--isolation", "subprocess",
                "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation",
            ],
            env,
            link_log,
            cwd=work,
        )  # fmt: skip
        wait_superlink(port, link, link_log)
        run_id = submit(app, env, logs / "flwr-run.log", run_config, federation)
        procs.start(["flwr", "log", str(run_id), CONNECTION, "--stream"], env, logs / "run.log")
        # Wait on the rounds file; ask the SuperLink for the status only once a minute
        # (to notice a crashed run): each `flwr ls` costs ~1 CPU-s, which a Flower user
        # following the run with `flwr run --stream` would not spend.
        deadline = time.monotonic() + timeout_s
        last_check = time.monotonic()
        while len(read_jsonl(rounds_file)) < total_rounds:
            if link.poll() is not None:
                raise RunnerError(f"SuperLink exited (code {link.returncode}); see {link_log}")
            if time.monotonic() > deadline:
                raise RunnerError(
                    f"{len(read_jsonl(rounds_file))} of {total_rounds} rounds done within "
                    f"{timeout_s:.0f}s; see {logs}"
                )
            if time.monotonic() - last_check > 60:
                last_check = time.monotonic()
                status = run_status(run_id, env)
                if status.startswith("finished"):
                    raise RunnerError(f"run ended early with status {status}; see {logs}")
            time.sleep(0.5)
        status = "unknown"
        while time.monotonic() < deadline:
            status = run_status(run_id, env)
            if status.startswith("finished"):
                break
            time.sleep(1.0)
        return status, run_id, read_jsonl(rounds_file)  # type: ignore[return-value]
    finally:
        procs.stop_all()


def flower_child(args: argparse.Namespace) -> dict[str, Any]:
    """Variant (b): the quickstart-style app under a fresh SuperLink (simulation mode)."""
    work = Path(args.workdir).resolve()
    run_config: dict[str, str | int | float | bool] = {
        "num-server-rounds": args.rounds,
        "learning-rate": LR,
        "batch-size": BATCH_SIZE,
        "local-epochs": LOCAL_EPOCHS,
        "num-devices": NUM_DEVICES,
        "data-path": str(Path(args.data).resolve()),
        "rounds-file": str(work / "rounds.jsonl"),
        "keep-personal": args.flower_state == "personal",
    }
    fed = {"num-supernodes": NUM_DEVICES, "client-resources-num-cpus": CPUS_PER_CLIENT}
    status, run_id, rows = drive_flower_app(
        work, FLOWER_APP, run_config, fed, args.rounds, args.timeout
    )
    rounds, prev_end = [], None
    for r in rows:
        start, end = float(r["start"]), float(r["end"])
        rounds.append(
            {
                "round": r["round"],
                "train_s": end - start,
                "start": start,
                "end": end,
                "cadence_s": None if prev_end is None else end - prev_end,
                "replies": r["replies"],
                "errors": r["errors"],
                "torch_threads": r["torch_threads"],
            }
        )
        prev_end = end
    return {"status": status, "run_id": run_id, "rounds": rounds}


# ------------------------------------------------------------------ parent
@dataclass
class Variant:
    """One measured way of running the workload."""

    key: str
    title: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_kb: int = 0
    peak_anon_kb: int = 0
    max_procs: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    """CPU seconds used by the variant's process tree."""
    busy_s: float = 0.0
    """CPU seconds all cores were busy meanwhile (the tree's and everyone else's)."""
    busy_before: float = 0.0
    """Cores busy just before the start (others' load)."""
    load_before: str = ""
    load_after: str = ""
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    at_peak: list[tuple[str, int]] = field(default_factory=list)

    def steady(self, warmup: int, key: str = "train_s", best: bool = False) -> float | None:
        """Median (or minimum) of ``key`` over the rounds after the warm-up ones."""
        values = [float(r[key]) for r in self.rounds if r.get(key) is not None]
        if not values:
            return None
        measured = values[warmup:] if len(values) > warmup else values
        return min(measured) if best else statistics.median(measured)

    def steady_quiet(self, warmup: int, cores: float) -> tuple[float | None, int]:
        """Median round time over the steady rounds that other processes left alone
        (fewer than ``cores`` cores busy with foreign work), and how many there were."""
        rows = self.rounds[warmup:] if len(self.rounds) > warmup else self.rounds
        quiet = [
            float(r["train_s"])
            for r in rows
            if r.get("others_cores") is not None and float(r["others_cores"]) < cores
        ]
        return (statistics.median(quiet) if quiet else None), len(quiet)

    def cpu_by_name(self, warmup: int) -> dict[str, float]:
        """Median CPU seconds per round of each process name, over the steady rounds."""
        rows = [r.get("cpu_by_name") or {} for r in self.rounds]
        rows = rows[warmup:] if len(rows) > warmup else rows
        names = {n for row in rows for n in row}
        med = {n: statistics.median([row.get(n, 0.0) for row in rows]) for n in names}
        return dict(sorted(med.items(), key=lambda kv: -kv[1]))

    def add_round_cpu(self, sampler: TreeSampler) -> None:
        """Per round: CPU seconds of the tree, and cores kept busy by other processes."""
        for r in self.rounds:
            if r.get("start") is None or r.get("end") is None:
                continue
            cpu, busy, by_name = sampler.window(float(r["start"]), float(r["end"]))
            dt = float(r["end"]) - float(r["start"])
            r["cpu_s"] = cpu
            r["others_cores"] = max(0.0, busy - cpu) / dt if dt > 0 else None
            r["cpu_by_name"] = {k: round(x, 3) for k, x in by_name.items() if x > 0.005}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "flwr": _version("flwr"),
        "ray": _version("ray"),
    }


def code_version(root: Path) -> str:
    """The commit of the hybridfl checkout measured, and how many files differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{root} (not a git checkout)"
    return f"{root} at {head}" + (f" with {len(dirty)} modified files" if dirty else "")


def _hybridfl_cmd() -> list[str]:
    script = Path(sys.executable).parent / "hybridfl"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "simulation.cli"]


def wait_quiet(max_wait_s: float, cores: float) -> float:
    """Wait (up to ``max_wait_s``) until other processes keep fewer than ``cores`` busy.

    Why: the machine may be shared; a variant measured while someone else's job
    takes a core is slowed for reasons that have nothing to do with it.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = _machine_busy_s(), time.monotonic()
        time.sleep(2.0)
        busy = (_machine_busy_s() - b0) / (time.monotonic() - t0)
        if busy < cores or time.monotonic() > deadline:
            return busy
        print(f"  waiting for a quieter machine ({busy:.2f} cores busy)", flush=True)


def measure(
    v: Variant,
    cmd: list[str],
    log: Path,
    args: argparse.Namespace,
    cwd: Path | None = None,
    watch: Path | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> TreeSampler | None:
    """Run one child process tree, sampling its RSS and CPU; stop everything it left."""
    timeout_s = args.timeout if timeout_s is None else timeout_s
    v.busy_before = wait_quiet(args.quiet_wait, args.quiet_cores)
    procs = Processes()
    v.load_before = _loadavg()
    busy0 = _machine_busy_s()
    t0 = time.perf_counter()
    rc: int | None = None
    sampler: TreeSampler | None = None
    try:
        proc = procs.start(cmd, env or dict(os.environ), log, cwd=cwd)
        sampler = TreeSampler(proc.pid, watch=watch)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            v.error = f"timed out after {timeout_s:.0f}s; see {log}"
    finally:
        v.wall_s = time.perf_counter() - t0
        v.busy_s = _machine_busy_s() - busy0
        if sampler is not None:
            sampler.stop()
            v.cpu_s = sampler.cpu_s
            v.peak_rss_kb, v.peak_anon_kb = sampler.peak_rss_kb, sampler.peak_anon_kb
            v.max_procs, v.at_peak = sampler.max_procs, sampler.at_peak
        procs.stop_all()
        v.load_after = _loadavg()
    if rc not in (0, None) and v.error is None:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        v.error = f"exit code {rc}; log tail:\n{tail}"
    return sampler


def run_floor(args: argparse.Namespace, tmp: Path) -> Variant:
    v = Variant("a", f"floor: plain PyTorch, {args.slots} thread slots x 1 torch thread")
    result = tmp / "a.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "floor",
        "--rounds", str(args.rounds), "--data", str(args.data), "--slots", str(args.slots),
        "--result", str(result),
    ]  # fmt: skip
    sampler = measure(v, cmd, tmp / "logs" / "a.log", args)
    if result.exists():
        data = json.loads(result.read_text())
        v.rounds = data["rounds"]
        v.notes.append(f"{data['steps_per_round']} SGD steps over {data['samples']} samples")
    if sampler is not None:
        v.add_round_cpu(sampler)
    return v


def run_flower(args: argparse.Namespace, tmp: Path) -> Variant:
    v = Variant("b", "Flower quickstart style (FedAvg + strategy.start)")
    work = tmp / "b"
    result = tmp / "b.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "flower",
        "--rounds", str(args.rounds), "--data", str(args.data), "--workdir", str(work),
        "--flower-state", args.flower_state, "--timeout", str(args.timeout),
        "--result", str(result),
    ]  # fmt: skip
    sampler = measure(v, cmd, tmp / "logs" / "b.log", args, timeout_s=args.timeout + 60)
    if result.exists():
        data = json.loads(result.read_text())
        v.rounds = data["rounds"]
        if data["status"] != "finished:completed":
            v.error = f"run status {data['status']}; see {work / 'logs'}"
        bad = [r for r in v.rounds if r["replies"] != NUM_DEVICES or r["errors"]]
        if bad:
            v.error = f"rounds without {NUM_DEVICES} good replies: {bad}"
        threads = {round(float(r["torch_threads"]), 3) for r in v.rounds}
        v.notes.append(f"torch threads in the ClientApps (mean over replies): {sorted(threads)}")
    if sampler is not None:
        v.add_round_cpu(sampler)
    return v


def run_hybridfl(args: argparse.Namespace, tmp: Path) -> Variant:
    from common.rundir import METRICS_FILE, TIMINGS_FILE, read_jsonl

    root = args.hybridfl_root.resolve()
    v = Variant("c", "hybridfl simulate configs/femnist_cnn.toml")
    env = dict(os.environ)
    if root == ROOT:
        launcher = _hybridfl_cmd()
    else:  # another checkout (say, a branch with a fix): its packages come first
        v.title += f" ({root})"
        launcher = [sys.executable, "-m", "simulation.cli"]
        env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    config = root / "configs" / CONFIG.name
    run_dir = tmp / "c"
    n = args.rounds
    cmd = [
        *launcher, "simulate", str(config if config.is_file() else CONFIG), "--out", str(run_dir),
        "--set", f"rounds={n}", "--set", f"evaluation.every={n}",
        "--set", f'data.path="{Path(args.data).resolve()}"', "--set", "output.plot=false",
    ]  # fmt: skip
    for extra in args.hybridfl_set:
        cmd += ["--set", extra]
        v.title += f" --set {extra}"
    log = tmp / "logs" / "c.log"
    sampler = measure(v, cmd, log, args, cwd=root, watch=run_dir / TIMINGS_FILE, env=env)
    v.rounds = [dict(r) for r in read_jsonl(run_dir / TIMINGS_FILE)]
    if sampler is not None:
        # timings.jsonl has no wall-clock instants: a round's training phase ends
        # when its line appeared, less what the round did after training.
        for r, seen in zip(v.rounds, sampler.line_seen_at, strict=False):
            end = seen - (float(r["round_s"]) - float(r["train_s"]))  # type: ignore[arg-type]
            r["start"], r["end"] = end - float(r["train_s"]), end  # type: ignore[arg-type]
        v.add_round_cpu(sampler)
    metrics = read_jsonl(run_dir / METRICS_FILE)
    bad = [m["round"] for m in metrics if m.get("num_updates") != NUM_DEVICES]
    if bad and v.error is None:
        v.error = f"rounds {bad} had fewer than {NUM_DEVICES} valid updates"
    return v


def _mb(kb: int) -> str:
    return f"{kb / 1024:,.0f} MB"


def _fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def _ratio_lines(name: str, by: dict[str, float | None], targets: bool) -> list[str]:
    a, b, c = by.get("a"), by.get("b"), by.get("c")
    out = []
    if a and b:
        out.append(f"- {name}: b/a = {b / a:.2f}")
    if a and c:
        verdict = ("meets" if c / a <= TARGET_C_OVER_A else "MISSES") if targets else ""
        target = f" (target <= {TARGET_C_OVER_A}: {verdict})" if targets else ""
        out.append(f"- {name}: c/a = {c / a:.2f}{target}")
    if b and c:
        target = f" (target c < b: {'meets' if c < b else 'MISSES'})" if targets else ""
        out.append(f"- {name}: c/b = {c / b:.2f}{target}")
    return out


def report(
    variants: list[Variant], args: argparse.Namespace, mach: dict[str, str], command: str
) -> str:
    """The result as markdown (printed and written to bench/results)."""
    w = args.warmup
    lines = [
        "# Round overhead: floor vs Flower quickstart style vs hybridfl",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()),
        "",
        f"hybridfl code: {code_version(args.hybridfl_root.resolve())}",
        "",
        f"Workload: FEMNIST {NUM_DEVICES} writers (natural split), McMahan CNN, every device "
        f"every round, {LOCAL_EPOCHS} local epoch, batch {BATCH_SIZE}, SGD lr {LR}; "
        f"{args.rounds} rounds, steady = median of rounds {w + 1}..{args.rounds}. "
        f"Ray: num-supernodes={NUM_DEVICES}, client-resources-num-cpus={CPUS_PER_CLIENT}. "
        f"Flower per-client state: {args.flower_state}.",
        "",
        "| variant | steady round (median) | quiet rounds (median, n) | best round "
        "| all rounds (s) | CPU-s per round (tree) | others' cores in rounds "
        "| peak RSS, tree (sum VmRSS) | peak private (sum RssAnon) | processes "
        "| wall incl. startup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    q = args.quiet_cores
    for v in variants:
        times = ", ".join(f"{float(r['train_s']):.2f}" for r in v.rounds) or "-"
        cpu, others = v.steady(w, "cpu_s"), v.steady(w, "others_cores")
        quiet, n_quiet = v.steady_quiet(w, q)
        lines.append(
            f"| ({v.key}) {v.title} | {_fmt_s(v.steady(w))} | {_fmt_s(quiet)}, {n_quiet} "
            f"| {_fmt_s(v.steady(w, best=True))} | {times} | {_fmt_s(cpu)} "
            f"| {'n/a' if others is None else f'{others:.2f}'} | {_mb(v.peak_rss_kb)} "
            f"| {_mb(v.peak_anon_kb)} | {v.max_procs} | {v.wall_s:.0f} s |"
        )
    ok = [v for v in variants if v.error is None]
    quiet_by = {v.key: v.steady_quiet(w, q)[0] for v in ok}
    lines.append("")
    if ok and all(x is not None for x in quiet_by.values()):
        lines.append(
            f"Ratios of steady round time over the quiet rounds (others < {q} cores), "
            "the headline numbers:"
        )
        lines += _ratio_lines("quiet rounds", quiet_by, True)
        lines += _ratio_lines("all steady rounds", {v.key: v.steady(w) for v in ok}, False)
    else:
        busy = [v.key for v in ok if quiet_by[v.key] is None]
        lines.append(
            f"**The machine was busy with other work during every steady round of "
            f"{', '.join(busy)}: the wall-time ratios below are not trustworthy** (compare "
            "CPU-s per round, or rerun on a quiet machine)."
        )
        lines += _ratio_lines("all steady rounds", {v.key: v.steady(w) for v in ok}, True)
    lines += _ratio_lines("CPU-s per round", {v.key: v.steady(w, "cpu_s") for v in ok}, False)
    lines += ["", "Per round (time; tree CPU-s; others' cores):", ""]
    for v in variants:
        cells = [
            f"r{r['round']} {float(r['train_s']):.1f}s; {float(r.get('cpu_s') or 0):.1f}; "
            f"{float(r.get('others_cores') or 0):.2f}"
            for r in v.rounds
        ]
        lines.append(f"- ({v.key}) " + " | ".join(cells))
    lines += ["", "CPU-s per steady round by process (median):", ""]
    for v in variants:
        parts = [f"{n} {x:.2f}" for n, x in v.cpu_by_name(w).items() if x >= 0.05]
        lines.append(f"- ({v.key}) " + (", ".join(parts) or "n/a"))
    lines.append("")
    for v in variants:
        for note in v.notes:
            lines.append(f"- ({v.key}) {note}")
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
        "- Round time: (a) global weights -> averaged weights; (b) FedAvg.configure_train -> "
        "end of aggregate_train (rounds file written by the ServerApp); (c) `train_s` of "
        "timings.jsonl (sampling -> validated aggregate), which excludes evaluation (only the "
        "last round evaluates).",
        f"- (a) runs in one process with {args.slots} worker threads (one per core, like "
        "Ray's one-CPU ClientApp actors), each with 1 torch thread: the same total cores.",
        "- CPU-s per round: CPU time of the variant's whole process tree during the round "
        "(utime+stime from /proc, sampled every "
        f"{SAMPLE_EVERY_S} s): the work a round costs, whatever else runs on the machine. "
        "'others' cores': how many cores other processes kept busy meanwhile (other jobs on "
        "this shared machine, this script's sampler); on 2 cores, more than ~0.2 means the "
        f"round was slowed by foreign load. 'quiet rounds' keeps the steady rounds with "
        f"others < {args.quiet_cores} cores.",
        "- Peak RSS sums VmRSS over the launched process and all descendants (/proc ppid walk, "
        f"every {SAMPLE_EVERY_S} s). Shared pages (Ray's shared-memory object store, shared "
        "libraries) count once per process that maps them, so the VmRSS sum over-counts; the "
        "RssAnon sum counts private memory only.",
    ]
    return "\n".join(lines) + "\n"


def _quietness(v: Variant, args: argparse.Namespace) -> tuple[int, int, float]:
    """Rank repeated measurements: most quiet steady rounds, then least foreign load."""
    n = v.steady_quiet(args.warmup, args.quiet_cores)[1]
    others = v.steady(args.warmup, "others_cores")
    return (0 if v.error else 1, n, -(others if others is not None else 9.0))


def _cleanup(tmp: Path) -> None:
    """Remove the temp folder and the short Ray folders its ``ray`` links point to."""
    for link in [*tmp.glob("*/ray"), *tmp.glob("*/*/ray")]:
        if link.is_symlink():
            shutil.rmtree(link.resolve(), ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds per variant (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="rounds left out of the median")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="femnist_105writers.npz")
    p.add_argument("--variants", default="a,b,c", help="which of a,b,c to run (default all)")
    p.add_argument(
        "--slots", type=int, default=os.cpu_count() or 1, help="(a) worker threads (cores)"
    )
    p.add_argument(
        "--flower-state",
        choices=("personal", "none"),
        default="personal",
        help="(b) keep each device's trained model in Context.state (default) or nothing",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="measure a variant again (at most this often) when under 2 of its steady "
        "rounds were quiet; the quietest measurement is kept",
    )
    p.add_argument(
        "--budget", type=float, default=840, help="no retries once this many seconds have passed"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=45,
        help="before each variant, wait up to this many seconds for a quiet machine",
    )
    p.add_argument(
        "--quiet-cores", type=float, default=0.3, help="'quiet': fewer cores busy than this"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown result file")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, runs)")
    p.add_argument(
        "--hybridfl-root",
        type=Path,
        default=ROOT,
        help="(c) the hybridfl checkout to run (default: this one), e.g. a branch with a fix",
    )
    p.add_argument(
        "--hybridfl-set",
        action="append",
        default=[],
        help="(c) an extra --set KEY=VALUE (repeatable), e.g. simulation.preaggregate=true",
    )
    p.add_argument("--child", choices=("floor", "flower"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        print(
            f"error: data file not found: {args.data}\n"
            "This benchmark needs FEMNIST's 105-writer file (shared/data/femnist_105writers.npz); "
            "pass its path with --data PATH.",
            file=sys.stderr,
        )
        return 2
    if args.child:
        fn = floor_child if args.child == "floor" else flower_child
        args.result.write_text(json.dumps(fn(args)))
        return 0
    wanted = [k.strip() for k in args.variants.split(",") if k.strip()]
    if not wanted or any(k not in ("a", "b", "c") for k in wanted):
        print(f"error: --variants must list a, b and/or c, got {args.variants!r}", file=sys.stderr)
        return 2
    command = "python bench/round_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    mach = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in mach.items()), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="hfl-bench-"))
    runners = {"a": run_floor, "b": run_flower, "c": run_hybridfl}
    variants: list[Variant] = []
    t_start = time.monotonic()
    try:
        for key in wanted:
            best: Variant | None = None
            for attempt in range(1 + args.retries):
                print(f"running ({key}){f' again ({attempt + 1})' if attempt else ''} ...")
                work = tmp / f"{key}{attempt}"
                (work / "logs").mkdir(parents=True)
                v = runners[key](args, work)
                status = (
                    "FAILED: " + v.error if v.error else f"steady {_fmt_s(v.steady(args.warmup))}"
                )
                n_quiet = v.steady_quiet(args.warmup, args.quiet_cores)[1]
                print(
                    f"({key}) {status}, {n_quiet} quiet steady rounds, "
                    f"peak RSS {_mb(v.peak_rss_kb)}, wall {v.wall_s:.0f}s",
                    flush=True,
                )
                if best is None or _quietness(v, args) > _quietness(best, args):
                    best = v
                over = time.monotonic() - t_start + v.wall_s > args.budget
                if v.error or n_quiet >= 2 or over or attempt == args.retries:
                    break
                print(f"  ({key}) too few quiet rounds: the machine is busy; measuring again")
            assert best is not None
            variants.append(best)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            with contextlib.suppress(OSError):
                _cleanup(tmp)
    text = report(variants, args, mach, command)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 1 if any(v.error for v in variants) else 0


if __name__ == "__main__":
    sys.exit(main())
