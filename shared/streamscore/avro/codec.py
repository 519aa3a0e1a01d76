"""Avro encoding and decoding of streamscore records (Event, Label, Prediction, ...).

Two framings, chosen by the writer, always both accepted by readers (first byte):

- Avro single-object encoding (no schema registry):
  0xC3 0x01 + 8-byte little-endian CRC-64-AVRO fingerprint of the writer schema + body.
  The writer schema is found by fingerprint among schemas/*.avsc and schemas/history/*.avsc.
- Confluent wire format (with a schema registry):
  0x00 + 4-byte big-endian schema id + body. The writer schema is fetched by id (and cached).

The reader schema is always the CURRENT schema of the expected record (schemas/<name>.avsc), so
events written with an older compatible schema are resolved to the current shape (new fields get
their defaults, removed fields are dropped).

Schema evolution: before changing schemas/<name>.avsc, save the current version with
`SchemaCatalog().archive(name, version)`; it writes schemas/history/<name>.v<version>.avsc in expanded
form (self-contained: named types inline), so messages written with it stay readable.

Bad input never escapes as a fastavro exception: decoding raises `DecodeError` (with a short
`reason` code for dead-letter headers) and encoding raises `EncodeError` naming the field.
"""
from __future__ import annotations

import importlib.resources
import json
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import UnknownType, fingerprint as _fastavro_fingerprint, to_parsing_canonical_form
from fastavro.validation import validate as fastavro_validate

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_HEADER_LEN = 10  # magic (2) + fingerprint (8)
CONFLUENT_MAGIC = b"\x00"
CONFLUENT_HEADER_LEN = 5  # magic (1) + schema id (4)

# Record short name (= file stem) for each record the contract defines.
EVENT = "event"
LABEL = "label"
PREDICTION = "prediction"
RETRAIN_REQUEST = "retrain_request"
MODEL_UPDATE = "model_update"
RECORD_NAMES = (EVENT, LABEL, PREDICTION, RETRAIN_REQUEST, MODEL_UPDATE)

HISTORY_DIR = "history"

# DecodeError.reason codes (also used as the `error.reason` dead-letter header).
UNDECODABLE = "undecodable"
UNKNOWN_SCHEMA = "unknown_schema"
WRONG_SCHEMA = "wrong_schema"
MISSING_FIELD = "missing_field"


class DecodeError(ValueError):
    """Bytes that cannot be read as the expected record; `reason` is a short code, `field` a name or None."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field


class EncodeError(ValueError):
    """A record that does not fit its schema; `field` is the dotted path of the offending field."""

    def __init__(self, message: str, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class SchemaCatalogError(ValueError):
    """The .avsc files themselves are broken (bad JSON, unknown type, ...)."""


class SchemaRegistryUnavailable(RuntimeError):
    """The schema registry could not be asked; not the message's fault, so never dead-letter on this."""


def crc64_avro(canonical_form: str) -> int:
    """CRC-64-AVRO (Rabin) fingerprint of a parsing canonical form, as the integer the spec defines."""
    # fastavro returns the 8 bytes little-endian (the Java and single-object byte order) as hex.
    return int.from_bytes(bytes.fromhex(_fastavro_fingerprint(canonical_form, "CRC-64-AVRO")), "little")


def single_object_header(fingerprint: int) -> bytes:
    return SINGLE_OBJECT_MAGIC + fingerprint.to_bytes(8, "little")


@dataclass(frozen=True)
class WriterSchema:
    """One schema messages may have been written with (current, historical, or from the registry)."""

    short_name: str  # "event"
    full_name: str  # "streamscore.Event"
    fingerprint: int  # CRC-64-AVRO of `canonical`
    canonical: str  # parsing canonical form (of the expanded schema)
    parsed: dict = field(repr=False)  # fastavro-parsed, ready for schemaless_reader/writer
    expanded: dict = field(repr=False)  # full JSON (docs, defaults) with named types inline
    source: str = ""  # "event.avsc", "history/event.v1.avsc", "registry id 3"


def _full_name(schema: dict) -> str:
    name = schema["name"]
    if "." in name or not schema.get("namespace"):
        return name
    return f"{schema['namespace']}.{name}"


def _without_logical_types(schema: Any) -> Any:
    """`schema` with every logicalType removed: streamscore reads and writes the underlying primitive (a
    timestamp-millis is its long), as the compiled scanner does; the parsing canonical form (the
    fingerprint) has no logical types either."""
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        out = {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
        if out.get("type") in ("bytes", "fixed") and "precision" in schema:  # a decimal: keep it as it is
            return schema
        return out
    return schema


def _writer_schema(short_name: str, raw: dict, named: dict, source: str) -> WriterSchema:
    """Parse `raw` (which may refer to types in `named`; `named` is updated with the types it defines)."""
    parsed = parse_schema(_without_logical_types(raw), named)
    # Expanded against a copy so the expansion does not redefine names in the shared dict.
    expanded = parse_schema(raw, dict(named), expand=True, _write_hint=False)
    canonical = to_parsing_canonical_form(expanded)
    return WriterSchema(
        short_name=short_name,
        full_name=_full_name(raw),
        fingerprint=crc64_avro(canonical),
        canonical=canonical,
        parsed=parsed,
        expanded=expanded,
        source=source,
    )


class SchemaCatalog:
    """streamscore's own record schemas (schemas/, current versions, plus schemas/history/), and the records a
    feature spec brings: the team's event and label schemas, under the short names "event" and "label",
    with their own history directories (`for_spec`).

    Current schemas in one directory share one namespace of named types. History files are self-contained.
    """

    @classmethod
    def for_spec(cls, spec, schema_dir: str | Path | None = None) -> "SchemaCatalog":
        """The system schemas plus `spec`'s event and label records (a spec.model.FeatureSpec)."""
        catalog = cls(schema_dir)
        catalog.add_record("event", spec.event.schema_path, spec.event.history_dir)
        catalog.add_record("label", spec.label.schema_path, spec.label.history_dir)
        return catalog

    def add_record(self, short_name: str, path: Path, history_dir: Path | None = None) -> WriterSchema:
        """Add a self-contained record schema file as the current `short_name`, and its older versions."""
        path = Path(path)
        writer = _writer_schema(short_name, self._read_json(path, path.name), {}, str(path))
        self._current[short_name] = writer
        self._by_fingerprint[writer.fingerprint] = writer
        if history_dir is not None:
            self._load_history(Path(history_dir))
        return writer

    def __init__(self, schema_dir: str | Path | None = None) -> None:
        root = importlib.resources.files("streamscore.schemas") if schema_dir is None else Path(schema_dir)
        self.schema_dir = root
        self._current: dict[str, WriterSchema] = {}
        self._by_fingerprint: dict[int, WriterSchema] = {}
        self._load_current(root)
        history = root / HISTORY_DIR
        if history.is_dir():
            self._load_history(history)

    # --- loading -------------------------------------------------------------
    @staticmethod
    def _read_json(resource, source: str) -> dict:
        try:
            raw = json.loads(resource.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SchemaCatalogError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("type") != "record":
            raise SchemaCatalogError(f"{source}: top level must be an Avro record")
        return raw

    def _load_current(self, root) -> None:
        files = sorted((r for r in root.iterdir() if r.name.endswith(".avsc")), key=lambda r: r.name)
        pending = {r.name[: -len(".avsc")]: self._read_json(r, r.name) for r in files}
        named: dict = {}
        # Files may refer to types defined in other files: parse in dependency order by retrying
        # those whose referenced types are not defined yet.
        while pending:
            progressed = False
            unknown: dict[str, str] = {}
            for short_name in list(pending):
                trial = dict(named)  # a failed parse must not leave half-defined names behind
                try:
                    writer = _writer_schema(short_name, pending[short_name], trial, f"{short_name}.avsc")
                except UnknownType as exc:
                    unknown[short_name] = exc.name
                    continue
                except Exception as exc:  # fastavro raises several types for malformed schemas
                    raise SchemaCatalogError(f"{short_name}.avsc: invalid Avro schema: {exc}") from exc
                named = trial
                del pending[short_name]
                self._current[short_name] = writer
                self._by_fingerprint[writer.fingerprint] = writer
                progressed = True
            if not progressed:
                detail = ", ".join(f"{n}.avsc refers to unknown type {t!r}" for n, t in unknown.items())
                raise SchemaCatalogError(f"cannot resolve schemas: {detail}")

    def _load_history(self, history) -> None:
        for resource in sorted(history.iterdir(), key=lambda r: r.name):
            if not resource.name.endswith(".avsc"):
                continue
            source = f"{HISTORY_DIR}/{resource.name}"
            short_name = resource.name.split(".", 1)[0]  # "event.v1.avsc" -> "event"
            try:
                writer = _writer_schema(short_name, self._read_json(resource, source), {}, source)
            except UnknownType as exc:
                raise SchemaCatalogError(
                    f"{source}: unknown type {exc.name!r}; history files must be self-contained (expanded form)"
                ) from exc
            except SchemaCatalogError:
                raise
            except Exception as exc:
                raise SchemaCatalogError(f"{source}: invalid Avro schema: {exc}") from exc
            # A history copy identical to the current schema is harmless; the current one wins.
            self._by_fingerprint.setdefault(writer.fingerprint, writer)

    # --- lookups -------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._current)

    def current(self, name: str) -> WriterSchema:
        try:
            return self._current[name]
        except KeyError:
            raise KeyError(f"no schema named {name!r}; known: {', '.join(sorted(self._current))}") from None

    def schema(self, name: str) -> dict:
        """fastavro-parsed current schema of `name`."""
        return self.current(name).parsed

    def full_name(self, name: str) -> str:
        return self.current(name).full_name

    def expanded(self, name: str) -> dict:
        """Current schema with docs and defaults and named types inline (what a registry needs)."""
        return self.current(name).expanded

    def expanded_json(self, name: str) -> str:
        return json.dumps(self.current(name).expanded, separators=(",", ":"))

    def canonical(self, name: str) -> str:
        """Parsing canonical form of the expanded current schema."""
        return self.current(name).canonical

    def fingerprint(self, name: str) -> int:
        return self.current(name).fingerprint

    def writer(self, fingerprint: int) -> WriterSchema | None:
        """Any known schema (current or history) with this CRC-64-AVRO fingerprint."""
        return self._by_fingerprint.get(fingerprint)

    def unknown_fingerprint_message(self, fingerprint: int) -> str:
        """Why no schema has `fingerprint`, naming where schemas come from and the usual producer mistake."""
        swapped = self._by_fingerprint.get(int.from_bytes(fingerprint.to_bytes(8, "little"), "big"))
        if swapped is not None:
            return (f"schema fingerprint 0x{fingerprint:016x} is {swapped.source}'s written in the wrong byte order: "
                    "single-object encoding is c3 01, the CRC-64-AVRO fingerprint little-endian, then the body")
        spec_files = sorted(Path(w.source).name for w in self._current.values() if Path(w.source).is_absolute())
        known = f"the spec's {', '.join(spec_files)} and " if spec_files else ""
        return (f"unknown schema fingerprint 0x{fingerprint:016x} (not {known}streamscore's schemas/, "
                "nor their history/ copies)")

    @property
    def writers(self) -> Mapping[int, WriterSchema]:
        return dict(self._by_fingerprint)

    def archive(self, name: str, version: int) -> Path:
        """Save the current schema of `name` as history/<name>.v<version>.avsc (call before editing it)."""
        if not isinstance(self.schema_dir, Path):
            raise SchemaCatalogError("archive needs a catalog loaded from a directory path")
        target = self.schema_dir / HISTORY_DIR / f"{name}.v{version}.avsc"
        if target.exists():
            raise SchemaCatalogError(f"{target} already exists")
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(self.expanded(name), indent=2) + "\n", encoding="utf-8")
        return target


# --- encode diagnostics ------------------------------------------------------------
# fastavro's own errors rarely say which field is wrong; on failure we walk the record
# against the expanded schema to find the first value that does not fit.

_MISSING = object()
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _is_int_in(datum: Any, bounds: tuple[int, int]) -> bool:
    return isinstance(datum, numbers.Integral) and not isinstance(datum, bool) and bounds[0] <= datum <= bounds[1]


def _is_utf8_str(datum: Any) -> bool:
    if not isinstance(datum, str):
        return False
    try:
        datum.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_PRIMITIVE_FITS: dict[str, Callable[[Any], bool]] = {
    "null": lambda d: d is None,
    "boolean": lambda d: isinstance(d, bool),
    "int": lambda d: _is_int_in(d, _INT32),
    "long": lambda d: _is_int_in(d, _INT64),
    "float": lambda d: isinstance(d, numbers.Real) and not isinstance(d, bool),
    "double": lambda d: isinstance(d, numbers.Real) and not isinstance(d, bool),
    "string": _is_utf8_str,
    "bytes": lambda d: isinstance(d, (bytes, bytearray)),
}


def _type_label(schema: Any) -> str:
    if isinstance(schema, list):
        return " or ".join(_type_label(s) for s in schema)
    if isinstance(schema, dict):
        if schema["type"] in ("record", "enum", "fixed"):
            return f"{schema['type']} {schema['name']}"
        if schema["type"] in ("map", "array"):
            return schema["type"]
        return _type_label(schema["type"])
    return str(schema)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _find_misfit(schema: Any, datum: Any, path: str) -> tuple[str, Any, str] | None:
    """First (field path, value, problem) where `datum` does not fit `schema`, or None if it fits."""
    if isinstance(schema, list):
        if any(_find_misfit(branch, datum, path) is None for branch in schema):
            return None
        # One non-null branch (the usual optional field): report the problem inside it.
        non_null = [b for b in schema if b != "null"]
        if datum is not None and len(non_null) == 1:
            return _find_misfit(non_null[0], datum, path)
        return path, datum, f"is not {_type_label(schema)}"
    if isinstance(schema, str):
        fits = _PRIMITIVE_FITS.get(schema)
        if fits is None or fits(datum):
            return None
        if datum is None:
            return path, datum, f"is null but the field is a non-nullable {schema}"
        if schema in ("int", "long") and isinstance(datum, numbers.Integral) and not isinstance(datum, bool):
            return path, datum, f"is out of range for an Avro {schema}"
        return path, datum, f"is not a valid {schema}"
    kind = schema["type"]
    if kind == "record":
        if not isinstance(datum, Mapping):
            return path, datum, f"is not a mapping (expected record {schema['name']})"
        names = {f["name"] for f in schema["fields"]}
        extra = [k for k in datum if k not in names]
        if extra:
            return _join(path, str(extra[0])), datum[extra[0]], f"is not a field of {schema['name']}"
        for f in schema["fields"]:
            value = datum.get(f["name"], f.get("default", _MISSING))
            if value is _MISSING:
                return _join(path, f["name"]), None, "is missing (required, no default)"
            misfit = _find_misfit(f["type"], value, _join(path, f["name"]))
            if misfit:
                return misfit
        return None
    if kind == "map":
        if not isinstance(datum, Mapping):
            return path, datum, "is not a mapping"
        for key, value in datum.items():
            if not isinstance(key, str):
                return f"{path}[{key!r}]", key, "map key is not a string"
            misfit = _find_misfit(schema["values"], value, f"{path}[{key!r}]")
            if misfit:
                return misfit
        return None
    if kind == "array":
        if isinstance(datum, (str, bytes)) or not isinstance(datum, Iterable):
            return path, datum, "is not a list"
        for i, value in enumerate(datum):
            misfit = _find_misfit(schema["items"], value, f"{path}[{i}]")
            if misfit:
                return misfit
        return None
    if kind == "enum":
        return None if datum in schema["symbols"] else (path, datum, f"is not one of {schema['symbols']}")
    if kind == "fixed":
        ok = isinstance(datum, (bytes, bytearray)) and len(datum) == schema["size"]
        return None if ok else (path, datum, f"is not {schema['size']} bytes")
    return _find_misfit(kind, datum, path)  # {"type": "string"} and friends


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _encode_error(writer: WriterSchema, record: Any, exc: Exception) -> EncodeError:
    misfit = _find_misfit(writer.expanded, record, "")
    if misfit is None:
        return EncodeError(f"cannot encode {writer.full_name}: {type(exc).__name__}: {exc}")
    path, value, problem = misfit
    if not path:  # the record itself is not a mapping
        return EncodeError(f"cannot encode {writer.full_name}: record {_short_repr(value)} {problem}", value=value)
    shown = "" if problem.startswith("is missing") else f" = {_short_repr(value)} ({type(value).__name__})"
    return EncodeError(f"cannot encode {writer.full_name}: field {path!r}{shown} {problem}", field=path, value=value)


def _int_field_paths(schema: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to plain "int" fields through nested records (not unions/maps/arrays)."""
    paths = []
    for f in schema.get("fields", ()):
        ftype = f["type"]
        if isinstance(ftype, dict) and ftype.get("type") in ("int", "record"):
            ftype = ftype if ftype["type"] == "record" else "int"
        if ftype == "int":
            paths.append((*prefix, f["name"]))
        elif isinstance(ftype, dict) and ftype.get("type") == "record":
            paths.extend(_int_field_paths(ftype, (*prefix, f["name"])))
    return paths


def _check_int_range(record: Mapping[str, Any], paths: list[tuple[str, ...]]) -> None:
    # fastavro writes an "int" as a varint without a range check, so 2**40 would encode and
    # then break (or wrap in) readers in other languages.
    for path in paths:
        value: Any = record
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, int) and not _INT32[0] <= value <= _INT32[1]:
            raise OverflowError(f"{'.'.join(path)} out of int range")


# --- decode diagnostics --------------------------------------------------------------


def _locate_bad_field(writer: WriterSchema, data: bytes, offset: int) -> tuple[str | None, bool]:
    """(field the body breaks in, whether it ran out of bytes there); rereads prefixes of the record."""
    fields = writer.expanded.get("fields", [])
    for k in range(1, len(fields) + 1):
        try:
            prefix = parse_schema({"type": "record", "name": writer.full_name, "fields": fields[:k]}, {})
        except Exception:
            return None, False
        buf = BytesIO(data)
        buf.seek(offset)
        try:
            schemaless_reader(buf, prefix, None)
        except EOFError:
            return fields[k - 1]["name"], True
        except Exception:
            return fields[k - 1]["name"], False
    return None, False


def _missing_reader_field(writer: WriterSchema, reader: WriterSchema) -> str | None:
    """A top-level reader field the writer lacks and that has no default."""
    written = {f["name"] for f in writer.expanded["fields"]}
    for f in reader.expanded["fields"]:
        names = {f["name"], *f.get("aliases", ())}
        if not names & written and "default" not in f:
            return f["name"]
    return None


def _read_error(exc: Exception, data: bytes, offset: int, writer: WriterSchema, reader: WriterSchema) -> DecodeError:
    if isinstance(exc, SchemaResolutionError):
        missing = _missing_reader_field(writer, reader)
        if missing is not None:
            return DecodeError(
                MISSING_FIELD,
                f"{reader.full_name} field {missing!r} is required (no default) but the writer schema "
                f"({writer.source}) does not have it",
                missing,
            )
        return DecodeError(
            WRONG_SCHEMA,
            f"writer schema {writer.source} cannot be resolved to the current {reader.full_name}: {exc}",
        )
    bad_field, truncated = _locate_bad_field(writer, data, offset)
    where = f" while reading field {bad_field!r}" if bad_field else ""
    if truncated or isinstance(exc, EOFError):
        return DecodeError(UNDECODABLE, f"truncated Avro body{where} ({writer.full_name})", bad_field)
    return DecodeError(
        UNDECODABLE, f"invalid Avro body{where} ({writer.full_name}): {type(exc).__name__}: {exc}", bad_field
    )


# --- the codec -------------------------------------------------------------------------

Decoder = Callable[[bytes], dict]
Encoder = Callable[[Mapping[str, Any]], bytes]


class AvroCodec:
    """Encodes records to framed Avro bytes and decodes them back; see the module docstring.

    Without `registry_url` writers use single-object framing; with it, Confluent framing
    (schemas registered under subject "<topic or name>-value"). `registry_client` may be given
    instead of a url (e.g. to share one mock registry between codecs in tests).

    Encoding type-checks through fastavro, which coerces with float()/int() where it can: a
    numeric string or a bool in a double field is written as that number. `validate=True`
    type-checks every record strictly first (~4 us per Event more); use it for untrusted input.
    """

    def __init__(
        self,
        catalog: SchemaCatalog | None = None,
        registry_url: str | None = None,
        *,
        registry_client=None,
        registry_config: dict | None = None,
        validate: bool = False,
    ) -> None:
        self.catalog = catalog or SchemaCatalog()
        self.validate = validate
        if registry_client is None and registry_url:
            from confluent_kafka.schema_registry import SchemaRegistryClient

            # new_client gives the in-memory MockSchemaRegistryClient for "mock://..." urls.
            # registry_config: basic auth and TLS (streamscore.kafka.config.schema_registry_config).
            registry_client = SchemaRegistryClient.new_client({"url": registry_url, **(registry_config or {})})
        self.registry = registry_client
        self.registry_url = registry_url
        self._encoders: dict[tuple[str, str | None], Encoder] = {}
        self._decoders: dict[str, Decoder] = {}
        self._registry_writers: dict[int, WriterSchema] = {}
        self._registry_unknown_ids: set[int] = set()

    # --- encoding ----------------------------------------------------------------
    def encoder(self, name: str, topic: str | None = None) -> Encoder:
        """A fast `record -> bytes` function for record `name` (topic only picks the registry subject)."""
        key = (name, topic if self.registry is not None else None)
        enc = self._encoders.get(key)
        if enc is None:
            enc = self._encoders[key] = self._make_encoder(name, topic)
        return enc

    def encode(self, name: str, record: Mapping[str, Any], topic: str | None = None) -> bytes:
        return self.encoder(name, topic)(record)

    def _make_encoder(self, name: str, topic: str | None) -> Encoder:
        writer = self.catalog.current(name)
        header = self._registry_header(writer, topic or name) if self.registry is not None else (
            single_object_header(writer.fingerprint)
        )
        parsed = writer.parsed
        validate = self.validate
        int_paths = _int_field_paths(writer.expanded)

        def encode(record: Mapping[str, Any]) -> bytes:
            buf = BytesIO()
            buf.write(header)
            try:
                if validate and not fastavro_validate(record, parsed, raise_errors=False):
                    raise ValueError("record does not validate against the schema")
                if int_paths:
                    _check_int_range(record, int_paths)
                # strict_allow_default: unknown keys (typos) are errors, missing optional fields get defaults.
                schemaless_writer(buf, parsed, record, strict_allow_default=True)
            except Exception as exc:  # fastavro raises TypeError/ValueError/OverflowError/...
                raise _encode_error(writer, record, exc) from exc
            return buf.getvalue()

        encode.__name__ = f"encode_{name}"
        encode.header = header  # the framing prefix, for writers that assemble records themselves
        return encode

    def _registry_header(self, writer: WriterSchema, subject_base: str) -> bytes:
        from confluent_kafka.schema_registry import Schema

        subject = f"{subject_base}-value"
        try:
            schema_id = self.registry.register_schema(subject, Schema(self.catalog.expanded_json(writer.short_name), "AVRO"))
        except Exception as exc:
            raise SchemaRegistryUnavailable(f"cannot register {writer.full_name} under subject {subject!r}: {exc}") from exc
        self._registry_writers[schema_id] = writer  # our own messages decode without a registry round trip
        return CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")

    # --- decoding ----------------------------------------------------------------
    def decoder(self, expected_name: str) -> Decoder:
        """A fast `bytes -> dict` function returning records shaped like the current `expected_name` schema."""
        dec = self._decoders.get(expected_name)
        if dec is None:
            dec = self._decoders[expected_name] = self._make_decoder(expected_name)
        return dec

    def decode(self, data: bytes, expected_name: str) -> dict:
        return self.decoder(expected_name)(data)

    def decode_many(self, messages: Iterable[bytes], expected_name: str) -> tuple[list[dict | None], list[tuple[int, DecodeError]]]:
        """Decode a batch without raising on bad messages.

        Returns (records, errors): records[i] is the decoded record of messages[i] or None if it failed;
        errors lists (index, DecodeError) for the failed ones. SchemaRegistryUnavailable still raises:
        a registry outage is not a reason to dead-letter good messages.
        """
        decode = self.decoder(expected_name)
        records: list[dict | None] = []
        errors: list[tuple[int, DecodeError]] = []
        append = records.append
        for i, data in enumerate(messages):
            try:
                append(decode(data))
            except DecodeError as err:
                append(None)
                errors.append((i, err))
        return records, errors

    def _make_decoder(self, expected_name: str) -> Decoder:
        reader = self.catalog.current(expected_name)
        # header bytes -> (writer, fastavro reader schema or None when writer == reader).
        plans: dict[bytes, tuple[WriterSchema, dict | None]] = {}

        def plan_for(header: bytes) -> tuple[WriterSchema, dict | None]:
            writer = self._writer_for_header(header)
            if writer.full_name != reader.full_name:
                raise DecodeError(WRONG_SCHEMA, f"message is {writer.full_name}, expected {reader.full_name}")
            plan = plans[header] = (writer, None if writer.fingerprint == reader.fingerprint else reader.parsed)
            return plan

        def decode(data: bytes) -> dict:
            if not data:
                raise DecodeError(UNDECODABLE, "empty message (no bytes)")
            first = data[0]
            if first == 0xC3:
                offset = SINGLE_OBJECT_HEADER_LEN
            elif first == 0x00:
                offset = CONFLUENT_HEADER_LEN
            else:
                raise DecodeError(
                    UNDECODABLE,
                    f"bad magic byte 0x{first:02x}: neither Avro single-object (0xc3 0x01) nor Confluent (0x00) framing",
                )
            header = bytes(data[:offset])
            plan = plans.get(header) or plan_for(header)
            buf = BytesIO(data)
            buf.seek(offset)
            try:
                record = schemaless_reader(buf, plan[0].parsed, plan[1])
            except Exception as exc:  # fastavro raises EOFError/IndexError/UnicodeDecodeError/...
                raise _read_error(exc, data, offset, plan[0], reader) from exc
            if buf.tell() != len(data):
                raise DecodeError(
                    UNDECODABLE,
                    f"{len(data) - buf.tell()} unexpected trailing bytes after the {plan[0].full_name} record",
                )
            return record

        decode.__name__ = f"decode_{expected_name}"
        return decode

    def writer_of(self, data: bytes) -> WriterSchema:
        """The schema `data` (a framed message) was written with; DecodeError if unknown or unframed."""
        if not data or data[0] not in (0xC3, 0x00):
            raise DecodeError(UNDECODABLE, "message is neither single-object nor Confluent framed")
        return self._writer_for_header(bytes(data[:SINGLE_OBJECT_HEADER_LEN if data[0] == 0xC3 else CONFLUENT_HEADER_LEN]))

    def _writer_for_header(self, header: bytes) -> WriterSchema:
        if header[0] == 0xC3:
            if len(header) < SINGLE_OBJECT_HEADER_LEN:
                raise DecodeError(UNDECODABLE, f"message too short ({len(header)} bytes) for a single-object header")
            if header[:2] != SINGLE_OBJECT_MAGIC:
                raise DecodeError(UNDECODABLE, f"bad single-object magic {header[:2].hex(' ')} (expected c3 01)")
            fp = int.from_bytes(header[2:10], "little")
            writer = self.catalog.writer(fp)
            if writer is None:
                raise DecodeError(UNKNOWN_SCHEMA, self.catalog.unknown_fingerprint_message(fp))
            return writer
        if len(header) < CONFLUENT_HEADER_LEN:
            raise DecodeError(UNDECODABLE, f"message too short ({len(header)} bytes) for a Confluent header")
        return self._registry_writer(int.from_bytes(header[1:5], "big"))

    def _registry_writer(self, schema_id: int) -> WriterSchema:
        writer = self._registry_writers.get(schema_id)
        if writer is not None:
            return writer
        if self.registry is None:
            raise DecodeError(
                UNKNOWN_SCHEMA, f"message has Confluent framing (schema id {schema_id}) but no schema registry is configured"
            )
        if schema_id in self._registry_unknown_ids:
            raise DecodeError(UNKNOWN_SCHEMA, f"unknown schema id {schema_id} (not in the schema registry)")
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            registered = self.registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                # Ids are assigned at registration, so an id unknown now stays unknown: cache it
                # (bounded) so garbage starting with 0x00 does not hammer the registry.
                if len(self._registry_unknown_ids) < 10_000:
                    self._registry_unknown_ids.add(schema_id)
                raise DecodeError(UNKNOWN_SCHEMA, f"unknown schema id {schema_id} (not in the schema registry)") from exc
            raise SchemaRegistryUnavailable(f"schema registry lookup of id {schema_id} failed: {exc}") from exc
        except Exception as exc:
            raise SchemaRegistryUnavailable(f"schema registry lookup of id {schema_id} failed: {exc}") from exc
        try:
            raw = json.loads(registered.schema_str)
            full_name = _full_name(raw)
            short_name = next((n for n in self.catalog.names if self.catalog.full_name(n) == full_name), full_name)
            writer = _writer_schema(short_name, raw, {}, f"registry id {schema_id}")
        except Exception as exc:
            raise DecodeError(UNKNOWN_SCHEMA, f"schema id {schema_id} is not a usable Avro record schema: {exc}") from exc
        # Same canonical form as a local schema: reuse it, so reader == writer skips resolution.
        writer = self.catalog.writer(writer.fingerprint) or writer
        self._registry_writers[schema_id] = writer
        return writer

