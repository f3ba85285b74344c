"""
Where a topic's messages and the broker's durable state live: the storage
contract.

Two interfaces form the seam.  L{IMessageLog} holds one topic's messages by
offset; L{IStorage} creates those logs, remembers topics and their settings,
keeps durable clients' committed offsets and consumer groups' positions,
and makes what was written durable.
The service and the topics talk to nothing else: the backends (L{memory},
L{disk}, and a networked one later) are interchangeable, and one contract
test suite (C{tests/test_storage_contract.py}) runs against each.

Whatever may wait returns a L{Deferred}: appending (it may have to reach a
disk or a server), reading a range (it may come from disk), syncing and
closing.  A backend that has the answer at once returns a fired Deferred.

Offsets are the topic's: the topic assigns them, and hands the log runs of
consecutive offsets.  A log is indexed by offset, never by position, and may
have gaps (a damaged range skipped on disk, a run whose append failed):
L{IMessageLog.read} says where what it returns begins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from zope.interface import Attribute, Interface

from zaichik.codec import ErrorCode
from zaichik.errors import ZaichikError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class StorageError(ZaichikError):
    """
    Storage could not take a write (a full disk, an I/O error).  The
    request that wrote is answered with C{ERROR(LIMIT)} when the storage is
    out of space and C{ERROR(INTERNAL)} for any other failure; nothing of
    the failed append is kept or delivered, and its offsets are not reused
    by a different message after a crash.
    """

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(ErrorCode.LIMIT if full else ErrorCode.INTERNAL, message)
        self.full = full


class IMessageLog(Interface):
    """
    One topic's messages.  A message is kept and served as its encoded
    MESSAGE frame (length prefix included): the bytes every subscriber is
    sent.  How a backend stores it is its own affair.
    """

    nbytes = Attribute("Sum of the retained messages' frame sizes, in bytes.")

    def __len__() -> int:
        """The number of retained messages."""

    def first_offset() -> Optional[int]:
        """The offset of the oldest retained message, or None when none is."""

    def append(first: int, frames: Sequence[bytes]) -> "Deferred":
        """
        Store C{frames}, whose offsets run from C{first} on, after every
        message stored so far.  C{frames} is a list, unless the log has a
        true C{takes_blocks} attribute: then a topic that retains nothing
        may give a L{zaichik.codec.FrameBlock} (its fire-and-forget runs).  The Deferred fires (with None) once they are
        stored as the storage's durability policy promises, and only then
        may they be delivered or acknowledged; it fails with
        L{StorageError} if they could not be stored, and then nothing of
        them is kept.  Appends complete in the order they were made.  A log
        whose appends cannot fail, and have fired when append returns (in
        memory), says so with a true C{stores_at_once} attribute, and has
        C{add(first, frames)}, the same as append without the Deferred: the
        publishers of its topic then watch no append for a failure.
        """

    def read(offset: int, limit: int) -> "Deferred":
        """
        Up to C{limit} retained frames with consecutive offsets, from
        C{offset} on (from the oldest retained one if C{offset} is older, or
        from the next one after a gap): fires with C{(first, frames)}, the
        offset of the first frame and the frames, C{frames} empty when
        nothing from C{offset} on is stored and durable yet.
        """

    def expire(cutoff: int) -> int:
        """
        Stop retaining messages whose timestamp (ms) is at or before
        C{cutoff}.  Returns how many were dropped.
        """

    def trim(max_bytes: int) -> int:
        """
        Drop the oldest retained messages until C{nbytes} is at most
        C{max_bytes}.  Returns how many were dropped.
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
        # A topic another broker has just made (shared engines): wildcard
        # subscriptions here follow it from its first message.
        self.young = False

    def __repr__(self) -> str:
        return (f"<TopicState {self.name} next_offset={self.next_offset} "
                f"retention={self.retention_ttl} window={self.compaction_window}>")


class IStorage(Interface):
    """
    The broker's state that outlives a topic's memory: topics and their
    settings, their logs, durable clients' committed offsets and consumer
    groups' positions.

    Its life: L{open} (from the service's C{startService}), then any number
    of units of work, each ended by L{sync}; then L{close}.
    """

    damaged = Attribute("Damaged ranges found and skipped so far (a count, for metrics).")
    torn = Attribute("Writes found torn by a crash at start (a count, for metrics).")
    cache_bytes = Attribute("Bytes of messages held in memory as a cache (0 where all is in memory).")

    def open() -> "Deferred":
        """
        Take the storage for this broker (lock it, recover what a crash
        left, start any timers of its own) and fire with the known topics
        as a list of L{TopicState}.
        """

    def open_log(name: str, retention_ttl: int, compaction_window: int) -> IMessageLog:
        """
        Record a new topic (or reopen a known one) and return its log.
        Does not wait: a backend that must reach a server does it with the
        log's first append.  Raises L{StorageError} if the topic cannot be
        recorded.
        """

    def commits() -> Dict[str, Dict[str, int]]:
        """Committed offsets, C{{client_id: {topic: offset}}}."""

    def record_commit(client_id: str, topic: str, offset: int) -> "Deferred":
        """
        Remember that durable C{client_id} committed C{offset} on C{topic};
        fires once that is as durable as the policy promises.
        """

    def group_positions() -> Dict[str, Dict[str, int]]:
        """
        Consumer groups' positions (protocol 1.1), C{{topic: {group: offset}}}:
        the lowest offset each group has not acknowledged.  Kept apart from
        L{commits}, so that no client_id can ever name a group's position.
        """

    def record_group_position(topic: str, group: str, offset: int) -> "Deferred":
        """
        Remember that C{group} of C{topic} is at C{offset}; fires once that
        is as durable as the policy promises.  Groups are never forgotten.
        """

    def last_commit_times() -> Dict[str, int]:
        """When each durable client last committed (ms), as far as storage knows."""

    def forget_client(client_id: str) -> None:
        """Forget every position of C{client_id} (unused for --durable-ttl); durable with the next sync."""

    def sync() -> None:
        """
        The end of a unit of work: what was appended or committed in it may
        now be made durable together (one fsync for many writes).  The
        Deferreds of those appends and commits fire when that is done.
        """

    def close() -> "Deferred":
        """Make everything durable, stop timers and release the storage."""


class ISharedLog(IMessageLog):
    """
    A topic's log that several brokers share: it assigns offsets and
    timestamps and answers duplicates itself (L{publish}), and tells its
    C{follower} of every stored message in offset order, whoever stored it.
    """

    follower = Attribute("Called with (first, frames) for stored messages, in offset order.")
    wanted = Attribute("Whether the follower needs the messages' contents (it has subscribers).")
    stored = Attribute("One past the newest offset the engine had, as last read (describe).")
    end = Attribute("One past the newest offset this broker was told of, in order.")
    elsewhere = Attribute("Subscribers on other brokers, as last read (describe).")

    def forget_cache() -> None:
        """No subscriber on this broker reads the topic any more: drop what is cached for them."""

    def count_subscribers(count: int) -> "Deferred":
        """This broker now has C{count} subscribers: tell the others; fires once they can see it."""

    def publish(entries: List[Tuple[Optional[bytes], bytes]]) -> "Deferred":
        """
        Store C{entries} in order; fires with C{(first, timestamp, results,
        count)}, C{results} a C{(offset, duplicate)} per entry and C{count}
        the number stored (consecutive from C{first}), or fails with
        L{StorageError}.
        """


class IEngineEvents(Interface):
    """What a shared engine tells the broker service about other brokers' doings."""

    def topic_appeared(state: TopicState) -> None:
        """Another broker made a topic (or this one learnt of it late)."""

    def client_claimed(client_id: str, generation: int) -> None:
        """A broker took durable C{client_id} over with C{generation}: close older sessions."""

    def resynced() -> None:
        """
        The engine's notifications came back after a loss: what was said
        meanwhile (takeovers, new topics) must be read again.
        """


class ISharedStorage(IStorage):
    """Storage that several brokers share (the Redis engine)."""

    offset_resets = Attribute("Topics found lost or gone back in the engine (a count, for metrics).")
    resyncs = Attribute("Times the engine's notifications came back after a loss (a count, for metrics).")

    def sweep() -> "Deferred":
        """Housekeeping each sweep: retention in the engine, and a check that nothing was missed."""

    def lease_group(topic: str, group: str) -> "Deferred":
        """
        Serve consumer group C{group} of C{topic} on this broker: fires with
        True (its recorded position is then in L{IStorage.group_positions}),
        or False if another broker serves it.
        """

    def renew_groups(groups: List[Tuple[str, str]]) -> None:
        """Keep serving these C{(topic, group)}s (each sweep)."""

    def generation(client_id: str) -> "Deferred":
        """Fires with the newest takeover generation of C{client_id} (0 if none)."""

    def names() -> "Deferred":
        """Fires with the names of every topic, made by any broker."""

    def lookup(name: str) -> "Deferred":
        """
        A topic this broker does not know yet: fires with its L{TopicState}
        if another broker made it (its log is opened), else None.
        """

    def refresh(name: str) -> "Deferred":
        """Bring what the log of known topic C{name} knows of its next offset (C{stored}) up to date."""

    def describe(names: List[str]) -> "Deferred":
        """
        Bring what the logs of topics C{names} know up to date from the
        engine (next offset, retained, subscribers on other brokers), for a
        TOPICS reply.
        """

    def watch(events: IEngineEvents) -> None:
        """Tell C{events} what other brokers do (before L{IStorage.open})."""

    def claim_client(client_id: str) -> "Deferred":
        """
        Take durable C{client_id} over everywhere and load its committed
        offsets (L{IStorage.commits}): fires with its new generation.
        """

    def create_topic(name: str, retention_ttl: int, compaction_window: int) -> "Deferred":
        """Make the topic if new: fires with C{(retention_ttl, compaction_window, made)} as recorded."""
