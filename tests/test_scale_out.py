"""
Several brokers on one Redis (and on a Redis Cluster), with real parts: a
real redis-server on a loopback port, real twistd brokers, the blocking
client.  The faults the scale-out issue names: a broker killed under a
publishing load (clients fail over, nothing acknowledged is lost, no offset
is given twice), Redis restarted with appendonly + appendfsync always
(nothing acknowledged lost), Redis restarted without persistence (detected,
no offset reused), a pub/sub connection killed (the broker hears again and
catches up).  The protocol's own rules across nodes are
tests/test_conformance_nodes.py.
"""

from __future__ import annotations

import atexit
import time
import unittest
import uuid
from typing import Dict, List

from zaichik.codec import Start
from zaichik.errors import ZaichikError
from zaichik.sync import connect
from zaichik.testing import BrokerProcess, RedisCluster, RedisServer, have_redis


def _topic(prefix: str = "so") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def read_all(address: str, topic: str, expected: int, timeout: float = 10.0) -> List:
    """Every retained message of C{topic}, read from its start on a new connection."""
    client = connect(address)
    try:
        subscription = client.subscribe(topic, start=Start.EARLIEST)
        messages = []
        deadline = time.monotonic() + timeout
        while len(messages) < expected and time.monotonic() < deadline:
            try:
                messages.append(subscription.get(timeout=max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                break
        return messages
    finally:
        client.close()


class RedisTestCase(unittest.TestCase):
    """A Redis and brokers on it, made per test and stopped after it."""

    persistent = False

    def setUp(self) -> None:
        if not have_redis():
            raise unittest.SkipTest("redis-server is not installed (.ci/run installs it)")
        self.redis = RedisServer(persistent=self.persistent).start()
        self.addCleanup(self.redis.cleanup)

    def broker(self, *options: str) -> BrokerProcess:
        broker = BrokerProcess("--engine", self.redis.url, *options).start()
        self.addCleanup(broker.cleanup)
        return broker

    def client(self, *args, **kwargs):
        client = connect(*args, **kwargs)
        self.addCleanup(client.close)
        return client

    @staticmethod
    def publish_retrying(client, topic: str, value: bytes, seconds: float = 10, **kwargs):
        """Publish until the broker takes it (Redis coming back), for at most C{seconds}."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                return client.publish(topic, value, **kwargs)
            except ZaichikError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


class NodeDiesTests(RedisTestCase):

    def test_node_killed_under_load(self) -> None:
        """
        kill -9 of the node a publisher and a durable subscriber use: both
        fail over to the other node; every acknowledged message is there,
        at the offset it was acknowledged with, and no offset holds two
        messages; the subscriber resumes after what it committed.
        """
        a, b = self.broker(), self.broker()
        topic = _topic()
        servers = [f"tcp:{a.address}", f"tcp:{b.address}"]
        publisher = self.client(servers, reconnect=True, request_timeout=10)
        publisher.create_topic(topic, retention_ttl=600_000)
        subscriber = self.client(servers, client_id="sub-" + topic, reconnect=True)
        subscription = subscriber.subscribe(topic)
        acked: Dict[int, bytes] = {}
        received: Dict[int, bytes] = {}

        def receive(until: int) -> None:
            while len(received) < until:
                message = subscription.get(timeout=10)
                assert message is not None
                if message.offset in received:
                    self.assertEqual(received[message.offset], message.value)
                received[message.offset] = message.value
                subscription.commit(message.offset)

        for i in range(300):
            value = b"m%d" % i
            if i == 150:
                a.process.kill()  # (kill -9)
                a.process.wait()
            try:
                result = publisher.publish(topic, value)
            except (ZaichikError, ConnectionError, TimeoutError):
                continue  # not acknowledged: it may or may not be stored
            self.assertNotIn(result.offset, acked, "an offset given twice")
            acked[result.offset] = value
            if i == 100:
                receive(len(acked))
        self.assertGreater(len(acked), 250)
        receive(len(acked))
        for offset, value in acked.items():
            self.assertEqual(received.get(offset), value, f"offset {offset}")
        stored = read_all(b.address, topic, len(acked) + 50, timeout=3)
        offsets = [m.offset for m in stored]
        self.assertEqual(len(offsets), len(set(offsets)))
        self.assertEqual(offsets, sorted(offsets))
        by_offset = {m.offset: m.value for m in stored}
        for offset, value in acked.items():
            self.assertEqual(by_offset.get(offset), value)


class PersistentRedisRestartTests(RedisTestCase):

    persistent = True  # appendonly yes, appendfsync always

    def test_nothing_acknowledged_lost(self) -> None:
        """kill -9 of Redis with appendfsync always, and a start: every acknowledged message is still there."""
        a, b = self.broker(), self.broker()
        topic = _topic()
        publisher = self.client(f"tcp:{a.address}")
        publisher.create_topic(topic, retention_ttl=600_000, compaction_window=600_000)
        acked = {publisher.publish(topic, b"v%d" % i, key=b"k%d" % i).offset: b"v%d" % i for i in range(50)}
        self.redis.stop(kill=True)
        self.redis.start()
        result = self.publish_retrying(publisher, topic, b"after")
        self.assertEqual(result.offset, 50)  # nothing lost: no jump
        # Compaction decisions survived too.
        self.assertTrue(publisher.publish(topic, b"again", key=b"k3").duplicate)
        stored = read_all(b.address, topic, 51)
        self.assertEqual({m.offset: m.value for m in stored[:50]}, acked)
        self.assertEqual(stored[50].value, b"after")


class VolatileRedisRestartTests(RedisTestCase):

    persistent = False

    def test_lost_data_detected_and_offsets_not_reused(self) -> None:
        """
        Redis restarted empty: the next publish is far past every offset
        given before (none is reused), and the broker says so in its log.
        """
        a, b = self.broker(), self.broker()
        topic = _topic()
        publisher = self.client(f"tcp:{a.address}")
        publisher.create_topic(topic, retention_ttl=600_000)
        before = [publisher.publish(topic, b"v%d" % i).offset for i in range(20)]
        other = self.client(f"tcp:{b.address}")
        subscription = other.subscribe(topic, start=Start.LATEST)
        self.redis.restart()  # everything gone
        result = self.publish_retrying(other, topic, b"after")
        self.assertGreater(result.offset, max(before) + 1)
        self.assertGreaterEqual(result.offset, 1_000_000)
        message = subscription.get(timeout=5)
        self.assertEqual((message.offset, message.value), (result.offset, b"after"))
        self.assertIn("had lost topic", b.log() + a.log())
        # And the other broker does not hand out the lost offsets either.
        self.assertGreater(publisher.publish(topic, b"a again").offset, result.offset)


class LivenessTests(RedisTestCase):

    def test_pubsub_connection_killed(self) -> None:
        """
        Redis drops a broker's pub/sub connection (CLIENT KILL): the broker
        connects again, and what was published meanwhile reaches its
        subscribers, in order.
        """
        a, b = self.broker(), self.broker()
        topic = _topic()
        publisher = self.client(f"tcp:{a.address}")
        publisher.create_topic(topic, retention_ttl=600_000)
        subscriber = self.client(f"tcp:{b.address}")
        subscription = subscriber.subscribe(topic, start=Start.LATEST)
        publisher.publish(topic, b"first")
        self.assertEqual(subscription.get(timeout=5).value, b"first")
        self.redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        for i in range(20):
            publisher.publish(topic, b"m%d" % i)
        got = [subscription.get(timeout=5) for _ in range(20)]
        self.assertEqual([m.value for m in got], [b"m%d" % i for i in range(20)])
        self.assertEqual([m.offset for m in got], list(range(1, 21)))

    def test_takeover_across_nodes(self) -> None:
        """A HELLO with a client_id on node B closes the connection that had it on node A."""
        a, b = self.broker(), self.broker()
        first = self.client(f"tcp:{a.address}", client_id="c-" + uuid.uuid4().hex)
        self.client(f"tcp:{b.address}", client_id=first.client_id)
        self.assertTrue(first.wait_closed(timeout=5))


class GroupTests(RedisTestCase):

    def test_group_served_by_one_broker(self) -> None:
        """
        A consumer group's members on one broker share its messages; a
        member on another broker is refused (LIMIT) while the group is
        served elsewhere; once that broker is gone, the group moves (after
        its lease lapses) and resumes from its recorded position.
        """
        a, b = self.broker("--sweep-interval", "200"), self.broker("--sweep-interval", "200")
        topic = _topic("grp")
        publisher = self.client(f"tcp:{a.address}")
        publisher.create_topic(topic, retention_ttl=600_000)
        for i in range(6):
            publisher.publish(topic, b"%d" % i)
        first, second = self.client(f"tcp:{a.address}"), self.client(f"tcp:{a.address}")
        m1 = first.subscribe_group(topic, "workers", max_inflight=1)
        m2 = second.subscribe_group(topic, "workers", max_inflight=1)
        got = []
        for member in (m1, m2, m1, m2):
            message = member.get(timeout=5)
            got.append(message.offset)
            member.ack(message.offset)
        self.assertEqual(sorted(got[:2]), [0, 1])
        elsewhere = self.client(f"tcp:{b.address}")
        with self.assertRaises(ZaichikError) as refused:
            elsewhere.subscribe_group(topic, "workers")
        self.assertEqual(refused.exception.code, 11)  # LIMIT
        a.process.kill()
        a.process.wait()
        deadline = time.monotonic() + 20
        while True:
            try:
                moved = elsewhere.subscribe_group(topic, "workers")
                break
            except ZaichikError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        rest = sorted(moved.get(timeout=5).offset for _ in range(2))
        self.assertEqual(rest, [4, 5])


_cluster: list = []


def _stop_cluster() -> None:
    for part in reversed(_cluster):
        part.cleanup()
    del _cluster[:]


class ClusterTests(unittest.TestCase):
    """
    Two brokers on a 3-primary Redis Cluster (redis-cli --cluster create),
    made once for the class (lazily in setUp: trial calls no setUpClass on
    stdlib test cases) and stopped at exit.
    """

    def setUp(self) -> None:
        if not have_redis():
            raise unittest.SkipTest("redis-server is not installed (.ci/run installs it)")
        if not _cluster:
            atexit.register(_stop_cluster)
            cluster = RedisCluster(3)
            _cluster.append(cluster)
            cluster.start()
            _cluster.append(BrokerProcess("--engine", cluster.url).start())
            _cluster.append(BrokerProcess("--engine", cluster.url).start())
        self.cluster, self.a, self.b = _cluster

    def test_topics_on_every_primary(self) -> None:
        """Topics whose keys live on different primaries: published on A, received on B, compacted."""
        publisher = connect(f"tcp:{self.a.address}")
        subscriber = connect(f"tcp:{self.b.address}")
        try:
            topics = [_topic("cl") for _ in range(12)]
            subscriptions = {}
            for topic in topics:
                publisher.create_topic(topic, retention_ttl=600_000, compaction_window=600_000)
                subscriptions[topic] = subscriber.subscribe(topic, start=Start.EARLIEST)
            for topic in topics:
                self.assertEqual(publisher.publish(topic, b"x", key=b"k").offset, 0)
                self.assertTrue(publisher.publish(topic, b"y", key=b"k").duplicate)
                self.assertEqual(publisher.publish(topic, b"z").offset, 1)
            for topic in topics:
                got = [subscriptions[topic].get(timeout=5) for _ in range(2)]
                self.assertEqual([(m.offset, m.value) for m in got], [(0, b"x"), (1, b"z")])
            listed = {t.name: t for t in subscriber.list_topics()}
            for topic in topics:
                self.assertEqual(listed[topic].next_offset, 2)
        finally:
            publisher.close()
            subscriber.close()

    def test_durable_resume_across_nodes(self) -> None:
        topic = _topic("cl")
        client_id = "d-" + uuid.uuid4().hex
        publisher = connect(f"tcp:{self.a.address}")
        try:
            publisher.create_topic(topic, retention_ttl=600_000)
            for i in range(5):
                publisher.publish(topic, b"%d" % i)
            first = connect(f"tcp:{self.a.address}", client_id=client_id)
            subscription = first.subscribe(topic, start=Start.EARLIEST)
            for _ in range(3):
                subscription.commit(subscription.get(timeout=5).offset)
            first.close()
            second = connect(f"tcp:{self.b.address}", client_id=client_id)
            try:
                again = second.subscribe(topic)
                self.assertEqual(again.get(timeout=5).offset, 3)
            finally:
                second.close()
        finally:
            publisher.close()


if __name__ == "__main__":
    unittest.main()


class ClusterFailoverTests(unittest.TestCase):
    """A primary of a Redis Cluster with replicas dies; its replica takes over."""

    def test_failover(self) -> None:
        """
        kill -9 of the primary that serves a topic: once its replica is
        promoted, brokers publish and deliver again (listening on the new
        primary), and no offset is given twice.
        """
        if not have_redis():
            raise unittest.SkipTest("redis-server is not installed (.ci/run installs it)")
        from zaichik.storage.redis import topic_keys

        cluster = RedisCluster(3, replicas=1)
        self.addCleanup(cluster.cleanup)
        cluster.start()
        a = BrokerProcess("--engine", cluster.url).start()
        self.addCleanup(a.cleanup)
        b = BrokerProcess("--engine", cluster.url).start()
        self.addCleanup(b.cleanup)
        topic = _topic("fo")
        publisher = connect(f"tcp:{a.address}")
        self.addCleanup(publisher.close)
        subscriber = connect(f"tcp:{b.address}")
        self.addCleanup(subscriber.close)
        publisher.create_topic(topic, retention_ttl=600_000)
        subscription = subscriber.subscribe(topic, start=Start.EARLIEST)
        before = [publisher.publish(topic, b"before %d" % i).offset for i in range(5)]
        self.assertEqual([subscription.get(timeout=5).offset for _ in range(5)], before)
        cluster.owner(topic_keys(topic)["meta"]).stop(kill=True)
        after = RedisTestCase.publish_retrying(publisher, topic, b"after", seconds=30)
        self.assertGreater(after.offset, max(before))
        message = subscription.get(timeout=10)
        self.assertEqual((message.offset, message.value), (after.offset, b"after"))
