"""Training, metrics (against hand-computed values), baseline and the promotion gate."""
from __future__ import annotations

import math

import lightgbm
import numpy as np
import pytest

from streamscore.learning import training
from streamscore.learning.training import (
    BASELINE_QUANTILES,
    TrainingDataError,
    alert_rate_threshold,
    average_precision,
    classification_metrics,
    compute_baseline,
    evaluate,
    gate,
    log_loss,
    max_f1_threshold,
    roc_auc,
    train_model,
)

FEATURES = ["amount", "count_1h", "secs_since_prev", "mcc_code", "channel_code"]
CATEGORICAL = ["mcc_code", "channel_code"]


def synthetic(n: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels depend on amount, count_1h and one mcc code; some NaN where features are undefined."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3, 1, n)
    count_1h = rng.poisson(2, n).astype(float)
    secs = rng.exponential(3600, n)
    secs[rng.random(n) < 0.1] = np.nan
    mcc = rng.integers(0, 8, n).astype(float)
    channel = rng.integers(0, 4, n).astype(float)
    logit = -4 + 0.02 * amount + 0.6 * count_1h + 2.0 * (mcc == 5)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    return np.column_stack([amount, count_1h, secs, mcc, channel]), y


# --- metrics on hand-computed examples ------------------------------------------

Y = [0, 0, 1, 1]
S = [0.1, 0.4, 0.35, 0.8]


def test_auc_hand_computed():
    # positive/negative pairs: (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4
    assert roc_auc(Y, S) == pytest.approx(0.75)


def test_auc_counts_ties_as_half():
    # pairs (pos, neg): (0.2, 0.2)=1/2, (0.2, 0.1)=1, (0.9, 0.2)=1, (0.9, 0.1)=1 -> 3.5 / 4
    assert roc_auc([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9]) == pytest.approx(0.875)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 0], [0.9, 0.1]) == pytest.approx(1.0)
    assert roc_auc([1, 0], [0.1, 0.9]) == pytest.approx(0.0)


def test_log_loss_hand_computed():
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.35) + math.log(0.8)) / 4
    assert log_loss(Y, S) == pytest.approx(expected)
    # clipping keeps a confident mistake finite
    assert math.isfinite(log_loss([1], [0.0]))


def test_average_precision_hand_computed():
    # descending: 0.8 (P=1, R=.5), 0.4 (P=.5, R=.5), 0.35 (P=2/3, R=1), 0.1 (P=.5, R=1)
    # AP = .5*1 + 0*.5 + .5*(2/3) + 0 = 0.8333
    assert average_precision(Y, S) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # tied scores form one threshold: 0.5 -> (P=.5, R=.5), 0.2 -> (P=2/3, R=1)
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.25 + 0.5 * 2 / 3)


def test_max_f1_threshold_hand_computed():
    # F1 at >=0.8: 2/3, >=0.4: 1/2, >=0.35: 4/5, >=0.1: 2/3
    assert max_f1_threshold(Y, S) == pytest.approx(0.35)


def test_alert_rate_threshold_flags_top_fraction():
    scores = np.arange(100) / 100
    t = alert_rate_threshold(scores, 0.05)
    assert np.sum(scores >= t) == 5


def test_classification_metrics_at_threshold():
    m = classification_metrics(Y, S, threshold=0.35)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.8)
    assert m["alert_rate"] == pytest.approx(0.75)
    assert m["positive_rate"] == pytest.approx(0.5)
    # nothing flagged: precision is 0 by convention, not a division error
    assert classification_metrics(Y, S, threshold=2.0)["precision"] == 0.0


def test_metrics_match_lightgbm_builtin_auc_and_logloss():
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.2).astype(float)
    p = np.clip(np.round(0.2 + 0.3 * (y - 0.2) + rng.normal(0, 0.15, y.size), 2), 0.01, 0.99)  # many ties
    # LightGBM evaluates its own metrics on a constant-init model with init_score = logit(p).
    X = np.zeros((y.size, 1))
    logit = np.log(p / (1 - p))
    train = lightgbm.Dataset(X, label=y, init_score=logit, params={"verbose": -1})
    results: dict = {}
    lightgbm.train(
        {"objective": "binary", "metric": ["auc", "binary_logloss"], "verbose": -1, "num_leaves": 2,
         "learning_rate": 1e-12, "min_data_in_leaf": 1},
        train, num_boost_round=1, valid_sets=[train], valid_names=["t"],
        callbacks=[lightgbm.record_evaluation(results)],
    )
    assert roc_auc(y, p) == pytest.approx(results["t"]["auc"][0], abs=1e-6)
    assert log_loss(y, p) == pytest.approx(results["t"]["binary_logloss"][0], abs=1e-6)


# --- input errors ------------------------------------------------------------------

def test_single_class_is_a_clear_error():
    X, _ = synthetic(200)
    with pytest.raises(TrainingDataError, match=r"training set has only label 0 \(200 rows\); need both classes"):
        train_model(X, np.zeros(200), FEATURES, CATEGORICAL)
    with pytest.raises(TrainingDataError, match="only label 1"):
        roc_auc([1, 1], [0.2, 0.3])


def test_empty_nan_labels_and_shape_errors():
    X, y = synthetic(300)
    with pytest.raises(TrainingDataError, match="empty"):
        train_model(np.zeros((0, 5)), np.zeros(0), FEATURES)
    y_nan = y.copy()
    y_nan[7] = np.nan
    with pytest.raises(TrainingDataError, match="1 NaN labels .first at row 7"):
        train_model(X, y_nan, FEATURES)
    with pytest.raises(TrainingDataError, match=r"X has 4 columns but expected 5 features \(amount, count_1h"):
        train_model(X[:, :4], y, FEATURES)
    with pytest.raises(TrainingDataError, match="X has 299 rows but y has 300"):
        train_model(X[:299], y, FEATURES)
    with pytest.raises(TrainingDataError, match="labels must be 0 or 1, row 0 has 2.0"):
        train_model(X, np.r_[2.0, y[1:]], FEATURES)
    X_inf = X.copy()
    X_inf[3, 0] = np.inf
    with pytest.raises(TrainingDataError, match="feature 'amount' is infinite at row 3"):
        train_model(X_inf, y, FEATURES)
    with pytest.raises(ValueError, match="categorical_features \\['nope'\\]"):
        train_model(X, y, FEATURES, ["nope"])


def test_holdout_without_positives_is_named():
    X, y = synthetic(1000)
    y = y.copy()
    y[800:] = 0
    with pytest.raises(TrainingDataError, match=r"validation holdout \(most recent 200 rows\) has only label 0"):
        train_model(X, y, FEATURES, CATEGORICAL)


# --- training ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    X, y = synthetic()
    return X, y, train_model(X, y, FEATURES, CATEGORICAL, num_boost_round=60)


def test_train_model_learns_and_reports_holdout_metrics(trained):
    X, y, model = trained
    assert model.train_rows == 4800 and model.validation_rows == 1200
    assert model.metrics["auc"] > 0.8
    assert model.metrics["rows"] == 1200
    assert model.threshold == model.metrics["threshold"]
    assert model.params["seed"] == 0 and model.params["num_boost_round"] == 60
    # the reported metrics are exactly evaluate() on the most recent 20%
    again = evaluate(model.booster, X[4800:], y[4800:], model.threshold)
    assert again == pytest.approx(model.metrics)
    assert model.booster.feature_name() == FEATURES
    assert model.baseline["score"]["count"] == 1200


def test_training_is_deterministic(trained):
    X, y, model = trained
    again = train_model(X, y, FEATURES, CATEGORICAL, num_boost_round=60)
    assert again.model_text == model.model_text
    different_seed = train_model(X, y, FEATURES, CATEGORICAL, num_boost_round=60, seed=1,
                                 params={"bagging_fraction": 0.8, "bagging_freq": 1})
    assert different_seed.model_text != model.model_text


def test_alert_rate_policy(trained):
    X, y, _ = trained
    model = train_model(X, y, FEATURES, CATEGORICAL, num_boost_round=20, alert_rate=0.02)
    assert model.metrics["alert_rate"] == pytest.approx(0.02, abs=0.005)
    assert model.params["threshold_policy"] == "alert_rate=0.02"


def test_evaluate_names_expected_feature_count(trained):
    X, y, model = trained
    with pytest.raises(TrainingDataError, match="X has 3 columns but expected 5 features"):
        evaluate(model.booster, X[:, :3], y, 0.5)


# --- baseline ---------------------------------------------------------------------

def test_baseline_quantiles_on_known_data():
    values = np.r_[np.arange(101, dtype=float), [np.nan] * 9]  # 0..100 plus 9 NaN (110 rows)
    X = np.column_stack([values, np.full(110, np.nan), np.r_[[2.0] * 55, [3.0] * 44, [0.0] * 11]])
    scores = np.linspace(0, 1, 110)
    b = compute_baseline(X, ["a", "all_nan", "mcc_code"], scores, categorical_features=["mcc_code"])
    a = b["a"]
    assert a["count"] == 101
    assert a["nan_fraction"] == pytest.approx(9 / 110)
    assert a["mean"] == pytest.approx(50.0)
    assert a["std"] == pytest.approx(math.sqrt((101**2 - 1) / 12))
    assert a["min"] == 0.0 and a["max"] == 100.0
    assert a["quantiles"] == pytest.approx({str(q): 100 * q for q in BASELINE_QUANTILES})
    assert b["all_nan"]["count"] == 0 and b["all_nan"]["nan_fraction"] == 1.0
    assert b["all_nan"]["mean"] is None and b["all_nan"]["quantiles"]["0.5"] is None
    assert b["mcc_code"]["frequencies"] == pytest.approx({"0": 0.1, "2": 0.5, "3": 0.4})
    assert b["score"]["quantiles"]["0.5"] == pytest.approx(0.5)
    assert "frequencies" not in b["a"] and "bins" not in b["mcc_code"] and "bins" not in b["all_nan"]
    # exact PSI bins over the distinct quantile edges: (-inf, 1], (1, 5], ..., (99, inf)
    assert b["a"]["bins"]["edges"] == [1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0]
    assert b["a"]["bins"]["fractions"] == pytest.approx(np.array([2, 4, 20, 25, 25, 20, 4, 1]) / 101)
    assert sum(b["score"]["bins"]["fractions"]) == pytest.approx(1.0)


def test_baseline_is_json_serialisable_without_nan():
    import json

    X = np.full((5, 1), np.nan)
    json.dumps(compute_baseline(X, ["x"], np.ones(5)), allow_nan=False)


def test_baseline_rejects_feature_named_score():
    with pytest.raises(ValueError, match="may not be named 'score'"):
        compute_baseline(np.zeros((2, 1)), ["score"], np.zeros(2))


# --- gate ---------------------------------------------------------------------------

def test_gate_without_production_uses_the_floor():
    assert gate({"auc": 0.8}, None, min_auc=0.7).passed
    result = gate({"auc": 0.65}, None, min_auc=0.7)
    assert not result.passed
    assert result.reason == "candidate auc 0.6500 is below the floor min_auc 0.7000"


def test_gate_compares_with_production_on_same_holdout():
    ok = gate({"auc": 0.905}, {"auc": 0.91}, min_auc=0.7, max_auc_drop=0.01)
    assert ok.passed and "0.9050" in ok.reason and "0.9100" in ok.reason
    bad = gate({"auc": 0.88}, {"auc": 0.91}, min_auc=0.7, max_auc_drop=0.01)
    assert not bad.passed
    assert bad.reason == "candidate auc 0.8800 is 0.0300 below production auc 0.9100 (max drop 0.0100)"
    # the floor applies even when production is worse
    assert not gate({"auc": 0.6}, {"auc": 0.55}, min_auc=0.7).passed


def test_gate_optional_average_precision_rule_and_nan():
    result = gate({"auc": 0.9, "average_precision": 0.30}, {"auc": 0.9, "average_precision": 0.40},
                  max_average_precision_drop=0.05)
    assert not result.passed and "average_precision 0.3000 is 0.1000 below production" in result.reason
    assert gate({"auc": 0.9, "average_precision": 0.38}, {"auc": 0.9, "average_precision": 0.40},
                max_average_precision_drop=0.05).passed
    nan = gate({"auc": float("nan")}, {"auc": 0.9})
    assert not nan.passed and "not finite" in nan.reason


# --- regression -----------------------------------------------------------------------------
def test_regression_metrics_against_hand_computed_values():
    metrics = training.regression_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 6.0])
    assert metrics["rmse"] == 1.0 and metrics["mae"] == 0.5
    assert metrics["r2"] == pytest.approx(1 - 4.0 / 5.0)
    with pytest.raises(training.TrainingDataError, match="non-finite labels"):
        training.regression_metrics([1.0, float("nan")], [1.0, 1.0])


def test_a_regression_learns_and_is_gated_on_rmse():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 3))
    y = 3.0 * X[:, 0] - X[:, 1] + rng.normal(0, 0.1, 4000)
    trained = training.train_model(X, y, ["a", "b", "c"], objective="regression", num_boost_round=100)
    assert trained.threshold is None and trained.metrics["rmse"] < 0.5 and trained.metrics["r2"] > 0.95
    assert "score" in trained.baseline and trained.params["objective"] == "regression"
    assert training.gate_regression(trained.metrics, None).passed
    worse = {"rmse": trained.metrics["rmse"] * 1.05}
    assert not training.gate_regression(worse, trained.metrics, max_rmse_increase=0.02).passed
    assert training.gate_regression(worse, trained.metrics, max_rmse_increase=0.1).passed
    with pytest.raises(ValueError, match="objective must be"):
        training.train_model(X, y, ["a", "b", "c"], objective="poisson")
