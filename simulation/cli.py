"""``hybridfl``: one entry point with sub-commands (after Flower's and Ray's CLIs).

Exit codes tell the truth: 0 only when the run finished and completed; 2 for a
bad config or missing data (nothing started); 1 when the run failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from common.rundir import LOG_DIR, REGISTRY_DIR, SUMMARY_FILE
from server.http_transport import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S
from simulation import typer_compat
from simulation.cli_common import (
    SetOpt,
    check_resources,
    echo,
    exit_interrupted,
    fail,
    port_option,
    prepare,
    prepare_resume,
    signals_as_interrupt,
    warn,
)
from simulation.report import report

typer_compat.apply()

DEFAULT_CACHE = Path.home() / ".cache" / "hybridfl"
HELP = "hybridfl: federated learning with a served global model and personalized devices."

cli = typer.Typer(add_completion=False, help=HELP)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            echo(f"hybridfl {version('hybridfl')}")
        except PackageNotFoundError:
            echo("hybridfl (not installed: run `pip install -e .`)")
        raise typer.Exit(0)


@cli.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """hybridfl: federated learning with a served global model and personalized devices."""
    if ctx.invoked_subcommand is None:
        echo(ctx.get_help())
        raise typer.Exit(0)


@cli.command()
def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment TOML (default: configs/quickstart.toml).")
    ] = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: runs/<name>).")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option("--serve", help="Serve the model registry over HTTP while training."),
    ] = False,
    host: Annotated[str, typer.Option(help="Model server address (with --serve).")] = "127.0.0.1",
    port: Annotated[int, port_option("Model server port, 1-65535 (0: a free one).")] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this folder from its last checkpoint (after a crash); "
            "CONFIG and --set, if given, must match the run's config.",
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Run once per seed, e.g. 0,1,2, into sibling folders <name>-s0, -s1, ...; "
            "`hybridfl report` on them gives mean ± std.",
        ),
    ] = None,
) -> None:
    """Run a federated simulation: a Flower SuperLink, devices under Ray, one run folder."""
    if seeds is not None:
        if resume is not None:
            fail("--resume continues one run: not with --seeds (resume each seed's folder)")
        if serve:
            fail("--serve serves one run: not with --seeds (serve a finished one instead)")
        from simulation.seeds import simulate_seeds

        simulate_seeds(config, set_ or [], out, seeds)
        return
    from common.rows import RoundRow, TimingRow
    from simulation.progress import done_line, evaluation_plan, plot_accuracy, progress_line
    from simulation.runner import RunnerError
    from simulation.runner import simulate as run_sim

    if serve and port:
        from simulation.serving import check_port_free

        try:
            check_port_free(host, port)
        except RunnerError as err:
            fail(str(err))
    done = 0
    if resume is not None:
        prep, done = prepare_resume(resume, config, set_ or [], out)
        check_resources(prep.cfg)
    else:
        prep = prepare(config, set_ or [], out, check=True)
    cfg, run_dir, stats = prep.cfg, prep.run_dir, prep.stats
    s = stats.get("summary", {})
    assert isinstance(s, dict)
    p = cfg.partition
    echo(
        f"run folder: {run_dir}\n"
        f"{p.num_devices} devices ({p.method} split of {cfg.data.dataset}; train samples per "
        f"device min {s.get('min_train')} / median {s.get('median_train')} / max "
        f"{s.get('max_train')}, {s.get('mean_classes_per_device', 0):.1f} classes on average)\n"
        f"model {cfg.model.name}, strategy {cfg.strategy.name}, algorithm "
        f"{cfg.client.algorithm}, {cfg.rounds} rounds\n"
        f"{evaluation_plan(cfg)}"
    )
    if resume is not None:
        echo(f"resuming after round {done} of {cfg.rounds} (its checkpoint)")

    def on_round(row: RoundRow, timing: TimingRow | None) -> None:
        echo(progress_line(row, timing, cfg.rounds))

    signals_as_interrupt()
    server = None
    try:
        if serve:
            from simulation.serving import start_model_server

            server = start_model_server(run_dir, host, port)
            echo(f"model server: {server.url} (e.g. hybridfl fetch {server.url})")
        result = run_sim(cfg, run_dir, on_round=on_round, resume=resume is not None)
    except RunnerError as err:
        fail(str(err), code=1)
    except KeyboardInterrupt as err:
        exit_interrupted(err)
    finally:
        if server is not None:
            server.stop()
    if not result.ok:
        cause = result.failure or f"no cause found in {run_dir / LOG_DIR}"
        fail(f"run {result.run_id} ended with status '{result.status}': {cause}", code=1)
    if cfg.output.plot:
        plot_accuracy(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    typer.secho(done_line(summary, result.wall_s, run_dir), fg=typer.colors.GREEN)


@cli.command("serve")
def serve_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (finished or running).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, port_option("Port to bind, 1-65535 (0: a free one).")] = 8080,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the write-API token (else env HYBRIDFL_TOKEN)."),
    ] = None,
    certfile: Annotated[
        Path | None,
        typer.Option(help="TLS certificate (e.g. CERTS/superlink.crt from `hybridfl certs`)."),
    ] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key of --certfile.")] = None,
    header_timeout: Annotated[
        float,
        typer.Option(min=0.1, help="Seconds a client has to send a request's headers."),
    ] = DEFAULT_HEADER_TIMEOUT_S,
    keep_alive: Annotated[
        int, typer.Option(min=1, help="Seconds an idle keep-alive connection stays open.")
    ] = DEFAULT_KEEP_ALIVE_S,
) -> None:
    """Serve a run's global-model versions over HTTP(S) (read API public, writes token-gated)."""
    import os
    import signal

    import uvicorn

    from server.http import create_app, load_token
    from server.http_transport import server_config
    from simulation.history import history_text

    if not (run_dir / REGISTRY_DIR).is_dir():
        fail(f"{run_dir} has no model registry ({REGISTRY_DIR}/): is it a hybridfl run folder?")
    if (certfile is None) != (keyfile is None):
        fail("TLS needs both --certfile and --keyfile (create them with `hybridfl certs`)")
    for opt, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path is not None and not path.is_file():
            fail(f"{opt} {path} does not exist")
    try:
        token = load_token(file=token_file)
    except ValueError as err:
        fail(str(err))
    if token is None:
        echo("write API disabled (set HYBRIDFL_TOKEN or --token-file to enable it)")
    elif certfile is None and host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"the write token travels in clear text to {host}: add --certfile/--keyfile")
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again
    # under the handlers it found: ours, which end like Ctrl-C. SIGHUP (a closed
    # terminal) is passed on as SIGTERM, so it shuts down gracefully too.
    if port == 0:
        from simulation.flwr_cli import free_port

        port = free_port()
    signals_as_interrupt()
    signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    scheme = "https" if certfile else "http"
    echo(f"serving {run_dir} at {scheme}://{host}:{port}  (docs: /docs)")
    echo(history_text(run_dir))
    try:
        app = create_app(run_dir, token)
        cfg = server_config(
            app,
            host,
            port,
            certfile=certfile,
            keyfile=keyfile,
            header_timeout_s=header_timeout,
            keep_alive_s=keep_alive,
        )
        # uvicorn.Server, not uvicorn.run: the latter swallows KeyboardInterrupt
        uvicorn.Server(cfg).run()
    except KeyboardInterrupt as err:
        exit_interrupted(err, "the model server is stopped")


@cli.command("fetch")
def fetch_cmd(
    url: Annotated[str, typer.Argument(help="Model server, e.g. http://127.0.0.1:8080")],
    version: Annotated[int | None, typer.Option(help="A version number.")] = None,
    alias: Annotated[str, typer.Option(help="Alias when no --version.")] = "serving",
    out: Annotated[Path | None, typer.Option(help="Copy the verified file here.")] = None,
    cache_dir: Annotated[
        Path, typer.Option(help="Download cache (resumable, content-addressed).")
    ] = DEFAULT_CACHE,
    ca_cert: Annotated[
        Path | None,
        typer.Option(help="CA that signed the server's TLS certificate (e.g. CERTS/ca.crt)."),
    ] = None,
    verify_key: Annotated[
        Path | None,
        typer.Option(
            help="Publisher's Ed25519 key (CERTS/models-signing.pub): the manifest must be "
            "signed by it (`hybridfl sign`), whoever serves it."
        ),
    ] = None,
) -> None:
    """Download a global model, verify its sha256 and check it loads into its model."""
    import shutil

    from client.fetch import FetchError, fetch_model, load_fetched_model

    if out is not None:
        if out.is_dir():
            fail(f"--out {out} is a folder: give a file name, e.g. {out / 'model.safetensors'}")
        if not out.parent.is_dir():
            fail(f"--out {out}: folder {out.parent} does not exist; create it first")
    try:
        if ca_cert is not None and not ca_cert.is_file():
            fail(f"--ca-cert {ca_cert} does not exist")
        res = fetch_model(
            url,
            version=version,
            alias=alias,
            cache_dir=cache_dir,
            ca_cert=ca_cert,
            verify_key=verify_key,
        )
        load_fetched_model(res)
    except FetchError as err:
        fail(str(err), code=1)
    except OSError as err:
        fail(f"--cache-dir {cache_dir}: {err.strerror or err}", code=1)
    m = res.manifest
    how = f"downloaded {res.bytes} bytes" if res.downloaded else "cache is current"
    signed = ", signature verified" if verify_key is not None else ""
    echo(f"version {m.version} (round {m.round}) sha256 {res.sha256[:16]}… {how}{signed}")
    if out is not None:
        tmp = out.with_name(out.name + ".incomplete")
        try:
            shutil.copyfile(res.path, tmp)
            tmp.replace(out)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            fail(f"--out {out}: cannot write it ({err.strerror or err})", code=1)
        echo(f"saved to {out}")
    else:
        echo(f"file: {res.path}")


cli.command()(report)


@cli.command("sign")
def sign_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (finished or running).")],
    key: Annotated[Path, typer.Option(help="Ed25519 signing key (CERTS/models-signing.key).")],
) -> None:
    """Sign every unsigned version manifest of a run (detached Ed25519 signatures).

    Devices and `hybridfl fetch --verify-key` then trust the weights whoever serves
    them (a mirror, a cache). Run it again, e.g. after each round, for new versions.
    """
    from common.signing import SignatureError, load_private_key, sign_registry

    if not (run_dir / REGISTRY_DIR).is_dir():
        fail(f"{run_dir} has no model registry ({REGISTRY_DIR}/): is it a hybridfl run folder?")
    try:
        signed = sign_registry(run_dir / REGISTRY_DIR, load_private_key(key))
    except SignatureError as err:
        fail(f"--key: {err}")
    echo(f"signed {len(signed)} version(s): {signed}" if signed else "every version is signed")


from simulation.cli_data import register as _register_data  # noqa: E402
from simulation.cli_deploy import register as _register_deploy  # noqa: E402

_register_deploy(cli)
_register_data(cli)


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
