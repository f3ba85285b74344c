"""
A subscriber that stops reading while a publisher streams: the broker's
memory must stay under --max-output-buffer plus a small constant, the slow
subscriber must be told LIMIT "slow consumer" and closed (aborted if it
still reads nothing after the close grace), and a second
(fast) subscriber must receive everything.

    python benchmarks/slow_consumer.py                 # 30 s of streaming
    python benchmarks/slow_consumer.py --seconds 5

Prints the broker's RSS before, its peak, and what each client saw.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zaichik import codec  # noqa: E402
from zaichik.testing import BrokerProcess  # noqa: E402

MB = 1024 * 1024
_u32 = struct.Struct(">I")


def rss(pid: int, field: str = "VmRSS:") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return 0.0


def subscribe(port: int, rcvbuf: int = 0) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(codec.frame(codec.Subscribe(1, "stream", codec.Start.LATEST).encode()))
    assert s.recv(9) == codec.frame(codec.Ok(1).encode())
    return s


def run(seconds: float, max_output_buffer: int) -> dict:
    broker = BrokerProcess("--max-output-buffer", str(max_output_buffer)).start()
    pid = broker.process.pid
    try:
        slow = subscribe(broker.port, rcvbuf=4096)
        fast = subscribe(broker.port)
        fast_count = [0]

        def read_fast() -> None:
            size = 0
            while True:
                data = fast.recv(1 << 20)
                if not data:
                    return
                size += len(data)
                fast_count[0] = size

        reader = threading.Thread(target=read_fast, daemon=True)
        reader.start()
        publisher = socket.create_connection(("127.0.0.1", broker.port))
        frame = codec.frame(codec.Publish(0, "stream", b"s" * 100).encode())
        chunk = frame * 1000
        before = rss(pid)
        peak = before
        sent = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            publisher.sendall(chunk)
            sent += 1000
            peak = max(peak, rss(pid))
            time.sleep(0.002)  # about 400k messages/s offered: a busy broker
        publisher.sendall(codec.frame(codec.Ping(9).encode()))
        publisher.settimeout(10)
        pong = publisher.recv(9)
        time.sleep(0.5)
        peak = max(peak, rss(pid))
        # What did the slow subscriber get in the end?  Read it all now.
        slow.settimeout(15)
        tail = b""
        total = 0
        closed = False
        while True:
            try:
                data = slow.recv(1 << 20)
            except socket.timeout:
                break
            except ConnectionResetError:
                # Past the close grace the broker aborts a connection that
                # still does not read (dropping what it had buffered).
                closed = True
                break
            if not data:
                closed = True
                break
            total += len(data)
            tail = (tail + data)[-200:]
        message_size = len(codec.frame(codec.Message("stream", 0, 0, b"s" * 100).encode()))
        error = codec.frame(codec.Error(0, codec.ErrorCode.LIMIT, "slow consumer").encode())
        return {
            "seconds": seconds,
            "messages published": sent,
            "max-output-buffer MB": max_output_buffer / MB,
            "broker RSS before MB": before,
            "broker peak RSS MB": max(peak, rss(pid, "VmHWM:")),
            "peak over before MB": max(peak, rss(pid, "VmHWM:")) - before,
            "slow subscriber closed by the broker": closed,
            "slow subscriber got LIMIT slow consumer": tail.endswith(error),
            "slow subscriber messages before close": (total - len(error)) // message_size,
            "fast subscriber messages": fast_count[0] // message_size,
            "publisher still served": pong == codec.frame(codec.Ok(9).encode()),
        }
    finally:
        broker.cleanup()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-output-buffer", type=int, default=16 * MB)
    args = parser.parse_args(argv)
    result = run(args.seconds, args.max_output_buffer)
    for name, value in result.items():
        print(f"{name:42} {value:,.1f}" if isinstance(value, float) else f"{name:42} {value}")
    ok = (result["slow subscriber closed by the broker"] and result["publisher still served"]
          and result["fast subscriber messages"] == result["messages published"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
