"""A retrain in flight at a stop: abandoned unregistered past trainer_shutdown_grace_s (its request handled at
the next start), or finished within it and recorded everywhere. Registry, the model-updates topic and the
model_versions table never disagree; training runs in a process of its own (not a thread of the scorer's)."""
from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import TopicPartition

from streamscore.kafka.io import make_consumer, make_producer
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.services.runner import ServiceGroup
from streamscore.services.tools.demo import wait_for_rows, wait_until_accounted
from streamscore.services.tools.simulate import produce_simulation
from streamscore.dev.generators import generator_ending_now
from streamscore.settings import TOPIC_MODEL_UPDATES, TOPIC_RETRAIN

from conftest import example_spec, spec_codec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAYMENTS = example_spec("payments")
CODEC = spec_codec(PAYMENTS)
HISTORY = 6_000


def wait_until(condition, what: str, group: ServiceGroup, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if group.failures:
            raise AssertionError(f"a service crashed waiting for {what}: {group.failures!r}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def topic_updates(settings) -> list[tuple[int, str]]:
    """(version, action) of every ModelUpdate on the topic."""
    topic = settings.topic(TOPIC_MODEL_UPDATES)
    consumer = make_consumer(settings, f"{settings.consumer_group_prefix}-reader-{uuid.uuid4().hex[:6]}")
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        consumer.assign([TopicPartition(topic, 0, low)])
        out, deadline = [], time.monotonic() + 30
        while len(out) < high - low and time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.5):
                if not msg.error():
                    update = CODEC.decode(msg.value(), "model_update")
                    out.append((update["version"], update["action"]))
        return sorted(out)
    finally:
        consumer.close()


def registry_updates(registry: ModelRegistry, name: str) -> list[tuple[int, str]]:
    """(version, action) the registry implies: every version registered, then promoted or rejected."""
    rejected, out = set(registry.rejected_versions(name)), []
    for version in registry.list(name):
        out.append((version.version, "register"))
        out.append((version.version, "reject" if version.version in rejected else "promote"))
    return sorted(out)


def table_updates(store) -> list[tuple[int, str]]:
    return sorted((int(v), a) for v, a in store.query("SELECT version, action FROM model_versions").rows)


def committed_retrain_offset(settings) -> int:
    consumer = make_consumer(settings, settings.group("trainer"))
    try:
        (tp,) = consumer.committed([TopicPartition(settings.topic(TOPIC_RETRAIN), 0)], timeout=10)
        return tp.offset
    finally:
        consumer.close()


def test_a_retrain_at_a_stop_is_abandoned_or_finished_and_recorded_everywhere(settings, store):
    settings = settings.model_copy(update={"trainer_min_new_labels": 0, "logger_flush_interval_s": 0.3,
                                           "train_num_boost_round": 100})
    registry = ModelRegistry(settings.registry_dir)
    name = settings.model_name
    simulator = generator_ending_now(PAYMENTS, seed=5, n_entities=300, n_events=HISTORY)
    with ServiceGroup(settings, ["scorer", "logger"], store=store) as group:
        history = produce_simulation(settings, PAYMENTS, CODEC, simulator, HISTORY)
        assert wait_until_accounted(store, HISTORY) >= HISTORY
        wait_for_rows(store, "labels", history.labels)
        v1 = train_and_register(store, registry, settings, PAYMENTS, reason="test: v1")
        events = v1.events if v1.promoted else [*v1.events, registry.promote(name, 1, reason="test").event]
        publish_model_updates(settings, CODEC, events)
        wait_for_rows(store, "model_versions", 2)
    request = {"request_id": "rq-shutdown", "model_name": name, "model_version": 1, "reason": "test",
               "detector": "psi", "feature": "amount", "statistic": "psi", "value": 0.5, "threshold": 0.25,
               "window": 2000, "detected_at": int(time.time() * 1000) - 3_600_000}
    producer = make_producer(settings)
    producer.produce(settings.topic(TOPIC_RETRAIN), key=name.encode(),
                     value=CODEC.encoder("retrain_request")(request))
    producer.flush(10)

    # 1. no grace: the stop abandons the training in flight; nothing registered, the request stays uncommitted
    group = ServiceGroup(settings.model_copy(update={"trainer_shutdown_grace_s": 0}), ["logger", "trainer"],
                         store=store).start()
    trainer = group.services["trainer"]
    training = wait_until(lambda: trainer.training, "the training process to start", group)
    assert training.process.pid != 0 and training.process.is_alive()  # its own process, not a thread
    group.shutdown(timeout_s=30)
    assert [o.action for o in trainer.outcomes] == ["abandoned"]
    assert not training.process.is_alive()
    assert [v.version for v in registry.list(name)] == [1]
    assert committed_retrain_offset(settings) < 1
    assert registry_updates(registry, name) == topic_updates(settings) == table_updates(store)

    # 2. the next start handles the request again; stopped while it trains, it finishes within the grace
    # period, is registered, published and recorded in model_versions before the logger stops
    group = ServiceGroup(settings.model_copy(update={"trainer_shutdown_grace_s": 60}), ["logger", "trainer"],
                         store=store).start()
    trainer = group.services["trainer"]
    wait_until(lambda: trainer.training, "the training process to start again", group)
    stopped = time.monotonic()
    group.shutdown(timeout_s=90)
    assert time.monotonic() - stopped < 60
    assert [o.action for o in trainer.outcomes] in (["promoted"], ["rejected"]), trainer.outcomes
    assert [v.version for v in registry.list(name)] == [1, 2]
    assert committed_retrain_offset(settings) == 1
    assert registry_updates(registry, name) == topic_updates(settings) == table_updates(store)
    assert (2, "register") in table_updates(store)
