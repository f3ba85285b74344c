"""
The Twisted client for zaichik: a thin adapter that moves bytes and time
between a Twisted transport and L{zaichik.client.core.ClientCore}.

Every call returns a Deferred, so it reads naturally in C{async def} code run
by L{twisted.internet.task.react}::

    from twisted.internet.task import react
    from zaichik.client import Start, connect

    async def main(reactor):
        client = await connect(reactor, "localhost:8889")
        subscription = await client.subscribe("greetings", start=Start.EARLIEST)
        result = await client.publish("greetings", b"hello")
        async for message in subscription:
            print(message.offset, message.value)
            await subscription.commit(message.offset)
            break
        await client.close()

    react(main)

C{subscribe} takes a wildcard pattern too (C{"sensors.>"}: each message
names its topic), and C{subscribe_group(topic, group)} joins a consumer
group, whose messages are acknowledged with C{ack(topic, offset)} (see
docs/groups-and-patterns.rst).

Errors from the broker are raised as L{zaichik.errors.ZaichikError}, whose
C{code} is the protocol's L{ErrorCode}.  The asyncio client
(L{zaichik.aio}) and the blocking one (L{zaichik.sync}) have the same
methods and behaviour.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any, Callable, Deque, Iterable, List, Optional, Sequence, Tuple, Union

from twisted.internet import error as _error
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IHandshakeListener, INegotiated, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zaichik import codec
from zaichik.client import core as _core
from zaichik.client.core import (
    ClientClosedError,
    ConnectionLostError,
    ConnectTimeout,
    Message,
    PublishResult,
    RequestTimeout,
    Start,
    TopicInfo,
)
from zaichik.codec import ErrorCode
from zaichik.errors import ZaichikError

__all__ = [
    "Client",
    "ClientClosedError",
    "ConnectTimeout",
    "ConnectionLostError",
    "ErrorCode",
    "Message",
    "PublishResult",
    "RequestTimeout",
    "Start",
    "Subscription",
    "TopicInfo",
    "ZaichikError",
    "client_endpoint",
    "connect",
]

_log = Logger()
_CONNECTION_DONE = Failure(_error.ConnectionDone())


# A lost connection fails requests with Twisted's own exceptions, as Twisted
# code expects, which are also the core's: `except ConnectionError` catches
# them in all three clients.
class ConnectionDone(_error.ConnectionDone, ConnectionLostError):
    """The connection was closed cleanly."""


class ConnectionLost(_error.ConnectionLost, ConnectionLostError):
    """The connection was lost."""


class ClientClosed(_error.ConnectionDone, ClientClosedError):
    """A request after the client was closed."""


def _twisted_error(exc: BaseException) -> BaseException:
    if isinstance(exc, _error.ConnectionClosed) or not isinstance(exc, ConnectionLostError):
        return exc
    converted: BaseException
    if isinstance(exc, ClientClosedError):
        converted = ClientClosed(*exc.args)
    else:
        converted = ConnectionLost(*exc.args)
    converted.__cause__ = exc.__cause__
    return converted


def _loss_reason(reason: Failure) -> BaseException:
    value = reason.value
    assert value is not None
    if isinstance(value, ConnectionLostError):
        return value
    if reason.check(_error.ConnectionDone):
        return ConnectionDone(*value.args)
    if reason.check(_error.ConnectionLost):
        converted: BaseException = ConnectionLost(*value.args)
    else:
        converted = ConnectionLost(f"{type(value).__name__}: {value}")
    converted.__cause__ = value
    return converted


def _log_error(error: ZaichikError) -> None:
    _log.warn("Broker reported an error: {error}", error=str(error))


class Subscription(_core.SubscriptionInfo):
    """
    Messages of one topic, of the topics a pattern matches, or a consumer
    group member's share of a topic: delivered to a callback or read with
    C{async for message in subscription} (or L{get}).  Each message names
    its own topic (C{message.topic}).
    """

    def __init__(self, client: "Client", state: _core.SubscriptionState,
                 callback: Optional[Callable[[Message], object]] = None) -> None:
        self.client = client
        self.topic = state.topic
        self._state = state
        state.handle = self
        self._callback = callback
        self._waiters: Deque[Deferred] = deque()

    def _deliver(self, message: Message) -> None:
        assert self._callback is not None
        try:
            result = self._callback(message)
        except Exception:
            _log.failure("Subscription callback for {topic} raised", topic=self.topic)
            return
        if isinstance(result, Deferred) or inspect.iscoroutine(result):
            ensureDeferred(result).addErrback(
                lambda f: _log.failure("Subscription callback for {topic} failed", f, topic=self.topic))

    def _wake(self) -> None:
        core = self.client._core
        state = self._state
        while self._waiters:
            message = core.take(state)
            if message is not None:
                self._waiters.popleft().callback(message)
            elif not state.active:
                waiter = self._waiters.popleft()
                if state.end_error is None:
                    waiter.callback(None)
                else:
                    waiter.errback(Failure(_twisted_error(state.end_error)))
            else:
                break
        self.client._pump()

    def get(self) -> Deferred:
        """
        The next message (a Deferred).  Fires with None once the subscription
        has ended and every received message has been read (or fails with
        what ended it: a lost connection).
        """
        state = self._state
        message = self.client._core.take(state)
        if message is not None:
            self.client._pump()
            return succeed(message)
        if not state.active:
            if state.end_error is None:
                return succeed(None)
            return fail(_twisted_error(state.end_error))
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

    def commit(self, offset: int, topic: Optional[str] = None) -> Deferred:
        """
        Commit everything of this topic up to and including C{offset} (of a
        pattern's: of C{topic}, the message's own; of a group member's:
        acknowledge what was sent to it up to C{offset}).
        """
        try:
            name = _core.commit_topic(self._state, topic)
        except ValueError as e:
            return fail(e)
        return self.client.commit(name, offset)

    def ack(self, offset: int) -> Deferred:
        """Acknowledge the message at C{offset} (a group member's)."""
        try:
            name = _core.ack_topic(self._state)
        except ValueError as e:
            return fail(e)
        return self.client.ack(name, offset)

    def unsubscribe(self) -> Deferred:
        return self.client.unsubscribe(self.topic)


@implementer(IPushProducer, IHandshakeListener)
class _ClientProtocol(Protocol):
    """
    Bytes in and out of one connection, for its L{Client}.  Over TLS the
    connection counts as made once the handshake has completed, so that a
    certificate that fails verification fails the connect.
    """

    made = False
    timed_out: Optional[BaseException] = None

    @property
    def tx(self) -> Any:
        """The transport (TCP, TLS, unix: a producer and consumer too)."""
        return self.transport

    def __init__(self, client: "Client") -> None:
        self.client = client
        self.writing_paused = False
        self._drained: List[Deferred] = []

    def connectionMade(self) -> None:
        self.tx.registerProducer(self, True)
        if not INegotiated.providedBy(self.transport):
            self.made = True
            self.client._connection_made(self)

    def handshakeCompleted(self) -> None:
        if not self.made:
            self.made = True
            self.client._connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.client._data_received(self, data)

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.writing_paused = False
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)
        self.client._connection_lost(self, reason)

    # IPushProducer: the transport says when its write buffer is full.
    def pauseProducing(self) -> None:
        self.writing_paused = True

    def resumeProducing(self) -> None:
        self.writing_paused = False
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def drained(self) -> Deferred:
        if not self.writing_paused:
            return succeed(None)
        d: Deferred = Deferred()
        self._drained.append(d)
        return d


class Client(_core.ClientAdapter):
    """
    A client of a zaichik broker (one connection at a time; with
    C{reconnect}, a new one after a loss).  Make one with L{connect}.

    @ivar closed: a Deferred that fires (with None) when the client is
        closed for good: closed, or its connection lost without reconnect.
        L{close_reason} then says why.
    @ivar on_error: called with errors that answer no awaited request (a
        fire-and-forget publish that failed; the broker's reason for
        closing).
    """

    def __init__(self, reactor, core: _core.ClientCore, tls: bool = False,
                 ca: Optional[str] = None) -> None:
        self._reactor = reactor
        self._core = core
        self._tls = tls
        self._ca = ca
        self._protocol: Optional[_ClientProtocol] = None
        self.closed: Deferred = Deferred()
        self.on_error: Callable[[ZaichikError], None] = _log_error
        self._pumping = False
        self._timer = None
        self._timer_at: Optional[float] = None
        self._dial_call = None
        self._dialing: Optional[Deferred] = None
        self._connect_timer = None

    def __repr__(self) -> str:
        return f"<zaichik Client {self._core.server} {self._core.state}>"

    # --- what the core says -----------------------------------------------------

    def _now(self) -> float:
        return self._reactor.seconds()

    def _send(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.tx.write(data)

    def _handle(self, event) -> None:
        kind = type(event)
        if kind is _core.Resolve:
            event.waiter.callback(event.value)
        elif kind is _core.Reject:
            event.waiter.errback(Failure(_twisted_error(event.error)))
        elif kind is _core.Deliver:
            event.handle._deliver(event.message)
        elif kind is _core.Wake:
            event.handle._wake()
        elif kind is _core.AsyncError:
            try:
                self.on_error(event.error)
            except Exception:
                _log.failure("on_error raised")
        elif kind is _core.Dial:
            if event.delay > 0:
                self._dial_call = self._reactor.callLater(event.delay, self._dial, event.server)
            else:
                self._dial(event.server)
        elif kind is _core.CloseTransport:
            if self._protocol is not None:
                if event.abort:
                    self._protocol.tx.abortConnection()
                else:
                    self._protocol.tx.loseConnection()
        elif kind is _core.PauseReading:
            if self._protocol is not None:
                self._protocol.tx.pauseProducing()
        elif kind is _core.ResumeReading:
            if self._protocol is not None:
                self._protocol.tx.resumeProducing()
        elif kind is _core.Closed:
            self._stop_timers()
            if not self.closed.called:
                self.closed.callback(None)

    def _arm_timer(self) -> None:
        at = self._core.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._reactor.callLater(max(0.0, at - self._now()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._core.handle_timer(self._now())
        self._pump()

    def _stop_timers(self) -> None:
        for name in ("_timer", "_dial_call", "_connect_timer"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        self._timer_at = None
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()

    # --- the connection ---------------------------------------------------------

    def _dial(self, server: str) -> None:
        self._dial_call = None
        core = self._core
        if core.closed:
            return
        timeout = core.connect_timeout
        try:
            endpoint = client_endpoint(self._reactor, server, self._tls, self._ca, timeout=timeout)
        except Exception as e:
            core.connection_failed(e, self._now())
            self._pump()
            return
        protocol = _ClientProtocol(self)
        d = connectProtocol(endpoint, protocol)
        self._dialing = d

        def too_late() -> None:
            self._connect_timer = None
            if not d.called:
                d.cancel()
            elif not protocol.made and protocol.transport is not None:
                # Connected, but the TLS handshake has not completed.
                protocol.timed_out = ConnectTimeout(f"no TLS handshake with {server} within {timeout:g} s")
                protocol.tx.abortConnection()

        if timeout:
            self._connect_timer = self._reactor.callLater(timeout, too_late)

        def done(result):
            if self._dialing is d:
                self._dialing = None
            if isinstance(result, Failure):
                self._cancel_connect_timer()
                error: BaseException = result.value  # type: ignore[assignment]
                if result.check(CancelledError):
                    if core.closed:
                        return None
                    error = ConnectTimeout(f"no connection to {server} within {timeout:g} s")
                core.connection_failed(error, self._now())
                self._pump()
            elif protocol.made:
                self._cancel_connect_timer()
            return None

        d.addBoth(done)

    def _cancel_connect_timer(self) -> None:
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None

    def _connection_made(self, protocol: _ClientProtocol) -> None:
        self._cancel_connect_timer()
        self._protocol = protocol
        self._core.connection_made(self._now())
        self._pump()

    def _data_received(self, protocol: _ClientProtocol, data: bytes) -> None:
        if protocol is self._protocol:
            self._core.receive_data(data, self._now())
            self._pump()

    def _connection_lost(self, protocol: _ClientProtocol, reason: Failure) -> None:
        if not protocol.made:
            # The TLS handshake failed: the connection was never made.
            self._cancel_connect_timer()
            self._core.connection_failed(protocol.timed_out or _loss_reason(reason), self._now())
            self._pump()
            return
        if protocol is not self._protocol:
            return
        self._protocol = None
        self._core.connection_lost(_loss_reason(reason), self._now(),
                                   clean=bool(reason.check(_error.ConnectionDone)))
        self._pump()

    # --- the API ------------------------------------------------------------------

    def _simple(self, make: Callable[[int], Any], convert: Callable = _core._none) -> Deferred:
        d: Deferred = Deferred()
        try:
            self._core.request(d, make, self._now(), convert)
        except Exception as e:
            return fail(e)
        self._pump()
        return d

    def hello(self, client_id: str = "", token: str = "") -> Deferred:
        """Identify this client (must come first; L{connect} does it for you)."""
        d: Deferred = Deferred()
        try:
            self._core.hello(d, client_id, token, self._now())
        except Exception as e:
            return fail(e)
        self._pump()
        return d

    def create_topic(self, topic: str, retention_ttl: int = 0, compaction_window: int = 0) -> Deferred:
        """Create C{topic} with retention and compaction in milliseconds (idempotent)."""
        return self._simple(lambda rid: codec.CreateTopic(rid, topic, retention_ttl, compaction_window))

    def publish(self, topic: str, value: bytes, key: Optional[bytes] = None) -> Deferred:
        """Publish and wait for the broker's answer: a L{PublishResult}."""
        return self._simple(lambda rid: codec.Publish(rid, topic, value, key), _core._published)

    def publish_nowait(self, topic: str, value: bytes, key: Optional[bytes] = None) -> None:
        """
        Fire and forget: no answer unless it fails (then C{on_error} is
        called).  Raises at once if it cannot be encoded, or the client is
        closed.  L{drain} waits until the transport takes more.
        """
        try:
            self._core.send(_core.encode_publish(topic, value, key), self._now())
        except ConnectionLostError as e:
            raise _twisted_error(e) from None
        self._pump()

    def drain(self) -> Deferred:
        """Fires once the connection's write buffer is below its high-water mark."""
        if self._protocol is None:
            return succeed(None)
        return self._protocol.drained()

    def publish_batch(self, topic: str, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> Deferred:
        """
        Publish C{(key, value)} pairs in one frame; fires with a list of
        L{PublishResult}, in order.
        """
        entries = list(entries)
        return self._simple(lambda rid: codec.PublishBatch(rid, topic, entries), _core._published_batch)

    def subscribe(
        self,
        topic: str,
        callback: Optional[Callable[[Message], object]] = None,
        start: Start = Start.DEFAULT,
        offset: int = 0,
        max_inflight: int = 0,
    ) -> Deferred:
        """
        Follow C{topic}, or every topic a wildcard pattern matches
        (C{sensors.>}, C{sensors.*.temp}: those that exist and those
        created later; each message names its topic).  Fires with a
        L{Subscription} once the broker has accepted; messages then go to
        C{callback}, or are read by iterating the subscription.  A coroutine
        function as C{callback} is awaited for each message in turn.
        """
        return self._subscribe(_core.SubscriptionState, topic, callback, start, offset, max_inflight)

    def subscribe_group(
        self,
        topic: str,
        group: str,
        callback: Optional[Callable[[Message], object]] = None,
        start: Start = Start.DEFAULT,
        offset: int = 0,
        max_inflight: int = 0,
        ack_timeout: int = 0,
    ) -> Deferred:
        """
        Join consumer group C{group} of C{topic} (which must retain
        messages): each message goes to one member of the group at a time.
        Fires with a L{Subscription}, as L{subscribe}.  Acknowledge each
        message with L{ack} (or L{Subscription.ack}), or all up to an
        offset with L{commit}; one not acknowledged within C{ack_timeout}
        milliseconds (0: the broker's 30 s), or outstanding when this
        member leaves or its connection ends, is sent again, to any member.
        C{start}/C{offset} set a new group's position (DEFAULT: the oldest
        retained message); C{max_inflight} bounds what this member has
        unacknowledged (0: 1,000).
        """
        def make(topic, start, offset, max_inflight, has_callback):
            return _core.SubscriptionState(topic, start, offset, max_inflight, has_callback, group=group,
                                           ack_timeout=ack_timeout)
        return self._subscribe(make, topic, callback, start, offset, max_inflight)

    def _subscribe(self, make: Callable[..., _core.SubscriptionState], topic: str,
                   callback: Optional[Callable[[Message], object]], start: Start, offset: int,
                   max_inflight: int) -> Deferred:
        is_async = callback is not None and inspect.iscoroutinefunction(callback)
        state = make(topic, start, offset, max_inflight, callback is not None and not is_async)
        Subscription(self, state, None if is_async else callback)   # state.handle
        d: Deferred = Deferred()
        try:
            self._core.subscribe(d, state, self._now())
        except Exception as e:
            return fail(e)
        self._pump()
        if is_async:
            assert callback is not None

            def consume(sub: Subscription) -> Subscription:
                ensureDeferred(_consume(sub, callback))
                return sub
            d.addCallback(consume)
        return d

    def unsubscribe(self, topic: str) -> Deferred:
        """End the subscription to C{topic}, or to a pattern, or leave the group of C{topic}."""
        d: Deferred = Deferred()
        self._core.unsubscribe(d, topic, self._now())
        self._pump()
        return d

    def commit(self, topic: str, offset: int) -> Deferred:
        """
        Commit C{topic} up to and including C{offset} (the message's own
        topic, for a pattern's; for a group member, acknowledge everything
        sent to it up to C{offset}).
        """
        d: Deferred = Deferred()
        try:
            self._core.commit(d, topic, offset, self._now())
        except Exception as e:
            return fail(e)
        self._pump()
        return d

    def ack(self, topic: str, offset: int) -> Deferred:
        """Acknowledge the message at C{offset} of C{topic}, sent to this member of a group."""
        d: Deferred = Deferred()
        try:
            self._core.ack(d, topic, offset, self._now())
        except Exception as e:
            return fail(e)
        self._pump()
        return d

    def ping(self) -> Deferred:
        return self._simple(codec.Ping)

    def list_topics(self) -> Deferred:
        """Fires with a list of L{TopicInfo}."""
        return self._simple(codec.ListTopics, _core._topics)

    def close(self) -> Deferred:
        """Ask the broker to close; fires once the connection is closed."""
        d: Deferred = Deferred()
        self._core.close(d, self._now())
        self._pump()
        return d

    def abort(self) -> None:
        """Drop the connection at once (and do not reconnect)."""
        self._core.abort()
        self._pump()


async def _consume(subscription: Subscription, callback: Callable) -> None:
    try:
        async for message in subscription:
            try:
                await callback(message)
            except Exception:
                _log.failure("Subscription callback for {topic} raised", topic=subscription.topic)
    except Exception:
        pass  # the subscription ended with the connection: nothing more to hand out


def client_endpoint(reactor, server: str, tls: bool = False, ca: Optional[str] = None,
                    timeout: Optional[float] = None):
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
    if sep and port.isdigit() and "=" not in host and (":" not in host or host.startswith("[")):
        host = host.strip("[]")
        if tls or ca:
            from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
            from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

            if ca:
                with open(ca, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            else:
                trust = platformTrust()
            options = optionsForClientTLS(host, trustRoot=trust)
            endpoint = (HostnameEndpoint(reactor, host.encode(), int(port)) if timeout is None
                        else HostnameEndpoint(reactor, host.encode(), int(port), timeout=timeout))
            return wrapClientTLS(options, endpoint)
        server = f"tcp:host={host}:port={port}"
        if timeout:
            server += f":timeout={max(1, int(timeout + 0.999))}"
    return clientFromString(reactor, server)


async def connect(reactor, server: Union[str, Sequence[str]] = "localhost:8889", client_id: str = "",
                  token: str = "", keepalive: float = 60.0, tls: bool = False, ca: Optional[str] = None,
                  *, reconnect: bool = False, connect_timeout: Optional[float] = 10.0,
                  request_timeout: Optional[float] = 30.0) -> Client:
    """
    Connect to a broker (see L{client_endpoint} for C{server}), and say
    HELLO when a C{client_id} or C{token} is given.

    @param server: one server, a list of them, or C{"a:8889,b:8889"}: tried
        in turn until one answers (and, with C{reconnect}, after a loss).
    @param tls: reach C{host:port} over TLS.
    @param ca: a PEM file with the CA certificate to check the broker's
        certificate against (implies C{tls}).
    @param keepalive: seconds without sending after which a PING keeps the
        connection inside the broker's idle timeout (and finds a dead one);
        0 for none.
    @param reconnect: after a lost connection, connect again (with backoff),
        HELLO, and resubscribe from the committed position.
    @param connect_timeout: seconds for the connection and HELLO.
    @param request_timeout: seconds a request waits for its answer.
    """
    core = _core.ClientCore(server, client_id=client_id, token=token, keepalive=keepalive,
                            connect_timeout=connect_timeout, request_timeout=request_timeout,
                            reconnect=reconnect)
    client = Client(reactor, core, tls=tls, ca=ca)
    d: Deferred = Deferred()
    core.start(d)
    client._pump()
    await d
    return client
