"""
Unit tests of L{zaichik.service.BrokerService}: topics and their defaults,
CREATE_TOPIC's idempotence and TOPIC_EXISTS, listing, the retention sweep
(a LoopingCall on a L{Clock}), the service lifecycle, durable commits and
the takeover of a durable client id.
"""

from __future__ import annotations

from typing import List

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zaichik.codec import ErrorCode, TopicInfo
from zaichik.errors import ZaichikError
from zaichik.service import BrokerService, Limits
from zaichik.storage.memory import MemoryStorage
from zaichik.topic import ISubscriber, Topic
from zope.interface import implementer

T0 = 1_700_000_000
T0_MS = T0 * 1000


@implementer(ISubscriber)
class Recorder:
    def __init__(self) -> None:
        self.firsts: List[int] = []

    def deliver(self, first_offset, frames):
        self.firsts.append(first_offset)


class FakeSession:
    def __init__(self) -> None:
        self.taken = 0

    def taken_over(self) -> None:
        self.taken += 1


class ServiceCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def at(self, ms: int) -> None:
        now_ms = round(self.clock.seconds() * 1000)
        self.clock.advance((T0_MS + ms - now_ms) / 1000)

    def service(self, **kwargs) -> BrokerService:
        return BrokerService(clock=self.clock, **kwargs)


class TopicTests(ServiceCase):
    def test_auto_create_takes_the_defaults(self):
        service = self.service(default_retention=5_000, default_compaction_window=700)
        self.assertEqual(service.topics, {})
        topic = service.topic("auto")
        self.assertIsInstance(topic, Topic)
        self.assertEqual((topic.name, topic.retention_ttl, topic.compaction_window), ("auto", 5_000, 700))
        self.assertIs(service.topic("auto"), topic)  # created once
        self.assertEqual(list(service.topics), ["auto"])

    def test_defaults_are_zero_unless_set(self):
        topic = self.service().topic("plain")
        self.assertEqual((topic.retention_ttl, topic.compaction_window, topic.next_offset), (0, 0, 0))

    def test_existing_topic_keeps_its_settings_on_auto_use(self):
        service = self.service(default_retention=5_000)
        created = service.create_topic("t", 100, 10)
        self.assertIs(service.topic("t"), created)
        self.assertEqual((created.retention_ttl, created.compaction_window), (100, 10))

    def test_create_topic_is_idempotent(self):
        service = self.service()
        topic = service.create_topic("t", 1_000, 200)
        topic.publish(None, b"x")
        again = service.create_topic("t", 1_000, 200)
        self.assertIs(again, topic)
        self.assertEqual(again.next_offset, 1)  # nothing reset
        self.assertEqual(len(service.topics), 1)

    def test_topic_exists_with_other_settings_changes_nothing(self):
        service = self.service()
        topic = service.create_topic("t", 1_000, 200)
        for ttl, window in [(2_000, 200), (1_000, 300), (0, 0)]:
            error = self.assertRaises(ZaichikError, service.create_topic, "t", ttl, window)
            self.assertEqual(error.code, ErrorCode.TOPIC_EXISTS)
            self.assertEqual(int(error.code), 5)
        self.assertIs(service.topics["t"], topic)
        self.assertEqual((topic.retention_ttl, topic.compaction_window), (1_000, 200))

    def test_auto_created_topic_then_create_with_other_settings(self):
        service = self.service()
        service.topic("t")  # defaults 0/0
        error = self.assertRaises(ZaichikError, service.create_topic, "t", 1, 0)
        self.assertEqual(error.code, ErrorCode.TOPIC_EXISTS)
        self.assertEqual(service.create_topic("t", 0, 0).retention_ttl, 0)

    def test_topic_limit(self):
        service = self.service(limits=Limits(max_topics=2))
        service.topic("a")
        service.create_topic("b", 0, 0)
        error = self.assertRaises(ZaichikError, service.topic, "c")
        self.assertEqual(error.code, ErrorCode.LIMIT)
        self.assertEqual(sorted(service.topics), ["a", "b"])

    def test_max_retained_bytes_limit_applies_to_topics(self):
        service = self.service(limits=Limits(max_retained_bytes=200))
        topic = service.create_topic("t", 60_000, 0)
        self.assertEqual(topic.max_retained_bytes, 200)
        for _ in range(10):
            topic.publish(None, b"x" * 50)
        self.assertLessEqual(topic.retained_bytes, 200)
        self.assertGreater(topic.retained, 0)
        self.assertEqual(topic.oldest_offset() + topic.retained, 10)  # the newest are kept

    def test_list_topics_sorted_with_fields(self):
        service = self.service(default_retention=60_000)
        zeta = service.create_topic("zeta", 0, 0)
        alpha = service.create_topic("alpha", 1_000, 50)
        mid = service.topic("m/id")
        self.assertEqual(service.list_topics()[0].name, "alpha")
        alpha.publish(None, b"1")
        self.at(600)
        alpha.publish(None, b"2")
        alpha.publish(b"k", b"3")
        alpha.publish(b"k", b"dup")  # dropped: takes no offset
        zeta.publish(None, b"gone")
        mid.subscribe(Recorder())
        mid.subscribe(Recorder())
        zeta.subscribe(Recorder())
        self.assertEqual(service.list_topics(), [
            TopicInfo("alpha", 1_000, 50, 3, 3, 0),
            TopicInfo("m/id", 60_000, 0, 0, 0, 2),
            TopicInfo("zeta", 0, 0, 1, 0, 1),
        ])
        self.at(1_000)  # alpha's first message expires
        self.assertEqual(service.list_topics()[0], TopicInfo("alpha", 1_000, 50, 3, 2, 0))

    def test_list_topics_empty(self):
        self.assertEqual(self.service().list_topics(), [])


class SweepTests(ServiceCase):
    def test_start_and_stop(self):
        service = self.service(sweep_interval=1.0)
        self.assertFalse(service.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        service.startService()
        self.assertTrue(service.running)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        service.stopService()
        self.assertFalse(service.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sweep_expires_on_schedule(self):
        service = self.service(sweep_interval=1.0)
        topic = service.create_topic("t", 1_500, 0)
        topic.publish(None, b"x")  # ts 0
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(1)  # sweep at 1000 ms: still retained
        self.assertEqual(topic.retained, 1)
        self.clock.advance(1)  # sweep at 2000 ms: expired (without any read)
        self.assertEqual(topic.retained, 0)
        self.assertEqual(topic.expired, 1)

    def test_sweep_not_run_before_start_or_after_stop(self):
        service = self.service(sweep_interval=1.0)
        topic = service.create_topic("t", 100, 0)
        topic.publish(None, b"x")
        self.clock.advance(5)
        self.assertEqual(topic.retained, 1)  # nothing swept: not started
        service.startService()
        service.stopService()
        topic.publish(None, b"y")
        self.clock.advance(5)
        self.assertEqual(topic.retained, 2)  # stopped: nothing swept

    def test_sweep_returns_the_count(self):
        service = self.service()
        a = service.create_topic("a", 10, 0)
        b = service.create_topic("b", 10, 0)
        a.publish(None, b"1")
        a.publish(None, b"2")
        b.publish(None, b"3")
        self.at(10)
        self.assertEqual(service.sweep(), 3)
        self.assertEqual(service.sweep(), 0)

    def test_sweep_survives_a_topic_whose_expire_raises(self):
        service = self.service(sweep_interval=1.0)
        before = service.create_topic("a-before", 500, 0)
        broken = service.create_topic("broken", 500, 0)
        after = service.create_topic("z-after", 500, 0)
        calls = []

        def explode():
            calls.append(True)
            raise RuntimeError("expire broke")

        broken.expire = explode
        service.startService()
        self.addCleanup(service.stopService)
        for interval in range(1, 6):
            before.publish(None, b"x")
            after.publish(None, b"x")
            self.assertEqual((before.retained, after.retained), (1, 1))
            self.clock.advance(1)  # one sweep
            self.assertEqual((before.retained, after.retained), (0, 0), f"sweep {interval}")
            self.assertEqual(len(calls), interval)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(service._sweeper.running)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_sweep_shrinks_the_compaction_key_map(self):
        service = self.service(sweep_interval=1.0)
        topic = service.create_topic("t", 0, 2_000)
        service.startService()
        self.addCleanup(service.stopService)
        for i in range(3_000):
            topic.publish(b"k%d" % i, b"v")
        self.assertEqual(len(topic._keys), 3_000)
        self.clock.advance(1)  # sweep at 1 s: still inside the window
        self.assertEqual(len(topic._keys), 3_000)
        for i in range(3_000, 4_000):
            topic.publish(b"k%d" % i, b"v")  # stored at 1000 ms
        self.clock.advance(1)  # sweep at 2 s: the first 3000 are past their window
        self.assertEqual(len(topic._keys), 1_000)
        self.assertEqual(len(topic._key_order), 1_000)
        self.clock.advance(1)  # sweep at 3 s: the rest
        self.assertEqual((len(topic._keys), len(topic._key_order)), (0, 0))


class DurableTests(ServiceCase):
    def test_record_commit_and_committed(self):
        service = self.service()
        self.assertIsNone(service.committed("c1", "t"))
        service.record_commit("c1", "t", 4)
        service.record_commit("c1", "u", 0)
        service.record_commit("c2", "t", 9)
        self.assertEqual(service.committed("c1", "t"), 4)
        self.assertEqual(service.committed("c1", "u"), 0)
        self.assertEqual(service.committed("c2", "t"), 9)
        self.assertIsNone(service.committed("c2", "u"))
        service.record_commit("c1", "t", 7)
        self.assertEqual(service.committed("c1", "t"), 7)
        self.assertEqual(service.durable_positions(), {"c1": {"t": 7, "u": 0}, "c2": {"t": 9}})

    def test_commits_live_in_the_storage(self):
        storage = MemoryStorage()
        first = self.service(storage=storage)
        first.record_commit("c", "t", 3)
        second = self.service(storage=storage)  # same storage, a new broker
        self.assertEqual(second.committed("c", "t"), 3)

    def test_attach_same_client_id_takes_over(self):
        service = self.service()
        a, b, c = FakeSession(), FakeSession(), FakeSession()
        service.attach("worker", a)
        self.assertEqual(a.taken, 0)
        service.attach("worker", a)  # the same session again: no takeover
        self.assertEqual(a.taken, 0)
        service.attach("worker", b)
        self.assertEqual((a.taken, b.taken), (1, 0))
        service.attach("worker", c)
        self.assertEqual((a.taken, b.taken, c.taken), (1, 1, 0))

    def test_attach_other_client_ids_independent(self):
        service = self.service()
        a, b = FakeSession(), FakeSession()
        service.attach("one", a)
        service.attach("two", b)
        self.assertEqual((a.taken, b.taken), (0, 0))

    def test_detach(self):
        service = self.service()
        a, b, c = FakeSession(), FakeSession(), FakeSession()
        service.attach("worker", a)
        service.detach("worker", a)
        service.attach("worker", b)
        self.assertEqual(a.taken, 0)  # a had left
        service.detach("worker", a)  # a stale detach does not unbind b
        service.attach("worker", c)
        self.assertEqual(b.taken, 1)
