"""Staged rollouts in the registry (shadow, canary, promote, reject, rollback with evidence), the online gate's
verdicts for both objectives, and the retrain schedule."""
from __future__ import annotations

import lightgbm
import numpy as np
import pytest

from streamscore.learning.registry import ModelRegistry, RegistryError, model_versions_row
from streamscore.learning.retrain_requests import (RetrainSchedule, parse_retrain_reason, retrain_reason,
                                                   scheduled_request)
from streamscore.drift.reference import fit_calibration, fit_loss_model
from streamscore.learning.rollout import OnlineComparison, judge, judge_estimates
from streamscore.settings import Settings

MODEL = "fraud"
FEATURES = ["amount", "count_1h", "mcc_code"]
HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def booster() -> lightgbm.Booster:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=300), rng.poisson(2, 300), rng.integers(0, 5, 300)]).astype(float)
    y = (X[:, 0] > 0.5).astype(float)
    return lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                          lightgbm.Dataset(X, y, feature_name=FEATURES), num_boost_round=3)


def registry_with(tmp_path, booster, versions: int = 3) -> ModelRegistry:
    registry = ModelRegistry(tmp_path)
    for _ in range(versions):
        registry.register(MODEL, booster, feature_set="fs", feature_names=FEATURES, train_rows=300,
                          metrics={"auc": 0.8}, baseline={}, threshold=0.5, reason="test")
    registry.promote(MODEL, 1, reason="first")
    return registry


def test_shadow_canary_promote_move_a_version_through_the_stages(tmp_path, booster):
    registry = registry_with(tmp_path, booster)
    registry.shadow(MODEL, 2, reason="try it")
    registry.shadow(MODEL, 3)
    rollout = registry.rollout(MODEL)
    assert (rollout.production, rollout.canary, rollout.shadows) == (1, None, (2, 3))
    with pytest.raises(RegistryError, match="already in shadow"):
        registry.shadow(MODEL, 2)
    with pytest.raises(RegistryError, match="in production"):
        registry.shadow(MODEL, 1)

    update = registry.canary(MODEL, 2, 0.05, reason="online gate passed", evidence={"labelled": 1200, "auc": 0.91})
    assert update.event["action"] == "canary" and update.event["stage"] == "canary"
    assert update.event["evidence"] == {"labelled": 1200.0, "auc": 0.91, "canary_share": 0.05}
    assert registry.rollout(MODEL).canary == 2 and registry.rollout(MODEL).shadows == (3,)
    with pytest.raises(RegistryError, match="is the canary"):
        registry.canary(MODEL, 3, 0.1)
    registry.canary(MODEL, 2, 0.25)  # raise the share
    assert registry.rollout(MODEL).canary_share == 0.25
    assert registry.stage_started_at(MODEL, 2, "canary") == registry.stages(MODEL)["history"][-1]["at"]

    registry.promote(MODEL, 2, reason="canary healthy", evidence={"labelled": 1500})
    rollout = registry.rollout(MODEL)
    assert (rollout.production, rollout.canary, rollout.shadows) == (2, None, (3,))
    registry.reject(MODEL, 3, "worse online", evidence={"auc": 0.6, "production_auc": 0.9})
    assert registry.rollout(MODEL).shadows == ()
    # the promotion from a canary is an ordinary promote: rollback returns to v1
    assert registry.rollback(MODEL).model_version.version == 1


def test_a_canary_rollback_ends_the_canary_not_production(tmp_path, booster):
    registry = registry_with(tmp_path, booster)
    registry.promote(MODEL, 2)
    registry.canary(MODEL, 3, 0.1)
    update = registry.rollback_canary(MODEL, reason="unhealthy", evidence={"auc": 0.55})
    assert (update.event["action"], update.event["stage"], update.event["version"]) == ("rollback", "canary", 3)
    rollout = registry.rollout(MODEL)
    assert (rollout.production, rollout.canary) == (2, None)
    # a canary rollback is not a production rollback: the production chain is still 1 -> 2
    assert registry.rollback(MODEL).model_version.version == 1
    with pytest.raises(RegistryError, match="no canary"):
        registry.rollback_canary(MODEL)


def test_canary_needs_production_and_a_share_between_0_and_1(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    registry.register(MODEL, booster, feature_set="fs", feature_names=FEATURES, train_rows=1, metrics={},
                      baseline={}, threshold=None)
    with pytest.raises(RegistryError, match="no production version"):
        registry.canary(MODEL, 1, 0.1)
    registry = registry_with(tmp_path / "other", booster)
    for share in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="canary share"):
            registry.canary(MODEL, 2, share)


def test_evidence_reaches_the_model_versions_row(tmp_path, booster):
    registry = registry_with(tmp_path, booster)
    update = registry.shadow(MODEL, 2, evidence={"labelled": 10})
    row = model_versions_row(update.model_version, update.event)
    assert row["metrics"] == {"auc": 0.8, "online.labelled": 10.0}
    assert (row["action"], row["stage"]) == ("shadow", "shadow")
    with pytest.raises(ValueError, match="evidence"):
        registry.reject(MODEL, 2, "x", evidence={"auc": float("nan")})


def comparison(labels, production, candidate) -> OnlineComparison:
    return OnlineComparison(1, 2, np.asarray(labels, float), np.asarray(production, float),
                            np.asarray(candidate, float))


def test_the_online_gate_waits_for_enough_labelled_events_then_uses_the_gate_settings():
    rng = np.random.default_rng(1)
    y = (rng.random(3000) < 0.3).astype(float)
    good = np.clip(y * 0.6 + rng.random(3000) * 0.5, 0, 1)  # AUC ~0.95
    noisy = np.clip(y * 0.2 + rng.random(3000) * 0.8, 0, 1)  # AUC ~0.7
    settings = Settings(rollout_min_labelled=3001)
    assert not judge(comparison(y, good, good), "binary", settings).decided
    settings = Settings(rollout_min_labelled=3000)
    same = judge(comparison(y, good, good), "binary", settings)
    assert same.decided and same.passed and same.evidence["labelled"] == 3000
    assert same.evidence["auc"] == same.evidence["production_auc"] and "log_loss" in same.evidence
    worse = judge(comparison(y, good, noisy), "binary", settings)
    assert worse.decided and not worse.passed and "below production" in worse.reason
    # the tolerance is STREAMSCORE_GATE_MAX_AUC_DROP: wide enough, the worse candidate passes
    drop = worse.evidence["production_auc"] - worse.evidence["auc"]
    assert judge(comparison(y, good, noisy), "binary", Settings(rollout_min_labelled=10,
                                                               gate_max_auc_drop=drop + 0.01)).passed
    # and the floor is STREAMSCORE_GATE_MIN_AUC
    assert judge(comparison(y, noisy, noisy), "binary", Settings(rollout_min_labelled=10, gate_min_auc=0.5)).passed
    assert not judge(comparison(y, noisy, noisy), "binary", Settings(rollout_min_labelled=10, gate_min_auc=0.99)).passed
    one_class = judge(comparison(np.zeros(3000), good, good), "binary", settings)
    assert not one_class.decided and "one class" in one_class.reason


def test_the_online_gate_of_a_regression_compares_rmse_with_its_tolerance():
    rng = np.random.default_rng(2)
    y = rng.normal(100, 20, 2000)
    production = y + rng.normal(0, 10, 2000)
    slightly_worse = y + rng.normal(0, 10.5, 2000)
    settings = Settings(rollout_min_labelled=2000, gate_max_rmse_increase=0.0)
    verdict = judge(comparison(y, production, production * 0 + y + rng.normal(0, 20, 2000)), "regression", settings)
    assert verdict.decided and not verdict.passed
    assert set(verdict.evidence) == {"labelled", "rmse", "production_rmse", "mae", "production_mae"}
    close = judge(comparison(y, production, slightly_worse), "regression", settings)
    ratio = close.evidence["rmse"] / close.evidence["production_rmse"]
    assert close.passed == (ratio <= 1.0)
    tolerant = Settings(rollout_min_labelled=2000, gate_max_rmse_increase=ratio - 1 + 0.01)
    assert judge(comparison(y, production, slightly_worse), "regression", tolerant).passed


def test_before_labels_a_candidate_expecting_to_be_clearly_worse_is_failed_and_none_is_passed():
    rng = np.random.default_rng(3)
    y = (rng.random(4000) < 0.3).astype(float)
    good = np.clip(y * 0.6 + rng.random(4000) * 0.4, 0, 1)  # its holdout: confident and right
    shuffled = rng.permutation(y)  # a model trained on shuffled labels: its calibration is the base rate
    useless = rng.random(4000)
    good_ref, useless_ref = {"calibration": fit_calibration(good, y)}, {"calibration": fit_calibration(useless, shuffled)}
    live_good, live_useless = np.clip(rng.random(3000) * 0.4 + (rng.random(3000) < 0.3) * 0.6, 0, 1), rng.random(3000)
    settings = Settings(rollout_min_labelled=2000)

    worse = judge_estimates(live_good, live_useless, good_ref, useless_ref, "binary", settings, "v2 vs v1")
    assert worse.decided and not worse.passed and "clearly worse" in worse.reason
    assert worse.evidence["production_estimated_auc"] - worse.evidence["estimated_auc"] > 0.3
    same = judge_estimates(live_good, live_good, good_ref, good_ref, "binary", settings, "v2 vs v1")
    assert not same.decided and not same.passed  # the estimate never promotes
    # STREAMSCORE_DRIFT_ESTIMATED_AUC_DROP_THRESHOLD is the tolerance
    drop = worse.evidence["production_estimated_auc"] - worse.evidence["estimated_auc"]
    assert not judge_estimates(live_good, live_useless, good_ref, useless_ref, "binary",
                               Settings(rollout_min_labelled=2000, drift_estimated_auc_drop_threshold=drop + 0.01),
                               "v2 vs v1").decided
    assert not judge_estimates(live_good, live_useless, good_ref, useless_ref, "binary",
                               Settings(rollout_min_labelled=3001), "v2 vs v1").decided  # too few events
    assert not judge_estimates(live_good, live_useless, good_ref, {}, "binary", settings, "v2 vs v1").decided


def test_before_labels_a_regression_candidate_expecting_a_much_larger_error_is_failed():
    rng = np.random.default_rng(4)
    y = rng.normal(100, 20, 3000)
    tight, loose = fit_loss_model(y + rng.normal(0, 5, 3000), y), fit_loss_model(y + rng.normal(0, 30, 3000), y)
    live = rng.normal(100, 20, 2500)
    settings = Settings(rollout_min_labelled=2000)
    worse = judge_estimates(live, live, {"loss_model": tight}, {"loss_model": loose}, "regression", settings, "v2")
    assert worse.decided and not worse.passed
    assert worse.evidence["estimated_mae"] > 1.2 * worse.evidence["production_estimated_mae"]
    assert not judge_estimates(live, live, {"loss_model": tight}, {"loss_model": tight}, "regression", settings,
                               "v2").decided


def test_the_schedule_fires_once_per_boundary_of_event_time():
    schedule = RetrainSchedule(6)
    start = 1_767_225_600_000  # 2026-01-01 00:00 UTC, a multiple of 6 h
    assert schedule.due(start + 5 * HOUR_MS) is None  # starts counting here
    assert schedule.due(start + 5.9 * HOUR_MS) is None
    assert schedule.due(start + 6 * HOUR_MS) == start + 6 * HOUR_MS
    assert schedule.due(start + 7 * HOUR_MS) is None
    assert schedule.due(start + 30 * HOUR_MS) == start + 30 * HOUR_MS  # one request after a gap, not four
    assert schedule.due(None) is None
    with pytest.raises(ValueError, match="RETRAIN_EVERY_HOURS"):
        RetrainSchedule(0)


def test_the_schedule_resumes_after_the_last_scheduled_retrain_the_registry_records(tmp_path, booster):
    boundary = 1_767_225_600_000 + 24 * HOUR_MS
    request = scheduled_request(MODEL, 1, boundary, 24)
    assert request["request_id"] == f"{MODEL}-schedule-{boundary}"
    assert parse_retrain_reason(retrain_reason(request)).detector == "schedule"
    registry = registry_with(tmp_path, booster)
    registry.register(MODEL, booster, feature_set="fs", feature_names=FEATURES, train_rows=1, metrics={},
                      baseline={}, threshold=None, reason=retrain_reason(request))
    schedule = RetrainSchedule.from_registry(24, registry, MODEL)
    assert schedule.last_boundary_ms == boundary
    assert schedule.due(boundary + 23 * HOUR_MS) is None
    assert schedule.due(boundary + 24 * HOUR_MS) == boundary + 24 * HOUR_MS


def test_canary_shares_setting_is_checked_and_parsed():
    assert Settings(rollout_canary_shares="0.05, 0.25,0.5").canary_shares == (0.05, 0.25, 0.5)
    assert Settings(rollout_canary_shares="").canary_shares == ()
    for bad, message in (("0.5,0.25", "must increase"), ("0,0.5", "between 0 and 1"), ("x", "not a number")):
        with pytest.raises(ValueError, match=message):
            Settings(rollout_canary_shares=bad)
