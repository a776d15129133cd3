"""The repository's own harness for the demo, the benchmarks and the tests; not shipped.

Run from the repository root (``python -m examples.llm_pipeline``, ``python -m
benchmarks.celery``, ``pytest``), where this package is importable, as it is for the
``celery worker`` processes those programs start with the repository root as their
working directory. The wheel holds only ``zae_celery``; what users need for their own
tests is :mod:`zae_celery.testing`.

- :mod:`harness.provider`: an HTTP LLM provider on 127.0.0.1 that speaks OpenAI's and
  Anthropic's wire formats (the official SDKs work against it), enforces its own rpm,
  tpm, itpm and otpm limits (429 with ``Retry-After`` and the providers' rate-limit
  headers) on an injectable clock, and records every request;
- :mod:`harness.workers`: a fleet of real ``celery worker`` processes, each in its own
  process group, waited for until ready and stopped by PID;
- :mod:`harness.fsbroker`: a kombu filesystem transport with atomic publishes
  (``zaefs://``), registered with kombu only by :func:`harness.fsbroker.register`;
- :mod:`harness.stores`: a key prefix of each run's own on a Redis store the user names.
"""
