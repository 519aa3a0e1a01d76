"""The offline feature path: logged events in ClickHouse -> the point-in-time training set.

Events are read back from `predictions` (which keeps every scored event's input fields) in the order
the scorer saw them (per partition, by Kafka offset) and replayed through the same compiled engine the
scorer runs (spec.engine), with fresh states. Each vector therefore uses only what was known when its
event was scored: no leakage from later events, and no training/serving skew by construction
(tests/integration/test_skew.py checks the vectors against the ones the scorer logged, bit for bit).

The read is bounded: a training window of `since_ms` onwards needs, before it, only the history the
state retains (the spec's lateness plus its longest window), so the query reads that span and
nothing older, however long the table is (`TrainingSet.rows_read` says how many rows it read).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streamscore.avro.scanner import columns_from_values
from streamscore.clickhouse.store import Store
from streamscore.clickhouse.tables import input_columns
from streamscore.spec.engine import FeatureEngine
from streamscore.spec.model import FeatureSpec
from streamscore.spec.text import Vocabulary, learn_vocabulary


@dataclass
class LoggedEvents:
    """Logged events in the scorer's processing order, as columns of the spec's event layout."""

    columns: dict[str, list]
    partitions: np.ndarray
    offsets: np.ndarray
    times: np.ndarray  # ms
    event_ids: list[str]
    rows_read: int = 0

    def __len__(self) -> int:
        return len(self.event_ids)


@dataclass
class TrainingSet:
    X: np.ndarray
    y: np.ndarray
    event_times: np.ndarray  # ms, for time-ordered validation splits
    event_ids: list[str]
    events_replayed: int
    vocabularies: dict[str, list[str]] = field(default_factory=dict)  # learned encodings, to freeze in the model
    rows_read: int = 0
    learned_values: dict[int, list] = field(default_factory=dict)  # column of a learned encoding -> raw values

    @property
    def rows(self) -> int:
        return len(self.y)

    def encoded_with(self, vocabularies: dict[str, list[str]], names: tuple[str, ...]) -> np.ndarray:
        """X with its learned encodings recomputed from another vocabulary (another model version's), so a
        model is evaluated on the vectors it would have been served."""
        X = self.X.copy()
        for column, values in self.learned_values.items():
            vocabulary = Vocabulary(vocabularies.get(names[column], ()))
            X[:, column] = [vocabulary.code(value) for value in values]
        return X


@dataclass(frozen=True)
class TrainingWindow:
    """What a retrain reads: labelled events from `since_ms` on, replayed from `read_from_ms` on (the warm-up
    their entity state needs); `rows_read` = what finding it cost."""

    since_ms: int | None
    read_from_ms: int | None
    rows_read: int = 0


def training_window(store: Store, spec: FeatureSpec, window_ms: int, max_events: int,
                    max_history_events: int) -> TrainingWindow:
    """The trainer's bounded window: from `window_ms` before the newest logged event, or later if that holds
    more than `max_events` events (then from the newest `max_events`-th); replayed from the spec's history
    before it (lateness + longest window), but at most `max_history_events` events before it. The warm-up
    cap is what keeps a retrain flat in table size when the spec's windows are long (payments: 14 days):
    the first events of the window then see a truncated history, the later ones (most of them, and the
    gate's holdout, the newest) the same state the scorer had.

    Both reads follow the table's time order: the newest event by the key, the caps by reading the newest
    event times in reverse key order (optimize_read_in_order), so they too are bounded."""
    newest = store.query("SELECT toUnixTimestamp64Milli(max(event_time)), count() FROM predictions")
    (newest_ms, logged), = newest.rows
    if not logged:
        return TrainingWindow(None, None, newest.read_rows)
    since = int(newest_ms) - int(window_ms)
    read_from = since - spec.history_ms
    newest_times = store.query(
        "SELECT toUnixTimestamp64Milli(event_time) FROM predictions "
        "WHERE event_time >= fromUnixTimestamp64Milli({start:Int64}, 'UTC') ORDER BY event_time DESC "
        "LIMIT {limit:UInt64}", {"start": read_from, "limit": max_events + max_history_events})
    times = [int(t) for (t,) in newest_times.rows]
    if len(times) >= max_events:
        since = max(since, times[max_events - 1])
    if len(times) >= max_events + max_history_events:
        read_from = max(read_from, times[-1])
    return TrainingWindow(since, read_from, newest.read_rows + newest_times.read_rows)


def load_logged_events(store: Store, spec: FeatureSpec, since_ms: int | None = None,
                       until_ms: int | None = None, read_from_ms: int | None = None) -> LoggedEvents:
    """Logged events with event_time >= since_ms minus the spec's history (all when None; not before
    `read_from_ms` when given, see training_window) and < until_ms."""
    event = spec.event
    fields = [name for name, _ in input_columns(spec)]
    conditions = []
    if since_ms is not None:
        start = int(since_ms - spec.history_ms)
        if read_from_ms is not None:
            start = max(start, int(read_from_ms))
        conditions.append(f"event_time >= fromUnixTimestamp64Milli({start}, 'UTC')")
    if until_ms is not None:
        conditions.append(f"event_time < fromUnixTimestamp64Milli({int(until_ms)}, 'UTC')")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    selected = ", ".join(f"`{name}`" for name in fields)
    result = store.query(
        f"SELECT event_id, entity_id, toUnixTimestamp64Milli(event_time), event_partition, event_offset"
        f"{', ' + selected if selected else ''} FROM predictions FINAL {where} ORDER BY event_partition, event_offset")
    rows = result.rows
    by_column = list(zip(*rows)) if rows else [()] * (5 + len(fields))
    times = np.array(by_column[2], dtype=np.int64)
    columns = {name: list(values) for name, values in zip(fields, by_column[5:])}
    columns[event.id_field] = list(by_column[0])
    columns[event.entity_field] = list(by_column[1])
    columns[event.time_field] = (times * event.time_divisor).tolist()
    return LoggedEvents(columns=columns, partitions=np.array(by_column[3], dtype=np.int64),
                        offsets=np.array(by_column[4], dtype=np.int64), times=times, event_ids=list(by_column[0]),
                        rows_read=result.read_rows)


def load_labels(store: Store, since_ms: int | None = None) -> dict[str, float]:
    """Labels of the events logged since `since_ms` (all when None)."""
    where = "" if since_ms is None else (
        "WHERE event_id IN (SELECT event_id FROM predictions "
        f"WHERE event_time >= fromUnixTimestamp64Milli({int(since_ms)}, 'UTC'))")
    result = store.query(f"SELECT event_id, label FROM labels FINAL {where}")
    return {event_id: float(label) for event_id, label in result.rows}


def offline_features(spec: FeatureSpec, logged: LoggedEvents,
                     vocabularies: dict[str, Vocabulary] | None = None) -> np.ndarray:
    """Replay `logged` through the scorer's engine with fresh states: the training-time feature matrix."""
    engine = FeatureEngine(spec)
    n = len(logged)
    batch = columns_from_values(spec.event.layout, logged.columns, n)
    matrix = np.empty((n, engine.n_features), dtype=np.float64)
    for partition in np.unique(logged.partitions).tolist():
        rows = np.flatnonzero(logged.partitions == partition)
        inputs = engine.inputs(batch, rows, logged.offsets[rows])
        part, _, _ = engine.compute(engine.new_state(), inputs)
        engine.encode(part, inputs, vocabularies)
        matrix[rows] = part
    return matrix


def learned_vocabularies(spec: FeatureSpec, logged: LoggedEvents, since_ms: int | None) -> dict[str, list[str]]:
    """The vocabulary of each `learned` encoding, from the events of the training window."""
    window = np.flatnonzero(logged.times >= since_ms) if since_ms is not None else np.arange(len(logged))
    out = {}
    for feature in spec.features:
        if feature.is_learned:
            values = logged.columns[feature.field]
            out[feature.name] = list(learn_vocabulary([values[i] for i in window.tolist()], feature.max_size,
                                                      feature.min_count))
    return out


def build_training_set(spec: FeatureSpec, logged: LoggedEvents, labels: dict[str, float],
                       since_ms: int | None = None, vocabularies: dict[str, list[str]] | None = None) -> TrainingSet:
    """Replay every logged event (so entity state is warm) and keep the labelled ones at or after `since_ms`.

    Learned encodings use `vocabularies` (a served model's, to reproduce its vectors) or are learned here."""
    if vocabularies is None:
        vocabularies = learned_vocabularies(spec, logged, since_ms)
    matrix = offline_features(spec, logged, {name: Vocabulary(values) for name, values in vocabularies.items()})
    ids = logged.event_ids
    keep = [i for i, event_id in enumerate(ids)
            if event_id in labels and (since_ms is None or logged.times[i] >= since_ms)]
    learned = {column: [logged.columns[feature.field][i] for i in keep]
               for column, feature in enumerate(spec.features) if feature.is_learned}
    return TrainingSet(
        learned_values=learned,
        X=matrix[keep] if keep else np.empty((0, len(spec.features))),
        y=np.asarray([labels[ids[i]] for i in keep], dtype=np.float64),
        event_times=logged.times[keep] if keep else np.empty(0, dtype=np.int64),
        event_ids=[ids[i] for i in keep],
        events_replayed=len(logged),
        vocabularies=vocabularies,
        rows_read=logged.rows_read,
    )


def load_training_set(store: Store, spec: FeatureSpec, since_ms: int | None = None, until_ms: int | None = None,
                      vocabularies: dict[str, list[str]] | None = None,
                      read_from_ms: int | None = None) -> TrainingSet:
    logged = load_logged_events(store, spec, since_ms, until_ms, read_from_ms=read_from_ms)
    return build_training_set(spec, logged, load_labels(store, since_ms), since_ms, vocabularies)
