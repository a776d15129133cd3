"""Unit tests of rate-limited tasks with zae-celery's pytest plugin (docs/testing.md)."""
