"""Real processes: a Flower SuperLink and one SuperNode per device, over TLS with node auth.

Why thin wrappers over Flower's own commands (``flower-superlink``,
``flower-supernode``, ``flwr supernode register``, ``flwr run``): the transport, TLS
and node authentication are Flower's; we only choose arguments, keep every process
in one ``Processes`` (so all of them stop, also on Ctrl-C), and give each its own
``FLWR_HOME``, port and log. The ClientApp and ServerApp are the very ones that run
under Ray; a device finds its data and personal state from its ``node_config``.

The SuperLink runs through ``simulation.superlink_guard``: devices reach only its
Fleet API (``port``); the Control API (``flwr run``, ``flwr supernode register``) is
on ``127.0.0.1:control_port``, for the SuperLink's own user only.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import ExperimentConfig
from common.rundir import FLWR_HOME_DIR, LOG_DIR, STATE_DIR
from simulation.certs import CertFiles, make_certs
from simulation.flwr_cli import (
    CONNECTION,
    RunnerError,
    flwr_env,
    flwr_json,
    free_port,
    stream_log_cmd,
    submit,
    wait_superlink,
    write_connection,
)
from simulation.procs import Processes
from simulation.runner import (
    RUN_LOG,
    SUBMIT_LOG,
    SUPERLINK_LOG,
    ProgressFn,
    RunResult,
    app_dir,
    failure_of,
    follow_run,
)
from simulation.superlink_guard import CONTROL_PORT_FLAG

DEFAULT_SUPERLINK_PORT = 9092
"""The Fleet API, the one port devices connect to (Flower's traditional Fleet port)."""
DEFAULT_CONTROL_PORT = 9093
"""Control and Runtime APIs, on 127.0.0.1 only (Flower's traditional Control port)."""
CERTS_DIR = "certs"
DEVICE_DATA_DIR = "device_data"
TASK_POLL_S = "0.2"
"""Flower's SuperExec looks for new ClientApp tasks every second by default
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``); a shorter interval cuts up to 0.8 s per message."""


# -- configuration of Flower's own tools ---------------------------------------------
def node_config_arg(values: dict[str, str | int]) -> str:
    """``--node-config`` value: ints bare, strings quoted (paths must not hold spaces)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, str):
            if any(c in v for c in ' "'):
                raise ValueError(f"node config {k}={v!r}: spaces and quotes are not supported")
            parts.append(f'{k}="{v}"')
        else:
            parts.append(f"{k}={int(v)}")
    return " ".join(parts)


def superlink_command(
    port: int,
    control_port: int,
    host: str = "127.0.0.1",
    certs: CertFiles | None = None,
    database: Path | None = None,
) -> list[str]:
    """Flower's SuperLink for real SuperNodes: TLS + node auth unless ``certs`` is None.

    Fleet API on ``host:port``, Control and Runtime APIs on ``127.0.0.1:control_port``
    (``simulation.superlink_guard``).
    """
    cmd = [sys.executable, "-m", "simulation.superlink_guard"]
    cmd += [CONTROL_PORT_FLAG, str(control_port), "--host", host, "--port", str(port)]
    cmd += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-certfile", str(certs.server_cert.resolve()),
            "--ssl-keyfile", str(certs.server_key.resolve()),
            "--ssl-ca-certfile", str(certs.ca_cert.resolve()),
            "--enable-supernode-auth",
        ]  # fmt: skip
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def device_command(
    superlink: str,
    device_id: int,
    node_config: dict[str, str | int],
    runtime_port: int,
    ca_cert: Path | None,
    private_key: Path | None,
) -> list[str]:
    """``flower-supernode`` for device ``device_id``; insecure when ``ca_cert`` is None.

    ``runtime_port`` is the SuperNode's local Runtime API (one per SuperNode on a
    machine); the ClientApp processes it starts talk to it on 127.0.0.1.
    """
    cmd = ["flower-supernode", "--superlink", superlink]
    if ca_cert is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(ca_cert.resolve())]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key.resolve())]
    cfg = {"device-id": device_id, **node_config}
    cmd += ["--node-config", node_config_arg(cfg), "--port", str(runtime_port)]
    cmd += ["--isolation", "subprocess"]
    return cmd


def register_key(public_key: Path, env: dict[str, str]) -> int:
    """Register a device's public key with ``flwr supernode register``; its node id."""
    payload, raw = flwr_json(
        ["supernode", "register", str(public_key), CONNECTION], env, f"registering {public_key}"
    )
    try:
        return int(payload["node-id"])
    except (KeyError, TypeError, ValueError):
        raise RunnerError(f"registering {public_key} gave no node id: {raw[-1000:]}") from None


def list_nodes(env: dict[str, str]) -> list[dict[str, object]]:
    """The SuperLink's node table (``flwr supernode ls``): ids and online status."""
    try:
        payload, _ = flwr_json(["supernode", "ls", CONNECTION], env, "listing the SuperNodes")
        return list(payload["nodes"])
    except (RunnerError, KeyError, TypeError):
        return []


def submit_deployment(run_dir: Path, env: dict[str, str], log: Path) -> int:
    """``flwr run`` to a deployment (no federation options): the run id.

    The ServerApp's population is the registered SuperNodes, one device each.
    """
    return submit(app_dir(run_dir), env, log, {"run-dir": str(run_dir), "population": "nodes"})


def export_device_data(run_dir: Path, device_id: int, out: Path) -> Path:
    """One device's own split as a plain ``.npz`` (what goes onto that device's disk).

    Why: a real device holds its data, not the whole dataset plus everyone's
    partition; the file is read with ``allow_pickle=False``.
    """
    from common.config import load_config
    from common.data import device_arrays, load_dataset, load_partition
    from common.rundir import CONFIG_FILE, PARTITION_FILE

    cfg = load_config(run_dir / CONFIG_FILE)
    x_tr, y_tr, x_te, y_te = device_arrays(
        load_dataset(cfg.data), load_partition(run_dir / PARTITION_FILE), device_id
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".incomplete.npz")
    np.savez(tmp, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    tmp.replace(out)
    return out


# -- one deployment on this machine ---------------------------------------------------
@dataclass
class Deployment:
    """A SuperLink, device SuperNodes and (optionally) the model server, all on 127.0.0.1.

    Each device has its own ``Processes`` so a test (or an operator) can kill and
    restart one device; ``stop`` ends every process any of them started.
    """

    run_dir: Path
    certs: CertFiles | None
    port: int = 0
    control_port: int = 0
    procs: Processes = field(default_factory=Processes)
    devices: dict[int, Processes] = field(default_factory=dict)
    model_server_url: str = ""
    link: subprocess.Popen[bytes] | None = None
    _model_server: object | None = None

    def __post_init__(self) -> None:
        self.run_dir = self.run_dir.resolve()
        self.port = self.port or free_port()
        while not self.control_port or self.control_port == self.port:
            self.control_port = free_port()
        self.logs = self.run_dir / LOG_DIR
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.run_dir / FLWR_HOME_DIR
        ca = self.certs.ca_cert if self.certs else None
        write_connection(self.flwr_home, self.control_address, ca)
        self.env = flwr_env(self.flwr_home)
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_S)
        self.device_data: dict[int, Path] = {}
        self._stopping = threading.Event()

    @property
    def address(self) -> str:
        """The Fleet API: what devices connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        """The Control API: what ``flwr`` (run, ls, supernode register) connects to."""
        return f"127.0.0.1:{self.control_port}"

    def start_superlink(self) -> None:
        log = self.logs / SUPERLINK_LOG
        cmd = superlink_command(self.port, self.control_port, "127.0.0.1", self.certs)
        self.link = self.procs.start(cmd, self.env, log, cwd=self.run_dir, plain=True)
        wait_superlink(self.port, self.link, log, self.certs.ca_cert if self.certs else None)

    def register(self, device_ids: list[int]) -> dict[int, int]:
        """Register the devices' public keys (node auth); device id -> node id."""
        if self.certs is None:
            return {}
        return {k: register_key(self.certs.device_pub(k), self.env) for k in device_ids}

    def export_data(self, device_ids: list[int]) -> None:
        """Give each device its own data file, as on a real device.

        Why: deployment starts a new ClientApp process per message, so the
        per-process dataset cache of simulation never hits; loading the whole
        dataset and slicing it per message costs about a second (digits), a
        device file a millisecond. The arrays are the same, so results are too.
        """
        for k in device_ids:
            out = self.run_dir / DEVICE_DATA_DIR / f"device-{k}.npz"
            self.device_data[k] = export_device_data(self.run_dir, k, out)

    def start_model_server(self) -> str:
        from simulation.serving import start_model_server

        server = start_model_server(self.run_dir, "127.0.0.1", 0, self.certs)
        self._model_server = server
        self.procs.procs.extend(server.procs.procs)
        self.model_server_url = server.url
        return server.url

    def start_device(
        self, device_id: int, private_key: Path | None = None, cold_start: bool = True
    ) -> subprocess.Popen[bytes]:
        """One SuperNode for ``device_id`` with its data and state in the run folder."""
        home = self.flwr_home / f"device-{device_id}"
        home.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "FLWR_HOME": str(home)}
        node_cfg: dict[str, str | int] = {"run-dir": str(self.run_dir)}
        if device_id in self.device_data:
            node_cfg["data"] = str(self.device_data[device_id])
            node_cfg["state-dir"] = str(self.run_dir / STATE_DIR)
        if cold_start and self.model_server_url:
            node_cfg["model-server"] = self.model_server_url
            if self.certs is not None:
                node_cfg["model-server-ca"] = str(self.certs.ca_cert.resolve())
        key = private_key
        if key is None and self.certs is not None:
            key = self.certs.device_key(device_id)
        cmd = device_command(
            self.address,
            device_id,
            node_cfg,
            free_port(),
            self.certs.ca_cert if self.certs else None,
            key,
        )
        procs = self.devices.setdefault(device_id, Processes())
        return procs.start(cmd, env, self.logs / f"device-{device_id}.log", cwd=home, plain=True)

    def kill_device(self, device_id: int, crash: bool = False) -> None:
        """Stop device ``device_id`` and everything it started; ``crash``: no grace at all."""
        procs = self.devices.pop(device_id, None)
        if procs is not None:
            procs.stop_all(grace_s=0.0 if crash else 5.0)

    def restart_device(self, device_id: int, within_s: float = 180.0) -> threading.Thread:
        """Start device ``device_id`` again, retrying in the background until it joins.

        Why retry: after a crash the SuperLink keeps the node online until its
        heartbeat expires (Flower: 2 x 30 s) and refuses to activate it twice, so the
        SuperNode exits (code 305); a real device would simply try again later.
        """

        def attempt() -> None:
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline and not self._stopping.is_set():
                proc = self.start_device(device_id)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    return  # still running: it joined
                self._stopping.wait(3.0)

        thread = threading.Thread(target=attempt, name=f"restart-device-{device_id}", daemon=True)
        thread.start()
        return thread

    def submit(self) -> int:
        return submit_deployment(self.run_dir, self.env, self.logs / SUBMIT_LOG)

    def check_alive(self) -> None:
        if self.link is not None and self.link.poll() is not None:
            raise RunnerError(
                f"SuperLink exited unexpectedly (code {self.link.returncode}); "
                f"see {self.logs / SUPERLINK_LOG}"
            )

    def follow(self, run_id: int, on_round: ProgressFn | None = None) -> str:
        log = self.logs / RUN_LOG
        self.procs.start(stream_log_cmd(run_id), self.env, log, cwd=self.flwr_home, plain=True)
        return follow_run(run_id, self.run_dir, self.env, on_round, self.check_alive)

    def stop(self) -> None:
        self._stopping.set()
        for k in list(self.devices):
            self.kill_device(k)
        self.procs.stop_all()


def deploy(
    cfg: ExperimentConfig,
    run_dir: Path,
    devices: int,
    on_round: ProgressFn | None = None,
    secure: bool = True,
    model_server: bool = True,
    on_started: Callable[[Deployment], None] | None = None,
) -> RunResult:
    """Certs, SuperLink, keys registered, N devices, model server, run, teardown.

    ``run_dir`` must be prepared (``prepare_run_dir``). Every process started here is
    stopped before returning, also on an exception or Ctrl-C.
    """
    run_dir = run_dir.resolve()
    t0 = time.perf_counter()
    certs = make_certs(run_dir / CERTS_DIR, devices) if secure else None
    dep = Deployment(run_dir, certs)
    try:
        dep.start_superlink()
        dep.register(list(range(devices)))
        dep.export_data(list(range(devices)))
        if model_server:
            dep.start_model_server()
        for k in range(devices):
            dep.start_device(k)
        if on_started is not None:
            on_started(dep)
        run_id = dep.submit()
        status = dep.follow(run_id, on_round)
        return RunResult(run_id, status, time.perf_counter() - t0, run_dir, failure_of(run_dir))
    finally:
        dep.stop()


__all__ = [
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_SUPERLINK_PORT",
    "Deployment",
    "deploy",
    "device_command",
    "export_device_data",
    "list_nodes",
    "node_config_arg",
    "register_key",
    "submit_deployment",
    "superlink_command",
    "wait_superlink",
    "write_connection",
]
