"""Which devices exist, what the server knows of each, and which Flower node runs them.

Two populations behind one interface:

* ``PartitionPopulation`` (simulation): the devices are the partition's (or the
  synthetic generator's) ids, known without any message; Flower's virtual SuperNodes
  are execution slots, and a message to a slot carries a cohort of device ids. Cost
  grows with the work (devices per round), not with the population.
* ``NodePopulation`` (deployment): one real SuperNode per device; the devices are
  the registered nodes, found by a ``hello`` query (and refreshed when a device
  comes back under a new node id).

Either way the server weights an update by the training-set size it knows (the
partition, or what the device registered), never by what a reply claims.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.protocol import CONFIG_KEY, REPORT_KEY, RoundInstructions
from server.pushpull import push_pull

log = logging.getLogger("hybridfl.server")
HELLO = "query.hello"


class PopulationError(RuntimeError):
    """The federation cannot run the population it was asked for."""


Route = tuple[int, list[int]]
"""(Flower node id, the devices one message to it carries)."""


class Population(Protocol):
    size: int

    def connect(self, wait_s: float = 120.0) -> None:
        """Know the devices before round 1 (deployment: register them; simulation: the slots)."""
        ...

    def train_pool(self) -> np.ndarray:
        """Device ids that may be selected for training (sorted; held-out excluded)."""
        ...

    def holdout(self) -> np.ndarray: ...

    def num_examples(self, device: int) -> int:
        """The training-set size the server knows for ``device``."""
        ...

    def routes(self, devices: list[int]) -> list[Route]:
        """Group ``devices`` (sorted) into messages, each for one node."""
        ...

    def refresh(self) -> None:
        """Catch up with nodes that (re)joined (deployment); a no-op in simulation."""
        ...


def default_cohort_size(num_devices: int, num_slots: int) -> int:
    """Devices per message when the config leaves it to us: one message per slot.

    Fewer, larger messages amortise Flower's per-message cost; one per slot keeps
    every worker busy (slots are twice the workers, so a worker always has the next
    message queued).
    """
    return max(1, -(-num_devices // max(1, num_slots)))


@dataclass
class PartitionPopulation:
    """Simulation: devices are ids with data; Flower nodes are execution slots."""

    sizes: np.ndarray
    """int64 training-set size per device id."""
    held_out: np.ndarray
    grid: Grid
    devices_per_message: int = 0
    slots: list[int] = field(default_factory=list)
    _pool: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.sizes.size)

    def connect(self, wait_s: float = 120.0) -> None:
        """Wait for the slots (Flower's virtual SuperNodes) to appear."""
        deadline = time.monotonic() + wait_s
        while not (nodes := sorted(self.grid.get_node_ids())) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not nodes:
            raise PopulationError(
                f"no Flower node connected within {wait_s:.0f}s: the simulation engine has "
                "no execution slots (check the federation's num-supernodes)"
            )
        self.slots = nodes
        log.info("%d devices over %d execution slots", self.size, len(nodes))

    def train_pool(self) -> np.ndarray:
        """Computed once: the partition's population never changes during a run."""
        if self._pool is None:
            ids = np.arange(self.size, dtype=np.int64)
            self._pool = np.setdiff1d(ids, self.held_out, assume_unique=True)
        return self._pool

    def holdout(self) -> np.ndarray:
        return self.held_out

    def num_examples(self, device: int) -> int:
        return int(self.sizes[device])

    def routes(self, devices: list[int]) -> list[Route]:
        if not self.slots:
            self.connect()
        per = self.devices_per_message or default_cohort_size(len(devices), len(self.slots))
        chunks = [devices[i : i + per] for i in range(0, len(devices), per)]
        return [(self.slots[i % len(self.slots)], chunk) for i, chunk in enumerate(chunks)]

    def refresh(self) -> None:
        return None


@dataclass
class NodePopulation:
    """Deployment: one real SuperNode per device, registered by a ``hello`` query."""

    grid: Grid
    expected: int
    """Devices the config declares (``partition.num_devices``)."""
    held_out: np.ndarray
    hello_task: RoundInstructions
    timeout_s: float
    node_of: dict[int, int] = field(default_factory=dict)
    device_of: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.expected

    def _hello(self, nodes: list[int]) -> list[str]:
        """Ask ``nodes`` who they are, all at once; the errors, one per node that failed.

        Replies are pulled as they come (``push_pull``), not after Flower's fixed 3 s
        sleep, so registering real devices costs what their answers take.
        """
        record = ConfigRecord(self.hello_task.to_record_fields())
        msgs = [
            (Message(RecordDict({CONFIG_KEY: record}), dst_node_id=n, message_type=HELLO), n)
            for n in nodes
        ]
        errors: list[str] = []

        def registered(r: Message, node: int) -> None:
            if r.has_error():
                errors.append(f"node {node}: {r.error.reason}")
                return
            rec = r.content[REPORT_KEY]
            dev = int(rec["device-id"])
            old = self.node_of.get(dev)
            if old is not None and old != node:
                self.device_of.pop(old, None)
                log.info("device %d is now node %d", dev, node)
            self.node_of[dev] = node
            self.device_of[node] = dev
            self.sizes[dev] = int(rec["num-train"])

        silent = push_pull(self.grid, msgs, self.timeout_s, max(1, len(msgs)), registered)
        errors += [f"node {n}: no answer to hello within {self.timeout_s:g}s" for n in silent]
        return errors

    def connect(self, wait_s: float = 120.0) -> None:
        """Register every device; fewer than the config declares is an error, not a
        quietly smaller experiment."""
        deadline = time.monotonic() + wait_s
        nodes = sorted(self.grid.get_node_ids())
        while len(nodes) < self.expected and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = sorted(self.grid.get_node_ids())
        errors = self._hello(nodes)
        missing = sorted(set(range(self.expected)) - set(self.node_of))
        if missing:
            raise PopulationError(
                f"{len(self.node_of)} of partition.num_devices={self.expected} devices "
                f"registered within {wait_s:.0f}s (missing {missing[:10]}"
                f"{'…' if len(missing) > 10 else ''}); "
                + ("; ".join(errors[:3]) or "start a SuperNode for each device")
            )
        log.info("registered %d devices", len(self.node_of))

    def refresh(self) -> None:
        unknown = sorted(set(self.grid.get_node_ids()) - set(self.device_of))
        if unknown:
            self._hello(unknown)

    def train_pool(self) -> np.ndarray:
        ids = np.array(sorted(self.node_of), dtype=np.int64)
        return np.setdiff1d(ids, self.held_out, assume_unique=True)

    def holdout(self) -> np.ndarray:
        return self.held_out

    def num_examples(self, device: int) -> int:
        return self.sizes[device]

    def routes(self, devices: list[int]) -> list[Route]:
        return [(self.node_of[d], [d]) for d in devices]
