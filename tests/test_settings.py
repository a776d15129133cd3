"""zae-celery's settings: every ``zae_`` setting declared once, read and validated
through its declaration, and shown in the docs as declared."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from zae_celery import ValidationError
from zae_celery.settings import SETTINGS, Settings, settings_table

REPO = Path(__file__).resolve().parent.parent


def test_non_iterable_queue_limits_are_a_validation_error() -> None:
    conf = {"zae_table_name": "zae-options", "zae_queue_limits": {"q": 5}}
    with pytest.raises(ValidationError) as info:
        Settings.from_app(SimpleNamespace(conf=conf))
    assert info.value.field == "zae_queue_limits['q']"
    assert "[Limit, ...]" in info.value.allowed


def test_every_setting_is_declared_once_and_read_through_its_declaration() -> None:
    assert [f.name for f in fields(Settings)] == [s.attr for s in SETTINGS]
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    defaults = Settings.from_conf({"zae_table_name": "zae-options"})
    for setting in (s for s in SETTINGS if s.name != "zae_table_name"):
        assert getattr(defaults, setting.attr) == setting.validate(setting.default)
        with pytest.raises(ValidationError) as info:
            Settings.from_conf({"zae_table_name": "zae-options", setting.name: object()})
        assert info.value.field == setting.name
        assert info.value.allowed == setting.check.allowed


def test_the_docs_show_the_declared_settings() -> None:
    assert settings_table() in (REPO / "docs" / "celery.md").read_text()


def test_a_store_url_replaces_the_table_settings() -> None:
    settings = Settings.from_conf({"zae_store_url": "dynamodb://zae-t?region=eu-west-1"})
    assert (settings.store_url, settings.table_name) == ("dynamodb://zae-t?region=eu-west-1", None)
    with pytest.raises(ValidationError) as info:
        Settings.from_conf({"zae_store_url": "memory://x", "zae_table_name": "zae-t"})
    assert info.value.field == "zae_store_url" and "zae_table_name" in info.value.problem
    redis = Settings.from_conf({"zae_store_url": "redis://redis-host:6379/1?prefix=zae"})
    assert (redis.store_url, redis.table_name) == ("redis://redis-host:6379/1?prefix=zae", None)
    bad_urls = (
        "redis:///0",  # no host
        "redis://h/one",  # the database is not a number
        "redis://h/0?prefix={x}",  # braces would break the hash tag
        "redis+cluster://h:7000/3",  # a cluster has only database 0
        "dynamodb://",
        "dynamodb://zae-t?colour=red",
        "memory://x?y=1",
    )
    for bad in bad_urls:
        with pytest.raises(ValidationError) as info:
            Settings.from_conf({"zae_store_url": bad})
        assert info.value.field == "zae_store_url", bad
    with pytest.raises(ValidationError) as info:
        Settings.from_conf({})  # neither
    assert info.value.field == "zae_table_name"


def test_a_task_on_a_memory_store_url_shares_it_with_the_process(tmp_path: Path) -> None:
    """``zae_store_url = "memory://NAME"``: the task's limiter and any limiter of the same
    URL in the process share the buckets (eager runs, unit tests)."""
    import uuid

    from celery import Celery

    from zae_celery import Limit, RateLimitedTask, RateLimiter

    url = f"memory://settings-{uuid.uuid4().hex[:8]}"
    app = Celery("store-url", set_as_current=False)
    app.conf.zae_store_url = url
    app.conf.zae_admission = False

    @app.task(base=RateLimitedTask, bind=True, rate_limits=[Limit.per_minute("rpm", 3)])
    def ping(self: object) -> str:
        return "pong"

    assert [ping.apply().get() for _ in range(3)] == ["pong"] * 3
    observer = RateLimiter.from_url(url)
    # Three of three taken (a token refills every 20 s of wall time).
    assert observer.available("default", ping.name, [Limit.per_minute("rpm", 3)])["rpm"] < 1
