"""Start child processes and stop them all, grandchildren included.

Why walk /proc: the SuperLink starts ``flower-superexec`` in a session of its
own, which starts the simulation process and Ray; killing the SuperLink's process
group alone would leave all of those running. We collect the whole tree and its
process groups first, then signal every group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        kids.setdefault(int(fields[1]), []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    kids = _children_map()
    out, stack = [], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_groups(pgids: set[int], pids: set[int], sig: signal.Signals) -> None:
    for g in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


@dataclass
class Processes:
    """Every process a run started, so all of them (and theirs) can be stopped."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(
        self, cmd: list[str], env: dict[str, str] | None, log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            p = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )
        self.procs.append(p)
        return p

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process group in the trees, wait, then SIGKILL what is left."""
        me = os.getpgrp()
        pids: set[int] = set()
        for p in self.procs:
            if p.poll() is None:
                pids.add(p.pid)
            pids.update(descendants(p.pid))
        pgids = {g for g in (_pgid(p) for p in pids) if g is not None and g != me}
        pgids.update(p.pid for p in self.procs)  # each was started as a group leader
        _signal_groups(pgids, pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(_alive(x) for x in pids):
            time.sleep(0.1)
        # New children may have appeared meanwhile; their groups are among ours.
        _signal_groups(pgids, {x for x in pids if _alive(x)}, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"
