"""
The Twisted client library for zaichik.

Every call returns a Deferred, so it reads naturally in C{async def} code run
by L{twisted.internet.task.react}::

    from twisted.internet.task import react
    from zaichik.client import connect

    async def main(reactor):
        client = await connect(reactor, "tcp:localhost:8889")
        subscription = await client.subscribe("greetings", start=Start.EARLIEST)
        result = await client.publish("greetings", b"hello")
        async for message in subscription:
            print(message.offset, message.value)
            await subscription.commit(message.offset)
            break
        await client.close()

    react(main)

Errors from the broker are raised as L{zaichik.errors.ZaichikError}, whose
C{code} is the protocol's L{ErrorCode}.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Iterable, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from zaichik import codec
from zaichik.codec import ErrorCode, Message, Start, TopicInfo
from zaichik.errors import ZaichikError

__all__ = [
    "Client",
    "Message",
    "PublishResult",
    "Start",
    "Subscription",
    "TopicInfo",
    "ZaichikError",
    "client_endpoint",
    "connect",
]

_log = Logger()


@dataclass(frozen=True)
class PublishResult:
    """The broker's answer to a publish: the message's offset, and whether
    compaction dropped it as a duplicate (then C{offset} is the original's)."""

    offset: int
    duplicate: bool


class Subscription:
    """
    Messages of one topic, delivered to a callback or read with
    C{async for message in subscription}.
    """

    def __init__(self, client: "Client", topic: str,
                 callback: Optional[Callable[[Message], object]] = None) -> None:
        self.client = client
        self.topic = topic
        self.active = True
        self._callback = callback
        self._queue: Deque[Message] = deque()
        self._waiters: Deque[Deferred] = deque()
        self._ended: Optional[Failure] = None

    def __repr__(self) -> str:
        return f"<Subscription {self.topic} active={self.active}>"

    def _receive(self, message: Message) -> None:
        if self._callback is not None:
            try:
                self._callback(message)
            except Exception:
                _log.failure("Subscription callback for {topic} raised", topic=self.topic)
        elif self._waiters:
            self._waiters.popleft().callback(message)
        else:
            self._queue.append(message)

    def _end(self, reason: Optional[Failure] = None) -> None:
        self.active = False
        self._ended = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            if reason is None:
                waiter.callback(None)
            else:
                waiter.errback(reason)

    def get(self) -> Deferred:
        """
        The next message (a Deferred).  Fires with None once the subscription
        has ended and every received message has been read.
        """
        if self._queue:
            return succeed(self._queue.popleft())
        if not self.active:
            return succeed(None) if self._ended is None else _failed(self._ended)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        return waiter

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Message:
        message = await self.get()
        if message is None:
            raise StopAsyncIteration
        return message

    def commit(self, offset: int) -> Deferred:
        """Commit everything of this topic up to and including C{offset}."""
        return self.client.commit(self.topic, offset)

    def unsubscribe(self) -> Deferred:
        return self.client.unsubscribe(self.topic)


class _ClientProtocol(Int32StringReceiver):
    # Large enough for any frame a broker sends within its own limit.
    MAX_LENGTH = 2**31 - 1

    def __init__(self) -> None:
        self._waiting: Dict[int, Tuple[Deferred, Callable]] = {}
        self._next_rid = 0
        self.subscriptions: Dict[str, Subscription] = {}
        self.on_error: Callable[[ZaichikError], None] = _log_error
        self.closed: Deferred = Deferred()
        self._lost: Optional[Failure] = None

    def next_rid(self) -> int:
        self._next_rid = self._next_rid % 0xFFFFFFFF + 1
        return self._next_rid

    def request(self, request, convert: Callable = lambda reply: None) -> Deferred:
        if self._lost is not None:
            return _failed(self._lost)
        d: Deferred = Deferred()
        self._waiting[request.rid] = (d, convert)
        self.sendString(request.encode())
        return d

    def send(self, request) -> None:
        """Send a request that expects no reply."""
        if self._lost is not None:
            raise ZaichikError(ErrorCode.INTERNAL, "not connected")
        self.sendString(request.encode())

    def stringReceived(self, body: bytes) -> None:
        try:
            reply = codec.decode_reply(body)
        except codec.DecodeError as e:
            _log.error("Undecodable frame from the broker: {error}", error=e)
            self.transport.loseConnection()
            return
        if type(reply) is codec.Message:
            subscription = self.subscriptions.get(reply.topic)
            if subscription is not None:
                subscription._receive(reply)
            return
        waiting = self._waiting.pop(reply.rid, None)
        if type(reply) is codec.Error:
            error = ZaichikError(reply.code, reply.message)
            if waiting is None:
                self.on_error(error)
            else:
                waiting[0].errback(error)
        elif waiting is not None:
            d, convert = waiting
            d.callback(convert(reply))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._lost = reason
        waiting, self._waiting = self._waiting, {}
        for d, _ in waiting.values():
            d.errback(reason)
        subscriptions, self.subscriptions = self.subscriptions, {}
        for subscription in subscriptions.values():
            subscription._end(None if reason.check(ConnectionDone) else reason)
        self.closed.callback(None)


def _failed(reason: Failure) -> Deferred:
    d: Deferred = Deferred()
    d.errback(reason)
    return d


def _log_error(error: ZaichikError) -> None:
    _log.warn("Broker reported an error: {error}", error=str(error))


class Client:
    """
    A connection to a zaichik broker.  Make one with L{connect}.

    @ivar closed: a Deferred that fires when the connection is gone.
    """

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol
        self.closed = protocol.closed

    @property
    def on_error(self) -> Callable[[ZaichikError], None]:
        """Called with errors that answer no awaited request (fire-and-forget publishes)."""
        return self._protocol.on_error

    @on_error.setter
    def on_error(self, handler: Callable[[ZaichikError], None]) -> None:
        self._protocol.on_error = handler

    def _request(self, make, convert: Callable = lambda reply: None) -> Deferred:
        p = self._protocol
        return p.request(make(p.next_rid()), convert)

    def hello(self, client_id: str = "", token: str = "") -> Deferred:
        """Identify this client (must come first; L{connect} does it for you)."""
        return self._request(lambda rid: codec.Hello(rid, client_id, token))

    def create_topic(self, topic: str, retention_ttl: int = 0, compaction_window: int = 0) -> Deferred:
        """Create C{topic} with retention and compaction in milliseconds (idempotent)."""
        return self._request(lambda rid: codec.CreateTopic(rid, topic, retention_ttl, compaction_window))

    def publish(self, topic: str, value: bytes, key: Optional[bytes] = None) -> Deferred:
        """Publish and wait for the broker's answer: a L{PublishResult}."""
        return self._request(lambda rid: codec.Publish(rid, topic, value, key),
                             lambda reply: PublishResult(reply.offset, reply.duplicate))

    def publish_nowait(self, topic: str, value: bytes, key: Optional[bytes] = None) -> None:
        """Fire and forget: no answer unless it fails (then C{on_error} is called)."""
        self._protocol.send(codec.Publish(0, topic, value, key))

    def publish_batch(self, topic: str, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> Deferred:
        """
        Publish C{(key, value)} pairs in one frame; fires with a list of
        L{PublishResult}, in order.
        """
        entries = list(entries)
        return self._request(
            lambda rid: codec.PublishBatch(rid, topic, entries),
            lambda reply: [PublishResult(o, d) for o, d in reply.results],
        )

    def subscribe(
        self,
        topic: str,
        callback: Optional[Callable[[Message], object]] = None,
        start: Start = Start.DEFAULT,
        offset: int = 0,
        max_inflight: int = 0,
    ) -> Deferred:
        """
        Follow C{topic}.  Fires with a L{Subscription} once the broker has
        accepted; messages then go to C{callback}, or are read by iterating
        the subscription.
        """
        p = self._protocol
        if topic in p.subscriptions:
            return _failed(Failure(ZaichikError(ErrorCode.ALREADY_SUBSCRIBED,
                                                f"already subscribed to {topic}")))
        subscription = Subscription(self, topic, callback)
        # Registered before the request, since messages follow the OK at once.
        p.subscriptions[topic] = subscription

        def refused(failure: Failure) -> Failure:
            if p.subscriptions.get(topic) is subscription:
                del p.subscriptions[topic]
            subscription._end(None)
            return failure

        d = self._request(lambda rid: codec.Subscribe(rid, topic, Start(start), offset, max_inflight),
                          lambda reply: subscription)
        return d.addErrback(refused)

    def unsubscribe(self, topic: str) -> Deferred:
        p = self._protocol

        def done(_):
            subscription = p.subscriptions.pop(topic, None)
            if subscription is not None:
                subscription._end(None)

        return self._request(lambda rid: codec.Unsubscribe(rid, topic)).addCallback(done)

    def commit(self, topic: str, offset: int) -> Deferred:
        """Commit C{topic} up to and including C{offset}."""
        return self._request(lambda rid: codec.Commit(rid, topic, offset))

    def ping(self) -> Deferred:
        return self._request(codec.Ping)

    def list_topics(self) -> Deferred:
        """Fires with a list of L{TopicInfo}."""
        return self._request(codec.ListTopics, lambda reply: reply.topics)

    def close(self) -> Deferred:
        """Ask the broker to close; fires once the connection is closed."""
        if self._protocol._lost is not None:
            return succeed(None)
        if not self._closing:
            self._closing = True
            d = self._request(codec.Close)
            d.addErrback(lambda failure: None)  # a connection lost meanwhile is closed too
        waiter: Deferred = Deferred()
        self.closed.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    _closing = False

    def _keepalive(self) -> None:
        if self._protocol._lost is None:
            self.ping().addErrback(lambda failure: None)

    def abort(self) -> None:
        """Drop the connection at once."""
        self._protocol.transport.abortConnection()


def client_endpoint(reactor, server: str, tls: bool = False, ca: Optional[str] = None):
    """
    An endpoint from C{host:port}, a bare port, or a full client endpoint
    description (C{tcp:host=...:port=...}, C{unix:path=...}, C{tls:...}).

    With C{tls} (or a C{ca}), C{host:port} is reached over TLS, the server's
    certificate checked against the CA certificate in the PEM file C{ca}, or
    against the system's trust roots without one.
    """
    if server.isdigit():
        server = f"localhost:{server}"
    host, sep, port = server.rpartition(":")
    if sep and port.isdigit() and ":" not in host and "=" not in host:
        if tls or ca:
            from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
            from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

            if ca:
                with open(ca, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            else:
                trust = platformTrust()
            options = optionsForClientTLS(host, trustRoot=trust)
            return wrapClientTLS(options, HostnameEndpoint(reactor, host.encode(), int(port)))
        server = f"tcp:host={host}:port={port}"
    return clientFromString(reactor, server)


async def connect(reactor, server: str = "localhost:8889", client_id: str = "", token: str = "",
                  keepalive: float = 60.0, tls: bool = False, ca: Optional[str] = None) -> Client:
    """
    Connect to a broker (see L{client_endpoint} for C{server}), and say
    HELLO when a C{client_id} or C{token} is given.

    @param tls: reach C{host:port} over TLS.
    @param ca: a PEM file with the CA certificate to check the broker's
        certificate against (implies C{tls}).
    @param keepalive: seconds between PINGs that keep an otherwise quiet
        connection (a subscriber that only listens) inside the broker's
        idle timeout; 0 for none.
    """
    protocol = await connectProtocol(client_endpoint(reactor, server, tls, ca), _ClientProtocol())
    client = Client(protocol)
    if keepalive:
        pinger = LoopingCall(client._keepalive)
        pinger.clock = reactor
        pinger.start(keepalive, now=False)
        client.closed.addBoth(lambda result: (pinger.stop(), result)[1])
    if client_id or token:
        try:
            await client.hello(client_id, token)
        except BaseException:
            client.abort()
            raise
    return client
