"""
Timers keep their period when the wall clock is stepped (an operator, NTP):
the broker runs the reactor's timers on the monotonic clock (zaichik.clock).
A subprocess runs the real broker on the real reactor with C{time.time}
replaced, before Twisted is imported, by a wall clock the test steps by an
hour back and forth; message timestamps still follow the wall clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from zaichik.testing import ROOT

SCRIPT = textwrap.dedent(r"""
    import json, socket, struct, sys, time
    real = time.time
    stepped = [0.0]
    time.time = lambda: real() + stepped[0]          # the wall clock, steppable
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from zaichik import codec
    from zaichik.service import BrokerService
    from zaichik.tap import Options, makeService

    sweeps = []
    original = BrokerService.sweep
    BrokerService.sweep = lambda self: (sweeps.append(time.monotonic()), original(self))[1]
    options = Options()
    options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--idle-timeout", "1500ms",
                          "--sweep-interval", "100ms"])
    application = makeService(options)
    application.startService()
    # A 100 ms beat of our own, started with the sweep's: a slow or loaded
    # machine skips the same beats of both (what counts is the sweep's pace
    # against it, not a number of sweeps in 2.3 s, which a stall cuts short).
    ticks = []
    LoopingCall(lambda: ticks.append(time.monotonic())).start(0.1, now=False)
    listener = [s for s in application if hasattr(s, "_waitingForPort")][0]
    port = listener._waitingForPort.result.getHost().port
    result = {}

    def client():
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        return s

    conns = [client() for _ in range(5)]
    start = time.monotonic()

    def step(seconds):
        stepped[0] += seconds
        result.setdefault("steps", []).append(seconds)

    def check():
        closed = 0
        for s in conns:
            try:
                data = s.recv(4096)
                closed += data == b"" or data[4:5] == bytes([codec.Opcode.ERROR])
            except BlockingIOError:
                pass
            except ConnectionError:
                closed += 1
        result["closed_at"] = result.get("closed_at") or (closed and round(time.monotonic() - start, 2))
        result["closed"] = closed

    def publish():
        broker = [s for s in application if isinstance(s, BrokerService)][0]
        topic = broker.create_topic("t", 60_000, 0)
        topic.publish(None, b"v")
        result["timestamp_vs_wall"] = round(topic._last_timestamp / 1000 - time.time(), 1)

    reactor.callLater(0.3, step, -3600)       # an hour back...
    reactor.callLater(0.7, publish)
    reactor.callLater(0.9, step, 7200)        # ...then an hour forward
    LoopingCall(check).start(0.1, now=False)  # (when the connections are closed, to 0.1 s)
    def done():
        if result.get("closed") != 5 and time.monotonic() - start < 10:
            reactor.callLater(0.1, done)      # (closes still to come: a slow machine, or never)
            return
        result["sweeps"] = len(sweeps)
        result["ticks"] = len(ticks)
        print(json.dumps(result))
        reactor.stop()
    reactor.callLater(2.3, done)
    reactor.run()
""")


class WallClockStepTests(SynchronousTestCase):
    def test_timers_keep_their_period_across_steps(self):
        run = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + SCRIPT], capture_output=True,
                             text=True, timeout=20, cwd=ROOT)
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        result = json.loads(run.stdout.strip().splitlines()[-1])
        # The sweep ran every 100 ms through both steps (before: none for an hour after the backward step),
        # as many times as a 100 ms beat on the monotonic clock (one fewer if a stall ended between them).
        self.assertGreaterEqual(result["sweeps"], result["ticks"] - 1)
        # The idle timeout (1.5 s) closed the five idle connections on time, not at the
        # forward step (before: all at once at 0.9 s) nor never (after the backward step).
        self.assertEqual(result["closed"], 5)
        self.assertGreaterEqual(result["closed_at"], 1.4)
        # Timestamps stay on the wall clock: the message published after the backward step
        # carries the stepped wall time (it cannot go below the topic's last one: it had none).
        self.assertEqual(result["timestamp_vs_wall"], 0.0)
