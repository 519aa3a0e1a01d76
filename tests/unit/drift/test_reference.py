"""The monitoring reference the trainer stores: calibration, label-free estimates, healthy chunk variation."""
from __future__ import annotations

import numpy as np
import pytest

from streamscore.drift.reference import (MONITORING_KEY, calibrate, estimated_auc, estimated_mae, fit_calibration,
                                         fit_loss_model, window_estimate)
from streamscore.learning.training import roc_auc, train_model


def test_isotonic_calibration_is_monotone_and_fixes_a_miscalibrated_score():
    rng = np.random.default_rng(1)
    truth = rng.beta(1, 20, 50_000)
    labels = (rng.random(truth.size) < truth).astype(int)
    scores = np.sqrt(truth)  # same ranking, over-confident
    calibration = fit_calibration(scores, labels)
    assert np.all(np.diff(calibration["p"]) >= 0) and len(calibration["x"]) <= 64
    calibrated = calibrate(scores, calibration)
    assert abs(calibrated.mean() - labels.mean()) < 0.002
    assert abs(np.mean(calibrated[scores > 0.4]) - np.mean(truth[scores > 0.4])) < 0.02


def test_cbpe_estimated_auc_matches_the_realised_auc_of_calibrated_scores():
    rng = np.random.default_rng(2)
    p = rng.beta(0.5, 8, 20_000)
    labels = (rng.random(p.size) < p).astype(int)
    assert estimated_auc(p, p) == pytest.approx(roc_auc(labels, p), abs=0.01)
    # scores pushed towards the uncertain middle: the estimate falls without any label
    middle = np.clip(p * 0.2 + 0.4, 0, 1)
    assert estimated_auc(middle, middle) < estimated_auc(p, p) - 0.05


def test_loss_model_estimates_mae_per_prediction_range():
    rng = np.random.default_rng(3)
    predictions = rng.uniform(100, 1000, 20_000)
    labels = predictions + rng.normal(0, 1, predictions.size) * predictions * 0.1  # error grows with the value
    model = fit_loss_model(predictions, labels)
    assert estimated_mae(predictions, model) == pytest.approx(np.mean(np.abs(predictions - labels)), rel=0.05)
    assert estimated_mae(np.full(1000, 950.0), model) > 2 * estimated_mae(np.full(1000, 200.0), model)
    assert window_estimate("regression", {"loss_model": model}, predictions[:10]) is None  # too few


def test_train_model_stores_the_monitoring_reference_from_its_holdout():
    rng = np.random.default_rng(4)
    n = 6000
    X = np.column_stack([rng.normal(size=n), rng.normal(size=n), rng.integers(2, 5, n).astype(float)])
    y = (rng.random(n) < 1 / (1 + np.exp(-(2 * X[:, 0] - 3)))).astype(float)
    trained = train_model(X, y, ["signal", "noise", "kind_code"], ["kind_code"], num_boost_round=30, drift_window=400)
    reference = trained.baseline[MONITORING_KEY]
    assert reference["objective"] == "binary" and reference["rows"] == trained.validation_rows
    assert reference["importance"]["signal"] > 0.5 > reference["importance"]["noise"]
    assert sum(reference["importance"].values()) == pytest.approx(1.0)
    chunks = reference["chunks"]
    assert chunks["size"] == 300 and chunks["count"] == 4  # a 1200-row holdout: 4 chunks, not 400-row ones
    assert set(chunks["psi_max"]) == {"signal", "noise", "kind_code", "score"}
    assert chunks["estimate"] == pytest.approx(trained.metrics["auc"], abs=0.03)
    assert chunks["estimate_worst"] <= chunks["estimate_mean"]
    # the expected log loss of the calibrated holdout scores is close to the measured one; its worst chunk above
    assert chunks["log_loss_estimate"] == pytest.approx(trained.metrics["log_loss"], rel=0.25)
    assert chunks["log_loss_estimate_worst"] >= chunks["log_loss_estimate"] * 0.9
    regression = train_model(X, X[:, 0] * 10 + rng.normal(size=n), ["signal", "noise", "kind_code"], ["kind_code"],
                             num_boost_round=30, objective="regression")
    assert regression.baseline[MONITORING_KEY]["loss_model"]["x"]
    assert "log_loss_estimate" not in regression.baseline[MONITORING_KEY]["chunks"]
    assert regression.baseline[MONITORING_KEY]["chunks"]["estimate"] == pytest.approx(regression.metrics["mae"],
                                                                                      rel=0.05)


def test_a_regression_monitor_measures_mae_from_labels_and_estimates_it_without():
    from streamscore.drift.monitor import DriftConfig, DriftMonitor

    rng = np.random.default_rng(5)
    n = 10_000
    X = np.column_stack([rng.uniform(1, 20, n), rng.normal(size=n)])
    y = X[:, 0] * 60 + rng.normal(0, 20, n)
    trained = train_model(X, y, ["distance", "noise"], num_boost_round=40, objective="regression", drift_window=500)
    monitor = DriftMonitor(DriftConfig(window=500, min_events=500, perf_window=1000), trained.baseline, "rides", 1,
                           reference_metrics=trained.metrics, objective="regression")
    with pytest.raises(ValueError, match="finite number"):
        monitor.update_label(1.0, float("nan"))
    predictions = trained.booster.predict(X)
    found = []
    for i in range(n):  # the first half as trained; then every trip takes 40% longer (a label-only change)
        truth = y[i] * (1.4 if i >= 5000 else 1.0)
        found += [(i, s) for s in monitor.update_prediction({"distance": X[i, 0], "noise": X[i, 1]},
                                                             float(predictions[i]), i)]
        found += [(i, s) for s in monitor.update_label(float(predictions[i]), float(truth), i)]
    harm = [(i, s) for i, s in found if s.harm]
    assert harm and all(i >= 5000 for i, _ in harm)
    assert harm[0][1].detector == "mae_ratio" and harm[0][1].harm == "measured" and harm[0][0] < 5600
    stats = {s.statistic: s for s in monitor.snapshot()}
    assert {"mae", "rmse", "estimated_mae"} <= set(stats)
    assert stats["estimated_mae"].value == pytest.approx(stats["estimated_mae"].baseline, rel=0.15)  # inputs unchanged
