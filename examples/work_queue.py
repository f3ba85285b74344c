"""
A work queue: three workers share the jobs of one topic as members of a
consumer group, each job going to one of them; one worker dies mid-way
(its connection dropped, with a job in hand and not acknowledged). The
broker gives what it had back to the group, the other two take it over, and
every job is done at least once.

    PORT=8889 python examples/work_queue.py
"""

import asyncio
import os
import sys
import uuid
from collections import Counter, defaultdict

from zaichik.aio import connect

JOBS = 30
GROUP = "workers"


async def worker(name, server, topic, joined, received, processed, acked, dies_after=None):
    """Take jobs, do them, acknowledge each; with C{dies_after}, drop the
    connection while doing the next one (as a crash would)."""
    async with connect(server) as client:
        jobs = await client.subscribe_group(topic, GROUP, max_inflight=2)
        joined.release()
        async for message in jobs:
            received[message.offset] += 1
            await asyncio.sleep(0.005)                        # the work
            processed[message.offset].append(name)
            if dies_after is not None and len(acked[name]) == dies_after:
                print(f"{name}: dies with {message.value.decode()} done and not acknowledged")
                client.abort()                                # no ACK, no CLOSE: the connection just ends
                return
            await jobs.ack(message.offset)
            acked[name].append(message.offset)


async def main():
    server = f"localhost:{os.environ.get('PORT', '8889')}"
    topic = f"jobs-{uuid.uuid4().hex[:8]}"
    received = Counter()                  # offset -> times a worker was handed it
    processed = defaultdict(list)         # offset -> the workers that did it
    acked = defaultdict(list)             # worker -> the offsets it acknowledged
    names = ["worker-1", "worker-2", "worker-3"]

    async with connect(server) as producer:
        # A group needs retained messages: the queue is the topic's log.
        await producer.create_topic(topic, retention_ttl=3_600_000)
        joined = asyncio.Semaphore(0)
        workers = [asyncio.create_task(worker(name, server, topic, joined, received, processed, acked,
                                              dies_after=5 if name == "worker-2" else None))
                   for name in names]
        for _ in names:
            await joined.acquire()
        for n in range(JOBS):
            await producer.publish(topic, f"job {n}".encode())
        print(f"published {JOBS} jobs to {topic}")

        # Until every job has been acknowledged by someone (at most 10 s).
        for _ in range(1000):
            if len({o for offsets in acked.values() for o in offsets}) == JOBS:
                break
            await asyncio.sleep(0.01)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    for name in names:
        print(f"{name} acknowledged {len(acked[name])} jobs")
    # Redelivered: handed to a worker again after another had it (what
    # worker-2 had in hand; what waited unread in its client went to the
    # others as well, and reached a worker once).
    redelivered = sum(count - 1 for count in received.values())
    twice = sorted(o for o, by in processed.items() if len(by) > 1)
    print(f"every job processed at least once: {sorted(processed) == list(range(JOBS))}; "
          f"redelivered: {redelivered} (processed twice: {len(twice)}: offsets {twice})")
    if sorted(processed) != list(range(JOBS)) or redelivered < 1:
        sys.exit("work_queue: FAILED")
    print("work_queue: OK")


if __name__ == "__main__":
    asyncio.run(main())
