"""
One connection's subscription to one topic: the order of delivery, the
C{max_inflight} window, and what has been sent.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional

from zope.interface import implementer

from zaichik.storage import Record
from zaichik.topic import ISubscriber, Topic


@implementer(ISubscriber)
class Subscription:
    """
    Sends a topic's records to one connection, in offset order.

    With C{max_inflight} M > 0, at most M records are sent and not yet
    acknowledged; the rest wait in C{pending} (a queued record that retention
    expires meanwhile is skipped, since it is gone).

    @ivar last_sent: the highest offset sent to the connection on this topic
        (carried over from earlier subscriptions of the same connection), or
        None.
    """

    def __init__(
        self,
        topic: Topic,
        write: Callable[[bytes], None],
        max_inflight: int = 0,
        last_sent: Optional[int] = None,
    ) -> None:
        self.topic = topic
        self.max_inflight = max_inflight
        self.last_sent = last_sent
        self.active = True
        self._write = write
        self._pending: Deque[Record] = deque()
        self._inflight: Deque[int] = deque()

    def __repr__(self) -> str:
        return f"<Subscription {self.topic.name} last_sent={self.last_sent} pending={len(self._pending)}>"

    @property
    def inflight(self) -> int:
        """How many records are sent and not yet acknowledged."""
        return len(self._inflight)

    @property
    def pending(self) -> int:
        """How many records wait for room in the window."""
        return len(self._pending)

    def deliver(self, records: List[Record]) -> None:
        if not self.active or not records:
            return
        if not self.max_inflight and not self._pending:
            write = self._write
            for record in records:
                write(record.frame)
            self.last_sent = records[-1].offset
            return
        self._pending.extend(records)
        self._drain()

    def _drain(self) -> None:
        limit = self.max_inflight
        pending = self._pending
        inflight = self._inflight
        while pending and (not limit or len(inflight) < limit):
            record = pending.popleft()
            if record.expired:
                continue
            self._write(record.frame)
            self.last_sent = record.offset
            if limit:
                inflight.append(record.offset)

    def acknowledge(self, offset: int) -> None:
        """Everything up to and including C{offset} is committed: open the window."""
        inflight = self._inflight
        while inflight and inflight[0] <= offset:
            inflight.popleft()
        if self._pending:
            self._drain()

    def cancel(self) -> None:
        """Stop delivery; nothing more is written."""
        self.active = False
        self.topic.unsubscribe(self)
        self._pending.clear()
        self._inflight.clear()
