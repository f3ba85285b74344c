"""
The transport-neutral part of the broker's edge: one L{BrokerConnection}
per client connection owns its policy (the connection limits, the idle
timer, the frame timeout and the broker's bound on incomplete frames, read
holds, the unit of work, errors and close, the output producer and the
close grace) and hands whole frame bodies to its L{Session}.

A transport is a thin framer on top (L{zaichik.edge.tcp}: length-prefixed
frames; L{zaichik.edge.websocket}: one frame body per binary message): it
splits what it reads into frame bodies for L{BrokerConnection.frameReceived}
and says how frames go out (L{BrokerConnection.wire}).
"""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Optional, Tuple, Union
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zaichik import codec
from zaichik.auth import peer_key
from zaichik.codec import ErrorCode
from zaichik.errors import ZaichikError
from zaichik.service import BrokerService
from zaichik.session import Session

_log = Logger()
_length = struct.Struct(">I")

PUBLISH = codec.Opcode.PUBLISH.value

# Seconds a closing connection has to read what it is still owed.
CLOSE_GRACE = 10.0

# The most one send may give, and the most a unit of work gathers for a
# connection before handing it over (zaichik/edge/tcp.py: twice its
# largest read, as Twisted's 128 KiB is twice its 64 KiB read; not all of
# its output mark, because Twisted copies what is left of its buffer into a
# new one at each write event while less than SEND_LIMIT is left: a slow
# reader taking 64 KiB an event would cost 4 MiB of copying an event).
SEND_LIMIT = 2 << 20
# The most pieces one sendmsg is given (Linux takes 1024, IOV_MAX); more are joined.
def _iov_max() -> int:
    try:
        found = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        found = -1
    return found if found > 0 else 16  # (POSIX's least)


MAX_PIECES = min(512, _iov_max())


@implementer(IPushProducer)
class _OutputProducer:
    """
    Registered with the transport so that it tells us when its write buffer
    is full (and drained again): the session's subscriptions then hold back
    rather than buffer without bound.
    """

    def __init__(self, protocol: "BrokerConnection") -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol.session.pause_output()
        # Replies are output too: read no more requests until the client
        # reads what it is sent.
        self.protocol.hold("output")

    def resumeProducing(self) -> None:
        self.protocol.session.resume_output()
        if not self.protocol.session.output.paused:
            self.protocol.release("output")

    def stopProducing(self) -> None:
        self.protocol.session.end()


class _Transport(TypingProtocol):
    """What the broker uses of a connection's transport (TCP, TLS or unix)."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def getPeer(self) -> object: ...


class BrokerConnection(Protocol):
    """
    Frame bodies in, frames out.  Requests are handled one at a time, in
    order.  Reading stops (L{hold}) while a request's answer is still to
    come (HELLO with asynchronous authentication, a publish to a topic that
    a slow subscriber blocks) and while the connection's output buffer is
    full; it goes on when every hold is released.

    A framer subclass implements L{dataReceived} (feeding
    L{frameReceived} inside C{with self.service.work:}, stopping while
    C{self.paused}), L{writeFrames} and L{sendFrame}; when the last hold is released,
    L{dataReceived} is called with no data, to go on with what the framer
    kept.

    @ivar MAX_LENGTH: the largest frame body accepted (--max-frame-size).
    """

    session: Session
    transport: _Transport  # type: ignore[assignment]  # (set by makeConnection, never None after it)
    _closing = False
    paused = False

    def __init__(self, service: BrokerService, max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE) -> None:
        self.service = service
        self.MAX_LENGTH = max_frame_size

    # -- what a framer provides ------------------------------------------------

    def wire(self, data: bytes) -> bytes:
        """C{data}, one or more frames (each with its 4-byte length), as this transport sends them."""
        raise NotImplementedError

    def readHeld(self) -> None:
        """Every hold is released: go on with what was read meanwhile (kept by the framer)."""
        self.dataReceived(b"")

    # -- the connection's life -------------------------------------------------

    def connectionMade(self) -> None:
        self.start()

    def start(self) -> None:
        """The connection is ready for frames: apply the limits and start the session."""
        peer = peer_key(self.transport)
        if isinstance(self.transport, tcp.Connection):
            self._socket = self.transport.socket  # (see flushOutput)
        self._holds: set = set()
        self.session = Session(self.service, self._sendReply, self._write, self._disconnect, peer, pieces=True)
        self.transport.registerProducer(_OutputProducer(self), True)
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        limits = self.service.limits
        service = self.service
        service.connections += 1
        self._peer = peer
        self._counted = True
        per_peer = service.connections_by_peer
        per_peer[peer] = per_peer.get(peer, 0) + 1
        if service.connections > limits.max_connections:
            self.session.fail(0, ZaichikError(
                ErrorCode.LIMIT, f"connection limit of {limits.max_connections} reached"), close=True)
            return
        if limits.max_connections_per_address and per_peer[peer] > limits.max_connections_per_address:
            self.session.fail(0, ZaichikError(
                ErrorCode.LIMIT, f"limit of {limits.max_connections_per_address} connections from "
                                 f"{peer} reached"), close=True)
            return
        if limits.idle_timeout:
            self._idle = self.factory.clock.callLater(limits.idle_timeout, self._idleTimeout)
        if self.service.running and not self.service.ready.called:
            # Storage is still being opened: read requests once it is.
            self.hold("ready")
            self.service.ready.addBoth(self._ready)

    def _ready(self, result):
        self.release("ready")
        return result

    _counted = False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._out = None
        self._socket = None
        for call in (self._idle, self._abort, self._frame_timer):
            if call is not None and call.active():
                call.cancel()
        if not self._counted:
            return  # (never started: a WebSocket handshake that did not finish)
        service = self.service
        service.connections -= 1
        left = service.connections_by_peer.get(self._peer, 1) - 1
        if left > 0:
            service.connections_by_peer[self._peer] = left
        else:
            service.connections_by_peer.pop(self._peer, None)
        service.stats.pending_input -= self._pending_input
        self._pending_input = 0
        self.session.end()

    _peer = ""
    _frame_timer = None
    _pending_input = 0  # bytes of an incomplete frame held for this connection

    # What the framer read and has not handled yet: the tail of the last
    # read, or the pieces of a large frame still arriving (see L{keep}).
    _unprocessed = b""
    _waiting_for = 0
    _pieces: list = []
    _pieces_bytes = 0

    def buffered(self, data: bytes) -> Optional[bytes]:
        """
        C{data} was read (counted; the connection is not idle): it and what
        was kept before it, or None while a large frame is still arriving
        or once the connection is closing.
        """
        if self._closing:
            return None
        self.service.stats.bytes_in += len(data)
        if self._idle is not None and data:
            self._idle.reset(self.service.limits.idle_timeout)
        if self._waiting_for:
            # The rest of a large frame, arriving in pieces: collect them and
            # join once, rather than copying the growing buffer every read.
            self._pieces.append(data)
            self._pieces_bytes += len(data)
            if self._pieces_bytes < self._waiting_for:
                self._partial(self._pieces_bytes, False)
                return None
            data = b"".join(self._pieces)
            self._pieces, self._pieces_bytes, self._waiting_for = [], 0, 0
        elif self._unprocessed:
            data = self._unprocessed + data
        return data

    def keep(self, rest: bytes, needed: int, handled: bool, held: int = 0) -> None:
        """
        After the framer's frame loop: keep C{rest}, the start of a frame of
        C{needed} bytes in all (0: not known yet), for the next read.
        C{handled}: frames were handled in this read (so what is kept began
        in it); C{held}: bytes of an incomplete message the framer holds
        besides.
        """
        new_frame = handled or not self._pending_input
        if needed - len(rest) > 65536 and not self.paused:
            # A large frame is on its way: collect its pieces.
            self._unprocessed = b""
            self._pieces, self._pieces_bytes, self._waiting_for = [rest], len(rest), needed
            self._partial(len(rest) + held, new_frame)
            return
        self._unprocessed = rest
        if rest or held or self._pending_input:
            self._partial(len(rest) + held, new_frame)

    def _partial(self, pending: int, new_frame: bool) -> None:
        """
        After a read: C{pending} bytes of an incomplete frame are held
        (C{new_frame}: it began in this read).  A frame must be complete
        within --frame-timeout of its first byte, and incomplete frames
        count against the broker's --max-pending-input.
        """
        stats = self.service.stats
        stats.pending_input += pending - self._pending_input
        self._pending_input = pending
        timer = self._frame_timer
        if not pending or self.paused:
            if timer is not None and timer.active():
                timer.cancel()
            self._frame_timer = None
            return
        limits = self.service.limits
        if limits.frame_timeout and (timer is None or not timer.active() or new_frame):
            if timer is not None and timer.active():
                timer.cancel()
            self._frame_timer = self.factory.clock.callLater(limits.frame_timeout, self._frameTimeout)
        if limits.max_pending_input and stats.pending_input > limits.max_pending_input:
            self.session.fail(0, ZaichikError(
                ErrorCode.LIMIT, "the broker holds too many incomplete frames (--max-pending-input)"), close=True)

    def _frameTimeout(self) -> None:
        self._frame_timer = None
        if self._closing:
            return
        timeout = self.service.limits.frame_timeout
        self.session.fail(0, ZaichikError(ErrorCode.LIMIT, f"a frame was not completed within {timeout:g} s"),
                          close=True)

    _idle = None
    _abort = None

    def _idleTimeout(self) -> None:
        timeout = self.service.limits.idle_timeout
        if self._holds:
            # Not idle: we are the ones not reading (see hold).
            self._idle = self.factory.clock.callLater(timeout, self._idleTimeout)
            return
        self.session.fail(0, ZaichikError(ErrorCode.LIMIT, f"idle for {timeout:g} s"), close=True)

    def hold(self, reason: str) -> None:
        """Stop reading requests until L{release}d (for every reason held)."""
        if not self._holds:
            self.paused = True  # the framer's frame loop stops here
            self.transport.pauseProducing()
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and not self._closing:
            self.paused = False
            self.transport.resumeProducing()
            self.readHeld()  # frames that arrived before the hold

    # -- frames in -------------------------------------------------------------

    def frameReceived(self, body: bytes) -> None:
        """One whole frame body, handled inside the framer's unit of work."""
        waiting = self.session.publish_frame(body) if body and body[0] == PUBLISH else False
        if waiting is None:
            return  # the common case: the one PUBLISH path, from the frame's bytes
        if waiting is False:
            try:
                request = codec.decode_request(body)
            except codec.DecodeError as e:
                self.session.fail(e.rid, ZaichikError(e.code, e.message))
                return
            waiting = self.session.handle(request)
        self.held(waiting)

    def publishRun(self, run: Tuple[Dict[str, List[Tuple[Optional[bytes], bytes]]], int, int]) -> Tuple[int, bool]:
        """
        A framer's run of fire-and-forget PUBLISHes (C{codec.parse_publish_run}'s
        answer): published, or not (no run there, or the session declined
        it), and where the run ends.  Not published, the framer reads its
        frames one by one, and looks for a run again only past its end (not
        at each of its frames: that read the rest again each time).
        """
        groups, count, after = run
        if not count:
            return after, False
        waiting = self.session.publish_run(groups, count)
        if waiting is False:
            return after, False
        self.held(waiting)
        return after, True

    def held(self, waiting: Optional[Deferred]) -> None:
        """Read nothing more until C{waiting} (a request's answer still to come, if any) fires."""
        # Pause only for an answer still to come: resuming reads what was
        # held back, which must not happen inside the framer's frame loop
        # (the frames of the current read would be handled twice).
        if waiting is not None and not waiting.called and not self._closing:
            self.hold("answer")
            waiting.addBoth(lambda _: self.release("answer"))

    def frameTooLarge(self, length: int) -> None:
        """A frame of C{length} bytes is over --max-frame-size: FRAME_TOO_LARGE, and close."""
        self.session.fail(
            0,
            ZaichikError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {length} bytes is over the limit of {self.MAX_LENGTH} bytes",
            ),
        )

    # -- frames out ------------------------------------------------------------

    #
    # Inside a unit of work (a read's requests and the deliveries they
    # release) the frames for this connection are gathered and written once,
    # when the unit ends (UnitOfWork.flush calls flushOutput): a publisher
    # spread over many topics makes one write per subscriber per unit, not
    # one per topic, and many replies one write.  That write goes straight to
    # the socket when Twisted's buffer is empty, as it is for any reader
    # that keeps up: Twisted would buffer it, ask epoll to watch for
    # writability, send on the next reactor turn and stop watching again,
    # two epoll changes and a pass through its write machinery per
    # connection per unit, most of the broker's time when each read
    # delivers to thousands of connections (cProfile, 10,000 topics over
    # 10,000 connections).  What the socket does not take goes to Twisted's
    # buffer, whose marks and producer signals then apply as before.
    # Outside a unit (timers, storage callbacks) writes go to Twisted.

    _out: Optional[List[bytes]] = None
    _outSize = 0
    _socket: Any = None  # a plain TCP or unix socket's (not TLS): see flushOutput

    def writeFrames(self, data: Union[bytes, List[bytes]]) -> None:
        """Send C{data}, one or more frames (each with its 4-byte length), in one bytes or in pieces."""
        work = self.service.work
        if not (work.depth or work.ending):
            self.transport.write(self.wire(b"".join(data) if type(data) is list else data))  # type: ignore[arg-type]
            return
        out = self._out
        if out is None:
            out = self._out = []
            self._outSize = 0
            work.gather(self)
        if type(data) is list:
            out.extend(data)
            self._outSize += sum(map(len, data))
        else:
            out.append(data)  # type: ignore[arg-type]
            self._outSize += len(data)
        if self._outSize >= SEND_LIMIT:
            # Enough to hand over now: so Twisted's marks see it, and a unit
            # delivering much to a slow reader pauses its subscriptions.
            self.flushOutput()

    def sendFrame(self, body: bytes) -> None:
        """Send one frame body (without its length)."""
        self.writeFrames(_length.pack(len(body)) + body)

    def flushOutput(self) -> None:
        """
        Write what the unit of work gathered for this connection.  Straight
        to the socket, the pieces as they are (one C{sendmsg}) where the
        framer sends frames as they are (L{scatter}): a topic's blocks of a
        unit's reads, to each of 100 subscribers, were otherwise joined (a
        copy of every byte delivered) only to be sent.
        """
        out = self._out
        if out is None:
            return
        self._out = None
        transport: Any = self.transport
        sock = self._socket
        if (sock is not None and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
                and transport.connected and not transport.disconnecting):
            # (Pieces of 1 KiB or more on average: a topic's blocks.  Many
            # small ones, replies or single frames, are cheaper joined: 50
            # pieces of 21 bytes, 4.5 us by sendmsg against 1.4 joined.)
            scatter = self.scatter and 1 < len(out) <= MAX_PIECES and self._outSize >= len(out) << 10
            data = b"" if scatter else self.wire(out[0] if len(out) == 1 else b"".join(out))
            try:
                sent = sock.sendmsg(out) if scatter else sock.send(data)
            except OSError:
                # EAGAIN, or an error Twisted's own send will meet and report
                # (connectionLost): either way, Twisted's buffer takes it.
                sent = 0
            if sent == (self._outSize if scatter else len(data)):
                return
            data = (b"".join(out) if scatter else data)[sent:]
        else:
            data = self.wire(out[0] if len(out) == 1 else b"".join(out))
        transport.write(data)

    # Does wire() leave frames as they are (so that pieces may be sent as
    # they are)?  The TCP framer's does; a WebSocket's makes messages of them.
    scatter = False

    def _write(self, data: Union[bytes, List[bytes]]) -> None:
        self.service.stats.bytes_out += sum(map(len, data)) if type(data) is list else len(data)
        self.writeFrames(data)

    def _sendReply(self, reply) -> None:
        if not self._closing:
            body = reply.encode()
            self.service.stats.bytes_out += len(body) + 4
            self.sendFrame(body)

    def loseTransport(self) -> None:
        """Close once what is buffered is written (a framer may say goodbye first)."""
        self.flushOutput()  # (what the unit wrote goes before the close)
        self.transport.loseConnection()

    def _disconnect(self) -> None:
        """End the session, stop reading requests; close once what is buffered is written."""
        self.session.end()
        if not self._closing:
            self._closing = True
            self.paused = True  # the framer's frame loop stops here
            # With a producer registered the transport would wait for it
            # instead of closing once its buffer is written.
            self.transport.unregisterProducer()
            self.loseTransport()
            # A peer that does not read would keep the connection (and its
            # buffer) forever: give it a few seconds to take what is written.
            self._abort = self.factory.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)
