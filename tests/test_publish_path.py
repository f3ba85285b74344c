"""
The one PUBLISH path (L{zaichik.session.Session.publish_frame}) with a
shared engine: a PUBLISH to a topic this broker does not know asks the
engine first, and is answered even when the engine cannot be reached.
"""

from __future__ import annotations

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
