"""Staged rollouts end to end on the real broker and ClickHouse: shadow rows, the canary's sticky share, the
online gate (promote, reject, roll back), scheduled retraining.

scorer + logger (+ trainer, which runs the online gate and the schedule) are threads of this process
(ServiceGroup, sharing the test's store). Models are trained offline on simulated events of the payments
spec (a good one, and a deliberately worse one trained on shuffled labels) and registered under the spec's
feature set, so every test starts serving at once.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import example_spec, offline_matrix, spec_codec, wait_until
from streamscore.dev.generators import generator_ending_now, load_generator
from streamscore.kafka.io import DeliveryTracker, flush_or_raise, make_producer
from streamscore.learning import training
from streamscore.learning.registry import ModelRegistry
from streamscore.ops.report import build_report
from streamscore.scoring.rollout import in_canary
from streamscore.services.runner import ServiceGroup
from streamscore.services.tools.simulate import produce_simulation
from streamscore.settings import TOPIC_RETRAIN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)
HOUR_MS = 3_600_000
FAST = dict(logger_flush_interval_s=0.3, rollout_gate_interval_s=0.5)


def scalar(store, sql: str):
    return store.query(sql).rows[0][0]


@pytest.fixture(scope="module")
def boosters():
    """A good model and a deliberately worse one (trained on shuffled labels) of the payments spec."""
    pairs = list(load_generator(PAYMENTS).make_generator(3, 300).events(8000))
    X = offline_matrix(PAYMENTS, [event for event, _ in pairs])
    y = np.array([label["label"] for _, label in pairs], dtype=float)
    train = lambda labels, rounds: training.train_model(X, labels, PAYMENTS.feature_names,  # noqa: E731
                                                        PAYMENTS.categorical_features, num_boost_round=rounds)
    return {"good": train(y, 60), "also_good": train(y, 40),
            "worse": train(np.random.default_rng(0).permutation(y), 20)}


def register(registry: ModelRegistry, name: str, trained, reason: str) -> int:
    return registry.register(name, trained.booster, feature_set=PAYMENTS.feature_set,
                             feature_names=PAYMENTS.feature_names,
                             categorical_features=PAYMENTS.categorical_features, train_rows=trained.train_rows,
                             metrics=trained.metrics, baseline=trained.baseline, threshold=trained.threshold,
                             reason=reason, spec_name=PAYMENTS.name).version


def features_of(store) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(event ids, served versions, served scores, logged feature matrix) of every prediction (FINAL)."""
    rows = store.query("SELECT event_id, model_version, score, features FROM predictions FINAL ORDER BY event_id").rows
    matrix = np.array([[mapping[name] for name in PAYMENTS.feature_names] for *_, mapping in rows], dtype=float)
    return ([r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows], dtype=float),
            matrix)


def test_every_event_gets_one_shadow_row_per_shadow_version_and_its_served_score_is_unchanged(
        settings, store, boosters):
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    versions = [register(registry, name, boosters[k], k) for k in ("good", "also_good", "worse")]
    registry.promote(name, versions[0])
    registry.shadow(name, versions[1])
    registry.shadow(name, versions[2])
    n = 4000
    simulator = generator_ending_now(PAYMENTS, 5, 500, n)
    settings = settings.model_copy(update=FAST)
    with ServiceGroup(settings, ["scorer", "logger"], store=store, spec=PAYMENTS) as group:
        wait_until(lambda: len(group.services["scorer"].pipeline.serving.shadows) == 2, "scorer shadowing", group)
        report = produce_simulation(settings, PAYMENTS, CODEC, simulator, n)
        wait_until(lambda: scalar(store, "SELECT count() FROM shadow_predictions FINAL") >= 2 * n
                   and scalar(store, "SELECT count() FROM predictions FINAL") >= n
                   and scalar(store, "SELECT count() FROM labels FINAL") >= report.labels, "shadow rows", group)
        time.sleep(1.0)  # anything more would arrive now
    assert scalar(store, "SELECT count() FROM predictions FINAL") == n
    per_version = dict(store.query("SELECT model_version, count() FROM shadow_predictions FINAL "
                                   "GROUP BY model_version").rows)
    assert per_version == {versions[1]: n, versions[2]: n}
    assert scalar(store, "SELECT uniqExact(event_id, model_version) FROM shadow_predictions FINAL") == 2 * n
    assert scalar(store, "SELECT count() FROM shadow_predictions AS s FINAL LEFT ANTI JOIN predictions AS p FINAL "
                         "ON s.event_id = p.event_id") == 0
    event_ids, served_versions, served, matrix = features_of(store)
    # served: production alone, its own prediction on the logged features
    assert set(served_versions.tolist()) == {versions[0]}
    assert np.array_equal(served, boosters["good"].booster.predict(matrix, num_threads=1))
    # shadows: each version's prediction on the same (logged) feature vector of the event
    for version, key in ((versions[1], "also_good"), (versions[2], "worse")):
        shadow = dict(store.query(f"SELECT event_id, score FROM shadow_predictions FINAL "
                                  f"WHERE model_version = {version}").rows)
        assert np.array_equal(np.array([shadow[e] for e in event_ids]),
                              boosters[key].booster.predict(matrix, num_threads=1))
    where = store.query("SELECT count() FROM shadow_predictions AS s FINAL INNER JOIN predictions AS p FINAL "
                        "ON s.event_id = p.event_id WHERE s.event_partition = p.event_partition "
                        "AND s.event_offset = p.event_offset AND s.event_time = p.event_time "
                        "AND s.entity_id = p.entity_id").rows[0][0]
    assert where == 2 * n
    # the report plots them against production, on the same labelled events
    shadow = build_report(store, settings, registry, PAYMENTS).sections["shadow"]
    assert shadow.png and shadow.data["sample"] > 0
    pairs = {(p["shadow_version"], p["served_version"]): p for p in shadow.data["pairs"]}
    assert set(pairs) == {(versions[1], versions[0]), (versions[2], versions[0])}
    worse = pairs[(versions[2], versions[0])]
    assert worse["labelled"] == report.labels and worse["shadow_auc"] < worse["served_auc"] - 0.1


def entity_events(simulator, entities: list[str], round_: int) -> list[dict]:
    """One valid event per entity (the simulator's, renamed to that entity and a fresh event id)."""
    events = []
    for i, (event, _) in enumerate(simulator.events(len(entities))):
        events.append({**event, "entity_id": entities[i], "event_id": f"r{round_}-{i}"})
    return events


def produce(settings, events: list[dict]) -> None:
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    encode = CODEC.encoder("event")
    topic = settings.topic(PAYMENTS.event.topic)
    for i, event in enumerate(events):
        producer.produce(topic, key=event["entity_id"].encode(), value=encode(event), on_delivery=tracker)
        if i % 2000 == 0:
            producer.poll(0)
    flush_or_raise(producer, tracker, timeout_s=60)


def canary_entities(store, round_: int, version: int) -> set[str]:
    return {r[0] for r in store.query(f"SELECT entity_id FROM predictions FINAL WHERE startsWith(event_id, "
                                      f"'r{round_}-') AND model_version = {version}").rows}


def test_the_canary_serves_a_sticky_share_of_entities_within_a_point_of_the_setting(settings, store, boosters):
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    v1, v2 = (register(registry, name, boosters[k], k) for k in ("good", "also_good"))
    registry.promote(name, v1)
    registry.canary(name, v2, 0.05)
    n = 20_000
    entities = [f"card-canary-{i:05d}" for i in range(n)]
    simulator = generator_ending_now(PAYMENTS, 9, 200, 3 * n)
    settings = settings.model_copy(update=FAST)
    rounds = {}
    with ServiceGroup(settings, ["scorer", "logger"], store=store, spec=PAYMENTS) as group:
        scorer = group.services["scorer"]
        for round_, share in ((1, 0.05), (2, 0.05), (3, 0.10)):
            if share != registry.rollout(name).canary_share:
                registry.canary(name, v2, share, reason="raise the share")
            wait_until(lambda: scorer.pipeline.serving.canary_share == share, f"canary at {share}", group)
            produce(settings, entity_events(simulator, entities, round_))
            wait_until(lambda: scalar(store, f"SELECT count() FROM predictions FINAL "
                                             f"WHERE startsWith(event_id, 'r{round_}-')") >= n,
                       f"round {round_} logged", group)
            rounds[round_] = canary_entities(store, round_, v2)
    for round_, share in ((1, 0.05), (2, 0.05), (3, 0.10)):
        assert abs(len(rounds[round_]) / n - share) <= 0.01, (round_, len(rounds[round_]))
        assert rounds[round_] == {e for e in entities if in_canary(e, share)}
    assert rounds[1] == rounds[2]  # the same entities every time
    assert rounds[1] < rounds[3]  # a raised share keeps them and adds more
    # every other entity was served by production, and the prediction says which version served it
    assert scalar(store, f"SELECT count() FROM predictions FINAL WHERE model_version NOT IN ({v1}, {v2})") == 0
    assert scalar(store, f"SELECT uniqExact(entity_id) FROM predictions FINAL WHERE model_version = {v1} "
                         f"AND startsWith(event_id, 'r1-')") == n - len(rounds[1])


def model_versions_rows(store, version: int) -> list[tuple]:
    return store.query(f"SELECT action, stage, reason, metrics FROM model_versions WHERE version = {version} "
                       "ORDER BY recorded_at").rows


def test_the_online_gate_promotes_a_good_shadow_through_the_canary_and_rejects_a_worse_one(settings, store, boosters):
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    v1, v2, v3 = (register(registry, name, boosters[k], k) for k in ("good", "also_good", "worse"))
    registry.promote(name, v1)
    registry.shadow(name, v2)
    registry.shadow(name, v3)
    settings = settings.model_copy(update={**FAST, "rollout_min_labelled": 800, "rollout_canary_shares": "0.3",
                                           "gate_max_auc_drop": 0.03})
    simulator = generator_ending_now(PAYMENTS, 13, 300, 12_000)
    with ServiceGroup(settings, ["scorer", "logger", "trainer"], store=store, spec=PAYMENTS) as group:
        wait_until(lambda: len(group.services["scorer"].pipeline.serving.shadows) == 2, "scorer shadowing", group)
        produce_simulation(settings, PAYMENTS, CODEC, simulator, 4000)
        wait_until(lambda: registry.rollout(name).shadows == (), "v2 and v3 judged", group)
        assert registry.rollout(name).canary == v2
        rejected_at = int(time.time() * 1000)
        time.sleep(1.0)  # the scorer follows the registry within 0.5 s
        produce_simulation(settings, PAYMENTS, CODEC, simulator, 4000)
        wait_until(lambda: registry.rollout(name).production == v2, "v2 promoted after its canary step", group)
        # (the test's own registry actions are not published: only the online gate's reach model_versions)
        wait_until(lambda: len(model_versions_rows(store, v2)) >= 2 and model_versions_rows(store, v3),
                   "model_versions rows of the gate's actions", group)
    history = registry.stages(name)["history"]
    assert not any(h["version"] == v3 and h["action"] == "promote" for h in history)  # never promoted
    assert [h["action"] for h in history if h["version"] == v2] == ["register", "shadow", "canary", "promote"]
    # a rejected shadow is not scored any more
    assert scalar(store, f"SELECT count() FROM shadow_predictions FINAL WHERE model_version = {v3} AND "
                         f"scored_at > fromUnixTimestamp64Milli({rejected_at}, 'UTC')") == 0
    reject = [r for r in model_versions_rows(store, v3) if r[0] == "reject"]
    assert len(reject) == 1 and reject[0][1] == "candidate"
    evidence = reject[0][3]
    if "label-free estimate" in reject[0][2]:  # v3 expected to be clearly worse before 800 labels had arrived
        assert evidence["online.scored"] >= 800
        assert evidence["online.estimated_auc"] < evidence["online.production_estimated_auc"] - 0.05
    else:
        assert "online gate on" in reject[0][2]
        assert evidence["online.labelled"] >= 800 and evidence["online.auc"] < evidence["online.production_auc"] - 0.03
    actions = [(r[0], r[1]) for r in model_versions_rows(store, v2)]
    assert actions == [("canary", "canary"), ("promote", "production")]
    assert all(r[3]["online.labelled"] >= 800 for r in model_versions_rows(store, v2))


def test_an_unhealthy_canary_is_rolled_back_automatically(settings, store, boosters):
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    v1, v2 = (register(registry, name, boosters[k], k) for k in ("good", "worse"))
    registry.promote(name, v1)
    registry.canary(name, v2, 0.2)
    settings = settings.model_copy(update={**FAST, "rollout_min_labelled": 800})
    simulator = generator_ending_now(PAYMENTS, 17, 300, 4000)
    with ServiceGroup(settings, ["scorer", "logger", "trainer"], store=store, spec=PAYMENTS) as group:
        wait_until(lambda: group.services["scorer"].pipeline.serving.canary is not None, "canary serving", group)
        produce_simulation(settings, PAYMENTS, CODEC, simulator, 4000)
        wait_until(lambda: registry.rollout(name).canary is None, "canary rolled back", group)
        wait_until(lambda: group.services["scorer"].pipeline.serving.canary is None, "scorer without canary", group)
        wait_until(lambda: any(r[0] == "rollback" for r in model_versions_rows(store, v2)), "rollback row", group)
    assert registry.rollout(name).production == v1
    rollback = [r for r in model_versions_rows(store, v2) if r[0] == "rollback"][0]
    # the labelled comparison or, when the label-free estimate decides first (both need 800 events, and
    # events are scored before their labels arrive), the estimate: either shows the canary worse
    metric = "auc" if "online.auc" in rollback[3] else "estimated_auc"
    assert rollback[1] == "canary" and rollback[3][f"online.{metric}"] < rollback[3][f"online.production_{metric}"]
    assert not any(h["version"] == v2 and h["action"] == "promote" for h in registry.stages(name)["history"])


def test_a_scheduled_retrain_fires_when_event_time_crosses_the_boundary(settings, store, boosters):
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    registry.promote(name, register(registry, name, boosters["good"], "good"))
    every = 24.0
    period = int(every * HOUR_MS)
    pairs = list(generator_ending_now(PAYMENTS, 21, 300, 9000).events(9000))
    times = np.array([event["event_time"] for event, _ in pairs])
    boundary = int(np.quantile(times, 0.6)) // period * period
    before = [p for p in pairs if p[0]["event_time"] < boundary]
    after = [p for p in pairs if boundary <= p[0]["event_time"] < boundary + period]
    assert len(before) > 2000 and len(after) > 500
    settings = settings.model_copy(update={**FAST, "retrain_every_hours": every, "trainer_min_new_labels": 0,
                                           "train_num_boost_round": 20})

    def send(chunk):
        produce_pairs(settings, chunk)

    # the history is logged before the trainer starts, so its schedule starts after the newest logged event
    # (a trainer that starts while a history is still being logged starts it wherever that load has got to)
    with ServiceGroup(settings, ["scorer", "logger"], store=store, spec=PAYMENTS) as group:
        send(before)
        wait_until(lambda: scalar(store, "SELECT count() FROM predictions FINAL") >= len(before), "first part", group)
    with ServiceGroup(settings, ["scorer", "logger", "trainer"], store=store, spec=PAYMENTS) as group:
        trainer = group.services["trainer"]
        wait_until(lambda: trainer.schedule.last_boundary_ms is not None, "schedule started", group)
        assert trainer.schedule.last_boundary_ms == boundary - period and trainer.scheduled == []
        send(after)
        wait_until(lambda: trainer.scheduled, "a scheduled retrain request", group)
        wait_until(lambda: any(o.request_id == trainer.scheduled[0]["request_id"] for o in trainer.outcomes),
                   "the trainer handling it", group)
    request = trainer.scheduled[0]
    assert len(trainer.scheduled) == 1
    assert request["detected_at"] == boundary and request["detector"] == "schedule"
    outcome = next(o for o in trainer.outcomes if o.request_id == request["request_id"])
    assert outcome.action in ("promoted", "rejected") and outcome.version == 2, outcome
    assert f"schedule/- at {boundary}" in registry.get(name, 2).reason


def produce_pairs(settings, pairs) -> None:
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    encode_event, encode_label = CODEC.encoder("event"), CODEC.encoder("label")
    for i, (event, label) in enumerate(pairs):
        producer.produce(settings.topic(PAYMENTS.event.topic), key=event["entity_id"].encode(),
                         value=encode_event(event), on_delivery=tracker)
        if label is not None:
            producer.produce(settings.topic(PAYMENTS.label.topic), key=label["entity_id"].encode(),
                             value=encode_label(label), on_delivery=tracker)
        if i % 2000 == 0:
            producer.poll(0)
    flush_or_raise(producer, tracker, timeout_s=60)


def test_retrain_topic_is_the_schedules_channel(settings):
    """The schedule's request goes through the retrain topic like a drift request (read back from it)."""
    from confluent_kafka import Consumer, TopicPartition

    from streamscore.services.trainer.service import TrainerService

    trainer = TrainerService(settings.model_copy(update={"retrain_every_hours": 6.0}), spec=PAYMENTS)
    request = trainer.request_scheduled_retrain(1_767_225_600_000)
    topic = settings.topic(TOPIC_RETRAIN)
    consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "reader",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        messages = wait_until(lambda: [m for m in consumer.consume(10, 0.5) if not m.error()], "the request")
    finally:
        consumer.close()
        trainer.store.close()
    assert CODEC.decode(messages[0].value(), "retrain_request") == request


def test_replayed_shadow_scores_collapse_to_one_row_per_event_and_version_with_final(settings, store):
    """A scorer replay re-scores events in other batches: the same (event, version) arrives again in another
    ShadowScores record, or in the same one twice; FINAL keeps one row each."""
    def record(first: int, last: int, version: int, scored_at: int) -> dict:
        ids = range(first, last)
        return {"model_name": settings.model_name, "model_version": version, "scored_at": scored_at,
                "event_ids": [f"e{i}" for i in ids], "entity_ids": [f"card-{i % 3}" for i in ids],
                "event_times": [1_767_225_600_000 + i for i in ids], "scores": [i / 100 for i in ids],
                "event_partitions": [0 for _ in ids], "event_offsets": list(ids)}

    sent = [record(0, 10, 2, 1_767_225_700_000), record(0, 10, 2, 1_767_225_700_000),
            record(5, 15, 2, 1_767_225_800_000), record(0, 15, 3, 1_767_225_800_000)]
    producer = make_producer(settings)
    tracker = DeliveryTracker()
    for value in sent:
        producer.produce(settings.topic("shadow-predictions"), value=CODEC.encode("shadow_scores", value),
                         on_delivery=tracker)
    flush_or_raise(producer, tracker, timeout_s=30)
    with ServiceGroup(settings.model_copy(update=FAST), ["logger"], store=store, spec=PAYMENTS) as group:
        logger = group.services["logger"]
        # every row was written (45: the duplicates too); a background merge may already have collapsed some
        wait_until(lambda: logger.stats.events_in >= len(sent) and logger.stats.events_out >= 45, "shadow rows",
                   group)
    assert logger.stats.events_out == 45
    assert scalar(store, "SELECT count() FROM shadow_predictions FINAL") == 30
    rows = store.query("SELECT model_version, uniqExact(event_id), min(score), max(score) FROM shadow_predictions "
                       "FINAL GROUP BY model_version ORDER BY model_version").rows
    assert rows == [(2, 15, 0.0, 0.14), (3, 15, 0.0, 0.14)]


def test_a_canary_the_scorers_cannot_load_is_rolled_back(settings, store, boosters):
    """v2 registered under another feature set: scorers refuse it, so it scores nothing; the gate rolls it back."""
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    v1 = register(registry, name, boosters["good"], "good")
    trained = boosters["also_good"]
    v2 = registry.register(name, trained.booster, feature_set="another-feature-set",
                           feature_names=PAYMENTS.feature_names, categorical_features=PAYMENTS.categorical_features,
                           train_rows=trained.train_rows, metrics=trained.metrics, baseline=trained.baseline,
                           threshold=trained.threshold, reason="built for other features").version
    registry.promote(name, v1)
    registry.canary(name, v2, 0.2)
    settings = settings.model_copy(update={**FAST, "rollout_min_labelled": 500})
    with ServiceGroup(settings, ["scorer", "logger", "trainer"], store=store, spec=PAYMENTS) as group:
        produce_simulation(settings, PAYMENTS, CODEC, generator_ending_now(PAYMENTS, 23, 300, 1500), 1500)
        wait_until(lambda: registry.rollout(name).canary is None, "canary rolled back", group)
    rollback = [h for h in registry.stages(name)["history"] if h["action"] == "rollback"]
    assert len(rollback) == 1 and "not scored at all" in rollback[0]["reason"]
    assert scalar(store, f"SELECT count() FROM predictions FINAL WHERE model_version = {v2}") == 0
