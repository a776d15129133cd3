"""The Celery layer and the CLI use the core's public API only (docs/api.md).

They import from ``zae_celery.core``, ``zae_celery.core.limits`` (the limit grammar) and
``zae_celery.core.stores`` and nothing deeper,
and they reach into no lease's state, no limiter's engine and no private member of a
core object. Changing the engine's internals then never breaks them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import zae_celery
import zae_celery.core

REPO = Path(__file__).resolve().parent.parent
LAYER = sorted(
    p for p in (REPO / "zae_celery").rglob("*.py") if "core" not in p.relative_to(REPO).parts[1:2]
)
PUBLIC_MODULES = {"zae_celery.core", "zae_celery.core.limits", "zae_celery.core.stores"}
"""The core, its limit grammar and token checks, its stores."""
PRIVATE_ATTRIBUTES = {"engine", "state", "_state", "_guarded", "_targets"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if module.startswith("zae_celery.core") and module not in PUBLIC_MODULES:
                found.append(f"{path.name}:{node.lineno} imports {module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zae_celery.core.") and alias.name not in PUBLIC_MODULES:
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    return found


def test_the_celery_layer_and_the_cli_use_the_public_core_only() -> None:
    assert any(p.name == "task.py" for p in LAYER) and any("cli" in p.parts for p in LAYER)
    violations = [v for path in LAYER for v in _violations(path)]
    assert violations == []


def test_the_check_finds_a_reach_into_the_engine(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from zae_celery.core.engine import Engine\n"
        "def f(lease, limiter):\n"
        "    return lease.state.claim, limiter.engine.now_ms()\n"
    )
    assert len(_violations(bad)) == 3


def test_every_public_name_is_documented() -> None:
    api = (REPO / "docs" / "api.md").read_text()
    core_names = set(zae_celery.core.__all__)
    missing = sorted(name for name in core_names if f"`{name}" not in api and name not in api)
    assert missing == []
    assert set(zae_celery.__all__) >= core_names
