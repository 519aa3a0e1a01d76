"""The simulator: deterministic, realistic enough to learn from, drift exactly where asked."""
from __future__ import annotations

import statistics

import lightgbm as lgb
import numpy as np
import pytest

from streamscore.avro.codec import AvroCodec, DecodeError
from streamscore.avro.scanner import columns_from_records
from streamscore.dev.simulator import COUNTRIES, MERCHANT_CATEGORIES, DriftSpec, Simulator
from streamscore.scoring.validation import EventValidator
from tests.conftest import example_spec, offline_matrix

PAYMENTS = example_spec("payments")

N = 20_000


@pytest.fixture(scope="module")
def stream() -> list[tuple[dict, dict]]:
    return list(Simulator(11, n_entities=500).events(N))


def test_same_seed_same_stream_and_calls_continue_the_stream():
    a = list(Simulator(3, n_entities=50).events(600))
    sim = Simulator(3, n_entities=50)
    b = list(sim.events(250)) + list(sim.events(350))
    assert a == b
    assert a != list(Simulator(4, n_entities=50).events(600))


def test_events_follow_the_contract_and_validate(stream):
    now = max(e["event_time"] for e, _ in stream) + 1
    ids = set()
    for event, _ in stream:
        assert set(event) == {"event_id", "entity_id", "event_time", "amount", "currency", "merchant_category",
                              "channel", "country", "device_id"}
        assert type(event["event_time"]) is int and type(event["amount"]) is float
        ids.add(event["event_id"])
    assert len(ids) == len(stream)
    events = [event for event, _ in stream]
    rows = np.arange(len(events))
    passed, rejected = EventValidator(PAYMENTS).check(columns_from_records(PAYMENTS.event.layout, events), rows, now)
    assert rejected == [] and len(passed) == len(events)  # the payments spec's checks accept every event
    # some optional fields are null, as from real acquirers
    assert any(e["merchant_category"] is None for e, _ in stream)


def test_labels_match_their_events_and_come_later(stream):
    for event, label in stream:
        assert (label["event_id"], label["entity_id"]) == (event["event_id"], event["entity_id"])
        assert label["label"] in (0, 1)
        assert event["event_time"] + 1_800_000 <= label["label_time"] <= event["event_time"] + 5_400_000


def test_fraud_is_rare_bursty_and_different(stream):
    labels = np.array([label["label"] for _, label in stream])
    assert 0.008 <= labels.mean() <= 0.025
    fraud = [e for e, label in stream if label["label"]]
    legit = [e for e, label in stream if not label["label"]]
    assert statistics.median(e["amount"] for e in fraud) > 3 * statistics.median(e["amount"] for e in legit)
    assert sum(e["channel"] == "ecom" for e in fraud) / len(fraud) > 0.5
    # bursts: fraud events of an entity come minutes apart
    by_entity: dict[str, list[int]] = {}
    for e in fraud:
        by_entity.setdefault(e["entity_id"], []).append(e["event_time"])
    gaps = [b - a for times in by_entity.values() for a, b in zip(sorted(times), sorted(times)[1:])]
    assert statistics.median(gaps) < 300_000


def test_a_few_events_arrive_out_of_order(stream):
    latest = 0
    out_of_order = 0
    for event, _ in stream:
        if event["event_time"] < latest:
            out_of_order += 1
            assert latest - event["event_time"] <= 10_000  # a few seconds late
        latest = max(latest, event["event_time"])
    assert 0.003 * N < out_of_order < 0.03 * N


def test_expected_span_matches_the_stream(stream):
    sim = Simulator(11, n_entities=500)
    span = stream[-1][0]["event_time"] - stream[0][0]["event_time"]
    assert 0.8 < span / sim.expected_span_ms(N) < 1.25
    assert stream[0][0]["event_time"] >= sim.start_ms


def _run(drift: DriftSpec | None, n: int) -> list[tuple[dict, dict]]:
    return list(Simulator(5, n_entities=300, drift=drift).events(n))


@pytest.mark.parametrize("kind", ["covariate", "new_categories", "concept"])
def test_drift_changes_nothing_before_its_index(kind):
    at = 3_000
    assert _run(DriftSpec(kind, at_event=at), 6_000)[:at] == _run(None, at)


def test_covariate_drift_scales_amounts_after_the_index():
    at, n = 5_000, 10_000
    drifted, plain = _run(DriftSpec("covariate", at, amount_factor=3.0), n), _run(None, n)
    after = statistics.mean(e["amount"] for e, _ in drifted[at:]) / statistics.mean(e["amount"] for e, _ in plain[at:])
    assert 2.5 < after < 3.5


def test_new_categories_drift_brings_values_outside_the_vocabularies():
    at = 5_000
    events = [e for e, _ in _run(DriftSpec("new_categories", at, new_category_share=0.3), 10_000)]

    def unseen_share(chunk, field, vocabulary):
        return sum(e[field] is not None and e[field] not in vocabulary for e in chunk) / len(chunk)

    assert unseen_share(events[:at], "merchant_category", MERCHANT_CATEGORIES) == 0
    assert unseen_share(events[:at], "country", COUNTRIES) == 0
    assert 0.25 < unseen_share(events[at:], "merchant_category", MERCHANT_CATEGORIES) < 0.35
    assert 0.25 < unseen_share(events[at:], "country", COUNTRIES) < 0.35


def test_concept_drift_turns_fraud_into_small_domestic_pos_payments():
    at = 8_000
    pairs = _run(DriftSpec("concept", at), 20_000)
    before = [e for e, label in pairs[:at] if label["label"]]
    after = [e for e, label in pairs[at + 1_000:] if label["label"]]  # bursts started after the drift
    assert statistics.median(e["amount"] for e in before) > 50
    assert statistics.median(e["amount"] for e in after) < 5
    assert sum(e["channel"] == "pos" for e in after) / len(after) > 0.9


def test_drift_and_arguments_are_checked():
    with pytest.raises(ValueError, match="kind must be one of"):
        DriftSpec("sudden", 10)
    with pytest.raises(ValueError, match="at_event"):
        DriftSpec("concept", -1)
    with pytest.raises(ValueError, match="n_entities"):
        Simulator(1, n_entities=0)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def test_simulated_fraud_is_learnable_from_the_features(stream):
    """The simulator and the features make a learnable problem (held-out, later in time)."""
    X = offline_matrix(PAYMENTS, [event for event, _ in stream])
    y = np.array([label["label"] for _, label in stream])
    cut = int(len(y) * 0.7)
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 15, "learning_rate": 0.1, "verbose": -1, "num_threads": 1,
         "seed": 1},
        lgb.Dataset(X[:cut], y[:cut], feature_name=list(PAYMENTS.feature_names),
                    categorical_feature=list(PAYMENTS.categorical_features)),
        num_boost_round=30,
    )
    held_out_auc = auc(y[cut:], booster.predict(X[cut:]))
    print(f"held-out AUC {held_out_auc:.3f} on {len(y) - cut} events, {int(y[cut:].sum())} fraud")
    assert held_out_auc > 0.8


def test_the_payments_spec_encodes_the_categories_the_simulator_generates():
    values = {f.field: tuple(f.values) for f in PAYMENTS.features if f.kind == "encode" and f.values}
    assert values["merchant_category"] == MERCHANT_CATEGORIES
    assert values["country"] == COUNTRIES
