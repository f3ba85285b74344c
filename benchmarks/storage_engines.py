"""
The figures behind the choice of storage engine: the broker's own write and
read pattern (append 100-byte messages in batches, each batch made durable;
read everything back at start) on a hand-written segment log, on SQLite in
WAL mode, and on LMDB when the lmdb package is installed.

The segment log here models release 0.1.0's layout (``u32 length, u32
crc32, frame`` records, one after the other), the one that was measured
when the engine was chosen; the broker's log (``zaichik.storage.disk``) has
since moved to format 2, checksummed batches with a header (see
``docs/storage.rst``): one CRC for each batch of messages rather than one
for each message.

    python benchmarks/storage_engines.py              # 200,000 messages, batches of 500
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zaichik import codec  # noqa: E402

PREFIX = codec.topic_prefix("engine")


def frames(count: int):
    return [codec.message_frame(PREFIX, i, 1_700_000_000_000 + i, None, b"e" * 100) for i in range(count)]


def segment_log(directory: str, data, batch: int):
    path = os.path.join(directory, "0.seg")
    record = struct.Struct(">II")
    t0 = time.monotonic()
    with open(path, "ab", buffering=1 << 20) as f:
        for i in range(0, len(data), batch):
            for frame in data[i : i + batch]:
                f.write(record.pack(len(frame), zlib.crc32(frame)) + frame)
            f.flush()
            os.fsync(f.fileno())
    write = time.monotonic() - t0
    t0 = time.monotonic()
    with open(path, "rb") as f:
        blob = f.read()
    at, out = 0, []
    while at < len(blob):
        n, crc = record.unpack_from(blob, at)
        frame = blob[at + 8 : at + 8 + n]
        if zlib.crc32(frame) != crc:
            break
        out.append(frame)
        at += 8 + n
    read = time.monotonic() - t0
    return write, read, len(out), os.path.getsize(path)


def sqlite_wal(directory: str, data, batch: int):
    path = os.path.join(directory, "db.sqlite")
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE m (offset INTEGER PRIMARY KEY, ts INTEGER, frame BLOB)")
    t0 = time.monotonic()
    for i in range(0, len(data), batch):
        with db:
            db.executemany("INSERT INTO m VALUES (?, ?, ?)",
                           ((i + j, 0, frame) for j, frame in enumerate(data[i : i + batch])))
    write = time.monotonic() - t0
    db.close()
    t0 = time.monotonic()
    db = sqlite3.connect(path)
    out = [row[0] for row in db.execute("SELECT frame FROM m ORDER BY offset")]
    read = time.monotonic() - t0
    db.close()
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return write, read, len(out), size


def lmdb_store(directory: str, data, batch: int):
    import lmdb

    env = lmdb.open(directory, map_size=1 << 32, sync=True)
    key = struct.Struct(">Q")
    t0 = time.monotonic()
    for i in range(0, len(data), batch):
        with env.begin(write=True) as txn:
            for j, frame in enumerate(data[i : i + batch]):
                txn.put(key.pack(i + j), frame, append=True)
    write = time.monotonic() - t0
    env.close()
    t0 = time.monotonic()
    env = lmdb.open(directory, map_size=1 << 32, readonly=True)
    with env.begin() as txn:
        out = [bytes(v) for _, v in txn.cursor()]
    read = time.monotonic() - t0
    env.close()
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return write, read, len(out), size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args(argv)
    data = frames(args.messages)
    engines = [("segment log", segment_log), ("SQLite WAL", sqlite_wal)]
    try:
        import lmdb  # noqa: F401

        engines.append(("LMDB", lmdb_store))
    except ImportError:
        print("(lmdb not installed: pip install lmdb to include it)")
    print(f"{args.messages:,} 100-byte messages, durable every {args.batch} (fsync or synchronous commit):")
    for name, engine in engines:
        directory = tempfile.mkdtemp(prefix="zaichik-engine-")
        try:
            write, read, count, size = engine(directory, data, args.batch)
        finally:
            shutil.rmtree(directory, True)
        print(f"  {name:12} write {args.messages / write:>10,.0f} msgs/s   read back all {count:,} in "
              f"{read:.2f} s   {size / 2**20:.1f} MiB on disk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
