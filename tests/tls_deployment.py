"""The default run's one real deployment, driven in the background (see conftest.py).

A SuperLink and one device SuperNode over TLS with node authentication, the model
server the device cold-starts from, and a rogue SuperNode whose key was never
registered. ``python -m tests.tls_deployment ROOT`` leaves the run folder in
``ROOT/run`` and, in ``ROOT/outcome.json``, what only the driver sees (the node ids
registration gave, the rogue's exit code, the run's final status, the SuperLink's
node table); ``test_deploy.py`` checks both.

Why a process of its own, in the background (after ``served_run``, see conftest.py):
a deployment mostly waits on process start-ups (every message starts a ClientApp
process), so on 2 cores the unit tests run meanwhile; a separate process keeps the
pytest process free for them, and a Ctrl-C (SIGINT) still stops every process
through ``Deployment.stop``.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
SETS = (
    "rounds=2",
    "partition.num_devices=1",
    'model.name="logistic"',
    "strategy.fraction_train=1.0",
    "seed=7",
    "evaluation.every=2",
)
"""One device, two rounds, one evaluation: in deployment every message starts a
ClientApp process (~5 s of CPU each), so this is the cheapest real deployment that
still shows TLS, node authentication, a cold start from the model server and state
kept between rounds. Several devices per deployment: the slow tests in test_deploy."""
OUTCOME = "outcome.json"


class Outcome(BaseModel):
    """What the driver saw; written once, at the end (also after a failure)."""

    status: str = ""
    registered: dict[int, int] = {}
    """device id -> node id, from ``flwr supernode register``."""
    rogue_returncode: int | None = None
    nodes: list[int] = []
    """Node ids in ``flwr supernode ls`` after the run."""
    error: str = ""
    """The driver's own exception, if any (the run's failure is in ``status``)."""


def drive(root: Path) -> Outcome:
    """Set up, run and stop the deployment; every process is stopped before returning."""
    from common.config import load_config
    from common.rundir import prepare_run_dir
    from simulation.certs import device_key_pair, make_certs
    from simulation.deploy import Deployment, list_nodes

    out = Outcome()
    run_dir = (root / "run").resolve()
    dep: Deployment | None = None
    try:
        prepare_run_dir(load_config(None, list(SETS)), run_dir)
        certs = make_certs(run_dir / "certs", 1)
        rogue_key = run_dir / "rogue.key"
        device_key_pair(rogue_key, run_dir / "rogue.pub")
        dep = Deployment(run_dir, certs)
        dep.start_superlink()
        out.registered = dep.register([0])
        dep.export_data([0])
        dep.start_model_server()
        rogue = dep.start_device(0, private_key=rogue_key)  # claims to be device 0
        dep.start_device(0)
        # Refused: the SuperLink does not activate an unregistered key; the SuperNode exits.
        out.rogue_returncode = rogue.wait(timeout=60)
        out.status = dep.follow(dep.submit())
        out.nodes = [int(n["node-id"]) for n in list_nodes(dep.env)]  # type: ignore[call-overload]
    except Exception:
        out.error = traceback.format_exc()[-3000:]
    finally:
        if dep is not None:
            dep.stop()
    return out


@dataclass(frozen=True)
class TlsDeployment:
    """The background deployment's result, for the tests."""

    run_dir: Path
    outcome: Outcome
    returncode: int
    output: str
    """The driver's stdout and stderr."""


class TlsDeploymentJob:
    """The driver process in the background; ``result`` waits for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "driver.out"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.tls_deployment", str(root)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> TlsDeployment:
        try:
            self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the TLS deployment did not finish in {TIMEOUT_S} s") from None
        outcome = self.root / OUTCOME
        return TlsDeployment(
            run_dir=(self.root / "run").resolve(),
            outcome=Outcome.model_validate_json(outcome.read_text())
            if outcome.exists()
            else Outcome(error="the driver wrote no outcome"),
            returncode=self.proc.returncode,
            output=self.log.read_text(errors="replace"),
        )

    def stop(self) -> None:
        """Ctrl-C (the driver's ``finally`` stops the deployment), SIGKILL if that hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str]) -> int:
    root = Path(argv[1])
    outcome = drive(root)
    tmp = root / (OUTCOME + ".incomplete")
    tmp.write_text(outcome.model_dump_json(indent=1))
    tmp.replace(root / OUTCOME)
    return 0 if not outcome.error else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main(sys.argv))
    sys.exit(130)
