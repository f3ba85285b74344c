"""
A topic: an ordered log of messages with offsets, retention and compaction,
fanned out to its subscribers.

Everything here takes time from an injected clock (C{IReactorTime}), so tests
drive it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from zope.interface import Interface

from zaichik import codec
from zaichik.codec import Start
from zaichik.storage import IMessageLog, Record

_log = Logger()


class ISubscriber(Interface):
    """Something that receives a topic's messages."""

    def deliver(records: List[Record]) -> object:
        """
        New records, in offset order.  May return a Deferred; a failure (raised
        or as a Deferred) removes the subscriber from the topic.
        """


class Topic:
    """
    One topic.

    @ivar next_offset: the offset the next stored message will get.
    @ivar subscribers: the L{ISubscriber}s currently following the topic.
    """

    def __init__(
        self,
        name: str,
        log: IMessageLog,
        clock,
        retention_ttl: int = 0,
        compaction_window: int = 0,
        max_retained_bytes: int = 0,
        next_offset: int = 0,
    ) -> None:
        self.name = name
        self.retention_ttl = retention_ttl
        self.compaction_window = compaction_window
        self.max_retained_bytes = max_retained_bytes
        self.next_offset = next_offset
        self.subscribers: List[ISubscriber] = []
        self._log = log
        self._clock = clock
        self._prefix = codec.topic_prefix(name)
        self._last_timestamp = 0
        # Compaction: the last stored timestamp and offset of each key still
        # inside its window, and the keys in the order they were stored so
        # that the ones whose window has passed can be forgotten cheaply.
        self._keys: Dict[bytes, Tuple[int, int]] = {}
        self._key_order: Deque[Tuple[int, bytes]] = deque()

    def __repr__(self) -> str:
        return f"<Topic {self.name} next_offset={self.next_offset} retained={len(self._log)}>"

    # -- time -------------------------------------------------------------------

    def now(self) -> int:
        """
        The broker's wall-clock time in milliseconds, never earlier than the
        last stored message's (so timestamps do not go backwards in a topic
        when the system clock is stepped).
        """
        now = int(self._clock.seconds() * 1000)
        return now if now > self._last_timestamp else self._last_timestamp

    # -- publishing -------------------------------------------------------------

    def publish(self, key: Optional[bytes], value: bytes) -> Tuple[int, bool]:
        """
        Store one message and deliver it.

        @return: C{(offset, duplicate)}: for a duplicate dropped by
            compaction, the offset of the stored message it duplicates.
        """
        record, offset = self._store(self.now(), key, value)
        if record is not None:
            self._stored([record])
        return offset, record is None

    def publish_many(self, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> List[Tuple[int, bool]]:
        """
        Store several messages as if published one after the other, and
        deliver the stored ones to each subscriber in one call.
        """
        now = self.now()
        results = []
        stored = []
        for key, value in entries:
            record, offset = self._store(now, key, value)
            if record is None:
                results.append((offset, True))
            else:
                stored.append(record)
                results.append((offset, False))
        if stored:
            self._stored(stored)
        return results

    def _store(self, now: int, key: Optional[bytes], value: bytes) -> Tuple[Optional[Record], int]:
        window = self.compaction_window
        if key and window:
            seen = self._keys.get(key)
            if seen is not None and now - seen[0] < window:
                return None, seen[1]
            if len(self._key_order) > 2 * len(self._keys) + 64:
                # Keys stored again after their window leave stale entries
                # behind; forget those before the deque outgrows the keys.
                self._forget_keys(now)
        offset = self.next_offset
        self.next_offset = offset + 1
        self._last_timestamp = now
        body = codec.message_body(self._prefix, offset, now, key, value)
        record = Record(offset, now, key, len(value) + (len(key) if key else 0),
                        codec.frame(body))
        if key and window:
            self._keys[key] = (now, offset)
            self._key_order.append((now, key))
        return record, offset

    def _stored(self, records: List[Record]) -> None:
        log = self._log
        if self.retention_ttl:
            for record in records:
                log.append(record)
        for subscriber in list(self.subscribers):
            d = maybeDeferred(subscriber.deliver, records)
            d.addErrback(self._deliveryFailed, subscriber)
        # Trim after the fan-out: a subscriber present at publish gets the
        # message even when it is too big to be retained.
        if self.max_retained_bytes and log.nbytes > self.max_retained_bytes:
            log.trim(self.max_retained_bytes)

    def _deliveryFailed(self, failure, subscriber: ISubscriber) -> None:
        _log.failure("Delivery on {topic} failed; dropping subscriber {subscriber}",
                     failure, topic=self.name, subscriber=subscriber)
        self.unsubscribe(subscriber)

    # -- retention and compaction housekeeping ---------------------------------

    def expire(self) -> int:
        """
        Drop what retention no longer keeps and forget compaction keys whose
        window has passed.  Returns the number of messages expired.
        """
        now = self.now()
        self._forget_keys(now)
        if not self.retention_ttl:
            return 0
        return self._log.expire(now - self.retention_ttl)

    def _forget_keys(self, now: int) -> None:
        order = self._key_order
        keys = self._keys
        cutoff = now - self.compaction_window
        while order and order[0][0] <= cutoff:
            timestamp, key = order.popleft()
            seen = keys.get(key)
            if seen is not None and seen[0] == timestamp:
                del keys[key]

    @property
    def retained(self) -> int:
        """The number of messages retained (as of the last expiry)."""
        return len(self._log)

    @property
    def retained_bytes(self) -> int:
        return self._log.nbytes

    # -- subscribing -------------------------------------------------------------

    def oldest_offset(self) -> int:
        """The offset of the oldest retained message, or the next one if none is."""
        first = self._log.first_offset()
        return self.next_offset if first is None else first

    def start_offset(self, start: Start, offset: int = 0, committed: Optional[int] = None) -> int:
        """
        The offset at which a subscription with C{start} begins (see the
        protocol's table).  C{committed} is the subscriber's committed offset
        on this topic, if it has one.
        """
        self.expire()
        oldest = self.oldest_offset()
        if start == Start.LATEST:
            return self.next_offset
        if start == Start.OFFSET:
            wanted = offset
        elif start == Start.DEFAULT and committed is not None:
            wanted = committed + 1
        else:
            return oldest
        return min(max(wanted, oldest), self.next_offset)

    def subscribe(self, subscriber: ISubscriber, first: int) -> List[Record]:
        """
        Add C{subscriber} and return the retained records from offset
        C{first} on, which it must be sent before anything delivered later.
        """
        self.subscribers.append(subscriber)
        return self._log.since(first) if first < self.next_offset else []

    def unsubscribe(self, subscriber: ISubscriber) -> None:
        try:
            self.subscribers.remove(subscriber)
        except ValueError:
            pass

    def info(self) -> codec.TopicInfo:
        self.expire()
        return codec.TopicInfo(self.name, self.retention_ttl, self.compaction_window,
                               self.next_offset, self.retained, len(self.subscribers))
