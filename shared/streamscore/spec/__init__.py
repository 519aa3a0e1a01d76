"""Feature specs: the file a team writes (loader), what it declares (model), the compiled engine (engine),
its reference interpreter (oracle) and text handling (text). `resolve` pairs a Settings with its spec."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from streamscore.spec.loader import SpecError, load_spec
from streamscore.spec.model import FeatureSpec

__all__ = ["FeatureSpec", "SpecError", "default_spec_path", "load_spec", "resolve"]


def default_spec_path() -> Path:
    """The payments example's spec, installed with the package: the spec when STREAMSCORE_SPEC is unset."""
    return Path(str(files("streamscore.examples") / "payments" / "spec.yaml"))


def resolve(settings):
    """(settings, spec): the spec STREAMSCORE_SPEC names (the payments example when unset), and the settings
    with the spec's model name when STREAMSCORE_MODEL_NAME is unset."""
    spec = load_spec(settings.spec or default_spec_path())
    if settings.model_name is None:
        settings = settings.model_copy(update={"model_name": spec.model.name})
    return settings, spec
