"""The local provider in both wire formats, through the official SDKs (no retries): a
success parses, the rate-limit headers read back through our own parser
(:func:`zae_celery.providers.read_rate_limits`) as the buckets stand on the provider's
injected clock, a 429 raises the SDK's RateLimitError with a retry-after we read, an
overload is 529 / 503 and charges nothing, the ``"request"`` accounting charges prompt +
completion cap, and the itpm and otpm buckets refuse on their own. Requests in flight are
counted from real concurrent requests whose replies a hold keeps back, and
``max_in_flight`` refuses one more at once in both formats."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import anthropic
import openai
import pytest

from harness.provider import IN_FLIGHT, LocalProvider, _go_duration, billed_usage, count_tokens
from zae_celery.providers import Window, parse_go_duration, read_rate_limits
from zae_celery.testing import ManualClock

PROMPT = "Name three rivers."
SYSTEM = "Be brief."


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def openai_client(provider: LocalProvider) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=provider.base_url + "/v1", max_retries=0)


def anthropic_client(provider: LocalProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="test", base_url=provider.base_url, max_retries=0)


def chat(client: openai.OpenAI, text: str = PROMPT, **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="gpt-local", messages=[{"role": "user", "content": text}], **kwargs
    )


def message(client: anthropic.Anthropic, text: str = PROMPT, max_tokens: int = 50) -> Any:
    return client.messages.with_raw_response.create(
        model="claude-local",
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": text}],
    )


def until_second(clock: ManualClock, seconds: float) -> float:
    """The reset an Anthropic header gives for a bucket full ``seconds`` from now: the
    timestamp is rounded up to a whole second."""
    return math.ceil(clock() + seconds) - clock()


@pytest.fixture
def served() -> Iterator[list[LocalProvider]]:
    """Providers the test starts, stopped at its end whatever happens."""
    providers: list[LocalProvider] = []
    yield providers
    for provider in providers:
        provider.stop()


def serve(served: list[LocalProvider], **kwargs: Any) -> LocalProvider:
    provider = LocalProvider(**kwargs)
    served.append(provider)
    return provider.start()


# -- OpenAI ------------------------------------------------------------------------------------
def test_openai_success_parses_and_its_headers_read_back(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=60, tpm=6000, slack_tokens=100, seed=3, clock=clock)
    bill = billed_usage(PROMPT, 50, seed=3)
    with openai_client(provider) as client:
        raw = chat(client, max_tokens=50)
        completion = raw.parse()
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == count_tokens(PROMPT)
        assert completion.usage.completion_tokens == bill.completion_tokens
        assert completion.usage.total_tokens == bill.total_tokens
        assert completion.choices[0].message.role == "assistant"
        assert completion.model == "gpt-local"

        limits = read_rate_limits(raw.headers, now=clock())
        assert limits.retry_after is None
        # 60 rpm: one request a second; the bucket (60 + 1 of slack) lacks one request.
        assert limits.windows["requests"] == Window(60, 59, 1.0)
        # 6000 tpm: 100 tokens a second; it lacks the request's real total.
        tokens = limits.windows["tokens"]
        assert (tokens.limit, tokens.remaining) == (6000, 6000 - bill.total_tokens)
        assert tokens.reset_after == pytest.approx(bill.total_tokens / 100)
        record = provider.records[0]
        assert raw.headers["x-request-id"] == record.request_id
        assert (record.api, record.status, record.charged_tokens) == (
            "openai",
            200,
            bill.total_tokens,
        )

        # Half a second later: half a request back, another one charged.
        clock.advance(0.5)
        raw = chat(client, max_tokens=50)
        assert raw.headers["x-ratelimit-reset-requests"] == "1.5s"
        assert read_rate_limits(raw.headers, now=clock()).windows["requests"] == Window(60, 58, 1.5)


def test_openai_429_raises_rate_limit_error_with_a_retry_after_we_read(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=1, slack_requests=0, clock=clock)
    with openai_client(provider) as client:
        chat(client)
        clock.advance(15.25)
        with pytest.raises(openai.RateLimitError) as caught:
            chat(client)
        error = caught.value
        assert (error.code, error.type) == ("rate_limit_exceeded", "requests")
        assert error.param is None
        limits = read_rate_limits(error.response.headers, now=clock())
        assert limits.retry_after == 44.75  # to the millisecond, from retry-after-ms
        assert error.response.headers["retry-after"] == "44.750"
        assert limits.windows["requests"] == Window(1, 0, 44.75)
        assert "tokens" not in limits.windows  # no tpm limit, no tokens headers
        record = provider.records[1]
        assert (record.status, record.retry_after, record.limited_by) == (429, 44.75, "requests")
        assert record.charged_tokens == 0

        clock.advance(44.75)  # exactly when it said
        assert chat(client).http_response.status_code == 200
    assert [r.status for r in provider.records] == [200, 429, 200]


def test_openai_accepts_list_content_and_max_completion_tokens(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=60, clock=clock)
    with openai_client(provider) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-local",
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
            ],
            max_completion_tokens=40,
        )
    usage = raw.parse().usage
    assert usage is not None
    assert usage.prompt_tokens == count_tokens(SYSTEM) + count_tokens(PROMPT)
    assert provider.records[0].max_tokens == 40
    assert usage.completion_tokens <= 40


# -- Anthropic ---------------------------------------------------------------------------------
def test_anthropic_success_parses_and_its_headers_read_back(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=60, tpm=6000, itpm=3000, otpm=1200, seed=5, clock=clock)
    bill = billed_usage(f"{SYSTEM}\n{PROMPT}", 50, seed=5)
    with anthropic_client(provider) as client:
        raw = client.messages.with_raw_response.create(
            model="claude-local",
            max_tokens=50,
            system=SYSTEM,
            messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        )
    reply = raw.parse()
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.model == "claude-local"
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert reply.content[0].type == "text"
    assert reply.usage.input_tokens == count_tokens(SYSTEM) + count_tokens(PROMPT)
    assert reply.usage.output_tokens == bill.completion_tokens
    assert reply.usage.cache_read_input_tokens == 0
    assert reply.usage.cache_creation_input_tokens == 0

    limits = read_rate_limits(raw.headers, now=clock())
    windows = limits.windows
    assert windows["requests"] == Window(60, 59, until_second(clock, 1.0))
    prompt, completion = bill.prompt_tokens, bill.completion_tokens
    assert windows["input-tokens"] == Window(3000, 3000 - prompt, until_second(clock, prompt / 50))
    assert windows["output-tokens"] == Window(
        1200, 1200 - completion, until_second(clock, completion / 20)
    )
    # tokens-*: the most restrictive token bucket, here the output one (fewest left).
    assert windows["tokens"] == windows["output-tokens"]
    record = provider.records[0]
    assert raw.headers["request-id"] == record.request_id
    assert record.api == "anthropic"
    assert (record.charged_tokens, record.charged_input_tokens, record.charged_output_tokens) == (
        bill.total_tokens,
        prompt,
        completion,
    )


def test_records_keep_who_a_request_is_for_and_its_metadata(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=60, clock=clock)
    with openai_client(provider) as client:
        chat(client, user="tenant-a", metadata={"task": "t1", "attempt": "0"})
        chat(client)  # untagged
        client.chat.completions.with_raw_response.create(  # what is not a string is left out
            model="gpt-local",
            messages=[{"role": "user", "content": PROMPT}],
            extra_body={"user": 7, "metadata": {"n": 1, "ok": "yes"}},
        )
    with anthropic_client(provider) as client:
        client.messages.with_raw_response.create(
            model="claude-local",
            max_tokens=50,
            messages=[{"role": "user", "content": PROMPT}],
            metadata={"user_id": "tenant-b"},
        )
    tagged, untagged, odd, anthropic_record = provider.records
    assert (tagged.user, dict(tagged.metadata)) == ("tenant-a", {"task": "t1", "attempt": "0"})
    assert tagged.metadata == (("attempt", "0"), ("task", "t1"))  # sorted pairs
    assert (untagged.user, untagged.metadata) == (None, ())
    assert (odd.user, odd.metadata) == (None, (("ok", "yes"),))
    assert anthropic_record.user == "tenant-b"
    assert provider.admit(billed_usage(PROMPT), user="direct").user == "direct"


def test_anthropic_429_raises_rate_limit_error_with_whole_seconds(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=1, slack_requests=0, clock=clock)
    with anthropic_client(provider) as client:
        message(client)
        clock.advance(15.25)
        with pytest.raises(anthropic.RateLimitError) as caught:
            message(client)
        error = caught.value
        assert isinstance(error.body, dict)
        assert error.body["type"] == "error"
        assert error.body["error"]["type"] == "rate_limit_error"
        assert error.response.headers["retry-after"] == "45"  # 44.75 s, rounded up
        limits = read_rate_limits(error.response.headers, now=clock())
        assert limits.retry_after == 45.0
        assert limits.windows["requests"] == Window(1, 0, until_second(clock, 44.75))
        assert provider.records[1].retry_after == 45.0
        clock.advance(44.75)
        assert message(client).http_response.status_code == 200


def test_a_cooldown_closes_the_key_after_a_429_without_extending_it(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    # 60 a minute, bucket of 1: the second request is 1 s early, and the key closes 20 s.
    provider = serve(served, rpm=60, window=1, slack_requests=0, cooldown=20, clock=clock)
    with openai_client(provider) as gpt:
        assert chat(gpt).http_response.status_code == 200
        for advance in (0.0, 5.0, 14.999):
            clock.advance(advance)
            with pytest.raises(openai.RateLimitError):
                chat(gpt)
        clock.advance(0.001)
        assert chat(gpt).http_response.status_code == 200
    records = provider.records
    assert [(r.status, r.retry_after, r.limited_by) for r in records] == [
        (200, None, None),
        (429, 20.0, "requests"),
        (429, 15.0, "requests"),  # inside the cooldown: the time left
        (429, 0.001, "requests"),
        (200, None, None),
    ]


def test_an_advertised_limit_is_stated_while_the_real_one_is_enforced(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(
        served, rpm=60, window=2, slack_requests=0, advertise={"requests": 600}, clock=clock
    )
    with openai_client(provider) as gpt:
        first = chat(gpt)
        assert first.headers["x-ratelimit-limit-requests"] == "600"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"  # of the 2 enforced
        chat(gpt)
        with pytest.raises(openai.RateLimitError):
            chat(gpt)
    with pytest.raises(ValueError, match="not set: input-tokens"):
        LocalProvider(rpm=60, advertise={"input-tokens": 5})


# -- overload ----------------------------------------------------------------------------------
def test_overload_refuses_every_request_and_charges_nothing(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=1, tpm=1000, slack_requests=0, clock=clock)
    provider.overload(5)
    with anthropic_client(provider) as claude, openai_client(provider) as gpt:
        with pytest.raises(anthropic.OverloadedError) as overloaded:
            message(claude)
        assert overloaded.value.status_code == 529
        assert overloaded.value.body == {
            "type": "error",
            "error": {"type": "overloaded_error", "message": "Overloaded"},
        }
        clock.advance(4.999)
        with pytest.raises(openai.InternalServerError) as unavailable:
            chat(gpt)
        assert unavailable.value.status_code == 503
        assert unavailable.value.body == {
            "message": "The server is overloaded",
            "type": "server_error",
            "param": None,
            "code": None,
        }

        clock.advance(0.001)  # over: the one request a minute was never charged
        assert message(claude).http_response.status_code == 200
    records = provider.records
    assert [(r.api, r.status) for r in records] == [
        ("anthropic", 529),
        ("openai", 503),
        ("anthropic", 200),
    ]
    assert [r.charged_tokens for r in records[:2]] == [0, 0]


# -- accounting --------------------------------------------------------------------------------
def test_request_accounting_charges_prompt_plus_the_completion_cap(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    prompt = count_tokens(PROMPT)
    # The tpm bucket holds exactly one request's prompt + cap: the real total (less than
    # that) would leave room for more, the cap does not.
    provider = serve(served, rpm=100, tpm=prompt + 300, accounting="request", clock=clock)
    bill = billed_usage(PROMPT, 300)
    assert bill.completion_tokens < 300
    with openai_client(provider) as client:
        raw = chat(client, max_tokens=300)
        assert raw.parse().usage.total_tokens == bill.total_tokens
        assert raw.headers["x-ratelimit-remaining-tokens"] == "0"
        with pytest.raises(openai.RateLimitError) as caught:
            chat(client, max_completion_tokens=1)
        assert caught.value.type == "tokens"
    records = provider.records
    assert records[0].charged_tokens == prompt + 300
    assert (records[1].status, records[1].limited_by) == (429, "tokens")
    # ... whose wait is for its own prompt + cap of 1 at (prompt + 300) tokens a minute.
    wait = math.ceil((prompt + 1) * 60 / (prompt + 300) * 1000) / 1000
    assert records[1].retry_after == wait


def test_completion_accounting_charges_the_real_total(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    bill = billed_usage(PROMPT, 300)
    provider = serve(served, rpm=100, tpm=10_000, clock=clock)
    with openai_client(provider) as client:
        raw = chat(client, max_tokens=300)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - bill.total_tokens)
    assert provider.records[0].charged_tokens == bill.total_tokens


def test_input_and_output_limits_refuse_on_their_own(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    bill = billed_usage(PROMPT, 50)
    prompt, completion = bill.prompt_tokens, bill.completion_tokens
    # Room for one prompt a minute; plenty of output.
    by_input = serve(served, rpm=100, itpm=prompt, otpm=10 * completion, clock=clock)
    with anthropic_client(by_input) as client:
        message(client)
        with pytest.raises(anthropic.RateLimitError) as caught:
            message(client)
    windows = read_rate_limits(caught.value.response.headers, now=clock()).windows
    assert windows["input-tokens"].remaining == 0
    # Refused by one bucket, charged on none: the output bucket holds the first request's
    # charge only.
    assert windows["output-tokens"].remaining == 9 * completion
    assert windows["tokens"] == windows["input-tokens"]
    assert "requests" in windows
    refused = by_input.records[1]
    assert (refused.limited_by, refused.retry_after) == ("input-tokens", 60.0)
    assert (refused.charged_input_tokens, refused.charged_output_tokens) == (0, 0)
    assert (
        by_input.records[0].charged_input_tokens,
        by_input.records[0].charged_output_tokens,
    ) == (
        prompt,
        completion,
    )

    # Room for one completion a minute; plenty of input. On the OpenAI route, which has
    # no headers for these limits, it is refused as a tokens limit.
    by_output = serve(served, rpm=100, itpm=10 * prompt, otpm=completion, clock=clock)
    with openai_client(by_output) as gpt:
        chat(gpt, max_tokens=50)
        with pytest.raises(openai.RateLimitError) as refused_openai:
            chat(gpt, max_tokens=50)
    assert refused_openai.value.type == "tokens"
    assert "tokens" not in read_rate_limits(refused_openai.value.response.headers).windows
    assert by_output.records[1].limited_by == "output-tokens"
    assert by_output.records[1].retry_after == 60.0


# -- the wire's small print --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.012, "12ms"),
        (0.0001, "1ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (59.999, "59.999s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_resets_are_go_durations_our_parser_reads(seconds: float, text: str) -> None:
    assert _go_duration(seconds) == text
    assert parse_go_duration(text) == pytest.approx(math.ceil(seconds * 1000) / 1000)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_body_that_is_not_json_is_a_400_in_the_route_s_shape(
    path: str, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=60)
    request = urllib.request.Request(provider.base_url + path, data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"
    assert provider.records == []  # never admitted, never recorded


# -- requests in flight ------------------------------------------------------------------------
def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON: the status and the JSON reply (an error status included)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def send(pool: ThreadPoolExecutor, provider: LocalProvider, api: str) -> Future[Any]:
    """One request from a thread of ``pool``, in the wire format ``api``."""
    body = {"model": "local", "max_tokens": 20, "messages": [{"role": "user", "content": PROMPT}]}
    url = provider.messages_url if api == "anthropic" else provider.url
    return pool.submit(post, url, body)


def test_requests_in_flight_are_counted_while_a_hold_keeps_their_replies(
    clock: ManualClock, served: list[LocalProvider]
) -> None:
    provider = serve(served, rpm=600, clock=clock)
    assert (provider.in_flight, provider.peak_in_flight) == (0, 0)
    with ThreadPoolExecutor(max_workers=4) as pool:
        with provider.hold() as hold:
            futures = [send(pool, provider, api) for api in ("openai", "anthropic") * 2]
            assert provider.wait_in_flight(4)
            assert (provider.in_flight, provider.peak_in_flight) == (4, 4)
            assert not any(future.done() for future in futures)  # every reply held
            # Each counted itself when it arrived, in some order.
            assert sorted(r.in_flight for r in provider.records) == [1, 2, 3, 4]
        assert hold.released
        assert [future.result(timeout=10)[0] for future in futures] == [200] * 4
    assert provider.wait_in_flight(0)
    assert provider.peak_in_flight == 4  # the peak stays until reset
    assert max(r.in_flight for r in provider.records) == 4  # ... and reads from the records

    provider.reset_peak()
    assert provider.peak_in_flight == 0
    assert post(provider.url, {})[0] == 200  # not held: the hold was released
    assert provider.wait_in_flight(0)
    assert (provider.peak_in_flight, provider.records[-1].in_flight) == (1, 1)


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_beyond_max_in_flight_a_request_is_refused_at_once_with_a_429(
    api: str, clock: ManualClock, served: list[LocalProvider]
) -> None:
    # A cooldown, to show that the cap's refusals do not close the key.
    provider = serve(served, rpm=600, max_in_flight=2, cooldown=20, clock=clock)
    with ThreadPoolExecutor(max_workers=2) as pool, provider.hold():
        futures = [send(pool, provider, api) for _ in range(2)]
        assert provider.wait_in_flight(2)
        # The third is answered while the two are held.
        if api == "openai":
            with openai_client(provider) as gpt, pytest.raises(openai.RateLimitError) as caught:
                chat(gpt)
            error = caught.value
            assert (error.code, error.type, error.param) == (
                "rate_limit_exceeded",
                "requests",
                None,
            )
            assert "requests in flight: Limit 2" in error.message
            headers = error.response.headers
            assert (headers["retry-after"], headers["retry-after-ms"]) == ("1.000", "1000")
            # Nothing charged: the rpm bucket lacks the two accepted requests only.
            assert headers["x-ratelimit-remaining-requests"] == "598"
        else:
            with (
                anthropic_client(provider) as claude,
                pytest.raises(anthropic.RateLimitError) as refused,
            ):
                message(claude)
            assert isinstance(refused.value.body, dict)
            assert refused.value.body["type"] == "error"
            assert refused.value.body["error"]["type"] == "rate_limit_error"
            assert "2 requests in flight" in refused.value.body["error"]["message"]
            headers = refused.value.response.headers
            assert headers["retry-after"] == "1"
            assert headers["anthropic-ratelimit-requests-remaining"] == "598"
        assert (provider.in_flight, provider.peak_in_flight) == (2, 2)  # not counted
        assert not any(future.done() for future in futures)
    assert [future.result(timeout=10)[0] for future in futures] == [200, 200]
    assert provider.wait_in_flight(0)

    # Room again, and the key is not closed.
    assert post(provider.messages_url if api == "anthropic" else provider.url, {})[0] == 200
    refused_record = provider.records[2]
    assert (refused_record.status, refused_record.limited_by) == (429, IN_FLIGHT)
    assert (refused_record.retry_after, refused_record.in_flight) == (1.0, 2)
    assert refused_record.charged_tokens == 0
    assert [r.status for r in provider.records] == [200, 200, 429, 200]
    assert provider.records[3].in_flight == 1


def test_a_hold_is_one_at_a_time_and_released_by_stop(served: list[LocalProvider]) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        LocalProvider(rpm=60, max_in_flight=0)
    provider = serve(served, rpm=600, max_in_flight=1)
    hold = provider.hold()
    with pytest.raises(RuntimeError, match="already holding"):
        provider.hold()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = send(pool, provider, "openai")
        assert provider.wait_in_flight(1)
        assert not provider.wait_in_flight(0, timeout=0)  # still held
        # A request charged directly is never in flight, and the cap does not apply to it.
        direct = provider.admit(billed_usage(PROMPT))
        assert (direct.status, direct.in_flight, provider.in_flight) == (200, 1, 1)
        provider.stop()  # a forgotten hold does not keep a reply forever
        assert hold.released
        assert future.result(timeout=10)[0] == 200
    assert provider.wait_in_flight(0)
    hold.release()  # again: nothing
    provider.hold().release()  # a new hold once the last one is released
    assert provider.peak_in_flight == 1
