"""DriftMonitor on seeded synthetic streams with known change points.

Windows close at event indices window-1, 2*window-1, ... (0-based), so a shift
that starts on a window boundary is reported exactly at the end of that window.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from streamscore.drift.monitor import (
    DriftConfig,
    DriftMonitor,
    DriftSignal,
    IncompatibleDriftState,
    histogram_bins,
    psi,
    quantile_bins,
)
from streamscore.drift.reference import MONITORING_KEY, build_monitoring_reference
from streamscore.settings import Settings
from streamscore.learning.training import compute_baseline

NAMES = ["amount", "count_1h", "amount_zscore_7d", "std_7d", "mcc_code"]
CATEGORICAL = ["mcc_code"]
MCC_CODES = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
MCC_P = np.array([0.05, 0.005, 0.4, 0.3, 0.2, 0.045])
WINDOW = 2000


def make_stream(n, seed, *, zscore_shift_at=None, zscore_shift=1.0, score_shift_at=None,
                unknown_surge_at=None, nan_surge_at=None):
    """Feature rows, scores, and labels drawn from the scores (a calibrated model)."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3.0, 1.0, n)
    count_1h = rng.poisson(1.0, n).astype(float)
    zscore = rng.normal(0.0, 1.0, n)
    std_7d = np.where(rng.random(n) < 0.2, np.nan, rng.lognormal(2.0, 0.5, n))
    mcc = rng.choice(MCC_CODES, n, p=MCC_P)
    score = rng.beta(1.0, 30.0, n)
    if zscore_shift_at is not None:
        zscore[zscore_shift_at:] += zscore_shift
    if score_shift_at is not None:
        score[score_shift_at:] = rng.beta(3.0, 20.0, n - score_shift_at)
    if unknown_surge_at is not None:
        surge = rng.random(n - unknown_surge_at) < 0.2
        mcc[unknown_surge_at:][surge] = 1.0
    if nan_surge_at is not None:
        std_7d[nan_surge_at:][rng.random(n - nan_surge_at) < 0.5] = np.nan
    labels = (rng.random(n) < score).astype(int)
    X = np.column_stack([amount, count_1h, zscore, std_7d, mcc])
    return X, score, labels


@pytest.fixture(scope="module")
def baseline():
    X, score, _ = make_stream(40_000, seed=1)
    return compute_baseline(X, NAMES, score, categorical_features=CATEGORICAL)


IMPORTANCE = {"amount": 0.1, "count_1h": 0.1, "amount_zscore_7d": 0.6, "std_7d": 0.1, "mcc_code": 0.1}


@pytest.fixture(scope="module")
def monitored_baseline():
    """A baseline with the trainer's monitoring reference (calibration, importance, healthy chunks)."""
    X, score, labels = make_stream(40_000, seed=1)
    baseline = compute_baseline(X, NAMES, score, categorical_features=CATEGORICAL)
    baseline[MONITORING_KEY] = build_monitoring_reference(X, labels, score, NAMES, baseline, IMPORTANCE,
                                                          "binary", WINDOW)
    return baseline


@pytest.fixture(scope="module")
def importance_only_baseline(monitored_baseline):
    """A monitoring reference without calibration: no label-free estimate to corroborate (or veto) with."""
    reference = {k: v for k, v in monitored_baseline[MONITORING_KEY].items() if k != "calibration"}
    return {**monitored_baseline, MONITORING_KEY: reference}


def run(monitor, X, score, start=0, stop=None, step_ms=10):
    """Feed predictions; returns [(index, signal)]."""
    stop = len(X) if stop is None else stop
    found = []
    rows = X[start:stop].tolist()
    scores = score[start:stop].tolist()
    for offset, (row, s) in enumerate(zip(rows, scores)):
        i = start + offset
        for signal in monitor.update_prediction(dict(zip(NAMES, row)), s, i * step_ms):
            found.append((i, signal))
    return found


def config(**overrides):
    defaults = dict(window=WINDOW, min_events=WINDOW, perf_window=1000)
    defaults.update(overrides)
    return DriftConfig(**defaults)


def test_no_drift_gives_no_signal_over_50k_events(baseline):
    X, score, labels = make_stream(50_000, seed=2)
    monitor = DriftMonitor(config(), baseline, "fraud", 1)
    assert run(monitor, X, score) == []
    perf = [s for s, y in zip(score.tolist(), labels.tolist()) for s in monitor.update_label(s, y)]
    assert perf == []
    assert monitor.windows_completed == 25
    # The baseline covers what we asked for: every feature but none missing.
    assert monitor.monitored == (*NAMES, "score")


def test_covariate_shift_is_reported_at_the_end_of_the_first_shifted_window(baseline):
    X, score, _ = make_stream(30_000, seed=3, zscore_shift_at=20_000, zscore_shift=1.0)
    monitor = DriftMonitor(config(), baseline, "fraud", 1)
    found = run(monitor, X, score)
    first_index = found[0][0]
    assert first_index == 21_999
    assert {s.feature for _, s in found} == {"amount_zscore_7d"}
    detectors = {s.detector for i, s in found if i == first_index}
    assert detectors == {"psi", "mean_shift"}
    shift = next(s for i, s in found if s.detector == "mean_shift")
    assert shift.value == pytest.approx(1.0, abs=0.1)  # in baseline std units
    assert shift.window == WINDOW and shift.at_ms == 21_999 * 10


def test_score_shift_is_caught_per_event_before_the_window_closes(baseline):
    X, score, _ = make_stream(40_000, seed=4, score_shift_at=30_500)
    monitor = DriftMonitor(config(detectors={"adwin", "pagehinkley", "windowed"}), baseline, "fraud", 1)
    found = run(monitor, X, score)
    first_index, first = found[0]
    assert 30_500 <= first_index < 30_500 + 300
    assert first.feature == "score" and first.detector in {"adwin", "pagehinkley"}
    assert {s.detector for _, s in found} >= {"adwin", "pagehinkley", "psi", "mean_shift"}


def test_never_seen_category_surge_shows_as_unknown_rate(baseline):
    X, score, _ = make_stream(20_000, seed=5, unknown_surge_at=10_000)
    monitor = DriftMonitor(config(), baseline, "fraud", 1)
    found = run(monitor, X, score)
    assert found[0][0] == 11_999
    unknown = [s for i, s in found if s.detector == "unknown_rate"]
    assert unknown and all(s.feature == "mcc_code" for s in unknown)
    assert unknown[0].value == pytest.approx(0.2, abs=0.03)
    assert unknown[0].baseline == pytest.approx(0.005, abs=0.002)


def test_nan_surge_is_counted_not_fed_to_detectors(baseline):
    X, score, _ = make_stream(20_000, seed=6, nan_surge_at=10_000)
    monitor = DriftMonitor(config(detectors={"adwin", "pagehinkley", "windowed"}, event_features=("std_7d",)),
                           baseline, "fraud", 1)
    found = run(monitor, X, score)
    assert found[0][0] == 11_999
    assert [(s.detector, s.feature) for i, s in found if i == 11_999] == [("nan_fraction", "std_7d")]
    nan_stat = next(s for s in monitor.snapshot() if s.feature == "std_7d" and s.statistic == "nan_fraction")
    assert nan_stat.value == pytest.approx(0.6, abs=0.03)


def test_performance_degradation_from_labels(baseline):
    _, score, labels = make_stream(12_000, seed=7)
    rng = np.random.default_rng(8)
    labels = labels.copy()
    # From label 6000 on the model's scores stop meaning anything: labels are 10% positive at random.
    labels[6000:] = (rng.random(6000) < 0.1).astype(int)
    expected_ll = float(np.mean(-np.log(1 - score[:6000]) * (1 - labels[:6000]) - np.log(score[:6000]) * labels[:6000]))
    monitor = DriftMonitor(config(), baseline, "fraud", 1, reference_metrics={"log_loss": expected_ll, "auc": 0.7})
    found = [(i, s) for i, (sc, y) in enumerate(zip(score.tolist(), labels.tolist()))
             for s in monitor.update_label(sc, y, i)]
    assert found, "degradation not detected"
    assert all(i >= 6000 for i, _ in found)
    assert all(s.at_ms == i for i, s in found)  # the labelled prediction's event time (no prediction seen yet)
    # ADWIN on the per-label loss reacts first...
    first_index, first = found[0]
    assert first_index == 6207 and (first.detector, first.feature) == ("adwin", None)
    assert first.value > first.baseline  # an increase of the mean loss
    assert first.harm is None  # recorded, not evidence of harm on its own
    # ...the measured tests follow at a check (every perf_window/10 labels): evidence of harm.
    ratio_index, ratio = next((i, s) for i, s in found if s.detector == "logloss_ratio")
    assert 6000 <= ratio_index <= 6700 and ratio_index % 100 == 99
    assert ratio.feature is None and ratio.baseline == pytest.approx(expected_ll) and ratio.harm == "measured"
    assert ratio.statistic == "log_loss_ratio_lower_bound"
    drop = next(s for i, s in found if s.detector == "auc_drop")
    assert drop.harm == "measured" and drop.threshold >= 0.1
    stats = {s.statistic: s for s in monitor.snapshot()}
    assert stats["log_loss"].window == 1000 and stats["auc"].value < 0.6
    assert {"precision", "recall", "positive_rate"} <= set(stats)


def test_performance_reference_self_calibrates_without_validation_metrics(baseline):
    _, score, labels = make_stream(6000, seed=9)
    monitor = DriftMonitor(config(), baseline, "fraud", 1)
    found = [s for sc, y in zip(score.tolist(), labels.tolist()) for s in monitor.update_label(sc, y)]
    assert found == []
    reference = next(s for s in monitor.snapshot() if s.statistic == "log_loss").baseline
    first_half = score[:500], labels[:500]  # the first check: half a label window
    assert reference == pytest.approx(float(np.mean(-np.log(np.where(first_half[1] == 1, first_half[0],
                                                                      1 - first_half[0])))))


def harm(channel="measured", value=0.5, threshold=0.25, at_ms=0):
    return DriftSignal("auc_drop", None, "auc_drop", value, threshold, WINDOW, at_ms, 0.9, harm=channel)


def test_feature_drift_is_recorded_but_requests_nothing_without_evidence_of_harm(baseline):
    X, score, _ = make_stream(30_000, seed=10, zscore_shift_at=10_000)
    monitor = DriftMonitor(config(), baseline, "fraud", 1)  # no monitoring reference: no importance
    found = run(monitor, X, score)
    assert {s.detector for _, s in found} >= {"psi", "mean_shift"}
    assert all(s.harm is None for _, s in found)
    assert monitor.should_request_retrain([s for _, s in found], now_ms=10**9) is None


def test_important_feature_drift_is_not_harm_while_the_scores_do_not_move(monitored_baseline):
    # the scores of this stream do not depend on the features: the estimated AUC stays put, so the
    # weighted PSI is recorded but not corroborated
    X, score, _ = make_stream(20_000, seed=10, zscore_shift_at=10_000, zscore_shift=1.5)
    monitor = DriftMonitor(config(), monitored_baseline, "fraud", 1)
    found = [s for _, s in run(monitor, X, score)]
    assert any(s.detector == "weighted_psi" for s in found)
    assert not any(s.harm for s in found)
    assert "estimated auc" in monitor.evidence()


def test_important_feature_drift_requests_once_it_persists(importance_only_baseline):
    X, score, _ = make_stream(40_000, seed=10, zscore_shift_at=10_000, zscore_shift=1.5)
    monitor = DriftMonitor(config(cooldown_events=100_000), importance_only_baseline, "fraud", 1)
    requests, recorded = [], []
    rows, scores = X.tolist(), score.tolist()
    for i in range(len(rows)):
        signals = monitor.update_prediction(dict(zip(NAMES, rows[i])), scores[i], i * 10)
        recorded += [s for s in signals if s.detector == "weighted_psi"]
        chosen = monitor.should_request_retrain(signals, now_ms=i * 10)
        if chosen is not None:
            requests.append((i, chosen))
    # the first shifted window is recorded; the second (persist_windows=2) is evidence: one request
    assert recorded[0].at_ms == 11_999 * 10 and recorded[0].harm is None
    assert [(i, s.detector, s.harm) for i, s in requests] == [(13_999, "weighted_psi", "covariate")]
    assert "evidence:" in requests[0][1].reason and "amount_zscore_7d" in requests[0][1].reason


def test_cooldown_needs_both_events_and_time(baseline):
    monitor = DriftMonitor(config(cooldown_events=10, cooldown_s=60.0), baseline, "fraud", 1)
    signal = harm()
    assert monitor.should_request_retrain([signal], now_ms=0).detector == "auc_drop"
    for _ in range(10):
        monitor.update_prediction({}, None, 0)
    assert monitor.should_request_retrain([signal], now_ms=59_999) is None  # events passed, time not
    assert monitor.should_request_retrain([signal], now_ms=60_000) is not None
    assert monitor.should_request_retrain([], now_ms=10**9) is None
    recorded_only = DriftSignal("psi", "amount", "psi", 5.0, 0.25, WINDOW, 0)
    assert monitor.should_request_retrain([recorded_only], now_ms=10**12) is None


def test_cooldown_breaks_through_once_the_cited_evidence_has_cleared(importance_only_baseline):
    # a transient shift (3 windows) requests; the stream recovers; a later real shift must not wait out
    # the 100k-event cool-down
    X, score, _ = make_stream(40_000, seed=18)
    X[10_000:16_000, 2] += 1.5
    X[26_000:, 2] += 1.5
    monitor = DriftMonitor(config(cooldown_events=100_000, cooldown_s=10**6, clear_windows=3),
                           importance_only_baseline, "fraud", 1)
    requests = []
    rows, scores = X.tolist(), score.tolist()
    for i in range(len(rows)):
        signals = monitor.update_prediction(dict(zip(NAMES, rows[i])), scores[i], i * 10)
        chosen = monitor.should_request_retrain(signals, now_ms=i * 10)
        if chosen is not None:
            requests.append((i, chosen))
    # the second request comes with the second shift's second window, not 100k events later
    assert [i for i, _ in requests] == [13_999, 29_999]
    assert "cool-down breakthrough" in requests[1][1].reason and "breakthrough" not in requests[0][1].reason


def test_harm_is_cited_by_channel_rank_then_strength(baseline):
    monitor = DriftMonitor(config(), baseline, "fraud", 1)
    covariate = DriftSignal("weighted_psi", None, "importance_weighted_psi", 9.0, 0.5, WINDOW, 0, harm="covariate")
    measured = harm(value=0.2, threshold=0.1)
    assert monitor.should_request_retrain([covariate, measured], now_ms=0).detector == "auc_drop"


def test_state_round_trip_continues_identically(baseline):
    X, score, labels = make_stream(30_000, seed=11, zscore_shift_at=15_000, score_shift_at=20_000)
    straight = DriftMonitor(config(), baseline, "fraud", 1)
    restored = DriftMonitor(config(), baseline, "fraud", 1)
    cut = 12_345  # mid-window, ADWIN well populated
    before = run(straight, X, score, 0, cut)
    assert run(restored, X, score, 0, cut) == before
    for s, y in zip(score[:3000].tolist(), labels[:3000].tolist()):
        straight.update_label(s, y)
        restored.update_label(s, y)
    restored = DriftMonitor.from_bytes(restored.to_bytes(), config())
    after_straight = run(straight, X, score, cut)
    after_restored = run(restored, X, score, cut)
    assert after_straight and after_restored == after_straight
    assert restored.snapshot() == straight.snapshot()
    assert (restored.predictions_seen, restored.labels_seen, restored.windows_completed) == (
        straight.predictions_seen, straight.labels_seen, straight.windows_completed)


def test_state_refuses_other_structure_and_garbage(baseline):
    monitor = DriftMonitor(config(), baseline, "fraud", 1)
    data = monitor.to_bytes()
    assert DriftMonitor.from_bytes(data).config == config()
    looser = DriftMonitor.from_bytes(data, config(psi_threshold=0.5))  # thresholds may change
    assert looser.config.psi_threshold == 0.5
    with pytest.raises(IncompatibleDriftState, match="window"):
        DriftMonitor.from_bytes(data, config(window=1000))
    with pytest.raises(IncompatibleDriftState, match="not UTF-8 JSON"):
        DriftMonitor.from_bytes(b"not a state")
    with pytest.raises(IncompatibleDriftState, match="field window_rows"):
        DriftMonitor.from_bytes(data.replace(b'"window_rows":[]', b'"window_rows":"x"'))


def test_reset_on_new_model_version_adopts_new_baseline(baseline):
    X, score, _ = make_stream(40_000, seed=12, zscore_shift_at=0, zscore_shift=1.0)
    monitor = DriftMonitor(config(cooldown_events=0, cooldown_s=0), baseline, "fraud", 1)
    found = run(monitor, X, score, 0, 4000)
    assert found[0][0] == 1999  # warm-up ends with the first window
    assert monitor.should_request_retrain([harm()], now_ms=0) is not None
    # The retrained model's baseline comes from shifted data: the shift is now normal.
    new_baseline = compute_baseline(X[:20_000], NAMES, score[:20_000], categorical_features=CATEGORICAL)
    monitor.reset(new_baseline, 2)
    assert (monitor.model_version, monitor.predictions_seen, monitor.windows_completed) == (2, 0, 0)
    assert not monitor.in_cooldown(now_ms=0)
    assert run(monitor, X, score, 20_000) == []


def test_warm_up_suppresses_alarms(baseline):
    X, score, _ = make_stream(10_000, seed=13, zscore_shift_at=0)
    monitor = DriftMonitor(config(min_events=6000), baseline, "fraud", 1)
    found = run(monitor, X, score)
    assert found[0][0] == 5999


def test_config_from_settings_and_validation():
    cfg = DriftConfig.from_settings(Settings())
    assert cfg.detectors == {"windowed", "performance", "estimated"}
    assert cfg.min_positives == Settings().drift_min_positives and cfg.persist_windows == 2
    assert cfg.features == () and cfg.window == Settings().drift_window
    custom = DriftConfig.from_settings(Settings(drift_detectors="windowed", drift_features="score, amount"))
    assert custom.detectors == {"windowed"} and custom.features == ("score", "amount")
    with pytest.raises(ValueError, match="kswin"):
        DriftConfig(detectors=frozenset({"kswin"}))


def test_unknown_feature_in_config_is_named(baseline):
    with pytest.raises(ValueError, match="'nope'"):
        DriftMonitor(config(features=("amount", "nope")), baseline, "fraud", 1)


def test_psi_bins_from_quantiles_and_exact_histogram():
    rng = np.random.default_rng(14)
    values = rng.normal(size=100_000)
    levels = ("0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99")
    quantiles = {lv: float(np.quantile(values, float(lv))) for lv in levels}
    edges, fractions = quantile_bins(quantiles)
    assert fractions.tolist() == pytest.approx([0.01, 0.04, 0.2, 0.25, 0.25, 0.2, 0.04, 0.01])
    exact = histogram_bins(values, quantiles)
    assert exact["fractions"] == pytest.approx(fractions.tolist(), abs=1e-3)
    assert psi(fractions, fractions) == 0.0
    assert psi(np.array([0.5, 0.5]), np.array([0.9, 0.1])) == pytest.approx(0.4 * math.log(0.5 / 0.1) - 0.4 * math.log(0.5 / 0.9))


def test_exact_bins_in_baseline_enable_psi_on_integer_features(baseline):
    X, score, _ = make_stream(20_000, seed=15)
    with_bins = {k: dict(v) for k, v in baseline.items()}
    X_train, _, _ = make_stream(40_000, seed=1)
    with_bins["count_1h"]["bins"] = histogram_bins(X_train[:, 1], baseline["count_1h"]["quantiles"])
    X[10_000:, 1] = np.random.default_rng(16).poisson(2.0, 10_000)
    monitor = DriftMonitor(config(), with_bins, "fraud", 1)
    found = run(monitor, X, score)
    assert found[0][0] == 11_999
    assert {(s.detector, s.feature) for i, s in found if i == 11_999} >= {("psi", "count_1h")}
    psi_stats = [s for s in monitor.snapshot() if s.statistic == "psi" and s.feature == "count_1h"]
    assert psi_stats and psi_stats[0].value > 0.25


def test_chosen_features_are_monitored_with_the_score_last(baseline):
    monitor = DriftMonitor(config(features=("score", "count_1h")), baseline, "fraud", 1)
    assert monitor.monitored == ("count_1h", "score")
    X, score, _ = make_stream(6000, seed=17, score_shift_at=2000)
    found = run(monitor, X, score)
    assert found and {s.feature for _, s in found} == {"score"}


# --- round 3: sliding estimate, expected log loss, recent half of the label window ----------------

def _first_harm(monitor, X, score):
    return next(((i, s) for i, s in run(monitor, X, score) if s.harm), (None, None))


def test_the_estimate_slides_so_persistent_evidence_is_reached_a_step_after_the_first_full_window(monitored_baseline):
    # the scores shift at a window boundary (20,000): the estimated AUC fires on every window that is
    # mostly shifted; sliding every 1,000 events, the second firing evaluation comes 1,000 events after
    # the first full window instead of a whole window later
    X, score, _ = make_stream(30_000, seed=12, score_shift_at=20_000)
    sliding, _ = _first_harm(DriftMonitor(config(estimate_every=1000), monitored_baseline, "fraud", 1), X, score)
    tumbling, _ = _first_harm(DriftMonitor(config(estimate_every=WINDOW), monitored_baseline, "fraud", 1), X, score)
    assert tumbling == 20_000 + 2 * WINDOW - 1
    assert sliding == tumbling - 1000


def test_the_sliding_estimate_stays_quiet_on_a_healthy_stream(monitored_baseline):
    X, score, _ = make_stream(50_000, seed=2)
    monitor = DriftMonitor(config(estimate_every=500), monitored_baseline, "fraud", 1)
    assert [s for _, s in run(monitor, X, score) if s.feature is None] == []


def test_a_restored_monitor_slides_on_identically(monitored_baseline):
    X, score, _ = make_stream(30_000, seed=12, score_shift_at=20_000)
    straight = DriftMonitor(config(), monitored_baseline, "fraud", 1)
    restored = DriftMonitor(config(), monitored_baseline, "fraud", 1)
    cut = 20_500  # mid-window: the next sliding evaluation needs the previous window's tail
    assert run(straight, X, score, 0, cut) == run(restored, X, score, 0, cut)
    restored = DriftMonitor.from_bytes(restored.to_bytes(), config())
    after = run(straight, X, score, cut)
    assert after and run(restored, X, score, cut) == after


def _amplified(factor=4.0):
    """Scores of the later part x4: ranking kept (the estimated AUC moves less than its threshold), many
    events moved to scores the calibration calls uncertain (the expected log loss x2.4)."""
    X, score, _ = make_stream(30_000, seed=12)
    score = score.copy()
    score[20_000:] = np.minimum(0.9, factor * score[20_000:])
    return X, score


def test_a_rise_of_the_expected_log_loss_is_evidence_of_harm_without_labels(monitored_baseline):
    X, score = _amplified()
    monitor = DriftMonitor(config(estimated_logloss_ratio_threshold=2.0), monitored_baseline, "fraud", 1)
    found = [(i, s) for i, s in run(monitor, X, score) if s.feature is None]
    assert found and all(i >= 20_000 for i, _ in found)
    assert {s.detector for _, s in found} == {"estimated_logloss_ratio"}  # the AUC estimate stays within
    first_harm = next(s for _, s in found if s.harm)
    assert first_harm.harm == "estimated" and first_harm.value > 2.0
    assert first_harm.baseline == pytest.approx(monitored_baseline[MONITORING_KEY]["chunks"]["log_loss_estimate"])
    assert "expected log loss" in monitor.evidence()


def test_the_expected_log_loss_threshold_is_never_below_the_healthy_chunks(monitored_baseline):
    X, score = _amplified()
    reference = dict(monitored_baseline[MONITORING_KEY])
    chunks = dict(reference["chunks"])
    chunks["log_loss_estimate_worst"] = 2.0 * chunks["log_loss_estimate"]  # a holdout chunk already at x2
    lifted = {**monitored_baseline, MONITORING_KEY: {**reference, "chunks": chunks}}
    monitor = DriftMonitor(config(estimated_logloss_ratio_threshold=2.0), lifted, "fraud", 1)
    assert not [s for _, s in run(monitor, X, score) if s.detector == "estimated_logloss_ratio"]
    # a model registered before the expected log loss was stored: no such test, nothing else changes
    older = {**monitored_baseline, MONITORING_KEY: {**reference, "chunks": {
        k: v for k, v in reference["chunks"].items() if not k.startswith("log_loss_estimate")}}}
    monitor = DriftMonitor(config(estimated_logloss_ratio_threshold=2.0), older, "fraud", 1)
    assert not [s for _, s in run(monitor, X, score) if s.feature is None]


def _degrading_regression(at=6000, n=12_000, factor=1.3):
    """Predictions with |error| ~ 8; from label `at` on the errors are `factor` x larger."""
    rng = np.random.default_rng(8)
    predictions = rng.normal(100.0, 20.0, n)
    noise = rng.normal(0.0, 10.0, n)
    noise[at:] *= factor
    return predictions, predictions + noise, {"mae": float(np.mean(np.abs(noise[:at])))}


def _feed_labels(monitor, predictions, labels, request=False):
    found = []
    for i, (p, y) in enumerate(zip(predictions.tolist(), labels.tolist())):
        signals = monitor.update_label(p, y, i)
        if request:
            chosen = monitor.should_request_retrain(signals, now_ms=i)
            found += [(i, chosen)] if chosen is not None else []
        else:
            found += [(i, s) for s in signals if s.harm]
    return found


def test_the_recent_half_of_the_label_window_sees_a_shift_first(baseline):
    predictions, labels, reference = _degrading_regression()
    monitor = DriftMonitor(config(perf_window=2000, detectors={"performance"}), baseline, "eta", 1,
                           reference_metrics=reference, objective="regression")
    found = _feed_labels(monitor, predictions, labels)
    assert found and found[0][0] >= 6000
    first_index, first = found[0]
    assert first.window == 1000 and first.detector == "mae_ratio" and first.harm == "measured"
    whole = [i for i, s in found if s.window == 2000]
    assert whole and whole[0] > first_index  # the whole window follows once enough of it has shifted
    replay = DriftMonitor(config(perf_window=2000, detectors={"performance"}), baseline, "eta", 1,
                          reference_metrics=reference, objective="regression")
    _feed_labels(replay, predictions[:first_index + 1], labels[:first_index + 1])
    assert "recent 1000 labels: mae" in replay.evidence()  # a request cites both figures
    # no shift: neither half fires
    predictions, labels, reference = _degrading_regression(factor=1.0, n=30_000)
    monitor = DriftMonitor(config(perf_window=2000, detectors={"performance"}), baseline, "eta", 1,
                           reference_metrics=reference, objective="regression")
    assert _feed_labels(monitor, predictions, labels) == []


def test_a_request_cited_by_the_recent_half_does_not_break_through_while_the_shift_lasts(baseline):
    predictions, labels, reference = _degrading_regression(n=20_000)
    monitor = DriftMonitor(config(perf_window=2000, detectors={"performance"}, cooldown_events=10**6,
                                  cooldown_s=10**6, min_events=0), baseline, "eta", 1, reference_metrics=reference,
                           objective="regression")  # labels only: no warm-up to wait for
    requests = _feed_labels(monitor, predictions, labels, request=True)
    # while the checks after the request still see pre-change labels in the whole window, the recent
    # half keeps the evidence present: one request for one shift
    assert len(requests) == 1 and requests[0][1].window == 1000


def _daily_errors(dip: int, n: int = 14_000):
    """Predictions with |error| ~ 8, x1.5 from label 6000 on except for `dip` labels from 9000 (a model whose
    error follows the day: the rides demo's v2 was within its holdout's MAE at night only)."""
    rng = np.random.default_rng(9)
    predictions = rng.normal(100.0, 20.0, n)
    noise = rng.normal(0.0, 10.0, n)
    factor = np.ones(n)
    factor[6000:] = 1.5
    factor[9000:9000 + dip] = 1.0
    return predictions, predictions + noise * factor, {"mae": float(np.mean(np.abs(noise[:6000])))}


@pytest.mark.parametrize("dip, requests", [(1300, 1), (3000, 2)])
def test_measured_evidence_clears_only_once_a_whole_label_window_stayed_below_half(baseline, dip, requests):
    # Measured checks come every tenth of the label window, so 3 consecutive quiet checks are mostly the
    # same labels. A dip shorter than a label window (the night) is the same shift: no breakthrough; once
    # a whole window of new labels stayed below half the threshold, the next rise is a new shift.
    predictions, labels, reference = _daily_errors(dip)
    monitor = DriftMonitor(config(perf_window=1000, detectors={"performance"}, cooldown_events=10**6,
                                  cooldown_s=10**6, clear_windows=3, min_events=0), baseline, "eta", 1,
                           reference_metrics=reference, objective="regression")  # labels only: no warm-up
    found = _feed_labels(monitor, predictions, labels, request=True)
    assert len(found) == requests and 6000 <= found[0][0] < 7000
    assert ["cool-down breakthrough" in s.reason for _, s in found] == [False] + [True] * (requests - 1)
    if requests == 2:
        assert found[1][0] > 9000 + dip
