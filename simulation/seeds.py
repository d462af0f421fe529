"""``hybridfl simulate --seeds 0,1,2``: one config, one run per seed, sibling run folders.

Why one child process per seed rather than a loop in this process: each run starts
and stops its own SuperLink and Ray; a fresh process gives every seed the same clean
start (nothing cached from the previous seed), and the child's progress lines and
exit code are exactly those of a plain ``hybridfl simulate``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from common.config import ConfigError, ExperimentConfig

SEED_SUFFIX = "-s{seed}"
"""Run folders of a seed sweep: ``<name>-s0``, ``<name>-s1``, ... side by side."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; distinct non-negative integers, in the given order."""
    seeds: list[int] = []
    for part in text.split(","):
        item = part.strip()
        if not item.isdigit():
            raise ConfigError(
                f"--seeds {text!r}: {item!r} is not a seed; give non-negative integers "
                "separated by commas, e.g. --seeds 0,1,2"
            )
        if int(item) in seeds:
            raise ConfigError(f"--seeds {text!r}: seed {item} is listed twice")
        seeds.append(int(item))
    return seeds


def seed_run_dirs(cfg: ExperimentConfig, out: Path | None, seeds: list[int]) -> dict[int, Path]:
    """The sibling run folder of each seed: ``<out or output.root/name>-s<seed>``."""
    base = out if out is not None else Path(cfg.output.root) / cfg.name
    return {s: base.with_name(base.name + SEED_SUFFIX.format(seed=s)) for s in seeds}


def child_command(
    config: Path | None, overrides: list[str], seed: int, run_dir: Path, name: str
) -> list[str]:
    """The plain ``hybridfl simulate`` that runs one seed."""
    cmd = [sys.executable, "-m", "simulation.cli", "simulate"]
    if config is not None:
        cmd.append(str(config))
    for item in [*overrides, f"seed={seed}", f"name={name}"]:
        cmd += ["--set", item]
    return [*cmd, "--out", str(run_dir)]


def run_child(cmd: list[str]) -> int:
    """Run one seed; on Ctrl-C/SIGTERM here, stop the child gracefully and re-raise.

    The child runs in a session of its own (``procs.guarded``: it dies with us), so a
    terminal's Ctrl-C reaches only this process, which passes it on as SIGTERM; the
    child then stops every process it started, as a plain ``simulate`` does.
    """
    from simulation.procs import guarded

    child = subprocess.Popen(cmd, **guarded(None))
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


def simulate_seeds(
    config: Path | None, overrides: list[str], out: Path | None, seeds_text: str
) -> None:
    """Run the config once per seed, one after another; exit non-zero if any seed failed.

    Everything is checked before the first run starts: the seed list, the config, and
    that no seed's run folder exists (a sweep never mixes old and new runs).
    """
    import typer

    from common.config import load_config
    from simulation.cli_common import echo, exit_interrupted, fail, signals_as_interrupt

    try:
        seeds = parse_seeds(seeds_text)
        if any(o.split("=", 1)[0].strip() in ("seed", "name") for o in overrides):
            raise ConfigError(
                "--seeds sets seed and name for each run: drop --set seed=/--set name="
            )
        cfg = load_config(config, overrides)
    except ConfigError as err:
        fail(str(err))
    dirs = seed_run_dirs(cfg, out, seeds)
    taken = [str(d) for d in dirs.values() if d.exists()]
    if taken:
        fail(
            f"run folders of this seed sweep exist already: {', '.join(taken)}; remove them "
            "or choose another --out (or name)"
        )
    echo(
        f"{len(seeds)} runs of {config or 'the quickstart'}, one per seed ({seeds_text}), "
        f"into {', '.join(str(d) for d in dirs.values())}"
    )
    signals_as_interrupt()
    failed: dict[int, int] = {}
    for i, (seed, run_dir) in enumerate(dirs.items(), 1):
        echo(f"--- seed {seed} ({i} of {len(seeds)}): {run_dir}")
        cmd = child_command(config, overrides, seed, run_dir, run_dir.name)
        try:
            rc = run_child(cmd)
        except KeyboardInterrupt as err:
            done = [str(s) for s in list(dirs)[: i - 1] if s not in failed]
            exit_interrupted(err, f"seed {seed} stopped; seeds done: {', '.join(done) or 'none'}")
        if rc == 2:  # a config or data problem: every other seed would fail the same way
            fail(f"seed {seed} could not start (see above); the remaining seeds were not run")
        if rc != 0:
            failed[seed] = rc
    ok = [str(d) for s, d in dirs.items() if s not in failed]
    if failed:
        fail(
            f"{len(failed)} of {len(seeds)} seeds failed ("
            + ", ".join(f"seed {s}: exit {rc}" for s, rc in failed.items())
            + f"); finished: {', '.join(ok) or 'none'}",
            code=1,
        )
    typer.secho(
        f"all {len(seeds)} seeds finished; mean ± std over seeds: hybridfl report {' '.join(ok)}",
        fg=typer.colors.GREEN,
    )
