"""validate_event: every reason code, messages that name field and value, and valid events pass;
batch_validator (the scorer's) gives exactly the same outcome for every event."""
from __future__ import annotations

import math
import pickle
import random

import pytest

from streamscore.settings import Settings
from streamscore.scoring.validation import PLAIN_CURRENCIES, InvalidEvent, batch_validator, validate_event

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SETTINGS = Settings(max_amount=10_000.0, max_event_future_s=60.0, max_event_age_days=30.0)


def event(**changes) -> dict:
    valid = {"event_id": "e-1", "entity_id": "card-1", "event_time": NOW - 1_000, "amount": 42.5,
             "currency": "EUR", "merchant_category": "5411", "channel": "pos", "country": "DE", "device_id": None}
    valid.update(changes)
    return valid


def rejection(**changes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        validate_event(event(**changes), SETTINGS, NOW)
    return info.value


def test_valid_events_pass():
    validate_event(event(), SETTINGS, NOW)
    validate_event(event(amount=0.0, merchant_category=None, channel=None, country=None), SETTINGS, NOW)
    validate_event(event(amount=10_000.0, currency="XYZ"), SETTINGS, NOW)  # unknown but well-formed currency
    validate_event(event(amount=7), SETTINGS, NOW)  # an int amount is a number
    validate_event(event(event_time=NOW + 60_000), SETTINGS, NOW)  # exactly at the future limit
    validate_event(event(event_time=NOW - 30 * 86_400_000), SETTINGS, NOW)  # exactly at the age limit


@pytest.mark.parametrize("entity_id", ["", "   ", None, 17])
def test_null_entity(entity_id):
    exc = rejection(entity_id=entity_id)
    assert (exc.reason, exc.field) == ("null_entity", "entity_id")
    assert repr(entity_id) in exc.detail and "e-1" in exc.detail


@pytest.mark.parametrize("event_id", ["", " ", None])
def test_missing_event_id(event_id):
    exc = rejection(event_id=event_id)
    assert (exc.reason, exc.field) == ("missing_field", "event_id")


@pytest.mark.parametrize("amount", [math.nan, math.inf, -math.inf])
def test_non_finite_amount(amount):
    exc = rejection(amount=amount)
    assert (exc.reason, exc.field) == ("non_finite", "amount") and repr(amount) in exc.detail


@pytest.mark.parametrize("amount", [-0.01, 10_000.01, 1e300])
def test_amount_out_of_range(amount):
    exc = rejection(amount=amount)
    assert (exc.reason, exc.field) == ("out_of_range", "amount")
    assert repr(amount) in exc.detail and "10000" in exc.detail


def test_amount_of_wrong_type_and_missing():
    assert (rejection(amount="12").reason, rejection(amount=True).reason) == ("invalid_value", "invalid_value")
    assert (rejection(amount=None).reason, rejection(amount=None).field) == ("missing_field", "amount")


def test_future_event_time():
    exc = rejection(event_time=NOW + 60_001)
    assert (exc.reason, exc.field) == ("future_event_time", "event_time")
    assert str(NOW + 60_001) in exc.detail and "max_event_future_s=60" in exc.detail


def test_stale_event_time():
    exc = rejection(event_time=NOW - 30 * 86_400_000 - 1)
    assert (exc.reason, exc.field) == ("stale_event_time", "event_time") and "max_event_age_days=30" in exc.detail


def test_event_time_type_and_missing():
    assert rejection(event_time=1.5e12).reason == "invalid_value"
    assert (rejection(event_time=None).reason, rejection(event_time=None).field) == ("missing_field", "event_time")


@pytest.mark.parametrize("currency", ["eur", "EU", "EURO", "E1R", "ÉUR", 978])
def test_malformed_currency(currency):
    exc = rejection(currency=currency)
    assert (exc.reason, exc.field) == ("invalid_value", "currency") and repr(currency) in exc.detail


def test_optional_fields_must_be_strings_or_null():
    exc = rejection(country=49)
    assert (exc.reason, exc.field) == ("invalid_value", "country")


def test_is_a_value_error_and_survives_pickling():
    exc = rejection(amount=math.nan)
    assert isinstance(exc, ValueError)
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.reason, copy.field, copy.detail) == (exc.reason, exc.field, exc.detail)


# --- batch_validator == validate_event ----------------------------------------------------------
class Text(str):
    """A str subclass: validate_event accepts it, the fast check must not decide on it alone."""


ODD_VALUES = {
    "event_id": ["", " ", "\t\n", None, 17, Text("e-2"), "é"],
    "entity_id": ["", "  ", None, 17, Text("c"), "card-9"],
    "event_time": [None, 1.5e12, True, NOW + 60_000, NOW + 60_001, NOW - 30 * 86_400_000,
                   NOW - 30 * 86_400_000 - 1, 0, -(2**63), 2**63 - 1],
    "amount": [None, "12", True, 7, 0, -0.0, 0.0, -0.01, 10_000.0, 10_000.01, math.nan, math.inf, -math.inf,
               1e300, 5e-324],
    "currency": [None, "eur", "EU", "EURO", "E1R", "ÉUR", 978, "XYZ", Text("EUR"), "ＥＵＲ", "EU\u0130"],
    "merchant_category": [None, "", 5411, b"5411"],
    "channel": [None, "", 1.0],
    "country": [None, 49, "BR"],
    "device_id": [None, "", ["d"]],
}


def outcome(check, candidate) -> tuple | None:
    try:
        check(candidate)
    except InvalidEvent as exc:
        return exc.reason, exc.field, exc.detail
    return None


@pytest.mark.parametrize("settings", [SETTINGS, Settings(max_amount=math.inf), Settings(max_event_future_s=0.5)])
def test_batch_validator_gives_the_outcome_of_validate_event(settings):
    check = batch_validator(settings, NOW)
    rng = random.Random(5)
    candidates = [event()] + [event(**{name: value}) for name, values in ODD_VALUES.items() for value in values]
    for _ in range(3000):  # several odd fields at once: the first failing check must still win
        candidates.append(event(**{name: rng.choice(values) for name, values in ODD_VALUES.items()
                                   if rng.random() < 0.3}))
    missing = dict(event())
    del missing["currency"]
    candidates.append(missing)
    rejected = 0
    for candidate in candidates:
        expected = outcome(lambda e: validate_event(e, settings, NOW), candidate)
        assert outcome(check, candidate) == expected, candidate
        rejected += expected is not None
    assert 0 < rejected < len(candidates)


def test_plain_currencies_are_exactly_the_well_formed_codes():
    assert len(PLAIN_CURRENCIES) == 26**3 and {"EUR", "USD", "XYZ"} <= PLAIN_CURRENCIES
    assert not {"eur", "EU", "EURO", "ÉUR", "E1R"} & PLAIN_CURRENCIES
