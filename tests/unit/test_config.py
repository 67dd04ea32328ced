"""Settings are validated at start, with messages an operator can act on."""

from __future__ import annotations

import pytest

from worker.config import load_settings
from worker.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("TALKWIRE_") or key in {"DATABASE_URL", "REDIS_URL"}:
            monkeypatch.delenv(key)


def test_defaults_use_the_embedded_servers() -> None:
    settings = load_settings()
    assert settings.embedded and settings.demo_enabled
    assert settings.fetch_limits().allow_networks == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TALKWIRE_FETCH_DEADLINE": "soon"}, "TALKWIRE_FETCH_DEADLINE"),
        ({"TALKWIRE_FETCH_MAX_BYTES": "-1"}, "TALKWIRE_FETCH_MAX_BYTES"),
        ({"DATABASE_URL": "mysql://x", "REDIS_URL": "redis://x"}, "DATABASE_URL"),
        ({"TALKWIRE_FETCH_ALLOW_NETWORKS": "not-a-cidr"}, "TALKWIRE_FETCH_ALLOW_NETWORKS"),
        ({"TALKWIRE_VISIBILITY_TIMEOUT": "100"}, "redelivers tasks that are still running"),
        ({"TALKWIRE_TASK_TIME_LIMIT": "60", "TALKWIRE_TASK_SOFT_TIME_LIMIT": "90"},
         "TALKWIRE_TASK_TIME_LIMIT"),
        ({"DATABASE_URL": "postgresql://localhost/x"}, "set both DATABASE_URL and REDIS_URL"),
        ({"TALKWIRE_MAX_DELIVERIES": "9"}, "TALKWIRE_MAX_DELIVERIES must exceed"),
        # 30 s of fetch plus 90 s of backoff on a full Redis would reach the 120 s soft limit.
        ({"TALKWIRE_PUBLISH_BACKOFF_MAX": "90"}, "PUBLISH_BACKOFF_MAX must stay below"),
    ],
)
def test_bad_values_fail_clearly(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                 message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert message in str(info.value)


def test_allow_list_parses_comma_separated_cidrs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALKWIRE_FETCH_ALLOW_NETWORKS", "127.0.0.1/32, ::1")
    assert [str(n) for n in load_settings().fetch_limits().allow_networks] == ["127.0.0.1/32", "::1/128"]
