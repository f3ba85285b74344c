"""
Client-controlled state is bounded: compaction keys (per topic, for the
broker, and the size of one key), durable positions (a TTL, the size of a
client_id) and commits.log (compacted while running).  Deterministic: a
Clock, sessions driven directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.service import BrokerService, Limits
from zaichik.session import Session
from zaichik.storage.disk import DiskStorage
from zaichik.testing import parse_frames

T0 = 1_700_000_000


class Conn:
    def __init__(self, service) -> None:
        self.replies: list = []
        self.frames: list = []
        self.closed = 0
        self.session = Session(service, self.replies.append, self.frames.append, self._close)

    def _close(self) -> None:
        self.closed += 1

    def send(self, request) -> list:
        before = len(self.replies)
        self.session.handle(request)
        return self.replies[before:]


class BoundsCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)

    def broker(self, **limits) -> BrokerService:
        return BrokerService(clock=self.clock, limits=Limits(**limits))

    def assertLimit(self, replies: list, rid: int) -> None:
        self.assertEqual(len(replies), 1, replies)
        self.assertEqual((type(replies[0]), replies[0].rid, replies[0].code),
                         (codec.Error, rid, int(ErrorCode.LIMIT)), replies[0])


class CompactionKeyTests(BoundsCase):
    def test_new_keys_over_the_topic_bound_are_refused_and_the_connection_stays(self):
        service = self.broker(max_compaction_keys=3)
        service.create_topic("t", 0, 10_000)
        c = Conn(service)
        for i in range(3):
            self.assertEqual(c.send(codec.Publish(i + 1, "t", b"v", b"k%d" % i)), [codec.Published(i + 1, i, False)])
        self.assertLimit(c.send(codec.Publish(9, "t", b"v", b"new")), 9)
        # A key already known is still a duplicate (first-wins is kept, not forgotten early).
        self.assertEqual(c.send(codec.Publish(10, "t", b"again", b"k0")), [codec.Published(10, 0, True)])
        self.assertEqual(c.send(codec.Publish(11, "t", b"no key")), [codec.Published(11, 3, False)])
        self.assertEqual(c.closed, 0)
        # Once the window has passed, the old keys are forgotten and new ones fit.
        self.clock.advance(10)
        self.assertEqual(c.send(codec.Publish(12, "t", b"v", b"new")), [codec.Published(12, 4, False)])
        self.assertEqual(service.keys.used, 1)

    def test_the_broker_wide_bound_counts_every_topic(self):
        service = self.broker(max_compaction_keys_total=4)
        for name in ("a", "b"):
            service.create_topic(name, 0, 10_000)
        c = Conn(service)
        c.send(codec.PublishBatch(1, "a", [(b"1", b"v"), (b"2", b"v"), (b"3", b"v")]))
        self.assertEqual(c.send(codec.Publish(2, "b", b"v", b"x")), [codec.Published(2, 0, False)])
        self.assertLimit(c.send(codec.Publish(3, "b", b"v", b"y")), 3)
        self.assertEqual(service.keys.used, 4)

    def test_a_batch_over_the_bound_is_refused_whole(self):
        service = self.broker(max_compaction_keys=2)
        service.create_topic("t", 60_000, 10_000)
        c = Conn(service)
        self.assertLimit(c.send(codec.PublishBatch(1, "t", [(b"1", b"v"), (b"2", b"v"), (b"3", b"v")])), 1)
        self.assertEqual(service.topics["t"].next_offset, 0)  # nothing of it stored
        self.assertEqual(service.keys.used, 0)

    def test_a_key_over_max_key_size_is_refused(self):
        service = self.broker(max_key_size=8)
        service.create_topic("t", 0, 0)
        c = Conn(service)
        self.assertLimit(c.send(codec.Publish(1, "t", b"v", b"k" * 9)), 1)
        self.assertEqual(c.send(codec.Publish(2, "t", b"v", b"k" * 8)), [codec.Published(2, 0, False)])
        self.assertLimit(c.send(codec.PublishBatch(3, "t", [(b"k", b"v"), (b"k" * 9, b"v")])), 3)
        # The PUBLISH path from a frame's bytes (what the edges use) refuses it too.
        self.assertIsNone(c.session.publish_frame(codec.Publish(4, "t", b"v", b"k" * 9).encode()))
        self.assertLimit(c.replies[-1:], 4)

    def test_forgetting_keys_gives_back_the_budget(self):
        service = self.broker()
        topic = service.create_topic("t", 0, 1_000)
        topic.publish_many([(b"%d" % i, b"v") for i in range(10)])
        self.assertEqual(service.keys.used, 10)
        self.clock.advance(1)
        service.sweep()
        self.assertEqual(service.keys.used, 0)


class ClientIdTests(BoundsCase):
    def test_a_long_client_id_is_refused_and_closed(self):
        service = self.broker(max_client_id=10)
        c = Conn(service)
        self.assertLimit(c.send(codec.Hello(1, "x" * 11)), 1)
        self.assertEqual(c.closed, 1)
        ok = Conn(service)
        self.assertEqual(ok.send(codec.Hello(1, "x" * 10)), [codec.Ok(1)])


class DurableTtlTests(BoundsCase):
    def commit(self, service, client_id: str, offset: int = 0) -> Conn:
        c = Conn(service)
        c.send(codec.Hello(1, client_id))
        c.send(codec.Subscribe(2, "t", Start.EARLIEST))
        self.assertEqual(c.send(codec.Commit(3, "t", offset)), [codec.Ok(3)])
        return c

    def test_positions_unused_for_the_ttl_are_forgotten(self):
        service = self.broker(durable_ttl=60_000)
        service.create_topic("t", 3_600_000, 0).publish(None, b"v")
        gone = self.commit(service, "gone")
        gone.session.close()
        stays = self.commit(service, "connected")  # still connected: kept however long
        self.clock.advance(59)
        service.sweep()
        self.assertIn("gone", service.durable_positions())
        self.clock.advance(1)
        service.sweep()
        self.assertNotIn("gone", service.durable_positions())
        self.assertIn("connected", service.durable_positions())
        self.assertEqual(service.durable_forgotten, 1)
        self.assertFalse(stays.closed)

    def test_zero_keeps_them_forever(self):
        service = self.broker(durable_ttl=0)
        service.create_topic("t", 3_600_000, 0).publish(None, b"v")
        self.commit(service, "c").session.close()
        self.clock.advance(10 * 365 * 86400)
        service.sweep()
        self.assertIn("c", service.durable_positions())


class DiskDurableTests(BoundsCase):
    def setUp(self) -> None:
        super().setUp()
        self.dir = tempfile.mkdtemp(prefix="zaichik-bounds-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.service = None
        self.addCleanup(self.stop)

    def start(self, **limits) -> BrokerService:
        self.stop()
        storage = DiskStorage(self.dir, fsync="never", clock=self.clock, run_blocking=maybeDeferred)
        self.service = BrokerService(storage=storage, clock=self.clock, limits=Limits(**limits))
        self.service.startService()
        return self.service

    def stop(self) -> None:
        if self.service is not None and self.service.running:
            self.successResultOf(self.service.stopService())

    def test_forgetting_survives_a_restart_and_the_ttl_counts_from_the_last_commit(self):
        service = self.start(durable_ttl=60_000)
        service.create_topic("t", 3_600_000, 0).publish(None, b"v")
        for client_id in ("old", "young"):
            c = Conn(service)
            c.send(codec.Hello(1, client_id))
            c.send(codec.Subscribe(2, "t", Start.EARLIEST))
            c.send(codec.Commit(3, "t", 0))
            c.session.close()
            self.clock.advance(30)
        service = self.start(durable_ttl=60_000)  # the commit times come back from commits.log
        self.clock.advance(1)
        service.sweep()
        self.assertEqual(sorted(service.durable_positions()), ["young"])
        service = self.start(durable_ttl=60_000)
        self.assertEqual(sorted(service.durable_positions()), ["young"])

    def test_commits_log_stays_proportional_to_live_positions(self):
        service = self.start()
        service.create_topic("t", 3_600_000, 0).publish_many([(None, b"v")] * 30_000)
        c = Conn(service)
        c.send(codec.Hello(1, "busy"))
        c.send(codec.Subscribe(2, "t", Start.EARLIEST))
        path = os.path.join(self.dir, "commits.log")
        sizes = []
        for i in range(30_000):
            c.session.handle(codec.Commit(3, "t", i))
            if i % 5_000 == 4_999:
                sizes.append(os.path.getsize(path))
        self.assertEqual(c.replies[-1], codec.Ok(3))
        line = len('["busy", "t", 29999, 1700000000000]\n')
        self.assertGreater(max(sizes), 5_000 * line)  # it did grow between rewrites...
        self.assertLess(max(sizes), 10_002 * line)  # ...but never to the 30,000 lines it was sent
        service = self.start()
        self.assertEqual(service.durable_positions(), {"busy": {"t": 29_999}})


class StorageFileTests(DiskDurableTests):
    def test_bad_commit_lines_and_meta_do_not_stop_the_broker(self):
        service = self.start()
        service.create_topic("t", 3_600_000, 0).publish(None, b"v")
        service.record_commit("c", "t", 0)
        service.work.flush()
        self.stop()
        with open(os.path.join(self.dir, "commits.log"), "ab") as f:
            f.write(b"null\n7\n\xff\xfe\n[\"x\"]\n[1, 2, 3]\n")
        broken = os.path.join(self.dir, "topics", b"u".hex())
        os.makedirs(broken)
        with open(os.path.join(broken, "meta.json"), "w") as f:
            f.write('{"name": "u"}')
        service = self.start()
        self.assertEqual(service.durable_positions(), {"c": {"t": 0}})
        self.assertEqual(sorted(service.topics), ["t"])
        self.assertEqual(service.storage.damaged, 1)

    def test_an_old_torn_tail_is_not_counted_again(self):
        service = self.start()
        topic = service.create_topic("t", 3_600_000, 0)
        for i in range(3):
            topic.publish(None, b"m%d" % i)
        self.stop()
        directory = os.path.join(self.dir, "topics", b"t".hex())
        for name in os.listdir(directory):
            if name.endswith(".idx"):
                os.unlink(os.path.join(directory, name))
        (seg,) = [n for n in os.listdir(directory) if n.endswith(".seg")]
        with open(os.path.join(directory, seg), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(directory, seg)) - 3)
        service = self.start()
        self.assertEqual((service.storage.torn, service.storage.damaged), (1, 0))
        service = self.start()
        self.assertEqual((service.storage.torn, service.storage.damaged), (0, 0))
        reader = Conn(service)
        reader.send(codec.Subscribe(1, "t", Start.EARLIEST))
        self.assertEqual([m.offset for m in parse_frames(b"".join(reader.frames))], [0, 1])


class FrameBoundTests(BoundsCase):
    def test_a_publish_whose_message_would_not_fit_is_refused(self):
        service = self.broker(max_frame_size=200)
        service.create_topic("t", 60_000, 0)
        c = Conn(service)
        # PUBLISH body: opcode, rid, topic, key length, value length: 14 + value.
        self.assertLimit(c.send(codec.Publish(1, "t", b"v" * 180)), 1)  # the MESSAGE would be 206 bytes
        self.assertEqual(c.send(codec.Publish(2, "t", b"v" * 174)), [codec.Published(2, 0, False)])
        self.assertLimit(c.send(codec.PublishBatch(3, "t", [(None, b"v"), (None, b"v" * 175)])), 3)
        self.assertEqual(service.topics["t"].next_offset, 1)

    def test_topics_lists_what_fits_in_a_frame(self):
        service = self.broker(max_frame_size=9 + 3 * (2 + 5 + 36))
        for i in range(5):
            service.create_topic(f"t{i:04d}", 0, 0)
        c = Conn(service)
        (reply,) = c.send(codec.ListTopics(1))
        self.assertEqual([t.name for t in reply.topics], ["t0000", "t0001", "t0002"])
        self.assertLessEqual(len(reply.encode()), service.limits.max_frame_size)

    def test_a_long_list_is_built_a_chunk_per_reactor_turn(self):
        service = self.broker()
        for i in range(5_000):
            service.create_topic(f"t{i:05d}", 0, 0)
        c = Conn(service)
        waiting = c.session.handle(codec.ListTopics(1))
        self.assertEqual(len(c.replies), 0)  # not at once: other connections get their turn
        self.assertIsNotNone(waiting)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the next chunk, on the next turn
        self.clock.advance(0)  # (a Clock runs the turns that follow in one advance)
        self.assertEqual(len(c.replies), 1)
        (reply,) = c.replies
        self.assertEqual(len(reply.topics), 5_000)
        self.assertTrue(waiting.called)
        self.assertEqual([t.name for t in reply.topics[:2]], ["t00000", "t00001"])


class EndedSubscriptionTests(BoundsCase):
    def test_a_subscription_whose_delivery_fails_leaves_its_session(self):
        service = self.broker()
        topic = service.create_topic("t", 60_000, 0)
        c = Conn(service)
        c.send(codec.Subscribe(1, "t", Start.LATEST))
        subscription = c.session.subscriptions["t"]
        self.patch(subscription, "deliver", lambda first, frames: 1 / 0)
        topic.publish(None, b"v")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(c.session.subscriptions, {})
        error = c.replies[-1]
        self.assertEqual((type(error), error.rid, error.code), (codec.Error, 0, int(ErrorCode.INTERNAL)))
        self.assertIn("subscription to t ended", error.message)
        self.assertEqual(topic.subscribers, [])
        # The client can subscribe again (before: ALREADY_SUBSCRIBED, and a resume delivered to the dead one).
        self.assertEqual(c.send(codec.Subscribe(2, "t", Start.EARLIEST)), [codec.Ok(2)])

    def test_a_failing_read_from_storage_ends_the_subscription_with_an_error(self):
        from twisted.internet.defer import fail

        service = self.broker()
        topic = service.create_topic("t", 60_000, 0)
        topic.publish(None, b"v")
        self.patch(topic._log, "read", lambda offset, limit: fail(OSError("I/O error")))
        c = Conn(service)
        replies = c.send(codec.Subscribe(1, "t", Start.EARLIEST))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(replies[0], codec.Ok(1))
        self.assertEqual((replies[1].rid, replies[1].code), (0, int(ErrorCode.INTERNAL)))
        self.assertEqual(c.session.subscriptions, {})


class FsyncFailureTests(BoundsCase):
    def test_a_failed_interval_fsync_stops_writes(self):
        """fsyncgate: after a failed fsync nothing can be trusted to reach the disk; refuse writes."""
        from twisted.internet.defer import fail

        directory = tempfile.mkdtemp(prefix="zaichik-fsync-")
        self.addCleanup(shutil.rmtree, directory, True)
        failing = []

        def run(f, *args):
            if failing:
                return fail(OSError(5, "Input/output error"))
            return maybeDeferred(f, *args)

        storage = DiskStorage(directory, fsync="interval", clock=self.clock, run_blocking=run)
        service = BrokerService(storage=storage, clock=self.clock)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        service.create_topic("t", 60_000, 0)
        c = Conn(service)
        self.assertEqual(c.send(codec.Publish(1, "t", b"v")), [codec.Published(1, 0, False)])
        failing.append(True)
        self.clock.advance(0.1)
        (error,) = c.send(codec.Publish(2, "t", b"v"))
        self.assertEqual((error.rid, error.code), (2, int(ErrorCode.INTERNAL)))
        self.assertIn("fsync failed", error.message)
