"""
Tests for L{zaichik.codec}, written against C{protocol-v1.md}.

Runs under both C{python -m pytest tests/test_codec.py} and
C{python -m twisted.trial tests.test_codec}.

Three independent checks of the byte layout:

  - hand-written golden hex strings, computed from the spec text;
  - a tiny reference encoder in this file (L{SpecEncoder}), written from the
    spec tables with C{struct} only, compared against the codec for random
    inputs over full field ranges;
  - round-trips through C{decode_request} / C{decode_reply}.

Then rejection of every malformed shape, with the error code and rid the
broker must answer with.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import (
    Ack,
    Close,
    Commit,
    CreateTopic,
    DecodeError,
    Error,
    ErrorCode,
    Hello,
    ListTopics,
    Message,
    Ok,
    Opcode,
    Ping,
    Publish,
    PublishBatch,
    Published,
    PublishedBatch,
    Start,
    Subscribe,
    SubscribeGroup,
    TopicInfo,
    Topics,
    Unsubscribe,
    decode_reply,
    decode_request,
    frame,
    is_pattern,
    is_valid_topic,
    message_body,
    message_frame,
    message_frame_offsets,
    topic_prefix,
)

# Hypothesis: no deadline (CI machines vary), modest example counts so the
# whole module stays well under ten seconds, and no example database so the
# run leaves nothing behind in the work tree.
FAST = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(FAST, max_examples=400)

U8_MAX = 0xFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


def H(hexstring: str) -> bytes:
    """Bytes from a hex string that may contain spaces for readability."""
    return bytes.fromhex(hexstring.replace(" ", ""))


def rid_of(body: bytes) -> int:
    """The rid the spec says an error about C{body} carries."""
    return int.from_bytes(body[1:5], "big") if len(body) >= 5 else 0


# --- strategies -------------------------------------------------------------


def _uint(bits: int):
    top = (1 << bits) - 1
    # Make the boundaries frequent, not just possible.
    return st.one_of(st.sampled_from([0, 1, top - 1, top]), st.integers(0, top))


u8s = _uint(8)
u16s = _uint(16)
u32s = _uint(32)
u64s = _uint(64)
rids = u32s

# Strings: empty, ASCII, and arbitrary non-ASCII (multi-byte UTF-8, including
# astral-plane characters).  st.text() never yields lone surrogates, which
# cannot be encoded as UTF-8 at all.
NON_ASCII = st.sampled_from(["é", "€", "日本", "😀", "\u0000", "ß/ü", "a\u0301"])
strings = st.one_of(st.just(""), NON_ASCII, st.text(max_size=24))
TOPIC_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/"
valid_topics = st.text(alphabet=TOPIC_ALPHABET, min_size=1, max_size=30)
# The codec does not police topic names (the broker answers BAD_TOPIC), so it
# must carry any string, including empty and non-ASCII ones.
topics = st.one_of(valid_topics, strings)
keys = st.one_of(st.none(), st.binary(min_size=1, max_size=24))
values = st.one_of(st.just(b""), st.binary(max_size=48))
entries = st.tuples(keys, values)
batches = st.lists(entries, min_size=1, max_size=6)

hellos = st.builds(Hello, rids, strings, strings, u16s)
creates = st.builds(CreateTopic, rids, topics, u64s, u64s)
subscribes = st.builds(Subscribe, rids, topics, st.sampled_from(list(Start)), u64s, u32s)
unsubscribes = st.builds(Unsubscribe, rids, topics)
publishes = st.builds(Publish, rids, topics, values, keys)
commits = st.builds(Commit, rids, topics, u64s)
closes = st.builds(Close, rids)
pings = st.builds(Ping, rids)
list_topics = st.builds(ListTopics, rids)
publish_batches = st.builds(PublishBatch, rids, topics, batches)
subscribe_groups = st.builds(SubscribeGroup, rids, topics, topics, st.sampled_from(list(Start)), u64s, u32s, u32s)
acks = st.builds(Ack, rids, topics, u64s)

REQUEST_STRATEGIES = {
    "HELLO": hellos,
    "CREATE_TOPIC": creates,
    "SUBSCRIBE": subscribes,
    "UNSUBSCRIBE": unsubscribes,
    "PUBLISH": publishes,
    "COMMIT": commits,
    "CLOSE": closes,
    "PING": pings,
    "LIST_TOPICS": list_topics,
    "PUBLISH_BATCH": publish_batches,
    "SUBSCRIBE_GROUP": subscribe_groups,
    "ACK": acks,
}
requests = st.one_of(*REQUEST_STRATEGIES.values())

oks = st.builds(Ok, rids)
errors = st.builds(Error, rids, st.one_of(st.sampled_from(list(ErrorCode)), u16s), strings)
messages = st.builds(Message, topics, u64s, u64s, values, keys)
publisheds = st.builds(Published, rids, u64s, st.booleans())
topic_infos = st.builds(TopicInfo, topics, u64s, u64s, u64s, u64s, u32s)
topics_replies = st.builds(Topics, rids, st.lists(topic_infos, max_size=4))
published_batches = st.builds(
    PublishedBatch, rids, st.lists(st.tuples(u64s, st.booleans()), max_size=8)
)
REPLY_STRATEGIES = {
    "OK": oks,
    "ERROR": errors,
    "MESSAGE": messages,
    "PUBLISHED": publisheds,
    "TOPICS": topics_replies,
    "PUBLISHED_BATCH": published_batches,
}
replies = st.one_of(*REPLY_STRATEGIES.values())

REQUEST_OPCODES = set(range(0x01, 0x0D))  # (0x0B and 0x0C: version 1.1)
REPLY_OPCODES = set(range(0x80, 0x86))


# --- an independent encoder, from the spec tables alone ---------------------


class SpecEncoder:
    """
    Encodes every frame body straight from the tables in protocol-v1.md,
    using nothing from the codec but its dataclasses' attribute names.
    """

    @staticmethod
    def string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack(">H", len(raw)) + raw

    @staticmethod
    def key(k) -> bytes:
        k = k or b""
        return struct.pack(">H", len(k)) + k

    @staticmethod
    def blob(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    @classmethod
    def encode(cls, m) -> bytes:
        s, k, b, p = cls.string, cls.key, cls.blob, struct.pack
        if isinstance(m, Hello):
            return p(">BIH", 0x01, m.rid, m.version) + s(m.client_id) + s(m.token)
        if isinstance(m, CreateTopic):
            return p(">BI", 0x02, m.rid) + s(m.topic) + p(">QQ", m.retention_ttl, m.compaction_window)
        if isinstance(m, Subscribe):
            return p(">BI", 0x03, m.rid) + s(m.topic) + p(">BQI", m.start, m.offset, m.max_inflight)
        if isinstance(m, Unsubscribe):
            return p(">BI", 0x04, m.rid) + s(m.topic)
        if isinstance(m, Publish):
            return p(">BI", 0x05, m.rid) + s(m.topic) + k(m.key) + b(m.value)
        if isinstance(m, Commit):
            return p(">BI", 0x06, m.rid) + s(m.topic) + p(">Q", m.offset)
        if isinstance(m, Close):
            return p(">BI", 0x07, m.rid)
        if isinstance(m, Ping):
            return p(">BI", 0x08, m.rid)
        if isinstance(m, ListTopics):
            return p(">BI", 0x09, m.rid)
        if isinstance(m, PublishBatch):
            out = p(">BI", 0x0A, m.rid) + s(m.topic) + p(">I", len(m.entries))
            for key, value in m.entries:
                out += k(key) + b(value)
            return out
        if isinstance(m, SubscribeGroup):
            return (p(">BI", 0x0B, m.rid) + s(m.topic) + s(m.group)
                    + p(">BQII", m.start, m.offset, m.max_inflight, m.ack_timeout))
        if isinstance(m, Ack):
            return p(">BI", 0x0C, m.rid) + s(m.topic) + p(">Q", m.offset)
        if isinstance(m, Ok):
            return p(">BI", 0x80, m.rid)
        if isinstance(m, Error):
            return p(">BIH", 0x81, m.rid, m.code) + s(m.message)
        if isinstance(m, Message):
            return (
                p(">B", 0x82) + s(m.topic) + p(">QQ", m.offset, m.timestamp) + k(m.key) + b(m.value)
            )
        if isinstance(m, Published):
            return p(">BIQB", 0x83, m.rid, m.offset, 1 if m.duplicate else 0)
        if isinstance(m, Topics):
            out = p(">BII", 0x84, m.rid, len(m.topics))
            for t in m.topics:
                out += s(t.name) + p(
                    ">QQQQI", t.retention_ttl, t.compaction_window, t.next_offset, t.retained,
                    t.subscribers,
                )
            return out
        if isinstance(m, PublishedBatch):
            out = p(">BII", 0x85, m.rid, len(m.results))
            for offset, dup in m.results:
                out += p(">QB", offset, 1 if dup else 0)
            return out
        raise TypeError(m)


# --- golden bytes, computed by hand from the spec ---------------------------

# (object, hex of its body).  Each hex string was worked out from the field
# tables in protocol-v1.md: opcode, then rid u32, then the fields in order;
# string = u16 length + UTF-8; key = u16 length + bytes (0 = no key);
# blob = u32 length + bytes.
GOLDEN_REQUESTS = [
    # HELLO rid=1 version=1 client_id="c1" token=""
    (Hello(1, "c1", "", 1), "01 00000001 0001 0002 6331 0000"),
    # HELLO rid=2 version=1 client_id="é" (2 UTF-8 bytes) token="tok"
    (Hello(2, "é", "tok", 1), "01 00000002 0001 0002 c3a9 0003 746f6b"),
    # CREATE_TOPIC rid=2 "ab" retention_ttl=1000 compaction_window=u64 max
    (CreateTopic(2, "ab", 1000, U64_MAX), "02 00000002 0002 6162 00000000000003e8 ffffffffffffffff"),
    # SUBSCRIBE rid=3 "x" start=OFFSET offset=258 max_inflight=16
    (Subscribe(3, "x", Start.OFFSET, 258, 16), "03 00000003 0001 78 02 0000000000000102 00000010"),
    # SUBSCRIBE rid=3 "x" start=EARLIEST offset=0 max_inflight=u32 max
    (Subscribe(3, "x", Start.EARLIEST, 0, U32_MAX), "03 00000003 0001 78 03 0000000000000000 ffffffff"),
    # UNSUBSCRIBE rid=4 "x/y"
    (Unsubscribe(4, "x/y"), "04 00000004 0003 782f79"),
    # PUBLISH rid=7 topic "a" key b"k" value b"v"
    (Publish(7, "a", b"v", b"k"), "05 00000007 0001 61 0001 6b 00000001 76"),
    # PUBLISH rid=0 (fire-and-forget) topic "t", no key, empty value
    (Publish(0, "t", b"", None), "05 00000000 0001 74 0000 00000000"),
    # COMMIT rid=0x01020304 "t" offset=5
    (Commit(0x01020304, "t", 5), "06 01020304 0001 74 0000000000000005"),
    # CLOSE rid=u32 max
    (Close(U32_MAX), "07 ffffffff"),
    # PING rid=9
    (Ping(9), "08 00000009"),
    # LIST_TOPICS rid=10
    (ListTopics(10), "09 0000000a"),
    # PUBLISH_BATCH rid=11 "t" count=2: (key "k", value "v1"), (no key, empty value)
    (
        PublishBatch(11, "t", [(b"k", b"v1"), (None, b"")]),
        "0a 0000000b 0001 74 00000002 0001 6b 00000002 7631 0000 00000000",
    ),
    # SUBSCRIBE_GROUP rid=12 "jobs" group "w" start=EARLIEST offset=0 max_inflight=10 ack_timeout=5000
    (
        SubscribeGroup(12, "jobs", "w", Start.EARLIEST, 0, 10, 5000),
        "0b 0000000c 0004 6a6f6273 0001 77 03 0000000000000000 0000000a 00001388",
    ),
    # SUBSCRIBE_GROUP rid=u32 max "t" group "g" start=OFFSET offset=258 max_inflight=0 ack_timeout=u32 max
    (
        SubscribeGroup(U32_MAX, "t", "g", Start.OFFSET, 258, 0, U32_MAX),
        "0b ffffffff 0001 74 0001 67 02 0000000000000102 00000000 ffffffff",
    ),
    # ACK rid=13 "jobs" offset=7
    (Ack(13, "jobs", 7), "0c 0000000d 0004 6a6f6273 0000000000000007"),
]

GOLDEN_REPLIES = [
    # OK rid=7
    (Ok(7), "80 00000007"),
    # ERROR rid=7 code=BAD_TOPIC(4) message "bad"
    (Error(7, ErrorCode.BAD_TOPIC, "bad"), "81 00000007 0004 0003 626164"),
    # ERROR rid=0 code=FRAME_TOO_LARGE(3) message "é€": 2 + 3 UTF-8 bytes
    (Error(0, ErrorCode.FRAME_TOO_LARGE, "é€"), "81 00000000 0003 0005 c3a9e282ac"),
    # MESSAGE "t" offset=1 timestamp=0x0102030405060708 key "k" value "v" (no rid)
    (
        Message("t", 1, 0x0102030405060708, b"v", b"k"),
        "82 0001 74 0000000000000001 0102030405060708 0001 6b 00000001 76",
    ),
    # MESSAGE "t" offset=u64 max timestamp=0, no key, empty value
    (Message("t", U64_MAX, 0, b"", None), "82 0001 74 ffffffffffffffff 0000000000000000 0000 00000000"),
    # PUBLISHED rid=7 offset=42 duplicate=1
    (Published(7, 42, True), "83 00000007 000000000000002a 01"),
    # PUBLISHED rid=8 offset=0 duplicate=0
    (Published(8, 0, False), "83 00000008 0000000000000000 00"),
    # TOPICS rid=6 count=0
    (Topics(6, []), "84 00000006 00000000"),
    # TOPICS rid=5 count=1: "t" ttl=1 window=2 next_offset=3 retained=4 subscribers=5
    (
        Topics(5, [TopicInfo("t", 1, 2, 3, 4, 5)]),
        "84 00000005 00000001 0001 74 0000000000000001 0000000000000002"
        " 0000000000000003 0000000000000004 00000005",
    ),
    # PUBLISHED_BATCH rid=8 count=2: (0, dup 0), (u64 max, dup 1)
    (
        PublishedBatch(8, [(0, False), (U64_MAX, True)]),
        "85 00000008 00000002 0000000000000000 00 ffffffffffffffff 01",
    ),
]


def assertDecodeError(case, func, body, code, rid):
    """C{func(body)} raises L{DecodeError} with C{code} and C{rid}."""
    e = case.assertRaises(DecodeError, func, body)
    case.assertEqual(
        (e.code, e.rid), (code, rid), f"wrong error for body {body.hex()}: {e}"
    )
    case.assertIsInstance(e.code, ErrorCode)
    return e


class GoldenTests(SynchronousTestCase):
    """Byte-exact encodings, worked out by hand from the spec."""

    def test_requests_encode(self):
        for obj, hexed in GOLDEN_REQUESTS:
            self.assertEqual(obj.encode().hex(), H(hexed).hex(), obj)

    def test_requests_decode(self):
        for obj, hexed in GOLDEN_REQUESTS:
            decoded = decode_request(H(hexed))
            self.assertEqual(decoded, obj)
            self.assertIs(type(decoded), type(obj))

    def test_replies_encode(self):
        for obj, hexed in GOLDEN_REPLIES:
            self.assertEqual(obj.encode().hex(), H(hexed).hex(), obj)

    def test_replies_decode(self):
        for obj, hexed in GOLDEN_REPLIES:
            decoded = decode_reply(H(hexed))
            self.assertEqual(decoded, obj)
            self.assertIs(type(decoded), type(obj))

    def test_every_opcode_has_a_golden(self):
        """Each of the 18 frame types in the spec (16 of version 1, 2 of 1.1) is covered above."""
        seen = {H(hexed)[0] for _, hexed in GOLDEN_REQUESTS + GOLDEN_REPLIES}
        self.assertEqual(seen, REQUEST_OPCODES | REPLY_OPCODES)

    def test_opcode_and_error_code_values(self):
        """The enums carry the numbers in the spec's tables."""
        self.assertEqual(
            {o.name: o.value for o in Opcode},
            {
                "HELLO": 0x01, "CREATE_TOPIC": 0x02, "SUBSCRIBE": 0x03, "UNSUBSCRIBE": 0x04,
                "PUBLISH": 0x05, "COMMIT": 0x06, "CLOSE": 0x07, "PING": 0x08,
                "LIST_TOPICS": 0x09, "PUBLISH_BATCH": 0x0A, "SUBSCRIBE_GROUP": 0x0B, "ACK": 0x0C,
                "OK": 0x80, "ERROR": 0x81,
                "MESSAGE": 0x82, "PUBLISHED": 0x83, "TOPICS": 0x84, "PUBLISHED_BATCH": 0x85,
            },
        )
        self.assertEqual(
            [(c.name, c.value) for c in ErrorCode],
            [
                ("BAD_FRAME", 1), ("UNKNOWN_OPCODE", 2), ("FRAME_TOO_LARGE", 3),
                ("BAD_TOPIC", 4), ("TOPIC_EXISTS", 5), ("NOT_SUBSCRIBED", 6),
                ("BAD_OFFSET", 7), ("UNSUPPORTED_VERSION", 8), ("NOT_AUTHORIZED", 9),
                ("ALREADY_SUBSCRIBED", 10), ("LIMIT", 11), ("PROTOCOL", 12), ("INTERNAL", 13),
            ],
        )
        self.assertEqual([(s.name, s.value) for s in Start],
                         [("DEFAULT", 0), ("LATEST", 1), ("OFFSET", 2), ("EARLIEST", 3)])
        self.assertEqual(codec.PROTOCOL_VERSION, 1)
        self.assertEqual(codec.DEFAULT_MAX_FRAME_SIZE, 1048576)
        self.assertEqual(codec.MAX_TOPIC_LENGTH, 249)

    def test_frame_prefix(self):
        """frame() prepends a 4-byte unsigned big-endian body length."""
        self.assertEqual(frame(b""), H("00000000"))
        self.assertEqual(frame(H("08 00000009")), H("00000005 08 00000009"))
        body = b"x" * 300
        self.assertEqual(frame(body), H("0000012c") + body)
        body = b"\xff" * 0x10203
        self.assertEqual(frame(body)[:4], H("00010203"))
        self.assertEqual(frame(body)[4:], body)

    def test_message_body_from_topic_prefix(self):
        """topic_prefix is the opcode + topic string; message_body appends the rest."""
        prefix = topic_prefix("t")
        self.assertEqual(prefix, H("82 0001 74"))
        self.assertEqual(topic_prefix("é"), H("82 0002 c3a9"))
        self.assertEqual(
            message_body(prefix, 1, 0x0102030405060708, b"k", b"v"),
            H("82 0001 74 0000000000000001 0102030405060708 0001 6b 00000001 76"),
        )
        self.assertEqual(
            message_body(prefix, 0, 0, None, b""),
            H("82 0001 74 0000000000000000 0000000000000000 0000 00000000"),
        )

    def test_message_frame(self):
        """message_frame is the whole MESSAGE frame, length prefix included."""
        prefix = topic_prefix("t")
        self.assertEqual(
            message_frame(prefix, 1, 0x0102030405060708, b"k", b"v"),
            H("0000001c 82 0001 74 0000000000000001 0102030405060708 0001 6b 00000001 76"),
        )
        self.assertEqual(
            message_frame(prefix, U64_MAX, 0, None, b""),
            H("0000001a 82 0001 74 ffffffffffffffff 0000000000000000 0000 00000000"),
        )
        self.assertEqual(message_frame(prefix, 0, 0, b"", b"x"), message_frame(prefix, 0, 0, None, b"x"))
        # The offset and the timestamp sit where message_frame_offsets says.
        self.assertEqual(message_frame_offsets("t"), (8, 16))
        self.assertEqual(message_frame_offsets("é/x"), (4 + 1 + 2 + 4, 4 + 1 + 2 + 4 + 8))

    @FAST
    @given(topics, u64s, u64s, keys, values)
    def test_message_frame_matches_body(self, topic, offset, timestamp, key, value):
        prefix = topic_prefix(topic)
        whole = message_frame(prefix, offset, timestamp, key, value)
        body = message_body(prefix, offset, timestamp, key, value)
        self.assertEqual(whole, frame(body))
        self.assertEqual(decode_reply(whole[4:]), Message(topic, offset, timestamp, value, key))
        at_offset, at_timestamp = message_frame_offsets(topic)
        self.assertEqual(int.from_bytes(whole[at_offset : at_offset + 8], "big"), offset)
        self.assertEqual(int.from_bytes(whole[at_timestamp : at_timestamp + 8], "big"), timestamp)

    def test_empty_key_is_no_key(self):
        """A zero-length key is 'no key': b'' encodes like None, and decodes to None."""
        self.assertEqual(Publish(1, "t", b"v", b"").encode(), Publish(1, "t", b"v", None).encode())
        self.assertIsNone(decode_request(H("05 00000001 0001 74 0000 00000001 76")).key)
        self.assertEqual(
            message_body(topic_prefix("t"), 0, 0, b"", b""), message_body(topic_prefix("t"), 0, 0, None, b"")
        )

    def test_key_may_hold_any_bytes(self):
        """Keys and values are raw bytes, not UTF-8: invalid UTF-8 there is fine."""
        body = H("05 00000003 0001 74 0002 ff00 00000003 c3ffed")
        self.assertEqual(decode_request(body), Publish(3, "t", H("c3ffed"), H("ff00")))

    def test_long_fields(self):
        """Length fields use their full unsigned range (u16 strings/keys, u32 blobs)."""
        topic = "a" * U16_MAX
        key = b"\x01" * U16_MAX
        value = b"\x02" * 0x10001
        body = Publish(1, topic, value, key).encode()
        self.assertEqual(body[5:7], H("ffff"))
        self.assertEqual(body[7 + U16_MAX : 9 + U16_MAX], H("ffff"))
        self.assertEqual(body[9 + 2 * U16_MAX : 13 + 2 * U16_MAX], H("00010001"))
        self.assertEqual(len(body), 13 + 2 * U16_MAX + 0x10001)
        self.assertEqual(decode_request(body), Publish(1, topic, value, key))

    def test_encoder_refuses_oversized_strings_and_keys(self):
        """A string or key over 65535 bytes cannot be encoded in a u16 length."""
        self.assertRaises(ValueError, Hello(1, "x" * 65536).encode)
        # 21846 three-byte characters is 65538 bytes: the limit is in bytes.
        self.assertRaises(ValueError, Unsubscribe(1, "€" * 21846).encode)
        self.assertRaises(ValueError, Publish(1, "t", b"", b"k" * 65536).encode)
        self.assertRaises(ValueError, Error(1, 1, "m" * 65536).encode)


class RoundTripTests(SynchronousTestCase):
    """encode() then decode gives an equal object, and matches the spec encoder."""

    def _request(self, req):
        body = req.encode()
        self.assertIsInstance(body, bytes)
        self.assertEqual(body.hex(), SpecEncoder.encode(req).hex())
        decoded = decode_request(body)
        self.assertIs(type(decoded), type(req))
        self.assertEqual(decoded, req)
        # Request encodings are canonical: re-encoding gives the same bytes.
        self.assertEqual(decoded.encode(), body)

    def _reply(self, rep):
        body = rep.encode()
        self.assertIsInstance(body, bytes)
        self.assertEqual(body.hex(), SpecEncoder.encode(rep).hex())
        decoded = decode_reply(body)
        self.assertIs(type(decoded), type(rep))
        self.assertEqual(decoded, rep)
        self.assertEqual(decoded.encode(), body)

    @FAST
    @given(hellos)
    @example(Hello(U32_MAX, "", "", U16_MAX))
    @example(Hello(0, "日本😀", "é", 0))
    def test_hello(self, req):
        self._request(req)

    @FAST
    @given(creates)
    @example(CreateTopic(U32_MAX, "a", U64_MAX, U64_MAX))
    @example(CreateTopic(0, "", 0, 0))
    def test_create_topic(self, req):
        self._request(req)

    @FAST
    @given(subscribes)
    @example(Subscribe(U32_MAX, "t", Start.EARLIEST, U64_MAX, U32_MAX))
    def test_subscribe(self, req):
        self._request(req)
        self.assertIsInstance(decode_request(req.encode()).start, Start)

    @FAST
    @given(unsubscribes)
    @example(Unsubscribe(0, ""))
    def test_unsubscribe(self, req):
        self._request(req)

    @FAST
    @given(publishes)
    @example(Publish(U32_MAX, "é", b"", None))
    @example(Publish(0, "t", b"\x00", b"\x00"))
    def test_publish(self, req):
        self._request(req)

    @FAST
    @given(commits)
    @example(Commit(U32_MAX, "t", U64_MAX))
    def test_commit(self, req):
        self._request(req)

    @FAST
    @given(st.one_of(closes, pings, list_topics))
    @example(Close(U32_MAX))
    @example(Ping(0))
    @example(ListTopics(U32_MAX))
    def test_close_ping_list_topics(self, req):
        self._request(req)

    @FAST
    @given(publish_batches)
    @example(PublishBatch(U32_MAX, "t", [(None, b"")]))
    @example(PublishBatch(0, "t", [(b"k", b"v")] * 6))
    def test_publish_batch(self, req):
        self._request(req)
        self.assertEqual(len(decode_request(req.encode()).entries), len(req.entries))

    @FAST
    @given(subscribe_groups)
    @example(SubscribeGroup(U32_MAX, "t", "g", Start.EARLIEST, U64_MAX, U32_MAX, U32_MAX))
    @example(SubscribeGroup(0, "", "", Start.DEFAULT, 0, 0, 0))
    def test_subscribe_group(self, req):
        self._request(req)
        self.assertIsInstance(decode_request(req.encode()).start, Start)

    @FAST
    @given(acks)
    @example(Ack(U32_MAX, "t", U64_MAX))
    @example(Ack(0, "", 0))
    def test_ack(self, req):
        self._request(req)

    @FAST
    @given(oks)
    @example(Ok(U32_MAX))
    def test_ok(self, rep):
        self._reply(rep)

    @FAST
    @given(errors)
    @example(Error(U32_MAX, U16_MAX, ""))
    def test_error(self, rep):
        self._reply(rep)

    @FAST
    @given(messages)
    @example(Message("", U64_MAX, U64_MAX, b"", None))
    def test_message(self, rep):
        self._reply(rep)
        # The broker's fast path produces the same bytes.
        self.assertEqual(
            message_body(topic_prefix(rep.topic), rep.offset, rep.timestamp, rep.key, rep.value),
            rep.encode(),
        )

    @FAST
    @given(publisheds)
    @example(Published(U32_MAX, U64_MAX, True))
    def test_published(self, rep):
        self._reply(rep)

    @FAST
    @given(topics_replies)
    @example(Topics(U32_MAX, [TopicInfo("é", U64_MAX, U64_MAX, U64_MAX, U64_MAX, U32_MAX)]))
    def test_topics(self, rep):
        self._reply(rep)

    @FAST
    @given(published_batches)
    @example(PublishedBatch(0, []))
    def test_published_batch(self, rep):
        self._reply(rep)


class OffsetRunTests(SynchronousTestCase):
    """A PUBLISHED_BATCH's results as OffsetRun: the same pairs, the same bytes, as the plain list."""

    @settings(max_examples=300, deadline=None)
    @given(rids, st.integers(0, U64_MAX), st.integers(0, 300))
    def test_same_as_the_list(self, rid, first, size):
        size = min(size, U64_MAX + 1 - first)  # (offsets are u64s)
        run = codec.OffsetRun(first, size)
        plain = [(first + i, False) for i in range(size)]
        self.assertEqual(run, plain)
        self.assertEqual(plain, run)
        self.assertEqual((len(run), list(run), run[:3]), (size, plain, plain[:3]))
        if size:
            self.assertEqual((run[0], run[-1], run[size // 2]), (plain[0], plain[-1], plain[size // 2]))
        self.assertRaises(IndexError, run.__getitem__, size)
        encoded = PublishedBatch(rid, run).encode()
        self.assertEqual(encoded, PublishedBatch(rid, plain).encode())
        self.assertEqual(codec.decode_reply(encoded), PublishedBatch(rid, plain))

    def test_not_equal_to_other_pairs(self):
        self.assertNotEqual(codec.OffsetRun(5, 2), [(5, False), (6, True)])
        self.assertNotEqual(codec.OffsetRun(5, 2), codec.OffsetRun(5, 3))
        self.assertNotEqual(codec.OffsetRun(5, 0), None)
        self.assertEqual(codec.OffsetRun(5, 0), codec.OffsetRun(9, 0))


class RejectionTests(SynchronousTestCase):
    """Malformed request bodies raise DecodeError with the right code and rid."""

    def test_empty_body(self):
        assertDecodeError(self, decode_request, b"", ErrorCode.BAD_FRAME, 0)
        assertDecodeError(self, decode_reply, b"", ErrorCode.BAD_FRAME, 0)

    def test_too_short_for_rid(self):
        """A known opcode with 0 to 3 rid bytes: BAD_FRAME, rid 0."""
        for op in sorted(REQUEST_OPCODES):
            for tail in (b"", b"\x00", b"\xff\xff", b"\x01\x02\x03"):
                assertDecodeError(self, decode_request, bytes([op]) + tail, ErrorCode.BAD_FRAME, 0)

    def test_rid_only(self):
        """Exactly opcode + rid: complete for CLOSE/PING/LIST_TOPICS, truncated otherwise."""
        for op in sorted(REQUEST_OPCODES):
            body = bytes([op]) + H("0a0b0c0d")
            if op in (0x07, 0x08, 0x09):
                self.assertEqual(decode_request(body).rid, 0x0A0B0C0D)
            else:
                assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 0x0A0B0C0D)

    def test_golden_truncated_at_every_byte(self):
        for _obj, hexed in GOLDEN_REQUESTS:
            body = H(hexed)
            for n in range(1, len(body)):
                want = int.from_bytes(body[1:5], "big") if n >= 5 else 0
                assertDecodeError(self, decode_request, body[:n], ErrorCode.BAD_FRAME, want)

    @FAST
    @given(requests)
    def test_truncated_at_every_byte(self, req):
        """Every strict, non-empty prefix of a valid request is BAD_FRAME."""
        body = req.encode()
        for n in range(1, len(body)):
            assertDecodeError(
                self, decode_request, body[:n], ErrorCode.BAD_FRAME, req.rid if n >= 5 else 0
            )

    @FAST
    @given(replies)
    def test_reply_truncated_at_every_byte(self, rep):
        body = rep.encode()
        for n in range(1, len(body)):
            e = self.assertRaises(DecodeError, decode_reply, body[:n])
            self.assertEqual(e.code, ErrorCode.BAD_FRAME)

    @FAST
    @given(requests, st.binary(min_size=1, max_size=16))
    @example(Close(0x01020304), b"\x00")
    @example(PublishBatch(9, "t", [(None, b"")]), b"\x00\x00\x00\x00\x00\x00")
    def test_trailing_bytes(self, req, extra):
        """Bytes after the last field: BAD_FRAME carrying the rid."""
        assertDecodeError(self, decode_request, req.encode() + extra, ErrorCode.BAD_FRAME, req.rid)

    @FAST
    @given(replies, st.binary(min_size=1, max_size=16))
    def test_reply_trailing_bytes(self, rep, extra):
        e = self.assertRaises(DecodeError, decode_reply, rep.encode() + extra)
        self.assertEqual(e.code, ErrorCode.BAD_FRAME)

    BAD_UTF8 = [
        b"\xff",  # never valid
        b"\x80",  # lone continuation byte
        b"\xc3",  # truncated two-byte sequence
        b"a\xc3(",  # bad continuation
        b"\xc0\xaf",  # overlong '/'
        b"\xed\xa0\x80",  # UTF-16 surrogate U+D800
        b"\xf4\x90\x80\x80",  # above U+10FFFF
        b"abc\xfe",
    ]

    def test_invalid_utf8_in_every_string_field(self):
        s = SpecEncoder
        for bad in self.BAD_UTF8:
            raw = struct.pack(">H", len(bad)) + bad
            rid = 0x00ABCDEF
            bodies = [
                # HELLO client_id, then token
                struct.pack(">BIH", 1, rid, 1) + raw + s.string("tok"),
                struct.pack(">BIH", 1, rid, 1) + s.string("c") + raw,
                struct.pack(">BI", 2, rid) + raw + struct.pack(">QQ", 0, 0),
                struct.pack(">BI", 3, rid) + raw + struct.pack(">BQI", 0, 0, 0),
                struct.pack(">BI", 4, rid) + raw,
                struct.pack(">BI", 5, rid) + raw + s.key(b"k") + s.blob(b"v"),
                struct.pack(">BI", 6, rid) + raw + struct.pack(">Q", 0),
                struct.pack(">BI", 10, rid) + raw + struct.pack(">I", 1) + s.key(None) + s.blob(b""),
            ]
            for body in bodies:
                assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, rid)
            # Replies too: ERROR message, MESSAGE topic, TOPICS name.
            for body in [
                struct.pack(">BIH", 0x81, rid, 1) + raw,
                struct.pack(">B", 0x82) + raw + struct.pack(">QQ", 0, 0) + s.key(None) + s.blob(b""),
                struct.pack(">BII", 0x84, rid, 1) + raw + struct.pack(">QQQQI", 0, 0, 0, 0, 0),
            ]:
                e = self.assertRaises(DecodeError, decode_reply, body)
                self.assertEqual(e.code, ErrorCode.BAD_FRAME)

    def test_unknown_opcodes(self):
        """
        Every byte that is not a request opcode, including the reply opcodes,
        is UNKNOWN_OPCODE; the rid comes from bytes 1-4 when present, else 0.
        """
        unknown = [op for op in range(256) if op not in REQUEST_OPCODES]
        self.assertEqual(len(unknown), 244)
        self.assertTrue(REPLY_OPCODES <= set(unknown))
        for op in unknown:
            assertDecodeError(self, decode_request, bytes([op]), ErrorCode.UNKNOWN_OPCODE, 0)
            assertDecodeError(self, decode_request, bytes([op]) + H("0102"), ErrorCode.UNKNOWN_OPCODE, 0)
            assertDecodeError(
                self, decode_request, bytes([op]) + H("01020304"), ErrorCode.UNKNOWN_OPCODE, 0x01020304
            )
            assertDecodeError(
                self, decode_request, bytes([op]) + H("ffffffff") + b"junk", ErrorCode.UNKNOWN_OPCODE,
                U32_MAX,
            )

    def test_valid_replies_sent_as_requests(self):
        """A well-formed reply body sent to the broker is UNKNOWN_OPCODE with its rid."""
        for _obj, hexed in GOLDEN_REPLIES:
            body = H(hexed)
            assertDecodeError(self, decode_request, body, ErrorCode.UNKNOWN_OPCODE, rid_of(body))

    def test_requests_sent_as_replies(self):
        for _obj, hexed in GOLDEN_REQUESTS:
            e = self.assertRaises(DecodeError, decode_reply, H(hexed))
            self.assertEqual(e.code, ErrorCode.UNKNOWN_OPCODE)
        for op in range(256):
            if op not in REPLY_OPCODES:
                e = self.assertRaises(DecodeError, decode_reply, bytes([op]) + b"\x00" * 8)
                self.assertEqual(e.code, ErrorCode.UNKNOWN_OPCODE)

    def test_subscribe_start_out_of_range(self):
        for start in (4, 5, 0x7F, 0x80, U8_MAX):
            body = H("03 00000021 0001 74") + bytes([start]) + H("0000000000000000 00000000")
            assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 0x21)
        for start in range(4):
            body = H("03 00000021 0001 74") + bytes([start]) + H("0000000000000000 00000000")
            self.assertEqual(decode_request(body).start, Start(start))

    def test_subscribe_group_start_out_of_range(self):
        for start in (4, 0x80, U8_MAX):
            body = H("0b 00000021 0001 74 0001 67") + bytes([start]) + H("0000000000000000 00000000 00000000")
            assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 0x21)
        body = H("0b 00000021 0001 74 0001 67 01 0000000000000000 00000000 00000000")
        self.assertEqual(decode_request(body), SubscribeGroup(0x21, "t", "g", Start.LATEST))

    def test_publish_batch_count_zero(self):
        body = H("0a 00000005 0001 74 00000000")
        assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 5)

    def test_publish_batch_count_exceeds_entries(self):
        one = H("0001 6b 00000001 76")  # key "k", value "v"
        base = H("0a 00000006 0001 74")
        self.assertEqual(
            decode_request(base + H("00000002") + one + one),
            PublishBatch(6, "t", [(b"k", b"v"), (b"k", b"v")]),
        )
        for count in (3, 4, 100, 0x10000, 0x7FFFFFFF):
            body = base + struct.pack(">I", count) + one + one
            assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 6)
        # Passes a "6 bytes per entry" size check but the first entry's blob
        # eats the bytes the second entry needs.
        body = base + H("00000002") + H("0000 00000006") + b"\x00" * 6
        assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 6)
        # Fewer entries claimed than present: trailing bytes.
        body = base + H("00000001") + one + one
        assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 6)

    def count_reads(self, method: str):
        """Count calls of one of the decoder's field readers during a test."""
        calls = []
        original = getattr(codec._Reader, method)

        def counting(reader, *args):
            calls.append(args)
            return original(reader, *args)

        self.patch(codec._Reader, method, counting)
        return calls

    def test_publish_batch_hostile_count_fails_fast(self):
        """
        A count that cannot fit fails at once, without walking the entries,
        even with a max-size frame of valid-looking entries behind it: no
        entry is read.  (Structural, not timed: the suite asserts no speeds.)
        """
        filler = b"\x00" * (codec.DEFAULT_MAX_FRAME_SIZE - 12)  # 174760 empty entries + 4
        cases = [
            H("0a 00000007 0001 74 ffffffff"),
            H("0a 00000007 0001 74 ffffffff 0000 00000000"),
            H("0a 00000007 0001 74 ffffffff") + filler,
            H("0a 00000007 0001 74") + struct.pack(">I", codec.DEFAULT_MAX_FRAME_SIZE) + filler,
            H("0a 00000007 0001 74") + struct.pack(">I", len(filler) // 6 + 1) + filler,
        ]
        keys_read = self.count_reads("key")
        for body in cases:
            assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 7)
        self.assertEqual(keys_read, [])

    def test_publish_batch_of_minimal_entries(self):
        """Entries are at least 6 bytes (empty key + empty value); exactly that many fit."""
        filler = b"\x00" * 6000
        req = decode_request(H("0a 00000007 0001 74") + struct.pack(">I", 1000) + filler)
        self.assertEqual(req, PublishBatch(7, "t", [(None, b"")] * 1000))

    def test_published_batch_hostile_count_fails_fast(self):
        """The client's decoder also refuses an impossible count up front (see above)."""
        filler = b"\x00" * (codec.DEFAULT_MAX_FRAME_SIZE - 9)
        offsets_read = self.count_reads("u64")
        for body in (
            H("85 00000007 ffffffff"),
            H("85 00000007 ffffffff") + filler,
            H("85 00000007") + struct.pack(">I", len(filler) // 9 + 1) + filler,
        ):
            e = self.assertRaises(DecodeError, decode_reply, body)
            self.assertEqual((e.code, e.rid), (ErrorCode.BAD_FRAME, 7))
        self.assertEqual(offsets_read, [])

    def test_published_batch_flag_neither_0_nor_1_fails(self):
        for flags in ((2,), (0, 0, 7), (1, 255)):
            body = H("85 00000007") + struct.pack(">I", len(flags)) + b"".join(
                struct.pack(">QB", i, flag) for i, flag in enumerate(flags))
            e = self.assertRaises(DecodeError, decode_reply, body)
            self.assertEqual((e.code, e.rid), (ErrorCode.BAD_FRAME, 7))
            self.assertIn("neither 0 nor 1", str(e))

    def test_topics_hostile_count_fails(self):
        """A TOPICS count larger than its entries fails once the body runs out."""
        body = H("84 00000007 ffffffff") + b"\x00" * 1000
        names_read = self.count_reads("string")
        e = self.assertRaises(DecodeError, decode_reply, body)
        self.assertEqual(e.code, ErrorCode.BAD_FRAME)
        self.assertLessEqual(len(names_read), 1000 // 2)

    def test_length_fields_beyond_body(self):
        """A string, key or blob length past the end of the body is BAD_FRAME."""
        for body in (
            H("04 00000001 ffff 74"),  # topic string length 65535, 1 byte present
            H("05 00000001 0001 74 ffff 00000000"),  # key length 65535
            H("05 00000001 ffff 74 0000 00000000"),  # PUBLISH topic length 65535
            H("05 00000001 0009 74 0000 00000000"),  # PUBLISH topic length 9, 7 bytes left
            H("05 00000001 0001 74 0003 6b 00000000"),  # key length 3, short
            H("05 00000001 0001 74 0000 00000002 76"),  # value one byte short
            H("05 00000001 0001 74 0000 ffffffff 76"),  # blob length u32 max
            H("01 00000001 0001 0000 0005 6162"),  # token length 5, 2 present
        ):
            assertDecodeError(self, decode_request, body, ErrorCode.BAD_FRAME, 1)

    def test_publish_every_shape(self):
        """
        PUBLISH has its own fast decoder; every malformed PUBLISH must still
        get the careful decoder's answer: truncated, trailing, bad UTF-8 topic
        (including one cut mid-character), and one byte of slack anywhere.
        """
        good = H("05 00000009 0002 c3a9 0001 6b 00000002 7676")
        self.assertEqual(decode_request(good), Publish(9, "é", b"vv", b"k"))
        for n in range(1, len(good)):
            assertDecodeError(self, decode_request, good[:n], ErrorCode.BAD_FRAME, 9 if n >= 5 else 0)
        for i in range(1, len(good) + 1):
            # One extra byte anywhere after the opcode (or one missing) never decodes.
            assertDecodeError(self, decode_request, good[:i] + b"\x00" + good[i:],
                              ErrorCode.BAD_FRAME, rid_of(good[:i] + b"\x00" + good[i:]))
        # Topic length 1 cuts "é" in half: bad UTF-8, and the rest misparses.
        assertDecodeError(self, decode_request, H("05 00000009 0001 c3 0000 00000000"),
                          ErrorCode.BAD_FRAME, 9)
        assertDecodeError(self, decode_request, H("05 00000009 0001 ff 0000 00000000"),
                          ErrorCode.BAD_FRAME, 9)

    def test_duplicate_flag_must_be_0_or_1(self):
        """PUBLISHED / PUBLISHED_BATCH duplicate is a u8 that is 0 or 1; anything else is BAD_FRAME."""
        self.assertIs(decode_reply(H("83 00000007 0000000000000001 01")).duplicate, True)
        self.assertIs(decode_reply(H("83 00000007 0000000000000001 00")).duplicate, False)
        self.assertEqual(
            decode_reply(H("85 00000007 00000002 0000000000000001 01 0000000000000002 00")).results,
            [(1, True), (2, False)],
        )
        for flag in (2, 0x83, 0xFF):
            for body in (
                H("83 00000007 0000000000000001") + bytes([flag]),
                H("85 00000007 00000001 0000000000000001") + bytes([flag]),
                H("85 00000007 00000002 0000000000000001 00 0000000000000002") + bytes([flag]),
            ):
                e = self.assertRaises(DecodeError, decode_reply, body)
                self.assertEqual((e.code, e.rid), (ErrorCode.BAD_FRAME, 7))

    def test_decode_error_attributes(self):
        e = DecodeError(ErrorCode.BAD_TOPIC, 42, "no")
        self.assertEqual((e.code, e.rid, e.message), (ErrorCode.BAD_TOPIC, 42, "no"))
        self.assertIn("BAD_TOPIC", str(e))
        self.assertIn("no", str(e))


def _mutations(draw_body):
    """Valid request bodies with one byte replaced, inserted or deleted."""

    @st.composite
    def mutated(draw):
        body = bytearray(draw(draw_body))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, len(body) - 1))
        if kind == "replace":
            body[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            body.insert(i, draw(st.integers(0, 255)))
        elif kind == "delete":
            del body[i]
        else:
            del body[i:]
        return bytes(body)

    return mutated()


request_bodies = requests.map(lambda r: r.encode())
fuzz_bodies = st.one_of(
    st.binary(max_size=64),
    # Known opcode + random tail, to get past the opcode check.
    st.builds(lambda op, tail: bytes([op]) + tail, st.sampled_from(sorted(REQUEST_OPCODES)),
              st.binary(max_size=64)),
    _mutations(request_bodies),
    # PUBLISH has a separate fast decoder: weight it.
    _mutations(publishes.map(lambda r: r.encode())),
    _mutations(publish_batches.map(lambda r: r.encode())),
)


class FuzzTests(SynchronousTestCase):
    """Arbitrary bytes never raise anything but DecodeError."""

    @FUZZ
    @given(fuzz_bodies)
    def test_decode_request_total(self, body):
        try:
            req = decode_request(body)
        except DecodeError as e:
            self.assertIn(e.code, (ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_OPCODE))
            self.assertEqual(e.rid, rid_of(body))
            if not body or body[0] in REQUEST_OPCODES:
                self.assertEqual(e.code, ErrorCode.BAD_FRAME)
            else:
                self.assertEqual(e.code, ErrorCode.UNKNOWN_OPCODE)
            self.assertIsInstance(e.message, str)
        else:
            self.assertIn(
                type(req),
                (Hello, CreateTopic, Subscribe, Unsubscribe, Publish, Commit, Close, Ping,
                 ListTopics, PublishBatch, SubscribeGroup, Ack),
            )
            # Whatever decodes is exactly what re-encodes to the same body.
            self.assertEqual(req.encode(), body)
            self.assertEqual(req.rid, rid_of(body))

    @FUZZ
    @given(st.one_of(
        st.binary(max_size=64),
        st.builds(lambda op, tail: bytes([op]) + tail, st.sampled_from(sorted(REPLY_OPCODES)),
                  st.binary(max_size=64)),
        _mutations(replies.map(lambda r: r.encode())),
    ))
    def test_decode_reply_total(self, body):
        try:
            rep = decode_reply(body)
        except DecodeError as e:
            self.assertIn(e.code, (ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_OPCODE))
        else:
            self.assertIn(type(rep), (Ok, Error, Message, Published, Topics, PublishedBatch))
            # Reply encodings are canonical too (duplicate flags are 0 or 1).
            self.assertEqual(rep.encode(), body)


class TopicNameTests(SynchronousTestCase):
    """is_valid_topic: 1..249 bytes of A-Z a-z 0-9 . _ - /."""

    @FAST
    @given(st.text(alphabet=TOPIC_ALPHABET, min_size=1, max_size=249))
    def test_valid_names_accepted(self, name):
        self.assertTrue(is_valid_topic(name))

    @FAST
    @given(
        st.text(alphabet=TOPIC_ALPHABET, max_size=100),
        st.characters(blacklist_characters=TOPIC_ALPHABET, blacklist_categories=("Cs",)),
        st.text(alphabet=TOPIC_ALPHABET, max_size=100),
    )
    def test_any_other_character_rejected(self, before, bad, after):
        self.assertFalse(is_valid_topic(before + bad + after))

    @FAST
    @given(st.text(alphabet=TOPIC_ALPHABET, min_size=250, max_size=400))
    def test_too_long_rejected(self, name):
        self.assertFalse(is_valid_topic(name))

    def test_edges(self):
        for name in ["a", "A", "0", ".", "_", "-", "/", "..", "a/b.c_d-e", "Z9", TOPIC_ALPHABET,
                     "a" * 249, "/" * 249]:
            self.assertTrue(is_valid_topic(name), repr(name))
        for name in ["", "a" * 250, "a" * 1000, " ", "a b", " a", "a ", "a\n", "\na", "a\t",
                     "a\x00", "é", "caf\u00e9", "日本", "😀", "ａ", "\u0661", "ß",
                     "a*", "a:b", "a#", "a+b", "a,b", "a\\b", "a@b", "a!", "a~", "(a)", "a%2F",
                     "a\u200b"]:
            self.assertFalse(is_valid_topic(name), repr(name))

    def test_every_ascii_character(self):
        for c in map(chr, range(128)):
            self.assertEqual(is_valid_topic(c), c in TOPIC_ALPHABET, repr(c))
            self.assertEqual(is_valid_topic("ok" + c + "ok"), c in TOPIC_ALPHABET, repr(c))


class PatternNameTests(SynchronousTestCase):
    """is_pattern (version 1.1): segments on ".", "*" alone any one, ">" alone and last one or more."""

    SEGMENT = st.text(alphabet=TOPIC_ALPHABET.replace(".", ""), max_size=8)

    @FAST
    @given(st.lists(st.one_of(SEGMENT, st.just("*")), min_size=1, max_size=6), st.booleans())
    def test_patterns_from_segments(self, segments, rest):
        if rest:
            segments = segments + [">"]
        name = ".".join(segments)
        wild = "*" in segments or rest
        self.assertEqual(is_pattern(name), wild and len(name) <= 249, name)
        # A name is a topic or a pattern, never both.
        self.assertFalse(is_pattern(name) and is_valid_topic(name))

    @FAST
    @given(st.lists(SEGMENT, min_size=1, max_size=4), st.lists(SEGMENT, min_size=1, max_size=4),
           st.sampled_from(["*", ">"]), st.sampled_from(["x{}", "{}x", "x{}x"]))
    def test_a_wildcard_inside_a_segment_or_gt_not_last(self, before, after, wild, shape):
        inside = ".".join(before + [shape.format(wild)] + after)
        self.assertFalse(is_pattern(inside), inside)
        self.assertFalse(is_pattern(".".join(before + [">"] + after)))

    def test_edges(self):
        for name in ("*", ">", "*.>", "a.*", ".*", "*.", "a." + "b" * 245 + ".*", "a." + "b" * 246 + ".*"):
            self.assertEqual(is_pattern(name), len(name) <= 249, name)
        for name in ("", "a", "**", ">>", "*>", ">.", "a.>.*", "é.*", "a b.*", "a.\x00.*"):
            self.assertFalse(is_pattern(name), repr(name))
