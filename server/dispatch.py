"""Instructions out, replies in, one result per device out of each reply.

A message goes to one Flower node and carries a cohort of devices (one, for a real
device). ``server.pushpull`` sends them (at most ``max_in_flight`` out at once) and
pulls replies with a short adaptive poll instead of Flower's fixed 3 s
``send_and_receive`` sleep. A reply is decoded once; each
device's report and arrays come out of it, and every device that was sent but not
answered is accounted for as failed, with the reason.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    REPORT_KEY,
    CohortReply,
    EvalReport,
    Kind,
    RoundInstructions,
    TrainReport,
)
from common.records import from_record, to_record
from common.rows import DeviceIssue
from common.weights import Arrays
from server.population import Route
from server.pushpull import push_pull

log = logging.getLogger("hybridfl.server")


@dataclass
class TrainResult:
    """One device's update: its report and its arrays (a row of the stacked reply)."""

    report: TrainReport
    arrays: Arrays


@dataclass
class PartialSum:
    """A worker's pre-aggregated cohort: ``sum(num_examples * update)`` over ``reports``
    marked valid (float64), and the total weight it claims."""

    reports: list[TrainReport]
    sums: Arrays
    weight_total: float


@dataclass
class Collected:
    train: list[TrainResult] = field(default_factory=list)
    partials: list[PartialSum] = field(default_factory=list)
    evaluate: list[EvalReport] = field(default_factory=list)
    failed: list[DeviceIssue] = field(default_factory=list)
    rejected: list[DeviceIssue] = field(default_factory=list)
    """Replies that broke the protocol (e.g. naming a device they were not sent)."""
    messages: int = 0


def _split_stacked(arrays: Arrays, n: int) -> list[Arrays]:
    if any(v.shape[:1] != (n,) for v in arrays.values()):
        raise ValueError(f"stacked arrays do not have {n} rows")
    return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def _decode(reply: Message, sent: list[int], kind: Kind, out: Collected) -> None:
    """Put one reply's per-device results into ``out``."""
    if reply.has_error():
        reason = reply.error.reason or f"error code {reply.error.code}"
        out.failed.extend(DeviceIssue(device=d, reason=reason) for d in sent)
        return
    try:
        body = CohortReply.from_record_fields(reply.content[REPORT_KEY])
    except (KeyError, ValueError) as err:
        out.rejected.extend(
            DeviceIssue(device=d, reason=f"malformed reply: {str(err)[:200]}") for d in sent
        )
        return
    reports: list[TrainReport] | list[EvalReport] = body.train if kind == "train" else body.evaluate
    named = [r.device for r in reports] + [f.device for f in body.failures]
    if sorted(named) != sorted(sent) or body.kind != kind:
        out.rejected.extend(
            DeviceIssue(device=d, reason=f"reply names devices {sorted(named)[:5]}, not these")
            for d in sent
        )
        return
    out.failed.extend(DeviceIssue(device=f.device, reason=f.reason) for f in body.failures)
    if kind == "evaluate":
        out.evaluate.extend(body.evaluate)
        return
    arrays = from_record(reply.content[ARRAYS_KEY]) if ARRAYS_KEY in reply.content else {}
    if body.layout == "sum":
        out.partials.append(PartialSum(body.train, arrays, body.weight_total))
        return
    try:
        rows = _split_stacked(arrays, len(body.train)) if body.train else []
    except ValueError as err:
        out.rejected.extend(DeviceIssue(device=r.device, reason=str(err)) for r in body.train)
        return
    out.train.extend(TrainResult(r, a) for r, a in zip(body.train, rows, strict=True))


class Dispatcher:
    """Sends one round's messages over a Flower ``Grid`` and collects per-device results."""

    def __init__(self, grid: object, timeout_s: float, max_in_flight: int) -> None:
        self.grid = grid
        self.timeout_s = timeout_s
        self.max_in_flight = max(1, max_in_flight)

    def exchange(
        self,
        kind: Kind,
        round_: int,
        routes: list[Route],
        task: Callable[[list[int]], RoundInstructions],
        global_arrays: Arrays,
    ) -> Collected:
        """Send ``task(devices)`` plus the global weights along each route; collect."""
        record = to_record(global_arrays)  # encoded once, shared by every message
        pending = deque(
            (
                Message(
                    RecordDict(
                        {
                            ARRAYS_KEY: record,
                            CONFIG_KEY: ConfigRecord(task(devices).to_record_fields()),
                        }
                    ),
                    dst_node_id=node,
                    message_type=kind,
                    group_id=str(round_),
                ),
                devices,
            )
            for node, devices in routes
        )
        out = Collected(messages=len(pending))
        late_routes = push_pull(
            self.grid,
            pending,
            self.timeout_s,
            self.max_in_flight,
            lambda reply, sent: _decode(reply, sent, kind, out),
        )
        late = [d for devices in late_routes for d in devices]
        reason = f"no reply within strategy.round_timeout_s={self.timeout_s:g}"
        out.failed.extend(DeviceIssue(device=d, reason=reason) for d in late)
        out.failed.sort(key=lambda f: f.device)
        out.rejected.sort(key=lambda f: f.device)
        out.train.sort(key=lambda r: r.report.device)
        out.evaluate.sort(key=lambda r: r.device)
        return out


def nbytes(arrays: Arrays) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
