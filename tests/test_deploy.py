"""Real processes: a SuperLink and device SuperNodes over TLS with node authentication.

Everything runs on 127.0.0.1 with free ports, in tmp_path; every test checks that
no process it started is left (``processes_mentioning(run_dir) == []``).
"""

from __future__ import annotations

import ipaddress
import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from safetensors.numpy import load_file

from common.config import ExperimentConfig, load_config
from common.data import load_dataset
from common.rows import RoundRow
from common.rundir import STATE_DIR, prepare_run_dir, read_jsonl
from server.registry import Registry
from simulation.certs import make_certs
from simulation.deploy import Deployment, deploy
from simulation.runner import simulate
from tests.conftest import accuracy, assert_no_leftovers, model_from
from tests.tls_deployment import TlsDeployment

HYBRIDFL = [sys.executable, "-m", "simulation.cli"]
SMALL = [
    "rounds=2",
    "partition.num_devices=3",
    'model.name="logistic"',
    "strategy.fraction_train=1.0",
    "seed=7",
]


def _cfg(*extra: str) -> ExperimentConfig:
    return load_config(None, [*SMALL, *extra])


def _accs(run_dir: Path) -> list[float]:
    return [float(r["global_test_acc"]) for r in read_jsonl(run_dir / "metrics.jsonl")]  # type: ignore[arg-type]


def test_certs_command_writes_ca_server_cert_and_device_keys(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    proc = subprocess.run(
        [*HYBRIDFL, "certs", str(out), "--devices", "2", "--host", "127.0.0.1", "--host", "link"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {
        "ca.crt",
        "ca.key",
        "superlink.crt",
        "superlink.key",
        "device-0.key",
        "device-0.pub",
        "device-1.key",
        "device-1.pub",
        "models-signing.key",
        "models-signing.pub",
    }
    for private in (
        "ca.key",
        "superlink.key",
        "device-0.key",
        "device-1.key",
        "models-signing.key",
    ):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600, private
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "link" in san.get_values_for_type(x509.DNSName)
    assert isinstance(
        load_pem_private_key((out / "superlink.key").read_bytes(), None), ec.EllipticCurvePrivateKey
    )
    key = load_ssh_private_key((out / "device-0.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert (out / "device-0.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_tls_auth_two_rounds_and_an_unregistered_device_is_refused(
    tls_deployment: TlsDeployment,
) -> None:
    """A registered key joins and trains over TLS; a device with a foreign key cannot.

    The shared background deployment (``tests/tls_deployment.py``): one device, two
    rounds, one evaluation, a cold start from the model server, and a rogue SuperNode
    claiming to be device 0 with a key that was never registered.
    """
    run_dir, outcome = tls_deployment.run_dir, tls_deployment.outcome
    assert outcome.error == "", outcome.error + tls_deployment.output[-2000:]
    cfg = load_config(run_dir / "config.toml")
    # Refused: the SuperLink does not activate an unregistered key; the SuperNode exits.
    assert outcome.rogue_returncode not in (None, 0)
    status = outcome.status
    assert status == "finished:completed", (run_dir / "logs" / "run.log").read_text()[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["num_updates"] == 1 and r["num_failed"] == 0
    assert set(outcome.nodes) == set(outcome.registered.values()) and outcome.registered
    assert "Failed to activate SuperNode" in (run_dir / "logs" / "device-0.log").read_text()
    # The reported accuracies, recomputed here: the final model on the global test set,
    # and (cold start) the served version on the device's own test split.
    ds = load_dataset(cfg.data)
    manifest = json.loads((run_dir / "final_model.json").read_text())
    final = model_from(load_file(run_dir / "final_model.safetensors"), manifest["model"])
    assert rows[-1]["global_test_acc"] == accuracy(final, ds.x_test, ds.y_test)
    registry = Registry(run_dir / "registry")
    cold = rows[0]["cold_start"]
    assert [c["device"] for c in cold] == [0]  # type: ignore[index, union-attr]
    for c in cold:  # type: ignore[union-attr]
        version = c.get("version") or 0  # type: ignore[union-attr]  # what it was served
        served = model_from(registry.load_arrays(version), registry.get(version).model)
        with np.load(run_dir / "device_data" / f"device-{c['device']}.npz") as z:  # type: ignore[index]
            assert c["acc"] == accuracy(served, z["x_test"], z["y_test"])  # type: ignore[index]
    assert not rows[1].get("cold_start")  # only a device's first join fetches
    assert [r["round"] for r in read_jsonl(run_dir / "cold_start.jsonl")] == [1]
    for name in ("summary.json", "registry", "partition.npz"):
        assert (run_dir / name).exists(), name
    state = load_file(run_dir / STATE_DIR / "device-000000.safetensors")
    assert state.keys() == final.state_dict().keys()  # FedAvg keeps its trained copy
    assert_no_leftovers(run_dir)


@pytest.mark.slow
def test_killed_device_does_not_stop_the_run_and_rejoins_from_its_state(tmp_path: Path) -> None:
    cfg = _cfg(
        "rounds=6",
        "strategy.min_train_devices=2",
        "strategy.round_timeout_s=45",  # a healthy wave takes ~20 s on 2 busy cores
        "evaluation.every=10",
    )
    run_dir = (tmp_path / "run").resolve()
    prepare_run_dir(cfg, run_dir)
    dep = Deployment(run_dir, make_certs(run_dir / "certs", 3))

    def on_round(row: RoundRow, _t: object) -> None:
        if row.round == 1:
            dep.kill_device(2, crash=True)  # round 2's train message is on its way
        elif row.round == 2:
            dep.restart_device(2)  # same key, data and state folder; retried until it joins

    try:
        dep.start_superlink()
        dep.register([0, 1, 2])
        dep.export_data([0, 1, 2])
        for k in range(3):
            dep.start_device(k)
        status = dep.follow(dep.submit(), on_round)
    finally:
        dep.stop()
    assert status == "finished:completed", (run_dir / "logs" / "run.log").read_text()[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["num_updates"] == 3
    assert rows[1]["num_updates"] == 2
    # Our round timeout or Flower's "node unavailable": either way, device 2 failed.
    assert [f["device"] for f in rows[1]["failed"]] == [2]  # type: ignore[union-attr]
    # Until the SuperLink lets the crashed node go (heartbeat expiry, ~60 s) only
    # device 2 fails; then it rejoins and trains again from its state on disk.
    for r in rows[2:]:
        assert [f["device"] for f in r["failed"]] in ([], [2])  # type: ignore[union-attr]
    assert rows[-1]["num_updates"] == 3 and rows[-1]["num_failed"] == 0
    from client.state import PersonalStateStore

    state = PersonalStateStore(run_dir / STATE_DIR).load(2)
    assert state is not None and state.meta["last_round"] == 6
    assert_no_leftovers(run_dir)


@pytest.mark.slow
def test_simulation_and_deployment_give_the_same_accuracy(tmp_path: Path) -> None:
    """Same config, same seed, all devices every round: same global accuracy per round."""
    cfg = _cfg()
    sim_dir, dep_dir = (tmp_path / "sim").resolve(), (tmp_path / "dep").resolve()
    prepare_run_dir(cfg, sim_dir)
    prepare_run_dir(cfg, dep_dir)
    sim = simulate(cfg, sim_dir)
    assert sim.ok, sim.failure
    dep = deploy(cfg, dep_dir, 3)
    assert dep.ok, dep.failure
    a, b = _accs(sim_dir), _accs(dep_dir)
    assert len(a) == len(b) == 2
    assert a == pytest.approx(b, abs=1e-6)
    assert_no_leftovers(sim_dir)
    assert_no_leftovers(dep_dir)


@pytest.mark.slow
def test_deploy_command_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "deployed"
    sets = [a for s in SMALL if not s.startswith("partition.") for a in ("--set", s)]
    proc = subprocess.run(
        [*HYBRIDFL, "deploy", "--devices", "3", "--out", str(out), *sets],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "round   2/2" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last"]["round"] == 2
    assert load_config(out / "config.toml").partition.num_devices == 3
    assert_no_leftovers(out.resolve())


@pytest.mark.slow
def test_superlink_device_and_run_commands(tmp_path: Path) -> None:
    """The step-by-step path: `superlink`, two `device`s (run folder; own data + state), `run`."""
    from simulation.deploy import export_device_data
    from simulation.procs import Processes
    from simulation.runner import free_port

    certs = make_certs(tmp_path / "certs", 2)
    sets = ["rounds=2", "partition.num_devices=2", 'model.name="logistic"', "seed=3"]
    sets.append("strategy.fraction_train=1.0")  # both devices train every round
    prep = tmp_path / "prep"  # the same seed gives the same partition: device 1's own file
    prepare_run_dir(load_config(None, sets), prep)
    data1 = export_device_data(prep, 1, tmp_path / "dev1" / "device-1.npz")
    out, port, procs = tmp_path / "real", free_port(), Processes()
    control = next(p for p in iter(free_port, None) if p != port)
    link = f"127.0.0.1:{port}"
    common = ["--superlink", link, "--certs", str(certs.root)]
    control_link = ["--superlink", f"127.0.0.1:{control}", "--certs", str(certs.root)]
    control_port = ["--control-port", str(control)]
    try:
        log = tmp_path / "superlink.out"
        procs.start(
            [
                *HYBRIDFL,
                "superlink",
                "--certs",
                str(certs.root),
                "--port",
                str(port),
                *control_port,
            ],
            None,
            log,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 90
        while "registered device-1.pub" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "registered device-1.pub" in log.read_text(), log.read_text()
        procs.start(
            [*HYBRIDFL, "device", *common, "--device-id", "0", "--run-dir", str(out)],
            None,
            tmp_path / "dev0.out",
            cwd=tmp_path,
        )
        state1 = tmp_path / "dev1" / "state"
        own_disk = ["--data", str(data1), "--state-dir", str(state1)]
        procs.start(
            [*HYBRIDFL, "device", *common, "--device-id", "1", *own_disk],
            None,
            tmp_path / "dev1.out",
            cwd=tmp_path,
        )
        run = subprocess.run(
            [
                *HYBRIDFL,
                "run",
                *control_link,
                "--out",
                str(out),
                *[a for s in sets for a in ("--set", s)],
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tmp_path,
        )
    finally:
        procs.stop_all()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "round   2/2" in run.stdout
    assert (out / STATE_DIR / "device-000000.safetensors").is_file()
    assert (state1 / "device-000001.safetensors").is_file()  # on "its own disk"
    assert not (out / STATE_DIR / "device-000001.safetensors").exists()
    assert_no_leftovers(tmp_path)
