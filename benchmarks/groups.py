"""
Consumer groups over real connections: how fast a group of 1, 2 and 4
members works through a queue, each member acknowledging each message
(ACK), against one plain subscriber committing each message (COMMIT); and
how evenly the group spreads the messages.  Twice: waiting for each answer
before taking the next message (as a worker that acknowledges a job once
done does), and pipelined (acknowledgements not awaited one by one).

    python benchmarks/groups.py              # about 15 s
    python benchmarks/groups.py --quick      # about 5 s

A broker (C{twistd zaichik}, in memory) runs in a subprocess; the members
are asyncio clients (L{zaichik.aio}, uvloop if installed), one connection
each, in this process.  The queue is a retained topic filled before the
consumers start, every consumer from the oldest message, a window
(C{max_inflight}) of 100 each.  Printed: messages processed per second, the
ratio to the plain subscriber, and the CPU the broker and the clients used
(of one core; on a machine with few cores they compete); then, per group
size, the messages each member got, the largest deviation from an equal share and the bound the
broker keeps (no member more than its share plus C{max_inflight}).  Figures
only: nothing is asserted but that every message was processed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from zaichik.aio import Start, connect  # noqa: E402
from zaichik.testing import BrokerProcess  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

PAYLOAD = b"x" * 100
WINDOW = 100


async def fill(server: str, messages: int) -> str:
    topic = f"queue-{uuid.uuid4().hex[:8]}"
    async with connect(server, keepalive=0) as client:
        await client.create_topic(topic, retention_ttl=3_600_000)
        for at in range(0, messages, 1000):
            await client.publish_batch(topic, [(None, PAYLOAD)] * min(1000, messages - at))
    return topic


async def consume(server: str, topic: str, messages: int, members: int,
                  pipelined: bool = False) -> Tuple[float, List[int]]:
    """
    Work through C{messages} of C{topic}: with a plain subscriber
    (C{members} 0) committing each, or a new group of C{members}
    acknowledging each, waiting for each answer before the next message
    (or, C{pipelined}, not).  Seconds from the first subscribe to the last
    answer, and how many messages each consumer processed.
    """
    clients = [await connect(server, keepalive=0) for _ in range(max(members, 1))]
    counts = [0] * len(clients)
    done = asyncio.Event()
    total = [0]
    group = f"g-{uuid.uuid4().hex[:8]}"

    answers: List[asyncio.Future] = []

    async def work(i: int, subscription) -> None:
        finish = subscription.ack if members else subscription.commit
        async for message in subscription:
            if pipelined:
                answers.append(asyncio.ensure_future(finish(message.offset)))
            else:
                await finish(message.offset)
            counts[i] += 1
            total[0] += 1
            if total[0] >= messages:
                done.set()

    started = time.perf_counter()
    tasks = []
    for i, client in enumerate(clients):
        if members:
            subscription = await client.subscribe_group(topic, group, start=Start.EARLIEST, max_inflight=WINDOW)
        else:
            subscription = await client.subscribe(topic, start=Start.EARLIEST, max_inflight=WINDOW)
        tasks.append(asyncio.ensure_future(work(i, subscription)))
    await asyncio.wait_for(done.wait(), 300)
    await asyncio.gather(*answers)
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for client in clients:
        await client.close()
    if sum(counts) != messages:
        raise RuntimeError(f"processed {sum(counts)} of {messages}")
    return elapsed, counts


def cpu_seconds(pid: Optional[int]) -> float:
    """User and system CPU seconds of process C{pid} so far (0 without one)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(server: str, messages: int, turns: int, broker_pid: Optional[int], pipelined: bool) -> None:
    sizes = (0, 1, 2, 4)
    rates: Dict[int, float] = {size: 0.0 for size in sizes}
    busy: Dict[int, Tuple[float, float]] = {}
    spreads: Dict[int, List[int]] = {}
    for _ in range(turns):
        # Turns over all sizes, best of each: the machine's noise falls on all alike.
        for size in sizes:
            topic = await fill(server, messages)
            broker_before, mine_before = cpu_seconds(broker_pid), time.process_time()
            elapsed, counts = await consume(server, topic, messages, size, pipelined)
            rate = messages / elapsed
            if rate > rates[size]:
                rates[size], spreads[size] = rate, counts
                busy[size] = ((cpu_seconds(broker_pid) - broker_before) / elapsed,
                              (time.process_time() - mine_before) / elapsed)
    plain = rates[0]

    def cpu(size: int) -> str:
        broker, clients = busy[size]
        return f"   CPU: broker {broker:.0%}, clients {clients:.0%}" if broker_pid else ""

    print("pipelined (each answer not awaited before the next message):" if pipelined else
          "each answer awaited before the next message (a worker):")
    print(f"  1 plain subscriber, COMMIT each:   {plain:>9,.0f} msgs/s{' ' * 21}{cpu(0)}")
    for size in sizes[1:]:
        print(f"  group of {size} member{'s' if size > 1 else ' '}, ACK each:     "
              f"{rates[size]:>9,.0f} msgs/s   ratio to plain {rates[size] / plain:.2f}{cpu(size)}")
    if pipelined:
        return
    print(f"  fair spread ({messages:,} messages; bound: share + max_inflight {WINDOW}):")
    for size in sizes[2:]:
        counts = spreads[size]
        share = messages / size
        deviation = max(abs(c - share) for c in counts)
        print(f"    {size} members: {', '.join(f'{c:,}' for c in counts)}   largest deviation "
              f"{deviation:,.0f} ({deviation / share:.1%} of a share)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    parser.add_argument("--messages", type=int, default=0, help="messages per run (default 20,000; quick 5,000)")
    parser.add_argument("--server", help="an already running broker (host:port), instead of a fresh one")
    args = parser.parse_args()
    messages = args.messages or (5_000 if args.quick else 20_000)
    turns = 1 if args.quick else 2
    broker = None if args.server else BrokerProcess().start()
    server = args.server or (broker.address if broker else "")
    kind = "uvloop" if uvloop is not None else "asyncio"
    print(f"zaichik groups over loopback, python {sys.version.split()[0]}, clients on {kind}, "
          f"{len(PAYLOAD)}-byte values, window {WINDOW}")
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    try:
        pid = broker.process.pid if broker is not None and broker.process is not None else None
        for pipelined in (False, True):
            loop.run_until_complete(run(server, messages, turns, pid, pipelined))
    finally:
        loop.close()
        if broker is not None:
            broker.cleanup()


if __name__ == "__main__":
    main()
