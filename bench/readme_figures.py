"""Regenerate the README's quickstart example from a real run, so it can be re-checked.

Run: ``python bench/readme_figures.py`` (runs ``hybridfl simulate`` on the default
config, about 1-4 min on 2 cores, and rewrites the README between the
``readme_figures`` markers); ``--check`` only reports whether the README matches;
``--from-output FILE`` renders a saved ``hybridfl simulate`` output instead of running.

Why a script: a hand-pasted sample goes stale (the issue that asked for this found a
missing column and other numbers). What is machine-dependent (paths, seconds) is
replaced by ``…``; every accuracy and count comes from the run. The quickstart is
seeded (42), so the same code gives the same numbers; the wall time is written with
the machine and its load, as measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK = "quickstart-output"
TIMING = "quickstart-timing"
_ROUND = re.compile(r"^round\s+(\d+)/(\d+)")
_SECONDS = re.compile(r"\s+[0-9.]+s$")


def render_output(output: str) -> str:
    """The example block: header lines, the first and last round, the closing lines;
    paths and seconds (machine-dependent) replaced by ``…``."""
    lines = [ln.rstrip() for ln in output.splitlines() if ln.strip()]
    rounds = [i for i, ln in enumerate(lines) if _ROUND.match(ln)]
    if not rounds:
        raise ValueError("no round lines in the output: is it `hybridfl simulate`'s?")
    head = lines[: rounds[0]]
    keep = [*head, lines[rounds[0]]]
    if len(rounds) > 1:
        keep += ["…", lines[rounds[-1]]]
    keep += lines[rounds[-1] + 1 :]
    out = []
    for ln in keep:
        ln = re.sub(r"(run folder: |results in )/\S*/(runs/[^/\s]+)", r"\1/…/\2", ln)
        ln = re.sub(r"(done in )[0-9.]+s", r"\1…s", ln)
        if _ROUND.match(ln):
            ln = _SECONDS.sub("    …s", ln)
        out.append(ln)
    return "\n".join(out)


def render_timing(wall_s: float, first_round_s: float | None) -> str:
    load = os.getloadavg()
    first = f", of which the first round (Flower/Ray start-up) was {first_round_s:.0f} s" if (
        first_round_s is not None
    ) else ""  # fmt: skip
    return (
        f"It took {int(wall_s // 60)} min {wall_s % 60:.0f} s on {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}, load average {load[0]:.1f} when it "
        f"ended){first}: `python bench/readme_figures.py`."
    )


def replace_between(text: str, name: str, new: str) -> str:
    """Replace what lies between ``<!-- readme_figures:NAME -->`` and ``<!-- /... -->``."""
    start, end = f"<!-- readme_figures:{name} -->", f"<!-- /readme_figures:{name} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"README needs exactly one {start} ... {end} pair")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{new}\n{end}{tail}"


def current_block(text: str, name: str) -> str:
    start, end = f"<!-- readme_figures:{name} -->", f"<!-- /readme_figures:{name} -->"
    return text.split(start)[1].split(end)[0].strip("\n")


def run_quickstart(out_dir: Path) -> tuple[str, float, float | None]:
    """``hybridfl simulate`` on the default config, as the README runs it (run folder
    ``runs/quickstart`` under ``out_dir``): stdout, wall s, first round s."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "simulate"],
        capture_output=True, text=True, env=env, cwd=out_dir, check=False,
    )  # fmt: skip
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the quickstart failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    first = next((ln for ln in proc.stdout.splitlines() if _ROUND.match(ln)), "")
    m = re.search(r"([0-9.]+)s$", first)
    return proc.stdout, wall, float(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    ap.add_argument("--from-output", type=Path, help="render this saved output, do not run")
    args = ap.parse_args(argv)
    timing = None
    if args.from_output is not None:
        output = args.from_output.read_text()
    else:
        with tempfile.TemporaryDirectory(prefix="readme-figures-") as tmp:
            output, wall, first = run_quickstart(Path(tmp))
        timing = render_timing(wall, first)
    block = "```\n" + render_output(output) + "\n```"
    text = README.read_text()
    if args.check:
        same = current_block(text, BLOCK) == block
        print("README example matches the run" if same else f"README example differs:\n{block}")
        return 0 if same else 1
    text = replace_between(text, BLOCK, block)
    if timing is not None:
        text = replace_between(text, TIMING, timing)
    README.write_text(text)
    print(block)
    if timing:
        print(timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
