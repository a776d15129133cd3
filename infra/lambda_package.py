"""The usage aggregator's Lambda package, built from the installed zae-celery.

The function needs :mod:`zae_celery.accounting` alone, which imports only the standard
library and boto3 (the Lambda runtime's), so the zip holds that package's modules and an
empty ``zae_celery/__init__.py`` (the real one imports Celery). The archive is the same
byte for byte for the same code (fixed timestamps and order), so a deploy can tell
whether the function's code is current from its SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from importlib import resources
from typing import Any

__all__ = ["HANDLER", "build_aggregator_zip", "code_sha256", "upload_aggregator"]

HANDLER = "zae_celery.accounting.handler.handler"
"""The function's handler (the template's ``Handler``)."""
_STUB = '"""zae-celery\'s usage aggregator: only zae_celery.accounting is packaged here."""\n'
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _entry(archive: zipfile.ZipFile, name: str, text: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, text)


def build_aggregator_zip() -> bytes:
    """The aggregator's deployment package (a zip, as bytes)."""
    package = resources.files("zae_celery.accounting")
    modules = sorted(
        (entry.name, entry.read_bytes())
        for entry in package.iterdir()
        if entry.is_file() and entry.name.endswith(".py")
    )
    if not any(name == "handler.py" for name, _ in modules):
        raise RuntimeError("zae_celery.accounting has no handler.py: the installation is broken")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        _entry(archive, "zae_celery/__init__.py", _STUB.encode())
        for name, text in modules:
            _entry(archive, f"zae_celery/accounting/{name}", text)
    return buffer.getvalue()


def code_sha256(package: bytes) -> str:
    """The package's SHA-256 as Lambda reports it (``CodeSha256``: base64)."""
    return base64.b64encode(hashlib.sha256(package).digest()).decode()


def upload_aggregator(lambda_client: Any, function_name: str) -> bool:
    """Put the installed aggregator's code in ``function_name``; False when it was
    already that code."""
    package = build_aggregator_zip()
    current = lambda_client.get_function_configuration(FunctionName=function_name)
    if current.get("CodeSha256") == code_sha256(package):
        return False
    lambda_client.update_function_code(FunctionName=function_name, ZipFile=package)
    return True
