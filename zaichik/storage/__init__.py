"""
Where a topic's retained messages and the broker's durable state live.

Two interfaces form the seam: L{IMessageLog} holds one topic's retained
messages in offset order; L{IStorage} creates those logs, remembers topics and
their settings, and keeps durable clients' committed offsets.  The topic code
only talks to these interfaces.  This module has the in-memory
implementations; an on-disk one is another implementation of the same two.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Optional, Tuple

from zope.interface import Attribute, Interface, implementer

from zaichik import codec


class IMessageLog(Interface):
    """
    The retained messages of one topic, oldest first, with contiguous
    offsets.  A message is kept as its encoded MESSAGE frame (length prefix
    included): the bytes every subscriber is sent.
    """

    nbytes = Attribute("Sum of the retained frames' sizes, in bytes.")

    def __len__() -> int:
        """The number of retained messages."""

    def first_offset() -> Optional[int]:
        """The offset of the oldest retained message, or None when empty."""

    def append(offset: int, timestamp: int, frame: bytes) -> None:
        """Retain a message whose offset follows the newest one's."""

    def expire(cutoff: int) -> int:
        """
        Drop messages whose timestamp is at or before C{cutoff}
        (milliseconds).  Returns how many were dropped.
        """

    def trim(max_bytes: int) -> int:
        """
        Drop the oldest messages until C{nbytes} is at most C{max_bytes}.
        Returns how many were dropped.
        """

    def record(offset: int, timestamp: int, frame: bytes) -> None:
        """
        A stored message that is not retained (the topic's retention is 0):
        a durable log keeps it for the offsets and compaction state; an
        in-memory one has nothing to do.
        """

    def read(offset: int, limit: int) -> Tuple[int, List[bytes]]:
        """
        Up to C{limit} frames from C{offset} on (from the oldest retained one
        if C{offset} is older), and the offset of the first of them.
        """


class TopicState:
    """
    What storage remembers of a topic, to rebuild it at start.

    @ivar keys: C{(key, timestamp, offset)} of the keyed messages still
        inside the compaction window, oldest first.
    """

    def __init__(self, name: str, retention_ttl: int, compaction_window: int, next_offset: int,
                 last_timestamp: int = 0, keys: Optional[List[Tuple[bytes, int, int]]] = None) -> None:
        self.name = name
        self.retention_ttl = retention_ttl
        self.compaction_window = compaction_window
        self.next_offset = next_offset
        self.last_timestamp = last_timestamp
        self.keys = keys or []


class IStorage(Interface):
    """
    The broker's state that outlives a topic's memory: topics and their
    settings, their logs, and durable clients' committed offsets.
    """

    def topics() -> Iterator[TopicState]:
        """The known topics, for the broker to rebuild them at start."""

    def open_log(name: str, retention_ttl: int, compaction_window: int) -> IMessageLog:
        """Record a new topic (or reopen a known one) and return its log."""

    def commits() -> Dict[str, Dict[str, int]]:
        """Committed offsets, C{{client_id: {topic: offset}}}."""

    def record_commit(client_id: str, topic: str, offset: int) -> None:
        """Remember that durable C{client_id} committed C{offset} on C{topic}."""


@implementer(IMessageLog)
class MemoryLog:
    """
    A list of frames with a moving head: O(1) append, amortised O(1) removal
    of the oldest message, O(1) lookup by offset.  Offsets and timestamps are
    not stored twice: the offset is the position, the timestamp is read from
    the frame (C{timestamp_at} is its position there), so a retained message
    costs its frame and a list slot.
    """

    _COMPACT_AT = 4096

    def __init__(self, timestamp_at: int) -> None:
        self._frames: List[bytes] = []
        self._head = 0
        self._first = 0  # the offset of self._frames[self._head]
        self._timestamp = struct.Struct(">Q")
        self._timestamp_at = timestamp_at
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._frames) - self._head

    def first_offset(self) -> Optional[int]:
        return self._first if self._head < len(self._frames) else None

    def append(self, offset: int, timestamp: int, frame: bytes) -> None:
        if self._head == len(self._frames):
            self._first = offset
        self._frames.append(frame)
        self.nbytes += len(frame)

    def record(self, offset: int, timestamp: int, frame: bytes) -> None:
        pass

    def _drop(self, count: int) -> None:
        frames = self._frames
        head = self._head
        self.nbytes -= sum(map(len, frames[head : head + count]))
        self._head = head + count
        self._first += count
        if self._head == len(frames):
            self._frames = []
            self._head = 0
        elif self._head >= self._COMPACT_AT and self._head * 2 >= len(frames):
            del frames[: self._head]
            self._head = 0

    def expire(self, cutoff: int) -> int:
        frames = self._frames
        unpack = self._timestamp.unpack_from
        at = self._timestamp_at
        end = self._head
        # Timestamps only grow along the log: find the first one kept.
        while end < len(frames) and unpack(frames[end], at)[0] <= cutoff:
            end += 1
        count = end - self._head
        if count:
            self._drop(count)
        return count

    def trim(self, max_bytes: int) -> int:
        frames = self._frames
        excess = self.nbytes - max_bytes
        end = self._head
        while excess > 0 and end < len(frames):
            excess -= len(frames[end])
            end += 1
        count = end - self._head
        if count:
            self._drop(count)
        return count

    def read(self, offset: int, limit: int) -> Tuple[int, List[bytes]]:
        first = max(offset, self._first)
        start = self._head + (first - self._first)
        if self._head == len(self._frames) or start >= len(self._frames):
            return first, []
        return first, self._frames[start : start + limit]


@implementer(IStorage)
class MemoryStorage:
    """Keeps everything in memory: nothing survives the process."""

    def __init__(self) -> None:
        self._commits: Dict[str, Dict[str, int]] = {}

    def topics(self) -> Iterator[TopicState]:
        return iter(())

    def open_log(self, name: str, retention_ttl: int, compaction_window: int) -> MemoryLog:
        return MemoryLog(codec.message_frame_offsets(name)[1])

    def commits(self) -> Dict[str, Dict[str, int]]:
        return self._commits

    def record_commit(self, client_id: str, topic: str, offset: int) -> None:
        self._commits.setdefault(client_id, {})[topic] = offset
