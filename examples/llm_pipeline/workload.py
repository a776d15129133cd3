"""What the pipeline's tasks and its runner share: the prompts, the token estimate, the
limits' shape and the HTTP call to the provider."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from zae_celery import Limit

PROMPTS = Path(__file__).with_name("prompts.jsonl")
MODEL = "local-llm"


@dataclass(frozen=True)
class Prompt:
    """One line of ``prompts.jsonl``."""

    id: str
    kind: str
    prompt: str
    max_tokens: int


def load_prompts(path: Path = PROMPTS) -> list[Prompt]:
    """Every prompt of the bundled data file, in order."""
    with path.open(encoding="utf-8") as lines:
        return [Prompt(**json.loads(line)) for line in lines if line.strip()]


def batch(count: int, path: Path = PROMPTS) -> list[Prompt]:
    """``count`` prompts in file order, starting over when the file runs out."""
    prompts = load_prompts(path)
    return [prompts[i % len(prompts)] for i in range(count)]


def estimate_tokens(prompt: str, max_tokens: int) -> int:
    """The client's estimate before the call: the prompt at four characters a token plus
    the completion's cap, as providers reserve it. The bill (``usage.total_tokens``) is
    known only after the call and is usually lower; ``report_usage`` gives back the
    difference."""
    return math.ceil(len(prompt) / 4) + max_tokens


def limits(rpm: int, tpm: int, window: float) -> list[Limit]:
    """The per-minute limits as buckets holding ``window`` seconds of each: the shape the
    local provider enforces (without its slack)."""
    return [
        Limit.custom("rpm", bucket_size(rpm, window), rpm, 60),
        Limit.custom("tpm", bucket_size(tpm, window), tpm, 60),
    ]


def bucket_size(per_minute: int, window: float) -> int:
    """Tokens a bucket of ``window`` seconds of ``per_minute`` holds (at least 1)."""
    return max(1, math.floor(per_minute * window / 60))


@dataclass(frozen=True)
class Reply:
    """The provider's answer: its bill, or its ``Retry-After`` on a 429."""

    status: int
    total_tokens: int = 0
    retry_after: float | None = None


def call_provider(url: str, prompt: Prompt, timeout: float = 30.0) -> Reply:
    """POST one chat completion; a 429 is returned (with Retry-After), not raised."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt.prompt}],
        "max_tokens": prompt.max_tokens,
    }
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            usage = json.loads(answer.read())["usage"]
    except urllib.error.HTTPError as exc:
        if exc.code != 429:
            raise
        return Reply(429, retry_after=float(exc.headers.get("Retry-After") or 1.0))
    return Reply(200, total_tokens=int(usage["total_tokens"]))
