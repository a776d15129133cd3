"""A rate-limited batch LLM pipeline on Celery, and ``make demo``, which runs it end to end.

- ``app.py``: the Celery app (a ``RateLimitedTask`` with rpm and tpm limits, and a plain
  task with Celery's ``rate_limit`` for ``--compare``);
- ``workload.py``: the prompts (``prompts.jsonl``), the token estimate, the limits;
- ``runner.py``: ``python -m examples.llm_pipeline``: servers, workers, the batch, a live
  view, the report and the chart (``report.py``).
"""
