"""The serving plane's history as text: for ``hybridfl serve`` at startup and ``report``.

One formatter, so the operator sees the same lines in both places (and they match
``GET /v1/models/global/events``, which reads the same log).
"""

from __future__ import annotations

from pathlib import Path

from common.rundir import REGISTRY_DIR
from server.registry import Registry, RegistryEvent
from server.rollout_state import read_state


def event_line(e: RegistryEvent) -> str:
    """One event: seq, round, what moved, who and why, and the analysis numbers."""
    rnd = "-" if e.round is None else str(e.round)
    src = "-" if e.from_version is None else f"v{e.from_version}"
    what = {"move": f"{e.alias} {src} -> v{e.to_version}", "reject": f"rejected v{src[1:]}"}
    text = what.get(e.kind, f"{e.kind} {e.alias} v{e.to_version}")
    if e.kind == "reject":
        text += f", devices back to v{e.to_version}"
    line = f"#{e.seq:<4} round {rnd:>4}  {text:<28} by {e.actor}"
    if e.pinned and e.kind == "move" and e.alias == "serving":
        line += " (pinned)"
    if e.reason:
        line += f": {e.reason}"
    a = e.analysis
    if a is not None:
        line += (
            f" [share {a.share:.0%}, {a.devices} devices: candidate {a.candidate_acc:.3f} vs "
            f"serving {a.serving_acc:.3f}, hurt {a.share_hurt:.0%}]"
        )
    return line


def history_text(run_dir: Path, *, last: int = 20, alias: str | None = "serving") -> str:
    """The last ``last`` events (of ``alias``, rollout verdicts included) and the rollout state."""
    root = Path(run_dir) / REGISTRY_DIR
    events = Registry(root).events()
    if alias is not None:
        events = [e for e in events if e.alias == alias]
    if not events:
        return "serving history: no events yet"
    shown = events[-last:]
    head = f"serving history ({len(events)} events"
    head += f", last {len(shown)}):" if len(shown) < len(events) else "):"
    lines = [head, *(f"  {event_line(e)}" for e in shown)]
    state = read_state(root)
    if state is not None:
        if state.active:
            lines.append(
                f"  rollout ({state.policy}): candidate v{state.candidate_version} at step "
                f"{state.step + 1}/{len(state.steps)}, share {state.share:.0%}, "
                f"{state.failures} failed measurement(s)"
            )
        else:
            lines.append(f"  rollout ({state.policy}): {state.phase}; {state.note}".rstrip("; "))
    return "\n".join(lines)


def history_markdown(name: str, run_dir: Path) -> str | None:
    """A report section for one run (None when the run has no event log)."""
    if not Registry(Path(run_dir) / REGISTRY_DIR).events():
        return None
    return f"### Serving history: {name}\n\n```\n{history_text(run_dir, last=50)}\n```"
