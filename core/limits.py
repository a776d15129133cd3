"""Limit definitions: a token bucket's size and refill rate, validated on construction,
and the one text form of a limit that the command line and Celery's ``rate_limit`` share.

The grammar (:meth:`Limit.parse`, :meth:`Limit.format`, :func:`parse_rate`)::

    LIMIT  = NAME "=" RATE [":capacity=" WHOLE] [":burst=" WHOLE] [":shards=" WHOLE]
    RATE   = AMOUNT "/" PERIOD
    AMOUNT = WHOLE | DECIMAL            500, 90_000, 90k, 2M; 0.5, 1.5k
    WHOLE  = digits with "_" separators, then an optional "k" (1 000) or "M" (1 000 000)
    PERIOD = [COUNT] UNIT               m, 10s, 500ms
    UNIT   = ms | s | m | h | d         (also sec, second(s), min, minute(s), hour(s), day(s))

``rpm=500/m`` is 500 tokens a minute in a bucket of 500; ``tpm=90k/m:burst=120k`` may
burst to 120 000; ``rpm=600/m:capacity=10`` never holds more than 10. A decimal AMOUNT
is made whole over a longer period, exactly: ``0.5/s`` is ``1/2s``, ``1.5/s`` is
``3/2s`` (and the capacity defaults to that whole amount). Whitespace around the parts
is ignored. ``rps=5k/s:shards=8`` spreads one hot bucket over 8 items (see
:attr:`Limit.shards` and docs/engine.md, "A hot bucket beyond one partition").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from .errors import ValidationError

__all__ = [
    "LIMIT_SYNTAX",
    "MAX_SHARDS",
    "MAX_TOKENS",
    "RATE_SYNTAX",
    "Limit",
    "format_rate",
    "parse_rate",
]

MAX_TOKENS = 10**18
"""Largest capacity, burst, refill amount or single consume/adjust, in tokens.

It keeps every number the engine stores well inside DynamoDB's 38 significant digits.
"""
MAX_PERIOD_MS = 10 * 365 * 86_400_000
MAX_SHARDS = 256
"""Most items one bucket may be spread over (:attr:`Limit.shards`)."""
RATE, INFLIGHT = "rate", "inflight"
"""The kinds of limit: a token bucket, and a cap on requests in flight."""
DEFAULT_SLOT_EXPIRY = 300.0
"""Seconds an in-flight slot stays held without renewal (:meth:`Limit.concurrent`)."""
TRACKS = ("", "start", "used", "debt", "blocks")
"""The attributes a limit has in a bucket item: the bucket, its start track, its counters."""
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")

LIMIT_SYNTAX = (
    "NAME=AMOUNT/PERIOD[:capacity=N][:burst=N][:shards=N] or "
    "NAME=N/inflight[:expires=PERIOD], e.g. rpm=500/m, tpm=90k/m:burst=120k or calls=8/inflight"
)
"""The text form of a limit, as error messages and help texts show it."""
RATE_SYNTAX = "AMOUNT/PERIOD, e.g. 500/m, 90k/m, 10/s, 0.5/s or 7/10s"
"""The text form of a rate (a limit's refill), as error messages show it."""

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_UNIT_ALIASES = {
    "sec": "s",
    "second": "s",
    "seconds": "s",
    "min": "m",
    "minute": "m",
    "minutes": "m",
    "hour": "h",
    "hours": "h",
    "day": "d",
    "days": "d",
}
_SUFFIXES = {"": 1, "k": 1000, "M": 1_000_000}
_NUMBER = re.compile(r"(?P<whole>\d+(?:_\d+)*)(?:\.(?P<fraction>\d+))?(?P<suffix>[kM]?)")
_PERIOD = re.compile(r"(?P<count>\d+)?(?P<unit>[a-z]+)")
_LIMIT = re.compile(r"(?P<name>[^=]+)=(?P<amount>[^/:]+)/(?P<period>[^:]+)(?P<options>(?::.*)?)")
_WHOLE_EXAMPLES = "e.g. 500, 90_000, 90k, 2M"


def check_tokens(field: str, value: Any, *, minimum: int = 1) -> int:
    """An integer token count in [minimum, MAX_TOKENS] or a ValidationError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(
            field,
            f"must be an integer, got {type(value).__name__}",
            f"an integer {minimum}..{MAX_TOKENS}",
        )
    if value < minimum or value > MAX_TOKENS:
        raise ValidationError(field, f"{value} is out of range", f"{minimum}..{MAX_TOKENS}")
    return value


def check_limit_name(field: str, name: Any) -> str:
    """A limit name usable as a keyword argument (``rpm``, ``tpm``, ``tokens_in``...)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(
            field, f"invalid limit name {name!r}", "a letter then letters, digits or _, <= 64"
        )
    return name


@dataclass(frozen=True)
class Limit:
    """A token bucket: ``refill_amount`` tokens every ``refill_period_ms`` milliseconds,
    holding at most ``burst`` tokens (``capacity`` unless raised).

    Use the constructors: ``Limit.per_minute("rpm", 500)``, ``Limit.per_second("rps", 10,
    burst=20)``, ``Limit.custom("tpd", capacity=1_000_000, refill_amount=1_000_000,
    refill_period_seconds=86_400)``.
    """

    name: str
    capacity: int
    burst: int
    refill_amount: int
    refill_period_ms: int
    track: str = field(default="", repr=False)
    """Internal: ``"start"`` is the copy of the bucket that counts actual starts;
    ``"used"``, ``"debt"`` and ``"blocks"`` name the bucket's counters (see :meth:`counter`);
    ``"slot:<id>"`` one held slot of an in-flight limit."""
    kind: str = field(default=RATE, repr=False)
    """``"rate"``: a token bucket. ``"inflight"``: at most ``capacity`` requests in
    flight at once (see :meth:`concurrent`), where ``refill_period_ms`` is how long a slot
    stays held without renewal before another client may take it back."""
    shards: int = field(default=1, repr=False)
    """How many bucket items the limit's bucket is spread over (1: one item). A hot
    bucket past one DynamoDB partition's writes (1,000 a second per item) takes
    ``shards`` items, each with an exact share of the capacity, burst and rate; a request
    is granted by one of them. See docs/engine.md, "A hot bucket beyond one partition".
    The other limits of the same resource are spread the same way (the item holds them
    all): a resource takes the largest ``shards`` of its limits."""

    def __post_init__(self) -> None:
        check_limit_name("name", self.name)
        if self.kind not in (RATE, INFLIGHT):
            raise ValidationError("kind", f"{self.kind!r}", f"{RATE!r} or {INFLIGHT!r}")
        slot = self.inflight and self.track.startswith("slot:") and len(self.track) > 5
        if self.track not in TRACKS and not slot:
            raise ValidationError("track", f"{self.track!r}", " or ".join(map(repr, TRACKS)))
        if self.inflight and self.burst != self.capacity:
            raise ValidationError(
                "burst",
                f"{self.burst} differs from capacity {self.capacity}",
                "an in-flight limit has no burst",
            )
        check_tokens("capacity", self.capacity)
        check_tokens("burst", self.burst)
        check_tokens("refill_amount", self.refill_amount)
        self._check_shards()
        if self.burst < self.capacity:
            raise ValidationError(
                "burst", f"{self.burst} is below capacity {self.capacity}", ">= capacity"
            )
        period = self.refill_period_ms
        if isinstance(period, bool) or not isinstance(period, int):
            raise ValidationError("refill_period_ms", "must be an integer number of ms")
        if not 1 <= period <= MAX_PERIOD_MS:
            raise ValidationError(
                "refill_period_ms", f"{period} ms is out of range", f"1..{MAX_PERIOD_MS} ms"
            )

    def _check_shards(self) -> None:
        shards = self.shards
        if isinstance(shards, bool) or not isinstance(shards, int):
            raise ValidationError("shards", "must be an integer", f"1..{MAX_SHARDS}")
        if not 1 <= shards <= MAX_SHARDS:
            raise ValidationError("shards", f"{shards} is out of range", f"1..{MAX_SHARDS}")
        if shards == 1:
            return
        if self.inflight:
            raise ValidationError("shards", f"{shards}", "1: an in-flight limit is one item")
        if self.capacity < shards:
            raise ValidationError(
                "shards",
                f"{shards} shards of a capacity of {self.capacity}",
                f"at most {self.capacity}: each shard holds at least one token",
            )
        if self.refill_period_ms * shards > MAX_PERIOD_MS:
            raise ValidationError(
                "shards", f"{shards} shards of a {self.refill_period_ms} ms refill", "fewer"
            )

    def with_shards(self, shards: int) -> Limit:
        """The same limit spread over ``shards`` bucket items (see :attr:`shards`)."""
        return replace(self, shards=shards)

    # -- constructors -----------------------------------------------------------------
    @classmethod
    def custom(
        cls,
        name: str,
        capacity: int,
        refill_amount: int,
        refill_period_seconds: float,
        burst: int | None = None,
    ) -> Limit:
        """``refill_amount`` tokens every ``refill_period_seconds`` (a whole number of ms),
        a bucket of ``burst`` tokens (default ``capacity``)."""
        return cls(
            name=name,
            capacity=capacity,
            burst=capacity if burst is None else burst,
            refill_amount=refill_amount,
            refill_period_ms=_period_ms(refill_period_seconds),
        )

    @classmethod
    def concurrent(cls, name: str, n: int, expires: float = DEFAULT_SLOT_EXPIRY) -> Limit:
        """At most ``n`` requests in flight at once, across every client: each lease holds
        one slot from its grant until it ends (commit, rollback, or the end of a
        Celery task, whatever its outcome).

        A slot whose holder died (a killed worker) comes back ``expires`` seconds after
        it was taken or last renewed (:meth:`~.limiter.Lease.renew`; a Celery task renews
        its slots while it runs): the next client that finds the limit full takes it
        back, in the write that grants its own slot.
        """
        return cls(name, n, n, n, _period_ms(expires), kind=INFLIGHT)

    @classmethod
    def per_second(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per second."""
        return cls.custom(name, capacity, capacity, 1, burst)

    @classmethod
    def per_minute(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per minute (e.g. a provider's requests/min or tokens/min)."""
        return cls.custom(name, capacity, capacity, 60, burst)

    @classmethod
    def per_hour(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per hour."""
        return cls.custom(name, capacity, capacity, 3600, burst)

    @classmethod
    def per_day(cls, name: str, capacity: int, burst: int | None = None) -> Limit:
        """``capacity`` tokens per day."""
        return cls.custom(name, capacity, capacity, 86_400, burst)

    # -- text form --------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, field: str = "limit") -> Limit:
        """A limit from its text form ``NAME=AMOUNT/PERIOD[:capacity=N][:burst=N]`` (see the
        module's docstring); the inverse of :meth:`format`.

        >>> Limit.parse("tpm=90k/m:burst=120k")
        Limit(name='tpm', capacity=90000, burst=120000, refill_amount=90000, refill_period_ms=60000)

        Raises ValidationError naming ``field``, saying which part is wrong and what is
        allowed.
        """
        if not isinstance(text, str):
            raise ValidationError(
                field, f"must be a string, got {type(text).__name__}", LIMIT_SYNTAX
            )
        match = _LIMIT.fullmatch(text.strip())
        if not match:
            raise ValidationError(field, f"{text!r} is not a limit", LIMIT_SYNTAX)
        name = match.group("name").strip()
        check_limit_name(field, name)
        if match.group("period").strip() == INFLIGHT:
            return cls._parse_inflight(field, text, name, match)
        amount, period_ms = _rate(field, match.group("amount"), match.group("period"))
        options: dict[str, int] = {}
        for part in match.group("options").split(":")[1:]:
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("capacity", "burst", "shards"):
                raise ValidationError(
                    field,
                    f"unknown option {part!r} in {text!r}",
                    "capacity=N, burst=N or shards=N",
                )
            if key in options:
                raise ValidationError(field, f"option {key!r} appears twice in {text!r}")
            options[key] = _whole(field, key, value)
        capacity = options.get("capacity", amount)
        try:
            return cls(
                name,
                capacity,
                options.get("burst", capacity),
                amount,
                period_ms,
                shards=options.get("shards", 1),
            )
        except ValidationError as exc:
            raise ValidationError(
                field, f"{text!r}: {exc.field} {exc.problem}", exc.allowed
            ) from None

    @classmethod
    def _parse_inflight(cls, field: str, text: str, name: str, match: re.Match[str]) -> Limit:
        """``NAME=N/inflight[:expires=PERIOD]`` (see :meth:`concurrent`)."""
        n = _whole(field, "amount", match.group("amount"))
        expires_ms: int | None = None
        for part in match.group("options").split(":")[1:]:
            key, sep, value = part.partition("=")
            if not sep or key.strip() != "expires":
                raise ValidationError(
                    field, f"unknown option {part!r} in {text!r}", "expires=PERIOD, e.g. 10m"
                )
            if expires_ms is not None:
                raise ValidationError(field, f"option 'expires' appears twice in {text!r}")
            expires_ms = _period(field, value)
        if expires_ms is None:
            expires_ms = round(DEFAULT_SLOT_EXPIRY * 1000)
        try:
            return cls.concurrent(name, n, expires_ms / 1000)
        except ValidationError as exc:
            raise ValidationError(
                field, f"{text!r}: {exc.field} {exc.problem}", exc.allowed
            ) from None

    def format(self) -> str:
        """The text form of this limit (the inverse of :meth:`parse`); also ``str(limit)``.

        >>> Limit.per_minute("tpm", 90_000, burst=120_000).format()
        'tpm=90000/m:burst=120000'

        The internal ``track`` is not part of it.
        """
        if self.inflight:
            text = f"{self.name}={self.capacity}/{INFLIGHT}"
            if self.refill_period_ms != round(DEFAULT_SLOT_EXPIRY * 1000):
                text += f":expires={_format_period(self.refill_period_ms)}"
            return text
        text = f"{self.name}={format_rate(self.refill_amount, self.refill_period_ms)}"
        if self.capacity != self.refill_amount:
            text += f":capacity={self.capacity}"
        if self.burst != self.capacity:
            text += f":burst={self.burst}"
        if self.shards != 1:
            text += f":shards={self.shards}"
        return text

    def __str__(self) -> str:
        return self.format()

    # -- derived values ---------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.refill_amount * 1000 / self.refill_period_ms

    @property
    def inflight(self) -> bool:
        """True for a cap on requests in flight (:meth:`concurrent`)."""
        return self.kind == INFLIGHT

    @property
    def key(self) -> str:
        """The stored attribute of this bucket. It includes the refill rate, so a limit
        whose rate changes starts a new bucket instead of misreading the old state. An
        in-flight limit's is its count of held slots, whatever ``n`` (each slot is an
        attribute of its own: :meth:`slot`)."""
        if self.inflight:
            key = f"{self.name}@{INFLIGHT}"
            return f"{key}~{self.track[5:]}" if self.track else key
        key = f"{self.name}@{self.refill_amount}/{self.refill_period_ms}"
        return f"{key}~{self.track}" if self.track else key

    def slot(self, slot_id: str) -> Limit:
        """The attribute of one held slot of an in-flight limit (its expiry, epoch ms)."""
        return replace(self, track=f"slot:{slot_id}")

    def start_track(self) -> Limit:
        """The same bucket shape, counting when requests actually start (see docs/engine.md)."""
        return replace(self, track="start")

    def counter(self, kind: str = "used") -> Limit:
        """The attribute beside the bucket that counts, without condition and never
        falling but by refunds: ``"used"``, the tokens charged (grants, debt, surcharges,
        less refunds); ``"debt"``, of those, the tokens charged after the grant;
        ``"blocks"``, the provider blocks written on the item."""
        return replace(self, track=kind)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (stored limits, CLI output)."""
        return {
            "name": self.name,
            "capacity": self.capacity,
            "burst": self.burst,
            "refill_amount": self.refill_amount,
            "refill_period_ms": self.refill_period_ms,
            **({"kind": INFLIGHT} if self.inflight else {}),
            **({"shards": self.shards} if self.shards != 1 else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limit:
        """The inverse of :meth:`to_dict` (numbers may come back as Decimal or str)."""
        try:
            return cls(
                name=str(data["name"]),
                capacity=int(data["capacity"]),
                burst=int(data["burst"]),
                refill_amount=int(data["refill_amount"]),
                refill_period_ms=int(data["refill_period_ms"]),
                kind=str(data.get("kind", RATE)),
                shards=int(data.get("shards", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError("limits", f"malformed stored limit {data!r}") from exc


def _period_ms(seconds: Any) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValidationError(
            "refill_period_seconds", "must be a number of seconds", "> 0, at most 315360000"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValidationError(
            "refill_period_seconds",
            f"{seconds!r} is not a positive finite number",
            "> 0, at most 315360000",
        )
    ms = seconds * 1000
    if ms > MAX_PERIOD_MS:
        raise ValidationError(
            "refill_period_seconds", f"{seconds!r} is longer than 10 years", "<= 315360000"
        )
    if abs(ms - round(ms)) > 1e-6 or round(ms) < 1:
        raise ValidationError(
            "refill_period_seconds",
            f"{seconds!r} is not a whole number of milliseconds",
            "a whole number of milliseconds, at least 1 ms",
        )
    return round(ms)


# -- the text form of rates -------------------------------------------------------------------
def parse_rate(text: str, field: str = "rate") -> tuple[int, int]:
    """``AMOUNT/PERIOD`` (``"500/m"``, ``"90k/m"``, ``"0.5/s"``, ``"7/10s"``) as a whole
    ``(refill_amount, refill_period_ms)``; see the module's docstring for the grammar.

    >>> parse_rate("0.5/s")
    (1, 2000)

    Raises ValidationError naming ``field`` on bad input.
    """
    if not isinstance(text, str):
        raise ValidationError(field, f"must be a string, got {type(text).__name__}", RATE_SYNTAX)
    amount, sep, period = text.strip().partition("/")
    if not sep or not amount.strip() or not period.strip():
        raise ValidationError(field, f"{text!r} is not a rate", RATE_SYNTAX)
    return _rate(field, amount, period)


def format_rate(amount: int, period_ms: int) -> str:
    """The text form of ``amount`` tokens every ``period_ms`` ms (inverse of
    :func:`parse_rate` for whole amounts): the period in the largest unit that divides it.

    >>> format_rate(90_000, 60_000), format_rate(3, 2_000), format_rate(5, 1_500)
    ('90000/m', '3/2s', '5/1500ms')
    """
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if period_ms % size == 0:
            count = period_ms // size
            return f"{amount}/{unit if count == 1 else f'{count}{unit}'}"
    return f"{amount}/{period_ms}ms"


def _rate(field: str, amount_text: str, period_text: str) -> tuple[int, int]:
    """A whole (refill_amount, refill_period_ms) from the two parts of a rate."""
    amount = _number(field, "amount", amount_text)
    period_ms = _period(field, period_text) * amount.denominator
    if not 1 <= amount.numerator <= MAX_TOKENS:
        raise ValidationError(
            field,
            f"amount {amount_text.strip()!r} is out of range",
            f"1..{MAX_TOKENS}, or a decimal above 0 (e.g. 0.5)",
        )
    if period_ms > MAX_PERIOD_MS:
        raise ValidationError(
            field,
            f"{amount_text.strip()}/{period_text.strip()} refills over more than 10 years",
            f"a period of at most {MAX_PERIOD_MS} ms, after a decimal amount is made whole",
        )
    return amount.numerator, period_ms


def _number(field: str, what: str, text: str) -> Fraction:
    match = _NUMBER.fullmatch(text.strip())
    if not match:
        raise ValidationError(
            field,
            f"{what} {text.strip()!r} is not a whole number or a decimal",
            f"{_WHOLE_EXAMPLES}, 0.5, 1.5k",
        )
    digits = match.group("whole").replace("_", "")
    if match.group("fraction"):
        digits += "." + match.group("fraction")
    return Fraction(digits) * _SUFFIXES[match.group("suffix")]


def _whole(field: str, what: str, text: str) -> int:
    value = _number(field, what, text)
    if value.denominator != 1 or "." in text:
        raise ValidationError(
            field, f"{what} {text.strip()!r} is not a whole number", _WHOLE_EXAMPLES
        )
    if not 1 <= value.numerator <= MAX_TOKENS:
        raise ValidationError(field, f"{what} {text.strip()!r} is out of range", f"1..{MAX_TOKENS}")
    return value.numerator


def _format_period(period_ms: int) -> str:
    """``period_ms`` as the PERIOD of the text form (``5m``, ``90s``, ``1500ms``)."""
    return format_rate(1, period_ms).split("/", 1)[1]


def _period(field: str, text: str) -> int:
    match = _PERIOD.fullmatch(text.strip())
    unit = _UNIT_ALIASES.get(match.group("unit"), match.group("unit")) if match else ""
    if not match or unit not in _UNITS_MS:
        raise ValidationError(
            field,
            f"period {text.strip()!r} is not [COUNT]UNIT with UNIT one of ms, s, m, h, d",
            "[COUNT]UNIT, UNIT one of ms, s, m, h, d (or sec, min, hour, day), e.g. m, 10s",
        )
    count = int(match.group("count") or 1)
    if count < 1:
        raise ValidationError(field, f"period {text.strip()!r} is zero", f"at least 1 {unit}")
    if count * _UNITS_MS[unit] > MAX_PERIOD_MS:
        raise ValidationError(
            field, f"period {text.strip()!r} is longer than 10 years", f"<= {MAX_PERIOD_MS} ms"
        )
    return count * _UNITS_MS[unit]
