"""
A FastAPI service on the asyncio client: POST /orders publishes an order,
and a background task subscribes to the topic and keeps what it receives.

    pip install fastapi uvicorn
    ZAICHIK_SERVER=localhost:8889 uvicorn examples.fastapi_app:app
    curl -X POST localhost:8000/orders -H 'content-type: application/json' -d '{"item": "tea"}'
    curl localhost:8000/received

(Also run by the tests, with httpx's client for ASGI apps: python examples/fastapi_app.py.)
"""

import asyncio
import contextlib
import json
import os

from fastapi import FastAPI, Request

from zaichik.aio import Start, connect

SERVER = os.environ.get("ZAICHIK_SERVER", "localhost:8889")
TOPIC = os.environ.get("ZAICHIK_TOPIC", "orders")
received: list = []
arrived = asyncio.Event()


async def consume(client) -> None:
    """The background subscriber: every order, from where this client_id committed."""
    subscription = await client.subscribe(TOPIC, start=Start.DEFAULT)
    async for message in subscription:
        received.append(json.loads(message.value))
        arrived.set()
        await subscription.commit(message.offset)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    async with connect(SERVER, client_id="orders-service", reconnect=True) as client:
        await client.create_topic(TOPIC, retention_ttl=3_600_000)
        app.state.zaichik = client
        consumer = asyncio.create_task(consume(client))
        yield
        consumer.cancel()


app = FastAPI(lifespan=lifespan)


@app.post("/orders")
async def create_order(request: Request):
    result = await request.app.state.zaichik.publish(TOPIC, await request.body())
    return {"offset": result.offset}


@app.get("/received")
async def list_received():
    return received


if __name__ == "__main__":
    # A self-check: POST two orders through the app, see them come back.
    import uuid

    import httpx

    async def main() -> None:
        global TOPIC
        TOPIC = f"orders-{uuid.uuid4().hex[:8]}"
        async with lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                for item in ("tea", "cake"):
                    answer = await http.post("/orders", json={"item": item})
                    print(f"POST /orders {item}: offset {answer.json()['offset']}")
                while len(received) < 2:
                    await asyncio.wait_for(arrived.wait(), 10)
                    arrived.clear()
                print("received:", (await http.get("/received")).json())
        assert [order["item"] for order in received] == ["tea", "cake"], received
        print("fastapi_app: OK")

    asyncio.run(main())
