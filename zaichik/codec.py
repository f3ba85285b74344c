"""
The zaichik wire protocol, version 1: frames to bytes and back.

This module is the only place that knows the byte layout of a frame (see
``docs/protocol.rst`` and ``protocol-v1.md``).  It has no networking in it, so
the broker, the client library, the tests and the benchmarks all share it.

A frame on the wire is a 4-byte big-endian length, then the body.  The
functions here deal in bodies; L{frame} adds the length prefix.

Decoding a request body returns one of the request classes below or raises
L{DecodeError}, which carries the error code and request id that the broker
must answer with.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import chain, repeat
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from zaichik import speedups

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
MAX_TOPIC_LENGTH = 249


class Opcode(IntEnum):
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
    SUBSCRIBE_GROUP = 0x0B  # version 1.1
    ACK = 0x0C  # version 1.1

    OK = 0x80
    ERROR = 0x81
    MESSAGE = 0x82
    PUBLISHED = 0x83
    TOPICS = 0x84
    PUBLISHED_BATCH = 0x85


class ErrorCode(IntEnum):
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


class Start(IntEnum):
    """Where a subscription begins."""

    DEFAULT = 0
    LATEST = 1
    OFFSET = 2
    EARLIEST = 3


class DecodeError(Exception):
    """
    A body that cannot be decoded.

    @ivar code: the L{ErrorCode} to answer with.
    @ivar rid: the request id to answer with (0 when the body is too short
        to hold one).
    @ivar message: a human-readable explanation.
    """

    def __init__(self, code: ErrorCode, rid: int, message: str) -> None:
        super().__init__(code, rid, message)
        self.code = code
        self.rid = rid
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


_TOPIC_RE = re.compile(rb"[A-Za-z0-9._/-]{1,%d}\Z" % MAX_TOPIC_LENGTH)


def is_valid_topic(name: str) -> bool:
    """
    Is C{name} a legal topic name: 1 to 249 bytes of C{A-Z a-z 0-9 . _ - /}?
    """
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        return False
    return _TOPIC_RE.match(raw) is not None


# A pattern's segments other than the wildcards: what a topic's may be,
# less the dot that separates them (an empty segment is one too: "a..b").
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_/-]*\Z")


def is_pattern(name: str) -> bool:
    """
    Is C{name} a wildcard pattern (version 1.1, SUBSCRIBE only): 1 to 249
    bytes that split on C{.} into segments, at least one of them a wildcard,
    where a segment that is exactly C{*} matches any one segment and a last
    segment that is exactly C{>} matches one or more, and every other
    segment is made of a topic name's characters?  A C{*} or C{>} anywhere
    else (inside a segment, C{>} not last) makes it no pattern (and, since
    neither character may be in a topic name, C{BAD_TOPIC}).
    """
    if not 0 < len(name) <= MAX_TOPIC_LENGTH:
        return False
    segments = name.split(".")
    wild = False
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == "*" or (segment == ">" and i == last):
            wild = True
        elif not _SEGMENT_RE.match(segment):
            return False
    return wild


# --- primitive encoders ------------------------------------------------------

_u8 = struct.Struct(">B")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")
_op_rid = struct.Struct(">BI")
_offset_dup = struct.Struct(">QB")


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return _u16.pack(len(raw)) + raw


def _key(value: Optional[bytes]) -> bytes:
    if not value:
        return b"\x00\x00"
    if len(value) > 0xFFFF:
        raise ValueError("key longer than 65535 bytes")
    return _u16.pack(len(value)) + value


def _blob(value: bytes) -> bytes:
    return _u32.pack(len(value)) + value


def frame(body: bytes) -> bytes:
    """Prefix C{body} with its 4-byte big-endian length."""
    return _u32.pack(len(body)) + body


# --- primitive decoder -------------------------------------------------------


class _Reader:
    """
    Reads fields from a body, raising L{DecodeError} for BAD_FRAME on any
    shortfall.  C{rid} is filled in as soon as it has been read so that errors
    after it carry it.
    """

    __slots__ = ("data", "pos", "rid")

    def __init__(self, data: bytes, pos: int = 1) -> None:
        self.data = data
        self.pos = pos
        self.rid = 0

    def fail(self, why: str) -> DecodeError:
        return DecodeError(ErrorCode.BAD_FRAME, self.rid, why)

    def _take(self, s: struct.Struct, what: str) -> int:
        end = self.pos + s.size
        if end > len(self.data):
            raise self.fail(f"truncated {what}")
        (value,) = s.unpack_from(self.data, self.pos)
        self.pos = end
        return value

    def u8(self, what: str) -> int:
        return self._take(_u8, what)

    def u16(self, what: str) -> int:
        return self._take(_u16, what)

    def u32(self, what: str) -> int:
        return self._take(_u32, what)

    def u64(self, what: str) -> int:
        return self._take(_u64, what)

    def read_rid(self) -> int:
        self.rid = self.u32("request id")
        return self.rid

    def raw(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise self.fail(f"truncated {what}")
        value = self.data[self.pos : end]
        self.pos = end
        return value

    def string(self, what: str) -> str:
        raw = self.raw(self.u16(what + " length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def key(self) -> Optional[bytes]:
        n = self.u16("key length")
        return self.raw(n, "key") if n else None

    def blob(self, what: str) -> bytes:
        return self.raw(self.u32(what + " length"), what)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} trailing bytes")


# --- requests (client to broker) ---------------------------------------------


@dataclass(slots=True)
class Hello:
    rid: int
    client_id: str = ""
    token: str = ""
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.HELLO, self.rid)
            + _u16.pack(self.version)
            + _string(self.client_id)
            + _string(self.token)
        )


@dataclass(slots=True)
class CreateTopic:
    rid: int
    topic: str
    retention_ttl: int = 0
    compaction_window: int = 0

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.CREATE_TOPIC, self.rid)
            + _string(self.topic)
            + _u64.pack(self.retention_ttl)
            + _u64.pack(self.compaction_window)
        )


@dataclass(slots=True)
class Subscribe:
    rid: int
    topic: str
    start: Start = Start.DEFAULT
    offset: int = 0
    max_inflight: int = 0

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.SUBSCRIBE, self.rid)
            + _string(self.topic)
            + _u8.pack(self.start)
            + _u64.pack(self.offset)
            + _u32.pack(self.max_inflight)
        )


@dataclass(slots=True)
class Unsubscribe:
    rid: int
    topic: str

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.UNSUBSCRIBE, self.rid) + _string(self.topic)


@dataclass(slots=True)
class Publish:
    rid: int
    topic: str
    value: bytes
    key: Optional[bytes] = None

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.PUBLISH, self.rid)
            + _string(self.topic)
            + _key(self.key)
            + _blob(self.value)
        )


@dataclass(slots=True)
class Commit:
    rid: int
    topic: str
    offset: int

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.COMMIT, self.rid)
            + _string(self.topic)
            + _u64.pack(self.offset)
        )


@dataclass(slots=True)
class Close:
    rid: int

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.CLOSE, self.rid)


@dataclass(slots=True)
class Ping:
    rid: int

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.PING, self.rid)


@dataclass(slots=True)
class ListTopics:
    rid: int

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.LIST_TOPICS, self.rid)


@dataclass(slots=True)
class PublishBatch:
    """
    C{entries} is a list of C{(key, value)} pairs; a key of C{None} is no key.
    """

    rid: int
    topic: str
    entries: List[Tuple[Optional[bytes], bytes]]

    def encode(self) -> bytes:
        parts = [
            _op_rid.pack(Opcode.PUBLISH_BATCH, self.rid),
            _string(self.topic),
            _u32.pack(len(self.entries)),
        ]
        for key, value in self.entries:
            parts.append(_key(key))
            parts.append(_blob(value))
        return b"".join(parts)


@dataclass(slots=True)
class SubscribeGroup:
    """SUBSCRIBE_GROUP (version 1.1): join C{group}, a consumer group of C{topic}."""

    rid: int
    topic: str
    group: str
    start: Start = Start.DEFAULT
    offset: int = 0
    max_inflight: int = 0
    ack_timeout: int = 0

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.SUBSCRIBE_GROUP, self.rid)
            + _string(self.topic)
            + _string(self.group)
            + _u8.pack(self.start)
            + _u64.pack(self.offset)
            + _u32.pack(self.max_inflight)
            + _u32.pack(self.ack_timeout)
        )


@dataclass(slots=True)
class Ack:
    """ACK (version 1.1): one message sent to this group member is done with."""

    rid: int
    topic: str
    offset: int

    def encode(self) -> bytes:
        return (
            _op_rid.pack(Opcode.ACK, self.rid)
            + _string(self.topic)
            + _u64.pack(self.offset)
        )


Request = Union[
    Hello,
    CreateTopic,
    Subscribe,
    Unsubscribe,
    Publish,
    Commit,
    Close,
    Ping,
    ListTopics,
    PublishBatch,
    SubscribeGroup,
    Ack,
]


def _decode_hello(r: _Reader) -> Hello:
    rid = r.read_rid()
    version = r.u16("version")
    client_id = r.string("client_id")
    token = r.string("token")
    return Hello(rid, client_id, token, version)


def _decode_create(r: _Reader) -> CreateTopic:
    rid = r.read_rid()
    return CreateTopic(rid, r.string("topic"), r.u64("retention_ttl"), r.u64("compaction_window"))


def _decode_subscribe(r: _Reader) -> Subscribe:
    rid = r.read_rid()
    topic = r.string("topic")
    start = r.u8("start")
    offset = r.u64("offset")
    max_inflight = r.u32("max_inflight")
    if start > Start.EARLIEST:
        raise r.fail(f"unknown start {start}")
    return Subscribe(rid, topic, Start(start), offset, max_inflight)


def _decode_unsubscribe(r: _Reader) -> Unsubscribe:
    rid = r.read_rid()
    return Unsubscribe(rid, r.string("topic"))


def _decode_publish(r: _Reader) -> Publish:
    rid = r.read_rid()
    topic = r.string("topic")
    key = r.key()
    value = r.blob("value")
    return Publish(rid, topic, value, key)


def _decode_commit(r: _Reader) -> Commit:
    rid = r.read_rid()
    return Commit(rid, r.string("topic"), r.u64("offset"))


def _decode_subscribe_group(r: _Reader) -> SubscribeGroup:
    rid = r.read_rid()
    topic = r.string("topic")
    group = r.string("group")
    start = r.u8("start")
    offset = r.u64("offset")
    max_inflight = r.u32("max_inflight")
    ack_timeout = r.u32("ack_timeout")
    if start > Start.EARLIEST:
        raise r.fail(f"unknown start {start}")
    return SubscribeGroup(rid, topic, group, Start(start), offset, max_inflight, ack_timeout)


def _decode_ack(r: _Reader) -> Ack:
    rid = r.read_rid()
    return Ack(rid, r.string("topic"), r.u64("offset"))


def _decode_publish_batch(r: _Reader) -> PublishBatch:
    rid = r.read_rid()
    topic = r.string("topic")
    count = r.u32("count")
    if count == 0:
        raise r.fail("a batch must hold at least one message")
    # Each entry is at least 6 bytes: refuse an impossible count before
    # looping over it, so a hostile count costs nothing.
    if count * 6 > len(r.data) - r.pos:
        raise r.fail(f"count {count} does not fit in the frame")
    entries = []
    for _ in range(count):
        key = r.key()
        entries.append((key, r.blob("value")))
    return PublishBatch(rid, topic, entries)


_REQUEST_DECODERS: Dict[int, Callable[[_Reader], Request]] = {
    Opcode.HELLO: _decode_hello,
    Opcode.CREATE_TOPIC: _decode_create,
    Opcode.SUBSCRIBE: _decode_subscribe,
    Opcode.UNSUBSCRIBE: _decode_unsubscribe,
    Opcode.PUBLISH: _decode_publish,
    Opcode.COMMIT: _decode_commit,
    Opcode.CLOSE: lambda r: Close(r.read_rid()),
    Opcode.PING: lambda r: Ping(r.read_rid()),
    Opcode.LIST_TOPICS: lambda r: ListTopics(r.read_rid()),
    Opcode.PUBLISH_BATCH: _decode_publish_batch,
    Opcode.SUBSCRIBE_GROUP: _decode_subscribe_group,
    Opcode.ACK: _decode_ack,
}


def _rid_or_zero(body: bytes) -> int:
    return _u32.unpack_from(body, 1)[0] if len(body) >= 5 else 0


_rid_u16 = struct.Struct(">IH")


def parse_publish_py(body: bytes) -> Optional[Tuple[int, str, Optional[bytes], bytes]]:
    """
    A PUBLISH body as C{(rid, topic, key, value)}, without the field-by-field
    reader: the broker's hot path.  Returns None for anything not perfectly
    formed; L{decode_request} then says what is wrong.

    This is the specification; L{parse_publish} is the compiled twin when
    it is built (see L{zaichik.speedups}).
    """
    try:
        rid, n = _rid_u16.unpack_from(body, 1)
        at = 7 + n
        topic = body[7:at].decode("utf-8")
        (n,) = _u16.unpack_from(body, at)
        key = body[at + 2 : at + 2 + n] if n else None
        at += 2 + n
        (n,) = _u32.unpack_from(body, at)
    except (struct.error, UnicodeDecodeError):
        return None
    at += 4
    if at + n != len(body):
        return None
    return rid, topic, key, body[at:]


def add_to_run(groups: Dict[str, List[Tuple[Optional[bytes], bytes]]], body: bytes) -> bool:
    """
    A run's next frame body: if a perfectly formed PUBLISH with rid 0, its
    C{(key, value)} added to its topic's entries in C{groups}, and True.
    """
    fields = parse_publish_py(body) if body[:1] == _PUBLISH_OPCODE else None
    if fields is None or fields[0]:
        return False
    _, topic, key, value = fields
    entries = groups.get(topic)
    if entries is None:
        groups[topic] = entries = []
    entries.append((key, value))
    return True


_PUBLISH_OPCODE = bytes((Opcode.PUBLISH,))


def parse_publish_run_py(
    data: bytes, at: int, end: int, limit: int
) -> Tuple[Dict[str, List[Tuple[Optional[bytes], bytes]]], int, int]:
    """
    The run of fire-and-forget PUBLISH frames that starts at C{data[at]}:
    whole frames before C{end}, each of at most C{limit} bytes, perfectly
    formed (as L{parse_publish_py} reads them) and with rid 0.  Returns
    C{(entries, count, at)}: each topic's C{(key, value)} entries in their
    order (topics in the order they first appear), how many frames, and
    where the run ends (the first frame not in it, or one not whole).

    The framer hands such a run to the session in one call
    (L{zaichik.session.Session.publish_run}).  This is the specification;
    L{parse_publish_run} is the compiled twin when it is built, whose
    entries (from a C{bytes} C{data}) are an C{Entries} each: the same
    pairs as a read-only sequence, kept as positions in C{data} (see
    L{ENTRIES}).
    """
    groups: Dict[str, List[Tuple[Optional[bytes], bytes]]] = {}
    count = 0
    unpack = _u32.unpack_from
    while end - at >= 4:
        (length,) = unpack(data, at)
        start = at + 4
        if length > limit or start + length > end or not add_to_run(groups, data[start : start + length]):
            break
        at = start + length
        count += 1
    return groups, count, at


def _publish_fast(body: bytes) -> Optional[Publish]:
    fields = parse_publish(body)
    if fields is None:
        return None
    rid, topic, key, value = fields
    return Publish(rid, topic, value, key)


def parse_publish_batch_py(body: bytes) -> Optional[Tuple[int, str, List[Tuple[Optional[bytes], bytes]]]]:
    """
    A PUBLISH_BATCH body as C{(rid, topic, entries)} on the hot path; None
    for anything not perfectly formed (see L{parse_publish_py}).  The
    specification of L{parse_publish_batch}, compiled where built.
    """
    unpack16 = _u16.unpack_from
    unpack32 = _u32.unpack_from
    try:
        rid, n = _rid_u16.unpack_from(body, 1)
        at = 7 + n
        topic = body[7:at].decode("utf-8")
        (count,) = unpack32(body, at)
        at += 4
        if not count or count * 6 > len(body) - at:
            return None
        entries: List[Tuple[Optional[bytes], bytes]] = []
        append = entries.append
        for _ in range(count):
            (n,) = unpack16(body, at)
            key = body[at + 2 : at + 2 + n] if n else None
            at += 2 + n
            (n,) = unpack32(body, at)
            at += 4
            append((key, body[at : at + n]))
            at += n
    except (struct.error, UnicodeDecodeError):
        return None
    if at != len(body):
        return None
    return rid, topic, entries


def _publish_batch_fast(body: bytes) -> Optional[PublishBatch]:
    fields = parse_publish_batch(body)
    if fields is None:
        return None
    return PublishBatch(*fields)


def decode_request(body: bytes) -> Request:
    """
    Decode one client-to-broker frame body.

    @raise DecodeError: BAD_FRAME for a body that does not parse,
        UNKNOWN_OPCODE for an opcode that is not a request.  For an unknown
        opcode the rid is read from bytes 1-4 when present, since every
        request starts with one.
    """
    if not body:
        raise DecodeError(ErrorCode.BAD_FRAME, 0, "empty frame")
    if body[0] == Opcode.PUBLISH:
        publish = _publish_fast(body)
        if publish is not None:
            return publish
    elif body[0] == Opcode.PUBLISH_BATCH:
        batch = _publish_batch_fast(body)
        if batch is not None:
            return batch
    decoder = _REQUEST_DECODERS.get(body[0])
    if decoder is None:
        raise DecodeError(
            ErrorCode.UNKNOWN_OPCODE, _rid_or_zero(body), f"unknown opcode 0x{body[0]:02x}"
        )
    r = _Reader(body)
    request = decoder(r)
    r.end()
    return request


# --- replies (broker to client) ----------------------------------------------


@dataclass(slots=True)
class Ok:
    rid: int

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.OK, self.rid)


@dataclass(slots=True)
class Error:
    rid: int
    code: int
    message: str = ""

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.ERROR, self.rid) + _u16.pack(self.code) + _string(self.message)


@dataclass(slots=True)
class Message:
    topic: str
    offset: int
    timestamp: int
    value: bytes
    key: Optional[bytes] = None

    def encode(self) -> bytes:
        return message_body(topic_prefix(self.topic), self.offset, self.timestamp, self.key, self.value)


@dataclass(slots=True)
class Published:
    rid: int
    offset: int
    duplicate: bool = False

    def encode(self) -> bytes:
        return _op_rid.pack(Opcode.PUBLISHED, self.rid) + _offset_dup.pack(
            self.offset, 1 if self.duplicate else 0
        )


@dataclass(slots=True)
class TopicInfo:
    name: str
    retention_ttl: int
    compaction_window: int
    next_offset: int
    retained: int
    subscribers: int


_topic_info_tail = struct.Struct(">QQQQI")


@dataclass(slots=True)
class Topics:
    rid: int
    topics: List[TopicInfo] = field(default_factory=list)

    def encode(self) -> bytes:
        parts = [_op_rid.pack(Opcode.TOPICS, self.rid), _u32.pack(len(self.topics))]
        for t in self.topics:
            parts.append(_string(t.name))
            parts.append(
                _topic_info_tail.pack(
                    t.retention_ttl, t.compaction_window, t.next_offset, t.retained, t.subscribers
                )
            )
        return b"".join(parts)


@dataclass(slots=True)
class PublishedBatch:
    """C{results} is a list of C{(offset, duplicate)} pairs, in publish order."""

    rid: int
    results: Sequence[Tuple[int, bool]] = field(default_factory=list)

    def encode(self) -> bytes:
        # (An acknowledged batch of 100 spent more on its reply, a tuple and
        # a struct call a message, than on its messages: see OffsetRun.)
        results = self.results
        if type(results) is OffsetRun:
            pairs = results.encode()
        else:
            pairs = _pairs_struct(len(results)).pack(*chain.from_iterable(results))
        return b"".join((_op_rid.pack(Opcode.PUBLISHED_BATCH, self.rid), _u32.pack(len(results)), pairs))


class OffsetRun(Sequence[Tuple[int, bool]]):
    """
    The results C{(offset, False)} of C{size} messages stored from offset
    C{first} on, in order, none a duplicate: what nearly every
    PUBLISHED_BATCH says (and a Redis script's results when none was a
    duplicate), kept as two numbers (no tuple a message, each made only if
    asked for) and encoded at once (L{encode}).  Equal to the list of the
    same pairs.
    """

    __slots__ = ("first", "size")

    def __init__(self, first: int, size: int) -> None:
        self.first = first
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Tuple[int, bool]]:
        return zip(range(self.first, self.first + self.size), repeat(False))

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [(self.first + i, False) for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        return (self.first + index % self.size, False)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OffsetRun):
            return list(self) == list(other)
        return isinstance(other, (list, tuple)) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OffsetRun({self.first}, {self.size})"

    def encode(self) -> bytes:
        """
        The C{size} pairs (u64 offset, u8 0) as PUBLISHED_BATCH carries
        them, by big-integer arithmetic: the pairs of offsets 0.. plus
        C{first} times the pairs of offsets all 1 (no field carries into the
        next: offsets stay below 2**64).  0.8 us for 100, against 5 us a
        struct call for all of them and 3 us more for their tuples.
        """
        count = self.size
        if self.first + count > 1 << 64:
            return _pairs_struct(count).pack(*chain.from_iterable(self))  # (a field would carry: struct.error)
        found = _runs.get(count)
        if found is None:
            pack = _pairs_struct(count).pack
            found = (int.from_bytes(pack(*chain.from_iterable(zip(range(count), repeat(0)))), "big"),
                     int.from_bytes(pack(*chain.from_iterable(zip(repeat(1, count), repeat(0)))), "big"))
            if len(_runs) < 256:
                _runs[count] = found
        base, ones = found
        return (base + self.first * ones).to_bytes(_offset_dup.size * count, "big")


_pairs: Dict[int, struct.Struct] = {}
_runs: Dict[int, Tuple[int, int]] = {}  # count -> (pairs of offsets 0.., pairs of offsets all 1) as integers


def _pairs_struct(count: int) -> struct.Struct:
    """The C{struct} of C{count} (offset, duplicate) pairs (cached: batches repeat their sizes)."""
    found = _pairs.get(count)
    if found is None:
        found = struct.Struct(">" + "QB" * count)
        if len(_pairs) < 1024:
            _pairs[count] = found
    return found


Reply = Union[Ok, Error, Message, Published, Topics, PublishedBatch]


def topic_prefix(topic: str) -> bytes:
    """The MESSAGE opcode and topic string: the same for every message of a topic."""
    return _u8.pack(Opcode.MESSAGE) + _string(topic)


_message_fixed = struct.Struct(">QQ")
_message_head_key = struct.Struct(">QQH")
_message_head_nokey = struct.Struct(">QQHI")


def message_frame_offsets(topic: str) -> Tuple[int, int]:
    """
    Where the offset and the timestamp sit in every MESSAGE frame (length
    prefix included) of C{topic}: storage reads them back from the frame
    rather than keeping them twice.
    """
    at = 4 + len(topic_prefix(topic))
    return at, at + 8


def message_frame_py(prefix: bytes, offset: int, timestamp: int, key: Optional[bytes], value: bytes) -> bytes:
    """
    A whole MESSAGE frame, length prefix included (see L{message_body}).
    The specification of L{message_frame} (compiled where built).
    """
    if key:
        key_len = len(key)
        size = len(prefix) + 22 + key_len + len(value)
        return b"".join((_u32.pack(size), prefix, _message_head_key.pack(offset, timestamp, key_len),
                         key, _u32.pack(len(value)), value))
    size = len(prefix) + 22 + len(value)
    return b"".join((_u32.pack(size), prefix,
                     _message_head_nokey.pack(offset, timestamp, 0, len(value)), value))


def message_frames_py(prefix: bytes, first: int, timestamp: int,
                      entries: List[Tuple[Optional[bytes], bytes]]) -> List[bytes]:
    """
    The MESSAGE frames of C{entries} (C{(key, value)} pairs) with offsets
    from C{first}, all at C{timestamp}: a batch stored at once.  The
    specification of L{message_frames}, compiled where built.
    """
    return [message_frame_py(prefix, first + i, timestamp, key, value) for i, (key, value) in enumerate(entries)]


def plain_message_frames_py(prefix: bytes, first: int, timestamp: int,
                            entries: List[Tuple[Optional[bytes], bytes]], max_body: int) -> Optional[List[bytes]]:
    """
    L{message_frames_py}'s result when no entry has a key (None or empty)
    and no frame's body is over C{max_body} bytes; else None, for the
    caller to take its careful path (L{zaichik.topic.Topic.publish_all}).
    The specification of L{plain_message_frames}, compiled where built.
    """
    if any(key for key, _ in entries):
        return None
    frames = message_frames_py(prefix, first, timestamp, entries)
    if frames and max(map(len, frames)) - 4 > max_body:
        return None
    return frames


def plain_message_block_py(prefix: bytes, first: int, timestamp: int,
                           entries: Sequence[Tuple[Optional[bytes], bytes]], max_body: int) -> Optional[bytes]:
    """
    L{plain_message_frames_py}'s frames one after another in one bytes (a
    block: see L{FrameBlock}), when there is at least one entry and each
    is a C{(None or b"", bytes)} tuple; else None (as for a key or a frame
    over C{max_body}).  The specification of L{plain_message_block},
    compiled where built.
    """
    memoryview(prefix)  # (refused first unless bytes-like, as the compiled twin asks for its buffer first)
    if not entries or not all(type(entry) is tuple and len(entry) == 2 and type(entry[1]) is bytes
                              and (entry[0] is None or (type(entry[0]) is bytes and not entry[0]))
                              for entry in entries):
        return None
    frames = plain_message_frames_py(prefix, first, timestamp, list(entries), max_body)
    return None if frames is None else b"".join(frames)


def split_frames_py(block: bytes) -> List[bytes]:
    """
    The length-prefixed frames of C{block}, each with its prefix; ValueError
    unless it is whole frames.  The specification of L{split_frames}.
    """
    frames = []
    at, end = 0, len(block)
    while at < end:
        if end - at < 4 or 4 + _u32.unpack_from(block, at)[0] > end - at:
            raise ValueError("not whole frames")
        size = 4 + _u32.unpack_from(block, at)[0]
        frames.append(block[at : at + size])
        at += size
    return frames


# The broker calls these once per published message (or batch): the
# compiled twins (zaichik/_speedups.c) when built, else the Python
# functions above, which specify them.
parse_publish: Callable[[bytes], Optional[Tuple[int, str, Optional[bytes], bytes]]] = parse_publish_py
parse_publish_batch: Callable[[bytes], Optional[Tuple[int, str, List[Tuple[Optional[bytes], bytes]]]]] = \
    parse_publish_batch_py
parse_publish_run: Callable[[bytes, int, int, int],
                            Tuple[Dict[str, List[Tuple[Optional[bytes], bytes]]], int, int]] = parse_publish_run_py
message_frame: Callable[[bytes, int, int, Optional[bytes], bytes], bytes] = message_frame_py
message_frames: Callable[[bytes, int, int, List[Tuple[Optional[bytes], bytes]]], List[bytes]] = message_frames_py
plain_message_frames: Callable[[bytes, int, int, List[Tuple[Optional[bytes], bytes]], int],
                               Optional[List[bytes]]] = plain_message_frames_py
plain_message_block: Callable[[bytes, int, int, Sequence[Tuple[Optional[bytes], bytes]], int],
                              Optional[bytes]] = plain_message_block_py
split_frames: Callable[[bytes], List[bytes]] = split_frames_py
if speedups.compiled is not None:
    parse_publish = speedups.compiled.parse_publish
    parse_publish_batch = speedups.compiled.parse_publish_batch
    parse_publish_run = speedups.compiled.parse_publish_run
    message_frame = speedups.compiled.message_frame
    message_frames = speedups.compiled.message_frames
    plain_message_frames = speedups.compiled.plain_message_frames
    plain_message_block = speedups.compiled.plain_message_block
    split_frames = speedups.compiled.split_frames

# What parse_publish_run gives for a topic's entries: a list, or (compiled,
# from a bytes read) its Entries, a sequence of the same (key, value) pairs
# kept as positions in the read, which plain_message_block takes as it is.
ENTRIES: Tuple[type, ...] = (list,) if speedups.compiled is None else (list, speedups.compiled.Entries)


class FrameBlock(Sequence[bytes]):
    """
    Consecutive MESSAGE frames (length prefixes included) as one bytes
    object, C{data}, that reads as the sequence of its frames.

    A topic that retains nothing stages a fire-and-forget run's frames as
    one block (L{plain_message_block}) and hands the unit's blocks (its
    C{chunks}) to its log and subscribers: a subscriber with room writes
    them as they are (a TCP connection in one C{sendmsg}, see
    L{zaichik.edge.connection.BrokerConnection.flushOutput}), a log that
    takes blocks (C{takes_blocks}) encodes from C{data}, the chunks joined.
    Anything that wants the frames one by one (an index, a slice, a loop,
    a consumer group) gets them, split once, on first use.  Why:
    with many topics a read, the frames as objects of their own outlived
    the caches before they were joined and sent (see
    L{zaichik.edge.tcp.READS_PER_UNIT}).
    """

    __slots__ = ("chunks", "_data", "_count", "_frames")

    def __init__(self, data: Union[bytes, List[bytes]], count: int) -> None:
        # C{data}: the frames in one bytes, or in several (each whole frames:
        # a unit's blocks, one a read), joined only if C{data} is asked for.
        if isinstance(data, bytes):
            self.chunks = [data]
            self._data: Optional[bytes] = data
        else:
            self.chunks = data
            self._data = data[0] if len(data) == 1 else None
        self._count = count
        self._frames: Optional[List[bytes]] = None

    @property
    def data(self) -> bytes:
        """The frames one after another, in one bytes."""
        data = self._data
        if data is None:
            data = self._data = b"".join(self.chunks)
            self.chunks = [data]  # (the pieces go: one copy of the frames is kept, not two)
        return data

    def __len__(self) -> int:
        return self._count

    def frames(self) -> List[bytes]:
        """The frames, one bytes each (split on first use, then kept)."""
        frames = self._frames
        if frames is None:
            frames = self._frames = split_frames(self.data)
        return frames

    def __getitem__(self, index):  # type: ignore[override]
        return self.frames()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.frames())

    def __repr__(self) -> str:
        return f"<FrameBlock of {self._count} frames, {sum(map(len, self.chunks))} bytes>"  # (not joined for it)


def joined(frames: Sequence[bytes]) -> bytes:
    """C{frames} one after another: a L{FrameBlock}'s data as it is."""
    if type(frames) is FrameBlock:
        return frames.data
    return frames[0] if len(frames) == 1 else b"".join(frames)


def message_body(prefix: bytes, offset: int, timestamp: int, key: Optional[bytes], value: bytes) -> bytes:
    """
    Encode a MESSAGE body from a L{topic_prefix}.  The broker calls this once
    per stored message and hands the same bytes to every subscriber.
    """
    return b"".join((prefix, _message_fixed.pack(offset, timestamp), _key(key), _blob(value)))


def _decode_message(r: _Reader) -> Message:
    topic = r.string("topic")
    offset = r.u64("offset")
    timestamp = r.u64("timestamp")
    key = r.key()
    value = r.blob("value")
    return Message(topic, offset, timestamp, value, key)


def _decode_error(r: _Reader) -> Error:
    rid = r.read_rid()
    return Error(rid, r.u16("code"), r.string("message"))


def _duplicate(r: _Reader) -> bool:
    flag = r.u8("duplicate")
    if flag > 1:
        raise r.fail(f"duplicate flag {flag} is neither 0 nor 1")
    return flag == 1


def _decode_published(r: _Reader) -> Published:
    rid = r.read_rid()
    offset = r.u64("offset")
    return Published(rid, offset, _duplicate(r))


def _decode_topics(r: _Reader) -> Topics:
    rid = r.read_rid()
    count = r.u32("count")
    topics = []
    for _ in range(count):
        name = r.string("topic")
        topics.append(
            TopicInfo(name, r.u64("retention_ttl"), r.u64("compaction_window"),
                      r.u64("next_offset"), r.u64("retained"), r.u32("subscribers"))
        )
    return Topics(rid, topics)


def _decode_published_batch(r: _Reader) -> PublishedBatch:
    rid = r.read_rid()
    count = r.u32("count")
    if count * _offset_dup.size > len(r.data) - r.pos:
        raise r.fail(f"count {count} does not fit in the frame")
    # (All the pairs in one struct call: a client decodes every reply.)
    values = _pairs_struct(count).unpack_from(r.data, r.pos)
    r.pos += count * _offset_dup.size
    flags = values[1::2]
    if count and max(flags) > 1:
        raise r.fail(f"duplicate flag {max(flags)} is neither 0 nor 1")
    return PublishedBatch(rid, list(zip(values[0::2], map(bool, flags))))


_REPLY_DECODERS: Dict[int, Callable[[_Reader], Reply]] = {
    Opcode.OK: lambda r: Ok(r.read_rid()),
    Opcode.ERROR: _decode_error,
    Opcode.MESSAGE: _decode_message,
    Opcode.PUBLISHED: _decode_published,
    Opcode.TOPICS: _decode_topics,
    Opcode.PUBLISHED_BATCH: _decode_published_batch,
}


def decode_reply(body: bytes) -> Reply:
    """
    Decode one broker-to-client frame body.

    @raise DecodeError: for a body that does not parse or an opcode that is
        not a reply.
    """
    if not body:
        raise DecodeError(ErrorCode.BAD_FRAME, 0, "empty frame")
    decoder = _REPLY_DECODERS.get(body[0])
    if decoder is None:
        raise DecodeError(ErrorCode.UNKNOWN_OPCODE, 0, f"unknown opcode 0x{body[0]:02x}")
    r = _Reader(body)
    reply = decoder(r)
    r.end()
    return reply
