"""Detection quality of the drift service's real configuration, on streams with known change points.

How to reproduce (everything is seeded; the same command prints the same table, timings aside):
    .venv/bin/python -m streamscore.services.tools.drift_quality            # full: ~10 min on 2 cores
    .venv/bin/python -m streamscore.services.tools.drift_quality --quick    # shorter streams, ~3 min
    ... --out /tmp/drift-quality.md --old-monitor b804a36     # write the tables; time round 1's monitor too

What is measured is what the service does: each domain's model is trained by
`streamscore.learning.training.train_model` (the trainer's function: time-ordered holdout, the
baseline and the monitoring reference it stores) on a long history of the example's own generator,
then every live prediction and every label (when it arrives, joined by event id) goes through a
`DriftTracker` with `DriftConfig.from_settings(Settings())`: warm-up, label join, cool-down, all
defaults. A retrain request is what the tracker emits.

Streams (per domain a history for training, then the live stream; a drift starts at a known live
event and everything before it is the same as the healthy stream):
- payments (examples/payments, 500 cards, ~5,000 events a day; the simulator's daily cycle, plus a
  WEEKLY cycle: on Saturdays and Sundays a third fewer legitimate events, 25% higher amounts; plus
  LEGITIMATE BURSTS: every 3rd day at 14:00 UTC, 30 minutes at 10x the normal rate from 100 cards,
  in their usual habits). History: 7 days of burn-in + 30 days (the trainer's default window).
  Scenarios: healthy (long), gradual amounts x1 -> x1.3 over 60k events, abrupt amounts x3,
  channel mix (pos -> ecom, ecom share x3), new categories (30% unseen merchant categories and
  countries), label-only concept drift (card-testing fraud) with prompt labels and with 30% of
  events labelled 12 h late (~2,500 events).
- rides (examples/rides, regression; daily cycle): healthy, traffic (every trip 40% slower: label-
  only concept drift), distance x1.5, new zones.
- river: SEA (variant 0 -> 2) through river.datasets.synth.ConceptDriftStream (width 1000), labels
  with every event; healthy control without the drift.

Per scenario: does the shift harm the model (on ALL labels, 20k events before the change vs everything
after: AUC down by more than 0.02 or log loss up by more than 50%; MAE up by more than 10%), the first retrain request's delay in events from the change and from the first
recorded signal after the change, and false requests (requests before the change, or on healthy
streams) per 100k healthy events. Detectors: the service defaults; "every detection requests" (the
round-1 policy: any recorded signal, per-event ADWIN/PageHinkley on the score included, is an action,
with the same cool-down); raw river detectors (default parameters, every alarm counts): ADWIN and
PageHinkley on the score, ADWIN on the per-label loss; always-fire and never-fire.
"""
from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable, Iterable

import numpy as np
from river import drift as river_drift

from streamscore.drift.monitor import DriftConfig, DriftMonitor
from streamscore.drift.tracking import DriftOutputs, DriftTracker
from streamscore.learning.registry import ModelVersion
from streamscore.learning.training import train_model
from streamscore.learning.training_set import LoggedEvents, learned_vocabularies, offline_features
from streamscore.settings import Settings
from streamscore.spec import default_spec_path, load_spec
from streamscore.spec.text import Vocabulary

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
HARM_AUC_DROP = 0.02  # a shift "harms" a classifier when its AUC falls by more than this...
HARM_LOG_LOSS_RATIO = 1.5  # ...or its log loss by more than half (calibration / accuracy, e.g. river SEA)
HARM_MAE_RATIO = 1.10  # ...a regression when its MAE rises by more than 10%


# --- streams -------------------------------------------------------------------------------

@dataclass
class Stream:
    """A domain's raw (event, label) pairs in arrival order: history (training) then live."""

    name: str
    domain: str
    pairs: list[tuple[dict, dict | None]]
    history: int  # the first `history` pairs are training history
    change_at: int | None  # live index of the first drifted event; None = healthy
    harmful_expected: str = ""
    label_fraction: float = 1.0
    label_delay_ms: int | None = None  # None: the generator's own label time


def weekly_cycle(pairs: Iterable[tuple[dict, dict]], seed: int, time_field: str = "event_time"):
    """Weekends: a third fewer legitimate events and 25% higher amounts (payments)."""
    rng = np.random.default_rng(seed)
    for event, label in pairs:
        weekday = datetime.fromtimestamp(event[time_field] / 1000, tz=timezone.utc).weekday()
        if weekday >= 5:
            if label["label"] == 0 and rng.random() < 0.33:
                continue
            event["amount"] = round(event["amount"] * 1.25, 2)
        yield event, label


def legitimate_bursts(pairs: list[tuple[dict, dict]], seed: int, every_days: int = 3, hour: int = 14,
                      minutes: int = 30, cards: int = 100, factor: float = 10.0) -> list[tuple[dict, dict]]:
    """Every `every_days` at `hour` UTC: `minutes` of extra legitimate events from `cards` cards, at
    `factor` times the stream's normal rate, each a copy of the card's previous legitimate event (new
    time, amount x lognormal(0, 0.3))."""
    rng = np.random.default_rng(seed)
    if not pairs:
        return pairs
    start, end = pairs[0][0]["event_time"], pairs[-1][0]["event_time"]
    head = pairs[:20_000]  # the rate and the cards' habits from the start: the same bursts on every stream
    rate_per_ms = len(head) / max(1, head[-1][0]["event_time"] - start)
    extra: list[tuple[dict, dict]] = []
    last_legit: dict[str, dict] = {}
    entities = sorted({e["entity_id"] for e, _ in pairs[:20_000]})
    day = (start // DAY_MS + 1) * DAY_MS
    bursts = []
    while day + hour * HOUR_MS < end:
        bursts.append(day + hour * HOUR_MS)
        day += every_days * DAY_MS
    for e, l in head:
        if l["label"] == 0:
            last_legit[e["entity_id"]] = e
    k = 0
    for at in bursts:
        chosen = rng.choice(entities, size=min(cards, len(entities)), replace=False)
        n = int((factor - 1) * rate_per_ms * minutes * 60_000)
        for _ in range(n):
            template = last_legit.get(str(chosen[int(rng.integers(len(chosen)))]))
            if template is None:
                continue
            t = int(at + rng.random() * minutes * 60_000)
            event = dict(template, event_time=t, event_id=f"burst-{k:09d}",
                         amount=round(template["amount"] * float(rng.lognormal(0, 0.3)), 2))
            extra.append((event, {"event_id": event["event_id"], "entity_id": event["entity_id"], "label": 0,
                                  "label_time": t + HOUR_MS}))
            k += 1
    extra.sort(key=lambda pair: pair[0]["event_time"])
    return list(heapq.merge(pairs, extra, key=lambda pair: pair[0]["event_time"]))


def gradual_amounts(pairs, at: int, over: int, factor: float):
    for i, (event, label) in enumerate(pairs):
        if i >= at:
            event["amount"] = round(event["amount"] * (1 + (factor - 1) * min(1.0, (i - at) / over)), 2)
        yield event, label


def channel_mix(pairs, at: int, seed: int, share: float = 0.67):
    """From `at` on, a pos payment becomes ecom with probability `share` (ecom share ~x3)."""
    rng = np.random.default_rng(seed)
    for i, (event, label) in enumerate(pairs):
        if i >= at and event.get("channel") == "pos" and rng.random() < share:
            event["channel"] = "ecom"
        yield event, label


def payments_streams(seed: int, history_days: int, live: int, healthy_live: int) -> list[Stream]:
    from streamscore.dev.simulator import DriftSpec, Simulator

    entities = 500
    per_day = entities * 10
    history = history_days * per_day
    change = 20_000

    def base(drift=None, label_delay_ms=HOUR_MS, n=history + live):
        sim = Simulator(seed, n_entities=entities, drift=drift, label_delay_ms=label_delay_ms)
        pairs = list(weekly_cycle(sim.events(n), seed))
        return legitimate_bursts(pairs, seed)

    # the same bursts and weekly thinning on every stream: they depend on the seed and the (unchanged) times
    healthy = base(n=history + healthy_live)
    at = history + change
    streams = [Stream("payments: healthy (daily+weekly cycles, bursts)", "payments", healthy, history, None)]
    prefix = healthy[:history + live]
    streams.append(Stream("payments: gradual amounts x1->x1.3 (60k events)", "payments",
                          list(gradual_amounts([(dict(e), dict(l)) for e, l in prefix], at, 60_000, 1.3)),
                          history, change, "no (issue: AUC unchanged)"))
    streams.append(Stream("payments: channel mix (ecom share x3)", "payments",
                          list(channel_mix([(dict(e), dict(l)) for e, l in prefix], at, seed)), history, change,
                          "no (issue)"))
    # drifts inside the simulator start at a raw event index: find the one that lands at live index `change`
    raw_at = _raw_index(prefix, at)
    for kind, title, extra in (("covariate", "abrupt amounts x3", {}),
                               ("new_categories", "new categories (30% unseen)", {}),
                               ("concept", "label-only concept (card testing), prompt labels", {})):
        pairs = base(drift=DriftSpec(kind=kind, at_event=raw_at, **extra))
        streams.append(Stream(f"payments: {title}", "payments", pairs, history, _live_index(pairs, history, kind,
                                                                                           raw_at, seed), ""))
    late = base(drift=DriftSpec(kind="concept", at_event=raw_at), label_delay_ms=12 * HOUR_MS)
    streams.append(Stream("payments: label-only concept, 30% labels 12 h late", "payments", late, history,
                          _live_index(late, history, "concept", raw_at, seed), "", label_fraction=0.3))
    return streams


def _raw_index(pairs, position: int) -> int:
    """The simulator's event index of the pair at `position` (bursts are inserted between them)."""
    event_id = pairs[position][0]["event_id"]
    while event_id.startswith("burst-"):
        position += 1
        event_id = pairs[position][0]["event_id"]
    return int(event_id.rsplit("-", 1)[1])


def _live_index(pairs, history: int, kind: str, raw_at: int, seed: int) -> int:
    target = f"sim{seed}-{raw_at:010d}"
    for i, (event, _) in enumerate(pairs):
        if event["event_id"] == target:
            return i - history
    raise ValueError(f"{kind}: drift start {target} not found")


def rides_streams(seed: int, history_days: int, live: int, healthy_live: int) -> list[Stream]:
    from streamscore.dev.generators import Drift, load_generator

    module = load_generator(load_spec(_example("rides")))
    drivers = 100
    probe = list(module.make_generator(seed, drivers).events(20_000))
    per_day = int(20_000 / ((probe[-1][0]["requested_at"] - probe[0][0]["requested_at"]) / DAY_MS))
    history = history_days * per_day
    change = 20_000
    healthy = list(module.make_generator(seed, drivers).events(history + healthy_live))
    streams = [Stream("rides: healthy (daily cycle)", "rides", healthy, history, None)]
    for kind, title in (("traffic", "traffic: trips 40% slower (label-only concept)"),
                        ("distance", "distance x1.5 (covariate)"), ("new_zones", "new pickup zones")):
        pairs = list(module.make_generator(seed, drivers, drift=Drift(kind, history + change)).events(history + live))
        streams.append(Stream(f"rides: {title}", "rides", pairs, history, change))
    return streams


def _example(name: str):
    return default_spec_path().parent.parent / name


# --- features, model, scores --------------------------------------------------------------------

@dataclass
class Prepared:
    stream: Stream
    X: np.ndarray  # live rows
    scores: np.ndarray
    labels: np.ndarray  # every live event's label value (for the harm figures)
    times: np.ndarray  # live event times (ms)
    label_times: np.ndarray
    event_ids: list[str]
    names: list[str]


def feature_matrix(spec, pairs, vocabularies=None) -> tuple[np.ndarray, LoggedEvents]:
    events = [e for e, _ in pairs]
    columns = {f.name: [e.get(f.name) for e in events] for f in spec.event.layout.fields}
    times = np.array([e[spec.event.time_field] // spec.event.time_divisor for e in events], dtype=np.int64)
    logged = LoggedEvents(columns=columns, partitions=np.zeros(len(events), dtype=np.int64),
                          offsets=np.arange(len(events)), times=times, event_ids=[e[spec.event.id_field] for e in events])
    vocab = None if vocabularies is None else {k: Vocabulary(v) for k, v in vocabularies.items()}
    return offline_features(spec, logged, vocab), logged


@dataclass
class Model:
    booster: object
    version: ModelVersion
    objective: str
    vocabularies: dict


def train_domain(spec, stream: Stream, burn_in: int, settings: Settings) -> Model:
    history = stream.pairs[:stream.history]
    _, logged = feature_matrix(spec, history)
    since = int(logged.times[burn_in])
    vocabularies = learned_vocabularies(spec, logged, since)
    X, _ = feature_matrix(spec, history, vocabularies)
    label = spec.label
    y = np.array([float(l[label.value_field]) for _, l in history])
    rows = np.arange(burn_in, len(history))
    order = rows[np.argsort(logged.times[rows], kind="stable")]
    trained = train_model(X[order], y[order], spec.feature_names, spec.categorical_features,
                          num_boost_round=settings.train_num_boost_round, objective=spec.objective,
                          validation_fraction=settings.train_validation_fraction, drift_window=settings.drift_window)
    version = ModelVersion(spec.name, 1, 0, None, spec.feature_set, list(spec.feature_names),
                           list(spec.categorical_features), None, None, trained.train_rows, trained.metrics,
                           trained.baseline, trained.threshold, {}, "bench", objective=spec.objective)
    return Model(trained.booster, version, spec.objective, vocabularies)


def prepare(spec, stream: Stream, model: Model, seed: int) -> Prepared:
    X, logged = feature_matrix(spec, stream.pairs, model.vocabularies)
    live = slice(stream.history, None)
    label = spec.label
    labels = np.array([float(l[label.value_field]) for _, l in stream.pairs[live]])
    times = logged.times[live]
    if stream.label_delay_ms is None:
        label_times = np.array([int(l[label.time_field]) if label.time_field else t
                                for (_, l), t in zip(stream.pairs[live], times)], dtype=np.int64)
    else:
        label_times = times + stream.label_delay_ms
    if stream.label_fraction < 1:
        keep = np.random.default_rng(seed).random(len(labels)) < stream.label_fraction
        label_times = np.where(keep, label_times, -1)
    return Prepared(stream, X[live], model.booster.predict(X[live]), labels, times, label_times,
                    logged.event_ids[stream.history:], list(spec.feature_names))


def river_streams(seed: int, n: int, settings: Settings) -> list[tuple[Prepared, Model]]:
    from river.datasets import synth

    def rows(source, k):
        X, y = [], []
        for x, label in source.take(k):
            X.append([float(v) for v in x.values()])
            y.append(float(label))
        return np.array(X), np.array(y)

    X_train, y_train = rows(synth.SEA(variant=0, seed=seed), 30_000)
    names = ["x0", "x1", "x2"]
    trained = train_model(X_train, y_train, names, num_boost_round=settings.train_num_boost_round,
                          drift_window=settings.drift_window, validation_fraction=settings.train_validation_fraction)
    version = ModelVersion("sea", 1, 0, None, "sea", names, [], None, None, trained.train_rows, trained.metrics,
                           trained.baseline, trained.threshold, {}, "bench")
    model = Model(trained.booster, version, "binary", {})
    change = n // 2
    out = []
    for name, source, change_at in (
        ("river: SEA 0->2 (ConceptDriftStream, width 1000)",
         synth.ConceptDriftStream(stream=synth.SEA(variant=0, seed=seed + 1), drift_stream=synth.SEA(variant=2, seed=seed + 2),
                                  position=change, width=1000, seed=seed + 3), change - 1500),
        ("river: SEA healthy", synth.SEA(variant=0, seed=seed + 4), None),
    ):
        X, y = rows(source, n)
        times = np.arange(n, dtype=np.int64) * 10_000 + 1_767_225_600_000
        stream = Stream(name, "river", [], 0, change_at)
        out.append((Prepared(stream, X, trained.booster.predict(X), y, times, times + 1, [f"r{i}" for i in range(n)],
                             names), model))
    return out


# --- running detectors ------------------------------------------------------------------------

@dataclass
class Run:
    requests: list[int]  # live indices of retrain requests (or raw alarms)
    signals: list[int] = field(default_factory=list)  # live indices of recorded detections
    seconds: float = 0.0
    cited: list[str] = field(default_factory=list)  # "channel/detector" of each request


class _SignalIsAction(DriftMonitor):
    """Round-1 policy: any recorded detection requests a retrain (with the cool-down)."""

    def should_request_retrain(self, signals, now_ms):
        signals = [replace(s, harm=s.harm or "covariate") for s in signals]
        return super().should_request_retrain(signals, now_ms)


def _events(prep: Prepared):
    """Live events in order with the labels that arrived before each: (i, labels [(j, value)])."""
    pending: list[tuple[int, int]] = []
    clock = -math.inf
    label_times = prep.label_times.tolist()
    times = prep.times.tolist()
    for i, t in enumerate(times):
        clock = max(clock, t)
        arrived = []
        while pending and pending[0][0] <= clock:
            arrived.append(heapq.heappop(pending)[1])
        yield i, arrived
        if label_times[i] >= 0:
            heapq.heappush(pending, (label_times[i], i))


def run_tracker(prep: Prepared, model: Model, config: DriftConfig, monitor_class=DriftMonitor) -> Run:
    tracker = DriftTracker(config, model.version.model_name)
    tracker.monitor = monitor_class(config, model.version.baseline, model.version.model_name, 1,
                                    reference_metrics=model.version.metrics,
                                    decision_threshold=model.version.threshold, objective=model.objective)
    rows = prep.X.tolist()
    scores = prep.scores.tolist()
    labels = prep.labels.tolist()
    times = prep.times.tolist()
    ids = prep.event_ids
    names = prep.names
    is_regression = model.objective == "regression"
    requests, signals, cited = [], [], []
    out = DriftOutputs()
    started = time.perf_counter()
    for i, arrived in _events(prep):
        for j in arrived:
            value = labels[j] if is_regression else int(labels[j])
            tracker.on_label({"event_id": ids[j], "label": value}, out)
        tracker.on_prediction({"event_id": ids[i], "model_version": 1, "score": scores[i], "event_time": times[i],
                               "features": dict(zip(names, rows[i]))}, out)
        if out.requests:
            requests += [i] * len(out.requests)
            cited += [f"{r['reason'].split(':', 1)[0]}/{r['detector']}" for r in out.requests]
        if any(row[3] == "drift" for row in out.rows):
            signals.append(i)
        out.clear()
    return Run(requests, signals, time.perf_counter() - started, cited)


def run_river_on_score(make: Callable[[], object]) -> Callable[[Prepared, Model], Run]:
    def run(prep: Prepared, model: Model) -> Run:
        detector, alarms = make(), []
        for i, s in enumerate(prep.scores.tolist()):
            detector.update(s)
            if detector.drift_detected:
                alarms.append(i)
        return Run(alarms)
    return run


def run_river_on_loss(prep: Prepared, model: Model) -> Run:
    detector, alarms = river_drift.ADWIN(), []
    scores, labels = prep.scores.tolist(), prep.labels.tolist()
    regression = model.objective == "regression"
    for i, arrived in _events(prep):
        for j in arrived:
            if regression:
                loss = abs(scores[j] - labels[j])
            else:
                p = min(max(scores[j], 1e-7), 1 - 1e-7)
                loss = -math.log(p if labels[j] else 1 - p)
            detector.update(loss)
            if detector.drift_detected:
                alarms.append(i)
    return Run(alarms)


def detectors(settings: Settings) -> dict[str, Callable[[Prepared, Model], Run]]:
    config = DriftConfig.from_settings(settings)
    # round 1: the same detectors plus per-event ADWIN/PageHinkley on the score, every detection an action,
    # and a cool-down without the breakthrough rule
    round1 = replace(config, detectors=frozenset({"adwin", "pagehinkley", "windowed", "performance", "estimated"}),
                     clear_windows=10**9)
    return {
        "service defaults": lambda p, m: run_tracker(p, m, config),
        "every detection requests (round-1 policy)": lambda p, m: run_tracker(p, m, round1, _SignalIsAction),
        "river ADWIN on score (raw)": run_river_on_score(river_drift.ADWIN),
        "river PageHinkley on score (raw)": run_river_on_score(river_drift.PageHinkley),
        "river ADWIN on per-label loss (raw)": run_river_on_loss,
        "always-fire": lambda p, m: Run(list(range(len(p.scores)))),
        "never-fire": lambda p, m: Run([]),
    }


# --- scoring ------------------------------------------------------------------------------------

@dataclass
class Harm:
    metric: str
    before: float
    after: float
    log_loss_before: float | None = None
    log_loss_after: float | None = None

    @property
    def harmful(self) -> bool:
        if self.metric == "auc":
            return (self.before - self.after > HARM_AUC_DROP
                    or self.log_loss_after > self.log_loss_before * HARM_LOG_LOSS_RATIO)
        return self.after > self.before * HARM_MAE_RATIO

    def describe(self) -> str:
        text = f"{self.metric} {self.before:.4g} -> {self.after:.4g}"
        if self.log_loss_before is not None:
            text += f", log loss {self.log_loss_before:.3g} -> {self.log_loss_after:.3g}"
        return text


def harm_of(prep: Prepared, objective: str) -> Harm | None:
    change = prep.stream.change_at
    if change is None:
        return None
    before = slice(max(0, change - 20_000), change)
    after = slice(change, None)
    if objective == "regression":
        mae = lambda part: float(np.mean(np.abs(prep.scores[part] - prep.labels[part])))
        return Harm("mae", mae(before), mae(after))
    from streamscore.learning.training import log_loss, roc_auc
    return Harm("auc", roc_auc(prep.labels[before], prep.scores[before]), roc_auc(prep.labels[after], prep.scores[after]),
                log_loss(prep.labels[before], prep.scores[before]), log_loss(prep.labels[after], prep.scores[after]))


@dataclass
class Score:
    healthy_events: int
    false_requests: int
    detected: bool | None
    delay: int | None
    delay_from_signal: int | None
    requests_after: int
    cited: str = ""


def score(prep: Prepared, run: Run) -> Score:
    change = prep.stream.change_at
    n = len(prep.scores)
    cited = ", ".join(sorted(set(run.cited)))
    if change is None:
        return Score(n, len(run.requests), None, None, None, 0, cited)
    false = [i for i in run.requests if i < change]
    after = [i for i in run.requests if i >= change]
    first_signal = next((i for i in run.signals if i >= change), None)
    delay = after[0] - change if after else None
    from_signal = after[0] - first_signal if after and first_signal is not None else None
    return Score(change, len(false), bool(after), delay, from_signal, len(after), cited)


def per_100k(count: int, events: int) -> float:
    return 1e5 * count / events if events else 0.0


# --- cost -----------------------------------------------------------------------------------------

def monitor_cost_us(prep: Prepared, model: Model, config: DriftConfig, repeats: int = 5, n: int = 40_000,
                    old_module=None) -> tuple[float, float | None]:
    """Median us per prediction of DriftMonitor.update_prediction (features as the service passes them),
    and of `old_module`'s DriftMonitor with ITS defaults on the same rows, interleaved (same run)."""
    from streamscore.drift.reference import MONITORING_KEY

    rows = [dict(zip(prep.names, r)) for r in prep.X[:n].tolist()]
    scores = prep.scores[:n].tolist()
    times = prep.times[:n].tolist()
    old_baseline = {k: v for k, v in model.version.baseline.items() if k != MONITORING_KEY}

    def one(make) -> float:
        update = make().update_prediction
        started = time.perf_counter()
        for row, s, t in zip(rows, scores, times):
            update(row, s, t)
        return (time.perf_counter() - started) / len(rows) * 1e6

    new, old = [], []
    for _ in range(repeats):
        new.append(one(lambda: DriftMonitor(config, model.version.baseline, "bench", 1,
                                            reference_metrics=model.version.metrics, objective=model.objective)))
        if old_module is not None:
            old.append(one(lambda: old_module.DriftMonitor(old_module.DriftConfig(), old_baseline, "bench", 1,
                                                           reference_metrics=model.version.metrics)))
    return statistics.median(new), (statistics.median(old) if old else None)


def load_old_monitor(revision: str):
    """streamscore/drift/monitor.py as of a git revision, loaded as a standalone module (it imports no
    streamscore code), to measure the round-1 monitor's cost in the same run."""
    import importlib.util
    import pathlib
    import subprocess
    import tempfile

    root = pathlib.Path(__file__).resolve().parents[2]
    text = subprocess.run(["git", "-C", str(root), "show", f"{revision}:shared/streamscore/drift/monitor.py"],
                          check=True, capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "old_drift_monitor.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_drift_monitor", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_drift_monitor"] = module
    spec.loader.exec_module(module)
    return module


# --- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter streams (healthy 100k, drifts 50k live)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--domains", default="payments,rides,river")
    parser.add_argument("--out", default=None, help="also write the markdown tables to this file")
    parser.add_argument("--old-monitor", default=None, metavar="GIT_REV",
                        help="also time the DriftMonitor of this git revision (e.g. b804a36) on the same rows")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("streamscore.drift_tracking").setLevel(logging.ERROR)  # one line per request otherwise
    settings = Settings()
    started = time.perf_counter()
    live, healthy_live = (50_000, 100_000) if args.quick else (80_000, 300_000)
    domains = args.domains.split(",")
    prepared: list[tuple[Prepared, Model]] = []
    notes = []
    for domain in ("payments", "rides"):
        if domain not in domains:
            continue
        spec = load_spec(_example(domain))
        t = time.perf_counter()
        if domain == "payments":
            streams = payments_streams(args.seed, 37, live, healthy_live)
            burn_in = 7 * 5000
        else:
            streams = rides_streams(args.seed, 15, live, 60_000 if args.quick else 200_000)
            burn_in = streams[0].history // 15
        model = train_domain(spec, streams[0], burn_in, settings)
        notes.append(f"{domain}: history {streams[0].history:,} events ({burn_in:,} burn-in), model trained on "
                     f"{model.version.train_rows:,} rows; holdout {_headline(model)}; built in "
                     f"{time.perf_counter() - t:.0f} s")
        for stream in streams:
            prepared.append((prepare(spec, stream, model, args.seed), model))
    if "river" in domains:
        prepared += river_streams(args.seed, 50_000 if args.quick else 100_000, settings)

    runners = detectors(settings)
    results: dict[tuple[str, str], Score] = {}
    harms: dict[str, Harm | None] = {}
    for prep, model in prepared:
        harms[prep.stream.name] = harm_of(prep, model.objective)
        for name, run in runners.items():
            results[(prep.stream.name, name)] = score(prep, run(prep, model))
        print(f"... {prep.stream.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    lines = [f"Seed {args.seed}; {'quick' if args.quick else 'full'} run; Settings() defaults "
             f"(window {settings.drift_window}, perf window {settings.drift_perf_window}, cool-down "
             f"{settings.drift_cooldown_events:,} events / {settings.drift_cooldown_s:.0f} s).", ""]
    lines += ["| stream | live events | change at | harms the model? (before -> after) | service: requests after change "
              "| cited evidence | delay from change (events) | delay from first signal | false requests / 100k healthy |",
              "|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for prep, model in prepared:
        s = results[(prep.stream.name, "service defaults")]
        h = harms[prep.stream.name]
        harm_text = "-" if h is None else f"{'**yes**' if h.harmful else 'no'} ({h.describe()})"
        lines.append(f"| {prep.stream.name} | {len(prep.scores):,} | "
                     f"{'-' if prep.stream.change_at is None else f'{prep.stream.change_at:,}'} | {harm_text} | "
                     f"{'-' if s.detected is None else s.requests_after} | {s.cited or '-'} | {_opt(s.delay)} | "
                     f"{_opt(s.delay_from_signal)} | "
                     f"{per_100k(s.false_requests, s.healthy_events):.2f} |")
    lines += ["", "Per detector over every stream: harmful shifts requested (and within 5,000 events of the change "
              "+ the label delay), harmless shifts requested, false requests per 100k healthy events.", "",
              "| detector | harmful shifts requested | median delay | harmless shifts requested | healthy events | "
              "false requests / 100k |", "|---|---:|---:|---:|---:|---:|"]
    for name in runners:
        harmful = [(p, results[(p.stream.name, name)]) for p, _ in prepared
                   if harms[p.stream.name] is not None and harms[p.stream.name].harmful]
        harmless = [(p, results[(p.stream.name, name)]) for p, _ in prepared
                    if harms[p.stream.name] is not None and not harms[p.stream.name].harmful]
        delays = [s.delay for _, s in harmful if s.delay is not None]
        healthy = sum(results[(p.stream.name, name)].healthy_events for p, _ in prepared)
        false = sum(results[(p.stream.name, name)].false_requests for p, _ in prepared)
        lines.append(f"| {name} | {sum(bool(s.detected) for _, s in harmful)}/{len(harmful)} | "
                     f"{statistics.median(delays) if delays else '-'} | "
                     f"{sum(bool(s.detected) for _, s in harmless)}/{len(harmless)} | {healthy:,} | "
                     f"{per_100k(false, healthy):.2f} |")
    healthy_prep = next((p, m) for p, m in prepared if p.stream.change_at is None)
    config = DriftConfig.from_settings(settings)
    old_module = load_old_monitor(args.old_monitor) if args.old_monitor else None
    cost, old_cost = monitor_cost_us(*healthy_prep, config, old_module=old_module)
    lines += ["", f"Monitor cost per prediction (DriftMonitor.update_prediction, service defaults, "
                  f"{healthy_prep[0].stream.name}, median of 5 x 40k, interleaved): {cost:.2f} us"
              + (f"; the monitor at {args.old_monitor} with its defaults, same rows, same run: {old_cost:.2f} us "
                 f"(new/old {cost / old_cost:.2f})" if old_cost else "") + ".", ""]
    lines += [f"- {note}" for note in notes]
    lines.append(f"- total {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


def _opt(value) -> str:
    return "-" if value is None else f"{value:,}"


def _headline(model: Model) -> str:
    m = model.version.metrics
    return f"MAE {m['mae']:.1f}" if model.objective == "regression" else f"AUC {m['auc']:.4f}, log loss {m['log_loss']:.4f}"


if __name__ == "__main__":
    sys.exit(main())
