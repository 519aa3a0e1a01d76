"""PredictionReader (the logger's fast Prediction decoder) must agree with the generic decoder exactly:
same dict for every message, same DecodeError (reason) for every bad one."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from streamscore.legacy import features
from streamscore.avro.codec import AvroCodec, DecodeError
from streamscore.legacy.prediction_decoding import PredictionReader
from streamscore.legacy.prediction_encoding import PredictionWriter
from streamscore.dev.simulator import Simulator
from streamscore.clickhouse.rows import prediction_row
from streamscore.scoring.validation import InvalidEvent

N_FEATURES = len(features.FEATURE_NAMES)


def same(a, b) -> bool:
    """Deep equality where NaN equals NaN and types must match (1.0 is not 1)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def simulated_predictions(codec: AvroCodec, n: int, seed: int, ascii_only: bool = False) -> list[bytes]:
    """Predictions as the scorer writes them: nulls in optional fields and the score, NaN and extreme
    features, empty strings, large offsets and negative times; unless `ascii_only`, also unicode and
    long (multi-byte length) strings."""
    rng = np.random.default_rng(seed)
    events = [event for event, _ in Simulator(seed, n_entities=300).events(n)]
    for i, event in enumerate(events):
        if i % 7 == 0:
            event["merchant_category"] = event["channel"] = event["country"] = event["device_id"] = None
        if i % 9 == 0:
            event["device_id"] = ""
        if i % 11 == 0 and not ascii_only:
            event["event_id"] = f"évé-{i}-日本-💳"
            event["device_id"] = "d" * (100 + i % 300)  # string length needs a multi-byte varint
        if i % 13 == 0:
            event["event_time"] = -1_000 * i  # before 1970: negative zig-zag
    encode_event = codec.encoder("event")
    raw = [encode_event(e) for e in events]
    matrix = rng.normal(size=(n, N_FEATURES)) * 1e6
    matrix[rng.random(matrix.shape) < 0.25] = np.nan
    matrix[0] = [math.inf, -math.inf, 0.0, -0.0] + [5e-324] * (N_FEATURES - 4)
    writer = PredictionWriter(codec)
    half = n // 2
    scored = writer.encode_batch(events[:half], raw[:half], matrix[:half], rng.random(half), 1_700_000_000_000,
                                 "fraud" if ascii_only else "fraud-ü", 123_456, list(range(half)),
                                 [2**40 + i for i in range(half)])
    unscored = writer.encode_batch(events[half:], raw[half:], matrix[half:], None, 1_700_000_000_001,
                                   "fraud", 0, [0] * (n - half), list(range(n - half)))
    return scored + unscored


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


@pytest.fixture(scope="module")
def messages(codec) -> list[bytes]:
    return simulated_predictions(codec, 400, seed=5)


def test_same_dict_and_row_as_the_generic_decoder(codec, messages):
    generic = codec.decoder("prediction")
    reader = PredictionReader(codec)
    for data in messages:
        expected = generic(data)
        assert same(reader(data), expected), expected["event_id"]
        assert same(reader.row(data), prediction_row(expected))
    assert reader._fields(messages[0]) is not None  # the fast path was taken, not the fallback


def test_confluent_framing_takes_the_fast_path_too():
    codec = AvroCodec(registry_url="mock://prediction-decoding")
    reader = PredictionReader(codec)
    messages = simulated_predictions(codec, 50, seed=8)
    assert messages[0][0] == 0x00
    generic = codec.decoder("prediction")
    for data in messages:
        assert same(reader(data), generic(data))
    assert reader._fields(messages[0]) is not None


def test_other_feature_maps_fall_back_to_the_generic_decoder(codec):
    """A scorer with another feature set writes other keys: still decoded, exactly as before."""
    record = PredictionReader(codec)(simulated_predictions(codec, 2, seed=1)[0])
    reader = PredictionReader(codec)
    for feature_map in ({}, {"amount": 1.0}, {**record["features"], "extra": 2.0},
                        dict(reversed(list(record["features"].items())))):
        data = codec.encode("prediction", {**record, "features": feature_map})
        assert reader._fields(data) is None
        assert same(reader(data), codec.decode(data, "prediction"))


def test_garbage_and_truncation_raise_the_generic_decode_error(codec, messages):
    generic = codec.decoder("prediction")
    reader = PredictionReader(codec)

    def outcome(decode, data):
        try:
            return "ok", decode(data)
        except DecodeError as exc:
            return "error", exc.reason

    rng = random.Random(3)
    cases = [b"", b"\xc3", b"\x00\x00", b"garbage", bytes(40), codec.encode("label", {
        "event_id": "e", "entity_id": "c", "label": 1, "label_time": 0})]
    for data in messages[:25]:
        cases += [data[:cut] for cut in range(0, len(data), 3)]  # truncations, header included
        cases.append(data + b"\x00")  # trailing byte
        for _ in range(20):  # random byte corruption after the header
            pos = rng.randrange(10, len(data))
            cases.append(data[:pos] + bytes((rng.randrange(256),)) + data[pos + 1:])
    errors = 0
    for data in cases:
        fast_kind, fast_value = outcome(reader, data)
        generic_kind, generic_value = outcome(generic, data)
        assert fast_kind == generic_kind, data
        assert same(fast_value, generic_value) if fast_kind == "ok" else fast_value == generic_value
        errors += fast_kind == "error"
        if fast_kind == "error":
            with pytest.raises(DecodeError):
                reader.row(data)
    assert errors > len(cases) // 2  # the cases really are mostly bad


def test_row_rejects_times_outside_datetime64(codec):
    record = PredictionReader(codec)(simulated_predictions(codec, 2, seed=2)[0])
    data = codec.encode("prediction", {**record, "scored_at": 10**14})
    with pytest.raises(InvalidEvent) as info:
        PredictionReader(codec).row(data)
    assert info.value.field == "scored_at"
