"""Business checks on a decoded Event, before it may touch feature state.

The Avro schema only guarantees types; this module rejects what the schema
cannot: empty ids, non-finite or out-of-range amounts, implausible event times,
malformed codes. The scorer dead-letters a rejected event with the exception's
`reason` / `field` / `detail` as headers, so each failure names the field and
the offending value. Called once per event, so it is a straight line of cheap
checks (about 1 us). The scorer uses `batch_validator`, which first asks one cheap question
(is this a plainly valid event?) and runs `validate_event` only when the answer is not a clear yes,
so rejections keep exactly the reasons, fields and details `validate_event` gives.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from itertools import product
from string import ascii_uppercase

from streamscore.settings import Settings

# Reason codes (dead-letter header `error.reason`), shared with the codec's decode reasons.
MISSING_FIELD = "missing_field"
NULL_ENTITY = "null_entity"
INVALID_VALUE = "invalid_value"
NON_FINITE = "non_finite"
OUT_OF_RANGE = "out_of_range"
FUTURE_EVENT_TIME = "future_event_time"
STALE_EVENT_TIME = "stale_event_time"
# Not a validation failure: the scorer's feature state already applied this event_id (features.is_duplicate).
DUPLICATE_EVENT = "duplicate_event"

DAY_MS = 86_400_000
# The limits the hard-coded path had as settings (the payments spec states them now).
MAX_EVENT_AGE_DAYS = 365.0
MAX_EVENT_FUTURE_S = 300.0
MAX_AMOUNT = 1_000_000.0
OPTIONAL_STRING_FIELDS = ("merchant_category", "channel", "country", "device_id")
# Every currency validate_event accepts (3 ASCII uppercase letters): one set lookup instead of five calls.
PLAIN_CURRENCIES = frozenset("".join(letters) for letters in product(ascii_uppercase, repeat=3))


class InvalidEvent(ValueError):
    """An event that must not be scored; `reason` is a short code, `field` the culprit, `detail` for humans."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail

    def __reduce__(self):  # keep reason/field when pickled (e.g. across processes)
        return (type(self), (self.reason, self.field, self.detail))


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def validate_event(event: Mapping, settings: Settings, now_ms: int) -> None:
    """Raise InvalidEvent if `event` (a decoded Event dict) must not be scored at wall time `now_ms`."""
    event_id = event.get("event_id")
    if not isinstance(event_id, str) or not event_id.strip():
        raise InvalidEvent(MISSING_FIELD, "event_id", f"event_id must be a non-empty string, got {_short(event_id)}")

    entity_id = event.get("entity_id")
    if not isinstance(entity_id, str) or not entity_id.strip():
        raise InvalidEvent(NULL_ENTITY, "entity_id",
                           f"entity_id must be a non-empty string, got {_short(entity_id)} (event {event_id!r})")

    event_time = event.get("event_time")
    if event_time is None:
        raise InvalidEvent(MISSING_FIELD, "event_time", f"event_time is missing (event {event_id!r})")
    if type(event_time) is not int:
        raise InvalidEvent(INVALID_VALUE, "event_time",
                           f"event_time must be epoch milliseconds as an int, got {_short(event_time)}")
    if event_time > now_ms + MAX_EVENT_FUTURE_S * 1000:
        raise InvalidEvent(FUTURE_EVENT_TIME, "event_time",
                           f"event_time {event_time} is {(event_time - now_ms) / 1000:.0f} s in the future "
                           f"(limit max_event_future_s={MAX_EVENT_FUTURE_S:g})")
    if event_time < now_ms - MAX_EVENT_AGE_DAYS * DAY_MS:
        raise InvalidEvent(STALE_EVENT_TIME, "event_time",
                           f"event_time {event_time} is {(now_ms - event_time) / DAY_MS:.1f} days old "
                           f"(limit max_event_age_days={MAX_EVENT_AGE_DAYS:g})")

    amount = event.get("amount")
    if amount is None:
        raise InvalidEvent(MISSING_FIELD, "amount", f"amount is missing (event {event_id!r})")
    if type(amount) is not float:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidEvent(INVALID_VALUE, "amount", f"amount must be a number, got {_short(amount)}")
        amount = float(amount)
    if not math.isfinite(amount):
        raise InvalidEvent(NON_FINITE, "amount", f"amount must be finite, got {amount!r}")
    if amount < 0.0 or amount > MAX_AMOUNT:
        raise InvalidEvent(OUT_OF_RANGE, "amount",
                           f"amount {amount!r} is outside [0, {MAX_AMOUNT:g}] (max_amount)")

    currency = event.get("currency")
    if currency is None:
        raise InvalidEvent(MISSING_FIELD, "currency", f"currency is missing (event {event_id!r})")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isascii()
            and currency.isalpha() and currency.isupper()):
        raise InvalidEvent(INVALID_VALUE, "currency",
                           f"currency must be 3 uppercase letters (ISO 4217), got {_short(currency)}")

    for name in OPTIONAL_STRING_FIELDS:
        value = event.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidEvent(INVALID_VALUE, name, f"{name} must be a string or null, got {_short(value)}")


def batch_validator(settings: Settings, now_ms: int) -> Callable[[Mapping], None]:
    """`validate_event(event, settings, now_ms)` as a function of the event, for a batch scored at `now_ms`.

    The limits are computed once, with the same expressions as validate_event, and an event that
    plainly passes every check (exact types, limits, currency in PLAIN_CURRENCIES) returns at once;
    anything else goes through validate_event itself, which raises with its reason, field and detail.
    """
    newest = now_ms + MAX_EVENT_FUTURE_S * 1000  # validate_event rejects event_time > newest
    oldest = now_ms - MAX_EVENT_AGE_DAYS * DAY_MS  # ... and event_time < oldest
    # 0 <= amount <= max_amount then also means finite (an infinite limit is clamped to the largest float)
    max_amount = MAX_AMOUNT if math.isfinite(MAX_AMOUNT) else sys.float_info.max
    currencies = PLAIN_CURRENCIES

    def validate(event: Mapping) -> None:
        event_id = event.get("event_id")
        entity_id = event.get("entity_id")
        event_time = event.get("event_time")
        amount = event.get("amount")
        currency = event.get("currency")
        merchant_category = event.get("merchant_category")
        channel = event.get("channel")
        country = event.get("country")
        device_id = event.get("device_id")
        if (type(event_id) is str and event_id.strip() and type(entity_id) is str and entity_id.strip()
                and type(event_time) is int and oldest <= event_time <= newest
                and type(amount) is float and 0.0 <= amount <= max_amount
                and type(currency) is str and currency in currencies
                and (merchant_category is None or type(merchant_category) is str)
                and (channel is None or type(channel) is str)
                and (country is None or type(country) is str)
                and (device_id is None or type(device_id) is str)):
            return
        validate_event(event, settings, now_ms)

    return validate
