"""The compiled scanner must read every record exactly as the generic decoder does, for any flat layout, and
leave every message it cannot read that way to the generic decoder (same DecodeError, same reason and field)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streamscore.avro.codec import AvroCodec, DecodeError, SchemaCatalog
from streamscore.avro.layout import LayoutError, record_layout
from streamscore.avro.scanner import ROW_FAILED, ROW_GENERIC, ROW_SCANNED, RecordReader, columns_from_records

ALL_TYPES = {"type": "record", "name": "AllTypes", "namespace": "test", "fields": [
    {"name": "s", "type": "string"}, {"name": "b", "type": "bytes"}, {"name": "flag", "type": "boolean"},
    {"name": "i", "type": "int"}, {"name": "l", "type": "long"}, {"name": "f", "type": "float"},
    {"name": "d", "type": "double"},
    {"name": "ns", "type": ["null", "string"], "default": None},
    {"name": "sn", "type": ["string", "null"], "default": "x"},  # null as the second branch
    {"name": "nl", "type": ["null", "long"], "default": None},
    {"name": "nd", "type": ["double", "null"], "default": 1.5},
    {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
]}


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> AvroCodec:
    folder = tmp_path_factory.mktemp("schemas")
    (folder / "alltypes.avsc").write_text(json.dumps(ALL_TYPES))
    catalog = SchemaCatalog()
    catalog.add_record("event", folder / "alltypes.avsc")
    return AvroCodec(catalog)


records = st.fixed_dictionaries({
    "s": st.text(max_size=80), "b": st.binary(max_size=80), "flag": st.booleans(),
    "i": st.integers(-(2**31), 2**31 - 1), "l": st.integers(-(2**63), 2**63 - 1),
    "f": st.floats(width=32, allow_nan=False), "d": st.floats(allow_nan=True),
    "ns": st.one_of(st.none(), st.text(max_size=5)), "sn": st.one_of(st.none(), st.text(max_size=200)),
    "nl": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), "nd": st.one_of(st.none(), st.floats()),
    "t": st.integers(0, 2**45),
})


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, min_size=1, max_size=8))
def test_records_read_exactly_as_the_generic_decoder_reads_them(codec, batch):
    encode, decode = codec.encoder("event"), codec.decoder("event")
    values = [encode(r) for r in batch]
    scanned = RecordReader(codec, "event").read_batch(values)
    for i, value in enumerate(values):
        expected = decode(value)
        got = scanned.record(i)
        assert list(got) == list(expected) and all(same(got[k], expected[k]) for k in expected), (got, expected)
    # 9-byte varints and longer are left to the generic decoder (beyond 63 bits Python and int64 differ)
    assert set(scanned.status.tolist()) <= {ROW_SCANNED, ROW_GENERIC}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=120), cut=st.integers(0, 200), flip=st.tuples(st.integers(0, 200), st.integers(1, 255)))
def test_garbage_truncation_and_corruption_give_the_generic_outcome(codec, body, cut, flip):
    encode, decode = codec.encoder("event"), codec.decoder("event")
    valid = encode({"s": "é", "b": b"\x00", "flag": True, "i": 1, "l": 2, "f": 0.5, "d": 1.0, "ns": None,
                    "sn": "y", "nl": 3, "nd": None, "t": 5})
    position = flip[0] % len(valid)
    candidates = [valid[:10] + body, valid[:cut], valid[:position] + bytes([valid[position] ^ flip[1]]) +
                  valid[position + 1:], valid + b"\x00", b"\x00" + body, b""]
    scanned = RecordReader(codec, "event").read_batch(candidates)
    for i, value in enumerate(candidates):
        try:
            expected = decode(value)
        except DecodeError as error:
            assert scanned.status[i] == ROW_FAILED
            got = scanned.errors[i]
            if value:
                assert (got.reason, got.field, str(got)) == (error.reason, error.field, str(error))
            continue
        assert scanned.status[i] != ROW_FAILED
        got = scanned.record(i)
        assert all(same(got[k], expected[k]) for k in expected)


def test_a_registry_framed_message_is_scanned_too(tmp_path):
    (tmp_path / "alltypes.avsc").write_text(json.dumps(ALL_TYPES))
    catalog = SchemaCatalog()
    catalog.add_record("event", tmp_path / "alltypes.avsc")
    codec = AvroCodec(catalog, registry_url="mock://scanner")
    value = codec.encode("event", {"s": "a", "b": b"", "flag": False, "i": 0, "l": 0, "f": 0.0, "d": 0.0,
                                   "t": 0}, topic="events")
    assert value[0] == 0  # Confluent framing
    scanned = RecordReader(codec, "event").read_batch([value])
    assert scanned.status.tolist() == [ROW_SCANNED] and scanned.record(0)["sn"] == "x"


def test_columns_from_records_have_the_scanners_shape(codec):
    rows = [{"s": "a", "b": b"xy", "flag": True, "i": -1, "l": 7, "f": 0.25, "d": float("nan"), "ns": None,
             "sn": None, "nl": None, "nd": 2.0, "t": 9}]
    from_records = columns_from_records(record_layout(ALL_TYPES), rows)
    scanned = RecordReader(codec, "event").read_batch([codec.encode("event", rows[0])])
    for name in ("lengths", "nulls"):
        assert np.array_equal(getattr(from_records, name), getattr(scanned, name)), name
    assert np.array_equal(from_records.floats, scanned.floats, equal_nan=True)
    a, b = from_records.record(0), scanned.record(0)
    assert list(a) == list(b) and all(same(a[k], b[k]) for k in a)


@pytest.mark.parametrize("field_type, message", [
    ({"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "int"}]}, "of type 'record'"),
    ({"type": "array", "items": "string"}, "of type 'array'"),
    ({"type": "map", "values": "long"}, "of type 'map'"),
    ({"type": "enum", "name": "E", "symbols": ["A"]}, "of type 'enum'"),
    (["null", "string", "long"], "only a union of null and one primitive"),
    (["string", "long"], "only a union of null and one primitive"),
    ({"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 2}, "logicalType 'decimal'"),
])
def test_layouts_refuse_what_is_not_a_flat_primitive_naming_the_field(field_type, message):
    schema = {"type": "record", "name": "R", "fields": [{"name": "ok", "type": "string"},
                                                         {"name": "bad", "type": field_type}]}
    with pytest.raises(LayoutError, match=message) as error:
        record_layout(schema)
    assert "field 'bad' of R" in str(error.value)
