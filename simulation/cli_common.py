"""What every ``hybridfl`` command shares: errors, the run-folder prologue, signals.

Why a module of its own: ``simulation/cli.py`` (simulate, serve, fetch, report) and
``simulation/cli_deploy.py`` (certs, superlink, device, run, deploy) both need these,
and neither should import the other for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

from common.config import ConfigError, ExperimentConfig, load_config
from common.data import DataError
from common.rundir import (
    CONFIG_FILE,
    FAILURE_FILE,
    PARTITION_STATS_FILE,
    SUMMARY_FILE,
    config_differences,
    prepare_run_dir,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: --set rounds=5 --set partition.alpha=0.1"),
]


def echo(msg: str, err: bool = False) -> None:
    """One line, flushed at once (progress must show when the output is piped)."""
    typer.echo(msg, err=err)
    (sys.stderr if err else sys.stdout).flush()


def fail(msg: str, code: int = 2) -> NoReturn:
    """``error: MSG`` on stderr and exit ``code`` (2: nothing started; 1: the run failed)."""
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    sys.stderr.flush()
    raise typer.Exit(code)


def warn(msg: str) -> None:
    typer.secho(f"warning: {msg}", fg=typer.colors.YELLOW, err=True)
    sys.stderr.flush()


def check_port(value: int) -> int:
    """Typer callback: a TCP port is 1-65535, or 0 for a free one."""
    if not 0 <= value <= 65535:
        raise typer.BadParameter(f"{value} is not a TCP port: use 1-65535, or 0 for a free one")
    return value


def port_option(help_text: str) -> typer.models.OptionInfo:
    return typer.Option(help=help_text, callback=check_port)  # type: ignore[no-any-return]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: stop everything we started, then exit 128+signal."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signals_as_interrupt() -> None:
    """SIGTERM and SIGHUP end like Ctrl-C, so ``finally`` blocks stop every child.

    Only the first signal interrupts: a second one while we are stopping the
    children is ignored, so the teardown itself is never cut short.
    """
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def exit_interrupted(err: KeyboardInterrupt, what: str = "all processes stopped") -> NoReturn:
    signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
    typer.secho(
        f"interrupted ({signal.Signals(signum).name}): {what}", fg=typer.colors.YELLOW, err=True
    )
    raise typer.Exit(128 + int(signum))


def new_run_dir(cfg: ExperimentConfig, out: Path | None) -> Path:
    """``--out`` as given, else ``<output.root>/<name>``, never reusing a folder."""
    if out is not None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            fail(f"--out {out} exists and is not empty: choose a new folder (or remove it)")
        return out
    base = Path(cfg.output.root) / cfg.name
    candidate, i = base, 1
    while candidate.exists():
        i += 1
        candidate = base.with_name(f"{cfg.name}-{i}")
    return candidate


def check_resources(cfg: ExperimentConfig, cpu_count: int | None = None) -> None:
    """Fail before anything starts when no device could ever be scheduled locally."""
    sim = cfg.simulation
    if sim.ray_address:
        return  # a cluster's resources are the cluster's business
    cores = cpu_count or os.cpu_count() or 1
    cpus = sim.max_workers if sim.max_workers > 0 else cores
    if sim.num_cpus_per_client > cpus:
        given = (
            f"simulation.max_workers={sim.max_workers}"
            if sim.max_workers > 0
            else f"all {cores} cores of this machine"
        )
        fail(
            f"invalid config: simulation.num_cpus_per_client={sim.num_cpus_per_client} but Ray "
            f"gets {cpus} CPUs ({given}): no device could ever run. Set "
            f"simulation.num_cpus_per_client to at most {cpus}"
            + ("" if sim.max_workers > 0 else f" (or simulation.max_workers to at least "
               f"{sim.num_cpus_per_client} to oversubscribe)")
        )  # fmt: skip


@dataclass
class Prepared:
    cfg: ExperimentConfig
    run_dir: Path
    stats: dict[str, object]


def prepare(
    config: Path | None,
    overrides: list[str],
    out: Path | None,
    check: bool = False,
) -> Prepared:
    """Config loaded and checked, a new run folder written; exit 2 naming the problem.

    A folder this call created is removed again when preparing it fails, so the
    corrected command can be rerun with the same ``--out``.
    """
    try:
        cfg = load_config(config, overrides)
    except ConfigError as err:
        fail(str(err))
    except (OSError, UnicodeDecodeError) as err:
        fail(f"cannot read the config {config}: {err}")
    if check:
        check_resources(cfg)
    run_dir = new_run_dir(cfg, out).resolve()
    existed = run_dir.exists()
    try:
        stats = prepare_run_dir(cfg, run_dir)
    except (DataError, ConfigError, OSError) as err:
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif run_dir.is_dir():  # an empty --out given by the user: empty it again
            for child in run_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        fail(str(err))
    return Prepared(cfg, run_dir, stats)


def prepare_resume(
    run_dir: Path, config: Path | None, overrides: list[str], out: Path | None
) -> tuple[Prepared, int]:
    """A crashed run's folder, checked and put back to its last checkpoint; the rounds
    already done. Exit 2 naming the problem (another config: the keys that differ).

    ``CONFIG`` and ``--set`` are optional: given, they must resolve to the run's own
    config (``--set`` alone applies to the run's config), so a changed experiment is
    never silently continued.
    """
    from server.checkpoint import ResumeError, rewind
    from server.recording import RewindError

    if out is not None:
        fail(f"--resume {run_dir} continues that folder: leave out --out {out}")
    run_dir = run_dir.resolve()
    stored = run_dir / CONFIG_FILE
    if not stored.is_file():
        fail(f"--resume {run_dir}: no {CONFIG_FILE} there; is it a hybridfl run folder?")
    try:
        cfg = load_config(stored)
        if config is not None or overrides:
            given = load_config(config or stored, overrides)
            diff = config_differences(cfg, given)
            if diff:
                fail(
                    f"--resume {run_dir}: the config differs from the run's in "
                    f"{len(diff)} key(s): {'; '.join(diff[:8])}. Resume with the run's own "
                    "config (leave out CONFIG and --set), or start a new run"
                )
    except ConfigError as err:
        fail(str(err))
    try:
        ck = rewind(run_dir)
    except (ResumeError, RewindError) as err:
        fail(f"--resume {run_dir}: {err}")
    for name in (FAILURE_FILE, SUMMARY_FILE):  # the end markers the CLI waits for
        (run_dir / name).unlink(missing_ok=True)
    stats_file = run_dir / PARTITION_STATS_FILE
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    return Prepared(cfg, run_dir, stats), 0 if ck is None else ck.round


__all__ = [
    "Interrupted",
    "Prepared",
    "SetOpt",
    "check_port",
    "check_resources",
    "echo",
    "exit_interrupted",
    "fail",
    "new_run_dir",
    "port_option",
    "prepare",
    "prepare_resume",
    "signals_as_interrupt",
    "warn",
]
