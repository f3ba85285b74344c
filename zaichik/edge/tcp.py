"""
The TCP framer (also TLS and unix sockets): each frame is a 4-byte
big-endian length and the body, as C{Int32StringReceiver} reads them, with
less work per frame: this is the broker's innermost loop.
"""

from __future__ import annotations

import struct
from time import perf_counter
from typing import Any, Tuple

from twisted.internet import tcp
from twisted.internet.protocol import Factory, connectionDone

from zaichik import codec
from zaichik.edge.connection import CLOSE_GRACE, PUBLISH, SEND_LIMIT, BrokerConnection, _OutputProducer
from zaichik.service import BrokerService

__all__ = ["CLOSE_GRACE", "SEND_LIMIT", "BrokerFactory", "BrokerProtocol", "_OutputProducer"]

_length = struct.Struct(">I")

# How much one read may take, how much output waits before the connection's
# subscriptions hold back, and how much one send may give.
#
# Twisted reads 64 KiB at a time, sends at most 128 KiB, and pauses a
# producer once 64 KiB wait (bufferSize is both the read size and that
# mark).  A publisher spread over many topics then costs a send to each
# subscriber per 64 KiB read: 100 topics, 100 sends for ~500 messages.  So a
# connection whose reads fill the buffer reads more next time (doubling up to
# READ_MAX, halving back when reads are small), and each subscriber's share
# of a read, and so of a send, grows with it (100 topics x 1 subscriber went
# from 0.41x to about 0.8x of one topic; bench.py --quick).  Output must keep
# up with such reads: a MESSAGE is larger than the PUBLISH (or batch entry)
# it comes from, and a paused connection resumes only once its buffer is
# empty, so the mark is OUTPUT_HIGH, well above READ_MAX, and one send may
# give all of it (the kernel takes what fits).
READ_MIN = 1 << 16
READ_MAX = 1 << 20
OUTPUT_HIGH = 4 << 20
# SEND_LIMIT (zaichik.edge.connection): twice the largest read.

# A full read whose publishes went to SPREAD topics or more is followed by
# up to READS_PER_UNIT - 1 more reads in the same unit of work (when the
# socket has them at once): a topic's commit and delivery, and each
# subscriber's write, cost as much for one message as for eight, and with
# 10,000 topics a 1 MiB read gives each topic less than one.  bench.py,
# 10,000 topics over 10,000 connections, 1/2/4/8 reads a unit: 54k, 80k,
# 125k, 178k msgs/s; 100 topics x 10 subscribers 3.4M -> 4.6M (4 reads);
# 100 topics x 1 unchanged.  Larger reads were measured and not kept (a
# 4 MiB read slowed one topic: the read and its messages no longer stayed
# in the caches); here each read is parsed and staged before the next.
# Only under a load that fills reads (so not in the latency runs), and
# at most READS_PER_UNIT reads before the reactor serves the other
# connections: the price is that the first message of such a unit waits
# for the others' reads before it is delivered.
SPREAD = 16
READS_PER_UNIT = 8
# Those further reads take up to READ_ON bytes each: with blocks of frames
# and Entries (no object a message), a larger read costs less per message
# (each topic's calls and its block come once a read), and 3 MiB stays
# below tune_malloc's 4 MiB mmap threshold (a read into fresh pages, which
# fault in one by one, is slower).  long.py x5 (bench.py's scenarios, 5M
# messages), alternating, msgs/s: 100 topics x 1 subscriber, reads on of
# 1 MiB 7.52M/7.94M/6.84M, 2 MiB 8.16M/8.47M/7.46M, 4 MiB 4.04M/3.34M/3.47M;
# again, 2 MiB 6.51M/9.38M/8.40M, 3 MiB 8.00M/9.95M/9.02M.  10,000 topics
# over 10,000 connections, 1 MiB 163k/157k, 3 MiB 234k/232k.  Sixteen 3 MiB
# reads a unit were slower again (6.0M): the unit's blocks and output no
# longer stay in the caches.
READ_ON = 3 << 20
# ... and no more than UNIT_BYTES in all (the unit's reads and blocks stay
# in the caches: sixteen 3 MiB reads were slower, above), nor more than its
# MESSAGE frames fit (unit_output).
UNIT_BYTES = 16 << 20


def unit_output(max_output_buffer: int, copies: int) -> int:
    """
    The bytes of MESSAGE frames one unit may make before it reads no more.
    What a unit reads it delivers at its end, in one burst: a subscriber of
    all its topics is given all of it at once, C{copies} times over if it
    holds patterns that match them (a topic by name and by each pattern:
    L{zaichik.service.BrokerService.most_patterns}), and the output mark and
    --max-output-buffer must hold that, or a subscriber that keeps up is
    dropped as a slow consumer.  A review found 1 + 7 x 3 MiB read did that
    at the default 16 MiB; 8 MiB read did under a smaller
    --max-output-buffer; a bound on the bytes read rather than made did for
    PUBLISH_BATCH entries (6 bytes read make a 30-byte MESSAGE) and for two
    patterns (tests/test_read_on.py).  20 MiB at the defaults; with no
    --max-output-buffer, no bound but UNIT_BYTES.  Units larger than the
    8 MiB read before: 100 topics x 1 subscriber (bench.py's scenario with
    twice its messages, alternating), broker CPU for 10M messages
    1.06/1.18/1.13 s -> (16 MiB) 0.92/0.99/1.06 s.
    """
    if not max_output_buffer:
        return 1 << 62
    return (OUTPUT_HIGH + max_output_buffer) // max(1, copies)


# ... and none once the unit has taken UNIT_TIME seconds: with 10,000
# topics over 10,000 connections a 1 MiB read can take tens of ms (a write
# to a subscriber for nearly every message), and every other connection
# waits for the unit to end.  (That case, 8 reads a unit: 185k msgs/s
# without this bound, 191k and 210k with it; 32 reads: 284k, with units of
# most of a second.)
UNIT_TIME = 0.1


def _tune(transport) -> None:
    """Give a TCP (or unix socket) transport the marks above; others keep theirs."""
    if not isinstance(transport, tcp.Connection):
        return
    transport.SEND_LIMIT = SEND_LIMIT

    # Twisted's own test of a full buffer, with OUTPUT_HIGH for bufferSize
    # (which stays the read size).  tests/test_protocol.py checks the mark.
    def full() -> bool:
        return len(transport.dataBuffer) + transport._tempDataLen > OUTPUT_HIGH

    transport._isSendBufferFull = full  # type: ignore[method-assign]


def _untune(transport) -> None:
    """Drop L{_tune}'s test of a full buffer: it refers to the transport, which would wait for a cyclic collection."""
    transport.__dict__.pop("_isSendBufferFull", None)


def read_size(transport: Any, data: bytes) -> int:
    """
    The size C{data} was read with (a tcp.Connection's bufferSize); the next
    read's is doubled when it filled that, up to READ_MAX, and halved when it
    was small (see READ_MIN above).  The TCP and WebSocket framers' reads.
    """
    size = getattr(transport, "bufferSize", READ_MIN)
    if len(data) >= size:
        if size < READ_MAX:
            transport.bufferSize = size * 2
    elif data and len(data) < size >> 3 and size > READ_MIN:  # (b"": a released hold, not a read)
        transport.bufferSize = size >> 1
    return size


class BrokerProtocol(BrokerConnection):
    """Length-prefixed frames over a stream (see L{BrokerConnection} for the policy)."""

    def dataReceived(self, data: bytes) -> None:
        """
        Split the stream into frames.  Messages published in one read reach
        each subscriber in one delivery per topic when the read is done, or
        when the few reads after it are (L{SPREAD}).
        """
        transport: Any = self.transport  # (a tcp.Connection's bufferSize: see READ_MAX)
        size = read_size(transport, data)
        with self.service.work:
            spread = self._frames(data)
            reads = 1
            taken = len(data)
            service = self.service
            work = service.work
            budget = unit_output(service.limits.max_output_buffer, 1 + service.most_patterns)
            until = perf_counter() + UNIT_TIME
            while (spread >= SPREAD and len(data) >= size and reads < READS_PER_UNIT and taken < UNIT_BYTES
                   and not self.paused and self._socket is not None and perf_counter() < until):
                # A full read spread over many topics: more is waiting, and
                # each topic had a few of its messages.  Read on in the same
                # unit of work, so that each topic's delivery (and each
                # subscriber's write) carries the messages of several reads:
                # as much as half of what is left of unit_output() takes, at
                # the bytes of MESSAGEs the unit made a byte read so far (5/3
                # at least: a PUBLISH's; a PUBLISH_BATCH entry's are more).
                # Half: a read whose messages make twice as much still fits
                # (a review found a read of batches after one of PUBLISHes
                # overshooting); one of tiny batch entries on long topic
                # names (8x and more) may not, as one read alone may not.
                made = work.staged
                ask = min(READ_ON, UNIT_BYTES - taken, (budget - made) * taken // (2 * max(made, taken * 5 // 3)))
                if ask <= 0:
                    break
                try:
                    data = transport.socket.recv(ask)
                except OSError:  # (nothing more yet; or an error, which Twisted's next read meets)
                    break
                if not data:
                    break  # (the end: Twisted's next read meets it too)
                reads += 1
                taken += len(data)
                spread = self._frames(data)

    def _frames(self, data: bytes) -> int:
        """
        The frames of one read (after what was kept of the last): returns the
        number of topics of the largest run of fire-and-forget publishes.
        """
        unpack = _length.unpack_from
        kept = self._unprocessed
        at = 0
        if len(kept) >= 4 and len(data) > READ_MIN and not self._waiting_for and not self.paused:
            # The last read ended inside a frame whose length it tells
            # (checked against the limit then): complete that frame from the
            # head of this read and go on from there, rather than copy the
            # whole read behind the few bytes kept (54 us for a 3 MiB read).
            at = 4 + unpack(kept, 0)[0] - len(kept)
            if at <= len(data):
                self._unprocessed = b""
            else:
                at = 0  # (nor does this read complete it: joined, as below)
        joined = self.buffered(data)
        if joined is None:
            return 0
        spread = 0
        if at:
            # Like any other frame: a PUBLISH there goes into its topic's
            # block with the rest of the run (one handled alone would stage
            # its topic frame by frame for the rest of the unit).
            spread = self._handle(kept + data[:at], 0)[1]
        else:
            data = joined
        at, found = self._handle(data, at)
        if at < 0:
            return 0
        # Before the batch ends: its delivery may release a hold, whose
        # dataReceived must find only the frames not yet handled.
        rest = data[at:] if at else data
        needed = 4 + unpack(rest, 0)[0] if len(rest) >= 4 and not self.paused else 0
        self.keep(rest, needed, at > 0)
        # (The completed frame's topic may be one of the run's, counted
        # twice: a read on one topic early, at worst.  Not counted at all,
        # a read spread over SPREAD topics did not read on: a review.)
        return spread + found

    def _handle(self, data: bytes, at: int) -> Tuple[int, int]:
        """
        Handle the whole frames of C{data} from C{at} on: returns where the
        first one not handled starts (-1 after a frame too large) and the
        number of topics of the largest run of fire-and-forget publishes.
        """
        end = len(data)
        limit = self.MAX_LENGTH
        unpack = _length.unpack_from
        handle = self.frameReceived
        runs = self.session.may_publish_runs
        run = codec.parse_publish_run
        no_run_before = 0
        spread = 0
        while end - at >= 4 and not self.paused:
            (length,) = unpack(data, at)
            if length > limit:
                self._unprocessed = b""
                self.frameTooLarge(length)
                return -1, 0
            start = at + 4
            if runs and at >= no_run_before and length and start + length <= end and data[start] == PUBLISH:
                # Fire-and-forget PUBLISHes, one after another: the
                # whole run in one call (Session.publish_run says why).
                found = run(data, at, end, limit)
                after, published = self.publishRun(found)
                if published:
                    at = after
                    spread = max(spread, len(found[0]))
                    continue
                no_run_before = after
            at = start + length
            if at > end:
                at = start - 4
                break
            handle(data[start:at])
        return at, spread

    def connectionMade(self) -> None:
        _tune(self.transport)
        super().connectionMade()

    def connectionLost(self, reason=connectionDone) -> None:
        _untune(self.transport)
        super().connectionLost(reason)

    def wire(self, data: bytes) -> bytes:
        return data  # (length-prefixed frames are what goes on a stream)

    scatter = True  # (so pieces go to the socket as they are: see flushOutput)


class BrokerFactory(Factory):
    """Builds a L{BrokerProtocol} for each connection to one L{BrokerService}."""

    noisy = False

    def __init__(self, service: BrokerService, max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE) -> None:
        self.service = service
        self.max_frame_size = max_frame_size
        self.clock = service.clock

    def buildProtocol(self, addr) -> BrokerProtocol:
        protocol = BrokerProtocol(self.service, self.max_frame_size)
        protocol.factory = self
        return protocol
