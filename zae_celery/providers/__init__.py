"""What LLM providers tell their clients about rate limits, read into plain values.

:func:`~zae_celery.providers.headers.read_rate_limits` parses the headers of a response
(a 429, or a success) from OpenAI, Anthropic and any API that sends ``Retry-After``.
Nothing here talks to a provider or imports its SDK.
"""

from zae_celery.providers.headers import *  # noqa: F403  (the parser is the package's API)
from zae_celery.providers.headers import __all__ as __all__
