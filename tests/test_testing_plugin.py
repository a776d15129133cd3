"""zae-celery's pytest plugin (entry point ``pytest11``): off unless enabled, enabled by
``--zae-celery``, the ini key ``zae_celery`` or ``pytest_plugins``; and the example test
of docs/testing.md, run as a user runs it (a pytest of its own, in a subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "testing"

USES_THE_FIXTURES = """
def test_the_clock_moves_only_when_told(zae, zae_clock, zae_limiter):
    start = zae_clock()
    zae_limiter.sleep(12.5)
    assert zae_clock() - start == 12.5 and zae.clock is zae_clock
"""


def pytest_run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python -m pytest ARGS`` in a process of its own (this environment's plugins)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_docs_example_passes_with_the_plugin_enabled() -> None:
    done = pytest_run("--zae-celery", str(EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr
    tests = len(re.findall(r"^def test_", (EXAMPLE / "test_tasks.py").read_text(), re.M))
    assert f"{tests} passed" in done.stdout, done.stdout


def test_the_plugin_is_off_unless_enabled(tmp_path: Path) -> None:
    (tmp_path / "test_uses.py").write_text(USES_THE_FIXTURES)
    done = pytest_run(str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fixture 'zae' not found" in done.stdout


@pytest.mark.parametrize(
    "enable",
    [
        {"pytest.ini": "[pytest]\nzae_celery = true\n"},
        {"conftest.py": 'pytest_plugins = ["zae_celery.testing.fixtures"]\n'},
        {  # both ways at once: registered once
            "pytest.ini": "[pytest]\nzae_celery = true\n",
            "conftest.py": 'pytest_plugins = ["zae_celery.testing.fixtures"]\n',
        },
    ],
    ids=["ini", "pytest_plugins", "both"],
)
def test_the_plugin_is_enabled_by_configuration(tmp_path: Path, enable: dict[str, str]) -> None:
    for name, text in enable.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "test_uses.py").write_text(USES_THE_FIXTURES)
    done = pytest_run(str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_the_docs_quote_the_example_as_it_is() -> None:
    docs = (REPO / "docs" / "testing.md").read_text()
    for name in ("tasks.py", "test_tasks.py"):
        assert (EXAMPLE / name).read_text() in docs, f"docs/testing.md misquotes {name}"
