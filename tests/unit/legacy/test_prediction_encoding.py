"""The batch Prediction writer must produce exactly the generic Avro encoder's bytes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from streamscore.legacy import features
from streamscore.avro.codec import AvroCodec, SchemaCatalog
from streamscore.legacy.prediction_encoding import PredictionWriter, avro_long, avro_longs
from streamscore.scoring.pipeline import InputMessage, ScoringPipeline, ServedModel
from streamscore.settings import Settings
from streamscore.dev.simulator import Simulator

CATALOG = SchemaCatalog()


def _generic(codec, events, matrix, scores, scored_at, name, version, partitions, offsets):
    encode = codec.encoder("prediction")
    return [encode({
        "event_id": e["event_id"], "entity_id": e["entity_id"], "event_time": e["event_time"],
        "scored_at": scored_at, "model_name": name, "model_version": version,
        "score": None if scores is None else float(scores[i]), "feature_set": features.FEATURE_SET_HASH,
        "features": dict(zip(features.FEATURE_NAMES, matrix[i].tolist())), "event": e,
        "event_partition": partitions[i], "event_offset": offsets[i]}) for i, e in enumerate(events)]


@pytest.mark.parametrize("registry", [None, "mock://prediction-encoding"])
@pytest.mark.parametrize("with_scores", [True, False])
def test_same_bytes_as_generic_encoder(registry, with_scores):
    codec = AvroCodec(CATALOG, registry)
    events = [e for e, _ in Simulator(5, n_entities=50).events(300)]
    events[3]["event_id"] = "évènement-ü-🙂"
    events[4]["merchant_category"] = None
    raws = [codec.encode("event", e) for e in events]
    matrix = features.offline_features(events)
    matrix[0, :] = math.nan
    matrix[1, 0] = -0.0
    scores = np.linspace(0, 1, len(events)) if with_scores else None
    partitions = [i % 7 for i in range(len(events))]
    offsets = [i * 2**40 for i in range(len(events))]
    args = (events, matrix, scores, 1_700_000_000_123, "fraud", 12, partitions, offsets)
    assert PredictionWriter(codec).encode_batch(events, raws, *args[1:]) == _generic(codec, *args)


def test_event_written_with_another_schema_is_reencoded():
    """A body from a foreign framing cannot be copied; the decoded event is encoded instead."""
    codec = AvroCodec(CATALOG)
    events = [e for e, _ in Simulator(6, n_entities=5).events(3)]
    foreign = [b"\x00\x00\x00\x00\x07" + codec.encode("event", e)[10:] for e in events]  # unknown registry id
    matrix = features.offline_features(events)
    args = (events, matrix, None, 5, "m", 0, [0, 0, 0], [1, 2, 3])
    assert PredictionWriter(codec).encode_batch(events, foreign, *args[1:]) == _generic(codec, *args)


@hsettings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_avro_long_matches_fastavro(value):
    codec = AvroCodec(CATALOG)
    event = {"event_id": "e", "entity_id": "x", "event_time": value, "amount": 1.0, "currency": "EUR"}
    body = codec.encode("event", event)[10:]
    assert body[4:4 + len(avro_long(value))] == avro_long(value)


def test_avro_longs_is_avro_long_of_each_value():
    edges = [0, 1, -1, 63, 64, -64, -65, 2**62 - 1, 2**62, -(2**62), -(2**62) - 1, 2**63 - 1, -(2**63)]
    edges += [sign * (2**shift + delta) for shift in range(0, 63, 7) for delta in (-1, 0, 1) for sign in (1, -1)]
    edges = [v for v in edges if -(2**63) <= v < 2**63]
    rng = np.random.default_rng(4)
    randoms = rng.integers(-(2**63), 2**63 - 1, size=2000).tolist() + rng.integers(-300, 300, size=200).tolist()
    for values in (edges, randoms, [7], list(range(10_000, 10_500))):
        assert avro_longs(values) == [avro_long(v) for v in values]
    assert avro_longs([]) == []
    too_big = [2**70] + list(range(40))  # not int64: the scalar encoding
    assert avro_longs(too_big) == [avro_long(v) for v in too_big]


def test_pipeline_bytes_decode_to_its_prediction_dicts():
    codec = AvroCodec(CATALOG)
    settings = Settings()
    events = [e for e, _ in Simulator(8, n_entities=20).events(200)]
    now = max(e["event_time"] for e in events) + 1
    messages = [InputMessage(codec.encode("event", e), i % 3, i) for i, e in enumerate(events)]
    messages[10] = InputMessage(b"garbage", 1, 10)
    result = ScoringPipeline(settings, codec, ServedModel("fraud", 0)).score(messages, now_ms=now)
    assert len(result.encoded) == len(result.predictions) == len(result.keys) == 199
    assert [r[0] for r in result.rejected] == [10]
    encode = codec.encoder("prediction")
    assert result.encoded == [encode(p) for p in result.predictions]
    assert [p["event_offset"] for p in result.predictions] == [i for i in range(200) if i != 10]
    assert result.keys == [p["entity_id"].encode() for p in result.predictions]
