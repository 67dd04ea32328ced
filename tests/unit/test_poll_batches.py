"""How claimed polls are packed into messages, and how a batch message is checked."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from worker.store import FeedRow
from worker.tasks import _claim_pairs, batch_claims

NOW = datetime(2017, 5, 4, tzinfo=timezone.utc)


def feed(feed_id: int, host: str) -> FeedRow:
    return FeedRow(id=feed_id, url=f"http://{host}/{feed_id}", title=None, source="cli",
                   status="active", etag=None, last_modified=None, body_hash=None,
                   last_status=None, last_reason=None, last_error=None, consecutive_failures=0,
                   interval_seconds=900, interval_reason="default", next_poll_at=NOW,
                   claimed_at=NOW, last_polled_at=None, last_success_at=None, host=host,
                   poll_slot=feed_id + 100)


def test_batches_are_full_and_spread_each_host() -> None:
    # A wire service with 30 feeds next to 12 small sites.
    feeds = [feed(i, "wire.example") for i in range(30)] + [feed(100 + i, f"s{i}.example")
                                                            for i in range(12)]
    batches = batch_claims(feeds, 10)
    assert len(batches) == 5 and all(len(b) <= 10 for b in batches)
    assert sorted(fid for b in batches for fid, _ in b) == sorted(f.id for f in feeds)
    # 30 feeds of one host over 5 batches: 6 each, never all in one thread's queue.
    per_batch = [Counter("wire" if fid < 100 else "other" for fid, _ in b)["wire"] for b in batches]
    assert per_batch == [6, 6, 6, 6, 6]
    assert all(slot == fid + 100 for b in batches for fid, slot in b)
    assert batch_claims([], 10) == []


def test_batch_messages_are_checked() -> None:
    assert _claim_pairs([[1, 2], [3, 4]]) == [(1, 2), (3, 4)]
    for bad in (None, [], [[1]], [[1, "x"]], [[True, 1]], "1,2", [[1, 2]] * 1001, [[0, 1]]):
        assert _claim_pairs(bad) is None
