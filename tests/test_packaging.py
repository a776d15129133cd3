"""The wheel installs one top-level package, with core/, infra/ and templates inside it,
and the public test helpers (``zae_celery.testing``) but not the repository's harness."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def unpacked(wheel: zipfile.ZipFile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel's files, as an installer would lay them out in site-packages."""
    site = tmp_path_factory.mktemp("site")
    wheel.extractall(site)
    return site


def run_from_wheel(site: Path, code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports zae_celery from ``site`` (not from
    the repository: the working directory is ``site``'s parent); its standard output."""
    prelude = f"import sys\nsys.path.insert(0, {str(site)!r})\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=site.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


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


def test_testing_ships_and_the_harness_does_not(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for module in ("__init__", "servers", "counting", "_moto_serial"):
        assert f"zae_celery/testing/{module}.py" in names
    assert not [n for n in names if n.startswith("zae_celery/local/")]
    harness = {"provider.py", "workers.py", "fsbroker.py"}  # harness/ in the repository
    assert not [n for n in names if n.rsplit("/", 1)[-1] in harness]


def test_importing_the_wheel_registers_no_kombu_transport(unpacked: Path) -> None:
    code = f"""
import importlib, json, pkgutil
from kombu.transport import TRANSPORT_ALIASES
before = dict(TRANSPORT_ALIASES)
import zae_celery, zae_celery.testing
assert zae_celery.__file__.startswith({str(unpacked)!r}), zae_celery.__file__
modules = ["zae_celery", "zae_celery.testing"]
for info in pkgutil.walk_packages(zae_celery.__path__, "zae_celery."):
    importlib.import_module(info.name)
    modules.append(info.name)
changed = {{k: v for k, v in TRANSPORT_ALIASES.items() if before.get(k) != v}}
print(json.dumps({{"modules": modules, "changed": changed}}))
"""
    result = json.loads(run_from_wheel(unpacked, code))
    assert "zae_celery.testing.servers" in result["modules"]
    assert result["changed"] == {}


def test_the_harness_is_not_importable_from_the_wheel(unpacked: Path) -> None:
    code = """
import importlib
for name in ("zae_celery.local", "zae_celery.fsbroker", "harness"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        print(name)
"""
    gone = run_from_wheel(unpacked, code).split()
    assert gone == ["zae_celery.local", "zae_celery.fsbroker", "harness"]


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


def _resolve(tmp_path: Path, name: str, *requirements: str) -> dict[str, str]:
    """What pip would install for ``requirements`` into an empty environment."""
    report = tmp_path / f"{name}.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
    result = subprocess.run(
        [*pip, "--report", str(report), *requirements],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        from tests.conftest import unavailable

        unavailable(f"pip could not resolve from the package index: {result.stderr[-300:]}")
    import json

    data = json.loads(report.read_text())
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in data["install"]}


def test_installing_keeps_the_newest_boto3(tmp_path: Path) -> None:
    """``pip install zae-celery`` beside the newest boto3 keeps it: nothing in the core
    dependencies pins botocore (the asyncio client is the [async] extra)."""
    newest = _resolve(tmp_path, "alone", "boto3")
    together = _resolve(tmp_path, "with", str(REPO), "boto3")
    assert together["boto3"] == newest["boto3"]
    assert together["botocore"] == newest["botocore"]
    assert "aiobotocore" not in together and "aioboto3" not in together


def test_zae_celery_reexports_every_public_name_of_the_core() -> None:
    missing = set(zae_celery.core.__all__) - set(zae_celery.__all__)
    assert not missing, f"zae_celery does not re-export {sorted(missing)}"
    for name in zae_celery.core.__all__:
        assert getattr(zae_celery, name) is getattr(zae_celery.core, name)
