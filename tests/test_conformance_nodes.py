"""
The conformance suite (tests/test_conformance.py, written from the protocol
text alone) again, against two brokers sharing one real Redis
(``--engine redis://...``): each test's connections go alternately to node
A and node B, so the publisher and the subscriber of most tests are on
different nodes.  Every rule of the protocol must hold across nodes.

A subset runs again on a 3-primary Redis Cluster (the classes named
...OnCluster).  Classes left out, and why: ConfiguredBrokerTests (--max-retained-bytes is
not offered with --engine), GroupRestartTests (restarts a --data-dir
broker), GroupTests (consumer groups are per node: docs/scale-out.rst).
"""

import itertools
import unittest

from zaichik.testing import RedisCluster, RedisServer, have_redis

from . import test_conformance as conformance

_redis = None
_cluster = None


def redis_server():
    global _redis
    if _redis is None or _redis.process is None:
        _redis = RedisServer().start()
    return _redis


def redis_cluster():
    global _cluster
    if _cluster is None:
        _cluster = RedisCluster(3).start()
        import atexit

        atexit.register(_cluster.cleanup)
    return _cluster


class TwoNodes(object):
    """Two brokers on one Redis; connect() alternates between them."""

    @staticmethod
    def engine():
        return redis_server().url

    @classmethod
    def _start_broker(cls):
        if cls.__dict__.get("broker") is None:
            if not have_redis():
                raise unittest.SkipTest("redis-server is not installed (.ci/run installs it)")
            for other in list(conformance._RUNNING):
                if other is not cls:
                    other._stop_broker()
            options = ("--engine", cls.engine()) + tuple(cls.broker_options)
            cls.broker = conformance.Broker(*options)
            cls.broker_b = conformance.Broker(*options)
            conformance._RUNNING.add(cls)

    @classmethod
    def _stop_broker(cls):
        b = cls.__dict__.get("broker")
        if b is not None:
            cls.broker = None
            conformance._RUNNING.discard(cls)
            b.stop()
            cls.broker_b.stop()

    def connect(self):
        if not hasattr(self, "_nodes"):
            self._nodes = itertools.cycle([self.broker.port, self.broker_b.port])
        c = conformance.wire.Client(next(self._nodes), timeout=5.0)
        self._clients.append(c)
        return c


class TwoNodesOnCluster(TwoNodes):
    """Two brokers on a 3-primary Redis Cluster: each test's topics land on different primaries."""

    @staticmethod
    def engine():
        return redis_cluster().url


class TopicsInAnyOrder(object):
    """
    Across brokers, messages of different topics may arrive in another
    order than they were published (each topic's offset order holds: on a
    Redis Cluster the topics' notifications come from different primaries,
    and no sequencer orders them).  The protocol orders MESSAGE frames by
    offset, per topic; the single-broker test also checks publish order
    across topics, which only one process can give.  Here: the same
    messages (each topic's has one, at offset 0), in any order.
    """

    def assertArrived(self, msgs, expected):
        self.assertEqual(sorted((m.topic, m.offset, m.value) for m in msgs), sorted(expected))


def _across(cls):
    return type(cls.__name__, (TwoNodes, cls), {"__doc__": f"{cls.__doc__ or cls.__name__} (two nodes, one Redis)"})


def _on_cluster(cls):
    return type(cls.__name__ + "OnCluster", (TwoNodesOnCluster, cls),
                {"__doc__": f"{cls.__doc__ or cls.__name__} (two nodes, a Redis Cluster)"})


FramingTests = _across(conformance.FramingTests)
FireAndForgetTests = _across(conformance.FireAndForgetTests)
TopicTests = _across(conformance.TopicTests)
MessageTests = _across(conformance.MessageTests)
RetentionTests = _across(conformance.RetentionTests)
CompactionTests = _across(conformance.CompactionTests)
SubscribeStartTests = _across(conformance.SubscribeStartTests)
CommitFlowTests = _across(conformance.CommitFlowTests)
HelloTests = _across(conformance.HelloTests)
BatchTests = _across(conformance.BatchTests)
CloseTests = _across(conformance.CloseTests)
WildcardTests = _across(type("WildcardTests", (TopicsInAnyOrder, conformance.WildcardTests), {}))

# The same on a Redis Cluster (the rules that involve more than one key
# or a channel: topics, messages, compaction, commits, durable clients,
# batches, wildcards).
TopicTestsOnCluster = _on_cluster(conformance.TopicTests)
MessageTestsOnCluster = _on_cluster(conformance.MessageTests)
CompactionTestsOnCluster = _on_cluster(conformance.CompactionTests)
CommitFlowTestsOnCluster = _on_cluster(conformance.CommitFlowTests)
HelloTestsOnCluster = _on_cluster(conformance.HelloTests)
BatchTestsOnCluster = _on_cluster(conformance.BatchTests)
WildcardTestsOnCluster = _on_cluster(type("WildcardTests", (TopicsInAnyOrder, conformance.WildcardTests), {}))
