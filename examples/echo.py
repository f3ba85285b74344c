"""
Publish a message and receive it on the same connection.

    PORT=8889 python examples/echo.py
"""

import os
import sys
import uuid

from twisted.internet.task import react

from zaichik.client import Start, connect


async def main(reactor):
    port = os.environ.get("PORT", "8889")
    topic = f"echo-{uuid.uuid4().hex[:8]}"
    client = await connect(reactor, f"localhost:{port}")
    subscription = await client.subscribe(topic, start=Start.LATEST)
    print(f"subscribed to {topic}")

    result = await client.publish(topic, b"hello, zaichik")
    print(f"published at offset {result.offset}")

    message = await subscription.get()
    print(f"received offset {message.offset}: {message.value.decode()}")
    await client.close()
    if message.value != b"hello, zaichik":
        sys.exit("echo: received something else")
    print("echo: OK")


if __name__ == "__main__":
    react(main)
