"""``hybridfl certs | superlink | device | run | deploy | device-data``: real processes.

Each command is a thin wrapper over Flower's own (``flower-superlink``,
``flower-supernode``, ``flwr supernode register``, ``flwr run``); the logic lives in
``simulation.deploy`` and ``simulation.certs``. Registered on the main app by
``register(cli)`` so ``simulation/cli.py`` stays small.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from simulation.cli_common import (
    SetOpt,
    echo,
    exit_interrupted,
    fail,
    port_option,
    prepare,
    signals_as_interrupt,
    warn,
)
from simulation.deploy import DEFAULT_CONTROL_PORT, DEFAULT_SUPERLINK_PORT

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


def _warn_insecure(what: str) -> None:
    warn(
        f"{what} runs WITHOUT TLS and without node authentication: anyone who "
        "can reach the port can join or read the traffic. Use it only on a trusted machine."
    )


def _certs(certs: Path | None, insecure: bool, what: str) -> object:
    from simulation.certs import CertFiles

    if insecure:
        _warn_insecure(what)
        return None
    if certs is None:
        fail(f"{what} needs --certs DIR (create one with `hybridfl certs DIR --devices N`)")
    assert certs is not None
    files = CertFiles(certs.resolve())
    if not files.ca_cert.is_file():
        fail(f"{files.ca_cert} is missing: is {certs} a `hybridfl certs` folder?")
    return files


def _git_work_tree(path: Path) -> Path | None:
    """The git work tree ``path`` is inside, if any."""
    for d in [path, *path.parents]:
        if (d / ".git").exists():
            return d
    return None


def certs_cmd(
    out_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Folder to write (created if needed; default: ~/.config/hybridfl/certs, "
            "outside any source tree)."
        ),
    ] = None,
    devices: Annotated[int, typer.Option("--devices", min=0, help="Device key pairs.")] = 1,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="SuperLink host name or IP for the certificate (repeat)."),
    ] = None,
) -> None:
    """Create a THROWAWAY CA, a SuperLink TLS certificate and one EC key pair per device.

    For tests and demos: real deployments use their own CA (see the README).
    """
    from simulation.certs import default_certs_dir, make_certs

    out_dir = out_dir if out_dir is not None else default_certs_dir()
    tree = _git_work_tree(out_dir.resolve())
    if tree is not None:
        warn(
            f"{out_dir} is inside the git work tree {tree}: private keys there are one "
            "`git add` away from a commit. Prefer a folder outside it (the default is "
            f"{default_certs_dir()})."
        )
    files = make_certs(out_dir, devices, host)
    echo(
        f"wrote {files.ca_cert}, {files.server_cert} (+ .key) and {devices} device key "
        f"pairs to {out_dir} (private keys are chmod 600; never commit them)"
    )


def superlink_cmd(
    certs: CertsOpt = None,
    host: Annotated[
        str, typer.Option(help="Address of the Fleet API, the one devices reach (0.0.0.0: all).")
    ] = "127.0.0.1",
    port: Annotated[
        int, port_option("Port of the Fleet API (devices connect here), 1-65535.")
    ] = DEFAULT_SUPERLINK_PORT,
    control_port: Annotated[
        int,
        port_option(
            "Port of the Control and Runtime APIs (`flwr`, `hybridfl run`), always on "
            "127.0.0.1 and for this user only, 1-65535."
        ),
    ] = DEFAULT_CONTROL_PORT,
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

    Flower's SuperLink (`--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile
    --enable-supernode-auth`) with only the Fleet API on --host:--port; `flwr` and
    `hybridfl run` use 127.0.0.1:--control-port on this machine, as this user. More
    keys can be added later with
    `FLWR_HOME=HOME flwr supernode register KEY.pub hybridfl-superlink`.
    """
    from simulation.certs import CertFiles
    from simulation.deploy import register_key, superlink_command
    from simulation.flwr_cli import RunnerError, flwr_env, wait_superlink, write_connection
    from simulation.procs import Processes
    from simulation.runner import SUPERLINK_LOG

    files = _certs(certs, insecure, "the SuperLink")
    assert files is None or isinstance(files, CertFiles)
    if control_port == port:
        fail(f"--control-port {control_port} equals --port: give the Control API its own port")
    home = home.resolve()
    write_connection(home, f"127.0.0.1:{control_port}", files.ca_cert if files else None)
    env = flwr_env(home)
    procs = Processes()
    signals_as_interrupt()
    log = home / SUPERLINK_LOG
    try:
        cmd = superlink_command(port, control_port, host, files)
        proc = procs.start(cmd, env, log, plain=True)
        wait_superlink(port, proc, log, files.ca_cert if files else None)
        echo(
            f"SuperLink up: devices connect to {host}:{port}; `hybridfl run` and `flwr` "
            f"to 127.0.0.1:{control_port} (log {log})"
        )
        if files is not None and register_keys:
            for pub in sorted(files.root.glob("device-*.pub")):
                echo(f"registered {pub.name}: node {register_key(pub, env)}")
        while proc.poll() is None:
            time.sleep(0.5)
        fail(f"SuperLink exited with code {proc.returncode}; see {log}", code=1)
    except RunnerError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt as err:
        exit_interrupted(err, "the SuperLink is stopped")
    finally:
        procs.stop_all()


def device_cmd(
    superlink: Annotated[
        str, typer.Option("--superlink", help="The SuperLink's Fleet API, HOST:PORT.")
    ],
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
    model_server_ca: Annotated[
        Path | None,
        typer.Option(
            help="CA of the model server's TLS certificate (default with --certs: CERTS/ca.crt)."
        ),
    ] = None,
    model_server_key: Annotated[
        Path | None,
        typer.Option(
            help="Publisher's Ed25519 key (models-signing.pub): the cold start accepts only "
            "signed manifests (`hybridfl sign`)."
        ),
    ] = None,
    port: Annotated[
        int, port_option("Local Runtime API port of this SuperNode, 1-65535 (0: a free one).")
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
    from simulation.flwr_cli import flwr_env, free_port

    if run_dir is None and (data is None or state_dir is None):
        fail("give --run-dir (one machine) or both --data and --state-dir (a real device)")
    files = _certs(certs, insecure, "this device")
    assert files is None or isinstance(files, CertFiles)
    node_cfg: dict[str, str | int] = {}
    if run_dir is not None:
        node_cfg["run-dir"] = str(run_dir.resolve())
    if data is not None:
        if not data.exists():
            fail(f"--data {data} does not exist")
        node_cfg["data"] = str(data.resolve())
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        node_cfg["state-dir"] = str(state_dir.resolve())
    if model_server:
        node_cfg["model-server"] = model_server
        ca = model_server_ca or (files.ca_cert if files is not None else None)
        if ca is not None and model_server.startswith("https://"):
            if not ca.is_file():
                fail(f"--model-server-ca {ca} does not exist")
            node_cfg["model-server-ca"] = str(ca.resolve())
        if model_server_key is not None:
            if not model_server_key.is_file():
                fail(f"--model-server-key {model_server_key} does not exist")
            node_cfg["model-server-key"] = str(model_server_key.resolve())
    if files is not None and key is None:
        key = files.device_key(device_id)
        if not key.is_file():
            fail(f"{key} is missing: pass --key or create it with `hybridfl certs`")
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
    echo(f"device {device_id}: {' '.join(cmd[:3])} ...", err=True)
    os.execvpe(cmd[0], cmd, env)


def run_cmd(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML.")] = None,
    superlink: Annotated[
        str,
        typer.Option(
            "--superlink",
            help="The SuperLink's Control API: 127.0.0.1:CONTROL_PORT on its machine.",
        ),
    ] = f"127.0.0.1:{DEFAULT_CONTROL_PORT}",
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
    from common.rundir import FLWR_HOME_DIR, LOG_DIR
    from simulation.certs import CertFiles
    from simulation.deploy import submit_deployment
    from simulation.flwr_cli import CONNECTION, RunnerError, flwr_env, write_connection
    from simulation.progress import progress_line
    from simulation.runner import SUBMIT_LOG, failure_of, follow_run

    files = _certs(certs, insecure, "`hybridfl run`")
    assert files is None or isinstance(files, CertFiles)
    prep = prepare(config, set_ or [], out)
    cfg, run_dir = prep.cfg, prep.run_dir
    home = run_dir / FLWR_HOME_DIR
    write_connection(home, superlink, files.ca_cert if files else None)
    env = flwr_env(home)
    echo(f"run folder: {run_dir}")
    signals_as_interrupt()
    try:
        (run_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
        run_id = submit_deployment(run_dir, env, run_dir / LOG_DIR / SUBMIT_LOG)
        echo(f"run {run_id} submitted to {superlink}")
        status = follow_run(
            run_id,
            run_dir,
            env,
            lambda row, timing: echo(progress_line(row, timing, cfg.rounds)),
        )
    except RunnerError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt as err:
        exit_interrupted(
            err,
            f"the run goes on in the SuperLink; to end it: FLWR_HOME={home} flwr stop "
            f"RUN_ID {CONNECTION}",
        )
    if status != "finished:completed":
        fail(f"run {run_id} ended with status '{status}': {failure_of(run_dir)}", code=1)
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
    import json

    from common.rundir import SUMMARY_FILE
    from simulation.deploy import deploy
    from simulation.progress import done_line, plot_accuracy, progress_line
    from simulation.runner import RunnerError

    if insecure:
        _warn_insecure("this deployment")
    overrides = set_ or []
    if any(o.split("=", 1)[0].strip() == "partition.num_devices" for o in overrides):
        warn(f"--devices {devices} overrides --set partition.num_devices")
    prep = prepare(config, [*overrides, f"partition.num_devices={devices}"], out)
    cfg, run_dir = prep.cfg, prep.run_dir
    echo(f"run folder: {run_dir}\n{devices} device processes, {cfg.rounds} rounds")
    signals_as_interrupt()
    try:
        result = deploy(
            cfg,
            run_dir,
            devices,
            lambda row, timing: echo(progress_line(row, timing, cfg.rounds)),
            secure=not insecure,
            model_server=serve,
        )
    except RunnerError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt as err:
        exit_interrupted(err)
    if not result.ok:
        fail(f"run {result.run_id} ended with status '{result.status}': {result.failure}", 1)
    if cfg.output.plot:
        plot_accuracy(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    typer.secho(done_line(summary, result.wall_s, run_dir), fg=typer.colors.GREEN)


def device_data_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A prepared run folder.")],
    device_id: Annotated[int, typer.Option("--device-id", min=0, help="The device's id.")],
    out: Annotated[Path, typer.Option("--out", help="Device data file to write (.npz).")],
) -> None:
    """Write one device's own split (train and test) to a file for that device's disk."""
    from simulation.deploy import export_device_data

    try:
        export_device_data(run_dir, device_id, out)
    except (OSError, ValueError, RuntimeError) as err:
        fail(str(err))
    echo(f"wrote {out}")


def register(cli: typer.Typer) -> None:
    """Add the real-process commands to the ``hybridfl`` app."""
    cli.command("certs")(certs_cmd)
    cli.command("superlink")(superlink_cmd)
    cli.command("device")(device_cmd)
    cli.command("run")(run_cmd)
    cli.command("deploy")(deploy_cmd)
    cli.command("device-data")(device_data_cmd)


__all__ = ["register"]
