"""One checkpoint per round, and resuming a run from it with identical results.

What a round leaves that the next one needs: the global arrays, the strategy's
state (FedAdam's moments, FedAvgM's momentum: ``Aggregator.state``), the round,
and how far the appended result files got. Nothing else is needed: selection,
device training and evaluation sampling draw from (seed, round, device) alone, so
no generator state is saved, and devices' personal state is rolled back on disk
(``common.state_files``).

Layout in ``<run>/checkpoint/``: ``round-<r>.safetensors`` (arrays, a new name
each round) and ``checkpoint.json``, written last, the commit point: temp file,
fsync, rename. A crash before the rename leaves the previous checkpoint and its
arrays file whole; older arrays files are removed only after the commit.

Resuming (``resume``): check the config is the one checkpointed, cut the result
files back to the checkpoint's positions, roll back devices that trained after
it, restore arrays and strategy, and go on with the next round. Versions the
lost round already published are matched by the registry (same bytes, same
version; ``Registry.publish``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from common.atomic import atomic_write_bytes
from common.crashpoint import crash_point
from common.rundir import CHECKPOINT_DIR, CONFIG_FILE, DEVICES_FILE, STATE_DIR, read_jsonl
from common.state_files import rollback
from common.weights import Arrays, from_safetensors, sha256_hex, to_safetensors
from server.device_summary import DeviceRow

if TYPE_CHECKING:
    from server.loop import ServerLoop

log = logging.getLogger("hybridfl.server")

CHECKPOINT_FILE = "checkpoint.json"
GLOBAL, STRATEGY = "global/", "strategy/"


class ResumeError(RuntimeError):
    """The run folder cannot be resumed as it is (the message says why and what to do)."""


class Checkpoint(BaseModel):
    """``checkpoint.json``: the commit point of a round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = 1
    round: int
    arrays_file: str
    arrays_sha256: str
    positions: dict[str, int]
    """Length of each appended result file (``server.recording.APPENDED``)."""
    config_sha256: str
    clock_now_s: float | None = None
    """Synchronous virtual clock: the virtual time the next round starts at."""


def _config_sha(run_dir: Path) -> str:
    return hashlib.sha256((run_dir / CONFIG_FILE).read_bytes()).hexdigest()


def read_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last committed checkpoint (None before the first one)."""
    path = run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE
    try:
        return Checkpoint.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError) as err:
        raise ResumeError(f"{path} is damaged ({err}): the run cannot be resumed") from None


def save_checkpoint(loop: ServerLoop, round_: int) -> None:
    """Commit the state after ``round_`` (its metrics row already appended)."""
    folder = loop.run_dir / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    arrays = {GLOBAL + k: v for k, v in loop.global_arrays.items()}
    arrays |= {STRATEGY + k: v for k, v in loop.aggregator.state().items()}
    blob = to_safetensors(arrays)
    name = f"round-{round_:06d}.safetensors"
    atomic_write_bytes(folder / name, blob, lambda: crash_point("checkpoint-arrays", round_))
    ck = Checkpoint(
        round=round_,
        arrays_file=name,
        arrays_sha256=sha256_hex(blob),
        positions=loop.recorder.positions(),
        config_sha256=_config_sha(loop.run_dir),
        clock_now_s=loop.sync.now_s if loop.sync is not None else None,
    )
    atomic_write_bytes(
        folder / CHECKPOINT_FILE,
        ck.model_dump_json(indent=1).encode(),
        lambda: crash_point("checkpoint-commit", round_),
    )
    for old in folder.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def rewind(run_dir: Path, loop: ServerLoop | None = None) -> Checkpoint | None:
    """Put the run folder back to its last checkpoint: result files cut back, devices
    that trained after it rolled back. Idempotent (a crash during it is repaired by
    running it again); the CLI runs it before following a resumed run."""
    from server.recording import Recorder

    ck = read_checkpoint(run_dir)
    recorder = loop.recorder if loop is not None else Recorder(run_dir)
    if ck is None:
        recorder.start()  # nothing was committed: as a fresh run
        rollback(run_dir / STATE_DIR, 0)
        return None
    if _config_sha(run_dir) != ck.config_sha256:
        raise ResumeError(
            f"{run_dir / CONFIG_FILE} changed after round {ck.round} was checkpointed: "
            "a resumed run must use the config it started with; start a new run instead"
        )
    recorder.rewind(ck.positions)
    undone = rollback(run_dir / STATE_DIR, ck.round)
    if undone:
        log.info("rolled back %d devices that trained after round %d", len(undone), ck.round)
    return ck


def resume(loop: ServerLoop) -> int:
    """Restore ``loop`` from the run folder's checkpoint; the first round to run."""
    ck = rewind(loop.run_dir, loop)
    if ck is None:
        return 1
    path = loop.run_dir / CHECKPOINT_DIR / ck.arrays_file
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ResumeError(f"{path} is missing: the checkpoint cannot be restored") from None
    if sha256_hex(blob) != ck.arrays_sha256:
        raise ResumeError(f"{path} does not match its checkpoint (sha256): cannot restore")
    arrays = {k: np.array(v) for k, v in from_safetensors(blob).items()}
    restored = _part(arrays, GLOBAL)
    if set(restored) != set(loop.global_arrays):
        raise ResumeError(
            f"{path} holds arrays {sorted(restored)[:4]}..., the model has "
            f"{sorted(loop.global_arrays)[:4]}...: the checkpoint is from another model"
        )
    loop.global_arrays.update(restored)
    loop.aggregator.load_state(_part(arrays, STRATEGY))
    if loop.sync is not None and ck.clock_now_s is not None:
        loop.sync.now_s = ck.clock_now_s
    loop.last_device_rows = _device_rows(loop.run_dir, ck.round)
    log.info("resuming after round %d", ck.round)
    return ck.round + 1


def _part(arrays: Arrays, prefix: str) -> Arrays:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _device_rows(run_dir: Path, round_: int) -> list[DeviceRow]:
    """The latest evaluation's device rows, if it is not from a lost round."""
    raw = read_jsonl(run_dir / DEVICES_FILE)
    if not raw or int(raw[0].get("round", round_ + 1)) > round_:  # type: ignore[call-overload]
        return []
    return [DeviceRow.model_validate({k: v for k, v in r.items() if k != "round"}) for r in raw]


def start(loop: ServerLoop, resuming: bool) -> int:
    """The first round to run: 1 for a fresh run (result files cleared), else the round
    after the checkpoint (see ``resume``)."""
    if resuming:
        if not loop.simulated:
            raise ResumeError(
                "resuming needs the devices' state on the server's disk: only simulations "
                "can be resumed"
            )
        if loop.cfg.clock.mode == "async":
            raise ResumeError(
                "clock.mode = 'async' keeps an event queue (devices in flight, the versions "
                "they started from) that is not checkpointed: an asynchronous run cannot be "
                "resumed; start it again"
            )
        if loop.cfg.rollout.policy != "immediate":
            raise ResumeError(
                f"rollout.policy = '{loop.cfg.rollout.policy}' keeps a rollout in progress "
                "(candidate, step, analysis window, detector) that is not checkpointed: a "
                "run with a rollout policy cannot be resumed; start it again"
            )
        return resume(loop)
    loop.recorder.start()
    return 1


__all__ = [
    "Checkpoint",
    "ResumeError",
    "read_checkpoint",
    "resume",
    "rewind",
    "save_checkpoint",
    "start",
]
