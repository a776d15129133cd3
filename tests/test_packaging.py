"""The wheel installs one top-level package, with core/, infra/ and templates inside it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import zae_celery
import zae_celery.core

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("zae_celery-*.whl")
    return zipfile.ZipFile(path)


def test_only_zae_celery_at_top_level(wheel: zipfile.ZipFile) -> None:
    tops = {name.split("/", 1)[0] for name in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert tops - dist_info == {"zae_celery"}


def test_core_infra_and_templates_are_inside(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for module in ("engine", "bucket", "limiter", "aio", "limits", "errors"):
        assert f"zae_celery/core/{module}.py" in names
    assert "zae_celery/infra/__init__.py" in names
    for module in ("__init__", "options", "errors", "stack", "table", "limits", "buckets"):
        assert f"zae_celery/cli/{module}.py" in names  # the console script's package
    templates = [n for n in names if n.startswith("zae_celery/infra/templates/")]
    assert any(n.endswith(".yaml") for n in templates), templates
    assert "zae_celery/py.typed" in names and "zae_celery/core/py.typed" in names


def test_editable_install_maps_core_into_the_package() -> None:
    import zae_celery.core
    import zae_celery.infra

    assert Path(zae_celery.core.__file__).resolve().parent == REPO / "core"
    assert Path(zae_celery.infra.__file__).resolve().parent == REPO / "infra"


def test_template_ships_and_passes_cfn_lint(tmp_path: Path) -> None:
    from zae_celery.infra import template_text

    text = template_text()
    assert "AWS::DynamoDB::Table" in text
    path = tmp_path / "table.yaml"
    path.write_text(text)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zae_celery_reexports_every_public_name_of_the_core() -> None:
    missing = set(zae_celery.core.__all__) - set(zae_celery.__all__)
    assert not missing, f"zae_celery does not re-export {sorted(missing)}"
    for name in zae_celery.core.__all__:
        assert getattr(zae_celery, name) is getattr(zae_celery.core, name)
