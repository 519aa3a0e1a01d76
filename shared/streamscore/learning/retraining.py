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


@dataclass
class Candidate:
    """A trained candidate and the gate's verdict, not registered yet: what a training process hands back
    (plain data; the model as LightGBM's text), so registering and promoting stay with the caller and a
    training abandoned at shutdown leaves no trace."""

    model_name: str
    model_text: str
    metrics: dict
    baseline: dict
    threshold: float | None
    params: dict
    train_rows: int
    passed: bool
    gate_reason: str
    training_rows: int
    events_replayed: int
    rows_read: int
    vocabularies: dict
    train_start: int | None
    train_end: int | None
    seconds: float


def train_candidate(store: Store, registry: ModelRegistry, settings: Settings, spec: FeatureSpec,
                    since_ms: int | None = None, training_set: TrainingSet | None = None,
                    read_from_ms: int | None = None) -> Candidate:
    """Build the point-in-time training set, train, and compare with production on the candidate's own
    recent holdout (reads the store and the registry, writes nothing)."""
    started = time.monotonic()
    data = training_set or load_training_set(store, spec, since_ms=since_ms, read_from_ms=read_from_ms)
    order = data.event_times.argsort(kind="stable")  # time-ordered split: validate on the most recent
    X, y, times = data.X[order], data.y[order], data.event_times[order]
    objective = spec.objective
    trained = training.train_model(X, y, spec.feature_names, spec.categorical_features,
                                   params=spec.model.params or None,
                                   num_boost_round=settings.train_num_boost_round,
                                   validation_fraction=settings.train_validation_fraction,
                                   alert_rate=settings.train_alert_rate, objective=objective,
                                   drift_window=settings.drift_window)
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
    return Candidate(
        model_name=model_name, model_text=trained.model_text, metrics=dict(trained.metrics),
        baseline=trained.baseline, threshold=trained.threshold, params=trained.params,
        train_rows=trained.train_rows, passed=verdict.passed, gate_reason=verdict.reason, training_rows=data.rows,
        events_replayed=data.events_replayed, rows_read=data.rows_read, vocabularies=data.vocabularies,
        train_start=int(times[0]) if len(times) else None, train_end=int(times[-1]) if len(times) else None,
        seconds=time.monotonic() - started)


def register_candidate(registry: ModelRegistry, spec: FeatureSpec, candidate: Candidate, reason: str,
                       started: float | None = None, auto_shadow: bool = False) -> RetrainOutcome:
    """Register `candidate`, then promote or reject it as its verdict says (fast: files in the registry). With
    `auto_shadow` (STREAMSCORE_ROLLOUT_AUTO_SHADOW) a passing candidate goes into shadow for the online gate
    instead of production, when there is a production version to compare it with."""
    started = time.monotonic() - candidate.seconds if started is None else started
    model_name, objective = candidate.model_name, spec.objective
    version = registry.register(
        model_name, candidate.model_text, feature_set=spec.feature_set,
        feature_names=spec.feature_names, categorical_features=spec.categorical_features,
        train_rows=candidate.train_rows, metrics=candidate.metrics, baseline=candidate.baseline,
        threshold=candidate.threshold, params=candidate.params, reason=reason,
        train_start=candidate.train_start, train_end=candidate.train_end,
        objective=objective, vocabularies=candidate.vocabularies, spec_name=spec.name,
    )
    events = [registration_event(version)]
    shadowed = bool(candidate.passed and auto_shadow and version.parent_version is not None)
    if shadowed:
        events.append(registry.shadow(model_name, version.version, reason=f"offline gate {candidate.gate_reason}; "
                                      "in shadow for the online gate").event)
    elif candidate.passed:
        events.append(registry.promote(model_name, version.version, reason=candidate.gate_reason).event)
    else:
        events.append(registry.reject(model_name, version.version, candidate.gate_reason).event)
    headline = "rmse" if objective == "regression" else "auc"
    action = "shadow" if shadowed else "promote" if candidate.passed else "reject"
    log.info("model %s v%d %s: %s", model_name, version.version,
             {"shadow": "in shadow", "promote": "promoted", "reject": "rejected"}[action], candidate.gate_reason,
             extra={"model_name": model_name, "model_version": version.version,
                    "parent_version": version.parent_version, "action": action,
                    headline: version.metrics.get(headline), "train_rows": candidate.training_rows,
                    "reason": reason, "rows_read": candidate.rows_read,
                    "seconds": round(time.monotonic() - started, 2)})
    return RetrainOutcome(version=version, promoted=candidate.passed and not shadowed,
                          gate_reason=candidate.gate_reason, training_rows=candidate.training_rows,
                          events_replayed=candidate.events_replayed, seconds=time.monotonic() - started,
                          events=events, rows_read=candidate.rows_read, shadowed=shadowed)


def train_and_register(store: Store, registry: ModelRegistry, settings: Settings, spec: FeatureSpec, reason: str,
                       since_ms: int | None = None, training_set: TrainingSet | None = None,
                       read_from_ms: int | None = None) -> RetrainOutcome:
    """Build the point-in-time training set, train, compare with production on the
    candidate's own recent holdout, register, then promote or reject."""
    started = time.monotonic()
    candidate = train_candidate(store, registry, settings, spec, since_ms=since_ms, training_set=training_set,
                                read_from_ms=read_from_ms)
    return register_candidate(registry, spec, candidate, reason, started=started,
                              auto_shadow=settings.rollout_auto_shadow)
