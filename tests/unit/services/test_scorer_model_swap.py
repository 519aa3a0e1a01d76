"""The scorer loads a changed rollout off its scoring loop and swaps it in between two batches; a version
that cannot be loaded leaves the current one serving."""
from __future__ import annotations

import time

import lightgbm
import numpy as np
import pytest

from streamscore.learning.registry import ModelRegistry
from streamscore.services.scorer.service import ScorerService
from streamscore.settings import Settings


@pytest.fixture
def scorer_and_registry(tmp_path, payments_spec):
    spec = payments_spec
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, len(spec.feature_names)))
    booster = lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                             lightgbm.Dataset(X, (X[:, 0] > 0).astype(float), feature_name=list(spec.feature_names)),
                             num_boost_round=5)
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "models", model_name=spec.model.name)
    registry = ModelRegistry(settings.registry_dir)
    for _ in range(2):
        registry.register(spec.model.name, booster, feature_set=spec.feature_set,
                          feature_names=list(spec.feature_names), train_rows=400, metrics={"auc": 0.9},
                          baseline={}, threshold=0.5, reason="test")
    scorer = ScorerService(settings, spec=spec)
    scorer.watcher.interval_s = 0.0  # check the registry at every loop turn
    return scorer, registry, spec.model.name


def turn_until(scorer: ScorerService, condition, timeout_s: float = 30.0) -> None:
    """Loop turns (what ScorerService.run does before each batch) until `condition` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the scorer never got there"
        scorer._maybe_swap_model()
        time.sleep(0.01)


def test_a_promoted_version_loads_in_the_background_and_swaps_between_batches(scorer_and_registry):
    scorer, registry, name = scorer_and_registry
    assert scorer.pipeline.model.version == 0
    registry.promote(name, 1, reason="test")
    scorer._maybe_swap_model()
    # the first turn only started the load: the loop goes on scoring with the model it has
    assert scorer._loading is not None and scorer.pipeline.model.version == 0
    turn_until(scorer, lambda: scorer.pipeline.model.version == 1)
    assert scorer.stats.model_version == 1 and scorer.stats.model_swaps == 1 and scorer._loading is None
    try:
        scorer._maybe_swap_model()  # nothing changed: no new load
        assert scorer._loading is None
    finally:
        scorer._loader.shutdown()


def test_a_version_that_fails_to_load_leaves_production_serving(scorer_and_registry):
    scorer, registry, name = scorer_and_registry
    registry.promote(name, 1, reason="test")
    turn_until(scorer, lambda: scorer.pipeline.model.version == 1)
    model_file = registry.root / name / "v2" / "model.txt"
    model_file.write_text(model_file.read_text().replace("tree", "leaf", 3))  # no longer its recorded sha256
    registry.promote(name, 2, reason="test")
    turn_until(scorer, lambda: scorer.stats.errors >= 1)
    try:
        assert scorer.pipeline.model.version == 1 and scorer.stats.model_swaps == 1
    finally:
        scorer._loader.shutdown()
