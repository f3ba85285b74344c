"""
WebSocket beside TCP, on one broker in one run: 1 -> 1 publish-to-subscriber
throughput (pipelined PUBLISH with rid 0, 100-byte payloads) and latency at
a paced 5,000 msgs/s (p50, p99).  The load generator is Python on raw
sockets: a WebSocket client (zaichik.testing.WebSocketClient: the handshake,
masked frames out) for the WebSocket side, length-prefixed frames for TCP.

    python benchmarks/websocket.py            # the full run (about a minute)
    python benchmarks/websocket.py --quick    # a short run, as CI does (it checks that it runs)

The publisher is a process of its own; the subscriber counts messages by
bytes (every message of a run has the same size) and reads the send stamp
(time.monotonic_ns, in the first 8 bytes of each payload) for latency.
Figures are from one machine at one time: compare the ratio, not absolutes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import struct
import sys
import time
from typing import List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zaichik import codec  # noqa: E402
from zaichik.edge.websocket import BINARY, encode_frame  # noqa: E402
from zaichik.testing import BrokerProcess, WebSocketClient  # noqa: E402

PAYLOAD = 100
TOPIC = "bench"
RATE = 5_000
_q = struct.Struct(">Q")


def _payload(stamp: int = 0) -> bytes:
    return _q.pack(stamp) + b"x" * (PAYLOAD - 8)


def _tcp(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Side:
    """How one transport frames what the load generator sends and reads."""

    name = ""

    def __init__(self, port: int) -> None:
        self.port = port

    def publisher(self) -> Tuple[socket.socket, "callable"]:
        raise NotImplementedError

    def subscribe(self) -> Tuple[socket.socket, bytes]:
        """A subscribed socket, and what it has read past the reply."""
        raise NotImplementedError

    def message_size(self) -> int:
        raise NotImplementedError


class Tcp(Side):
    name = "tcp"

    def publisher(self):
        return _tcp(self.port), lambda body: codec.frame(body)

    def subscribe(self):
        s = _tcp(self.port)
        s.sendall(codec.frame(codec.Subscribe(1, TOPIC, codec.Start.LATEST).encode()))
        data = b""
        while len(data) < 9:
            data += s.recv(4096)
        return s, data[9:]  # OK: 4-byte length + opcode + rid

    def message_size(self) -> int:
        return 4 + len(codec.Message(TOPIC, 0, 0, _payload(), None).encode())


class WebSocket(Side):
    name = "websocket"

    def publisher(self):
        client = WebSocketClient(self.port)
        mask = client.mask
        return client.sock, lambda body: encode_frame(BINARY, body, mask)

    def subscribe(self):
        client = WebSocketClient(self.port)
        client.send(codec.Subscribe(1, TOPIC, codec.Start.LATEST))
        data = client.buffer
        while len(data) < 7:
            data += client.sock.recv(4096)
        return client.sock, data[7:]  # OK: 2-byte header + opcode + rid

    def message_size(self) -> int:
        return len(encode_frame(BINARY, codec.Message(TOPIC, 0, 0, _payload(), None).encode()))


def _publish_flood(side: Side, count: int, batch: int) -> None:
    s, frame = side.publisher()
    chunk = b"".join(frame(codec.Publish(0, TOPIC, _payload()).encode()) for _ in range(batch))
    for _ in range(count // batch):
        s.sendall(chunk)
    s.close()


def _publish_paced(side: Side, seconds: float, total) -> None:
    s, frame = side.publisher()
    start = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        due = int((now - start) * RATE)
        while sent < due:
            s.sendall(frame(codec.Publish(0, TOPIC, _payload(time.monotonic_ns())).encode()))
            sent += 1
        time.sleep(0.0005)
    total.value = sent
    s.close()


def throughput(side: Side, count: int) -> float:
    sub, rest = side.subscribe()
    size = side.message_size()
    publisher = multiprocessing.Process(target=_publish_flood, args=(side, count, 500))
    publisher.start()
    got = len(rest)
    want = count * size
    first = None
    sub.settimeout(30)
    while got < want:
        data = sub.recv(1 << 20)
        if not data:
            raise ConnectionError("subscriber closed")
        if first is None:
            first = time.monotonic()
        got += len(data)
    elapsed = time.monotonic() - (first or time.monotonic())
    publisher.join()
    sub.close()
    return count / max(elapsed, 1e-9)


def latency(side: Side, seconds: float) -> Tuple[int, float, float]:
    """Messages sent and not received, p50 and p99 (ms)."""
    sub, data = side.subscribe()
    size = side.message_size()
    total = multiprocessing.Value("q", -1)
    publisher = multiprocessing.Process(target=_publish_paced, args=(side, seconds, total))
    publisher.start()
    samples: List[int] = []
    sub.settimeout(2 + seconds)
    stamp_at = size - PAYLOAD
    deadline = time.monotonic() + seconds + 2
    while time.monotonic() < deadline:
        while len(data) >= size:
            now = time.monotonic_ns()
            samples.append(now - _q.unpack_from(data, stamp_at)[0])
            data = data[size:]
        if total.value >= 0 and len(samples) >= total.value:
            break
        try:
            chunk = sub.recv(1 << 16)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
    publisher.join()
    sub.close()
    samples.sort()
    if not samples:
        raise RuntimeError(f"{side.name}: no message arrived")
    return total.value - len(samples), samples[len(samples) // 2] / 1e6, samples[int(len(samples) * 0.99)] / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI: it must run, not be fast)")
    args = parser.parse_args()
    # (5,000,000: at ten million messages a second or so, 500,000 took
    # 0.05 s, which the start and end of a run weighed on; bench.py's
    # steady scenarios are as long.)
    count = 50_000 if args.quick else 5_000_000
    seconds = 2.0 if args.quick else 10.0
    runs = 1 if args.quick else 3
    # As bench.py: a subscriber that falls behind holds the publisher back
    # (--slow-consumer block) rather than being dropped (the default policy
    # dropped the WebSocket subscriber once runs were long enough).
    broker = BrokerProcess("--slow-consumer", "block", websocket=True).start()
    try:
        sides = [Tcp(broker.port), WebSocket(broker.websocket_port)]
        rates = {}
        failed = False
        print(f"{'scenario':32} {'transport':10} {'msgs/s':>12} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8}")
        for side in sides:
            # The best of a few runs: a shared machine's other load only slows a run down.
            rates[side.name] = max(throughput(side, count) for _ in range(runs))
        for side in sides:
            ratio = rates[side.name] / rates["tcp"]
            print(f"{'1->1 PUBLISH, 100 B':32} {side.name:10} {rates[side.name]:12,.0f} {ratio:6.2f}")
        for side in sides:
            lost, p50, p99 = latency(side, seconds)
            print(f"{f'latency @ {RATE:,}/s':32} {side.name:10} {RATE:12,} {'':>6} {p50:8.2f} {p99:8.2f}"
                  + (f"  ({lost} NOT RECEIVED)" if lost else ""))
            if lost:
                failed = True
    finally:
        broker.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
