"""A Flower Grid that delivers messages to the real ClientApp in this process.

For testing the server's round logic (validation, aggregation order, evaluation)
without Ray: the ClientApp, the data and the personal-state store are the real
ones; only the transport is skipped. A ``tamper`` hook can replace a node's
reply (its argument is the node's slot or device number), to play a faulty or
malicious device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common.protocol import CONFIG_KEY, RoundInstructions
from server.aggregation import StandInGrid

Tamper = Callable[[int, Message, Message], Message | None]


class InProcessGrid(StandInGrid):
    """``num_nodes`` simulation slots (``partition-id``), or, with ``devices=True``, one
    real device per node (``device-id``), as a deployment's SuperNodes are."""

    def __init__(
        self,
        run_dir: Path,
        num_nodes: int,
        tamper: Tamper | None = None,
        *,
        devices: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.nodes = {1000 + d: d for d in range(num_nodes)}
        self.node_key = "device-id" if devices else "partition-id"
        self.tamper = tamper
        self.hold: dict[int, int] = {}
        """Device id -> pulls a reply for a message carrying it is held back for (a
        worker that finishes later in real time than the others)."""
        self._held: dict[str, int] = {}
        self._devices_of: dict[str, tuple[str, list[int]]] = {}
        self.pulled: list[tuple[str, list[int]]] = []
        """(message type + group, devices) of each reply, in the order it was pulled."""
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._ready: dict[str, Message] = {}
        _identity()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        _identity()
        run_config = {"run-dir": str(self.run_dir)}
        ctx = Context(1, node, {self.node_key: self.nodes[node]}, RecordDict(), run_config)
        try:
            reply = client_app(msg, ctx)
        except Exception as err:  # the real runtime turns exceptions into error replies
            reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
        if self.tamper is not None:
            reply = self.tamper(self.nodes[node], msg, reply) or reply
        self.sent.append(msg)
        if reply is not None:
            self.replies.append(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's push does
            reply = self._deliver(msg)
            if reply is not None:
                self._ready[msg.metadata.message_id] = reply
                devs = _devices(msg)
                self._devices_of[msg.metadata.message_id] = (
                    f"{msg.metadata.message_type}:{msg.metadata.group_id}",
                    devs,
                )
                held = max((self.hold.get(d, 0) for d in devs), default=0)
                if held:
                    self._held[msg.metadata.message_id] = held
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for i in list(message_ids):
            if self._held.get(i, 0) > 0:
                self._held[i] -= 1
                continue
            if i in self._ready:
                out.append(self._ready.pop(i))
                if i in self._devices_of:
                    self.pulled.append(self._devices_of.pop(i))
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = [r for m in messages if (r := self._deliver(m)) is not None]
        return out


def _devices(msg: Message) -> list[int]:
    if CONFIG_KEY not in msg.content.config_records:
        return []
    return RoundInstructions.from_record_fields(msg.content[CONFIG_KEY]).devices


def _identity() -> None:
    """What Flower's runtime sets in the ServerApp/ClientApp process."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1
