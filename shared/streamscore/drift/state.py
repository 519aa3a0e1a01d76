"""The drift checkpoint's format: versioned JSON with a schema, never pickle.

The drift service saves its state as one record on the compacted `drift-state` topic. Anyone who can
write to that topic can put anything there, so reading it must never run code: the record is
zlib-compressed UTF-8 JSON (with a fixed magic prefix), decompressed with a size limit, parsed with
`json`, and validated field by field against the schemas below (pydantic, strict types, no extra
fields). A record that fails any step raises `CorruptDriftState` naming the step and the field; the
service then logs it and starts fresh (docs/drift.md "Checkpoint"): an empty monitor and the
consumer group's committed offsets.

Layout (version 2):
    b"SSDRIFT\\x02" + zlib(JSON {"format": "streamscore.drift.checkpoint", "version": 2,
                                 "tracker": {...}, "monitor": {...} | null})
"""
from __future__ import annotations

import json
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from streamscore.drift.monitor import MONITOR_STATE_FORMAT, MONITOR_STATE_VERSION, IncompatibleDriftState

CHECKPOINT_MAGIC = b"SSDRIFT\x02"
CHECKPOINT_FORMAT = "streamscore.drift.checkpoint"
CHECKPOINT_VERSION = 2
MAX_STATE_BYTES = 64 * 1024 * 1024  # decompressed; a zip bomb stops here


class CorruptDriftState(IncompatibleDriftState):
    """A checkpoint that is not (or no longer) a valid drift state: damaged, foreign or hostile."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Number = float | int


class _LastRequest(_Strict):
    ms: int
    event: int
    channel: Literal["measured", "estimated", "covariate"]
    cleared: bool = False


class _Performance(_Strict):
    scores: list[Number]
    labels: list[Number]
    expected: list[Number | None]
    seen: int


class _Statistic(_Strict):
    feature: str | None
    statistic: str
    value: Number | None
    baseline: Number | None
    window: int
    at_ms: int


class MonitorState(_Strict):
    format: Literal["streamscore.drift.monitor"]
    version: Literal[2]
    config: dict[str, Any]
    model_name: str
    model_version: int
    objective: Literal["binary", "regression"]
    baseline: dict[str, Any]
    reference_metrics: dict[str, Number | None]
    decision_threshold: Number
    monitored: list[str]
    windows_completed: int
    predictions_seen: int
    labels_seen: int
    labels_since_window: int
    last_event_ms: int
    window_rows: list[list[Number | None]]
    previous_scores: list[Number | None] = []  # the sliding estimate's tail of the last window (absent before it)
    last_window: list[_Statistic]
    performance: _Performance
    self_reference: dict[str, Number]
    streaks: dict[str, int]
    latest: dict[str, str]
    last_request: _LastRequest | None
    cited_quiet: int


class TrackerState(_Strict):
    model_name: str
    offsets: dict[str, dict[str, int]]
    waiting_labels: list[list[str | Number]]  # [event_id, label] each (checked in check_waiting_labels)
    counters: dict[str, int]


class Checkpoint(_Strict):
    format: Literal["streamscore.drift.checkpoint"]
    version: Literal[2]
    tracker: TrackerState
    monitor: dict[str, Any] | None


assert MONITOR_STATE_FORMAT == "streamscore.drift.monitor" and MONITOR_STATE_VERSION == 2


def _explain(exc: ValidationError, what: str) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"{what}: field {where}: {first['msg']} ({exc.error_count()} problem(s))"


def parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptDriftState(f"{what} is not UTF-8 JSON ({type(exc).__name__}: {exc}); starting fresh") from exc


def validate_monitor_state(state: Any) -> dict[str, Any]:
    """The monitor state as plain data, checked against MonitorState."""
    if isinstance(state, dict) and state.get("version") not in (None, MONITOR_STATE_VERSION):
        raise CorruptDriftState(f"drift monitor state version {state.get('version')!r}, this code reads "
                                f"{MONITOR_STATE_VERSION}")
    try:
        return MonitorState.model_validate(state).model_dump()
    except ValidationError as exc:
        raise CorruptDriftState(_explain(exc, "drift monitor state")) from exc


def encode_checkpoint(tracker: dict[str, Any], monitor: dict[str, Any] | None) -> bytes:
    document = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "tracker": tracker, "monitor": monitor}
    return CHECKPOINT_MAGIC + zlib.compress(json.dumps(document, allow_nan=False, separators=(",", ":")).encode(), 6)


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Bytes from the drift-state topic -> a validated Checkpoint; CorruptDriftState otherwise."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(CHECKPOINT_MAGIC):
        head = bytes(data[:8]) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise CorruptDriftState(f"drift checkpoint has no {CHECKPOINT_MAGIC!r} prefix (starts with {head!r}): not a "
                                f"version-{CHECKPOINT_VERSION} drift checkpoint (an older or foreign record)")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(bytes(data[len(CHECKPOINT_MAGIC):]), MAX_STATE_BYTES)
    except zlib.error as exc:
        raise CorruptDriftState(f"drift checkpoint does not decompress: {exc}") from exc
    if inflater.unconsumed_tail:
        raise CorruptDriftState(f"drift checkpoint decompresses to more than {MAX_STATE_BYTES} bytes")
    if not inflater.eof:
        raise CorruptDriftState("drift checkpoint does not decompress completely (truncated)")
    document = parse_json(text, "drift checkpoint")
    if isinstance(document, dict) and document.get("version") not in (None, CHECKPOINT_VERSION):
        raise CorruptDriftState(f"drift checkpoint version {document.get('version')!r}, this code reads "
                                f"{CHECKPOINT_VERSION}")
    try:
        checkpoint = Checkpoint.model_validate(document)
    except ValidationError as exc:
        raise CorruptDriftState(_explain(exc, "drift checkpoint")) from exc
    for i, pair in enumerate(checkpoint.tracker.waiting_labels):
        if len(pair) != 2 or not isinstance(pair[0], str) or isinstance(pair[1], str):
            raise CorruptDriftState(f"drift checkpoint: field tracker.waiting_labels.{i}: expected "
                                    f"[event_id, label], got {pair!r}")
    return checkpoint
