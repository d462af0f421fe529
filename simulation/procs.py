"""Start child processes and stop them all, grandchildren included, even when we die.

Why walk /proc: the SuperLink starts ``flower-superexec`` in a session of its
own, which starts the simulation process and Ray; killing the SuperLink's process
group alone would leave all of those running. We collect the whole tree and its
process groups first, then signal every group.

Why more when this process is killed (``kill -9``, an OOM kill, a closed terminal):
no ``finally`` runs then. Two guards cover it:

* every child asks the kernel for SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``), which stops the SuperLink, the model server and
  ``flwr log`` at once;
* a watchdog process (``simulation/watchdog.py``) waits on a pipe only we hold and,
  when it closes, stops every process whose environment carries our marker
  ``HYBRIDFL_OWNER=<token>``: also those that started sessions of their own and
  were re-parented to init (SuperExec, the simulation process, Ray).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

OWNER_VAR = "HYBRIDFL_OWNER"
"""Environment marker of every process this command started (and of theirs)."""
OWNER_TOKEN = uuid.uuid4().hex
_PR_SET_PDEATHSIG = 1
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")

_watchdog_lock = threading.Lock()
_watchdog_pipe: int | None = None
_watchdog: subprocess.Popen[bytes] | None = None
"""Kept so the Popen object is never collected while the watchdog runs."""


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def _die_with_parent(parent: int) -> Callable[[], None]:
    """``preexec_fn``: a new session, SIGTERM when the parent dies (Linux)."""

    def preexec() -> None:
        os.setsid()
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def ensure_watchdog() -> None:
    """Start this process's watchdog once (Linux; a no-op elsewhere)."""
    global _watchdog_pipe, _watchdog
    with _watchdog_lock:
        if _watchdog_pipe is not None or not Path("/proc").is_dir():
            return
        r, w = os.pipe()  # both ends close-on-exec: no other child inherits them
        try:
            _watchdog = subprocess.Popen(
                [sys.executable, "-I", str(Path(__file__).with_name("watchdog.py")), str(r),
                 OWNER_TOKEN],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(r)
        _watchdog_pipe = w


def owned_env(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` (default: ours) with this command's owner marker."""
    return {**(os.environ if env is None else env), OWNER_VAR: OWNER_TOKEN}


def guarded(env: dict[str, str] | None) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a child that must not outlive us.

    The child gets our owner marker in ``env``, a session of its own and, when
    started from the main thread, SIGTERM on our death (``PR_SET_PDEATHSIG`` fires
    when the *thread* that started the child ends, so other threads rely on the
    watchdog alone); the watchdog is started if it is not yet running. For test
    helpers and anything else that starts a process without ``Processes``.
    """
    ensure_watchdog()
    kwargs: dict[str, Any] = {"env": owned_env(env)}
    if threading.current_thread() is threading.main_thread():
        kwargs["preexec_fn"] = _die_with_parent(os.getpid())
    else:
        kwargs["start_new_session"] = True
    return kwargs


def _copy_plain(src: IO[bytes], log: Path) -> None:
    """Copy a child's output to its log without terminal colour codes."""
    with log.open("ab") as out:
        for line in iter(src.readline, b""):
            out.write(_ANSI.sub(b"", line))
            out.flush()
    src.close()


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
        self,
        cmd: list[str],
        env: dict[str, str] | None,
        log: Path,
        cwd: Path | None = None,
        plain: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a session of its own, output to ``log``.

        ``plain``: strip terminal colour codes from the output (Flower colours its
        log lines whatever the terminal). Children started from the main thread also
        get SIGTERM when we die (``PR_SET_PDEATHSIG`` fires when the *thread* that
        started the child ends, so other threads rely on the watchdog alone).
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        kwargs = guarded(env)
        if plain:
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=cwd, **kwargs,  # type: ignore[call-overload]
            )  # fmt: skip
            assert p.stdout is not None
            threading.Thread(
                target=_copy_plain, args=(p.stdout, log), name=f"log-{log.name}", daemon=True
            ).start()
        else:
            with log.open("ab") as out:
                p = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=cwd, **kwargs,  # type: ignore[call-overload]
                )  # fmt: skip
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


def _inodes_of(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1])
    # IPv6: four little-endian 32-bit words
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    full = b"".join(words)
    if full[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(str(b) for b in full[12:])
    import ipaddress

    return str(ipaddress.IPv6Address(full))


def _tcp_table(names: tuple[str, ...] = ("tcp", "tcp6")) -> list[list[str]]:
    """Rows of /proc/net/tcp and tcp6 (Linux; empty elsewhere), split into columns."""
    rows = []
    for name in names:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9:
                    rows.append(cols)
    return rows


def _endpoint(col: str) -> tuple[str, int]:
    ip, port = col.split(":")
    return _hex_ip(ip), int(port, 16)


def _same_host(a: str, b: str) -> bool:
    """``a == b``, an IPv4 address also matching its IPv4-mapped IPv6 form."""
    return a.removeprefix("::ffff:") == b.removeprefix("::ffff:")


def tcp_peer_uid(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The user id owning the *client* end of a TCP connection to one of our servers.

    Only a connection from this machine has its client end in our socket table, so
    ``None`` also means "not from this machine" (Linux; always ``None`` elsewhere).
    Like ``SO_PEERCRED`` for TCP: the kernel records who opened the socket, which a
    client cannot choose. Reads one table (IPv4 or IPv6, by the client's address):
    /proc is slow in some sandboxes (~20 ms a read), so call it once per connection.
    """
    table = ("tcp6",) if ":" in client[0] else ("tcp",)
    for cols in _tcp_table(table):
        (lip, lport), (rip, rport) = _endpoint(cols[1]), _endpoint(cols[2])
        if (
            lport == client[1]
            and rport == server[1]
            and _same_host(lip, client[0])
            and _same_host(rip, server[0])
        ):
            return int(cols[7])
    return None


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """TCP sockets in LISTEN state held by ``pids``: (pid, address, port) (Linux)."""
    table: dict[str, tuple[str, int]] = {}
    for cols in _tcp_table():
        if cols[3] == "0A":  # TCP_LISTEN
            table[cols[9]] = _endpoint(cols[1])
    out = []
    for pid in pids:
        for inode in _inodes_of(pid):
            if inode in table:
                out.append((pid, *table[inode]))
    return out
