"""``hybridfl certs | superlink | device | run | deploy | device-data``: real processes.

Each command is a thin wrapper over Flower's own (``flower-superlink``,
``flower-supernode``, ``flwr supernode register``, ``flwr run``); the logic lives in
``simulation.deploy`` and ``simulation.certs``. Registered on the main app by
``register(cli)`` so ``simulation/cli.py`` stays small.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from simulation.deploy import DEFAULT_SUPERLINK_PORT

CertsOpt = Annotated[
    Path | None,
    typer.Option(
        "--certs",
        help="Folder from `hybridfl certs` (ca.crt, superlink.crt/.key, device-K.key/.pub).",
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option("--insecure", help="No TLS and no node authentication (local experiments only)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key: --set rounds=5 --set partition.alpha=0.1"),
]


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _warn_insecure(what: str) -> None:
    typer.secho(
        f"warning: {what} runs WITHOUT TLS and without node authentication: anyone who "
        "can reach the port can join or read the traffic. Use it only on a trusted machine.",
        fg=typer.colors.YELLOW,
        err=True,
    )


def _term_as_interrupt() -> None:
    """SIGTERM ends like Ctrl-C, so ``finally`` blocks stop every child process."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _certs(certs: Path | None, insecure: bool, what: str) -> object:
    from simulation.certs import CertFiles

    if insecure:
        _warn_insecure(what)
        return None
    if certs is None:
        _fail(f"{what} needs --certs DIR (create one with `hybridfl certs DIR --devices N`)")
    assert certs is not None
    files = CertFiles(certs.resolve())
    if not files.ca_cert.is_file():
        _fail(f"{files.ca_cert} is missing: is {certs} a `hybridfl certs` folder?")
    return files


def certs_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (created if needed).")],
    devices: Annotated[int, typer.Option("--devices", min=0, help="Device key pairs.")] = 1,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="SuperLink host name or IP for the certificate (repeat)."),
    ] = None,
) -> None:
    """Create a THROWAWAY CA, a SuperLink TLS certificate and one EC key pair per device.

    For tests and demos: real deployments use their own CA (see the README).
    """
    from simulation.certs import make_certs

    files = make_certs(out_dir, devices, host)
    typer.echo(
        f"wrote {files.ca_cert}, {files.server_cert} (+ .key) and {devices} device key "
        f"pairs to {out_dir} (private keys are chmod 600; never commit them)"
    )


def superlink_cmd(
    certs: CertsOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: all).")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port of the Fleet, Control and Runtime APIs.")
    ] = DEFAULT_SUPERLINK_PORT,
    register_keys: Annotated[
        bool,
        typer.Option(
            "--register/--no-register",
            help="Register every device-*.pub found in --certs once the SuperLink is up.",
        ),
    ] = True,
    home: Annotated[
        Path, typer.Option(help="FLWR_HOME for the SuperLink and `flwr` (connection entry).")
    ] = Path("superlink_home"),
    insecure: InsecureOpt = False,
) -> None:
    """Start a Flower SuperLink for real devices: TLS and SuperNode authentication on.

    Wraps `flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile
    --enable-supernode-auth`; more keys can be added later with
    `FLWR_HOME=HOME flwr supernode register KEY.pub hybridfl`.
    """
    from simulation.certs import CertFiles
    from simulation.deploy import register_key, superlink_command, wait_superlink, write_connection
    from simulation.procs import Processes
    from simulation.runner import RunnerError, flwr_env

    files = _certs(certs, insecure, "the SuperLink")
    assert files is None or isinstance(files, CertFiles)
    home = home.resolve()
    write_connection(home, f"127.0.0.1:{port}", files.ca_cert if files else None)
    env = flwr_env(home)
    procs = Processes()
    _term_as_interrupt()
    log = home / "superlink.log"
    try:
        proc = procs.start(superlink_command(port, host, files), env, log)
        wait_superlink(port, proc, log, files.ca_cert if files else None)
        typer.echo(f"SuperLink up on {host}:{port} (log {log})")
        if files is not None and register_keys:
            for pub in sorted(files.root.glob("device-*.pub")):
                typer.echo(f"registered {pub.name}: node {register_key(pub, env)}")
        while proc.poll() is None:
            time.sleep(0.5)
        _fail(f"SuperLink exited with code {proc.returncode}; see {log}", code=1)
    except RunnerError as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        typer.echo("stopping the SuperLink")
    finally:
        procs.stop_all()


def device_cmd(
    superlink: Annotated[str, typer.Option("--superlink", help="SuperLink HOST:PORT.")],
    device_id: Annotated[int, typer.Option("--device-id", min=0, help="This device's id.")],
    run_dir: Annotated[
        Path | None,
        typer.Option(help="One machine: the run folder (data and devices/ state in it)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="This device's data: a `hybridfl device-data` file (.npz)."),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Folder for this device's personal state.")
    ] = None,
    certs: CertsOpt = None,
    key: Annotated[
        Path | None, typer.Option(help="Private key (default: CERTS/device-K.key).")
    ] = None,
    model_server: Annotated[
        str, typer.Option(help="Model server URL for the cold-start fetch (optional).")
    ] = "",
    port: Annotated[
        int, typer.Option(help="Local Runtime API port of this SuperNode (0: a free one).")
    ] = 0,
    home: Annotated[
        Path | None,
        typer.Option(help="FLWR_HOME (default: STATE_DIR/flwr_home-K or ./supernode_home/...)."),
    ] = None,
    insecure: InsecureOpt = False,
) -> None:
    """Run one device: a Flower SuperNode whose node_config names its id, data and state.

    Replaces this process with `flower-supernode` (Ctrl-C stops it directly).
    """
    from simulation.certs import CertFiles
    from simulation.deploy import device_command
    from simulation.runner import flwr_env, free_port

    if run_dir is None and (data is None or state_dir is None):
        _fail("give --run-dir (one machine) or both --data and --state-dir (a real device)")
    files = _certs(certs, insecure, "this device")
    assert files is None or isinstance(files, CertFiles)
    node_cfg: dict[str, str | int] = {}
    if run_dir is not None:
        node_cfg["run-dir"] = str(run_dir.resolve())
    if data is not None:
        if not data.exists():
            _fail(f"--data {data} does not exist")
        node_cfg["data"] = str(data.resolve())
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        node_cfg["state-dir"] = str(state_dir.resolve())
    if model_server:
        node_cfg["model-server"] = model_server
    if files is not None and key is None:
        key = files.device_key(device_id)
        if not key.is_file():
            _fail(f"{key} is missing: pass --key or create it with `hybridfl certs`")
    if home is None:  # never inside the run folder: `hybridfl run --out` wants it empty
        base = state_dir if state_dir is not None else Path("supernode_home")
        home = base.resolve() / f"flwr_home-{device_id}"
    home.mkdir(parents=True, exist_ok=True)
    cmd = device_command(
        superlink,
        device_id,
        node_cfg,
        port or free_port(),
        files.ca_cert if files else None,
        key if files else None,
    )
    env = flwr_env(home)
    typer.echo(f"device {device_id}: {' '.join(cmd[:3])} ...", err=True)
    os.execvpe(cmd[0], cmd, env)


def run_cmd(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML.")] = None,
    superlink: Annotated[
        str, typer.Option("--superlink", help="SuperLink HOST:PORT (its Control API).")
    ] = f"127.0.0.1:{DEFAULT_SUPERLINK_PORT}",
    certs: CertsOpt = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder.")] = None,
    insecure: InsecureOpt = False,
) -> None:
    """Submit an experiment to a running deployment and follow it to the end.

    Prepares the run folder, `flwr run` with its own FLWR_HOME (CA as root
    certificates), streams metrics.jsonl; exit code 1 when the run failed.
    The SuperLink's ServerApp reads the run folder: run this on the SuperLink's machine.
    """
    from common.config import ConfigError, load_config
    from common.data import DataError
    from common.rundir import LOG_DIR, prepare_run_dir
    from simulation.certs import CertFiles
    from simulation.cli import new_run_dir
    from simulation.deploy import failure_of, follow_run, submit, write_connection
    from simulation.report import progress_line
    from simulation.runner import RunnerError, app_dir, flwr_env

    files = _certs(certs, insecure, "`hybridfl run`")
    assert files is None or isinstance(files, CertFiles)
    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as err:
        _fail(str(err))
    run_dir = new_run_dir(cfg, out).resolve()
    try:
        prepare_run_dir(cfg, run_dir)
    except (DataError, ConfigError) as err:
        _fail(str(err))
    home = run_dir / "flwr_home"
    write_connection(home, superlink, files.ca_cert if files else None)
    env = flwr_env(home)
    typer.echo(f"run folder: {run_dir}")
    try:
        (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        run_id = submit(app_dir(run_dir), run_dir, env, run_dir / LOG_DIR / "flwr-run.log")
        typer.echo(f"run {run_id} submitted to {superlink}")
        status = follow_run(
            run_id,
            run_dir,
            env,
            lambda row, timing: typer.echo(progress_line(row, timing, cfg.rounds)),
        )
    except RunnerError as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        typer.secho("interrupted (the run goes on: `flwr stop`)", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    if status != "finished:completed":
        _fail(f"run {run_id} ended with status '{status}': {failure_of(run_dir)}", code=1)
    typer.secho(f"run {run_id} completed; results in {run_dir}", fg=typer.colors.GREEN)


def deploy_cmd(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML.")] = None,
    devices: Annotated[
        int, typer.Option("--devices", min=1, help="Device processes (= partition.num_devices).")
    ] = 3,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder.")] = None,
    serve: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Model server for cold-start fetches.")
    ] = True,
    insecure: InsecureOpt = False,
) -> None:
    """One machine, real processes: throwaway certs, SuperLink (TLS + node auth), N devices.

    Writes the same run folder as `simulate` (plus certs/ and per-device logs) and
    stops every process it started, also on Ctrl-C.
    """
    from common.config import ConfigError, load_config
    from common.data import DataError
    from common.rundir import prepare_run_dir
    from simulation.cli import new_run_dir
    from simulation.deploy import deploy
    from simulation.report import progress_line
    from simulation.runner import RunnerError

    if insecure:
        _warn_insecure("this deployment")
    try:
        cfg = load_config(config, [*(set_ or []), f"partition.num_devices={devices}"])
    except ConfigError as err:
        _fail(str(err))
    run_dir = new_run_dir(cfg, out).resolve()
    try:
        prepare_run_dir(cfg, run_dir)
    except (DataError, ConfigError) as err:
        _fail(str(err))
    typer.echo(f"run folder: {run_dir}\n{devices} device processes, {cfg.rounds} rounds")
    _term_as_interrupt()
    try:
        result = deploy(
            cfg,
            run_dir,
            devices,
            lambda row, timing: typer.echo(progress_line(row, timing, cfg.rounds)),
            secure=not insecure,
            model_server=serve,
        )
    except RunnerError as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        typer.secho("interrupted: all processes stopped", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    if not result.ok:
        _fail(f"run {result.run_id} ended with status '{result.status}': {result.failure}", 1)
    typer.secho(f"done in {result.wall_s:.1f}s; results in {run_dir}", fg=typer.colors.GREEN)


def device_data_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A prepared run folder.")],
    device_id: Annotated[int, typer.Option("--device-id", min=0)],
    out: Annotated[Path, typer.Option("--out", help="Device data file to write (.npz).")],
) -> None:
    """Write one device's own split (train and test) to a file for that device's disk."""
    from simulation.deploy import export_device_data

    try:
        export_device_data(run_dir, device_id, out)
    except (OSError, ValueError, RuntimeError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out}")


def register(cli: typer.Typer) -> None:
    """Add the real-process commands to the ``hybridfl`` app."""
    cli.command("certs")(certs_cmd)
    cli.command("superlink")(superlink_cmd)
    cli.command("device")(device_cmd)
    cli.command("run")(run_cmd)
    cli.command("deploy")(deploy_cmd)
    cli.command("device-data")(device_data_cmd)


__all__ = ["register"]
