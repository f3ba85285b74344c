"""
Limits, idle timeouts, slow consumers and backpressure, over
L{StringTransport} with a L{task.Clock}: no sockets, no wall clock.
"""

from __future__ import annotations

from typing import List

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.protocol import CLOSE_GRACE, BrokerFactory
from zaichik.service import BrokerService, Limits
from zaichik.testing import parse_frames


class Connection:
    """One client connection to the broker, over a StringTransport."""

    def __init__(self, factory: BrokerFactory) -> None:
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def send(self, *requests) -> None:
        self.protocol.dataReceived(b"".join(codec.frame(r.encode()) for r in requests))

    def received(self) -> List[object]:
        frames = parse_frames(self.transport.value())
        self.transport.clear()
        return frames

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        self.protocol.connectionLost(None)


class LimitTestCase(SynchronousTestCase):
    limits = Limits()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.service = BrokerService(clock=self.clock, limits=self.limits)
        self.factory = BrokerFactory(self.service)

    def connect(self) -> Connection:
        return Connection(self.factory)


class ConnectionLimitTests(LimitTestCase):
    limits = Limits(max_connections=1)

    def test_one_too_many(self):
        first = self.connect()
        second = self.connect()
        self.assertEqual(second.received(), [codec.Error(0, ErrorCode.LIMIT, "connection limit of 1 reached")])
        self.assertTrue(second.closing)
        second.lose()
        first.send(codec.Ping(1))
        self.assertEqual(first.received(), [codec.Ok(1)])
        first.lose()
        third = self.connect()
        third.send(codec.Ping(2))
        self.assertEqual(third.received(), [codec.Ok(2)])


class TopicAndSubscriptionLimitTests(LimitTestCase):
    limits = Limits(max_topics=2, max_subscriptions=1)

    def test_topic_limit(self):
        c = self.connect()
        c.send(codec.CreateTopic(1, "a"), codec.Publish(2, "b", b"x"), codec.CreateTopic(3, "c"),
               codec.Publish(0, "d", b"x"), codec.Publish(4, "a", b"y"))
        replies = c.received()
        self.assertEqual(replies[:2], [codec.Ok(1), codec.Published(2, 0, False)])
        self.assertEqual([(r.rid, r.code) for r in replies[2:4]], [(3, ErrorCode.LIMIT), (0, ErrorCode.LIMIT)])
        self.assertEqual(replies[4], codec.Published(4, 0, False))
        self.assertEqual(sorted(self.service.topics), ["a", "b"])
        self.assertFalse(c.closing)

    def test_subscription_limit(self):
        c = self.connect()
        c.send(codec.Subscribe(1, "a"), codec.Subscribe(2, "b"), codec.Ping(3))
        replies = c.received()
        self.assertEqual(replies[0], codec.Ok(1))
        self.assertEqual((replies[1].rid, replies[1].code), (2, ErrorCode.LIMIT))
        self.assertEqual(replies[2], codec.Ok(3))


def frame_size(topic: str, value: bytes) -> int:
    return len(codec.frame(codec.Message(topic, 0, 0, value).encode()))


class RetainedBytesTests(LimitTestCase):
    VALUE = b"v" * 100

    def make(self, policy: str) -> Connection:
        self.service.limits = Limits(max_retained_bytes=2 * frame_size("t", self.VALUE) + 10,
                                     retained_bytes_policy=policy)
        c = self.connect()
        c.send(codec.CreateTopic(1, "t", retention_ttl=60_000))
        c.received()
        return c

    def test_reject(self):
        c = self.make("reject")
        c.send(*[codec.Publish(i, "t", self.VALUE) for i in (1, 2, 3)])
        replies = c.received()
        self.assertEqual(replies[:2], [codec.Published(1, 0, False), codec.Published(2, 1, False)])
        self.assertEqual((replies[2].rid, replies[2].code), (3, ErrorCode.LIMIT))
        # A batch that does not fit is refused whole.
        c.send(codec.PublishBatch(4, "t", [(None, b"")] * 1))
        self.assertEqual(c.received()[0].code, ErrorCode.LIMIT)
        self.assertEqual(self.service.topics["t"].next_offset, 2)
        # Once the first two expire there is room again.
        self.clock.advance(60)
        c.send(codec.Publish(5, "t", self.VALUE))
        self.assertEqual(c.received(), [codec.Published(5, 2, False)])

    def test_expire_oldest(self):
        c = self.make("expire")
        c.send(*[codec.Publish(i, "t", self.VALUE) for i in (1, 2, 3)])
        self.assertEqual([r.offset for r in c.received()], [0, 1, 2])
        info = self.service.topics["t"].info()
        self.assertEqual(info.retained, 2)
        self.assertEqual(self.service.topics["t"].oldest_offset(), 1)


class IdleTimeoutTests(LimitTestCase):
    limits = Limits(idle_timeout=30)

    def test_ping_keeps_alive(self):
        c = self.connect()
        self.clock.advance(29)
        c.send(codec.Ping(1))
        self.clock.advance(29)
        self.assertFalse(c.closing)
        self.clock.advance(1)
        self.assertEqual(c.received(), [codec.Ok(1), codec.Error(0, ErrorCode.LIMIT, "idle for 30 s")])
        self.assertTrue(c.closing)

    def test_timer_cancelled_on_close(self):
        c = self.connect()
        c.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowConsumerTests(LimitTestCase):
    limits = Limits(max_output_buffer=10_000)

    def setUp(self) -> None:
        super().setUp()
        self.publisher = self.connect()
        self.slow = self.connect()
        self.fast = self.connect()
        for c in (self.slow, self.fast):
            c.send(codec.Subscribe(1, "live", Start.LATEST))
            self.assertEqual(c.received(), [codec.Ok(1)])
        # The slow subscriber's socket buffer is full: the transport says so.
        self.slow.transport.producer.pauseProducing()

    def publish(self, count: int, value: bytes = b"x" * 100) -> None:
        for _ in range(count):
            self.publisher.send(codec.Publish(0, "live", value))

    def test_disconnected_past_limit(self):
        self.publish(50)  # about 6.5 KB queued: under the limit
        self.assertFalse(self.slow.closing)
        self.assertEqual(self.slow.received(), [])
        self.publish(50)
        self.assertEqual(self.slow.received(), [codec.Error(0, ErrorCode.LIMIT, "slow consumer")])
        self.assertTrue(self.slow.closing)
        # Nobody else noticed.
        self.assertEqual([m.offset for m in self.fast.received()], list(range(100)))
        self.assertEqual(self.publisher.received(), [])
        self.assertEqual(self.service.topics["live"].subscribers,
                         [self.fast.protocol.session.subscriptions["live"]])

    def test_aborted_if_it_never_reads(self):
        self.publish(100)
        self.assertTrue(self.slow.closing)
        self.assertFalse(self.slow.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(self.slow.transport.disconnected)  # abortConnection

    def test_resumes_in_order(self):
        self.publish(30)
        self.slow.transport.producer.resumeProducing()
        self.publish(5)
        self.assertEqual([m.offset for m in self.slow.received()], list(range(35)))


class RetainedSlowConsumerTests(LimitTestCase):
    limits = Limits(max_output_buffer=1_000)

    def test_lags_on_the_log(self):
        """On a retaining topic a slow subscriber costs no memory and is not cut off."""
        publisher = self.connect()
        slow = self.connect()
        publisher.send(codec.CreateTopic(1, "kept", retention_ttl=60_000))
        slow.send(codec.Subscribe(1, "kept"))
        slow.received()
        slow.transport.producer.pauseProducing()
        publisher.send(*[codec.Publish(0, "kept", b"y" * 100) for _ in range(200)])
        subscription = slow.protocol.session.subscriptions["kept"]
        self.assertEqual((subscription.pending, subscription.next), (0, 0))
        self.assertFalse(slow.closing)
        slow.transport.producer.resumeProducing()
        self.assertEqual([m.offset for m in slow.received()], list(range(200)))


class BlockPolicyTests(LimitTestCase):
    limits = Limits(max_output_buffer=2_000, slow_consumer="block")

    def test_publisher_held_until_subscriber_drains(self):
        publisher = self.connect()
        slow = self.connect()
        slow.send(codec.Subscribe(1, "live", Start.LATEST))
        slow.received()
        slow.transport.producer.pauseProducing()
        frames = [codec.Publish(0, "live", b"z" * 100) for _ in range(40)]
        # Several reads: the block takes effect at the first publish after
        # the subscriber's queue passed the limit.
        for i in range(0, 40, 10):
            publisher.send(*frames[i : i + 10])
        self.assertEqual(publisher.transport.producerState, "paused")
        self.assertFalse(slow.closing)
        topic = self.service.topics["live"]
        held = topic.next_offset
        self.assertLess(held, 40)
        slow.transport.producer.resumeProducing()
        self.assertEqual(publisher.transport.producerState, "producing")
        self.assertEqual(topic.next_offset, 40)
        self.assertEqual([m.offset for m in slow.received()], list(range(40)))


class FlowControlFixTests(LimitTestCase):
    """Found in review; each failed before its fix."""

    limits = Limits(idle_timeout=30, max_output_buffer=5_000)

    def test_idle_close_ends_the_session_at_once(self):
        subscriber = self.connect()
        subscriber.send(codec.Subscribe(1, "t", Start.LATEST))
        self.clock.advance(30)
        self.assertTrue(subscriber.closing)
        self.assertTrue(subscriber.protocol.session.ended)
        self.assertEqual(self.service.topics["t"].subscribers, [])

    def test_replies_are_flow_controlled(self):
        """A client that sends requests and reads nothing is read no more."""
        c = self.connect()
        c.transport.producer.pauseProducing()  # its socket buffer is full
        self.assertEqual(c.transport.producerState, "paused")  # we stopped reading it
        c.send(*[codec.Ping(i) for i in range(1, 4)])
        self.assertEqual(c.received(), [])  # held, not answered into the full buffer
        c.transport.producer.resumeProducing()
        self.assertEqual(c.transport.producerState, "producing")
        self.assertEqual(c.received(), [codec.Ok(1), codec.Ok(2), codec.Ok(3)])

    def test_held_connection_is_not_idle(self):
        c = self.connect()
        c.transport.producer.pauseProducing()
        self.clock.advance(90)
        self.assertFalse(c.closing)

    def test_output_budget_is_per_connection(self):
        publisher = self.connect()
        slow = self.connect()
        slow.send(*[codec.Subscribe(i + 1, f"t{i}", Start.LATEST) for i in range(10)])
        slow.received()
        slow.transport.producer.pauseProducing()
        # 10 topics x 5 messages of ~120 bytes: under the limit per topic,
        # over it for the connection.
        for _ in range(5):
            publisher.send(*[codec.Publish(0, f"t{i}", b"x" * 100) for i in range(10)])
        self.assertTrue(slow.closing)

    def test_max_inflight_is_clamped(self):
        from zaichik.subscription import MAX_INFLIGHT

        c = self.connect()
        c.send(codec.Subscribe(1, "t", Start.LATEST, max_inflight=0xFFFFFFFF))
        self.assertEqual(c.protocol.session.subscriptions["t"].max_inflight, MAX_INFLIGHT)


class LargeFrameTests(LimitTestCase):
    def test_large_frame_in_small_pieces(self):
        """A frame near the limit, fed 1,000 bytes at a time, is joined once and handled once."""
        c = self.connect()
        big = codec.frame(codec.Publish(7, "big", b"v" * 900_000).encode()) + codec.frame(codec.Ping(8).encode())
        for i in range(0, len(big), 1000):
            c.protocol.dataReceived(big[i : i + 1000])
        self.assertEqual(c.received(), [codec.Published(7, 0, False), codec.Ok(8)])
        self.assertEqual(c.protocol._pieces_bytes, 0)
