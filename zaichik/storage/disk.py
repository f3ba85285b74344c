"""
Durable storage: C{twistd zaichik --data-dir DIR}.

An append-only segment log per topic, as Kafka and NATS JetStream keep
theirs (the format is in L{zaichik.storage.segment} and docs/storage.rst).
Retained messages are read from the segments; memory holds a sparse index
per segment and a bounded cache of the newest messages (C{--cache-size},
shared by all topics).  A subscriber behind the cache is fed from disk a
chunk at a time, as its connection takes them.

Layout::

    DIR/FORMAT                       the data dir's format ("2")
    DIR/lock                         flock'd by the running broker (its pid inside)
    DIR/commits.log                  durable commits, one JSON line each
    DIR/topics/<hex name>/meta.json  {"name", "retention_ttl", "compaction_window"}
    DIR/topics/<hex name>/<base offset, 20 digits>.seg
    DIR/topics/<hex name>/<base offset, 20 digits>.idx   summary and sparse index of
                                                          a segment closed cleanly

Start-up reads only what it must: a segment with a valid index (its size
matching) is taken from it; the others (the newest, after a crash) are read
and every batch's CRC checked.  So start-up time does not grow with the
retained data.  Keys inside the compaction window are read back from the
newest segments.

Integrity: a bad batch followed by a valid one is damage, not a torn tail:
nothing after it is deleted, its offsets are skipped (never served, never
given again), and it is logged and counted (L{DiskStorage.damaged}).  A bad
tail of the newest segment is a write torn by a crash: it is left in place
and a gap marker written after it uses up every offset it could have held,
so no offset is ever given to two messages.  Readers check each batch's
CRC as they read and step over damage found later.

Writes: each unit of work appends one batch per topic with one C{write}.
A write that fails (a full disk) is cut back off the file, and the append
fails: nothing of it is kept or delivered.  Durability follows C{--fsync}:

  - C{always}: appends are acknowledged and delivered only after an fsync;
    the fsyncs of every unit that ended while one was running are done
    together (group commit), in a thread;
  - C{interval}: fsync every 100 ms, in a thread; an append past the
    offsets reservation that an fsync made durable waits for the next one
    (see RESERVE);
  - C{never}: when the kernel pleases.

A topic that retains and compacts nothing writes a marker of the offsets
each append took, not its records (see segment.PASSED).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from bisect import bisect_right
from collections import OrderedDict
from typing import IO, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zaichik import codec
from zaichik.clock import wall_clock
from zaichik.storage import IMessageLog, IStorage, StorageError, TopicState
from zaichik.storage import segment as fmt
from zaichik.storage.memory import MemoryLog
from zaichik.storage.writer import Write, Writer, write_all

_log = Logger()
SEGMENT_BYTES = 64 * 1024 * 1024
INDEX_EVERY = 64 * 1024  # bytes of segment between two sparse index entries
READ_BYTES = 256 * 1024  # bytes read from a segment at a time
DEFAULT_CACHE_SIZE = 32 * 1024 * 1024
# Offsets a reservation covers ahead of the newest (renewed half-way).
# Under --fsync interval a renewal is durable only at the next tick; an
# append past the durable reservation waits for that fsync before it is
# delivered (DiskStorage.written), so half of RESERVE is what a topic may
# take between two completed fsyncs without waiting: at 12 million msgs/s
# on one topic a 100 ms tick took 1.2 million, and 16 million leaves 8
# million, about 0.7 s at that rate.  The price: after a stop that was not
# clean, up to this many offsets of a topic are skipped.
RESERVE = 16_000_000
FSYNC_POLICIES = ("always", "interval", "never")
FSYNC_INTERVAL = 0.1
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DataDirLocked(Exception):
    """Another broker is using the data directory."""


class DataDirError(Exception):
    """The data directory cannot be used (a newer format, say)."""


def fsync_dir(path: str) -> None:
    """Make a directory's entries (files created, renamed, deleted) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encodable(frames: Sequence[bytes]) -> Union[List[bytes], bytes]:
    """What encode_batch takes for C{frames}: a L{codec.FrameBlock}'s data as it is, else the list."""
    if type(frames) is codec.FrameBlock:
        return frames.data
    return frames  # type: ignore[return-value]


def _storage_error(e: OSError, what: str) -> StorageError:
    if e.errno in _FULL:
        return StorageError(f"storage full: {what}: {e.strerror}", full=True)
    return StorageError(f"storage failed: {what}: {e.strerror or e}")


class Segment:
    """
    What memory keeps of one segment file: its summary, and a sparse index
    (an entry each L{INDEX_EVERY} bytes: offset, position, timestamp, and
    the messages and record bytes before it).
    """

    __slots__ = ("base", "path", "size", "count", "record_bytes", "first", "end", "first_ts", "last_ts",
                 "entries", "_offsets", "_times", "damaged", "_indexed_at", "reserved")

    def __init__(self, base: int, path: str) -> None:
        self.base = base
        self.path = path
        self.size = fmt.SEGMENT_HEADER
        self.count = 0
        self.record_bytes = 0
        self.first: Optional[int] = None  # the first message's offset
        self.end = base  # one past the newest offset used (messages and gap markers)
        self.first_ts = 0
        self.last_ts = 0
        self.entries: List[Tuple[int, int, int, int, int]] = []
        self._offsets: List[int] = []
        self._times: List[int] = []
        self.damaged: List[Tuple[int, int]] = []  # byte ranges found bad
        self.reserved = 0  # the highest reservation found in it (read from the segment only)
        self._indexed_at = -INDEX_EVERY

    def add(self, batch: fmt.Batch) -> None:
        if not batch.count:
            if batch.is_reservation:
                self.reserved = max(self.reserved, batch.first)
            else:
                self.end = max(self.end, batch.first)
                if batch.is_passed:
                    self.last_ts = batch.last_ts
            self.size = batch.end
            return
        if self.first is None:
            self.first = batch.first
            self.first_ts = batch.first_ts
        if batch.pos - self._indexed_at >= INDEX_EVERY:
            self.entries.append((batch.first, batch.pos, batch.first_ts, self.count, self.record_bytes))
            self._offsets.append(batch.first)
            self._times.append(batch.first_ts)
            self._indexed_at = batch.pos
        self.count += batch.count
        self.record_bytes += batch.record_bytes
        self.end = batch.first + batch.count
        self.last_ts = batch.last_ts
        self.size = batch.end

    def entry_for(self, offset: int) -> Tuple[int, int, int, int, int]:
        """The index entry at or before C{offset} (the first one if none is)."""
        i = bisect_right(self._offsets, offset) - 1
        return self.entries[max(i, 0)]

    def entry_for_time(self, cutoff: int) -> Optional[Tuple[int, int, int, int, int]]:
        """The last index entry whose batch starts at or before C{cutoff} (ms)."""
        i = bisect_right(self._times, cutoff) - 1
        return self.entries[i] if i >= 0 else None

    def index_bytes(self) -> bytes:
        return fmt.encode_index(self.size, self.count, self.record_bytes, self.first, self.end,
                                self.first_ts, self.last_ts, self.entries)

    def load_index(self, data: bytes, file_size: int) -> bool:
        decoded = fmt.decode_index(data)
        if decoded is None or decoded[0] != file_size:
            return False
        (self.size, self.count, self.record_bytes, self.first, self.end, self.first_ts, self.last_ts,
         entries) = decoded
        self.entries = [tuple(e) for e in entries]
        self._offsets = [e[0] for e in self.entries]
        self._times = [e[2] for e in self.entries]
        self._indexed_at = self.entries[-1][1] if self.entries else -INDEX_EVERY
        return True


class _Head:
    """Where a log's retained messages begin: a segment, a batch in it, an offset."""

    __slots__ = ("segment", "pos", "offset", "count_before", "bytes_before", "timestamp")

    def __init__(self, segment: Segment, pos: int, offset: int, count_before: int, bytes_before: int,
                 timestamp: int = 0) -> None:
        self.segment = segment
        # The head message's timestamp, or one at or before it (0: unknown):
        # nothing is older than the head, so a cutoff before it drops nothing.
        self.timestamp = timestamp
        self.pos = pos  # the batch holding `offset`
        self.offset = offset
        self.count_before = count_before  # messages of the segment before `offset`
        self.bytes_before = bytes_before  # their record bytes


@implementer(IMessageLog)
class DiskLog:
    """One topic's log: segments on disk, their index and a cache in memory."""

    # append may be given a codec.FrameBlock (see IMessageLog.append).
    takes_blocks = True

    def __init__(self, storage: "DiskStorage", directory: str, topic: str, retention_ttl: int,
                 compaction_window: int) -> None:
        self._storage = storage
        self.directory = directory
        self.topic = topic
        self.retention_ttl = retention_ttl
        self.compaction_window = compaction_window
        self.retains = retention_ttl > 0
        # A topic that retains and compacts nothing never reads a record back:
        # its appends are written as markers of the offsets they took
        # (segment.encode_passed), not as records.  In memory it keeps nothing
        # either; writing them cost --fsync never most of its gap to memory.
        self.keeps_records = self.retains or compaction_window > 0
        prefix = codec.topic_prefix(topic)
        self._prefix = prefix
        self._skip = 4 + len(prefix)  # a frame's bytes before its record body
        self._timestamp_at = codec.message_frame_offsets(topic)[1]
        self.cache = MemoryLog(self._timestamp_at)
        self.segments: List[Segment] = []
        self._fd: Optional[int] = None  # the newest segment, open for appending
        self._read_fds: "OrderedDict[str, int]" = OrderedDict()
        self._head: Optional[_Head] = None
        self._count = 0
        self.nbytes = 0
        self.next_offset = 0
        self.visible_end = 0  # reads serve offsets below this (durable ones)
        self._hints: "OrderedDict[int, Tuple[Segment, int]]" = OrderedDict()  # offset -> (segment, batch pos)
        self.broken: Optional[str] = None
        self._unclean = False  # the newest segment had no index at start (a crash)
        self._reserved = 0  # offsets below this may be given without writing a reservation
        # Offsets below this are covered by a reservation an fsync has made
        # durable (none at start: what was read may not be on the disk yet).
        self.durable_reserved = 0
        self.held = 0  # of its appends, how many wait in DiskStorage._held
        # Writes queued for the writer thread (zaichik.storage.writer): how
        # many, where the segment will end after them, the generation they
        # belong to (a failed write ends one) and, in the writer thread, the
        # generation that failed and why.
        self._inflight = 0
        self._stale = 0  # of those, queued behind a write that failed
        self._planned = 0
        self.gen = 0
        self.failed_gen = -1
        self.failure: Optional[OSError] = None

    def __repr__(self) -> str:
        return f"<DiskLog {self.topic} segments={len(self.segments)} next={self.next_offset}>"

    # -- recovery ----------------------------------------------------------------

    def recover(self, now: int, upgrade: bool = False) -> Tuple[int, int, List[Tuple[bytes, int, int]]]:
        """
        Take the segments back: from their indexes where those hold, else
        by reading them (checking every batch).  With C{upgrade} (a data dir
        of release 0.1.0, which has no FORMAT file), segments in that
        release's format are rewritten first; in a current data dir a
        segment without its magic is damaged, never taken for an old one.

        @return: C{(next_offset, last_timestamp, keys)}, C{keys} being
            C{(key, timestamp, offset)} of keyed messages still inside the
            compaction window, oldest first.
        """
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".seg"))
        for i, name in enumerate(names):
            path = os.path.join(self.directory, name)
            base = int(name[:-4])
            if upgrade:
                self._upgrade_v1(path, base)
            segment = Segment(base, path)
            newest = i == len(names) - 1
            if self._load_index(segment):
                pass
            elif not self._scan(segment, newest):
                continue
            elif newest:
                self._unclean = True
            self.segments.append(segment)
        next_offset = max([s.end for s in self.segments] + [0])
        if self.segments and self._unclean:
            # Not closed cleanly: offsets up to the reservation may have
            # been delivered from the page cache before a power loss.
            reserved = self.segments[-1].reserved
            if reserved > next_offset:
                _log.info("{topic}: not closed cleanly; offsets {first} to {last} are skipped (reserved, "
                          "maybe given out before the stop)", topic=self.topic, first=next_offset,
                          last=reserved - 1)
                next_offset = reserved
        self._reserved = next_offset
        self.next_offset = self.visible_end = next_offset
        last_timestamp = max([s.last_ts for s in self.segments] + [0])
        if self.retains:
            for segment in self.segments:
                if segment.count:
                    self._count += segment.count
                    self.nbytes += segment.record_bytes + segment.count * len(self._prefix)
                    if self._head is None:
                        entry = segment.entries[0]
                        self._head = _Head(segment, entry[1], entry[0], 0, 0, entry[2])
        keys = self._recover_keys(now) if self.compaction_window else []
        return next_offset, last_timestamp, keys

    def _load_index(self, segment: Segment) -> bool:
        try:
            size = os.path.getsize(segment.path)
            with open(segment.path[:-4] + ".idx", "rb") as f:
                data = f.read()
        except OSError:
            return False
        return segment.load_index(data, size)

    def _scan(self, segment: Segment, newest: bool) -> bool:
        """Read a whole segment, checking every batch; False if it is not a segment at all."""
        with open(segment.path, "rb") as f:
            data = f.read()
        if len(data) < fmt.SEGMENT_HEADER:
            if newest and not data:
                # Created and never written (a crash at once): start it again.
                self._write_file(segment.path, fmt.encode_segment_header(segment.base))
                return True
            _log.warn("{path} is too short to be a segment; ignored", path=segment.path)
            return False
        if data[:4] != fmt.SEGMENT_MAGIC:
            _log.warn("{path} has a damaged header; reading its batches anyway", path=segment.path)
            self._storage.damaged += 1
        result = fmt.scan(data, segment.base)
        for batch in result.batches:
            segment.add(batch)
        segment.size = len(data)
        for start, end in result.damage:
            gap = fmt.batch_at(data, end)
            if gap is not None and not gap.count and gap.first_ts == fmt.GAP:
                # A torn tail found at an earlier start, with the gap marker
                # written after it: known, not new damage.
                segment.damaged.append((start, end))
                _log.info("{path}: bytes {start} to {end} are a write torn by an earlier crash (skipped)",
                          path=segment.path, start=start, end=end)
                continue
            self._damage(segment, start, end, "at start-up")
        if result.torn is not None:
            torn = result.torn
            if not newest:
                self._damage(segment, torn, len(data), "at start-up (to the segment's end)")
            else:
                self._torn_tail(segment, data, torn)
        if not segment.damaged and not newest:
            self._write_index(segment)
        return True

    def _torn_tail(self, segment: Segment, data: bytes, torn: int) -> None:
        """
        A bad tail of the newest segment: a write cut by a crash.  It stays
        (it may be all that is left of something), and every offset it could
        have held is used up by a gap marker, so none is given again.
        """
        lost = len(data) - torn
        header = data[torn : torn + fmt.BATCH_HEADER]
        most = lost // fmt.MIN_RECORD + 1
        if len(header) == fmt.BATCH_HEADER and header[:4] == fmt.BATCH_MAGIC:
            claimed = fmt.batch_header.unpack(header)
            length, first, count = claimed[1], claimed[3], claimed[4]
            if first >= segment.end and count * fmt.MIN_RECORD <= length:
                # The header survived: the batch claimed these offsets (they
                # may have been delivered before the crash).
                most = max(most, first + count - segment.end)
        skip_to = segment.end + most
        _log.warn("Torn write at the end of {path} (byte {at}, {lost} bytes): offsets {first} to {last} "
                  "are skipped, never given again", path=segment.path, at=torn, lost=lost,
                  first=segment.end, last=skip_to - 1)
        segment.damaged.append((torn, len(data)))
        segment.end = skip_to
        self._storage.torn += 1
        gap = fmt.encode_gap(skip_to)
        try:
            fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, gap)
                os.fsync(fd)
            finally:
                os.close(fd)
            segment.size = len(data) + len(gap)
        except OSError as e:
            # Kept in memory: a restart finds the same tail and skips the same offsets.
            _log.warn("Could not write the gap marker to {path}: {error}", path=segment.path, error=e)

    def _damage(self, segment: Segment, start: int, end: int, when: str) -> None:
        if (start, end) in segment.damaged:
            return
        segment.damaged.append((start, end))
        self._storage.damaged += 1
        _log.error("Damaged data in {path}, bytes {start} to {end} ({when}): skipped; "
                   "`zaichik check` reports the offsets lost", path=segment.path, start=start, end=end, when=when)

    def _recover_keys(self, now: int) -> List[Tuple[bytes, int, int]]:
        after = now - self.compaction_window
        keys: List[Tuple[bytes, int, int]] = []
        for segment in self.segments:
            if not segment.count or segment.last_ts <= after:
                continue
            for data, batch, shift in self._batches(segment, segment.entries[0][1]):
                if batch.last_ts <= after:
                    continue
                for offset, body, _ in fmt.records(data, batch, shift):
                    timestamp = fmt.u64.unpack_from(data, body + 8)[0]
                    if timestamp > after:
                        key = fmt.key_of(data, body)
                        if key:
                            keys.append((key, timestamp, offset))
        return keys

    def _upgrade_v1(self, path: str, base: int) -> None:
        """Rewrite a segment of release 0.1.0 in this format (once; atomically)."""
        with open(path, "rb") as f:
            head = f.read(4)
            if not fmt.is_v1(head):
                return
            data = head + f.read()
        frames, valid = fmt.v1_frames(data)
        if valid < len(data):
            _log.warn("Upgrading {path}: {n} bytes after byte {at} were not valid (a torn write); dropped",
                      path=path, n=len(data) - valid, at=valid)
        out = [fmt.encode_segment_header(base)]
        run: List[bytes] = []
        run_first = 0
        offset_at = self._skip + 0
        for frame in frames:
            offset = fmt.u64.unpack_from(frame, offset_at)[0]
            if run and (offset != run_first + len(run) or len(run) >= 1000):
                out.append(fmt.encode_batch(run_first, run, self._skip))
                run = []
            if not run:
                run_first = offset
            run.append(frame)
        if run:
            out.append(fmt.encode_batch(run_first, run, self._skip))
        tmp = path + ".upgrade"
        self._write_file(tmp, b"".join(out))
        os.replace(tmp, path)
        fsync_dir(self.directory)
        _log.info("Upgraded {path} from release 0.1.0's format ({n} messages)", path=path, n=len(frames))

    @staticmethod
    def _write_file(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _write_index(self, segment: Segment) -> None:
        """An index is a cache of the segment: not fsynced, checked by size and CRC when read."""
        try:
            with open(segment.path[:-4] + ".idx", "wb") as f:
                f.write(segment.index_bytes())
        except OSError as e:
            _log.warn("Could not write the index of {path}: {error}", path=segment.path, error=e)

    # -- reading segments ----------------------------------------------------------

    def _read_fd(self, segment: Segment) -> int:
        fds = self._read_fds
        fd = fds.get(segment.path)
        if fd is None:
            fd = os.open(segment.path, os.O_RDONLY)
            fds[segment.path] = fd
            if len(fds) > 4:
                os.close(fds.popitem(last=False)[1])
        else:
            fds.move_to_end(segment.path)
        return fd

    def _batches(self, segment: Segment, pos: int, chunk: int = READ_BYTES):
        """
        C{(data, batch, shift)} for each valid batch of C{segment} from
        byte C{pos} on (C{shift}: where C{data} starts in the file; the
        batch's positions are the file's), stepping over damage (logged and
        counted).
        """
        fd = self._read_fd(segment)
        size = segment.size
        data = b""
        shift = pos
        expected = 0
        while pos < size:
            rel = pos - shift
            if len(data) - rel < fmt.BATCH_HEADER:
                data = os.pread(fd, max(chunk, fmt.BATCH_HEADER), pos)
                shift, rel = pos, 0
            batch = None
            if len(data) - rel >= fmt.BATCH_HEADER:
                length = fmt.u32.unpack_from(data, rel + 4)[0]
                total = fmt.CRC_FROM + length
                if len(data) - rel < total and pos + total <= size:
                    data = os.pread(fd, max(chunk, total), pos)
                    shift, rel = pos, 0
                batch = fmt.batch_at(data, rel, expected, min(len(data), size - shift))
            if batch is None:
                # Damage: find the next valid batch in the rest of the segment.
                rest = os.pread(fd, size - pos, pos)
                found = fmt.next_batch(rest, 0, expected)
                self._damage(segment, pos, pos + (found.pos if found else len(rest)), "while reading")
                if found is None:
                    return
                data, shift = rest, pos
                pos = pos + found.pos
                continue
            batch = fmt.Batch(shift + batch.pos, batch.first, batch.count, batch.first_ts, batch.last_ts,
                              shift + batch.end)  # positions in the file
            yield data, batch, shift
            if not batch.is_reservation:
                expected = batch.first + batch.count
            pos = batch.end

    # -- IMessageLog -------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def first_offset(self) -> Optional[int]:
        return self._head.offset if self._head is not None and self._count else None

    def read(self, offset: int, limit: int) -> Deferred:
        try:
            return succeed(self.get(offset, limit))
        except OSError as e:
            return fail(_storage_error(e, f"reading {self.topic}"))

    def get(self, offset: int, limit: int) -> Tuple[int, List[bytes]]:
        """L{read} without the Deferred."""
        head = self._head
        if head is None or not self._count:
            return max(offset, self.visible_end if head is None else head.offset), []
        offset = max(offset, head.offset)
        visible = self.visible_end
        if offset >= visible:
            return offset, []
        cached = self.cache.first_offset()
        if cached is not None and offset >= cached:
            first, frames = self.cache.get(offset, min(limit, visible - offset))
            return first, frames
        stop = min(cached, visible) if cached is not None else visible
        return self._read_disk(offset, limit, stop)

    def _locate(self, offset: int) -> Optional[Tuple[Segment, int]]:
        hint = self._hints.pop(offset, None)
        if hint is not None and hint[0] in self.segments:
            return hint
        bases = [s.base for s in self.segments]
        i = max(bisect_right(bases, offset) - 1, 0)
        head = self._head
        for segment in self.segments[i:]:
            if segment.end <= offset or not segment.count:
                continue
            if head is not None and segment is head.segment and offset <= head.offset:
                return segment, head.pos
            return segment, segment.entry_for(offset)[1]
        return None

    def _read_disk(self, offset: int, limit: int, stop: int) -> Tuple[int, List[bytes]]:
        frames: List[bytes] = []
        first = offset
        where = self._locate(offset)
        if where is None:
            return offset, frames
        segment, pos = where
        prefix = self._prefix
        plen = len(prefix)
        pack = fmt.u32.pack
        segments = self.segments
        i = segments.index(segment)
        want = offset
        while True:
            for data, batch, shift in self._batches(segment, pos):
                if batch.first + batch.count <= want or not batch.count:
                    continue
                if frames and batch.first != want:
                    return first, frames  # a gap: the next read starts after it
                if not frames:
                    first = want = max(want, batch.first)
                sizes, at = fmt.record_sizes(data, batch, shift)
                skip = want - batch.first  # records before the one wanted
                if skip:
                    at += sum(sizes[:skip])
                take = min(batch.count - skip, stop - want, limit - len(frames))
                append = frames.append
                for n in sizes[skip : skip + take]:
                    append(b"".join((pack(n + plen), prefix, data[at : at + n])))
                    at += n
                number = want + take
                end = batch.first + batch.count
                want = number
                if number >= stop or len(frames) >= limit:
                    if number < end:
                        self._hint(want, segment, batch.pos)
                    else:
                        self._hint(want, segment, batch.end)
                    return first, frames
            i += 1
            if i >= len(segments):
                return first, frames
            segment = segments[i]
            if not segment.count:
                continue
            pos = segment.entries[0][1]

    def _hint(self, offset: int, segment: Segment, pos: int) -> None:
        """Where a reader that stopped before C{offset} will go on."""
        hints = self._hints
        hints[offset] = (segment, pos)
        if len(hints) > 256:
            hints.popitem(last=False)

    def append(self, first: int, frames: Sequence[bytes]) -> Deferred:
        if self.broken:
            return fail(StorageError(f"storage failed: {self.broken}"))
        writer = self._storage.writer
        if writer is not None:
            if self._stale:
                # Writes queued behind a failed one are still out: they will
                # fail, and this append's offsets follow theirs, so it fails
                # with them (and the topic gives all their offsets again).
                writer.wait()
                return self._refused_with_queued()
            if self._inflight and (self._fd is None or self._planned >= self._storage.segment_bytes):
                # A segment to roll: here, once the queued writes are booked
                # (and refused if one of them was: this append's offsets
                # follow theirs), for the full one's index.
                gen = self.gen
                writer.wait()
                if self.gen != gen:
                    return self._refused_with_queued()
            if self.broken:
                return fail(StorageError(f"storage failed: {self.broken}"))
        return self._append_now(first, frames, writer)

    def _refused_with_queued(self) -> Deferred:
        """An append refused because a write queued before it failed (its offsets follow that one's)."""
        return fail(_storage_error(self.failure or OSError("write failed"), f"writing {self.topic}"))

    def written(self, write: Write) -> None:
        """A queued write is done (on the reactor thread, in order): book it, or refuse it."""
        self._inflight -= 1
        if write.gen != self.gen:
            self._stale -= 1  # (queued behind a failed write: failed unwritten)
        if write.error is None:
            self._book(write.first, write.frames, write.pos, write.data,
                       write.pos + len(write.data) if write.marker else 0)
            if write.marker:
                self.segments[-1].reserved = write.reserved
            self._storage.written(self, write.first + len(write.frames), write.pos, write.done)
            return
        if write.gen == self.gen:
            # The file is cut back to this write: what is queued from now on
            # is written from there, and the writes still out (queued behind
            # this one) fail; what they reserved is not.
            self.gen += 1
            self._planned = write.pos
            self._stale = self._inflight
            self._reserved = write.reserved_before
        write.done.errback(_storage_error(write.error, f"writing {self.topic}"))

    def cut_failed_write(self, fd: int, pos: int) -> None:
        """A write failed: cut the newest segment back to C{pos} (in either thread), or refuse writes until restart."""
        try:
            os.ftruncate(fd, pos)
        except OSError as e:
            self.broken = f"could not cut a failed write off {self.topic}'s newest segment: {e}"
            _log.critical("{why}: refusing writes to {topic} until restarted", why=self.broken, topic=self.topic)

    def _append_now(self, first: int, frames: Sequence[bytes], writer: Optional[Writer] = None) -> Deferred:
        """
        L{append}, the segment chosen (a new one, a roll) and the reservation
        renewed where due on this thread: written here, or queued for
        C{writer} (the batch and its reservation marker: the renewals and
        each new segment's first batch had been written on the reactor, half
        of the writes under --fsync never at full speed, perf).
        """
        end = first + len(frames)
        if self.keeps_records:
            data = fmt.encode_batch(first, _encodable(frames), self._skip)
        else:
            data = fmt.encode_passed(end, self._newest_time(frames))
        reserve = self._storage.reserve
        try:
            segment = self._segment_for(first)
            if self.broken:
                # (The fsync of the segment it rolled failed: refused, as
                # every write after it until a restart.)
                return fail(StorageError(f"storage failed: {self.broken}"))
            pos = self._planned if self._inflight else segment.size
            if reserve and (end > self._reserved - reserve // 2 or pos == fmt.SEGMENT_HEADER):
                # Renew the reservation (and start each segment with one).
                reserved = max(self._reserved, end + reserve)
                marker = fmt.encode_reservation(reserved)
            else:
                reserved, marker = 0, b""
            if writer is not None:
                # (Reserved from now on for what follows; given back if the
                # write fails: see written.)
                fd = self._fd
                assert fd is not None  # (the segment chosen: see _segment_for)
                write = Write(self, fd, data, pos, first, frames, self.gen, marker, reserved,
                              self._reserved)
                if reserved:
                    self._reserved = reserved
                self._planned = pos + len(data) + len(marker)
                self._inflight += 1
                writer.submit(write)
                return write.done
            self._write(data + marker if marker else data, pos)
            if reserved:
                self._reserved = segment.reserved = reserved
        except OSError as e:
            return fail(_storage_error(e, f"writing {self.topic}"))
        self._book(first, frames, pos, data, pos + len(data) if marker else 0)
        return self._storage.written(self, end, pos)

    def _newest_time(self, frames: Sequence[bytes]) -> int:
        """The newest of C{frames}' timestamps; of a L{codec.FrameBlock} not split, its last chunk's first."""
        last = frames.chunks[-1] if type(frames) is codec.FrameBlock else frames[-1]
        return fmt.u64.unpack_from(last, self._skip + 8)[0]

    def _book(self, first: int, frames: Sequence[bytes], pos: int, data: bytes, marker_at: int) -> None:
        """
        The batch C{data} (of C{frames}, or its marker: see keeps_records)
        is written at C{pos} of the newest segment: keep its account.
        """
        segment = self.segments[-1]
        # (Its timestamps from its header, not the frames: a FrameBlock's
        # frames would be split for them.)
        _, _, _, at, count, first_ts, last_ts = fmt.batch_header.unpack_from(data)
        batch = fmt.Batch(pos, at, count, first_ts, last_ts, pos + len(data))
        segment.add(batch)
        if marker_at:
            segment.size = marker_at + fmt.BATCH_HEADER
        end = first + len(frames)
        self.next_offset = end
        if self.retains:
            if self._head is None or not self._count:
                self._head = _Head(segment, pos, first, segment.count - len(frames),
                                   segment.record_bytes - batch.record_bytes, batch.first_ts)
            self._count += len(frames)
            self.nbytes += batch.record_bytes + len(frames) * len(self._prefix)
            self.cache.add(first, frames)
            self._storage.cached(self, batch.record_bytes + len(frames) * (len(self._prefix) + 64))

    def _write(self, data: bytes, pos: int) -> None:
        """Write C{data} at the end of the newest segment; on failure leave the file as it was."""
        fd = self._fd
        assert fd is not None
        try:
            write_all(fd, data)
        except OSError:
            self.cut_failed_write(fd, pos)
            raise

    def _segment_for(self, first: int) -> Segment:
        """The segment to append to: the newest, or a new one when that is full."""
        limit = self._storage.segment_bytes
        if self._fd is not None:
            newest = self.segments[-1]
            if newest.size < limit:
                return newest
            # Full: it is closed (fsynced, given its index) and a new one begins.
            self._storage.retire_fd(self._fd)
            self._fd = None
            if not newest.damaged:
                self._write_index(newest)
            return self._new_segment(first)
        if self.segments:
            newest = self.segments[-1]
            if not newest.damaged and newest.size < limit and os.path.getsize(newest.path) == newest.size:
                # After a start: append to the newest segment; its index is
                # out of date from the first write on.
                try:
                    os.unlink(newest.path[:-4] + ".idx")
                except FileNotFoundError:
                    pass
                self._fd = os.open(newest.path, os.O_WRONLY | os.O_APPEND)
                return newest
        return self._new_segment(first)

    def _new_segment(self, first: int) -> Segment:
        path = os.path.join(self.directory, f"{first:020d}.seg")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        reserve = self._storage.reserve
        reserved = max(self._reserved, first + reserve) if reserve else 0
        try:
            header = fmt.encode_segment_header(first)
            if reserved:
                # The segment begins with the offsets' reservation, durable
                # with its header: a start reads the newest segment's only,
                # and a power loss before the first batch's fsync (the next
                # tick under interval) gave again the offsets delivered from
                # it (a review).
                header += fmt.encode_reservation(reserved)
            if os.write(fd, header) != len(header):
                raise OSError(errno.ENOSPC, "No space left on device")
            if self._storage.fsync_policy != "never":
                os.fsync(fd)
                fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        segment = Segment(first, path)
        if reserved:
            segment.size = len(header)
            segment.reserved = self._reserved = reserved
            if self._storage.fsync_policy != "never":
                self.durable_reserved = reserved
        if self.segments and self.segments[-1].base == first:
            self.segments[-1] = segment  # an empty one of the same name, replaced
        else:
            self.segments.append(segment)
        self._fd = fd
        return segment

    def cut_back(self, pos: int, segment: Optional[Segment] = None) -> None:
        """
        Cut C{segment} (the newest by default) back to byte C{pos}: appends
        that were refused.  A rolled one is cut by its path and loses its
        index (written at the roll: the next start reads it whole).  Never
        grows a file (a position of another segment).
        """
        newest = segment is None or (bool(self.segments) and segment is self.segments[-1])
        try:
            if newest:
                if self._fd is None or os.fstat(self._fd).st_size <= pos:
                    return
                os.ftruncate(self._fd, pos)
            else:
                assert segment is not None
                if os.path.getsize(segment.path) <= pos:
                    return
                os.truncate(segment.path, pos)
                try:
                    os.unlink(segment.path[:-4] + ".idx")
                except FileNotFoundError:
                    pass
        except OSError as e:
            path = self.segments[-1].path if segment is None else segment.path
            _log.error("Could not cut {path} back to byte {pos}: {error}", path=path, pos=pos, error=e)

    def sync_fd(self) -> Optional[int]:
        return self._fd

    # -- retention -----------------------------------------------------------------

    def _drop_head(self, keep: Callable[[int, int], bool]) -> int:
        """
        Move the head over the oldest messages until C{keep(timestamp,
        frame bytes)} says to keep one.  Returns how many were dropped.
        """
        head = self._head
        if head is None or not self._count:
            return 0
        dropped = 0
        plen = len(self._prefix)
        segments = self.segments
        i = segments.index(head.segment)
        while self._count:
            segment = segments[i]
            for data, batch, shift in self._batches(segment, head.pos):
                if batch.first + batch.count <= head.offset or not batch.count:
                    continue
                sizes, at = fmt.record_sizes(data, batch, shift)
                number = batch.first
                skip = head.offset - number
                if skip > 0:
                    at += sum(sizes[:skip])
                    number += skip
                end = batch.first + batch.count
                while number < end:
                    n = sizes[number - batch.first]
                    timestamp = fmt.u64.unpack_from(data, at + 8)[0]
                    if keep(timestamp, 4 + n + plen):
                        head.pos, head.offset, head.timestamp = batch.pos, number, timestamp
                        self._dropped(dropped)
                        return dropped
                    at += n
                    number += 1
                    dropped += 1
                    head.count_before += 1
                    head.bytes_before += 4 + n
                    self._count -= 1
                    self.nbytes -= 4 + n + plen
                head.pos, head.offset = batch.end, end
            # The whole segment is dropped: on to the next one with messages.
            self._count -= segment.count - head.count_before
            self.nbytes -= (segment.record_bytes - head.bytes_before) + (segment.count - head.count_before) * plen
            dropped += segment.count - head.count_before
            i += 1
            while i < len(segments) and not segments[i].count:
                i += 1
            if i >= len(segments):
                break
            nxt = segments[i]
            self._head = head = _Head(nxt, nxt.entries[0][1], nxt.entries[0][0], 0, 0, nxt.first_ts)
        # Everything is dropped: the head waits at the end.
        self._count = 0
        self.nbytes = 0
        last = segments[-1]
        self._head = _Head(last, last.size, self.next_offset, last.count, last.record_bytes)
        self._dropped(dropped)
        return dropped

    def _dropped(self, count: int) -> None:
        if self._head is not None:
            self.cache.drop_before(self._head.offset)

    def _skip_whole_segments(self, cutoff: int) -> int:
        """Drop, without reading them, the retained segments whose newest message is at or before C{cutoff}."""
        head = self._head
        assert head is not None
        dropped = 0
        plen = len(self._prefix)
        segments = self.segments
        i = segments.index(head.segment)
        while i < len(segments) - 1 and segments[i].last_ts <= cutoff and self._count:
            segment = segments[i]
            n = segment.count - head.count_before
            self._count -= n
            self.nbytes -= (segment.record_bytes - head.bytes_before) + n * plen
            dropped += n
            i += 1
            while i < len(segments) - 1 and not segments[i].count:
                i += 1
            nxt = segments[i]
            if not nxt.count:
                break
            self._head = head = _Head(nxt, nxt.entries[0][1], nxt.entries[0][0], 0, 0, nxt.first_ts)
        return dropped

    def expire(self, cutoff: int) -> int:
        dropped = 0
        if self.retains and self._head is not None and self._count and self._head.timestamp <= cutoff:
            dropped = self._skip_whole_segments(cutoff)
            head = self._head
            entry = head.segment.entry_for_time(cutoff)
            if entry is not None and entry[0] > head.offset:
                # Whole index blocks before this entry are older: skip them unread.
                skipped = entry[3] - head.count_before
                self._count -= skipped
                self.nbytes -= (entry[4] - head.bytes_before) + skipped * len(self._prefix)
                dropped += skipped
                self._head = _Head(head.segment, entry[1], entry[0], entry[3], entry[4], entry[2])
            dropped += self._drop_head(lambda timestamp, size: timestamp > cutoff)
            if dropped:
                self._dropped(dropped)
        self._delete_segments(cutoff + self.retention_ttl)
        return dropped

    def trim(self, max_bytes: int) -> int:
        if not self.retains:
            return 0
        excess = [self.nbytes - max_bytes]

        def keep(timestamp: int, size: int) -> bool:
            if excess[0] <= 0:
                return True
            excess[0] -= size
            return False

        return self._drop_head(keep)

    def _delete_segments(self, now: int) -> None:
        """
        Delete whole segments before the head whose newest message is past
        both retention and the compaction window (whose keys a restart must
        still know).  The newest segment stays: it holds the next offset.
        """
        cutoff = now - max(self.retention_ttl, self.compaction_window)
        segments = self.segments
        head = self._head.segment if self._head is not None and self.retains else None
        while len(segments) > 1 and segments[0] is not head and segments[0].last_ts <= cutoff:
            self._remove(segments.pop(0))

    def _remove(self, segment: Segment) -> None:
        fd = self._read_fds.pop(segment.path, None)
        if fd is not None:
            os.close(fd)
        # (The index first: a stop between the two leaves a segment without
        # one, read whole at the next start and deleted again, not an index
        # that no segment will ever take away.)
        self._storage.delete(segment.path[:-4] + ".idx", segment.path)

    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def close(self) -> None:
        """Close the files; the newest segment gets its index (a clean close)."""
        if self._fd is not None:
            self._fd = None
        if self.segments and not self.segments[-1].damaged:
            self._write_index(self.segments[-1])
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()


def _cut_refused(entries: Iterable[Tuple[DiskLog, Tuple[Segment, int]]]) -> None:
    """
    Cut refused appends, C{(log, (segment, pos))}, off their segments: each
    segment back to its first refused one (they may span a roll).
    """
    cut: Dict[Tuple[DiskLog, Segment], int] = {}
    for log, (segment, pos) in entries:
        key = (log, segment)
        cut[key] = min(pos, cut.get(key, pos))
    for (log, segment), pos in cut.items():
        log.cut_back(pos, segment)


def _run_now(f, *args) -> Deferred:
    return maybeDeferred(f, *args)


def _fsync_all(fds: List[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def _unlink_all(paths: Sequence[str]) -> List[Tuple[str, OSError]]:
    """Delete C{paths} (those already gone too); the failures, to be logged."""
    failed = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append((path, e))
    return failed


@implementer(IStorage)
class DiskStorage:
    """
    Topics, their segment logs and durable commits under one directory.

    @param run_blocking: how to run blocking work (the fsyncs) off the
        reactor: C{f(*args) -> Deferred}.  The default is the reactor's
        thread pool; tests pass one that runs at once.
    @param call_from_thread: with C{never} and C{interval}, appends are
        written by a thread of their own (L{zaichik.storage.writer}), which
        hands each outcome back through this (C{reactor.callFromThread} by
        default).  Tests that pass C{run_blocking} write on the calling
        thread unless they pass this too (and then call C{writer.wait()}).
    """

    def __init__(self, directory: str, fsync: str = "interval", clock=None, cache_size: int = DEFAULT_CACHE_SIZE,
                 run_blocking: Optional[Callable[..., Deferred]] = None, segment_bytes: int = SEGMENT_BYTES,
                 call_from_thread: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy is one of {FSYNC_POLICIES}")
        if clock is None:
            from twisted.internet import reactor as clock
        self.wall = wall_clock(clock)  # timestamps; clock is for timers (see zaichik.clock)
        # Offsets reserved ahead (see zaichik.storage.segment): where messages
        # may be delivered before they are durable, that is without "always".
        self.reserve = 0 if fsync == "always" else RESERVE
        if run_blocking is None:
            from twisted.internet import reactor
            from twisted.internet.threads import deferToThread

            run_blocking = deferToThread
            if call_from_thread is None:
                call_from_thread = reactor.callFromThread  # type: ignore[attr-defined]
        self._call_from_thread = call_from_thread if fsync != "always" else None
        self.writer: Optional[Writer] = None  # started once open
        self.unit_of_work = None  # what the writer's outcomes are booked in (set by the broker service)
        self.directory = directory
        self.fsync_policy = fsync
        self.clock = clock
        self.cache_size = cache_size
        self.segment_bytes = segment_bytes
        self._run_blocking: Callable[..., Deferred] = run_blocking
        self.damaged = 0
        self.torn = 0
        self._logs: Dict[str, DiskLog] = {}
        self._commits: Dict[str, Dict[str, int]] = {}
        self._commits_path = os.path.join(directory, "commits.log")
        self._commits_fd: Optional[int] = None
        self._commit_lines: List[str] = []
        self._commit_waiting: List[Deferred] = []
        self._last_commit: Dict[str, int] = {}
        self._groups: Dict[str, Dict[str, int]] = {}  # topic -> group -> position
        self._commit_lines_on_disk = 0
        self._live_positions = 0
        self._on_idle: List[Deferred] = []
        self._lock: Optional[IO[str]] = None
        self._opened = False
        # Group commit (fsync always): appends waiting for the next fsync,
        # and whether one is running.
        # (log, end, d, (segment, pos)), None for a commits' fsync.
        self._unsynced: List[Tuple[Optional[DiskLog], int, Deferred, Tuple[Optional[Segment], int]]] = []
        self._syncing = False
        self._retired: List[int] = []  # fds of rolled segments, closed once no fsync uses them
        self._deleting = 0  # deletions of expired segments under way (see delete)
        self._dirty: set = set()  # interval: logs written since the last fsync
        # interval: appends past their log's durable reservation, waiting for
        # an fsync before they are delivered (see written).
        self._held: List[Tuple[DiskLog, int, Deferred, Tuple[Segment, int]]] = []  # (log, end, d, (segment, pos))
        self._ticker: Optional[LoopingCall] = None
        self._cache_lru: "OrderedDict[DiskLog, int]" = OrderedDict()
        self._cache_total = 0

    # -- opening -------------------------------------------------------------------

    def open(self) -> Deferred:
        return maybeDeferred(self._open)

    def _open(self) -> List[TopicState]:
        os.makedirs(os.path.join(self.directory, "topics"), exist_ok=True)
        lock = self._lock = lock_data_dir(self.directory)
        try:
            states = self._recover()
        except BaseException:
            lock.close()  # refused or failed: the data dir is free again
            self._lock = None
            raise
        if self._call_from_thread is not None:
            self.writer = Writer(self._call_from_thread, self._writes_done)
        return states

    def _writes_done(self) -> None:
        """The writer thread finished writes: book them (in the broker's unit of work, if any)."""
        writer = self.writer
        if writer is not None:
            self._in_unit(writer.complete)

    def _in_unit(self, f, *args):
        """
        C{f(*args)} inside the broker's unit of work, if any: what it
        delivers and answers goes out together, one write per connection,
        as a read's does.
        """
        work = self.unit_of_work
        if work is None:
            return f(*args)
        with work:
            return f(*args)

    def _recover(self) -> List[TopicState]:
        upgrade = self._check_format()
        self._opened = True
        self._load_commits()
        now = round(self.wall.seconds() * 1000)
        states = []
        root = os.path.join(self.directory, "topics")
        for entry in sorted(os.listdir(root)):
            meta_path = os.path.join(root, entry, "meta.json")
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                _log.warn("Skipping {dir}: no readable meta.json", dir=os.path.join(root, entry))
                continue
            try:
                name, retention, window = meta["name"], int(meta["retention_ttl"]), int(meta["compaction_window"])
                if not codec.is_valid_topic(name):
                    raise ValueError(name)
            except (KeyError, TypeError, ValueError):
                _log.error("Skipping {dir}: its meta.json lacks a valid name, retention_ttl or "
                           "compaction_window", dir=os.path.join(root, entry))
                self.damaged += 1
                continue
            log = DiskLog(self, os.path.join(root, entry), name, retention, window)
            next_offset, last_timestamp, keys = log.recover(now, upgrade)
            self._logs[name] = log
            states.append(TopicState(name, retention, window,
                                     next_offset, last_timestamp, keys))
        if upgrade:
            self._write_format()  # only once every segment is in this format
        created = not os.path.exists(self._commits_path)
        self._commits_fd = os.open(self._commits_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if created:
            fsync_dir(self.directory)
        if self.fsync_policy == "interval":
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.clock
            self._ticker.start(FSYNC_INTERVAL, now=False)
        return states

    def _check_format(self) -> bool:
        """Refuse a newer format; True when the data dir is new or release 0.1.0's (no FORMAT)."""
        path = os.path.join(self.directory, "FORMAT")
        try:
            with open(path, encoding="ascii") as f:
                found = int(f.read().strip() or 0)
        except FileNotFoundError:
            return True
        except ValueError:
            raise DataDirError(f"{path} is not a format number") from None
        if found != fmt.FORMAT:
            raise DataDirError(f"{self.directory} is in format {found}, not this release's "
                               f"({fmt.FORMAT}): use the zaichik that wrote it, or a newer one")
        return False

    def _write_format(self) -> None:
        path = os.path.join(self.directory, "FORMAT")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{fmt.FORMAT}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.directory)

    # -- topics ---------------------------------------------------------------------

    def _topic_dir(self, name: str) -> str:
        # Hex keeps any legal topic name (".." included) a plain directory name.
        return os.path.join(self.directory, "topics", name.encode().hex())

    def open_log(self, name: str, retention_ttl: int, compaction_window: int) -> DiskLog:
        log = self._logs.get(name)
        if log is not None:
            return log
        directory = self._topic_dir(name)
        try:
            os.makedirs(directory, exist_ok=True)
            meta = {"name": name, "retention_ttl": retention_ttl, "compaction_window": compaction_window}
            tmp = os.path.join(directory, "meta.json.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(directory, "meta.json"))
            fsync_dir(directory)
            fsync_dir(os.path.dirname(directory))
        except OSError as e:
            raise _storage_error(e, f"creating topic {name}") from None
        log = DiskLog(self, directory, name, retention_ttl, compaction_window)
        log.broken = self.broken
        log.recover(0)
        self._logs[name] = log
        return log

    # -- the cache -------------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        return self._cache_total

    def cached(self, log: DiskLog, size: int) -> None:
        """C{log} cached C{size} more bytes: keep all caches within --cache-size."""
        lru = self._cache_lru
        lru[log] = lru.get(log, 0) + size
        lru.move_to_end(log)
        self._cache_total += size
        if self._cache_total <= self.cache_size:
            return
        for other in list(lru):
            if self._cache_total <= self.cache_size:
                return
            if other is log:
                break
            self._cache_total -= lru.pop(other)
            other.cache = MemoryLog(other._timestamp_at)
        # Only this log is left: keep its newest messages within the budget.
        cache = log.cache
        before = cache.nbytes
        cache.trim(max(self.cache_size * 3 // 4, 0))
        freed = (before - cache.nbytes) * (lru[log] / max(before, 1))
        lru[log] -= int(freed)
        self._cache_total -= int(freed)

    # -- commits --------------------------------------------------------------------

    def _load_commits(self) -> None:
        """
        Read commits.log: C{[client_id, topic, offset, ms]} lines (C{ms}
        missing in release 0.1.0's), C{[client_id, null]} for a client
        forgotten (see L{forget_client}), and C{["group", topic, group,
        offset, ms]} for a consumer group's position (five fields: no client
        line has them, and a broker before groups skips it as malformed).  A
        line that is not one of these is skipped (a torn write), with a
        warning.
        """
        try:
            with open(self._commits_path, "rb") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        now = round(self.wall.seconds() * 1000)
        skipped = 0
        for line in lines:
            try:
                entry = json.loads(line.decode("utf-8"))
                if len(entry) == 5 and entry[0] == "group":
                    _, topic, group, offset = entry[:4]
                    if (not isinstance(topic, str) or not isinstance(group, str) or not isinstance(offset, int)
                            or isinstance(offset, bool)):
                        raise TypeError(entry)
                    self._groups.setdefault(topic, {})[group] = offset
                    continue
                client_id, topic = entry[0], entry[1]
                if not isinstance(client_id, str):
                    raise TypeError(client_id)
                if topic is None:
                    self._commits.pop(client_id, None)
                    self._last_commit.pop(client_id, None)
                    continue
                offset = entry[2]
                if not isinstance(topic, str) or not isinstance(offset, int) or isinstance(offset, bool):
                    raise TypeError(entry)
                when = entry[3] if len(entry) > 3 and isinstance(entry[3], int) else now
            except (ValueError, TypeError, IndexError, KeyError, UnicodeDecodeError):
                skipped += 1
                continue
            self._commits.setdefault(client_id, {})[topic] = offset
            self._last_commit[client_id] = max(when, self._last_commit.get(client_id, 0))
        if skipped:
            _log.warn("Skipped {n} unreadable lines in {path}", n=skipped, path=self._commits_path)
        self._rewrite_commits()

    def _rewrite_commits(self) -> None:
        """
        Rewrite commits.log compacted, one line per position; if that fails
        (a full disk), the file serves as it is.
        """
        tmp = self._commits_path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for client_id, positions in self._commits.items():
                    when = self._last_commit.get(client_id, 0)
                    for topic, offset in positions.items():
                        f.write(json.dumps([client_id, topic, offset, when]) + "\n")
                now = round(self.wall.seconds() * 1000)
                for topic, groups in self._groups.items():
                    for group, offset in groups.items():
                        f.write(json.dumps(["group", topic, group, offset, now]) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._commits_path)
            fsync_dir(self.directory)
        except OSError as e:
            _log.warn("Could not compact {path}: {error}", path=self._commits_path, error=e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return
        self._live_positions = self._commit_lines_on_disk = (
            sum(len(p) for p in self._commits.values()) + sum(len(g) for g in self._groups.values()))
        if self._commits_fd is not None:
            self.retire_fd(self._commits_fd)  # (an fsync in a thread may still use it)
            self._commits_fd = os.open(self._commits_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def commits(self) -> Dict[str, Dict[str, int]]:
        return self._commits

    def last_commit_times(self) -> Dict[str, int]:
        return self._last_commit

    def record_commit(self, client_id: str, topic: str, offset: int) -> Deferred:
        positions = self._commits.setdefault(client_id, {})
        previous = positions.get(topic)
        if previous is None:
            self._live_positions += 1
        positions[topic] = offset
        when = round(self.wall.seconds() * 1000)
        self._last_commit[client_id] = when
        self._commit_lines.append(json.dumps([client_id, topic, offset, when]) + "\n")
        d: Deferred = Deferred()
        # If the write fails, the position goes back to what it was.
        d.addErrback(self._commitFailed, client_id, topic, offset, previous)
        self._commit_waiting.append(d)
        return d

    def group_positions(self) -> Dict[str, Dict[str, int]]:
        return self._groups

    def record_group_position(self, topic: str, group: str, offset: int) -> Deferred:
        positions = self._groups.setdefault(topic, {})
        previous = positions.get(group)
        if previous is None:
            self._live_positions += 1
        positions[group] = offset
        when = round(self.wall.seconds() * 1000)
        self._commit_lines.append(json.dumps(["group", topic, group, offset, when]) + "\n")
        d: Deferred = Deferred()
        d.addErrback(self._groupFailed, topic, group, offset, previous)
        self._commit_waiting.append(d)
        return d

    def _groupFailed(self, failure, topic: str, group: str, offset: int, previous: Optional[int]):
        positions = self._groups.get(topic, {})
        if positions.get(group) == offset:
            if previous is None:
                positions.pop(group, None)
                self._live_positions -= 1
                if not positions:
                    self._groups.pop(topic, None)
            else:
                positions[group] = previous
        return failure

    def forget_client(self, client_id: str) -> None:
        positions = self._commits.pop(client_id, None)
        if positions is not None:
            self._live_positions -= len(positions)
            self._last_commit.pop(client_id, None)
            self._commit_lines.append(json.dumps([client_id, None]) + "\n")

    def _commitFailed(self, failure, client_id: str, topic: str, offset: int, previous: Optional[int]):
        positions = self._commits.get(client_id, {})
        if positions.get(topic) == offset:
            if previous is None:
                positions.pop(topic, None)
                self._live_positions -= 1
                if not positions:
                    self._commits.pop(client_id, None)
            else:
                positions[topic] = previous
        return failure

    def _write_commits(self) -> Optional[StorageError]:
        if not self._commit_lines:
            return None
        lines = self._commit_lines
        data = "".join(lines).encode("utf-8")
        self._commit_lines = []
        self._commit_lines_on_disk += len(lines)
        fd = self._commits_fd
        assert fd is not None
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            return _storage_error(e, "writing commits")
        return None

    # -- durability -----------------------------------------------------------------

    def written(self, log: DiskLog, end: int, pos: int, d: Optional[Deferred] = None) -> Deferred:
        """
        C{log} wrote up to offset C{end}, from byte C{pos} of its newest
        segment: fires (C{d}, if given) once that is as durable as the policy
        says.  Under C{interval} that is at once, unless the offsets pass the
        reservation an fsync has made durable: then after the next fsync
        (one is started at the end of the unit, or when the one under way
        ends), or a power loss could give the offsets delivered again after
        the restart.  Behind a held append of the same log (a roll makes the
        new segment's reservation durable at once), and after a failed
        fsync, an append is held too: in order, and cut back if refused.
        """
        policy = self.fsync_policy
        if policy != "always":
            if policy == "interval":
                self._dirty.add(log)
                if end > log.durable_reserved or log.held or log.broken:
                    if d is None:
                        d = Deferred()
                    self._held.append((log, end, d, (log.segments[-1], pos)))
                    log.held += 1
                    return d
            log.visible_end = end
            if d is None:
                return succeed(None)
            d.callback(None)
            return d
        if d is None:
            d = Deferred()
        self._unsynced.append((log, end, d, (log.segments[-1], pos)))
        return d

    def sync(self) -> None:
        """The end of a unit of work: write its commits; with C{always}, fsync the unit."""
        if self._shut:
            return  # (a unit that closed the storage, ending: see close)
        waiting, self._commit_waiting = self._commit_waiting, []
        error = self._write_commits() if self._commits_fd is not None else None
        if error is None and self._commit_lines_on_disk > 2 * self._live_positions + 10_000:
            # Keep commits.log proportional to the live positions.
            self._rewrite_commits()
        if error is not None:
            for d in waiting:
                d.errback(error)
            waiting = []
        if self.fsync_policy == "always":
            self._unsynced.extend((None, 0, d, (None, 0)) for d in waiting)
            if self._unsynced and not self._syncing:
                self._fsync_group()
            return
        if waiting and self.fsync_policy == "interval":
            self._commits_dirty = True
        for d in waiting:
            d.callback(None)
        if self._held:
            self._tick()  # (an fsync now for appends past the durable reservation)

    _commits_dirty = False

    def _fsync_group(self) -> None:
        group, self._unsynced = self._unsynced, []
        fds = {entry[0].sync_fd() for entry in group if entry[0] is not None} - {None}
        if any(entry[0] is None for entry in group):
            fds.add(self._commits_fd)
        self._syncing = True
        self._run_blocking(_fsync_all, list(fds)).addBoth(lambda result: self._in_unit(self._synced, result, group))

    def _synced(self, result, group) -> None:
        self._syncing = False
        self._close_retired()
        if isinstance(result, Failure):
            error = result.value
            self._fsync_failed(error)
            # What was written since the last good fsync is cut off (it was
            # refused: a restart must not serve it), and every append waiting
            # for an fsync fails.
            group = group + self._unsynced
            self._unsynced = []
            _cut_refused([(log, at) for log, _, _, at in group if log is not None])
            for _, _, d, _ in group:
                d.errback(StorageError(f"storage failed: fsync: {error}"))
        else:
            # A log broken meanwhile (a roll's fsync of the segment these
            # appends are in failed): its appends are refused and cut, not
            # acknowledged by this fsync of its new segment (a review).
            broken = [(log, at) for log, _, _, at in group if log is not None and log.broken]
            _cut_refused(broken)
            for log, end, d, _ in group:
                if log is not None and log.broken:
                    d.errback(StorageError(f"storage failed: {log.broken}"))
                    continue
                if log is not None and end > log.visible_end:
                    log.visible_end = end
                d.callback(None)
        if self._unsynced:
            self._fsync_group()
        else:
            self._idle()

    def delete(self, *paths: str) -> None:
        """
        Delete files (an expired segment and its index) off the reactor:
        unlinking a segment frees its pages in the page cache, ~5% of the
        reactor's time under --fsync never at full speed (perf: a 64 MiB
        segment every few tenths of a second), in one stall each.  Nothing
        refers to them any more; a close waits for deletions under way (a
        stop before one ends leaves expired segments that the next start's
        sweep deletes again).
        """
        self._deleting += 1

        def done(result) -> None:
            self._deleting -= 1
            if isinstance(result, Failure):
                _log.failure("Deleting {paths} failed", result, paths=paths)
            else:
                for path, error in result:
                    _log.warn("Could not delete {path}: {error}", path=path, error=error)
            self._idle()

        self._run_blocking(_unlink_all, paths).addBoth(done)

    def _busy(self) -> bool:
        """An fsync or a deletion is under way in a thread."""
        return self._syncing or self._deleting > 0

    def _idle(self) -> None:
        if self._busy():
            return
        waiting, self._on_idle = self._on_idle, []
        for d in waiting:
            d.callback(None)

    def _fsync_failed(self, error) -> None:
        """
        After a failed fsync, what was written since the last good one may
        be gone from the kernel's cache without reaching the disk, and a
        retry can report success (PostgreSQL's "fsyncgate"): refuse every
        write until the broker is restarted and reads back what is there.
        """
        _log.critical("fsync failed ({error}): refusing writes until restarted", error=error)
        self.broken = f"fsync failed: {error}"  # (topics made from now on too)
        for log in self._logs.values():
            log.broken = self.broken

    def retire_fd(self, fd: int) -> None:
        """A rolled segment's fd: fsynced (unless never), closed once no fsync in flight uses it."""
        if self.fsync_policy != "never":
            try:
                os.fsync(fd)
            except OSError as e:
                self._fsync_failed(e)
        self._retired.append(fd)
        if not self._syncing:
            self._close_retired()

    def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for fd in retired:
            os.close(fd)

    def _tick(self) -> None:
        """The C{interval} policy: fsync what was written in the last 100 ms, in a thread."""
        if self._syncing or not (self._dirty or self._commits_dirty):
            return
        fds = [log.sync_fd() for log in self._dirty if log.sync_fd() is not None]
        # The reservations written so far: durable once this fsync is done.
        reserved = [(log, log.segments[-1].reserved) for log in self._dirty if log.segments]
        if self._commits_dirty:
            fds.append(self._commits_fd)
        self._dirty = set()
        self._commits_dirty = False
        self._syncing = True

        def done(result):
            self._syncing = False
            self._close_retired()
            if isinstance(result, Failure):
                self._fsync_failed(result.value)
            else:
                for log, at in reserved:
                    if at > log.durable_reserved:
                        log.durable_reserved = at
            if self._held:
                self._release_held(result)
            self._idle()

        self._run_blocking(_fsync_all, fds).addBoth(lambda result: self._in_unit(done, result))

    def _release_held(self, result) -> None:
        """
        After an fsync (C{interval}): appends now covered by a durable
        reservation are delivered, in order.  After a failed one the broker
        refuses writes until restarted: the held appends of a broken log
        fail, cut back off its segment (as under C{always}: a restart must
        not serve what was refused), with the writes still queued for the
        writer thread (waited for: they follow the held ones).  The appends
        delivered since the last good fsync stay.
        """
        failed = isinstance(result, Failure)
        if self.writer is not None and (failed or any(log.broken for log, _, _, _ in self._held)):
            self.writer.wait()
        held, self._held = self._held, []
        cut = {log for log, _, _, _ in held if failed or log.broken}
        _cut_refused([(log, at) for log, _, _, at in held if log in cut])
        for log, end, d, at in held:
            if log in cut:
                log.held -= 1
                d.errback(StorageError(f"storage failed: {log.broken or result.value}"))
            elif end <= log.durable_reserved:
                log.held -= 1
                if end > log.visible_end:
                    log.visible_end = end
                d.callback(None)
            else:
                self._held.append((log, end, d, at))
                self._dirty.add(log)
        if self._held:
            self._tick()

    # -- closing --------------------------------------------------------------------

    _closed = False
    _shut = False  # closed, files and all
    broken: Optional[str] = None  # why every write is refused until a restart (a failed fsync)

    def close(self) -> Deferred:
        if self._closed or not self._opened:
            return succeed(None)
        self._closed = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        if self.writer is not None:
            self.writer.stop()  # (what is queued is written and booked first)
            # Appends made while closing (connections publish until the
            # reactor stops) are written here, as without the thread.
            self.writer = None
        self.sync()
        if self._busy():
            # An fsync (or a deletion) runs in a thread on these files: close after it.
            d: Deferred = Deferred()
            self._on_idle.append(d)
            return d.addCallback(lambda _: self._close_now())
        self._close_now()
        return succeed(None)

    def _close_now(self) -> None:
        error = self._write_commits()
        if error is not None:
            _log.error("Could not write the last commits: {error}", error=error.message)
        fds = [fd for fd in [log.sync_fd() for log in self._logs.values()] + [self._commits_fd] if fd is not None]
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError as e:
                _log.error("fsync at close failed: {error}", error=e)
        self._close_retired()
        for log in self._logs.values():
            log.close()
        for fd in fds:
            os.close(fd)
        self._shut = True
        if self._lock is not None:
            self._lock.close()


def lock_data_dir(directory: str):
    """Lock C{directory} for this process (writing its pid) or raise L{DataDirLocked}."""
    lock = open(os.path.join(directory, "lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DataDirLocked(f"{directory} is in use by another broker (its lock is held)") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def check_not_locked(directory: str) -> None:
    """Raise L{DataDirLocked} if a broker holds C{directory} now (for a clear error before starting)."""
    path = os.path.join(directory, "lock")
    if not os.path.exists(path):
        return
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataDirLocked(f"{directory} is in use by another broker (its lock is held)") from None
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
