"""
The authentication limiter under a spray of bad tokens.

Starts a real broker with C{--auth} (a credentials file with a real scrypt
hash, the cost the broker pays per check), then:

  1. times valid HELLOs from 127.0.0.1 on a quiet broker;
  2. sends 12 valid HELLOs at once from one address (127.0.0.70) and counts
     how many were accepted;
  3. sprays bad HELLOs (default 240, from 60 source addresses 127.0.0.2 ..
     127.0.0.61, 4 each: under the 5-a-minute per-address limit, so every
     one costs a scrypt check unless the broker bounds the work), and
     meanwhile times valid HELLOs from 127.0.0.1, one after another.

Prints figures; asserts nothing.  Loopback addresses only (Linux routes all
of 127.0.0.0/8 to lo).  To measure another checkout's broker (this script
uses only APIs that the code before the limiter's rework had)::

    python benchmarks/auth_spray.py
    git worktree add /tmp/auth-base HEAD
    PYTHONPATH=/tmp/auth-base python benchmarks/auth_spray.py
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
# Appended, not inserted: a PYTHONPATH pointing at another checkout wins.
sys.path.append(os.path.dirname(HERE))

import zaichik  # noqa: E402
from zaichik import codec  # noqa: E402
from zaichik.auth import hash_secret  # noqa: E402
from zaichik.testing import BrokerProcess  # noqa: E402

SECRET = "bench-secret"
TOKEN = f"bench:{SECRET}"


def hello_socket(port: int, source: str, token: str) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(codec.frame(codec.Hello(1, "", token).encode()))
    return s


def read_reply(s: socket.socket) -> Optional[object]:
    data = b""
    while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
        chunk = s.recv(65536)
        if not chunk:
            return None
        data += chunk
    return codec.decode_reply(data[4 : 4 + int.from_bytes(data[:4], "big")])


def describe(reply) -> str:
    if reply is None:
        return "closed without a reply"
    if isinstance(reply, codec.Ok):
        return "OK"
    try:
        code = codec.ErrorCode(reply.code).name
    except ValueError:
        code = str(reply.code)
    return f"{code} {reply.message!r}"


def timed_hello(port: int, source: str = "127.0.0.1", token: str = TOKEN) -> Tuple[float, str]:
    start = time.perf_counter()
    with hello_socket(port, source, token) as s:
        reply = read_reply(s)
    return time.perf_counter() - start, describe(reply)


def figures(latencies: List[float]) -> str:
    if not latencies:
        return "none"
    ms = [x * 1000 for x in latencies]
    return f"n={len(ms)} median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms"


def at_once(port: int, sources: List[str], tokens: List[str]) -> Tuple[float, dict]:
    """Open one connection a (source, token), all HELLOs sent before any reply is read."""
    start = time.perf_counter()
    sel = selectors.DefaultSelector()
    sockets = []
    for source, token in zip(sources, tokens):
        s = hello_socket(port, source, token)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, bytearray())
        sockets.append(s)
    outcomes: dict = {}
    left = len(sockets)
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            s, buf = key.fileobj, key.data
            try:
                chunk = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            buf += chunk
            n = int.from_bytes(buf[:4], "big") if len(buf) >= 4 else -1
            if chunk and (n < 0 or len(buf) < 4 + n):
                continue
            reply = codec.decode_reply(bytes(buf[4 : 4 + n])) if chunk else None
            what = describe(reply)
            outcomes[what] = outcomes.get(what, 0) + 1
            sel.unregister(s)
            left -= 1
    if left:
        outcomes["no reply within 60 s"] = left
    for s in sockets:
        s.close()
    sel.close()
    return time.perf_counter() - start, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addresses", type=int, default=60, help="spraying source addresses (at most 60)")
    parser.add_argument("--per-address", type=int, default=4, help="bad HELLOs from each")
    args = parser.parse_args()
    addresses = [f"127.0.0.{x}" for x in range(2, 2 + min(args.addresses, 60))]

    print(f"zaichik from {os.path.dirname(zaichik.__file__)}")
    directory = tempfile.mkdtemp(prefix="zaichik-auth-spray-")
    path = os.path.join(directory, "credentials")
    with open(path, "w") as f:
        f.write(f"bench {hash_secret(SECRET)} publish=# subscribe=# create=#\n")
    broker = BrokerProcess("--auth", path)
    broker.start()
    try:
        port = broker.port
        timed_hello(port)  # warm up (imports, the thread pool)
        quiet = [timed_hello(port) for _ in range(20)]
        assert all(what == "OK" for _, what in quiet), quiet
        print(f"quiet broker, valid HELLO from 127.0.0.1: {figures([t for t, _ in quiet])}")

        took, outcomes = at_once(port, ["127.0.0.70"] * 12, [TOKEN] * 12)
        print(f"12 valid HELLOs at once from 127.0.0.70 ({took:.2f} s): {outcomes}")

        total = len(addresses) * args.per_address
        sources = [a for _ in range(args.per_address) for a in addresses]
        tokens = [f"bench:wrong-{i}" for i in range(total)]
        result: dict = {}
        spray = threading.Thread(target=lambda: result.update(zip(("took", "outcomes"),
                                                                  at_once(port, sources, tokens))))
        spray.start()
        during: List[float] = []
        refused: dict = {}
        deadline = time.monotonic() + 120
        time.sleep(0.05)  # let the spray's HELLOs arrive first
        while spray.is_alive() and time.monotonic() < deadline:
            latency, what = timed_hello(port)
            if what == "OK":
                during.append(latency)
            else:
                refused[what] = refused.get(what, 0) + 1
            time.sleep(0.02)
        spray.join(120)
        print(f"spray: {total} bad HELLOs from {len(addresses)} addresses, all answered in "
              f"{result.get('took', float('nan')):.2f} s: {result.get('outcomes')}")
        print(f"valid HELLOs from 127.0.0.1 during the spray: {figures(during)}"
              + (f"; refused: {refused}" if refused else ""))
        if during:
            print(f"  first {during[0] * 1000:.0f} ms; each in order (ms): "
                  + " ".join(f"{x * 1000:.0f}" for x in during[:40]) + (" ..." if len(during) > 40 else ""))
        after = [timed_hello(port) for _ in range(10)]
        print(f"after the spray, valid HELLO from 127.0.0.1: {figures([t for t, w in after if w == 'OK'])}")
    finally:
        code = broker.stop()
        print(f"broker stopped (exit {code})")
        broker.cleanup()
        os.unlink(path)
        os.rmdir(directory)


if __name__ == "__main__":
    main()
