"""zae-celery's pytest plugin: installed with the package (entry point ``pytest11``),
off unless enabled.

Enable it with ``pytest --zae-celery``, with ``zae_celery = true`` in the ``[pytest]``
(or ``[tool.pytest.ini_options]``) section, or in a ``conftest.py`` with
``pytest_plugins = ["zae_celery.testing.fixtures"]``. It then provides the fixtures of
:mod:`zae_celery.testing.fixtures` (``zae``, ``zae_clock``, ``zae_limiter``). Disabled,
it adds only its option and ini key, and imports nothing else.
"""

from __future__ import annotations

from typing import Any

FIXTURES = "zae_celery.testing.fixtures"
"""The module of the fixtures (what ``pytest_plugins`` names to enable them directly)."""


def pytest_addoption(parser: Any) -> None:
    """``--zae-celery`` and the ini key ``zae_celery``."""
    group = parser.getgroup("zae-celery")
    group.addoption(
        "--zae-celery",
        action="store_true",
        default=False,
        help="enable zae-celery's fixtures (zae, zae_clock, zae_limiter)",
    )
    parser.addini("zae_celery", "enable zae-celery's fixtures", type="bool", default=False)


def pytest_configure(config: Any) -> None:
    """Register the fixtures when enabled (once, whichever way it was)."""
    if not (config.getoption("zae_celery") or config.getini("zae_celery")):
        return
    if config.pluginmanager.has_plugin(FIXTURES):
        return
    import importlib

    config.pluginmanager.register(importlib.import_module(FIXTURES), FIXTURES)
