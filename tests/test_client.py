"""
The client library (L{zaichik.client}) against a real broker
(L{zaichik.protocol.BrokerFactory}), connected in memory.

The broker listens on a L{MemoryReactorClock}; L{zaichik.client.connect}
connects through the same reactor, and L{ConnectionCompleter} joins the two
ends with an L{iosim} pump.  No global reactor, no sockets, no waiting.
"""

from __future__ import annotations

from typing import List

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from zaichik import codec
from zaichik.auth import ALLOW_ALL, IAuthenticator, Permissions
from zaichik.client import (
    Client,
    Message,
    PublishResult,
    Start,
    Subscription,
    TopicInfo,
    ZaichikError,
    client_endpoint,
    connect,
)
from zaichik.codec import ErrorCode
from zaichik.protocol import BrokerFactory
from zaichik.service import BrokerService, Limits

NOW = 1_700_000_000
PORT = 8889


# What the fake authenticators grant: everything, as a distinct object.
PERMISSIONS = Permissions(["#"], ["#"], ["#"], ["*"])


@implementer(IAuthenticator)
class TokenAuthenticator:
    """Accepts only the token "secret"."""

    requires_hello = False

    def authenticate(self, client_id: str, token: str, peer: str = "") -> object:
        if token != "secret":
            raise ZaichikError(ErrorCode.NOT_AUTHORIZED, "bad token")
        return PERMISSIONS


class ClientTestCase(SynchronousTestCase):
    """A broker on a L{MemoryReactorClock}, and clients connected to it."""

    limits = None
    authenticator = None
    max_frame_size = codec.DEFAULT_MAX_FRAME_SIZE

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.service = BrokerService(clock=self.reactor, authenticator=self.authenticator, limits=self.limits)
        self.factory = BrokerFactory(self.service, self.max_frame_size)
        self.reactor.listenTCP(PORT, self.factory)
        self.pumps: List[IOPump] = []

    def flush(self) -> None:
        """Move bytes both ways on every connection until nothing moves."""
        for _ in range(100):
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved
            if not moved:
                return
        self.fail("connections never went quiet")

    def open(self, **kwargs) -> Deferred:
        """Start L{connect}, complete the TCP connection, pump; the Deferred
        of the connect."""
        d = ensureDeferred(connect(self.reactor, f"localhost:{PORT}", **kwargs))
        pump = ConnectionCompleter(self.reactor).succeedOnce()
        self.assertIsNotNone(pump)
        self.pumps.append(pump)
        self.flush()
        return d

    def connect(self, **kwargs) -> Client:
        return self.successResultOf(self.open(**kwargs))

    def pump_of(self, client: Client) -> IOPump:
        for pump in self.pumps:
            if pump.client._wrappedProtocol is client._protocol:
                return pump
        raise AssertionError("no such client")

    def result(self, d: Deferred):
        """Pump, then the result of C{d}."""
        self.flush()
        return self.successResultOf(d)

    def error(self, d: Deferred) -> ZaichikError:
        """Pump, then the L{ZaichikError} C{d} failed with."""
        self.flush()
        return self.failureResultOf(d, ZaichikError).value

    def assertError(self, d: Deferred, code: ErrorCode) -> ZaichikError:
        error = self.error(d)
        self.assertIs(error.code, code)
        self.assertTrue(error.message)
        return error


# ---------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------


class ConnectTests(ClientTestCase):
    def test_connect(self) -> None:
        """connect() dials host:port and says no HELLO when given no
        client_id or token (so the client may still send one)."""
        d = ensureDeferred(connect(self.reactor, f"localhost:{PORT}"))
        self.assertEqual(self.reactor.tcpClients[0][:2], ("localhost", PORT))
        self.assertNoResult(d)
        self.pumps.append(ConnectionCompleter(self.reactor).succeedOnce())
        self.flush()
        client = self.successResultOf(d)
        self.assertIsInstance(client, Client)
        self.assertEqual(self.service.connections, 1)
        self.assertIsNone(self.result(client.hello("late")))
        self.assertEqual(self.pump_of(client).server.session.client_id, "late")

    def test_connect_hello(self) -> None:
        client = self.connect(client_id="me", token="tok")
        session = self.pump_of(client).server.session
        self.assertEqual(session.client_id, "me")
        self.assertIs(session.permissions, ALLOW_ALL)
        # A second HELLO is a protocol error.
        self.assertError(client.hello("again"), ErrorCode.PROTOCOL)
        self.assertIsNone(self.result(client.ping()))

    def test_connect_refused(self) -> None:
        """A connection that fails fails connect()."""
        d = ensureDeferred(connect(self.reactor, f"localhost:{PORT}"))
        ConnectionCompleter(self.reactor).failOnce()
        self.failureResultOf(d, ConnectionRefusedError)


class AuthenticatedConnectTests(ClientTestCase):
    authenticator = TokenAuthenticator()

    def test_hello_accepted(self) -> None:
        client = self.connect(client_id="me", token="secret")
        self.assertEqual(self.pump_of(client).server.session.permissions, PERMISSIONS)

    def test_hello_refused(self) -> None:
        """connect() raises NOT_AUTHORIZED and drops the connection."""
        d = self.open(token="wrong")
        self.assertIs(self.failureResultOf(d, ZaichikError).value.code, ErrorCode.NOT_AUTHORIZED)
        self.assertTrue(self.pumps[0].clientIO.disconnecting)
        self.flush()
        self.assertEqual(self.service.connections, 0)


class EndpointTests(SynchronousTestCase):
    """What L{client_endpoint} would connect to."""

    def dial(self, description: str):
        reactor = MemoryReactorClock()
        client_endpoint(reactor, description).connect(Factory.forProtocol(Protocol))
        return reactor

    def assertDials(self, description: str, host: str, port: int) -> None:
        reactor = self.dial(description)
        self.assertEqual([c[:2] for c in reactor.tcpClients], [(host, port)], description)

    def test_host_port(self) -> None:
        self.assertDials("broker.example:1234", "broker.example", 1234)
        self.assertDials("127.0.0.1:8889", "127.0.0.1", 8889)

    def test_bare_port(self) -> None:
        self.assertDials("8889", "localhost", 8889)

    def test_tcp_description(self) -> None:
        self.assertDials("tcp:host=broker.example:port=4000", "broker.example", 4000)
        self.assertDials("tcp:broker.example:4000", "broker.example", 4000)
        self.assertDials("tcp:host=broker.example:port=4000:timeout=5", "broker.example", 4000)

    def test_unix_description(self) -> None:
        reactor = self.dial("unix:path=/tmp/zaichik.sock")
        self.assertEqual([c[0] for c in reactor.unixClients], ["/tmp/zaichik.sock"])
        self.assertEqual(reactor.tcpClients, [])


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class RequestTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = self.connect()

    def test_create_topic(self) -> None:
        self.assertIsNone(self.result(self.client.create_topic("orders", 60_000, 250)))
        topic = self.service.topics["orders"]
        self.assertEqual((topic.retention_ttl, topic.compaction_window), (60_000, 250))
        # Idempotent with the same settings; TOPIC_EXISTS with others.
        self.assertIsNone(self.result(self.client.create_topic("orders", 60_000, 250)))
        self.assertError(self.client.create_topic("orders", 1, 250), ErrorCode.TOPIC_EXISTS)

    def test_publish(self) -> None:
        self.result(self.client.create_topic("c", 0, 1000))
        results = [self.client.publish("c", b"a", key=b"k"), self.client.publish("c", b"b"),
                   self.client.publish("c", b"c", key=b"k")]
        self.flush()
        self.assertEqual([self.successResultOf(d) for d in results],
                         [PublishResult(0, False), PublishResult(1, False), PublishResult(0, True)])

    def test_publish_nowait(self) -> None:
        errors: List[ZaichikError] = []
        self.client.on_error = errors.append
        self.assertIsNone(self.client.publish_nowait("t", b"a"))
        self.assertIsNone(self.client.publish_nowait("t", b"b", key=b"k"))
        self.flush()
        self.assertEqual(self.service.topics["t"].next_offset, 2)
        self.assertEqual(errors, [])

    def test_publish_nowait_error_reaches_on_error(self) -> None:
        errors: List[ZaichikError] = []
        self.client.on_error = errors.append
        pending = self.client.ping()
        self.client.publish_nowait("no good", b"a")
        self.client.publish_nowait("t", b"b")
        self.flush()
        self.assertEqual([e.code for e in errors], [ErrorCode.BAD_TOPIC])
        self.assertIsNone(self.successResultOf(pending))
        self.assertEqual(self.service.topics["t"].next_offset, 1)

    def test_publish_batch(self) -> None:
        self.result(self.client.create_topic("c", 0, 1000))
        results = self.result(self.client.publish_batch("c", [(b"k", b"a"), (None, b"b"), (b"k", b"c")]))
        self.assertEqual(results, [PublishResult(0, False), PublishResult(1, False), PublishResult(0, True)])
        # Any iterable of pairs.
        results = self.result(self.client.publish_batch("c", iter([(None, b"d")])))
        self.assertEqual(results, [PublishResult(2, False)])

    def test_publish_batch_empty(self) -> None:
        """An empty batch is malformed: BAD_FRAME."""
        self.assertError(self.client.publish_batch("c", []), ErrorCode.BAD_FRAME)

    def test_list_topics(self) -> None:
        self.result(self.client.create_topic("b", 60_000, 5))
        self.result(self.client.publish("b", b"x"))
        self.result(self.client.subscribe("a", start=Start.LATEST))
        topics = self.result(self.client.list_topics())
        self.assertEqual(topics, [TopicInfo("a", 0, 0, 0, 0, 1), TopicInfo("b", 60_000, 5, 1, 1, 0)])

    def test_ping(self) -> None:
        self.assertIsNone(self.result(self.client.ping()))

    def test_request_ids_wrap(self) -> None:
        """Request ids run 1 .. 2**32-1 and wrap to 1, never 0 (the
        fire-and-forget id)."""
        self.client._core._next_rid = 0xFFFFFFFE
        first, second = self.client.ping(), self.client.ping()
        self.assertEqual(self.client._core._next_rid, 1)
        self.flush()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))

    def test_errors(self) -> None:
        """Errors from the broker fail the request with ZaichikError and the
        protocol's ErrorCode."""
        client = self.client
        self.assertError(client.create_topic("bad topic"), ErrorCode.BAD_TOPIC)
        self.assertError(client.publish("", b"x"), ErrorCode.BAD_TOPIC)
        self.assertError(client.publish_batch("x" * 250, [(None, b"x")]), ErrorCode.BAD_TOPIC)
        self.assertError(client.unsubscribe("t"), ErrorCode.NOT_SUBSCRIBED)
        self.assertError(client.commit("t", 0), ErrorCode.NOT_SUBSCRIBED)
        self.assertError(client.subscribe("a b"), ErrorCode.BAD_TOPIC)
        error = self.assertError(client.hello("late"), ErrorCode.PROTOCOL)
        self.assertTrue(str(error).startswith("PROTOCOL"))
        # None of them closed the connection.
        self.assertIsNone(self.result(client.ping()))


class LimitErrorTests(ClientTestCase):
    limits = Limits(max_topics=2, max_subscriptions=1)

    def test_limit(self) -> None:
        client = self.connect()
        self.result(client.create_topic("one"))
        self.result(client.create_topic("two"))
        self.assertError(client.create_topic("three"), ErrorCode.LIMIT)
        self.assertError(client.publish("three", b"x"), ErrorCode.LIMIT)

    def test_refused_subscription_forgotten(self) -> None:
        """A subscription the broker refuses is not kept: it ends, and the
        topic can be subscribed to later."""
        client = self.connect()
        first = self.result(client.subscribe("one", start=Start.LATEST))
        d = client.subscribe("two", start=Start.LATEST)
        self.assertError(d, ErrorCode.LIMIT)
        self.assertNotIn("two", client._core.subscriptions)
        self.result(first.unsubscribe())
        second = self.result(client.subscribe("two", start=Start.LATEST))
        self.assertIsInstance(second, Subscription)
        self.assertTrue(second.active)


# ---------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------


class SubscriptionTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = self.connect()
        self.publisher = self.connect()

    def publish(self, topic: str, *values: bytes, key=None) -> None:
        for value in values:
            self.result(self.publisher.publish(topic, value, key=key))

    def test_callback(self) -> None:
        received: List[Message] = []
        sub = self.result(self.client.subscribe("t", received.append, start=Start.LATEST))
        self.assertIsInstance(sub, Subscription)
        self.assertEqual((sub.topic, sub.active), ("t", True))
        self.reactor.advance(1.5)
        self.publish("t", b"a", key=b"k")
        self.publish("t", b"b")
        self.assertEqual(received, [
            Message("t", 0, NOW * 1000 + 1500, b"a", b"k"),
            Message("t", 1, NOW * 1000 + 1500, b"b", None),
        ])

    def test_callback_error_logged(self) -> None:
        """A callback that raises is logged; later messages still arrive."""
        received: List[bytes] = []

        def callback(message: Message) -> None:
            received.append(message.value)
            if message.value == b"boom":
                raise ValueError("callback bug")

        self.result(self.client.subscribe("t", callback, start=Start.LATEST))
        self.publish("t", b"boom", b"after")
        self.assertEqual(received, [b"boom", b"after"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_own_messages(self) -> None:
        """A client that publishes to a topic it follows receives its own
        messages (the echo example)."""
        sub = self.result(self.client.subscribe("echo", start=Start.LATEST))
        result = self.result(self.client.publish("echo", b"hello"))
        message = self.result(sub.get())
        self.assertEqual((message.offset, message.value), (result.offset, b"hello"))

    def test_async_for(self) -> None:
        self.result(self.client.create_topic("t", 60_000, 0))
        self.publish("t", b"a", b"b")
        sub = self.result(self.client.subscribe("t", start=Start.EARLIEST))

        async def consume() -> List[bytes]:
            got = []
            async for message in sub:
                got.append((message.offset, message.value))
                if len(got) == 4:
                    break
            return got

        d = ensureDeferred(consume())
        self.flush()
        self.assertNoResult(d)  # two of four so far
        self.publish("t", b"c", b"d")
        self.assertEqual(self.successResultOf(d), [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")])

    def test_get_waits(self) -> None:
        sub = self.result(self.client.subscribe("t", start=Start.LATEST))
        first, second = sub.get(), sub.get()
        self.assertNoResult(first)
        self.publish("t", b"a", b"b")
        self.assertEqual(self.successResultOf(first).value, b"a")
        self.assertEqual(self.successResultOf(second).value, b"b")

    def test_start_positions(self) -> None:
        self.result(self.client.create_topic("t", 60_000, 0))
        self.publish("t", b"a", b"b", b"c")
        received = {}
        for start, offset in ((Start.EARLIEST, 0), (Start.OFFSET, 1), (Start.LATEST, 0), (Start.DEFAULT, 0)):
            values = received[start] = []
            client = self.connect()
            self.result(client.subscribe("t", values.append, start=start, offset=offset))
        self.publish("t", b"new")
        self.assertEqual({start: [m.value for m in values] for start, values in received.items()}, {
            Start.EARLIEST: [b"a", b"b", b"c", b"new"],
            Start.OFFSET: [b"b", b"c", b"new"],
            Start.LATEST: [b"new"],
            Start.DEFAULT: [b"a", b"b", b"c", b"new"],
        })

    def test_already_subscribed(self) -> None:
        sub = self.result(self.client.subscribe("t"))
        self.assertError(self.client.subscribe("t"), ErrorCode.ALREADY_SUBSCRIBED)
        self.assertTrue(sub.active)
        self.assertIs(self.client._core.subscriptions["t"].handle, sub)

    def test_commit_and_max_inflight(self) -> None:
        self.result(self.client.create_topic("t", 60_000, 0))
        self.result(self.publisher.publish_batch("t", [(None, bytes([i])) for i in range(5)]))
        received: List[int] = []
        sub = self.result(self.client.subscribe("t", lambda m: received.append(m.offset),
                                                start=Start.EARLIEST, max_inflight=2))
        self.flush()
        self.assertEqual(received, [0, 1])
        self.assertIsNone(self.result(sub.commit(1)))
        self.assertEqual(received, [0, 1, 2, 3])
        self.assertError(sub.commit(9), ErrorCode.BAD_OFFSET)
        self.assertIsNone(self.result(self.client.commit("t", 2)))
        self.assertEqual(received, [0, 1, 2, 3, 4])
        # 3 and 4 are in flight: the window is full.  A commit below the
        # last one is OK and changes nothing.
        self.assertIsNone(self.result(sub.commit(0)))
        self.publish("t", b"5", b"6")
        self.assertEqual(received, [0, 1, 2, 3, 4])
        self.assertIsNone(self.result(sub.commit(4)))
        self.assertEqual(received, [0, 1, 2, 3, 4, 5, 6])

    def test_durable_commit(self) -> None:
        """With a client_id, commits outlive the connection: a new
        connection resumes after the committed offset."""
        first = self.connect(client_id="worker")
        self.result(first.create_topic("jobs", 60_000, 0))
        self.publish("jobs", b"a", b"b", b"c")
        sub = self.result(first.subscribe("jobs", start=Start.EARLIEST))
        self.assertEqual(self.result(sub.get()).value, b"a")
        self.result(sub.commit(0))
        self.result(first.close())

        second = self.connect(client_id="worker")
        sub = self.result(second.subscribe("jobs"))
        self.assertEqual([self.result(sub.get()).value for _ in range(2)], [b"b", b"c"])

    def test_unsubscribe_ends_iteration(self) -> None:
        """Messages received before the unsubscribe are still read; then the
        iteration ends."""
        sub = self.result(self.client.subscribe("t", start=Start.LATEST))
        self.publish("t", b"a", b"b")

        async def consume() -> List[bytes]:
            return [message.value async for message in sub]

        d = ensureDeferred(consume())
        self.assertNoResult(d)
        self.assertIsNone(self.result(sub.unsubscribe()))
        self.assertEqual(self.successResultOf(d), [b"a", b"b"])
        self.assertFalse(sub.active)
        self.assertIsNone(self.successResultOf(sub.get()))
        self.assertEqual(self.service.topics["t"].subscribers, [])
        # Nothing more arrives; the topic may be followed again.
        self.publish("t", b"c")
        self.assertIsNone(self.successResultOf(sub.get()))
        again = self.result(self.client.subscribe("t", start=Start.LATEST))
        self.assertTrue(again.active)

    def test_unsubscribe_wakes_waiting_reader(self) -> None:
        sub = self.result(self.client.subscribe("t", start=Start.LATEST))

        async def consume() -> List[bytes]:
            return [message.value async for message in sub]

        d = ensureDeferred(consume())
        self.flush()
        self.assertNoResult(d)
        self.result(self.client.unsubscribe("t"))
        self.assertEqual(self.successResultOf(d), [])


# ---------------------------------------------------------------------------
# Closing and losing the connection
# ---------------------------------------------------------------------------


class CloseTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.client = self.connect()

    def test_close(self) -> None:
        """close() fires once the connection is closed, as does closed;
        subscriptions end cleanly; later requests fail at once."""
        sub = self.result(self.client.subscribe("t", start=Start.LATEST))
        reader = ensureDeferred(self._drain(sub))
        self.assertNoResult(self.client.closed)
        d = self.client.close()
        self.assertIsNone(self.result(d))
        self.assertIsNone(self.successResultOf(self.client.closed))
        self.assertEqual(self.successResultOf(reader), [])
        self.assertFalse(sub.active)
        self.assertEqual(self.service.connections, 0)
        self.assertEqual(self.service.topics["t"].subscribers, [])
        self.failureResultOf(self.client.ping(), ConnectionDone)
        self.assertIsNone(self.successResultOf(self.client.close()))
        self.assertRaises(ConnectionDone, self.client.publish_nowait, "t", b"x")
        self.assertRaises(ConnectionError, self.client.publish_nowait, "t", b"x")

    @staticmethod
    async def _drain(sub: Subscription) -> List[bytes]:
        return [message.value async for message in sub]

    def test_close_answers_earlier_requests(self) -> None:
        """Requests sent before close() are answered before it closes."""
        publish = self.client.publish("t", b"x")
        close = self.client.close()
        self.flush()
        self.assertEqual(self.successResultOf(publish), PublishResult(0, False))
        self.assertIsNone(self.successResultOf(close))

    def test_connection_lost(self) -> None:
        """A lost connection fails outstanding requests with its reason and
        ends subscriptions with it."""
        callback_sub = self.result(self.client.subscribe("a", lambda m: None, start=Start.LATEST))
        iter_sub = self.result(self.client.subscribe("b", start=Start.LATEST))
        reader = ensureDeferred(self._drain(iter_sub))
        outstanding = [self.client.ping(), self.client.publish("a", b"x"), self.client.list_topics()]
        pump = self.pump_of(self.client)
        pump.clientIO.disconnectReason = ConnectionLost("cable cut")
        pump.serverIO.abortConnection()
        self.flush()
        for d in outstanding:
            self.failureResultOf(d, ConnectionLost)
        self.failureResultOf(reader, ConnectionLost)
        self.failureResultOf(iter_sub.get(), ConnectionLost)
        self.assertFalse(callback_sub.active)
        self.assertFalse(iter_sub.active)
        self.assertIsNone(self.successResultOf(self.client.closed))
        self.failureResultOf(self.client.subscribe("c"), ConnectionLost)
        self.assertNotIn("c", self.client._core.subscriptions)
        self.assertEqual(self.service.connections, 0)
        self.assertEqual(self.service.topics["a"].subscribers, [])

    def test_abort(self) -> None:
        sub = self.result(self.client.subscribe("t", start=Start.LATEST))
        self.client.abort()
        self.flush()
        self.assertFalse(sub.active)
        self.failureResultOf(self.client.ping(), ConnectionDone)
        self.assertIsNone(self.successResultOf(self.client.closed))
        self.assertEqual(self.service.connections, 0)

    def test_taken_over(self) -> None:
        """A second connection with the same client_id closes the first."""
        first = self.connect(client_id="same")
        sub = self.result(first.subscribe("t", start=Start.LATEST))
        reader = ensureDeferred(self._drain(sub))
        self.assertNoResult(first.closed)
        second = self.connect(client_id="same")
        self.assertIsNone(self.successResultOf(first.closed))
        self.assertEqual(self.successResultOf(reader), [])
        self.assertIsNone(self.result(second.ping()))

    def test_undecodable_frame_from_broker(self) -> None:
        """The client drops a connection whose broker sends garbage: a lost
        connection, whose reason says so."""
        self.client._protocol.dataReceived(codec.frame(b"\x07\x00\x00\x00\x01"))
        self.assertTrue(self.pump_of(self.client).clientIO.disconnecting)
        self.flush()
        failure = self.failureResultOf(self.client.ping(), ConnectionLost)
        self.assertIn("undecodable frame", str(failure.value))
        self.assertIsNone(self.successResultOf(self.client.closed))


class FrameTooLargeTests(ClientTestCase):
    max_frame_size = 128

    def test_frame_too_large(self) -> None:
        """The broker's ERROR(0, FRAME_TOO_LARGE) reaches on_error; the
        connection closes, failing the request that caused it with
        FRAME_TOO_LARGE (the broker's reason, not "connection lost")."""
        client = self.connect()
        errors: List[ZaichikError] = []
        client.on_error = errors.append
        small = client.publish("t", b"x" * 100)
        big = client.publish("t", b"x" * 200)
        self.flush()
        self.assertEqual(self.successResultOf(small), PublishResult(0, False))
        self.assertEqual([e.code for e in errors], [ErrorCode.FRAME_TOO_LARGE])
        self.assertIs(self.failureResultOf(big, ZaichikError).value.code, ErrorCode.FRAME_TOO_LARGE)
        self.assertIsNone(self.successResultOf(client.closed))
        self.assertIs(client.close_reason.code, ErrorCode.FRAME_TOO_LARGE)
        self.assertIs(self.failureResultOf(client.ping(), ZaichikError).value.code,
                      ErrorCode.FRAME_TOO_LARGE)
        self.assertEqual(self.service.topics["t"].next_offset, 1)


class CloseTwiceTests(ClientTestCase):
    def test_close_twice_before_closed(self) -> None:
        """Both calls fire once the connection is closed."""
        client = self.connect()
        first = client.close()
        second = client.close()
        self.assertIsNone(self.result(first))
        self.assertIsNone(self.result(second))
        self.assertTrue(client.closed.called)
