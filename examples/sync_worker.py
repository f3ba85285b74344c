"""
The blocking client, as in a script, a Django view or a Celery task: publish
jobs, then work through them as a durable worker that commits each one.

    PORT=8889 python examples/sync_worker.py
"""

import os
import sys
import uuid

from zaichik.sync import Start, connect

server = f"localhost:{os.environ.get('PORT', '8889')}"
topic = f"jobs-{uuid.uuid4().hex[:8]}"

with connect(server) as client:                       # e.g. in a Django view
    client.create_topic(topic, retention_ttl=60_000)
    for n in range(3):
        result = client.publish(topic, f"job {n}".encode())
        print(f"published job {n} at offset {result.offset}")
    client.publish_nowait(topic, b"job 3")            # fire and forget
    client.ping()                                     # ... and be sure it was handled

done = []
with connect(server, client_id=f"worker-{topic}") as worker:    # e.g. a Celery worker
    with worker.subscribe(topic, start=Start.DEFAULT) as jobs:
        for message in jobs:
            print(f"worker: {message.value.decode()} (offset {message.offset})")
            done.append(message.value)
            jobs.commit(message.offset)
            if len(done) == 4:
                break

if done != [b"job 0", b"job 1", b"job 2", b"job 3"]:
    sys.exit("sync_worker: FAILED")
print("sync_worker: OK")
