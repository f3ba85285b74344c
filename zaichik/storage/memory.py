"""
Storage in memory: nothing survives the process.  L{MemoryLog} is also the
disk backend's cache of a topic's newest messages.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import Dict, List, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from zaichik import codec
from zaichik.storage import IMessageLog, IStorage, TopicState

_u64 = struct.Struct(">Q")


class _Run:
    """Frames with consecutive offsets from C{first}; C{head} frames at the front are dropped."""

    __slots__ = ("first", "frames", "head")

    def __init__(self, first: int, frames: List[bytes]) -> None:
        self.first = first  # the offset of frames[0]
        self.frames = frames
        self.head = 0

    @property
    def end(self) -> int:
        return self.first + len(self.frames)


@implementer(IMessageLog)
class MemoryLog:
    """
    Frames by offset, in runs of consecutive offsets (a new run starts at a
    gap): O(1) append, amortised O(1) removal of the oldest, O(log runs)
    lookup.  Timestamps are read from the frames (C{timestamp_at} is where
    they sit), so a retained message costs its frame and a list slot.
    """

    _COMPACT_AT = 4096

    # append may be given a codec.FrameBlock, and its Deferred has fired
    # with None when it returns (see IMessageLog.append).
    takes_blocks = True
    stores_at_once = True

    def __init__(self, timestamp_at: int, retains: bool = True) -> None:
        self._runs: List[_Run] = []
        # A topic that retains nothing keeps nothing here.
        self.retains = retains
        self._timestamp_at = timestamp_at
        self.nbytes = 0
        self._count = 0
        self._end = 0  # one past the newest offset added

    def __len__(self) -> int:
        return self._count

    def first_offset(self) -> Optional[int]:
        if not self._runs:
            return None
        run = self._runs[0]
        return run.first + run.head

    def end_offset(self) -> Optional[int]:
        """One past the newest retained offset, or None when empty."""
        return self._runs[-1].end if self._runs else None

    def add(self, first: int, frames: Sequence[bytes]) -> None:
        """L{append} without the Deferred (the disk cache's entry point)."""
        if not frames or not self.retains:
            return
        self._end = first + len(frames)
        runs = self._runs
        if runs and runs[-1].end == first:
            runs[-1].frames.extend(frames)
        else:
            runs.append(_Run(first, list(frames)))
        self._count += len(frames)
        self.nbytes += sum(map(len, frames))

    def append(self, first: int, frames: Sequence[bytes]) -> Deferred:
        self.add(first, frames)
        return succeed(None)

    def _drop_front(self, count: int, nbytes: Optional[int] = None) -> None:
        """Drop the C{count} oldest frames (C{nbytes} of them, if known)."""
        runs = self._runs
        if nbytes is not None:
            self.nbytes -= nbytes
        while count and runs:
            run = runs[0]
            take = min(count, len(run.frames) - run.head)
            frames = run.frames
            if nbytes is None:
                self.nbytes -= sum(map(len, frames[run.head : run.head + take]))
            run.head += take
            self._count -= take
            count -= take
            if run.head == len(frames):
                runs.pop(0)
            elif run.head >= self._COMPACT_AT and run.head * 2 >= len(frames):
                del frames[: run.head]
                run.first += run.head
                run.head = 0

    def drop_before(self, offset: int) -> int:
        """Drop every frame whose offset is below C{offset}; returns how many."""
        dropped = 0
        while self._runs:
            run = self._runs[0]
            start = run.first + run.head
            if start >= offset:
                break
            take = min(offset, run.end) - start
            self._drop_front(take)
            dropped += take
        return dropped

    def expire(self, cutoff: int) -> int:
        unpack = _u64.unpack_from
        at = self._timestamp_at
        dropped = 0
        # Timestamps only grow along the log: find the first one kept.
        while self._runs:
            run = self._runs[0]
            frames = run.frames
            end = run.head
            while end < len(frames) and unpack(frames[end], at)[0] <= cutoff:
                end += 1
            count = end - run.head
            if count:
                self._drop_front(count)
                dropped += count
            if count == 0 or (self._runs and self._runs[0] is run):
                break
        return dropped

    _TRIM_STEP = 4096

    def trim(self, max_bytes: int) -> int:
        """
        Drop the oldest frames until at most C{max_bytes} are kept.  The
        sizes are summed in C a slice at a time (accumulate, bisect), not a
        Python step per frame: the disk cache trims a quarter of
        --cache-size at a time, and the loop per frame had been a third of
        the reactor's time under a retaining topic on disk (cProfile).
        """
        excess = self.nbytes - max_bytes
        if excess <= 0:
            return 0
        count = freed = 0
        step = self._TRIM_STEP
        for run in self._runs:
            frames = run.frames
            i = run.head
            while i < len(frames):
                sizes = list(accumulate(map(len, frames[i : i + step])))
                if sizes[-1] >= excess:
                    n = bisect_left(sizes, excess) + 1
                    count += i + n - run.head
                    self._drop_front(count, freed + sizes[n - 1])
                    return count
                excess -= sizes[-1]
                freed += sizes[-1]
                i += len(sizes)
            count += i - run.head
        self._drop_front(count, freed)
        return count

    def get(self, offset: int, limit: int):
        """L{read} without the Deferred: C{(first, frames)}."""
        runs = self._runs
        if not runs:
            return max(offset, self._end), []
        if len(runs) == 1:
            run = runs[0]
        else:
            i = bisect_right([r.first + r.head for r in runs], offset) - 1
            run = runs[max(i, 0)]
            if offset >= run.end and i + 1 < len(runs):
                run = runs[i + 1]  # in the gap after run i: the next run
        first = max(offset, run.first + run.head)
        start = first - run.first
        if start >= len(run.frames):
            return first, []
        return first, run.frames[start : start + limit]

    def read(self, offset: int, limit: int) -> Deferred:
        return succeed(self.get(offset, limit))


@implementer(IStorage)
class MemoryStorage:
    """Keeps everything in memory: nothing survives the process."""

    damaged = 0
    torn = 0
    cache_bytes = 0

    def __init__(self, clock=None) -> None:
        self._commits: Dict[str, Dict[str, int]] = {}
        self._last_commit: Dict[str, int] = {}
        self._groups: Dict[str, Dict[str, int]] = {}
        self._clock = clock

    def open(self) -> Deferred:
        return succeed([])

    def open_log(self, name: str, retention_ttl: int, compaction_window: int) -> MemoryLog:
        return MemoryLog(codec.message_frame_offsets(name)[1], retention_ttl > 0)

    def commits(self) -> Dict[str, Dict[str, int]]:
        return self._commits

    def record_commit(self, client_id: str, topic: str, offset: int) -> Deferred:
        self._commits.setdefault(client_id, {})[topic] = offset
        self._last_commit[client_id] = round(self._clock.seconds() * 1000) if self._clock else 0
        return succeed(None)

    def group_positions(self) -> Dict[str, Dict[str, int]]:
        return self._groups

    def record_group_position(self, topic: str, group: str, offset: int) -> Deferred:
        self._groups.setdefault(topic, {})[group] = offset
        return succeed(None)

    def last_commit_times(self) -> Dict[str, int]:
        return self._last_commit

    def forget_client(self, client_id: str) -> None:
        self._commits.pop(client_id, None)
        self._last_commit.pop(client_id, None)

    def sync(self) -> None:
        pass

    def close(self) -> Deferred:
        return succeed(None)


__all__ = ["MemoryLog", "MemoryStorage", "TopicState"]
