"""
The rules of being a zaichik client, written once and without I/O.

L{ClientCore} is a state machine in the manner of h11 and wsproto: it never
touches a socket, a clock or a thread.  An adapter (L{zaichik.client.twisted},
L{zaichik.client.aio}; L{zaichik.client.sync} runs the asyncio one in a
thread) moves bytes and time into it and acts on what comes out:

    core.receive_data(data, now)       bytes read from the connection
    core.connection_made(now)          the transport is up (TCP, TLS, unix)
    core.connection_failed(exc, now)   a dial failed
    core.connection_lost(exc, now)     the transport is gone
    core.handle_timer(now)             the time core.next_deadline() asked for came

    core.data_to_send() -> bytes       to write to the transport, in order
    core.events() -> [event]           what the adapter must do (below)
    core.next_deadline() -> float      when to call handle_timer (or None)

Requests (L{ClientCore.request}, L{ClientCore.subscribe}, ...) take an
opaque C{waiter} (a Deferred, a Future) that the core hands back in a
L{Resolve} or L{Reject} event; the core never calls it.

What lives here: request ids and matching replies to requests, timeouts of
requests, of connecting and of keepalive PINGs; subscriptions to a topic,
to a wildcard pattern or to a consumer group (their messages queued for
readers, or handed to a callback, their committed and received offsets);
flow control (reading pauses while readers fall behind, unless a reply is
awaited); the list of servers, failover and reconnecting with backoff,
resubscribing from the committed position and rejoining groups; and which
error ends a connection: an ERROR the broker sent before closing is
reported as that error, not as a lost connection.

A MESSAGE frame names its topic, not the subscription it is for.  A message
goes to the subscription to its topic or, failing that, to the pattern
that matches it; where several subscriptions of the connection follow one
topic (a topic and patterns, or patterns that overlap), the broker sends a
copy for each, and L{ClientCore._attribute} hands each copy to one of them.
"""

from __future__ import annotations

import heapq
import random
import re
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

from zaichik import codec
from zaichik.codec import ErrorCode, Message, Start, TopicInfo
from zaichik.errors import ZaichikError

__all__ = [
    "ClientClosedError",
    "ClientCore",
    "ConnectTimeout",
    "ConnectionLostError",
    "Message",
    "PublishResult",
    "RequestTimeout",
    "Start",
    "TopicInfo",
    "ZaichikError",
    "parse_address",
    "parse_servers",
]


# --- what a caller can see -----------------------------------------------------


@dataclass(frozen=True)
class PublishResult:
    """The broker's answer to a publish: the message's offset, and whether
    compaction dropped it as a duplicate (then C{offset} is the original's)."""

    offset: int
    duplicate: bool


class ConnectionLostError(ConnectionError):
    """
    The connection to the broker is gone (or the client was closed), and
    with it the answer to a request.  A request sent before the loss may or
    may not have been carried out.
    """


class ClientClosedError(ConnectionLostError):
    """A request made after C{close()} (or after the connection ended for good)."""


class RequestTimeout(TimeoutError):
    """The broker did not answer a request within C{request_timeout}."""


class ConnectTimeout(TimeoutError):
    """No connection (TCP, TLS and HELLO) within C{connect_timeout}."""


# Codes after which the broker closes the connection (see docs/protocol.rst,
# "Error codes"): an ERROR with one of them followed by the end of the
# connection is the reason for the end.
CLOSING_CODES = frozenset({ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNSUPPORTED_VERSION,
                           ErrorCode.NOT_AUTHORIZED, ErrorCode.LIMIT})
# Codes that make reconnecting pointless: the next HELLO gets the same.
FATAL_CODES = frozenset({ErrorCode.UNSUPPORTED_VERSION, ErrorCode.NOT_AUTHORIZED})

MAX_RID = 0xFFFFFFFF


# --- server addresses ------------------------------------------------------------

_HOST_PORT = re.compile(r"\A(?:\[[0-9A-Fa-f:.]+\]|[^\s:=,\[\]]+):\d+\Z|\A\d+\Z")


def parse_servers(servers: Union[str, Sequence[str]]) -> List[str]:
    """
    A list of server descriptions from a list, or from one string of
    comma-separated C{host:port}s (C{"a:8889,b:8889"}).  An endpoint
    description (C{tcp:host=...}, C{unix:path=...}) is one server.
    """
    if isinstance(servers, str):
        parts = [p.strip() for p in servers.split(",")]
        if len(parts) > 1 and all(_HOST_PORT.match(p) for p in parts):
            result = parts
        else:
            result = [servers.strip()]
    else:
        result = [str(s).strip() for s in servers]
    if not result or not all(result):
        raise ValueError(f"no server in {servers!r}")
    return result


@dataclass(frozen=True)
class Address:
    """Where to connect: C{kind} is C{"tcp"} (C{host}, C{port}) or C{"unix"} (C{path})."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> Address:
    """
    An L{Address} from C{host:port}, C{[v6]:port}, a bare port (localhost),
    C{tcp:host=H:port=P} or C{tcp:H:P}, or C{unix:path=P} or C{unix:P}.
    (The Twisted client takes any Twisted client endpoint description.)

    @raise ValueError: for anything else.
    """
    text = text.strip()
    if text.isdigit():
        return Address("tcp", "localhost", int(text))
    if text.startswith("unix:"):
        rest = text[5:]
        fields = _endpoint_fields(rest)
        path = fields.get("path", fields.get(0))
        if not path:
            raise ValueError(f"no path in {text!r}")
        return Address("unix", path=path)
    if text.startswith("tcp:"):
        fields = _endpoint_fields(text[4:])
        host, port = fields.get("host", fields.get(0)), fields.get("port", fields.get(1))
        if not host or not port or not port.isdigit():
            raise ValueError(f"not a tcp endpoint with a host and a port: {text!r}")
        return Address("tcp", host, int(port))
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host:
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port}")
        return Address("tcp", host, int(port))
    raise ValueError(f"not host:port, a port, tcp:host=H:port=P or unix:path=P: {text!r}")


def _endpoint_fields(rest: str) -> Dict[Any, str]:
    """C{a=1:b=2:c} as C{{"a": "1", "b": "2", 0: "c"}} (positional by index)."""
    fields: Dict[Any, str] = {}
    position = 0
    for part in rest.split(":") if rest else []:
        name, eq, value = part.partition("=")
        if eq:
            fields[name] = value
        else:
            fields[position] = part
            position += 1
    return fields


# --- events: what the adapter must do --------------------------------------------


@dataclass
class Resolve:
    """Fire C{waiter} with C{value}."""

    waiter: Any
    value: Any


@dataclass
class Reject:
    """Fail C{waiter} with C{error}."""

    waiter: Any
    error: BaseException


@dataclass
class Deliver:
    """Call the callback of the subscription C{handle} with C{message}."""

    handle: Any
    message: Message


@dataclass
class Wake:
    """The iterated subscription C{handle} has messages queued, or has
    ended: wake its readers (L{ClientCore.take} and L{SubscriptionState.end_error})."""

    handle: Any


@dataclass
class AsyncError:
    """An ERROR that answers no awaited request: for C{on_error}."""

    error: ZaichikError


@dataclass
class Dial:
    """After C{delay} seconds, connect to C{server}, then call
    L{ClientCore.connection_made} or L{ClientCore.connection_failed}."""

    server: str
    delay: float


@dataclass
class CloseTransport:
    """Close the transport (abort it: do not wait for buffered output when
    C{abort}); the core expects L{ClientCore.connection_lost} after."""

    abort: bool = False


@dataclass
class PauseReading:
    """Stop reading from the transport (readers fell behind)."""


@dataclass
class ResumeReading:
    """Read from the transport again."""


@dataclass
class Ready:
    """Connected, HELLO (if any) accepted, subscriptions renewed."""

    server: str


@dataclass
class Closed:
    """The client is closed for good; C{error} is why (None: asked to)."""

    error: Optional[BaseException]


Event = Union[Resolve, Reject, Deliver, Wake, AsyncError, Dial, CloseTransport, PauseReading,
              ResumeReading, Ready, Closed]


# --- subscriptions ---------------------------------------------------------------

PENDING, ACTIVE, ENDED = "pending", "active", "ended"

# What a subscription follows.
TOPIC, PATTERN, GROUP = "topic", "pattern", "group"


def pattern_matches(pattern: str, name: str) -> bool:
    """
    Does the wildcard C{pattern} match the topic C{name}?  Both split on
    C{.} into segments (empty ones included); C{*} matches any one segment,
    a last C{>} one or more.  (As the broker's index decides; see
    docs/groups-and-patterns.rst.)
    """
    want = pattern.split(".")
    got = name.split(".")
    if want[-1] == ">":
        if len(got) < len(want):
            return False
        want = want[:-1]
        got = got[:len(want)]
    elif len(got) != len(want):
        return False
    return all(w == "*" or w == g for w, g in zip(want, got))


class SubscriptionInfo:
    """
    What every adapter's Subscription tells of itself, read from its
    L{SubscriptionState} (C{self._state}).
    """

    _state: "SubscriptionState"
    topic: str

    def __repr__(self) -> str:
        group = f" group={self.group}" if self.group is not None else ""
        return f"<Subscription {self.topic}{group} active={self.active}>"

    @property
    def active(self) -> bool:
        """Following the topic (also while reconnecting)."""
        return self._state.active

    @property
    def group(self) -> Optional[str]:
        """The consumer group this subscription is a member of (L{Client.subscribe_group}), or None."""
        return self._state.group

    @property
    def is_pattern(self) -> bool:
        """Is C{topic} a wildcard pattern (C{sensors.>}, C{sensors.*.temp})?"""
        return self._state.kind == PATTERN

    @property
    def committed(self) -> Optional[int]:
        """The highest offset whose COMMIT the broker accepted (None for a pattern: see L{committed_offsets})."""
        return self._state.committed

    @property
    def committed_offsets(self) -> Dict[str, int]:
        """The highest offset whose COMMIT the broker accepted, per topic."""
        state = self._state
        if state.kind == PATTERN:
            return dict(state.committed_by_topic)
        return {} if state.committed is None else {state.topic: state.committed}



class SubscriptionState:
    """
    One subscription as the core sees it.  C{handle} is the adapter's
    Subscription object, returned to the caller and named in events.

    C{topic} is a topic, or a wildcard pattern (L{codec.is_pattern}: then
    C{kind} is L{PATTERN}, and offsets are kept per topic followed); with a
    C{group}, the subscription is a membership of that consumer group of
    the topic (C{kind} L{GROUP}): messages are not deduplicated (a message
    not acknowledged in time comes again), and what is queued and unread
    when the connection ends is dropped (the broker gives it back to the
    group).
    """

    def __init__(self, topic: str, start: Start, offset: int, max_inflight: int,
                 has_callback: bool, handle: Any = None, group: Optional[str] = None,
                 ack_timeout: int = 0) -> None:
        self.topic = topic
        self.start = Start(start)
        self.offset = offset
        self.max_inflight = max_inflight
        self.has_callback = has_callback
        self.handle = handle
        self.group = group
        self.ack_timeout = ack_timeout
        if group is not None:
            self.kind = GROUP
        elif codec.is_pattern(topic):
            self.kind = PATTERN
        else:
            self.kind = TOPIC
        self.state = PENDING
        self.queue: Deque[Message] = deque()
        # The first and last offsets received, and the highest commit the
        # broker accepted: where a renewed subscription resumes.  (Of a
        # pattern: per topic, in the dicts.)
        self.first_received: Optional[int] = None
        self.last_received: Optional[int] = None
        self.committed: Optional[int] = None
        self.last_by_topic: Dict[str, int] = {}
        self.committed_by_topic: Dict[str, int] = {}
        self.unsubscribing = False
        self.confirmed = False   # the broker accepted it once (so it is renewed after a reconnect)
        self.end_error: Optional[BaseException] = None
        self.seq = 0             # order of subscribing (the core numbers them)
        # Bumped when queued messages are dropped (a group's, at the end of a
        # connection): an adapter that buffers messages itself drops those
        # of an earlier generation.
        self.generation = 0

    @property
    def active(self) -> bool:
        return self.state != ENDED

    def matches(self, topic: str) -> bool:
        """Does this subscription follow C{topic}?"""
        if self.kind == PATTERN:
            return pattern_matches(self.topic, topic)
        return topic == self.topic

    def last(self, topic: str) -> Optional[int]:
        """The last offset of C{topic} handed to this subscription (None for a group's)."""
        if self.kind == PATTERN:
            return self.last_by_topic.get(topic)
        if self.kind == GROUP:
            return None
        return self.last_received

    def accepts(self, topic: str, offset: int) -> bool:
        """Is the message C{offset} of C{topic} new to this subscription?  (A
        group's messages always are: one may come again after its ack_timeout.)"""
        last = self.last(topic)
        return last is None or offset > last

    def received(self, topic: str, offset: int) -> None:
        if self.kind == PATTERN:
            self.last_by_topic[topic] = offset
            return
        if self.first_received is None:
            self.first_received = offset
        if self.last_received is None or offset > self.last_received:
            self.last_received = offset

    def commit_accepted(self, topic: str, offset: int) -> None:
        if self.kind == PATTERN:
            if offset > self.committed_by_topic.get(topic, -1):
                self.committed_by_topic[topic] = offset
        elif self.committed is None or offset > self.committed:
            self.committed = offset

    def __repr__(self) -> str:
        group = f" group {self.group}" if self.group is not None else ""
        return f"<SubscriptionState {self.topic}{group} {self.state}>"


def commit_topic(sub: SubscriptionState, topic: Optional[str]) -> str:
    """
    The topic a subscription's C{commit(offset, topic)} names: the
    subscription's own, or for a pattern's, C{topic} (a message's).

    @raise ValueError: a pattern's commit without a topic it matches, or
        another subscription's with a topic not its own.
    """
    if sub.kind == PATTERN:
        if topic is None:
            raise ValueError(f"a commit of {sub.topic} names the message's topic: commit(offset, message.topic)")
        if not pattern_matches(sub.topic, topic):
            raise ValueError(f"{topic} is not a topic of {sub.topic}")
        return topic
    if topic is not None and topic != sub.topic:
        raise ValueError(f"{topic} is not the topic of this subscription ({sub.topic})")
    return sub.topic


def ack_topic(sub: SubscriptionState) -> str:
    """The topic of a group member's C{ack(offset)}; ValueError for any other subscription."""
    if sub.kind != GROUP:
        raise ValueError(f"ack is for the messages of a group member (subscribe_group), "
                         f"not of a subscription to {sub.topic}: commit them")
    return sub.topic


# --- requests --------------------------------------------------------------------


class _Pending:
    """A request sent (or queued) and not yet answered."""

    __slots__ = ("rid", "waiter", "on_reply", "on_error", "deadline", "abandoned", "internal",
                 "timeout_error")

    def __init__(self, rid: int, waiter: Any, on_reply: Callable, on_error: Optional[Callable],
                 deadline: Optional[float], internal: bool, timeout_error: Callable) -> None:
        self.rid = rid
        self.waiter = waiter
        self.on_reply = on_reply
        self.on_error = on_error
        self.deadline = deadline
        self.abandoned = False
        self.internal = internal
        self.timeout_error = timeout_error


def _none(reply) -> None:
    if type(reply) is not codec.Ok:
        raise _unexpected(reply)
    return None


def _published(reply) -> PublishResult:
    if type(reply) is not codec.Published:
        raise _unexpected(reply)
    return PublishResult(reply.offset, reply.duplicate)


def _published_batch(reply) -> List[PublishResult]:
    if type(reply) is not codec.PublishedBatch:
        raise _unexpected(reply)
    return [PublishResult(o, d) for o, d in reply.results]


def _topics(reply) -> List[TopicInfo]:
    if type(reply) is not codec.Topics:
        raise _unexpected(reply)
    return reply.topics


def _unexpected(reply) -> ZaichikError:
    return ZaichikError(ErrorCode.INTERNAL, f"unexpected reply from the broker: {type(reply).__name__}")


def encode(request) -> bytes:
    """
    A request as a whole frame.  A request that cannot be encoded (a string
    or key longer than 65535 bytes, a number out of range, text that is not
    UTF-8) raises ValueError or TypeError here, before anything waits for it.
    """
    try:
        return codec.frame(request.encode())
    except struct.error as e:
        raise ValueError(f"cannot encode {type(request).__name__}: {e}") from None
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot encode {type(request).__name__}: not UTF-8 ({e.reason})") from None


def encode_publish(topic: str, value: bytes, key: Optional[bytes] = None) -> bytes:
    """A fire-and-forget PUBLISH frame (rid 0)."""
    return encode(codec.Publish(0, topic, bytes(value), None if key is None else bytes(key)))


class Backoff:
    """
    Delays between rounds of reconnect attempts: C{initial}, doubling up to
    C{maximum}, each drawn between half and all of that (jitter, so that
    many clients of one broker do not come back at the same instant).
    """

    def __init__(self, initial: float = 0.1, maximum: float = 5.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rand = rand
        self.failures = 0

    def next(self) -> float:
        delay = min(self.maximum, self.initial * (2 ** self.failures))
        self.failures += 1
        return delay * (0.5 + 0.5 * self.rand())

    def reset(self) -> None:
        self.failures = 0


# --- the state machine -----------------------------------------------------------

# Client states.
DIALING = "dialing"          # a Dial is out (or waiting for its delay)
HANDSHAKING = "handshaking"  # transport up, HELLO sent, not answered
READY = "ready"
CLOSING = "closing"          # CLOSE sent (or the transport is being closed)
CLOSED = "closed"


class ClientAdapter:
    """
    What the adapters' Clients share: the core's state, and the loop that
    moves the core's bytes out (C{_send}) and hands its events on
    (C{_handle}), then sets the next timer (C{_arm_timer}).
    """

    _core: "ClientCore"
    _pumping = False

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _handle(self, event: Any) -> None:
        raise NotImplementedError

    def _arm_timer(self) -> None:
        raise NotImplementedError

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        core = self._core
        try:
            while True:
                data = core.data_to_send()
                if data:
                    self._send(data)
                event = core.pop_event()
                if event is None:
                    break
                self._handle(event)
        finally:
            self._pumping = False
        self._arm_timer()


    @property
    def client_id(self) -> str:
        """The durable client id said in HELLO ("" for none)."""
        return self._core.client_id

    @property
    def server(self) -> Optional[str]:
        """The server connected to (or being dialed)."""
        return self._core.server

    @property
    def close_reason(self) -> Optional[BaseException]:
        """Why the client closed (None while open, or when asked to close)."""
        return self._core.close_reason

    @property
    def is_closed(self) -> bool:
        return self._core.closed


class ClientCore:
    """
    One client: its connection (one at a time), its requests and its
    subscriptions, across reconnects.

    @param servers: where to connect, tried in turn (see L{parse_servers}).
    @param client_id: durable client id (HELLO), or "".
    @param token: authentication token (HELLO), or "".
    @param keepalive: seconds without sending after which a PING is sent;
        a PING not answered within C{request_timeout} (or C{keepalive}
        without one) means the connection is dead.  0: no keepalive.
    @param connect_timeout: seconds for the transport and HELLO (the
        adapter times the transport; the core the HELLO).
    @param request_timeout: seconds a request waits for its answer
        (including, while reconnecting, to be sent); None: for ever.
    @param reconnect: after losing an established connection, connect
        again (each server in turn, then again after a backoff), say HELLO,
        renew the subscriptions, and send what was asked meanwhile.
    @param max_queued: messages queued for readers of all subscriptions
        beyond which reading pauses (while no reply is awaited).
    @param max_backlog: bytes of requests kept while reconnecting.
    """

    def __init__(self, servers: Union[str, Sequence[str]], client_id: str = "", token: str = "",
                 keepalive: float = 60.0, connect_timeout: Optional[float] = 10.0,
                 request_timeout: Optional[float] = 30.0, reconnect: bool = False,
                 backoff: Optional[Backoff] = None, max_queued: int = 10_000,
                 max_backlog: int = 8 * 1024 * 1024) -> None:
        self.servers = parse_servers(servers)
        self.client_id = client_id
        self.token = token
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self.max_queued = max_queued
        self.max_backlog = max_backlog

        self.state = DIALING
        self.server: Optional[str] = None   # the one connected or being dialed
        self._server_index = -1
        self._round_left = 0                # servers left to try in this round
        self._established = False           # ever been READY
        self._connected = False             # a transport is up
        self._out: List[bytes] = []
        self._events: Deque[Event] = deque()
        self._next_rid = 0
        self._waiting: "OrderedDict[int, _Pending]" = OrderedDict()
        self._deadlines: List[Tuple[float, int, int]] = []   # (deadline, seq, rid)
        self._seq = 0
        self._backlog: List[Tuple[bytes, Optional[_Pending]]] = []
        self._backlog_bytes = 0
        self._buffer = bytearray()
        # Subscriptions by topic, pattern (which no topic name can be) or
        # group's topic (one subscription per topic, plain or group).
        self.subscriptions: Dict[str, SubscriptionState] = {}
        self._routes_cache: Dict[str, List[SubscriptionState]] = {}
        self._subscribed_count = 0
        self.queued = 0
        self.paused = False
        self._last_error: Optional[ZaichikError] = None   # the last frame, if an ERROR
        self.close_reason: Optional[BaseException] = None
        self._close_waiters: List[Any] = []
        self._last_sent = 0.0
        self._handshake_deadline: Optional[float] = None
        self._handshake_rid: Optional[int] = None
        self._ping_rid: Optional[int] = None
        self._connect_waiter: Any = None
        self._healthy = False          # this connection answered something other than ERROR
        self._dropping_input = False   # the transport is being aborted: ignore what it still reads

    # --- starting --------------------------------------------------------------

    def start(self, waiter: Any = None) -> None:
        """
        Begin the first connection: each server in turn, once; C{waiter}
        gets the core (L{Ready}) or the last error (L{Closed} follows).
        """
        self._connect_waiter = waiter
        self._round_left = len(self.servers)
        self._dial_next(0.0)

    def _dial_next(self, delay: float) -> None:
        self.state = DIALING
        self._server_index = (self._server_index + 1) % len(self.servers)
        self._round_left -= 1
        self.server = self.servers[self._server_index]
        self._events.append(Dial(self.server, delay))

    def connection_made(self, now: float) -> None:
        """The transport to C{self.server} is up."""
        if self.state == CLOSED:
            self._events.append(CloseTransport(abort=True))
            return
        self._connected = True
        self._healthy = False
        self._dropping_input = False
        self._buffer.clear()
        self._last_error = None
        self._last_sent = now
        if self.client_id or self.token:
            self.state = HANDSHAKING
            deadline = None if self.connect_timeout is None else now + self.connect_timeout
            pending = self._send_internal(codec.Hello(self._rid(), self.client_id, self.token),
                                          self._hello_ok, self._hello_refused, deadline,
                                          lambda: ConnectTimeout(f"no answer to HELLO from {self.server} "
                                                                 f"within {self.connect_timeout:g} s"))
            self._handshake_rid = pending.rid
        else:
            self._become_ready(now)

    def _hello_ok(self, reply) -> None:
        self._handshake_rid = None
        self._become_ready(None)

    def _hello_refused(self, error: ZaichikError) -> None:
        # The broker closes the connection after a refused HELLO; then
        # connection_lost finds this error (the last frame) as the reason.
        self._handshake_rid = None

    def _become_ready(self, now: Optional[float]) -> None:
        self.state = READY
        self._established = True
        self._round_left = 0
        # Renew subscriptions (after a reconnect), then send what was asked
        # meanwhile, in order.
        for sub in list(self.subscriptions.values()):
            if sub.state == ENDED or not sub.confirmed:
                continue  # ended, or its own SUBSCRIBE waits in the backlog
            if sub.unsubscribing:
                self._end_subscription(sub, None)
                continue
            sub.state = PENDING
            start, offset = self._resume_position(sub)
            self._send_internal(self._subscribe_request(self._rid(), sub, start, offset),
                                lambda reply, sub=sub: self._subscribed(sub),
                                lambda error, sub=sub: self._end_subscription(sub, error),
                                None, None)
        backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
        for data, pending in backlog:
            if pending is not None and self._waiting.get(pending.rid) is not pending:
                continue  # timed out while waiting to be sent
            self._out.append(data)
        self._events.append(Ready(self.server or ""))
        if self._connect_waiter is not None:
            waiter, self._connect_waiter = self._connect_waiter, None
            self._events.append(Resolve(waiter, self))

    def _resume_position(self, sub: SubscriptionState) -> Tuple[Start, int]:
        """
        Where a renewed subscription starts: with a client_id, after the
        broker's durable commit (DEFAULT) if this subscription committed or
        began there; otherwise after the last commit the broker accepted, or
        at the first message received (so that commits of received messages
        still refer to messages sent on the new connection), or where it
        began.  Messages received before are not handed out twice.

        A pattern has one start for all its topics: DEFAULT as above, or
        else where it began (per topic, what was handed out already is not
        handed out again).  A group rejoins as it joined: the group's
        position is the broker's, and what was outstanding for this member
        is sent again by the broker, to any member.
        """
        if sub.kind == GROUP:
            return sub.start, sub.offset
        if sub.kind == PATTERN:
            if self.client_id and (sub.committed_by_topic or sub.start == Start.DEFAULT):
                return Start.DEFAULT, 0
            return sub.start, sub.offset
        if self.client_id and (sub.committed is not None or sub.start == Start.DEFAULT):
            return Start.DEFAULT, 0
        if sub.committed is not None:
            return Start.OFFSET, sub.committed + 1
        if sub.first_received is not None:
            return Start.OFFSET, sub.first_received
        return sub.start, sub.offset

    def connection_failed(self, error: BaseException, now: float) -> None:
        """A dial (TCP, TLS) did not succeed."""
        self._connected = False
        if self.state == CLOSED:
            return
        self._after_loss(error)

    # --- requests ----------------------------------------------------------------

    def _rid(self) -> int:
        for _ in range(len(self._waiting) + 1):
            self._next_rid = self._next_rid % MAX_RID + 1
            if self._next_rid not in self._waiting:
                return self._next_rid
        raise RuntimeError("no free request id")  # pragma: no cover: 2**32 requests in flight

    def _deadline(self, now: float) -> Optional[float]:
        return None if self.request_timeout is None else now + self.request_timeout

    def _register(self, rid: int, waiter: Any, on_reply: Callable, on_error: Optional[Callable],
                  deadline: Optional[float], internal: bool,
                  timeout_error: Optional[Callable] = None) -> _Pending:
        pending = _Pending(rid, waiter, on_reply, on_error, deadline, internal,
                           timeout_error or (lambda: RequestTimeout(
                               f"no answer from the broker within {self.request_timeout:g} s")))
        self._waiting[rid] = pending
        if deadline is not None:
            self._seq += 1
            heapq.heappush(self._deadlines, (deadline, self._seq, rid))
        return pending

    def _send_internal(self, request, on_reply: Callable, on_error: Optional[Callable],
                       deadline: Optional[float], timeout_error: Optional[Callable]) -> _Pending:
        data = encode(request)
        pending = self._register(request.rid, None, on_reply, on_error, deadline, True, timeout_error)
        self._out.append(data)
        return pending

    def _closed_error(self) -> BaseException:
        if self.close_reason is not None:
            return self.close_reason
        return ClientClosedError("the client is closed")

    def request(self, waiter: Any, make: Callable[[int], Any], now: float,
                convert: Callable = _none) -> None:
        """
        Send the request C{make(rid)}; C{waiter} gets C{convert(reply)} or
        the error.  Raises (and keeps nothing) if it cannot be encoded.
        """
        self._request(waiter, make, now, convert)

    def _request(self, waiter: Any, make: Callable[[int], Any], now: float, convert: Callable,
                 on_error: Optional[Callable] = None) -> Optional[_Pending]:
        if self.state in (CLOSING, CLOSED):
            self._events.append(Reject(waiter, self._closed_error()))
            return None
        rid = self._rid()
        data = encode(make(rid))   # may raise: nothing registered yet
        pending = self._register(rid, waiter, convert, on_error, self._deadline(now), False)
        if self.state == READY:
            self._out.append(data)
            self._last_sent = now
        else:
            self._backlog.append((data, pending))
            self._backlog_bytes += len(data)
        if self.paused:
            self._resume()
        return pending

    def send(self, data: bytes, now: float) -> None:
        """
        Send an encoded request that expects no reply (a fire-and-forget
        publish, L{encode_publish}).  While reconnecting it waits, up to
        C{max_backlog} bytes.

        @raise ConnectionLostError: the client is closed, or the backlog is full.
        """
        if self.state == READY:
            self._out.append(data)
            self._last_sent = now
        elif self.state in (CLOSING, CLOSED):
            error = self._closed_error()
            if isinstance(error, ConnectionLostError):
                raise error
            raise ClientClosedError(f"the client is closed: {error}")
        elif self._backlog_bytes + len(data) > self.max_backlog:
            raise ConnectionLostError(f"not connected, and {self._backlog_bytes} bytes already wait")
        else:
            self._backlog.append((data, None))
            self._backlog_bytes += len(data)

    def hello(self, waiter: Any, client_id: str, token: str, now: float) -> None:
        def ok(reply) -> None:
            _none(reply)
            self.client_id, self.token = client_id, token

        self.request(waiter, lambda rid: codec.Hello(rid, client_id, token), now, ok)

    @staticmethod
    def _subscribe_request(rid: int, sub: SubscriptionState, start: Start, offset: int):
        if sub.kind == GROUP:
            assert sub.group is not None
            return codec.SubscribeGroup(rid, sub.topic, sub.group, start, offset, sub.max_inflight,
                                        sub.ack_timeout)
        return codec.Subscribe(rid, sub.topic, start, offset, sub.max_inflight)

    def subscribe(self, waiter: Any, sub: SubscriptionState, now: float) -> None:
        """
        Follow C{sub.topic} (a topic or a pattern), or join C{sub.group} of
        it (SUBSCRIBE_GROUP); C{waiter} gets C{sub.handle} once the broker
        accepts.  Messages for it are delivered only after that (a reply
        comes before the messages its request releases), so strays of an
        earlier subscription to the topic are not taken for this one's.
        Raises (and keeps nothing) if the request cannot be encoded.
        """
        topic = sub.topic
        if topic in self.subscriptions and self.state not in (CLOSING, CLOSED):
            raise ZaichikError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {topic}")

        def ok(reply) -> Any:
            _none(reply)
            self._subscribed(sub)
            return sub.handle

        def refused(error: BaseException) -> None:
            self._forget(sub)
            sub.state = ENDED

        try:
            pending = self._request(waiter, lambda rid: self._subscribe_request(rid, sub, sub.start, sub.offset),
                                    now, ok, refused)
        except BaseException:
            sub.state = ENDED
            raise
        if pending is not None:
            self._subscribed_count += 1
            sub.seq = self._subscribed_count
            self.subscriptions[topic] = sub
            self._routes_cache.clear()
        else:
            sub.state = ENDED

    def _forget(self, sub: SubscriptionState) -> None:
        if self.subscriptions.get(sub.topic) is sub:
            del self.subscriptions[sub.topic]
            self._routes_cache.clear()

    def _routes(self, topic: str) -> List[SubscriptionState]:
        """The subscriptions that follow C{topic}: its own, then the patterns that match it."""
        routes = self._routes_cache.get(topic)
        if routes is None:
            own = self.subscriptions.get(topic)
            routes = [own] if own is not None else []
            routes.extend(s for s in self.subscriptions.values() if s.kind == PATTERN and s.matches(topic))
            if len(self._routes_cache) >= 10_000:
                self._routes_cache.clear()
            self._routes_cache[topic] = routes
        return routes

    def _subscribed(self, sub: SubscriptionState) -> None:
        sub.confirmed = True
        if sub.state == PENDING:
            sub.state = ACTIVE

    def unsubscribe(self, waiter: Any, topic: str, now: float) -> None:
        """
        UNSUBSCRIBE C{topic}: a topic, a pattern (which ends the whole
        pattern subscription), or the topic of a group membership (which
        leaves the group: what was outstanding goes back to it, and what
        is queued unread here is dropped).
        """
        sub = self.subscriptions.get(topic)

        def ok(reply) -> None:
            _none(reply)
            current = self.subscriptions.get(topic)
            if current is not None and (sub is None or current is sub):
                self._end_subscription(current, None)

        pending = self._request(waiter, lambda rid: codec.Unsubscribe(rid, topic), now, ok)
        if pending is not None and sub is not None:
            sub.unsubscribing = True

    def commit(self, waiter: Any, topic: str, offset: int, now: float) -> None:
        """
        COMMIT C{topic} (a topic, never a pattern: the topic of a message
        a pattern brought) up to and including C{offset}.  The broker
        commits it for every subscription of the connection that follows
        the topic; on a group membership it acknowledges what is
        outstanding for this member up to C{offset}.
        """
        def ok(reply) -> None:
            _none(reply)
            for sub in self._routes(topic):
                sub.commit_accepted(topic, offset)

        self.request(waiter, lambda rid: codec.Commit(rid, topic, offset), now, ok)

    def ack(self, waiter: Any, topic: str, offset: int, now: float) -> None:
        """ACK one message of C{topic} sent to this member of a group."""
        self.request(waiter, lambda rid: codec.Ack(rid, topic, offset), now)

    def close(self, waiter: Any, now: float) -> None:
        """
        Close: CLOSE, its OK, then the broker's end of the connection;
        C{waiter} fires (with None) once closed.  Stops reconnecting.
        """
        if self.state == CLOSED:
            self._events.append(Resolve(waiter, None))
            return
        self._close_waiters.append(waiter)
        if self.state == CLOSING:
            return
        if self.state == READY:
            self.state = CLOSING
            rid = self._rid()
            deadline = self._deadline(now)
            self._register(rid, None, _none, None, deadline, True)
            self._out.append(encode(codec.Close(rid)))
            self._last_sent = now
        elif self._connected:
            self.state = CLOSING
            self._abort_transport(ClientClosedError("closed while connecting"))
        else:
            self._finish(None)

    def abort(self) -> None:
        """Drop the connection at once, and do not reconnect."""
        if self.state == CLOSED:
            return
        if self._connected:
            self.state = CLOSING
            self._abort_transport(ClientClosedError("the connection was aborted"))
        else:
            self._finish(None)

    # --- subscriptions' messages -------------------------------------------------

    def take(self, sub: SubscriptionState) -> Optional[Message]:
        """The next queued message of C{sub}, or None."""
        if not sub.queue:
            return None
        message = sub.queue.popleft()
        self.queued -= 1
        if self.paused and self.queued <= self.max_queued // 2:
            self._resume()
        return message

    def take_all(self, sub: SubscriptionState) -> List[Message]:
        messages = list(sub.queue)
        sub.queue.clear()
        self.queued -= len(messages)
        if self.paused and self.queued <= self.max_queued // 2:
            self._resume()
        return messages

    def _drop_queued(self, sub: SubscriptionState) -> None:
        sub.generation += 1
        if sub.queue:
            self.queued -= len(sub.queue)
            sub.queue.clear()
            if self.paused and self.queued <= self.max_queued // 2:
                self._resume()

    def _resume(self) -> None:
        self.paused = False
        self._events.append(ResumeReading())

    def _deliver(self, message: Message) -> None:
        routes = self._routes_cache.get(message.topic)
        if routes is None:
            routes = self._routes(message.topic)
        if len(routes) == 1:
            sub: Optional[SubscriptionState] = routes[0]
            assert sub is not None
            if sub.state != ACTIVE:
                return  # after UNSUBSCRIBE's OK, or before SUBSCRIBE's: not this subscription's
            offset = message.offset
            if sub.kind is TOPIC:   # (the common case, inline)
                last = sub.last_received
                if last is not None and offset <= last:
                    return  # sent again after a reconnect: already handed out
                if last is None:
                    sub.first_received = offset
                sub.last_received = offset
            elif sub.accepts(message.topic, offset):
                sub.received(message.topic, offset)
            else:
                return
        elif not routes:
            return
        else:
            sub = self._attribute(routes, message.topic, message.offset)
            if sub is None:
                return
            sub.received(message.topic, message.offset)
        if sub.has_callback:
            self._events.append(Deliver(sub.handle, message))
            return
        sub.queue.append(message)
        self.queued += 1
        if len(sub.queue) == 1:
            self._events.append(Wake(sub.handle))
        if self.queued > self.max_queued and not self.paused and not self._awaiting_reply():
            self.paused = True
            self._events.append(PauseReading())

    @staticmethod
    def _attribute(routes: List[SubscriptionState], topic: str, offset: int) -> Optional[SubscriptionState]:
        """
        Which of several subscriptions following C{topic} a copy of the
        message at C{offset} is for.  The broker sends one copy per
        subscription, each subscription's in order of offset, but the frame
        does not say whose it is.  A subscription follows the topic's log
        from where it began, and a log's offsets are consecutive, so:

          1. a subscription whose last message of the topic was
             C{offset - 1} (it is its next: whose ever copy it was, each
             subscription then ends up with each message once, in order);
          2. else the oldest that has had nothing of the topic yet (and
             whose known start, C{Start.OFFSET}, is not past C{offset});
          3. else the group membership of the topic (a group's messages
             come in any order, and may come again);
          4. else the one that got furthest in the topic without reaching
             C{offset} (messages expired while it lagged behind).

        None: every one had it already (sent again after a reconnect).
        """
        fresh: Optional[SubscriptionState] = None
        group: Optional[SubscriptionState] = None
        best: Optional[SubscriptionState] = None
        best_last = -1
        for sub in routes:
            if sub.state != ACTIVE:
                continue
            if sub.kind == GROUP:
                group = sub
                continue
            last = sub.last(topic)
            if last is None:
                if sub.kind == TOPIC and sub.start == Start.OFFSET and offset < sub.offset:
                    continue
                if fresh is None or sub.seq < fresh.seq:
                    fresh = sub
            elif last == offset - 1:
                return sub
            elif last < offset and (best is None or last > best_last):
                best, best_last = sub, last
        return fresh or group or best

    def _awaiting_reply(self) -> bool:
        return any(not p.abandoned for p in self._waiting.values())

    def _end_subscription(self, sub: SubscriptionState, error: Optional[BaseException]) -> None:
        self._forget(sub)
        if sub.state == ENDED:
            return
        sub.state = ENDED
        sub.end_error = error
        if sub.kind == GROUP:
            self._drop_queued(sub)   # given back to the group by the broker
        if not sub.has_callback:
            self._events.append(Wake(sub.handle))

    # --- bytes in ----------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        if self._dropping_input or not self._connected:
            return
        buffer = self._buffer
        buffer += data
        at = 0
        end = len(buffer)
        try:
            while end - at >= 4:
                n = int.from_bytes(buffer[at:at + 4], "big")
                if end - at - 4 < n:
                    break
                body = bytes(buffer[at + 4:at + 4 + n])
                at += 4 + n
                self._frame(body, now)
                if self._dropping_input or not self._connected:
                    break
        finally:
            if at:
                del buffer[:at]

    def _frame(self, body: bytes, now: float) -> None:
        try:
            reply = codec.decode_reply(body)
        except codec.DecodeError as e:
            self._last_error = None
            self._abort_transport(ConnectionLostError(f"undecodable frame from the broker: {e}"))
            return
        if isinstance(reply, codec.Error):
            error = ZaichikError(reply.code, reply.message)
            self._last_error = error
            pending = self._waiting.pop(reply.rid, None) if reply.rid else None
            if pending is None:
                self._events.append(AsyncError(error))
                return
            self._drop_abandoned_before()
            if pending.on_error is not None:
                pending.on_error(error)
            if pending.waiter is not None and not pending.abandoned:
                self._events.append(Reject(pending.waiter, error))
            return
        self._last_error = None
        self._healthy = True
        if isinstance(reply, codec.Message):
            self._deliver(reply)
            return
        pending = self._waiting.pop(reply.rid, None)
        if pending is None:
            return  # an answer to nothing asked (or to a request abandoned at its timeout)
        self._drop_abandoned_before()
        if pending.rid == self._ping_rid:
            self._ping_rid = None
        try:
            value = pending.on_reply(reply)
        except ZaichikError as error:
            if pending.waiter is not None and not pending.abandoned:
                self._events.append(Reject(pending.waiter, error))
            return
        if pending.waiter is not None and not pending.abandoned:
            self._events.append(Resolve(pending.waiter, value))

    def _drop_abandoned_before(self) -> None:
        # Replies come in request order: requests ahead of the one just
        # answered that timed out will not be answered now.
        while self._waiting:
            first_rid, first = next(iter(self._waiting.items()))
            if not first.abandoned:
                break
            del self._waiting[first_rid]

    def _abort_transport(self, reason: BaseException) -> None:
        """The connection is unusable: drop it, with C{reason} as the loss's reason."""
        if self._dropping_input:
            return
        self._dropping_input = True
        self._reason_hint = reason
        self._events.append(CloseTransport(abort=True))

    _reason_hint: Optional[BaseException] = None

    # --- bytes out, time ------------------------------------------------------------

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def events(self) -> List[Event]:
        events = list(self._events)
        self._events.clear()
        return events

    def has_events(self) -> bool:
        return bool(self._events) or bool(self._out)

    def pop_event(self) -> Optional[Event]:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> Optional[float]:
        deadlines = self._deadlines
        while deadlines and (deadlines[0][2] not in self._waiting
                             or self._waiting[deadlines[0][2]].abandoned):
            heapq.heappop(deadlines)
        best = deadlines[0][0] if deadlines else None
        if self.keepalive and self.state == READY and self._connected and self._ping_rid is None:
            at = self._last_sent + self.keepalive
            best = at if best is None else min(best, at)
        return best

    def handle_timer(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, rid = heapq.heappop(deadlines)
            pending = self._waiting.get(rid)
            if pending is None or pending.abandoned:
                continue
            error = pending.timeout_error()
            if pending.internal:
                # HELLO, a keepalive PING or CLOSE unanswered: the connection is dead.
                self._waiting.pop(rid, None)
                if self._connected:
                    self._abort_transport(error)
                continue
            if self.state != READY or not self._connected:
                # Never sent (still in the backlog): forget it.
                self._waiting.pop(rid, None)
            else:
                pending.abandoned = True
            if pending.on_error is not None:
                pending.on_error(error)
            self._events.append(Reject(pending.waiter, error))
        if (self.keepalive and self.state == READY and self._connected and self._ping_rid is None
                and now >= self._last_sent + self.keepalive):
            deadline = now + (self.request_timeout or self.keepalive)
            pending = self._send_internal(
                codec.Ping(self._rid()), _none, None, deadline,
                lambda: ConnectionLostError(f"no answer to a keepalive PING from {self.server}"))
            self._ping_rid = pending.rid
            self._last_sent = now
            if self.paused:
                self._resume()

    # --- the end of a connection --------------------------------------------------------

    def connection_lost(self, error: BaseException, now: float, clean: bool = False) -> None:
        """
        The transport is gone.  C{error} is the adapter's reason; C{clean}
        says it ended with an orderly end-of-file.  An ERROR the broker sent
        last, with a code after which it closes, is the reason instead (a
        FRAME_TOO_LARGE is reported as FRAME_TOO_LARGE, not as a lost
        connection); so is a timeout that made the core drop it.
        """
        if not self._connected:
            return
        self._connected = False
        self._buffer.clear()
        self._ping_rid = None
        self._handshake_rid = None
        self.paused = False
        last = self._last_error
        broker_error = last if last is not None and last.code in CLOSING_CODES else None
        hint, self._reason_hint = self._reason_hint, None
        self._last_error = None
        reason: BaseException = broker_error or hint or error
        asked = self.state == CLOSING
        healthy = self._healthy

        # What was sent on this connection will not be answered; what waits
        # in the backlog (asked while reconnecting) is still to be sent.
        unsent = {id(p) for _, p in self._backlog if p is not None}
        waiting = list(self._waiting.values())
        self._waiting.clear()
        self._deadlines = []
        for pending in waiting:
            if id(pending) in unsent:
                self._waiting[pending.rid] = pending
                if pending.deadline is not None:
                    self._seq += 1
                    heapq.heappush(self._deadlines, (pending.deadline, self._seq, pending.rid))
                continue
            if pending.internal:
                continue  # HELLO, renewals, PING: they are sent again on the next connection
            if pending.on_error is not None:
                pending.on_error(reason)
            if pending.waiter is not None and not pending.abandoned:
                self._events.append(Reject(pending.waiter, reason))
        for sub in self.subscriptions.values():
            if sub.state == ACTIVE:
                sub.state = PENDING
            if sub.kind == GROUP:
                # What this member had and nobody read goes back to the
                # group with the connection (the broker sends it again, to
                # any member): not handed out from here.
                self._drop_queued(sub)

        if asked:
            self._finish(None)
            return
        fatal = broker_error is not None and broker_error.code in FATAL_CODES
        if not fatal:
            if not self._established and self._round_left > 0:
                self._dial_next(0.0)            # connecting: the next server
                return
            if self._established and self.reconnect:
                # Every server in turn, at once if this connection was
                # working, else after a backoff (a broker that accepts and
                # drops at once must not be hammered).
                if healthy:
                    self.backoff.reset()
                self._round_left = len(self.servers)
                self._dial_next(0.0 if healthy else self.backoff.next())
                return
        ended_clean = clean and broker_error is None and hint is None
        self._finish(reason, subscriptions_error=None if ended_clean else reason)

    def _after_loss(self, error: BaseException) -> None:
        """After a failed dial: the next server, the next round after a backoff, or the end."""
        if self._round_left > 0:
            self._dial_next(0.0)
        elif self._established and self.reconnect:
            self._round_left = len(self.servers)
            self._dial_next(self.backoff.next())
        else:
            self._finish(error, subscriptions_error=error)

    def _finish(self, error: Optional[BaseException],
                subscriptions_error: Optional[BaseException] = None) -> None:
        """Closed for good."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.close_reason = error
        self._connected = False
        for pending in list(self._waiting.values()):
            if pending.waiter is not None and not pending.abandoned:
                self._events.append(Reject(pending.waiter, self._closed_error()
                                           if error is None else error))
        self._waiting.clear()
        self._deadlines = []
        self._backlog, self._backlog_bytes = [], 0
        for sub in list(self.subscriptions.values()):
            self._end_subscription(sub, subscriptions_error)
        self.subscriptions.clear()
        self._routes_cache.clear()
        if self._connect_waiter is not None:
            waiter, self._connect_waiter = self._connect_waiter, None
            self._events.append(Reject(waiter, error or ConnectionLostError("closed while connecting")))
        for waiter in self._close_waiters:
            self._events.append(Resolve(waiter, None))
        self._close_waiters = []
        self._events.append(Closed(error))

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    @property
    def ready(self) -> bool:
        return self.state == READY
