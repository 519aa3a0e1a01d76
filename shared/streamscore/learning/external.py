"""Bring your own model: register a LightGBM model trained elsewhere (a notebook) for a spec's features.

The model must use the spec's features, in the spec's order (its own `feature_names=` line is compared
with the spec: a mismatch is refused naming the first differing feature), and the spec's objective (a
binary classifier for a binary label, a regression for a numeric one). Its drift baseline (the feature
and score distributions the drift service compares live traffic with) comes from a reference CSV of
feature vectors, or from the feature vectors the scorer logged in the last days; its holdout metrics
and threshold come from the labelled rows among those, when there are any.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import lightgbm
import numpy as np

from streamscore.learning import training
from streamscore.learning.registry import FeatureNamesMismatch, ModelRegistry, ModelVersion, RegistryUpdate, check_feature_names
from streamscore.settings import Settings
from streamscore.spec.model import FeatureSpec

DAY_MS = 86_400_000


class ExternalModelError(ValueError):
    """A model file that cannot be served under the spec; the message says why and what to do."""


def _objective(model_text: str) -> str:
    for line in model_text.splitlines():
        if line.startswith("objective="):
            name = line.split("=", 1)[1].split()[0]
            return "binary" if name == "binary" else ("regression" if name.startswith("regression") or name in (
                "huber", "fair", "quantile") else name)
    raise ExternalModelError("the model text has no objective= line: is it a LightGBM model (booster.save_model)?")


def read_reference(path: Path, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(feature matrix in spec order, labels or None) from a CSV with a header row naming the spec's features
    (any order, extra columns ignored; a `label` column is used as labels; empty cells are NaN)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [name for name in spec.feature_names if name not in header]
        if missing:
            raise ExternalModelError(f"{path}: no column for feature(s) {', '.join(missing)} (the header row names "
                                     "the spec's features)")
        rows = list(reader)
    if not rows:
        raise ExternalModelError(f"{path} has no rows")

    def number(text: str, row: int, column: str) -> float:
        if text in ("", "nan", "NaN"):
            return math.nan
        try:
            return float(text)
        except ValueError:
            raise ExternalModelError(f"{path} row {row + 2}, column {column!r}: {text!r} is not a number") from None

    X = np.array([[number(r[name], i, name) for name in spec.feature_names] for i, r in enumerate(rows)])
    y = (np.array([number(r["label"], i, "label") for i, r in enumerate(rows)]) if "label" in header else None)
    return X, y


def logged_reference(store, spec: FeatureSpec, since_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The feature vectors the scorer logged since `since_ms` (this feature set only), and the labelled ones
    with their labels."""
    result = store.query(
        "SELECT event_id, features FROM predictions FINAL WHERE feature_set = {fs:String} "
        "AND event_time >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')",
        {"fs": spec.feature_set, "since": since_ms})
    if not result.rows:
        raise ExternalModelError(f"no predictions of feature set {spec.feature_set} logged in the window: pass "
                                 "--reference with a CSV of feature vectors")
    names = spec.feature_names
    X = np.array([[features.get(name, math.nan) for name in names] for _, features in result.rows], dtype=np.float64)
    labels = dict(store.query(
        "SELECT event_id, label FROM labels FINAL WHERE event_id IN (SELECT event_id FROM predictions "
        "WHERE feature_set = {fs:String} AND event_time >= fromUnixTimestamp64Milli({since:Int64}, 'UTC'))",
        {"fs": spec.feature_set, "since": since_ms}).rows)
    labelled = [i for i, (event_id, _) in enumerate(result.rows) if event_id in labels]
    return X, X[labelled], np.array([labels[result.rows[i][0]] for i in labelled], dtype=np.float64)


def register_external_model(settings: Settings, spec: FeatureSpec, registry: ModelRegistry, model_name: str,
                            model_text: str, reference: Path | None = None, days: float = 7.0,
                            reason: str = "registered from a file", promote: bool = False,
                            store=None) -> tuple[ModelVersion, RegistryUpdate | None]:
    """Check `model_text` against `spec`, compute its baseline and metrics, register it (and maybe promote)."""
    try:
        check_feature_names(model_text, spec.feature_names)
    except FeatureNamesMismatch as error:
        raise ExternalModelError(f"the model does not fit spec {spec.name!r}: {error}") from None
    objective = _objective(model_text)
    if objective != spec.objective:
        raise ExternalModelError(f"the model's objective is {objective!r} but spec {spec.name!r} has a "
                                 f"{spec.label.kind} label (objective {spec.objective!r})")
    if any(f.is_learned for f in spec.features):
        learned = ", ".join(f.name for f in spec.features if f.is_learned)
        raise ExternalModelError(f"spec {spec.name!r} has learned encodings ({learned}), whose vocabulary is "
                                 "frozen at training time: train such a model with `streamscore train`, or give "
                                 "those features fixed vocabularies in the spec")
    booster = lightgbm.Booster(model_str=model_text)
    if reference is not None:
        X, y = read_reference(reference, spec)
        X_labelled = X
        source = f"reference file {reference}"
    else:
        from streamscore.clickhouse.store import open_store

        own = store is None
        store = store or open_store(settings)
        try:
            X, X_labelled, y = logged_reference(store, spec, int(time.time() * 1000 - days * DAY_MS))
        finally:
            if own:
                store.close()
        source = f"logged predictions of the last {days:g} days"
    scores = booster.predict(X, num_threads=1)
    threshold, metrics = (None, {}) if objective == "regression" else (0.5, {})
    if y is not None and len(y):
        labelled_scores = booster.predict(X_labelled, num_threads=1)
        if objective == "regression":
            metrics = training.regression_metrics(y, labelled_scores)
        elif 0 < y.sum() < len(y):
            threshold = training.max_f1_threshold(y, labelled_scores)
            metrics = training.classification_metrics(y, labelled_scores, threshold)
    version = registry.register(
        model_name, model_text, feature_set=spec.feature_set, feature_names=spec.feature_names,
        categorical_features=spec.categorical_features, train_rows=0, metrics=metrics,
        baseline=training.compute_baseline(X, spec.feature_names, scores, spec.categorical_features),
        threshold=threshold, params={"baseline_source": source, "baseline_rows": int(len(X))}, reason=reason,
        objective=objective, spec_name=spec.name)
    update = registry.promote(model_name, version.version, reason=reason) if promote else None
    return version, update
