"""Drift statistics for one served model version: pure, river-based, no I/O.

The drift service feeds every prediction and every (late) label of the served
model into a `DriftMonitor` and gets back `DriftSignal`s; it asks
`should_request_retrain` whether a signal becomes a RetrainRequest, and writes
`snapshot()` statistics to ClickHouse periodically.

Four detector families (DriftConfig.detectors):

- windowed (the primary, interpretable one): every `window` predictions, for each
  monitored feature and the score, compare the tumbling window with the training
  baseline: PSI over the baseline's bins, |mean shift| in baseline-std units,
  NaN fraction, and for *_code features the share of code 1 (never-seen category).
- adwin / pagehinkley: river detectors updated per event on the score (and,
  optionally, on chosen features). Values are first mapped through the
  baseline's CDF (probability integral transform, 0..1), which makes one
  threshold fit every stream and keeps ADWIN's bounded-input assumption true
  for heavy-tailed features like amount.
- performance: rolling log loss and AUC over the last `perf_window` labels vs the
  model's validation metrics (or, when those are missing, vs the first full
  label window this monitor saw).

Warm-up (`min_events`) suppresses alarms right after a model swap; the cool-down
gate (`should_request_retrain`) turns one sustained shift into ONE retrain
request. State survives restarts through `to_bytes`/`from_bytes`.

Why per-event detectors run only on the score by default: see
bench/drift_quality.py (false alarms on bursty features, cost per feature).
"""
from __future__ import annotations

import math
import pickle
from bisect import bisect_left
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
from river import drift as river_drift

SCORE = "score"  # the baseline key of the model score (training.compute_baseline)
QUANTILE_LEVELS = ("0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99")
UNKNOWN_CODE = 1.0  # *_code features: 0 = missing, 1 = never seen in the vocabulary
DETECTOR_FAMILIES = frozenset({"adwin", "pagehinkley", "windowed", "performance"})
# Diurnal by construction: a window covering part of a day always differs from
# a training set covering whole days, so it is not monitored unless asked for.
NOT_MONITORED_BY_DEFAULT = frozenset({"hour_of_day"})

_STATE_HEADER = b"streamscore.drift.monitor.DriftMonitor\n"
_STATE_VERSION = 1
_EPS = 1e-4  # floor of a bin fraction in PSI (an empty bin would be infinite)
_MIN_WINDOW_VALUES = 50  # fewer non-NaN values in a window: no mean / PSI for it
_LOSS_CLIP = 1e-7
# AUC from fewer positives (or negatives) than this has a standard error above ~0.03:
# a 0.1 "drop" would be noise. Fraud windows need perf_window * positive_rate >= this.
_MIN_CLASS_FOR_AUC = 100
# A ratio to a near-perfect validation log loss (a tree that was never wrong on
# validation reports ~1e-7) turns the first mistake into a 1000x "drift".
_MIN_REFERENCE_LOGLOSS = 0.01
# Per-label log loss fed to ADWIN is capped (p=0.001 on the wrong side): ADWIN's bound
# assumes bounded values and one confident miss should not look like a regime change.
_LOSS_CAP_FOR_ADWIN = -math.log(1e-3)


class IncompatibleDriftState(ValueError):
    """Saved monitor state cannot continue under the given configuration."""


@dataclass(frozen=True)
class DriftConfig:
    """Knobs of the DriftMonitor; `from_settings` maps the drift_* settings (see their descriptions)."""

    detectors: frozenset[str] = frozenset({"adwin", "pagehinkley", "windowed", "performance"})
    features: tuple[str, ...] = ()  # empty = every baseline feature but NOT_MONITORED_BY_DEFAULT
    event_features: tuple[str, ...] = ()  # per-event ADWIN/PH besides the score; ("all",) = all
    window: int = 2000
    psi_threshold: float = 0.25
    mean_shift_threshold: float = 0.5
    nan_fraction_threshold: float = 0.1
    unknown_rate_threshold: float = 0.05
    adwin_delta: float = 1e-6
    ph_delta: float = 0.01
    ph_threshold: float = 100.0
    min_events: int = 2000
    cooldown_events: int = 50_000
    cooldown_s: float = 600.0
    perf_window: int = 5000
    logloss_ratio_threshold: float = 1.5
    auc_drop_threshold: float = 0.1

    def __post_init__(self) -> None:
        unknown = set(self.detectors) - DETECTOR_FAMILIES
        if unknown:
            raise ValueError(f"drift_detectors: unknown detector(s) {sorted(unknown)}; known: {sorted(DETECTOR_FAMILIES)}")
        object.__setattr__(self, "detectors", frozenset(self.detectors))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "event_features", tuple(self.event_features))
        for name in ("window", "perf_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"drift_{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.adwin_delta < 1:
            raise ValueError(f"drift_adwin_delta must be in (0, 1), got {self.adwin_delta}")

    @classmethod
    def from_settings(cls, settings: Any) -> "DriftConfig":
        return cls(
            detectors=frozenset(_split(settings.drift_detectors)),
            features=_split(settings.drift_features),
            event_features=_split(settings.drift_event_features),
            window=settings.drift_window,
            psi_threshold=settings.drift_psi_threshold,
            mean_shift_threshold=settings.drift_mean_shift_threshold,
            nan_fraction_threshold=settings.drift_nan_fraction_threshold,
            unknown_rate_threshold=settings.drift_unknown_rate_threshold,
            adwin_delta=settings.drift_adwin_delta,
            ph_delta=settings.drift_ph_delta,
            ph_threshold=settings.drift_ph_threshold,
            min_events=settings.drift_min_events,
            cooldown_events=settings.drift_cooldown_events,
            cooldown_s=settings.drift_cooldown_s,
            perf_window=settings.drift_perf_window,
            logloss_ratio_threshold=settings.drift_logloss_ratio_threshold,
            auc_drop_threshold=settings.drift_auc_drop_threshold,
        )

    def structure(self) -> tuple:
        """The fields saved detector state depends on; thresholds may change across a restart."""
        return (self.detectors, self.features, self.event_features, self.window, self.adwin_delta,
                self.ph_delta, self.ph_threshold, self.perf_window)


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class DriftSignal:
    """One detection. `feature` is None for model-level (performance) detectors."""

    detector: str  # adwin | pagehinkley | psi | mean_shift | nan_fraction | unknown_rate | logloss_ratio | auc_drop
    feature: str | None
    statistic: str
    value: float
    threshold: float
    window: int  # events (or labels) the statistic was computed over
    at_ms: int  # event time of the prediction/label that completed the evidence
    baseline: float | None = None

    @property
    def reason(self) -> str:
        where = f" on {self.feature}" if self.feature else ""
        base = f" (baseline {self.baseline:.4g})" if self.baseline is not None else ""
        return f"{self.detector}{where}: {self.statistic}={self.value:.4g} > {self.threshold:.4g} over {self.window}{base}"


@dataclass(frozen=True)
class Statistic:
    """A periodic value for the drift_events table (kind='statistic')."""

    feature: str | None
    statistic: str
    value: float
    baseline: float | None
    window: int
    at_ms: int


# --- baseline helpers -----------------------------------------------------------

@dataclass(frozen=True)
class _FeatureReference:
    """What the monitor needs from one baseline entry, precomputed."""

    name: str
    mean: float | None
    std: float | None
    nan_fraction: float
    # PSI bins: values x go to bin searchsorted(edges, x, 'left'), i.e. (-inf,e0], (e0,e1], ..., (e_last, inf)
    edges: np.ndarray | None
    expected: np.ndarray | None
    categorical_codes: np.ndarray | None  # categorical PSI over these codes (+ one "other" bin)
    unknown_fraction: float | None  # only for *_code features
    cdf_x: list[float]  # piecewise-linear baseline CDF for the per-event detectors
    cdf_p: list[float]

    def to_unit(self, x: float) -> float:
        """Baseline CDF at x (probability integral transform), in [0.005, 0.995]."""
        xs = self.cdf_x
        i = bisect_left(xs, x)
        if i == 0:
            return 0.005
        if i == len(xs):
            return 0.995
        x0, x1 = xs[i - 1], xs[i]
        p0, p1 = self.cdf_p[i - 1], self.cdf_p[i]
        return p0 + (p1 - p0) * (x - x0) / (x1 - x0)


def quantile_bins(quantiles: Mapping[str, float | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """PSI bins (edges, expected fractions) estimated from a baseline's quantiles.

    Distinct quantile values are the edges. Where several levels share a value
    (a point mass, e.g. count_1h = 0) the CDF there is only known to lie between
    the highest such level and the next level; the midpoint is used. Prefer
    exact bins (baseline entry "bins", see `histogram_bins`) when available.
    """
    pairs = [(float(lv), quantiles.get(lv)) for lv in QUANTILE_LEVELS]
    pairs = [(p, float(q)) for p, q in pairs if q is not None and math.isfinite(float(q))]
    if not pairs:
        return None
    values = sorted({q for _, q in pairs})
    levels = [p for p, _ in pairs]
    cdf = []
    for v in values:
        at = [p for p, q in pairs if q == v]
        highest = max(at)
        following = [p for p in levels if p > highest]
        next_level = min(following) if following else 1.0
        cdf.append(highest if len(at) == 1 else (highest + next_level) / 2)
    fractions = np.diff(np.array([0.0, *cdf, 1.0]))
    return np.array(values), np.maximum(fractions, 0.0)


def histogram_bins(values: np.ndarray, quantiles: Mapping[str, float | None]) -> dict[str, list[float]]:
    """Exact baseline bins for a training column: {"edges", "fractions"} over the
    quantile edges, counted with the monitor's rule. Add as baseline[name]["bins"]
    to get PSI without the tie approximation of `quantile_bins` (integer features)."""
    edges = sorted({float(q) for q in quantiles.values() if q is not None and math.isfinite(float(q))})
    finite = np.asarray(values, dtype=float)
    finite = finite[~np.isnan(finite)]
    counts = np.bincount(np.searchsorted(np.array(edges), finite, side="left"), minlength=len(edges) + 1)
    return {"edges": edges, "fractions": (counts / max(1, finite.size)).tolist()}


def _reference(name: str, stats: Mapping[str, Any]) -> _FeatureReference | None:
    """None if the baseline cannot support any comparison for this feature (e.g. all NaN in training)."""
    quantiles = stats.get("quantiles") or {}
    mean, std = stats.get("mean"), stats.get("std")
    nan_fraction = float(stats.get("nan_fraction") or 0.0)
    frequencies = stats.get("frequencies")
    is_code = name.endswith("_code")
    edges = expected = codes = None
    if frequencies:
        codes = np.array(sorted(float(c) for c in frequencies))
        expected = np.array([float(frequencies[str(int(c))]) for c in codes] + [0.0])
    elif stats.get("bins"):
        edges = np.array(stats["bins"]["edges"], dtype=float)
        expected = np.array(stats["bins"]["fractions"], dtype=float)
    else:
        bins = quantile_bins(quantiles)
        # Quantiles cannot say how much mass sits ON an integer value (count_1h = 0 may be
        # 37% or 49%), so the bin estimate of a discrete feature is off by enough to fake a
        # PSI of 0.2-0.5 with no drift at all. Those features get mean shift only, unless
        # the baseline carries exact "bins".
        if bins is not None and not is_code and not _looks_discrete(quantiles):
            edges, expected = bins
    unknown = None
    if is_code:
        unknown = float(frequencies.get("1", 0.0)) if frequencies else _mass_at(quantiles, UNKNOWN_CODE)
    cdf_x, cdf_p = [], []
    for level in QUANTILE_LEVELS:
        q = quantiles.get(level)
        if q is not None and math.isfinite(float(q)) and (not cdf_x or float(q) > cdf_x[-1]):
            cdf_x.append(float(q))
            cdf_p.append(float(level))
    if mean is None and expected is None and unknown is None:
        return None
    return _FeatureReference(
        name=name,
        mean=None if mean is None else float(mean),
        std=None if std is None else float(std),
        nan_fraction=nan_fraction,
        edges=edges,
        expected=expected,
        categorical_codes=codes,
        unknown_fraction=unknown,
        cdf_x=cdf_x,
        cdf_p=cdf_p,
    )


def _looks_discrete(quantiles: Mapping[str, float | None]) -> bool:
    values = [float(q) for q in quantiles.values() if q is not None and math.isfinite(float(q))]
    return bool(values) and all(v == int(v) for v in values)


def _mass_at(quantiles: Mapping[str, float | None], value: float) -> float:
    """Rough share of a point mass from quantiles: 0 unless some level sits on it."""
    bins = quantile_bins(quantiles)
    if bins is None:
        return 0.0
    edges, fractions = bins
    hits = np.nonzero(edges == value)[0]
    return float(fractions[hits[0]]) if hits.size else 0.0


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two fraction vectors (each bin floored at 1e-4)."""
    a = np.maximum(actual, _EPS)
    e = np.maximum(expected, _EPS)
    return float(np.sum((a - e) * np.log(a / e)))


# --- per-event detectors ----------------------------------------------------------

class _EventDetectors:
    """ADWIN and/or PageHinkley on one stream, fed the baseline-CDF transform of each value."""

    __slots__ = ("adwin", "page_hinkley", "reference")

    def __init__(self, config: DriftConfig, reference: _FeatureReference | None):
        self.reference = reference if reference is not None and len(reference.cdf_x) >= 2 else None
        self.adwin = river_drift.ADWIN(delta=config.adwin_delta) if "adwin" in config.detectors else None
        # alpha=1 (classic Page-Hinkley): river's default fading (0.9999) keeps the cumulative
        # sum hovering while its all-time minimum keeps falling, so on a long stationary
        # stream it alarms eventually (measured: ~2 false alarms / 100k events on the score).
        self.page_hinkley = (
            river_drift.PageHinkley(min_instances=30, delta=config.ph_delta, threshold=config.ph_threshold, alpha=1.0)
            if "pagehinkley" in config.detectors
            else None
        )

    def update(self, x: float) -> tuple[bool, bool, float]:
        u = self.reference.to_unit(x) if self.reference is not None else x
        adwin_fired = ph_fired = False
        if self.adwin is not None:
            self.adwin.update(u)
            adwin_fired = self.adwin.drift_detected
        if self.page_hinkley is not None:
            self.page_hinkley.update(u)
            ph_fired = self.page_hinkley.drift_detected
        return adwin_fired, ph_fired, u


# --- the monitor -------------------------------------------------------------------

_PRIORITY = {"logloss_ratio": 0, "auc_drop": 1, "psi": 2, "mean_shift": 3, "unknown_rate": 4,
             "nan_fraction": 5, "adwin": 6, "pagehinkley": 7}


@dataclass
class _Performance:
    """Rolling window of labeled predictions with an O(1) running log loss."""

    size: int
    scores: deque = field(default_factory=deque)
    labels: deque = field(default_factory=deque)
    losses: deque = field(default_factory=deque)
    loss_sum: float = 0.0
    positives: int = 0
    seen: int = 0

    def add(self, score: float, label: int) -> None:
        p = min(max(score, _LOSS_CLIP), 1.0 - _LOSS_CLIP)
        loss = -math.log(p) if label else -math.log(1.0 - p)
        self.scores.append(score)
        self.labels.append(label)
        self.losses.append(loss)
        self.loss_sum += loss
        self.positives += label
        self.seen += 1
        if len(self.losses) > self.size:
            self.scores.popleft()
            self.loss_sum -= self.losses.popleft()
            self.positives -= self.labels.popleft()
        if self.seen % self.size == 0:  # re-add from scratch now and then: no float drift
            self.loss_sum = math.fsum(self.losses)

    @property
    def full(self) -> bool:
        return len(self.losses) >= self.size

    @property
    def log_loss(self) -> float:
        return self.loss_sum / len(self.losses) if self.losses else math.nan

    def auc(self) -> float:
        """ROC AUC with ties as 1/2 (Mann-Whitney); NaN without both classes."""
        n = len(self.labels)
        positives = self.positives
        if positives == 0 or positives == n:
            return math.nan
        scores = np.fromiter(self.scores, dtype=float, count=n)
        labels = np.fromiter(self.labels, dtype=np.int8, count=n)
        order = np.argsort(scores, kind="mergesort")
        sorted_scores = scores[order]
        ranks = np.empty(n)
        # average ranks over ties
        _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
        average = first + (counts + 1) / 2.0
        ranks[order] = np.repeat(average, counts)
        rank_sum = ranks[labels == 1].sum()
        return float((rank_sum - positives * (positives + 1) / 2) / (positives * (n - positives)))

    def precision_recall(self, threshold: float) -> tuple[float, float]:
        scores = np.fromiter(self.scores, dtype=float, count=len(self.scores))
        labels = np.fromiter(self.labels, dtype=np.int8, count=len(self.labels))
        flagged = scores >= threshold
        tp = float(np.sum(flagged & (labels == 1)))
        precision = tp / float(flagged.sum()) if flagged.any() else math.nan
        recall = tp / float(self.positives) if self.positives else math.nan
        return precision, recall


class DriftMonitor:
    """All drift state of one served model version. Not thread-safe; one per model."""

    def __init__(
        self,
        config: DriftConfig,
        baseline: Mapping[str, Any],
        model_name: str,
        model_version: int,
        *,
        reference_metrics: Mapping[str, float] | None = None,
        decision_threshold: float = 0.5,
    ):
        """reference_metrics: the version's validation metrics ("log_loss", "auc" are used);
        decision_threshold: the serving threshold, for precision/recall statistics."""
        self.config = config
        self.model_name = model_name
        self._last_request_ms: int | None = None
        self._last_request_event: int | None = None
        self.reset(baseline, model_version, reference_metrics=reference_metrics, decision_threshold=decision_threshold)

    # -- lifecycle -------------------------------------------------------------------

    def reset(
        self,
        baseline: Mapping[str, Any],
        model_version: int,
        *,
        reference_metrics: Mapping[str, float] | None = None,
        decision_threshold: float = 0.5,
    ) -> None:
        """Start over for a new model version: new baseline, empty detectors, warm-up, no cool-down."""
        config = self.config
        self.model_version = int(model_version)
        self.baseline = dict(baseline)
        self.reference_metrics = dict(reference_metrics or {})
        self.decision_threshold = float(decision_threshold) if decision_threshold is not None else 0.5
        wanted = config.features or tuple(name for name in baseline if name not in NOT_MONITORED_BY_DEFAULT)
        references = {}
        # The score is always monitored and always the last column of a window row.
        for name in (*(n for n in wanted if n != SCORE), SCORE):
            stats = baseline.get(name)
            if stats is None:
                if name in config.features:
                    raise ValueError(f"drift_features names {name!r}, which the model's baseline does not have")
                continue
            reference = _reference(name, stats)
            if reference is not None:
                references[name] = reference
        self.monitored: tuple[str, ...] = tuple(references)  # features..., then score (last) if available
        self._references = references
        self._score_column = self.monitored.index(SCORE) if SCORE in references else None
        self._feature_columns = [n for n in self.monitored if n != SCORE]

        per_event = ("adwin" in config.detectors) or ("pagehinkley" in config.detectors)
        event_names: list[str] = []
        if per_event:
            event_names.append(SCORE)
            if config.event_features == ("all",):
                event_names += self._feature_columns
            else:
                event_names += [n for n in config.event_features if n in references]
        self._event_detectors = {n: _EventDetectors(config, references.get(n)) for n in event_names}
        self._event_feature_names = [n for n in event_names if n != SCORE]

        self._window_rows: list[list[float]] = []
        self._last_window: list[Statistic] = []
        self.windows_completed = 0
        self.predictions_seen = 0
        self.labels_seen = 0
        self._last_event_ms = 0
        self._performance = _Performance(size=config.perf_window)
        self._loss_adwin = river_drift.ADWIN(delta=config.adwin_delta)
        self._calibrated_logloss: float | None = None
        self._calibrated_auc: float | None = None
        self._last_request_ms = None
        self._last_request_event = None

    # -- updates -------------------------------------------------------------------------

    def update_prediction(self, features: Mapping[str, float], score: float | None, event_time_ms: int) -> list[DriftSignal]:
        """Feed one prediction; returns the drift signals it completed (usually none)."""
        self.predictions_seen += 1
        self._last_event_ms = event_time_ms
        get = features.get
        row = [get(name, math.nan) for name in self._feature_columns]
        if self._score_column is not None:
            row.append(math.nan if score is None else score)
        self._window_rows.append(row)
        signals: list[DriftSignal] = []
        warmed_up = self.predictions_seen >= self.config.min_events
        detectors = self._event_detectors
        if detectors:
            if score is not None and score == score:
                self._update_event_detectors(SCORE, score, event_time_ms, warmed_up, signals)
            for name in self._event_feature_names:
                x = get(name, math.nan)
                if x == x:  # NaN: not a value; counted in the window's nan_fraction
                    self._update_event_detectors(name, x, event_time_ms, warmed_up, signals)
        if len(self._window_rows) >= self.config.window:
            window_signals = self._close_window(event_time_ms)
            if warmed_up:
                signals += window_signals
        return signals

    def _update_event_detectors(self, name: str, x: float, at_ms: int, warmed_up: bool, signals: list) -> None:
        adwin_fired, ph_fired, _ = self._event_detectors[name].update(x)
        if not warmed_up or not (adwin_fired or ph_fired):
            return
        d = self._event_detectors[name]
        if adwin_fired:
            signals.append(DriftSignal("adwin", name, "window_mean_change", float(d.adwin.estimation),
                                       self.config.adwin_delta, int(d.adwin.width), at_ms))
        if ph_fired:
            signals.append(DriftSignal("pagehinkley", name, "cumulative_deviation", self.config.ph_threshold,
                                       self.config.ph_threshold, 0, at_ms))

    def update_label(self, score: float | None, label: int, event_time_ms: int | None = None) -> list[DriftSignal]:
        """Feed one label joined to its prediction's score (and event time); returns performance signals."""
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        if score is None or score != score or "performance" not in self.config.detectors:
            return []
        perf = self._performance
        perf.add(float(score), int(label))
        self.labels_seen += 1
        # the labelled prediction's event time, never before the latest prediction seen (the monitor's clock):
        # a label resolved late (its prediction looked up in ClickHouse) can complete evidence before the
        # monitor's own stream reached that prediction
        at_ms = self._last_event_ms if event_time_ms is None else max(event_time_ms, self._last_event_ms)
        signals = self._update_loss_adwin(min(perf.losses[-1], _LOSS_CAP_FOR_ADWIN), at_ms)
        if not perf.full:
            return signals
        check_every = max(1, self.config.perf_window // 10)
        if (perf.seen - self.config.perf_window) % check_every:
            return signals
        return signals + self._check_performance(at_ms)

    def _update_loss_adwin(self, loss: float, at_ms: int) -> list[DriftSignal]:
        """ADWIN on the per-label log loss: reacts within hundreds of labels to a jump in
        mistakes that the rolling-window ratio only sees once the window has turned over.
        Only increases are drift (a model getting better is not a reason to retrain)."""
        adwin = self._loss_adwin
        before = adwin.estimation
        adwin.update(loss)
        if not adwin.drift_detected or adwin.estimation <= before:
            return []
        return [DriftSignal("adwin", None, "log_loss_mean", float(adwin.estimation), self.config.adwin_delta,
                            int(adwin.width), at_ms, float(before))]

    def _check_performance(self, at_ms: int) -> list[DriftSignal]:
        config, perf = self.config, self._performance
        signals: list[DriftSignal] = []
        log_loss = perf.log_loss
        positives = perf.positives
        enough = min(positives, len(perf.labels) - positives) >= _MIN_CLASS_FOR_AUC
        auc = perf.auc() if enough else math.nan
        reference_ll = self._reference_metric("log_loss")
        reference_auc = self._reference_metric("auc")
        if reference_ll is None and self._calibrated_logloss is None:
            self._calibrated_logloss = log_loss  # first full window stands in for validation
        if reference_auc is None and self._calibrated_auc is None and not math.isnan(auc):
            self._calibrated_auc = auc
        reference_ll = reference_ll if reference_ll is not None else self._calibrated_logloss
        reference_auc = reference_auc if reference_auc is not None else self._calibrated_auc
        if reference_ll is not None:
            reference_ll = max(reference_ll, _MIN_REFERENCE_LOGLOSS)
        if reference_ll and log_loss / reference_ll > config.logloss_ratio_threshold:
            signals.append(DriftSignal("logloss_ratio", None, "log_loss_ratio", log_loss / reference_ll,
                                       config.logloss_ratio_threshold, len(perf.losses), at_ms, reference_ll))
        if reference_auc is not None and not math.isnan(auc) and reference_auc - auc > config.auc_drop_threshold:
            signals.append(DriftSignal("auc_drop", None, "auc_drop", reference_auc - auc,
                                       config.auc_drop_threshold, len(perf.losses), at_ms, reference_auc))
        return signals

    def _reference_metric(self, name: str) -> float | None:
        value = self.reference_metrics.get(name)
        return float(value) if value is not None and math.isfinite(float(value)) and value > 0 else None

    # -- windowed comparison --------------------------------------------------------------

    def _close_window(self, at_ms: int) -> list[DriftSignal]:
        config = self.config
        table = np.asarray(self._window_rows, dtype=float)
        self._window_rows = []
        self.windows_completed += 1
        n = table.shape[0]
        signals: list[DriftSignal] = []
        stats: list[Statistic] = []
        windowed = "windowed" in config.detectors
        for column, name in enumerate(self.monitored):
            ref = self._references[name]
            values = table[:, column]
            missing = np.isnan(values)
            nan_fraction = float(missing.mean())
            values = values[~missing]
            stats.append(Statistic(name, "nan_fraction", nan_fraction, ref.nan_fraction, n, at_ms))
            if windowed and nan_fraction - ref.nan_fraction > config.nan_fraction_threshold:
                signals.append(DriftSignal("nan_fraction", name, "nan_fraction", nan_fraction,
                                           config.nan_fraction_threshold, n, at_ms, ref.nan_fraction))
            if values.size < _MIN_WINDOW_VALUES:
                continue
            mean = float(values.mean())
            stats.append(Statistic(name, "window_mean", mean, ref.mean, n, at_ms))
            if ref.mean is not None and ref.std:
                shift = abs(mean - ref.mean) / ref.std
                stats.append(Statistic(name, "mean_shift_std", shift, 0.0, n, at_ms))
                if windowed and shift > config.mean_shift_threshold:
                    signals.append(DriftSignal("mean_shift", name, "mean_shift_std", shift,
                                               config.mean_shift_threshold, n, at_ms, ref.mean))
            if ref.expected is not None:
                if ref.categorical_codes is not None:
                    idx = np.searchsorted(ref.categorical_codes, values)
                    idx = np.minimum(idx, len(ref.categorical_codes))
                    known = idx < len(ref.categorical_codes)
                    known[known] = ref.categorical_codes[idx[known]] == values[known]
                    idx = np.where(known, idx, len(ref.categorical_codes))  # never-seen code: "other" bin
                else:
                    idx = np.searchsorted(ref.edges, values, side="left")
                actual = np.bincount(idx, minlength=len(ref.expected)) / values.size
                value = psi(actual, ref.expected)
                stats.append(Statistic(name, "psi", value, 0.0, n, at_ms))
                if windowed and value > config.psi_threshold:
                    signals.append(DriftSignal("psi", name, "psi", value, config.psi_threshold, n, at_ms, 0.0))
            if ref.unknown_fraction is not None:
                unknown = float(np.mean(values == UNKNOWN_CODE))
                stats.append(Statistic(name, "unknown_rate", unknown, ref.unknown_fraction, n, at_ms))
                if windowed and unknown - ref.unknown_fraction > config.unknown_rate_threshold:
                    signals.append(DriftSignal("unknown_rate", name, "unknown_rate", unknown,
                                               config.unknown_rate_threshold, n, at_ms, ref.unknown_fraction))
        self._last_window = stats
        return signals

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> list[Statistic]:
        """Statistics of the last completed window plus the current label-window performance."""
        stats = list(self._last_window)
        perf = self._performance
        if perf.losses:
            n, at = len(perf.losses), self._last_event_ms
            precision, recall = perf.precision_recall(self.decision_threshold)
            stats += [
                Statistic(None, "log_loss", perf.log_loss, self._reference_metric("log_loss") or self._calibrated_logloss, n, at),
                Statistic(None, "auc", perf.auc(), self._reference_metric("auc") or self._calibrated_auc, n, at),
                Statistic(None, "precision", precision, self._reference_metric("precision"), n, at),
                Statistic(None, "recall", recall, self._reference_metric("recall"), n, at),
                Statistic(None, "positive_rate", perf.positives / n, self._reference_metric("positive_rate"), n, at),
            ]
        return stats

    # -- cool-down -----------------------------------------------------------------------

    def should_request_retrain(self, signals: Iterable[DriftSignal], now_ms: int) -> DriftSignal | None:
        """The signal to cite in a RetrainRequest, or None (no signal, or still cooling down).

        Returning a signal starts the cool-down: no further request for this model
        version until `cooldown_events` predictions AND `cooldown_s` of event time
        have passed. A model swap (`reset`) ends the cool-down.
        """
        signals = list(signals)
        if not signals or self.in_cooldown(now_ms):
            return None
        chosen = min(signals, key=lambda s: (_PRIORITY.get(s.detector, 99), -(s.value / s.threshold if s.threshold else 0)))
        self._last_request_ms = now_ms
        self._last_request_event = self.predictions_seen
        return chosen

    def in_cooldown(self, now_ms: int) -> bool:
        if self._last_request_ms is None:
            return False
        events_ok = self.predictions_seen - self._last_request_event >= self.config.cooldown_events
        time_ok = now_ms - self._last_request_ms >= self.config.cooldown_s * 1000
        return not (events_ok and time_ok)

    # -- persistence ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Versioned snapshot of the whole state (river detectors pickled)."""
        state = {k: v for k, v in self.__dict__.items() if k != "config"}
        payload = pickle.dumps({"config": asdict(self.config), "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
        return _STATE_HEADER + _STATE_VERSION.to_bytes(2, "big") + payload

    @classmethod
    def from_bytes(cls, data: bytes, config: DriftConfig | None = None) -> "DriftMonitor":
        """Restore `to_bytes` output. With `config`, thresholds may differ from the saved
        ones but the structure (detectors, features, window sizes) may not."""
        if not data.startswith(_STATE_HEADER):
            raise IncompatibleDriftState("not a DriftMonitor state (header missing)")
        version = int.from_bytes(data[len(_STATE_HEADER):len(_STATE_HEADER) + 2], "big")
        if version != _STATE_VERSION:
            raise IncompatibleDriftState(f"DriftMonitor state version {version}, this code reads {_STATE_VERSION}")
        saved = pickle.loads(data[len(_STATE_HEADER) + 2:])
        saved_config = DriftConfig(**saved["config"])
        if config is not None and config.structure() != saved_config.structure():
            raise IncompatibleDriftState(
                "drift configuration changed in a way saved state cannot follow "
                f"(saved {saved_config.structure()}, now {config.structure()}); start a fresh monitor"
            )
        monitor = cls.__new__(cls)
        monitor.__dict__.update(saved["state"])
        monitor.config = config or saved_config
        return monitor


__all__ = [
    "DriftConfig", "DriftMonitor", "DriftSignal", "Statistic", "IncompatibleDriftState",
    "histogram_bins", "quantile_bins", "psi", "SCORE",
]
