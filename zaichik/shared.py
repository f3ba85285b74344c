"""
A topic that several brokers share through an engine (Redis: see
L{zaichik.storage.redis}).

The rules are L{zaichik.topic.Topic}'s; what changes is who decides.  Here
the engine assigns offsets and timestamps and answers duplicates, so a
publish is staged without an offset and its reply is made once the
engine has answered (a L{Late} reply); and messages are delivered in offset
order as the engine tells of them, whichever broker published them (this
one included), never straight from the publish.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Iterable, List, Optional, Sequence, Tuple

from twisted.logger import Logger

from zaichik import codec
from zaichik.codec import ErrorCode
from zaichik.errors import ZaichikError
from zaichik.storage import ISharedLog, StorageError
from zaichik.topic import Topic
from zaichik.work import Late, Pending

_log = Logger()

_key_of, _value_of = itemgetter(0), itemgetter(1)  # of a (key, value) entry


class _Staged:
    """One unit of work's publishes to a shared topic, and (once answered) their results."""

    __slots__ = ("entries", "results", "pending", "silent")

    def __init__(self) -> None:
        self.silent: Optional[Late] = None
        self.entries: List[Tuple[Optional[bytes], bytes]] = []
        self.results: Sequence[Tuple[int, bool]] = []
        self.pending = Pending()


class SharedTopic(Topic):
    """
    A L{Topic} whose log (an engine's) decides offsets.  C{next_offset} is
    one past the newest offset this broker knows to be taken: told by the
    engine, or given to one of its own publishes.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._log: ISharedLog = ISharedLog(self._log)
        self._staged: Optional[_Staged] = None
        self._log.follower = self._arrived
        # Follow messages' contents only while someone here reads them.
        self._log.wanted = False

    # What this broker knows to be taken: given to its publishes, or told by
    # the engine (which follows a topic nobody here reads by offsets only,
    # without calling _arrived).
    _next = 0

    @property  # type: ignore[override]
    def next_offset(self) -> int:
        end = self._log.end
        return end if end > self._next else self._next

    @next_offset.setter
    def next_offset(self, value: int) -> None:
        self._next = value

    # -- publishing ---------------------------------------------------------------

    def _check(self, key: Optional[bytes], value: bytes) -> None:
        """Refuse (LIMIT) a key over --max-key-size, or a message whose MESSAGE frame would not fit."""
        size = len(self._prefix) + 22 + len(value)
        if key:
            if len(key) > self.keys.max_key_size:
                raise self._key_too_long(len(key))
            size += len(key)
        if size > self.max_frame_size:
            raise self._too_large(size)

    def _stage(self, entries: List[Tuple[Optional[bytes], bytes]]) -> Tuple[_Staged, int]:
        # The largest key and value, checked together (no Python code per
        # entry); one by one, for the refusal's words, only if they break a limit.
        longest_key = max(map(len, filter(None, map(_key_of, entries))), default=0)
        if (longest_key > self.keys.max_key_size or len(self._prefix) + 22 + longest_key
                + max(map(len, map(_value_of, entries)), default=0) > self.max_frame_size):
            for key, value in entries:
                self._check(key, value)
        staged = self._staged
        if staged is None:
            staged = self._staged = _Staged()
            self.pending = staged.pending
        at = len(staged.entries)
        staged.entries.extend(entries)
        self._stored()
        return staged, at

    answers_late = True

    def published(self, rid: int, key: Optional[bytes], value: bytes) -> Late:
        # (The hot path of a shared topic: one message, staged without
        # _stage's list and loop.)
        self._check(key, value)
        staged = self._staged
        if staged is None:
            staged = self._staged = _Staged()
            self.pending = staged.pending
        entries = staged.entries
        at = len(entries)
        entries.append((key, value))
        if not self._dirty:
            self._stored()  # (outside a unit of work, this sends it at once)
        if not rid:
            # Fire-and-forget: its reply is only ever sent as a failure, so
            # one serves every such publish of the unit.
            silent = staged.silent
            if silent is None:
                silent = staged.silent = Late(0, lambda: codec.Published(0, *staged.results[0]))
            return silent
        return Late(rid, lambda: codec.Published(rid, *staged.results[at]))

    def published_batch(self, rid: int, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> Late:
        entries = list(entries)
        staged, at = self._stage(entries)
        end = at + len(entries)
        return Late(rid, lambda: codec.PublishedBatch(rid, list(staged.results[at:end])))

    def publish_all(self, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> None:
        """
        Fire-and-forget publishes, staged together (refused whole if one
        breaks a limit, before any is staged); the engine decides their
        offsets, and only a failure is told.
        """
        self._stage(list(entries))

    def publish(self, key: Optional[bytes], value: bytes) -> Tuple[int, bool]:
        raise ZaichikError(ErrorCode.INTERNAL, "a shared topic answers publishes with published()")

    publish_many = publish  # type: ignore[assignment]

    def commit(self) -> None:
        """The end of a unit of work: send what was staged to the engine in one script."""
        self._dirty = False
        staged, self._staged = self._staged, None
        if staged is None:
            return
        self._appending += 1
        self._log.publish(staged.entries).addCallbacks(
            self._answered, self._refused, (staged,), {}, (staged,))

    def _answered(self, reply, staged: _Staged) -> None:
        self._appending -= 1
        first, _, results, count = reply
        staged.results = results
        self.duplicates += len(results) - count
        if count and first + count > self.next_offset:
            self.next_offset = first + count
        staged.pending.settle()

    def _refused(self, failure, staged: _Staged) -> None:
        self._appending -= 1
        if failure.check(StorageError):
            error = failure.value
            _log.error("Could not store {count} messages on {topic}: {error}",
                       count=len(staged.entries), topic=self.name, error=error.message)
        else:
            _log.failure("Publishing to {topic} failed", failure, topic=self.name)
            error = StorageError("storage failed")
        self.store_errors += 1
        staged.pending.settle(error)

    # -- delivery -----------------------------------------------------------------

    def _arrived(self, first: int, frames: List[bytes]) -> None:
        """Stored messages, in offset order, told by the engine."""
        end = first + len(frames)
        if end > self.next_offset:
            self.next_offset = end
        self._stored_end = end
        self._last_timestamp = max(self._last_timestamp, self._log_timestamp(frames))
        self._deliver(first, frames)

    _ts_at = None

    def _log_timestamp(self, frames: List[bytes]) -> int:
        if self._ts_at is None:
            self._ts_at = codec.message_frame_offsets(self.name)[1]
        at = self._ts_at
        return int.from_bytes(frames[-1][at:at + 8], "big") if frames else 0

    def subscribe(self, subscriber) -> None:
        super().subscribe(subscriber)
        self._log.wanted = True
        self._count_subscribers()

    def unsubscribe(self, subscriber) -> None:
        before = len(self.subscribers)
        super().unsubscribe(subscriber)
        self._log.wanted = bool(self.subscribers)
        if not self.subscribers:
            self._log.forget_cache()
        if len(self.subscribers) != before:
            self._count_subscribers()

    def _count_subscribers(self) -> None:
        """Tell other brokers (TOPICS counts everyone's); a reply about this topic waits for it."""
        pending = Pending()
        if self.pending is None or self.pending.done:
            self.pending = pending
        self._log.count_subscribers(len(self.subscribers) + self.extra_subscribers).addCallbacks(
            lambda _: pending.settle(), lambda f: pending.settle(f.value if f.check(ZaichikError) else None))

    def heard(self) -> None:
        """The engine was read (describe, refresh): its next offset holds here too."""
        if self._log.stored > self.next_offset:
            self.next_offset = self._log.stored

    def info(self) -> codec.TopicInfo:
        self.heard()
        log = self._log
        return codec.TopicInfo(self.name, self.retention_ttl, self.compaction_window, self.next_offset,
                               len(log), len(self.subscribers) + self.extra_subscribers + log.elsewhere)

    def oldest_offset(self) -> int:
        first = self._log.first_offset()
        if first is not None:
            return first
        return self.next_offset

    def expire(self) -> int:
        now = self.now()
        if self.retention_ttl:
            self._log.expire(now - self.retention_ttl)
        return 0  # the engine expires (and counts) them
