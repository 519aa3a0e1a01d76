"""A model version ready to serve: its booster, its compiled tree walk, its learned vocabularies.

`load_production_model` refuses a version built for other feature definitions (its feature-set
hash differs from the spec's), so a scorer never feeds a model columns it was not trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamscore.learning.registry import ModelRegistry, ModelVersion, check_feature_set
from streamscore.scoring.tree_kernel import TreeKernel
from streamscore.spec.model import FeatureSpec
from streamscore.spec.text import Vocabulary


@dataclass(frozen=True)
class ServedModel:
    """A model version ready to predict, or the explicit 'no model yet' state (version 0).

    `kernel` (a TreeKernel) predicts exactly like the booster in one compiled loop; without one the booster
    predicts. Either way on one thread. `vocabularies` are the version's learned encodings (feature name ->
    Vocabulary), applied to the feature matrix before it predicts."""

    name: str
    version: int
    booster: object | None = None
    threshold: float | None = None
    kernel: TreeKernel | None = field(default=None, compare=False, repr=False)
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict, compare=False, repr=False)
    objective: str = "binary"

    def predict(self, matrix: np.ndarray) -> np.ndarray | None:
        if self.booster is None or len(matrix) == 0:
            return None
        if self.kernel is not None:
            return self.kernel.predict(matrix)
        return self.booster.predict(matrix, num_threads=1)


def served_model(registry: ModelRegistry, spec: FeatureSpec, version: ModelVersion) -> ServedModel:
    """Load one registered version for serving under `spec` (FeatureSetMismatch if built for another)."""
    check_feature_set(version, spec.feature_set)
    booster = registry.load_booster(version.model_name, version.version)
    # ~0.1 s (the first model of a process ~0.5 s: numba loads the compiled loop); None when unsupported or not exact
    kernel = TreeKernel.for_booster(booster)
    return ServedModel(name=version.model_name, version=version.version, booster=booster,
                       threshold=version.threshold, kernel=kernel,
                       vocabularies={name: Vocabulary(values) for name, values in version.vocabularies.items()},
                       objective=version.objective)


def load_production_model(registry: ModelRegistry, spec: FeatureSpec, model_name: str) -> ServedModel:
    """The registry's production version of `model_name`, or version 0 (no model yet)."""
    version = registry.production(model_name)
    if version is None:
        return ServedModel(name=model_name, version=0, objective=spec.objective)
    return served_model(registry, spec, version)
