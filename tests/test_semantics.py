"""
Topic and service semantics, deterministic with L{task.Clock}: offsets,
retention expiry at the exact millisecond, compaction window edges, the four
subscribe starts, the max_inflight window, durable resume and takeover.
"""

from __future__ import annotations

from typing import List, Tuple

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.errors import ZaichikError
from zaichik.service import BrokerService
from zaichik.session import Session
from zaichik.subscription import Output, Subscription
from zaichik.testing import parse_frames

T0 = 1_700_000_000  # seconds


def offsets_of(written: List[bytes]) -> List[int]:
    return [m.offset for m in parse_frames(b"".join(written))]


class Base(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.service = BrokerService(clock=self.clock)

    def at(self, ms: int) -> None:
        """Move the clock to T0 + ms."""
        self.clock.advance((T0 * 1000 + ms - round(self.clock.seconds() * 1000)) / 1000)

    def follow(self, topic, start: int = None, max_inflight: int = 0) -> Tuple[Subscription, List[bytes]]:
        written: List[bytes] = []
        subscription = Subscription(topic, Output(written.append), max_inflight, start=start)
        topic.subscribe(subscription)
        subscription.drain()
        return subscription, written


class OffsetTests(Base):
    def test_no_gaps_and_duplicates_take_none(self):
        topic = self.service.create_topic("t", 0, 1_000)
        results = [topic.publish(k, b"v") for k in (b"a", None, b"a", b"b", None)]
        self.assertEqual(results, [(0, False), (1, False), (0, True), (2, False), (3, False)])
        self.assertEqual(topic.next_offset, 4)

    def test_timestamps_never_go_back(self):
        topic = self.service.create_topic("t", 60_000, 0)
        subscription, written = self.follow(topic)
        self.at(500)
        topic.publish(None, b"a")
        self.clock.advance(-0.2)  # the system clock is stepped back
        topic.publish(None, b"b")
        stamps = []
        for frame in written:
            stamps.append(codec.decode_reply(frame[4:]).timestamp)
        self.assertEqual(stamps, [T0 * 1000 + 500] * 2)


class RetentionTests(Base):
    def test_expiry_at_the_exact_millisecond(self):
        topic = self.service.create_topic("t", 1_000, 0)
        self.at(0)
        topic.publish(None, b"old")
        self.at(400)
        topic.publish(None, b"young")
        self.at(999)
        self.assertEqual(topic.info().retained, 2)
        self.assertEqual(offsets_of(self.follow(topic, 0)[1]), [0, 1])
        self.at(1_000)  # the first is gone at ts + T
        self.assertEqual(topic.info().retained, 1)
        self.assertEqual(offsets_of(self.follow(topic, 0)[1]), [1])
        self.at(1_399)
        self.assertEqual(topic.info().retained, 1)
        self.at(1_400)
        self.assertEqual((topic.info().retained, offsets_of(self.follow(topic, 0)[1])), (0, []))

    def test_zero_keeps_nothing_but_present_subscribers_get_it(self):
        topic = self.service.create_topic("t", 0, 0)
        _, present = self.follow(topic)
        topic.publish(None, b"now")
        self.assertEqual(offsets_of(present), [0])
        self.assertEqual(offsets_of(self.follow(topic, 0)[1]), [])
        self.assertEqual(topic.info().retained, 0)

    def test_sweep_frees_and_survives_errors(self):
        self.service.startService()
        good = self.service.create_topic("good", 1_000, 0)
        bad = self.service.create_topic("bad", 1_000, 0)
        good.publish(None, b"x")
        bad.expire = lambda: 1 / 0
        self.clock.pump([1, 1])  # two sweeps
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual(good.retained, 0)
        good.publish(None, b"y")
        self.clock.pump([1, 1])
        self.assertEqual(good.retained, 0)  # the LoopingCall still runs
        self.flushLoggedErrors(ZeroDivisionError)
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CompactionTests(Base):
    def test_window_edges(self):
        topic = self.service.create_topic("t", 0, 1_000)
        self.at(0)
        self.assertEqual(topic.publish(b"k", b"1"), (0, False))
        self.at(999)
        self.assertEqual(topic.publish(b"k", b"2"), (0, True))  # inside: ts + W - 1
        self.at(1_000)
        self.assertEqual(topic.publish(b"k", b"3"), (1, False))  # at ts + W: stored again

    def test_window_not_extended_by_duplicates(self):
        topic = self.service.create_topic("t", 0, 1_000)
        for ms, expected in [(0, (0, False)), (600, (0, True)), (900, (0, True)),
                             (1_000, (1, False)), (1_500, (1, True)), (2_000, (2, False))]:
            self.at(ms)
            self.assertEqual(topic.publish(b"k", b"v"), expected, ms)

    def test_keys_independent_keyless_never_dropped_zero_window(self):
        topic = self.service.create_topic("t", 0, 1_000)
        self.assertEqual([topic.publish(k, b"v")[1] for k in (b"a", b"b", None, None, b"a")],
                         [False, False, False, False, True])
        plain = self.service.create_topic("plain", 0, 0)
        self.assertEqual([plain.publish(b"a", b"v")[1] for _ in range(3)], [False] * 3)

    def test_batch_decides_each_message(self):
        topic = self.service.create_topic("t", 0, 1_000)
        _, written = self.follow(topic)
        results = topic.publish_many([(b"a", b"1"), (b"a", b"2"), (b"b", b"3"), (None, b"4")])
        self.assertEqual(results, [(0, False), (0, True), (1, False), (2, False)])
        self.assertEqual(len(written), 1)  # one delivery for the batch
        self.assertEqual(offsets_of(written), [0, 1, 2])

    def test_key_memory_is_bounded(self):
        topic = self.service.create_topic("t", 0, 1_000)
        for i in range(10_000):
            topic.publish(b"%d" % i, b"v")
        self.at(5_000)
        topic.expire()
        self.assertEqual((len(topic._keys), len(topic._key_order)), (0, 0))


class StartTests(Base):
    def setUp(self) -> None:
        super().setUp()
        self.topic = self.service.create_topic("t", 1_000, 0)
        self.at(0)
        self.topic.publish(None, b"0")
        self.at(500)
        for _ in range(3):
            self.topic.publish(None, b"n")  # offsets 1..3
        self.at(1_000)  # offset 0 has expired

    def start(self, start: Start, offset: int = 0, committed=None) -> int:
        return self.topic.start_offset(start, offset, committed)

    def test_starts(self):
        self.assertEqual(self.start(Start.EARLIEST, 99), 1)
        self.assertEqual(self.start(Start.LATEST), 4)
        self.assertEqual(self.start(Start.DEFAULT), 1)
        self.assertEqual(self.start(Start.DEFAULT, committed=2), 3)
        self.assertEqual(self.start(Start.DEFAULT, committed=0), 1)  # committed past expiry
        self.assertEqual(self.start(Start.OFFSET, 2), 2)
        self.assertEqual(self.start(Start.OFFSET, 0), 1)  # expired: the oldest retained
        self.assertEqual(self.start(Start.OFFSET, 4), 4)
        self.assertEqual(self.start(Start.OFFSET, 2**64 - 1), 4)  # past the end: the next published


class InflightTests(Base):
    def test_window(self):
        topic = self.service.create_topic("t", 60_000, 0)
        for _ in range(5):
            topic.publish(None, b"v")
        subscription, written = self.follow(topic, 0, max_inflight=2)
        self.assertEqual(offsets_of(written), [0, 1])
        subscription.acknowledge(0)
        self.assertEqual(offsets_of(written), [0, 1, 2])
        topic.publish(None, b"v")  # offset 5 waits in the log
        subscription.acknowledge(3)  # beyond what was sent: opens the window fully
        self.assertEqual(offsets_of(written), [0, 1, 2, 3, 4])
        subscription.acknowledge(4)
        self.assertEqual(offsets_of(written), [0, 1, 2, 3, 4, 5])

    def test_unretained_topic_queues(self):
        topic = self.service.create_topic("t", 0, 0)
        subscription, written = self.follow(topic, max_inflight=1)
        for _ in range(3):
            topic.publish(None, b"v")
        self.assertEqual((offsets_of(written), subscription.pending), ([0], 2))
        subscription.acknowledge(0)
        subscription.acknowledge(1)
        self.assertEqual(offsets_of(written), [0, 1, 2])


class DurableTests(Base):
    def session(self):
        replies, written, closed = [], [], []
        session = Session(self.service, replies.append, written.append, lambda: closed.append(True))
        return session, replies, written, closed

    def test_resume_after_commit_and_takeover(self):
        self.service.create_topic("t", 60_000, 0)
        first, replies, written, closed = self.session()
        first.handle(codec.Hello(1, "worker"))
        first.handle(codec.Subscribe(2, "t", Start.DEFAULT))
        self.service.topics["t"].publish_many([(None, b"v")] * 4)
        self.assertEqual(offsets_of(written), [0, 1, 2, 3])
        first.handle(codec.Commit(3, "t", 1))
        first.handle(codec.Commit(4, "t", 0))  # backwards: OK, no change
        first.handle(codec.Commit(5, "t", 9))  # never sent
        self.assertEqual([type(r).__name__ for r in replies], ["Ok", "Ok", "Ok", "Ok", "Error"])
        self.assertEqual(replies[-1].code, ErrorCode.BAD_OFFSET)

        second, replies2, written2, _ = self.session()
        second.handle(codec.Hello(1, "worker"))
        self.assertEqual(closed, [True])  # taken over
        self.assertTrue(first.ended)
        second.handle(codec.Subscribe(2, "t", Start.DEFAULT))
        self.assertEqual(offsets_of(written2), [2, 3])  # uncommitted ones again

    def test_non_durable_commits_last_as_long_as_the_connection(self):
        self.service.create_topic("t", 60_000, 0)
        session, _, written, _ = self.session()
        session.handle(codec.Subscribe(1, "t", Start.EARLIEST))
        self.service.topics["t"].publish_many([(None, b"v")] * 3)
        session.handle(codec.Commit(2, "t", 1))
        session.handle(codec.Unsubscribe(3, "t"))
        del written[:]
        session.handle(codec.Subscribe(4, "t", Start.DEFAULT))
        self.assertEqual(offsets_of(written), [2])
        other, _, written2, _ = self.session()
        other.handle(codec.Subscribe(1, "t", Start.DEFAULT))
        self.assertEqual(offsets_of(written2), [0, 1, 2])

    def test_topic_exists(self):
        self.service.create_topic("t", 1_000, 0)
        self.assertIs(self.service.create_topic("t", 1_000, 0), self.service.topics["t"])
        error = self.assertRaises(ZaichikError, self.service.create_topic, "t", 2_000, 0)
        self.assertEqual(error.code, ErrorCode.TOPIC_EXISTS)
        self.assertEqual(self.service.topics["t"].retention_ttl, 1_000)
