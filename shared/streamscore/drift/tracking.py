"""The drift service's step as plain code: predictions and labels in, drift rows and retrain requests out.

`DriftTracker` owns everything the drift service knows, with no Kafka or
ClickHouse inside (services/drift wraps it in a consume/write/checkpoint loop):

- the `DriftMonitor` of the production model version (None while there is
  none); `set_model` resets it when the production pointer moves (keeping the
  cool-down when the new version was trained for the monitor's last request:
  it answers that shift, which is not requested again for it);
- the label join: a label carries no score, so the tracker keeps the last
  `label_join_size` predictions' (model_version, score) by event_id (they
  arrive before their labels). Labels of older predictions — long label delays,
  or predictions seen before a restart — are returned by `take_unmatched` for
  the service to look up in ClickHouse (`resolve_labels`); a label whose
  prediction is not logged yet waits up to `label_wait_s`, then is dropped and
  counted;
- the consumed offsets, so state and position are saved together (`to_bytes`: versioned,
  validated JSON, see streamscore.drift.state; never pickle).

Only predictions and labels of the monitored version feed the monitor: those
of an older version (still in flight after a swap) would mix two score
distributions in one window.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone

from streamscore.drift.monitor import DriftConfig, DriftMonitor, DriftSignal, IncompatibleDriftState, Statistic
from streamscore.drift.state import decode_checkpoint, encode_checkpoint
from streamscore.learning.registry import ModelVersion
from streamscore.learning.retrain_requests import parse_retrain_reason, retrain_request

log = logging.getLogger("streamscore.drift_tracking")

DRIFT_EVENTS_COLUMNS = ["detected_at", "model_name", "model_version", "kind", "detector", "feature", "statistic",
                        "value", "baseline", "threshold", "window", "retrain_requested", "request_id"]
KIND_STATISTIC = "statistic"
KIND_DRIFT = "drift"


@dataclass
class DriftOutputs:
    """What one batch produced: rows for drift_events and RetrainRequest records."""

    rows: list[list] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)

    def extend(self, other: "DriftOutputs") -> None:
        self.rows += other.rows
        self.requests += other.requests

    def clear(self) -> None:
        self.rows = []
        self.requests = []


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def statistic_row(stat: Statistic, model_name: str, model_version: int) -> list:
    return [_datetime(stat.at_ms), model_name, model_version, KIND_STATISTIC, "window", stat.feature or "",
            stat.statistic, stat.value if math.isfinite(stat.value) else math.nan, _finite_or_none(stat.baseline),
            None, stat.window, 0, None]


def drift_row(signal: DriftSignal, model_name: str, model_version: int, request_id: str | None) -> list:
    return [_datetime(signal.at_ms), model_name, model_version, KIND_DRIFT, signal.detector, signal.feature or "",
            signal.statistic, float(signal.value), _finite_or_none(signal.baseline), float(signal.threshold),
            signal.window, int(request_id is not None), request_id]


class DriftTracker:
    def __init__(self, config: DriftConfig, model_name: str, label_join_size: int = 200_000,
                 label_wait_s: float = 60.0):
        self.config = config
        self.model_name = model_name
        self.label_join_size = label_join_size
        self.label_wait_s = label_wait_s
        self.monitor: DriftMonitor | None = None
        self.offsets: dict[str, dict[int, int]] = {}  # topic -> partition -> next offset to read
        self._scores: OrderedDict[str, tuple[int, float | None]] = OrderedDict()
        self._waiting: list[tuple[str, int, float]] = []  # (event_id, label, first seen, monotonic s)
        self.predictions_other_version = 0
        self.labels_other_version = 0
        self.labels_unmatched = 0

    @property
    def model_version(self) -> int:
        return self.monitor.model_version if self.monitor is not None else 0

    # --- model lifecycle -----------------------------------------------------------
    def set_model(self, version: ModelVersion | None) -> bool:
        """Monitor `version` (the production one); returns True if that changed anything."""
        if version is None:
            changed = self.monitor is not None
            self.monitor = None
            return changed
        if self.monitor is not None and self.monitor.model_version == version.version:
            return False
        kwargs = dict(reference_metrics=version.metrics, decision_threshold=version.threshold,
                      objective=version.objective)
        if self.monitor is None:
            self.monitor = DriftMonitor(self.config, version.baseline, self.model_name, version.version, **kwargs)
        else:
            # A version trained for a request about the monitored one answers that shift: its cool-down
            # continues (one shift, one request), else the new version starts without one.
            answers = self.retrained_for_the_monitored_version(version)
            if answers:
                log.info("%s v%d was trained for a request about v%d: a cool-down of that request continues",
                         self.model_name, version.version, self.monitor.model_version)
            self.monitor.reset(version.baseline, version.version, keep_cooldown=answers, **kwargs)
        return True

    def retrained_for_the_monitored_version(self, version: ModelVersion) -> bool:
        """True when `version` was trained for a retrain request about the version monitored now (its registry
        reason says so, streamscore.learning.retrain_requests): it answers the shift that request was for."""
        request = parse_retrain_reason(version.reason)
        return (request is not None and self.monitor is not None
                and request.model_version == self.monitor.model_version)

    # --- messages ------------------------------------------------------------------
    def record_offset(self, topic: str, partition: int, offset: int) -> None:
        self.offsets.setdefault(topic, {})[partition] = offset + 1

    def on_prediction(self, prediction: dict, out: DriftOutputs) -> None:
        version = int(prediction["model_version"])
        self._scores[prediction["event_id"]] = (version, prediction["score"], int(prediction["event_time"]))
        if len(self._scores) > self.label_join_size:
            self._scores.popitem(last=False)
        monitor = self.monitor
        if monitor is None or version != monitor.model_version:
            self.predictions_other_version += 1
            return
        windows_before = monitor.windows_completed
        signals = monitor.update_prediction(prediction["features"], prediction["score"], int(prediction["event_time"]))
        if monitor.windows_completed != windows_before:
            out.rows += [statistic_row(s, self.model_name, monitor.model_version) for s in monitor.snapshot()]
        if signals:
            self._on_signals(signals, out)

    def on_label(self, label: dict, out: DriftOutputs) -> None:
        if self.monitor is None:  # no model in production: nothing to evaluate
            self.labels_other_version += 1
            return
        joined = self._scores.get(label["event_id"])
        if joined is None:
            self._waiting.append((label["event_id"], _label_value(label["label"]), time.monotonic()))
            return
        self._feed_label(joined, _label_value(label["label"]), out)

    def _feed_label(self, joined: tuple[int, float | None, int], label: float, out: DriftOutputs) -> None:
        version, score, event_time_ms = joined
        monitor = self.monitor
        if monitor is None or version != monitor.model_version:
            self.labels_other_version += 1
            return
        # Event time of the latest prediction is the monitor's one clock (cool-down, detected_at).
        signals = monitor.update_label(score, label, event_time_ms)
        # The monitor's warm-up gates prediction detectors only; right after a swap the first
        # labels of the new version are few and their loss is noise, so gate them here too.
        if signals and monitor.predictions_seen >= self.config.min_events:
            self._on_signals(signals, out)

    def take_unmatched(self) -> list[str]:
        """Event ids of waiting labels whose prediction is not in memory (look them up in ClickHouse)."""
        return [event_id for event_id, _, _ in self._waiting if event_id not in self._scores]

    def resolve_labels(self, found: dict[str, tuple[int, float | None, int]], out: DriftOutputs) -> None:
        """Feed waiting labels whose prediction is now known (in memory, or `found` in ClickHouse);
        drop those that waited longer than label_wait_s."""
        now = time.monotonic()
        waiting = []
        for event_id, label, since in self._waiting:
            joined = self._scores.get(event_id) or found.get(event_id)
            if joined is not None:
                self._feed_label(joined, label, out)
            elif now - since > self.label_wait_s:
                self.labels_unmatched += 1
            else:
                waiting.append((event_id, label, since))
        self._waiting = waiting

    @property
    def labels_waiting(self) -> int:
        return len(self._waiting)

    def _on_signals(self, signals: list[DriftSignal], out: DriftOutputs) -> None:
        monitor = self.monitor
        now_ms = max(s.at_ms for s in signals)
        chosen = monitor.should_request_retrain(signals, now_ms)
        request = None
        if chosen is not None:
            request = retrain_request(chosen, self.model_name, monitor.model_version, monitor.predictions_seen)
            out.requests.append(request)
            log.warning("drift on %s v%d: %s -> retrain request %s", self.model_name, monitor.model_version,
                        chosen.reason, request["request_id"])
        for signal in signals:
            cited = request is not None and signal == dataclasses.replace(chosen, note=signal.note)
            out.rows.append(drift_row(signal, self.model_name, monitor.model_version,
                                      request["request_id"] if cited else None))

    # --- persistence ---------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Monitor state + offsets + waiting labels as a version-2 checkpoint (streamscore.drift.state;
        the score cache is not saved: after a restart, labels of earlier predictions are joined
        through ClickHouse)."""
        tracker = {
            "model_name": self.model_name,
            "offsets": {topic: {str(p): o for p, o in parts.items()} for topic, parts in self.offsets.items()},
            "waiting_labels": [[event_id, label] for event_id, label, _ in self._waiting],
            "counters": {"predictions_other_version": self.predictions_other_version,
                         "labels_other_version": self.labels_other_version,
                         "labels_unmatched": self.labels_unmatched},
        }
        return encode_checkpoint(tracker, self.monitor.to_state() if self.monitor is not None else None)

    def restore(self, data: bytes) -> None:
        """Continue from `to_bytes` output. Raises CorruptDriftState (nothing restored) for bytes that
        are not a valid checkpoint: damaged, of an older format, or hostile (no code ever runs: the
        format is JSON). A monitor saved under an incompatible drift configuration is dropped (the
        next set_model starts a fresh one); offsets are kept."""
        checkpoint = decode_checkpoint(data)
        saved = checkpoint.tracker
        if saved.model_name != self.model_name:
            raise IncompatibleDriftState(f"state is for model {saved.model_name!r}, not {self.model_name!r}")
        try:
            offsets = {topic: {int(p): int(o) for p, o in parts.items()} for topic, parts in saved.offsets.items()}
        except ValueError as exc:
            raise IncompatibleDriftState(f"drift checkpoint: a partition is not a number ({exc})") from exc
        monitor = None
        if checkpoint.monitor is not None:
            try:
                monitor = DriftMonitor.from_state(checkpoint.monitor, self.config)
            except IncompatibleDriftState as exc:
                log.warning("saved drift monitor dropped, starting a fresh one: %s", exc)
        self.offsets = offsets
        now = time.monotonic()
        self._waiting = [(event_id, label, now) for event_id, label in saved.waiting_labels]
        counters = saved.counters
        self.predictions_other_version = counters.get("predictions_other_version", 0)
        self.labels_other_version = counters.get("labels_other_version", 0)
        self.labels_unmatched = counters.get("labels_unmatched", 0)
        self.monitor = monitor


def _label_value(value) -> float:
    """A label as the monitor takes it: 0/1 for a classifier, any finite number for a regression."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise ValueError(f"label must be a number, got {value!r}")
