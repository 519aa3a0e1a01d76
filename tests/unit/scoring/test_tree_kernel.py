"""TreeKernel (the scorer's compiled LightGBM predictor) must give exactly booster.predict's numbers,
bit for bit, on typical and adversarial inputs; models it does not reproduce get no kernel."""
from __future__ import annotations

import math

import lightgbm
import numpy as np
import pytest


from streamscore.learning import training
from streamscore.scoring.served_model import ServedModel
from streamscore.dev.simulator import Simulator
from streamscore.scoring.tree_kernel import TreeKernel
from tests.conftest import example_spec, offline_matrix

PAYMENTS = example_spec("payments")


@pytest.fixture(scope="module")
def simulated():
    pairs = list(Simulator(21, n_entities=300).events(6000))
    matrix = offline_matrix(PAYMENTS, [event for event, _ in pairs])
    labels = np.array([label["label"] for _, label in pairs])
    return matrix, labels


def train(matrix, labels, rounds=60, **params):
    return training.train_model(matrix, labels, PAYMENTS.feature_names, PAYMENTS.categorical_features,
                                num_boost_round=rounds, params=params or None).booster


def adversarial(matrix: np.ndarray, seed: int) -> np.ndarray:
    """Rows of `matrix` with cells replaced by NaN, +-0, tiny (below LightGBM's zero threshold), negative,
    huge and non-integral values (categorical columns included)."""
    rng = np.random.default_rng(seed)
    out = matrix[rng.integers(0, len(matrix), size=3000)].copy()
    specials = np.array([math.nan, 0.0, -0.0, 1e-36, -1e-36, 1e-30, -1.0, -0.5, 0.5, 2.5, 1e300, -1e300,
                         math.inf, -math.inf, 2**31, -(2**31) - 1.0, 3e9])
    mask = rng.random(out.shape) < 0.3
    out[mask] = rng.choice(specials, size=int(mask.sum()))
    return out


def assert_same(kernel: TreeKernel, booster, matrix: np.ndarray) -> None:
    expected = booster.predict(matrix, num_threads=1)
    got = kernel.predict(matrix)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected, equal_nan=True), int((got != expected).sum())


def test_the_scorers_model_is_reproduced_bit_for_bit(simulated):
    matrix, labels = simulated
    booster = train(matrix, labels, rounds=200)
    kernel = TreeKernel.for_booster(booster)
    assert kernel is not None
    assert_same(kernel, booster, matrix)
    assert_same(kernel, booster, adversarial(matrix, seed=1))
    assert_same(kernel, booster, kernel.probe_matrix(5000, seed=7))
    for batch in (matrix[:1], matrix[:7], matrix[:0]):  # small and empty batches
        assert_same(kernel, booster, batch)


@pytest.mark.parametrize("params", [
    {"zero_as_missing": True},  # missing type Zero
    {"use_missing": False},  # missing type None
    {"max_cat_to_onehot": 64, "num_leaves": 7},  # one-vs-rest categorical splits, shallow trees
    {"num_leaves": 2},
])
def test_missing_value_and_categorical_variants(simulated, params):
    matrix, labels = simulated
    holes = matrix.copy()
    holes[np.random.default_rng(3).random(holes.shape) < 0.2] = math.nan  # NaN in training: NaN missing type
    booster = train(holes, labels, **params)
    kernel = TreeKernel.for_booster(booster)
    assert kernel is not None
    assert_same(kernel, booster, adversarial(matrix, seed=2))


def test_regression_models_predict_exactly_like_lightgbm(simulated):
    """The raw score is the output (no sigmoid); categorical splits and NaN holes included."""
    matrix, labels = simulated
    target = matrix[:, 0] * 0.1 + labels * 3.0  # a numeric label
    holes = matrix.copy()
    holes[np.random.default_rng(5).random(holes.shape) < 0.1] = math.nan
    for objective in ("regression", "regression_l1", "huber"):
        booster = lightgbm.train({"objective": objective, "verbose": -1, "num_threads": 1, "min_data_in_leaf": 20},
                                 lightgbm.Dataset(holes, target, categorical_feature=[matrix.shape[1] - 1]),
                                 num_boost_round=30)
        kernel = TreeKernel.for_booster(booster)
        assert kernel is not None, objective
        assert_same(kernel, booster, adversarial(matrix, seed=4))


def test_models_it_does_not_reproduce_get_no_kernel(simulated):
    matrix, labels = simulated
    for params in ({"objective": "poisson"}, {"objective": "multiclass", "num_class": 3},
                   {"objective": "binary", "boosting": "rf", "bagging_freq": 1, "bagging_fraction": 0.5}):
        target = (matrix[:, 0] > 50).astype(int) + labels if params["objective"] == "multiclass" else labels
        booster = lightgbm.train({**params, "verbose": -1, "num_threads": 1},
                                 lightgbm.Dataset(matrix, target), num_boost_round=5)
        assert TreeKernel.for_booster(booster) is None


def test_single_leaf_trees(simulated):
    matrix, labels = simulated
    booster = lightgbm.train({"objective": "binary", "min_data_in_leaf": 10**6, "verbose": -1, "num_threads": 1},
                             lightgbm.Dataset(matrix, labels), num_boost_round=3)
    kernel = TreeKernel.for_booster(booster)
    assert kernel is not None
    assert_same(kernel, booster, matrix[:100])


def test_a_kernel_that_differs_from_the_booster_on_the_probe_is_refused(simulated, monkeypatch):
    matrix, labels = simulated
    booster = train(matrix, labels, rounds=10)
    monkeypatch.setattr(TreeKernel, "predict", lambda self, m: booster.predict(m, num_threads=1) + 1e-16)
    assert TreeKernel.for_booster(booster) is None


def test_served_model_predicts_with_the_kernel_and_without_it(simulated):
    matrix, labels = simulated
    booster = train(matrix, labels, rounds=30)
    with_kernel = ServedModel("m", 1, booster, 0.5, kernel=TreeKernel.for_booster(booster))
    without = ServedModel("m", 1, booster, 0.5)
    assert with_kernel.kernel is not None and with_kernel == without
    assert np.array_equal(with_kernel.predict(matrix), without.predict(matrix))
    assert with_kernel.predict(matrix[:0]) is None and ServedModel("m", 0).predict(matrix) is None
