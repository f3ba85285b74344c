"""
The Redis engine's figures, in one run: a publisher on node A and a
subscriber on node B (two brokers on one redis-server), beside one broker
alone and beside Redis pub/sub alone; throughput (100-byte messages,
fire-and-forget) and latency at 5,000 msgs/s; and 2 nodes x 2 publishers
against one node with the same two publishers.

    python benchmarks/scale_out.py            # the full run
    python benchmarks/scale_out.py --quick    # a short run, as CI does

The load generator is bench.py's (raw sockets, pipelined writes, a
monotonic-clock stamp in each payload for latency).  Targets (issue 11):
cross-node >= 0.5x one node, p99 <= 2 ms at 5,000 msgs/s, two nodes' aggregate
above one node's.  On this 2-core machine the brokers, Redis and the load
generator share the cores: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.bench import (  # noqa: E402
    PAYLOAD,
    Redis,
    Row,
    ZaichikWire,
    _connect,
    _percentile,
    _request,
    fmt_table,
    publisher_main,
    subscriber_main,
)
from zaichik import codec  # noqa: E402
from zaichik.testing import BrokerProcess, RedisServer, have_redis  # noqa: E402


class Node:
    """A broker, alone or on an engine."""

    # As bench.py's: a subscriber that falls behind holds its publisher
    # back (--slow-consumer block) rather than being dropped; with
    # 5,000,000 messages a run the default (disconnect) dropped the
    # subscribers of "2 publishers, 2 topics" on two nodes (the machine's
    # two cores shared by two brokers, Redis and four generator processes).
    POLICY = ("--slow-consumer", "block")

    def __init__(self, *options: str, reactor: str = "") -> None:
        self.broker = BrokerProcess(*self.POLICY, *options,
                                    twistd_options=["-r", reactor] if reactor else []).start()
        self.port = self.broker.port
        self.pid = self.broker.process.pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.broker.cleanup()


def run(name: str, server: str, pairs, count: int, rate: int = 0, wire_factory=lambda n: ZaichikWire(),
        cpu_of=()) -> Row:
    """
    C{pairs}: (publisher port, subscriber port, topic) each; one publisher
    and one subscriber process per pair, all at once.  The row's rate is
    the sum of the pairs' rates.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    subs, pubs = [], []
    for _, sub_port, topic in pairs:
        recv, send = ctx.Pipe(False)
        p = ctx.Process(target=subscriber_main, args=(sub_port, [topic], 1, count, wire_factory(len(topic)),
                                                      bool(rate), send, results, 120))
        p.start()
        recv.recv()
        subs.append(p)
    time.sleep(0.2)  # (the subscription reaches every node)
    cpu0 = sum(n.cpu_seconds() for n in cpu_of)
    done = ctx.Event()
    for pub_port, _, topic in pairs:
        p = ctx.Process(target=publisher_main, args=(pub_port, [topic], count, "fire", 100, rate, False,
                                                     wire_factory(len(topic)), results, PAYLOAD, done))
        p.start()
        pubs.append(p)
    try:
        got = [results.get(timeout=180) for _ in range(2 * len(pairs))]
    finally:
        done.set()
    for p in pubs + subs:
        p.join()
    starts = [r["start"] for r in got if "start" in r]
    received = [r for r in got if "received" in r]
    last = max(r["last"] for r in received)
    elapsed = (last - min(starts)) / 1e9 if last else 0
    total = sum(r["received"] for r in received)
    latencies = [x for r in received for x in r["latencies"]]
    return Row(name, server, rate=total / elapsed if elapsed > 0 else 0.0, received=total,
               expected=count * len(pairs), p50=_percentile(latencies, 0.5), p99=_percentile(latencies, 0.99),
               p999=_percentile(latencies, 0.999), cpu=sum(n.cpu_seconds() for n in cpu_of) - cpu0,
               gen_cpu=sum(r["cpu"] for r in got))


def create(port: int, topic: str) -> None:
    s = _connect(port)
    _request(s, codec.CreateTopic(1, topic, 0, 0))
    s.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    if not have_redis():
        print("redis-server is not on PATH: nothing to measure")
        return 0
    # (5,000,000: one broker alone forwards ten million messages a second or
    # so, and 500,000 took 0.05 s, which the start and end of a run weighed
    # on; bench.py's steady scenarios are as long.)
    n = 50_000 if args.quick else int(os.environ.get("ZN", 5_000_000))
    seconds = 2 if args.quick else 5
    t0 = time.monotonic()
    rows: List[Row] = []

    # One broker alone (the reference: ratio 1.00).
    node = Node()
    try:
        rows.append(run("1->1", "one node", [(node.port, node.port, "t1")], n, cpu_of=[node]))
    finally:
        node.stop()
    # What a Redis client that needs the asyncio reactor (redis-py's) would
    # cost the whole broker: the same broker on Twisted's asyncio reactor.
    node = Node(reactor="asyncio")
    try:
        rows.append(run("1->1", "asyncio", [(node.port, node.port, "t1")], n, cpu_of=[node]))
    finally:
        node.stop()
    node = Node()
    try:
        rows.append(run("latency @ 5,000/s", "one node", [(node.port, node.port, "t2")], 5_000 * seconds,
                        rate=5_000, cpu_of=[node]))
        rows.append(run("2 publishers, 2 topics", "one node",
                        [(node.port, node.port, "t3"), (node.port, node.port, "t4")], n, cpu_of=[node]))
    finally:
        node.stop()

    # Two brokers on one Redis.
    # (As docs/scale-out.rst says: a broker's pub/sub connection carries the
    # batches, and Redis' default limit would drop it when it falls behind.)
    redis = RedisServer(options=["--client-output-buffer-limit", "pubsub 0 0 0"]).start()
    a = Node("--engine", redis.url)
    b = Node("--engine", redis.url)
    try:
        for topic in ("x1", "x2", "x3", "x4"):
            create(a.port, topic)
        rows.append(run("1->1", "A->B", [(a.port, b.port, "x1")], n, cpu_of=[a, b]))
        rows.append(run("latency @ 5,000/s", "A->B", [(a.port, b.port, "x2")], 5_000 * seconds, rate=5_000,
                        cpu_of=[a, b]))
        rows.append(run("2 publishers, 2 topics", "2 nodes",
                        [(a.port, a.port, "x3"), (b.port, b.port, "x4")], n, cpu_of=[a, b]))
    finally:
        a.stop()
        b.stop()
        redis.cleanup()

    # Redis pub/sub alone.
    peer = Redis()
    try:
        rows.append(run("1->1", "redis", [(peer.port, peer.port, "r1")], n, wire_factory=Redis.wire,
                        cpu_of=[peer]))
        rows.append(run("latency @ 5,000/s", "redis", [(peer.port, peer.port, "r2")], 5_000 * seconds,
                        rate=5_000, wire_factory=Redis.wire, cpu_of=[peer]))
    finally:
        peer.stop()

    for row in rows:
        if row.server == "one node":
            row.server = "baseline"  # (fmt_table's reference row for ratios)
    print()
    print(f"zaichik scale-out benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} cores; "
          f"ratio = row / one node alone in this run (the 'baseline' rows); 100-byte values")
    print(fmt_table(rows).replace("baseline ", "one node "))
    cross = {r.scenario: r for r in rows if r.server in ("A->B", "2 nodes")}
    single = {r.scenario: r for r in rows if r.server == "baseline"}
    ratio = cross["1->1"].rate / single["1->1"].rate if single["1->1"].rate else 0
    print(f"cross-node 1->1: {ratio:.2f}x one node (target >= 0.5); "
          f"p99 at 5,000/s across nodes {cross['latency @ 5,000/s'].p99:.2f} ms (target <= 2); "
          f"2 nodes x 2 publishers {cross['2 publishers, 2 topics'].rate:,.0f} vs one node "
          f"{single['2 publishers, 2 topics'].rate:,.0f} msgs/s")
    print(f"total time {time.monotonic() - t0:.0f} s")
    lost = sum(r.expected - r.received for r in rows)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
