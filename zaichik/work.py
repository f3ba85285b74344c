"""
The unit of work: one stretch of the broker's work (typically everything
one read from one connection asked for), whose writes reach storage
together and whose messages are delivered together.

While a unit is open, topics stage what is published (offsets and frames
are assigned at once, so replies can name them).  When the outermost unit
ends, each topic appends what it staged to its log in one call, and the
storage is told to make the unit durable (L{IStorage.sync}: one fsync for
the whole unit with C{--fsync always}).  Each append's outcome settles a
L{Pending}: replies that wait on it go out (or become errors), and only
then are the messages delivered.  So whoever drives the broker (a TCP
connection, a WebSocket, a test calling a L{Session} directly) gets the
same order and durability: a reply before the messages its request
released, and nothing delivered or acknowledged before storage has it.

A connection may hold its output back until the unit ends (L{gather}):
the edges then write each connection's replies and messages of the unit
at once.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from twisted.logger import Logger

from zaichik.errors import ZaichikError

_log = Logger()


class Pending:
    """
    The outcome of one append (a topic's staged messages of one unit), for
    whatever waits on it: C{error} is None while pending and after success
    (see C{done}), the L{ZaichikError} after a failure.
    """

    __slots__ = ("done", "error", "_waiters", "watched")

    def __init__(self) -> None:
        self.done = False
        # A fire-and-forget publish's reply waits on it already (its failure
        # is told once per append: see Session.publish_frame).
        self.watched = False
        self.error: Optional[ZaichikError] = None
        self._waiters: List[Callable[[], None]] = []

    def when_done(self, waiter: Callable[[], None]) -> None:
        """Call C{waiter()} once settled (at once if it is)."""
        if self.done:
            waiter()
        else:
            self._waiters.append(waiter)

    def settle(self, error: Optional[ZaichikError] = None) -> None:
        self.done = True
        self.error = error
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter()

    def __repr__(self) -> str:
        state = "pending" if not self.done else ("failed" if self.error else "stored")
        return f"<Pending {state}>"


class Late:
    """
    A reply that names what only the append's outcome tells (the offsets an
    engine shared by several brokers assigns): made by C{make()} once the
    L{Pending} it waits on has settled without error.
    """

    __slots__ = ("rid", "make")

    def __init__(self, rid: int, make: Callable[[], object]) -> None:
        self.rid = rid
        self.make = make

    def __repr__(self) -> str:
        return f"<Late reply rid={self.rid}>"


class UnitOfWork:
    """
    Owned by the service; re-entrant: nested uses end when the outermost
    one does.  Outside any use, L{begin} and L{end} around each request do
    the same for one request.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self.depth = 0
        self.now = 0  # the time in ms, read once per unit (see Topic.now)
        # Bytes of MESSAGE frames staged in this unit (what it will deliver
        # to each subscription at its end: see zaichik.edge.tcp.unit_output).
        self.staged = 0
        self._dirty: List = []
        self._writers: List = []
        self._sync = sync

    def dirty(self, topic) -> None:
        """C{topic} staged messages in this unit: append them at its end."""
        self._dirty.append(topic)

    # True while flush appends and delivers: what it writes is gathered too.
    ending = False

    def gather(self, writer) -> None:
        """
        C{writer} holds output back until this unit ends: call its
        C{flushOutput()} then (see L{zaichik.edge.connection.BrokerConnection}).
        """
        self._writers.append(writer)

    def __enter__(self) -> "UnitOfWork":
        if not self.depth:
            self.now = 0
            self.staged = 0
        self.depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.flush()

    def flush(self) -> None:
        """
        Append what every topic staged so far and ask storage to sync it
        (an UNSUBSCRIBE or a closing connection calls this so that what was
        published before it is delivered first).
        """
        ending, self.ending = self.ending, True
        try:
            while self._dirty:
                dirty, self._dirty = self._dirty, []
                for topic in dirty:
                    topic.commit()
            self._sync()
        finally:
            self.ending = ending
            if not self.depth:  # (a request ending the unit early: the output waits for the unit's end)
                self._write_out()

    def _write_out(self) -> None:
        """The output the unit made (replies and deliveries), one write per connection."""
        while self._writers:
            writers, self._writers = self._writers, []
            for writer in writers:
                try:
                    writer.flushOutput()
                except Exception:
                    _log.failure("Writing to {writer} failed", writer=writer)
