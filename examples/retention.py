"""
A message published before anyone subscribes still reaches a late subscriber
while the topic retains it, and no longer once its retention has passed.

    PORT=8889 python examples/retention.py
"""

import os
import sys
import time
import uuid

from twisted.internet.task import deferLater, react

from zaichik.client import Start, connect

RETENTION_MS = 1000
# The early subscriber must come within the retention.  On a slow machine it
# may not: then nothing was shown (neither way), and it is shown again with
# a longer retention, up to this one.
LONGEST_RETENTION_MS = 16_000


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


async def show(reactor, server, retention_ms):
    """
    Publish with nobody subscribed, then subscribe at once and again after
    the retention: what each subscriber received, or None if the first came
    too late to show anything.
    """
    topic = f"retention-{uuid.uuid4().hex[:8]}"
    publisher = await connect(reactor, server)
    await publisher.create_topic(topic, retention_ttl=retention_ms)
    sent = time.monotonic()  # the broker stamps the message after this
    result = await publisher.publish(topic, b"I was here first")
    await publisher.close()
    print(f"published to {topic} (retention {retention_ms} ms) at offset {result.offset}, "
          "with nobody subscribed")

    early = await received_now(reactor, server, topic)
    # The broker read the topic for this subscriber before the reply to its
    # PING: less than `waited` after it stamped the message.
    waited = (time.monotonic() - sent) * 1000
    if not early and waited >= retention_ms:
        print(f"the first subscriber came {waited:.0f} ms after the publish, not within the retention "
              "(a slow machine): again, with a longer retention")
        return None
    print(f"a subscriber arriving within the retention receives: {early}")

    await deferLater(reactor, retention_ms / 1000 + 0.2, lambda: None)
    late = await received_now(reactor, server, topic)
    print(f"a subscriber arriving after {retention_ms + 200} ms receives: {late}")
    return early, late


async def main(reactor):
    server = f"localhost:{os.environ.get('PORT', '8889')}"
    retention_ms = RETENTION_MS
    while (shown := await show(reactor, server, retention_ms)) is None:
        retention_ms *= 2
        if retention_ms > LONGEST_RETENTION_MS:
            sys.exit(f"retention: FAILED (no subscriber came within {retention_ms // 2} ms of a publish)")
    early, late = shown
    if early != [b"I was here first"] or late != []:
        sys.exit("retention: FAILED")
    print("retention: OK")


if __name__ == "__main__":
    react(main)
