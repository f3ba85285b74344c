"""
The on-disk format of a topic's segments and their indexes (format 2),
without any I/O: encoding batches, finding them in bytes, the records in
them.  docs/storage.rst describes the same format for people.

A segment file::

    header   magic "ZKSG", u16 format (2), u16 flags (0), u64 base offset   16 bytes
    batch*

A batch (one topic's messages of one unit of work, or of an upgrade)::

    magic "ZKB2"  u32 length  u32 crc32      the CRC covers the `length` bytes after it
    u64 first offset  u32 count  u64 first timestamp  u64 last timestamp
    u32 size * count                         each record's size, then
    record * count                           the records: offsets first .. first+count-1

A record (C{size} bytes)::

    u64 offset, u64 timestamp (ms), u16 key length, key, u32 value length, value

The sizes come first so that a batch is written, and read, with one
C{struct} call for all of them rather than one per record.

A batch with count 0 is a marker, by its first timestamp:

  - 0, a gap marker: offsets below its first offset are used, even if no
    record shows them (written after a torn tail is found, so that those
    offsets are never given again);
  - 1, a reservation: offsets below its first offset may have been given
    out.  Without C{--fsync always}, messages are delivered before they are
    on disk; a power loss can take the newest of them, and their offsets
    must not go to new messages.  The broker writes a reservation ahead of
    the offsets it gives (16 million at a time, renewed half-way, and at the
    start of every new segment; a message past the reservation an fsync
    has made durable waits for the next fsync before it is delivered), and
    after a start that was not clean (the newest segment has no index) it
    goes on from the reservation;
  - 2, messages not kept: a topic that retains and compacts nothing never
    reads its records back, so each of its appends is written as this
    marker alone (offsets below its first offset went to messages), with
    its last timestamp the newest message's time (or one at most a unit of
    work older), where the topic's timestamps go on from after a restart.
    Brokers before this kind take it as a gap marker.

All integers are big-endian.  A record holds no topic name: the broker
makes a MESSAGE frame from it by putting the topic in front.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

from zaichik import codec, speedups
from zaichik.speedups import crc32

SEGMENT_MAGIC = b"ZKSG"
BATCH_MAGIC = b"ZKB2"
INDEX_MAGIC = b"ZKIX"
FORMAT = 2

segment_header = struct.Struct(">4sHHQ")
SEGMENT_HEADER = segment_header.size  # 16
batch_header = struct.Struct(">4sIIQIQQ")
BATCH_HEADER = batch_header.size  # 40
_batch_rest = struct.Struct(">QIQQ")  # what the CRC covers of the header: 28 bytes
CRC_FROM = 12
u32 = struct.Struct(">I")
u64 = struct.Struct(">Q")
u16 = struct.Struct(">H")
# The smallest record: its length, offset, timestamp, key length 0, value length.
MIN_RECORD = 4 + 8 + 8 + 2 + 4


def crc(data) -> int:
    return crc32(data) & 0xFFFFFFFF


def encode_segment_header(base: int) -> bytes:
    return segment_header.pack(SEGMENT_MAGIC, FORMAT, 0, base)


def encode_batch_py(first: int, frames: Union[List[bytes], bytes], skip: int) -> bytes:
    """
    A batch of MESSAGE frames whose offsets run from C{first}: each
    frame's first C{skip} bytes (its length and topic) are left out.
    C{frames} may be a block of them (L{codec.FrameBlock}'s C{data}).
    The specification of L{encode_batch}, compiled where built.
    """
    if isinstance(frames, bytes):
        frames = codec.split_frames_py(frames)
    count = len(frames)
    bodies = [frame[skip:] for frame in frames]
    sizes = sizes_struct(count).pack(*map(len, bodies))
    records = b"".join(bodies)
    first_ts = u64.unpack_from(frames[0], skip + 8)[0]
    last_ts = u64.unpack_from(frames[-1], skip + 8)[0]
    rest = _batch_rest.pack(first, count, first_ts, last_ts)
    checksum = crc32(records, crc32(sizes, crc32(rest))) & 0xFFFFFFFF
    return b"".join((BATCH_MAGIC, u32.pack(len(rest) + len(sizes) + len(records)), u32.pack(checksum),
                     rest, sizes, records))


# Once per append on the disk path: the compiled twin (zaichik/_speedups.c)
# writes the sizes and records straight into the result, one copy of each
# record instead of a slice and a join.
encode_batch: Callable[[int, Union[List[bytes], bytes], int], bytes] = encode_batch_py
if speedups.compiled is not None:
    encode_batch = speedups.compiled.encode_batch

_sizes: dict = {}


def sizes_struct(count: int) -> struct.Struct:
    """The C{struct} of C{count} record sizes (cached: batches repeat their counts)."""
    found = _sizes.get(count)
    if found is None:
        found = struct.Struct(f">{count}I")
        if len(_sizes) < 4096:
            _sizes[count] = found
    return found


GAP = 0
RESERVATION = 1
PASSED = 2


def encode_gap(first: int, kind: int = GAP, last_ts: Optional[int] = None) -> bytes:
    """A gap marker (every offset below C{first} is used), or with C{kind} RESERVATION a reservation."""
    rest = _batch_rest.pack(first, 0, kind, kind if last_ts is None else last_ts)
    return b"".join((BATCH_MAGIC, u32.pack(len(rest)), u32.pack(crc(rest)), rest))


def encode_reservation(first: int) -> bytes:
    """A reservation: offsets below C{first} may have been given out (see the module docstring)."""
    return encode_gap(first, RESERVATION)


def encode_passed(first: int, last_ts: int) -> bytes:
    """
    A gap marker for messages not kept: offsets below C{first} went to
    messages of a topic that retains and compacts nothing, the newest of
    them at about C{last_ts} (see the module docstring).
    """
    return encode_gap(first, PASSED, last_ts)


@dataclass(frozen=True, slots=True)
class Batch:
    pos: int  # where it starts
    first: int
    count: int
    first_ts: int
    last_ts: int
    end: int  # where the next one starts

    @property
    def record_bytes(self) -> int:
        return self.end - self.pos - BATCH_HEADER

    @property
    def is_reservation(self) -> bool:
        return not self.count and self.first_ts == RESERVATION

    @property
    def is_passed(self) -> bool:
        return not self.count and self.first_ts == PASSED



def batch_at(data, at: int, min_first: int = 0, limit: Optional[int] = None) -> Optional[Batch]:
    """
    The valid batch starting at C{data[at:]}, or None: its magic, length,
    CRC and offsets (not below C{min_first}) must all hold.  C{at} and the
    batch's positions count from C{data}'s start.
    """
    end = len(data) if limit is None else limit
    if end - at < BATCH_HEADER:
        return None
    magic, length, checksum, first, count, first_ts, last_ts = batch_header.unpack_from(data, at)
    total = CRC_FROM + length
    if (magic != BATCH_MAGIC or length < _batch_rest.size or at + total > end or first < min_first
            or count * MIN_RECORD > length - _batch_rest.size):
        return None
    if crc(memoryview(data)[at + CRC_FROM : at + total]) != checksum:
        return None
    return Batch(at, first, count, first_ts, last_ts, at + total)


def next_batch(data, at: int, min_first: int = 0) -> Optional[Batch]:
    """The first valid batch after byte C{at} (to step over damage), or None."""
    find = data.find
    at = find(BATCH_MAGIC, at + 1)
    while at != -1:
        batch = batch_at(data, at, min_first)
        if batch is not None:
            return batch
        at = find(BATCH_MAGIC, at + 1)
    return None


class Scan(NamedTuple):
    batches: List[Batch]
    damage: List[Tuple[int, int]]  # byte ranges that hold no valid batch, with a valid one after
    torn: Optional[int]  # where a bad tail starts (nothing valid after it), or None


def scan(data, base: int, start: int = SEGMENT_HEADER) -> Scan:
    """Every batch of a whole segment's bytes, checking each."""
    batches: List[Batch] = []
    damage: List[Tuple[int, int]] = []
    torn = None
    at = start
    end = len(data)
    expected = base
    while at < end:
        batch = batch_at(data, at, expected)
        if batch is None:
            batch = next_batch(data, at, expected)
            if batch is None:
                torn = at
                break
            damage.append((at, batch.pos))
        batches.append(batch)
        if not batch.is_reservation:
            expected = batch.first + batch.count
        at = batch.end
    return Scan(batches, damage, torn)


def record_sizes(data, batch: Batch, shift: int = 0) -> Tuple[Tuple[int, ...], int]:
    """
    The sizes of C{batch}'s records and where the first one starts in
    C{data} (which starts at byte C{shift} of the file).
    """
    at = batch.pos - shift + BATCH_HEADER
    return sizes_struct(batch.count).unpack_from(data, at), at + 4 * batch.count


def records(data, batch: Batch, shift: int = 0):
    """C{(offset, start, end)} of each record of C{batch}, as positions in C{data}."""
    sizes, at = record_sizes(data, batch, shift)
    offset = batch.first
    for size in sizes:
        yield offset, at, at + size
        at += size
        offset += 1


def key_of(data, body: int) -> bytes:
    """The key of the record whose body starts at C{body} (b"" when none)."""
    (n,) = u16.unpack_from(data, body + 16)
    return bytes(data[body + 18 : body + 18 + n])


# -- the index of a closed segment ----------------------------------------------

index_header = struct.Struct(">4sHHQQQQQQQI")
index_entry = struct.Struct(">QQQQQ")
NO_OFFSET = (1 << 64) - 1


def encode_index(size: int, count: int, record_bytes: int, first: Optional[int], end: int,
                 first_ts: int, last_ts: int, entries) -> bytes:
    """
    A segment's summary and sparse index: C{entries} are
    C{(offset, position, timestamp, count before, record bytes before)} of
    the batches that start an index block.
    """
    parts = [index_header.pack(INDEX_MAGIC, FORMAT, 0, size, count, record_bytes,
                               NO_OFFSET if first is None else first, end, first_ts, last_ts, len(entries))]
    parts.extend(index_entry.pack(*entry) for entry in entries)
    body = b"".join(parts)
    return body + u32.pack(crc(body))


def decode_index(data: bytes):
    """C{(size, count, record_bytes, first, end, first_ts, last_ts, entries)}, or None if not valid."""
    if len(data) < index_header.size + 4 or crc(data[:-4]) != u32.unpack_from(data, len(data) - 4)[0]:
        return None
    magic, version, _, size, count, record_bytes, first, end, first_ts, last_ts, n = index_header.unpack_from(data)
    if magic != INDEX_MAGIC or version != FORMAT or len(data) != index_header.size + n * index_entry.size + 4:
        return None
    entries = [index_entry.unpack_from(data, index_header.size + i * index_entry.size) for i in range(n)]
    return size, count, record_bytes, (None if first == NO_OFFSET else first), end, first_ts, last_ts, entries


# -- release 0.1.0's segments ----------------------------------------------------------

_v1_record = struct.Struct(">II")


def is_v1(head: bytes) -> bool:
    """Does a segment starting with C{head} come from release 0.1.0 (no magic)?"""
    return bool(head) and not head.startswith(SEGMENT_MAGIC)


def v1_frames(data: bytes) -> Tuple[List[bytes], int]:
    """
    The frames of a 0.1.0 segment (C{u32 length, u32 crc32(frame), frame}
    records), and the byte where the valid ones end.
    """
    frames = []
    at = 0
    end = len(data)
    while end - at >= 8:
        length, checksum = _v1_record.unpack_from(data, at)
        if at + 8 + length > end:
            break
        frame = data[at + 8 : at + 8 + length]
        if crc(frame) != checksum:
            break
        frames.append(frame)
        at += 8 + length
    return frames, at
