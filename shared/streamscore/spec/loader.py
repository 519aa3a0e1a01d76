"""Reading a feature spec file (YAML) into a FeatureSpec, with errors that name the file, line and key.

The format is documented, key by key, in docs/spec-reference.md; examples/*/spec.yaml are
complete specs. Schema paths are relative to the spec file. Every problem raises SpecError
with `file:line: key.path: what is wrong (and what is allowed)`; unknown keys are errors (a
typo must not silently drop a check or a feature).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from streamscore.avro.layout import LayoutError, RecordLayout, record_layout
from streamscore.spec.model import (AGGREGATES, ENCODINGS, FORMAT, LABEL_KINDS, RATIO_AGGREGATES, TRANSFORMS,
                                    EventSpec, Feature, FeatureSpec, FieldCheck, LabelSpec, ModelSpec)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # the registry's rule
MIN_WINDOW_MS = 1000
MAX_WINDOW_MS = 366 * 86_400_000
# Columns every predictions row has besides the input fields: an input field may not take their names.
RESERVED_COLUMNS = frozenset({"event_id", "entity_id", "event_time", "scored_at", "logged_at", "model_name",
                              "model_version", "score", "features", "feature_set", "event_partition",
                              "event_offset"})


class SpecError(ValueError):
    """A spec that cannot be used; the message starts with `file:line: key.path:`."""


class _Document:
    """The parsed YAML plus the line of every key, so errors can point at it."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            loader = yaml.SafeLoader(text)
            try:
                node = loader.get_single_node()
                self.data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f"{mark.line + 1}:" if mark is not None else ""
            raise SpecError(f"{path}:{line} not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
        if node is not None:
            self._index(node, ())

    def _index(self, node, path: tuple) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    raise SpecError(f"{self.path}:{key_node.start_mark.line + 1}: {_dotted(path + (key,))}: "
                                    "duplicate key")
                seen.add(key)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self._index(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def error(self, path: tuple, message: str) -> SpecError:
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        line = self.lines.get(probe, 1)
        return SpecError(f"{self.path}:{line}: {_dotted(path) or '(top level)'}: {message}")


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Reader:
    """Typed access to one mapping of the document, refusing unknown keys."""

    def __init__(self, doc: _Document, path: tuple, value: Any, allowed: tuple[str, ...]):
        self.doc, self.path = doc, path
        if not isinstance(value, dict):
            raise doc.error(path, f"must be a mapping with keys {', '.join(allowed)}, got {_kind(value)}")
        self.value = value
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise doc.error(path + (key,), f"unknown key{hint}; allowed here: {', '.join(allowed)}")

    def has(self, key: str) -> bool:
        return key in self.value

    def error(self, key: str | None, message: str) -> SpecError:
        return self.doc.error(self.path + ((key,) if key is not None else ()), message)

    def get(self, key: str, kind: type | tuple, default: Any = ..., what: str = "") -> Any:
        if key not in self.value:
            if default is ...:
                raise self.error(None, f"missing required key {key!r}" + (f" ({what})" if what else ""))
            return default
        value = self.value[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__.replace("str", "string").replace("dict", "mapping")
                                .replace("list", "list") for k in kinds)
            raise self.error(key, f"must be a {names}, got {_kind(value)} {value!r}")
        return value

    def name(self, key: str, default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value is not None and value is not default and not _NAME.match(value):
            raise self.error(key, f"{value!r} is not a valid name (letters, digits, _; not starting with a digit)")
        return value

    def duration(self, key: str, default: Any = ...) -> Any:
        if key not in self.value:
            if default is ...:
                raise self.error(None, f"missing required key {key!r} (a duration such as 15m, 1h or 7d)")
            return default
        return parse_duration(self.value[key], lambda message: self.error(key, message))


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "nothing (null)"}.get(type(value), type(value).__name__)


def parse_duration(value: Any, error=None) -> int:
    """'90s', '15m', '1h', '7d', '2w' (or '500ms') -> milliseconds."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        message = (f"{value!r} is not a duration: a number and a unit, one of ms, s, m (minutes), h, d, w "
                   "(e.g. 15m, 1h, 7d)")
        raise (error(message) if error else ValueError(message))
    return int(round(float(match.group(1)) * _UNIT_MS[match.group(2)]))


def _schema(reader: _Reader, key: str, base: Path) -> tuple[Path, dict, RecordLayout]:
    import json

    from fastavro import parse_schema

    relative = reader.get(key, str)
    path = (base / relative).resolve()
    if not path.is_file():
        raise reader.error(key, f"schema file {relative!r} not found (looked for {path})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise reader.error(key, f"{path.name} is not valid JSON: {exc}") from None
    try:
        expanded = parse_schema(raw, expand=True, _write_hint=False)
    except Exception as exc:
        raise reader.error(key, f"{path.name} is not a valid Avro schema: {exc}") from None
    try:
        layout = record_layout(expanded)
    except LayoutError as exc:
        raise reader.error(key, f"{path.name}: {exc}") from None
    return path, expanded, layout


def _history(reader: _Reader, base: Path) -> Path | None:
    relative = reader.get("history", str, None)
    if relative is None:
        return None
    path = (base / relative).resolve()
    if not path.is_dir():
        raise reader.error("history", f"directory {relative!r} not found (looked for {path})")
    return path


def _strings(reader: _Reader, key: str) -> list[str]:
    """A non-empty list of non-empty strings; YAML's unquoted NO, YES, ON, OFF (booleans) and numbers are
    named, since a vocabulary of country codes or merchant codes meets them first."""
    values = reader.get(key, list)
    if not values:
        raise reader.error(key, "must be a non-empty list of strings")
    for i, value in enumerate(values):
        if isinstance(value, bool):
            raise reader.doc.error(reader.path + (key, i), f"is the boolean {value} (YAML reads unquoted "
                                   "NO/YES/ON/OFF/true/false as booleans): quote it, e.g. \"NO\"")
        if not isinstance(value, str) or not value:
            raise reader.doc.error(reader.path + (key, i), f"{value!r} is not a non-empty string (quote numbers "
                                   "such as merchant codes: \"5411\")")
    return values


def _field_of(reader: _Reader, key: str, layout: RecordLayout, types: tuple[str, ...], what: str,
              default: Any = ...) -> Any:
    name = reader.get(key, str, default, what=what)
    if name is None:
        return None
    if name not in layout:
        close = difflib.get_close_matches(name, layout.names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise reader.error(key, f"{layout.full_name} has no field {name!r}{hint}; its fields: {', '.join(layout.names)}")
    field = layout.field(name)
    if field.type not in types:
        raise reader.error(key, f"field {name!r} is {field.type}, but {what} must be {' or '.join(types)}")
    return name


def _event(doc: _Document, value: Any, base: Path) -> EventSpec:
    reader = _Reader(doc, ("event",), value, ("schema", "history", "topic", "id", "entity", "time"))
    path, expanded, layout = _schema(reader, "schema", base)
    id_field = _field_of(reader, "id", layout, ("string",), "the event id")
    entity_field = _field_of(reader, "entity", layout, ("string",), "the entity key")
    time_field = _field_of(reader, "time", layout, ("long",), "the event time (epoch milliseconds)")
    for key, name in (("id", id_field), ("entity", entity_field), ("time", time_field)):
        if layout.field(name).nullable:
            raise reader.error(key, f"field {name!r} is nullable: the event {key} must always be present")
    logical = layout.field(time_field).logical_type
    if logical not in (None, "timestamp-millis", "timestamp-micros"):
        raise reader.error("time", f"field {time_field!r} has logicalType {logical!r}; the event time is epoch "
                                   "milliseconds (plain long or timestamp-millis) or timestamp-micros")
    for field in layout.fields:
        if field.name in RESERVED_COLUMNS and field.name not in (id_field, entity_field, time_field):
            raise reader.error("schema", f"field {field.name!r} of {layout.full_name} has the name of a "
                                         f"predictions column ({', '.join(sorted(RESERVED_COLUMNS))}); rename it")
    return EventSpec(schema_path=path, history_dir=_history(reader, base),
                     topic=reader.get("topic", str, "events"), layout=layout, schema=expanded,
                     id_field=id_field, entity_field=entity_field, time_field=time_field,
                     time_divisor=1000 if logical == "timestamp-micros" else 1)


def _label(doc: _Document, value: Any, base: Path) -> LabelSpec:
    reader = _Reader(doc, ("label",), value, ("schema", "history", "topic", "id", "value", "time", "entity",
                                             "kind"))
    path, expanded, layout = _schema(reader, "schema", base)
    kind = reader.get("kind", str)
    if kind not in LABEL_KINDS:
        raise reader.error("kind", f"{kind!r} is not a label kind: binary (classification) or numeric (regression)")
    return LabelSpec(schema_path=path, history_dir=_history(reader, base), topic=reader.get("topic", str, "labels"),
                     layout=layout, schema=expanded,
                     id_field=_field_of(reader, "id", layout, ("string",), "the labelled event's id"),
                     value_field=_field_of(reader, "value", layout, ("boolean", "int", "long", "float", "double"),
                                           "the label value"),
                     time_field=_field_of(reader, "time", layout, ("long",), "the label time", None),
                     entity_field=_field_of(reader, "entity", layout, ("string",), "the entity key", None),
                     kind=kind)


def _checks(doc: _Document, value: Any, event: EventSpec) -> tuple[tuple[FieldCheck, ...], int, int]:
    """Field checks, and the event-time limits (max age, max future) in ms."""
    max_age, max_future = parse_duration("365d"), parse_duration("5m")
    if value is None:
        return (), max_age, max_future
    if not isinstance(value, dict):
        raise doc.error(("validation",), f"must be a mapping of field name -> checks, got {_kind(value)}")
    layout = event.layout
    checks = []
    for name, rules in value.items():
        path = ("validation", name)
        if name not in layout:
            close = difflib.get_close_matches(str(name), layout.names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise doc.error(path, f"{layout.full_name} has no field {name!r}{hint}")
        if name == event.time_field:
            reader = _Reader(doc, path, rules, ("max_age", "max_future"))
            max_age = reader.duration("max_age", max_age)
            max_future = reader.duration("max_future", max_future)
            continue
        field = layout.field(name)
        allowed = ("required",) + (("finite", "min", "max") if field.is_numeric else
                                   ("allowed", "min_length", "max_length", "pattern"))
        reader = _Reader(doc, path, rules, allowed)
        check = FieldCheck(field=name, required=reader.get("required", bool, False),
                           finite=reader.get("finite", bool, False),
                           min=reader.get("min", float, None), max=reader.get("max", float, None),
                           min_length=reader.get("min_length", int, None), max_length=reader.get("max_length", int, None),
                           pattern=reader.get("pattern", str, None))
        if reader.has("allowed"):
            values = _strings(reader, "allowed")
            check = FieldCheck(**{**check.__dict__, "allowed": tuple(values)})
        if check.pattern is not None:
            try:
                re.compile(check.pattern)
            except re.error as exc:
                raise reader.error("pattern", f"{check.pattern!r} is not a regular expression: {exc}") from None
        if check.min is not None and check.max is not None and check.min > check.max:
            raise reader.error("min", f"min {check.min:g} is above max {check.max:g}")
        checks.append(check)
    return tuple(checks), max_age, max_future


def _window(reader: _Reader, required: bool) -> int | None:
    window = reader.duration("window", ... if required else None)
    if window is not None and not MIN_WINDOW_MS <= window <= MAX_WINDOW_MS:
        raise reader.error("window", f"{window} ms is outside 1s .. 366d")
    return window


def _feature(doc: _Document, index: int, value: Any, layout: RecordLayout, time_field: str) -> Feature:
    path = ("features", index)
    if not isinstance(value, dict):
        raise doc.error(path, f"a feature is a mapping (name plus one of field, aggregate, transform, encode), got "
                              f"{_kind(value)}")
    kinds = [k for k in ("field", "aggregate", "transform", "encode") if k in value]
    if "aggregate" in kinds or "transform" in kinds or "encode" in kinds:
        kinds = [k for k in kinds if k != "field"]  # there `field` is the input the op reads
    if len(kinds) != 1:
        raise doc.error(path, "a feature has exactly one of: field (the value of a numeric input field), "
                              f"aggregate ({', '.join(AGGREGATES)}), transform ({', '.join(TRANSFORMS)}), "
                              f"encode ({', '.join(ENCODINGS)})" + (f"; got {', '.join(kinds)}" if kinds else ""))
    kind = kinds[0]
    numeric = ("boolean", "int", "long", "float", "double")
    if kind == "field":
        reader = _Reader(doc, path, value, ("name", "field"))
        field = _field_of(reader, "field", layout, numeric, "a numeric field (use encode for a string field)")
        return Feature(reader.name("name"), "field", "value", field)
    if kind == "aggregate":
        op = value["aggregate"]
        allowed = {"count": ("field", "window"), "time_since_previous": ("window",),
                   "distinct_count": ("field", "window")}.get(op, ("field", "window"))
        reader = _Reader(doc, path, value, ("name", "aggregate") + allowed)
        if op not in AGGREGATES:
            raise reader.error("aggregate", f"{op!r} is not an aggregate; one of {', '.join(AGGREGATES)}")
        if op == "distinct_count":
            field = _field_of(reader, "field", layout, ("string", "bytes"), "distinct_count's field (a string)")
        elif op == "count":
            field = _field_of(reader, "field", layout, tuple(f.type for f in layout.fields), "the counted field",
                              None)
        elif op == "time_since_previous":
            field = None
        else:
            field = _field_of(reader, "field", layout, numeric, f"{op}'s field (numeric)")
        if field == time_field:
            raise reader.error("field", f"{field!r} is the event time; aggregate another field")
        return Feature(reader.name("name"), "aggregate", op, field, _window(reader, op != "time_since_previous"))
    if kind == "transform":
        op = value["transform"]
        allowed = {"log1p": ("field",), "hour_of_day": (), "day_of_week": (), "ratio": ("field", "of", "window"),
                   "zscore": ("field", "window")}.get(op, ())
        reader = _Reader(doc, path, value, ("name", "transform") + allowed)
        if op not in TRANSFORMS:
            raise reader.error("transform", f"{op!r} is not a transform; one of {', '.join(TRANSFORMS)}")
        if op in ("hour_of_day", "day_of_week"):
            return Feature(reader.name("name"), "transform", op)
        field = _field_of(reader, "field", layout, numeric, f"{op}'s field (numeric)")
        if op == "log1p":
            return Feature(reader.name("name"), "transform", op, field)
        of = None
        if op == "ratio":
            of = reader.get("of", str, what=f"the aggregate of {field} it divides by: {', '.join(RATIO_AGGREGATES)}")
            if of not in RATIO_AGGREGATES:
                raise reader.error("of", f"{of!r} cannot be a ratio's denominator; one of {', '.join(RATIO_AGGREGATES)}")
        return Feature(reader.name("name"), "transform", op, field, _window(reader, True), of=of)
    op = value["encode"]
    allowed = {"vocabulary": ("field", "values"), "learned": ("field", "max_size", "min_count")}.get(op, ("field",))
    reader = _Reader(doc, path, value, ("name", "encode") + allowed)
    if op not in ENCODINGS:
        raise reader.error("encode", f"{op!r} is not an encoding; one of {', '.join(ENCODINGS)}")
    field = _field_of(reader, "field", layout, ("string",), "an encoded field (a string)")
    if op == "vocabulary":
        values = _strings(reader, "values")
        if len(set(values)) != len(values):
            duplicate = next(v for v in values if values.count(v) > 1)
            raise reader.error("values", f"{duplicate!r} is listed twice")
        return Feature(reader.name("name"), "encode", op, field, values=tuple(values))
    max_size = reader.get("max_size", int, 100)
    min_count = reader.get("min_count", int, 1)
    if not 1 <= max_size <= 10_000:
        raise reader.error("max_size", f"{max_size} is outside 1 .. 10000")
    if min_count < 1:
        raise reader.error("min_count", f"{min_count} must be at least 1")
    return Feature(reader.name("name"), "encode", op, field, max_size=max_size, min_count=min_count)


def load_spec(path: str | Path) -> FeatureSpec:
    """Load and validate the spec at `path` (a spec file, or a directory holding spec.yaml)."""
    path = Path(path)
    if path.is_dir():
        path = path / "spec.yaml"
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    path = path.resolve()
    doc = _Document(path, path.read_text(encoding="utf-8"))
    top = _Reader(doc, (), doc.data, ("format", "name", "version", "description", "event", "label", "lateness",
                                      "validation", "features", "model", "generator"))
    fmt = top.get("format", int)
    if fmt != FORMAT:
        raise top.error("format", f"format {fmt} is not supported; this streamscore reads format {FORMAT}")
    base = path.parent
    event = _event(doc, top.get("event", dict), base)
    label = _label(doc, top.get("label", dict), base)
    checks, max_age, max_future = _checks(doc, top.value.get("validation"), event)
    raw_features = top.get("features", list)
    if not raw_features:
        raise top.error("features", "declare at least one feature")
    features = tuple(_feature(doc, i, f, event.layout, event.time_field) for i, f in enumerate(raw_features))
    seen: dict[str, int] = {}
    for i, feature in enumerate(features):
        if feature.name in seen:
            raise doc.error(("features", i, "name"), f"feature {feature.name!r} is already defined at "
                                                     f"features[{seen[feature.name]}]")
        if feature.name == "score":
            raise doc.error(("features", i, "name"), "a feature may not be named 'score' (the model output)")
        seen[feature.name] = i
    if len(features) > 255:
        raise top.error("features", f"{len(features)} features; at most 255 are supported")
    windows = [f.window_ms for f in features if f.window_ms]
    lateness = top.duration("lateness", max(windows, default=0))
    if lateness < 0:
        raise top.error("lateness", "must not be negative")
    model = _Reader(doc, ("model",), top.get("model", dict, {}), ("name", "params"))
    model_name = model.get("name", str, None)
    if model_name is not None and not _MODEL_NAME.match(model_name):
        raise model.error("name", f"{model_name!r} is not a valid model name (letters, digits, '_', '.', '-')")
    generator = top.get("generator", str, None)
    generator_path = None
    if generator is not None:
        generator_path = (base / generator).resolve()
        if not generator_path.is_file():
            raise top.error("generator", f"{generator!r} not found (looked for {generator_path})")
    name = top.name("name")
    return FeatureSpec(
        path=path, name=name, version=top.get("version", int, 1), description=top.get("description", str, ""),
        event=event, label=label, features=features, checks=checks, max_event_age_ms=max_age,
        max_event_future_ms=max_future, lateness_ms=lateness,
        model=ModelSpec(name=model_name or name, params=model.get("params", dict, {})),
        generator=generator_path,
    )
