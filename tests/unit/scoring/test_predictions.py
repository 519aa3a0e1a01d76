"""The batch Prediction writer must produce exactly the generic Avro encoder's bytes."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import example_spec, spec_codec
from streamscore.scoring.predictions import PREDICTION_FIELDS, PredictionWriter, _declared_fields

SPEC = example_spec("payments")


@pytest.mark.parametrize("registry", [None, "mock://predictions"])
@pytest.mark.parametrize("scored", [True, False])
def test_the_same_bytes_as_the_generic_encoder(registry, scored):
    codec = spec_codec(SPEC, registry)
    events = [codec.encode("event", {"event_id": f"e-{i}" * (1 + 40 * (i == 2)), "entity_id": f"card-é{i}",
                                     "event_time": 1_767_225_600_000 + i * 10**9, "amount": 1.5 * i,
                                     "currency": "EUR"}, topic="events") for i in range(5)]
    src = b"".join(events)
    ends = np.cumsum([len(e) for e in events])
    starts = ends - [len(e) for e in events]
    decoded = [codec.decode(e, "event") for e in events]
    ids = [d["event_id"].encode() for d in decoded]
    entities = [d["entity_id"].encode() for d in decoded]
    id_starts = np.array([src.index(b, s) for b, s in zip(ids, starts)])
    entity_starts = np.array([src.index(b, s) for b, s in zip(entities, starts)])
    matrix = np.random.default_rng(1).normal(size=(5, len(SPEC.features)))
    matrix[0, 3] = np.nan
    scores = np.array([0.1, -0.0, 1e300, 0.5, 0.9]) if scored else None
    models = [("fraud", 3), ("fraud", 4)]  # a canary serves some events
    model_of = np.array([0, 1, 0, 0, 1])
    writer = PredictionWriter(codec, SPEC.feature_set, topic="predictions")
    encoded = writer.encode_batch(src, (id_starts, np.array([len(b) for b in ids])),
                                  (entity_starts, np.array([len(b) for b in entities])),
                                  (starts, ends - starts), [d["event_time"] for d in decoded], 1_767_225_700_000,
                                  models, model_of, scores, matrix, [2] * 5, [10**12 + i for i in range(5)])
    generic = codec.encoder("prediction", "predictions")
    for i, value in enumerate(encoded):
        record = {"event_id": decoded[i]["event_id"], "entity_id": decoded[i]["entity_id"],
                  "event_time": decoded[i]["event_time"], "scored_at": 1_767_225_700_000,
                  "model_name": "fraud", "model_version": models[model_of[i]][1],
                  "score": None if scores is None else float(scores[i]), "feature_set": SPEC.feature_set,
                  "features": matrix[i].tolist(), "event": events[i], "event_partition": 2,
                  "event_offset": 10**12 + i}
        assert value == generic(record), i


def test_the_writer_states_the_schemas_field_order():
    assert _declared_fields(spec_codec(SPEC)) == PREDICTION_FIELDS
