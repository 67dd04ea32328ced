"""Typed settings, read once from the environment and validated at start.

Every knob an operator can turn is a field here. `load_settings()` turns bad values into a
`ConfigError` with one readable line per problem, so a service never starts half-configured.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.errors import ConfigError
from worker.types import FetchLimits


def default_data_dir() -> Path:
    """Where the embedded Postgres and Redis keep their files when no directory is set."""
    return Path.home() / ".local" / "share" / "talkwire"


def default_concurrency() -> int:
    """Pool children when TALKWIRE_WORKER_CONCURRENCY is not set: two per core."""
    return 2 * (os.cpu_count() or 1)


class Settings(BaseSettings):
    """All talkwire settings; environment names are `TALKWIRE_<FIELD>` except the two URLs."""

    model_config = SettingsConfigDict(env_prefix="TALKWIRE_", frozen=True, extra="ignore")

    # The two backing stores. Unset means: start the embedded ones under data_dir.
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    data_dir: Path = Field(default_factory=default_data_dir)
    # Prefix for every Redis key Celery and talkwire write, so two deployments (or two test
    # runs) can share one Redis without seeing each other's queues (kombu global_keyprefix).
    redis_prefix: str = ""

    # Serve the bundled demo site on 127.0.0.1 and ingest it. Unset: on in the embedded mode.
    demo: bool | None = None
    demo_port: int = Field(default=8787, ge=0, le=65535)

    db_pool_min: int = Field(default=1, ge=1)
    db_pool_max: int = Field(default=4, ge=1)

    fetch_connect_timeout: float = Field(default=5.0, gt=0)
    fetch_read_timeout: float = Field(default=10.0, gt=0)
    fetch_deadline: float = Field(default=30.0, gt=0)
    fetch_max_bytes: int = Field(default=5 * 1024 * 1024, gt=1024)
    fetch_max_redirects: int = Field(default=5, ge=0, le=20)
    # CIDRs admitted despite the SSRF guard. Empty in production; the demo and the tests
    # set 127.0.0.1/32 so they can reach their local HTTP server.
    fetch_allow_networks: Annotated[tuple[str, ...], NoDecode] = ()
    user_agent: str = "talkwire/0.1 (news ingestion; +https://example.invalid/talkwire)"

    poll_interval_default: int = Field(default=900, ge=1)
    poll_interval_min: int = Field(default=120, ge=1)
    poll_interval_max: int = Field(default=6 * 3600, ge=1)
    # Soft failures back off from this base up to poll_backoff_cap, and are retried forever.
    poll_backoff_base: int = Field(default=60, ge=1)
    poll_backoff_cap: int = Field(default=6 * 3600, ge=1)
    # Each next poll is pushed later by up to this fraction of its interval, so feeds added
    # together (an OPML import) drift apart instead of hitting their hosts in step.
    poll_jitter: float = Field(default=0.1, ge=0, le=1)
    # Send a GET without validators at least this often: some servers answer 304 although the
    # feed changed (mediacloud/rss-fetcher saw it in the wild), and the body hash still saves
    # the parse when they were right.
    poll_full_fetch_every: int = Field(default=24 * 3600, ge=1)
    poll_log_keep: int = Field(default=50, ge=1)  # poll log rows kept per feed
    # Per-host politeness, shared by every worker through Redis: at most this many requests
    # in flight to one host, and request starts at least this many seconds apart.
    host_max_concurrent: int = Field(default=2, ge=1)
    host_min_spacing: float = Field(default=1.0, ge=0)
    # A poll that must wait longer than this for its host is re-scheduled through the
    # database (beat claims it again) instead of a Celery countdown held by a worker.
    host_max_wait: float = Field(default=60.0, gt=0)
    beat_interval: float = Field(default=30.0, gt=0)
    sweep_interval: float = Field(default=60.0, gt=0)
    # How long a claimed feed or article may stay in flight before the sweeper re-enqueues it.
    lease_seconds: int = Field(default=600, ge=1)
    claim_batch: int = Field(default=100, ge=1)
    # Claimed polls per message: one worker thread polls them in turn, which spares the broker
    # and the worker most of their per-message cost (the poll benchmark measures it).
    poll_batch: int = Field(default=10, ge=1, le=100)
    # Articles per process message: one child processes them in turn, sharing the broker's
    # and Celery's cost of a message among them (ops/bench pipeline). 1: a message each.
    process_batch: int = Field(default=4, ge=1, le=100)

    task_soft_time_limit: int = Field(default=120, ge=1)
    task_time_limit: int = Field(default=150, ge=1)
    max_retries: int = Field(default=8, ge=0)
    retry_backoff_max: int = Field(default=600, ge=1)
    # Seconds a task may spend backing off while Redis refuses a publish for want of memory
    # (maxmemory with noeviction, issue 8); then it gives up and the sweeper resends. It
    # comes on top of a fetch, so with the fetch deadline it must fit the soft limit (checked).
    publish_backoff_max: float = Field(default=20.0, ge=0)
    # An article leased more often than this is quarantined as poison_message (a dead letter
    # and a failed row): a page that kills its worker every time (OOM, hard time limit) would
    # otherwise be redelivered for ever (issue 8). Leases count retries too, so it must
    # exceed max_retries + 1 (checked).
    max_deliveries: int = Field(default=12, ge=2)
    # Redis redelivers an unacked message after this many seconds. It must exceed every time
    # limit and backoff, or a slow task runs twice (celery/celery#5935).
    visibility_timeout: int = Field(default=3600, ge=1)
    # Seconds between a worker's scans for messages a dead worker left unacknowledged.
    unacked_restore_interval: int = Field(default=10, ge=1)
    worker_max_memory_kb: int = Field(default=400_000, ge=10_000)
    # Pool children: two per core, because a child spends part of each article waiting (on
    # the outlet's server, on Postgres) and a second child per core fills those waits
    # (ops/bench pipeline; over the internet the fetch waits are far longer than here).
    worker_concurrency: int = Field(default_factory=default_concurrency, ge=1)
    # Prometheus /metrics of `talkwire worker` and `talkwire beat` (0: off). Two processes on
    # one host need two ports; a port already taken is logged, never fatal.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    beat_metrics_port: int = Field(default=9465, ge=0, le=65535)

    # Producer contracts (issue 7). A message larger than this is dead-lettered as too_large;
    # it bounds what one message can make a worker hold and extract.
    message_max_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # A dead letter keeps its whole payload up to this size (so it can be replayed after, say,
    # the limit above is raised); a larger one keeps its first 64 KiB, its size and sha256.
    dead_letter_max_bytes: int = Field(default=4 * 1024 * 1024, ge=65536)
    # The Redis stream any language can XADD to (under redis_prefix), and its consumer group.
    intake_stream: str = "talkwire:intake"
    intake_group: str = "talkwire"
    # A stream entry left unacknowledged this long by a consumer that died is claimed by
    # another (XAUTOCLAIM), so nothing on the stream is lost.
    intake_claim_idle: float = Field(default=60.0, gt=0)
    intake_batch: int = Field(default=50, ge=1)

    @field_validator("fetch_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("fetch_allow_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must start with postgresql://")
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or redis+socket://")
        return value or None

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.task_time_limit <= self.task_soft_time_limit:
            raise ValueError("TALKWIRE_TASK_TIME_LIMIT must exceed TALKWIRE_TASK_SOFT_TIME_LIMIT")
        if self.fetch_deadline >= self.task_soft_time_limit:
            raise ValueError("TALKWIRE_FETCH_DEADLINE must be below TALKWIRE_TASK_SOFT_TIME_LIMIT")
        if self.fetch_deadline + self.publish_backoff_max >= self.task_soft_time_limit:
            raise ValueError(
                "TALKWIRE_FETCH_DEADLINE plus TALKWIRE_PUBLISH_BACKOFF_MAX must stay below "
                "TALKWIRE_TASK_SOFT_TIME_LIMIT; a task that fetched and then backs off on a "
                "full Redis would otherwise outrun its soft limit")
        longest = max(self.task_time_limit, self.retry_backoff_max, self.lease_seconds)
        if self.visibility_timeout <= longest:
            raise ValueError(
                "TALKWIRE_VISIBILITY_TIMEOUT must exceed the task time limit, the retry backoff "
                f"and the lease (now {self.visibility_timeout} <= {longest}); otherwise Redis "
                "redelivers tasks that are still running"
            )
        if self.host_max_wait + self.task_time_limit >= self.visibility_timeout:
            raise ValueError("TALKWIRE_HOST_MAX_WAIT plus the task time limit must stay below "
                             "TALKWIRE_VISIBILITY_TIMEOUT; a deferred poll is held unacked")
        if self.max_deliveries <= self.max_retries + 1:
            raise ValueError("TALKWIRE_MAX_DELIVERIES must exceed TALKWIRE_MAX_RETRIES + 1, "
                             "or ordinary retries would be quarantined as poison")
        if not self.poll_interval_min <= self.poll_interval_default <= self.poll_interval_max:
            raise ValueError("poll intervals must satisfy MIN <= DEFAULT <= MAX")
        if self.db_pool_max < self.db_pool_min:
            raise ValueError("TALKWIRE_DB_POOL_MAX must be at least TALKWIRE_DB_POOL_MIN")
        return self

    @property
    def embedded(self) -> bool:
        """True when neither store is configured, so the embedded servers are used."""
        return self.database_url is None and self.redis_url is None

    @property
    def demo_enabled(self) -> bool:
        """Whether `talkwire run` serves and ingests the bundled demo."""
        return self.embedded if self.demo is None else self.demo

    def child_env(self) -> dict[str, str]:
        """Environment variables that give a child process these same resolved settings."""
        env = {"TALKWIRE_DATA_DIR": str(self.data_dir)}
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        if self.fetch_allow_networks:
            env["TALKWIRE_FETCH_ALLOW_NETWORKS"] = ",".join(self.fetch_allow_networks)
        if self.redis_prefix:
            env["TALKWIRE_REDIS_PREFIX"] = self.redis_prefix
        return env

    def fetch_limits(self) -> FetchLimits:
        """The fetcher's limits derived from these settings."""
        return FetchLimits(
            connect_timeout=self.fetch_connect_timeout,
            read_timeout=self.fetch_read_timeout,
            deadline=self.fetch_deadline,
            max_bytes=self.fetch_max_bytes,
            max_redirects=self.fetch_max_redirects,
            allow_networks=tuple(
                ipaddress.ip_network(c, strict=False) for c in self.fetch_allow_networks
            ),
            user_agent=self.user_agent,
        )


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings from the environment; raise ConfigError on bad values."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            name = loc.upper() if loc in {"DATABASE_URL", "REDIS_URL"} else f"TALKWIRE_{loc.upper()}"
            if loc == "settings" or not err["loc"]:
                name = "settings"
            lines.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    if (settings.database_url is None) != (settings.redis_url is None):
        raise ConfigError(
            "invalid configuration: set both DATABASE_URL and REDIS_URL, or neither "
            "(neither starts the embedded Postgres and Redis)"
        )
    return settings
