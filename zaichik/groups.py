"""
Consumer groups (protocol version 1.1): a topic's messages spread over the
members of a group, each message to one member at a time.

A L{Group} is one (topic, group name).  It follows its topic like a
subscriber (while it has members) and hands each message, from the group's
position on, to one L{GroupMember} with room, round-robin.  A member has at
most C{max_inflight} messages outstanding (sent and not acknowledged); a
message not acknowledged within the member's C{ack_timeout}, or outstanding
with a member that leaves, is sent again to any member, read back from the
topic's log so that it is the same frame (offset, timestamp, key, value).
Groups need retained messages: that is where what waits is kept, so a group
costs memory only for what is outstanding, never for a backlog.

The group's position is its lowest offset not yet acknowledged (expired
messages skipped).  It is recorded in storage whenever it moves, so a group
outlives its members and, with data on disk, a restart: it then resumes at
that position (messages acknowledged above it are sent again: at least once).
"""

from __future__ import annotations

from collections import deque
from heapq import heappop, heappush
from typing import Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from zaichik.subscription import MAX_INFLIGHT, READ_CHUNK, Output
from zaichik.topic import ISubscriber, Topic

_log = Logger()

DEFAULT_MAX_INFLIGHT = 1_000  # a member's window when SUBSCRIBE_GROUP says 0
DEFAULT_ACK_TIMEOUT = 30_000  # ms, when SUBSCRIBE_GROUP says 0


class GroupMember:
    """
    One connection's membership of a L{Group}.

    @ivar outstanding: offset -> when (clock seconds) it is due back, for
        the messages sent to this member and not acknowledged.
    @ivar last_sent: the highest offset sent to this member, or None.
    """

    def __init__(self, group: "Group", output: Output, max_inflight: int = 0, ack_timeout: int = 0,
                 on_stopped: Optional[Callable[["GroupMember", str], None]] = None) -> None:
        self.group = group
        self.output = output
        self.max_inflight = min(max_inflight or DEFAULT_MAX_INFLIGHT, MAX_INFLIGHT)
        self.ack_timeout = (ack_timeout or DEFAULT_ACK_TIMEOUT) / 1000.0
        self.outstanding: Dict[int, float] = {}
        self.last_sent: Optional[int] = None
        self.active = True
        self.received = 0  # messages sent to this member, redeliveries included
        self._due: Deque[Tuple[float, int]] = deque()  # (when, offset), in the order sent
        self._timer = None
        self._on_stopped = on_stopped

    def __repr__(self) -> str:
        return f"<GroupMember {self.group.name}@{self.group.topic.name} outstanding={len(self.outstanding)}>"

    @property
    def topic(self) -> Topic:
        return self.group.topic

    def room(self) -> int:
        if not self.active or self.output.paused:
            return 0
        return self.max_inflight - len(self.outstanding)

    def _send(self, offsets: List[int], frames: List[bytes]) -> None:
        clock = self.group.clock
        due = clock.seconds() + self.ack_timeout
        for offset in offsets:
            self.outstanding[offset] = due
            self._due.append((due, offset))
        highest = max(offsets)
        if self.last_sent is None or highest > self.last_sent:
            self.last_sent = highest
        self.received += len(offsets)
        if self._timer is None:
            self._timer = clock.callLater(self.ack_timeout, self._timedOut)
        self.output.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def _timedOut(self) -> None:
        """Messages not acknowledged in time go back to the group (to any member)."""
        self._timer = None
        if not self.active:
            return
        group = self.group
        now = group.clock.seconds()
        due = self._due
        late = []
        while due and due[0][0] <= now:
            when, offset = due.popleft()
            if self.outstanding.get(offset) == when:  # (not acknowledged, nor sent again since)
                del self.outstanding[offset]
                late.append(offset)
        self._trim_due()
        if due:
            self._timer = group.clock.callLater(max(due[0][0] - now, 0), self._timedOut)
        if late:
            with group.work:
                group.timed_out(self, late)

    def _trim_due(self) -> None:
        """Forget the oldest due times of messages no longer outstanding (acknowledged, or sent again)."""
        due, outstanding = self._due, self.outstanding
        while due and outstanding.get(due[0][1]) != due[0][0]:
            due.popleft()

    def acknowledge(self, offset: int) -> bool:
        """ACK: False if C{offset} is not outstanding for this member."""
        if self.outstanding.pop(offset, None) is None:
            return False
        self.group.acknowledged(offset)
        self._trim_due()
        return True

    def acknowledge_through(self, offset: int) -> None:
        """COMMIT on a group subscription: every outstanding offset up to C{offset}."""
        done = [o for o in self.outstanding if o <= offset]
        for o in done:
            del self.outstanding[o]
            self.group.acknowledged(o)
        self._trim_due()

    def _forget(self) -> List[int]:
        """Stop: what was outstanding, for the group to send again."""
        self.active = False
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        offsets = list(self.outstanding)
        self.outstanding.clear()
        self._due.clear()
        return offsets

    def leave(self) -> None:
        """UNSUBSCRIBE or a closed connection: leave the group; what was outstanding goes back."""
        if self.active:
            self.group.leave(self)

    def stopped(self, why: str) -> None:
        """The group stopped (its delivery failed): the owner is told."""
        if self._on_stopped is not None:
            self._on_stopped(self, why)


@implementer(ISubscriber)
class Group:
    """
    One consumer group of one topic.

    @ivar next: the lowest offset never sent to a member (in this run).
    @ivar recorded: the position last given to storage.
    """

    def __init__(self, topic: Topic, name: str, position: int, clock, work,
                 record: Callable[[int], Optional[Deferred]]) -> None:
        self.topic = topic
        self.name = name
        self.clock = clock  # timers (ack timeouts)
        self.work = work  # the broker's unit of work, around what timers do
        self.next = position
        self.recorded = position
        self._record = record
        self.members: List[GroupMember] = []
        self._turn = 0  # round-robin: the member to look at first
        # Offsets sent and not acknowledged, or waiting to be sent again:
        # the position is the lowest of them (or next).  _low is a min-heap
        # of them, with acknowledged ones dropped lazily.
        self._unacked: Set[int] = set()
        self._low: List[int] = []
        self._owner: Dict[int, GroupMember] = {}  # offset -> member it is outstanding with
        self._again: List[int] = []  # min-heap: offsets to send again
        self._reading = False
        self._pumping = False
        self._more = False
        # Counters, for the metrics endpoint.
        self.redelivered = 0  # messages sent again (timed out, or their member left)
        self.skipped = 0  # messages expired before acknowledgement (or before being sent)
        self.acks = 0

    def __repr__(self) -> str:
        return (f"<Group {self.name}@{self.topic.name} position={self.position} next={self.next} "
                f"members={len(self.members)} outstanding={self.outstanding}>")

    # -- state -------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """
        The lowest offset not yet acknowledged, expired messages skipped
        (where messages above the oldest retained one were acknowledged out
        of order, a lower bound: what is sent again after a restart).
        """
        low, unacked = self._low, self._unacked
        while low and low[0] not in unacked:
            heappop(low)
        lowest = low[0] if low else self.next
        oldest = self.topic.oldest_offset()
        return oldest if oldest > lowest else lowest

    @property
    def outstanding(self) -> int:
        """Messages sent to members and not acknowledged."""
        return len(self._owner)

    @property
    def lag(self) -> int:
        """Messages from the position on, stored or staged (acknowledged ones above it included)."""
        return max(self.topic.next_offset - self.position, 0)

    def settle(self) -> Optional[Deferred]:
        """Record the position if it moved: the Deferred fires once that is durable (None: nothing to record)."""
        position = self.position
        if position <= self.recorded:
            return None
        self.recorded = position
        return self._record(position)

    # -- members -----------------------------------------------------------------------

    def join(self, member: GroupMember) -> None:
        if not self.members:
            self.topic.subscribe(self)
        else:
            self.topic.extra_subscribers += 1  # TOPICS counts members, not groups
        self.members.append(member)

    def leave(self, member: GroupMember) -> None:
        try:
            i = self.members.index(member)
        except ValueError:
            return
        del self.members[i]
        if i < self._turn:
            self._turn -= 1
        if not self.members:
            self.topic.unsubscribe(self)
        else:
            self.topic.extra_subscribers -= 1
        self._return(member._forget())
        self.dispatch()

    def _return(self, offsets: List[int]) -> None:
        """C{offsets}, no longer outstanding with their member, are to be sent again."""
        for offset in offsets:
            if self._owner.pop(offset, None) is not None:
                heappush(self._again, offset)
                self.redelivered += 1

    def timed_out(self, member: GroupMember, offsets: List[int]) -> None:
        self._return(offsets)
        self.dispatch()

    def acknowledged(self, offset: int) -> None:
        del self._owner[offset]
        self._unacked.discard(offset)
        self.acks += 1

    # -- ISubscriber ---------------------------------------------------------------------

    def deliver(self, first: int, frames: Sequence[bytes]) -> None:
        """New messages on the topic: straight to members with room, when they are next in line."""
        if self._again or self._reading or self._pumping or first > self.next:
            self.dispatch()
            return
        skip = self.next - first
        if skip >= len(frames):
            return
        if skip:
            frames = frames[skip:]
            first = self.next
        self._hand_out(first, frames)  # what finds no room waits in the log

    def stopped(self, why: str) -> None:
        """The topic dropped the group (a delivery failed): every member is told."""
        for member in list(self.members):
            self.leave(member)
            member.stopped(why)

    # -- handing out -----------------------------------------------------------------------

    def _next_member(self) -> Optional[GroupMember]:
        """The next member with room, round-robin (None if none has any)."""
        members = self.members
        n = len(members)
        for k in range(n):
            i = (self._turn + k) % n
            if members[i].room() > 0:
                self._turn = (i + 1) % n
                return members[i]
        return None

    def _room(self) -> int:
        room = 0
        for member in self.members:
            r = member.room()
            if r > 0:
                room += r
        return room

    def _hand_out(self, first: int, frames: Sequence[bytes], again: bool = False) -> int:
        """
        Give messages with consecutive offsets from C{first} to members with
        room, round-robin; returns how many were given.  New messages (not
        C{again}) move C{next} on.
        """
        batches: Dict[GroupMember, Tuple[List[int], List[bytes]]] = {}
        given = 0
        for i, frame in enumerate(frames):
            member = self._next_member()
            if member is None:
                break
            offset = first + i
            # Counted as outstanding at once, so that the next turn sees the room it takes.
            member.outstanding[offset] = 0.0
            batch = batches.get(member)
            if batch is None:
                batch = batches[member] = ([], [])
            batch[0].append(offset)
            batch[1].append(frame)
            self._owner[offset] = member
            if not again:
                self._unacked.add(offset)
                heappush(self._low, offset)
            given += 1
        if not again and given:
            self.next = first + given
        self.topic.messages_out += given
        for member, (offsets, sent) in batches.items():
            member._send(offsets, sent)
        return given

    def dispatch(self) -> None:
        """Send what waits (messages to send again first, lowest offset first), as far as members have room."""
        if self._pumping:
            self._more = True
            return
        self._pumping = True
        try:
            self._more = True
            while self._more:
                self._more = False
                self._pump()
        finally:
            self._pumping = False
        self._settle_quietly()

    def _pump(self) -> None:
        topic = self.topic
        while not self._reading and self.members:
            again = self._again
            if not again and self.next >= topic.next_offset:
                return  # nothing waits
            room = self._room()
            if room <= 0:
                return
            if again:
                offset = heappop(again)
                if offset not in self._unacked:
                    continue
                got = self._read(offset, 1, True)
            else:
                got = self._read(self.next, min(room, READ_CHUNK), False)
            if got is None:
                return
            given = self._take(*got)
            if given < 0 or (not got[3] and given >= room):
                return  # stopped, or every member's room is taken

    def _take(self, first: int, frames: Sequence[bytes], offset: int, again: bool) -> int:
        """
        Hand out what a read from C{offset} returned (C{again}: the one
        message at C{offset}, to send again): how many were given, or -1
        when the pump should stop.
        """
        if again:
            if first != offset or not frames:
                self._expired(offset)
                return 0
            if not self._hand_out(offset, frames[:1], True):
                heappush(self._again, offset)  # no room any more
                return -1
            return 1
        if offset != self.next:
            return 0  # moved on meanwhile: read again
        if first > self.next:
            self.skipped += first - self.next  # expired before anyone was sent them
            self.next = first
        if not frames:
            return -1
        return self._hand_out(first, frames) or -1

    def _read(self, offset: int, limit: int, again: bool) -> Optional[Tuple[int, List[bytes], int, bool]]:
        """
        The log's answer from C{offset}, with C{offset} and C{again}, if it
        has it at once; else None, and the answer is taken when it comes.
        """
        got: list = []
        d = self.topic.read(offset, limit)
        d.addCallback(got.append)
        if got:
            first, frames = got[0]
            return first, frames, offset, again
        self._reading = True
        d.addCallbacks(self._readLater, self._readFailed, (got, offset, again), {}, (offset, again))
        return None

    def _readLater(self, _: object, got: list, offset: int, again: bool) -> None:
        self._reading = False
        if self.members:
            first, frames = got[0]
            self._take(first, frames, offset, again)
        elif again:
            heappush(self._again, offset)
        self.dispatch()

    def _readFailed(self, failure, offset: int, again: bool) -> None:
        self._reading = False
        if again:
            heappush(self._again, offset)
        _log.failure("Reading {topic} for group {group} failed", failure, topic=self.topic.name, group=self.name)

    def _expired(self, offset: int) -> None:
        """C{offset}, to be sent again, expired meanwhile: the group skips it."""
        self._unacked.discard(offset)
        self.skipped += 1

    def _settle_quietly(self) -> None:
        """Record a position moved by skipping (no request waits on it); a failure is logged."""
        if self.position > self.recorded:
            d = self.settle()
            if d is not None:
                d.addErrback(lambda f: _log.failure("Recording the position of group {group} on {topic} failed",
                                                    f, group=self.name, topic=self.topic.name))
