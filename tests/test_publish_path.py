"""
The one PUBLISH path (L{zaichik.session.Session.publish_frame}) with a
shared engine: a PUBLISH to a topic this broker does not know asks the
engine first, and is answered even when the engine cannot be reached; and
runs of fire-and-forget PUBLISHes in one read (L{Session.publish_run})
reach another broker's subscribers in order, topics known or not.
"""

from __future__ import annotations

import socket

from zaichik import codec
from zaichik.codec import Start
from zaichik.errors import ZaichikError

from tests.test_redis_review import RealRedisTestCase, _topic


class PublishToAnUnknownTopicTests(RealRedisTestCase):

    def test_publish_while_redis_is_unreachable_is_answered(self) -> None:
        """
        A PUBLISH naming a topic this broker does not know waits for the
        engine's answer (learn_topic); when Redis is unreachable that fails,
        and the failure must reach the client as an ERROR (the protocol
        promises one reply), not an unhandled error in a Deferred.  Failed
        before its fix: the client's publish timed out.
        """
        a = self.broker()
        client = self.client(f"tcp:{a.address}", request_timeout=3)
        client.ping()
        self.redis.stop(kill=True)
        try:
            with self.assertRaises(ZaichikError):
                client.publish(_topic(), b"x")
        except TimeoutError:
            self.fail("PUBLISH was never answered while Redis was down")


class PublishRunAcrossBrokersTests(RealRedisTestCase):

    def test_runs_reach_the_other_broker(self) -> None:
        """
        Fire-and-forget PUBLISHes to three topics, interleaved in one write
        to broker A (one of them new to A, so that run is declined and its
        frames handled one by one, learning the topic): B's subscriber of
        each gets every message in order, offsets from 0.
        """
        a, b = self.broker(), self.broker()
        names = [_topic() for _ in range(3)]
        creator = self.client(f"tcp:{b.address}")
        for name in names[:2]:
            creator.create_topic(name, retention_ttl=600_000)
        subscriptions = []
        for name in names:
            if name == names[2]:
                creator.create_topic(name, retention_ttl=600_000)  # (made on B: A learns it from the run)
            subscriptions.append(self.client(f"tcp:{b.address}").subscribe(name, start=Start.EARLIEST))
        host, port = a.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(b"".join(codec.frame(codec.Publish(0, names[i % 3], b"v%d" % i).encode())
                                 for i in range(300)))
            raw.sendall(codec.frame(codec.Ping(1).encode()))
            reply = b""
            while len(reply) < 9:
                reply += raw.recv(100)
        for n, subscription in enumerate(subscriptions):
            got = [subscription.get(timeout=10) for _ in range(100)]
            self.assertEqual([(m.offset, m.value) for m in got], [(i, b"v%d" % (3 * i + n)) for i in range(100)])
