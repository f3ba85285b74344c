"""
A small Redis client on Twisted, for the Redis engine (L{zaichik.storage.redis}).

Why our own: the engine needs Deferreds on Twisted's default reactor,
pipelining (every command is written at once and replies are matched in
order), sharded pub/sub (SSUBSCRIBE) and Redis Cluster routing.  txredisapi
has no cluster and no sharded pub/sub; redis-py's asyncio client has both
but needs the asyncio reactor for the whole broker.  What is hard to get
right and fast, parsing RESP, is done by C{hiredis}' C reader; this module
only moves bytes and matches replies (docs/scale-out.rst has the figures).

L{Connection} is one connection to one server that reconnects by itself;
L{Router} sends a command to the server that owns its key: the one primary,
or the cluster node that owns the key's slot (following MOVED and ASK).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import hiredis
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

_log = Logger()


class RedisError(Exception):
    """An error reply from Redis (C{str} is its text), or a lost connection."""


class NotConnected(RedisError):
    """The command could not be sent or its reply was lost with the connection."""


class NotSent(NotConnected):
    """The command was not sent (no connection): it is safe to send it again."""


def encode(args: Sequence) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def when_done(running: Deferred) -> Deferred:
    """
    A new Deferred that fires (with None) once C{running}, an operation
    others may wait on too, has ended however it ended; C{running}'s own
    result goes on to its other callbacks untouched.
    """
    d: Deferred = Deferred()

    def done(result):
        d.callback(None)
        return result

    running.addBoth(done)
    return d


# -- cluster slots ----------------------------------------------------------------

def _crc16_table() -> List[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def key_slot(key: bytes) -> int:
    """The cluster slot of C{key} (CRC16/XMODEM of its hash tag, mod 16384)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    crc = 0
    for byte in key:
        crc = ((crc << 8) & 0xFF00) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % 16384


# -- one connection ------------------------------------------------------------------

class _RESP(Protocol):
    """Writes commands and hands each reply to the oldest waiting Deferred."""

    def __init__(self, owner: "Connection") -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.waiting: Deque[Deferred] = deque()

    def connectionMade(self) -> None:
        out: Any = self.transport  # (an ITCPTransport: a Connection uses TCP only)
        # Small pipelined writes must not wait for Nagle (40 ms with delayed ACKs).
        out.setTcpNoDelay(True)
        # A script carries a whole read's messages and a notification as
        # many (a MiB or more): each in a few system calls, not Twisted's
        # 128 KiB a send and 64 KiB a read (zaichik/edge/tcp.py says more;
        # nothing is registered as a producer here, so the read size is all
        # bufferSize sets): A->B in benchmarks/scale_out.py went from about
        # 1.3M to 1.8M messages a second.  Sends of twice the read, as there:
        # Twisted copies what is left of its buffer at each write event while
        # less than SEND_LIMIT is left, which with Redis behind would be all.
        out.SEND_LIMIT = 2 << 20
        out.bufferSize = 1 << 20
        self.out = out
        self.owner._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.owner.received += len(data)
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        push = self.owner.on_push
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if push is not None and type(reply) is list and reply and reply[0] in _PUSHES:
                push(reply)
                continue
            if not waiting:
                _log.warn("Redis sent a reply nothing waits for: {reply!r}", reply=reply)
                continue
            d = waiting.popleft()
            if type(reply) is hiredis.ReplyError:
                d.errback(RedisError(str(reply)))
            else:
                d.callback(reply)

    def connectionLost(self, reason=None) -> None:
        waiting, self.waiting = self.waiting, deque()
        for d in waiting:
            d.errback(NotConnected(f"connection to Redis lost: {reason.getErrorMessage() if reason else ''}"))
        self.owner._lost(self)


# Pub/sub messages (RESP2 arrays that answer no command).
# (sunsubscribe: a cluster moved a sharded channel's slot away; we never
# unsubscribe ourselves.)
_PUSHES = {b"message", b"smessage", b"pmessage", b"sunsubscribe"}


class Connection:
    """
    One connection to one Redis server, made again (after a pause that
    grows to a second) whenever it is lost, until L{close}.

    Commands sent while it is down fail at once with L{NotConnected}; so do
    those whose replies were lost with the connection (their outcome is
    unknown: the caller decides).  C{on_connect} runs on every (re)connect
    before anything else is sent; C{on_push} receives pub/sub messages.
    """

    def __init__(self, reactor, host: str, port: int, db: int = 0,
                 on_connect: Optional[Callable[["Connection"], object]] = None,
                 on_push: Optional[Callable[[list], None]] = None,
                 on_down: Optional[Callable[["Connection"], object]] = None,
                 password: Optional[str] = None) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.db = db
        self.password = password
        self.on_connect = on_connect
        self.on_push = on_push
        self.on_down = on_down
        self._protocol: Optional[_RESP] = None
        self._closing = False
        self._delay = 0.05
        self._retry = None
        self._ready: List[Deferred] = []
        self._connecting = False
        self.received = 0  # bytes read, all connections together (liveness: see RedisStorage._ping)

    def __repr__(self) -> str:
        return f"<redis.Connection {self.host}:{self.port}{' up' if self.up else ''}>"

    @property
    def up(self) -> bool:
        return self._protocol is not None

    def connect(self) -> Deferred:
        """Fires once connected (and set up) the first time."""
        d: Deferred = Deferred()
        self._ready.append(d)
        self._connect()
        return d

    def _connect(self) -> None:
        if self._closing or self._connecting or self._protocol is not None:
            return
        self._connecting = True
        self._retry = None
        endpoint = TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=5)
        d = endpoint.connect(Factory.forProtocol(lambda: _RESP(self)))
        d.addErrback(self._failed)

    def _failed(self, failure) -> None:
        self._connecting = False
        if self._closing:
            return
        _log.warn("Cannot reach Redis at {host}:{port}: {why}; retrying", host=self.host, port=self.port,
                  why=failure.getErrorMessage())
        self._schedule()

    def _schedule(self) -> None:
        if self._retry is None and not self._closing:
            self._retry = self.reactor.callLater(self._delay, self._connect)
            self._delay = min(self._delay * 2, 1.0)

    def _connected(self, protocol: _RESP) -> None:
        self._connecting = False
        if self._closing:
            protocol.out.loseConnection()
            return
        self._protocol = protocol
        self._delay = 0.05
        d = defer.succeed(None)
        if self.password:
            d.addCallback(lambda _: self.execute("AUTH", self.password))
        if self.db:
            d.addCallback(lambda _: self.execute("SELECT", self.db))
        on_connect = self.on_connect
        if on_connect is not None:
            d.addCallback(lambda _: on_connect(self))
        d.addCallbacks(self._set_up, self._not_set_up)

    def _set_up(self, _) -> None:
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(self)

    def _not_set_up(self, failure) -> None:
        _log.warn("Setting up the Redis connection to {host}:{port} failed: {why}", host=self.host,
                  port=self.port, why=failure.getErrorMessage())
        self.drop()

    def _lost(self, protocol: _RESP) -> None:
        if self._protocol is protocol:
            self._protocol = None
            if not self._closing:
                _log.warn("Lost the connection to Redis at {host}:{port}; reconnecting", host=self.host,
                          port=self.port)
                if self.on_down is not None:
                    self.on_down(self)
        self._connecting = False
        self._schedule()

    def drop(self) -> None:
        """Close the connection now (it is made again): e.g. it stopped answering."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.out.abortConnection()

    def execute(self, *args) -> Deferred:
        """Send one command; fires with its reply, or fails with L{RedisError}."""
        protocol = self._protocol
        if protocol is None:
            return defer.fail(NotSent(f"not connected to Redis at {self.host}:{self.port}"))
        d: Deferred = Deferred()
        protocol.waiting.append(d)
        protocol.out.write(encode(args))
        return d

    def pipeline(self, commands: Sequence[Sequence]) -> List[Deferred]:
        """Send several commands in one write; a Deferred for each reply."""
        protocol = self._protocol
        if protocol is None:
            return [defer.fail(NotSent(f"not connected to Redis at {self.host}:{self.port}"))
                    for _ in commands]
        ds: List[Deferred] = []
        for _ in commands:
            d: Deferred = Deferred()
            protocol.waiting.append(d)
            ds.append(d)
        protocol.out.write(b"".join(encode(args) for args in commands))
        return ds

    def close(self) -> Deferred:
        self._closing = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            return defer.succeed(None)
        done: Deferred = Deferred()
        original = protocol.connectionLost

        def lost(reason):
            original(reason)
            done.callback(None)

        protocol.connectionLost = lost  # type: ignore[method-assign,assignment]
        protocol.out.loseConnection()
        return done


# -- where a key lives ---------------------------------------------------------------

def parse_url(url: str) -> Tuple[List[Tuple[str, int]], int, Optional[str], bool]:
    """
    C{redis://[:password@]host:port[/db]} (one primary) or
    C{redis+cluster://host:port,host:port,...} (seed nodes of a cluster):
    the addresses, the database, the password and whether it is a cluster.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "redis+cluster"):
        raise ValueError(f"{url!r}: the engine must be redis://HOST:PORT[/DB] or "
                         f"redis+cluster://HOST:PORT,HOST:PORT,...")
    cluster = parts.scheme == "redis+cluster"
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        password = credentials.split(":", 1)[-1] or None
    addresses = []
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":")
        if not host:
            host, port = hostport, "6379"
        try:
            addresses.append((host or "127.0.0.1", int(port)))
        except ValueError:
            raise ValueError(f"{url!r}: {hostport!r} is not HOST:PORT") from None
    if not addresses:
        raise ValueError(f"{url!r}: no server named")
    if len(addresses) > 1 and not cluster:
        raise ValueError(f"{url!r}: several servers need redis+cluster://")
    db = 0
    path = parts.path.strip("/")
    if path:
        if cluster:
            raise ValueError(f"{url!r}: a cluster has only database 0")
        try:
            db = int(path)
        except ValueError:
            raise ValueError(f"{url!r}: the database must be a number") from None
    return addresses, db, password, cluster


class Router:
    """
    Sends each command to the server that owns its key.  With one primary
    that is always the same connection; in a cluster it is the node that
    owns the key's slot, learnt from CLUSTER SLOTS and corrected by MOVED
    (the map is read again) and ASK (one command sent on with ASKING).

    C{on_connect(connection)} and C{on_push(connection, message)} are
    called for each node's connection.
    """

    def __init__(self, reactor, url: str, on_connect=None, on_push=None, on_down=None,
                 slots_from: Optional["Router"] = None) -> None:
        self.reactor = reactor
        # A router for pub/sub connections, which cannot ask CLUSTER SLOTS
        # once subscribed, takes the slot map of another router.
        self.slots_from = slots_from
        self.addresses, self.db, self.password, self.cluster = parse_url(url)
        self._on_connect = on_connect
        self._on_push = on_push
        self._on_down = on_down
        self.nodes: Dict[Tuple[str, int], Connection] = {}
        self._slots: List[Optional[Tuple[str, int]]] = [None] * 16384
        self._refreshing: Optional[Deferred] = None

    def _node(self, address: Tuple[str, int]) -> Connection:
        connection = self.nodes.get(address)
        if connection is None:
            connection = Connection(self.reactor, address[0], address[1], self.db, on_connect=self._on_connect,
                                    on_down=self._on_down, password=self.password)
            if self._on_push is not None:
                connection.on_push = (lambda message, c=connection: self._on_push(c, message))
            self.nodes[address] = connection
            connection._connect()
        return connection

    @defer.inlineCallbacks
    def start(self):
        """Connect (and, for a cluster, learn which node owns which slot)."""
        if not self.cluster:
            yield self._node(self.addresses[0]).connect()
            return
        if self.slots_from is not None:
            yield self._connect_primaries()
            return
        last: Optional[Exception] = None
        for address in self.addresses:
            seed = Connection(self.reactor, address[0], address[1], password=self.password)
            try:
                yield seed.connect()
                yield self._read_slots(seed)
                return
            except Exception as e:
                last = e
            finally:
                yield seed.close()
        raise RedisError(f"no seed node of the cluster answered: {last}")

    @defer.inlineCallbacks
    def _read_slots(self, connection: Connection, wait: bool = True):
        """Read the slot map from C{connection}; with C{wait}, until connected to every primary."""
        slots = yield connection.execute("CLUSTER", "SLOTS")
        table: List[Optional[Tuple[str, int]]] = [None] * 16384
        for entry in slots:
            start, end, primary = entry[0], entry[1], entry[2]
            host = primary[0].decode() or connection.host
            address = (host, int(primary[1]))
            for slot in range(start, end + 1):
                table[slot] = address
        self._slots = table
        connecting = self._connect_primaries()
        if wait:
            yield connecting

    def _connect_primaries(self) -> Deferred:
        waits = [self._node(address).connect() for address in set(a for a in self._table() if a is not None)
                 if not self._node(address).up]
        if not waits:
            return defer.succeed(None)
        return defer.DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)

    def _table(self) -> List[Optional[Tuple[str, int]]]:
        return (self.slots_from or self)._slots

    def refresh(self) -> Deferred:
        """Read the slot map again (after MOVED, or a node that went away)."""
        if not self.cluster:
            return defer.succeed(None)
        if self.slots_from is not None:
            def connect(_) -> None:
                self._connect_primaries().addErrback(lambda f: None)  # (not waited for: see above)

            return self.slots_from.refresh().addCallback(connect)
        if self._refreshing is None:
            candidates = [c for c in self.nodes.values() if c.up]

            @defer.inlineCallbacks
            def go():
                try:
                    for connection in candidates:
                        try:
                            # (Not waiting for every primary: one may be
                            # the node that just died.)
                            yield self._read_slots(connection, wait=False)
                            return
                        except Exception:
                            continue
                    yield self.start()
                finally:
                    self._refreshing = None

            self._refreshing = go()
        return when_done(self._refreshing)

    def for_key(self, key: bytes) -> Connection:
        """The connection to the node that owns C{key}."""
        if not self.cluster:
            return self._node(self.addresses[0])
        address = self._table()[key_slot(key)]
        if address is None:
            address = self.addresses[0]
        return self._node(address)

    def any(self) -> Connection:
        """A connection to some node (for commands that touch no key)."""
        if not self.cluster:
            return self._node(self.addresses[0])
        for connection in self.nodes.values():
            if connection.up:
                return connection
        return self._node(self.addresses[0])

    def primaries(self) -> List[Connection]:
        """A connection to each primary (one without a cluster)."""
        if not self.cluster:
            return [self._node(self.addresses[0])]
        return [self._node(a) for a in sorted(set(a for a in self._table() if a is not None))]

    def execute(self, key: bytes, *args, _tries: int = 5) -> Deferred:
        """Run C{args} on the node that owns C{key}; follow MOVED/ASK in a cluster."""
        d = self.for_key(key).execute(*args)
        if not self.cluster:
            return d
        return d.addErrback(self._redirected, key, args, _tries)

    def _redirected(self, failure, key: bytes, args, tries: int):
        failure.trap(RedisError)
        message = str(failure.value)
        if tries <= 0:
            return failure
        if message.startswith("MOVED"):
            _, slot, hostport = message.split()
            host, _, port = hostport.rpartition(":")
            self._slots[int(slot)] = (host, int(port))
            self.refresh()
            return self.execute(key, *args, _tries=tries - 1)
        if message.startswith("ASK"):
            _, slot, hostport = message.split()
            host, _, port = hostport.rpartition(":")
            target = self._node((host, int(port)))
            asking, d = target.pipeline([("ASKING",), args])
            asking.addErrback(lambda f: None)
            return d
        if message.startswith(("TRYAGAIN", "CLUSTERDOWN")) or isinstance(failure.value, NotSent):
            # Not sent again later: a command sent after this one would run
            # first (offsets out of order, a duplicate answered before its
            # original).  The caller fails; the map is read again for the next.
            self.refresh()
        return failure

    def close(self) -> Deferred:
        return defer.DeferredList([c.close() for c in self.nodes.values()], consumeErrors=True)


__all__ = ["Connection", "Router", "RedisError", "NotConnected", "NotSent", "key_slot", "parse_url", "encode",
           "when_done"]
