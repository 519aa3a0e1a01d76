"""EventValidator: every check of a spec, in order, with reasons and details that name the field and value."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import example_spec, spec_codec
from streamscore.avro.scanner import RecordReader
from streamscore.scoring.validation import EventValidator

PAYMENTS = example_spec("payments")
RIDES = example_spec("rides")
NOW = 1_767_225_600_000
GOOD = {"event_id": "e1", "entity_id": "card-1", "event_time": NOW - 1000, "amount": 12.5, "currency": "EUR",
        "merchant_category": None, "channel": "pos", "country": None, "device_id": None}
TRIP = {"trip_id": "t1", "driver_id": "d1", "requested_at": NOW - 1000, "pickup_zone": "Z07", "dropoff_zone": None,
        "distance_km": 3.2, "passengers": 2, "vehicle": "xl", "surge": 1.0, "is_airport": False, "rider_rating": None}


def check(spec, records, now=NOW):
    codec = spec_codec(spec)
    batch = RecordReader(codec, "event").read_batch([codec.encode("event", r) for r in records])
    passed, rejected = EventValidator(spec).check(batch, np.arange(len(records)), now)
    return passed.tolist(), [(row, r.reason, r.field, r.detail, event_id) for row, r, event_id in rejected]


def one(spec, change, base=None):
    record = {**(base or (GOOD if spec is PAYMENTS else TRIP)), **change}
    passed, rejected = check(spec, [record])
    assert passed == [] and len(rejected) == 1, rejected
    return rejected[0][1:]


def test_valid_events_pass():
    assert check(PAYMENTS, [GOOD, {**GOOD, "amount": 0.0, "currency": "JPY"}]) == ([0, 1], [])
    assert check(RIDES, [TRIP, {**TRIP, "vehicle": None, "passengers": 8}]) == ([0, 1], [])


@pytest.mark.parametrize("entity", ["", "   ", "\u00a0", "\t"])
def test_a_blank_entity_is_null_entity(entity):
    reason, field, detail, event_id = one(PAYMENTS, {"entity_id": entity})
    assert (reason, field, event_id) == ("null_entity", "entity_id", "e1") and repr(entity) in detail


@pytest.mark.parametrize("event_id", ["", " "])
def test_a_blank_event_id_is_missing(event_id):
    reason, field, _, got_id = one(PAYMENTS, {"event_id": event_id})
    assert (reason, field, got_id) == ("missing_field", "event_id", None)


def test_event_time_limits():
    assert one(PAYMENTS, {"event_time": NOW + 301_000})[:2] == ("future_event_time", "event_time")
    assert one(PAYMENTS, {"event_time": NOW - 366 * 86_400_000})[:2] == ("stale_event_time", "event_time")
    assert one(RIDES, {"requested_at": NOW + 121_000})[:2] == ("future_event_time", "requested_at")
    assert check(PAYMENTS, [{**GOOD, "event_time": NOW + 299_000}])[1] == []


@pytest.mark.parametrize("amount, reason", [(math.nan, "non_finite"), (math.inf, "non_finite"),
                                            (-0.01, "out_of_range"), (1e6 + 1, "out_of_range")])
def test_numeric_checks(amount, reason):
    got_reason, field, detail, _ = one(PAYMENTS, {"amount": amount})
    assert (got_reason, field) == (reason, "amount") and "amount = " in detail and "(event 'e1')" in detail


def test_string_checks_pattern_allowed_and_required():
    reason, field, detail, _ = one(PAYMENTS, {"currency": "eur"})
    assert (reason, field) == ("invalid_value", "currency") and "does not match the pattern" in detail
    assert one(PAYMENTS, {"currency": "EURO"})[:2] == ("invalid_value", "currency")  # a full match, not a search
    assert one(RIDES, {"vehicle": "bike"})[:2] == ("invalid_value", "vehicle")
    assert one(RIDES, {"vehicle": ""})[:2] == ("invalid_value", "vehicle")  # "" is a value, and not allowed
    assert one(RIDES, {"passengers": 0})[:2] == ("out_of_range", "passengers")


def test_the_first_failing_check_wins_in_the_documented_order_and_rows_stay_in_order():
    records = [GOOD, {**GOOD, "entity_id": "", "amount": math.nan}, {**GOOD, "amount": -1.0, "currency": "x"},
               {**GOOD, "event_id": "e4"}]
    passed, rejected = check(PAYMENTS, records)
    assert passed == [0, 3]
    assert [(row, reason, field) for row, reason, field, _, _ in rejected] == [
        (1, "null_entity", "entity_id"), (2, "out_of_range", "amount")]


def test_required_and_length_checks_from_a_spec(tmp_path):
    import shutil

    from streamscore.spec import load_spec

    folder = tmp_path / "rides"
    shutil.copytree(RIDES.path.parent, folder, ignore=shutil.ignore_patterns("__pycache__"))
    text = (folder / "spec.yaml").read_text()
    (folder / "spec.yaml").write_text(text.replace("vehicle: {allowed: [standard, xl, green, luxury]}",
                                                   "vehicle: {required: true, min_length: 2, max_length: 5}"))
    spec = load_spec(folder)
    assert one(spec, {"vehicle": None})[:2] == ("missing_field", "vehicle")
    assert one(spec, {"vehicle": "x"})[:2] == ("invalid_value", "vehicle")
    assert one(spec, {"vehicle": "luxury"})[:2] == ("invalid_value", "vehicle")
    assert check(spec, [{**TRIP, "vehicle": "ééééé"}])[1] == []  # 5 characters (10 bytes)
