"""EventReader (the scorer's fast Event decoder) must agree with the generic decoder exactly:
same dict (keys, order, values, types) for every message, same DecodeError (reason, field, message)
for every bad one."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamscore.avro.codec import AvroCodec, DecodeError, SchemaCatalog, SchemaRegistryUnavailable
from streamscore.legacy.event_decoding import EventReader
from streamscore.dev.simulator import Simulator

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "schemas"


def same(a, b) -> bool:
    """Deep equality where NaN equals NaN, key order counts and types must match (1.0 is not 1)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def simulated_events(n: int, seed: int) -> list[dict]:
    """Simulated events plus the corners: nulls, empty and unicode strings, strings needing a multi-byte
    length (fallback), negative / huge times (9- and 10-byte varints), NaN, infinities, -0.0."""
    events = [event for event, _ in Simulator(seed, n_entities=200).events(n)]
    specials = [math.nan, math.inf, -math.inf, -0.0, 5e-324, -1e300]
    for i, event in enumerate(events):
        if i % 7 == 0:
            event["merchant_category"] = event["channel"] = event["country"] = event["device_id"] = None
        if i % 11 == 0:
            event["event_id"] = f"évé-{i}-日本-💳"
            event["currency"] = ""
        if i % 13 == 0:
            event["device_id"] = "d" * (60 + i % 10)  # 63 bytes has a one-byte length, 64 does not
        if i % 17 == 0:
            event["event_time"] = [-1, 0, -(2**62), 2**62 - 1, -(2**63), 2**63 - 1][i // 17 % 6]
        if i % 19 == 0:
            event["amount"] = specials[i // 19 % len(specials)]
    return events


def outcome(decode, data: bytes):
    try:
        return "ok", decode(data)
    except DecodeError as exc:
        return "error", (exc.reason, exc.field, str(exc))


def assert_same_outcome(reader: EventReader, data: bytes) -> str:
    fast_kind, fast_value = outcome(reader, data)
    generic_kind, generic_value = outcome(reader.generic, data)
    assert fast_kind == generic_kind, data
    assert same(fast_value, generic_value) if fast_kind == "ok" else fast_value == generic_value, data
    return fast_kind


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


@pytest.fixture(scope="module")
def messages(codec) -> list[bytes]:
    encode = codec.encoder("event")
    return [encode(event) for event in simulated_events(600, seed=4)]


class CountingGeneric:
    """Wraps the generic decoder to count how often the fast path fell back to it."""

    def __init__(self, generic):
        self.generic = generic
        self.calls = 0

    def __call__(self, data):
        self.calls += 1
        return self.generic(data)


def test_same_dict_as_the_generic_decoder(codec, messages):
    reader = EventReader(codec)
    assert reader.fast_path_enabled  # schemas/event.avsc has the layout the fast path reads
    for data in messages:
        assert_same_outcome(reader, data)


def test_the_fast_path_is_taken_for_ordinary_events(codec):
    reader = EventReader(codec)
    reader.generic = counting = CountingGeneric(reader.generic)
    encode = codec.encoder("event")
    events = [event for event, _ in Simulator(9, n_entities=50).events(300)]
    for event in events:
        assert same(reader(encode(event)), codec.decode(encode(event), "event"))
    batch = reader.read_batch([encode(event) for event in events])
    assert all(same(a, codec.decode(encode(b), "event")) for a, b in zip(batch, events))
    assert counting.calls == 0


def test_confluent_framing_takes_the_fast_path_too():
    codec = AvroCodec(registry_url="mock://event-decoding")
    reader = EventReader(codec)
    reader.generic = counting = CountingGeneric(reader.generic)
    encode = codec.encoder("event", "events")
    messages = [encode(event) for event in simulated_events(100, seed=8)]
    assert messages[0][0] == 0x00
    for data in messages:
        assert same(reader(data), codec.decode(data, "event"))
    assert counting.calls < len(messages) // 4  # only the multi-byte-length / huge-varint corners


def _evolved_schema_dir(tmp_path: Path) -> Path:
    """schemas/ where Event gained an optional field, the old Event archived in history/."""
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "history", "*.py"))
    old = SchemaCatalog(target)
    old.archive("event", 1)
    old.archive("prediction", 1)
    raw = json.loads((target / "event.avsc").read_text())
    raw["fields"].append({"name": "mcc_description", "type": ["null", "string"], "default": None})
    (target / "event.avsc").write_text(json.dumps(raw))
    return target


def test_older_writer_schema_and_a_changed_current_schema_use_the_generic_decoder(codec, messages, tmp_path):
    v2 = AvroCodec(SchemaCatalog(_evolved_schema_dir(tmp_path)))
    reader = EventReader(v2)
    assert not reader.fast_path_enabled  # this file reads the old layout only: it must not guess
    for data in messages[:50]:  # written with what is now history/event.v1.avsc
        assert assert_same_outcome(reader, data) == "ok"
        assert reader(data)["mcc_description"] is None
    new = v2.encode("event", {**v2.decode(messages[0], "event"), "mcc_description": "Grocery"})
    assert reader(new)["mcc_description"] == "Grocery"


def test_garbage_truncation_and_foreign_schemas_raise_the_generic_decode_error(codec, messages):
    reader = EventReader(codec)
    rng = random.Random(3)
    label = codec.encode("label", {"event_id": "e", "entity_id": "c", "label": 1, "label_time": 0})
    prediction_header = codec.encoder("prediction").header
    cases = [b"", b"\xc3", b"\x00", b"\x00\x00", b"garbage", bytes(40), b"\xc3\x02" + messages[0][2:],
             label, prediction_header + messages[0][10:], messages[0][:10] + label[10:],
             b"\xc3\x01" + bytes(8) + messages[0][10:], b"\x00\x00\x00\x00\x07" + messages[0][10:]]
    for data in messages[:40]:
        cases += [data[:cut] for cut in range(len(data))]  # every truncation, header included
        cases += [data + b"\x00", data + b"\x02a"]  # trailing bytes
        for _ in range(30):  # random byte corruption after the header
            pos = rng.randrange(10, len(data))
            cases.append(data[:pos] + bytes((rng.randrange(256),)) + data[pos + 1:])
        pos = rng.randrange(10, len(data))
        cases.append(data[:pos] + b"\xff\xfe" + data[pos + 2:])  # invalid UTF-8 / long varint
    kinds = [assert_same_outcome(reader, data) for data in cases]
    assert kinds.count("error") > len(cases) // 2  # the cases really are mostly bad
    # one batch holding them all (and good messages between them) reads each like the generic decoder
    batch = [value for pair in zip(cases, messages * (len(cases) // len(messages) + 1)) for value in pair]
    batch += [None, b""]  # a tombstone and an empty value: None, for the caller to reject
    decoded = reader.read_batch(batch)
    assert decoded[-2:] == [None, None]
    for data, result in zip(batch[:-2], decoded):
        kind, expected = outcome(reader.generic, data)
        if not data:
            assert result is None
        elif kind == "ok":
            assert same(result, expected), data
        else:
            assert isinstance(result, DecodeError) and (result.reason, result.field, str(result)) == expected, data
            assert result.__traceback__ is None


def test_non_bytes_values_are_decoded_like_the_generic_decoder(codec, messages):
    reader = EventReader(codec)
    for data in messages[:5]:
        assert same(reader(bytearray(data)), reader.generic(bytearray(data)))
        assert same(reader(memoryview(data)), reader.generic(memoryview(data)))


class UnreachableRegistry:
    def get_schema(self, schema_id):
        raise ConnectionError("registry down")


def test_a_registry_outage_still_raises_from_the_generic_decoder(codec, messages):
    """Not the message's fault: SchemaRegistryUnavailable (never a DecodeError), and nothing cached."""
    reader = EventReader(AvroCodec(registry_client=UnreachableRegistry()))
    data = b"\x00\x00\x00\x00\x09" + messages[0][10:]
    for _ in range(2):
        with pytest.raises(SchemaRegistryUnavailable, match="registry down"):
            reader(data)
    assert reader._fast_headers == {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=120), framing=st.sampled_from(["single", "confluent", "raw"]))
def test_arbitrary_bodies_give_the_generic_outcome(codec, body, framing):
    prefix = {"single": codec.encoder("event").header, "confluent": b"\x00\x00\x00\x00\x01", "raw": b""}[framing]
    assert_same_outcome(EventReader(codec), prefix + body)


_text = st.text(max_size=70)
events = st.fixed_dictionaries({
    "event_id": _text, "entity_id": _text, "event_time": st.integers(-(2**63), 2**63 - 1),
    "amount": st.floats(), "currency": _text, "merchant_category": st.none() | _text,
    "channel": st.none() | _text, "country": st.none() | _text, "device_id": st.none() | _text,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=events)
def test_arbitrary_events_decode_like_the_generic_decoder(codec, event):
    assert assert_same_outcome(EventReader(codec), codec.encode("event", event)) == "ok"
