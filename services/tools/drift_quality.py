"""Detection quality of streamscore.drift.monitor on streams with known change points.

How to reproduce:
    .venv/bin/python bench/drift_quality.py --quick     # ~20k events per stream, < 60 s on 2 cores
    .venv/bin/python bench/drift_quality.py             # 100k events per stream, a few minutes
    .venv/bin/python bench/drift_quality.py --out results.md   # also write the tables to a file

Everything is seeded; the same command prints the same table (timings aside).

Streams (each has a NO-DRIFT CONTROL of the same length from the same generator):
- covariate: 16 fraud-like features named as in streamscore.legacy.features (+ a score from a
  fixed logistic function of log_amount) with, at the change point, a mean shift of
  amount_zscore_7d (+0.75 std), a variance change of amount_zscore_7d (std 1 -> 2, same
  mean), a never-seen-category surge (mcc_code = 1 from 0.5% to 10%), or a score shift.
- concept: river.datasets.synth.ConceptDriftStream of SEA (variant 0 -> 2: error of the
  fixed model 1% -> 7%) and Agrawal (function 0 -> 2: error 1% -> 50%), width 1000 (river's
  sigmoid needs a width; "abrupt" at this scale). A model trained on a separate pre-drift
  prefix, then frozen (as a served LightGBM model is), scores every event; its label comes
  with the event (no label delay here). Covariates do not change, so feature and score
  detectors SHOULD stay quiet; only performance detectors can see this drift.

Detectors:
- monitor:* are streamscore.drift.monitor.DriftMonitor with the Settings() defaults (or one family);
  an alarm is an event whose update returned >= 1 signal (no cool-down: raw alarms).
- river:* are raw river detectors with river's default parameters on raw values (every
  feature and the score; alarm if any fires) or on the frozen model's per-event log loss /
  0-1 error. KSWIN costs ~600 us/update, so it sees every 10th value of one stream only.
- always-fire / never-fire are the reference detectors scored the same way.

Simulator streams (when streamscore.dev.simulator and streamscore.legacy.features exist): the
project's own event simulator with DriftSpec covariate (amounts x3), new_categories and
concept (card-testing fraud) at the change point, features from streamscore.legacy.features,
scored by a LightGBM model trained on the pre-drift part; every detector runs on them.

Scores: detected = an alarm at or after (change point - 1.5 width); delay = first such alarm
minus the change point, in events (negative = during the concept transition: river's sigmoid
gives the new concept a 0.25% share at change - 1.5 width, 12% at change - width/2, 50% at
the change point); FA/100k = alarms before (change point - 1.5 width) on the drift stream
plus all alarms on its control, per 100k no-drift events. A good detector detects with a small delay at FA/100k ~ 0.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from river import drift as river_drift
from river import linear_model, preprocessing, tree
from river.datasets import synth

from streamscore.drift.monitor import DriftConfig, DriftMonitor, histogram_bins
from streamscore.settings import Settings
from streamscore.learning.training import compute_baseline

FEATURES = ["amount", "log_amount", "hour_of_day", "count_1h", "sum_1h", "count_24h", "sum_24h", "mean_7d", "std_7d",
            "secs_since_prev", "distinct_mcc_24h", "amount_to_mean_7d", "amount_zscore_7d", "currency_code",
            "mcc_code", "channel_code", "country_code"]
CATEGORICAL = [f for f in FEATURES if f.endswith("_code")]
MCC_CODES = np.array([0, 1, 2, 3, 4, 5, 6], dtype=float)
MCC_P = np.array([0.05, 0.005, 0.3, 0.3, 0.2, 0.1, 0.045])


@dataclass
class Stream:
    name: str
    kind: str  # covariate | concept
    rows: list[dict]
    scores: list[float]
    labels: list[int] | None
    change_at: int | None  # None: control
    width: int
    baseline: dict
    reference_metrics: dict = field(default_factory=dict)

    @property
    def quiet_until(self) -> int:
        """Alarms before this index are false alarms."""
        return len(self.rows) if self.change_at is None else self.change_at - (3 * self.width) // 2


# --- stream generators -------------------------------------------------------------

def fraud_like_columns(n: int, rng: np.random.Generator, change: str | None, change_at: int) -> tuple[np.ndarray, np.ndarray]:
    amount = rng.lognormal(3.0, 1.0, n)
    zscore = rng.normal(0.0, 1.0, n)
    mcc = rng.choice(MCC_CODES, n, p=MCC_P)
    after = slice(change_at, n)
    if change == "mean_shift":
        zscore[after] += 0.75
    elif change == "variance_change":
        zscore[after] *= 2.0
    elif change == "new_category":
        mcc[after] = np.where(rng.random(n - change_at) < 0.1, 1.0, mcc[after])
    cols = {
        "amount": amount, "log_amount": np.log1p(amount), "hour_of_day": rng.integers(0, 24, n).astype(float),
        "count_1h": rng.poisson(1.0, n).astype(float), "sum_1h": rng.lognormal(3.0, 1.2, n),
        "count_24h": rng.poisson(5.0, n).astype(float), "sum_24h": rng.lognormal(5.0, 1.0, n),
        "mean_7d": rng.lognormal(3.0, 0.5, n), "std_7d": np.where(rng.random(n) < 0.2, np.nan, rng.lognormal(2.0, 0.5, n)),
        "secs_since_prev": rng.exponential(3600.0, n), "distinct_mcc_24h": rng.poisson(2.0, n).astype(float),
        "amount_to_mean_7d": rng.lognormal(0.0, 0.5, n), "amount_zscore_7d": zscore,
        "currency_code": rng.choice([2.0, 3.0, 4.0], n, p=[0.8, 0.15, 0.05]), "mcc_code": mcc,
        "channel_code": rng.choice([2.0, 3.0, 4.0], n), "country_code": rng.choice([2.0, 3.0, 5.0, 7.0], n),
    }
    X = np.column_stack([cols[f] for f in FEATURES])
    score = 1.0 / (1.0 + np.exp(4.0 - 0.8 * (cols["log_amount"] - 3.0)))
    if change == "score_shift":
        score[after] = 1.0 / (1.0 + np.exp(3.5 - 0.8 * (cols["log_amount"][after] - 3.0)))
    return X, score


def with_exact_bins(baseline: dict, X: np.ndarray, names: list[str]) -> dict:
    """compute_baseline + exact PSI bins (what the trainer should store; see drift.histogram_bins)."""
    for j, name in enumerate(names):
        if "frequencies" not in baseline[name]:
            baseline[name]["bins"] = histogram_bins(X[:, j], baseline[name]["quantiles"])
    return baseline


def covariate_streams(n: int, seed: int) -> list[Stream]:
    rng = np.random.default_rng(seed)
    X_train, s_train = fraud_like_columns(50_000, rng, None, 0)
    baseline = with_exact_bins(compute_baseline(X_train, FEATURES, s_train, categorical_features=CATEGORICAL),
                               X_train, FEATURES)
    change_at = n // 2
    streams = []
    for change in ("mean_shift", "variance_change", "new_category", "score_shift", None):
        X, score = fraud_like_columns(n, rng, change, change_at)
        rows = [dict(zip(FEATURES, r)) for r in X.tolist()]
        streams.append(Stream(f"covariate:{change or 'control'}", "covariate", rows, score.tolist(), None,
                              change_at if change else None, 0, baseline))
    return streams


def concept_streams(n: int, seed: int) -> list[Stream]:
    specs = [
        ("SEA 0->2", lambda s: synth.SEA(variant=0, seed=s), lambda s: synth.SEA(variant=2, seed=s),
         lambda: preprocessing.StandardScaler() | linear_model.LogisticRegression()),
        ("Agrawal 0->2", lambda s: synth.Agrawal(classification_function=0, seed=s),
         lambda s: synth.Agrawal(classification_function=2, seed=s),
         lambda: tree.HoeffdingTreeClassifier(grace_period=100)),
    ]
    width, change_at = 1000, n // 2
    streams = []
    for name, base, drifted, make_model in specs:
        model = make_model()
        for x, y in base(seed).take(5000):
            model.learn_one(x, y)
        # validation slice: the model's reference metrics and the baseline, as the trainer makes them
        valid = list(base(seed + 1).take(5000))
        names = [str(k) for k in valid[0][0]]
        X_valid = np.array([[float(v) for v in x.values()] for x, _ in valid])
        s_valid = np.array([_proba(model, x) for x, _ in valid])
        y_valid = np.array([int(y) for _, y in valid])
        baseline = with_exact_bins(compute_baseline(X_valid, names, s_valid), X_valid, names)
        clipped = np.clip(s_valid, 1e-7, 1 - 1e-7)
        reference = {"log_loss": float(np.mean(-(y_valid * np.log(clipped) + (1 - y_valid) * np.log(1 - clipped))))}
        for label, source in (
            (name, synth.ConceptDriftStream(stream=base(seed + 2), drift_stream=drifted(seed + 3),
                                            position=change_at, width=width, seed=seed + 4)),
            (f"{name} control", base(seed + 5)),
        ):
            rows, scores, labels = [], [], []
            for x, y in source.take(n):
                rows.append({str(k): float(v) for k, v in x.items()})
                scores.append(_proba(model, x))
                labels.append(int(y))
            is_drift = label == name
            streams.append(Stream(f"concept:{label}", "concept", rows, scores, labels,
                                  change_at if is_drift else None, width if is_drift else 0, baseline, reference))
    return streams


def _proba(model, x) -> float:
    return float(model.predict_proba_one(x).get(True, 0.0))


def _losses(stream: Stream) -> tuple[list[float], list[float]]:
    log_loss, error = [], []
    for p, y in zip(stream.scores, stream.labels):
        q = min(max(p, 1e-7), 1 - 1e-7)
        log_loss.append(-math.log(q) if y else -math.log(1 - q))
        error.append(float((p >= 0.5) != bool(y)))
    return log_loss, error


# --- detectors: each returns the sorted event indices at which it alarmed -------------

def monitor_detector(config: DriftConfig) -> Callable[[Stream], list[int]]:
    def run(stream: Stream) -> list[int]:
        monitor = DriftMonitor(config, stream.baseline, "bench", 1, reference_metrics=stream.reference_metrics)
        alarms = []
        labels = stream.labels
        update_prediction, update_label = monitor.update_prediction, monitor.update_label
        for i, (row, score) in enumerate(zip(stream.rows, stream.scores)):
            fired = update_prediction(row, score, i)
            if labels is not None and update_label(score, labels[i], i):
                fired = True
            if fired:
                alarms.append(i)
        return alarms
    return run


def river_on_values(make: Callable[[], object], every: int = 1, score_only: bool = False) -> Callable[[Stream], list[int]]:
    """One river detector per raw stream (every feature + the score); alarm if any fires."""
    def run(stream: Stream) -> list[int]:
        names = [] if score_only else list(stream.rows[0])
        detectors = {name: make() for name in [*names, "score"]}
        alarms = []
        for i, (row, score) in enumerate(zip(stream.rows, stream.scores)):
            if i % every:
                continue
            fired = False
            for name, detector in detectors.items():
                x = score if name == "score" else row[name]
                if x != x:
                    continue
                detector.update(x)
                fired |= detector.drift_detected
            if fired:
                alarms.append(i)
        return alarms
    return run


def river_on_model(make: Callable[[], object], signal: str, every: int = 1) -> Callable[[Stream], list[int]]:
    """A river detector on the frozen model's per-event log loss or 0/1 error (concept streams)."""
    def run(stream: Stream) -> list[int]:
        if stream.labels is None:
            return []
        log_loss, error = _losses(stream)
        values = log_loss if signal == "log_loss" else error
        detector, alarms = make(), []
        for i in range(0, len(values), every):
            detector.update(values[i])
            if detector.drift_detected:
                alarms.append(i)
        return alarms
    return run


def always_fire(stream: Stream) -> list[int]:
    return list(range(len(stream.rows)))


def never_fire(stream: Stream) -> list[int]:
    return []


def detectors(settings: Settings) -> dict[str, tuple[set[str], Callable[[Stream], list[int]]]]:
    """name -> (stream kinds it applies to, runner)."""
    base = DriftConfig.from_settings(settings)
    both = {"covariate", "concept"}
    return {
        "monitor: defaults": (both, monitor_detector(base)),
        "monitor: windowed only": (both, monitor_detector(DriftConfig(**{**base.__dict__, "detectors": frozenset({"windowed"})}))),
        "monitor: adwin+PH on score only": (both, monitor_detector(DriftConfig(**{**base.__dict__, "detectors": frozenset({"adwin", "pagehinkley"})}))),
        "monitor: performance only": ({"concept"}, monitor_detector(DriftConfig(**{**base.__dict__, "detectors": frozenset({"performance"})}))),
        "monitor: + per-event ADWIN/PH on all features": ({"covariate"}, monitor_detector(DriftConfig(**{**base.__dict__, "event_features": ("all",)}))),
        "river: ADWIN (default) raw, every feature+score": ({"covariate"}, river_on_values(river_drift.ADWIN)),
        "river: PageHinkley (default) raw, every feature+score": ({"covariate"}, river_on_values(river_drift.PageHinkley)),
        "river: KSWIN (default) on score, 1/10 subsample": ({"covariate"}, river_on_values(lambda: river_drift.KSWIN(seed=1), every=10, score_only=True)),
        "river: ADWIN (default) on log loss": ({"concept"}, river_on_model(river_drift.ADWIN, "log_loss")),
        "river: ADWIN (default) on 0/1 error": ({"concept"}, river_on_model(river_drift.ADWIN, "error")),
        "river: PageHinkley (default) on 0/1 error": ({"concept"}, river_on_model(river_drift.PageHinkley, "error")),
        "river: KSWIN (default) on log loss, 1/10 subsample": ({"concept"}, river_on_model(lambda: river_drift.KSWIN(seed=1), "log_loss", every=10)),
        "reference: always-fire": (both, always_fire),
        "reference: never-fire": (both, never_fire),
    }


# --- scoring ----------------------------------------------------------------------------

@dataclass
class Score:
    detected: bool | None  # None on controls
    delay: int | None
    false_alarms: int
    quiet_events: int
    seconds: float


def score(stream: Stream, alarms: list[int], seconds: float) -> Score:
    quiet_until = stream.quiet_until
    false_alarms = sum(1 for i in alarms if i < quiet_until)
    if stream.change_at is None:
        return Score(None, None, false_alarms, len(stream.rows), seconds)
    after = [i for i in alarms if i >= quiet_until]
    return Score(bool(after), (after[0] - stream.change_at) if after else None, false_alarms, quiet_until, seconds)


def fa_per_100k(false_alarms: int, events: int) -> float:
    return 1e5 * false_alarms / events if events else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k events per stream (CI-sized), else 100k")
    parser.add_argument("--events", type=int, default=None, help="events per stream (overrides --quick)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    n = args.events or (20_000 if args.quick else 100_000)
    settings = Settings()
    started = time.perf_counter()

    streams = covariate_streams(n, args.seed) + concept_streams(n, args.seed)
    streams += simulator_streams(n, args.seed)
    generated = time.perf_counter() - started

    results: dict[tuple[str, str], Score] = {}
    all_detectors = detectors(settings)
    for stream in streams:
        for name, (kinds, run) in all_detectors.items():
            if stream.kind not in kinds and not (stream.kind == "simulator" and kinds & {"covariate", "concept"}):
                continue
            t = time.perf_counter()
            alarms = run(stream)
            results[(stream.name, name)] = score(stream, alarms, time.perf_counter() - t)

    lines = [f"# Drift detection quality ({n} events per stream, seed {args.seed})", ""]
    lines += ["Per stream (drift streams: change at event %d; controls: no change)." % (n // 2), "",
              "| stream | detector | detected | delay (events) | false alarms / 100k | us/event |",
              "|---|---|---|---|---|---|"]
    for stream in streams:
        for name in all_detectors:
            s = results.get((stream.name, name))
            if s is None:
                continue
            detected = "-" if s.detected is None else ("yes" if s.detected else "NO")
            delay = "-" if s.delay is None else str(s.delay)
            lines.append(f"| {stream.name} | {name} | {detected} | {delay} | "
                         f"{fa_per_100k(s.false_alarms, s.quiet_events):.0f} | {1e6 * s.seconds / len(stream.rows):.1f} |")
    lines += ["", "Summary per detector over the streams it applies to (FA/100k over every no-drift event: "
              "pre-change parts and controls).", "",
              "| detector | streams detected | median delay | max delay | false alarms / 100k |", "|---|---|---|---|---|"]
    for name in all_detectors:
        scores = [s for (st, d), s in results.items() if d == name]
        drifts = [s for s in scores if s.detected is not None]
        delays = [s.delay for s in drifts if s.delay is not None]
        fa = fa_per_100k(sum(s.false_alarms for s in scores), sum(s.quiet_events for s in scores))
        lines.append(f"| {name} | {sum(s.detected for s in drifts)}/{len(drifts)} | "
                     f"{statistics.median(delays) if delays else '-'} | {max(delays) if delays else '-'} | {fa:.0f} |")
    lines += ["", f"simulator streams: {SIMULATOR_NOTE}",
              f"generation {generated:.1f} s, total {time.perf_counter() - started:.1f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


SIMULATOR_NOTE = "not run"


def simulator_streams(n: int, seed: int) -> list[Stream]:
    """Feature streams from streamscore.dev.simulator + streamscore.legacy.features, scored by a small
    LightGBM model trained on the pre-drift part (skipped if those modules are missing)."""
    global SIMULATOR_NOTE
    try:
        import lightgbm
        from streamscore.legacy import features as feature_defs
        from streamscore.dev.simulator import DriftSpec, Simulator
    except ImportError as exc:
        SIMULATOR_NOTE = f"skipped: {exc}"
        return []
    names = list(feature_defs.FEATURE_NAMES)
    n_entities = 200  # 2000 events per simulated day: the 7-day windows fill in a 14k burn-in
    burn_in, n_train = 14_000, 20_000
    change_at = n // 2

    def run(drift):
        states: dict = {}
        X, y = [], []
        for event, label in Simulator(seed, n_entities=n_entities, drift=drift).events(burn_in + n_train + n):
            X.append(feature_defs.compute_and_update(states, event))
            y.append(int(label["label"]))
        return np.array(X[burn_in:], dtype=float), np.array(y[burn_in:])

    X_control, y_control = run(None)
    X_train, y_train = X_control[:n_train], y_control[:n_train]
    booster = lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1, "num_leaves": 15},
                             lightgbm.Dataset(X_train, y_train, feature_name=names), num_boost_round=60)
    s_train = booster.predict(X_train)
    categorical = [f for f in names if f.endswith("_code")]
    baseline = with_exact_bins(compute_baseline(X_train, names, s_train, categorical_features=categorical), X_train, names)
    clipped = np.clip(s_train, 1e-7, 1 - 1e-7)
    reference = {"log_loss": float(np.mean(-(y_train * np.log(clipped) + (1 - y_train) * np.log(1 - clipped))))}
    streams = []
    for kind in ("covariate", "new_categories", "concept", None):
        if kind is None:
            X, y = X_control, y_control
        else:
            X, y = run(DriftSpec(kind=kind, at_event=burn_in + n_train + change_at))
        X, y = X[n_train:], y[n_train:]
        score = booster.predict(X)
        rows = [dict(zip(names, r)) for r in X.tolist()]
        streams.append(Stream(f"simulator:{kind or 'control'}", "simulator", rows, score.tolist(), y.tolist(),
                              change_at if kind else None, 0, baseline, reference))
    SIMULATOR_NOTE = (f"run: Simulator(seed={seed}, n_entities={n_entities}), {burn_in} burn-in events, LightGBM "
                      f"trained on the next {n_train}, labels fed with each prediction (no delay)")
    return streams


if __name__ == "__main__":
    sys.exit(main())
