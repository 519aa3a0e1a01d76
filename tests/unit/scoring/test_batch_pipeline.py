"""The scoring step (ScoringPipeline) on whatever arrives on the events topic: it never raises and accounts
for every message (exactly one prediction or exactly one rejection with a reason), for any spec."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from conftest import example_spec, spec_codec
from streamscore.scoring.pipeline import InputMessage, ScoringPipeline
from streamscore.scoring.served_model import ServedModel
from streamscore.scoring.validation import REASONS
from streamscore.spec.oracle import Oracle

PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)
ENCODE_EVENT = CODEC.encoder("event")
ENCODE_LABEL = CODEC.encoder("label")
NOW_MS = 1_760_000_000_000
DAY_MS = 86_400_000
MAX_AMOUNT = 1_000_000.0
KNOWN_REASONS = set(REASONS) | {"undecodable", "unknown_schema", "wrong_schema"}

# Doubles the way a hostile or buggy producer could write them: anything Avro can carry.
any_double = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e15, -1.0, MAX_AMOUNT, math.nextafter(MAX_AMOUNT, math.inf)]),
)
any_long = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=NOW_MS - 400 * DAY_MS, max_value=NOW_MS + DAY_MS),
)
short_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\x00", "\u00a0", "EUR", "eu", "5411", "pos"]))
maybe_text = st.one_of(st.none(), short_text)
events = st.fixed_dictionaries({
    "event_id": short_text, "entity_id": st.one_of(short_text, st.sampled_from(["card-1", "card-2"])),
    "event_time": any_long, "amount": any_double, "currency": short_text, "merchant_category": maybe_text,
    "channel": maybe_text, "country": maybe_text, "device_id": maybe_text,
})
# Mostly-sane events, so that plenty of inputs get past validation into the feature state.
plausible_events = st.fixed_dictionaries({
    "event_id": st.uuids().map(str), "entity_id": st.sampled_from(["card-1", "card-2", "card-3"]),
    "event_time": st.integers(min_value=NOW_MS - 300 * DAY_MS, max_value=NOW_MS),
    "amount": st.one_of(st.floats(min_value=0, max_value=MAX_AMOUNT), any_double),
    "currency": st.sampled_from(["EUR", "USD", "eu"]),
    "merchant_category": st.one_of(st.none(), st.sampled_from(["5411", "9999", ""])),
    "channel": st.one_of(st.none(), st.sampled_from(["pos", "ecom", "martian"])),
    "country": st.one_of(st.none(), st.sampled_from(["DE", "ZZ"])), "device_id": maybe_text,
})
any_event = st.one_of(events, plausible_events)
VALID = ENCODE_EVENT({"event_id": "e", "entity_id": "c", "event_time": NOW_MS, "amount": 1.0, "currency": "EUR",
                      "merchant_category": None, "channel": None, "country": None, "device_id": None})
framed_garbage = st.one_of(
    st.binary(max_size=64).map(lambda tail: VALID[:10] + tail),  # right fingerprint, random body
    st.binary(max_size=16).map(lambda tail: b"\x00" + tail),  # Confluent framing without a registry
    st.integers(min_value=0, max_value=len(VALID)).map(lambda n: VALID[:n]),  # truncated
    st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)).map(
        lambda flip: VALID[:flip[0]] + bytes([VALID[flip[0]] ^ flip[1]]) + VALID[flip[0] + 1:]),
)
wire_values = st.one_of(
    st.none(), st.binary(max_size=200), framed_garbage, any_event.map(ENCODE_EVENT),
    st.builds(lambda i: ENCODE_LABEL({"event_id": f"e{i}", "entity_id": "c", "label": 1, "label_time": NOW_MS}),
              st.integers(0, 10)),
)


def new_pipeline(spec=PAYMENTS, codec=CODEC) -> ScoringPipeline:
    return ScoringPipeline(spec, codec, ServedModel(name="fraud", version=0))


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(wire_values, min_size=1, max_size=20), st.integers(0, 3))
def test_score_accounts_for_every_message_and_never_raises(values, partition):
    pipeline = new_pipeline()
    messages = [InputMessage(value, partition, offset) for offset, value in enumerate(values)]

    result = pipeline.score(messages, now_ms=NOW_MS)

    predicted = [offset for _, offset in result.sources]
    rejected = [messages[index].offset for index, _, _ in result.rejected]
    assert sorted(predicted + rejected) == list(range(len(values))), "every message is predicted XOR rejected"
    assert [index for index, _, _ in result.rejected] == sorted(index for index, _, _ in result.rejected)
    assert len(result.predictions) == len(result.sources)
    for _, rejection, _ in result.rejected:
        assert rejection.reason in KNOWN_REASONS, rejection
        assert rejection.detail, f"rejection {rejection.reason} without a detail"
    for prediction in result.predictions:
        event = CODEC.decode(prediction["event"], "event")  # the source message, carried as it was
        assert prediction["entity_id"] == event["entity_id"] and prediction["event_id"] == event["event_id"]
        assert event["entity_id"].strip() and event["event_id"].strip()
        assert math.isfinite(event["amount"]) and 0 <= event["amount"] <= MAX_AMOUNT
        assert len(prediction["features"]) == len(PAYMENTS.features)
        assert prediction["feature_set"] == PAYMENTS.feature_set
    assert not np.isinf(result.matrix).any(), "NaN means undefined; inf would poison a model"


@hyp_settings(max_examples=200, deadline=None)
@given(st.lists(plausible_events, min_size=1, max_size=30))
def test_accepted_events_get_the_reference_interpreters_vectors(batch):
    pipeline = new_pipeline()
    result = pipeline.score([InputMessage(ENCODE_EVENT(e), 0, i) for i, e in enumerate(batch)], now_ms=NOW_MS)
    accepted = [(batch[offset], partition, offset) for partition, offset in result.sources]
    duplicates = {index for index, rejection, _ in result.rejected if rejection.reason == "duplicate_event"}
    oracle = Oracle(PAYMENTS)
    expected = [vector for i, vector in enumerate(oracle.run(
        (batch[index], 0, index) for index in sorted({offset for _, offset in result.sources} | duplicates)))]
    kept = [k for k, index in enumerate(sorted({offset for _, offset in result.sources} | duplicates))
            if index not in duplicates]
    np.testing.assert_array_equal(result.matrix, np.array([expected[k] for k in kept]).reshape(result.matrix.shape))
    assert len(accepted) == len(result.matrix)


def test_a_resent_event_id_is_rejected_as_duplicate_in_the_same_and_a_later_batch():
    pipeline = new_pipeline()
    event = {"event_id": "e-1", "entity_id": "card-1", "event_time": NOW_MS - 60_000, "amount": 5.0,
             "currency": "EUR", "merchant_category": None, "channel": None, "country": None, "device_id": None}
    other = dict(event, event_id="e-2", event_time=NOW_MS - 30_000)
    first = pipeline.score([InputMessage(ENCODE_EVENT(event), 0, 10), InputMessage(ENCODE_EVENT(event), 0, 11),
                            InputMessage(ENCODE_EVENT(other), 0, 12)], now_ms=NOW_MS)
    assert [p["event_id"] for p in first.predictions] == ["e-1", "e-2"] and first.sources == [(0, 10), (0, 12)]
    count_1h = PAYMENTS.feature_names.index("count_1h")
    assert first.predictions[1]["features"][count_1h] == 1.0
    ((index, rejection, event_id),) = first.rejected
    assert (index, rejection.reason, rejection.field, event_id) == (1, "duplicate_event", "event_id", "e-1")
    assert "offset 10" in rejection.detail and "offset 11" in rejection.detail
    later = pipeline.score([InputMessage(ENCODE_EVENT(other), 0, 20), InputMessage(ENCODE_EVENT(event), 0, 10)],
                           now_ms=NOW_MS)  # a re-send of e-2, then a crash replay of e-1's offset
    assert [r[1].reason for r in later.rejected] == ["duplicate_event"] and later.rejected[0][0] == 0
    assert [p["event_offset"] for p in later.predictions] == [10]
    assert len(pipeline.states[0].events_of(b"card-1")) == 2


@pytest.mark.parametrize("name", ["payments", "rides"])
def test_every_poison_message_of_an_example_is_rejected_with_its_reason_and_field(name):
    from streamscore.dev.generators import load_generator

    spec = example_spec(name)
    codec = spec_codec(spec)
    generator = load_generator(spec).make_generator(3, 10)
    bad = list(generator.bad_events(codec.encoder("event")))
    event, _ = next(generator.events(1))
    now = event[spec.event.time_field] // spec.event.time_divisor + 60_000
    result = new_pipeline(spec, codec).score([InputMessage(b.value, 0, i) for i, b in enumerate(bad)], now_ms=now)
    assert not result.encoded
    assert [(index, r.reason) for index, r, _ in result.rejected] == [(i, b.reason) for i, b in enumerate(bad)]
    for (_, rejection, _), case in zip(result.rejected, bad):
        if case.field is not None:  # garbage names the field where reading broke, when there is one
            assert rejection.field == case.field, case.description


def test_messages_of_an_older_writer_schema_take_the_generic_path_and_are_counted(tmp_path):
    import json

    from streamscore.avro.codec import AvroCodec, SchemaCatalog

    old = json.loads(PAYMENTS.event.schema_path.read_text())
    old["fields"] = [f for f in old["fields"] if f["name"] != "device_id"]  # an older Event without device_id
    history = tmp_path / "history"
    history.mkdir()
    (history / "event.v0.avsc").write_text(json.dumps(old))
    writer_catalog = SchemaCatalog()
    (tmp_path / "event.avsc").write_text(json.dumps(old))
    writer_catalog.add_record("event", tmp_path / "event.avsc")
    old_message = AvroCodec(writer_catalog).encode("event", {"event_id": "old-1", "entity_id": "card-9",
                                                            "event_time": NOW_MS - 1000, "amount": 3.0,
                                                            "currency": "EUR", "merchant_category": "5411",
                                                            "channel": None, "country": None})
    reader_catalog = SchemaCatalog.for_spec(PAYMENTS)
    reader_catalog.add_record("event", PAYMENTS.event.schema_path, history)
    codec = AvroCodec(reader_catalog)
    result = new_pipeline(PAYMENTS, codec).score([InputMessage(old_message, 0, 0), InputMessage(VALID, 0, 1)],
                                                 now_ms=NOW_MS)
    assert result.generic_rows == 1 and not result.rejected
    assert [p["event_id"] for p in result.predictions] == ["old-1", "e"]
    assert codec.decode(result.predictions[0]["event"], "event")["device_id"] is None  # resolved to the current schema
