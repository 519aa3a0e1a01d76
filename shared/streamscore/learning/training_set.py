"""The offline feature path: logged raw events in ClickHouse -> point-in-time training set.

Events are read back from `predictions` (which keeps every scored event's raw
inputs) in the order the scorer saw them — per entity, by Kafka offset — and
replayed through the same `features.offline_features` code the scorer runs.
Each vector therefore uses only what was known when its event was scored:
no leakage from later events, and no training/serving skew by construction
(tests/test_skew.py checks it against the vectors the scorer actually logged).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamscore.legacy import features
from streamscore.clickhouse.store import Store

EVENT_FIELDS = ["event_id", "entity_id", "event_time", "amount", "currency", "merchant_category", "channel",
                "country", "device_id", "event_partition", "event_offset"]


@dataclass
class TrainingSet:
    X: np.ndarray
    y: np.ndarray
    event_times: np.ndarray  # ms, for time-ordered validation splits
    event_ids: list[str]
    events_replayed: int

    @property
    def rows(self) -> int:
        return len(self.y)


def load_logged_events(store: Store, until_ms: int | None = None) -> list[dict]:
    """Every logged event (deduplicated), in the scorer's processing order."""
    where = "" if until_ms is None else f"WHERE event_time < fromUnixTimestamp64Milli({int(until_ms)}, 'UTC')"
    result = store.query(
        "SELECT event_id, entity_id, toUnixTimestamp64Milli(event_time), amount, currency, merchant_category, "
        f"channel, country, device_id, event_partition, event_offset FROM predictions FINAL {where} "
        "ORDER BY event_partition, event_offset")
    return [dict(zip(EVENT_FIELDS, row)) for row in result.rows]


def load_labels(store: Store) -> dict[str, int]:
    result = store.query("SELECT event_id, label FROM labels FINAL")
    return {event_id: int(label) for event_id, label in result.rows}


def build_training_set(events: list[dict], labels: dict[str, int], since_ms: int | None = None) -> TrainingSet:
    """Replay all `events` (so entity state is warm) and keep the labelled ones at or after `since_ms`."""
    matrix = features.offline_features(events)
    keep = [i for i, e in enumerate(events)
            if e["event_id"] in labels and (since_ms is None or e["event_time"] >= since_ms)]
    return TrainingSet(
        X=matrix[keep] if keep else np.empty((0, len(features.FEATURE_NAMES))),
        y=np.asarray([labels[events[i]["event_id"]] for i in keep], dtype=np.float64),
        event_times=np.asarray([events[i]["event_time"] for i in keep], dtype=np.int64),
        event_ids=[events[i]["event_id"] for i in keep],
        events_replayed=len(events),
    )


def load_training_set(store: Store, since_ms: int | None = None, until_ms: int | None = None) -> TrainingSet:
    return build_training_set(load_logged_events(store, until_ms), load_labels(store), since_ms)
