"""
One connection's subscription to one topic: the order of delivery, the
C{max_inflight} window, and what has been sent.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional, Sequence, Union

from twisted.logger import Logger
from zope.interface import implementer

from zaichik.codec import FrameBlock, joined
from zaichik.topic import ISubscriber, Topic

_log = Logger()

# How many retained messages one read from the log hands over at most.
READ_CHUNK = 1024
# The largest max_inflight window honoured (a larger one counts as this).
MAX_INFLIGHT = 1 << 20


def _one_block(runs: List[Sequence[bytes]], count: int) -> FrameBlock:
    """Consecutive runs of frames (C{count} in all) as one L{FrameBlock}, a FrameBlock's chunks as they are."""
    chunks: List[bytes] = []
    for run in runs:
        if type(run) is FrameBlock:
            chunks.extend(run.chunks)  # type: ignore[attr-defined]
        else:
            chunks.append(joined(run))
    return FrameBlock(chunks, count)


def _nbytes(frames: Sequence[bytes]) -> int:
    """The bytes of C{frames} (a FrameBlock's without splitting it)."""
    return sum(map(len, frames.chunks if type(frames) is FrameBlock else frames))  # type: ignore[attr-defined]


class Output:
    """
    A connection's output, shared by its subscriptions: where their frames
    are written, and whether the connection's buffer is full (C{paused}).
    """

    def __init__(self, write: Callable[[Union[bytes, List[bytes]]], None], pieces: bool = False) -> None:
        self.write = write
        # C{write} also takes a list of pieces (each whole frames), which it
        # writes without joining them (a connection's output: sendmsg).
        self.pieces = pieces
        self.paused = False
        # Bytes queued by all of the connection's subscriptions (on topics
        # that retain nothing): the budget --max-output-buffer bounds.
        self.pending_bytes = 0


@implementer(ISubscriber)
class Subscription:
    """
    Sends a topic's messages to one connection, in offset order, from
    offset C{next} on.

    It sends while it may: while the connection's L{Output} is not paused
    and, with C{max_inflight} M > 0, while fewer than M messages
    are sent and not yet acknowledged.  When it may not, what it has not sent
    waits:

      - on a topic that retains messages, in the topic's log: the
        subscription only remembers its position and reads on from there
        later, so a slow reader costs no memory (and skips what expires
        meanwhile);
      - on a topic that retains nothing, in the subscription's own queue,
        whose size in bytes is counted on the connection's L{Output}: when
        the connection's queues pass C{max_pending_bytes} (when set),
        C{on_overflow} is called.

    @ivar next: the offset of the next message to send.
    @ivar last_sent: the highest offset sent to the connection on this topic
        (carried over from earlier subscriptions of the same connection), or
        None.
    """

    def __init__(
        self,
        topic: Topic,
        output: Output,
        max_inflight: int = 0,
        last_sent: Optional[int] = None,
        start: Optional[int] = None,
        max_pending_bytes: int = 0,
        on_overflow: Optional[Callable[["Subscription"], None]] = None,
        on_stopped: Optional[Callable[["Subscription", str], None]] = None,
    ) -> None:
        self.topic = topic
        # The window is at most MAX_INFLIGHT: a client's u32 could otherwise
        # make the record of what is in flight as large as it likes.
        self.max_inflight = min(max_inflight, MAX_INFLIGHT)
        self.last_sent = last_sent
        self.next = topic.next_offset if start is None else start
        self.active = True
        self.max_pending_bytes = max_pending_bytes
        self._on_overflow = on_overflow
        self._on_stopped = on_stopped
        self._output = output
        # What waits, from offset self.next on: runs of frames as they were
        # delivered (a FrameBlock stays one bytes a read), _pending_count
        # frames and pending_bytes bytes in all.  A slow subscriber of a
        # topic that retains nothing queued a unit's block frame by frame
        # (split, counted and joined again): 7% of the broker in a 1 -> 1
        # run whose subscriber fell behind (perf).
        self._pending: Deque[Sequence[bytes]] = deque()
        self._head = 0  # frames of _pending[0] sent already (a window cut it)
        self._pending_count = 0
        self.pending_bytes = 0
        # Set while this subscription holds its topic's publishers back
        # (the "block" policy), until its queue is down to half the limit.
        self.blocking = False
        self._inflight: Deque[int] = deque()
        # A read from the topic's log is under way (it may come from disk).
        self._reading = False

    def __repr__(self) -> str:
        return (f"<Subscription {self.topic.name} next={self.next} "
                f"inflight={len(self._inflight)} pending={self._pending_count}>")

    @property
    def inflight(self) -> int:
        """How many messages are sent and not yet acknowledged."""
        return len(self._inflight)

    @property
    def pending(self) -> int:
        """How many messages wait in this subscription's own queue."""
        return self._pending_count

    def _room(self) -> int:
        if self._output.paused or not self.active:
            return 0
        if not self.max_inflight:
            return 1 << 62
        return self.max_inflight - len(self._inflight)

    def _send(self, first: int, frames: Sequence[bytes]) -> None:
        count = len(frames)
        self.topic.messages_out += count
        self.next = first + count
        # The connection's high-water mark: a resubscription that sends
        # older offsets again does not lower it.
        if self.last_sent is None or first + count - 1 > self.last_sent:
            self.last_sent = first + count - 1
        if self.max_inflight:
            self._inflight.extend(range(first, first + count))
        # One write per batch (a FrameBlock's blocks as they are); the
        # transport may pause us inside it.
        output = self._output
        if output.pieces and type(frames) is FrameBlock and len(frames.chunks) > 1:
            output.write(frames.chunks)
        else:
            output.write(joined(frames))

    # -- ISubscriber ---------------------------------------------------------------

    def deliver(self, first: int, frames: Sequence[bytes]) -> None:
        if not self.active:
            return
        skip = self.next - first
        if skip > 0:
            # Already sent (from the log, when this subscription started
            # inside the batch that delivers them now).
            if skip >= len(frames):
                return
            frames = frames[skip:]
            first = self.next
        if self.topic.retains:
            if first == self.next and not self._reading and len(frames) <= self._room():
                self._send(first, frames)
            else:
                # Behind, or out of room: the log has them.  A read under
                # way may have been asked before they were stored: read
                # again after it (_readLater).
                if self._reading:
                    self._missed = True
                self.drain()
            return
        if not self._pending and len(frames) <= self._room():
            self._send(first, frames)
            return
        self._pending.append(frames)
        self._pending_count += len(frames)
        size = _nbytes(frames)
        self.pending_bytes += size
        self._output.pending_bytes += size
        self.drain()
        if (self.max_pending_bytes and self._output.pending_bytes > self.max_pending_bytes
                and self._on_overflow and not self.blocking):
            self._on_overflow(self)

    # -- flow ------------------------------------------------------------------

    def drain(self) -> None:
        """Send what is waiting, as far as the window and the connection allow."""
        while not self._reading:
            room = self._room()
            if room <= 0:
                return
            if self.topic.retains:
                # From the log, which may answer later (from disk): one read
                # at a time, and what arrived meanwhile is read after it.
                self._reading = True
                got: list = []
                d = self.topic.read(self.next, min(room, READ_CHUNK))
                d.addCallback(got.append)
                if not got:
                    d.addCallback(self._readLater, got)
                    d.addErrback(self._readFailed)
                    return
                self._reading = False
                if not self._sendRead(*got[0]):
                    return
                continue
            pending = self._pending
            if not pending:
                return
            # Whole runs while the window has room for them (the one that
            # does not fit is cut), up to READ_CHUNK frames a write unless
            # one run has more: each write may pause the connection.
            runs: List[Sequence[bytes]] = []
            count = size = 0
            # (A cut run stays whole in the queue, _head frames of it sent:
            # copying the rest of it at each cut cost a run of N frames
            # N * N / 2 copies under a window that opens one at a time.)
            while pending and count < room and count < READ_CHUNK:
                run = pending[0]
                head = self._head
                n = len(run) - head
                if count + n > room:
                    cut = room - count
                    self._head = head + cut
                    run = run[head:head + cut]
                    n = cut
                else:
                    pending.popleft()
                    self._head = 0
                    if head:
                        run = run[head:]
                runs.append(run)
                count += n
                size += _nbytes(run)
            self._pending_count -= count
            self.pending_bytes -= size
            self._output.pending_bytes -= size
            self._send(self.next, runs[0] if len(runs) == 1 else _one_block(runs, count))
            if self.blocking and self.pending_bytes <= self.max_pending_bytes // 2:
                # After the send: unblocking lets publishers run (and deliver
                # to us) at once, and they must find our position current.
                self.blocking = False
                self.topic.unblock(self)

    def _sendRead(self, first: int, frames: List[bytes]) -> bool:
        """Send what a read returned (less what was sent meanwhile); False if nothing."""
        if not frames or not self.active:
            return False
        skip = self.next - first
        if skip > 0:
            if skip >= len(frames):
                return True  # all sent already: read on
            frames = frames[skip:]
            first = self.next
        room = self._room()
        if room <= 0:
            return False
        if len(frames) > room:
            frames = frames[:room]
        self._send(first, frames)
        return True

    _missed = False  # messages were delivered while a read was under way

    def _readLater(self, _: object, got: list) -> None:
        self._reading = False
        missed, self._missed = self._missed, False
        if self._sendRead(*got[0]) or missed:
            self.drain()

    def _readFailed(self, failure) -> None:
        self._reading = False
        _log.failure("Reading {topic} for a subscriber failed", failure, topic=self.topic.name)
        self.cancel()
        self.stopped("reading the topic's messages failed")

    def stopped(self, why: str) -> None:
        """The subscription cannot go on: its owner is told (and forgets it)."""
        self.active = False
        if self._on_stopped is not None:
            self._on_stopped(self, why)

    def acknowledge(self, offset: int) -> None:
        """Everything up to and including C{offset} is committed: open the window."""
        inflight = self._inflight
        while inflight and inflight[0] <= offset:
            inflight.popleft()
        self.drain()

    def cancel(self) -> None:
        """Stop delivery; nothing more is written."""
        self.active = False
        self.topic.unsubscribe(self)
        self._pending.clear()
        self._head = 0
        self._pending_count = 0
        self._output.pending_bytes -= self.pending_bytes
        self.pending_bytes = 0
        self._inflight.clear()
