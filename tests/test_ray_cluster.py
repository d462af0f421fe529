"""Scale-out on an existing Ray cluster: two Ray nodes on this machine, one simulation.

The test starts a real two-node Ray cluster (``ray start --head`` and ``ray start
--address``, one CPU each, each with its own temp folder and free ports), runs
``hybridfl simulate`` on it through ``simulation.ray_address``, and checks that
ClientApp work ran on *both* nodes, that the run succeeded, and that both nodes are
gone afterwards, without touching any other Ray instance on the machine.

How the nodes are told apart and stopped: each ``ray start`` runs in a new session
(``start_new_session``), and Ray never calls ``setsid`` for what it spawns (GCS,
raylet, agents, workers), so every process of a node has the session id of the
``ray start`` that created it. That is also how the test stops the cluster: it signals
the processes of its own two sessions, never ``ray stop`` (which stops every Ray
instance on the machine). Process titles are not enough: Ray workers and agents call
``setproctitle``, which overwrites their command line *and* environment in /proc.

How "work ran on both nodes" is shown, while the run goes on: a ClientApp actor's
process title is ``ray::ClientAppActor.run`` while it handles a Flower message (Ray
sets the title per task), so sampling /proc for such processes and grouping them by
session tells which node handled messages. After the run, each node's own log folder
must also hold a worker log of a ``ClientAppActor``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.rundir import METRICS_FILE, RAY_DIR, SUMMARY_FILE
from tests.conftest import REPO, processes_mentioning

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 900
STOP_GRACE_S = 20.0
OBJECT_STORE_BYTES = 100 * 1024 * 1024
ACTOR_TITLE = "ray::ClientAppActor"


def _free_port() -> int:
    from simulation.flwr_cli import free_port

    return free_port()


def _session(pid: int) -> int | None:
    """Session id of ``pid``; None when it is gone or a zombie (it runs nothing)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
    return None if fields[0] == "Z" else int(fields[3])


def session_members(sid: int) -> list[int]:
    """Running processes whose session id is ``sid``."""
    return [
        int(d.name)
        for d in Path("/proc").iterdir()
        if d.name.isdigit() and _session(int(d.name)) == sid
    ]


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


class RayNode:
    """One ``ray start`` (head or worker) in a session of its own."""

    def __init__(self, name: str, temp_dir: Path, args: list[str]) -> None:
        self.name, self.temp_dir = name, temp_dir
        temp_dir.mkdir(parents=True)
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
            env.pop(key, None)  # the latter =0 forbids joining a cluster
        env.update(
            {
                "RAY_TMPDIR": str(temp_dir),
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DEDUP_LOGS": "0",
                "NO_COLOR": "1",
            }
        )
        cmd = [
            RAY, "start", "--num-cpus", "1", "--temp-dir", str(temp_dir),
            "--disable-usage-stats", "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--node-manager-port", str(_free_port()),
            "--object-manager-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0",
            *args,
        ]  # fmt: skip
        self.log = temp_dir.parent / f"ray-start-{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.sid = self.proc.pid  # session leader: its pid is the session id

    def wait_started(self) -> None:
        try:
            rc = self.proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"`ray start` ({self.name}) exited {rc}:\n{tail}")

    def members(self) -> list[int]:
        return session_members(self.sid)

    def logs_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"


def stop_nodes(nodes: list[RayNode]) -> None:
    """SIGTERM every process of the nodes' sessions, SIGKILL what is left after a grace."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.kill()
            for pid in node.members():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while any(n.members() for n in nodes) and time.monotonic() < deadline:
            for node in nodes:
                node.proc.poll()  # reap the session leaders if they were still ours
            time.sleep(0.5)
        if not any(n.members() for n in nodes):
            return


class ActorSampler:
    """Samples /proc while the run goes on: titles of ClientApp actors, per node."""

    def __init__(self, nodes: list[RayNode], every_s: float = 0.2) -> None:
        self.by_sid = {n.sid: n.name for n in nodes}
        self.seen: dict[str, set[str]] = {n.name: set() for n in nodes}
        self.pids: dict[str, set[int]] = {n.name: set() for n in nodes}
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actor-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                title = cmdline(int(d.name))
                if not title.startswith(ACTOR_TITLE):
                    continue
                node = self.by_sid.get(_session(int(d.name)) or -1)
                if node is not None:
                    self.seen[node].add(title.strip())
                    self.pids[node].add(int(d.name))
            self._stop.wait(self.every_s)

    def __enter__(self) -> ActorSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def handled_messages(self, node: str) -> bool:
        return any(t.startswith(f"{ACTOR_TITLE}.run") for t in self.seen[node])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder under /tmp: Ray's Unix socket paths must stay under 107 bytes."""
    root = Path(tempfile.mkdtemp(prefix="hfl-rc-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def two_node_cluster(short_tmp: Path) -> Iterator[tuple[str, list[RayNode]]]:
    """A head and a worker node (1 CPU each) on this machine; stopped afterwards."""
    nodes: list[RayNode] = []
    try:
        gcs_port = _free_port()
        head = RayNode(
            "head",
            short_tmp / "head",
            [
                "--head", "--port", str(gcs_port),
                "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
                "--ray-client-server-port", str(_free_port()),
            ],
        )  # fmt: skip
        nodes.append(head)
        head.wait_started()
        # What the head announces (its node IP, not loopback: Ray resolves 127.0.0.1
        # to the host's address for any cluster that other nodes may join).
        address = (head.temp_dir / "ray_current_cluster").read_text().strip()
        assert address.endswith(f":{gcs_port}"), address
        worker = RayNode("worker", short_tmp / "worker", ["--address", address])
        nodes.append(worker)
        worker.wait_started()
        yield address, nodes
    finally:
        stop_nodes(nodes)
        left = {n.name: [(p, cmdline(p)[:120]) for p in n.members()] for n in nodes}
        assert not any(left.values()), f"Ray processes left running: {left}"
        deadline = time.monotonic() + 15
        while processes_mentioning(str(short_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        stray = [(p, cmdline(p)[:120]) for p in processes_mentioning(str(short_tmp))]
        assert stray == [], f"processes still mention {short_tmp}: {stray}"


@pytest.mark.slow
def test_simulation_runs_on_both_nodes_of_a_ray_cluster(
    two_node_cluster: tuple[str, list[RayNode]], short_tmp: Path
) -> None:
    address, nodes = two_node_cluster
    run_dir = short_tmp / "run"  # short: its Ray temp folder stays inside it
    sets = [
        "rounds=2",
        'model.name="logistic"',
        "partition.num_devices=6",
        f'simulation.ray_address="{address}"',
        # The cluster's CPUs (2 nodes x 1): with ray_address set, max_workers is not
        # given to Ray but sizes hybridfl's slots (2 x workers), so every actor of the
        # cluster-wide pool gets messages. One device per message: several messages.
        "simulation.max_workers=2",
        "simulation.devices_per_message=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "simulation.cli",
        "simulate",
        str(REPO / "configs/quickstart.toml"),
    ]
    cmd += ["--out", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    log = short_tmp / "simulate.out"
    t0 = time.monotonic()
    with ActorSampler(nodes) as sampler, log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # the CLI stops its SuperLink on Ctrl-C
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = None
    wall = time.monotonic() - t0
    output = log.read_text(errors="replace")
    assert rc == 0, f"hybridfl simulate exited {rc} after {wall:.0f}s:\n{output[-4000:]}"

    # The run succeeded: one metrics row per round, a summary of the last round.
    rows = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines() if x]
    assert [r["round"] for r in rows] == [1, 2], output[-2000:]
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["rounds"] == 2
    assert summary["num_updates"] > 0 and summary["failed_updates"] == 0
    # The simulation connected to this cluster, not to a Ray instance of its own:
    # nothing was started in the run folder's Ray temp folder.
    assert not list((run_dir / RAY_DIR).glob("session_*")), "a local Ray instance was started"

    # Work ran on both nodes: a ClientApp actor of each node handled a message.
    for node in nodes:
        assert sampler.handled_messages(node.name), (
            f"no ClientApp actor on the {node.name} node handled a message; titles seen per "
            f"node: {sampler.seen}; run output:\n{output[-2000:]}"
        )
    assert sampler.pids["head"].isdisjoint(sampler.pids["worker"])
    # And each node's own log folder holds a ClientAppActor worker.
    for node in nodes:
        logs = list(node.logs_dir().glob("worker-*.out"))
        assert any(":actor_name:ClientAppActor" in p.read_text(errors="replace") for p in logs), (
            f"no ClientAppActor worker log under {node.logs_dir()}"
        )
    print(f"run on the two-node cluster {address}: {wall:.0f}s; titles seen {sampler.seen}")
