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
    for setting in SETTINGS[1:]:
        assert getattr(defaults, setting.attr) == setting.validate(setting.default)
        with pytest.raises(ValidationError) as info:
            Settings.from_conf({"zae_table_name": "zae-options", setting.name: object()})
        assert info.value.field == setting.name
        assert info.value.allowed == setting.check.allowed


def test_the_docs_show_the_declared_settings() -> None:
    assert settings_table() in (REPO / "docs" / "celery.md").read_text()
