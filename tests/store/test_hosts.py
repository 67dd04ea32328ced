"""The per-host limiter on a real Redis: concurrency, spacing, queue places, 429 penalties."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from worker.config import Settings
from worker.politeness import HostLimiter, HostPermit, HostWait, redis_client


@pytest.fixture()
def make_limiter(settings: Settings):  # type: ignore[no-untyped-def]
    clients = []

    def make(**limits: float) -> HostLimiter:
        client = redis_client(settings.redis_url or "")
        clients.append(client)
        options = {"max_concurrent": 2, "min_spacing": 0.0, "lease_seconds": 30.0,
                   "max_wait": 60.0, **limits}
        return HostLimiter(client, prefix=settings.redis_prefix + uuid.uuid4().hex[:6] + ":",
                           **options)  # type: ignore[arg-type]

    yield make
    for client in clients:
        client.close()


def test_no_more_than_the_limit_in_flight(make_limiter) -> None:  # type: ignore[no-untyped-def]
    hosts = make_limiter(max_concurrent=2)
    first, second = hosts.acquire("wire.example"), hosts.acquire("wire.example")
    assert isinstance(first, HostPermit) and isinstance(second, HostPermit)
    third = hosts.acquire("wire.example")
    assert isinstance(third, HostWait) and third.reservation is not None
    assert isinstance(hosts.acquire("other.example"), HostPermit)  # hosts are independent
    hosts.release(first)
    time.sleep(third.seconds)  # come back when told, holding the place
    assert isinstance(hosts.acquire("wire.example", reservation=third.reservation), HostPermit)


def test_spacing_hands_out_places_one_spacing_apart(make_limiter) -> None:  # type: ignore[no-untyped-def]
    hosts = make_limiter(max_concurrent=100, min_spacing=0.5)
    assert isinstance(hosts.acquire("wire.example"), HostPermit)
    waits = [hosts.acquire("wire.example") for _ in range(4)]
    assert all(isinstance(w, HostWait) for w in waits)
    places = [w.reservation for w in waits]  # type: ignore[union-attr]
    assert [b - a for a, b in zip(places, places[1:])] == [500, 500, 500]  # type: ignore[operator]
    # A place that is not yet due is kept, not lost.
    early = hosts.acquire("wire.example", reservation=places[0])
    assert isinstance(early, HostWait) and early.reservation == places[0]


def test_a_queue_longer_than_max_wait_holds_no_place(make_limiter) -> None:  # type: ignore[no-untyped-def]
    hosts = make_limiter(max_concurrent=100, min_spacing=1.0, max_wait=2.5)
    answers = [hosts.acquire("wire.example") for _ in range(5)]
    assert isinstance(answers[0], HostPermit)
    assert [a.reservation is not None for a in answers[1:]] == [True, True, False, False]  # type: ignore[union-attr]


def test_a_penalty_stops_every_request_to_the_host(make_limiter) -> None:  # type: ignore[no-untyped-def]
    hosts = make_limiter(max_wait=30.0)
    hosts.penalize("wire.example", 120)
    answer = hosts.acquire("wire.example")
    assert isinstance(answer, HostWait) and answer.seconds > 100 and answer.reservation is None


def test_a_dead_workers_lease_expires(make_limiter) -> None:  # type: ignore[no-untyped-def]
    hosts = make_limiter(max_concurrent=1, lease_seconds=0.3)
    assert isinstance(hosts.acquire("wire.example"), HostPermit)  # never released
    assert isinstance(hosts.acquire("wire.example"), HostWait)
    time.sleep(0.4)
    assert isinstance(hosts.acquire("wire.example"), HostPermit)


def test_racing_threads_never_exceed_the_limit(make_limiter) -> None:  # type: ignore[no-untyped-def]
    hosts = make_limiter(max_concurrent=3)
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "done": 0}

    def work() -> None:
        for _ in range(15):
            answer = hosts.acquire("wire.example")
            while isinstance(answer, HostWait):
                time.sleep(min(answer.seconds, 0.05))
                answer = hosts.acquire("wire.example", reservation=answer.reservation)
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.002)
            with lock:
                state["now"] -= 1
                state["done"] += 1
            hosts.release(answer)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["done"] == 120 and 1 < state["peak"] <= 3
