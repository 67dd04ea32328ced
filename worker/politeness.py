"""Per-host politeness shared by every worker: a cap on requests in flight and a minimum
spacing between request starts, kept in Redis and decided by one Lua script each, so two
workers can never both take the last place.

A caller that cannot go now gets a place in the host's queue (a reservation on Redis's clock)
and the time to come back, so a thousand feeds on one host queue up one spacing apart instead
of retrying in a herd. Leases expire, so a worker killed mid-fetch frees its place by itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import redis

# KEYS[1]: leases of requests in flight (zset: token -> expiry, ms); KEYS[2]: host state
# (hash: next = first free place in the queue, last = last start, until = end of a 429
# penalty, avg = average request time). ARGV: token, max_concurrent, spacing_ms, lease_ms,
# reservation_ms (0: none), max_wait_ms. Returns {granted, wait_ms, reservation_ms}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_conc, spacing, lease = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local reserved, max_wait = tonumber(ARGV[5]), tonumber(ARGV[6])
-- Redis and Celery timers are not exact: a place is honoured this close to its time.
local tol = math.min(10, math.floor(spacing / 4))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local st = redis.call('HMGET', KEYS[2], 'next', 'last', 'until', 'avg')
local nxt, last = tonumber(st[1]) or 0, tonumber(st[2]) or 0
local blocked, avg = tonumber(st[3]) or 0, tonumber(st[4]) or 0
local busy = redis.call('ZCARD', KEYS[1]) >= max_conc or now < blocked
-- The queue advances at the host's own pace when that is slower than the spacing.
local step = math.max(spacing, math.floor(avg / max_conc))

local function grant()
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease)
  if nxt < now + spacing then nxt = now + spacing end
  redis.call('HSET', KEYS[2], 'last', now, 'next', nxt)
  redis.call('PEXPIRE', KEYS[2], math.max(nxt, blocked) - now + lease)
  return {1, 0, 0}
end

if reserved > 0 and reserved >= blocked then
  if reserved > now + tol then
    return {0, reserved - now, reserved}            -- early: keep the place
  end
  if not busy then
    -- Places are one spacing apart already. A neighbour that came late may have just gone:
    -- keep at least half a spacing from it, but do not inherit all of its lateness, or every
    -- later place in the queue would slip by it too.
    local gap = last + math.floor(spacing / 2) - now
    if gap > tol then return {0, gap, reserved} end
    return grant()
  end
elseif reserved == 0 and not busy and nxt <= now + tol and last + spacing <= now + tol then
  return grant()
end
local slot = math.max(nxt, last + spacing, now, blocked)
if busy then slot = math.max(slot, now + math.max(step, 10)) end
if slot - now > max_wait then return {0, slot - now, 0} end
redis.call('HSET', KEYS[2], 'next', slot + step)
redis.call('PEXPIRE', KEYS[2], slot + step - now + lease)
return {0, slot - now, slot}
"""

# KEYS as above; ARGV: token, lease_ms. Frees the place and feeds the average request time.
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if score then
  local took = now - (tonumber(score) - tonumber(ARGV[2]))
  local avg = tonumber(redis.call('HGET', KEYS[2], 'avg')) or took
  redis.call('HSET', KEYS[2], 'avg', math.floor(avg * 0.8 + took * 0.2))
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl < 0 then redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2])) end
end
return 1
"""

# KEYS[2] only; ARGV: penalty_ms. No request to the host starts before the penalty ends.
_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untilms = now + tonumber(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'until', 'next')
if (tonumber(st[1]) or 0) < untilms then redis.call('HSET', KEYS[1], 'until', untilms) end
if (tonumber(st[2]) or 0) < untilms then redis.call('HSET', KEYS[1], 'next', untilms) end
redis.call('PEXPIRE', KEYS[1], untilms - now + 60000)
return 1
"""


@dataclass(frozen=True)
class HostPermit:
    """Leave to send one request to `host`; release it when the response is read."""

    host: str
    token: str


@dataclass(frozen=True)
class HostWait:
    """The host is busy: come back in `seconds`, presenting `reservation` (None: no place held)."""

    seconds: float
    reservation: int | None


def redis_client(url: str) -> redis.Redis:
    """A redis-py client for a Celery broker URL (kombu's redis+socket:// included)."""
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(url)


class HostLimiter:
    """Concurrency and spacing limits per host, shared through Redis by all workers."""

    def __init__(self, client: redis.Redis, *, prefix: str, max_concurrent: int,
                 min_spacing: float, lease_seconds: float, max_wait: float) -> None:
        self._redis = client
        self._prefix = prefix
        self.max_concurrent = max_concurrent
        self._spacing_ms = int(min_spacing * 1000)
        self._lease_ms = int(lease_seconds * 1000)
        self._max_wait_ms = int(max_wait * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._penalize = client.register_script(_PENALIZE)

    def _keys(self, host: str) -> list[str]:
        # One hash tag per host keeps both keys in one Redis Cluster slot for the scripts.
        base = f"{self._prefix}talkwire:host:{{{host}}}"
        return [base + ":leases", base + ":state"]

    def acquire(self, host: str, *, reservation: int | None = None) -> HostPermit | HostWait:
        """Take a place in flight for one request to host, or say how long to wait."""
        token = uuid.uuid4().hex
        granted, wait_ms, slot = self._acquire(
            keys=self._keys(host),
            args=[token, self.max_concurrent, self._spacing_ms, self._lease_ms,
                  reservation or 0, self._max_wait_ms])
        if granted:
            return HostPermit(host, token)
        return HostWait(max(0.0, int(wait_ms) / 1000), int(slot) or None)

    def release(self, permit: HostPermit) -> None:
        """Free the place a permit held."""
        self._release(keys=self._keys(permit.host), args=[permit.token, self._lease_ms])

    def penalize(self, host: str, seconds: float) -> None:
        """Start no request to host for `seconds` (it answered 429 Too Many Requests)."""
        self._penalize(keys=self._keys(host)[1:], args=[int(seconds * 1000)])

    def close(self) -> None:
        """Close the Redis connections."""
        self._redis.close()
