"""Property-based tests of the scorer's input handling: whatever arrives on the events
topic, the scoring step never raises and accounts for every message — each one
becomes exactly one prediction or exactly one rejection with a reason."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from streamscore.legacy import features
from streamscore.avro.codec import AvroCodec
from streamscore.scoring.pipeline import InputMessage, ScoringPipeline, ServedModel
from streamscore.settings import Settings
from streamscore.scoring.validation import InvalidEvent, validate_event

SETTINGS = Settings(kafka_bootstrap_servers="unused:9092")
CODEC = AvroCodec()
ENCODE_EVENT = CODEC.encoder("event")
ENCODE_LABEL = CODEC.encoder("label")
NOW_MS = 1_760_000_000_000
DAY_MS = 86_400_000
KNOWN_REASONS = {"undecodable", "unknown_schema", "wrong_schema", "missing_field", "invalid_value", "null_entity",
                 "out_of_range", "non_finite", "future_event_time", "stale_event_time", "duplicate_event"}

# Doubles the way a hostile or buggy producer could write them: anything Avro can carry.
any_double = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e15, -1.0, SETTINGS.max_amount, math.nextafter(SETTINGS.max_amount, math.inf)]),
)
any_long = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=NOW_MS - 400 * DAY_MS, max_value=NOW_MS + DAY_MS),
)
short_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\x00", "EUR", "eu", "5411", "pos"]))
maybe_text = st.one_of(st.none(), short_text)

events = st.fixed_dictionaries({
    "event_id": short_text,
    "entity_id": st.one_of(short_text, st.sampled_from(["card-1", "card-2"])),
    "event_time": any_long,
    "amount": any_double,
    "currency": short_text,
    "merchant_category": maybe_text,
    "channel": maybe_text,
    "country": maybe_text,
    "device_id": maybe_text,
})
# Mostly-sane events, so that plenty of inputs get past validation into the feature state.
plausible_events = st.fixed_dictionaries({
    "event_id": st.uuids().map(str),
    "entity_id": st.sampled_from(["card-1", "card-2", "card-3"]),
    "event_time": st.integers(min_value=NOW_MS - 300 * DAY_MS, max_value=NOW_MS),
    "amount": st.one_of(st.floats(min_value=0, max_value=SETTINGS.max_amount), any_double),
    "currency": st.sampled_from(["EUR", "USD", "eu"]),
    "merchant_category": st.one_of(st.none(), st.sampled_from(["5411", "9999", ""])),
    "channel": st.one_of(st.none(), st.sampled_from(["pos", "ecom", "martian"])),
    "country": st.one_of(st.none(), st.sampled_from(["DE", "ZZ"])),
    "device_id": maybe_text,
})
any_event = st.one_of(events, plausible_events)


def framed_garbage() -> st.SearchStrategy[bytes]:
    """Bytes that get past the first checks: real framing headers or real events cut short or bit-flipped."""
    valid = ENCODE_EVENT({"event_id": "e", "entity_id": "c", "event_time": NOW_MS, "amount": 1.0, "currency": "EUR",
                          "merchant_category": None, "channel": None, "country": None, "device_id": None})
    return st.one_of(
        st.binary(max_size=64).map(lambda tail: valid[:10] + tail),  # right fingerprint, random body
        st.binary(max_size=16).map(lambda tail: b"\x00" + tail),  # Confluent framing without a registry
        st.integers(min_value=0, max_value=len(valid)).map(lambda n: valid[:n]),  # truncated
        st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(
            lambda flip: valid[:flip[0]] + bytes([valid[flip[0]] ^ flip[1]]) + valid[flip[0] + 1:]),
    )


wire_values = st.one_of(
    st.none(),
    st.binary(max_size=200),
    framed_garbage(),
    any_event.map(ENCODE_EVENT),
    st.builds(lambda i: ENCODE_LABEL({"event_id": f"e{i}", "entity_id": "c", "label": 1, "label_time": NOW_MS}),
              st.integers(0, 10)),
)


def new_pipeline() -> ScoringPipeline:
    return ScoringPipeline(SETTINGS, CODEC, ServedModel(name="fraud", version=0))


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(wire_values, min_size=1, max_size=20), st.integers(0, 3))
def test_score_accounts_for_every_message_and_never_raises(values, partition):
    pipeline = new_pipeline()
    messages = [InputMessage(value, partition, offset) for offset, value in enumerate(values)]

    result = pipeline.score(messages, now_ms=NOW_MS)

    predicted = [offset for _, offset in result.sources]
    rejected = [messages[index].offset for index, _, _ in result.rejected]
    assert sorted(predicted + rejected) == list(range(len(values))), "every message is predicted XOR rejected"
    assert len(result.predictions) == len(result.sources)
    for _, rejection, _ in result.rejected:
        assert rejection.reason in KNOWN_REASONS, rejection
        assert rejection.detail, f"rejection {rejection.reason} without a detail"
    for prediction in result.predictions:
        assert prediction["entity_id"].strip() and prediction["event_id"].strip()
        assert math.isfinite(prediction["event"]["amount"])
        assert 0 <= prediction["event"]["amount"] <= SETTINGS.max_amount
        assert set(prediction["features"]) == set(features.FEATURE_NAMES)


@hyp_settings(max_examples=400, deadline=None)
@given(st.lists(any_event, min_size=1, max_size=30))
def test_extreme_valid_events_through_validation_and_features(batch):
    """Accepted events have finite in-range amounts, and computing features on them never raises."""
    states: dict[str, features.EntityState] = {}
    accepted = []
    for event in batch:
        try:
            validate_event(event, SETTINGS, NOW_MS)
        except InvalidEvent as rejection:
            assert rejection.reason in KNOWN_REASONS and rejection.field, rejection
            continue
        assert math.isfinite(event["amount"]) and 0 <= event["amount"] <= SETTINGS.max_amount
        accepted.append(event)
    matrix = features.compute_batch(states, accepted, list(range(len(accepted))))
    assert matrix.shape == (len(accepted), len(features.FEATURE_NAMES))
    if accepted:
        amount_column = matrix[:, features.FEATURE_NAMES.index("amount")]
        assert np.isfinite(amount_column).all()
        # Nothing infinite leaks into the features: NaN means "undefined", inf would poison a model.
        assert not np.isinf(matrix).any(), matrix
    # The same events replayed through the offline path give the same vectors (one definition).
    offline = features.offline_features([dict(e, event_partition=0, event_offset=i) for i, e in enumerate(accepted)])
    np.testing.assert_array_equal(offline, matrix)



def test_a_resent_event_id_is_rejected_as_duplicate_in_the_same_and_a_later_batch():
    pipeline = new_pipeline()
    event = {"event_id": "e-1", "entity_id": "card-1", "event_time": NOW_MS - 60_000, "amount": 5.0,
             "currency": "EUR", "merchant_category": None, "channel": None, "country": None, "device_id": None}
    other = dict(event, event_id="e-2", event_time=NOW_MS - 30_000)
    first = pipeline.score([InputMessage(ENCODE_EVENT(event), 0, 10), InputMessage(ENCODE_EVENT(event), 0, 11),
                            InputMessage(ENCODE_EVENT(other), 0, 12)], now_ms=NOW_MS)
    assert [p["event_id"] for p in first.predictions] == ["e-1", "e-2"] and first.sources == [(0, 10), (0, 12)]
    assert first.predictions[1]["features"]["count_1h"] == 1.0
    ((index, rejection, event_id),) = first.rejected
    assert (index, rejection.reason, rejection.field, event_id) == (1, "duplicate_event", "event_id", "e-1")
    assert "offset 10" in rejection.detail and "offset 11" in rejection.detail
    later = pipeline.score([InputMessage(ENCODE_EVENT(other), 0, 20), InputMessage(ENCODE_EVENT(event), 0, 10)],
                           now_ms=NOW_MS)  # a re-send of e-2, then a crash replay of e-1's offset
    assert [r[1].reason for r in later.rejected] == ["duplicate_event"] and later.rejected[0][0] == 0
    assert [p["event_offset"] for p in later.predictions] == [10]
    assert len(pipeline.states[0]["card-1"]) == 2
