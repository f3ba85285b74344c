"""
The asyncio client for zaichik (also C{zaichik.aio}): a thin adapter that
moves bytes and time between an asyncio transport and
L{zaichik.client.core.ClientCore}.  It imports nothing from Twisted and runs
on any asyncio event loop, uvloop's included::

    import asyncio
    from zaichik.aio import Start, connect

    async def main():
        async with connect("localhost:8889", client_id="worker-1") as client:
            await client.create_topic("orders", retention_ttl=60_000)
            result = await client.publish("orders", b'{"id": 1}')
            subscription = await client.subscribe("orders", start=Start.EARLIEST)
            async for message in subscription:
                print(message.offset, message.value)
                await subscription.commit(message.offset)
                break

    asyncio.run(main())

The methods and their behaviour are those of the Twisted client
(L{zaichik.client}); coroutines stand for Deferreds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import ssl
from collections import deque
from typing import Any, Callable, Deque, Iterable, List, Optional, Sequence, Set, Tuple, Union

from zaichik import codec
from zaichik.client import core as _core
from zaichik.client._sockets import read_what_is_left
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
    "connect",
]

log = logging.getLogger("zaichik.client")

def _log_error(error: ZaichikError) -> None:
    log.warning("broker reported an error: %s", error)


def _tls_context(tls: bool, ca: Optional[str]) -> Optional[ssl.SSLContext]:
    if not (tls or ca):
        return None
    return ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()


def describe_connect_error(error: BaseException) -> str:
    """One line for an error of connecting (TLS verification failures included)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {error.verify_message or error.reason}"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    return str(error) or type(error).__name__


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
        self._waiters: Deque[asyncio.Future] = deque()
        self._listeners: List[Callable[[], None]] = []

    def _deliver(self, message: Message) -> None:
        assert self._callback is not None
        try:
            self._callback(message)
        except Exception:
            log.exception("subscription callback for %s raised", self.topic)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener()

    async def get(self) -> Optional[Message]:
        """
        The next message.  None once the subscription has ended and every
        received message has been read (or raises what ended it: a lost
        connection).
        """
        client = self.client
        state = self._state
        while True:
            message = client._core.take(state)
            if message is not None:
                client._pump()
                return message
            if not state.active:
                if state.end_error is None:
                    return None
                raise state.end_error
            waiter = client._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Message:
        message = await self.get()
        if message is None:
            raise StopAsyncIteration
        return message

    async def commit(self, offset: int, topic: Optional[str] = None) -> None:
        """
        Commit everything of this topic up to and including C{offset} (of a
        pattern's: of C{topic}, the message's own; of a group member's:
        acknowledge what was sent to it up to C{offset}).
        """
        await self.client.commit(_core.commit_topic(self._state, topic), offset)

    async def ack(self, offset: int) -> None:
        """Acknowledge the message at C{offset} (a group member's)."""
        await self.client.ack(_core.ack_topic(self._state), offset)

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self.topic)


class _Protocol(asyncio.Protocol):
    """
    One connection's bytes, for its L{Client}.  (A protocol rather than
    streams: each read reaches the core at once, so that an ERROR the broker
    sent just before closing is handled before a failed write can report
    the connection lost; a StreamReader raises a stored write error before
    the data it still holds.)
    """

    def __init__(self, client: "Client") -> None:
        self.client = client
        self.transport: Optional[asyncio.Transport] = None
        self.writing_paused = False
        self._drained: List[asyncio.Future] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client._connection_made(self)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(self, data)

    def eof_received(self) -> bool:
        return False   # close; connection_lost(None) follows

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.resume_writing()
        if exc is not None and self.transport is not None and self.transport.get_extra_info("sslcontext") is None:
            # A write failed: what the broker sent before closing (its
            # reason) may still wait to be read.
            left = read_what_is_left(self.transport.get_extra_info("socket"))
            if left:
                self.client._data_received(self, left)
        self.client._connection_lost(self, exc)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drained, self._drained = self._drained, []
        for future in drained:
            if not future.done():
                future.set_result(None)

    async def drained(self) -> None:
        if self.writing_paused:
            future = asyncio.get_running_loop().create_future()
            self._drained.append(future)
            await future

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, abort: bool) -> None:
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class Client(_core.ClientAdapter):
    """
    A client of a zaichik broker (one connection at a time; with
    C{reconnect}, a new one after a loss).  Make one with L{connect}.

    @ivar on_error: called with errors that answer no awaited request (a
        fire-and-forget publish that failed; the broker's reason for
        closing).
    """

    def __init__(self, core: _core.ClientCore, tls: bool = False, ca: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None) -> None:
        self._core = core
        self._loop = asyncio.get_running_loop()
        self._ssl = ssl_context if ssl_context is not None else _tls_context(tls, ca)
        self._protocol: Optional[_Protocol] = None
        self._dial_task: Optional[asyncio.Task] = None
        self._tasks: Set[asyncio.Task] = set()
        self._pumping = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at: Optional[float] = None
        self._closed = self._loop.create_future()
        self.on_error: Callable[[ZaichikError], None] = _log_error

    def __repr__(self) -> str:
        return f"<zaichik aio Client {self._core.server} {self._core.state}>"

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # --- what the core says -----------------------------------------------------

    def _now(self) -> float:
        return self._loop.time()

    def _send(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.write(data)

    def _handle(self, event) -> None:
        kind = type(event)
        if kind is _core.Resolve:
            if not event.waiter.done():
                event.waiter.set_result(event.value)
        elif kind is _core.Reject:
            if not event.waiter.done():
                event.waiter.set_exception(event.error)
        elif kind is _core.Deliver:
            event.handle._deliver(event.message)
        elif kind is _core.Wake:
            event.handle._wake()
        elif kind is _core.AsyncError:
            try:
                self.on_error(event.error)
            except Exception:
                log.exception("on_error raised")
        elif kind is _core.Dial:
            self._dial_task = self._loop.create_task(self._dial(event.server, event.delay))
        elif kind is _core.CloseTransport:
            if self._protocol is not None:
                self._protocol.close(event.abort)
        elif kind is _core.PauseReading:
            if self._protocol is not None:
                self._protocol.pause_reading()
        elif kind is _core.ResumeReading:
            if self._protocol is not None:
                self._protocol.resume_reading()
        elif kind is _core.Closed:
            self._stop()
            if not self._closed.done():
                self._closed.set_result(None)

    def _arm_timer(self) -> None:
        at = self._core.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._core.handle_timer(self._now())
        self._pump()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None
        current = asyncio.current_task(self._loop) if self._loop.is_running() else None
        if self._dial_task is not None and not self._dial_task.done() and self._dial_task is not current:
            self._dial_task.cancel()

    # --- the connection ---------------------------------------------------------

    async def _dial(self, server: str, delay: float) -> None:
        core = self._core
        if delay:
            await asyncio.sleep(delay)
        if core.closed:
            return
        try:
            address = _core.parse_address(server)
            opened = self._open(address)
            if core.connect_timeout:
                transport, protocol = await asyncio.wait_for(opened, core.connect_timeout)
            else:
                transport, protocol = await opened
        except asyncio.CancelledError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            core.connection_failed(ConnectTimeout(f"no connection to {server} within "
                                                  f"{core.connect_timeout:g} s"), self._now())
            self._pump()
            return
        except Exception as e:
            error = ConnectionLostError(f"cannot connect to {server}: {describe_connect_error(e)}")
            error.__cause__ = e
            core.connection_failed(error, self._now())
            self._pump()
            return
        if core.closed:
            transport.abort()

    def _open(self, address: _core.Address):
        kwargs: dict = {}
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
            kwargs["server_hostname"] = address.host if address.kind == "tcp" else "localhost"
            if self._core.connect_timeout:
                kwargs["ssl_handshake_timeout"] = self._core.connect_timeout
        factory = lambda: _Protocol(self)
        if address.kind == "unix":
            return self._loop.create_unix_connection(factory, address.path, **kwargs)
        return self._loop.create_connection(factory, address.host, address.port, **kwargs)

    def _connection_made(self, protocol: "_Protocol") -> None:
        if self._core.closed:
            protocol.close(abort=True)
            return
        self._protocol = protocol
        self._core.connection_made(self._now())
        self._pump()

    def _data_received(self, protocol: "_Protocol", data: bytes) -> None:
        if protocol is self._protocol:
            self._core.receive_data(data, self._now())
            self._pump()

    def _connection_lost(self, protocol: "_Protocol", exc: Optional[BaseException]) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        core = self._core
        reason: BaseException
        if exc is None:
            reason = ConnectionLostError(f"{core.server} closed the connection")
        else:
            reason = ConnectionLostError(f"connection to {core.server} lost: {describe_connect_error(exc)}")
            reason.__cause__ = exc
        core.connection_lost(reason, self._now(), clean=exc is None)
        self._pump()

    # --- the API ------------------------------------------------------------------

    @property
    def closed(self) -> "asyncio.Future[None]":
        """A future done (with None) when the client is closed for good."""
        return self._closed

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def _call(self, start: Callable[[asyncio.Future], None]) -> Any:
        future = self._loop.create_future()
        start(future)   # may raise: nothing was sent, nothing waits
        self._pump()
        return await future

    async def hello(self, client_id: str = "", token: str = "") -> None:
        """Identify this client (must come first; L{connect} does it for you)."""
        return await self._call(lambda f: self._core.hello(f, client_id, token, self._now()))

    async def _simple(self, make: Callable[[int], Any], convert: Callable = _core._none) -> Any:
        return await self._call(lambda f: self._core.request(f, make, self._now(), convert))

    async def create_topic(self, topic: str, retention_ttl: int = 0, compaction_window: int = 0) -> None:
        """Create C{topic} with retention and compaction in milliseconds (idempotent)."""
        return await self._simple(lambda rid: codec.CreateTopic(rid, topic, retention_ttl, compaction_window))

    async def publish(self, topic: str, value: bytes, key: Optional[bytes] = None) -> PublishResult:
        """Publish and wait for the broker's answer."""
        return await self._simple(lambda rid: codec.Publish(rid, topic, value, key), _core._published)

    def publish_nowait(self, topic: str, value: bytes, key: Optional[bytes] = None) -> None:
        """
        Fire and forget: no answer unless it fails (then C{on_error} is
        called).  Raises at once if it cannot be encoded, or the client is
        closed.  C{await client.drain()} now and then bounds what is buffered.
        """
        self._core.send(_core.encode_publish(topic, value, key), self._now())
        self._pump()

    def _send_frames(self, frames: List[bytes]) -> None:
        """Encoded fire-and-forget frames (the blocking client's path)."""
        now = self._now()
        for data in frames:
            self._core.send(data, now)
        self._pump()

    def write_buffer_size(self) -> int:
        protocol = self._protocol
        return 0 if protocol is None or protocol.transport is None else protocol.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait until the connection's write buffer is below its high-water mark."""
        protocol = self._protocol
        if protocol is not None:
            await protocol.drained()

    async def publish_batch(self, topic: str,
                            entries: Iterable[Tuple[Optional[bytes], bytes]]) -> List[PublishResult]:
        """Publish C{(key, value)} pairs in one frame; their results, in order."""
        entries = list(entries)
        return await self._simple(lambda rid: codec.PublishBatch(rid, topic, entries), _core._published_batch)

    async def subscribe(self, topic: str, callback: Optional[Callable[[Message], object]] = None,
                        start: Start = Start.DEFAULT, offset: int = 0,
                        max_inflight: int = 0) -> Subscription:
        """
        Follow C{topic}, or every topic a wildcard pattern matches
        (C{sensors.>}, C{sensors.*.temp}: those that exist and those
        created later; each message names its topic).  Returns a
        L{Subscription} once the broker has accepted; messages then go to
        C{callback}, or are read by iterating the subscription.  A coroutine
        function as C{callback} is awaited for each message in turn.
        """
        return await self._subscribe(_core.SubscriptionState(topic, start, offset, max_inflight, False),
                                     callback)

    async def subscribe_group(self, topic: str, group: str, callback: Optional[Callable[[Message], object]] = None,
                              start: Start = Start.DEFAULT, offset: int = 0, max_inflight: int = 0,
                              ack_timeout: int = 0) -> Subscription:
        """
        Join consumer group C{group} of C{topic} (which must retain
        messages): each message goes to one member of the group at a time.
        Returns a L{Subscription}, as L{subscribe}.  Acknowledge each
        message with L{ack} (or L{Subscription.ack}), or all up to an
        offset with L{commit}; one not acknowledged within C{ack_timeout}
        milliseconds (0: the broker's 30 s), or outstanding when this
        member leaves or its connection ends, is sent again, to any member.
        C{start}/C{offset} set a new group's position (DEFAULT: the oldest
        retained message); C{max_inflight} bounds what this member has
        unacknowledged (0: 1,000).
        """
        return await self._subscribe(_core.SubscriptionState(topic, start, offset, max_inflight, False,
                                                             group=group, ack_timeout=ack_timeout), callback)

    async def _subscribe(self, state: _core.SubscriptionState,
                         callback: Optional[Callable[[Message], object]]) -> Subscription:
        is_async = callback is not None and inspect.iscoroutinefunction(callback)
        state.has_callback = callback is not None and not is_async
        subscription = Subscription(self, state, None if is_async else callback)
        await self._call(lambda future: self._core.subscribe(future, state, self._now()))
        if is_async:
            assert callback is not None
            task = self._loop.create_task(_consume(subscription, callback))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return subscription

    async def unsubscribe(self, topic: str) -> None:
        """End the subscription to C{topic}, or to a pattern, or leave the group of C{topic}."""
        return await self._call(lambda f: self._core.unsubscribe(f, topic, self._now()))

    async def commit(self, topic: str, offset: int) -> None:
        """
        Commit C{topic} up to and including C{offset} (the message's own
        topic, for a pattern's; for a group member, acknowledge everything
        sent to it up to C{offset}).
        """
        return await self._call(lambda f: self._core.commit(f, topic, offset, self._now()))

    async def ack(self, topic: str, offset: int) -> None:
        """Acknowledge the message at C{offset} of C{topic}, sent to this member of a group."""
        return await self._call(lambda f: self._core.ack(f, topic, offset, self._now()))

    async def ping(self) -> None:
        return await self._simple(codec.Ping)

    async def list_topics(self) -> List[TopicInfo]:
        return await self._simple(codec.ListTopics, _core._topics)

    async def close(self) -> None:
        """Ask the broker to close; returns once the connection is closed."""
        await self._call(lambda f: self._core.close(f, self._now()))

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
                log.exception("subscription callback for %s raised", subscription.topic)
    except Exception:
        pass  # the subscription ended with the connection: nothing more to hand out


async def _connect(server: Union[str, Sequence[str]], client_id: str, token: str, keepalive: float,
                   tls: bool, ca: Optional[str], ssl_context: Optional[ssl.SSLContext], reconnect: bool,
                   connect_timeout: Optional[float], request_timeout: Optional[float],
                   max_queued: int) -> Client:
    core = _core.ClientCore(server, client_id=client_id, token=token, keepalive=keepalive,
                            connect_timeout=connect_timeout, request_timeout=request_timeout,
                            reconnect=reconnect, max_queued=max_queued)
    client = Client(core, tls=tls, ca=ca, ssl_context=ssl_context)
    future = client._loop.create_future()
    core.start(future)
    client._pump()
    try:
        await future
    except BaseException:
        client.abort()
        raise
    return client


class _Connecting:
    """What L{connect} returns: await it for a L{Client}, or use it as
    C{async with connect(...) as client:} (closed at the end)."""

    def __init__(self, coro) -> None:
        self._coro = coro
        self._client: Optional[Client] = None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._coro
        return self._client

    async def __aexit__(self, *exc_info) -> None:
        if self._client is not None:
            await self._client.close()


def connect(server: Union[str, Sequence[str]] = "localhost:8889", client_id: str = "", token: str = "",
            keepalive: float = 60.0, tls: bool = False, ca: Optional[str] = None, *,
            ssl_context: Optional[ssl.SSLContext] = None, reconnect: bool = False,
            connect_timeout: Optional[float] = 10.0, request_timeout: Optional[float] = 30.0,
            max_queued: int = 10_000) -> _Connecting:
    """
    Connect to a broker, and say HELLO when a C{client_id} or C{token} is
    given.  C{await connect(...)} or C{async with connect(...) as client}.

    @param server: C{host:port}, a port, C{tcp:host=H:port=P},
        C{unix:path=P}; a list of them, or C{"a:8889,b:8889"}: tried in turn
        until one answers (and, with C{reconnect}, after a loss).
    @param tls: reach the server over TLS, checking its certificate against
        the system's trust roots, or C{ca} (a PEM file; implies C{tls}), or
        use C{ssl_context}.
    @param keepalive: seconds without sending after which a PING keeps the
        connection inside the broker's idle timeout (and finds a dead one);
        0 for none.
    @param reconnect: after a lost connection, connect again (with backoff),
        HELLO, and resubscribe from the committed position.
    @param connect_timeout: seconds for the connection (TCP, TLS, HELLO).
    @param request_timeout: seconds a request waits for its answer.
    @param max_queued: messages received and not yet read, over all
        subscriptions, beyond which the client stops reading the socket.
    """
    return _Connecting(_connect(server, client_id, token, keepalive, tls, ca, ssl_context, reconnect,
                                connect_timeout, request_timeout, max_queued))
