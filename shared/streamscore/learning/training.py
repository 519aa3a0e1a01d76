"""LightGBM training, validation metrics, training baselines and the promotion gate.

Pure functions on numpy arrays: no Kafka, no ClickHouse, no files. The trainer
service loads (features, labels) from the store, calls these, and registers the
result in streamscore.learning.registry.

Validation is time-ordered: rows must be passed in event-time order, the model
is trained on the oldest (1 - validation_fraction) and evaluated on the most
recent validation_fraction. A random split would leak the future into training
and overstate quality for a drifting stream.

Decision threshold: by default the score that maximises F1 on the validation
holdout (predict "fraud" when score >= threshold). With `alert_rate=r` it is
instead the score that flags the top r fraction of the holdout, for teams that
size alerting by analyst capacity.

Metrics are implemented here with numpy (no scikit-learn dependency) and follow
scikit-learn's definitions: roc_auc with ties counted as 1/2, log_loss with
probabilities clipped to [1e-15, 1 - 1e-15], average_precision as the
step-wise sum  sum_n (R_n - R_{n-1}) * P_n  over distinct score thresholds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightgbm
import numpy as np

# The drift monitor's own binning rule, so baseline bins and live windows are counted alike.
from streamscore.drift.monitor import histogram_bins
from streamscore.drift.reference import MONITORING_KEY, build_monitoring_reference, feature_importance

BASELINE_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
SCORE_KEY = "score"
_LOG_LOSS_EPS = 1e-15

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.9,
    "lambda_l2": 1.0,
    # categorical codes: small vocabularies, keep splits regularised
    "max_cat_to_onehot": 4,
    "cat_smooth": 10.0,
    "min_data_per_group": 50,
    # reproducible: same data + seed -> byte-identical model text
    "deterministic": True,
    "force_row_wise": True,
    # One thread: the trainer shares a small machine with the scorers, and OpenMP threads that
    # spin-wait for a busy core made 50k x 17 x 200 training 5-20x slower at 2 threads (1.5 s -> 8-30 s).
    "num_threads": 1,
    "verbose": -1,
}


class TrainingDataError(ValueError):
    """Training/evaluation input that cannot produce a meaningful model or metric."""


@dataclass(frozen=True)
class TrainedModel:
    booster: lightgbm.Booster
    metrics: dict[str, float]  # on the time-ordered validation holdout (see evaluate)
    threshold: float | None  # None for regression
    params: dict[str, Any]  # everything needed to reproduce: LightGBM params + num_boost_round + split
    feature_names: list[str]
    categorical_features: list[str]
    train_rows: int
    validation_rows: int
    baseline: dict[str, Any]  # compute_baseline on the validation holdout, with its out-of-sample scores,
    # and under MONITORING_KEY the drift monitor's reference (streamscore.drift.reference): feature
    # importance, calibration / loss model and healthy per-window variation, all from the holdout

    @property
    def model_text(self) -> str:
        return self.booster.model_to_string()


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str


# --- input checks -------------------------------------------------------------

def _check_labels(y: Any, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise TrainingDataError(f"{what}: labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise TrainingDataError(f"{what} is empty (0 rows)")
    nan_rows = np.flatnonzero(np.isnan(y))
    if nan_rows.size:
        raise TrainingDataError(
            f"{what} has {nan_rows.size} NaN labels (first at row {nan_rows[0]}); drop unlabelled rows first"
        )
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise TrainingDataError(f"{what}: labels must be 0 or 1, row {bad[0]} has {float(y[bad[0]])}")
    return y


def _require_both_classes(y: np.ndarray, what: str) -> None:
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        only = 1 if positives else 0
        raise TrainingDataError(
            f"{what} has only label {only} ({y.size} rows); need both classes (0 and 1)"
        )


def _check_features(X: Any, feature_names: Sequence[str], rows: int, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise TrainingDataError(f"{what}: X must be 2-D (rows x features), got shape {X.shape}")
    if X.shape[1] != len(feature_names):
        raise TrainingDataError(
            f"{what}: X has {X.shape[1]} columns but expected {len(feature_names)} features "
            f"({', '.join(feature_names)})"
        )
    if X.shape[0] != rows:
        raise TrainingDataError(f"{what}: X has {X.shape[0]} rows but y has {rows}")
    infinite = np.isinf(X)
    if infinite.any():
        row, col = map(int, np.argwhere(infinite)[0])
        raise TrainingDataError(
            f"{what}: feature {feature_names[col]!r} is infinite at row {row}; features must be finite or NaN"
        )
    return X


# --- metrics ------------------------------------------------------------------

def roc_auc(y: Any, scores: Any) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2)."""
    y = _check_labels(y, "roc_auc")
    scores = np.asarray(scores, dtype=np.float64)
    _require_both_classes(y, "roc_auc")
    # Mann-Whitney U with average ranks for tied scores.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    positives = y.sum()
    negatives = y.size - positives
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def log_loss(y: Any, scores: Any) -> float:
    y = _check_labels(y, "log_loss")
    p = np.clip(np.asarray(scores, dtype=np.float64), _LOG_LOSS_EPS, 1 - _LOG_LOSS_EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _precision_recall_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, true positives, false positives) at each distinct score, predicting score >= t."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_y = y[order]
    # last index of each run of equal scores: everything up to it is predicted positive
    last_of_group = np.flatnonzero(np.r_[np.diff(sorted_scores) != 0, True])
    tp = np.cumsum(sorted_y)[last_of_group]
    fp = (last_of_group + 1) - tp
    return sorted_scores[last_of_group], tp, fp, sorted_y


def average_precision(y: Any, scores: Any) -> float:
    y = _check_labels(y, "average_precision")
    scores = np.asarray(scores, dtype=np.float64)
    positives = y.sum()
    if positives == 0:
        raise TrainingDataError("average_precision: no positive labels; it is undefined")
    _, tp, fp, _ = _precision_recall_curve(y, scores)
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def max_f1_threshold(y: Any, scores: Any) -> float:
    """The score t maximising F1 of (score >= t); the highest such t on ties (fewer alerts)."""
    y = _check_labels(y, "max_f1_threshold")
    scores = np.asarray(scores, dtype=np.float64)
    _require_both_classes(y, "max_f1_threshold")
    thresholds, tp, fp, _ = _precision_recall_curve(y, scores)
    fn = y.sum() - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    return float(thresholds[int(np.argmax(f1))])  # argmax = first = highest threshold


def alert_rate_threshold(scores: Any, alert_rate: float) -> float:
    """The score at which the top `alert_rate` fraction of rows is flagged (score >= t)."""
    if not 0 < alert_rate < 1:
        raise ValueError(f"alert_rate must be in (0, 1), got {alert_rate}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    k = max(1, int(math.ceil(alert_rate * scores.size)))
    return float(scores[k - 1])


def classification_metrics(y: Any, scores: Any, threshold: float) -> dict[str, float]:
    """AUC, log loss, average precision, and precision/recall/F1/alert rate at `threshold`."""
    y = _check_labels(y, "evaluation set")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != y.shape:
        raise TrainingDataError(f"scores shape {scores.shape} does not match labels shape {y.shape}")
    _require_both_classes(y, "evaluation set")
    flagged = scores >= threshold
    tp = float(np.sum(flagged & (y == 1)))
    fp = float(np.sum(flagged & (y == 0)))
    fn = float(np.sum(~flagged & (y == 1)))
    return {
        "auc": roc_auc(y, scores),
        "log_loss": log_loss(y, scores),
        "average_precision": average_precision(y, scores),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "threshold": float(threshold),
        "alert_rate": float(flagged.mean()),
        "positive_rate": float(y.mean()),
        "rows": float(y.size),
    }


def evaluate(booster: lightgbm.Booster, X: Any, y: Any, threshold: float) -> dict[str, float]:
    """classification_metrics of `booster` on (X, y); X columns in the booster's feature order."""
    y = _check_labels(y, "evaluation set")
    names = booster.feature_name()
    X = _check_features(X, names, y.size, "evaluation set")
    return classification_metrics(y, booster.predict(X), threshold)


# --- baseline -----------------------------------------------------------------

def _column_stats(values: np.ndarray) -> dict[str, Any]:
    total = int(values.size)
    finite = values[~np.isnan(values)]
    stats: dict[str, Any] = {
        "count": int(finite.size),
        "nan_fraction": float((total - finite.size) / total) if total else 0.0,
    }
    if finite.size:
        quantiles = np.quantile(finite, BASELINE_QUANTILES)
        stats.update(
            mean=float(finite.mean()),
            std=float(finite.std()),
            min=float(finite.min()),
            max=float(finite.max()),
            quantiles={str(q): float(v) for q, v in zip(BASELINE_QUANTILES, quantiles)},
        )
    else:  # JSON has no NaN: undefined statistics are null
        stats.update(mean=None, std=None, min=None, max=None, quantiles={str(q): None for q in BASELINE_QUANTILES})
    return stats


def compute_baseline(
    X: Any, feature_names: Sequence[str], scores: Any, categorical_features: Sequence[str] = ()
) -> dict[str, Any]:
    """Training-time statistics the drift service compares live windows with.

    {name: stats for each feature, "score": stats}, where stats =
    {"count": non-NaN rows, "nan_fraction", "mean", "std" (population), "min", "max",
     "quantiles": {"0.01": v, "0.05": v, ..., "0.99": v}}  (NaN ignored; null if all NaN).
    Categorical features also get "frequencies": {"<code>": fraction of non-NaN rows};
    the others and the score get exact PSI "bins": {"edges", "fractions"} (drift.histogram_bins),
    which quantiles alone cannot give for integer-valued features such as count_1h.
    """
    feature_names = list(feature_names)
    if SCORE_KEY in feature_names:
        raise ValueError(f"a feature may not be named {SCORE_KEY!r}: the baseline uses that key for the model score")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise TrainingDataError(f"scores must be 1-D, got shape {scores.shape}")
    X = _check_features(X, feature_names, scores.size, "baseline")
    baseline: dict[str, Any] = {}
    for column, name in enumerate(feature_names):
        values = X[:, column]
        baseline[name] = _column_stats(values)
        if name in categorical_features:
            finite = values[~np.isnan(values)]
            codes, counts = np.unique(finite, return_counts=True)
            baseline[name]["frequencies"] = {
                str(int(c)): float(n / finite.size) for c, n in zip(codes, counts)
            }
        elif baseline[name]["count"]:
            baseline[name]["bins"] = histogram_bins(values, baseline[name]["quantiles"])
    baseline[SCORE_KEY] = _column_stats(scores)
    if baseline[SCORE_KEY]["count"]:
        baseline[SCORE_KEY]["bins"] = histogram_bins(scores, baseline[SCORE_KEY]["quantiles"])
    return baseline


# --- training -----------------------------------------------------------------

def train_model(
    X: Any,
    y: Any,
    feature_names: Sequence[str],
    categorical_features: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    num_boost_round: int = 200,
    seed: int = 0,
    validation_fraction: float = 0.2,
    alert_rate: float | None = None,
    objective: str = "binary",
    drift_window: int = 2000,
) -> TrainedModel:
    """Train on the oldest rows, validate on the most recent `validation_fraction`.

    Rows must be in event-time order. `params` override DEFAULT_PARAMS. `objective` is "binary" (labels
    0/1; the threshold maximises F1 on the holdout, or flags the top `alert_rate` of it) or "regression"
    (numeric labels, L2 loss; no threshold: RMSE, MAE and R² on the holdout). `drift_window`: the
    drift service's window, the chunk size of the monitoring reference's healthy variation.
    """
    if objective == "regression":
        return _train_regression(X, y, feature_names, categorical_features, params, num_boost_round, seed,
                                 validation_fraction, drift_window)
    if objective != "binary":
        raise ValueError(f"objective must be 'binary' or 'regression', got {objective!r}")
    feature_names = [str(n) for n in feature_names]
    if len(set(feature_names)) != len(feature_names):
        raise ValueError(f"duplicate feature names in {feature_names}")
    unknown = [c for c in categorical_features if c not in feature_names]
    if unknown:
        raise ValueError(f"categorical_features {unknown} are not in feature_names {feature_names}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if num_boost_round < 1:
        raise ValueError(f"num_boost_round must be >= 1, got {num_boost_round}")
    y = _check_labels(y, "training set")
    X = _check_features(X, feature_names, y.size, "training set")
    _require_both_classes(y, "training set")

    split = int(round(y.size * (1 - validation_fraction)))
    if split < 1 or split >= y.size:
        raise TrainingDataError(
            f"training set of {y.size} rows is too small to hold out {validation_fraction:.0%} for validation"
        )
    X_train, y_train, X_valid, y_valid = X[:split], y[:split], X[split:], y[split:]
    _require_both_classes(y_train, f"training part (oldest {split} rows)")
    _require_both_classes(
        y_valid,
        f"validation holdout (most recent {y.size - split} rows)",
    )

    full_params = {**DEFAULT_PARAMS, "seed": seed, **(params or {})}
    dataset = lightgbm.Dataset(
        X_train, label=y_train, feature_name=feature_names,
        categorical_feature=list(categorical_features) or "auto", params=full_params,
        free_raw_data=True,
    )
    booster = lightgbm.train(full_params, dataset, num_boost_round=num_boost_round)

    valid_scores = booster.predict(X_valid)
    if alert_rate is None:
        threshold = max_f1_threshold(y_valid, valid_scores)
        policy = "max_f1"
    else:
        threshold = alert_rate_threshold(valid_scores, alert_rate)
        policy = f"alert_rate={alert_rate}"
    metrics = classification_metrics(y_valid, valid_scores, threshold)
    return TrainedModel(
        booster=booster,
        metrics=metrics,
        threshold=threshold,
        params={
            **full_params,
            "num_boost_round": num_boost_round,
            "validation_fraction": validation_fraction,
            "threshold_policy": policy,
        },
        feature_names=feature_names,
        categorical_features=list(categorical_features),
        train_rows=int(split),
        validation_rows=int(y.size - split),
        # On the recent out-of-sample slice: live traffic should look like it (in-sample scores are optimistic).
        baseline=monitoring_baseline(booster, X_valid, y_valid, valid_scores, feature_names, categorical_features,
                                     "binary", drift_window),
    )


def monitoring_baseline(booster: lightgbm.Booster, X_holdout: np.ndarray, y_holdout: np.ndarray,
                        holdout_scores: np.ndarray, feature_names: Sequence[str], categorical_features: Sequence[str],
                        objective: str, drift_window: int) -> dict[str, Any]:
    """compute_baseline of the holdout plus the drift monitor's reference under MONITORING_KEY."""
    baseline = compute_baseline(X_holdout, feature_names, holdout_scores, categorical_features)
    baseline[MONITORING_KEY] = build_monitoring_reference(
        X_holdout, y_holdout, holdout_scores, feature_names, baseline, feature_importance(booster, feature_names),
        objective, drift_window)
    return baseline


# --- promotion gate -----------------------------------------------------------

def gate(
    candidate_metrics: dict[str, float],
    production_metrics: dict[str, float] | None,
    min_auc: float = 0.70,
    max_auc_drop: float = 0.01,
    max_average_precision_drop: float | None = None,
) -> GateResult:
    """Should the candidate replace production?

    Both metric dicts must come from the SAME recent holdout (evaluate() of each
    booster on it). Passes when:
      1. candidate AUC >= min_auc (absolute floor), and
      2. if there is a production model: candidate AUC >= production AUC - max_auc_drop, and
      3. if max_average_precision_drop is set: candidate AP >= production AP - max_average_precision_drop.
    A NaN/missing metric fails.
    """
    def metric(metrics: dict[str, float], name: str) -> float | None:
        value = metrics.get(name)
        if value is None or not math.isfinite(float(value)):
            return None
        return float(value)

    candidate_auc = metric(candidate_metrics, "auc")
    if candidate_auc is None:
        return GateResult(False, f"candidate auc is missing or not finite ({candidate_metrics.get('auc')!r})")
    if candidate_auc < min_auc:
        return GateResult(False, f"candidate auc {candidate_auc:.4f} is below the floor min_auc {min_auc:.4f}")
    if production_metrics is None:
        return GateResult(True, f"no production model; candidate auc {candidate_auc:.4f} >= floor {min_auc:.4f}")

    production_auc = metric(production_metrics, "auc")
    if production_auc is None:
        return GateResult(
            True,
            f"production auc is not available ({production_metrics.get('auc')!r}); "
            f"candidate auc {candidate_auc:.4f} >= floor {min_auc:.4f}",
        )
    if candidate_auc < production_auc - max_auc_drop:
        return GateResult(
            False,
            f"candidate auc {candidate_auc:.4f} is {production_auc - candidate_auc:.4f} below production auc "
            f"{production_auc:.4f} (max drop {max_auc_drop:.4f})",
        )
    reasons = [f"candidate auc {candidate_auc:.4f} vs production auc {production_auc:.4f} (max drop {max_auc_drop:.4f}, floor {min_auc:.4f})"]

    if max_average_precision_drop is not None:
        candidate_ap = metric(candidate_metrics, "average_precision")
        production_ap = metric(production_metrics, "average_precision")
        if candidate_ap is None:
            return GateResult(False, "candidate average_precision is missing or not finite")
        if production_ap is not None:
            if candidate_ap < production_ap - max_average_precision_drop:
                return GateResult(
                    False,
                    f"candidate average_precision {candidate_ap:.4f} is {production_ap - candidate_ap:.4f} below "
                    f"production average_precision {production_ap:.4f} (max drop {max_average_precision_drop:.4f})",
                )
            reasons.append(f"average_precision {candidate_ap:.4f} vs {production_ap:.4f}")
    return GateResult(True, "passed: " + "; ".join(reasons))


# --- regression -----------------------------------------------------------------

def _check_numeric_labels(y: Any, what: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1:
        raise TrainingDataError(f"{what}: labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise TrainingDataError(f"{what} is empty (0 rows)")
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise TrainingDataError(f"{what} has {bad.size} non-finite labels (first at row {bad[0]}: {y[bad[0]]})")
    return y


def regression_metrics(y: Any, predictions: Any) -> dict[str, float]:
    """RMSE, MAE, R² (1 - SSE/SST; 0 when the labels are constant), mean label and prediction, rows."""
    y = _check_numeric_labels(y, "evaluation set")
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.shape != y.shape:
        raise TrainingDataError(f"predictions shape {predictions.shape} does not match labels shape {y.shape}")
    error = predictions - y
    sse = float(np.sum(error * error))
    sst = float(np.sum((y - y.mean()) ** 2))
    return {
        "rmse": math.sqrt(sse / y.size),
        "mae": float(np.mean(np.abs(error))),
        "r2": 1.0 - sse / sst if sst > 0 else 0.0,
        "mean_label": float(y.mean()),
        "mean_prediction": float(predictions.mean()),
        "rows": float(y.size),
    }


def evaluate_regression(booster: lightgbm.Booster, X: Any, y: Any) -> dict[str, float]:
    y = _check_numeric_labels(y, "evaluation set")
    X = _check_features(X, booster.feature_name(), y.size, "evaluation set")
    return regression_metrics(y, booster.predict(X))


REGRESSION_PARAMS: dict[str, Any] = {**DEFAULT_PARAMS, "objective": "regression"}


def _train_regression(X, y, feature_names, categorical_features, params, num_boost_round, seed,
                      validation_fraction, drift_window=2000) -> TrainedModel:
    feature_names = [str(n) for n in feature_names]
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    y = _check_numeric_labels(y, "training set")
    X = _check_features(X, feature_names, y.size, "training set")
    split = int(round(y.size * (1 - validation_fraction)))
    if split < 1 or split >= y.size:
        raise TrainingDataError(
            f"training set of {y.size} rows is too small to hold out {validation_fraction:.0%} for validation")
    full_params = {**REGRESSION_PARAMS, "seed": seed, **(params or {})}
    dataset = lightgbm.Dataset(X[:split], label=y[:split], feature_name=feature_names,
                               categorical_feature=list(categorical_features) or "auto", params=full_params,
                               free_raw_data=True)
    booster = lightgbm.train(full_params, dataset, num_boost_round=num_boost_round)
    valid = booster.predict(X[split:])
    return TrainedModel(
        booster=booster, metrics=regression_metrics(y[split:], valid), threshold=None,
        params={**full_params, "num_boost_round": num_boost_round, "validation_fraction": validation_fraction},
        feature_names=feature_names, categorical_features=list(categorical_features), train_rows=int(split),
        validation_rows=int(y.size - split),
        baseline=monitoring_baseline(booster, X[split:], y[split:], valid, feature_names, categorical_features,
                                     "regression", drift_window),
    )


def gate_regression(candidate_metrics: dict[str, float], production_metrics: dict[str, float] | None,
                    max_rmse_increase: float = 0.02) -> GateResult:
    """Should a regression candidate replace production? Both metric dicts from the SAME recent holdout:
    passes when the candidate's RMSE is finite and at most `max_rmse_increase` (relative) above production's."""
    candidate = candidate_metrics.get("rmse")
    if candidate is None or not math.isfinite(float(candidate)):
        return GateResult(False, f"candidate rmse is missing or not finite ({candidate!r})")
    if production_metrics is None or production_metrics.get("rmse") is None:
        return GateResult(True, f"no production model to compare; candidate rmse {candidate:.4f}")
    production = float(production_metrics["rmse"])
    limit = production * (1 + max_rmse_increase)
    if candidate > limit:
        return GateResult(False, f"candidate rmse {candidate:.4f} is above production rmse {production:.4f} "
                                 f"+ {max_rmse_increase:.0%} ({limit:.4f})")
    return GateResult(True, f"passed: candidate rmse {candidate:.4f} vs production rmse {production:.4f} "
                            f"(max increase {max_rmse_increase:.0%})")
