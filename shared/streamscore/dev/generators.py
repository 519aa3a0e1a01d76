"""The data generator of a spec's example: what `streamscore demo` and `streamscore simulate` produce.

A spec may name a Python module (`generator: generate.py`, relative to the spec) defining
`make_generator(seed, n_entities, start_ms=None, drift=None)`, which returns an object with

- `events(n)`: n (event, label) pairs in arrival order (label None when the event gets none): dicts of
  the spec's event and label records;
- `expected_span_ms(n)`: about how much event time n events cover;
- `bad_events()`: poison messages (objects with `value`, `reason`, `field`) the scorer must dead-letter;
- an `id_prefix` attribute: its event ids are `<id_prefix><10-digit index>`;

and `DRIFT_KINDS`, the drifts `drift` (a `Drift`) may ask for. The module is loaded by path, so an
example (or a team's own generator) lives beside its spec, outside the package.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from types import ModuleType

from streamscore.spec.model import FeatureSpec

DAY_MS = 86_400_000


class GeneratorError(ValueError):
    """The spec has no usable generator; says what to add."""


@dataclass(frozen=True)
class Drift:
    """A change of the generated stream from event index `at_event` (0-based, arrival order) on."""

    kind: str
    at_event: int


def load_generator(spec: FeatureSpec) -> ModuleType:
    if spec.generator is None:
        raise GeneratorError(f"spec {spec.name!r} ({spec.path}) names no generator: add `generator: generate.py` "
                             "with a make_generator function (see streamscore.dev.generators) to run the demo or "
                             "simulate, or produce your own events to the events topic")
    name = f"streamscore_generator_{spec.name}"
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(spec.generator):
        return loaded
    module_spec = importlib.util.spec_from_file_location(name, spec.generator)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before it runs: dataclasses look their module up there
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise GeneratorError(f"generator {spec.generator} of spec {spec.name!r} failed to load: "
                             f"{type(exc).__name__}: {exc}") from exc
    if not hasattr(module, "make_generator"):
        raise GeneratorError(f"generator {spec.generator} defines no make_generator(seed, n_entities, start_ms, drift)")
    return module


def drift_kinds(spec: FeatureSpec) -> tuple[str, ...]:
    return tuple(getattr(load_generator(spec), "DRIFT_KINDS", ()))


def generator_ending_now(spec: FeatureSpec, seed: int, n_entities: int, n_events: int, drift: Drift | None = None,
                         now_ms: int | None = None):
    """A generator whose first `n_events` all lie at least a minute before now, so none is rejected for being
    in the future. Streams depend on the time of day, so a dry run measures the real end and the start is
    moved back by whole days, which shifts the same stream without changing it."""
    module = load_generator(spec)
    if drift is not None and drift.kind not in getattr(module, "DRIFT_KINDS", ()):
        raise GeneratorError(f"spec {spec.name!r}'s generator has no drift {drift.kind!r}; it has "
                             f"{', '.join(getattr(module, 'DRIFT_KINDS', ())) or 'none'}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    latest_allowed = now_ms - 60_000
    start_ms = latest_allowed - module.make_generator(seed, n_entities).expected_span_ms(n_events)
    probe = module.make_generator(seed, n_entities, start_ms=start_ms, drift=drift)
    time_field = spec.event.time_field
    last = max(event[time_field] for event, _ in probe.events(n_events)) // spec.event.time_divisor
    if last > latest_allowed:
        start_ms -= -(-(last - latest_allowed) // DAY_MS) * DAY_MS
    return module.make_generator(seed, n_entities, start_ms=start_ms, drift=drift)
