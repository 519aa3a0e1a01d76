"""validate_event: every reason code, messages that name field and value, and valid events pass."""
from __future__ import annotations

import math
import pickle

import pytest

from streamscore.settings import Settings
from streamscore.validation import InvalidEvent, validate_event

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
