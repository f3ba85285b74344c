"""
The Redis engine's pieces that need no server: cluster slots, URLs, the
RESP encoding, stream records, option checks.  (With a server:
tests/test_scale_out.py and tests/test_conformance_nodes.py.)
"""

from hypothesis import HealthCheck, given, settings
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

    # (No deadline nor speed health checks: a slow or loaded machine is not a failure.)
    @settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
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


class _FakeRouter:
    """Answers XRANGE from a dict of stream entries; records every command."""

    def __init__(self, entries) -> None:
        self.entries = entries  # [(first, ts, [values])]
        self.commands: list = []

    def execute(self, key, *args):
        from twisted.internet.defer import succeed

        self.commands.append(args)
        if args[0] == b"XRANGE":
            start = int(args[2].split(b"-")[0])
            found = []
            for first, ts, values in self.entries:
                if first + len(values) - 1 >= start:
                    blob = encode_records([(None, v) for v in values])
                    found.append([b"%d-1" % (first + len(values) - 1), [b"f", b"%d" % first, b"t", b"%d" % ts,
                                                                         b"d", blob]])
            return succeed(found)
        return succeed(None)


class _FakeStorage:
    def __init__(self, router) -> None:
        from twisted.internet.task import Clock

        self.router = router
        self.clock = Clock()
        self.wall = self.clock
        self.offset_resets = 0


class FollowTests(SynchronousTestCase):
    """How a broker follows a topic from its channel: in order, once, and catching up on gaps."""

    def setUp(self) -> None:
        from zaichik.storage.redis import RedisLog

        self.router = _FakeRouter([(0, 5, [b"a", b"b"]), (2, 6, [b"c"]), (3, 7, [b"d", b"e"])])
        self.log = RedisLog(_FakeStorage(self.router), "t", 0, 0)
        self.log.wanted = True
        self.got: list = []
        self.log.follower = lambda first, frames: self.got.append((first, len(frames)))

    def told(self, first: int, values) -> None:
        self.log.told(first, 1, len(values), encode_records([(None, v) for v in values]))

    def test_in_order(self) -> None:
        self.told(0, [b"a", b"b"])
        self.told(2, [b"c"])
        self.assertEqual(self.got, [(0, 2), (2, 1)])
        self.assertEqual(self.log.end, 3)
        self.assertEqual(self.router.commands, [])

    def test_heard_twice(self) -> None:
        """A batch heard again (after catching up) is not delivered again; one overlapping is trimmed."""
        self.told(0, [b"a", b"b"])
        self.told(0, [b"a", b"b"])
        self.told(1, [b"b", b"c"])
        self.assertEqual(self.got, [(0, 2), (2, 1)])

    def test_gap_caught_up_from_the_stream(self) -> None:
        """A batch after a gap waits: the missing ones are read from the stream first, then it follows."""
        self.told(0, [b"a", b"b"])
        self.told(3, [b"d", b"e"])
        self.assertEqual(self.got, [(0, 2), (2, 1), (3, 2)])
        self.assertEqual(self.router.commands[0][:3], (b"XRANGE", self.log.keys["stream"], b"2-0"))
        self.assertEqual(self.log.end, 5)

    def test_not_wanted(self) -> None:
        """With no subscriber here and nothing retained, only the offsets are followed."""
        self.log.wanted = False
        self.told(0, [b"a", b"b"])
        self.assertEqual((self.got, self.log.end), ([], 2))


class FakeConnection:
    """
    A connection for the liveness tests: up, answering PING at once
    (C{answers}) or never, counting the bytes it "received" and the times
    it was dropped (after which it is down, as a real Connection).
    """

    host, port = "127.0.0.1", 1

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.up = True
        self.received = 0
        self.dropped = 0

    def execute(self, *args):
        from twisted.internet.defer import Deferred, succeed

        return succeed(b"PONG") if self.answers else Deferred()

    def drop(self) -> None:
        self.dropped += 1
        self.up = False


class PingTests(SynchronousTestCase):
    """A pub/sub connection that stops answering PING is dropped (and so made again)."""

    def test_unanswered_pings_drop_the_connection(self) -> None:
        from zaichik.storage.redis import RedisStorage

        storage = RedisStorage("redis://127.0.0.1:1")
        silent = storage.pubsub.nodes[("127.0.0.1", 1)] = FakeConnection(answers=False)  # type: ignore[assignment]
        for _ in range(3):
            storage._ping()
        self.assertEqual(silent.dropped, 0)
        storage._ping()
        self.assertEqual(silent.dropped, 1)

    def test_answered_pings_keep_it(self) -> None:
        from zaichik.storage.redis import RedisStorage

        storage = RedisStorage("redis://127.0.0.1:1")
        answers = storage.pubsub.nodes[("127.0.0.1", 1)] = FakeConnection(answers=True)  # type: ignore[assignment]
        for _ in range(10):
            storage._ping()
        self.assertEqual(answers.dropped, 0)


class GapTests(SynchronousTestCase):

    def test_gap_the_stream_cannot_fill(self) -> None:
        """Offsets missing from the stream too (expired, lost): said, and followed on from there, once."""
        from zaichik.storage.redis import RedisLog

        router = _FakeRouter([(7, 1, [b"x"])])
        log = RedisLog(_FakeStorage(router), "t", 0, 0)
        log.wanted = True
        got: list = []
        log.follower = lambda first, frames: got.append((first, len(frames)))
        log.end = 2
        log.told(8, 1, 1, encode_records([(None, b"y")]))
        self.assertEqual(got, [(7, 1), (8, 1)])
        self.assertEqual(log.end, 9)
        log.told(9, 1, 1, encode_records([(None, b"z")]))
        self.assertEqual(got[-1], (9, 1))
        self.assertEqual(len([c for c in router.commands if c[0] == b"XRANGE"]), 2)


class CacheTests(SynchronousTestCase):
    """The newest messages are cached only for subscribers here, within the broker's budget."""

    def make(self, cache_size: int):
        from zaichik.storage.redis import RedisLog

        storage = _FakeStorage(_FakeRouter([]))
        storage.cache_size = cache_size
        storage.cache_bytes = 0
        log = RedisLog(storage, "t", 60_000, 0)
        log.follower = lambda first, frames: None
        return storage, log

    def test_not_cached_without_subscribers(self) -> None:
        storage, log = self.make(1 << 20)
        log.told(0, 1, 2, encode_records([(None, b"a"), (None, b"b")]))
        self.assertEqual((storage.cache_bytes, log.end, len(log)), (0, 2, 2))

    def test_budget(self) -> None:
        storage, log = self.make(300)
        log.wanted = True
        for i in range(20):
            log.told(i, 1, 1, encode_records([(None, b"x" * 50)]))
        self.assertLessEqual(storage.cache_bytes, 300)
        self.assertGreater(storage.cache_bytes, 0)
        first, frames = log.read(19, 10).result
        self.assertEqual((first, len(frames)), (19, 1))
        log.forget_cache()
        self.assertEqual(storage.cache_bytes, 0)


class BusyConnectionTests(SynchronousTestCase):

    def test_a_busy_connection_is_kept(self) -> None:
        """
        A connection whose PONG sits behind a backlog (bytes keep arriving)
        is not dropped however many PINGs wait: only silence is.
        """
        from zaichik.storage.redis import RedisStorage

        storage = RedisStorage("redis://127.0.0.1:1")
        busy = storage.pubsub.nodes[("127.0.0.1", 1)] = FakeConnection(answers=False)  # type: ignore[assignment]
        for _ in range(10):
            busy.received += 1000  # (the PONG is behind the backlog)
            storage._ping()
        self.assertEqual(busy.dropped, 0)
        for _ in range(4):
            storage._ping()  # now silent
        self.assertEqual(busy.dropped, 1)
