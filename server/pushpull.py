"""Push messages to Flower nodes and pull their replies: a sliding window, a short poll.

Why not Flower's ``Grid.send_and_receive``: it sleeps a fixed 3 s between pulls, so
every exchange lasts at least 3 s longer than its fastest reply needs (a deployment's
``hello`` and every round). Here a pull that finds nothing waits 5 ms, doubling up to
0.2 s, and any reply resets the wait. At most ``max_in_flight`` messages are out at
once: the SuperLink's simulation backend scans nodes x messages, and a bounded window
keeps that scan small. Both the round dispatch and the deployment's registration use
this one loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flwr.app import Message

POLL_MIN_S = 0.005
POLL_MAX_S = 0.2

Tag = TypeVar("Tag")


def push_pull(
    grid: Any,
    messages: Iterable[tuple[Message, Tag]],
    timeout_s: float,
    max_in_flight: int,
    on_reply: Callable[[Message, Tag], None],
) -> list[Tag]:
    """Send each message (a ``Tag`` says what it was for); ``on_reply(reply, tag)`` for
    every reply, in arrival order. Returns the tags of the messages still unanswered
    after ``timeout_s`` (sent or not yet sent); a later reply to one of them is ignored.

    ``grid`` is a Flower ``Grid`` (anything with ``push_messages``/``pull_messages``).
    """
    pending = deque(messages)
    in_flight: dict[str, Tag] = {}
    window = max(1, max_in_flight)
    deadline = time.monotonic() + timeout_s
    wait = POLL_MIN_S
    while pending or in_flight:
        room = window - len(in_flight)
        if pending and room > 0:
            batch = [pending.popleft() for _ in range(min(room, len(pending)))]
            ids = list(grid.push_messages([m for m, _ in batch]))
            for msg_id, (_, tag) in zip(ids, batch, strict=True):
                in_flight[msg_id] = tag
        replies = list(grid.pull_messages(list(in_flight)))
        for reply in replies:
            replied_to = reply.metadata.reply_to_message_id
            if replied_to in in_flight:  # else a late reply to a message given up on
                on_reply(reply, in_flight.pop(replied_to))
        if replies:
            wait = POLL_MIN_S
            continue
        if time.monotonic() > deadline:
            break
        time.sleep(wait)
        wait = min(POLL_MAX_S, wait * 2)
    return [*in_flight.values(), *(tag for _, tag in pending)]
