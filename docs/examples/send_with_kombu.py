"""Send one URL to talkwire with kombu alone, writing Celery's message protocol (v2) by hand.

    REDIS_URL=redis://127.0.0.1:6379/0 python send_with_kombu.py https://example.org/a

This is what `send_task` does underneath; a producer in another language that speaks AMQP or
Redis can follow the same shape (or use the Redis stream, which is simpler).
"""

from __future__ import annotations

import os
import sys
import uuid

from kombu import Connection

message = {"version": 1, "producer": "example-kombu", "url": sys.argv[1]}
task_id = str(uuid.uuid4())
options = {}
if os.environ.get("TALKWIRE_REDIS_PREFIX"):
    options["global_keyprefix"] = os.environ["TALKWIRE_REDIS_PREFIX"]

with Connection(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                transport_options=options) as conn:
    conn.Producer(serializer="json").publish(
        # Celery protocol 2 body: [args, kwargs, embed]
        [[message], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        exchange="", routing_key="intake",            # straight to the intake queue
        headers={"lang": "py", "task": "talkwire.ingest_url", "id": task_id,
                 "root_id": task_id, "parent_id": None, "group": None, "retries": 0,
                 "eta": None, "expires": None, "timelimit": [None, None],
                 "argsrepr": repr([message]), "kwargsrepr": "{}", "origin": "send_with_kombu"},
        properties={"correlation_id": task_id},
    )
print(task_id)
