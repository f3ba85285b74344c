"""
A tiny, independent implementation of the zaichik wire protocol v1 (with the
version 1.1 additions: SUBSCRIBE_GROUP and ACK), written from
``protocol-v1.md`` alone, for the conformance suite.

Nothing here imports the ``zaichik`` package: the point is to check the broker
against the spec text, the way a client author in another language would.

Encoding helpers build request *bodies* (opcode first); ``frame()`` adds the
4-byte big-endian length prefix.  ``decode()`` parses a broker-to-client body
strictly (truncation, trailing bytes and bad UTF-8 raise ``WireError``), so a
malformed reply from the broker fails the test that received it.

``Client`` is a blocking-socket client with timeouts.  MESSAGE frames and
replies are interleaved on the wire; ``Client`` keeps them in two queues so a
test can ask for "the next reply" or "the next message" independently.
"""

import errno
import socket
import struct
import time
from collections import deque
from types import SimpleNamespace

# --- opcodes ---------------------------------------------------------------

HELLO = 0x01
CREATE_TOPIC = 0x02
SUBSCRIBE = 0x03
UNSUBSCRIBE = 0x04
PUBLISH = 0x05
COMMIT = 0x06
CLOSE = 0x07
PING = 0x08
LIST_TOPICS = 0x09
PUBLISH_BATCH = 0x0A
SUBSCRIBE_GROUP = 0x0B  # version 1.1 ("Additions")
ACK = 0x0C  # version 1.1

OK = 0x80
ERROR = 0x81
MESSAGE = 0x82
PUBLISHED = 0x83
TOPICS = 0x84
PUBLISHED_BATCH = 0x85

OP_NAMES = {
    OK: "OK", ERROR: "ERROR", MESSAGE: "MESSAGE", PUBLISHED: "PUBLISHED",
    TOPICS: "TOPICS", PUBLISHED_BATCH: "PUBLISHED_BATCH",
}

# --- error codes -----------------------------------------------------------

BAD_FRAME = 1
UNKNOWN_OPCODE = 2
FRAME_TOO_LARGE = 3
BAD_TOPIC = 4
TOPIC_EXISTS = 5
NOT_SUBSCRIBED = 6
BAD_OFFSET = 7
UNSUPPORTED_VERSION = 8
NOT_AUTHORIZED = 9
ALREADY_SUBSCRIBED = 10
LIMIT = 11
PROTOCOL = 12
INTERNAL = 13

ERROR_NAMES = {
    1: "BAD_FRAME", 2: "UNKNOWN_OPCODE", 3: "FRAME_TOO_LARGE", 4: "BAD_TOPIC",
    5: "TOPIC_EXISTS", 6: "NOT_SUBSCRIBED", 7: "BAD_OFFSET",
    8: "UNSUPPORTED_VERSION", 9: "NOT_AUTHORIZED", 10: "ALREADY_SUBSCRIBED",
    11: "LIMIT", 12: "PROTOCOL", 13: "INTERNAL",
}

# --- subscribe starts ------------------------------------------------------

START_DEFAULT = 0
START_LATEST = 1
START_OFFSET = 2
START_EARLIEST = 3


class WireError(Exception):
    """A broker-to-client body that does not parse per the spec."""


class ConnectionClosed(Exception):
    """The broker closed the connection (EOF or reset)."""


# --- field encoders --------------------------------------------------------

def u8(n):
    return struct.pack(">B", n)


def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def u64(n):
    return struct.pack(">Q", n)


def _bytes(s):
    return s.encode("utf-8") if isinstance(s, str) else bytes(s)


def string(s):
    """u16 length + UTF-8 bytes.  Accepts raw bytes so tests can send bad UTF-8."""
    b = _bytes(s)
    return u16(len(b)) + b


def key(k):
    """u16 length + bytes; None (or b'') is 'no key' (length 0)."""
    b = b"" if k is None else _bytes(k)
    return u16(len(b)) + b


def blob(v):
    b = _bytes(v)
    return u32(len(b)) + b


def frame(body):
    return u32(len(body)) + body


# --- request bodies --------------------------------------------------------

def hello(rid, version=1, client_id="", token=""):
    return u8(HELLO) + u32(rid) + u16(version) + string(client_id) + string(token)


def create_topic(rid, topic, retention_ttl=0, compaction_window=0):
    return (u8(CREATE_TOPIC) + u32(rid) + string(topic)
            + u64(retention_ttl) + u64(compaction_window))


def subscribe(rid, topic, start=START_DEFAULT, offset=0, max_inflight=0):
    return (u8(SUBSCRIBE) + u32(rid) + string(topic) + u8(start)
            + u64(offset) + u32(max_inflight))


def unsubscribe(rid, topic):
    return u8(UNSUBSCRIBE) + u32(rid) + string(topic)


def publish(rid, topic, value, k=None):
    return u8(PUBLISH) + u32(rid) + string(topic) + key(k) + blob(value)


def commit(rid, topic, offset):
    return u8(COMMIT) + u32(rid) + string(topic) + u64(offset)


def close(rid):
    return u8(CLOSE) + u32(rid)


def ping(rid):
    return u8(PING) + u32(rid)


def list_topics(rid):
    return u8(LIST_TOPICS) + u32(rid)


def publish_batch(rid, topic, messages, count=None):
    """messages: list of (key_or_None, value).  count overrides the u32 count."""
    if count is None:
        count = len(messages)
    body = u8(PUBLISH_BATCH) + u32(rid) + string(topic) + u32(count)
    for k, v in messages:
        body += key(k) + blob(v)
    return body


def subscribe_group(rid, topic, group, start=START_DEFAULT, offset=0, max_inflight=0, ack_timeout=0):
    return (u8(SUBSCRIBE_GROUP) + u32(rid) + string(topic) + string(group) + u8(start)
            + u64(offset) + u32(max_inflight) + u32(ack_timeout))


def ack(rid, topic, offset):
    return u8(ACK) + u32(rid) + string(topic) + u64(offset)


# --- strict decoder --------------------------------------------------------

class _Reader(object):
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise WireError("truncated: need %d bytes at %d of %r"
                            % (n, self.pos, self.data))
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self):
        return struct.unpack(">B", self.take(1))[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def u64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def string(self):
        b = self.take(self.u16())
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("bad UTF-8 in string %r" % (b,))

    def key(self):
        b = self.take(self.u16())
        return b if b else None

    def blob(self):
        return self.take(self.u32())

    def end(self):
        if self.pos != len(self.data):
            raise WireError("trailing bytes %r" % (self.data[self.pos:],))


def decode(body):
    """Decode one broker-to-client body into a SimpleNamespace with .op/.name."""
    r = _Reader(body)
    op = r.u8()
    f = SimpleNamespace(op=op, name=OP_NAMES.get(op, hex(op)), raw=body)
    if op == OK:
        f.rid = r.u32()
    elif op == ERROR:
        f.rid = r.u32()
        f.code = r.u16()
        f.message = r.string()
        f.code_name = ERROR_NAMES.get(f.code, str(f.code))
    elif op == MESSAGE:
        f.topic = r.string()
        f.offset = r.u64()
        f.timestamp = r.u64()
        f.key = r.key()
        f.value = r.blob()
    elif op == PUBLISHED:
        f.rid = r.u32()
        f.offset = r.u64()
        f.duplicate = r.u8()
    elif op == TOPICS:
        f.rid = r.u32()
        n = r.u32()
        f.topics = []
        for _ in range(n):
            f.topics.append(SimpleNamespace(
                name=r.string(), retention_ttl=r.u64(),
                compaction_window=r.u64(), next_offset=r.u64(),
                retained=r.u64(), subscribers=r.u32()))
    elif op == PUBLISHED_BATCH:
        f.rid = r.u32()
        n = r.u32()
        f.results = [(r.u64(), r.u8()) for _ in range(n)]
    else:
        raise WireError("unknown broker opcode 0x%02x in %r" % (op, body))
    r.end()
    return f


def describe(f):
    if f is None:
        return "None"
    d = dict(vars(f))
    d.pop("raw", None)
    d.pop("op", None)
    return "%s(%s)" % (d.pop("name"), ", ".join(
        "%s=%r" % kv for kv in sorted(d.items())))


# --- blocking client -------------------------------------------------------

class Client(object):
    """A blocking socket client.  All waits are bounded by ``timeout``."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0):
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.messages = deque()   # MESSAGE frames not yet consumed
        self.replies = deque()    # non-MESSAGE frames not yet consumed
        self.closed = False

    # raw I/O

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, *bodies):
        """Frame and send one or more bodies in a single write."""
        self.sock.sendall(b"".join(frame(b) for b in bodies))

    def _fill(self, deadline):
        if self.closed:
            raise ConnectionClosed("connection already closed")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.closed = True
            raise ConnectionClosed("reset: %s" % (e,))
        except OSError as e:
            if isinstance(e, socket.timeout):
                raise
            if e.errno in (errno.ECONNRESET, errno.EPIPE):
                self.closed = True
                raise ConnectionClosed(str(e))
            raise
        if not data:
            self.closed = True
            raise ConnectionClosed("EOF")
        self.buf += data

    def read_body(self, timeout=None):
        """Next raw frame body off the wire (socket.timeout / ConnectionClosed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < 4:
            self._fill(deadline)
        (n,) = struct.unpack(">I", self.buf[:4])
        while len(self.buf) < 4 + n:
            self._fill(deadline)
        body = self.buf[4:4 + n]
        self.buf = self.buf[4 + n:]
        return body

    def read_frame(self, timeout=None):
        """Next decoded frame off the wire, ignoring the queues."""
        return decode(self.read_body(timeout))

    def _pump(self, deadline):
        f = self.read_frame(max(0.0, deadline - time.monotonic()))
        (self.messages if f.op == MESSAGE else self.replies).append(f)

    # queued access

    def reply(self, timeout=None):
        """The next non-MESSAGE frame; MESSAGE frames met on the way are queued."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.replies:
            self._pump(deadline)
        return self.replies.popleft()

    def message(self, timeout=None):
        """The next MESSAGE frame; replies met on the way are queued."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.messages:
            self._pump(deadline)
        return self.messages.popleft()

    def messages_n(self, n, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.message(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def request(self, body, timeout=None):
        self.send(body)
        return self.reply(timeout)

    def drain_messages(self, quiet=0.3):
        """Return queued MESSAGEs plus whatever arrives within ``quiet`` seconds."""
        out = []
        deadline = time.monotonic() + quiet
        while True:
            while self.messages:
                out.append(self.messages.popleft())
            try:
                self._pump(deadline)
            except socket.timeout:
                break
        while self.messages:
            out.append(self.messages.popleft())
        return out

    def wait_closed(self, timeout=None):
        """True if the broker closes the connection within ``timeout``.

        Frames that arrive before the close are queued as usual.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                self._pump(deadline)
        except ConnectionClosed:
            return True
        except socket.timeout:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
