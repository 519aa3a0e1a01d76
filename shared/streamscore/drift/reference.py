"""What the drift monitor needs to know about a model beyond its baseline, built at training time.

`build_monitoring_reference` runs on the model's time-ordered validation holdout (the same rows the
baseline and the registry's metrics come from) and returns a JSON-able dict that the trainer stores
in the baseline under `MONITORING_KEY` (so the registry format does not change):

- `importance`: each feature's share of the model's total split gain: covariate drift is weighted by
  what the model relies on (a shift of an unused feature harms nothing);
- binary: `calibration`, an isotonic map score -> P(label = 1) fitted on the holdout (pool adjacent
  violators, each block shrunk towards the base rate by one pseudo-observation of each class);
  with it the monitor estimates AUC and log loss WITHOUT labels (confidence-based performance
  estimation, as NannyML's CBPE: the calibrated probabilities stand in for the missing labels);
- regression: `loss_model`, the holdout's mean absolute and squared error per prediction decile
  (a direct loss estimation reduced to the prediction): the monitor's label-free MAE estimate;
- `chunks`: the same statistics the monitor computes per window, computed on consecutive holdout
  chunks of the drift window's size: how much a HEALTHY window varies, cycles included (the holdout
  covers the most recent part of the training period, nights and days alike). The monitor's
  thresholds never go below these observed healthy extremes (see streamscore.drift.monitor); for a
  binary model also the expected log loss of the whole holdout and of its worst chunk.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

MONITORING_KEY = "_monitoring"  # baseline key of this reference (feature names never start with "_")
REFERENCE_VERSION = 1
_MAX_KNOTS = 64
_MIN_CHUNK = 200
_CLIP = 1e-7


# --- calibration (binary) --------------------------------------------------------------

def fit_calibration(scores: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Isotonic calibration knots {"x": scores, "p": probabilities} (apply with `calibrate`)."""
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores, dtype=float)[order]
    y = np.asarray(labels, dtype=float)[order]
    rate = float(y.mean()) if y.size else 0.0
    # pool adjacent violators over (sum of labels, count, sum of scores) blocks
    sums, counts, score_sums = [], [], []
    for value, score in zip(y.tolist(), s.tolist()):
        sums.append(value)
        counts.append(1.0)
        score_sums.append(score)
        while len(sums) > 1 and sums[-2] / counts[-2] >= sums[-1] / counts[-1]:
            top_sum, top_count, top_score = sums.pop(), counts.pop(), score_sums.pop()
            sums[-1] += top_sum
            counts[-1] += top_count
            score_sums[-1] += top_score
    xs = [score_sum / count for score_sum, count in zip(score_sums, counts)]
    ps = [(total + rate) / (count + 1.0) for total, count in zip(sums, counts)]  # shrunk towards the base rate
    ps = np.maximum.accumulate(np.asarray(ps)).tolist()  # shrinking can break monotonicity slightly
    if len(xs) > _MAX_KNOTS:  # keep every block boundary's shape with fewer knots
        keep = np.unique(np.linspace(0, len(xs) - 1, _MAX_KNOTS).round().astype(int))
        xs = [xs[i] for i in keep]
        ps = [ps[i] for i in keep]
    return {"x": [float(v) for v in xs], "p": [float(v) for v in ps]}


def calibrate(scores: np.ndarray, calibration: Mapping[str, Sequence[float]]) -> np.ndarray:
    return np.interp(scores, calibration["x"], calibration["p"])


def estimated_auc(scores: np.ndarray, probabilities: np.ndarray) -> float:
    """Expected ROC AUC if each event's label were Bernoulli(its calibrated probability) (CBPE)."""
    order = np.argsort(scores, kind="mergesort")
    p = probabilities[order]
    negative = 1.0 - p
    below = np.cumsum(negative) - negative  # negative mass ranked strictly below each event
    positives, negatives = float(p.sum()), float(negative.sum())
    denominator = positives * negatives - float(np.sum(p * negative))  # an event is never paired with itself
    if denominator <= 0:
        return math.nan
    return float(np.sum(p * below) / denominator)


def estimated_log_loss(scores: np.ndarray, probabilities: np.ndarray) -> float:
    """Expected log loss of the raw scores if labels were Bernoulli(calibrated probability)."""
    s = np.clip(scores, _CLIP, 1 - _CLIP)
    return float(np.mean(-(probabilities * np.log(s) + (1 - probabilities) * np.log(1 - s))))


# --- loss model (regression) ---------------------------------------------------------------

def fit_loss_model(predictions: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Mean |error| and error^2 per prediction decile: {"x": decile mean predictions, "mae", "mse"}."""
    predictions = np.asarray(predictions, dtype=float)
    error = predictions - np.asarray(labels, dtype=float)
    order = np.argsort(predictions, kind="mergesort")
    xs, mae, mse = [], [], []
    for part in np.array_split(order, min(bins, max(1, predictions.size // 20))):
        if part.size:
            xs.append(float(predictions[part].mean()))
            mae.append(float(np.abs(error[part]).mean()))
            mse.append(float((error[part] ** 2).mean()))
    return {"x": xs, "mae": mae, "mse": mse}


def estimated_mae(predictions: np.ndarray, loss_model: Mapping[str, Sequence[float]]) -> float:
    return float(np.mean(np.interp(predictions, loss_model["x"], loss_model["mae"])))


# --- the reference ---------------------------------------------------------------------------

def window_estimate(objective: str, reference: Mapping[str, Any], scores: np.ndarray) -> float | None:
    """The label-free performance estimate of one window of scores: estimated AUC (binary) or MAE."""
    scores = scores[~np.isnan(scores)]
    if scores.size < 50:
        return None
    if objective == "regression":
        model = reference.get("loss_model")
        return estimated_mae(scores, model) if model and model.get("x") else None
    calibration = reference.get("calibration")
    if not calibration or not calibration.get("x"):
        return None
    value = estimated_auc(scores, calibrate(scores, calibration))
    return None if math.isnan(value) else value


def window_log_loss_estimate(reference: Mapping[str, Any], scores: np.ndarray) -> float | None:
    """Binary: the log loss one window of scores implies if each event's label were Bernoulli(its
    calibrated probability) (CBPE's expected log loss); None without a calibration or with few scores."""
    scores = scores[~np.isnan(scores)]
    calibration = reference.get("calibration")
    if scores.size < 50 or not calibration or not calibration.get("x"):
        return None
    value = estimated_log_loss(scores, calibrate(scores, calibration))
    return value if math.isfinite(value) and value > 0 else None


def feature_importance(booster, feature_names: Sequence[str]) -> dict[str, float]:
    gain = np.asarray(booster.feature_importance(importance_type="gain"), dtype=float)
    total = float(gain.sum())
    if total <= 0:
        return {name: 1.0 / len(feature_names) for name in feature_names}
    return {name: float(g / total) for name, g in zip(feature_names, gain)}


def build_monitoring_reference(X: np.ndarray, y: np.ndarray, scores: np.ndarray, feature_names: Sequence[str],
                               baseline: Mapping[str, Any], importance: Mapping[str, float], objective: str,
                               window: int) -> dict[str, Any]:
    """See the module docstring. X, y, scores: the holdout in event-time order; baseline: its
    compute_baseline; window: the drift service's window (chunks are that long when the holdout allows)."""
    from streamscore.drift.monitor import SCORE, window_psi, _reference  # the monitor's own statistics

    X = np.asarray(X, dtype=float)
    scores = np.asarray(scores, dtype=float)
    reference: dict[str, Any] = {"version": REFERENCE_VERSION, "objective": objective, "rows": int(scores.size),
                                 "importance": {k: float(v) for k, v in importance.items()}}
    if objective == "regression":
        reference["loss_model"] = fit_loss_model(scores, y)
    else:
        reference["calibration"] = fit_calibration(scores, y)
    # consecutive chunks of the holdout: the healthy variation of each per-window statistic
    chunk = min(window, max(_MIN_CHUNK, scores.size // 4))
    starts = range(0, scores.size - chunk + 1, chunk)
    refs = {name: _reference(name, baseline[name]) for name in [*feature_names, SCORE] if name in baseline}
    psi_chunks: dict[str, list[float]] = {}
    weighted, estimates, log_losses = [], [], []
    for start in starts:
        part = slice(start, start + chunk)
        total = 0.0
        for j, name in enumerate(feature_names):
            ref = refs.get(name)
            value = window_psi(ref, X[part, j]) if ref is not None else None
            if value is not None:
                psi_chunks.setdefault(name, []).append(value)
                total += importance.get(name, 0.0) * value
        if refs.get(SCORE) is not None:
            value = window_psi(refs[SCORE], scores[part])
            if value is not None:
                psi_chunks.setdefault(SCORE, []).append(value)
        weighted.append(total)
        estimate = window_estimate(objective, reference, scores[part])
        if estimate is not None:
            estimates.append(estimate)
        if objective != "regression":
            log_loss = window_log_loss_estimate(reference, scores[part])
            if log_loss is not None:
                log_losses.append(log_loss)
    whole = window_estimate(objective, reference, scores)
    reference["chunks"] = {
        "size": int(chunk), "count": len(weighted),
        "psi_max": {name: float(max(values)) for name, values in psi_chunks.items()},
        "weighted_psi_max": float(max(weighted)) if weighted else None,
        "estimate": whole,
        "estimate_mean": float(np.mean(estimates)) if estimates else None,
        "estimate_std": float(np.std(estimates)) if len(estimates) > 1 else None,
        # the worst healthy window: lowest estimated AUC, highest estimated MAE
        "estimate_worst": (float(max(estimates)) if objective == "regression" else float(min(estimates)))
        if estimates else None,
    }
    if objective != "regression":  # binary: the expected log loss of the holdout and of its worst chunk
        reference["chunks"]["log_loss_estimate"] = window_log_loss_estimate(reference, scores)
        reference["chunks"]["log_loss_estimate_worst"] = float(max(log_losses)) if log_losses else None
    return reference
