"""Send one URL to talkwire with a plain Celery client: no talkwire import, only the task name.

    REDIS_URL=redis://127.0.0.1:6379/0 python send_with_celery.py https://example.org/a [KEY]

Prints the Celery task id. Set TALKWIRE_REDIS_PREFIX when the deployment uses a key prefix.
"""

from __future__ import annotations

import os
import sys

from celery import Celery

app = Celery(broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
if os.environ.get("TALKWIRE_REDIS_PREFIX"):
    # The same kombu option talkwire sets; without it the message lands beside its queue.
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["TALKWIRE_REDIS_PREFIX"]}

message = {
    "version": 1,                       # schemas/messages/ingest_url.v1.schema.json
    "producer": "example-celery",       # who you are: half of the idempotency key
    "url": sys.argv[1],
    "hints": {"language": "ru", "source_name": "Южный вестник"},
}
if len(sys.argv) > 2:
    message["idempotency_key"] = sys.argv[2]  # default: the canonical form of url

# By name and to the public "intake" queue: the name and the queue are the contract.
result = app.send_task("talkwire.ingest_url", args=[message], queue="intake")
print(result.id)
