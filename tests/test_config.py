"""Config errors name the key and the fix; overrides and the resolved dump round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import (
    ConfigError,
    apply_overrides,
    default_config_path,
    dump_config,
    load_config,
    validate_config,
)


def test_quickstart_is_valid() -> None:
    cfg = load_config()
    assert cfg.name == "quickstart"
    assert cfg.data.dataset == "digits"
    assert default_config_path().is_file()


def _err(raw: dict, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        validate_config(raw)
    return str(info.value)


def test_unknown_key_is_named() -> None:
    msg = _err({"client": {"local_epoch": 2}}, "client.local_epoch")
    assert "unknown key" in msg


def test_unknown_section_is_named() -> None:
    _err({"clients": {}}, "clients: unknown key")


def test_wrong_type_is_named() -> None:
    msg = _err({"rounds": "ten"}, "rounds")
    assert "'ten'" in msg


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"partition": {"alpha": 0.0}}, "partition.alpha"),
        ({"partition": {"alpha": -1}}, "partition.alpha"),
        ({"strategy": {"fraction_train": 1.5}}, "strategy.fraction_train"),
        ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
        ({"partition": {"num_devices": 0}}, "partition.num_devices"),
        ({"data": {"dataset": "mnist"}}, "data.dataset"),
    ],
)
def test_impossible_values(raw: dict, key: str) -> None:
    _err(raw, key)


def test_file_dataset_needs_path() -> None:
    msg = _err({"data": {"dataset": "npz"}}, "data.path is required")
    assert "--set data.path=" in msg


def test_head_personal_algorithms_need_a_body() -> None:
    _err({"client": {"algorithm": "fedper"}, "model": {"name": "logistic"}}, "all head")


def test_natural_needs_writers() -> None:
    _err({"partition": {"method": "natural"}}, "femnist")


def test_overrides_parse_toml_values(tmp_path: Path) -> None:
    raw = apply_overrides({}, ["rounds=3", "partition.alpha=0.1", "data.dataset=digits"])
    assert raw == {"rounds": 3, "partition": {"alpha": 0.1}, "data": {"dataset": "digits"}}
    cfg = load_config(None, ["rounds=3", "client.algorithm=fedper"])
    assert cfg.rounds == 3 and cfg.client.algorithm == "fedper"


@pytest.mark.parametrize("bad", ["rounds", "a.b.c=1", ".x=1"])
def test_bad_override_syntax(bad: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        apply_overrides({}, [bad])


def test_override_of_unknown_key_fails() -> None:
    with pytest.raises(ConfigError, match=r"client\.lrr: unknown key"):
        load_config(None, ["client.lrr=0.1"])


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["rounds=7", 'data.path=some "quoted" path'])
    p = tmp_path / "resolved.toml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_relative_data_path_is_resolved_in_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from common.rundir import prepare_run_dir

    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(
        data,
        x_train=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8),
        y_train=np.arange(40, dtype=np.uint8) % 4,
        x_test=rng.integers(0, 255, (8, 8, 8), dtype=np.uint8),
        y_test=np.arange(8, dtype=np.uint8) % 4,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYBRIDFL_DATA", raising=False)  # no data folder: the current one
    cfg = load_config(None, ["data.dataset=npz", "data.path=d.npz", "partition.num_devices=4"])
    prepare_run_dir(cfg, tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.toml").data.path == str(data)
