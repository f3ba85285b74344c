"""
The blocking client for zaichik (also C{zaichik.sync}): for scripts, Django
views, Celery tasks and anything else without an event loop::

    from zaichik.sync import Start, connect

    with connect("localhost:8889", client_id="worker-1") as client:
        client.create_topic("orders", retention_ttl=60_000)
        print(client.publish("orders", b'{"id": 1}').offset)
        client.publish_nowait("orders", b'{"id": 2}')       # fire and forget
        with client.subscribe("orders", start=Start.EARLIEST) as subscription:
            for message in subscription:
                print(message.offset, message.value)
                subscription.commit(message.offset)
                if message.offset == 1:
                    break

Each client runs the asyncio client (L{zaichik.client.aio}) on an event loop
in a thread of its own; its methods hand calls to that thread and wait for
the answer.  The methods and their behaviour are those of the Twisted and
asyncio clients.  Every method is thread-safe: many threads may publish
through one client.  L{Client.publish_nowait} blocks while more than a
bounded amount is waiting to be written (backpressure), so a loop that
publishes as fast as it reads a file does not grow without bound.

Callbacks (C{subscribe(topic, callback)}) run in order on a thread of the
subscription's own, and may call the client.  C{on_error} runs on the
client's I/O thread and must not wait for the client.  A client belongs to
the process that made it: after C{fork()} (Celery's prefork pool, uWSGI,
gunicorn), make one per process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from zaichik.client import aio as _aio
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
    "connect",
]

log = logging.getLogger("zaichik.client")

# Bytes of fire-and-forget publishes waiting for the I/O thread beyond which
# publish_nowait blocks (the transport's own buffer is bounded by asyncio's
# high-water mark on top of this).
MAX_PENDING_BYTES = 256 * 1024


class Subscription:
    """
    Messages of one topic, of the topics a pattern matches, or a consumer
    group member's share of a topic: iterate (C{for message in
    subscription}), or L{get} one at a time.  A context manager that
    unsubscribes (or leaves the group) at its end.
    """

    def __init__(self, client: "Client", inner: _aio.Subscription) -> None:
        self.client = client
        self.topic = inner.topic
        self._inner = inner
        self._cond = threading.Condition()
        # (generation, message): a group member's messages of an earlier
        # connection are dropped (the broker gave them back to the group).
        self._buffer: Deque[Tuple[int, Message]] = deque()
        self._ended = False
        self._error: Optional[BaseException] = None
        self._asked = False
        self._thread: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        group = f" group={self.group}" if self.group is not None else ""
        return f"<Subscription {self.topic}{group} active={self.active}>"

    @property
    def active(self) -> bool:
        return self._inner.active

    @property
    def group(self) -> Optional[str]:
        """The consumer group this subscription is a member of (L{Client.subscribe_group}), or None."""
        return self._inner.group

    @property
    def is_pattern(self) -> bool:
        """Is C{topic} a wildcard pattern (C{sensors.>}, C{sensors.*.temp})?"""
        return self._inner.is_pattern

    @property
    def committed(self) -> Optional[int]:
        """The highest offset whose COMMIT the broker accepted (None for a pattern: see L{committed_offsets})."""
        return self._inner.committed

    @property
    def committed_offsets(self) -> Dict[str, int]:
        """The highest offset whose COMMIT the broker accepted, per topic."""
        return self._inner.committed_offsets

    def _fetch(self) -> None:
        """(I/O thread) Move what is queued to this thread-safe buffer, or wait for it."""
        state = self._inner._state
        core = self.client._inner._core
        messages = core.take_all(state)
        if not messages and state.active:
            self._inner._listeners.append(self._fetch)
            return
        generation = state.generation
        with self._cond:
            self._buffer.extend((generation, m) for m in messages)
            if not state.active and not state.queue:
                self._ended = True
                self._error = state.end_error
            self._asked = False
            self._cond.notify_all()
        self.client._inner._pump()

    def get(self, timeout: Optional[float] = None) -> Optional[Message]:
        """
        The next message, waiting for it; None once the subscription has
        ended and every received message has been read (or raises what
        ended it: a lost connection).

        @raise TimeoutError: nothing came within C{timeout} seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self._inner._state
        with self._cond:
            while True:
                if self._buffer:
                    generation, message = self._buffer.popleft()
                    if generation != state.generation:
                        continue
                    return message
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    return None
                if self.client._stopped:
                    # The I/O thread is gone (closed): what is left is read here.
                    generation = state.generation
                    self._buffer.extend((generation, m) for m in self.client._inner._core.take_all(state))
                    if not self._buffer:
                        self._ended = True
                        self._error = state.end_error if not state.active else self.client._closed_error()
                    continue
                if not self._asked:
                    self._asked = True
                    self.client._call_soon(self._fetch)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message on {self.topic} within {timeout:g} s")
                self._cond.wait(remaining)

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.get()
            if message is None:
                return
            yield message

    def commit(self, offset: int, topic: Optional[str] = None) -> None:
        """
        Commit everything of this topic up to and including C{offset} (of a
        pattern's: of C{topic}, the message's own; of a group member's:
        acknowledge what was sent to it up to C{offset}).
        """
        self.client.commit(_core.commit_topic(self._inner._state, topic), offset)

    def ack(self, offset: int) -> None:
        """Acknowledge the message at C{offset} (a group member's)."""
        self.client.ack(_core.ack_topic(self._inner._state), offset)

    def unsubscribe(self) -> None:
        self.client.unsubscribe(self.topic)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active and not self.client.is_closed:
            try:
                self.unsubscribe()
            except (ZaichikError, ConnectionError):
                pass

    def _dispatch(self, callback: Callable[[Message], object]) -> None:
        try:
            for message in self:
                try:
                    callback(message)
                except Exception:
                    log.exception("subscription callback for %s raised", self.topic)
        except Exception:
            pass  # ended with the connection: nothing more to hand out


class Client:
    """
    A blocking client of a zaichik broker.  Make one with L{connect}; use it
    as a context manager, or call L{close}.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 inner: _aio.Client) -> None:
        self._loop = loop
        self._thread = thread
        self._inner = inner
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._pending: List[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False
        self._blocked = False
        self._send_error: Optional[BaseException] = None
        self._stopped = False
        inner.closed.add_done_callback(lambda _: self._wake_writers())

    def __repr__(self) -> str:
        return f"<zaichik sync Client {self._inner.server} {self._inner._core.state}>"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- handing calls to the I/O thread --------------------------------------------

    def _check(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a zaichik.sync client cannot be used after fork(): make one per process")
        if threading.current_thread() is self._thread:
            raise RuntimeError("a zaichik.sync client cannot wait for itself on its I/O thread "
                               "(in on_error): hand the work to another thread")

    def _closed_error(self) -> BaseException:
        reason = self._inner.close_reason
        return reason if reason is not None else ClientClosedError("the client is closed")

    def _call_soon(self, function: Callable, *args) -> None:
        if self._stopped:
            raise self._closed_error()
        self._loop.call_soon_threadsafe(function, *args)

    def _run(self, coroutine) -> Any:
        self._check()
        if self._stopped:
            coroutine.close()
            raise self._closed_error()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # --- the API ------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self._inner.client_id

    @property
    def server(self) -> Optional[str]:
        return self._inner.server

    @property
    def close_reason(self) -> Optional[BaseException]:
        return self._inner.close_reason

    @property
    def is_closed(self) -> bool:
        return self._stopped or self._inner.is_closed

    @property
    def on_error(self) -> Callable[[ZaichikError], None]:
        """Called (on the I/O thread) with errors that answer no awaited request."""
        return self._inner.on_error

    @on_error.setter
    def on_error(self, handler: Callable[[ZaichikError], None]) -> None:
        self._inner.on_error = handler

    def wait_closed(self, timeout: Optional[float] = None) -> bool:
        """Wait until the client is closed for good; False if C{timeout} passed first."""
        done = threading.Event()
        self._loop.call_soon_threadsafe(
            lambda: self._inner.closed.add_done_callback(lambda _: done.set()))
        return done.wait(timeout)

    def hello(self, client_id: str = "", token: str = "") -> None:
        return self._run(self._inner.hello(client_id, token))

    def create_topic(self, topic: str, retention_ttl: int = 0, compaction_window: int = 0) -> None:
        return self._run(self._inner.create_topic(topic, retention_ttl, compaction_window))

    def publish(self, topic: str, value: bytes, key: Optional[bytes] = None) -> PublishResult:
        return self._run(self._inner.publish(topic, value, key))

    def publish_nowait(self, topic: str, value: bytes, key: Optional[bytes] = None) -> None:
        """
        Fire and forget: no answer unless it fails (then C{on_error} is
        called).  Blocks while more than L{MAX_PENDING_BYTES} wait to be
        written.  Raises at once if it cannot be encoded, or the client is
        closed.
        """
        self._check()
        data = _core.encode_publish(topic, value, key)
        with self._cond:
            limit = self._inner._core.request_timeout
            while (self._blocked or self._pending_bytes >= MAX_PENDING_BYTES) and not self.is_closed:
                # Progress wakes this; none for request_timeout is a broker
                # that has stopped reading.
                if not self._cond.wait(limit):
                    raise RequestTimeout(f"the broker has read nothing for {limit:g} s")
            if self._send_error is not None:
                error, self._send_error = self._send_error, None
                raise error
            if self.is_closed:
                raise self._closed_error()
            self._pending.append(data)
            self._pending_bytes += len(data)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        """(I/O thread) Hand the waiting fire-and-forget frames to the connection."""
        with self._cond:
            frames, self._pending, self._pending_bytes = self._pending, [], 0
            self._flush_scheduled = False
        try:
            self._inner._send_frames(frames)
        except ConnectionLostError as e:
            with self._cond:
                self._send_error = e
        if self._inner.write_buffer_size() > MAX_PENDING_BYTES:
            with self._cond:
                self._blocked = True
            self._loop.create_task(self._unblock())
        else:
            self._wake_writers()

    async def _unblock(self) -> None:
        await self._inner.drain()
        with self._cond:
            self._blocked = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def publish_batch(self, topic: str, entries: Iterable[Tuple[Optional[bytes], bytes]]) -> List[PublishResult]:
        return self._run(self._inner.publish_batch(topic, list(entries)))

    def subscribe(self, topic: str, callback: Optional[Callable[[Message], object]] = None,
                  start: Start = Start.DEFAULT, offset: int = 0, max_inflight: int = 0) -> Subscription:
        """
        Follow C{topic}, or every topic a wildcard pattern matches
        (C{sensors.>}, C{sensors.*.temp}: those that exist and those
        created later; each message names its topic).  Returns a
        L{Subscription} once the broker has accepted; messages then go to
        C{callback} (in order, on a thread of the subscription's own), or
        are read by iterating the subscription.
        """
        inner = self._run(self._inner.subscribe(topic, start=start, offset=offset,
                                                max_inflight=max_inflight))
        return self._subscription(inner, callback)

    def subscribe_group(self, topic: str, group: str, callback: Optional[Callable[[Message], object]] = None,
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
        inner = self._run(self._inner.subscribe_group(topic, group, start=start, offset=offset,
                                                      max_inflight=max_inflight, ack_timeout=ack_timeout))
        return self._subscription(inner, callback)

    def _subscription(self, inner: _aio.Subscription,
                      callback: Optional[Callable[[Message], object]]) -> Subscription:
        topic = inner.topic
        subscription = Subscription(self, inner)
        if callback is not None:
            thread = threading.Thread(target=subscription._dispatch, args=(callback,),
                                      name=f"zaichik-callback-{topic}", daemon=True)
            subscription._thread = thread
            thread.start()
        return subscription

    def unsubscribe(self, topic: str) -> None:
        """End the subscription to C{topic}, or to a pattern, or leave the group of C{topic}."""
        return self._run(self._inner.unsubscribe(topic))

    def commit(self, topic: str, offset: int) -> None:
        """
        Commit C{topic} up to and including C{offset} (the message's own
        topic, for a pattern's; for a group member, acknowledge everything
        sent to it up to C{offset}).
        """
        return self._run(self._inner.commit(topic, offset))

    def ack(self, topic: str, offset: int) -> None:
        """Acknowledge the message at C{offset} of C{topic}, sent to this member of a group."""
        return self._run(self._inner.ack(topic, offset))

    def ping(self) -> None:
        """Every request and fire-and-forget publish before it has been handled when it returns."""
        return self._run(self._inner.ping())

    def flush(self, timeout: Optional[float] = None) -> bool:
        """
        Wait until everything published before (fire-and-forget included)
        has been handled by the broker (a PING), at most C{timeout} seconds;
        False if that did not happen (timed out, or the connection failed).
        """
        self._check()
        if self.is_closed:
            return False
        future = asyncio.run_coroutine_threadsafe(self._inner.ping(), self._loop)
        try:
            future.result(timeout)
        except Exception:
            future.cancel()
            return False
        return True

    def list_topics(self) -> List[TopicInfo]:
        return self._run(self._inner.list_topics())

    def close(self) -> None:
        """Close (CLOSE, then the end of the connection) and stop the I/O thread."""
        if self._stopped:
            return
        self._check()
        try:
            asyncio.run_coroutine_threadsafe(self._inner.close(), self._loop).result()
        finally:
            self._stop_thread()

    def abort(self) -> None:
        """Drop the connection at once and stop the I/O thread."""
        if self._stopped:
            return
        self._check()
        asyncio.run_coroutine_threadsafe(_abort(self._inner), self._loop).result()
        self._stop_thread()

    def _stop_thread(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(5)


async def _abort(inner: _aio.Client) -> None:
    inner.abort()
    await inner.wait_closed()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def connect(server: Union[str, Sequence[str]] = "localhost:8889", client_id: str = "", token: str = "",
            keepalive: float = 60.0, tls: bool = False, ca: Optional[str] = None, *,
            ssl_context=None, reconnect: bool = False, connect_timeout: Optional[float] = 10.0,
            request_timeout: Optional[float] = 30.0, max_queued: int = 10_000,
            loop_factory: Optional[Callable[[], asyncio.AbstractEventLoop]] = None) -> Client:
    """
    Connect to a broker (blocking), and say HELLO when a C{client_id} or
    C{token} is given.  The parameters are those of L{zaichik.aio.connect};
    C{loop_factory} makes the I/O thread's event loop (e.g.
    C{uvloop.new_event_loop}).
    """
    loop = (loop_factory or asyncio.new_event_loop)()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="zaichik-io", daemon=True)
    thread.start()
    future = asyncio.run_coroutine_threadsafe(
        _aio._connect(server, client_id, token, keepalive, tls, ca, ssl_context, reconnect,
                      connect_timeout, request_timeout, max_queued), loop)
    try:
        inner = future.result()
    except BaseException:
        future.cancel()
        loop.call_soon_threadsafe(loop.stop)
        raise
    return Client(loop, thread, inner)
