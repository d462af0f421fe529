"""A Flower Grid that delivers messages to the real ClientApp in this process.

For testing the server's round logic (validation, aggregation order, evaluation)
without Ray: the ClientApp, the data and the personal-state store are the real
ones; only the transport is skipped. A ``tamper`` hook can replace a device's
reply, to play a faulty or malicious device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

Tamper = Callable[[int, Message, Message], Message | None]


class InProcessGrid(Grid):
    def __init__(self, run_dir: Path, num_devices: int, tamper: Tamper | None = None) -> None:
        self.run_dir = run_dir
        self.nodes = {1000 + d: d for d in range(num_devices)}
        self.tamper = tamper
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        # What Flower's runtime sets in the ServerApp/ClientApp process.
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 1
        TaskIdentity.task_id = 1

    def set_run(self, run: object) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            device = self.nodes[node]
            TaskIdentity.run_id = 1
            TaskIdentity.node_id = 1
            TaskIdentity.task_id = 1
            run_config = {"run-dir": str(self.run_dir)}
            ctx = Context(1, node, {"partition-id": device}, RecordDict(), run_config)
            try:
                reply = client_app(msg, ctx)
            except Exception as err:  # the real runtime turns exceptions into error replies
                reply = Message(Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(device, msg, reply) or reply
            self.sent.append(msg)
            if reply is not None:
                out.append(reply)
        self.replies.extend(out)
        return out
