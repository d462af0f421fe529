"""``flwr run . --run-config 'rounds=3 client.algorithm="fedper"'``: experiment keys from
Flower's run config take the ``--set`` path, with the same errors."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from common.config import ConfigError, ExperimentConfig, load_config
from server.app import APP_KEYS, resolve_run_dir, run_config_overrides
from simulation.compare import flat_config
from tests.conftest import REPO


def declared_run_config() -> dict[str, object]:
    """What Flower fuses an override into: the app's declared keys, flattened."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(flatten_dict(data["tool"]["flwr"]["app"]["config"]))


def test_pyproject_declares_every_experiment_key_and_nothing_else() -> None:
    """Flower refuses undeclared run-config keys; a new config key needs a line in
    pyproject.toml's [tool.flwr.app.config] (the assertion names it)."""
    declared = declared_run_config()
    schema = set(flat_config(ExperimentConfig().model_dump()))
    experiment = {k: v for k, v in declared.items() if k not in APP_KEYS}
    assert set(experiment) == schema, (
        f"add to pyproject.toml: {sorted(schema - set(experiment))}; "
        f"remove: {sorted(set(experiment) - schema)}"
    )
    assert all(v == "" for v in experiment.values())  # "" = as in the experiment file
    # hybridfl's own `flwr run` submitter keeps only declared keys: dotted ones included.
    from simulation.flwr_cli import app_run_config_keys

    assert app_run_config_keys(REPO) == set(declared)


def test_a_bare_flwr_run_applies_run_config_keys_like_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_config = {
        **declared_run_config(),
        "rounds": 3,
        "client.algorithm": "fedper",
        "model.name": "mlp2nn",
        "client.lr": 0.2,
        "output.plot": False,
        "partition.num_devices": 4,
        "output.root": str(tmp_path / "runs"),
    }
    run_dir = resolve_run_dir(run_config)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("quickstart-")
    cfg = load_config(run_dir / "config.toml")
    want = load_config(None, run_config_overrides(run_config))
    assert cfg.model_copy(update={"output": want.output}) == want
    assert (cfg.rounds, cfg.client.algorithm, cfg.client.lr) == (3, "fedper", 0.2)
    assert cfg.output.plot is False and cfg.partition.num_devices == 4


def test_strings_survive_the_round_trip() -> None:
    got = load_config(None, run_config_overrides({"data.root": 'a "b"\\c d', "seed": 7}))
    assert got.data.root == 'a "b"\\c d' and got.seed == 7


def test_a_bad_value_gives_the_same_error_as_set() -> None:
    with pytest.raises(ConfigError) as from_set:
        load_config(None, ["rounds=0", "client.algorithm=nope"])
    with pytest.raises(ConfigError) as from_run_config:
        resolve_run_dir({**declared_run_config(), "rounds": 0, "client.algorithm": "nope"})
    assert str(from_run_config.value) == str(from_set.value)
    assert "rounds" in str(from_set.value) and "client.algorithm" in str(from_set.value)


def test_experiment_keys_are_refused_beside_a_prepared_run_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run config sets experiment keys \(rounds=3\)"):
        resolve_run_dir({**declared_run_config(), "run-dir": str(tmp_path), "rounds": 3})


@pytest.mark.slow
def test_flwr_run_with_run_config_overrides_on_a_real_superlink(tmp_path: Path) -> None:
    """What a Flower user types: a SuperLink in simulation mode, then `flwr run .` with
    experiment keys in --run-config; the run folder records them and finishes."""
    from simulation.flwr_cli import (
        flwr_env,
        free_port,
        run_status,
        submit,
        wait_superlink,
        write_connection,
    )
    from simulation.procs import Processes
    from simulation.runner import ray_tmpdir, superlink_sim_command

    flwr_home, runs = tmp_path / "flwr_home", tmp_path / "runs"
    port = free_port()
    write_connection(flwr_home, f"127.0.0.1:{port}")
    env = flwr_env(flwr_home, ray_tmpdir(tmp_path))
    procs = Processes()
    try:
        link_log = tmp_path / "superlink.log"
        link = procs.start(superlink_sim_command(port), env, link_log, cwd=tmp_path, plain=True)
        wait_superlink(port, link, link_log)
        run_config: dict[str, str | int | float | bool] = {
            "rounds": 1,
            "partition.num_devices": 4,
            "model.name": "logistic",
            "output.plot": False,
            "output.root": str(runs),
        }
        run_id = submit(REPO, env, tmp_path / "flwr-run.log", run_config, {"num-supernodes": 2})
        deadline = time.monotonic() + 400
        status = run_status(run_id, env)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            status = run_status(run_id, env)
    finally:
        procs.stop_all()
    assert status == "finished:completed", (tmp_path / "superlink.log").read_text()[-3000:]
    (run_dir,) = runs.iterdir()
    cfg = load_config(run_dir / "config.toml")
    assert (cfg.rounds, cfg.partition.num_devices, cfg.model.name) == (1, 4, "logistic")
    assert (run_dir / "summary.json").is_file()
