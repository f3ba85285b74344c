"""
Faults on the disk backend, end to end: damaged segments (a flipped byte at
many positions, after a clean stop and after a crash), a full disk (a real
tmpfs, mounted here when running as root, in-process and under a real
twistd), and failing writes injected into C{os.write}.

What must hold whatever happens (issue 10): every offset served carries the
message acknowledged for it; nothing acknowledged after the damage is lost;
no offset is given to two messages, before or after a restart; a publish
whose write fails gets C{ERROR(LIMIT)} ("storage full") and is never
delivered; other connections keep working; publishing resumes by itself
once there is room.

In-process tests use a Clock and run the fsyncs at once (deterministic);
the twistd ones poll with bounded deadlines.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple
from unittest import SkipTest

from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from tests import wire
from tests.test_disk import DiskTestCase, WaitingDiskStorage, offsets_of, run_all, run_now, slow_fsyncs
from zaichik import codec
from zaichik.codec import ErrorCode, Start
from zaichik.session import Session
from zaichik.storage import disk
from zaichik.storage import segment as fmt
from zaichik.testing import BrokerProcess, parse_frames

DAY = 86_400_000


def topic_dir(data_dir: str, name: str) -> str:
    return os.path.join(data_dir, "topics", name.encode().hex())


def segment_paths(data_dir: str, name: str) -> List[str]:
    directory = topic_dir(data_dir, name)
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory)) if n.endswith(".seg")]


def flip(path: str, pos: int) -> None:
    """Damage one byte of a file (every bit of it that 0x5A has)."""
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x5A]))


def messages_in(written) -> List[codec.Message]:
    return [m for m in parse_frames(b"".join(written)) if type(m) is codec.Message]


class Client:
    """A Session driven in-process, as a connection would drive it."""

    def __init__(self, service, client_id: str = "") -> None:
        self.replies: list = []
        self.written: list = []
        self.closed = False
        self.session = Session(service, self.replies.append, self.written.append, self._closed)
        if client_id:
            self.session.handle(codec.Hello(1, client_id))

    def _closed(self) -> None:
        self.closed = True

    def request(self, request):
        """Handle one request (its own unit of work); its reply, if one came."""
        before = len(self.replies)
        self.session.handle(request)
        got = [r for r in self.replies[before:] if getattr(r, "rid", None) == request.rid]
        return got[-1] if got else None

    def messages(self) -> List[codec.Message]:
        return messages_in(self.written)


# -- a. damage at many positions -------------------------------------------------------


class CorruptionTests(DiskTestCase):
    """
    One flipped byte, at every ~37th byte of a segment: only the damaged
    batch's messages may be lost, nothing is misserved, the damage is
    counted, and no offset is given again.
    """

    SEGMENT_BYTES = 1500
    STEP = 37

    def publish_all(self) -> Dict[int, bytes]:
        """Acknowledged publishes in small units of work (most of one message, some of three)."""
        service = self.start(fsync="always", segment_bytes=self.SEGMENT_BYTES)
        client = Client(service)
        self.assertEqual(client.request(codec.CreateTopic(1, "t", DAY, 0)), codec.Ok(1))
        acked: Dict[int, bytes] = {}
        rid = 10
        for unit in range(60):
            size = 1 if unit % 4 else 3
            requests = []
            for _ in range(size):
                value = b"value %04d " % rid + bytes([65 + rid % 26]) * (20 + rid * 13 % 60)
                requests.append(codec.Publish(rid, "t", value))
                rid += 1
            before = len(client.replies)
            with service.work:
                for request in requests:
                    client.session.handle(request)
            replies = client.replies[before:]
            self.assertEqual([type(r) for r in replies], [codec.Published] * size)
            for request, reply in zip(requests, replies):
                self.assertEqual(reply.rid, request.rid)
                self.assertNotIn(reply.offset, acked)
                acked[reply.offset] = request.value
        self.assertEqual(sorted(acked), list(range(len(acked))))
        return acked

    def prepare(self, crash: bool) -> Tuple[str, Dict[int, bytes], List[str]]:
        acked = self.publish_all()
        if crash:
            self.crash()
        else:
            self.stop()
        pristine = tempfile.mkdtemp(prefix="zaichik-pristine-")
        self.addCleanup(shutil.rmtree, pristine, True)
        shutil.copytree(self.dir, os.path.join(pristine, "data"))
        pristine = os.path.join(pristine, "data")
        segments = segment_paths(pristine, "t")
        self.assertGreaterEqual(len(segments), 4)
        for path in segments[:-1]:
            self.assertTrue(os.path.exists(path[:-4] + ".idx"))  # closed when rolled
        self.assertEqual(os.path.exists(segments[-1][:-4] + ".idx"), not crash)
        return pristine, acked, segments

    def damage_at(self, pristine: str, segment: str, positions, acked: Dict[int, bytes], scanned: bool) -> None:
        """
        For each position: a fresh copy, that byte flipped, a restart, and
        every check.  C{scanned}: start-up reads this segment (the newest,
        with no index after a crash), so it must find the damage at once;
        otherwise (a segment taken from its index) reading must find it.
        """
        with open(segment, "rb") as f:
            original = f.read()
        base = int(os.path.basename(segment)[:-4])
        before = fmt.scan(original, base)
        self.assertEqual((before.damage, before.torn), ([], None))  # (before the flip)
        batches = before.batches
        work = tempfile.mkdtemp(prefix="zaichik-damaged-")
        self.addCleanup(shutil.rmtree, work, True)
        problems: List[str] = []
        checked = 0
        for pos in positions:
            if pos >= len(original):
                continue
            self.stop()
            self.dir = os.path.join(work, str(pos))
            shutil.copytree(pristine, self.dir)
            flip(os.path.join(self.dir, os.path.relpath(segment, pristine)), pos)
            hit = [b for b in batches if b.pos <= pos < b.end]
            lost = set(range(hit[0].first, hit[0].first + hit[0].count)) if hit else set()
            for problem in self.check_damaged(acked, lost, scanned):
                problems.append(f"byte {pos} (batch of offsets {sorted(lost)}): {problem}")
            checked += 1
            self.stop()
            shutil.rmtree(self.dir, True)
        self.assertGreater(checked, 10)
        if problems:
            self.fail(f"{len(problems)} problems in {checked} positions of {os.path.basename(segment)} "
                      f"({len(original)} bytes):\n" + "\n".join(problems[:25]))

    def check_damaged(self, acked: Dict[int, bytes], lost: set, scanned: bool) -> List[str]:
        problems: List[str] = []
        try:
            service = self.start(fsync="always", segment_bytes=self.SEGMENT_BYTES)
        except Exception as e:
            return [f"the broker did not start: {e!r}"]
        storage = self.storage
        if scanned and not (storage.damaged or storage.torn):
            problems.append("start-up read the damaged segment and did not count the damage")
        newest_acked = max(acked)

        def follow(start: Start, offset: int = 0) -> List[codec.Message]:
            client = Client(service)
            reply = client.request(codec.Subscribe(2, "t", start, offset))
            if reply != codec.Ok(2):
                problems.append(f"SUBSCRIBE {start.name} {offset}: {reply}")
            return client.messages()

        got = follow(Start.EARLIEST)
        offsets = [m.offset for m in got]
        if offsets != sorted(set(offsets)):
            problems.append(f"offsets do not strictly increase: {offsets}")
        wrong = [m.offset for m in got if acked.get(m.offset) != m.value]
        if wrong:
            problems.append(f"offsets served with another message's value (or never acknowledged): {wrong}")
        missing = sorted(set(acked) - set(offsets) - lost)
        if missing:
            problems.append(f"acknowledged offsets lost outside the damaged batch: {missing[:10]}"
                            f"{'...' if len(missing) > 10 else ''} ({len(missing)})")
        if not (storage.damaged or storage.torn):
            problems.append("the damage was not counted, even once read (damaged == torn == 0)")
        # SUBSCRIBE OFFSET before, inside and after the damage.
        if lost:
            starts = {0, min(lost) - 1, min(lost), min(lost) + 1, max(lost), max(lost) + 1, newest_acked,
                      newest_acked + 1}
        else:
            starts = {0, 1, newest_acked // 2, newest_acked, newest_acked + 1}
        for start in sorted(s for s in starts if s >= 0):
            at = [(m.offset, m.value) for m in follow(Start.OFFSET, start)]
            want = [(m.offset, m.value) for m in got if m.offset >= start]
            if at != want:
                problems.append(f"SUBSCRIBE OFFSET {start} delivered offsets {[o for o, _ in at][:8]}, "
                                f"not {[o for o, _ in want][:8]}")
        # A new message gets a new offset, now and after another restart.
        client = Client(service)
        newest = max([newest_acked] + offsets)
        for attempt in range(2):
            reply = client.request(codec.Publish(99, "t", b"after the damage %d" % attempt))
            if type(reply) is not codec.Published or reply.offset <= newest:
                problems.append(f"publish after the damage (start {attempt + 1}): {reply}, "
                                f"but offsets up to {newest} were used")
                break
            newest = reply.offset
            again = [m for m in follow(Start.OFFSET, reply.offset)]
            if [(m.offset, m.value) for m in again] != [(reply.offset, b"after the damage %d" % attempt)]:
                problems.append(f"the new message is not served at its offset: {again}")
            if attempt == 0:
                service = self.start(fsync="always", segment_bytes=self.SEGMENT_BYTES)
                client = Client(service)
                later = [(m.offset, m.value) for m in follow(Start.EARLIEST)]
                if later[:len(got)] != [(m.offset, m.value) for m in got]:
                    problems.append("a second start serves something else")
        return problems

    def positions(self, segment: str) -> range:
        # From inside the first batch (the segment's header is tested apart).
        return range(fmt.SEGMENT_HEADER + 3, os.path.getsize(segment), self.STEP)

    def test_non_last_segment_after_a_clean_stop(self):
        pristine, acked, segments = self.prepare(crash=False)
        self.damage_at(pristine, segments[1], self.positions(segments[1]), acked, scanned=False)

    def test_non_last_segment_after_a_crash(self):
        pristine, acked, segments = self.prepare(crash=True)
        self.damage_at(pristine, segments[-2], self.positions(segments[-2]), acked, scanned=False)

    def test_last_segment_after_a_clean_stop(self):
        pristine, acked, segments = self.prepare(crash=False)
        self.damage_at(pristine, segments[-1], self.positions(segments[-1]), acked, scanned=False)

    def test_last_segment_after_a_crash(self):
        pristine, acked, segments = self.prepare(crash=True)
        with open(segments[-1], "rb") as f:
            self.assertGreaterEqual(len(fmt.scan(f.read(), 0).batches), 3)
        self.damage_at(pristine, segments[-1], self.positions(segments[-1]), acked, scanned=True)

    def test_segment_header(self):
        """
        A flipped byte in a segment's 16-byte header (magic, format, flags,
        base offset): nothing lost, nothing misserved.  Where start-up reads
        the header (the newest segment after a crash), damage to its magic is
        counted.
        """
        pristine, acked, segments = self.prepare(crash=True)
        problems = []
        for segment in (segments[1], segments[-1]):
            problems += self.damage_at_header(pristine, segment, acked, counted=segment == segments[-1])
        if problems:
            self.fail(f"{len(problems)} problems:\n" + "\n".join(problems))

    def damage_at_header(self, pristine: str, segment: str, acked, counted: bool) -> List[str]:
        work = tempfile.mkdtemp(prefix="zaichik-damaged-")
        self.addCleanup(shutil.rmtree, work, True)
        problems = []
        for pos in range(fmt.SEGMENT_HEADER):
            self.stop()
            self.dir = os.path.join(work, str(pos))
            shutil.copytree(pristine, self.dir)
            flip(os.path.join(self.dir, os.path.relpath(segment, pristine)), pos)
            found = self.check_damaged(acked, set(), scanned=counted and pos < 4)
            if not (counted and pos < 4):
                found = [p for p in found if "not counted" not in p]
            problems += [f"byte {pos} of the header of {os.path.basename(segment)}: {p}" for p in found]
            self.stop()
        return problems

    def test_damaged_index_is_only_a_cache(self):
        """A flipped byte in a closed segment's .idx: the segment is read instead; nothing lost, nothing counted."""
        pristine, acked, segments = self.prepare(crash=False)
        index = segments[1][:-4] + ".idx"
        work = tempfile.mkdtemp(prefix="zaichik-damaged-")
        self.addCleanup(shutil.rmtree, work, True)
        for pos in range(0, os.path.getsize(index), 11):
            self.stop()
            self.dir = os.path.join(work, str(pos))
            shutil.copytree(pristine, self.dir)
            flip(os.path.join(self.dir, os.path.relpath(index, pristine)), pos)
            service = self.start(fsync="always", segment_bytes=self.SEGMENT_BYTES)
            client = Client(service)
            client.request(codec.Subscribe(2, "t", Start.EARLIEST))
            self.assertEqual({m.offset: m.value for m in client.messages()}, acked, f"index byte {pos}")
            self.assertEqual((self.storage.damaged, self.storage.torn), (0, 0), f"index byte {pos}")
            self.assertEqual(Client(service).request(codec.Publish(5, "t", b"new")),
                             codec.Published(5, len(acked)))


# -- c. a failing write, injected ------------------------------------------------------------


class FailingWriteTests(DiskTestCase):
    """os.write fails (ENOSPC) for the files chosen; everything else is real."""

    def fail_writes(self, which, partial: bool = False):
        """
        Make C{os.write} fail with ENOSPC on the fds C{which(fd)} picks
        (with C{partial}, a first call writes half and returns, as a disk
        filling up would do).  Returns the patch (C{.restore()} ends it) and
        the list of fds that failed.
        """
        real = os.write
        failed: List[int] = []

        def write(fd, data):
            if which(fd):
                if partial and not failed:
                    failed.append(fd)
                    return real(fd, bytes(data[: max(len(data) // 2, 1)]))
                failed.append(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        return self.patch(disk.os, "write", write), failed

    @staticmethod
    def under(directory: str):
        def which(fd: int) -> bool:
            try:
                return os.readlink(f"/proc/self/fd/{fd}").startswith(directory)
            except OSError:
                return False
        return which

    def setup_topic(self, fsync: str = "always", **options):
        service = self.start(fsync=fsync, **options)
        publisher = Client(service)
        self.assertEqual(publisher.request(codec.CreateTopic(1, "t", DAY, 0)), codec.Ok(1))
        for i in range(3):
            self.assertEqual(publisher.request(codec.Publish(10 + i, "t", b"ok %d" % i)), codec.Published(10 + i, i))
        follower = Client(service)
        self.assertEqual(follower.request(codec.Subscribe(2, "t", Start.EARLIEST)), codec.Ok(2))
        return service, publisher, follower

    def assert_others_work(self, service, served: Dict[int, bytes]) -> None:
        other = Client(service)
        self.assertEqual(other.request(codec.Ping(7)), codec.Ok(7))
        topics = other.request(codec.ListTopics(8))
        self.assertEqual([(t.name, t.next_offset, t.retained) for t in topics.topics],
                         [("t", max(served) + 1, len(served))])
        self.assertEqual(other.request(codec.Subscribe(9, "t", Start.EARLIEST)), codec.Ok(9))
        self.assertEqual({m.offset: m.value for m in other.messages()}, served)
        self.assertFalse(other.closed)

    def check_failed_publish(self, partial: bool, fsync: str = "always") -> None:
        service, publisher, follower = self.setup_topic(fsync)
        log = self.storage._logs["t"]
        path = log.segments[-1].path
        size = os.path.getsize(path)
        patch, failed = self.fail_writes(lambda fd: fd == log._fd, partial)
        reply = publisher.request(codec.Publish(20, "t", b"never stored" * 20))
        self.assertTrue(failed)
        self.assertEqual(type(reply), codec.Error, reply)
        self.assertEqual((reply.rid, reply.code), (20, ErrorCode.LIMIT))
        self.assertIn("storage full", reply.message)
        self.assertEqual(os.path.getsize(path), size)  # no partial batch left behind
        self.assertFalse(publisher.closed)
        self.assertEqual(publisher.request(codec.Ping(21)), codec.Ok(21))
        served = {0: b"ok 0", 1: b"ok 1", 2: b"ok 2"}
        self.assert_others_work(service, served)
        self.assertEqual({m.offset: m.value for m in follower.messages()}, served)
        # Still failing: refused again, the same way.
        reply = publisher.request(codec.Publish(22, "t", b"never stored either"))
        self.assertEqual((type(reply), reply.code), (codec.Error, ErrorCode.LIMIT))
        patch.restore()
        # Room again: the offset nobody got is given to the next message.
        self.assertEqual(publisher.request(codec.Publish(23, "t", b"stored")), codec.Published(23, 3))
        served[3] = b"stored"
        self.assertEqual({m.offset: m.value for m in follower.messages()}, served)
        self.assert_others_work(service, served)
        service = self.start(fsync=fsync)
        self.assert_others_work(service, served)
        self.assertEqual(Client(service).request(codec.Publish(24, "t", b"next")), codec.Published(24, 4))

    def test_failed_write(self):
        self.check_failed_publish(partial=False)

    def test_partly_failed_write_is_cut_back(self):
        self.check_failed_publish(partial=True)

    def test_failed_write_fsync_never(self):
        self.check_failed_publish(partial=True, fsync="never")

    def test_failed_write_in_a_batch_of_publishes(self):
        """A unit of work with several publishes and a PUBLISH_BATCH: each request gets its ERROR."""
        service, publisher, follower = self.setup_topic()
        log = self.storage._logs["t"]
        patch, failed = self.fail_writes(lambda fd: fd == log._fd)
        before = len(publisher.replies)
        with service.work:
            publisher.session.handle(codec.Publish(30, "t", b"a"))
            publisher.session.handle(codec.PublishBatch(31, "t", [(None, b"c"), (b"k", b"d")]))
            publisher.session.handle(codec.Publish(32, "t", b"e"))
        replies = publisher.replies[before:]
        self.assertEqual([(type(r), r.rid, r.code) for r in replies],
                         [(codec.Error, rid, ErrorCode.LIMIT) for rid in (30, 31, 32)])
        self.assertTrue(all("storage full" in r.message for r in replies))
        patch.restore()
        self.assertEqual(publisher.request(codec.PublishBatch(33, "t", [(None, b"f"), (None, b"g")])),
                         codec.PublishedBatch(33, [(3, False), (4, False)]))
        self.assertEqual([(m.offset, m.value) for m in follower.messages()],
                         [(0, b"ok 0"), (1, b"ok 1"), (2, b"ok 2"), (3, b"f"), (4, b"g")])

    def test_failed_fire_and_forget_publish_is_told(self):
        """
        The spec: a PUBLISH with rid 0 "gets ... an ERROR with rid 0 if it
        fails", also when an acknowledged publish failed in the same unit of
        work (the same append).
        """
        service, publisher, follower = self.setup_topic()
        log = self.storage._logs["t"]
        patch, failed = self.fail_writes(lambda fd: fd == log._fd)
        before = len(publisher.replies)
        publisher.session.handle(codec.Publish(0, "t", b"alone"))
        self.assertEqual([(type(r), r.rid, r.code) for r in publisher.replies[before:]],
                         [(codec.Error, 0, ErrorCode.LIMIT)])
        before = len(publisher.replies)
        with service.work:
            publisher.session.handle(codec.Publish(30, "t", b"acknowledged"))
            publisher.session.handle(codec.Publish(0, "t", b"fire and forget"))
        patch.restore()
        self.assertEqual([(type(r), r.rid, r.code) for r in publisher.replies[before:]],
                         [(codec.Error, 30, ErrorCode.LIMIT), (codec.Error, 0, ErrorCode.LIMIT)])

    def test_failed_fire_and_forget_batch_is_told(self):
        """The same for PUBLISH_BATCH with rid 0 (which makes no reply of its own): one ERROR, rid 0."""
        service, publisher, follower = self.setup_topic()
        log = self.storage._logs["t"]
        patch, failed = self.fail_writes(lambda fd: fd == log._fd)
        before = len(publisher.replies)
        with service.work:
            publisher.session.handle(codec.PublishBatch(0, "t", [(None, b"a"), (None, b"b")]))
            publisher.session.handle(codec.PublishBatch(0, "t", [(None, b"c")]))
        patch.restore()
        self.assertEqual([(type(r), r.rid, r.code) for r in publisher.replies[before:]],
                         [(codec.Error, 0, ErrorCode.LIMIT)])
        self.assertEqual(publisher.request(codec.PublishBatch(31, "t", [(None, b"d")])),
                         codec.PublishedBatch(31, [(3, False)]))

    def test_failed_write_of_a_new_segment(self):
        """The write that fails is the new segment's header: no empty segment left, the offset given again."""
        service, publisher, follower = self.setup_topic(segment_bytes=200)
        log = self.storage._logs["t"]
        directory = topic_dir(self.dir, "t")
        segments = sorted(os.listdir(directory))
        self.assertGreater(log.segments[-1].size, 200)  # the next write rolls
        patch, failed = self.fail_writes(self.under(directory))
        reply = publisher.request(codec.Publish(40, "t", b"x"))
        self.assertEqual((type(reply), reply.code), (codec.Error, ErrorCode.LIMIT), reply)
        self.assertIn("storage full", reply.message)
        patch.restore()
        self.assertEqual([n for n in sorted(os.listdir(directory)) if n.endswith(".seg")],
                         [n for n in segments if n.endswith(".seg")])
        self.assertEqual(publisher.request(codec.Publish(41, "t", b"y")), codec.Published(41, 3))
        self.assertEqual([(m.offset, m.value) for m in follower.messages()][-1], (3, b"y"))
        service = self.start(segment_bytes=200)
        self.assert_others_work(service, {0: b"ok 0", 1: b"ok 1", 2: b"ok 2", 3: b"y"})

    def failed_commit(self):
        """A durable client commits 1, then its COMMIT of 3 cannot be written."""
        service = self.start(fsync="always")
        service.create_topic("t", DAY, 0).publish_many([(None, b"v")] * 5)
        worker = Client(service, "worker")
        self.assertEqual(worker.request(codec.Subscribe(2, "t", Start.DEFAULT)), codec.Ok(2))
        self.assertEqual(worker.request(codec.Commit(3, "t", 1)), codec.Ok(3))
        commits = os.path.join(self.dir, "commits.log")
        size = os.path.getsize(commits)
        patch, failed = self.fail_writes(self.under(commits))
        reply = worker.request(codec.Commit(4, "t", 3))
        patch.restore()
        self.assertTrue(failed)
        self.assertEqual((type(reply), reply.rid, reply.code), (codec.Error, 4, ErrorCode.LIMIT), reply)
        self.assertIn("storage full", reply.message)
        self.assertEqual(os.path.getsize(commits), size)  # no partial line
        self.assertFalse(worker.closed)
        return service

    def test_failed_commit_is_not_durable(self):
        self.failed_commit()
        service = self.start(fsync="always")
        resumed = Client(service, "worker")
        resumed.request(codec.Subscribe(2, "t", Start.DEFAULT))
        self.assertEqual([m.offset for m in resumed.messages()], [2, 3, 4])

    def test_failed_commit_is_not_remembered(self):
        """The client was told its commit failed: reconnecting, it resumes after the last commit that held."""
        service = self.failed_commit()
        resumed = Client(service, "worker")  # takes the client id over, same broker
        resumed.request(codec.Subscribe(2, "t", Start.DEFAULT))
        self.assertEqual([m.offset for m in resumed.messages()], [2, 3, 4])
        self.assertEqual(service.committed("worker", "t"), 1)

    def test_failed_fsync(self):
        """
        An fsync that fails (EIO): the PUBLISH gets an ERROR, and the message
        it carried is never delivered, not even after a restart.
        """
        service, publisher, follower = self.setup_topic()
        self.storage._run_blocking = lambda f, *args: fail(OSError(errno.EIO, os.strerror(errno.EIO)))
        reply = publisher.request(codec.Publish(50, "t", b"not durable"))
        self.assertEqual((type(reply), reply.rid), (codec.Error, 50), reply)
        self.assertEqual(reply.code, ErrorCode.INTERNAL)
        self.assertEqual([m.offset for m in follower.messages()], [0, 1, 2])
        self.assertEqual(Client(service).request(codec.Ping(51)), codec.Ok(51))
        service = self.start(fsync="always")
        reader = Client(service)
        reader.request(codec.Subscribe(2, "t", Start.EARLIEST))
        self.assertNotIn(b"not durable", [m.value for m in reader.messages()])
        reply = Client(service).request(codec.Publish(52, "t", b"later"))
        self.assertEqual(type(reply), codec.Published)
        self.assertGreaterEqual(reply.offset, 3)

    def test_a_topic_made_after_a_failed_fsync_refuses_writes_too(self):
        """Writes are refused until a restart: a new topic's as well (a review's doubt)."""
        service, publisher, follower = self.setup_topic()
        self.storage._run_blocking = lambda f, *args: fail(OSError(errno.EIO, os.strerror(errno.EIO)))
        self.assertEqual(type(publisher.request(codec.Publish(50, "t", b"not durable"))), codec.Error)
        self.storage._run_blocking = run_now
        reply = publisher.request(codec.Publish(51, "new", b"after the failure"))
        self.assertEqual(type(reply), codec.Error, reply)
        self.assertIn("fsync failed", reply.message)

    def test_failed_fsync_at_a_roll(self):
        """
        Rolling a full segment fsyncs it (under interval too).  When that
        fails the broker refuses writes until restarted; the append that
        rolled had gone on into the new segment and was delivered (a
        review's doubt).  It is refused like the ones after it.
        """
        service, publisher, follower = self.setup_topic("interval", segment_bytes=2_000)
        log = self.storage._logs["t"]
        full = fail_fsync_once(self)
        for rid in range(100, 200):
            full.add(log._fd)  # (the newest segment's fsync fails when it is rolled)
            reply = publisher.request(codec.Publish(rid, "t", b"v%d" % rid * 40))
            if len(log.segments) > 1:
                break
            self.assertEqual(type(reply), codec.Published)
        self.assertEqual((type(reply), reply.rid), (codec.Error, rid), reply)
        self.assertNotIn(b"v%d" % rid * 40, [m.value for m in follower.messages()])
        reply = publisher.request(codec.Publish(rid + 1, "t", b"after"))
        self.assertEqual(type(reply), codec.Error)


EIO = OSError(errno.EIO, os.strerror(errno.EIO))


def fail_fsync_once(test) -> set:
    """os.fsync fails (EIO) once for each fd put in the set returned (a new segment may get the same number)."""
    real = os.fsync
    failing: set = set()

    def fsync(fd):
        if fd in failing:
            failing.discard(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    test.patch(os, "fsync", fsync)
    return failing


def topic_with_slow_fsyncs(test, service):
    """Topic "t" on a broker whose fsyncs wait (see slow_fsyncs): its log, the held fsyncs, a publisher."""
    service.create_topic("t", 60_000, 0)
    held = slow_fsyncs(test.storage)
    replies: list = []
    publisher = Session(service, replies.append, lambda b: None, lambda: None)
    return test.storage._logs["t"], held, replies, publisher


def refused_offsets(replies, batches) -> set:
    """Offsets of the batches (rid -> offsets) that got an ERROR."""
    return {o for r in replies if type(r) is codec.Error for o in batches.get(r.rid, ())}


class HeldAcrossARollTests(DiskTestCase):
    """
    Held appends (past the durable reservation, --fsync interval) in the
    segment before a roll, then the append that rolled (held behind them,
    DiskLog.held), then a failed fsync: every held append is refused and
    cut off the segment it is in (a review: only the newest segment was
    cut, at a position of the old one, which could grow it with zeros).
    """

    def fill_and_roll(self, service):
        self.storage.reserve = 100
        log, held, replies, publisher = topic_with_slow_fsyncs(self, service)
        batches = {}
        rid, first = 10, 0
        while len(log.segments) < 2:
            with service.work:
                publisher.handle(codec.PublishBatch(rid, "t", [(None, b"x")] * 40))
            batches[rid] = range(first, first + 40)
            rid += 1
            first += 40
        return log, held, replies, batches

    def test_refused_held_appends_before_the_roll_are_not_served_after_a_restart(self):
        service = self.start(fsync="interval", segment_bytes=4_000)
        log, held, replies, batches = self.fill_and_roll(service)
        d, f, args = held.pop(0)  # the tick's fsync under way since the first held append
        with service.work:
            d.errback(EIO)
        refused = refused_offsets(replies, batches)
        self.assertTrue(refused)
        self.storage._run_blocking = run_now
        held.clear()
        service = self.start(fsync="interval")
        _, written = self.follow(service, "t")
        served = set(offsets_of(written))
        # Refused (ERROR) yet served after the restart: still in the rolled segment.
        self.assertEqual(sorted(served & refused), [])

    def test_a_failed_roll_fsync_does_not_cut_the_new_segment_at_an_old_position(self):
        """
        6cfb29c: the roll's fsync fails (every log broken, the append that
        rolled refused); the next tick's _release_held cuts the held
        appends of the old segment with their positions applied to the
        new one: ftruncate past its end grows it with zeros, which the next
        start takes for a torn write.
        """
        service = self.start(fsync="interval", segment_bytes=4_000)
        self.storage.reserve = 100
        log, held, replies, publisher = topic_with_slow_fsyncs(self, service)
        failing = fail_fsync_once(self)
        batches = {}
        rid, first = 10, 0
        while len(log.segments) < 2:
            failing.clear()
            failing.add(log._fd)  # (the roll's fsync of this segment fails)
            with service.work:
                publisher.handle(codec.PublishBatch(rid, "t", [(None, b"x")] * 40))
            batches[rid] = range(first, first + 40)
            rid += 1
            first += 40
        failing.clear()
        self.assertTrue(log.broken)
        self.assertTrue(self.storage._held)  # (appends of the old segment still held)
        new_path = log.segments[-1].path
        size = os.path.getsize(new_path)
        self.storage._run_blocking = run_now
        run_all(held)  # (the tick's fsync ends well: the held appends of the broken log are refused)
        self.assertFalse(self.storage._held)
        self.assertLessEqual(os.path.getsize(new_path), size)  # not grown by a cut "back"
        refused = refused_offsets(replies, batches)
        service = self.start(fsync="interval")
        self.assertEqual(self.storage.torn, 0)
        _, written = self.follow(service, "t")
        self.assertEqual(sorted(set(offsets_of(written)) & refused), [])


class HeldAcrossARollWriterTests(HeldAcrossARollTests):
    storage_class = WaitingDiskStorage


class AlwaysRollFsyncTests(DiskTestCase):
    """
    --fsync always: appends waiting for the next group fsync (one is under
    way) in a segment whose roll fsync then fails (6cfb29c refuses the
    append that rolled).  Their group's fsync takes log.sync_fd(), the
    *new* segment, succeeds, and they are acknowledged: never fsynced.
    """

    def test_appends_before_a_failed_roll_fsync_are_not_acknowledged(self):
        service = self.start(fsync="always", segment_bytes=2_000)
        log, held, replies, publisher = topic_with_slow_fsyncs(self, service)
        failing = fail_fsync_once(self)
        publisher.handle(codec.Publish(5, "t", b"first"))  # (its group's fsync under way)
        rid = 10
        while len(log.segments) < 2:
            failing.clear()
            failing.add(log._fd)  # (the roll's fsync of this segment fails)
            publisher.handle(codec.Publish(rid, "t", b"v" * 300))
            rid += 1
        failing.clear()
        rolled = rid - 1
        self.assertTrue(log.broken)
        run_all(held)
        got = {r.rid: type(r) for r in replies}
        self.assertEqual(got[rolled], codec.Error)
        # Written to the rolled segment, whose only fsync since failed.
        self.assertEqual({r: got[r] for r in range(10, rolled)}, {r: codec.Error for r in range(10, rolled)})

    def test_a_failed_group_fsync_spanning_a_roll_cuts_the_rolled_segment_too(self):
        """
        The same cut (_synced, --fsync always; before these commits): a
        group with appends before and after a roll fails; the ones in the
        rolled segment get an ERROR but stay in it, and a restart serves them.
        """
        service = self.start(fsync="always", segment_bytes=2_000)
        log, held, replies, publisher = topic_with_slow_fsyncs(self, service)
        publisher.handle(codec.Publish(5, "t", b"first"))  # (its group's fsync under way)
        rid = 10
        while len(log.segments) < 2:
            publisher.handle(codec.Publish(rid, "t", b"v%d" % rid + b"v" * 300))
            rid += 1
        d, f, args = held.pop(0)
        d.errback(EIO)
        refused = [r.rid for r in replies if type(r) is codec.Error]
        self.assertEqual(refused, [5] + list(range(10, rid)))
        self.storage._run_blocking = run_now
        held.clear()
        service = self.start(fsync="always")
        _, written = self.follow(service, "t")
        values = {m.value for m in messages_in(written)}
        self.assertEqual(sorted(r for r in range(10, rid) if b"v%d" % r + b"v" * 300 in values), [])


# -- b. a full disk: a real (small) filesystem -------------------------------------------------


def mount_tmpfs(test, size: str) -> str:
    """
    Mount a tmpfs of C{size} on a new directory, unmounted (always) at the
    test's cleanup; skip the test where that cannot be done.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise SkipTest("mounting a small tmpfs needs root (the injected failing writes cover the rest)")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        raise SkipTest("no mount/umount command")
    where = tempfile.mkdtemp(prefix="zaichik-tmpfs-")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "zaichik-test", where],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        os.rmdir(where)
        raise SkipTest(f"cannot mount a tmpfs: {e}") from None
    if done.returncode:
        os.rmdir(where)
        raise SkipTest(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")

    def unmount():
        if subprocess.run(["umount", where], capture_output=True, timeout=30).returncode:
            subprocess.run(["umount", "-l", where], capture_output=True, timeout=30)
        try:
            os.rmdir(where)
        except OSError:
            pass

    test.addCleanup(unmount)
    return where


def fill(path: str, limit: Optional[int] = None) -> int:
    """Write to C{path} until its filesystem is full (or C{limit} bytes); the bytes written."""
    written = 0
    with open(path, "ab", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            block = b"\0" * chunk
            while limit is None or written + chunk <= limit:
                try:
                    n = f.write(block)
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
                written += n
                if not n:
                    break
    return written


def value_of(i: int, size: int) -> bytes:
    return (b"message %06d " % i).ljust(size, b".")


class WriterThreadFailingWriteTests(FailingWriteTests):
    """
    The same with --fsync never and interval, whose appends the writer
    thread writes (zaichik.storage.writer): booked here at each unit's end.
    """

    storage_class = WaitingDiskStorage

    def test_failed_write_writer_thread(self):
        for fsync, partial in (("never", False), ("never", True), ("interval", True)):
            self.check_failed_publish(partial=partial, fsync=fsync)
            self.stop()
            shutil.rmtree(self.dir)
            os.mkdir(self.dir)

    def test_writes_queued_behind_a_failed_one_fail_too(self):
        """
        Three units' writes queued, the first fails: all three are refused
        (their offsets follow the first's), the file is as before them, and
        their offsets are given again from the first.
        """
        service, publisher, follower = self.setup_topic("never")
        self.storage.wait_at_sync = False
        log = self.storage._logs["t"]
        size = os.path.getsize(log.segments[-1].path)
        gate = threading.Event()
        real = os.write
        calls: List[int] = []

        def write(fd, data):
            if fd == log._fd:
                calls.append(len(data))
                if len(calls) == 1:
                    gate.wait(10)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        patch = self.patch(disk.os, "write", write)
        for rid in (30, 31, 32):
            self.assertIsNone(publisher.request(codec.Publish(rid, "t", b"queued %d" % rid)))  # (not yet answered)
        gate.set()
        self.storage.writer.wait()
        self.assertEqual(len(calls), 1)  # (only the first reached the file: the others failed unwritten)
        self.assertEqual([(type(r), r.rid, r.code) for r in publisher.replies[-3:]],
                         [(codec.Error, rid, ErrorCode.LIMIT) for rid in (30, 31, 32)])
        self.assertEqual(os.path.getsize(log.segments[-1].path), size)
        patch.restore()
        self.storage.wait_at_sync = True
        self.assertEqual(publisher.request(codec.Publish(33, "t", b"stored")), codec.Published(33, 3))
        served = {0: b"ok 0", 1: b"ok 1", 2: b"ok 2", 3: b"stored"}
        self.assertEqual({m.offset: m.value for m in follower.messages()}, served)
        self.assert_others_work(service, served)
        service = self.start(fsync="never")
        self.assert_others_work(service, served)


class DiskFullInProcessTests(DiskTestCase):
    """A data dir on a 1 MiB tmpfs, --fsync always, driven by Sessions."""

    def setUp(self) -> None:
        super().setUp()
        self.mount = mount_tmpfs(self, "1m")
        self.addCleanup(self.stop)  # (before the unmount: the broker holds files there)
        self.dir = os.path.join(self.mount, "data")
        os.mkdir(self.dir)

    def publish_until_full(self, client: Client, acked: Dict[int, bytes], failed: List[bytes], first: int) -> int:
        for i in range(first, first + 5000):
            value = value_of(i, 1000)
            reply = client.request(codec.Publish(1000 + i, "t", value))
            if type(reply) is codec.Published:
                self.assertNotIn(reply.offset, acked)
                acked[reply.offset] = value
                continue
            self.assertEqual((type(reply), reply.rid, reply.code), (codec.Error, 1000 + i, ErrorCode.LIMIT), reply)
            self.assertIn("storage full", reply.message)
            failed.append(value)
            return i + 1
        self.fail("the filesystem never filled up")

    def test_full_then_room_again_then_crash_while_full(self):
        spare = [os.path.join(self.mount, "spare-%d" % i) for i in range(2)]
        for path in spare:
            self.assertEqual(fill(path, 96 * 1024), 96 * 1024)
        service = self.start(fsync="always")
        publisher = Client(service)
        self.assertEqual(publisher.request(codec.CreateTopic(1, "t", DAY, 0)), codec.Ok(1))
        follower = Client(service)
        self.assertEqual(follower.request(codec.Subscribe(2, "t", Start.EARLIEST)), codec.Ok(2))
        acked: Dict[int, bytes] = {}
        failed: List[bytes] = []
        i = self.publish_until_full(publisher, acked, failed, 0)
        self.assertGreater(len(acked), 100)
        # Still full: refused again, the connection open.
        refused = value_of(99_999, 1000)
        reply = publisher.request(codec.Publish(3, "t", refused))
        self.assertEqual((type(reply), getattr(reply, "code", None)), (codec.Error, ErrorCode.LIMIT), reply)
        failed.append(refused)
        self.assertFalse(publisher.closed)
        self.assertEqual(publisher.request(codec.Ping(4)), codec.Ok(4))
        # Everyone else goes on.
        other = Client(service)
        self.assertEqual(other.request(codec.Ping(5)), codec.Ok(5))
        topics = other.request(codec.ListTopics(6)).topics
        self.assertEqual([(t.name, t.next_offset, t.retained) for t in topics], [("t", len(acked), len(acked))])
        self.assertEqual(other.request(codec.Subscribe(7, "t", Start.EARLIEST)), codec.Ok(7))
        self.assertEqual({m.offset: m.value for m in other.messages()}, acked)
        self.assertEqual({m.offset: m.value for m in follower.messages()}, acked)  # only what was acknowledged
        # A topic cannot be recorded either: refused the same way, and not half made.
        reply = other.request(codec.CreateTopic(10, "new", DAY, 0))
        self.assertEqual((type(reply), getattr(reply, "code", None)), (codec.Error, ErrorCode.LIMIT), reply)
        self.assertIn("storage full", reply.message)
        self.assertEqual(sorted(service.topics), ["t"])
        self.assertFalse(other.closed)
        # Room again: publishing resumes by itself, at the next offset.
        os.unlink(spare[0])
        self.assertEqual(other.request(codec.CreateTopic(11, "new", DAY, 0)), codec.Ok(11))
        reply = publisher.request(codec.Publish(8, "t", b"room again"))
        self.assertEqual(reply, codec.Published(8, len(acked)))
        acked[reply.offset] = b"room again"
        self.assertEqual({m.offset: m.value for m in follower.messages()}, acked)
        # Full again, and the broker dies.
        self.publish_until_full(publisher, acked, failed, i)
        delivered = {m.offset: m.value for m in follower.messages()}
        self.assertEqual(delivered, acked)
        self.crash()
        os.unlink(spare[1])
        service = self.start(fsync="always")
        reader = Client(service)
        reader.request(codec.Subscribe(2, "t", Start.EARLIEST))
        self.assertEqual({m.offset: m.value for m in reader.messages()}, acked)
        reply = Client(service).request(codec.Publish(9, "t", b"after the crash"))
        self.assertEqual(type(reply), codec.Published)
        self.assertGreater(reply.offset, max(acked))
        values = [m.value for m in reader.messages()]
        self.assertFalse(set(failed) & set(values), "a message that got an ERROR was delivered")


class DiskFullProcessTests(SynchronousTestCase):
    """A real twistd broker whose --data-dir is on a 2 MiB tmpfs."""

    def setUp(self) -> None:
        self.mount = mount_tmpfs(self, "2m")
        self.dir = os.path.join(self.mount, "data")
        os.mkdir(self.dir)
        self.spare = [os.path.join(self.mount, "spare-%d" % i) for i in range(2)]
        for path in self.spare:
            self.assertEqual(fill(path, 192 * 1024), 192 * 1024)

    def broker(self) -> BrokerProcess:
        broker = BrokerProcess("--data-dir", self.dir).start()
        self.addCleanup(broker.cleanup)  # (before the unmount)
        return broker

    def client(self, broker: BrokerProcess) -> wire.Client:
        client = wire.Client(broker.port, timeout=10)
        self.addCleanup(client.close)
        return client

    def publish_until_full(self, client: wire.Client, acked: Dict[int, bytes], failed: List[bytes], first: int) -> int:
        deadline = time.monotonic() + 30
        i = first
        while time.monotonic() < deadline:
            value = value_of(i, 2000)
            reply = client.request(wire.publish(i + 1, "full", value))
            i += 1
            if reply.name == "PUBLISHED":
                self.assertEqual(reply.rid, i)
                self.assertNotIn(reply.offset, acked)
                acked[reply.offset] = value
                continue
            self.assertEqual((reply.name, reply.rid, reply.code), ("ERROR", i, wire.LIMIT), wire.describe(reply))
            self.assertIn("storage full", reply.message)
            failed.append(value)
            return i
        self.fail("the filesystem never filled up")

    def read_all(self, broker: BrokerProcess, count: int) -> Dict[int, bytes]:
        reader = self.client(broker)
        self.assertEqual(reader.request(wire.subscribe(1, "full", wire.START_EARLIEST)).name, "OK")
        got = reader.messages_n(count)
        got += reader.drain_messages(0.3)
        offsets = [m.offset for m in got]
        self.assertEqual(offsets, sorted(set(offsets)))
        reader.close()
        return {m.offset: m.value for m in got}

    def test_disk_full(self):
        broker = self.broker()
        publisher = self.client(broker)
        self.assertEqual(publisher.request(wire.create_topic(1, "full", DAY, 0)).name, "OK")
        follower = self.client(broker)
        self.assertEqual(follower.request(wire.subscribe(1, "full", wire.START_EARLIEST)).name, "OK")
        acked: Dict[int, bytes] = {}
        failed: List[bytes] = []
        i = self.publish_until_full(publisher, acked, failed, 1000)
        self.assertGreater(len(acked), 200)
        self.assertEqual(sorted(acked), list(range(len(acked))))
        # The publisher's connection stays open, and is refused again while full.
        self.assertEqual(publisher.request(wire.ping(7)).name, "OK")
        refused = value_of(99_999, 2000)
        reply = publisher.request(wire.publish(8, "full", refused))
        self.assertEqual((reply.name, getattr(reply, "code", None)), ("ERROR", wire.LIMIT), wire.describe(reply))
        failed.append(refused)
        # Other connections keep working.
        other = self.client(broker)
        self.assertEqual(other.request(wire.ping(1)).name, "OK")
        topics = other.request(wire.list_topics(2)).topics
        self.assertEqual([(t.name, t.next_offset, t.retained) for t in topics], [("full", len(acked), len(acked))])
        self.assertEqual(self.read_all(broker, len(acked)), acked)
        # The subscriber got exactly the acknowledged messages.
        delivered = {m.offset: m.value for m in follower.messages_n(len(acked)) + follower.drain_messages(0.3)}
        self.assertEqual(delivered, acked)
        # Room again: publishing resumes by itself, with the next offset.
        os.unlink(self.spare[0])
        reply = publisher.request(wire.publish(9, "full", b"room again"))
        self.assertEqual((reply.name, reply.offset), ("PUBLISHED", len(acked)), wire.describe(reply))
        acked[reply.offset] = b"room again"
        message = follower.message()
        self.assertEqual((message.offset, message.value), (reply.offset, b"room again"))
        delivered[message.offset] = message.value
        self.assertEqual(self.read_all(broker, len(acked)), acked)
        # Full again; then kill -9.
        self.publish_until_full(publisher, acked, failed, i)
        delivered.update({m.offset: m.value for m in follower.drain_messages(0.3)})
        broker.process.kill()
        broker.process.wait(10)
        broker.process = None
        self.assertTrue(follower.wait_closed(10))
        delivered.update({m.offset: m.value for m in follower.messages})
        self.assertEqual({o: v for o, v in delivered.items() if acked.get(o) != v}, {})
        # Room again, and a new broker on the same data dir.
        os.unlink(self.spare[1])
        broker = self.broker()
        served = self.read_all(broker, len(acked))
        self.assertEqual(served, acked)  # every acknowledged offset with its own message, nothing else
        self.assertFalse(set(failed) & set(served.values()), "a message that got an ERROR is served")
        publisher = self.client(broker)
        reply = publisher.request(wire.publish(1, "full", b"after the restart"))
        self.assertEqual(reply.name, "PUBLISHED", wire.describe(reply))
        self.assertGreater(reply.offset, max(set(acked) | set(delivered)))
        self.assertIn(broker.stop(), (0, -signal.SIGTERM))  # (twistd ends by its signal)
