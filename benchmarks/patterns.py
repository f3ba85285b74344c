"""
Wildcard subscriptions and consumer groups, in process (no sockets): what
10,000 subscribed patterns that match nothing cost a publish, and what a
consumer group of 4 members costs against one plain subscriber.

    python benchmarks/patterns.py            # about 10 s
    python benchmarks/patterns.py --quick    # about 3 s

Publishes go through the broker's own path for a connection's PUBLISH
frame (L{Session.publish_frame}, one unit of work per batch of frames, as
one read from a socket is); subscribers' frames are counted, not parsed.
Printed: publish rate to an existing topic and topic creation rate (the
first publish to a new topic, where the pattern index is asked) with 0, 100
and 10,000 patterns subscribed, and their ratios to 0; then messages processed
per second by one plain subscriber (committing each) and by a group of 4
members (acknowledging each).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402

from zaichik import codec  # noqa: E402
from zaichik.service import BrokerService, Limits  # noqa: E402
from zaichik.session import Session  # noqa: E402

PAYLOAD = b"x" * 100
READ = 100  # PUBLISH frames per unit of work (one socket read)


class Sink:
    """A connection whose output is counted."""

    def __init__(self, service: BrokerService) -> None:
        self.bytes = 0
        self.frames: List[bytes] = []
        self.keep = False
        self.session = Session(service, self.reply, self.write, lambda: None, "bench")

    def reply(self, reply) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.keep:
            self.frames.append(data)


def broker() -> BrokerService:
    clock = Clock()
    clock.advance(1_700_000_000)
    return BrokerService(clock=clock, limits=Limits(max_subscriptions=100_000, max_topics=10_000_000,
                                                    max_output_buffer=0))


def subscribe_patterns(service: BrokerService, count: int) -> Sink:
    """C{count} patterns that match none of the benchmark's topics (but share their first segment)."""
    holder = Sink(service)
    for i in range(count):
        pattern = f"bench.other{i}.>" if i % 2 else f"bench.*.x{i}"
        holder.session.handle(codec.Subscribe(1, pattern, codec.Start.LATEST))
    assert len(service.patterns) == count, len(service.patterns)
    return holder


def publish_rate(service: BrokerService, messages: int) -> float:
    """PUBLISH (rid 0) to one existing topic with one plain subscriber: messages per second."""
    subscriber = Sink(service)
    subscriber.session.handle(codec.Subscribe(1, "bench.topic", codec.Start.LATEST))
    publisher = Sink(service)
    body = codec.Publish(0, "bench.topic", PAYLOAD).encode()
    work = service.work
    gc.collect()
    start = time.perf_counter()
    for _ in range(messages // READ):
        with work:
            for _ in range(READ):
                publisher.session.publish_frame(body)
    elapsed = time.perf_counter() - start
    assert subscriber.bytes >= messages * len(body), (subscriber.bytes, messages)
    return messages / elapsed


def creation_rate(service: BrokerService, topics: int, tag: str) -> float:
    """The first PUBLISH to each of C{topics} new topics (bench.<tag>.<i>): topics per second."""
    publisher = Sink(service)
    bodies = [codec.Publish(0, f"bench.{tag}.{i}", PAYLOAD).encode() for i in range(topics)]
    gc.collect()
    start = time.perf_counter()
    for body in bodies:
        request = codec.decode_request(body)
        publisher.session.handle(request)
    return topics / (time.perf_counter() - start)


def consume_rate(messages: int, members: int) -> float:
    """
    C{messages} retained messages, taken by one plain subscriber that
    commits each (C{members} 0) or by a group of C{members} that acknowledge
    each: messages processed per second (window 100 each).
    """
    service = broker()
    service.create_topic("jobs", 3_600_000, 0)
    publisher = Sink(service)
    with service.work:
        for _ in range(messages // READ):
            publisher.session.handle(codec.PublishBatch(0, "jobs", [(None, PAYLOAD)] * READ))
    sinks = [Sink(service) for _ in range(max(members, 1))]
    for sink in sinks:
        sink.keep = True
    gc.collect()
    start = time.perf_counter()
    for sink in sinks:
        if members:
            sink.session.handle(codec.SubscribeGroup(1, "jobs", "workers", codec.Start.EARLIEST, 0, 100))
        else:
            sink.session.handle(codec.Subscribe(1, "jobs", codec.Start.EARLIEST, 0, 100))
    done = 0
    at = codec.message_frame_offsets("jobs")[0]
    while done < messages:
        progressed = False
        for sink in sinks:
            frames, sink.frames = sink.frames, []
            for data in frames:
                # Each write is one or more whole MESSAGE frames of the same size.
                size = int.from_bytes(data[:4], "big") + 4
                for pos in range(0, len(data), size):
                    offset = int.from_bytes(data[pos + at:pos + at + 8], "big")
                    request = codec.Ack(2, "jobs", offset) if members else codec.Commit(2, "jobs", offset)
                    sink.session.handle(request)
                    done += 1
                    progressed = True
        if not progressed:
            raise RuntimeError(f"stalled after {done} messages")
    return messages / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    parser.add_argument("--patterns", type=int, default=10_000)
    args = parser.parse_args()
    messages = 100_000 if args.quick else 400_000
    topics = 5_000 if args.quick else 20_000
    consumed = 20_000 if args.quick else 100_000

    print(f"zaichik in process, python {sys.version.split()[0]}; {PAYLOAD.__len__()}-byte values")
    # Both brokers first, then their measurements in turns (best of each):
    # the machine's noise then falls on both alike.
    counts = (0, 100, args.patterns)
    services = {count: broker() for count in counts}
    holders = [subscribe_patterns(services[count], count) for count in counts]  # (kept alive)
    publish = {count: 0.0 for count in counts}
    create = {count: 0.0 for count in counts}
    for turn in range(3):
        for count in counts:
            publish[count] = max(publish[count], publish_rate(services[count], messages))
            create[count] = max(create[count], creation_rate(services[count], topics, f"new{turn}"))
    for count in counts:
        print(f"  {count:>6,} patterns: publish {publish[count]:>12,.0f} msgs/s   "
              f"topic creation {create[count]:>10,.0f} topics/s")
    for count in counts[1:]:
        print(f"  ratio {count:,} / 0 patterns: publish {publish[count] / publish[0]:.3f}   "
              f"topic creation {create[count] / create[0]:.3f}")
    del holders

    plain = max(consume_rate(consumed, 0) for _ in range(2))
    group = max(consume_rate(consumed, 4) for _ in range(2))
    print(f"  consumed, 1 plain subscriber (COMMIT each): {plain:>10,.0f} msgs/s")
    print(f"  consumed, group of 4 members (ACK each):    {group:>10,.0f} msgs/s   ratio {group / plain:.2f}")


if __name__ == "__main__":
    main()
