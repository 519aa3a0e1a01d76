"""A valid record of any Avro schema, built from its types alone (for warming compiled readers up).

>>> example_record({"type": "record", "name": "Trip", "fields": [
...     {"name": "id", "type": "string"}, {"name": "km", "type": ["null", "double"]},
...     {"name": "tags", "type": {"type": "array", "items": "string"}},
...     {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["CAR", "BIKE"]}}]})
{'id': 'x', 'km': 0.0, 'tags': ['x'], 'kind': 'CAR'}
"""
from __future__ import annotations

PRIMITIVES = {"string": "x", "bytes": b"x", "int": 0, "long": 0, "float": 0.0, "double": 0.0, "boolean": False,
              "null": None}


def example_record(schema, named: dict | None = None):
    """A value of `schema` (a fastavro-parsed schema or plain JSON one): unions take their first non-null
    branch, arrays and maps one item, enums their first symbol, so every reader path sees a value."""
    named = {} if named is None else named
    if isinstance(schema, str):
        return PRIMITIVES[schema] if schema in PRIMITIVES else example_record(named[schema], named)
    if isinstance(schema, list):
        branches = [branch for branch in schema if branch != "null"] or ["null"]
        return example_record(branches[0], named)
    kind = schema["type"]
    if kind in ("record", "error"):
        named[schema["name"]] = schema
        return {field["name"]: example_record(field["type"], named) for field in schema["fields"]}
    if kind == "enum":
        named[schema["name"]] = schema
        return schema["symbols"][0]
    if kind == "fixed":
        named[schema["name"]] = schema
        return b"\0" * schema["size"]
    if kind == "array":
        return [example_record(schema["items"], named)]
    if kind == "map":
        return {"x": example_record(schema["values"], named)}
    return example_record(kind, named)  # {"type": "long", "logicalType": ...} and the like
