"""Named crash points: ``kill -9`` at an exact step of a real run, for resume tests.

Why in the product and not a test patch: the resume guarantee (identical results
after a crash anywhere) must be checked on real processes started by the CLI
(SuperLink, simulation process, Ray), where no test can patch a function. Unset,
a point costs one environment lookup.

``HYBRIDFL_CRASH_AT="<stage>@<round>"`` arms one point. When reached, the process
SIGKILLs itself, or, with ``HYBRIDFL_CRASH_PAUSE_FILE`` set, writes its pid to that
file and waits to be killed from outside (to kill the CLI above it at that step).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TextIO

CRASH_ENV = "HYBRIDFL_CRASH_AT"
PAUSE_ENV = "HYBRIDFL_CRASH_PAUSE_FILE"


def armed(stage: str, round_: int) -> bool:
    return os.environ.get(CRASH_ENV) == f"{stage}@{round_}"


def crash() -> None:
    """Die now as ``kill -9`` would (no ``finally``, no flush), or wait to be killed."""
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        Path(pause).write_text(str(os.getpid()))
        while True:
            time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(stage: str, round_: int) -> None:
    if armed(stage, round_):
        crash()


def write_line(f: TextIO, line: str, stage: str, round_: int) -> None:
    """Write ``line`` and a newline; when ``stage`` is armed, die halfway through it
    (what a kill during the write leaves: a torn last line)."""
    if armed(stage, round_):
        f.write(line[: len(line) // 2])
        f.flush()
        crash()
    f.write(line + "\n")
