"""
L{zaichik.protocol.BrokerProtocol} over L{StringTransport}: bytes in with
C{dataReceived}, frames out parsed with L{zaichik.codec.decode_reply}.

No reactor, no sockets: the broker's clock is a L{Clock}, and every
connection is a protocol built by a L{BrokerFactory} on a L{StringTransport}.

Where the spec leaves room, these readings are used:

  - It orders replies among themselves, and MESSAGE frames after their
    SUBSCRIBE's OK and in offset order, but not MESSAGE frames against other
    replies: the framing tests compare the two streams separately.
  - LIMIT is "stays open" in the error table, but the table's own example
    ("connections") cannot be; the idle timeout and the slow-consumer
    "disconnect" policy are documented in L{zaichik.service.Limits} as
    closing, and are tested as documented.
  - What the connection does after NOT_AUTHORIZED is left to "the auth
    issue": only the reply is checked.
"""

from __future__ import annotations

import select
import socket
import struct
from typing import List, Optional, Tuple

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from zaichik import codec
from zaichik.auth import IAuthenticator, Permissions
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
from zaichik.errors import ZaichikError
from zaichik.edge import connection as connection_edge
from zaichik.edge import tcp as tcp_edge
from zaichik.protocol import CLOSE_GRACE, BrokerFactory
from zaichik.service import BrokerService, Limits
from zaichik.testing import parse_frames

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

# Clock time for every test: timestamps are then a known, non-zero value.
NOW = 1_700_000_000
NOW_MS = NOW * 1000


def frames(*requests) -> bytes:
    """Requests (codec objects, or raw bodies as bytes) as framed bytes."""
    return b"".join(codec.frame(r if isinstance(r, bytes) else r.encode()) for r in requests)


# One frame parser for every test: zaichik.testing's.
parse = parse_frames


class RecordingTransport(StringTransport):
    """
    A L{StringTransport} that supports TCP_NODELAY and remembers how much had
    been written when the connection was first asked to close.
    """

    nodelay: Optional[bool] = None
    written_at_close: Optional[int] = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def loseConnection(self) -> None:
        if self.written_at_close is None:
            self.written_at_close = len(self.value())
        super().loseConnection()


class Connection:
    """One broker connection on a L{StringTransport}."""

    def __init__(self, factory: BrokerFactory, transport: Optional[StringTransport] = None) -> None:
        self.factory = factory
        self.protocol = factory.buildProtocol(None)
        self.transport = transport if transport is not None else RecordingTransport()
        self.protocol.makeConnection(self.transport)
        self._read = 0

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send(self, *requests) -> None:
        """All of C{requests} in one C{dataReceived}."""
        self.feed(frames(*requests))

    def replies(self) -> list:
        """The frames written since the last call."""
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        return parse(new)

    def request(self, *requests) -> list:
        self.send(*requests)
        return self.replies()

    def lose(self, reason=ConnectionDone) -> None:
        self.transport.loseConnection()
        self.protocol.connectionLost(Failure(reason()))


def errors_of(replies) -> list:
    """C{(rid, code)} of each reply, for replies expected to all be ERRORs."""
    out = []
    for reply in replies:
        assert isinstance(reply, Error), f"expected an ERROR, got {reply!r}"
        out.append((reply.rid, ErrorCode(reply.code)))
    return out


# What the fake authenticators grant: everything, as a distinct object.
PERMISSIONS = Permissions(["#"], ["#"], ["#"], ["*"])


@implementer(IAuthenticator)
class PendingAuthenticator:
    """Answers each HELLO with a Deferred that the test fires."""

    requires_hello = False

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def authenticate(self, client_id: str, token: str, peer: str = "") -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((client_id, token, d))
        return d


@implementer(IAuthenticator)
class TokenAuthenticator:
    """Accepts only the token "secret" (synchronously)."""

    requires_hello = False

    def authenticate(self, client_id: str, token: str, peer: str = "") -> object:
        if token != "secret":
            raise ZaichikError(ErrorCode.NOT_AUTHORIZED, "bad token")
        return PERMISSIONS


@implementer(IAuthenticator)
class BrokenAuthenticator:
    requires_hello = False

    def authenticate(self, client_id: str, token: str, peer: str = "") -> object:
        raise RuntimeError("authenticator bug")


class BrokerTestCase(SynchronousTestCase):
    """Builds a broker on a L{Clock} and connections to it."""

    max_frame_size = codec.DEFAULT_MAX_FRAME_SIZE

    def setUp(self) -> None:
        self.setUpBroker()

    def setUpBroker(self, **service_kwargs) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.service = BrokerService(clock=self.clock, **service_kwargs)
        self.factory = BrokerFactory(self.service, self.max_frame_size)

    def connect(self, transport: Optional[StringTransport] = None) -> Connection:
        return Connection(self.factory, transport)

    def blocked_topic(self) -> Tuple[Connection, Connection]:
        """
        A broker under the "block" policy whose topic "live" is held: (its
        subscriber, paused, and the publisher whose PUBLISH (rid 1) filled
        the subscriber's queue past the bound, which fan-out does at the end
        of a read).
        """
        self.setUpBroker(limits=Limits(max_output_buffer=100, slow_consumer="block"))
        slow = self.connect()
        slow.request(Subscribe(1, "live", Start.LATEST))
        slow.transport.producer.pauseProducing()
        publisher = self.connect()
        self.assertEqual(publisher.request(Publish(1, "live", b"x" * 200)), [Published(1, 0, False)])
        self.assertTrue(self.service.topics["live"].blocked)
        return slow, publisher

    def assertOpen(self, conn: Connection, rid: int = 4242) -> None:
        """The connection is not closing and still answers a PING."""
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(conn.request(Ping(rid)), [Ok(rid)])

    def assertClosed(self, conn: Connection) -> None:
        """
        The connection is closing, asked to close only after its last frame
        was written; nothing more is written even if more requests arrive.
        """
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(conn.transport.written_at_close, len(conn.transport.value()))
        self.assertEqual(conn.replies(), [])
        conn.send(Ping(99), CreateTopic(100, "after-close"))
        self.assertEqual(conn.replies(), [])
        self.assertNotIn("after-close", self.service.topics)


# ---------------------------------------------------------------------------
# Every opcode's reply
# ---------------------------------------------------------------------------


class OpcodeReplyTests(BrokerTestCase):
    def test_hello(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.request(Hello(1, "client-a", "")), [Ok(1)])
        self.assertEqual(conn.protocol.session.client_id, "client-a")
        self.assertOpen(conn)

    def test_hello_empty_client_id(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.request(Hello(7)), [Ok(7)])
        self.assertEqual(conn.protocol.session.client_id, "")

    def test_create_topic(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.request(CreateTopic(1, "orders", 60_000, 500)), [Ok(1)])
        topic = self.service.topics["orders"]
        self.assertEqual((topic.retention_ttl, topic.compaction_window), (60_000, 500))

    def test_create_topic_idempotent(self) -> None:
        conn = self.connect()
        replies = conn.request(CreateTopic(1, "orders", 10, 20), CreateTopic(2, "orders", 10, 20))
        self.assertEqual(replies, [Ok(1), Ok(2)])

    def test_subscribe_then_messages(self) -> None:
        """OK, then the retained messages in offset order, with the
        broker's timestamp, key and value."""
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0), Publish(2, "t", b"v0", b"k"), Publish(3, "t", b"v1"))
        replies = conn.request(Subscribe(4, "t", Start.EARLIEST))
        self.assertEqual(replies, [
            Ok(4),
            Message("t", 0, NOW_MS, b"v0", b"k"),
            Message("t", 1, NOW_MS, b"v1", None),
        ])

    def test_subscribe_live(self) -> None:
        """A message published after SUBSCRIBE is sent to the subscriber,
        its own publisher included."""
        conn = self.connect()
        self.assertEqual(conn.request(Subscribe(1, "live", Start.LATEST)), [Ok(1)])
        self.clock.advance(2.5)
        replies = conn.request(Publish(2, "live", b"hi"))
        self.assertEqual(replies, [Published(2, 0, False), Message("live", 0, NOW_MS + 2500, b"hi")])

    def test_subscribe_offset(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0),
                     PublishBatch(2, "t", [(None, b"a"), (None, b"b"), (None, b"c")]))
        replies = conn.request(Subscribe(3, "t", Start.OFFSET, 1))
        self.assertEqual([type(r) for r in replies], [Ok, Message, Message])
        self.assertEqual([r.offset for r in replies[1:]], [1, 2])

    def test_unsubscribe(self) -> None:
        """OK, and no more messages after it."""
        conn = self.connect()
        conn.request(Subscribe(1, "t", Start.LATEST))
        self.assertEqual(conn.request(Unsubscribe(2, "t")), [Ok(2)])
        self.assertEqual(conn.request(Publish(3, "t", b"x")), [Published(3, 0, False)])
        self.assertEqual(self.service.topics["t"].subscribers, [])

    def test_publish(self) -> None:
        conn = self.connect()
        replies = conn.request(Publish(1, "t", b"a"), Publish(2, "t", b"b", b"key"))
        self.assertEqual(replies, [Published(1, 0, False), Published(2, 1, False)])
        self.assertEqual(self.service.topics["t"].next_offset, 2)

    def test_publish_duplicate(self) -> None:
        """Compaction: PUBLISHED with duplicate = 1 and the original's offset."""
        conn = self.connect()
        conn.request(CreateTopic(1, "c", 0, 1000))
        replies = conn.request(Publish(2, "c", b"a", b"k"), Publish(3, "c", b"b", b"other"),
                               Publish(4, "c", b"c", b"k"))
        self.assertEqual(replies, [Published(2, 0, False), Published(3, 1, False), Published(4, 0, True)])

    def test_publish_fire_and_forget(self) -> None:
        """PUBLISH with rid 0 is stored and gets no reply."""
        conn = self.connect()
        self.assertEqual(conn.request(Publish(0, "t", b"a"), Ping(1)), [Ok(1)])
        self.assertEqual(self.service.topics["t"].next_offset, 1)

    def test_publish_batch(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "c", 0, 1000))
        replies = conn.request(PublishBatch(2, "c", [(b"k", b"a"), (None, b"b"), (b"k", b"c"), (b"j", b"d")]))
        self.assertEqual(replies, [PublishedBatch(2, [(0, False), (1, False), (0, True), (2, False)])])

    def test_publish_batch_fire_and_forget(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.request(PublishBatch(0, "t", [(None, b"a"), (None, b"b")]), Ping(1)), [Ok(1)])
        self.assertEqual(self.service.topics["t"].next_offset, 2)

    def test_commit(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0), Publish(2, "t", b"a"), Publish(3, "t", b"b"),
                     Subscribe(4, "t", Start.EARLIEST))
        self.assertEqual(conn.request(Commit(5, "t", 1)), [Ok(5)])
        # At or below the last commit: OK, changes nothing.
        self.assertEqual(conn.request(Commit(6, "t", 0)), [Ok(6)])
        self.assertEqual(conn.protocol.session.committed("t"), 1)

    def test_ping(self) -> None:
        conn = self.connect()
        self.assertEqual(conn.request(Ping(0xFFFFFFFF)), [Ok(0xFFFFFFFF)])

    def test_list_topics(self) -> None:
        conn = self.connect()
        other = self.connect()
        conn.request(CreateTopic(1, "b", 60_000, 7), Publish(2, "b", b"x"), Publish(3, "a", b"y"))
        other.request(Subscribe(1, "b", Start.LATEST))
        replies = conn.request(ListTopics(4))
        self.assertEqual(replies, [Topics(4, [
            TopicInfo("a", 0, 0, 1, 0, 0),
            TopicInfo("b", 60_000, 7, 1, 1, 1),
        ])])

    def test_list_topics_empty(self) -> None:
        self.assertEqual(self.connect().request(ListTopics(3)), [Topics(3, [])])

    def test_close(self) -> None:
        """OK, then the connection closes; the OK is written first."""
        conn = self.connect()
        self.assertEqual(conn.request(Close(9)), [Ok(9)])
        self.assertClosed(conn)

    def test_close_ends_subscriptions(self) -> None:
        conn = self.connect()
        conn.request(Subscribe(1, "t", Start.LATEST))
        conn.request(Close(2))
        self.assertEqual(self.service.topics["t"].subscribers, [])
        # Nothing deleted: the topic remains.
        self.assertIn("t", self.service.topics)

    def test_close_sends_what_it_owes(self) -> None:
        """
        "CLOSE. The broker answers OK, sends what it still owes the
        connection, then closes it."  A message published while this
        connection follows the topic is owed to it ("a message goes only to
        the subscribers present when it is published"), also when the
        PUBLISH and the CLOSE arrive in one read; and fed one frame per read
        the broker does send it, so whole and split input must agree.
        """
        for topic, retention in (("live", 0), ("kept", 60_000)):
            split = self.connect()
            split.request(CreateTopic(1, topic, retention, 0), Subscribe(2, topic, Start.LATEST))
            split.send(Publish(3, topic, b"mine"))
            split.send(Close(4))
            split_replies_, split_messages = split_replies(split.replies())
            self.assertEqual(split_replies_, [Published(3, 0, False), Ok(4)])
            self.assertEqual([m.value for m in split_messages], [b"mine"])

            self.setUpBroker()
            whole = self.connect()
            whole.request(CreateTopic(1, topic, retention, 0), Subscribe(2, topic, Start.LATEST))
            whole.send(Publish(3, topic, b"mine"), Close(4))
            replies, messages = split_replies(whole.replies())
            self.assertEqual(replies, [Published(3, 0, False), Ok(4)])
            self.assertEqual([m.value for m in messages], [b"mine"], f"topic with retention {retention}")
            self.assertTrue(whole.transport.disconnecting)

    def test_commits_without_hello_last_as_long_as_the_connection(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0),
                     PublishBatch(2, "t", [(None, b"a"), (None, b"b"), (None, b"c")]),
                     Subscribe(3, "t", Start.EARLIEST))
        conn.request(Commit(4, "t", 1), Unsubscribe(5, "t"))
        replies = conn.request(Subscribe(6, "t", Start.DEFAULT))
        self.assertEqual([m.value for m in replies[1:]], [b"c"])
        other = self.connect()
        replies = other.request(Subscribe(1, "t", Start.DEFAULT))
        self.assertEqual([m.value for m in replies[1:]], [b"a", b"b", b"c"])

    def test_close_grace_then_abort(self) -> None:
        """A peer that does not finish closing is aborted after the grace
        period; a connection that does close leaves no timer behind."""
        conn = self.connect()
        conn.request(Close(1))
        self.assertFalse(conn.transport.disconnected)
        self.clock.advance(CLOSE_GRACE)
        self.assertTrue(conn.transport.disconnected)  # StringTransport.abortConnection

        first = conn
        conn = self.connect()
        conn.request(Close(1))
        conn.lose()
        first.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])


# ---------------------------------------------------------------------------
# Every error code, and whether the connection stays open
# ---------------------------------------------------------------------------


class BadFrameTests(BrokerTestCase):
    def assertBadFrame(self, body: bytes, rid: int) -> None:
        conn = self.connect()
        replies = conn.request(body)
        self.assertEqual(errors_of(replies), [(rid, ErrorCode.BAD_FRAME)], repr(body))
        self.assertOpen(conn)

    def test_empty_body(self) -> None:
        self.assertBadFrame(b"", 0)

    def test_too_short_for_rid(self) -> None:
        """A body too short to hold a rid: the error carries rid 0."""
        for body in (b"\x08", b"\x08\x00\x00\x05", b"\x01\x00", b"\x05\x00\x00\x00"):
            self.assertBadFrame(body, 0)

    def test_truncated_field(self) -> None:
        """A truncated field after the rid: the error carries the rid."""
        for request in (Hello(11, "id", "tok"), CreateTopic(12, "t", 1, 2), Subscribe(13, "t"),
                        Unsubscribe(14, "topic"), Publish(15, "t", b"value", b"key"), Commit(16, "t", 3),
                        PublishBatch(17, "t", [(b"k", b"v"), (None, b"w")])):
            body = request.encode()
            self.assertBadFrame(body[:-1], request.rid)

    def test_trailing_bytes(self) -> None:
        for request in (Ping(21), Close(22), ListTopics(23), Hello(24), CreateTopic(25, "t"),
                        Subscribe(26, "t"), Unsubscribe(27, "t"), Publish(28, "t", b"v"),
                        Commit(29, "t", 0), PublishBatch(30, "t", [(None, b"v")])):
            self.assertBadFrame(request.encode() + b"\x00", request.rid)
        self.assertNotIn("t", self.service.topics)

    def test_bad_utf8(self) -> None:
        bad = b"\x00\x02\xff\xfe"
        self.assertBadFrame(b"\x02\x00\x00\x00\x05" + bad + b"\x00" * 16, 5)  # CREATE_TOPIC
        self.assertBadFrame(b"\x05\x00\x00\x00\x06" + bad + b"\x00\x00" + b"\x00\x00\x00\x01x", 6)  # PUBLISH
        self.assertBadFrame(b"\x01\x00\x00\x00\x07\x00\x01" + bad + b"\x00\x00", 7)  # HELLO client_id
        self.assertEqual(self.service.topics, {})

    def test_unknown_start(self) -> None:
        body = Subscribe(8, "t").encode()
        # start is the byte after the topic string
        at = 1 + 4 + 2 + 1
        self.assertBadFrame(body[:at] + b"\x04" + body[at + 1 :], 8)

    def test_batch_count_zero(self) -> None:
        self.assertBadFrame(PublishBatch(9, "t", []).encode(), 9)
        self.assertNotIn("t", self.service.topics)

    def test_malformed_batch_publishes_nothing(self) -> None:
        """All or nothing: a batch whose last entry is cut off, or whose
        count is larger than its entries, publishes none of them."""
        conn = self.connect()
        conn.request(CreateTopic(1, "t"))
        body = PublishBatch(2, "t", [(None, b"a"), (None, b"b"), (None, b"c")]).encode()
        overcount = body[:11] + struct.pack(">I", 4) + body[15:]
        self.assertEqual(errors_of(conn.request(body[:-1], overcount)),
                         [(2, ErrorCode.BAD_FRAME), (2, ErrorCode.BAD_FRAME)])
        self.assertEqual(self.service.topics["t"].next_offset, 0)
        self.assertOpen(conn)

    def test_fire_and_forget_bad_frame(self) -> None:
        """A malformed rid-0 PUBLISH is answered with ERROR rid 0."""
        self.assertBadFrame(Publish(0, "t", b"value").encode()[:-2], 0)


class ErrorCodeTests(BrokerTestCase):
    def test_unknown_opcode(self) -> None:
        conn = self.connect()
        replies = conn.request(b"\x0d\x00\x00\x00\x07", b"\x80\x00\x00\x00\x08", b"\xff\x00\x00\x00\x09xyz",
                               b"\x42")
        self.assertEqual(errors_of(replies), [
            (7, ErrorCode.UNKNOWN_OPCODE),
            (8, ErrorCode.UNKNOWN_OPCODE),
            (9, ErrorCode.UNKNOWN_OPCODE),
            (0, ErrorCode.UNKNOWN_OPCODE),
        ])
        self.assertOpen(conn)

    def test_bad_topic(self) -> None:
        conn = self.connect()
        # ("*" alone is a pattern since protocol 1.1: "a*" and "a.>.b" are not.)
        for name in ("", "has space", "x" * 250, "тема", "a:b", "a\n", "a*", "a.>.b"):
            replies = conn.request(
                CreateTopic(1, name), Subscribe(2, name), Unsubscribe(3, name), Publish(4, name, b"v"),
                Commit(5, name, 0), PublishBatch(6, name, [(None, b"v")]), Publish(0, name, b"v"),
                PublishBatch(0, name, [(None, b"v")]),
            )
            self.assertEqual(errors_of(replies), [
                (1, ErrorCode.BAD_TOPIC), (2, ErrorCode.BAD_TOPIC), (3, ErrorCode.BAD_TOPIC),
                (4, ErrorCode.BAD_TOPIC), (5, ErrorCode.BAD_TOPIC), (6, ErrorCode.BAD_TOPIC),
                (0, ErrorCode.BAD_TOPIC), (0, ErrorCode.BAD_TOPIC),
            ], repr(name))
        self.assertEqual(self.service.topics, {})
        self.assertOpen(conn)

    def test_topic_name_limits(self) -> None:
        """249 bytes of every allowed character is a good name."""
        conn = self.connect()
        longest = "x" * 249
        allowed = "AZaz09._-/"
        self.assertEqual(conn.request(CreateTopic(1, longest), CreateTopic(2, allowed)), [Ok(1), Ok(2)])

    def test_topic_exists(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 100, 0))
        replies = conn.request(CreateTopic(2, "t", 200, 0), CreateTopic(3, "t", 100, 5))
        self.assertEqual(errors_of(replies), [(2, ErrorCode.TOPIC_EXISTS), (3, ErrorCode.TOPIC_EXISTS)])
        topic = self.service.topics["t"]
        self.assertEqual((topic.retention_ttl, topic.compaction_window), (100, 0))
        self.assertOpen(conn)

    def test_topic_exists_for_implicit_topic(self) -> None:
        """A topic made by PUBLISH has the defaults (0, 0)."""
        conn = self.connect()
        conn.request(Publish(1, "t", b"v"))
        self.assertEqual(conn.request(CreateTopic(2, "t", 0, 0)), [Ok(2)])
        self.assertEqual(errors_of(conn.request(CreateTopic(3, "t", 1, 0))), [(3, ErrorCode.TOPIC_EXISTS)])

    def test_not_subscribed(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "t"))
        replies = conn.request(Unsubscribe(2, "t"), Commit(3, "t", 0), Unsubscribe(4, "never"))
        self.assertEqual(errors_of(replies), [
            (2, ErrorCode.NOT_SUBSCRIBED), (3, ErrorCode.NOT_SUBSCRIBED), (4, ErrorCode.NOT_SUBSCRIBED)])
        self.assertOpen(conn)

    def test_not_subscribed_after_unsubscribe(self) -> None:
        conn = self.connect()
        conn.request(Subscribe(1, "t", Start.LATEST), Unsubscribe(2, "t"))
        self.assertEqual(errors_of(conn.request(Commit(3, "t", 0))), [(3, ErrorCode.NOT_SUBSCRIBED)])

    def test_bad_offset(self) -> None:
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0))
        conn.request(Subscribe(2, "t", Start.EARLIEST))
        # Nothing sent yet.
        self.assertEqual(errors_of(conn.request(Commit(3, "t", 0))), [(3, ErrorCode.BAD_OFFSET)])
        replies = conn.request(Publish(4, "t", b"a"), Publish(5, "t", b"b"))
        self.assertEqual([r.offset for r in replies if isinstance(r, Message)], [0, 1])
        self.assertEqual(errors_of(conn.request(Commit(6, "t", 2))), [(6, ErrorCode.BAD_OFFSET)])
        self.assertEqual(conn.request(Commit(7, "t", 1)), [Ok(7)])
        self.assertEqual(conn.protocol.session.committed("t"), 1)
        self.assertOpen(conn)

    def test_unsupported_version(self) -> None:
        """ERROR with the HELLO's rid, then closed; requests behind it in
        the same read are not carried out."""
        conn = self.connect()
        replies = conn.request(Hello(3, "id", "", version=2), CreateTopic(4, "behind"))
        self.assertEqual(errors_of(replies), [(3, ErrorCode.UNSUPPORTED_VERSION)])
        self.assertNotIn("behind", self.service.topics)
        self.assertClosed(conn)

    def test_not_authorized(self) -> None:
        self.setUpBroker(authenticator=TokenAuthenticator())
        conn = self.connect()
        self.assertEqual(errors_of(conn.request(Hello(1, "id", "wrong"))), [(1, ErrorCode.NOT_AUTHORIZED)])
        self.assertEqual(conn.protocol.session.client_id, "")
        good = self.connect()
        self.assertEqual(good.request(Hello(1, "id", "secret")), [Ok(1)])
        self.assertIs(good.protocol.session.permissions, PERMISSIONS)

    def test_already_subscribed(self) -> None:
        conn = self.connect()
        conn.request(Subscribe(1, "t", Start.LATEST))
        self.assertEqual(errors_of(conn.request(Subscribe(2, "t", Start.EARLIEST))),
                         [(2, ErrorCode.ALREADY_SUBSCRIBED)])
        self.assertEqual(len(self.service.topics["t"].subscribers), 1)
        self.assertOpen(conn)

    def test_protocol_hello_not_first(self) -> None:
        conn = self.connect()
        replies = conn.request(Ping(1), Hello(2, "late"))
        self.assertEqual(replies[0], Ok(1))
        self.assertEqual(errors_of(replies[1:]), [(2, ErrorCode.PROTOCOL)])
        self.assertEqual(conn.protocol.session.client_id, "")
        self.assertOpen(conn)

    def test_protocol_second_hello(self) -> None:
        conn = self.connect()
        replies = conn.request(Hello(1, "first"), Hello(2, "second"))
        self.assertEqual(replies[0], Ok(1))
        self.assertEqual(errors_of(replies[1:]), [(2, ErrorCode.PROTOCOL)])
        self.assertEqual(conn.protocol.session.client_id, "first")
        self.assertOpen(conn)

    def test_internal(self) -> None:
        """A bug (here in the authenticator) is INTERNAL, logged; the
        connection stays open."""
        self.setUpBroker(authenticator=BrokenAuthenticator())
        conn = self.connect()
        self.assertEqual(errors_of(conn.request(Hello(5, "id"))), [(5, ErrorCode.INTERNAL)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertOpen(conn)

    def test_limit_topics(self) -> None:
        self.setUpBroker(limits=Limits(max_topics=1))
        conn = self.connect()
        replies = conn.request(CreateTopic(1, "one"), CreateTopic(2, "two"), Publish(3, "three", b"v"),
                               Subscribe(4, "four"))
        self.assertEqual(replies[0], Ok(1))
        self.assertEqual(errors_of(replies[1:]), [(2, ErrorCode.LIMIT), (3, ErrorCode.LIMIT), (4, ErrorCode.LIMIT)])
        self.assertEqual(list(self.service.topics), ["one"])
        self.assertOpen(conn)

    def test_limit_subscriptions(self) -> None:
        self.setUpBroker(limits=Limits(max_subscriptions=1))
        conn = self.connect()
        replies = conn.request(Subscribe(1, "a"), Subscribe(2, "b"))
        self.assertEqual(replies[0], Ok(1))
        self.assertEqual(errors_of(replies[1:]), [(2, ErrorCode.LIMIT)])
        self.assertOpen(conn)

    def test_limit_retained_bytes_reject(self) -> None:
        self.setUpBroker(limits=Limits(max_retained_bytes=200, retained_bytes_policy="reject"))
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0))
        self.assertEqual(conn.request(Publish(2, "t", b"x" * 100)), [Published(2, 0, False)])
        self.assertEqual(errors_of(conn.request(Publish(3, "t", b"y" * 100))), [(3, ErrorCode.LIMIT)])
        self.assertEqual(self.service.topics["t"].next_offset, 1)
        self.assertOpen(conn)

    def test_limit_connections(self) -> None:
        """One connection too many is told LIMIT (rid 0) and closed; the
        others are untouched, and a slot frees when a connection ends."""
        self.setUpBroker(limits=Limits(max_connections=1))
        first = self.connect()
        second = self.connect()
        self.assertEqual(errors_of(second.replies()), [(0, ErrorCode.LIMIT)])
        self.assertClosed(second)
        self.assertOpen(first)
        second.lose()
        first.lose()
        third = self.connect()
        self.assertEqual(third.replies(), [])
        self.assertOpen(third)

    def test_limit_idle_timeout(self) -> None:
        """Any request resets the idle timer; silence past it is LIMIT
        (rid 0) and a close."""
        self.setUpBroker(limits=Limits(idle_timeout=5))
        conn = self.connect()
        self.clock.advance(4)
        self.assertOpen(conn, 1)
        self.clock.advance(4)
        self.assertOpen(conn, 2)
        self.clock.advance(5)
        self.assertEqual(errors_of(conn.replies()), [(0, ErrorCode.LIMIT)])
        self.assertClosed(conn)

    def test_limit_slow_consumer_disconnect(self) -> None:
        """A subscriber whose output is full past the bound is told LIMIT
        (rid 0) and closed; the publisher is not affected."""
        self.setUpBroker(limits=Limits(max_output_buffer=200, slow_consumer="disconnect"))
        slow = self.connect()
        slow.request(Subscribe(1, "live", Start.LATEST))
        slow.transport.producer.pauseProducing()  # its socket buffer is full
        publisher = self.connect()
        replies = publisher.request(*[Publish(i, "live", b"x" * 60) for i in range(1, 6)])
        self.assertEqual([r.offset for r in replies], [0, 1, 2, 3, 4])
        self.assertEqual(errors_of(slow.replies()), [(0, ErrorCode.LIMIT)])
        self.assertClosed(slow)
        self.assertEqual(self.service.topics["live"].subscribers, [])
        self.assertOpen(publisher)

    def test_limit_slow_consumer_block(self) -> None:
        """With the "block" policy the publisher's later requests wait until
        the slow subscriber drains, then are answered in order."""
        slow, publisher = self.blocked_topic()
        # ... so the next publish is answered, and what follows it waits.
        replies = publisher.request(Publish(2, "live", b"y"), Ping(3))
        self.assertEqual(replies, [Published(2, 1, False)])
        publisher.send(Ping(4))
        self.assertEqual(publisher.replies(), [])
        other = self.connect()
        self.assertOpen(other)
        slow.transport.producer.resumeProducing()
        self.assertEqual([r.offset for r in slow.replies()], [0, 1])
        self.assertFalse(self.service.topics["live"].blocked)
        self.assertEqual(publisher.replies(), [Ok(3), Ok(4)])


class FrameTooLargeTests(BrokerTestCase):
    max_frame_size = 64

    def test_over_limit(self) -> None:
        """Exactly one ERROR(0, FRAME_TOO_LARGE), then the connection closes,
        even though more bytes follow."""
        conn = self.connect()
        body = Publish(1, "t", b"x" * 60).encode()
        self.assertGreater(len(body), 64)
        conn.feed(codec.frame(body) + frames(Ping(2)))
        replies = conn.replies()
        self.assertEqual(errors_of(replies), [(0, ErrorCode.FRAME_TOO_LARGE)])
        self.assertNotIn("t", self.service.topics)
        self.assertClosed(conn)

    def test_over_limit_by_one(self) -> None:
        conn = self.connect()
        conn.feed(struct.pack(">I", 65))  # the length alone is enough
        self.assertEqual(errors_of(conn.replies()), [(0, ErrorCode.FRAME_TOO_LARGE)])
        conn.feed(b"\x08" + b"\x00" * 64 + frames(Ping(1)))
        self.assertClosed(conn)

    def test_at_limit(self) -> None:
        """A frame of exactly the limit is accepted."""
        conn = self.connect()
        body = Publish(1, "t", b"x" * (64 - 14)).encode()
        self.assertEqual(len(body), 64)
        self.assertEqual(conn.request(body), [Published(1, 0, False)])
        self.assertOpen(conn)

    def test_earlier_frames_answered(self) -> None:
        """Frames before the oversized one in the same read are answered
        first; the subscription ends with the connection."""
        conn = self.connect()
        conn.feed(frames(Subscribe(1, "t", Start.LATEST), Ping(2)) + struct.pack(">I", 1000) + b"\x08")
        replies = conn.replies()
        self.assertEqual(replies[:2], [Ok(1), Ok(2)])
        self.assertEqual(errors_of(replies[2:]), [(0, ErrorCode.FRAME_TOO_LARGE)])
        self.assertEqual(self.service.topics["t"].subscribers, [])
        self.assertClosed(conn)


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------

# A conversation touching every request, errors included.  Two topics:
# "news" retains (a subscriber that starts inside a read gets each message
# exactly once), "live" does not (a subscriber gets only what is published
# after it subscribed, even within one read).
CONVERSATION = [
    Hello(1, "framer", ""),
    CreateTopic(2, "news", 60_000, 1000),
    Publish(3, "news", b"first", b"k1"),
    Subscribe(4, "news", Start.EARLIEST),
    Publish(0, "news", b"second"),
    PublishBatch(5, "news", [(None, b"third"), (b"k1", b"dup"), (b"k2", b"fourth")]),
    b"",
    b"\x42\x00\x00\x00\x06",
    Commit(7, "news", 0),
    Publish(8, "live", b"before"),
    Subscribe(9, "live", Start.LATEST),
    Publish(10, "live", b"after", b"key"),
    Subscribe(11, "spare", Start.LATEST),
    ListTopics(12),
    Unsubscribe(13, "spare"),
    Publish(14, "bad topic", b"x"),
    Commit(15, "spare", 0),
    Ping(16),
]
CONVERSATION_BYTES = frames(*CONVERSATION)


def split_replies(replies: list):
    """(replies to requests, MESSAGE frames)."""
    return ([r for r in replies if not isinstance(r, Message)],
            [r for r in replies if isinstance(r, Message)])


class ConversationTestCase(BrokerTestCase):
    def converse(self, chunks) -> list:
        """A fresh broker, one connection fed C{chunks}; its replies."""
        self.setUpBroker()
        conn = self.connect()
        for chunk in chunks:
            conn.feed(chunk)
        self.assertFalse(conn.transport.disconnecting)
        return conn.replies()


class FramingTests(ConversationTestCase):
    def test_whole(self) -> None:
        """The reference answers: each request answered once, in order."""
        replies, messages = split_replies(self.converse([CONVERSATION_BYTES]))
        self.assertEqual([r.rid for r in replies], [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
        self.assertEqual(replies[2], Published(3, 0, False))
        self.assertEqual(replies[4], PublishedBatch(5, [(2, False), (0, True), (3, False)]))
        self.assertEqual(errors_of([replies[5], replies[6], replies[14], replies[15]]), [
            (0, ErrorCode.BAD_FRAME), (6, ErrorCode.UNKNOWN_OPCODE), (14, ErrorCode.BAD_TOPIC),
            (15, ErrorCode.NOT_SUBSCRIBED)])
        self.assertEqual(replies[7], Ok(7))
        self.assertEqual(replies[12], Topics(12, [
            TopicInfo("live", 0, 0, 2, 0, 1),
            TopicInfo("news", 60_000, 1000, 4, 4, 1),
            TopicInfo("spare", 0, 0, 0, 0, 1),
        ]))
        self.assertEqual([(m.topic, m.offset, m.key, m.value) for m in messages], [
            ("news", 0, b"k1", b"first"), ("news", 1, None, b"second"), ("news", 2, None, b"third"),
            ("news", 3, b"k2", b"fourth"), ("live", 1, b"key", b"after"),
        ])

    def test_byte_at_a_time(self) -> None:
        whole = split_replies(self.converse([CONVERSATION_BYTES]))
        data = CONVERSATION_BYTES
        split = split_replies(self.converse([data[i : i + 1] for i in range(len(data))]))
        self.assertEqual(split, whole)

    def test_every_split_point(self) -> None:
        """Two reads, split at every byte boundary."""
        whole = split_replies(self.converse([CONVERSATION_BYTES]))
        data = CONVERSATION_BYTES
        for at in range(len(data) + 1):
            self.assertEqual(split_replies(self.converse([data[:at], data[at:]])), whole, at)

    if given is not None:

        @settings(max_examples=150, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.integers(min_value=0, max_value=len(CONVERSATION_BYTES)), max_size=40))
        def test_random_chunks(self, cuts) -> None:
            whole = split_replies(self.converse([CONVERSATION_BYTES]))
            points = [0] + sorted(cuts) + [len(CONVERSATION_BYTES)]
            chunks = [CONVERSATION_BYTES[a:b] for a, b in zip(points, points[1:])]
            self.assertEqual(split_replies(self.converse(chunks)), whole)

    def test_many_frames_one_read_in_order(self) -> None:
        conn = self.connect()
        replies = conn.request(Ping(5), CreateTopic(4, "t"), Publish(3, "t", b"a"), ListTopics(2),
                               Unsubscribe(1, "t"), Ping(6))
        self.assertEqual([r.rid for r in replies], [5, 4, 3, 2, 1, 6])
        self.assertEqual([type(r) for r in replies], [Ok, Ok, Published, Topics, Error, Ok])

    def test_partial_frame_waits(self) -> None:
        """Nothing is answered until a frame is complete."""
        conn = self.connect()
        data = frames(Ping(1), Ping(2))
        conn.feed(data[:12])
        self.assertEqual(conn.replies(), [Ok(1)])
        conn.feed(data[12:])
        self.assertEqual(conn.replies(), [Ok(2)])

    def test_frames_after_close_ignored(self) -> None:
        """CLOSE in the middle of a read: what follows it is not carried out,
        and the OK is written before the connection is closed."""
        conn = self.connect()
        replies = conn.request(Ping(1), Close(2), CreateTopic(3, "after"), Ping(4))
        self.assertEqual(replies, [Ok(1), Ok(2)])
        self.assertNotIn("after", self.service.topics)
        self.assertClosed(conn)


# Reads larger than READ_MIN: a frame the last read left unfinished is
# completed from the head of the next read rather than by copying the whole
# read behind it (BrokerProtocol._frames).  ~300 KB of requests, each 1 KB
# publish fire-and-forget except a few answered ones, to two topics.
LARGE_CONVERSATION = [
    Hello(1, "framer", ""),
    Subscribe(2, "a", Start.LATEST),
    Subscribe(3, "b", Start.LATEST),
    *[Publish(0, "ab"[i % 2], b"%06d" % i + b"v" * 1000) if i % 50 else Publish(4 + i, "a", b"%06d" % i)
      for i in range(300)],
    Ping(9999),
]
LARGE_CONVERSATION_BYTES = frames(*LARGE_CONVERSATION)


class LargeReadFramingTests(ConversationTestCase):
    """Reads over READ_MIN split anywhere give the answers of one read."""

    def outcome(self, chunks):
        """The replies, and each topic's messages (two topics' deliveries interleave as reads end)."""
        replies, messages = split_replies(self.converse(chunks))
        return replies, {t: [m for m in messages if m.topic == t] for t in "ab"}

    _reference = None

    def reference(self):
        if LargeReadFramingTests._reference is None:
            LargeReadFramingTests._reference = self.outcome([LARGE_CONVERSATION_BYTES])
        return LargeReadFramingTests._reference

    def cut(self, points) -> list:
        points = [0] + sorted(points) + [len(LARGE_CONVERSATION_BYTES)]
        return [LARGE_CONVERSATION_BYTES[a:b] for a, b in zip(points, points[1:])]

    def test_reference(self) -> None:
        replies, messages = self.reference()
        self.assertEqual([r.rid for r in replies], [1, 2, 3, *[4 + i for i in range(0, 300, 50)], 9999])
        for topic, first in (("a", 0), ("b", 1)):
            self.assertEqual([m.value[:6] for m in messages[topic]],
                             [b"%06d" % i for i in range(first, 300, 2) if topic == "a" or i % 50])

    def test_frame_completed_from_next_read(self) -> None:
        """The first read ends inside a frame's header, its length, its body; the second completes it."""
        whole = self.reference()
        start = len(frames(*LARGE_CONVERSATION[:120]))  # (a 1 KB publish)
        for into in (1, 3, 4, 5, 200, 1030):
            self.assertEqual(self.outcome(self.cut([start + into])), whole, into)

    def test_completed_publish_joins_the_run(self) -> None:
        """
        A fire-and-forget PUBLISH completed from the next read is staged with
        the rest of the read's run (one block a topic), not on its own: one
        staged alone made its topic stage frame by frame for the rest of the
        unit (1 -> 1 fell from 13.5M to 7.5M msgs/s).
        """
        from zaichik.topic import Topic

        staged: List[tuple] = []
        alone: List[str] = []
        stage_run, publish = Topic.stage_run, Topic.publish

        def spy_stage_run(topic, entries):
            staged.append((topic.name, len(entries)))
            return stage_run(topic, entries)

        def spy_publish(topic, *args, **kwargs):
            alone.append(topic.name)
            return publish(topic, *args, **kwargs)

        self.patch(Topic, "stage_run", spy_stage_run)
        self.patch(Topic, "publish", spy_publish)
        self.setUpBroker()
        conn = self.connect()
        data = frames(Hello(1, "framer", ""), Subscribe(2, "a", Start.LATEST),
                      *[Publish(0, "a", b"%06d" % i + b"v" * 1000) for i in range(200)])
        at = len(frames(Hello(1, "framer", ""), Subscribe(2, "a", Start.LATEST))) + 69 * 1024 + 500  # (in the 70th)
        conn.feed(data[:at])
        conn.feed(data[at:])
        self.assertEqual(alone, [])
        self.assertEqual([n for _, n in staged], [69, 1, 130])
        messages = split_replies(conn.replies())[1]
        self.assertEqual([m.value[:6] for m in messages], [b"%06d" % i for i in range(200)])

    def test_read_ends_where_the_kept_frame_does(self) -> None:
        """The second read holds the rest of the kept frame and nothing more, then the rest."""
        whole = self.reference()
        start = len(frames(*LARGE_CONVERSATION[:120]))
        end = len(frames(*LARGE_CONVERSATION[:121]))
        self.assertEqual(self.outcome(self.cut([start + 10, end])), whole)
        self.assertEqual(self.outcome(self.cut([100_000, start + 10, end])), whole)

    def test_kept_frame_not_completed_by_a_large_read(self) -> None:
        """A frame larger than the read after it (a 200 KB value): kept and joined, not completed."""
        self.setUpBroker()
        conn = self.connect()
        big = frames(Publish(7, "a", b"z" * 200_000))
        data = frames(Hello(1, "framer", ""), Subscribe(2, "a", Start.LATEST)) + big + frames(Ping(8))
        cut = len(data) - len(big) // 2
        conn.feed(data[: cut - 70_000])
        conn.feed(data[cut - 70_000 : cut])
        conn.feed(data[cut:])
        replies, messages = split_replies(conn.replies())
        self.assertEqual([r.rid for r in replies], [1, 2, 7, 8])
        self.assertEqual([len(m.value) for m in messages], [200_000])

    def test_close_in_the_completed_frame(self) -> None:
        """A CLOSE completed from the next read: nothing after it is carried out."""
        self.setUpBroker()
        conn = self.connect()
        data = frames(Hello(1, "framer", ""), Close(2)) + frames(
            *[Publish(0, "after", b"x" * 1000) for _ in range(100)])
        at = len(frames(Hello(1, "framer", ""))) + 4  # (the CLOSE's length read, not its body)
        conn.feed(data[:at])
        conn.feed(data[at:])
        self.assertEqual([r.rid for r in conn.replies()], [1, 2])
        self.assertNotIn("after", self.service.topics)

    if given is not None:

        @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(st.integers(min_value=0, max_value=len(LARGE_CONVERSATION_BYTES)), max_size=6))
        def test_random_large_chunks(self, cuts) -> None:
            self.assertEqual(self.outcome(self.cut(cuts)), self.reference())


# ---------------------------------------------------------------------------
# Several connections to one service
# ---------------------------------------------------------------------------


class ConnectionsTests(BrokerTestCase):
    max_frame_size = 1024

    def test_bad_input_does_not_disturb_others(self) -> None:
        subscriber = self.connect()
        subscriber.request(Subscribe(1, "t", Start.LATEST))
        bad = self.connect()
        replies = bad.request(Publish(1, "t", b"one"), b"", b"\x99\x00", Hello(2, version=1),
                              Unsubscribe(3, "t"), Commit(4, "t", 0), Subscribe(5, "no good"))
        self.assertEqual(replies[0], Published(1, 0, False))
        self.assertEqual([r.code for r in replies[1:]], [
            ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_OPCODE, ErrorCode.PROTOCOL, ErrorCode.NOT_SUBSCRIBED,
            ErrorCode.NOT_SUBSCRIBED, ErrorCode.BAD_TOPIC])
        self.assertEqual([(m.offset, m.value) for m in subscriber.replies()], [(0, b"one")])
        # Now a frame too large: the bad connection is closed...
        bad.feed(struct.pack(">I", 5000))
        self.assertTrue(bad.transport.disconnecting)
        bad.lose()
        # ... and the subscriber still receives.
        publisher = self.connect()
        publisher.request(Publish(1, "t", b"two"))
        self.assertEqual([(m.offset, m.value) for m in subscriber.replies()], [(1, b"two")])
        self.assertEqual(len(self.service.topics["t"].subscribers), 1)
        self.assertOpen(subscriber)

    def test_lost_subscriber_removed(self) -> None:
        topic_subs = lambda: self.service.topics["t"].subscribers
        a = self.connect()
        b = self.connect()
        a.request(Subscribe(1, "t", Start.LATEST))
        b.request(Subscribe(1, "t", Start.LATEST))
        self.assertEqual(len(topic_subs()), 2)
        a.lose(ConnectionLost)
        self.assertEqual(len(topic_subs()), 1)
        publisher = self.connect()
        self.assertEqual(publisher.request(Publish(1, "t", b"x"), ListTopics(2))[1].topics[0].subscribers, 1)
        self.assertEqual([m.value for m in b.replies()], [b"x"])
        self.assertEqual(a.replies(), [])
        b.lose()
        self.assertEqual(topic_subs(), [])
        self.assertEqual(self.service.connections, 1)

    def test_takeover(self) -> None:
        """A second HELLO with the same client_id closes the first connection
        (ending its subscriptions); the newcomer resumes after the durable
        commit."""
        first = self.connect()
        first.request(Hello(1, "worker"), CreateTopic(2, "jobs", 60_000, 0),
                      PublishBatch(3, "jobs", [(None, b"a"), (None, b"b"), (None, b"c")]),
                      Subscribe(4, "jobs", Start.EARLIEST), Commit(5, "jobs", 0))
        self.assertEqual(len(self.service.topics["jobs"].subscribers), 1)
        other = self.connect()
        self.assertEqual(other.request(Hello(1, "someone-else")), [Ok(1)])
        self.assertFalse(first.transport.disconnecting)

        second = self.connect()
        self.assertEqual(second.request(Hello(1, "worker")), [Ok(1)])
        self.assertTrue(first.transport.disconnecting)
        self.assertEqual(self.service.topics["jobs"].subscribers, [])
        first.feed(frames(Ping(6)))
        self.assertEqual(first.replies(), [])
        replies = second.request(Subscribe(2, "jobs", Start.DEFAULT))
        self.assertEqual(replies[0], Ok(2))
        self.assertEqual([m.value for m in replies[1:]], [b"b", b"c"])
        # The old connection going away later does not detach the new one.
        first.lose()
        third = self.connect()
        third.request(Hello(1, "worker"))
        self.assertTrue(second.transport.disconnecting)
        self.assertOpen(other)


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


class AuthenticationTests(BrokerTestCase):
    def setUp(self) -> None:
        self.auth = PendingAuthenticator()
        self.setUpBroker(authenticator=self.auth)

    def test_async_holds_later_requests(self) -> None:
        """Requests behind a HELLO wait for its answer, then are answered in
        order, including ones that arrived meanwhile."""
        conn = self.connect()
        conn.send(Hello(1, "id", "tok"), Ping(2), CreateTopic(3, "t"))
        conn.feed(frames(Publish(4, "t", b"v"))[:5])
        self.assertEqual(conn.replies(), [])
        self.assertNotIn("t", self.service.topics)
        self.assertEqual([call[:2] for call in self.auth.calls], [("id", "tok")])
        conn.feed(frames(Publish(4, "t", b"v"))[5:] + frames(Ping(5)))
        self.assertEqual(conn.replies(), [])
        self.auth.calls[0][2].callback(PERMISSIONS)
        self.assertEqual(conn.replies(), [Ok(1), Ok(2), Ok(3), Published(4, 0, False), Ok(5)])
        self.assertIs(conn.protocol.session.permissions, PERMISSIONS)
        self.assertOpen(conn)

    def test_async_does_not_hold_other_connections(self) -> None:
        waiting = self.connect()
        waiting.send(Hello(1, "id", "tok"), Ping(2))
        other = self.connect()
        self.assertOpen(other)
        self.assertEqual(waiting.replies(), [])

    def test_async_refused(self) -> None:
        conn = self.connect()
        conn.send(Hello(1, "id", "bad"), Ping(2))
        self.assertEqual(conn.replies(), [])
        self.auth.calls[0][2].errback(ZaichikError(ErrorCode.NOT_AUTHORIZED, "no"))
        replies = conn.replies()
        self.assertEqual(errors_of(replies[:1]), [(1, ErrorCode.NOT_AUTHORIZED)])
        self.assertEqual(conn.protocol.session.client_id, "")

    def test_lost_while_authenticating(self) -> None:
        """The answer to a HELLO whose connection is gone is dropped."""
        conn = self.connect()
        conn.send(Hello(1, "id", "tok"), Subscribe(2, "t"))
        conn.lose()
        self.auth.calls[0][2].callback(PERMISSIONS)
        self.assertEqual(conn.replies(), [])
        self.assertEqual(conn.protocol.session.client_id, "")
        self.assertNotIn("t", self.service.topics)


# ---------------------------------------------------------------------------
# Transport details
# ---------------------------------------------------------------------------


class TransportTests(BrokerTestCase):
    def test_nodelay(self) -> None:
        conn = self.connect()
        self.assertIs(conn.transport.nodelay, True)

    def test_no_nodelay_support(self) -> None:
        conn = self.connect(StringTransport())
        self.assertFalse(hasattr(conn.transport, "setTcpNoDelay"))
        self.assertEqual(conn.request(Ping(1)), [Ok(1)])

    def test_output_paused_and_resumed(self) -> None:
        """While the transport's buffer is full, messages wait; they are
        sent when it drains."""
        sub = self.connect()
        sub.request(CreateTopic(1, "t", 60_000, 0), Subscribe(2, "t", Start.LATEST))
        sub.transport.producer.pauseProducing()
        publisher = self.connect()
        publisher.request(Publish(1, "t", b"a"), Publish(2, "t", b"b"))
        self.assertEqual(sub.replies(), [])
        sub.transport.producer.resumeProducing()
        self.assertEqual([m.value for m in sub.replies()], [b"a", b"b"])

    def test_max_inflight(self) -> None:
        """At most max_inflight messages are sent and not committed; each
        commit lets more through."""
        conn = self.connect()
        conn.request(CreateTopic(1, "t", 60_000, 0),
                     PublishBatch(2, "t", [(None, bytes([i])) for i in range(5)]))

        def step(*requests):
            replies, messages = split_replies(conn.request(*requests))
            return replies, [m.offset for m in messages]

        self.assertEqual(step(Subscribe(3, "t", Start.EARLIEST, 0, 2)), ([Ok(3)], [0, 1]))
        self.assertEqual(step(Ping(4)), ([Ok(4)], []))
        self.assertEqual(step(Commit(5, "t", 0)), ([Ok(5)], [2]))
        self.assertEqual(step(Commit(6, "t", 2)), ([Ok(6)], [3, 4]))
        self.assertEqual(step(Publish(7, "t", b"x")), ([Published(7, 5, False)], []))
        self.assertEqual(step(Commit(8, "t", 4)), ([Ok(8)], [5]))
        self.assertEqual(step(Publish(9, "t", b"y")), ([Published(9, 6, False)], [6]))


class ReadAndWriteMarksTests(BrokerTestCase):
    """
    A TCP connection reads more at a time while its reads fill the buffer
    (and less again when they do not), and its subscriptions hold back only
    once OUTPUT_HIGH bytes wait, not at Twisted's 64 KiB (zaichik/edge/tcp.py
    says why).  On a real L{tcp.Server} over a loopback socket: the marks live
    in Twisted's transport, so a change there must fail here.
    """

    def setUp(self) -> None:
        super().setUp()
        from twisted.internet.testing import MemoryReactorClock

        with socket.create_server(("127.0.0.1", 0)) as listening:
            client = socket.create_connection(listening.getsockname())
            server, _ = listening.accept()
        self.sockets = (server, client)
        self.addCleanup(lambda: [s.close() for s in self.sockets])
        self.protocol = self.factory.buildProtocol(None)
        self.transport = tcp.Server(self.sockets[0], self.protocol, ("127.0.0.1", 1), None, 1,
                                    MemoryReactorClock())
        self.protocol.makeConnection(self.transport)

    def test_output_mark(self) -> None:
        self.assertEqual(self.transport.SEND_LIMIT, tcp_edge.SEND_LIMIT)
        self.transport.write(b"x" * (tcp_edge.OUTPUT_HIGH - 1))
        self.assertFalse(self.protocol.session.output.paused)
        self.transport.write(b"x" * 2)
        self.assertTrue(self.protocol.session.output.paused)

    def test_no_cycle_left_behind(self) -> None:
        """The full-buffer test refers to its transport: dropped when the connection is lost."""
        self.assertIn("_isSendBufferFull", self.transport.__dict__)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn("_isSendBufferFull", self.transport.__dict__)

    def test_a_released_hold_is_not_a_small_read(self) -> None:
        """readHeld calls dataReceived(b""): that must not halve the read size."""
        self.transport.bufferSize = tcp_edge.READ_MAX
        self.protocol.dataReceived(b"")
        self.assertEqual(self.transport.bufferSize, tcp_edge.READ_MAX)

    def test_read_size_follows_the_reads(self) -> None:
        self.assertEqual(self.transport.bufferSize, tcp_edge.READ_MIN)
        # Fire-and-forget publishes to a topic nobody reads: no output.
        full = codec.frame(Publish(0, "t", b"v" * (tcp_edge.READ_MIN - 100)).encode())
        ping = codec.frame(Ping(0).encode())
        sizes = []
        for _ in range(6):
            self.protocol.dataReceived(full * (self.transport.bufferSize // len(full) + 1))
            self.assertFalse(self.protocol.paused)
            sizes.append(self.transport.bufferSize)
        self.assertEqual(sizes, [tcp_edge.READ_MIN << i for i in range(1, 5)] + [tcp_edge.READ_MAX] * 2)
        for _ in range(6):
            self.protocol.dataReceived(ping)
            sizes.append(self.transport.bufferSize)
        self.assertEqual(sizes[6:], [tcp_edge.READ_MAX >> i for i in range(1, 5)] + [tcp_edge.READ_MIN] * 2)


class _CountingSocket:
    """A socket's stand-in that counts its sends (and may take at most C{take} bytes of each)."""

    def __init__(self, sock: socket.socket, take: Optional[int] = None) -> None:
        self.sock = sock
        self.take = take
        self.sends: List[int] = []

    def send(self, data) -> int:
        self.sends.append(len(data))
        return self.sock.send(data if self.take is None else data[: self.take])

    # How many pieces each sendmsg was given (a send counts as one piece).
    pieces: List[int] = []

    def sendmsg(self, buffers) -> int:
        self.pieces = self.pieces + [len(buffers)]
        self.sends.append(sum(map(len, buffers)))
        if self.take is None:
            return self.sock.sendmsg(buffers)  # (the real one)
        return self.sock.send(b"".join(buffers)[: self.take])


class RealSocketTestCase(BrokerTestCase):
    """
    Connections on real L{tcp.Server} transports over loopback sockets, with a
    L{MemoryReactorClock} (so Twisted's own sends happen only when a test
    calls doWrite), and a publisher on a L{StringTransport}.
    """

    def setUp(self) -> None:
        super().setUp()
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        self.publisher = self.connect()
        self.publisher.request(Hello(0))

    def publisher_socket(self):
        """A publisher on a real socket (after HELLO): (protocol, transport, server socket, client socket)."""
        with socket.create_server(("127.0.0.1", 0)) as listening:
            client = socket.create_connection(listening.getsockname())
            server, _ = listening.accept()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        protocol = self.factory.buildProtocol(None)
        transport = tcp.Server(server, protocol, ("127.0.0.1", 1), None, 1, self.reactor)
        protocol.makeConnection(transport)
        protocol.dataReceived(frames(Hello(0)))
        return protocol, transport, server, client

    def publish_data(self, data: bytes, asked: Optional[List[int]] = None) -> socket.socket:
        """
        C{data} sent by a publisher on a real socket, its first full read
        handed over as the reactor would (the rest waits in the kernel for
        reads on); returns the broker's socket.  C{asked}: a list to which
        each read on's requested size is added.
        """
        protocol, transport, server, client = self.publisher_socket()
        if asked is not None:
            transport.socket = _AskedSocket(server, asked)
        size = transport.bufferSize
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)  # (so that rest_of knows the end)
        first = b""
        while len(first) < size:
            first += server.recv(size - len(first))
        # (So that the first read on finds something waiting: what the
        # kernel moves on after a read may lag it.)
        select.select([server], [], [], 5)
        protocol.dataReceived(first)
        return server

    def subscriber(self, *topics: str, take: Optional[int] = None):
        """A subscriber on a real socket: (protocol, transport, counting socket, client socket)."""
        with socket.create_server(("127.0.0.1", 0)) as listening:
            client = socket.create_connection(listening.getsockname())
            server, _ = listening.accept()
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        client.settimeout(5)
        protocol = self.factory.buildProtocol(None)
        transport = tcp.Server(server, protocol, ("127.0.0.1", 1), None, 1, self.reactor)
        protocol.makeConnection(transport)
        counting = protocol._socket = _CountingSocket(server, take)
        protocol.dataReceived(frames(Hello(0), *[Subscribe(i + 1, t, Start.LATEST) for i, t in enumerate(topics)]))
        replies = read_frames(client, 1 + len(topics))
        self.assertEqual(replies[1:], [Ok(i + 1) for i in range(len(topics))])
        counting.sends.clear()
        counting.pieces = []
        return protocol, transport, counting, client


class OutputGatheringTests(RealSocketTestCase):
    """
    Inside a unit of work a TCP connection's frames are gathered and written
    once, at its end, straight to the socket when Twisted's buffer is empty
    (zaichik/edge/tcp.py, "output", says why); what the socket does not take
    goes to Twisted's buffer, behind which nothing overtakes.
    """

    def test_one_send_per_read(self) -> None:
        """A read publishing to three topics a connection reads: one send, every frame in order."""
        _, transport, counting, client = self.subscriber("a", "b", "c")
        self.publisher.send(*[Publish(0, t, b"%s%d" % (t.encode(), i)) for i in range(3) for t in "abc"],
                            Publish(7, "a", b"last"))
        self.assertEqual(len(counting.sends), 1)
        got = read_frames(client, 10)
        by_topic = {t: [m.value for m in got if m.topic == t] for t in "abc"}
        self.assertEqual(by_topic, {"a": [b"a0", b"a1", b"a2", b"last"], "b": [b"b0", b"b1", b"b2"],
                                    "c": [b"c0", b"c1", b"c2"]})
        # Nothing left for Twisted to send, so nothing watched for.
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))
        self.assertNotIn(transport, self.reactor.getWriters())

    def test_one_send_for_a_reads_requests(self) -> None:
        """
        Requests that end the unit early (a SUBSCRIBE, a PING: what was
        published before them is stored first) still share the read's one
        send.
        """
        protocol, _, counting, client = self.subscriber()
        self.publisher.send(CreateTopic(9, "a", 60_000, 0), Publish(0, "a", b"before"))
        protocol.dataReceived(frames(Ping(1), Subscribe(2, "a", Start.EARLIEST), Ping(3),
                                     Subscribe(4, "b", Start.LATEST)))
        self.assertEqual(len(counting.sends), 1)
        got = read_frames(client, 5)
        self.assertEqual([type(r).__name__ for r in got], ["Ok", "Ok", "Message", "Ok", "Ok"])

    def test_a_units_blocks_in_one_sendmsg(self) -> None:
        """
        A topic that retains nothing, published to in two reads of one unit:
        its two blocks go to the subscriber as they are, in one sendmsg (not
        joined first), and arrive whole and in order.
        """
        _, transport, counting, client = self.subscriber("a")
        with self.service.work:
            self.publisher.send(*[Publish(0, "a", b"first%d" % i * 200) for i in range(3)])
            self.publisher.send(*[Publish(0, "a", b"second%d" % i * 200) for i in range(2)])
        self.assertEqual(counting.pieces, [2])
        self.assertEqual(len(counting.sends), 1)
        got = read_frames(client, 5)
        self.assertEqual([(m.offset, m.value[:7]) for m in got],
                         [(0, b"first0f"), (1, b"first1f"), (2, b"first2f"), (3, b"second0"), (4, b"second1")])
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))

    def test_a_units_blocks_counted_out(self) -> None:
        """The bytes sent in pieces are the bytes counted out (the metrics' bytes_out)."""
        _, _, counting, client = self.subscriber("a")
        before = self.service.stats.bytes_out
        with self.service.work:
            for i in range(3):
                self.publisher.send(*[Publish(0, "a", b"%d" % i * 400) for _ in range(4)])
        self.assertEqual(counting.pieces, [3])
        self.assertEqual(self.service.stats.bytes_out - before, counting.sends[0])
        self.assertEqual(len(read_frames(client, 12)), 12)

    def test_many_pieces_by_the_real_sendmsg(self) -> None:
        """MAX_PIECES blocks of a unit, by the socket's own sendmsg: all of them, in order. (From a review.)"""
        _, transport, counting, client = self.subscriber("a")
        n = connection_edge.MAX_PIECES
        with self.service.work:
            for i in range(n):
                self.publisher.send(Publish(0, "a", b"%04d" % i + b"x" * 1100))
        self.assertEqual(counting.pieces, [n])
        received = b""
        while transport._tempDataLen or transport.dataBuffer:  # (what the socket did not take at once)
            transport.doWrite()
            received += client.recv(1 << 20)  # (room for the rest, whatever the sockets' buffer sizes)
        self.assertEqual([m.value[:4] for m in read_frames(client, n, received)], [b"%04d" % i for i in range(n)])

    def test_small_pieces_joined(self) -> None:
        """Many small writes of a unit (replies, single frames to many topics): one plain send, not sendmsg."""
        protocol, _, counting, client = self.subscriber(*["t%d" % i for i in range(100)])
        self.publisher.send(*[Publish(0, "t%d" % i, b"v") for i in range(100)])
        self.assertEqual((counting.pieces, len(counting.sends)), ([], 1))
        protocol.dataReceived(frames(*[Publish(i + 1, "r", b"v") for i in range(200)]))
        self.assertEqual((counting.pieces, len(counting.sends)), ([], 2))
        self.assertEqual(len(read_frames(client, 300)), 300)

    def test_pieces_the_socket_does_not_take_are_buffered(self) -> None:
        """A sendmsg that sends part: the rest, joined, waits in Twisted's buffer, in order."""
        _, transport, counting, client = self.subscriber("a", take=1000)
        with self.service.work:
            self.publisher.send(*[Publish(0, "a", bytes([65 + i]) * 400) for i in range(3)])
            self.publisher.send(*[Publish(0, "a", bytes([70 + i]) * 400) for i in range(3)])
        self.assertEqual(counting.pieces, [2])
        self.assertEqual(transport._tempDataLen, counting.sends[0] - 1000)
        counting.take = None
        transport.doWrite()
        self.assertEqual([m.value for m in read_frames(client, 6)], [bytes([c]) * 400 for c in b"ABCFGH"])

    def test_what_the_socket_does_not_take_is_buffered(self) -> None:
        """The socket takes part: the rest waits in Twisted's buffer, and arrives after it in order."""
        protocol, transport, counting, client = self.subscriber("a", take=1000)
        values = [bytes([65 + i]) * 700 for i in range(5)]
        self.publisher.send(*[Publish(0, "a", v) for v in values])
        self.assertEqual(counting.sends, [sum(len(v) + 30 for v in values)])  # (30: a MESSAGE frame's overhead on "a")
        self.assertEqual(transport._tempDataLen, counting.sends[0] - 1000)
        self.assertIn(transport, self.reactor.getWriters())
        # Later output queues behind what waits: not sent past it.
        self.publisher.send(Publish(0, "a", b"after"))
        self.assertEqual(len(counting.sends), 1)
        counting.take = None
        transport.doWrite()
        self.assertEqual([m.value for m in read_frames(client, 6)], values + [b"after"])

    def test_output_before_a_close(self) -> None:
        """An ERROR that closes the connection is written (and sent) before the close."""
        protocol, transport, counting, client = self.subscriber()
        protocol.dataReceived(struct.pack(">I", self.max_frame_size + 1))
        self.assertTrue(transport.disconnecting)
        [error] = read_frames(client, 1)
        self.assertEqual(error.code, ErrorCode.FRAME_TOO_LARGE)

    def test_outside_a_unit_to_twisted(self) -> None:
        """A write outside any unit of work (a timer's, a storage callback's) goes to Twisted's buffer."""
        protocol, transport, counting, _ = self.subscriber()
        protocol.writeFrames(b"\x00\x00\x00\x01x")
        self.assertEqual((counting.sends, transport._tempDataLen), ([], 5))

    def test_a_full_sends_worth_handed_over_at_once(self) -> None:
        """Once SEND_LIMIT bytes are gathered they are written without waiting for the unit's end."""
        protocol, transport, counting, client = self.subscriber()
        counting.take = 0  # (a reader that takes nothing)
        with self.service.work:
            protocol.writeFrames(b"x" * (tcp_edge.SEND_LIMIT - 1))
            self.assertEqual(counting.sends, [])
            protocol.writeFrames(b"y")
            self.assertEqual(counting.sends, [tcp_edge.SEND_LIMIT])
            self.assertFalse(protocol.session.output.paused)
            protocol.writeFrames(b"z" * tcp_edge.OUTPUT_HIGH)
            self.assertEqual(len(counting.sends), 1)  # (behind Twisted's buffer now: to it)
            self.assertTrue(protocol.session.output.paused)

    def test_tls_and_others_write_through_twisted(self) -> None:
        """A transport that is not a plain socket's (TLS, a test's) gets the gathered frames as one write."""
        sub = self.connect()
        sub.request(Hello(0), Subscribe(1, "a", Start.LATEST))
        writes = []
        real = sub.transport.write
        sub.transport.write = lambda data: (writes.append(data), real(data))  # type: ignore[method-assign]
        self.publisher.send(Publish(0, "a", b"1"), Publish(0, "a", b"2"), Ping(3))
        self.assertEqual(len(writes), 1)
        self.assertEqual([m.value for m in sub.replies()], [b"1", b"2"])


class ReadsPerUnitTests(RealSocketTestCase):
    """
    A full read spread over SPREAD topics or more is followed by more reads
    in the same unit of work (tcp_edge.READS_PER_UNIT at most), so each
    subscriber gets the messages of all of them in one write; a read to
    fewer topics is a unit on its own.  The publisher on a real socket too,
    whose later reads wait in the kernel.
    """

    def publish_reads(self, topics: List[str], reads: int, asked: Optional[List[int]] = None):
        """
        C{reads} full reads of rid-0 publishes round the topics; the first
        handed over as the reactor would.  C{asked}: a list to which each
        read on's requested size is added.
        """
        size = tcp_edge.READ_MIN  # (a new connection's first read: its bufferSize)
        parts: List[bytes] = []
        i = length = 0
        while length < size * reads:
            parts.append(frames(Publish(0, topics[i % len(topics)], b"%06d" % i)))
            length += len(parts[-1])
            i += 1
        data = b"".join(parts)[: size * reads]
        return data, self.publish_data(data, asked)

    def test_reads_on_when_spread(self) -> None:
        self.patch(tcp_edge, "READ_ON", tcp_edge.READ_MIN)  # (each read on as large as the first)
        topics = ["t%02d" % i for i in range(tcp_edge.SPREAD)]
        _, _, counting, client = self.subscriber(*topics)
        data, server = self.publish_reads(topics, tcp_edge.READS_PER_UNIT + 1)
        consumed = len(data) - len(rest_of(server))
        # More than the first read was read (a read on stops at a short one:
        # how much the kernel hands over at a time varies), never all.
        self.assertGreater(consumed, len(data) // (tcp_edge.READS_PER_UNIT + 1))
        self.assertLess(consumed, len(data))
        # Every publish whole in what was read (all frames are the same
        # size), delivered in one write.
        self.assertEqual(len(counting.sends), 1)
        expected = consumed // len(frames(Publish(0, "t00", b"000000")))
        got = read_frames(client, expected)
        self.assertEqual(sorted(int(m.value) for m in got), list(range(expected)))

    def test_reads_on_take_up_to_read_on(self) -> None:
        """A read on asks for READ_ON bytes, more than the first read's size, and all of it is delivered at once."""
        self.patch(tcp_edge, "READ_ON", 2 * tcp_edge.READ_MIN)
        self.patch(tcp_edge, "READS_PER_UNIT", 3)
        topics = ["t%02d" % i for i in range(tcp_edge.SPREAD)]
        _, _, counting, client = self.subscriber(*topics)
        asked: List[int] = []
        data, server = self.publish_reads(topics, 5, asked)
        consumed = len(data) - len(rest_of(server))
        # How much the kernel hands over at a time varies (a read may be
        # short, and a short one ends the unit), what is asked for does not:
        # found in CI, where a read on came back 1 KiB short of READ_ON.
        self.assertTrue(asked)
        self.assertEqual(set(asked), {tcp_edge.READ_ON})
        self.assertLessEqual(len(asked), 2)
        self.assertGreater(consumed, tcp_edge.READ_MIN)
        self.assertEqual(len(counting.sends), 1)
        expected = consumed // len(frames(Publish(0, "t00", b"000000")))
        self.assertEqual(sorted(int(m.value) for m in read_frames(client, expected)), list(range(expected)))

    def test_no_more_than_unit_bytes(self) -> None:
        """A unit reads on no further than UNIT_BYTES in all: what it reads it delivers at once. (From a review.)"""
        self.patch(tcp_edge, "READ_ON", 2 * tcp_edge.READ_MIN)
        self.patch(tcp_edge, "UNIT_BYTES", 3 * tcp_edge.READ_MIN)
        topics = ["t%02d" % i for i in range(tcp_edge.SPREAD)]
        self.subscriber(*topics)
        data, server = self.publish_reads(topics, 6)
        consumed = len(data) - len(rest_of(server))
        self.assertGreater(consumed, tcp_edge.READ_MIN)
        self.assertLessEqual(consumed, tcp_edge.UNIT_BYTES)

    def test_no_more_reads_past_the_unit_time(self) -> None:
        """A unit that has taken UNIT_TIME reads no more: the other connections wait no longer."""
        self.patch(tcp_edge, "UNIT_TIME", 0)
        topics = ["t%02d" % i for i in range(tcp_edge.SPREAD)]
        self.subscriber(*topics)
        data, server = self.publish_reads(topics, 2)
        self.assertEqual(len(rest_of(server)), len(data) // 2)

    def test_one_read_a_unit_for_few_topics(self) -> None:
        topics = ["t%02d" % i for i in range(tcp_edge.SPREAD - 1)]
        self.subscriber(*topics)
        data, server = self.publish_reads(topics, 2)
        self.assertEqual(len(rest_of(server)), len(data) // 2)


class _AskedSocket:
    """A socket that notes the size each C{recv} asks for (and is otherwise the socket)."""

    def __init__(self, sock: socket.socket, asked: List[int]) -> None:
        self._sock = sock
        self._asked = asked

    def recv(self, size: int) -> bytes:
        self._asked.append(size)
        return self._sock.recv(size)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


def rest_of(server: socket.socket) -> bytes:
    """What is left to read on C{server}, whose peer has shut its side down."""
    server.settimeout(5)
    rest = b""
    while True:
        chunk = server.recv(1 << 20)
        if not chunk:
            return rest
        rest += chunk


def read_frames(client: socket.socket, count: int, data: bytes = b"") -> list:
    """C{count} frames from C{client} (blocking, with its timeout), after C{data} (read from it already)."""
    while True:
        got: list = []
        at = 0
        while len(data) - at >= 4:
            n = struct.unpack_from(">I", data, at)[0]
            if len(data) - at - 4 < n:
                break
            got.append(codec.decode_reply(data[at + 4 : at + 4 + n]))
            at += 4 + n
        if len(got) >= count:
            return got
        chunk = client.recv(1 << 20)
        if not chunk:
            return got
        data += chunk


class LargeFrameTests(BrokerTestCase):
    """
    Values of several KB (the accelerator's parser and frame builder, where
    built, and the Python twins): what subscribers get, and what is
    retained, is what was published; a damaged large PUBLISH is BAD_FRAME.
    """

    def test_large_values_intact(self) -> None:
        self.setUpBroker()
        pub, sub = self.connect(), self.connect()
        pub.request(codec.CreateTopic(1, "big", 60_000, 0))
        self.assertEqual(sub.request(codec.Subscribe(2, "big", codec.Start.LATEST)), [Ok(2)])
        values = [bytes([i]) * (1024 + 977 * i) for i in range(4)]
        replies = pub.request(*[codec.Publish(10 + i, "big", v, b"k%d" % i if i % 2 else None)
                                for i, v in enumerate(values)])
        self.assertEqual([r.offset for r in replies], [0, 1, 2, 3])
        self.assertEqual([(m.offset, m.value, m.key) for m in sub.replies()],
                         [(i, v, b"k%d" % i if i % 2 else None) for i, v in enumerate(values)])
        late = self.connect()
        got = late.request(codec.Subscribe(3, "big", codec.Start.EARLIEST))
        self.assertEqual(got[0], Ok(3))
        self.assertEqual([m.value for m in got[1:]], values)

    def test_large_bad_frame(self) -> None:
        """A 2 KB PUBLISH whose value length is wrong: BAD_FRAME with its rid, the connection stays."""
        self.setUpBroker()
        conn = self.connect()
        body = bytearray(codec.Publish(9, "big", b"x" * 2048).encode())
        body[-2049] ^= 0xFF  # (the value's length field)
        conn.feed(struct.pack(">I", len(body)) + bytes(body))
        self.assertEqual(errors_of(conn.replies()), [(9, ErrorCode.BAD_FRAME)])
        self.assertEqual(conn.request(codec.Ping(4)), [Ok(4)])
