"""The payments example's data: simulated card traffic with labelled fraud (streamscore.dev.simulator).

Implements the generator protocol of streamscore.dev.generators.
"""
from __future__ import annotations

from streamscore.dev.simulator import DRIFT_KINDS, DriftSpec, Simulator

__all__ = ["DRIFT_KINDS", "make_generator"]


def make_generator(seed: int, n_entities: int, start_ms: int | None = None, drift=None) -> Simulator:
    """`drift`: a streamscore.dev.generators.Drift (kind in DRIFT_KINDS, at_event) or None."""
    kwargs = {} if start_ms is None else {"start_ms": start_ms}
    spec = None if drift is None else DriftSpec(kind=drift.kind, at_event=drift.at_event)
    return Simulator(seed, n_entities=n_entities, drift=spec, **kwargs)
