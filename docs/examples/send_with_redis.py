"""Send one URL to talkwire's Redis stream with the plain redis client (no Celery, no talkwire).

    REDIS_URL=redis://127.0.0.1:6379/0 python send_with_redis.py https://example.org/a

Any language with a Redis client does the same: XADD one field, "message", holding the JSON.
Prints the stream entry id.
"""

from __future__ import annotations

import json
import os
import sys

import redis

client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
stream = os.environ.get("TALKWIRE_REDIS_PREFIX", "") + "talkwire:intake"
message = {
    "type": "ingest_url",               # required on the stream: it carries both kinds
    "version": 1,
    "producer": "example-stream",
    "url": sys.argv[1],
    "hints": {"published_at": "2017-09-15", "language": "tr"},
}
entry_id = client.xadd(stream, {"message": json.dumps(message, ensure_ascii=False)})
print(entry_id.decode())
