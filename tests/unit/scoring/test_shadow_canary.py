"""Staged rollouts in the scoring step: shadows and the canary score the same feature matrix; the served score
is production's except for the canary's sticky share of entities; every unserved score is a ShadowScores row."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import example_spec, offline_matrix, spec_codec
from streamscore.dev.generators import load_generator
from streamscore.dev.simulator import Simulator
from streamscore.learning import training
from streamscore.scoring.pipeline import InputMessage, ScoringPipeline
from streamscore.scoring.rollout import ServingModels, entity_position, entity_positions, in_canary
from streamscore.scoring.served_model import ServedModel
from streamscore.scoring.tree_kernel import TreeKernel
from streamscore.spec.text import Vocabulary

PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)
ENCODE_EVENT = CODEC.encoder("event")
DECODE_SHADOW = CODEC.decoder("shadow_scores")


@pytest.fixture(scope="module")
def events():
    pairs = list(Simulator(5, n_entities=400).events(9000))
    return pairs


@pytest.fixture(scope="module")
def models(events):
    """Three versions trained on different slices (so their scores differ)."""
    matrix = offline_matrix(PAYMENTS, [event for event, _ in events[:6000]])
    labels = np.array([label["label"] for _, label in events[:6000]])

    def version(number, rows, rounds, vocabularies=None):
        booster = training.train_model(matrix[rows], labels[rows], PAYMENTS.feature_names,
                                       PAYMENTS.categorical_features, num_boost_round=rounds).booster
        return ServedModel("fraud", number, booster, 0.5, TreeKernel.for_booster(booster), vocabularies or {})

    return {1: version(1, slice(0, 6000), 40), 2: version(2, slice(0, 3000), 15),
            3: version(3, slice(3000, 6000), 20)}


def messages(events, start, n):
    return [InputMessage(ENCODE_EVENT(event), i % 4, i) for i, (event, _) in enumerate(events[start:start + n], start)]


def now_after(events):
    return max(event["event_time"] for event, _ in events) + 60_000


def score_all(pipeline, events, start=6000, n=3000, batch=500):
    results = []
    for first in range(start, start + n, batch):
        results.append(pipeline.score(messages(events, first, batch), now_ms=now_after(events)))
    assert sum(len(r.encoded) for r in results) > 0.95 * n
    return results


def shadow_rows(results):
    rows = {}
    for result in results:
        for record in result.shadow:
            decoded = DECODE_SHADOW(record)
            for event_id, score in zip(decoded["event_ids"], decoded["scores"]):
                key = (event_id, decoded["model_version"])
                assert key not in rows, f"two shadow scores of {key}"
                rows[key] = score
    return rows


def served(results):
    return {p["event_id"]: (p["model_version"], p["score"]) for r in results for p in r.predictions}


def test_entity_positions_are_the_same_compiled_and_in_python_and_spread_evenly():
    ids = [f"card-{i:06d}" for i in range(20_000)]
    data = "".join(ids).encode()
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    compiled = np.empty(len(ids))
    entity_positions(np.frombuffer(data, dtype=np.uint8), starts, lengths, compiled)
    assert compiled.tolist() == [entity_position(i) for i in ids]
    assert ((compiled >= 0) & (compiled < 1)).all()
    for share in (0.01, 0.05, 0.25, 0.5):
        assert abs((compiled < share).mean() - share) < 0.01
    # sticky and nested: raising the share keeps every entity already in the canary
    assert set(np.flatnonzero(compiled < 0.05)) <= set(np.flatnonzero(compiled < 0.10))


def test_shadows_score_every_event_from_the_served_features_and_leave_the_served_score_alone(events, models):
    alone = ScoringPipeline(PAYMENTS, CODEC, models[1])
    with_shadows = ScoringPipeline(PAYMENTS, CODEC, models[1])
    with_shadows.set_serving(ServingModels(models[1], shadows=(models[2], models[3])))
    plain, shadowed = score_all(alone, events), score_all(with_shadows, events)

    assert served(shadowed) == served(plain)
    assert all(result.shadow == [] for result in plain)
    rows = shadow_rows(shadowed)
    event_ids = list(served(plain))
    assert len(rows) == 2 * len(event_ids)
    # each shadow score is the version's prediction on the logged (served) feature vector
    features = np.array([p["features"] for r in shadowed for p in r.predictions])
    for version in (2, 3):
        assert np.array_equal(np.array([rows[(e, version)] for e in event_ids]), models[version].predict(features))
    assert not np.array_equal(models[2].predict(features), models[3].predict(features))


def test_a_shadow_with_other_learned_vocabularies_is_scored_on_its_own_encoding():
    rides = example_spec("rides")
    codec = spec_codec(rides)
    encode = codec.encoder("event")
    pairs = list(load_generator(rides).make_generator(3, 300).events(4000))
    learned = [f for f in rides.features if f.is_learned]
    zones = sorted({e[learned[0].field] for e, _ in pairs if e[learned[0].field]})
    first = {f.name: Vocabulary(zones) for f in learned}
    other = {f.name: Vocabulary(zones[::-1]) for f in learned}  # the same zones, other codes
    now = max(e[rides.event.time_field] for e, _ in pairs) // rides.event.time_divisor + 60_000
    # trained on features encoded with `first`, so the zone codes matter to it
    history = ScoringPipeline(rides, codec, ServedModel("rides", 0, vocabularies=first, objective="regression"))
    encoded = history.score([InputMessage(encode(e), 0, i) for i, (e, _) in enumerate(pairs[:3000])], now_ms=now)
    by_id = {label[rides.label.id_field]: label[rides.label.value_field] for _, label in pairs[:3000] if label}
    ids = [p["event_id"] for p in encoded.predictions]
    target = np.array([by_id.get(i, np.nan) for i in ids], dtype=float)
    known = ~np.isnan(target)
    booster = training.train_model(encoded.matrix[known], target[known], rides.feature_names,
                                   rides.categorical_features, num_boost_round=30, objective="regression").booster
    production = ServedModel("rides", 1, booster, None, None, first, "regression")
    shadow = ServedModel("rides", 2, booster, None, None, other, "regression")
    inputs = [InputMessage(encode(e), 1, i) for i, (e, _) in enumerate(pairs[3000:])]

    pipeline = ScoringPipeline(rides, codec, production)
    pipeline.set_serving(ServingModels(production, shadows=(shadow,)))
    result = pipeline.score(inputs, now_ms=now)
    alone = ScoringPipeline(rides, codec, shadow).score(inputs, now_ms=now)
    assert len(alone.encoded) > 900
    shadow_scores = DECODE_SHADOW(result.shadow[0])["scores"]
    assert shadow_scores == alone.scores.tolist()
    assert shadow_scores != result.scores.tolist()  # production's encoding would have given other scores


def test_the_canary_serves_its_share_of_entities_and_production_scores_them_in_shadow(events, models):
    pipeline = ScoringPipeline(PAYMENTS, CODEC, models[1])
    pipeline.set_serving(ServingModels(models[1], canary=models[2], canary_share=0.3))
    results = score_all(pipeline, events)
    alone = served(score_all(ScoringPipeline(PAYMENTS, CODEC, models[1]), events))
    as_canary = served(score_all(ScoringPipeline(PAYMENTS, CODEC, models[2]), events))
    rows = shadow_rows(results)
    entity_of = {p["event_id"]: p["entity_id"] for r in results for p in r.predictions}
    canary_events = 0
    for event_id, (version, score) in served(results).items():
        if in_canary(entity_of[event_id], 0.3):
            canary_events += 1
            assert (version, score) == (2, as_canary[event_id][1])
            assert rows[(event_id, 1)] == alone[event_id][1] and (event_id, 2) not in rows
        else:
            assert (version, score) == alone[event_id]
            assert rows[(event_id, 2)] == as_canary[event_id][1] and (event_id, 1) not in rows
    assert 0 < canary_events < len(entity_of)


def test_swap_model_ends_the_canary_and_the_shadows(events, models):
    pipeline = ScoringPipeline(PAYMENTS, CODEC, models[1])
    pipeline.set_serving(ServingModels(models[1], canary=models[2], canary_share=0.5, shadows=(models[3],)))
    pipeline.swap_model(models[2])
    result = pipeline.score(messages(events, 6000, 200), now_ms=now_after(events))
    assert len(result.encoded) > 150 and result.shadow == [] and {p["model_version"] for p in result.predictions} == {2}


def test_shadow_records_are_the_generic_encoders_bytes(events, models):
    pipeline = ScoringPipeline(PAYMENTS, CODEC, models[1])
    pipeline.set_serving(ServingModels(models[1], canary=models[2], canary_share=0.4))
    result = pipeline.score(messages(events, 6000, 300), now_ms=now_after(events))
    assert len(result.shadow) == 2
    for record in result.shadow:
        assert record == CODEC.encode("shadow_scores", DECODE_SHADOW(record))
