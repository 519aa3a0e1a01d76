"""What a feature spec declares, as plain frozen dataclasses (built and checked by spec.loader).

The field layout of the user's records comes from their Avro schemas (avro.layout); the spec
names which fields are the event id, the entity key and the event time, and declares features
over the others. `FeatureSpec.feature_set` is the identity of the feature definitions: it is
stored with every prediction and every model version, and a scorer refuses a model of another.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamscore.avro.layout import RecordLayout

FORMAT = 1  # the spec file format this code reads

AGGREGATES = ("count", "sum", "mean", "std", "min", "max", "distinct_count", "last", "time_since_previous")
TRANSFORMS = ("log1p", "hour_of_day", "day_of_week", "ratio", "zscore")
ENCODINGS = ("vocabulary", "learned")
# ratio's denominator: an aggregate of the same field over a window
RATIO_AGGREGATES = ("mean", "sum", "min", "max", "last")

LABEL_KINDS = {"binary": "binary", "numeric": "regression"}  # label kind -> model objective

NULL_CODE = 0  # categorical codes: null or empty string
UNKNOWN_CODE = 1  # a value outside the vocabulary (a learned one: not seen often enough in training)
FIRST_VOCABULARY_CODE = 2


@dataclass(frozen=True)
class Feature:
    """One model input, in model order. `kind` is "field", "aggregate", "transform" or "encode"; `op` the
    aggregate, transform or encoding (for "field": "value")."""

    name: str
    kind: str
    op: str
    field: str | None = None
    window_ms: int | None = None
    of: str | None = None  # ratio: the aggregate (over `window_ms` of `field`) it divides by
    values: tuple[str, ...] = ()  # vocabulary: the fixed values, codes 2.. in this order
    max_size: int = 0  # learned: at most this many values
    min_count: int = 1  # learned: values seen fewer times in training are unknown

    @property
    def is_categorical(self) -> bool:
        return self.kind == "encode"

    @property
    def is_learned(self) -> bool:
        return self.kind == "encode" and self.op == "learned"

    def definition(self) -> dict[str, Any]:
        """What the feature computes, for the feature-set hash (names included: they are model inputs)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "op": self.op}
        for key in ("field", "window_ms", "of"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.op == "vocabulary":
            out["values"] = list(self.values)
        if self.op == "learned":
            out["max_size"], out["min_count"] = self.max_size, self.min_count
        return out


@dataclass(frozen=True)
class FieldCheck:
    """Validation of one input field; every failure dead-letters the event with a reason naming the field."""

    field: str
    required: bool = False
    finite: bool = False
    min: float | None = None
    max: float | None = None
    allowed: tuple[str, ...] | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class RecordSpec:
    """A user record on a topic: its schema (file, layout, expanded JSON) and older writer schemas."""

    schema_path: Path
    history_dir: Path | None
    topic: str
    layout: RecordLayout = field(repr=False)
    schema: dict = field(repr=False)


@dataclass(frozen=True)
class EventSpec(RecordSpec):
    id_field: str = ""
    entity_field: str = ""
    time_field: str = ""
    time_divisor: int = 1  # 1000 when the time field is timestamp-micros: every time in the engine is ms


@dataclass(frozen=True)
class LabelSpec(RecordSpec):
    id_field: str = ""
    value_field: str = ""
    time_field: str | None = None
    entity_field: str | None = None
    kind: str = "binary"

    @property
    def objective(self) -> str:
        return LABEL_KINDS[self.kind]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: dict = field(default_factory=dict)  # LightGBM parameters over streamscore's defaults


@dataclass(frozen=True)
class FeatureSpec:
    """A loaded, validated feature spec (see spec.loader for the file format and its reference)."""

    path: Path
    name: str
    version: int
    description: str
    event: EventSpec
    label: LabelSpec
    features: tuple[Feature, ...]
    checks: tuple[FieldCheck, ...]
    max_event_age_ms: int
    max_event_future_ms: int
    lateness_ms: int
    model: ModelSpec
    generator: Path | None = None  # examples: a module with the data generator the demo uses

    # --- derived -----------------------------------------------------------------
    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def categorical_features(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if f.is_categorical)

    @property
    def objective(self) -> str:
        return self.label.objective

    @property
    def max_window_ms(self) -> int:
        windows = [f.window_ms for f in self.features if f.window_ms]
        return max(windows, default=0)

    @property
    def retention_ms(self) -> int:
        """How far behind an entity's newest event its state keeps events: the lateness plus the longest window
        is exactly what every non-late event's windows need."""
        return self.lateness_ms + self.max_window_ms

    @property
    def history_ms(self) -> int:
        """How much event time before a training window the offline replay needs so its first events' features
        are exact (the same span the online state retains)."""
        return self.retention_ms

    def feature_set_description(self) -> str:
        """Canonical JSON of everything that defines the feature values (the input of `feature_set`)."""
        used = sorted({f.field for f in self.features if f.field} | {self.event.time_field})
        description = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "features": [f.definition() for f in self.features],
            "input_types": {name: self.event.layout.field(name).type for name in used},
            "time_divisor": self.event.time_divisor,
            "lateness_ms": self.lateness_ms,
            "retention_ms": self.retention_ms,
            "codes": {"null": NULL_CODE, "unknown": UNKNOWN_CODE, "first": FIRST_VOCABULARY_CODE},
            "std_ddof": 1,
        }
        return json.dumps(description, sort_keys=True, separators=(",", ":"))

    @property
    def feature_set(self) -> str:
        """The feature-set hash: same definitions, same hash, whatever the file's formatting or comments."""
        return hashlib.sha256(self.feature_set_description().encode()).hexdigest()[:16]
