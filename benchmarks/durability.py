"""
Durable storage figures, side by side from one run: acknowledged publish
throughput in memory and with --data-dir under each --fsync policy, and the
time a broker with N retained 100-byte messages takes to restart and serve.

    python benchmarks/durability.py                   # 200,000 publishes, 1,000,000 retained
    python benchmarks/durability.py --publishes 50000 --retained 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zaichik import codec  # noqa: E402
from zaichik.testing import BrokerProcess  # noqa: E402

PAYLOAD = b"d" * 100
REPLY = 18  # a PUBLISHED frame


def ping_probe(port: int, stop, rtts) -> None:
    """PING every 10 ms on a second connection: how long the reactor is held up."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ping = codec.frame(codec.Ping(7).encode())
    while not stop.is_set():
        t0 = time.monotonic()
        s.sendall(ping)
        got = 0
        while got < 9:
            got += len(s.recv(64))
        rtts.append(time.monotonic() - t0)
        time.sleep(0.01)
    s.close()


def acked_throughput(port: int, count: int, window: int = 1000) -> float:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(codec.frame(codec.CreateTopic(1, "durable", 3_600_000, 0).encode()))
    s.recv(9)
    frame = codec.frame(codec.Publish(1, "durable", PAYLOAD).encode())
    t0 = time.monotonic()
    s.sendall(frame * window)
    sent, acked, pending = window, 0, 0
    while acked < count:
        data = s.recv(1 << 20)
        pending += len(data)
        new, pending = divmod(pending, REPLY)
        acked += new
        more = min(new, count - sent)
        if more > 0:
            s.sendall(frame * more)
            sent += more
    elapsed = time.monotonic() - t0
    s.close()
    return count / elapsed


def load(port: int, count: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(codec.frame(codec.CreateTopic(1, "retained", 3_600_000, 0).encode()))
    s.recv(9)
    batch = codec.frame(codec.PublishBatch(1, "retained", [(None, PAYLOAD)] * 1000).encode())
    for _ in range(count // 1000):
        s.sendall(batch)
        want = 4 + 1 + 4 + 4 + 9 * 1000
        got = 0
        while got < want:
            got += len(s.recv(1 << 20))
    s.close()


def first_and_all(port: int, count: int):
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(codec.frame(codec.Subscribe(1, "retained", codec.Start.EARLIEST).encode()))
    size = len(codec.frame(codec.Message("retained", 0, 0, PAYLOAD).encode()))
    want, got, first = 9 + size * count, 0, None
    while got < want:
        data = s.recv(1 << 20)
        if not data:
            break
        got += len(data)
        if first is None and got >= 9 + size:
            first = time.monotonic() - t0
    s.close()
    return first, time.monotonic() - t0, (got - 9) // size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=200_000)
    parser.add_argument("--retained", type=int, default=1_000_000)
    args = parser.parse_args(argv)

    print(f"acknowledged publishes (1,000 in flight, 100-byte values), {args.publishes:,} each:")
    base = None
    for mode in ("memory", "never", "interval", "always"):
        data_dir = tempfile.mkdtemp(prefix="zaichik-bench-")
        options = () if mode == "memory" else ("--data-dir", data_dir, "--fsync", mode)
        broker = BrokerProcess(*options).start()
        stop, rtts = threading.Event(), []
        probe = threading.Thread(target=ping_probe, args=(broker.port, stop, rtts))
        try:
            probe.start()
            rate = acked_throughput(broker.port, args.publishes)
        finally:
            stop.set()
            probe.join()
            broker.cleanup()
            shutil.rmtree(data_dir, True)
        base = base or rate
        rtts.sort()
        label = "in memory" if mode == "memory" else f"--fsync {mode}"
        print(f"  {label:18} {rate:>10,.0f} msgs/s   {rate / base:.2f}x memory   "
              f"PING meanwhile: p50 {rtts[len(rtts) // 2] * 1000:.2f} ms, "
              f"p99 {rtts[int(len(rtts) * 0.99)] * 1000:.2f} ms, max {rtts[-1] * 1000:.2f} ms")

    data_dir = tempfile.mkdtemp(prefix="zaichik-bench-")
    try:
        broker = BrokerProcess("--data-dir", data_dir).start()
        t0 = time.monotonic()
        load(broker.port, args.retained)
        loaded = time.monotonic() - t0
        broker.stop()
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data_dir) for f in fs)
        t0 = time.monotonic()
        broker = BrokerProcess("--data-dir", data_dir).start()  # returns once it answers a PING
        serving = time.monotonic() - t0
        first, everything, received = first_and_all(broker.port, args.retained)
        with open(f"/proc/{broker.process.pid}/status") as f:
            rss = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))
        broker.cleanup()
        print(f"restart with {args.retained:,} retained 100-byte messages ({disk / 2**20:.0f} MiB on disk, "
              f"loaded in {loaded:.1f} s):")
        print(f"  process start to serving (answers PING)   {serving:.2f} s")
        print(f"  then subscriber's first message            {first:.3f} s")
        print(f"  then all {received:,} messages               {everything:.2f} s")
        print(f"  broker RSS after restart                   {rss} MB")
    finally:
        shutil.rmtree(data_dir, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
