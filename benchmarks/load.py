"""
Many clients at once: N connections on loopback, each subscribing to one of
T topics and publishing sequence-numbered messages to it, for a bounded
time.  Every subscriber checks that it receives every message of its topic,
each sender's in order without gaps; the broker's peak RSS is measured.

    python benchmarks/load.py                       # 1,000 connections, 100 topics, 20 s
    python benchmarks/load.py --connections 200 --seconds 3

Exits 1 if anything was lost.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zaichik import codec  # noqa: E402
from zaichik.testing import BrokerProcess  # noqa: E402

_u32 = struct.Struct(">I")
_seq = struct.Struct(">II")  # sender id, sequence number


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Client:
    def __init__(self, index: int, port: int, topic: str) -> None:
        self.index = index
        self.topic = topic
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.out = bytearray()
        self.sent = 0
        self.received = 0
        self.last_seq: Dict[int, int] = {}
        self.gaps = 0
        self.subscribed = False

    def publish_frame(self) -> bytes:
        value = _seq.pack(self.index, self.sent) + b"p" * 92
        self.sent += 1
        return codec.frame(codec.Publish(0, self.topic, value).encode())

    def parse(self) -> None:
        buf = self.buffer
        at = 0
        while len(buf) - at >= 4:
            (n,) = _u32.unpack_from(buf, at)
            if len(buf) - at - 4 < n:
                break
            body = bytes(buf[at + 4 : at + 4 + n])
            at += 4 + n
            reply = codec.decode_reply(body)
            if type(reply) is codec.Message:
                sender, seq = _seq.unpack_from(reply.value)
                expected = self.last_seq.get(sender, -1) + 1
                if seq != expected:
                    self.gaps += 1
                self.last_seq[sender] = seq
                self.received += 1
            elif type(reply) is codec.Ok:
                self.subscribed = True
            else:
                raise RuntimeError(f"client {self.index}: unexpected {reply!r}")
        del buf[:at]


def read_ready(sel, timeout: float) -> None:
    """Read and parse whatever the clients' sockets have, waiting up to C{timeout}."""
    for key, _ in sel.select(timeout):
        c = key.data
        try:
            data = c.sock.recv(1 << 16)
        except BlockingIOError:
            continue
        c.buffer += data
        c.parse()


def run(connections: int, topics: int, seconds: float, rate: float) -> dict:
    broker = BrokerProcess("--max-connections", str(connections + 100),
                           "--max-connections-per-address", str(connections + 100)).start()
    try:
        clients: List[Client] = [Client(i, broker.port, f"load{i % topics:03d}") for i in range(connections)]
        sel = selectors.DefaultSelector()
        for c in clients:
            c.sock.sendall(codec.frame(codec.Subscribe(1, c.topic, codec.Start.LATEST).encode()))
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ, c)
        # Wait until every subscription is acknowledged, so nothing published
        # before a subscriber joined is counted as lost.
        deadline = time.monotonic() + 30
        while not all(c.subscribed for c in clients) and time.monotonic() < deadline:
            for key, _ in sel.select(0.1):
                c = key.data
                c.buffer += c.sock.recv(1 << 16)
                c.parse()
        start = time.monotonic()
        interval = 1.0 / rate
        next_round = start
        rounds = 0
        while True:
            now = time.monotonic()
            if now >= start + seconds:
                break
            if now >= next_round:
                for c in clients:
                    c.sock.send(c.publish_frame())  # 106 bytes: always fits the socket buffer
                rounds += 1
                next_round += interval
            read_ready(sel, max(0.0, min(next_round, start + seconds) - time.monotonic()))
        published = {t: 0 for t in {c.topic for c in clients}}
        for c in clients:
            published[c.topic] += c.sent
        expected = sum(published[c.topic] for c in clients)
        # Drain what is still on its way.
        deadline = time.monotonic() + 30
        while sum(c.received for c in clients) < expected and time.monotonic() < deadline:
            read_ready(sel, 0.2)
        elapsed = time.monotonic() - start
        received = sum(c.received for c in clients)
        result = {
            "connections": connections,
            "topics": topics,
            "seconds": seconds,
            "published": sum(published.values()),
            "expected deliveries": expected,
            "delivered": received,
            "lost": expected - received,
            "out-of-order or gaps": sum(c.gaps for c in clients),
            "deliveries/s": received / elapsed,
            "broker peak RSS MB": peak_rss_mb(broker.process.pid),
        }
        for c in clients:
            c.sock.close()
        return result
    finally:
        broker.cleanup()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--topics", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rate", type=float, default=5, help="messages/s each connection publishes")
    args = parser.parse_args(argv)
    result = run(args.connections, args.topics, args.seconds, args.rate)
    for name, value in result.items():
        print(f"{name:24} {value:,.1f}" if isinstance(value, float) else f"{name:24} {value:,}")
    return 1 if result["lost"] or result["out-of-order or gaps"] else 0


if __name__ == "__main__":
    sys.exit(main())
