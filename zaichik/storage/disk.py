"""
Durable storage: C{twistd zaichik --data-dir DIR}.

A hand-written append-only segment log per topic, as Kafka and NATS
JetStream keep theirs: the broker's messages are already encoded frames with
their offset and timestamp inside, so the log is those frames, each behind a
length and a CRC-32, appended to the topic's newest segment file.  Reading
back is sequential; deleting expired data is deleting whole segment files.

Layout::

    DIR/lock                         flock'd by the running broker
    DIR/commits.log                  durable commits, one JSON line each
    DIR/topics/<hex name>/meta.json  {"name", "retention_ttl", "compaction_window"}
    DIR/topics/<hex name>/<base offset, 20 digits>.seg

A record is C{u32 length, u32 crc32(frame), frame}.  At start every segment
is read; a record whose length runs past the end of the file or whose CRC
does not match (a write torn by a crash) ends the segment: the file is cut
there, with a warning.  The newest segment is never deleted, so the next
offset survives even when every message has expired.

Retained frames are also kept in memory (a L{MemoryLog}), so reads never
touch the disk.  Writes go to the kernel at the end of every read batch
(see L{DiskStorage.sync}); C{fsync} follows the policy:

  - C{always}: before the batch's replies go out (one fsync per batch and
    segment: group commit);
  - C{interval}: at most every 100 ms;
  - C{never}: when the kernel pleases.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import zlib
from typing import Dict, Iterator, List, Optional, Set, Tuple

from twisted.logger import Logger
from zope.interface import implementer

from zaichik import codec
from zaichik.storage import IMessageLog, IStorage, MemoryLog, TopicState

_log = Logger()
_record = struct.Struct(">II")
_u16 = struct.Struct(">H")
_u64 = struct.Struct(">Q")
SEGMENT_BYTES = 64 * 1024 * 1024
FSYNC_POLICIES = ("always", "interval", "never")


class DataDirLocked(Exception):
    """Another broker is using the data directory."""


def _crc(frame: bytes) -> int:
    return zlib.crc32(frame) & 0xFFFFFFFF


@implementer(IMessageLog)
class DiskLog:
    """One topic's log: frames in memory for reading, segments on disk."""

    def __init__(self, storage: "DiskStorage", directory: str, topic: str, retention_ttl: int,
                 compaction_window: int) -> None:
        self._storage = storage
        self.directory = directory
        self._offset_at, self._timestamp_at = codec.message_frame_offsets(topic)
        self._memory = MemoryLog(self._timestamp_at)
        self.retention_ttl = retention_ttl
        self.compaction_window = compaction_window
        # (base offset, path, last offset, last timestamp) of each segment, oldest first.
        self._segments: List[List] = []
        self._file = None
        self._file_bytes = 0

    # -- recovery ----------------------------------------------------------------

    def recover(self, now: int) -> Tuple[int, int, List[Tuple[bytes, int, int]]]:
        """
        Read every segment; load what retention still keeps into memory.

        @return: C{(next_offset, last_timestamp, keys)}, C{keys} being
            C{(key, timestamp, offset)} of keyed messages still inside the
            compaction window, oldest first.
        """
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".seg"))
        next_offset = 0
        last_timestamp = 0
        keys: List[Tuple[bytes, int, int]] = []
        keep_after = now - self.retention_ttl
        window_after = now - self.compaction_window
        key_at = self._timestamp_at + 8
        unpack_record = _record.unpack_from
        unpack_u64 = _u64.unpack_from
        for name in names:
            path = os.path.join(self.directory, name)
            base = int(name[:-4])
            with open(path, "rb") as f:
                data = f.read()
            at = 0
            end = len(data)
            last = (base - 1, 0)
            while at < end:
                if end - at < 8:
                    break
                length, crc = unpack_record(data, at)
                start = at + 8
                if start + length > end:
                    break
                frame = data[start : start + length]
                if _crc(frame) != crc:
                    break
                offset = unpack_u64(frame, self._offset_at)[0]
                timestamp = unpack_u64(frame, self._timestamp_at)[0]
                if self.retention_ttl and timestamp > keep_after:
                    self._memory.append(offset, timestamp, frame)
                if self.compaction_window and timestamp > window_after:
                    (n,) = _u16.unpack_from(frame, key_at)
                    if n:
                        keys.append((frame[key_at + 2 : key_at + 2 + n], timestamp, offset))
                last = (offset, timestamp)
                at = start + length
            if at < end:
                _log.warn("Torn or corrupt record in {path} at byte {at}: cut {lost} bytes",
                          path=path, at=at, lost=end - at)
                with open(path, "r+b") as f:
                    f.truncate(at)
                    f.flush()
                    os.fsync(f.fileno())
            self._segments.append([base, path, last[0], last[1]])
            next_offset = max(next_offset, last[0] + 1, base)
            last_timestamp = max(last_timestamp, last[1])
        self._next_offset = next_offset
        return next_offset, last_timestamp, keys

    # -- IMessageLog -------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self._memory.nbytes

    def __len__(self) -> int:
        return len(self._memory)

    def first_offset(self) -> Optional[int]:
        return self._memory.first_offset()

    def read(self, offset: int, limit: int):
        return self._memory.read(offset, limit)

    def append(self, offset: int, timestamp: int, frame: bytes) -> None:
        self.write(offset, timestamp, frame)  # the disk first: if it fails, nothing is retained
        if self.retention_ttl:
            self._memory.append(offset, timestamp, frame)

    def record(self, offset: int, timestamp: int, frame: bytes) -> None:
        self.write(offset, timestamp, frame)

    def write(self, offset: int, timestamp: int, frame: bytes) -> None:
        """Append to the newest segment (every stored message, retained or not)."""
        if self._file is None or self._file_bytes >= SEGMENT_BYTES:
            self._roll(offset)
        record = _record.pack(len(frame), _crc(frame)) + frame
        self._file.write(record)
        self._file_bytes += len(record)
        segment = self._segments[-1]
        segment[2] = offset
        segment[3] = timestamp
        self._storage.dirty.add(self)

    def _roll(self, offset: int) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._segments and self._segments[-1][2] < self._segments[-1][0]:
            # The newest segment is empty: write into it.
            path = self._segments[-1][1]
        else:
            path = os.path.join(self.directory, f"{offset:020d}.seg")
            self._segments.append([offset, path, offset - 1, 0])
        self._file = open(path, "ab", buffering=1 << 20)
        self._file_bytes = self._file.tell()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def fsync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def expire(self, cutoff: int) -> int:
        dropped = self._memory.expire(cutoff)
        self._delete_segments(cutoff)
        return dropped

    def trim(self, max_bytes: int) -> int:
        dropped = self._memory.trim(max_bytes)
        first = self._memory.first_offset()
        if first is not None:
            self._delete_segments_before(first)
        return dropped

    def _delete_segments(self, retention_cutoff: int) -> None:
        """
        Delete whole segments whose newest message is past both retention and
        the compaction window (whose keys a restart must still know).
        """
        now = retention_cutoff + self.retention_ttl
        cutoff = now - max(self.retention_ttl, self.compaction_window)
        while len(self._segments) > 1 and self._segments[0][3] <= cutoff:
            self._remove(self._segments.pop(0))

    def _delete_segments_before(self, offset: int) -> None:
        while len(self._segments) > 1 and self._segments[0][2] < offset and not self.compaction_window:
            self._remove(self._segments.pop(0))

    def _remove(self, segment) -> None:
        try:
            os.unlink(segment[1])
        except OSError as e:
            _log.warn("Could not delete segment {path}: {error}", path=segment[1], error=e)

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(s[1]) for s in self._segments if os.path.exists(s[1]))

    def close(self) -> None:
        if self._file is not None:
            self.fsync()
            self._file.close()
            self._file = None


@implementer(IStorage)
class DiskStorage:
    """Topics, their segment logs and durable commits under one directory."""

    def __init__(self, directory: str, fsync: str = "interval", clock=None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy is one of {FSYNC_POLICIES}")
        if clock is None:
            from twisted.internet import reactor as clock
        self.directory = directory
        self.fsync_policy = fsync
        self.clock = clock
        self.dirty: Set[DiskLog] = set()
        self._fsync_due: Set[DiskLog] = set()
        os.makedirs(os.path.join(directory, "topics"), exist_ok=True)
        self._lock = open(os.path.join(directory, "lock"), "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise DataDirLocked(f"{directory} is in use by another broker (its lock is held)") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{os.getpid()}\n")
        self._lock.flush()
        self._logs: Dict[str, DiskLog] = {}
        self._commits: Dict[str, Dict[str, int]] = {}
        self._commits_path = os.path.join(directory, "commits.log")
        self._load_commits()
        self._commits_file = open(self._commits_path, "a", buffering=1 << 16, encoding="utf-8")
        self._commits_dirty = False

    # -- topics ---------------------------------------------------------------------

    def _topic_dir(self, name: str) -> str:
        # Hex keeps any legal topic name (".." included) a plain directory name.
        return os.path.join(self.directory, "topics", name.encode().hex())

    def topics(self) -> Iterator[TopicState]:
        now = round(self.clock.seconds() * 1000)
        root = os.path.join(self.directory, "topics")
        for entry in sorted(os.listdir(root)):
            meta_path = os.path.join(root, entry, "meta.json")
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                _log.warn("Skipping {dir}: no readable meta.json", dir=os.path.join(root, entry))
                continue
            log = DiskLog(self, os.path.join(root, entry), meta["name"], meta["retention_ttl"],
                          meta["compaction_window"])
            next_offset, last_timestamp, keys = log.recover(now)
            self._logs[meta["name"]] = log
            yield TopicState(meta["name"], meta["retention_ttl"], meta["compaction_window"],
                             next_offset, last_timestamp, keys)

    def open_log(self, name: str, retention_ttl: int, compaction_window: int) -> DiskLog:
        log = self._logs.get(name)
        if log is not None:
            return log
        directory = self._topic_dir(name)
        os.makedirs(directory, exist_ok=True)
        meta = {"name": name, "retention_ttl": retention_ttl, "compaction_window": compaction_window}
        tmp = os.path.join(directory, "meta.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, "meta.json"))
        log = DiskLog(self, directory, name, retention_ttl, compaction_window)
        log.recover(0)
        self._logs[name] = log
        return log

    # -- commits --------------------------------------------------------------------

    def _load_commits(self) -> None:
        try:
            with open(self._commits_path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                client_id, topic, offset = json.loads(line)
            except ValueError:
                _log.warn("Skipping a torn line at the end of {path}", path=self._commits_path)
                continue
            self._commits.setdefault(client_id, {})[topic] = offset
        # Rewrite compacted: one line per position.
        tmp = self._commits_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for client_id, positions in self._commits.items():
                for topic, offset in positions.items():
                    f.write(json.dumps([client_id, topic, offset]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._commits_path)

    def commits(self) -> Dict[str, Dict[str, int]]:
        return self._commits

    def record_commit(self, client_id: str, topic: str, offset: int) -> None:
        self._commits.setdefault(client_id, {})[topic] = offset
        self._commits_file.write(json.dumps([client_id, topic, offset]) + "\n")
        self._commits_dirty = True

    # -- durability -----------------------------------------------------------------

    def sync(self) -> None:
        """
        End of a read batch: hand what was written to the kernel, and with
        C{always} fsync it before the batch's replies are sent.
        """
        dirty = self.dirty
        if not dirty and not self._commits_dirty:
            return
        always = self.fsync_policy == "always"
        for log in dirty:
            if always:
                log.fsync()
            else:
                log.flush()
        if self.fsync_policy == "interval":
            self._fsync_due |= dirty
        self.dirty = set()
        if self._commits_dirty:
            self._commits_file.flush()
            if always:
                os.fsync(self._commits_file.fileno())
            self._commits_dirty = False
            self._commits_fsync_due = True

    _commits_fsync_due = False

    def fsync_interval(self) -> None:
        """The C{interval} policy's tick (every 100 ms)."""
        due, self._fsync_due = self._fsync_due, set()
        for log in due:
            log.fsync()
        if self._commits_fsync_due:
            self._commits_fsync_due = False
            os.fsync(self._commits_file.fileno())

    _closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sync()
        for log in self._logs.values():
            log.close()
        self._commits_file.flush()
        os.fsync(self._commits_file.fileno())
        self._commits_file.close()
        self._lock.close()
