"""Avro contracts and codec: framing, schema evolution, error reasons, fingerprints."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamscore.avro.codec import (
    MISSING_FIELD,
    RECORD_NAMES,
    UNDECODABLE,
    UNKNOWN_SCHEMA,
    WRONG_SCHEMA,
    AvroCodec,
    DecodeError,
    EncodeError,
    SchemaCatalog,
    SchemaCatalogError,
)

# A schema set of its own (named types shared across files, like the first streamscore contract): the codec is
# generic, and these tests must not change when the product's records do.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

EVENT = {
    "event_id": "ev-1",
    "entity_id": "card-42",
    "event_time": 1_700_000_000_123,
    "amount": 12.5,
    "currency": "EUR",
    "merchant_category": "5411",
    "channel": "pos",
    "country": "DE",
    "device_id": None,
}
SAMPLES = {
    "event": EVENT,
    "label": {"event_id": "ev-1", "entity_id": "card-42", "label": 1, "label_time": 1_700_000_100_000},
    "prediction": {
        "event_id": "ev-1",
        "entity_id": "card-42",
        "event_time": EVENT["event_time"],
        "scored_at": 1_700_000_000_200,
        "model_name": "fraud",
        "model_version": 3,
        "score": 0.125,
        "feature_set": "f3a9c0",
        "features": {"amount": 12.5, "log_amount": math.log1p(12.5), "std_7d": 0.0},
        "event": EVENT,
        "event_partition": 2,
        "event_offset": 123_456_789_012,
    },
    "retrain_request": {
        "request_id": "rq-1",
        "model_name": "fraud",
        "model_version": 3,
        "reason": "psi 0.31 > 0.2 on amount",
        "detector": "psi",
        "feature": "amount",
        "statistic": "psi",
        "value": 0.31,
        "threshold": 0.2,
        "window": 5000,
        "detected_at": 1_700_000_500_000,
    },
    "model_update": {
        "model_name": "fraud",
        "version": 4,
        "stage": "production",
        "action": "promote",
        "feature_set": "f3a9c0",
        "reason": "auc 0.91 > 0.89",
        "updated_at": 1_700_000_600_000,
    },
}


@pytest.fixture(scope="module")
def catalog() -> SchemaCatalog:
    return SchemaCatalog(SCHEMA_DIR)


@pytest.fixture(scope="module")
def codec(catalog) -> AvroCodec:
    return AvroCodec(catalog)


@pytest.fixture()
def registry_codec(catalog) -> AvroCodec:
    return AvroCodec(catalog, registry_url="mock://test-codec")


# --- independent CRC-64-AVRO, written from the spec ("Schema Fingerprints") ---------------
EMPTY = 0xC15D213AA4D7A795
_FP_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (EMPTY & -(_fp & 1))
    _FP_TABLE.append(_fp)


def spec_fingerprint64(buf: bytes) -> int:
    fp = EMPTY
    for byte in buf:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_independent_crc64_matches_avro_published_vectors():
    # From apache/avro share/test/data/schema-tests.txt (signed Java longs).
    vectors = {
        '"null"': 7195948357588979594,
        '"boolean"': -6970731678124411036,
        '"int"': 8247732601305521295,
        '{"name":"foo","type":"fixed","size":15}': 1756455273707447556,
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}': 7843277075252814651,
    }
    for canonical, signed in vectors.items():
        assert spec_fingerprint64(canonical.encode()) == signed & 0xFFFF_FFFF_FFFF_FFFF, canonical


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_fingerprint_is_crc64_avro_of_parsing_canonical_form(catalog, codec, name):
    canonical = catalog.canonical(name)
    assert catalog.fingerprint(name) == spec_fingerprint64(canonical.encode("utf-8"))
    # Canonical form strips docs and defaults and uses full names.
    assert '"doc"' not in canonical and '"default"' not in canonical
    assert canonical.startswith('{"name":"streamscore.')
    # The single-object header carries it little-endian.
    data = codec.encode(name, SAMPLES[name])
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == catalog.fingerprint(name).to_bytes(8, "little")


def test_event_is_defined_once_and_expanded_into_prediction(catalog):
    assert '"Event"' not in (SCHEMA_DIR / "prediction.avsc").read_text()
    assert '"name":"streamscore.Event"' in catalog.canonical("prediction")
    event_field = next(f for f in catalog.expanded("prediction")["fields"] if f["name"] == "event")
    assert event_field["type"]["name"] == "streamscore.Event"
    assert event_field["type"]["fields"][5]["default"] is None  # expanded form keeps defaults (registry needs them)


def test_every_field_is_documented(catalog):
    for name in RECORD_NAMES:
        raw = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        assert raw["namespace"] == "streamscore" and raw.get("doc")
        undocumented = [f["name"] for f in raw["fields"] if not f.get("doc")]
        assert not undocumented, f"{name}.avsc: {undocumented}"


# --- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", RECORD_NAMES)
def test_round_trip_single_object(codec, name):
    assert codec.decode(codec.encode(name, SAMPLES[name]), name) == SAMPLES[name]


@pytest.mark.parametrize("name", RECORD_NAMES)
def test_round_trip_registry(registry_codec, name):
    data = registry_codec.encode(name, SAMPLES[name], topic=f"t.{name}")
    assert data[0] == 0x00
    assert registry_codec.decode(data, name) == SAMPLES[name]


def test_optional_fields_default_to_null_and_nan_features_survive(codec):
    minimal = {k: EVENT[k] for k in ("event_id", "entity_id", "event_time", "amount", "currency")}
    decoded = codec.decode(codec.encode("event", minimal), "event")
    assert decoded == {**minimal, "merchant_category": None, "channel": None, "country": None, "device_id": None}

    prediction = {**SAMPLES["prediction"], "score": None, "model_version": 0, "features": {"mean_7d": math.nan}}
    back = codec.decode(codec.encode("prediction", prediction), "prediction")
    assert back["score"] is None and math.isnan(back["features"]["mean_7d"])


def test_encoder_is_reusable_and_equals_encode(codec):
    encode_event = codec.encoder("event")
    assert encode_event(EVENT) == codec.encode("event", EVENT)
    assert codec.encoder("event") is encode_event


# --- registry mode ----------------------------------------------------------------------------
def test_registry_registers_expanded_schema_under_topic_subject(registry_codec, catalog):
    data = registry_codec.encode("prediction", SAMPLES["prediction"], topic="dev.predictions")
    registered = registry_codec.registry.get_latest_version("dev.predictions-value")
    assert int.from_bytes(data[1:5], "big") == registered.schema_id
    assert json.loads(registered.schema.schema_str) == catalog.expanded("prediction")
    registry_codec.encode("event", EVENT)  # no topic -> subject from the record name
    assert "event-value" in registry_codec.registry.get_subjects()


def test_registry_reader_accepts_single_object_framing_and_vice_versa_fails_clearly(registry_codec, codec):
    single = codec.encode("event", EVENT)
    assert registry_codec.decode(single, "event") == EVENT

    confluent = registry_codec.encode("event", EVENT)
    with pytest.raises(DecodeError) as err:
        codec.decode(confluent, "event")  # a reader without a registry cannot resolve an id
    assert err.value.reason == UNKNOWN_SCHEMA and "no schema registry" in str(err.value)


def test_registry_reader_fetches_writer_schema_by_id(catalog):
    writer = AvroCodec(catalog, registry_url="mock://shared")
    reader = AvroCodec(catalog, registry_client=writer.registry)  # fresh caches, same registry
    data = writer.encode("label", SAMPLES["label"], topic="labels")
    assert reader.decode(data, "label") == SAMPLES["label"]
    with pytest.raises(DecodeError) as err:
        reader.decode(data, "event")
    assert err.value.reason == WRONG_SCHEMA
    with pytest.raises(DecodeError) as err:
        reader.decode(b"\x00\x00\x00\x03\xe7" + data[5:], "label")
    assert err.value.reason == UNKNOWN_SCHEMA and "999" in str(err.value)


# --- schema evolution -------------------------------------------------------------------------
def _evolved_schema_dir(tmp_path: Path, new_event_fields: list[dict], archive_version: int | None = 1) -> Path:
    """A copy of schemas/ where Event gained `new_event_fields` (optionally archiving the old Event)."""
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "history", "*.py"))
    if archive_version is not None:
        old = SchemaCatalog(target)
        old.archive("event", archive_version)
        old.archive("prediction", archive_version)  # embeds Event, so its fingerprint changes too
    raw = json.loads((target / "event.avsc").read_text())
    raw["fields"].extend(new_event_fields)
    (target / "event.avsc").write_text(json.dumps(raw))
    return target


MCC_DESCRIPTION = {"name": "mcc_description", "type": ["null", "string"], "default": None, "doc": "test-only v2 field"}


def test_newer_reader_reads_events_written_with_archived_older_schema(codec, tmp_path):
    v2 = SchemaCatalog(_evolved_schema_dir(tmp_path, [MCC_DESCRIPTION]))
    old_bytes = codec.encode("event", EVENT)
    assert v2.writer(codec.catalog.fingerprint("event")).source == "history/event.v1.avsc"

    reader = AvroCodec(v2)
    assert reader.decode(old_bytes, "event") == {**EVENT, "mcc_description": None}
    new_bytes = reader.encode("event", {**EVENT, "mcc_description": "Grocery stores"})
    assert reader.decode(new_bytes, "event")["mcc_description"] == "Grocery stores"
    # Nested: a Prediction written with the old Event, read as the new Prediction.
    assert v2.fingerprint("prediction") != codec.catalog.fingerprint("prediction")
    old_prediction = codec.encode("prediction", SAMPLES["prediction"])
    assert reader.decode(old_prediction, "prediction")["event"] == {**EVENT, "mcc_description": None}


def test_older_reader_reads_newer_data_through_the_registry(catalog, tmp_path):
    v2 = SchemaCatalog(_evolved_schema_dir(tmp_path, [MCC_DESCRIPTION]))
    new_writer = AvroCodec(v2, registry_url="mock://evolution")
    old_reader = AvroCodec(catalog, registry_client=new_writer.registry)
    data = new_writer.encode("event", {**EVENT, "mcc_description": "Grocery stores"}, topic="events")
    assert old_reader.decode(data, "event") == EVENT  # the unknown new field is dropped


def test_older_reader_without_registry_reports_unknown_fingerprint_of_newer_data(codec, tmp_path):
    v2 = SchemaCatalog(_evolved_schema_dir(tmp_path, [MCC_DESCRIPTION]))
    data = AvroCodec(v2).encode("event", EVENT)
    with pytest.raises(DecodeError) as err:
        codec.decode(data, "event")
    assert err.value.reason == UNKNOWN_SCHEMA
    assert str(err.value) == (f"unknown schema fingerprint 0x{v2.fingerprint('event'):016x} "
                              "(not streamscore's schemas/, nor their history/ copies)")


def test_new_required_field_without_default_is_missing_field(codec, tmp_path):
    v3 = SchemaCatalog(_evolved_schema_dir(tmp_path, [{"name": "risk_zone", "type": "string", "doc": "no default"}]))
    with pytest.raises(DecodeError) as err:
        AvroCodec(v3).decode(codec.encode("event", EVENT), "event")
    assert (err.value.reason, err.value.field) == (MISSING_FIELD, "risk_zone")
    assert "risk_zone" in str(err.value)


def test_catalog_rejects_unresolvable_reference_and_non_self_contained_history(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(SCHEMA_DIR / "prediction.avsc", broken)  # refers to streamscore.Event, not defined here
    with pytest.raises(SchemaCatalogError, match="prediction.avsc refers to unknown type 'streamscore.Event'"):
        SchemaCatalog(broken)

    history = tmp_path / "hist"
    (history / "history").mkdir(parents=True)
    shutil.copy(SCHEMA_DIR / "event.avsc", history)
    shutil.copy(SCHEMA_DIR / "prediction.avsc", history / "history" / "prediction.v0.avsc")
    with pytest.raises(SchemaCatalogError, match="self-contained"):
        SchemaCatalog(history)


# --- decode errors ----------------------------------------------------------------------------
def _decode_error(codec: AvroCodec, data: bytes, name: str = "event") -> DecodeError:
    with pytest.raises(DecodeError) as err:
        codec.decode(data, name)
    assert isinstance(err.value, ValueError)
    return err.value


def test_empty_and_random_bytes_are_undecodable(codec):
    assert _decode_error(codec, b"").reason == UNDECODABLE
    err = _decode_error(codec, os.urandom(64).replace(b"\xc3", b"A").replace(b"\x00", b"B") or b"A")
    assert err.reason == UNDECODABLE and "magic" in str(err)


def test_bad_single_object_magic_and_short_header(codec):
    good = codec.encode("event", EVENT)
    err = _decode_error(codec, b"\xc3\x02" + good[2:])
    assert err.reason == UNDECODABLE and "c3 02" in str(err)
    assert _decode_error(codec, good[:6]).reason == UNDECODABLE


def test_truncated_body_names_the_field(codec):
    good = codec.encode("event", EVENT)
    # Body: event_id, entity_id, event_time (varint), amount (8 bytes), ...; cut inside amount.
    cut = 10 + len(b"\x08ev-1") + len(b"\x0ecard-42") + 6 + 3
    err = _decode_error(codec, good[:cut])
    assert (err.reason, err.field) == (UNDECODABLE, "amount")
    assert str(err) == "truncated Avro body while reading field 'amount' (streamscore.Event)"


def test_trailing_garbage_is_undecodable(codec):
    err = _decode_error(codec, codec.encode("event", EVENT) + b"\x00\x01")
    assert err.reason == UNDECODABLE and "trailing" in str(err)


def test_unknown_fingerprint(codec):
    body = codec.encode("event", EVENT)[10:]
    err = _decode_error(codec, b"\xc3\x01" + bytes.fromhex("1a2b3c4d5e6f7081")[::-1] + body)
    assert err.reason == UNKNOWN_SCHEMA
    assert str(err) == "unknown schema fingerprint 0x1a2b3c4d5e6f7081 (not streamscore's schemas/, nor their history/ copies)"


def test_a_fingerprint_written_big_endian_is_named_as_the_mistake_it_is(codec):
    data = codec.encode("event", EVENT)
    err = _decode_error(codec, data[:2] + data[2:10][::-1] + data[10:])
    assert err.reason == UNKNOWN_SCHEMA
    assert str(err).startswith(f"schema fingerprint 0x{int.from_bytes(data[2:10], 'big'):016x} is event.avsc's "
                               "written in the wrong byte order")


def test_label_where_event_expected_is_wrong_schema(codec):
    err = _decode_error(codec, codec.encode("label", SAMPLES["label"]), "event")
    assert (err.reason, err.field) == (WRONG_SCHEMA, None)
    assert str(err) == "message is streamscore.Label, expected streamscore.Event"


def test_decode_many_keeps_positions_and_never_raises(codec):
    good = codec.encode("event", EVENT)
    batch = [good, b"", good[:-2], codec.encode("label", SAMPLES["label"]), good]
    records, errors = codec.decode_many(batch, "event")
    assert records == [EVENT, None, None, None, EVENT]
    assert [(i, e.reason) for i, e in errors] == [(1, UNDECODABLE), (2, UNDECODABLE), (3, WRONG_SCHEMA)]


# --- encode errors ----------------------------------------------------------------------------
def _encode_error(codec: AvroCodec, name: str, record: dict) -> EncodeError:
    with pytest.raises(EncodeError) as err:
        codec.encode(name, record)
    assert isinstance(err.value, ValueError)
    return err.value


def test_encode_missing_required_field_names_it(codec):
    err = _encode_error(codec, "event", {k: v for k, v in EVENT.items() if k != "currency"})
    assert err.field == "currency"
    assert str(err) == "cannot encode streamscore.Event: field 'currency' is missing (required, no default)"


def test_encode_wrong_value_names_field_and_value(codec):
    err = _encode_error(codec, "event", {**EVENT, "amount": None})
    assert (err.field, err.value) == ("amount", None)
    assert str(err) == "cannot encode streamscore.Event: field 'amount' = None (NoneType) is null but the field is a non-nullable double"
    err = _encode_error(codec, "event", {**EVENT, "channel": 7})
    assert (err.field, err.value) == ("channel", 7) and "'channel' = 7 (int)" in str(err)
    assert _encode_error(codec, "event", {**EVENT, "entity_id": None}).field == "entity_id"
    assert _encode_error(codec, "label", {**SAMPLES["label"], "label": 2**40}).field == "label"


def test_numeric_coercion_is_lenient_by_default_and_rejected_with_validate(codec, catalog):
    # fastavro writes float("12.50") for a double; documented, and closed by validate=True.
    lenient = codec.decode(codec.encode("event", {**EVENT, "amount": "12.50"}), "event")
    assert lenient["amount"] == 12.5
    err = _encode_error(AvroCodec(catalog, validate=True), "event", {**EVENT, "amount": "12.50"})
    assert (err.field, err.value) == ("amount", "12.50")
    assert str(err) == "cannot encode streamscore.Event: field 'amount' = '12.50' (str) is not a valid double"
    assert _encode_error(AvroCodec(catalog, validate=True), "event", {**EVENT, "amount": True}).field == "amount"


def test_encode_nested_and_map_fields_are_named(codec):
    bad_event = {**SAMPLES["prediction"], "event": {**EVENT, "event_time": "yesterday"}}
    assert _encode_error(codec, "prediction", bad_event).field == "event.event_time"
    bad_feature = {**SAMPLES["prediction"], "features": {"amount": "x"}}
    assert _encode_error(codec, "prediction", bad_feature).field == "features['amount']"


def test_encode_non_mapping_record(codec):
    err = _encode_error(codec, "label", ["not", "a", "dict"])
    assert err.field is None and "is not a mapping" in str(err)


def test_encode_rejects_unknown_fields(codec):
    err = _encode_error(codec, "event", {**EVENT, "merchant_categroy": "5411"})
    assert err.field == "merchant_categroy" and "not a field of streamscore.Event" in str(err)


# --- properties -------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), framing=st.sampled_from(["raw", "single", "confluent"]), name=st.sampled_from(RECORD_NAMES))
def test_arbitrary_bytes_only_raise_decode_error(registry_codec, data, framing, name):
    catalog = registry_codec.catalog
    registry_codec.encode(name, SAMPLES[name])  # make sure id 1.. exist in the mock registry
    prefix = {
        "raw": b"",
        "single": b"\xc3\x01" + catalog.fingerprint(name).to_bytes(8, "little"),
        "confluent": b"\x00\x00\x00\x00\x01",
    }[framing]
    try:
        record = registry_codec.decode(prefix + data, name)
    except DecodeError as err:
        assert err.reason in {UNDECODABLE, UNKNOWN_SCHEMA, WRONG_SCHEMA, MISSING_FIELD}
    else:
        assert isinstance(record, dict)


_text = st.text(max_size=20)
_optional_text = st.none() | _text
events = st.fixed_dictionaries(
    {
        "event_id": _text.filter(bool),
        "entity_id": _text.filter(bool),
        "event_time": st.integers(-(2**63), 2**63 - 1),
        "amount": st.floats(allow_nan=False),
        "currency": _text,
        "merchant_category": _optional_text,
        "channel": _optional_text,
        "country": _optional_text,
        "device_id": _optional_text,
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=events)
def test_arbitrary_valid_events_round_trip(codec, registry_codec, event):
    assert codec.decode(codec.encode("event", event), "event") == event
    assert registry_codec.decode(registry_codec.encode("event", event), "event") == event
    prediction = {**copy.deepcopy(SAMPLES["prediction"]), "event": event}
    assert codec.decode(codec.encode("prediction", prediction), "prediction")["event"] == event


# --- the product's records: streamscore's own schemas plus each example spec's ---------------
@pytest.mark.parametrize("name", ["payments", "rides"])
def test_a_specs_records_join_the_system_schemas_and_round_trip(name):
    from conftest import example_spec

    spec = example_spec(name)
    catalog = SchemaCatalog.for_spec(spec)
    assert {"prediction", "model_update", "retrain_request", "event", "label"} <= set(catalog.names)
    codec = AvroCodec(catalog)
    from streamscore.dev.generators import load_generator

    event, label = next(load_generator(spec).make_generator(0, 5).events(1))
    assert codec.decode(codec.encode("event", event), "event") == event
    assert codec.decode(codec.encode("label", label), "label") == label


def test_logical_types_are_read_and_written_as_their_primitive():
    """A timestamp-millis is its long (what the compiled scanner reads), not a datetime."""
    from conftest import example_spec

    spec = example_spec("rides")  # requested_at is a timestamp-millis long
    codec = AvroCodec(SchemaCatalog.for_spec(spec))
    event = {"trip_id": "t", "driver_id": "d", "requested_at": 1_767_225_600_123, "pickup_zone": "Z01",
             "dropoff_zone": None, "distance_km": 2.5, "passengers": 1, "vehicle": None, "surge": 1.0,
             "is_airport": False, "rider_rating": None}
    decoded = codec.decode(codec.encode("event", event), "event")
    assert decoded["requested_at"] == 1_767_225_600_123 and type(decoded["requested_at"]) is int
    assert "logicalType" in json.dumps(codec.catalog.expanded("event"))  # kept for registries and readers


def test_an_unknown_fingerprint_names_the_spec_schemas_it_was_looked_up_in():
    from conftest import example_spec

    catalog = SchemaCatalog.for_spec(example_spec("rides"))
    assert catalog.unknown_fingerprint_message(1) == ("unknown schema fingerprint 0x0000000000000001 (not the spec's "
                                                      "outcome.avsc, trip.avsc and streamscore's schemas/, nor their "
                                                      "history/ copies)")
