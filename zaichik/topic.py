"""
A topic: an ordered log of messages with offsets, retention and compaction,
fanned out to its subscribers.

Everything here takes time from an injected clock (C{IReactorTime}), so tests
drive it with L{twisted.internet.task.Clock}.
"""

from __future__ import annotations

from collections import deque
from itertools import repeat
from operator import itemgetter
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.errors import ZaichikError
from zaichik.storage import IMessageLog, StorageError
from zaichik.work import Pending, UnitOfWork

_log = Logger()

# A compaction key's offset and timestamp share one int: timestamps (ms since
# the epoch) take the low 48 bits, which last until the year 10889.
_TIMESTAMP_BITS = 48
_TIMESTAMP = (1 << _TIMESTAMP_BITS) - 1

_key_of = itemgetter(0)  # of a (key, value) entry


class ISubscriber(Interface):
    """Something that receives a topic's messages."""

    def deliver(first_offset: int, frames: Sequence[bytes]) -> object:
        """
        New messages, as encoded MESSAGE frames with consecutive offsets from
        C{first_offset}: a list, or a L{codec.FrameBlock} (whose C{data} is
        them all, ready to write; see L{codec.joined}), which nothing changes
        afterwards (a subscriber may keep it).  May return a
        Deferred; a failure (raised or as a Deferred) removes the subscriber
        from the topic, and then L{stopped} is called.
        """

    def stopped(why: str) -> None:
        """The topic dropped this subscriber (its delivery failed): C{why}, for its owner."""


class KeyBudget:
    """
    Bounds on compaction keys, which a client could otherwise grow without
    end: per topic, for the whole broker (C{used} counts every topic's), and
    the size of one key.  Each is a C{twistd zaichik} option.
    """

    def __init__(self, per_topic: int = 1_000_000, total: int = 4_000_000, max_key_size: int = 1024) -> None:
        self.per_topic = per_topic
        self.total = total
        self.max_key_size = max_key_size
        self.used = 0


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
        work: Optional[UnitOfWork] = None,
        reject_over_bytes: bool = False,
        keys: Optional["KeyBudget"] = None,
        max_frame_size: int = 1 << 62,
    ) -> None:
        self.name = name
        self.retention_ttl = retention_ttl
        self.compaction_window = compaction_window
        self.max_retained_bytes = max_retained_bytes
        # With a byte bound: refuse what does not fit (True) or expire the
        # oldest to make room (False).
        self.reject_over_bytes = reject_over_bytes
        self.next_offset = next_offset
        self.subscribers: List[ISubscriber] = []
        # Subscribers not in that list: a consumer group is one subscriber
        # there however many members it has, and TOPICS counts members.
        self.extra_subscribers = 0
        self._log = log
        self._clock = clock
        self._work = work if work is not None else UnitOfWork(lambda: None)
        # Staged in the current unit of work and not yet appended to the
        # log: frames from offset self._unsent_first on, the keys they
        # added to the compaction state, and what waits on their append.
        self._unsent: List[bytes] = []
        self._unsent_first = 0
        # ... or, on a topic that retains nothing and whose log takes them
        # (codec.FrameBlock), as blocks of frames, C{_block_count} in all.
        self._blocks: List[bytes] = []
        self._block_count = 0
        self._takes_blocks = bool(getattr(log, "takes_blocks", False))
        # Can an append fail after the unit of work that made it (so that a
        # fire-and-forget publisher must watch it, to be told)?  Not in memory.
        self.fails_later = not getattr(log, "stores_at_once", False)
        self._unsent_keys: List[Tuple[bytes, int]] = []
        self.pending: Optional[Pending] = None  # the newest unsettled append
        self._appending = 0  # appends made and not yet settled
        self._stored_end = next_offset  # one past the newest message stored
        # Counters for the metrics endpoint (stored messages are
        # next_offset; retained ones are the log's).
        self.duplicates = 0
        self.expired = 0
        self.messages_out = 0
        self._prefix = codec.topic_prefix(name)
        self._last_timestamp = 0
        # Compaction: each key still inside its window -> its last stored
        # offset and timestamp, packed into one int (offset << 48 |
        # timestamp, see _remember_key): a tuple of two ints cost ~50 B more a key.
        self._keys: Dict[bytes, int] = {}
        # A MESSAGE frame's body is at most this (the peer's --max-frame-size).
        self.max_frame_size = max_frame_size
        # The bounds on keys (shared by every topic of a broker).
        self.keys = keys if keys is not None else KeyBudget()
        # The keys in the order they were stored (stale entries too), so that
        # the ones whose window has passed can be forgotten cheaply, with their
        # timestamps as runs: _key_times[i] for the next _key_counts[i] keys
        # (one run a millisecond rather than a (timestamp, key) tuple a key).
        self._key_order: Deque[bytes] = deque()
        self._key_times: Deque[int] = deque()
        self._key_counts: Deque[int] = deque()

    # -- backpressure (the "block" slow-consumer policy) ----------------------

    _blockers: Optional[set] = None

    @property
    def blocked(self) -> bool:
        """Does a subscriber that cannot keep up hold the publishers back?"""
        return bool(self._blockers)

    def block(self, subscriber: ISubscriber) -> None:
        if self._blockers is None:
            self._blockers = set()
            self._waiting: List[Deferred] = []
        self._blockers.add(subscriber)

    def unblock(self, subscriber: ISubscriber) -> None:
        if self._blockers:
            self._blockers.discard(subscriber)
            if not self._blockers:
                waiting, self._waiting = self._waiting, []
                for d in waiting:
                    d.callback(None)

    def when_unblocked(self) -> Deferred:
        """A Deferred that fires once no subscriber blocks the topic."""
        if not self.blocked:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def restore(self, last_timestamp: int, keys) -> None:
        """
        Take back the compaction state (and the last timestamp) a topic had
        before a restart: C{keys} are C{(key, timestamp, offset)}, oldest first.
        """
        self._last_timestamp = max(self._last_timestamp, last_timestamp)
        for key, timestamp, offset in keys:
            if key not in self._keys:
                self.keys.used += 1
            self._remember_key(key, timestamp, offset)

    def __repr__(self) -> str:
        return f"<Topic {self.name} next_offset={self.next_offset} retained={len(self._log)}>"

    # -- time -------------------------------------------------------------------

    def now(self) -> int:
        """
        The broker's wall-clock time in milliseconds, never earlier than the
        last stored message's (so timestamps do not go backwards in a topic
        when the system clock is stepped).  Rounded, not truncated: seconds
        since the epoch as a float carry errors well below a millisecond,
        which truncation would turn into a whole millisecond early.
        """
        work = self._work
        if work.depth:
            # One reading of the clock serves a whole unit of work (one read
            # from a connection: well under a millisecond of work).
            now = work.now
            if not now:
                now = work.now = round(self._clock.seconds() * 1000)
        else:
            now = round(self._clock.seconds() * 1000)
        return now if now > self._last_timestamp else self._last_timestamp

    # -- publishing -------------------------------------------------------------

    @property
    def retains(self) -> bool:
        """Does this topic keep messages after they are published?"""
        return self.retention_ttl > 0

    def publish(self, key: Optional[bytes], value: bytes) -> Tuple[int, bool]:
        """
        Store one message and deliver it.

        @return: C{(offset, duplicate)}: for a duplicate dropped by
            compaction, the offset of the stored message it duplicates.
        """
        now = self.now()
        if self.reject_over_bytes:
            self._check_room(now, [(key, value)])
        offset, duplicate = self._store(now, key, value)
        if not duplicate and not self._dirty:  # (the flag read here: a call a message saved)
            self._stored()
        return offset, duplicate

    # Its replies are made once the append is done (L{zaichik.work.Late}):
    # True for a topic whose engine assigns offsets (L{zaichik.shared}).
    answers_late = False

    def published(self, rid: int, key: Optional[bytes], value: bytes):
        """L{publish}, answered: the PUBLISHED reply for request C{rid}."""
        offset, duplicate = self.publish(key, value)
        return codec.Published(rid, offset, duplicate)

    def published_batch(self, rid: int, entries: Iterable[Tuple[Optional[bytes], bytes]]):
        """L{publish_many}, answered: the PUBLISHED_BATCH reply for request C{rid}."""
        first = self.next_offset
        results = self.publish_all(entries)
        return codec.PublishedBatch(rid, codec.OffsetRun(first, self.next_offset - first) if results is None
                                    else results)

    def publish_many(self, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> List[Tuple[int, bool]]:
        """
        Store several messages as if published one after the other, and
        deliver the stored ones to each subscriber in one call.  A batch
        that breaks a limit is refused whole, before anything is stored.

        @return: C{(offset, duplicate)} for each entry, as L{publish}'s.
        """
        first = self.next_offset
        results = self.publish_all(entries)
        return results if results is not None else list(zip(range(first, self.next_offset), repeat(False)))

    def publish_all(self, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> Optional[List[Tuple[int, bool]]]:
        """
        L{publish_many}, returning None rather than its results when every
        entry was stored in turn from the next offset on (no duplicate): a
        run of fire-and-forget publishes has no use for them, and making
        them cost as much as the rest of the batch (cProfile).
        """
        if type(entries) not in codec.ENTRIES:
            entries = list(entries)
        if self.stage_run(entries):  # type: ignore[arg-type]
            return None
        now = self.now()
        first = self.next_offset
        if type(entries) is not list:
            entries = list(entries)
        if self.reject_over_bytes:
            self._check_room(now, entries)
        frames = codec.plain_message_frames(self._prefix, first, now, entries, self.max_frame_size)
        if frames:
            # No key and no frame too large (as a run's or a batch's entries
            # almost always are): staged at once, in one call per topic.
            self._stage_frames(now, first, frames)
            self._stored()
            return None
        keyed = list(filter(None, map(_key_of, entries)))  # (no Python code per entry)
        if keyed:
            self._check_keys(now, keyed)
        results = None
        if keyed and self.compaction_window:
            overhead = len(self._prefix) + 22
            largest = max(len(value) + (len(key) if key else 0) for key, value in entries) + overhead
            if largest > self.max_frame_size:
                raise self._too_large(largest)
            store = self._store
            results = [store(now, key, value) for key, value in entries]
        else:
            # Nothing to look up per message (no compaction, keys checked
            # above): the frames in one call, which the accelerator makes in
            # C, checked against the frame size (refused before anything is
            # staged), and the bookkeeping once for the batch.
            first = self.next_offset
            frames = codec.message_frames(self._prefix, first, now, entries)
            largest = max(map(len, frames)) - 4
            if largest > self.max_frame_size:
                raise self._too_large(largest)
            self._stage_frames(now, first, frames)
        if self._unsent:
            self._stored()
        return results

    def _check_room(self, now: int, entries: List[Tuple[Optional[bytes], bytes]]) -> None:
        """
        Under the C{reject} policy, refuse (all of) C{entries} unless they fit
        in the retained-bytes bound once expired messages are gone.  Sizes
        are counted as if none were a duplicate.
        """
        if not (self.retention_ttl and self.max_retained_bytes):
            return
        overhead = len(self._prefix) + 26
        size = sum(overhead + len(value) + (len(key) if key else 0) for key, value in entries)
        size += self._staged_bytes  # staged in this unit, not in the log yet
        if self._log.nbytes + size > self.max_retained_bytes:
            self.expired += self._log.expire(now - self.retention_ttl)
            if self._log.nbytes + size > self.max_retained_bytes:
                raise ZaichikError(
                    ErrorCode.LIMIT,
                    f"topic {self.name} would retain more than {self.max_retained_bytes} bytes",
                )
        self._staged_bytes = size

    _staged_bytes = 0

    def _store(self, now: int, key: Optional[bytes], value: bytes) -> Tuple[int, bool]:
        window = self.compaction_window
        if key:
            # (Once per keyed message: one look-up of the key, the budget
            # read once.)
            budget = self.keys
            if len(key) > budget.max_key_size:
                raise self._key_too_long(len(key))
            if window:
                keys = self._keys
                if len(self._key_order) > 2 * len(keys) + 64:
                    # Keys stored again after their window leave stale entries
                    # behind; forget those before the deque outgrows the keys.
                    self._forget_keys(now)
                seen = keys.get(key)
                if seen is None:
                    if len(keys) >= budget.per_topic or budget.used >= budget.total:
                        self._make_room_for_keys(now, 1)
                    budget.used += 1
                elif now - (seen & _TIMESTAMP) < window:
                    self.duplicates += 1
                    return seen >> _TIMESTAMP_BITS, True
        if self._blocks:
            self._unblock()
        offset = self.next_offset
        frame = codec.message_frame(self._prefix, offset, now, key, value)
        if len(frame) - 4 > self.max_frame_size:
            raise self._too_large(len(frame) - 4)
        # Staged here rather than by _stage_frames: this runs once per message
        # published, where a call costs a tenth of the broker's time.
        self.next_offset = offset + 1
        self._last_timestamp = now
        if not self._unsent:
            self._unsent_first = offset
            self.pending = Pending()
        self._unsent.append(frame)
        if not self.retention_ttl:  # (see _stage_frames)
            self._work.staged += len(frame)
        if key and window:
            self._remember_key(key, now, offset)
            self._unsent_keys.append((key, offset))
        return offset, False

    def _remember_key(self, key: bytes, timestamp: int, offset: int) -> None:
        """C{key} was stored at C{offset} at C{timestamp} (not before the last key's)."""
        self._keys[key] = offset << _TIMESTAMP_BITS | timestamp
        self._key_order.append(key)
        times = self._key_times
        if times and times[-1] == timestamp:
            self._key_counts[-1] += 1
        else:
            times.append(timestamp)
            self._key_counts.append(1)

    def _stage_frames(self, now: int, first: int, frames: List[bytes]) -> None:
        """Stage C{frames}, stored at C{now} with offsets from C{first}, in the unit of work."""
        if self._blocks:
            self._unblock()
        self.next_offset = first + len(frames)
        self._last_timestamp = now
        if not self._unsent:
            self._unsent_first = first
            self.pending = Pending()
        self._unsent.extend(frames)
        if not self.retention_ttl:
            # (Only here: a subscriber of a topic that retains nothing is
            # the one a burst can overflow; one that retains has it read from
            # the log later.  Counting every frame cost a retaining topic 5%,
            # an estimate from the first and the last was found short.)
            self._work.staged += sum(map(len, frames))

    def stage_run(self, entries: Sequence[Tuple[Optional[bytes], bytes]]) -> bool:
        """
        Stage C{entries} (a list, or a run's Entries: see
        L{codec.parse_publish_run}) as one block of frames, if this topic
        keeps nothing for later readers, its log takes blocks (see
        L{codec.FrameBlock}) and none has a key or makes a frame too large;
        else stage nothing and return False (L{publish_all} then takes
        them).  In one call: a framer's run calls it for each topic of
        each read.
        """
        if self._unsent or self.retention_ttl or not self._takes_blocks:
            return False
        now = self.now()
        first = self.next_offset
        block = codec.plain_message_block(self._prefix, first, now, entries, self.max_frame_size)
        if block is None:
            return False
        count = len(entries)
        self.next_offset = first + count
        self._last_timestamp = now
        self._work.staged += len(block)
        if self._blocks:
            self._blocks.append(block)
            self._block_count += count
        else:
            self._blocks = [block]
            self._block_count = count
            self._unsent_first = first
            self.pending = Pending()
        if not self._dirty:
            self._stored()
        return True

    def _unblock(self) -> None:
        """The staged blocks as frames, for frames staged after them (keyed or refused as a block)."""
        self._unsent = codec.split_frames(b"".join(self._blocks))
        self._blocks = []
        self._block_count = 0

    _dirty = False

    def _stored(self) -> None:
        if not self._dirty:
            self._dirty = True
            work = self._work
            work.dirty(self)
            if not work.depth:
                work.flush()

    def waiting(self) -> Optional[Pending]:
        """What a reply about this topic's newest message must wait for: None if nothing."""
        pending = self.pending
        return pending if pending is not None and not pending.done else None

    def commit(self) -> None:
        """
        The end of a unit of work: append what was staged to the log; once
        stored, settle its L{Pending} (replies go out) and deliver it.
        """
        self._dirty = False
        frames: Sequence[bytes] = self._unsent
        blocks = self._blocks
        if blocks:
            frames = codec.FrameBlock(blocks, self._block_count)  # (joined only where needed)
            self._blocks = []
            self._block_count = 0
        elif not frames:
            return
        else:
            self._unsent = []
        self._staged_bytes = 0
        first = self._unsent_first
        keys, self._unsent_keys = self._unsent_keys, []
        pending = self.pending
        assert pending is not None  # (staged with the first frame)
        self._appending += 1
        if not self.fails_later:
            # In memory: stored when add returns (IMessageLog.append
            # without its Deferred, a fifth of a delivery's cost when each
            # read publishes to thousands of topics).
            self._log.add(first, frames)  # type: ignore[attr-defined]  # (stores_at_once: it has add)
            d = None
        else:
            d = self._log.append(first, frames)
        if d is None or d.called and d.result is None:
            # Stored already (in memory, or on disk without --fsync always):
            # straight on, without the callback machinery, which costs as
            # much as the delivery when each read publishes to many topics.
            try:
                self._appended(None, first, frames, pending)
            except Exception:  # (as the Deferred would have: the unit of work goes on)
                _log.failure("Delivering on {topic} failed", topic=self.name)
        else:
            d.addCallbacks(self._appended, self._appendFailed, (first, frames, pending), {},
                           (first, frames, pending, keys))

    def _appended(self, _, first: int, frames: Sequence[bytes], pending: Pending) -> None:
        self._appending -= 1
        self._given_again = None
        self._stored_end = first + len(frames)
        # Deliver, then settle: a connection whose reply waits on this
        # append queues its MESSAGE frames behind that reply (see Session),
        # and a CLOSE answered on settling still gets what it is owed.
        self._deliver(first, frames)
        pending.settle()
        # Trim after the fan-out: a subscriber present at publish gets the
        # message even when it is too big to be retained.
        log = self._log
        if self.max_retained_bytes and log.nbytes > self.max_retained_bytes:
            self.expired += log.trim(self.max_retained_bytes)

    def _deliver(self, first: int, frames: Sequence[bytes]) -> None:
        """
        Hand C{frames} to every subscriber.  A subscriber that raises, or
        returns a Deferred that fails, is dropped.  Called directly rather
        than through maybeDeferred: with many topics this runs once per
        topic per read, and a Deferred for each delivery (almost none of
        which answers later) cost more than the delivery itself.
        """
        for subscriber in list(self.subscribers):
            try:
                result = subscriber.deliver(first, frames)
            except Exception:
                self._deliveryFailed(Failure(), subscriber)
            else:
                if isinstance(result, Deferred):
                    result.addErrback(self._deliveryFailed, subscriber)

    def _appendFailed(self, failure, first: int, frames: Sequence[bytes], pending: Pending, keys) -> None:
        self._appending -= 1
        if failure.check(StorageError):
            error = failure.value
            _log.error("Could not store {count} messages on {topic}: {error}",
                       count=len(frames), topic=self.name, error=error.message)
        else:
            _log.failure("Appending to {topic} failed", failure, topic=self.name)
            error = StorageError("storage failed")
        self.store_errors += 1
        # Nothing of the append was kept or delivered: forget its keys, and
        # give its offsets again if nothing was staged after them.
        for key, offset in keys:
            seen = self._keys.get(key)
            if seen is not None and seen >> _TIMESTAMP_BITS == offset:
                del self._keys[key]
                self.keys.used -= 1
        # A storage that writes later (zaichik.storage.writer) fails every
        # append queued after a failed one: the offsets of all of them are
        # given again, from the first, once the last has failed.
        end = first + len(frames)
        given = first if self._given_again is None else min(first, self._given_again)
        if self.next_offset == end:
            self.next_offset = given
            self._given_again = None
        elif self._appending:
            self._given_again = given
        pending.settle(error)

    _given_again: Optional[int] = None  # the first offset of failed appends whose later ones are still out

    store_errors = 0

    def _deliveryFailed(self, failure, subscriber: ISubscriber) -> None:
        _log.failure("Delivery on {topic} failed; dropping subscriber {subscriber}",
                     failure, topic=self.name, subscriber=subscriber)
        self.unsubscribe(subscriber)
        stopped = getattr(subscriber, "stopped", None)  # (an ISubscriber written before stopped())
        if stopped is not None:
            stopped("delivery failed")

    # -- retention and compaction housekeeping ---------------------------------

    def expire(self) -> int:
        """
        Drop what retention no longer keeps and forget compaction keys whose
        window has passed.  Returns the number of messages expired.
        """
        now = self.now()
        self._forget_keys(now)
        expired = self._log.expire(now - self.retention_ttl)
        if self.max_retained_bytes and self._log.nbytes > self.max_retained_bytes:
            expired += self._log.trim(self.max_retained_bytes)
        self.expired += expired
        return expired

    def _forget_keys(self, now: int) -> None:
        order, times, counts = self._key_order, self._key_times, self._key_counts
        keys = self._keys
        cutoff = now - self.compaction_window
        before = len(keys)
        while times and times[0] <= cutoff:
            timestamp = times.popleft()
            for _ in range(counts.popleft()):
                key = order.popleft()
                seen = keys.get(key)
                # (Unless stored again since, at a later timestamp.)
                if seen is not None and seen & _TIMESTAMP == timestamp:
                    del keys[key]
        self.keys.used -= before - len(keys)

    def _key_too_long(self, size: int) -> ZaichikError:
        return ZaichikError(ErrorCode.LIMIT, f"a key of {size} bytes is over the limit of "
                                             f"{self.keys.max_key_size} (--max-key-size)")

    def _too_large(self, size: int) -> ZaichikError:
        return ZaichikError(ErrorCode.LIMIT, f"as a MESSAGE this would be {size} bytes, over the max frame "
                                             f"size of {self.max_frame_size}: subscribers could not take it")

    def _check_keys(self, now: int, keyed: List[bytes]) -> None:
        """Refuse (with LIMIT) keys over --max-key-size, or new keys the bounds have no room for."""
        budget = self.keys
        longest = max(map(len, keyed))
        if longest > budget.max_key_size:
            raise self._key_too_long(longest)
        if self.compaction_window:
            new = len(set(keyed).difference(self._keys))
            if new and (len(self._keys) + new > budget.per_topic or budget.used + new > budget.total):
                self._make_room_for_keys(now, new)

    def _make_room_for_keys(self, now: int, new: int) -> None:
        """
        Forget the keys whose window has passed; if that leaves no room for
        C{new} more, refuse with LIMIT (forgetting a live key early would
        break first-wins).
        """
        self._forget_keys(now)
        budget = self.keys
        if len(self._keys) + new > budget.per_topic:
            raise ZaichikError(ErrorCode.LIMIT, f"topic {self.name} holds {len(self._keys)} compaction keys, "
                                                f"the limit (--max-compaction-keys)")
        if budget.used + new > budget.total:
            raise ZaichikError(ErrorCode.LIMIT, f"the broker holds {budget.used} compaction keys, the limit "
                                                f"(--max-compaction-keys-total)")

    @property
    def retained(self) -> int:
        """The number of messages retained (as of the last expiry)."""
        return len(self._log)

    @property
    def retained_bytes(self) -> int:
        return self._log.nbytes

    # -- subscribing -------------------------------------------------------------

    def oldest_offset(self) -> int:
        """
        The offset of the oldest retained message or, if none is, of the
        next one to be stored (staged ones included).
        """
        first = self._log.first_offset()
        if first is not None:
            return first
        return self._stored_end if self.retention_ttl else self.next_offset

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

    def subscribe(self, subscriber: ISubscriber) -> None:
        """
        Add C{subscriber}: from now on it is given every message stored.
        What it should get of the retained messages, it reads with L{read}.
        """
        self.subscribers.append(subscriber)

    def read(self, offset: int, limit: int) -> Deferred:
        """
        Up to C{limit} retained frames from C{offset} on (from the oldest
        retained one when C{offset} has expired): fires with
        C{(first, frames)} (see L{IMessageLog.read}).
        """
        self.expire()
        return self._log.read(offset, limit)

    def unsubscribe(self, subscriber: ISubscriber) -> None:
        try:
            self.subscribers.remove(subscriber)
        except ValueError:
            pass
        self.unblock(subscriber)

    def heard(self) -> None:
        """What other brokers did was read from a shared engine (nothing to do for a topic of one broker)."""

    def info(self) -> codec.TopicInfo:
        self.expire()
        return codec.TopicInfo(self.name, self.retention_ttl, self.compaction_window,
                               self.next_offset, self.retained, len(self.subscribers) + self.extra_subscribers)
