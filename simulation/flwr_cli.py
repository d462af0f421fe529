"""Talking to Flower's own tools and waiting on processes: the one place that does it.

Why one module: ``simulate``, ``deploy``, ``run`` and ``superlink`` all write a Flower
connection, submit with ``flwr run``, ask ``flwr ls`` for a status, parse ``flwr``'s
JSON output and wait for a process to answer on HTTP. Each of those has a trap
(below) that must be handled once.

* Every ``flwr`` command runs with its working directory set to the run's own
  ``FLWR_HOME``: the Flower CLI reads its connection argument as an app path when
  a folder of that name with a ``pyproject.toml`` exists in the working directory
  (e.g. running from a clone's parent folder, whose ``hybridfl/`` is this app).
* Every wait has a deadline and ends with an error that names what did not happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx

CONNECTION = "hybridfl-superlink"
"""Name of the one SuperLink connection in every ``FLWR_HOME`` we write."""
FLWR_TIMEOUT_S = 60.0
"""Deadline of one ``flwr ls``/``register`` call (``flwr run`` gets five times that)."""


class RunnerError(RuntimeError):
    """The run could not be started or did not finish successfully."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flwr_env(flwr_home: Path, ray_tmp: Path | None = None, ray_address: str = "") -> dict[str, str]:
    """Environment for every Flower process of a run: isolated, quiet, local.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes a local Ray instance take
    127.0.0.1 as its node address (Ray's own default on a laptop OS), and Ray then
    binds gcs_server, raylet, the runtime-env and dashboard agents and its workers to
    the loopback interface only: nobody on the network can reach them (Ray has no
    authentication). It is left unset when joining an existing cluster.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
            # Flower's CLI and Ray colour their output; log files get plain text.
            "NO_COLOR": "1",
            "TERM": "dumb",
            "RAY_COLOR_PREFIX": "0",
        }
    )
    env.pop("FORCE_COLOR", None)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    else:
        env.pop("RAY_ADDRESS", None)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None = None) -> None:
    """``FLWR_HOME/config.toml`` with one connection: TLS with our CA, or insecure."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = (
        f'root-certificates = "{ca_cert.resolve()}"\n'
        if ca_cert is not None
        else "insecure = true\n"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}'
    )


def _home(env: dict[str, str]) -> Path:
    return Path(env["FLWR_HOME"])


def parse_json_output(stdout: str) -> dict[str, Any]:
    """The JSON object ``flwr ... --format json`` prints (after any notices)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    value = json.loads(stdout[start:])
    if not isinstance(value, dict):
        raise ValueError("the JSON output is not an object")
    return value


def flwr_json(
    args: list[str], env: dict[str, str], what: str, timeout_s: float = FLWR_TIMEOUT_S
) -> tuple[dict[str, Any], str]:
    """Run ``flwr ARGS --format json`` in ``FLWR_HOME``; its JSON object and raw output.

    Raises ``RunnerError`` naming ``what`` with the tail of Flower's output when the
    command fails, times out or prints no JSON.
    """
    try:
        out = subprocess.run(
            ["flwr", *args, "--format", "json"],
            env=env,
            cwd=_home(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RunnerError(
            f"{what}: `flwr {args[0]}` gave no answer within {timeout_s:.0f}s"
        ) from None
    raw = out.stdout + out.stderr
    try:
        payload = parse_json_output(out.stdout)
    except ValueError:
        raise RunnerError(f"{what} failed (exit {out.returncode}):\n{raw[-2000:]}") from None
    if payload.get("success") is False:
        raise RunnerError(f"{what} failed: {payload.get('error-message') or raw[-2000:]}")
    return payload, raw


def app_run_config_keys(app: Path) -> set[str]:
    """Keys the app declares in ``[tool.flwr.app.config]`` (Flower rejects any other)."""
    try:
        data = tomllib.loads((app / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return set()
    from flwr.common.config import flatten_dict  # dotted keys, as Flower checks them

    return set(flatten_dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})))


def _toml_value(v: str | int | float | bool) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if '"' in v:
        raise RunnerError(f"run config value {v!r}: double quotes are not supported")
    return f'"{v}"'


def submit(
    app: Path,
    env: dict[str, str],
    log: Path,
    run_config: dict[str, str | int | float | bool],
    federation_config: dict[str, str | int | float | bool] | None = None,
) -> int:
    """``flwr run APP`` on our connection; the run id.

    ``run_config`` keys the app does not declare are left out (Flower would refuse
    the run), so a key added here before the app declares it does no harm.
    """
    declared = app_run_config_keys(app)
    rc = " ".join(
        f"{k}={_toml_value(v)}" for k, v in run_config.items() if not declared or k in declared
    )
    args = ["run", str(app), CONNECTION, "--run-config", rc]
    if federation_config:
        fed = " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())
        args += ["--federation-config", fed]
    try:
        payload, raw = flwr_json(args, env, "flwr run", timeout_s=5 * FLWR_TIMEOUT_S)
    except RunnerError as err:
        with log.open("a") as f:
            f.write(str(err) + "\n")
        raise
    with log.open("a") as f:
        f.write(raw)
    try:
        return int(payload["run-id"])
    except (KeyError, TypeError, ValueError):
        raise RunnerError(f"flwr run printed no run id:\n{raw[-2000:]}") from None


def run_status(run_id: int, env: dict[str, str]) -> str:
    """The run's status from the SuperLink (``flwr ls``); raises ``RunnerError`` if unknown."""
    payload, raw = flwr_json(
        ["ls", CONNECTION, "--run-id", str(run_id)], env, f"asking the status of run {run_id}"
    )
    try:
        return str(payload["runs"][0]["status"])
    except (KeyError, IndexError, TypeError):
        raise RunnerError(f"flwr ls gave no status for run {run_id}:\n{raw[-1000:]}") from None


def stream_log_cmd(run_id: int) -> list[str]:
    """``flwr log RUN --stream``: the run's log, to a file (start it with cwd=FLWR_HOME)."""
    return ["flwr", "log", str(run_id), CONNECTION, "--stream"]


def log_tail(log: Path, chars: int = 2000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def wait_http_ok(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout_s: float = 60.0,
    verify: str | bool = False,
    accept: Any = None,
) -> httpx.Response:
    """Poll ``url`` until it answers 2xx (and ``accept(response)`` holds); the response.

    Fails early, with the log's tail, when ``proc`` exits; after ``timeout_s`` with
    the log's path.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunnerError(f"{what} exited with code {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(url, timeout=1.0, verify=verify)
            if r.is_success and (accept is None or accept(r)):
                return r
        time.sleep(0.2)
    raise RunnerError(f"{what} did not answer on {url} within {timeout_s:.0f}s; see {log}")


def wait_superlink(
    port: int,
    proc: subprocess.Popen[bytes],
    log: Path,
    ca_cert: Path | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Poll the SuperLink's ``/health`` (over TLS, verified with our CA, when secure)."""
    url = f"{'https' if ca_cert else 'http'}://127.0.0.1:{port}/health"
    verify: str | bool = str(ca_cert) if ca_cert else False
    wait_http_ok(url, proc, log, "the SuperLink", timeout_s, verify)


__all__ = [
    "CONNECTION",
    "RunnerError",
    "app_run_config_keys",
    "flwr_env",
    "flwr_json",
    "free_port",
    "log_tail",
    "parse_json_output",
    "run_status",
    "stream_log_cmd",
    "submit",
    "wait_http_ok",
    "wait_superlink",
    "write_connection",
]
