"""Error roots. The class of an error decides whether work is retried.

`Permanent` failures are recorded with a reason and never retried (a 404, a blocked
address, a body that is not a feed). `Transient` failures are retried with backoff
(timeouts, 5xx, connection resets). Every error carries a short stable `reason` code
that lands in the database and in metrics, so operators can group failures.
"""

from __future__ import annotations


class TalkwireError(Exception):
    """Base of every error talkwire raises on purpose."""

    reason: str = "error"

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Permanent(TalkwireError):
    """Retrying cannot help: record the reason and move on."""


class Transient(TalkwireError):
    """Retrying later may help: back off and try again."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after


class Overrun(TalkwireError):
    """Work ended past the task's soft time limit although the limit's signal never arrived
    (Python drops an exception raised inside a `__del__`); handled like the limit itself."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("time_limit", detail)


class ConfigError(Exception):
    """A setting is missing or invalid; raised at start, never at run time."""
