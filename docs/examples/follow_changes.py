"""Follow talkwire's change feed as a consumer: LISTEN, catch up by id, survive disconnects.

    TALKWIRE_READER_URL=postgresql://analyst@db/talkwire python follow_changes.py last-id.txt

Prints one JSON line per change. The last id handled is kept in the state file, so a restart
resumes where it stopped; a dropped connection is re-opened and caught up the same way. It
reads only the talkwire_v1 views, so a role in talkwire_reader is enough.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psycopg

state = Path(sys.argv[1])
last = int(state.read_text()) if state.exists() else 0


def handle(change: dict[str, object]) -> None:
    """Your work goes here; it must tolerate seeing the last change again after a crash."""
    print(json.dumps(change, ensure_ascii=False, default=str), flush=True)


while True:
    try:
        with psycopg.connect(os.environ["TALKWIRE_READER_URL"], autocommit=True,
                             application_name="follow_changes") as conn:
            # LISTEN first, then catch up: nothing committed in between can be missed.
            conn.execute("LISTEN talkwire_changes")
            while True:
                rows = conn.execute(
                    "SELECT id, event, entity, entity_id, payload, created_at"
                    " FROM talkwire_v1.changes WHERE id > %s ORDER BY id LIMIT 500",
                    (last,)).fetchall()
                for id_, event, entity, entity_id, payload, created_at in rows:
                    handle({"id": id_, "event": event, "entity": entity,
                            "entity_id": entity_id, "payload": payload,
                            "created_at": created_at})
                    last = id_
                    state.write_text(str(last))
                if len(rows) < 500:
                    # Each NOTIFY carries a change id; it is only a wake-up here, the query
                    # above is the source of truth. The timeout covers a lost notification.
                    for _ in conn.notifies(timeout=30, stop_after=1):
                        pass
    except psycopg.OperationalError as exc:
        print(f"connection lost ({exc.__class__.__name__}); reconnecting", file=sys.stderr,
              flush=True)
        time.sleep(1)
    except KeyboardInterrupt:
        break
