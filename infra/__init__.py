"""zae_celery.infra: CloudFormation assets for the engine's DynamoDB table."""

from __future__ import annotations

from importlib import resources

__all__ = ["template_text"]


def template_text(name: str = "table.yaml") -> str:
    """The text of a CloudFormation template shipped inside the package."""
    return resources.files("zae_celery.infra.templates").joinpath(name).read_text()
