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

from common.config import ConfigError, ExperimentConfig, load_config
from common.data import DataError
from common.rundir import SUMMARY_FILE, prepare_run_dir
from simulation.compare import report

DEFAULT_CACHE = Path.home() / ".cache" / "hybridfl"

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="hybridfl: federated learning with a served global model and personalized devices.",
)


@cli.callback()
def _root() -> None:
    """hybridfl: federated learning with a served global model and personalized devices."""


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def new_run_dir(cfg: ExperimentConfig, out: Path | None) -> Path:
    """``--out`` as given, else ``<output.root>/<name>``, never reusing a folder."""
    if out is not None:
        if out.exists() and any(out.iterdir()):
            _fail(f"--out {out} exists and is not empty: choose a new folder")
        return out
    base = Path(cfg.output.root) / cfg.name
    candidate, i = base, 1
    while candidate.exists():
        i += 1
        candidate = base.with_name(f"{cfg.name}-{i}")
    return candidate


@cli.command()
def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment TOML (default: configs/quickstart.toml).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: --set rounds=5 --set partition.alpha=0.1"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: runs/<name>).")
    ] = None,
    serve: Annotated[
        bool,
        typer.Option("--serve", help="Serve the model registry over HTTP while training."),
    ] = False,
    host: Annotated[str, typer.Option(help="Model server address (with --serve).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Model server port (0: a free one).")] = 0,
) -> None:
    """Run a federated simulation: a Flower SuperLink, devices under Ray, one run folder."""
    from simulation.report import plot_accuracy, progress_line
    from simulation.runner import RunnerError
    from simulation.runner import simulate as run_sim

    try:
        cfg = load_config(config, set_ or [])
    except ConfigError as err:
        _fail(str(err))
    run_dir = new_run_dir(cfg, out).resolve()
    try:
        stats = prepare_run_dir(cfg, run_dir)
    except (DataError, ConfigError) as err:
        _fail(str(err))
    s = stats.get("summary", {})
    p = cfg.partition
    typer.echo(
        f"run folder: {run_dir}\n"
        f"{p.num_devices} devices ({p.method} split of {cfg.data.dataset}; train samples per "
        f"device min {s.get('min_train')} / median {s.get('median_train')} / max "
        f"{s.get('max_train')}, {s.get('mean_classes_per_device', 0):.1f} classes on average)\n"
        f"model {cfg.model.name}, strategy {cfg.strategy.name}, algorithm "
        f"{cfg.client.algorithm}, {cfg.rounds} rounds"
    )

    def on_round(row: dict[str, object], timing: dict[str, object]) -> None:
        typer.echo(progress_line(row, timing, cfg.rounds))

    server = None
    if serve:
        from simulation.serving import start_model_server

        server = start_model_server(run_dir, host, port)
        typer.echo(f"model server: {server.url} (e.g. hybridfl fetch {server.url})")
    try:
        result = run_sim(cfg, run_dir, on_round=on_round)
    except RunnerError as err:
        _fail(str(err), code=1)
    except KeyboardInterrupt:
        typer.secho("interrupted: all processes stopped", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    finally:
        if server is not None:
            server.stop()
    if not result.ok:
        cause = result.failure or f"see {run_dir / 'logs' / 'run.log'}"
        _fail(f"run {result.run_id} ended with status '{result.status}': {cause}", code=1)
    if cfg.output.plot:
        plot_accuracy(run_dir)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    last = summary.get("last", {})
    typer.secho(
        f"done in {result.wall_s:.1f}s: global test accuracy {last.get('global_test_acc', 0):.4f}, "
        f"personalized on devices {last.get('device_personal_acc') or 0:.4f} "
        f"(global on devices {last.get('device_global_acc') or 0:.4f}); results in {run_dir}",
        fg=typer.colors.GREEN,
    )


@cli.command("serve")
def serve_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (finished or running).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the write-API token (else env HYBRIDFL_TOKEN)."),
    ] = None,
) -> None:
    """Serve a run's global-model versions over HTTP (read API public, writes token-gated)."""
    import uvicorn

    from server.http import create_app, load_token

    if not (run_dir / "registry").is_dir():
        _fail(f"{run_dir} has no model registry (registry/): is it a hybridfl run folder?")
    try:
        token = load_token(file=token_file)
    except ValueError as err:
        _fail(str(err))
    if token is None:
        typer.echo("write API disabled (set HYBRIDFL_TOKEN or --token-file to enable it)")
    typer.echo(f"serving {run_dir} at http://{host}:{port}  (docs: /docs)")
    uvicorn.run(create_app(run_dir, token), host=host, port=port, log_level="warning")


@cli.command("fetch")
def fetch_cmd(
    url: Annotated[str, typer.Argument(help="Model server, e.g. http://127.0.0.1:8080")],
    version: Annotated[int | None, typer.Option(help="A version number.")] = None,
    alias: Annotated[str, typer.Option(help="Alias when no --version.")] = "serving",
    out: Annotated[Path | None, typer.Option(help="Copy the verified file here.")] = None,
    cache_dir: Annotated[
        Path, typer.Option(help="Download cache (resumable, content-addressed).")
    ] = DEFAULT_CACHE,
) -> None:
    """Download a global model, verify its sha256 and check it loads into its model."""
    import shutil

    from client.fetch import FetchError, fetch_model, load_fetched_model

    try:
        res = fetch_model(url, version=version, alias=alias, cache_dir=cache_dir)
        load_fetched_model(res)
    except FetchError as err:
        _fail(str(err), code=1)
    m = res.manifest
    how = f"downloaded {res.bytes} bytes" if res.downloaded else "cache is current"
    typer.echo(f"version {m.version} (round {m.round}) sha256 {res.sha256[:16]}… {how}")
    if out is not None:
        tmp = out.with_name(out.name + ".incomplete")
        shutil.copyfile(res.path, tmp)
        tmp.replace(out)
        typer.echo(f"saved to {out}")
    else:
        typer.echo(f"file: {res.path}")


cli.command()(report)

from simulation.cli_deploy import register as _register_deploy  # noqa: E402

_register_deploy(cli)


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
