"""How the commands fail: operational errors (exit code 1) and the translation of engine,
botocore and stack errors into exit codes 1 and 2, each with a next step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from zae_celery.core import (
    IncompatibleSchema,
    RateLimiterUnavailable,
    ValidationError,
    ZaeError,
)
from zae_celery.infra.stack import StackError

if TYPE_CHECKING:
    from zae_celery.cli.options import Target

__all__ = ["NO_CREDENTIALS", "NO_REGION", "OperationalError", "translate_errors"]


class OperationalError(click.ClickException):
    """The command was fine but the operation failed (exit code 1)."""

    exit_code = 1


@contextlib.contextmanager
def translate_errors(target: Target | None = None) -> Iterator[None]:
    """Turn engine, botocore and stack errors into exit codes 1 or 2 with a next step."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )
    from botocore.parsers import ResponseParserError

    where = target.where() if target is not None else "AWS"
    try:
        yield
    except click.ClickException:
        raise
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from exc
    except IncompatibleSchema as exc:
        raise OperationalError(str(exc)) from exc
    except RateLimiterUnavailable as exc:
        if target is not None and target.redis:  # no table to check
            raise OperationalError(
                f"{exc}\nCheck that {where} is reachable (and the URL's password, if any)."
            ) from exc
        raise OperationalError(
            f"{exc}\nCheck that {where} is reachable and that the table exists "
            "('zae-celery status', or 'zae-celery create-table' on a local endpoint)."
        ) from exc
    except ZaeError as exc:
        raise OperationalError(str(exc)) from exc
    except StackError as exc:
        text = str(exc)
        if exc.events:
            text += "\nFailing stack events:\n" + "\n".join(f"  {e.line()}" for e in exc.events)
        raise OperationalError(text) from exc
    except ProfileNotFound as exc:
        raise click.UsageError(f"{exc}: pass an existing --profile or set AWS_PROFILE") from exc
    except NoRegionError as exc:
        raise click.UsageError(NO_REGION) from exc
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise OperationalError(NO_CREDENTIALS) from exc
    except EndpointConnectionError as exc:
        raise OperationalError(
            f"cannot reach {where}: {exc}. Check --endpoint-url (or AWS_ENDPOINT_URL) and "
            "that the endpoint is running."
        ) from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", ""))
        hint = _CLIENT_ERROR_HINTS.get(code, "Fix the cause above and run the command again.")
        raise OperationalError(f"{where} refused the request: {code}: {message}\n{hint}") from exc
    except BotoCoreError as exc:
        raise OperationalError(f"request to {where} failed: {exc}") from exc
    except ResponseParserError as exc:
        raise OperationalError(
            f"{where} sent a response that is not an AWS response ({str(exc)[:200]}); check "
            "that --endpoint-url points at DynamoDB/CloudFormation, and its logs."
        ) from exc


NO_REGION = (
    "no AWS region configured: pass --region (e.g. --region eu-west-1), set AWS_REGION, "
    "or put a region in your AWS profile"
)
NO_CREDENTIALS = (
    "no AWS credentials found: configure them the usual way (AWS_PROFILE, "
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, 'aws configure', an instance role). A local "
    "endpoint accepts any values: export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local"
)
_CLIENT_ERROR_HINTS = {
    "AccessDenied": "Your AWS identity lacks a permission: ask for it, or use another --profile.",
    "AccessDeniedException": (
        "Your AWS identity lacks a permission: attach the stack's AdminPolicyArn "
        "('zae-celery status' prints it), or use another --profile."
    ),
    "UnrecognizedClientException": "The credentials are invalid: check your AWS profile or keys.",
    "InvalidClientTokenId": "The credentials are invalid: check your AWS profile or keys.",
    "ExpiredToken": "The credentials have expired: refresh them (e.g. 'aws sso login').",
    "ExpiredTokenException": "The credentials have expired: refresh them (e.g. 'aws sso login').",
    "InsufficientCapabilitiesException": "The stack needs CAPABILITY_IAM; report this as a bug.",
}
