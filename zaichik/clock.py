"""
The broker's two clocks.

Message timestamps, retention and compaction windows are defined on the
wall clock (milliseconds since the epoch: what a MESSAGE carries).  Timers
(the retention sweep, fsync ticks, idle and frame timeouts, the close
grace) measure durations, and must keep their period when the wall clock
is stepped by an operator or NTP: they run on the monotonic clock.

Twisted's reactor schedules C{callLater} on C{reactor.seconds()}, which is
the wall clock (twisted#2424, open since 2007); the workaround its
maintainers describe is to give the reactor a monotonic C{seconds}.
L{use_monotonic_timers} does that when the broker starts, and the code that
needs the wall clock asks L{wall_clock} for it instead of the reactor.
Tests pass a L{twisted.internet.task.Clock}, which serves as both.
"""

from __future__ import annotations

import time

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()


class WallClock:
    """C{seconds()}: the wall clock, whatever the reactor's timers use."""

    @staticmethod
    def seconds() -> float:
        return time.time()

    def __repr__(self) -> str:
        return "<WallClock>"


def wall_clock(clock):
    """The wall clock that goes with C{clock}: itself, unless it is the global reactor."""
    from twisted.internet import reactor

    return WallClock() if clock is reactor else clock


def use_monotonic_timers(reactor) -> None:
    """
    Make C{reactor}'s timers monotonic (once, before it runs): calls
    already scheduled keep their remaining delay.
    """
    if getattr(reactor, "seconds", None) is time.monotonic:
        return
    pending = list(reactor.getDelayedCalls())
    wall = reactor.seconds
    reactor.seconds = time.monotonic
    now_wall, now = wall(), time.monotonic()
    for call in pending:
        call.seconds = time.monotonic
        call.time = now + max(0.0, call.getTime() - now_wall)
    if pending:
        # DelayedCalls are kept in a heap ordered by time: rebuild its order.
        import heapq

        heapq.heapify(reactor._pendingTimedCalls)
    _log.debug("Reactor timers now run on the monotonic clock ({n} rescheduled)", n=len(pending))


class MonotonicTimers(Service):
    """
    A service, first in the application, that makes the reactor's timers
    monotonic when the application starts, before the broker schedules any.
    """

    name = "monotonic-timers"

    def startService(self) -> None:
        from twisted.internet import reactor

        use_monotonic_timers(reactor)
        super().startService()
