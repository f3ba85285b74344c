"""
Where a topic's retained messages and the broker's durable state live.

Two interfaces form the seam: L{IMessageLog} holds one topic's retained
records in offset order; L{IStorage} creates those logs, remembers topics and
their settings, and keeps durable clients' committed offsets.  The topic code
only talks to these interfaces.  This module has the in-memory
implementations; an on-disk one is another implementation of the same two.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

from zope.interface import Attribute, Interface, implementer


class Record:
    """
    One stored message.

    The MESSAGE frame (length prefix included) is encoded once, when the
    message is stored, and the same bytes go to every subscriber.

    @ivar expired: set when retention removes the record, so that a
        subscriber that queued it behind its C{max_inflight} window skips it.
    """

    __slots__ = ("offset", "timestamp", "key", "size", "frame", "expired")

    def __init__(self, offset: int, timestamp: int, key: Optional[bytes], size: int, frame: bytes) -> None:
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.size = size
        self.frame = frame
        self.expired = False

    def __repr__(self) -> str:
        return f"<Record offset={self.offset} timestamp={self.timestamp} key={self.key!r}>"


class IMessageLog(Interface):
    """
    The retained records of one topic, oldest first, with contiguous offsets.
    """

    nbytes = Attribute("Sum of the retained records' key and value sizes.")

    def __len__() -> int:
        """The number of retained records."""

    def first_offset() -> Optional[int]:
        """The offset of the oldest retained record, or None when empty."""

    def append(record: Record) -> None:
        """Retain C{record}, whose offset follows the newest one's."""

    def expire(cutoff: int) -> int:
        """
        Drop records whose timestamp is at or before C{cutoff} (milliseconds),
        marking each as expired.  Returns how many were dropped.
        """

    def trim(max_bytes: int) -> int:
        """
        Drop the oldest records until C{nbytes} is at most C{max_bytes},
        marking each as expired.  Returns how many were dropped.
        """

    def since(offset: int) -> List[Record]:
        """The retained records with an offset at or after C{offset}."""


class IStorage(Interface):
    """
    The broker's state that outlives a topic's memory: topics and their
    settings, their logs, and durable clients' committed offsets.
    """

    def topics() -> Iterator[Tuple[str, int, int, int]]:
        """
        The known topics, as C{(name, retention_ttl, compaction_window,
        next_offset)}, for the broker to rebuild its topics at start.
        """

    def open_log(name: str, retention_ttl: int, compaction_window: int) -> IMessageLog:
        """Record a new topic (or reopen a known one) and return its log."""

    def commits() -> Dict[str, Dict[str, int]]:
        """Committed offsets, C{{client_id: {topic: offset}}}."""

    def record_commit(client_id: str, topic: str, offset: int) -> None:
        """Remember that durable C{client_id} committed C{offset} on C{topic}."""


@implementer(IMessageLog)
class MemoryLog:
    """
    A list with a moving head: O(1) append, amortised O(1) removal of the
    oldest record, and O(1) lookup by offset (offsets are contiguous).
    """

    _COMPACT_AT = 4096

    def __init__(self) -> None:
        self._records: List[Record] = []
        self._head = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._records) - self._head

    def first_offset(self) -> Optional[int]:
        if self._head < len(self._records):
            return self._records[self._head].offset
        return None

    def append(self, record: Record) -> None:
        self._records.append(record)
        self.nbytes += record.size

    def _drop_oldest(self) -> None:
        record = self._records[self._head]
        record.expired = True
        self.nbytes -= record.size
        self._records[self._head] = None  # type: ignore[call-overload]
        self._head += 1

    def _compact(self) -> None:
        if self._head == len(self._records):
            self._records = []
            self._head = 0
        elif self._head >= self._COMPACT_AT and self._head * 2 >= len(self._records):
            del self._records[: self._head]
            self._head = 0

    def expire(self, cutoff: int) -> int:
        records = self._records
        start = self._head
        while self._head < len(records) and records[self._head].timestamp <= cutoff:
            self._drop_oldest()
        dropped = self._head - start
        if dropped:
            self._compact()
        return dropped

    def trim(self, max_bytes: int) -> int:
        start = self._head
        while self.nbytes > max_bytes and self._head < len(self._records):
            self._drop_oldest()
        dropped = self._head - start
        if dropped:
            self._compact()
        return dropped

    def since(self, offset: int) -> List[Record]:
        first = self.first_offset()
        if first is None:
            return []
        index = self._head + max(0, offset - first)
        return self._records[index:]


@implementer(IStorage)
class MemoryStorage:
    """Keeps everything in memory: nothing survives the process."""

    def __init__(self) -> None:
        self._commits: Dict[str, Dict[str, int]] = {}

    def topics(self) -> Iterator[Tuple[str, int, int, int]]:
        return iter(())

    def open_log(self, name: str, retention_ttl: int, compaction_window: int) -> MemoryLog:
        return MemoryLog()

    def commits(self) -> Dict[str, Dict[str, int]]:
        return self._commits

    def record_commit(self, client_id: str, topic: str, offset: int) -> None:
        self._commits.setdefault(client_id, {})[topic] = offset
