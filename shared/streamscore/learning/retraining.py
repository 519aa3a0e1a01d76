"""Train a candidate from logged data, gate it against production, register and maybe promote.

Used by `streamscore train`, the trainer service and the demo. It reads
ClickHouse and writes the registry; publishing the returned ModelUpdate events
to Kafka is the caller's job.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from streamscore.legacy import features

from streamscore.learning import training
from streamscore.learning.registry import ModelRegistry, ModelVersion, registration_event
from streamscore.settings import Settings
from streamscore.clickhouse.store import Store
from streamscore.learning.training_set import TrainingSet, load_training_set

log = logging.getLogger("streamscore.retraining")


@dataclass
class RetrainOutcome:
    version: ModelVersion
    promoted: bool
    gate_reason: str
    training_rows: int
    events_replayed: int
    seconds: float
    events: list[dict] = field(default_factory=list)  # ModelUpdate records to publish


def train_and_register(store: Store, registry: ModelRegistry, settings: Settings, reason: str,
                       since_ms: int | None = None, num_boost_round: int = 200,
                       training_set: TrainingSet | None = None) -> RetrainOutcome:
    """Build the point-in-time training set, train, compare with production on the
    candidate's own recent holdout, register, then promote or reject."""
    started = time.monotonic()
    data = training_set or load_training_set(store, since_ms=since_ms)
    order = data.event_times.argsort(kind="stable")  # time-ordered split: validate on the most recent
    X, y, times = data.X[order], data.y[order], data.event_times[order]
    trained = training.train_model(X, y, features.FEATURE_NAMES, features.CATEGORICAL_FEATURES,
                                   num_boost_round=num_boost_round)
    holdout = slice(trained.train_rows, None)
    production = registry.production(settings.model_name)
    production_metrics = None
    if production is not None and production.feature_set == features.FEATURE_SET_HASH:
        booster = registry.load_booster(settings.model_name, production.version)
        production_metrics = training.evaluate(booster, X[holdout], y[holdout], production.threshold)
    verdict = training.gate(trained.metrics, production_metrics)
    version = registry.register(
        settings.model_name, trained.booster, feature_set=features.FEATURE_SET_HASH,
        feature_names=features.FEATURE_NAMES, categorical_features=features.CATEGORICAL_FEATURES,
        train_rows=trained.train_rows, metrics=trained.metrics, baseline=trained.baseline,
        threshold=trained.threshold, params=trained.params, reason=reason,
        train_start=int(times[0]) if len(times) else None, train_end=int(times[-1]) if len(times) else None,
    )
    events = [registration_event(version)]
    if verdict.passed:
        events.append(registry.promote(settings.model_name, version.version, reason=verdict.reason).event)
    else:
        events.append(registry.reject(settings.model_name, version.version, verdict.reason).event)
    log.info("model %s v%d %s: %s", settings.model_name, version.version,
             "promoted" if verdict.passed else "rejected", verdict.reason,
             extra={"model_name": settings.model_name, "model_version": version.version,
                    "parent_version": version.parent_version, "action": "promote" if verdict.passed else "reject",
                    "auc": version.metrics.get("auc"), "train_rows": data.rows, "reason": reason,
                    "seconds": round(time.monotonic() - started, 2)})
    return RetrainOutcome(version=version, promoted=verdict.passed, gate_reason=verdict.reason,
                          training_rows=data.rows, events_replayed=data.events_replayed,
                          seconds=time.monotonic() - started, events=events)
