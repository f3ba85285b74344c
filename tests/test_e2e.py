"""
End to end: a real C{twistd zaichik} process on loopback, driven by the
client library and by the examples.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from zaichik.testing import TWISTD, BrokerProcess, shared_broker
from zaichik.client import Start, ZaichikError, connect
from zaichik.codec import ErrorCode


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class BrokerTestCase(TestCase):
    """One broker process for the class; each test uses its own topics."""

    broker_options: tuple = ()

    def setUp(self) -> None:
        self.broker = shared_broker(*self.broker_options)

    async def connect(self, **kwargs):
        kwargs.setdefault("keepalive", 0)
        client = await connect(reactor, self.broker.address, **kwargs)
        self.addCleanup(lambda: ensureDeferred(self._close(client)))
        return client

    @staticmethod
    async def _close(client) -> None:
        try:
            await client.close()
        except Exception:
            pass
        await client.closed


def async_test(f):
    def wrapper(self):
        return ensureDeferred(f(self))

    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


class ClientLibraryTests(BrokerTestCase):
    @async_test
    async def test_echo(self):
        """A client receives its own message."""
        client = await self.connect()
        topic = unique("echo")
        subscription = await client.subscribe(topic, start=Start.LATEST)
        result = await client.publish(topic, b"hello", key=b"k")
        message = await subscription.get()
        self.assertEqual((result.offset, result.duplicate), (0, False))
        self.assertEqual((message.topic, message.offset, message.key, message.value),
                         (topic, 0, b"k", b"hello"))

    @async_test
    async def test_durable_resume_and_takeover(self):
        """
        A durable client that committed offset 1 of 0..3 resumes at 2 on a new
        connection, which takes over (closes) the old one.
        """
        topic = unique("durable")
        client_id = unique("worker")
        first = await self.connect(client_id=client_id)
        await first.create_topic(topic, retention_ttl=60_000)
        await first.publish_batch(topic, [(None, b"m%d" % i) for i in range(4)])
        subscription = await first.subscribe(topic, max_inflight=10)
        offsets = [(await subscription.get()).offset for _ in range(4)]
        self.assertEqual(offsets, [0, 1, 2, 3])
        await subscription.commit(1)

        second = await self.connect(client_id=client_id)
        await first.closed  # taken over
        resumed = await second.subscribe(topic)
        await second.ping()
        self.assertEqual([(await resumed.get()).offset for _ in range(2)], [2, 3])

    @async_test
    async def test_errors_carry_codes(self):
        client = await self.connect()
        topic = unique("settings")
        await client.create_topic(topic, retention_ttl=1000)
        await client.create_topic(topic, retention_ttl=1000)  # idempotent
        with self.assertRaises(ZaichikError) as caught:
            await client.create_topic(topic, retention_ttl=2000)
        self.assertEqual(caught.exception.code, ErrorCode.TOPIC_EXISTS)
        with self.assertRaises(ZaichikError) as caught:
            await client.publish("no spaces allowed", b"x")
        self.assertEqual(caught.exception.code, ErrorCode.BAD_TOPIC)
        self.assertEqual(await client.ping(), None)  # still open

    @async_test
    async def test_list_topics(self):
        client = await self.connect()
        topic = unique("listed")
        await client.create_topic(topic, retention_ttl=60_000, compaction_window=5_000)
        await client.publish(topic, b"a", key=b"k")
        await client.publish(topic, b"b", key=b"k")  # duplicate: not stored
        info = {t.name: t for t in await client.list_topics()}[topic]
        self.assertEqual((info.retention_ttl, info.compaction_window, info.next_offset,
                          info.retained, info.subscribers), (60_000, 5_000, 1, 1, 0))


class ExampleTests(BrokerTestCase):
    """The three examples pass against a running broker, and again on a rerun."""

    def run_example(self, name: str) -> str:
        env = dict(os.environ, PORT=str(self.broker.port))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        outputs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)],
                                  env=env, capture_output=True, text=True, timeout=60)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            outputs.append(done.stdout)
        return outputs[1]

    def test_echo(self):
        self.assertIn("echo: OK", self.run_example("echo.py"))

    def test_retention(self):
        self.assertIn("retention: OK", self.run_example("retention.py"))

    def test_compaction(self):
        output = self.run_example("compaction.py")
        self.assertIn("duplicate of offset 0, dropped", output)
        self.assertIn("compaction: OK", output)


class ProcessTests(TestCase):
    def test_plugin_listed(self):
        """C{twistd --help} lists the zaichik plugin."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run(TWISTD + ["--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        self.assertIn("zaichik", done.stdout)

    def test_sigterm_exits_cleanly(self):
        broker = BrokerProcess().start()
        self.addCleanup(broker.cleanup)
        # twistd re-raises the signal that stopped it, so the exit status
        # says SIGTERM; the log shows the orderly shutdown.
        self.assertEqual(broker.stop(), -signal.SIGTERM)
        self.assertIn("Server Shut Down", broker.log())

    def test_restart_keeps_one_log(self):
        """A restart writes after the last start's log, in the same file (not a new one left behind)."""
        broker = BrokerProcess().start()
        self.addCleanup(broker.cleanup)
        first = broker.log_path
        broker.restart()
        self.assertEqual(broker.log_path, first)
        broker.stop()
        self.assertEqual(broker.log().count("Server Shut Down"), 2)
        broker.cleanup()
        self.assertFalse(os.path.exists(first))

    def test_json_logs(self):
        """--log-format json: one JSON event a line, with its structured fields."""
        import json

        broker = BrokerProcess("--log-format", "json").start()
        self.addCleanup(broker.cleanup)
        done = subprocess.run([sys.executable, "-m", "zaichik.cli", "--server", broker.address,
                               "create", "logged.topic"], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertEqual(done.returncode, 0, done.stderr)
        broker.stop()
        events = [json.loads(line) for line in broker.log().splitlines() if line.strip()]
        created = [e for e in events if e.get("topic") == "logged.topic"]
        self.assertEqual(len(created), 1, events)
        self.assertEqual(created[0]["namespace"], "zaichik.service")
        self.assertIn("logged.topic", created[0]["message"])
        self.assertFalse([key for event in events for key in event if key.startswith("log_")])

    def test_bad_option_refused(self):
        done = subprocess.run(TWISTD + ["-n", "zaichik", "--default-retention", "soon"],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              capture_output=True, text=True, timeout=60)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("not a duration", done.stdout + done.stderr)


class IdleTimeoutTests(BrokerTestCase):
    """The broker closes quiet connections; the client library's keepalive prevents it."""

    broker_options = ("--idle-timeout", "2s")

    @async_test
    async def test_keepalive_keeps_a_listener_connected(self):
        from twisted.internet.task import deferLater

        # The quiet one is waited for, not looked at a fixed 1.6 s after a 1 s
        # timeout (0.6 s for its close to arrive); the other's PINGs every
        # 0.2 s keep it open through stalls of up to 1.8 s (were 0.7 s).
        kept = await self.connect(keepalive=0.2)
        quiet = await self.connect(keepalive=0)
        errors = []
        quiet.on_error = errors.append
        for _ in range(100):
            if quiet.closed.called:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(quiet.closed.called)
        self.assertEqual([e.code for e in errors], [ErrorCode.LIMIT])
        self.assertFalse(kept.closed.called)
        self.assertIsNone(await kept.ping())
