"""
The disk log's writer thread (zaichik/storage/writer.py) on its own, with a
stand-in log and real files: order, failures and what follows them, the
bound on what is queued.  The disk log's use of it is tested by the
storage contract and fault tests (their WriterThread classes).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from typing import List, Tuple

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zaichik import codec
from zaichik.storage import segment as fmt
from zaichik.storage import writer as writer_module
from zaichik.storage.disk import DiskStorage
from zaichik.storage.writer import Write, Writer
from zaichik.work import UnitOfWork

DAY = 86_400_000
NOW = 1_700_000_000_000


def run_now(f, *args) -> Deferred:
    return maybeDeferred(f, *args)


def frame(name: str, offset: int, value: bytes) -> bytes:
    return codec.message_frame(codec.topic_prefix(name), offset, NOW + offset, None, value)


class Log:
    """What the writer asks of a log: the failed generation, the cut, and the booking of outcomes."""

    def __init__(self) -> None:
        self.failed_gen = -1
        self.failure = None
        self.cuts: List[Tuple[int, int]] = []
        self.booked: List[Tuple[bytes, object]] = []

    def cut_failed_write(self, fd: int, pos: int) -> None:
        self.cuts.append((fd, pos))
        os.ftruncate(fd, pos)

    def written(self, write: Write) -> None:
        self.booked.append((write.data, write.error))


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.calls: list = []
        self.writer = Writer(self.calls.append)  # (complete is called by the test, as the reactor would)
        self.addCleanup(self.writer.stop)
        fd, path = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.addCleanup(os.close, self.fd)
        self.log = Log()

    def write(self, data: bytes, pos: int, gen: int = 0) -> Write:
        w = Write(self.log, self.fd, data, pos, 0, [], gen)
        self.writer.submit(w)
        return w

    def contents(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def fail_after(self, good: int):
        """os.write fails (ENOSPC) on our file after C{good} calls; the calls are counted."""
        real = os.write
        count = [0]

        def write(fd, data):
            if fd == self.fd:
                count[0] += 1
                if count[0] > good:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data)

        return count, self.patch(writer_module.os, "write", write)

    def test_in_order(self) -> None:
        for i in range(50):
            self.write(b"%02d," % i, 3 * i)
        self.writer.wait()
        self.assertEqual(self.contents(), b"".join(b"%02d," % i for i in range(50)))
        self.assertEqual(self.log.booked, [(b"%02d," % i, None) for i in range(50)])
        self.assertTrue(self.calls)  # (the reactor was asked to complete them)

    def test_failed_and_queued_behind_it(self) -> None:
        """A failed write is cut back; the later ones of its generation fail unwritten; a new generation writes."""
        count, patch = self.fail_after(1)
        self.write(b"one,", 0)
        self.write(b"two,", 4)
        self.write(b"three,", 8)
        self.writer.wait()
        self.assertEqual(count[0], 2)  # (three was never tried)
        self.assertEqual(self.contents(), b"one,")
        self.assertEqual(self.log.cuts, [(self.fd, 4)])
        errors = [e for _, e in self.log.booked]
        self.assertIsNone(errors[0])
        self.assertEqual([e.errno for e in errors[1:]], [errno.ENOSPC, errno.ENOSPC])
        self.assertIs(errors[1], errors[2])
        patch.restore()
        self.write(b"four,", 4, gen=1)
        self.writer.wait()
        self.assertEqual(self.contents(), b"one,four,")

    def test_submit_waits_for_room(self) -> None:
        """Past MAX_QUEUED bytes queued, submit waits until the thread has written some."""
        self.writer.MAX_QUEUED = 0
        gate = threading.Event()
        real = os.write

        def write(fd, data):
            if fd == self.fd:
                gate.wait(10)
            return real(fd, data)

        self.patch(writer_module.os, "write", write)
        self.write(b"first,", 0)
        submitted = threading.Event()
        helper = threading.Thread(target=lambda: (self.write(b"second,", 6), submitted.set()))
        helper.start()
        self.assertFalse(submitted.wait(0.2))  # (waiting for room)
        gate.set()
        self.assertTrue(submitted.wait(10))
        helper.join()
        self.writer.wait()
        self.assertEqual(self.contents(), b"first,second,")

    def test_stop_writes_what_is_queued(self) -> None:
        for i in range(5):
            self.write(b"x", i)
        self.writer.stop()
        self.assertEqual(self.contents(), b"xxxxx")
        self.assertEqual(len(self.log.booked), 5)


def fail_writes(test: SynchronousTestCase, count: int) -> List[int]:
    """The writer thread's next C{count} writes fail (ENOSPC); the list's one item counts down what is left."""
    real = writer_module.write_all
    left = [count]

    def write_all(fd, data):
        if left[0]:
            left[0] -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    test.patch(writer_module, "write_all", write_all)
    return left


class DiskLogWriterTests(SynchronousTestCase):
    """
    The disk log with the writer thread, where the reactor (the test) books
    a failed write while the writes queued behind it are still out (found
    by a review: the next write was booked where it was not written, and a
    later failed write cut the file at the wrong place).  The thread is held
    after its second write (the first opens the segment) until the test has booked it.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zaichik-writer-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.first_done = threading.Event()
        self.gate = threading.Event()
        self.addCleanup(self.gate.set)  # (never leave the writer thread held)
        calls = [0]

        def call_from_thread(f) -> None:
            calls[0] += 1
            if calls[0] == 2:  # (after the write that opens the segment)
                self.first_done.set()
                self.gate.wait(10)

        self.storage = self.open(call_from_thread)
        self.log = self.storage.open_log("t", DAY, 0)
        self.addCleanup(self.close)

    def open(self, call_from_thread) -> DiskStorage:
        storage = DiskStorage(self.dir, fsync="never", clock=Clock(), run_blocking=run_now,
                              call_from_thread=call_from_thread)
        self.successResultOf(storage.open())
        return storage

    def close(self) -> None:
        self.gate.set()
        if self.storage is not None:
            self.successResultOf(self.storage.close())
            self.storage = None

    def fail_writes(self, count: int) -> List[int]:
        return fail_writes(self, count)

    def test_an_append_made_while_failed_writes_are_out_fails_with_them(self) -> None:
        log = self.log
        writer = self.storage.writer
        d0 = log.append(0, [frame("t", 0, b"zero")])  # (opens the segment, written by the thread too)
        writer.wait()
        self.successResultOf(d0)
        left = self.fail_writes(1)
        d1 = log.append(1, [frame("t", 1, b"one fails")])
        d2 = log.append(2, [frame("t", 2, b"two, queued behind it")])
        self.assertTrue(self.first_done.wait(10))
        writer.complete()  # (the reactor books the first outcome only)
        self.failureResultOf(d1)
        self.assertNoResult(d2)
        self.gate.set()
        d3 = log.append(3, [frame("t", 3, b"three, its offsets follow theirs")])
        for d in (d2, d3):
            self.assertEqual(self.failureResultOf(d).value.code, codec.ErrorCode.LIMIT)
        segment = log.segments[-1]
        self.assertEqual(segment.size, os.path.getsize(segment.path))
        # Their offsets are given again; the next write goes where the file ends.
        d = log.append(1, [frame("t", 1, b"one")])
        writer.wait()
        self.successResultOf(d)
        self.assertEqual(segment.size, os.path.getsize(segment.path))
        # A later failed write is cut back to where it began.
        left[0] = 1
        d4 = log.append(2, [frame("t", 2, b"two fails")])
        writer.wait()
        self.failureResultOf(d4)
        self.assertEqual(segment.size, os.path.getsize(segment.path))
        d5 = log.append(2, [frame("t", 2, b"two")])
        writer.wait()
        self.successResultOf(d5)
        # A clean stop and a start: what was acknowledged, nothing else.
        self.close()
        self.storage = self.open(lambda f: None)
        first, frames = self.successResultOf(self.storage.open_log("t", DAY, 0).read(0, 10))
        self.assertEqual([(codec.decode_reply(f[4:]).offset, codec.decode_reply(f[4:]).value) for f in frames],
                         [(0, b"zero"), (1, b"one"), (2, b"two")])


class ReservationsByTheWriterTests(SynchronousTestCase):
    """
    Under --fsync never the writer thread writes every batch: those that
    open a segment or renew the offsets' reservation too, with their
    reservation marker (they had been written on the reactor, half of the
    writes at full speed).  A failed one gives its reservation back.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zaichik-writer-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.threads: List[str] = []
        real = writer_module.write_all

        def write_all(fd, data):
            self.threads.append(threading.current_thread().name)
            return real(fd, data)

        from zaichik.storage import disk

        self.patch(writer_module, "write_all", write_all)
        self.patch(disk, "write_all", write_all)
        self.storage = self.open()
        self.addCleanup(lambda: self.storage is not None and self.successResultOf(self.storage.close()))

    def open(self) -> DiskStorage:
        storage = DiskStorage(self.dir, fsync="never", clock=Clock(), run_blocking=run_now,
                              call_from_thread=lambda f: None)
        storage.reserve = 10  # (renewed every few appends)
        self.successResultOf(storage.open())
        return storage

    def append(self, log, first: int, count: int) -> Deferred:
        return log.append(first, [frame("t", first + i, b"v%d" % (first + i)) for i in range(count)])

    def test_renewals_and_a_new_segments_first_batch_are_the_threads(self) -> None:
        log = self.storage.open_log("t", DAY, 0)
        done = [self.append(log, first, 3) for first in range(0, 30, 3)]
        self.storage.writer.wait()
        for d in done:
            self.successResultOf(d)
        self.assertGreaterEqual(len(self.threads), 10 + 3)  # (each batch, and the markers)
        self.assertEqual(set(self.threads), {"zaichik-writer"})
        self.assertEqual(log._reserved, 30 + 10)  # (last renewed by the batch ending at 30, past 34 - 10 // 2)
        self.assertEqual(log.segments[-1].reserved, log._reserved)
        self.assertEqual(log.segments[-1].size, os.path.getsize(log.segments[-1].path))
        # A crash (no clean close): the broker goes on from the reservation on disk.
        self.storage.writer.stop()
        os.close(log._fd)
        log._fd = None
        self.storage._lock.close()
        self.storage = self.open()
        self.assertEqual(self.storage.open_log("t", DAY, 0).next_offset, log._reserved)

    def test_a_failed_renewal_gives_its_reservation_back(self) -> None:
        log = self.storage.open_log("t", DAY, 0)
        self.successResultOf(self.settled(self.append(log, 0, 3)))
        before = log._reserved
        fail_writes(self, 1)
        d = self.append(log, 3, 6)  # (ends at 9, past half the reservation of 10: renews it)
        self.assertGreater(log._reserved, before)  # (reserved for what follows, meanwhile)
        self.storage.writer.wait()
        self.assertEqual(self.failureResultOf(d).value.code, codec.ErrorCode.LIMIT)
        self.assertEqual(log._reserved, before)
        self.assertEqual(log.segments[-1].size, os.path.getsize(log.segments[-1].path))
        d = self.append(log, 3, 6)
        self.successResultOf(self.settled(d))
        self.assertGreater(log._reserved, before)

    def test_a_failed_write_that_renews_nothing_keeps_the_reservation(self) -> None:
        """
        A failed write without a marker gives back only what was reserved
        after it: the reservation written before it holds (a review: it
        fell to 0, and the next append wrote a marker again).
        """
        log = self.storage.open_log("t", DAY, 0)
        self.successResultOf(self.settled(self.append(log, 0, 3)))  # (opens the segment: reserves 10)
        before = log._reserved
        fail_writes(self, 1)
        d = self.append(log, 3, 1)  # (ends at 4, well inside the reservation: no marker)
        self.storage.writer.wait()
        self.assertEqual(self.failureResultOf(d).value.code, codec.ErrorCode.LIMIT)
        self.assertEqual(log._reserved, before)
        segment = log.segments[-1]
        size = segment.size
        self.successResultOf(self.settled(self.append(log, 3, 1)))
        self.assertEqual(log._reserved, before)  # (written without a marker)
        self.assertEqual(segment.size - size, len(fmt.encode_batch(3, [frame("t", 3, b"v3")], log._skip)))
        self.assertEqual(segment.size, os.path.getsize(segment.path))

    def settled(self, d: Deferred) -> Deferred:
        self.storage.writer.wait()
        return d


class AppendWhileClosingTests(SynchronousTestCase):
    """
    The storage's close stops the writer thread, then (--fsync interval)
    waits for an fsync in flight while connections still publish: such an
    append is written on the calling thread, as without the writer (it had
    been queued for a thread that had ended, and never answered).
    """

    def test_append_while_close_waits_for_an_fsync(self) -> None:
        tmp = tempfile.mkdtemp(prefix="zaichik-writer-")
        self.addCleanup(shutil.rmtree, tmp, True)
        clock = Clock()
        fsyncs: list = []

        def run_blocking(f, *args):
            d: Deferred = Deferred()
            fsyncs.append((d, f, args))
            return d  # (the fsync "thread": answered when the test says)

        storage = DiskStorage(tmp, fsync="interval", clock=clock, run_blocking=run_blocking,
                              call_from_thread=lambda f: None)
        self.successResultOf(storage.open())
        log = storage.open_log("t", DAY, 0)
        d0 = log.append(0, [frame("t", 0, b"zero")])
        d1 = log.append(1, [frame("t", 1, b"one")])
        storage.writer.wait()
        self.successResultOf(d0)
        self.successResultOf(d1)
        clock.advance(0.1)  # the interval's fsync starts
        self.assertEqual(len(fsyncs), 1)
        closed = storage.close()
        self.assertNoResult(closed)
        d2 = log.append(2, [frame("t", 2, b"two")])
        self.successResultOf(d2)
        d, f, args = fsyncs.pop()
        f(*args)
        d.callback(None)
        self.successResultOf(closed)


class UnitOfWorkFlushErrorTests(SynchronousTestCase):
    def test_output_is_written_when_a_commit_raises(self) -> None:
        """A commit that raises (a bug) does not keep the unit's gathered output from being written."""
        work = UnitOfWork(lambda: None)
        flushed: list = []

        class Writer:
            def flushOutput(self) -> None:
                flushed.append(self)

        class BadTopic:
            def commit(self) -> None:
                raise RuntimeError("a bug in a commit")

        writer = Writer()
        with self.assertRaises(RuntimeError):
            with work:
                work.gather(writer)
                work.dirty(BadTopic())
        self.assertEqual(flushed, [writer])
