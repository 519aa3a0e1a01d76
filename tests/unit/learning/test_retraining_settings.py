"""Every training and gate setting is read where docs/configuration.md says: train_and_register with each set
shows its effect (holdout size, threshold policy, rounds, the gate's floor and tolerances, auto shadow)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import example_spec, offline_matrix
from streamscore.dev.simulator import Simulator
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.learning.training_set import TrainingSet
from streamscore.settings import Settings

PAYMENTS = example_spec("payments")


@pytest.fixture(scope="module")
def training_set() -> TrainingSet:
    pairs = list(Simulator(11, n_entities=300).events(5000))
    X = offline_matrix(PAYMENTS, [event for event, _ in pairs])
    y = np.array([label["label"] for _, label in pairs], dtype=float)
    times = np.array([event["event_time"] for event, _ in pairs], dtype=np.int64)
    return TrainingSet(X, y, times, [event["event_id"] for event, _ in pairs], len(pairs))


def train(tmp_path, training_set, name="run", **overrides):
    settings = Settings(**{"model_dir": tmp_path / name, "model_name": "fraud", "train_num_boost_round": 30,
                           **overrides})
    registry = ModelRegistry(settings.registry_dir)
    return registry, train_and_register(None, registry, settings, PAYMENTS, "test", training_set=training_set)


def test_validation_fraction_sets_the_holdout(tmp_path, training_set):
    _, small = train(tmp_path, training_set, "a", train_validation_fraction=0.1)
    _, large = train(tmp_path, training_set, "b", train_validation_fraction=0.4)
    assert small.version.train_rows == 4500 and small.version.metrics["rows"] == 500
    assert large.version.train_rows == 3000 and large.version.metrics["rows"] == 2000


def test_alert_rate_sets_the_threshold_policy(tmp_path, training_set):
    _, f1 = train(tmp_path, training_set, "a")
    _, alerting = train(tmp_path, training_set, "b", train_alert_rate=0.2)
    assert alerting.version.metrics["alert_rate"] == pytest.approx(0.2, abs=0.01)
    assert f1.version.metrics["alert_rate"] != pytest.approx(0.2, abs=0.01)
    assert alerting.version.threshold < f1.version.threshold


def test_num_boost_round_sets_the_model_size(tmp_path, training_set):
    registry, outcome = train(tmp_path, training_set, "a", train_num_boost_round=7)
    assert registry.load_booster("fraud", outcome.version.version).num_trees() == 7


def test_min_auc_is_the_gates_floor(tmp_path, training_set):
    _, passed = train(tmp_path, training_set, "a", gate_min_auc=0.5)
    _, refused = train(tmp_path, training_set, "b", gate_min_auc=0.999)
    assert passed.promoted and not refused.promoted and "below the floor min_auc 0.9990" in refused.gate_reason


def test_max_auc_drop_is_the_gates_tolerance_against_production(tmp_path, training_set):
    registry, first = train(tmp_path, training_set, "a")
    assert first.promoted
    # the same data again: the candidate's AUC equals production's, within any tolerance
    settings = Settings(model_dir=tmp_path / "a", model_name="fraud", train_num_boost_round=3,
                        gate_max_auc_drop=0.0)
    weaker = train_and_register(None, registry, settings, PAYMENTS, "fewer rounds", training_set=training_set)
    drop = first.version.metrics["auc"] - weaker.version.metrics["auc"]
    assert drop > 0 and not weaker.promoted and f"max drop {0:.4f}" in weaker.gate_reason
    tolerant = settings.model_copy(update={"gate_max_auc_drop": drop + 0.01})
    again = train_and_register(None, registry, tolerant, PAYMENTS, "fewer rounds", training_set=training_set)
    assert again.promoted


def test_auto_shadow_puts_a_passing_candidate_in_shadow_instead_of_production(tmp_path, training_set):
    registry, first = train(tmp_path, training_set, "a", rollout_auto_shadow=True)
    assert first.promoted and not first.shadowed  # nothing to compare with: straight to production
    settings = Settings(model_dir=tmp_path / "a", model_name="fraud", train_num_boost_round=30,
                        rollout_auto_shadow=True)
    second = train_and_register(None, registry, settings, PAYMENTS, "again", training_set=training_set)
    assert second.shadowed and not second.promoted
    assert [e["action"] for e in second.events] == ["register", "shadow"]
    rollout = registry.rollout("fraud")
    assert (rollout.production, rollout.shadows) == (1, (2,))
