"""
The disk log's writes in a thread of their own (C{--fsync never} and
C{interval}).

A C{write} of a unit's batch to a segment costs as much as encoding it
(the kernel copies it into the page cache and accounts each page): with
C{--fsync never}, about 50 ns of the broker's ~250 ns per message, on the
thread that also reads and delivers.  Here it runs beside the reactor, which
meanwhile reads and stages the next unit.

One thread, one queue: the batches of every log are written in the order
they were appended, and each write's outcome reaches the reactor thread in
that order (L{Writer.complete}, called through C{callFromThread}), where the
log books it and only then fires the append's Deferred, so nothing is
delivered or acknowledged before the kernel has it, as with a write on the
reactor thread.  A write that fails is cut back off the file here (as the
reactor-thread write is), and every later write of that log queued behind
it fails the same way without being written: their offsets follow the
failed one's, and the topic gives them all again (L{zaichik.topic.Topic}).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Callable, Deque, Optional, Sequence

from twisted.internet.defer import Deferred


class Write:
    """
    One batch for one log's newest segment, and its outcome; with a
    C{marker} (a reservation, written right after the batch) the offsets it
    reserves once written, and what was reserved before it (see
    L{zaichik.storage.disk.DiskLog.append}).
    """

    __slots__ = ("log", "fd", "data", "pos", "first", "frames", "gen", "error", "done", "marker", "reserved",
                 "reserved_before")

    def __init__(self, log, fd: int, data: bytes, pos: int, first: int, frames: Sequence[bytes], gen: int,
                 marker: bytes = b"", reserved: int = 0, reserved_before: int = 0) -> None:
        self.log = log
        self.fd = fd
        self.data = data
        self.pos = pos  # where the segment ends before it (O_APPEND: where it goes)
        self.first = first
        self.frames = frames
        self.gen = gen  # the log's write generation when it was queued (see DiskLog.append)
        self.marker = marker
        self.reserved = reserved
        self.reserved_before = reserved_before
        self.error: Optional[OSError] = None
        self.done: Deferred = Deferred()

    def run(self) -> None:
        """In the writer thread: write, or (after an earlier failure of the same generation) fail."""
        log = self.log
        if log.failed_gen == self.gen:
            self.error = log.failure
            return
        try:
            write_all(self.fd, self.data)
            if self.marker:
                write_all(self.fd, self.marker)
        except OSError as e:
            log.cut_failed_write(self.fd, self.pos)
            log.failure = e
            log.failed_gen = self.gen
            self.error = e


def write_all(fd: int, data: bytes) -> None:
    """C{data} to C{fd}, however many writes it takes."""
    done = os.write(fd, data)
    if done < len(data):
        view = memoryview(data)[done:]
        while view:
            view = view[os.write(fd, view):]


class Writer:
    """
    The writer thread.  C{call_from_thread(f)} must run C{f} on the reactor
    thread (C{reactor.callFromThread}): it is given C{on_done}, which must
    call L{complete} (by default it is L{complete}).  L{wait} completes at
    once too, for whoever must see every queued write booked (a segment that
    rolls, a close, a test).
    """

    # Bytes queued and not yet written at most: past this, submit waits for
    # the thread (the reactor thread then waits for the disk, as it did
    # when it wrote itself), so a disk slower than the publishers costs
    # them speed, not the broker's memory.
    MAX_QUEUED = 8 << 20

    def __init__(self, call_from_thread: Callable[[Callable[[], None]], None],
                 on_done: Optional[Callable[[], None]] = None) -> None:
        self._call = call_from_thread
        self._on_done = on_done if on_done is not None else self.complete  # (what call_from_thread is given)
        self._queue: "queue.Queue[Optional[Write]]" = queue.Queue()
        self._done: Deque[Write] = deque()
        self._room = threading.Condition()
        self.queued = 0  # bytes submitted and not yet written
        self._thread = threading.Thread(target=self._run, name="zaichik-writer", daemon=True)
        self._thread.start()
        self.stopped = False

    def submit(self, write: Write) -> None:
        room = self._room
        with room:
            while self.queued > self.MAX_QUEUED:
                room.wait()
            self.queued += len(write.data)
        self._queue.put(write)

    def _run(self) -> None:
        room = self._room
        while True:
            write = self._queue.get()
            if write is None:
                self._queue.task_done()
                return
            try:
                write.run()
            except BaseException as e:  # pragma: no cover (run catches OSError; anything else fails the write)
                write.error = OSError(str(e))
            with room:
                self.queued -= len(write.data)
                room.notify()
            self._done.append(write)
            self._queue.task_done()
            self._call(self._on_done)

    def complete(self) -> None:
        """On the reactor thread: book the finished writes, in order."""
        done = self._done
        while done:
            write = done.popleft()
            write.log.written(write)

    def wait(self) -> None:
        """Block until every queued write is done, and book them."""
        self._queue.join()
        self.complete()

    def stop(self) -> None:
        """Finish the queued writes, book them and end the thread."""
        if self.stopped:
            return
        self.stopped = True
        self._queue.put(None)
        self._thread.join()
        self.complete()
