"""
The metrics endpoint: the collector after a known workload (in memory), and
a real broker's /metrics and /healthz over HTTP, parsed by prometheus_client's
own parser.
"""

from __future__ import annotations

import re
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zaichik.client import Start, connect
from zaichik.codec import ErrorCode
from zaichik.errors import ZaichikError
from zaichik.metrics import BrokerCollector
from zaichik.service import BrokerService
from zaichik.testing import shared_broker


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} from the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, frozenset(labels.items()))]


class CollectorTests(SynchronousTestCase):
    def test_known_workload(self):
        clock = Clock()
        clock.advance(1_000)
        service = BrokerService(clock=clock)
        topic = service.create_topic("orders", retention_ttl=10_000, compaction_window=5_000)
        for key in (b"a", b"a", b"b", None):
            topic.publish(key, b"v")
        service.topic("other").publish(None, b"w")
        service.record_commit("worker", "orders", 0)
        service.stats.error(ErrorCode.BAD_TOPIC)
        clock.advance(11)  # everything in "orders" expires
        service.sweep()

        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(service))
        metrics = samples(generate_latest(registry).decode())
        self.assertEqual(value(metrics, "zaichik_topics"), 2)
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="orders"), 3)
        self.assertEqual(value(metrics, "zaichik_duplicates_dropped_total", topic="orders"), 1)
        self.assertEqual(value(metrics, "zaichik_messages_expired_total", topic="orders"), 3)
        self.assertEqual(value(metrics, "zaichik_retained_messages", topic="orders"), 0)
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="other"), 1)
        self.assertEqual(value(metrics, "zaichik_commit_lag", client_id="worker", topic="orders"), 2)
        self.assertEqual(value(metrics, "zaichik_errors_total", code="BAD_TOPIC"), 1)
        self.assertEqual(value(metrics, "zaichik_errors_total", code="LIMIT"), 0)


    def topics_service(self, count: int) -> BrokerService:
        """A broker with C{count} topics t0000, t0001, ...; topic tN has N % 7 + 1 messages."""
        clock = Clock()
        clock.advance(1_000)
        service = BrokerService(clock=clock)
        for n in range(count):
            topic = service.create_topic(f"t{n:04d}", retention_ttl=60_000, compaction_window=0)
            for _ in range(n % 7 + 1):
                topic.publish(None, b"v")
        return service

    def collect(self, service: BrokerService, **kwargs) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(service, **kwargs))
        return generate_latest(registry).decode()

    def test_per_topic_series_are_capped(self):
        """
        2,000 topics, the default cap of 1,000: the first 1,000 by name have
        series of their own, the other 1,000 are summed in topic="_other".
        """
        from zaichik.metrics import DEFAULT_MAX_TOPICS

        self.assertEqual(DEFAULT_MAX_TOPICS, 1000)
        service = self.topics_service(2_000)
        service.record_commit("worker", "t0001", 0)
        service.record_commit("worker", "t1999", 0)
        text = self.collect(service)
        metrics = samples(text)
        for family in ("zaichik_messages_in_total", "zaichik_messages_out_total",
                       "zaichik_duplicates_dropped_total", "zaichik_messages_expired_total",
                       "zaichik_retained_messages", "zaichik_retained_bytes", "zaichik_subscribers"):
            topics = [dict(labels)["topic"] for name, labels in metrics if name == family]
            self.assertEqual(len(topics), 1_001, family)
            self.assertEqual(set(topics), {f"t{n:04d}" for n in range(1_000)} | {"_other"}, family)
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="t0005"), 6)
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="_other"),
                         sum(n % 7 + 1 for n in range(1_000, 2_000)))
        self.assertEqual(value(metrics, "zaichik_retained_messages", topic="_other"),
                         sum(n % 7 + 1 for n in range(1_000, 2_000)))
        self.assertEqual(value(metrics, "zaichik_topics"), 2_000)
        self.assertEqual(value(metrics, "zaichik_metrics_topics_other"), 1_000)
        # commit lag: by client and topic for the topics shown, the rest summed
        self.assertEqual(value(metrics, "zaichik_commit_lag", client_id="worker", topic="t0001"), 1)
        self.assertEqual(value(metrics, "zaichik_commit_lag", client_id="_other", topic="_other"),
                         1999 % 7 + 1 - 1)
        self.assertLess(len(text), 1_000 * 8 * 80)  # about 1,000 lines of 80 bytes for each family

    def test_cap_option(self):
        service = self.topics_service(30)
        metrics = samples(self.collect(service, max_topics=10))
        topics = {dict(labels)["topic"] for name, labels in metrics if name == "zaichik_messages_in_total"}
        self.assertEqual(topics, {f"t{n:04d}" for n in range(10)} | {"_other"})
        metrics = samples(self.collect(service, max_topics=0))
        topics = {dict(labels)["topic"] for name, labels in metrics if name == "zaichik_messages_in_total"}
        self.assertEqual(topics, {"_other"})
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="_other"),
                         sum(n % 7 + 1 for n in range(30)))

    def test_under_the_cap_no_other(self):
        metrics = samples(self.collect(self.topics_service(5), max_topics=5))
        topics = {dict(labels)["topic"] for name, labels in metrics if name == "zaichik_messages_in_total"}
        self.assertEqual(topics, {f"t{n:04d}" for n in range(5)})
        self.assertEqual(value(metrics, "zaichik_metrics_topics_other"), 0)

    def test_a_topic_named_other_is_counted_in_other(self):
        """A real topic called _other never has a series of its own (it would clash): it is in the sum."""
        service = self.topics_service(3)
        service.topic("_other").publish(None, b"x")
        metrics = samples(self.collect(service, max_topics=10))
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="_other"), 1)
        self.assertEqual(value(metrics, "zaichik_metrics_topics_other"), 1)

    def test_storage_counters(self):
        """Damage found on disk, torn tails, refused appends and the cache are counted."""
        import os
        import shutil
        import tempfile

        from twisted.internet.defer import fail, maybeDeferred

        from zaichik.storage import StorageError
        from zaichik.storage.disk import DiskStorage

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        clock = Clock()
        clock.advance(1_000)
        storage = DiskStorage(directory, fsync="never", clock=clock, run_blocking=maybeDeferred)
        service = BrokerService(storage=storage, clock=clock)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        topic = service.create_topic("orders", retention_ttl=60_000, compaction_window=0)
        topic.publish(None, b"stored")
        storage.damaged, storage.torn = 2, 1
        log = topic._log
        self.patch(log, "append", lambda first, frames: fail(StorageError("disk full", full=True)))
        topic.publish(None, b"refused")

        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(service))
        metrics = samples(generate_latest(registry).decode())
        self.assertEqual(value(metrics, "zaichik_storage_damaged_total"), 2)
        self.assertEqual(value(metrics, "zaichik_storage_torn_tails_total"), 1)
        self.assertEqual(value(metrics, "zaichik_store_errors_total", topic="orders"), 1)
        self.assertGreater(value(metrics, "zaichik_storage_cache_bytes"), 0)
        self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="orders"), 1)
        self.assertTrue(os.listdir(directory))
        self.assertNotIn(("zaichik_write_queue_bytes", frozenset()), metrics)  # (written on the reactor thread)

    def test_write_queue(self):
        """With the disk's writer thread, the bytes waiting to be written."""
        import shutil
        import tempfile

        from twisted.internet.defer import maybeDeferred

        from zaichik.storage.disk import DiskStorage

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory, True)
        storage = DiskStorage(directory, fsync="never", clock=Clock(), run_blocking=maybeDeferred,
                              call_from_thread=lambda f: None)
        service = BrokerService(storage=storage, clock=Clock())
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(service))
        self.assertEqual(value(samples(generate_latest(registry).decode()), "zaichik_write_queue_bytes"), 0)
        storage.writer.queued = 1234  # (as while the thread is behind)
        self.assertEqual(value(samples(generate_latest(registry).decode()), "zaichik_write_queue_bytes"),
                         1234)
        storage.writer.queued = 0


    def test_groups_and_patterns(self):
        """Issue 13: per group lag, outstanding, members, redeliveries; per pattern subscriptions."""
        from zaichik import codec
        from zaichik.session import Session

        clock = Clock()
        clock.advance(1_000)
        service = BrokerService(clock=clock)
        topic = service.create_topic("jobs", retention_ttl=60_000, compaction_window=0)
        for _ in range(5):
            topic.publish(None, b"job")
        replies = []
        worker = Session(service, replies.append, lambda frames: None, lambda: None)
        worker.handle(codec.SubscribeGroup(1, "jobs", "workers", codec.Start.EARLIEST, 0, 2, 1_000))
        watcher = Session(service, replies.append, lambda frames: None, lambda: None)
        watcher.handle(codec.Subscribe(2, "sensors.>"))
        other = Session(service, replies.append, lambda frames: None, lambda: None)
        other.handle(codec.Subscribe(3, "sensors.>"))
        clock.advance(1.5)  # the two outstanding jobs time out and are sent again
        self.assertEqual(replies, [codec.Ok(1), codec.Ok(2), codec.Ok(3)])

        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(service))
        metrics = samples(generate_latest(registry).decode())
        self.assertEqual(value(metrics, "zaichik_group_lag", topic="jobs", group="workers"), 5)
        self.assertEqual(value(metrics, "zaichik_group_outstanding", topic="jobs", group="workers"), 2)
        self.assertEqual(value(metrics, "zaichik_group_members", topic="jobs", group="workers"), 1)
        self.assertEqual(value(metrics, "zaichik_group_redeliveries_total", topic="jobs", group="workers"), 2)
        self.assertEqual(value(metrics, "zaichik_pattern_subscriptions", pattern="sensors.>"), 2)


class EndpointTests(TestCase):
    def setUp(self) -> None:
        # On a port the kernel picks, read from the broker's log: a free port
        # picked when the module was imported (at collection) could be another
        # listener's by the time these tests ran.
        self.broker = shared_broker("--metrics-port", "tcp:0:interface=127.0.0.1")
        listening = re.search(r"Serving /metrics.* on 127\.0\.0\.1:(\d+) ", self.broker.log())
        assert listening is not None, self.broker.log()
        self.metrics_port = int(listening.group(1))

    def fetch(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10) as r:
            return r.read().decode()

    def test_metrics_after_workload(self):
        async def workload():
            client = await connect(reactor, self.broker.address, client_id="m-reader", keepalive=0)
            await client.create_topic("m.topic", retention_ttl=60_000, compaction_window=60_000)
            subscription = await client.subscribe("m.topic", start=Start.EARLIEST)
            await client.publish_batch("m.topic", [(b"k1", b"x"), (b"k1", b"y"), (b"k2", b"z")])
            for _ in range(2):
                await subscription.get()
            await client.commit("m.topic", 0)
            try:
                await client.publish("bad topic", b"x")
            except ZaichikError:
                pass
            await client.close()

        def check(_):
            metrics = samples(self.fetch("/metrics"))
            self.assertEqual(value(metrics, "zaichik_messages_in_total", topic="m.topic"), 2)
            self.assertEqual(value(metrics, "zaichik_messages_out_total", topic="m.topic"), 2)
            self.assertEqual(value(metrics, "zaichik_duplicates_dropped_total", topic="m.topic"), 1)
            self.assertEqual(value(metrics, "zaichik_retained_messages", topic="m.topic"), 2)
            self.assertGreater(value(metrics, "zaichik_retained_bytes", topic="m.topic"), 0)
            self.assertEqual(value(metrics, "zaichik_commit_lag", client_id="m-reader", topic="m.topic"), 1)
            self.assertGreaterEqual(value(metrics, "zaichik_errors_total", code="BAD_TOPIC"), 1)
            self.assertGreater(value(metrics, "zaichik_bytes_in_total"), 0)
            self.assertGreater(value(metrics, "zaichik_bytes_out_total"), 0)

        return ensureDeferred(workload()).addCallback(check)

    def test_healthz(self):
        self.assertEqual(self.fetch("/healthz"), "ok\n")
