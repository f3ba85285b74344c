"""
The Redis engine's pieces that need no server: cluster slots, URLs, the
RESP encoding, stream records, option checks.  (With a server:
tests/test_scale_out.py and tests/test_conformance_nodes.py.)
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.storage.redis import _tag, client_key, decode_records, encode_records, topic_keys
from zaichik.storage.resp import encode, key_slot, parse_url
from zaichik.tap import Options


class SlotTests(SynchronousTestCase):

    def test_known_slots(self) -> None:
        """The values Redis' cluster spec gives (CLUSTER KEYSLOT)."""
        self.assertEqual(key_slot(b"123456789"), 0x31C3 % 16384)
        self.assertEqual(key_slot(b"foo"), 12182)
        self.assertEqual(key_slot(b"{user1000}.following"), key_slot(b"{user1000}.followers"))
        self.assertEqual(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"))
        self.assertNotEqual(key_slot(b"foo{}{bar}"), key_slot(b"bar"))  # an empty tag hashes the whole key
        self.assertEqual(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"))

    def test_one_topic_one_slot(self) -> None:
        """Every key and the channel of a topic share a slot, whatever the name holds."""
        for name in ("orders", "a}b", "{x}", "}", "sensors.*", "ü"):
            slots = {key_slot(key) for key in topic_keys(name).values()}
            self.assertEqual(len(slots), 1, name)
        self.assertNotEqual(_tag(b"t", "a}b"), _tag(b"t", "a"))
        self.assertNotEqual(client_key("a"), client_key("b"))


class URLTests(SynchronousTestCase):

    def test_single(self) -> None:
        self.assertEqual(parse_url("redis://127.0.0.1:6380/2"), ([("127.0.0.1", 6380)], 2, None, False))
        self.assertEqual(parse_url("redis://:secret@h:1"), ([("h", 1)], 0, "secret", False))

    def test_cluster(self) -> None:
        self.assertEqual(parse_url("redis+cluster://a:1,b:2"), ([("a", 1), ("b", 2)], 0, None, True))

    def test_refused(self) -> None:
        for url in ("http://x:1", "redis://a:1,b:2", "redis://h:port", "redis+cluster://a:1/3", "redis://h:1/x"):
            self.assertRaises(ValueError, parse_url, url)

    def test_options(self) -> None:
        """--engine is checked when options are parsed: one line, naming the option."""
        for argv, wanted in ((["--engine", "redis://h:x"], "--engine"),
                             (["--engine", "redis://h:1", "--data-dir", "/tmp/x"], "--data-dir"),
                             (["--engine", "redis://h:1", "--max-retained-bytes", "10"], "--max-retained-bytes")):
            error = self.assertRaises(usage.UsageError, Options().parseOptions, argv)
            self.assertIn(wanted, str(error))


class EncodingTests(SynchronousTestCase):

    def test_resp(self) -> None:
        self.assertEqual(encode([b"SET", "k", 12]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n")

    @given(st.lists(st.binary(max_size=300), min_size=1, max_size=20), st.integers(0, 2 ** 40),
           st.integers(0, 2 ** 42))
    def test_records_round_trip(self, values, first, timestamp) -> None:
        """The records of a stream entry come back as the MESSAGE frames a single broker would send."""
        prefix = codec.topic_prefix("t")
        frames = decode_records(prefix, first, timestamp, encode_records([(None, v) for v in values]))
        self.assertEqual(frames, [codec.message_frame(prefix, first + i, timestamp, None, v)
                                  for i, v in enumerate(values)])

    def test_keyed_records(self) -> None:
        """What the PUBLISH script writes for keyed messages (struct '>I4I4', key, value)."""
        import struct

        blob = struct.pack(">II", 2, 1) + b"k1" + b"a" + struct.pack(">II", 0, 0)
        prefix = codec.topic_prefix("t")
        self.assertEqual(decode_records(prefix, 7, 9, blob),
                         [codec.message_frame(prefix, 7, 9, b"k1", b"a"), codec.message_frame(prefix, 8, 9, None, b"")])
