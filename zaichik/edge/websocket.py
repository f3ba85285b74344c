"""
The WebSocket framer (RFC 6455, subprotocol C{zaichik.v1}): each binary
message carries exactly one frame body, without the 4-byte length; a text
message is BAD_FRAME.  Everything else (limits, authentication, holds,
backpressure, the slow-consumer policy) is L{BrokerConnection}'s, as over
TCP.

    twistd zaichik --websocket-port 8890
    new WebSocket("ws://127.0.0.1:8890/", "zaichik.v1")

Written here rather than on C{twisted.web.websocket} (Twisted 25.5+) or
autobahn, for three reasons found when trying the former: its handshake
accepts no subprotocol (a browser that asks for C{zaichik.v1} gets none
back and fails the connection), it reassembles each message in memory
without a bound (--max-frame-size could not be enforced before a whole
message is held), and it delivers every message of a read whatever the
connection's read holds say.  The server's half of RFC 6455 is small: the
handshake (an HTTP/1.1 GET with Upgrade), and frames whose header is 2 to
14 bytes, masked from the client, unmasked to it.  This framer reads them in
one loop per read, as the TCP framer does, so a WebSocket costs little more
than TCP per message.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from twisted.internet.protocol import Factory

from zaichik import codec, speedups
from zaichik.codec import ErrorCode
from zaichik.edge.connection import BrokerConnection
from zaichik.edge.tcp import _tune, _untune, read_size
from zaichik.errors import ZaichikError
from zaichik.service import BrokerService

SUBPROTOCOL = "zaichik.v1"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Bytes of a handshake request at most (request line and headers).
MAX_HANDSHAKE = 16 * 1024
# Seconds a connection has to complete its handshake.
HANDSHAKE_TIMEOUT = 10.0

_length = struct.Struct(">I")
_u16 = struct.Struct(">H")
_u64 = struct.Struct(">Q")

# Opcodes (RFC 6455 section 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept answer to a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def encode_frame(opcode: int, payload: bytes, mask: Optional[bytes] = None) -> bytes:
    """One final WebSocket frame (masked with C{mask} where given, as a client sends)."""
    n = len(payload)
    first = 0x80 | opcode
    bit = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes((first, bit | n))
    elif n < 65536:
        header = bytes((first, bit | 126)) + _u16.pack(n)
    else:
        header = bytes((first, bit | 127)) + _u64.pack(n)
    if mask is None:
        return header + payload
    return header + mask + unmask(payload, mask)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR C{payload} with the 4-byte C{mask}, repeated (its own inverse)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * ((n + 3) // 4))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def masked_head(data: bytes, at: int, end: int) -> Optional[Tuple[int, int]]:
    """
    The payload length of the client frame at C{data[at]} and where its
    payload starts (past the 4-byte mask), or None while its header is not
    all before C{end}.
    """
    n = data[at + 1] & 0x7F
    if n == 126:
        if end - at < 4:
            return None
        return _u16.unpack_from(data, at + 2)[0], at + 8
    if n == 127:
        if end - at < 10:
            return None
        return _u64.unpack_from(data, at + 2)[0], at + 14
    return n, at + 6


def parse_ws_publish_run_py(
    data: bytes, at: int, end: int, limit: int
) -> Tuple[Dict[str, List[Tuple[Optional[bytes], bytes]]], int, int]:
    """
    L{codec.parse_publish_run_py} for a client's WebSocket messages: the run
    of whole, final, masked binary frames (0x82) of at most C{limit} bytes
    at C{data[at]}, before C{end}, each a perfectly formed PUBLISH body
    with rid 0: C{(entries by topic, count, where the run ends)}.  What is
    not in a run the framer reads frame by frame (and says what is wrong).
    The specification; L{parse_ws_publish_run} is the compiled twin.
    """
    groups: Dict[str, List[Tuple[Optional[bytes], bytes]]] = {}
    count = 0
    while end - at >= 2:
        first, second = data[at], data[at + 1]
        if first != 0x82 or not second & 0x80:
            break
        head = masked_head(data, at, end)
        if head is None:
            break
        n, start = head
        if n > limit or start + n > end:
            break
        if not codec.add_to_run(groups, unmask(data[start:start + n], data[start - 4:start])):
            break
        at = start + n
        count += 1
    return groups, count, at




def parse_messages(data: bytes) -> Tuple[List[Tuple[int, bytes]], int]:
    """
    Whole unfragmented frames at the start of C{data} (as a server sends
    them, or masked): C{([(opcode, payload), ...], bytes used)}.  For
    clients and tests.
    """
    out: List[Tuple[int, bytes]] = []
    at, end = 0, len(data)
    while end - at >= 2:
        opcode, n, start = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
        if n == 126:
            if end - at < 4:
                break
            n, start = _u16.unpack_from(data, at + 2)[0], at + 4
        elif n == 127:
            if end - at < 10:
                break
            n, start = _u64.unpack_from(data, at + 2)[0], at + 10
        masked = data[at + 1] & 0x80
        if masked:
            start += 4
        if start + n > end:
            break
        payload = data[start:start + n]
        out.append((opcode, unmask(payload, data[start - 4:start]) if masked else payload))
        at = start + n
    return out, at


def ws_frames_py(data: bytes) -> bytes:
    """
    Each length-prefixed frame of C{data} as one binary message from the
    server (not masked), one after another.  The specification of
    L{ws_frames} (compiled where built: this loop per message, as the
    reading one, held a WebSocket subscriber to well under TCP's rate).
    """
    n = len(data)
    if n >= 4:
        length = _length.unpack_from(data, 0)[0]
        if length + 4 == n:
            return _binary_header(length) + data[4:]
    out = []
    at = 0
    unpack = _length.unpack_from
    while at < n:
        length = unpack(data, at)[0]
        start = at + 4
        at = start + length
        out.append(_binary_header(length))
        out.append(data[start:at])
    return b"".join(out)


def _binary_header(n: int) -> bytes:
    if n < 126:
        return bytes((0x82, n))
    if n < 65536:
        return b"\x82\x7e" + _u16.pack(n)
    return b"\x82\x7f" + _u64.pack(n)


# The compiled twins, where built (see zaichik.speedups).
parse_ws_publish_run = parse_ws_publish_run_py
ws_frames = ws_frames_py
if speedups.compiled is not None:
    parse_ws_publish_run = speedups.compiled.parse_ws_publish_run
    ws_frames = speedups.compiled.ws_frames


class Origins:
    """
    Which pages may open a WebSocket (the browser sends their origin; other
    clients send none and are always let in: the check protects a user's
    browser from other sites, not the broker from programs, which --auth
    does).

    @ivar allowed: origins allowed by name (C{https://app.example.com}), or
        C{*} for any.  Empty (the default): pages from the listener's own
        host name, on any port, so that the console on the --metrics-port
        of the same host may connect.
    """

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        self.allowed = [origin.rstrip("/").lower() for origin in allowed]

    def allows(self, origin: Optional[str], host: Optional[str]) -> bool:
        if origin is None:
            return True
        origin = origin.rstrip("/").lower()
        if self.allowed:
            return "*" in self.allowed or origin in self.allowed
        if host is None:
            return False
        try:
            origin_host = urlsplit(origin).hostname
            own_host = urlsplit("//" + host).hostname
        except ValueError:
            return False
        return origin_host is not None and origin_host == own_host


class _HandshakeRefused(Exception):
    def __init__(self, status: str, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


def _parse_request(head: bytes) -> Tuple[str, Dict[str, str]]:
    """The request target and headers (names lower-cased, repeats joined with commas)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover (latin-1 decodes anything)
        raise _HandshakeRefused("400 Bad Request", "not HTTP") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1."):
        raise _HandshakeRefused("400 Bad Request", "a WebSocket handshake is an HTTP/1.1 GET")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise _HandshakeRefused("400 Bad Request", "a malformed header line")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return parts[1], headers


def _tokens(value: str) -> List[str]:
    return [token.strip().lower() for token in value.split(",") if token.strip()]


class WebSocketProtocol(BrokerConnection):
    """
    One WebSocket connection: the handshake, then binary messages in and
    out (see L{BrokerConnection} for everything else).
    """

    _handshaken = False
    _head = b""
    _message: Optional[List[bytes]] = None  # the pieces of a fragmented message
    _message_bytes = 0
    _message_text = False
    _handshake_timer = None
    origins = Origins()

    def connectionMade(self) -> None:
        # The broker's policy starts with the handshake done (L{start});
        # until then only the handshake's own bounds apply, and a broker at
        # its connection limit turns the handshake away at once.
        limit = self.service.limits.max_connections
        if self.service.connections >= limit:
            self._refuse(_HandshakeRefused("503 Service Unavailable", f"connection limit of {limit} reached"))
            return
        self._handshake_timer = self.factory.clock.callLater(HANDSHAKE_TIMEOUT, self.transport.abortConnection)
        # Reads that grow and an output mark as the TCP framer's (see
        # zaichik.edge.tcp): in Twisted's 64 KiB reads a publisher's unit of
        # work, delivery and send came 16 times as often (websocket.py).
        _tune(self.transport)

    def connectionLost(self, reason=None) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        _untune(self.transport)
        super().connectionLost(reason)

    # -- the handshake ---------------------------------------------------------

    def _handshake(self, data: bytes) -> bytes:
        """Read the handshake from C{data}; return what follows it (frames already sent)."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HANDSHAKE:
                self._refuse(_HandshakeRefused("431 Request Header Fields Too Large", "handshake too large"))
            return b""
        head, rest = self._head[:end], self._head[end + 4:]
        self._head = b""
        try:
            key, protocols = self._check(head)
        except _HandshakeRefused as e:
            self._refuse(e)
            return b""
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii") + b"\r\n"
            b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode("ascii") + b"\r\n\r\n")
        self._handshaken = True
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self.start()
        return rest

    def _check(self, head: bytes) -> Tuple[str, List[str]]:
        _, headers = _parse_request(head)
        if "websocket" not in _tokens(headers.get("upgrade", "")) or \
                "upgrade" not in _tokens(headers.get("connection", "")):
            raise _HandshakeRefused("426 Upgrade Required", "this port speaks WebSocket only")
        if headers.get("sec-websocket-version") != "13":
            raise _HandshakeRefused("426 Upgrade Required", "WebSocket version 13 only")
        key = headers.get("sec-websocket-key", "")
        try:
            if len(base64.b64decode(key, validate=True)) != 16:
                raise ValueError(key)
        except ValueError:
            raise _HandshakeRefused("400 Bad Request", "a bad Sec-WebSocket-Key") from None
        protocols = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        if SUBPROTOCOL not in protocols:
            raise _HandshakeRefused("400 Bad Request", f"ask for the subprotocol {SUBPROTOCOL}")
        if not self.origins.allows(headers.get("origin"), headers.get("host")):
            raise _HandshakeRefused("403 Forbidden", f"origin {headers.get('origin')} is not allowed "
                                                     f"(--websocket-origin)")
        return key, protocols

    def _refuse(self, error: _HandshakeRefused) -> None:
        body = (error.why + "\n").encode("utf-8")
        self.transport.write(f"HTTP/1.1 {error.status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1") + body)
        self._closing = True
        self.transport.loseConnection()

    # -- frames in -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._handshaken:
            data = self._handshake(data)
            if not self._handshaken or self._closing:
                return
        read_size(self.transport, data)
        joined = self.buffered(data)
        if joined is None:
            return
        data = joined
        end = len(data)
        at = 0
        limit = self.MAX_LENGTH
        handle = self.frameReceived
        needed = 0
        runs = self.session.may_publish_runs
        no_run_before = 0
        with self.service.work:
            while end - at >= 2 and not self.paused:
                first, second = data[at], data[at + 1]
                if runs and first == 0x82 and at >= no_run_before and self._message is None:
                    # Fire-and-forget PUBLISHes, one message after another:
                    # the run in one call, as the TCP framer does (unmasked
                    # and read in C where built: this loop per message kept
                    # a WebSocket at a quarter of TCP's rate).
                    after, published = self.publishRun(parse_ws_publish_run(data, at, end, limit))
                    if published:
                        at = after
                        continue
                    no_run_before = after
                head = masked_head(data, at, end)
                if head is None:
                    break
                n, start = head
                opcode = first & 0x0F
                if not second & 0x80 or first & 0x70:
                    self._unprocessed = b""
                    return self._protocolError("a client's frames are masked and use no extension")
                if opcode >= CLOSE:
                    if n > 125 or not first & 0x80:
                        self._unprocessed = b""
                        return self._protocolError("a control frame is 125 bytes at most, unfragmented")
                elif n > limit or self._message_bytes + n > limit:
                    self._unprocessed = b""
                    return self.frameTooLarge(self._message_bytes + n)
                if start + n > end:
                    needed = start + n - at
                    break
                payload = unmask(data[start:start + n], data[start - 4:start])
                at = start + n
                if first == 0x82:  # a whole binary message, the common case
                    if self._message is not None:
                        self._unprocessed = b""
                        return self._protocolError("a new message inside a fragmented one")
                    handle(payload)
                elif opcode >= CLOSE:
                    self._control(opcode, payload)
                else:
                    self._fragment(first, opcode, payload)
            self.keep(data[at:] if at else data, needed, at > 0, self._message_bytes)

    def _fragment(self, first: int, opcode: int, payload: bytes) -> None:
        """A frame of a fragmented message, or a text message."""
        if opcode == CONTINUATION:
            if self._message is None:
                return self._protocolError("a continuation frame outside a message")
        elif opcode in (TEXT, BINARY):
            if self._message is not None:
                return self._protocolError("a new message inside a fragmented one")
            self._message, self._message_bytes, self._message_text = [], 0, opcode == TEXT
        else:
            return self._protocolError(f"unknown opcode {opcode}")
        message = self._message
        assert message is not None
        if not self._message_text:
            message.append(payload)
        self._message_bytes += len(payload)
        if first & 0x80:  # the message's last frame
            text = self._message_text
            self._message, self._message_bytes, self._message_text = None, 0, False
            if text:
                self.session.fail(0, ZaichikError(
                    ErrorCode.BAD_FRAME, "a text message: each frame travels in one binary message"))
            else:
                self.frameReceived(b"".join(message))

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            self.flushOutput()  # (the PONG after what was answered before the PING)
            self.transport.write(encode_frame(PONG, payload))
        elif opcode == CLOSE:
            # The client closes: answer with its code, as RFC 6455 asks, and
            # close once what it is still owed is written.
            self._close_payload = payload[:2] if len(payload) >= 2 else b""
            self.session.end()
            self._disconnect()
        elif opcode != PONG:
            self._protocolError(f"unknown opcode {opcode}")

    def frameTooLarge(self, length: int) -> None:
        self._close_payload = _u16.pack(1009)  # message too big
        super().frameTooLarge(length)

    def _protocolError(self, why: str) -> None:
        self._close_payload = _u16.pack(1002)
        self.session.fail(0, ZaichikError(ErrorCode.BAD_FRAME, f"WebSocket protocol error: {why}"), close=True)

    # -- frames out ------------------------------------------------------------

    _close_payload = b"\x03\xe8"  # 1000: normal closure

    def wire(self, data: bytes) -> bytes:
        """Each length-prefixed frame of C{data} as one binary message."""
        return ws_frames(data)

    def loseTransport(self) -> None:
        self.flushOutput()
        if self._handshaken:
            self.transport.write(encode_frame(CLOSE, self._close_payload))
        self.transport.loseConnection()


class WebSocketFactory(Factory):
    """Builds a L{WebSocketProtocol} for each connection to one L{BrokerService}."""

    noisy = False

    def __init__(self, service: BrokerService, max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE,
                 origins: Sequence[str] = ()) -> None:
        self.service = service
        self.max_frame_size = max_frame_size
        self.origins = Origins(origins)
        self.clock = service.clock

    def buildProtocol(self, addr) -> WebSocketProtocol:
        protocol = WebSocketProtocol(self.service, self.max_frame_size)
        protocol.factory = self
        protocol.origins = self.origins
        return protocol
