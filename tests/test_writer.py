"""
The disk log's writer thread (zaichik/storage/writer.py) on its own, with a
stand-in log and real files: order, failures and what follows them, the
bound on what is queued.  The disk log's use of it is tested by the
storage contract and fault tests (their WriterThread classes).
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from typing import List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from zaichik.storage import writer as writer_module
from zaichik.storage.writer import Write, Writer


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
