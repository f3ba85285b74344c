"""
Unit tests of L{zaichik.session.Session}: the meaning of each request.

A session is given plain callables: replies are encoded as the protocol does
(4-byte length prefix and body) into the same list as the frames written for
subscriptions, and a disconnect is a marker in that list, so the order of
everything a connection is sent can be checked.  Frames are decoded with
L{zaichik.codec.decode_reply} after their length prefix is stripped.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import (
    Close,
    Commit,
    CreateTopic,
    Error,
    ErrorCode,
    Hello,
    ListTopics,
    Message,
    Ok,
    Ping,
    Publish,
    PublishBatch,
    Published,
    PublishedBatch,
    Start,
    Subscribe,
    TopicInfo,
    Topics,
    Unsubscribe,
)
from zaichik.service import BrokerService
from zaichik.testing import parse_frames

T0 = 1_700_000_000
T0_MS = T0 * 1000
DISCONNECT = "DISCONNECT"


decode_stream = parse_frames  # one frame parser for every test: zaichik.testing's


class Conn:
    """A Session with list-backed reply/write/disconnect callables."""

    def __init__(self, service: BrokerService) -> None:
        from zaichik.session import Session

        self.events: list = []  # bytes (frames) and DISCONNECT markers
        self.disconnects = 0
        self.session = Session(service, self._reply, self.events.append, self._disconnect, "test")
        self._seen = 0

    def _reply(self, reply) -> None:
        body = reply.encode()
        self.events.append(codec.frame(body))

    def _disconnect(self) -> None:
        self.disconnects += 1
        self.events.append(DISCONNECT)

    def decoded(self) -> list:
        out = []
        for event in self.events:
            if event is DISCONNECT:
                out.append(DISCONNECT)
            else:
                out.extend(decode_stream(event))
        return out

    def new(self) -> list:
        """What was sent since the last call."""
        everything = self.decoded()
        fresh = everything[self._seen :]
        self._seen = len(everything)
        return fresh

    def send(self, request) -> list:
        """Handle one request; return what it caused to be sent."""
        self.session.handle(request)
        return self.new()

    def offsets(self, items: list) -> List[int]:
        return [m.offset for m in items if isinstance(m, Message)]


class SessionCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.service = BrokerService(clock=self.clock)

    def at(self, ms: int) -> None:
        now_ms = round(self.clock.seconds() * 1000)
        self.clock.advance((T0_MS + ms - now_ms) / 1000)

    def conn(self) -> Conn:
        return Conn(self.service)

    def assertError(self, items: list, rid: int, code: ErrorCode) -> None:
        self.assertEqual(len(items), 1, items)
        self.assertIsInstance(items[0], Error)
        self.assertEqual((items[0].rid, items[0].code), (rid, int(code)), items[0])


class ReplyTests(SessionCase):
    """Every request type's reply."""

    def test_hello(self):
        c = self.conn()
        self.assertEqual(c.send(Hello(7, "client", "")), [Ok(7)])
        self.assertEqual(c.session.client_id, "client")

    def test_hello_empty_client_id_is_not_durable(self):
        c = self.conn()
        self.assertEqual(c.send(Hello(1, "", "")), [Ok(1)])
        self.assertEqual(c.session.client_id, "")

    def test_create_topic(self):
        c = self.conn()
        self.assertEqual(c.send(CreateTopic(3, "t", 1_000, 50)), [Ok(3)])
        topic = self.service.topics["t"]
        self.assertEqual((topic.retention_ttl, topic.compaction_window), (1_000, 50))
        self.assertEqual(c.send(CreateTopic(4, "t", 1_000, 50)), [Ok(4)])  # idempotent
        self.assertError(c.send(CreateTopic(5, "t", 2_000, 50)), 5, ErrorCode.TOPIC_EXISTS)
        self.assertEqual(self.service.topics["t"].retention_ttl, 1_000)
        self.assertEqual(c.send(Ping(6)), [Ok(6)])  # stays open

    def test_create_topic_bad_name(self):
        c = self.conn()
        for name in ("", "has space", "x" * 250, "caf\u00e9"):
            self.assertError(c.send(CreateTopic(1, name, 0, 0)), 1, ErrorCode.BAD_TOPIC)
        self.assertEqual(self.service.topics, {})
        self.assertEqual(c.send(CreateTopic(2, "A-z_0.9/x", 0, 0)), [Ok(2)])

    def test_subscribe(self):
        c = self.conn()
        self.assertEqual(c.send(Subscribe(9, "new", Start.LATEST)), [Ok(9)])
        self.assertIn("new", self.service.topics)  # created by SUBSCRIBE
        self.assertEqual(self.service.topics["new"].info().subscribers, 1)

    def test_unsubscribe(self):
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.assertEqual(c.send(Unsubscribe(2, "t")), [Ok(2)])
        self.assertEqual(self.service.topics["t"].info().subscribers, 0)
        self.service.topics["t"].publish(None, b"v")
        self.assertEqual(c.new(), [])  # delivery stopped

    def test_publish(self):
        c = self.conn()
        self.assertEqual(c.send(Publish(3, "p", b"v0")), [Published(3, 0, False)])
        self.assertEqual(c.send(Publish(4, "p", b"v1", b"k")), [Published(4, 1, False)])
        self.assertEqual(self.service.topics["p"].next_offset, 2)  # created by PUBLISH

    def test_publish_duplicate(self):
        c = self.conn()
        c.send(CreateTopic(1, "p", 0, 1_000))
        self.assertEqual(c.send(Publish(2, "p", b"a", b"k")), [Published(2, 0, False)])
        self.assertEqual(c.send(Publish(3, "p", b"b", None)), [Published(3, 1, False)])
        self.assertEqual(c.send(Publish(4, "p", b"c", b"k")), [Published(4, 0, True)])
        self.assertEqual(c.send(Publish(5, "p", b"d", None)), [Published(5, 2, False)])

    def test_publish_batch(self):
        c = self.conn()
        c.send(CreateTopic(1, "b", 0, 1_000))
        reader = self.conn()
        reader.send(Subscribe(1, "b", Start.LATEST))
        reader.new()
        reader.events.clear()
        reader._seen = 0
        entries = [(b"k", b"1"), (b"k", b"2"), (None, b"3"), (b"j", b"4")]
        self.assertEqual(c.send(PublishBatch(2, "b", entries)),
                         [PublishedBatch(2, [(0, False), (0, True), (1, False), (2, False)])])
        self.assertEqual(len(reader.events), 1)  # one write for the whole batch
        self.assertEqual([(m.offset, m.value) for m in reader.new()],
                         [(0, b"1"), (1, b"3"), (2, b"4")])

    def test_commit(self):
        c = self.conn()
        c.send(CreateTopic(1, "t", 60_000, 0))
        c.send(Subscribe(2, "t"))
        self.service.topics["t"].publish(None, b"v")
        c.new()
        self.assertEqual(c.send(Commit(3, "t", 0)), [Ok(3)])
        self.assertEqual(c.session.committed("t"), 0)

    def test_close(self):
        c = self.conn()
        self.assertEqual(c.send(Close(8)), [Ok(8), DISCONNECT])
        self.assertTrue(c.session.ended)

    def test_ping(self):
        c = self.conn()
        self.assertEqual(c.send(Ping(0xFFFFFFFF)), [Ok(0xFFFFFFFF)])

    def test_list_topics(self):
        c = self.conn()
        self.assertEqual(c.send(ListTopics(1)), [Topics(1, [])])
        c.send(CreateTopic(2, "zz", 1_000, 5))
        c.send(Publish(3, "aa", b"v"))
        c.send(Subscribe(4, "zz", Start.LATEST))
        c.send(Publish(5, "zz", b"v"))
        c.new()
        self.assertEqual(c.send(ListTopics(6)), [Topics(6, [
            TopicInfo("aa", 0, 0, 1, 0, 0),
            TopicInfo("zz", 1_000, 5, 1, 1, 1),
        ])])

    def test_replies_in_request_order(self):
        c = self.conn()
        for request in [Ping(1), Publish(2, "t", b"v"), CreateTopic(3, "t", 0, 0),
                        Unsubscribe(4, "t"), ListTopics(5)]:
            c.session.handle(request)
        self.assertEqual([r.rid for r in c.new()], [1, 2, 3, 4, 5])


class FireAndForgetTests(SessionCase):
    def test_publish_rid_zero_no_reply_on_success(self):
        c = self.conn()
        self.assertEqual(c.send(Publish(0, "t", b"v")), [])
        self.assertEqual(c.send(Publish(0, "t", b"v", b"k")), [])
        self.assertEqual(self.service.topics["t"].next_offset, 2)

    def test_publish_rid_zero_error_on_failure(self):
        c = self.conn()
        self.assertError(c.send(Publish(0, "bad topic", b"v")), 0, ErrorCode.BAD_TOPIC)
        self.assertNotIn("bad topic", self.service.topics)
        self.assertEqual(c.send(Ping(1)), [Ok(1)])  # stays open

    def test_publish_batch_rid_zero(self):
        c = self.conn()
        self.assertEqual(c.send(PublishBatch(0, "t", [(None, b"1"), (None, b"2")])), [])
        self.assertEqual(self.service.topics["t"].next_offset, 2)
        self.assertError(c.send(PublishBatch(0, "no good", [(None, b"1")])), 0, ErrorCode.BAD_TOPIC)

    def test_publish_rid_zero_limit_error(self):
        from zaichik.service import Limits
        self.service.limits = Limits(max_topics=1)
        c = self.conn()
        c.send(Publish(0, "one", b"v"))
        self.assertError(c.send(Publish(0, "two", b"v")), 0, ErrorCode.LIMIT)

    def test_hot_path_rid_zero(self):
        c = self.conn()
        c.send(CreateTopic(1, "t", 0, 0))
        self.assertIsNone(c.session.publish_frame(Publish(0, "t", b"v").encode()))
        self.assertEqual(c.new(), [])
        self.assertIsNone(c.session.publish_frame(Publish(5, "t", b"v").encode()))
        self.assertEqual(c.new(), [Published(5, 1, False)])
        # A new topic takes the same path (created with its checks).
        self.assertIsNone(c.session.publish_frame(Publish(6, "other", b"v").encode()))
        self.assertEqual(c.new(), [Published(6, 0, False)])
        self.assertIsNone(c.session.publish_frame(Publish(7, "bad name", b"v").encode()))
        self.assertError(c.new(), 7, ErrorCode.BAD_TOPIC)
        # A malformed body is left to the general decoder, which says what is wrong.
        self.assertIs(c.session.publish_frame(Publish(0, "t", b"v").encode()[:-1]), False)


class WatchedAppendTests(SessionCase):
    """
    A fire-and-forget publish's reply waits on its append (to tell a
    failure, and to keep later replies behind it) only where the append may
    fail after its unit of work: in memory nothing is queued.
    """

    def queued(self, fails_later: Optional[bool] = None) -> list:
        c = self.conn()
        c.send(CreateTopic(1, "t", 0, 0))
        topic = self.service.topics["t"]
        if fails_later is not None:
            topic.fails_later = fails_later  # (as a log that says so would make it)
        with self.service.work:
            c.session.publish_frame(Publish(0, "t", b"one").encode())
            c.session.publish_run({"t": [(None, b"two"), (None, b"three")]}, 2)
            queued = list(c.session._queue or ())
        self.assertEqual(topic.next_offset, 3)
        self.assertEqual(c.new(), [])
        self.assertFalse(c.session._queue)
        return queued

    def test_in_memory_nothing_is_watched(self):
        self.assertEqual(self.queued(), [])
        self.assertFalse(self.service.topics["t"].fails_later)

    def test_a_log_that_may_fail_later_is_watched_once_an_append(self):
        queued = self.queued(True)
        self.assertEqual(len(queued), 1, queued)
        self.assertEqual(queued[0][0].rid, 0)


class HelloTests(SessionCase):
    def test_second_hello_is_protocol_error(self):
        c = self.conn()
        self.assertEqual(c.send(Hello(1, "a")), [Ok(1)])
        self.assertError(c.send(Hello(2, "b")), 2, ErrorCode.PROTOCOL)
        self.assertEqual(c.session.client_id, "a")
        self.assertEqual(c.disconnects, 0)
        self.assertEqual(c.send(Ping(3)), [Ok(3)])

    def test_hello_not_first_is_protocol_error(self):
        c = self.conn()
        self.assertEqual(c.send(Ping(1)), [Ok(1)])
        self.assertError(c.send(Hello(2, "a")), 2, ErrorCode.PROTOCOL)
        self.assertEqual(c.session.client_id, "")  # not durable
        self.assertEqual(c.disconnects, 0)
        self.assertEqual(c.send(Ping(3)), [Ok(3)])

    def test_hello_after_a_failed_request_is_not_first(self):
        c = self.conn()
        self.assertError(c.send(Unsubscribe(1, "t")), 1, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(c.send(Hello(2, "a")), 2, ErrorCode.PROTOCOL)

    def test_unsupported_version_disconnects(self):
        c = self.conn()
        items = c.send(Hello(4, "a", "", version=2))
        self.assertEqual(len(items), 2, items)
        self.assertEqual((items[0].rid, items[0].code), (4, int(ErrorCode.UNSUPPORTED_VERSION)))
        self.assertEqual(items[1], DISCONNECT)
        self.assertTrue(c.session.ended)
        self.assertEqual(c.send(Ping(5)), [])  # nothing more after the close

    def test_no_hello_is_fine(self):
        c = self.conn()
        self.assertEqual(c.send(Publish(1, "t", b"v")), [Published(1, 0, False)])


class SubscribeTests(SessionCase):
    def setUp(self):
        super().setUp()
        self.topic = self.service.create_topic("t", 60_000, 0)

    def test_ok_before_the_backlog(self):
        self.topic.publish_many([(None, b"%d" % i) for i in range(3)])
        c = self.conn()
        items = c.send(Subscribe(5, "t", Start.EARLIEST))
        self.assertEqual(items[0], Ok(5))
        self.assertEqual([(m.topic, m.offset, m.value) for m in items[1:]],
                         [("t", 0, b"0"), ("t", 1, b"1"), ("t", 2, b"2")])
        self.assertEqual(items[1].timestamp, T0_MS)

    def test_subscribe_new_topic_takes_defaults(self):
        service = self.service = BrokerService(clock=self.clock, default_retention=123,
                                               default_compaction_window=45)
        c = self.conn()
        c.send(Subscribe(1, "fresh"))
        c.send(Publish(2, "fresh2", b"v"))
        for name in ("fresh", "fresh2"):
            topic = service.topics[name]
            self.assertEqual((topic.retention_ttl, topic.compaction_window), (123, 45))

    def test_already_subscribed(self):
        c = self.conn()
        self.assertEqual(c.send(Subscribe(1, "t")), [Ok(1)])
        self.assertError(c.send(Subscribe(2, "t", Start.EARLIEST)), 2, ErrorCode.ALREADY_SUBSCRIBED)
        self.assertEqual(self.topic.info().subscribers, 1)
        self.topic.publish(None, b"v")
        self.assertEqual(c.offsets(c.new()), [0])  # once, not twice

    def test_subscribe_bad_topic(self):
        c = self.conn()
        self.assertError(c.send(Subscribe(1, "b a d")), 1, ErrorCode.BAD_TOPIC)
        self.assertNotIn("b a d", self.service.topics)

    def test_publisher_gets_its_own_messages(self):
        c = self.conn()
        c.send(Subscribe(1, "t", Start.LATEST))
        items = c.send(Publish(2, "t", b"echo"))
        self.assertIn(Published(2, 0, False), items)
        self.assertEqual([m.value for m in items if isinstance(m, Message)], [b"echo"])

    def test_starts_through_the_session(self):
        self.topic.publish_many([(None, b"v")] * 4)
        cases = [(Start.DEFAULT, 0, [0, 1, 2, 3]), (Start.LATEST, 0, []),
                 (Start.OFFSET, 2, [2, 3]), (Start.OFFSET, 9, []), (Start.EARLIEST, 3, [0, 1, 2, 3])]
        for start, offset, expected in cases:
            c = self.conn()
            items = c.send(Subscribe(1, "t", start, offset))
            self.assertEqual(items[0], Ok(1))
            self.assertEqual(c.offsets(items), expected, start)

    def test_not_subscribed(self):
        c = self.conn()
        self.assertError(c.send(Unsubscribe(1, "t")), 1, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(c.send(Commit(2, "t", 0)), 2, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(c.send(Unsubscribe(3, "nope")), 3, ErrorCode.NOT_SUBSCRIBED)
        self.assertNotIn("nope", self.service.topics)  # neither creates a topic
        c.send(Subscribe(4, "t"))
        c.send(Unsubscribe(5, "t"))
        self.assertError(c.send(Unsubscribe(6, "t")), 6, ErrorCode.NOT_SUBSCRIBED)
        self.assertError(c.send(Commit(7, "t", 0)), 7, ErrorCode.NOT_SUBSCRIBED)
        # Another connection's subscription does not count.
        other = self.conn()
        other.send(Subscribe(1, "t"))
        self.assertError(c.send(Commit(8, "t", 0)), 8, ErrorCode.NOT_SUBSCRIBED)


class CommitTests(SessionCase):
    def setUp(self):
        super().setUp()
        self.topic = self.service.create_topic("t", 60_000, 0)

    def test_bad_offset_past_what_was_sent(self):
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.assertError(c.send(Commit(2, "t", 0)), 2, ErrorCode.BAD_OFFSET)  # nothing sent yet
        self.topic.publish_many([(None, b"v")] * 2)
        c.new()
        self.assertError(c.send(Commit(3, "t", 2)), 3, ErrorCode.BAD_OFFSET)
        self.assertIsNone(c.session.committed("t"))
        self.assertEqual(c.send(Commit(4, "t", 1)), [Ok(4)])
        self.assertEqual(c.session.committed("t"), 1)

    def test_bad_offset_for_published_but_unsent(self):
        c = self.conn()
        c.send(Subscribe(1, "t", Start.EARLIEST, 0, 1))
        self.topic.publish_many([(None, b"v")] * 3)
        self.assertEqual(c.offsets(c.new()), [0])
        self.assertError(c.send(Commit(2, "t", 1)), 2, ErrorCode.BAD_OFFSET)

    def test_commits_only_move_forward(self):
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.topic.publish_many([(None, b"v")] * 5)
        c.new()
        self.assertEqual(c.send(Commit(2, "t", 3)), [Ok(2)])
        self.assertEqual(c.send(Commit(3, "t", 1)), [Ok(3)])  # below: OK, no change
        self.assertEqual(c.send(Commit(4, "t", 3)), [Ok(4)])  # equal: OK, no change
        self.assertEqual(c.session.committed("t"), 3)
        c.send(Unsubscribe(5, "t"))
        items = c.send(Subscribe(6, "t", Start.DEFAULT))
        self.assertEqual(c.offsets(items), [4])

    def test_commit_opens_the_window(self):
        c = self.conn()
        self.topic.publish_many([(None, b"v")] * 5)
        items = c.send(Subscribe(1, "t", Start.EARLIEST, 0, 2))
        self.assertEqual(c.offsets(items), [0, 1])
        self.topic.publish(None, b"v")
        self.assertEqual(c.new(), [])
        items = c.send(Commit(2, "t", 0))
        self.assertIn(Ok(2), items)  # (MESSAGE and reply order is not specified)
        self.assertEqual(c.offsets(items), [2])
        self.assertEqual(c.offsets(c.send(Commit(3, "t", 2))), [3, 4])
        self.assertEqual(c.offsets(c.send(Commit(4, "t", 4))), [5])

    def test_commit_opens_the_window_on_an_unretained_topic(self):
        self.service.create_topic("live", 0, 0)
        reader = self.conn()
        reader.send(Subscribe(1, "live", Start.LATEST, 0, 1))
        writer = self.conn()
        self.assertEqual(writer.send(PublishBatch(1, "live", [(None, b"v")] * 3)),
                         [PublishedBatch(1, [(0, False), (1, False), (2, False)])])
        self.assertEqual(reader.offsets(reader.new()), [0])
        self.assertError(reader.send(Commit(2, "live", 1)), 2, ErrorCode.BAD_OFFSET)
        self.assertEqual(reader.offsets(reader.send(Commit(3, "live", 0))), [1])
        self.assertEqual(reader.offsets(reader.send(Commit(4, "live", 1))), [2])
        self.assertEqual(reader.send(Commit(5, "live", 2)), [Ok(5)])

    def test_non_durable_commits_survive_resubscribe_on_the_same_session(self):
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.topic.publish_many([(None, b"v")] * 4)
        c.new()
        c.send(Commit(2, "t", 1))
        c.send(Unsubscribe(3, "t"))
        items = c.send(Subscribe(4, "t", Start.DEFAULT))
        self.assertEqual(items[0], Ok(4))
        self.assertEqual(c.offsets(items), [2, 3])
        # ... and only on that session.
        other = self.conn()
        self.assertEqual(other.offsets(other.send(Subscribe(1, "t", Start.DEFAULT))), [0, 1, 2, 3])

    def test_commit_of_offset_sent_before_resubscribing_is_allowed(self):
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.topic.publish_many([(None, b"v")] * 3)
        c.send(Unsubscribe(2, "t"))
        c.send(Subscribe(3, "t", Start.LATEST))
        c.new()
        self.assertEqual(c.send(Commit(4, "t", 2)), [Ok(4)])  # sent to this connection earlier
        self.assertError(c.send(Commit(5, "t", 3)), 5, ErrorCode.BAD_OFFSET)

    def test_commit_at_or_below_committed_still_opens_the_window(self):
        """
        Messages at or below the committed offset are committed ("processed
        every message up to and including offset"), so the max_inflight
        window must not stay shut on them: re-reading from an older offset
        after a commit must not stall.
        """
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.topic.publish_many([(None, b"v")] * 6)
        c.send(Commit(2, "t", 4))
        c.send(Unsubscribe(3, "t"))
        c.new()
        items = c.send(Subscribe(4, "t", Start.OFFSET, 0, 2))
        self.assertEqual(c.offsets(items), [0, 1])
        items = c.send(Commit(5, "t", 1))
        self.assertIn(Ok(5), items)
        self.assertEqual(c.offsets(items), [2, 3])

    def test_commit_reply_comes_before_the_messages_it_releases(self):
        """The spec: a reply comes before any MESSAGE frame its request releases."""
        c = self.conn()
        c.send(Subscribe(1, "t", Start.EARLIEST, 0, 1))
        self.topic.publish_many([(None, b"v")] * 3)
        self.assertEqual(c.offsets(c.new()), [0])
        items = c.send(Commit(2, "t", 0))
        self.assertEqual(items[0], Ok(2))
        self.assertEqual(c.offsets(items[1:]), [1])


    def test_highest_sent_is_not_lowered_by_sending_again(self):
        """BAD_OFFSET is only for offsets past the highest sent to this connection."""
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.topic.publish_many([(None, b"v")] * 6)  # 0..5 sent
        c.send(Commit(2, "t", 2))
        c.send(Unsubscribe(3, "t"))
        c.send(Subscribe(4, "t", Start.OFFSET, 0))  # 0..5 sent again
        c.send(Unsubscribe(5, "t"))
        c.send(Subscribe(6, "t", Start.OFFSET, 4, 1))  # only 4 sent
        c.new()
        items = c.send(Commit(7, "t", 5))
        self.assertIn(Ok(7), items)
        self.assertNotIsInstance(items[-1], Error)
        self.assertEqual(c.session.committed("t"), 5)


class DurableTests(SessionCase):
    def setUp(self):
        super().setUp()
        self.topic = self.service.create_topic("t", 60_000, 0)

    def test_durable_resume(self):
        a = self.conn()
        self.assertEqual(a.send(Hello(1, "worker")), [Ok(1)])
        a.send(Subscribe(2, "t", Start.DEFAULT))
        self.topic.publish_many([(None, b"%d" % i) for i in range(4)])
        self.assertEqual(a.offsets(a.new()), [0, 1, 2, 3])
        self.assertEqual(a.send(Commit(3, "t", 1)), [Ok(3)])
        self.assertEqual(a.send(Close(4)), [Ok(4), DISCONNECT])
        self.assertEqual(self.service.committed("worker", "t"), 1)

        b = self.conn()
        self.assertEqual(b.send(Hello(1, "worker")), [Ok(1)])
        self.assertEqual(a.disconnects, 1)  # a had closed: no second disconnect
        items = b.send(Subscribe(2, "t", Start.DEFAULT))
        self.assertEqual(items[0], Ok(2))
        self.assertEqual([(m.offset, m.value) for m in items[1:]], [(2, b"2"), (3, b"3")])

    def test_durable_commit_needs_a_client_id(self):
        a = self.conn()
        a.send(Hello(1, ""))
        a.send(Subscribe(2, "t"))
        self.topic.publish(None, b"v")
        a.send(Commit(3, "t", 0))
        a.send(Close(4))
        self.assertEqual(self.service.durable_positions(), {})
        b = self.conn()
        b.send(Hello(1, ""))
        self.assertEqual(b.offsets(b.send(Subscribe(2, "t"))), [0])

    def test_takeover(self):
        a = self.conn()
        a.send(Hello(1, "worker"))
        a.send(Subscribe(2, "t"))
        a.new()
        b = self.conn()
        self.assertEqual(b.send(Hello(1, "worker")), [Ok(1)])
        self.assertEqual(a.new(), [DISCONNECT])
        self.assertTrue(a.session.ended)
        self.assertEqual(self.topic.info().subscribers, 0)  # a's subscription ended
        self.topic.publish(None, b"v")
        self.assertEqual(a.new(), [])
        self.assertEqual(b.disconnects, 0)
        # b holds the id now: a third connection takes it from b.
        c = self.conn()
        c.send(Hello(1, "worker"))
        self.assertEqual(b.new(), [DISCONNECT])
        self.assertEqual(a.disconnects, 1)

    def test_other_client_id_no_takeover(self):
        a = self.conn()
        a.send(Hello(1, "one"))
        b = self.conn()
        b.send(Hello(1, "two"))
        self.assertEqual((a.disconnects, b.disconnects), (0, 0))

    def test_durable_commit_forward_only_across_connections(self):
        a = self.conn()
        a.send(Hello(1, "w"))
        a.send(Subscribe(2, "t"))
        self.topic.publish_many([(None, b"v")] * 4)
        a.send(Commit(3, "t", 2))
        a.send(Close(4))
        b = self.conn()
        b.send(Hello(1, "w"))
        b.send(Subscribe(2, "t", Start.EARLIEST))
        self.assertEqual(b.send(Commit(3, "t", 0)), [Ok(3)])  # below: no change
        self.assertEqual(self.service.committed("w", "t"), 2)
        self.assertEqual(b.send(Commit(4, "t", 3)), [Ok(4)])
        self.assertEqual(self.service.committed("w", "t"), 3)


class CloseTests(SessionCase):
    def test_close_ends_subscriptions_and_ignores_later_requests(self):
        topic = self.service.create_topic("t", 60_000, 0)
        c = self.conn()
        c.send(Subscribe(1, "t"))
        self.assertEqual(c.send(Close(2)), [Ok(2), DISCONNECT])
        self.assertEqual(topic.info().subscribers, 0)
        self.assertEqual(c.send(Ping(3)), [])
        topic.publish(None, b"v")
        self.assertEqual(c.new(), [])
        self.assertEqual(c.disconnects, 1)
        self.assertEqual(topic.info().retained, 1)  # closing deletes no message

    def test_close_sends_what_it_owes_before_closing(self):
        self.service.create_topic("t", 0, 0)
        c = self.conn()
        c.send(Subscribe(1, "t"))
        with self.service.work:  # one read: PUBLISH then CLOSE
            c.session.handle(Publish(0, "t", b"owed"))
            c.session.handle(Close(2))
        items = c.new()
        # Published before the CLOSE: delivered before its reply.
        self.assertEqual([m.value for m in items[:-2]], [b"owed"])
        self.assertEqual(items[-2:], [Ok(2), DISCONNECT])


class InternalErrorTests(SessionCase):
    def test_unexpected_exception_gives_internal_and_the_session_goes_on(self):
        c = self.conn()
        topic = self.service.create_topic("t", 0, 0)
        topic.info = lambda: 1 / 0
        self.assertError(c.send(ListTopics(4)), 4, ErrorCode.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        del topic.info
        self.assertFalse(c.session.ended)
        self.assertEqual(c.disconnects, 0)
        self.assertEqual(c.send(Ping(5)), [Ok(5)])
        self.assertEqual(c.send(ListTopics(6)), [Topics(6, [TopicInfo("t", 0, 0, 0, 0, 0)])])

    def test_internal_error_in_publish(self):
        c = self.conn()
        topic = self.service.create_topic("t", 0, 0)

        def broken(key, value):
            raise KeyError("boom")

        topic.publish = broken
        self.assertError(c.send(Publish(0, "t", b"v")), 0, ErrorCode.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        del topic.publish
        self.assertEqual(c.send(Publish(1, "t", b"v")), [Published(1, 0, False)])


    def test_internal_error_on_the_publish_hot_path(self):
        c = self.conn()
        topic = self.service.create_topic("t", 0, 0)
        topic.publish = lambda key, value: 1 / 0
        self.assertIsNone(c.session.publish_frame(Publish(9, "t", b"v").encode()))
        self.assertError(c.new(), 9, ErrorCode.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        del topic.publish
        self.assertEqual(c.send(Ping(10)), [Ok(10)])

    def test_internal_error_from_an_asynchronous_hello(self):
        from twisted.internet.defer import fail

        class Broken:
            requires_hello = False

            def authenticate(self, client_id, token, peer):
                return fail(RuntimeError("checker broke"))

        self.service.authenticator = Broken()
        c = self.conn()
        c.session.handle(Hello(3, "x"))
        self.assertError(c.new(), 3, ErrorCode.INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(c.send(Ping(4)), [Ok(4)])


class OutputFlowTests(SessionCase):
    def test_paused_output_holds_back_then_resumes(self):
        topic = self.service.create_topic("t", 60_000, 0)
        c = self.conn()
        c.send(Subscribe(1, "t"))
        c.session.pause_output()
        topic.publish_many([(None, b"v")] * 3)
        self.assertEqual(c.new(), [])
        c.session.resume_output()
        self.assertEqual(c.offsets(c.new()), [0, 1, 2])
