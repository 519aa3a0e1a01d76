"""The field layout of a flat Avro record: defined once, read by the scanner, the writers and the DDL.

A user's event (and label) record must be flat: every field a primitive (`string`, `bytes`,
`boolean`, `int`, `long`, `float`, `double`) or a nullable primitive (a union of `null` and one
primitive, in either order). Anything else (nested records, arrays, maps, enums, fixed, unions of
two non-null types, `decimal`) is refused with an error naming the field, because every field
becomes one typed ClickHouse column and one slot of the compiled scanner.

Logical types on primitives are read as their underlying primitive (a `timestamp-millis` long is
the long), which is also what the parsing canonical form (and so the fingerprint) says.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIMITIVES = ("string", "bytes", "boolean", "int", "long", "float", "double")
NUMERIC = ("boolean", "int", "long", "float", "double")
TEXT = ("string", "bytes")
REFUSED_LOGICAL_TYPES = ("decimal",)

# Kind codes of the compiled scanner (avro.scanner), one per primitive; streamscore's own records may also
# hold an array of doubles (the Prediction's features), never a user record.
KIND_STRING, KIND_BYTES, KIND_BOOLEAN, KIND_INT, KIND_LONG, KIND_FLOAT, KIND_DOUBLE, KIND_DOUBLE_ARRAY = range(8)
DOUBLE_ARRAY = "double_array"
KIND_OF = dict(zip(PRIMITIVES + (DOUBLE_ARRAY,), range(8)))

# ClickHouse column types of the primitives (Nullable(...) around them when the field is nullable).
CLICKHOUSE_TYPES = {"string": "String", "bytes": "String", "boolean": "Bool", "int": "Int32", "long": "Int64",
                    "float": "Float32", "double": "Float64", DOUBLE_ARRAY: "Array(Float64)"}


class LayoutError(ValueError):
    """A schema the compiled paths cannot take; the message names the field and says what is allowed."""


@dataclass(frozen=True)
class FieldLayout:
    """One field: its name, primitive type, whether it may be null and which union branch is null."""

    name: str
    type: str  # one of PRIMITIVES (or DOUBLE_ARRAY in streamscore's own records)
    nullable: bool = False
    null_branch: int = -1  # union branch index of null (0 or 1), -1 when not nullable
    logical_type: str | None = None
    doc: str = ""

    @property
    def kind(self) -> int:
        return KIND_OF[self.type]

    @property
    def is_numeric(self) -> bool:
        return self.type in NUMERIC

    @property
    def is_text(self) -> bool:
        return self.type in TEXT

    @property
    def clickhouse_type(self) -> str:
        base = CLICKHOUSE_TYPES[self.type]
        return f"Nullable({base})" if self.nullable else base


@dataclass(frozen=True)
class RecordLayout:
    """A flat record's fields in schema order (the order Avro writes them)."""

    full_name: str
    fields: tuple[FieldLayout, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {f.name: i for i, f in enumerate(self.fields)})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.full_name} has no field {name!r}; its fields: {', '.join(self.names)}") from None

    def field(self, name: str) -> FieldLayout:
        return self.fields[self.index(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def scanner_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(kinds, null branches) as int64 arrays, the scanner's description of this layout."""
        return (np.array([f.kind for f in self.fields], dtype=np.int64),
                np.array([f.null_branch for f in self.fields], dtype=np.int64))


def _primitive(schema, where: str) -> tuple[str, str | None]:
    """(primitive name, logical type) of a field type that must be primitive; LayoutError otherwise."""
    logical = None
    if isinstance(schema, dict):
        logical = schema.get("logicalType")
        if logical in REFUSED_LOGICAL_TYPES:
            raise LayoutError(f"{where} has logicalType {logical!r}, which is not supported: use a double or a "
                              "string field")
        schema = schema.get("type")
    if isinstance(schema, str) and schema in PRIMITIVES:
        return schema, logical
    shown = schema if isinstance(schema, str) else (schema.get("type") if isinstance(schema, dict) else schema)
    raise LayoutError(f"{where} is of type {shown!r}: event and label records must be flat, every field one of "
                      f"{', '.join(PRIMITIVES)} or a union of null and one of them")


def record_layout(schema: dict, double_arrays: bool = False) -> RecordLayout:
    """The layout of an expanded (or parsed) Avro record schema; LayoutError naming the first field that is not
    a primitive or a nullable primitive (`double_arrays`: also accept arrays of doubles, for streamscore's own
    records)."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise LayoutError("the schema's top level must be an Avro record")
    name = schema.get("name", "?")
    namespace = schema.get("namespace")
    full_name = name if "." in name or not namespace else f"{namespace}.{name}"
    fields = []
    for field in schema.get("fields", []):
        where = f"field {field['name']!r} of {full_name}"
        ftype = field["type"]
        if isinstance(ftype, list):
            branches = [b for b in ftype if b != "null"]
            if len(ftype) != 2 or len(branches) != 1:
                raise LayoutError(f"{where} is the union {ftype}: only a union of null and one primitive "
                                  "(e.g. [\"null\", \"string\"]) is supported")
            primitive, logical = _primitive(branches[0], where)
            fields.append(FieldLayout(field["name"], primitive, True, ftype.index("null"), logical,
                                      field.get("doc", "")))
        elif double_arrays and isinstance(ftype, dict) and ftype.get("type") == "array" and ftype.get("items") == "double":
            fields.append(FieldLayout(field["name"], DOUBLE_ARRAY, False, -1, None, field.get("doc", "")))
        else:
            primitive, logical = _primitive(ftype, where)
            fields.append(FieldLayout(field["name"], primitive, False, -1, logical, field.get("doc", "")))
    if not fields:
        raise LayoutError(f"{full_name} has no fields")
    return RecordLayout(full_name, tuple(fields))
