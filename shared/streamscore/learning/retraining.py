"""Train a candidate from logged data, gate it against production, register and maybe promote.

Used by `streamscore train`, the trainer service and the demo. It reads ClickHouse and writes the
registry; publishing the returned ModelUpdate events to Kafka is the caller's job. Every setting it
uses is read here: the training window's holdout (STREAMSCORE_TRAIN_VALIDATION_FRACTION), the
classifier's threshold policy (STREAMSCORE_TRAIN_ALERT_RATE), the rounds (STREAMSCORE_TRAIN_NUM_BOOST_ROUND)
and the gate (STREAMSCORE_GATE_MIN_AUC and STREAMSCORE_GATE_MAX_AUC_DROP for a classifier,
STREAMSCORE_GATE_MAX_RMSE_INCREASE for a regression). A candidate that passes is promoted, or with
STREAMSCORE_ROLLOUT_AUTO_SHADOW (and a production version to compare with) put in shadow for the online
gate (streamscore.learning.rollout).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from streamscore.clickhouse.store import Store
from streamscore.learning import training
from streamscore.learning.registry import ModelRegistry, ModelVersion, registration_event
from streamscore.learning.training_set import TrainingSet, load_training_set
from streamscore.settings import Settings
from streamscore.spec.model import FeatureSpec

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
    rows_read: int = 0
    shadowed: bool = False  # passed the offline gate and went into shadow instead of production


def train_and_register(store: Store, registry: ModelRegistry, settings: Settings, spec: FeatureSpec, reason: str,
                       since_ms: int | None = None, training_set: TrainingSet | None = None) -> RetrainOutcome:
    """Build the point-in-time training set, train, compare with production on the
    candidate's own recent holdout, register, then promote or reject."""
    started = time.monotonic()
    data = training_set or load_training_set(store, spec, since_ms=since_ms)
    order = data.event_times.argsort(kind="stable")  # time-ordered split: validate on the most recent
    X, y, times = data.X[order], data.y[order], data.event_times[order]
    objective = spec.objective
    trained = training.train_model(X, y, spec.feature_names, spec.categorical_features,
                                   params=spec.model.params or None,
                                   num_boost_round=settings.train_num_boost_round,
                                   validation_fraction=settings.train_validation_fraction,
                                   alert_rate=settings.train_alert_rate, objective=objective)
    holdout = order[trained.train_rows:]
    model_name = settings.model_name or spec.model.name
    production = registry.production(model_name)
    production_metrics = None
    if production is not None and production.feature_set == spec.feature_set:
        booster = registry.load_booster(model_name, production.version)
        X_production = data.encoded_with(production.vocabularies, spec.feature_names)[holdout]
        production_metrics = (training.evaluate_regression(booster, X_production, data.y[holdout])
                              if objective == "regression" else
                              training.evaluate(booster, X_production, data.y[holdout], production.threshold))
    if objective == "regression":
        verdict = training.gate_regression(trained.metrics, production_metrics, settings.gate_max_rmse_increase)
    else:
        verdict = training.gate(trained.metrics, production_metrics, min_auc=settings.gate_min_auc,
                                max_auc_drop=settings.gate_max_auc_drop)
    version = registry.register(
        model_name, trained.booster, feature_set=spec.feature_set,
        feature_names=spec.feature_names, categorical_features=spec.categorical_features,
        train_rows=trained.train_rows, metrics=trained.metrics, baseline=trained.baseline,
        threshold=trained.threshold, params=trained.params, reason=reason,
        train_start=int(times[0]) if len(times) else None, train_end=int(times[-1]) if len(times) else None,
        objective=objective, vocabularies=data.vocabularies, spec_name=spec.name,
    )
    events = [registration_event(version)]
    shadowed = bool(verdict.passed and settings.rollout_auto_shadow and production is not None)
    if shadowed:
        events.append(registry.shadow(model_name, version.version, reason=f"offline gate {verdict.reason}; "
                                      "in shadow for the online gate").event)
    elif verdict.passed:
        events.append(registry.promote(model_name, version.version, reason=verdict.reason).event)
    else:
        events.append(registry.reject(model_name, version.version, verdict.reason).event)
    headline = "rmse" if objective == "regression" else "auc"
    action = "shadow" if shadowed else "promote" if verdict.passed else "reject"
    log.info("model %s v%d %s: %s", model_name, version.version,
             {"shadow": "in shadow", "promote": "promoted", "reject": "rejected"}[action], verdict.reason,
             extra={"model_name": model_name, "model_version": version.version,
                    "parent_version": version.parent_version, "action": action,
                    headline: version.metrics.get(headline), "train_rows": data.rows, "reason": reason,
                    "rows_read": data.rows_read, "seconds": round(time.monotonic() - started, 2)})
    return RetrainOutcome(version=version, promoted=verdict.passed and not shadowed, gate_reason=verdict.reason,
                          training_rows=data.rows, events_replayed=data.events_replayed,
                          seconds=time.monotonic() - started, events=events, rows_read=data.rows_read,
                          shadowed=shadowed)
