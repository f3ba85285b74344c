"""
Durable storage (--data-dir): restart, recovery of torn writes, the lock,
segment deletion, fsync policies; in-process with a Clock, and end to end
with real twistd processes stopped by SIGTERM and by kill -9.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zaichik import codec
from zaichik.storage import disk
from zaichik.storage import check, segment
from zaichik.codec import Start
from zaichik.storage.disk import DataDirLocked, DiskStorage
from zaichik.service import BrokerService
from zaichik.session import Session
from zaichik.testing import ROOT, BrokerProcess, parse_frames

ENV = dict(os.environ, PYTHONPATH=ROOT)

T0 = 1_700_000_000


def offsets_of(written) -> list:
    return [m.offset for m in parse_frames(b"".join(written)) if type(m) is codec.Message]


def run_now(f, *args):
    """Blocking work (the fsyncs) run at once, so tests stay deterministic."""
    return maybeDeferred(f, *args)


class WaitingDiskStorage(DiskStorage):
    """
    Appends written by the writer thread (C{--fsync never} and
    C{interval}), whose outcomes are booked when each unit of work ends
    (while C{wait_at_sync}) rather than through a reactor.
    """

    wait_at_sync = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, call_from_thread=lambda f: None, **kwargs)

    def sync(self) -> None:
        super().sync()
        if self.writer is not None and self.wait_at_sync:
            self.writer.wait()
            if getattr(self, "_held", None):
                super().sync()  # (as a unit booking the writes would end)


class DiskTestCase(SynchronousTestCase):
    storage_class = DiskStorage
    storage_options: dict = {}

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zaichik-data-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(T0)
        self.storage = None
        self.service = None
        self.addCleanup(self.stop)

    def start(self, fsync: str = "interval", limits=None, **options) -> BrokerService:
        """Start a broker on the data dir (a clean stop of the running one first)."""
        self.stop()
        options = {**self.storage_options, **options}
        self.storage = self.storage_class(self.dir, fsync=fsync, clock=self.clock, run_blocking=run_now, **options)
        self.service = BrokerService(storage=self.storage, clock=self.clock, limits=limits)
        self.service.startService()
        self.assertTrue(self.service.ready.called)
        return self.service

    def stop(self) -> None:
        if self.service is not None and self.service.running:
            self.successResultOf(self.service.stopService())
        self.service = None

    def crash_after_five(self) -> None:
        """Five messages on topic "t", which retains and compacts nothing (markers on disk), then a crash."""
        topic = self.start(fsync="interval").create_topic("t", 0, 0)
        for _ in range(5):
            topic.publish(None, b"m")
        self.crash()

    def crash(self) -> None:
        """The broker dies (kill -9): no clean close, no index for the newest segment."""
        storage = self.storage
        for log in storage._logs.values():
            for fd in [log._fd, *log._read_fds.values()]:
                if fd is not None:
                    os.close(fd)
            log._fd = None
            log._read_fds.clear()
        os.close(storage._commits_fd)
        storage._lock.close()
        self.service.running = False
        if self.service._sweeper is not None:
            self.service._sweeper.stop()
        self.service = None

    def follow(self, service, name, start=Start.EARLIEST, client_id=""):
        replies, written = [], []
        session = Session(service, replies.append, written.append, lambda: None)
        if client_id:
            session.handle(codec.Hello(1, client_id))
        session.handle(codec.Subscribe(2, name, start))
        return session, written


class RestartTests(DiskTestCase):
    def test_offsets_messages_and_dedup_survive(self):
        service = self.start()
        topic = service.create_topic("t", 60_000, 30_000)
        self.assertEqual(topic.publish_many([(b"a", b"1"), (b"b", b"2"), (None, b"3")]),
                         [(0, False), (1, False), (2, False)])
        self.clock.advance(10)
        service = self.start()  # a restart
        topic = service.topics["t"]
        self.assertEqual((topic.retention_ttl, topic.compaction_window, topic.next_offset), (60_000, 30_000, 3))
        _, written = self.follow(service, "t")
        self.assertEqual(offsets_of(written), [0, 1, 2])
        self.assertEqual(topic.publish(b"a", b"again"), (0, True))  # same dedup decision
        self.assertEqual(topic.publish(None, b"4"), (3, False))  # no gap, no reuse

    def test_ttl_passed_while_stopped(self):
        service = self.start()
        topic = service.create_topic("t", 1_000, 0)
        topic.publish(None, b"old")
        self.clock.advance(0.5)
        topic.publish(None, b"young")
        self.storage.close()
        self.clock.advance(0.6)  # the first one's TTL passes while the broker is down
        service = self.start()
        _, written = self.follow(service, "t")
        self.assertEqual(offsets_of(written), [1])
        self.assertEqual(service.topics["t"].next_offset, 2)

    def test_compaction_window_longer_than_retention(self):
        service = self.start()
        topic = service.create_topic("t", 1_000, 10_000)
        topic.publish(b"k", b"v")
        self.clock.advance(5)  # expired from retention, still inside the window
        service.sweep()
        service = self.start()
        self.assertEqual(service.topics["t"].publish(b"k", b"v2"), (0, True))

    def test_unretained_topic_keeps_its_offsets(self):
        service = self.start()
        topic = service.topic("live")
        for _ in range(3):
            topic.publish(None, b"x")
        service = self.start()
        self.assertEqual(service.topics["live"].publish(None, b"y"), (3, False))

    def test_durable_resume_after_restart(self):
        service = self.start()
        service.create_topic("t", 60_000, 0).publish_many([(None, b"v")] * 4)
        session, written = self.follow(service, "t", Start.DEFAULT, client_id="worker")
        self.assertEqual(offsets_of(written), [0, 1, 2, 3])
        session.handle(codec.Commit(3, "t", 1))
        service = self.start()
        _, written = self.follow(service, "t", Start.DEFAULT, client_id="worker")
        self.assertEqual(offsets_of(written), [2, 3])


class RecoveryTests(DiskTestCase):
    def segment(self, name="t") -> str:
        directory = os.path.join(self.dir, "topics", name.encode().hex())
        (seg,) = [f for f in os.listdir(directory) if f.endswith(".seg")]
        return os.path.join(directory, seg)

    def test_torn_tail_uses_up_its_offsets(self):
        """A write cut by a crash: the tail stays, its offsets are never given again."""
        service = self.start()
        topic = service.create_topic("t", 60_000, 0)
        for i in range(5):
            topic.publish(None, b"m%d" % i)  # a batch each
        self.crash()
        path = self.segment()
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 3)  # a crash mid-write of the last batch
        size = os.path.getsize(path)
        service = self.start()
        next_offset = service.topics["t"].next_offset
        self.assertGreater(next_offset, 4)  # offset 4 may have reached someone: not reused
        self.assertGreater(os.path.getsize(path), size)  # nothing cut; a gap marker added
        _, written = self.follow(service, "t")
        self.assertEqual(offsets_of(written), [0, 1, 2, 3])
        self.assertEqual(service.topics["t"].publish(None, b"new"), (next_offset, False))
        self.assertEqual(self.storage.torn, 1)
        service = self.start()  # and the decision holds over another restart
        self.assertEqual(service.topics["t"].next_offset, next_offset + 1)

    def test_bad_checksum_in_the_middle_is_damage_not_a_tail(self):
        service = self.start()
        topic = service.create_topic("t", 60_000, 0)
        for i in range(5):
            topic.publish(None, b"m%d" % i)
        self.crash()
        path = self.segment()
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            batch = (len(data) - 16) // 5
            data[16 + 2 * batch + 45] ^= 0xFF  # a flipped byte inside the third batch
            f.seek(0)
            f.write(data)
        service = self.start()
        _, written = self.follow(service, "t")
        self.assertEqual(offsets_of(written), [0, 1, 3, 4])  # the damaged one is skipped, nothing after it lost
        self.assertEqual(self.storage.damaged, 1)
        # After a crash the broker goes on from its reservation: no offset it may have given is reused.
        # (the reservation written with the segment's header: offset 0 + RESERVE)
        self.assertEqual(service.topics["t"].next_offset, disk.RESERVE)
        self.assertEqual(service.topics["t"].publish(None, b"new"), (disk.RESERVE, False))

    def test_power_loss_never_reuses_offsets_that_may_have_been_delivered(self):
        """
        Under --fsync interval messages are delivered before they are on disk;
        a power loss may take the newest writes, cut at a batch boundary (no
        torn tail to see).  The reservation, written ahead, keeps their
        offsets from being given to new messages.
        """
        service = self.start(fsync="interval")
        topic = service.create_topic("t", 60_000, 0)
        reader, written = self.follow(service, "t")
        for i in range(10):
            topic.publish(None, b"m%d" % i)  # a batch each; all delivered
        self.assertEqual(offsets_of(written), list(range(10)))
        self.crash()
        path = self.segment()
        with open(path, "rb") as f:
            data = f.read()
        from zaichik.storage import segment as fmt

        batches = [b for b in fmt.scan(data, 0).batches if b.count]
        with open(path, "r+b") as f:
            f.truncate(batches[3].end)  # the page cache lost messages 4 to 9
        service = self.start(fsync="interval")
        self.assertGreaterEqual(service.topics["t"].next_offset, 10)
        offset, _ = service.topics["t"].publish(None, b"after the power loss")
        self.assertNotIn(offset, range(10))

    def test_power_loss_just_after_a_roll_never_reuses_offsets_that_may_have_been_delivered(self):
        """
        The same just after a segment rolled (a review; older than the
        writer thread): the new segment and its directory entry are fsynced
        when it is created, its first batch and the reservation written
        with it only by the next tick.  A power loss before that tick leaves
        the new segment's header alone, and the start read the reservation
        of the newest segment only (none): the offsets delivered from the
        new segment were given again.
        """
        synced: dict = {}  # path -> its size at its last fsync
        real_fsync = os.fsync

        def fsync(fd):
            real_fsync(fd)
            synced[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size

        self.patch(os, "fsync", fsync)
        service = self.start(fsync="interval", segment_bytes=2_000)
        topic = service.create_topic("t", 60_000, 0)
        reader, written = self.follow(service, "t")
        log = self.storage._logs["t"]
        while len(log.segments) < 2:
            topic.publish_many([(None, b"x" * 100)] * 5)  # (no tick: the clock stands still)
        delivered = topic.next_offset
        new = log.segments[-1]
        self.assertLess(new.base, delivered)  # (the new segment's first batch was delivered)
        self.assertEqual(offsets_of(written), list(range(delivered)))
        self.crash()
        kept = synced[os.path.realpath(new.path)]
        self.assertLess(kept, os.path.getsize(new.path))
        with open(new.path, "r+b") as f:
            f.truncate(kept)  # (the page cache lost what was not fsynced: all but the header)
        service = self.start(fsync="interval", segment_bytes=2_000)
        self.assertGreaterEqual(service.topics["t"].next_offset, delivered)

    def test_a_clean_stop_leaves_no_gap(self):
        service = self.start(fsync="interval")
        topic = service.create_topic("t", 60_000, 0)
        for i in range(3):
            topic.publish(None, b"m%d" % i)
        service = self.start(fsync="interval")
        self.assertEqual(service.topics["t"].next_offset, 3)

    def test_locked_by_a_running_broker(self):
        self.start()
        other = DiskStorage(self.dir, clock=self.clock)
        self.failureResultOf(other.open(), DataDirLocked)
        self.assertRaises(DataDirLocked, disk.check_not_locked, self.dir)


class SegmentTests(DiskTestCase):
    def test_expired_segments_are_deleted(self):
        service = self.start(segment_bytes=2_000)
        topic = service.create_topic("t", 1_000, 0)
        for _ in range(20):
            topic.publish_many([(None, b"x" * 100)] * 5)
            self.clock.advance(0.1)
        log = self.storage._logs["t"]
        self.assertGreater(len(log.segments), 5)
        self.clock.advance(2)
        topic.expire()
        self.assertEqual(len(log.segments), 1)  # only the newest is kept
        self.assertLess(log.disk_bytes(), 2_000 + 800)
        service = self.start(segment_bytes=2_000)
        self.assertEqual(service.topics["t"].next_offset, 100)

    def held_deletions(self):
        """
        A broker (--fsync never) whose blocking work waits in C{held} until
        the test runs it, and a topic with segments to expire.
        """
        held: list = []

        def later(f, *args):
            d: Deferred = Deferred()
            held.append((d, f, args))
            return d

        self.stop()
        # (The writer's outcomes booked by writer.wait() on this thread: with
        # call_from_thread=f(), the writer thread booked them itself, racing
        # the test.)
        self.storage = DiskStorage(self.dir, fsync="never", clock=self.clock, run_blocking=later,
                                   call_from_thread=lambda f: None, segment_bytes=2_000)
        self.service = service = BrokerService(storage=self.storage, clock=self.clock)
        service.startService()
        topic = service.create_topic("t", 1_000, 0)
        for _ in range(10):
            topic.publish_many([(None, b"x" * 100)] * 5)
            self.storage.writer.wait()
            self.clock.advance(0.1)
        return service, topic, held

    def test_expired_segments_are_deleted_off_the_reactor(self):
        """The unlink (which frees the segment's cached pages) runs as blocking work, not in expire."""
        service, topic, held = self.held_deletions()
        log = self.storage._logs["t"]
        directory = os.path.dirname(log.segments[-1].path)
        before = sorted(os.listdir(directory))
        self.assertGreater(len(log.segments), 2)
        self.clock.advance(2)  # (the sweep expires them)
        topic.expire()
        self.assertEqual(len(log.segments), 1)
        self.assertEqual(sorted(os.listdir(directory)), before)  # (not yet)
        deletions = [(d, f, args) for d, f, args in held if f is disk._unlink_all]
        self.assertEqual(len(deletions), len([n for n in before if n.endswith(".seg")]) - 1)
        for d, f, args in deletions:
            d.callback(f(*args))
        left = sorted(os.listdir(directory))
        self.assertEqual([n for n in left if n.endswith(".seg")], [os.path.basename(log.segments[0].path)])

    def test_an_index_goes_before_its_segment(self):
        """(A review: a stop between the two unlinks left an index no segment would ever take away.)"""
        service, topic, held = self.held_deletions()
        self.clock.advance(2)
        deletions = [args[0] for d, f, args in held if f is disk._unlink_all]
        self.assertTrue(deletions)
        for paths in deletions:
            self.assertEqual([p[-4:] for p in paths], [".idx", ".seg"])
        while held:  # (so that the broker's stop is not left waiting for them)
            d, f, args = held.pop(0)
            d.callback(f(*args))

    def test_a_close_waits_for_deletions(self):
        service, topic, held = self.held_deletions()
        self.clock.advance(2)
        self.assertTrue(held)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.service = None
        while held:
            d, f, args = held.pop(0)
            d.callback(f(*args))
        self.successResultOf(stopped)

    def test_what_could_not_be_deleted_is_logged(self):
        gone = os.path.join(self.dir, "gone")
        directory = os.path.join(self.dir, "a directory")
        os.mkdir(directory)
        failed = disk._unlink_all([gone, directory])
        self.assertEqual([path for path, _ in failed], [directory])  # (one already gone is no failure)
        self.storage = DiskStorage(self.dir, fsync="never", clock=self.clock, run_blocking=run_now)
        logged: list = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.storage.delete(directory)
        self.assertTrue(any(e.get("path") == directory for e in logged))
        self.assertEqual(self.storage._deleting, 0)


class FsyncTests(DiskTestCase):
    def test_always_syncs_once_per_unit_of_work(self):
        calls = []
        real = os.fsync
        self.patch(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
        service = self.start(fsync="always")
        topic = service.create_topic("t", 60_000, 0)
        topic.publish(None, b"first")  # (creating the segment fsyncs it and its directory)
        del calls[:]
        with service.work:
            for _ in range(100):
                topic.publish(None, b"v")
        self.assertEqual(len(calls), 1)

    def start_with_held_fsyncs(self):
        """A broker with --fsync always whose fsyncs wait, in C{held}, until the test runs them."""
        held: list = []

        def later(f, *args):
            d = Deferred()
            held.append((d, f, args))
            return d

        self.stop()
        self.storage = DiskStorage(self.dir, fsync="always", clock=self.clock, run_blocking=later)
        self.service = service = BrokerService(storage=self.storage, clock=self.clock)
        service.startService()
        service.create_topic("t", 60_000, 0)
        return service, held

    def test_always_acknowledges_and_delivers_only_after_the_fsync(self):
        service, held = self.start_with_held_fsyncs()
        reader, written = self.follow(service, "t")
        replies = []
        writer = Session(service, replies.append, lambda b: None, lambda: None)
        writer.handle(codec.Publish(5, "t", b"v"))
        writer.handle(codec.Ping(6))
        self.assertEqual((replies, offsets_of(written)), ([], []))  # not durable yet
        d, f, args = held.pop(0)
        f(*args)
        d.callback(None)
        self.assertEqual(replies, [codec.Published(5, 0, False), codec.Ok(6)])
        self.assertEqual(offsets_of(written), [0])

    def test_always_a_request_after_a_publish_sees_it_stored(self):
        """A COMMIT in the same read as the PUBLISH it commits waits for the fsync, then succeeds."""
        service, held = self.start_with_held_fsyncs()
        replies, written = [], []
        session = Session(service, replies.append, written.append, lambda: None)
        session.handle(codec.Subscribe(1, "t", Start.EARLIEST))
        with service.work:  # one read
            session.handle(codec.Publish(2, "t", b"v"))
            waiting = session.handle(codec.Commit(3, "t", 0))
        self.assertEqual(replies, [codec.Ok(1)])
        self.assertFalse(waiting.called)  # (the connection reads nothing more meanwhile)
        while held:
            d, f, args = held.pop(0)
            f(*args)
            d.callback(None)
        self.assertEqual(replies, [codec.Ok(1), codec.Published(2, 0, False), codec.Ok(3)])
        self.assertEqual(offsets_of(written), [0])
        self.assertTrue(waiting.called)

    def test_interval_syncs_on_the_tick(self):
        calls = []
        real = os.fsync
        self.patch(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
        service = self.start(fsync="interval")
        topic = service.create_topic("t", 60_000, 0)
        topic.publish(None, b"first")  # (creating the segment fsyncs it and its directory)
        self.clock.advance(0.1)
        del calls[:]
        with service.work:
            topic.publish(None, b"v")
        self.assertEqual(calls, [])
        self.clock.advance(0.1)
        self.assertEqual(len(calls), 1)


def slow_fsyncs(storage) -> list:
    """The running broker's blocking work waits, in the returned list, until the test runs it."""
    held: list = []

    def later(f, *args):
        d: Deferred = Deferred()
        held.append((d, f, args))
        return d

    storage._run_blocking = later
    return held


def run_all(held: list) -> None:
    while held:
        d, f, args = held.pop(0)
        d.callback(f(*args))


class DurableReservationTests(DiskTestCase):
    """
    Under --fsync interval a message is delivered before it is durable; the
    offsets it takes must be covered by a reservation that is, or a power
    loss gives them again after the restart.  A renewal written ahead
    becomes durable at the next fsync: an append past the durable one waits
    for that fsync (a review: a slow fsync, or a fast topic, outran it).
    """

    def test_a_slow_fsync_and_a_power_loss_never_reuse_delivered_offsets(self):
        synced: dict = {}  # path -> its size at its last completed fsync
        real_fsync = os.fsync

        def fsync(fd):
            real_fsync(fd)
            synced[os.readlink(f"/proc/self/fd/{fd}")] = os.fstat(fd).st_size

        self.patch(os, "fsync", fsync)
        service = self.start(fsync="interval")
        self.storage.reserve = 100
        topic = service.create_topic("t", 60_000, 0)
        reader, written = self.follow(service, "t")
        topic.publish(None, b"m")  # (a new segment: its reservation fsynced with its header)
        held = slow_fsyncs(self.storage)
        for i in range(500):
            with service.work:
                topic.publish(None, b"m%d" % i)
            if i == 10:
                self.clock.advance(0.1)  # a tick: its fsync does not end
        self.assertTrue(held)
        delivered = offsets_of(written)
        self.assertEqual(delivered, list(range(len(delivered))))
        self.crash()
        path = self.storage._logs["t"].segments[-1].path
        with open(path, "r+b") as f:
            f.truncate(synced[os.path.realpath(path)])  # the power loss: all but what was fsynced
        service = self.start(fsync="interval")
        self.assertGreaterEqual(service.topics["t"].next_offset, len(delivered))

    def restarted_with_slow_fsyncs(self):
        """
        A broker restarted on a topic holding one message (no reservation
        known durable yet), its fsyncs slow: the service, the held fsyncs,
        a reader's frames, a publisher and its replies.
        """
        service = self.start(fsync="interval")
        service.create_topic("t", 60_000, 0).publish(None, b"first")
        service = self.start(fsync="interval")
        held = slow_fsyncs(self.storage)
        reader, written = self.follow(service, "t")
        replies: list = []
        publisher = Session(service, replies.append, lambda b: None, lambda: None)
        return service, held, written, publisher, replies

    def test_held_appends_are_delivered_in_order_once_the_fsync_ends(self):
        service, held, written, publisher, replies = self.restarted_with_slow_fsyncs()
        with service.work:
            publisher.handle(codec.Publish(5, "t", b"second"))
            publisher.handle(codec.Publish(6, "t", b"third"))
        self.assertEqual((offsets_of(written), replies), ([0], []))
        self.assertEqual(len(held), 1)  # an fsync at once, not at the next tick
        d, f, args = held.pop()
        d.callback(f(*args))
        self.assertEqual(offsets_of(written), [0, 1, 2])
        self.assertEqual(replies, [codec.Published(5, 1, False), codec.Published(6, 2, False)])
        with service.work:
            service.topics["t"].publish(None, b"fourth")  # (covered now: no wait)
        self.assertEqual((offsets_of(written), held), ([0, 1, 2, 3], []))

    def test_held_appends_fail_when_the_fsync_fails(self):
        service, held, written, publisher, replies = self.restarted_with_slow_fsyncs()
        with service.work:
            publisher.handle(codec.Publish(5, "t", b"second"))
        d, f, args = held.pop()
        with service.work:
            d.errback(OSError(5, "Input/output error"))
        self.assertEqual(offsets_of(written), [0])
        self.assertEqual([type(r) for r in replies], [codec.Error])
        self.assertIn("fsync", self.storage._logs["t"].broken)


class DurableReservationWriterTests(DurableReservationTests):
    """The same with the writer thread (its writes booked at the end of each unit)."""

    storage_class = WaitingDiskStorage


class HeldAppendOrderTests(DiskTestCase):
    """
    a held append must not be overtaken by a later one of the same
    topic.  A roll raises durable_reserved at once (the new segment's
    reservation, fsynced with its header): the append that rolled is
    delivered while the appends before it still wait for the fsync.
    """

    def overtaken(self, retention_ttl: int, compaction_window: int) -> None:
        service = self.start(fsync="interval", segment_bytes=4_000)
        self.storage.reserve = 100
        topic = service.create_topic("t", retention_ttl, compaction_window)
        reader, written = self.follow(service, "t", Start.LATEST)
        log = self.storage._logs["t"]
        held = slow_fsyncs(self.storage)
        self.addCleanup(run_all, held)  # (before the broker's stop)
        sent = 0
        while len(log.segments) < 2:
            with service.work:
                topic.publish_many([(None, b"x")] * 40)
            sent += 40
        self.assertTrue(self.storage._held)  # (appends before the roll wait for the fsync)
        first_held = self.storage._held[0][1] - 40  # (40 offsets an append)
        delivered = offsets_of(written)
        # Nothing at or after a held append is delivered (or served) while it is held.
        self.assertEqual(delivered, list(range(first_held)))
        run_all(held)
        self.assertEqual(offsets_of(written), list(range(sent)))  # (and nothing skipped)
        self.assertEqual(topic._stored_end, sent)

    def test_a_roll_does_not_overtake_held_appends_keeping_nothing(self):
        """(A subscriber of a topic that retains nothing never gets the held ones: skipped as already sent.)"""
        self.overtaken(0, 0)

    def test_a_roll_does_not_overtake_held_appends_compacting(self):
        self.overtaken(0, 60_000)

    def test_a_roll_does_not_overtake_held_appends_retaining(self):
        """(A retaining topic's subscriber reads the gap from the log: in order, but the held ones too.)"""
        self.overtaken(60_000, 0)


class HeldAppendFailureTests(DiskTestCase):
    """
    Appends held for an fsync that fails are refused (ERROR) and, as under
    --fsync always, cut back off the segment: a restart must not serve
    them (a review: they were served).
    """

    def test_a_refused_held_append_is_not_served_after_a_restart(self):
        service = self.start(fsync="interval")
        service.create_topic("t", 60_000, 0).publish(None, b"first")
        service = self.start(fsync="interval")  # (nothing durable known: the next append waits)
        held = slow_fsyncs(self.storage)
        replies: list = []
        publisher = Session(service, replies.append, lambda b: None, lambda: None)
        with service.work:
            publisher.handle(codec.Publish(5, "t", b"refused"))
        d, f, args = held.pop()
        with service.work:
            d.errback(OSError(5, "Input/output error"))
        self.assertEqual([type(r) for r in replies], [codec.Error])  # (refused)
        self.storage._run_blocking = run_now  # (the stop's fsync)
        service = self.start(fsync="interval")
        _, written = self.follow(service, "t")
        self.assertEqual(offsets_of(written), [0])  # not the refused message


class HeldAppendFailureWriterTests(HeldAppendFailureTests):
    storage_class = WaitingDiskStorage

    def test_writes_queued_behind_held_ones_are_refused_and_cut_too(self):
        service = self.start(fsync="interval")
        service.create_topic("t", 60_000, 0).publish(None, b"first")
        service = self.start(fsync="interval")
        held = slow_fsyncs(self.storage)
        replies: list = []
        publisher = Session(service, replies.append, lambda b: None, lambda: None)
        with service.work:
            publisher.handle(codec.Publish(5, "t", b"held"))
        self.storage.wait_at_sync = False  # (the next write stays queued for the writer thread)
        with service.work:
            publisher.handle(codec.Publish(6, "t", b"queued"))
        self.assertEqual(self.storage._logs["t"]._inflight, 1)
        d, f, args = held.pop()
        with service.work:
            d.errback(OSError(5, "Input/output error"))
        self.assertEqual([(type(r), r.rid) for r in replies], [(codec.Error, 5), (codec.Error, 6)])
        self.storage._run_blocking = run_now
        service = self.start(fsync="interval")
        _, written = self.follow(service, "t")
        self.assertEqual(offsets_of(written), [0])


class HeldAppendOrderWriterTests(HeldAppendOrderTests):
    storage_class = WaitingDiskStorage


class NotKeptCountTests(DiskTestCase):
    """
    zaichik check counts PASSED offsets as not_kept by their
    distance from the previous batch; after an unclean stop the topic goes
    on from its reservation (up to RESERVE offsets skipped, never given),
    and those count as 16 million messages "not kept" (and the NOTE that
    offsets were skipped is gone).
    """

    def test_offsets_skipped_after_an_unclean_stop_are_not_messages_not_kept(self):
        self.crash_after_five()
        service = self.start(fsync="interval")
        service.topics["t"].publish(None, b"after")
        self.stop()
        report = check.check(self.dir)
        [t] = [t for t in report.topics if t.name == "t"]
        self.assertEqual(sum(s.not_kept for s in t.segments), 6)


class DamageInAKeepsNothingSegmentTests(DiskTestCase):
    """
    DiskLog._scan takes damage followed by a count-0 batch for an
    old torn tail (the gap marker a start wrote after it): not counted, logged
    as information.  In a topic that keeps nothing every batch is a count-0
    marker, so real damage anywhere in its segments is never counted
    (zaichik check calls the same bytes DAMAGE).
    """

    def test_damage_between_passed_markers_is_counted(self):
        self.crash_after_five()
        log_dir = os.path.join(self.dir, "topics", b"t".hex())
        [name] = [n for n in os.listdir(log_dir) if n.endswith(".seg")]
        path = os.path.join(log_dir, name)
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            markers = [b for b in segment.scan(data, 0).batches if b.is_passed]
            data[markers[2].pos + 20] ^= 0xFF  # a flipped bit inside the third marker
            f.seek(0)
            f.write(data)
        report = check.check(self.dir)
        self.assertTrue(report.damaged)  # (check: DAMAGE)
        self.start(fsync="interval")
        self.assertEqual(self.storage.damaged, 1)  # the broker: "a write torn by an earlier crash"


def _acked_publisher(port: int, seen_path: str) -> None:
    """Publish acked messages as fast as the broker answers; record each PUBLISHED offset."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(codec.frame(codec.CreateTopic(1, "crash", 3_600_000, 0).encode()))
    assert s.recv(9) == codec.frame(codec.Ok(1).encode())
    out = open(seen_path, "w", buffering=1)
    frame = codec.frame(codec.Publish(1, "crash", b"c" * 100).encode())
    s.sendall(frame * 100)
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            return
        buf += data
        n = len(buf) // 18
        for i in range(n):
            out.write(f"{struct.unpack_from('>Q', buf, i * 18 + 9)[0]}\n")
        buf = buf[n * 18 :]
        s.sendall(frame * n)


class ProcessTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zaichik-data-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def broker(self, *options) -> BrokerProcess:
        broker = BrokerProcess("--data-dir", self.dir, *options).start()
        self.addCleanup(broker.cleanup)
        return broker

    def test_sigterm_restart(self):
        broker = self.broker()
        run = lambda *a, stdin="": subprocess.run(
            [sys.executable, "-m", "zaichik.cli", "--server", broker.address, *a], input=stdin,
            capture_output=True, text=True, timeout=60, env=ENV)
        self.assertEqual(run("create", "kept", "--retention", "1h", "--compaction-window", "1h").returncode, 0)
        self.assertEqual(run("pub", "kept", "--key-from", "1", "--ack", stdin="a 1\nb 2\n").stdout, "0\n1\n")
        self.assertEqual(run("--client-id", "r", "sub", "kept", "--commit", "--count", "1").stdout, "kept 0 [a] a 1\n")
        broker.stop()
        broker = self.broker()
        run = lambda *a, stdin="": subprocess.run(
            [sys.executable, "-m", "zaichik.cli", "--server", broker.address, *a], input=stdin,
            capture_output=True, text=True, timeout=60, env=ENV)
        self.assertEqual(run("pub", "kept", "--key-from", "1", "--ack", stdin="a 3\nc 4\n").stdout,
                         "0 duplicate\n2\n")
        self.assertEqual(run("--client-id", "r", "sub", "kept", "--count", "2").stdout,
                         "kept 1 [b] b 2\nkept 2 [c] c 4\n")

    def test_kill_9_loses_nothing_acknowledged(self):
        broker = self.broker("--fsync", "always")
        seen_path = os.path.join(self.dir, "..", os.path.basename(self.dir) + ".seen")
        self.addCleanup(lambda: os.path.exists(seen_path) and os.unlink(seen_path))
        publisher = subprocess.Popen([sys.executable, "-c",
                                      f"import sys; sys.path.insert(0, {ROOT!r}); "
                                      f"from tests.test_disk import _acked_publisher; "
                                      f"_acked_publisher({broker.port}, {seen_path!r})"])
        self.addCleanup(lambda: publisher.poll() is None and publisher.kill())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if os.path.exists(seen_path) and os.path.getsize(seen_path) > 20_000:
                break
        broker.process.send_signal(signal.SIGKILL)
        broker.process.wait()
        publisher.wait(10)
        with open(seen_path) as f:
            acknowledged = [int(line) for line in f if line.strip()]
        self.assertGreater(len(acknowledged), 1000)
        self.assertEqual(acknowledged, list(range(len(acknowledged))))
        broker.process = None
        broker = self.broker()
        s = socket.create_connection(("127.0.0.1", broker.port))
        s.sendall(codec.frame(codec.Subscribe(1, "crash", Start.EARLIEST).encode()))
        s.settimeout(10)
        data = b""
        want = 9 + len(acknowledged) * len(codec.frame(codec.Message("crash", 0, 0, b"c" * 100).encode()))
        while len(data) < want:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        s.close()
        got = offsets_of([data[9:want]])
        self.assertEqual(got, acknowledged)  # every acknowledged message, in order, no gaps


class DaemonTests(TestCase):
    def test_lock_records_the_daemons_pid(self):
        """Storage is opened after twistd daemonizes: the lock names the running broker."""
        from zaichik.testing import TWISTD

        work = tempfile.mkdtemp(prefix="zaichik-daemon-")
        self.addCleanup(shutil.rmtree, work, True)
        data, pidfile = os.path.join(work, "data"), os.path.join(work, "twistd.pid")
        # (Port 0: the kernel picks one at the listen, so no other can take it first.)
        subprocess.run(TWISTD + ["--pidfile", pidfile, "--logfile", os.path.join(work, "log"), "zaichik",
                                 "--port", "tcp:0:interface=127.0.0.1", "--data-dir", data],
                       cwd=ROOT, env=ENV, check=True, timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not os.path.exists(os.path.join(data, "lock")):
            time.sleep(0.05)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(lambda: os.path.exists(f"/proc/{pid}") and os.kill(pid, signal.SIGKILL))
        while time.monotonic() < deadline:
            with open(os.path.join(data, "lock")) as f:
                written = f.read().strip()
            if written:
                break
            time.sleep(0.05)
        self.assertEqual(int(written), pid)
        os.kill(pid, signal.SIGTERM)
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)


class UnitOfWorkTests(DiskTestCase):
    def test_a_session_driven_directly_is_durable_before_it_answers(self):
        """No unit of work around the call: the session opens its own, so PUBLISHED means written."""
        service = self.start(fsync="never")
        replies = []
        path = os.path.join(self.dir, "topics", b"t".hex())
        sizes = []

        def reply(r):
            segs = [f for f in os.listdir(path) if f.endswith(".seg")]
            sizes.append(sum(os.path.getsize(os.path.join(path, f)) for f in segs))
            replies.append(r)

        session = Session(service, reply, lambda b: None, lambda: None)
        session.handle(codec.CreateTopic(1, "t", 60_000, 0))
        session.handle(codec.Publish(2, "t", b"v" * 100))
        self.assertEqual(replies, [codec.Ok(1), codec.Published(2, 0, False)])
        self.assertGreater(sizes[1], 100)  # the message was in the segment when PUBLISHED was sent


class FrameBlockTests(DiskTestCase):
    """
    A topic that retains nothing gives its log blocks of frames
    (codec.FrameBlock): the same batches on disk where it keeps records (a
    compaction window), only markers where it keeps nothing.
    """

    def test_blocks_written_as_the_frames_would_be(self):
        service = self.start(fsync="never")
        topic = service.create_topic("t", 0, 60_000)
        with service.work:
            topic.publish_all([(None, b"a" * 10), (None, b"b" * 20)])
            topic.publish_all([(None, b"c" * 30)])
        self.clock.advance(0.005)
        with service.work:
            topic.publish_all([(None, b"d" * 40)])
        if self.storage.writer is not None:
            self.storage.writer.wait()
        log = self.storage._logs["t"]
        prefix = codec.topic_prefix("t")
        frames = codec.message_frames_py(prefix, 0, T0 * 1000, [(None, b"a" * 10), (None, b"b" * 20),
                                                                (None, b"c" * 30)])
        later = codec.message_frames_py(prefix, 3, T0 * 1000 + 5, [(None, b"d" * 40)])
        with open(log.segments[-1].path, "rb") as f:
            data = f.read()
        first = segment.encode_batch_py(0, frames, 4 + len(prefix))
        second = segment.encode_batch_py(3, later, 4 + len(prefix))
        self.assertIn(first, data)
        self.assertIn(second, data)  # (after a reservation marker)
        self.assertLess(data.index(first), data.index(second))
        # Booked from the batches' headers: offsets, counts and timestamps.
        batches = segment.scan(data, 0).batches
        self.assertEqual([(b.first, b.count, b.first_ts, b.last_ts) for b in batches if b.count],
                         [(0, 3, T0 * 1000, T0 * 1000), (3, 1, T0 * 1000 + 5, T0 * 1000 + 5)])
        self.assertEqual(log.next_offset, 4)
        service = self.start(fsync="never")
        self.assertEqual(service.topics["t"].next_offset, 4)

    def test_a_topic_that_keeps_nothing_writes_markers_not_records(self):
        """
        Its records are never read back (nothing retained, no keys to know
        after a restart): each append is one marker of the offsets it took
        and its newest time, and the offsets and times go on from there.
        """
        for fsync in ("never", "interval", "always"):
            service = self.start(fsync=fsync)
            now = round(self.clock.seconds() * 1000)
            topic = service.create_topic(fsync, 0, 0)
            reader, written = self.follow(service, fsync)
            with service.work:
                topic.publish_all([(None, b"a" * 10), (None, b"b" * 20)])  # (a block)
                topic.publish_all([(b"k", b"c" * 30)])  # (keyed: frames)
            self.clock.advance(0.005)
            with service.work:
                topic.publish_all([(None, b"d" * 40)])
            self.assertEqual(offsets_of(written), [0, 1, 2, 3])
            self.stop()
            log = self.storage._logs[fsync]
            with open(log.segments[-1].path, "rb") as f:
                data = f.read()
            for value in (b"a" * 10, b"c" * 30, b"d" * 40):
                self.assertNotIn(value, data)
            markers = [(b.first, b.last_ts) for b in segment.scan(data, 0).batches if b.is_passed]
            self.assertEqual(markers, [(3, now), (4, now + 5)])
            self.assertEqual([b for b in segment.scan(data, 0).batches if b.count], [])
            self.clock.advance(-1)  # (the clock went back while the broker was down)
            service = self.start(fsync=fsync)
            topic = service.topics[fsync]
            self.assertEqual(topic.next_offset, 4)
            _, written = self.follow(service, fsync)
            topic.publish(None, b"e")
            self.assertEqual(parse_frames(b"".join(written))[0].timestamp, now + 5)
            self.stop()
            report = check.check(self.dir)
            [topic_report] = [t for t in report.topics if t.name == fsync]
            self.assertEqual(list(report.all_findings()), [])  # (no NOTE per marker)
            self.assertEqual(sum(s.not_kept for s in topic_report.segments), 5)


class ByteBoundTests(DiskTestCase):
    def test_trimmed_messages_stay_trimmed_after_restart(self):
        from zaichik.service import Limits

        service = self.start(limits=Limits(max_retained_bytes=1_000))
        topic = service.create_topic("t", 60_000, 0)
        for _ in range(20):
            topic.publish(None, b"x" * 100)
        kept = topic.retained
        self.assertLess(kept, 20)
        service = self.start(limits=Limits(max_retained_bytes=1_000))
        self.assertEqual(service.topics["t"].retained, kept)
