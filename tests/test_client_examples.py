"""
The clients' examples (examples/fastapi_app.py, examples/sync_worker.py, as
docs/clients.rst shows them) against a real broker; what the asyncio and
blocking clients promise beyond the shared suite (no Twisted, uvloop,
thread-safe publishing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import unittest
import uuid

from zaichik.testing import ROOT, shared_broker

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def run_python(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60,
                          env=env or ENV, cwd=ROOT)


class ExampleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.broker = shared_broker()
        self.env = dict(ENV, PORT=str(self.broker.port), ZAICHIK_SERVER=self.broker.address)

    def test_fastapi_app(self):
        """POST publishes; the background subscriber receives (run twice: it
        uses topics of its own run)."""
        try:
            import fastapi  # noqa: F401
            import httpx  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("fastapi and httpx are in the [test] extra")
        for _ in range(2):
            done = run_python(os.path.join("examples", "fastapi_app.py"), env=self.env)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertIn("received: [{'item': 'tea'}, {'item': 'cake'}]", done.stdout)
            self.assertIn("fastapi_app: OK", done.stdout)

    def test_sync_worker(self):
        for _ in range(2):
            done = run_python(os.path.join("examples", "sync_worker.py"), env=self.env)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertIn("worker: job 3 (offset 3)", done.stdout)
            self.assertIn("sync_worker: OK", done.stdout)

    def test_work_queue(self):
        """Three workers in a group, one dies mid-way: every job is done, and
        what it had in hand is redelivered (run twice: topics of its own run)."""
        for _ in range(2):
            done = run_python(os.path.join("examples", "work_queue.py"), env=self.env)
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertIn("worker-2: dies with job", done.stdout)
            self.assertIn("every job processed at least once: True; redelivered: 1 (processed twice: 1",
                          done.stdout)
            self.assertIn("work_queue: OK", done.stdout)


class NoTwistedTests(unittest.TestCase):
    def test_aio_and_sync_import_no_twisted(self):
        done = run_python("-c", "import sys, zaichik.aio, zaichik.sync, zaichik.cli\n"
                                "print(sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "[]"), done.stderr)

    def test_names(self):
        """The three clients have the same methods."""
        import zaichik.aio
        import zaichik.client
        import zaichik.sync

        methods = {"hello", "create_topic", "publish", "publish_nowait", "publish_batch", "subscribe",
                   "subscribe_group", "ack", "commit", "unsubscribe", "ping", "list_topics", "close", "abort",
                   "client_id", "close_reason", "is_closed", "server", "on_error"}
        subscription = {"topic", "group", "is_pattern", "active", "committed", "committed_offsets", "get",
                        "commit", "ack", "unsubscribe"}
        for module in (zaichik.client, zaichik.aio, zaichik.sync):
            self.assertEqual(methods - set(dir(module.Client)) - {"on_error"}, set(), module)
            self.assertEqual(subscription - set(dir(module.Subscription)) - {"topic"}, set(), module)
            for name in ("Start", "ZaichikError", "ErrorCode", "Message", "PublishResult", "TopicInfo",
                         "ConnectionLostError", "RequestTimeout", "ConnectTimeout", "connect"):
                self.assertTrue(hasattr(module, name), (module, name))


class SyncThreadTests(unittest.TestCase):
    def test_publish_from_many_threads(self):
        """One client, eight threads publishing (fire-and-forget and acknowledged)."""
        from zaichik.sync import Start, connect

        broker = shared_broker()
        topic = f"threads-{uuid.uuid4().hex[:8]}"
        with connect(broker.address, keepalive=0) as client:
            client.create_topic(topic, retention_ttl=60_000)
            offsets = []

            def work(n: int) -> None:
                for i in range(250):
                    client.publish_nowait(topic, b"%d-%d" % (n, i))
                offsets.append(client.publish(topic, b"%d-done" % n).offset)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            self.assertEqual(len(offsets), 8)
            client.ping()
            with client.subscribe(topic, start=Start.EARLIEST) as subscription:
                values = [subscription.get(10).value for _ in range(8 * 251)]
        self.assertEqual(len(set(values)), 8 * 251)
        for n in range(8):   # each thread's messages in its order
            mine = [v for v in values if v.startswith(b"%d-" % n)]
            self.assertEqual(mine, [b"%d-%d" % (n, i) for i in range(250)] + [b"%d-done" % n])

    def test_callback_may_call_the_client(self):
        """A blocking client's callback runs on a thread of its own, and may commit."""
        from zaichik.sync import Start, connect

        broker = shared_broker()
        topic = f"cb-{uuid.uuid4().hex[:8]}"
        done = threading.Event()
        with connect(broker.address, keepalive=0) as client:
            def callback(message) -> None:
                client.commit(message.topic, message.offset)
                if message.offset == 2:
                    done.set()

            subscription = client.subscribe(topic, callback, start=Start.LATEST, max_inflight=1)
            client.publish_batch(topic, [(None, b"a"), (None, b"b"), (None, b"c")])
            self.assertTrue(done.wait(10))
            self.assertEqual(subscription.committed, 2)

    def test_get_timeout(self):
        from zaichik.sync import Start, connect

        broker = shared_broker()
        with connect(broker.address, keepalive=0) as client:
            subscription = client.subscribe(f"quiet-{uuid.uuid4().hex[:8]}", start=Start.LATEST)
            with self.assertRaises(TimeoutError):
                subscription.get(timeout=0.05)
            client.publish(subscription.topic, b"x")
            self.assertEqual(subscription.get(timeout=10).value, b"x")
