"""The Flower ServerApp: resolve the run folder, run the round loop, save results.

Thin on purpose: the round loop lives in ``server.loop``; this module wires the
run config (which carries only paths) to it and records how the run ended.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.atomic import atomic_write_bytes, atomic_write_text
from common.config import default_config_path, load_config
from common.data import open_source
from common.manifest import model_manifest
from common.models import ModelSpec
from common.rows import read_rows
from common.rundir import (
    CONFIG_FILE,
    FAILURE_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    PARTITION_FILE,
    REGISTRY_DIR,
    SUMMARY_FILE,
    prepare_run_dir,
)
from common.weights import Arrays, sha256_hex, to_safetensors
from server.loop import ServerLoop
from server.registry import Registry
from server.summary import personalization_verdict, summarize

log = logging.getLogger("hybridfl.server")
app = ServerApp()

POPULATION_KEY = "population"
"""Run-config key: ``partition`` (simulation: devices come from the data, Flower nodes
are execution slots) or ``nodes`` (deployment: one registered SuperNode per device)."""
RESUME_KEY = "resume"
"""Run-config key: true to continue the run folder's run from its last checkpoint."""


APP_KEYS = ("config", "run-dir", POPULATION_KEY, RESUME_KEY)
"""Run-config keys of the app itself; every other declared key is an experiment key."""


def run_config_overrides(run_config: dict[str, object]) -> list[str]:
    """Experiment keys set with ``flwr run . --run-config 'rounds=3 client.lr=0.1'``, as
    ``--set`` items, so they take the same override path (and errors) as the CLI's.

    ``pyproject.toml`` declares every experiment key with the value "" (Flower refuses
    undeclared keys): "" means "as in the experiment file" and is skipped.
    """
    items = []
    for key, value in sorted(run_config.items()):
        if key in APP_KEYS or value == "":
            continue
        text = json.dumps(value) if isinstance(value, str) else _toml_scalar(value)
        items.append(f"{key}={text}")
    return items


def _toml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def resolve_run_dir(run_config: dict[str, object]) -> Path:
    """The run folder named by the run config, or a new one for a bare ``flwr run .``."""
    given = str(run_config.get("run-dir", "") or "")
    overrides = run_config_overrides(run_config)
    if given:
        if overrides:
            raise ValueError(
                f"run config sets experiment keys ({', '.join(overrides)}) and run-dir "
                f"{given}: a prepared run folder already holds its config; give them to "
                "`hybridfl simulate --set` instead, or drop run-dir"
            )
        run_dir = Path(given)
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"run-dir {run_dir} has no {CONFIG_FILE}: prepare it first")
        return run_dir
    cfg_path = Path(str(run_config.get("config", "") or "") or default_config_path())
    if not cfg_path.is_absolute() and not cfg_path.exists():
        # Relative to the app: `flwr run .` installs the repository (configs
        # included) as a FAB, and the ServerApp runs from elsewhere.
        cfg_path = default_config_path().parent.parent / cfg_path
    cfg = load_config(cfg_path, overrides)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.output.root).resolve() / f"{cfg.name}-{stamp}"
    prepare_run_dir(cfg, run_dir)
    return run_dir


def save_final_model(loop: ServerLoop, run_dir: Path) -> str:
    """The final global weights and their manifest (one schema with the registry's)."""
    blob = to_safetensors(loop.global_arrays)
    digest = sha256_hex(blob)
    atomic_write_bytes(run_dir / MODEL_FILE, blob)
    manifest = model_manifest(
        loop.global_arrays,
        loop.spec,
        round=loop.cfg.rounds,
        sha256=digest,
        size=len(blob),
        metrics=loop.last_metrics,
    )
    atomic_write_text(run_dir / MANIFEST_FILE, manifest.to_json() + "\n")
    return digest


def registry_publisher(
    run_dir: Path, spec: ModelSpec, rounds: int, every: int, *, move_serving: bool = True
) -> Callable[[int, Arrays, dict[str, float]], None]:
    """Publish version 0 (the initial model) and each k-th round's aggregate.

    Every version becomes the initial model of devices fetching ``serving`` over
    HTTP, live while the run trains (``move_serving=False``: only once a rollout
    policy promotes it). The last round is always published.
    """
    registry = Registry(run_dir / REGISTRY_DIR)

    def publish(round_: int, arrays: Arrays, metrics: dict[str, float]) -> None:
        if round_ % every and round_ not in (0, rounds):
            return
        registry.publish(
            arrays, round=round_, model=spec, metrics=metrics, move_serving=move_serving
        )

    return publish


def run_experiment(
    grid: Grid, run_dir: Path, population: str = "partition", resume: bool = False
) -> None:
    """The whole server side of a run in a prepared run folder: rounds, final model,
    summary; ``failure.json`` with the cause when it fails."""
    t0 = time.perf_counter()
    try:
        (run_dir / FAILURE_FILE).unlink(missing_ok=True)
        cfg = load_config(run_dir / CONFIG_FILE)
        source = open_source(cfg, run_dir / PARTITION_FILE)
        if population not in ("partition", "nodes"):
            raise ValueError(
                f"run config '{POPULATION_KEY}' = {population!r}: use 'partition' "
                "(simulation) or 'nodes' (one SuperNode per device)"
            )
        loop = ServerLoop(grid, cfg, run_dir, source, population=population, resume=resume)  # type: ignore[arg-type]
        loop.on_version = registry_publisher(
            run_dir,
            loop.spec,
            cfg.rounds,
            cfg.output.publish_every,
            move_serving=cfg.rollout.policy == "immediate",
        )
        loop.run()
        digest = save_final_model(loop, run_dir)
        targets = (cfg.clock.target_accuracy, cfg.clock.target_personal_accuracy)
        summary = summarize(read_rows(run_dir / METRICS_FILE), targets)
        summary.update({"model_sha256": digest, "server_wall_s": time.perf_counter() - t0})
        verdict = personalization_verdict(loop.last_device_rows)
        if verdict is not None:
            summary["personalization"] = verdict
        atomic_write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    except Exception as err:
        failure = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        atomic_write_text(run_dir / FAILURE_FILE, json.dumps(failure, indent=1) + "\n")
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    run_dir = resolve_run_dir(config)
    population = str(config.get(POPULATION_KEY, "") or "partition")
    resume = str(config.get(RESUME_KEY, "")).lower() in ("true", "1")
    run_experiment(grid, run_dir, population, resume)
