"""
A message published before anyone subscribes still reaches a late subscriber
while the topic retains it, and no longer once its retention has passed.

    PORT=8889 python examples/retention.py
"""

import os
import sys
import uuid

from twisted.internet.task import deferLater, react

from zaichik.client import Start, connect

RETENTION_MS = 1000


async def received_now(reactor, server, topic):
    """Subscribe from the oldest retained message and take what is there."""
    client = await connect(reactor, server)
    subscription = await client.subscribe(topic, start=Start.EARLIEST)
    # Retained messages follow the subscription's OK at once, so by the time
    # the answer to a later PING arrives they are all here.
    await client.ping()
    await client.unsubscribe(topic)
    messages = []
    while (message := await subscription.get()) is not None:
        messages.append(message.value)
    await client.close()
    return messages


async def main(reactor):
    server = f"localhost:{os.environ.get('PORT', '8889')}"
    topic = f"retention-{uuid.uuid4().hex[:8]}"

    publisher = await connect(reactor, server)
    await publisher.create_topic(topic, retention_ttl=RETENTION_MS)
    result = await publisher.publish(topic, b"I was here first")
    await publisher.close()
    print(f"published to {topic} (retention {RETENTION_MS} ms) at offset {result.offset}, "
          "with nobody subscribed")

    early = await received_now(reactor, server, topic)
    print(f"a subscriber arriving within the retention receives: {early}")

    await deferLater(reactor, RETENTION_MS / 1000 + 0.2, lambda: None)
    late = await received_now(reactor, server, topic)
    print(f"a subscriber arriving after {RETENTION_MS + 200} ms receives: {late}")

    if early != [b"I was here first"] or late != []:
        sys.exit("retention: FAILED")
    print("retention: OK")


if __name__ == "__main__":
    react(main)
