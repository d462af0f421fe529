"""Stop every process a hybridfl command started once that command is gone.

Started by ``simulation.procs`` with the read end of a pipe whose write end only the
command holds: when the command ends in any way (``kill -9`` included) the read
returns end-of-file, and this process stops every process whose environment carries
the command's marker ``HYBRIDFL_OWNER=<token>``. The marker is inherited by every
descendant, also by those that start sessions of their own (Flower's SuperExec,
Ray's gcs_server, raylet and workers), which a process-tree walk would lose once
their parent is gone.

Standard library only, run as a script (``python -I watchdog.py FD TOKEN``): it
must start fast and never import the project.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

MARKER = "HYBRIDFL_OWNER"
GRACE_S = 3.0
"""Time between SIGTERM and SIGKILL."""
GIVE_UP_S = 30.0


def owned(token: str, me: int) -> list[int]:
    """Live processes (not zombies) whose environment carries ``MARKER=token``."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read():
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z":
            found.append(int(name))
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def clean_up(token: str) -> None:
    """SIGTERM every owned process, SIGKILL what is left after the grace period;
    repeat until none is left (a dying parent may have just started one)."""
    me = os.getpid()
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline:
        pids = owned(token, me)
        if not pids:
            return
        _signal(pids, signal.SIGTERM)
        grace = time.monotonic() + GRACE_S
        while time.monotonic() < grace and owned(token, me):
            time.sleep(0.1)
        _signal(owned(token, me), signal.SIGKILL)
        time.sleep(0.1)


def main() -> None:
    fd, token = int(sys.argv[1]), sys.argv[2]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if not os.read(fd, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    clean_up(token)


if __name__ == "__main__":
    main()
