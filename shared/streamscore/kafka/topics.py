"""The Kafka topics streamscore uses, as data, and their idempotent creation.

scorer-state is the scorer's per-entity feature state changelog: it is compacted
(only the latest state per entity matters) and has as many partitions as events,
so partition p of events and partition p of scorer-state hold the same entities.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamscore.kafka.config import admin_config
from streamscore.kafka.io import admin_result
from streamscore.settings import (
    TOPIC_DEAD_LETTER,
    TOPIC_DRIFT_STATE,
    TOPIC_EVENTS,
    TOPIC_LABELS,
    TOPIC_MODEL_UPDATES,
    TOPIC_PREDICTIONS,
    TOPIC_RETRAIN,
    TOPIC_SCORER_STATE,
    TOPIC_SHADOW_PREDICTIONS,
    Settings,
)

SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
THIRTY_DAYS_MS = 30 * 24 * 3600 * 1000
ADMIN_TIMEOUT_S = 30.0
# A DriftMonitor snapshot holds its open windows (a few hundred KB at default sizes).
DRIFT_STATE_MAX_BYTES = 16 * 1024 * 1024
SCORER_STATE_SEGMENT_BYTES = 64 * 1024 * 1024


class TopicMismatchError(RuntimeError):
    """An existing topic's partition count differs from what streamscore needs."""


@dataclass(frozen=True)
class TopicSpec:
    name: str  # logical name; the physical one is settings.topic(name)
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings, spec=None) -> list[TopicSpec]:
    """The topics of these settings; the events and labels topics are the feature spec's (default names
    `events` and `labels` without one)."""
    stream = {"cleanup.policy": "delete", "retention.ms": str(SEVEN_DAYS_MS)}
    control = {"cleanup.policy": "delete", "retention.ms": str(THIRTY_DAYS_MS)}
    return [
        TopicSpec(spec.event.topic if spec is not None else TOPIC_EVENTS, settings.partitions, stream),
        TopicSpec(spec.label.topic if spec is not None else TOPIC_LABELS, settings.partitions, stream),
        TopicSpec(TOPIC_PREDICTIONS, settings.partitions, stream),
        TopicSpec(TOPIC_DEAD_LETTER, settings.partitions, stream),
        # Scores of versions in shadow / canary that were not served (one ShadowScores record per batch).
        TopicSpec(TOPIC_SHADOW_PREDICTIONS, settings.partitions, stream),
        # Single partition: requests and registry updates are few and must stay in order.
        TopicSpec(TOPIC_RETRAIN, 1, control),
        TopicSpec(TOPIC_MODEL_UPDATES, 1, control),
        # 64 MiB segments: compaction never cleans the open segment, so with the broker default (1 GiB) the
        # changelog held ~1 GiB per partition until the roll, then the log cleaner compacted it at once
        # (0.25-0.38 of a core for 40 s beside the pipeline: the soak's worst minute); a restore read all of it.
        TopicSpec(TOPIC_SCORER_STATE, settings.partitions, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
                                                            "segment.bytes": str(SCORER_STATE_SEGMENT_BYTES)}),
        # The drift service's checkpoint (monitor state + consumed offsets), one record per model, latest wins;
        # segments roll hourly because compaction never cleans the open segment.
        TopicSpec(TOPIC_DRIFT_STATE, 1, {"cleanup.policy": "compact", "max.message.bytes": str(DRIFT_STATE_MAX_BYTES),
                                         "segment.ms": str(3_600_000)}),
    ]


def topic_names(settings: Settings, spec=None) -> list[str]:
    """Physical names of all streamscore topics for these settings (and feature spec)."""
    return [settings.topic(topic.name) for topic in topic_specs(settings, spec)]


def ensure_topics(settings: Settings, admin: AdminClient | None = None, spec=None) -> list[str]:
    """Create the missing topics; returns the physical names created (empty when all existed).

    Returns once every topic has a leader on each partition, so callers can
    produce right away. Raises TopicMismatchError when an existing topic has a
    different partition count: entities would then land on other partitions
    than the scorer's state for them.
    """
    admin = admin or AdminClient(admin_config(settings))
    specs = {settings.topic(topic.name): topic for topic in topic_specs(settings, spec)}
    existing = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    missing = [
        # replication_factor=-1: the cluster's default (1 on the local broker, 3 on a typical cluster)
        NewTopic(name, num_partitions=spec.partitions, replication_factor=-1, config=spec.config)
        for name, spec in specs.items()
        if name not in existing
    ]
    created: list[str] = []
    if missing:
        for name, future in admin.create_topics(missing, operation_timeout=ADMIN_TIMEOUT_S).items():
            try:
                admin_result(future)
                created.append(name)
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # a concurrent creator won
                    raise
    _wait_until_ready_and_check(settings, admin, specs)
    return created


def _wait_until_ready_and_check(settings: Settings, admin: AdminClient, specs: dict[str, TopicSpec]) -> None:
    """Wait until every topic has a leader for each partition (a new topic takes a moment), then check counts."""
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while True:
        metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
        not_ready = [
            name for name in specs
            if name not in metadata or metadata[name].error is not None
            or not metadata[name].partitions
            or any(partition.leader < 0 for partition in metadata[name].partitions.values())
        ]
        if not not_ready:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not ready after {ADMIN_TIMEOUT_S:.0f} s: {', '.join(not_ready)}")
        time.sleep(0.1)
    for name, spec in specs.items():
        actual = len(metadata[name].partitions)
        if actual != spec.partitions:
            fix = "delete the topic"
            if spec.partitions == settings.partitions:
                fix += f" or set STREAMSCORE_PARTITIONS={actual} (now {settings.partitions})"
            raise TopicMismatchError(
                f"topic {name!r} exists with {actual} partitions but streamscore needs {spec.partitions}: {fix}."
            )
