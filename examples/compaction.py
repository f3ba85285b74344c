"""
Messages whose key was stored less than the compaction window earlier are
dropped as duplicates: they get no offset and reach no subscriber.

    PORT=8889 python examples/compaction.py
"""

import os
import sys
import uuid

from twisted.internet.task import react

from zaichik.client import Start, connect

WINDOW_MS = 60_000
READINGS = [
    (b"sensor-a", b"21.5"),
    (b"sensor-b", b"19.0"),
    (b"sensor-a", b"21.6"),  # duplicate of sensor-a inside the window
    (b"sensor-c", b"20.1"),
    (b"sensor-b", b"19.2"),  # duplicate
    (b"sensor-a", b"21.7"),  # duplicate
]


async def main(reactor):
    server = f"localhost:{os.environ.get('PORT', '8889')}"
    topic = f"compaction-{uuid.uuid4().hex[:8]}"
    client = await connect(reactor, server)
    await client.create_topic(topic, retention_ttl=WINDOW_MS, compaction_window=WINDOW_MS)

    duplicates = []
    for key, value in READINGS:
        result = await client.publish(topic, value, key=key)
        if result.duplicate:
            duplicates.append(key)
            print(f"{key.decode()}={value.decode()}: duplicate of offset {result.offset}, dropped")
        else:
            print(f"{key.decode()}={value.decode()}: stored at offset {result.offset}")

    subscription = await client.subscribe(topic, start=Start.EARLIEST)
    await client.ping()  # the retained messages arrive before this answer
    await client.unsubscribe(topic)
    received = []
    while (message := await subscription.get()) is not None:
        received.append((message.key, message.value))
    print("a subscriber receives: " + ", ".join(f"{k.decode()}={v.decode()}" for k, v in received))
    await client.close()

    expected = [READINGS[0], READINGS[1], READINGS[3]]
    if received != expected or duplicates != [b"sensor-a", b"sensor-b", b"sensor-a"]:
        sys.exit("compaction: FAILED")
    print("compaction: OK")


if __name__ == "__main__":
    react(main)
