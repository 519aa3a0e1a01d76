"""Drift statistics and retrain decisions for one served model version: pure, no I/O.

The drift service feeds every prediction and every (late) label of the served model into a
`DriftMonitor` and gets back `DriftSignal`s; every signal is recorded in `drift_events`. It asks
`should_request_retrain` whether the signals are evidence of HARM, and only then does one become a
RetrainRequest. Signal and action are separate (docs/drift.md):

Signals (recorded, never a retrain by themselves):
- windowed: every `window` predictions, for each monitored feature and the score, the tumbling
  window vs the training baseline: PSI over the baseline's bins, |mean shift| in baseline-std units,
  NaN fraction, and for *_code features the share of code 1 (never-seen category). A feature's PSI
  threshold is never below `SEASONAL_MARGIN` x the highest PSI of a healthy holdout chunk of the
  same size (the reference's `chunks`): cycles the training data contains are not drift.
- adwin / pagehinkley (off by default): river detectors per event on the score, mapped through the
  baseline's CDF. ADWIN on the per-label loss is recorded whenever performance is on.

Evidence of harm (a retrain request cites one, with all channels' latest figures):
- measured (family "performance"): from labels, over the last `perf_window` labelled predictions
  (checked once half of them have arrived): AUC below the holdout AUC by more than
  `auc_drop_threshold` AND by more than Z standard errors (Hanley-McNeil; only with at least
  `min_positives` of each class); log loss whose lower confidence bound (mean - Z * std / sqrt(n))
  exceeds `logloss_ratio_threshold` x the reference, the reference being the holdout log loss or,
  if higher, the loss the calibrated scores of these same predictions predict (a shift towards
  harder but correctly scored cases is not harm); for a regression the same test on the mean
  absolute error with `mae_ratio_threshold`. When the whole window's tests do not fire, the same
  tests run on its most recent half (a shift fills it twice as fast).
- estimated (family "estimated", no labels needed): every `estimate_every` predictions over the last
  `window` scores (sliding), the performance the calibrated scores imply (binary: CBPE estimated
  AUC and expected log loss; regression: MAE from the holdout's loss model) vs the holdout's,
  beyond `estimated_auc_drop_threshold` / `estimated_logloss_ratio_threshold` /
  `estimated_mae_ratio_threshold` and beyond the worst healthy holdout chunk, for
  `persist_windows` consecutive evaluations.
- covariate (family "windowed"): the importance-weighted PSI (sum over features of gain share x
  PSI) above `weighted_psi_threshold` and above 2x the healthy chunks' maximum, corroborated by the
  estimated channel (at least half its threshold), for `persist_windows` consecutive windows: a drift
  of what the model relies on that reaches its scores, before labels come.

Warm-up (`min_events`) suppresses everything right after a model swap. The cool-down turns one
harmful shift into ONE request: none for `cooldown_events` predictions AND `cooldown_s` of event
time, unless the evidence the last request cited has CLEARED (below half its threshold for
`clear_windows` consecutive evaluations): a false or transient request then cannot hide a real
shift that follows it. A swap to the version trained for the request keeps the cool-down (`reset`'s
`keep_cooldown`): the retrained version answers that shift and is not asked for again for it. State
survives restarts as versioned JSON (`to_state` / `from_state`; no pickle): windows, label window,
streaks and cool-down are kept, river detectors restart empty.
"""
from __future__ import annotations

import math
import operator
from bisect import bisect_left
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import Any, Iterable, Mapping

import numpy as np
from river import drift as river_drift

from streamscore.drift.reference import (MONITORING_KEY, calibrate, estimated_auc, estimated_log_loss,
                                         window_estimate)

SCORE = "score"  # the baseline key of the model score (training.compute_baseline)
QUANTILE_LEVELS = ("0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99")
UNKNOWN_CODE = 1.0  # *_code features: 0 = missing, 1 = never seen in the vocabulary
DETECTOR_FAMILIES = frozenset({"adwin", "pagehinkley", "windowed", "performance", "estimated"})
DEFAULT_DETECTORS = frozenset({"windowed", "performance", "estimated"})
# Diurnal by construction: a window covering part of a day always differs from
# a training set covering whole days, so it is not monitored unless asked for.
NOT_MONITORED_BY_DEFAULT = frozenset({"hour_of_day"})
MEASURED, ESTIMATED, COVARIATE = "measured", "estimated", "covariate"
CHANNEL_RANK = {MEASURED: 0, ESTIMATED: 1, COVARIATE: 2}  # which evidence a request cites first
SEASONAL_MARGIN = 1.5  # x the highest healthy-chunk PSI of a feature: its lowest PSI threshold
WEIGHTED_MARGIN = 2.0  # x the highest healthy-chunk weighted PSI: the covariate channel's lowest threshold
CLEAR_LEVEL = 0.5  # the cited evidence has cleared when it stays below this share of its threshold
CORROBORATION = 0.5  # share of the estimated channel's threshold that makes a covariate drift evidence of harm
Z = 3.0  # standard errors a measured change must exceed (one-sided, ~0.1% false positive per check)

_EPS = 1e-4  # floor of a bin fraction in PSI (an empty bin would be infinite)
_MIN_WINDOW_VALUES = 50  # fewer non-NaN values in a window: no mean / PSI for it
_LOSS_CLIP = 1e-7
# Per-label loss fed to ADWIN is capped (p=0.001 on the wrong side): ADWIN's bound
# assumes bounded values and one confident miss should not look like a regime change.
_LOSS_CAP_FOR_ADWIN = -math.log(1e-3)


class IncompatibleDriftState(ValueError):
    """Saved monitor state cannot continue under the given configuration (or is not a monitor state)."""


@dataclass(frozen=True)
class DriftConfig:
    """Knobs of the DriftMonitor; `from_settings` maps the drift_* settings (see their descriptions)."""

    detectors: frozenset[str] = DEFAULT_DETECTORS
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
    min_positives: int = 30
    mae_ratio_threshold: float = 1.15
    estimated_auc_drop_threshold: float = 0.05
    estimated_mae_ratio_threshold: float = 1.2
    estimated_logloss_ratio_threshold: float = 3.0
    estimate_every: int = 1000
    weighted_psi_threshold: float = 0.5
    persist_windows: int = 2
    clear_windows: int = 3

    def __post_init__(self) -> None:
        unknown = set(self.detectors) - DETECTOR_FAMILIES
        if unknown:
            raise ValueError(f"drift_detectors: unknown detector(s) {sorted(unknown)}; known: {sorted(DETECTOR_FAMILIES)}")
        object.__setattr__(self, "detectors", frozenset(self.detectors))
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "event_features", tuple(self.event_features))
        for name in ("window", "perf_window", "persist_windows", "clear_windows", "min_positives", "estimate_every"):
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
            min_positives=settings.drift_min_positives,
            mae_ratio_threshold=settings.drift_mae_ratio_threshold,
            estimated_auc_drop_threshold=settings.drift_estimated_auc_drop_threshold,
            estimated_mae_ratio_threshold=settings.drift_estimated_mae_ratio_threshold,
            estimated_logloss_ratio_threshold=settings.drift_estimated_logloss_ratio_threshold,
            estimate_every=settings.drift_estimate_every,
            weighted_psi_threshold=settings.drift_weighted_psi_threshold,
            persist_windows=settings.drift_persist_windows,
            clear_windows=settings.drift_clear_windows,
        )

    def structure(self) -> tuple:
        """The fields saved state depends on; thresholds may change across a restart."""
        return (sorted(self.detectors), list(self.features), list(self.event_features), self.window,
                self.perf_window)

    def to_json(self) -> dict:
        data = asdict(self)
        data["detectors"] = sorted(self.detectors)
        data["features"] = list(self.features)
        data["event_features"] = list(self.event_features)
        return data


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class DriftSignal:
    """One detection. `feature` is None for model-level detectors. `harm` names the evidence channel
    (measured | estimated | covariate) when the signal is evidence of harm, else None (record only)."""

    detector: str  # adwin | pagehinkley | psi | mean_shift | nan_fraction | unknown_rate | auc_drop | logloss_ratio | mae_ratio | estimated_auc_drop | estimated_mae_ratio | weighted_psi
    feature: str | None
    statistic: str
    value: float
    threshold: float
    window: int  # events (or labels) the statistic was computed over
    at_ms: int  # event time of the prediction/label that completed the evidence
    baseline: float | None = None
    harm: str | None = None
    note: str = ""  # the evidence a retrain request carries (all channels' latest figures)

    @property
    def strength(self) -> float:
        return self.value / self.threshold if self.threshold else 0.0

    @property
    def reason(self) -> str:
        where = f" on {self.feature}" if self.feature else ""
        base = f" (baseline {self.baseline:.4g})" if self.baseline is not None else ""
        harm = f"{self.harm}: " if self.harm else ""
        note = f"; {self.note}" if self.note else ""
        return (f"{harm}{self.detector}{where}: {self.statistic}={self.value:.4g} > {self.threshold:.4g} "
                f"over {self.window}{base}{note}")


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


def window_psi(ref: _FeatureReference | None, values: np.ndarray) -> float | None:
    """PSI of a window's values vs the reference's bins (NaN dropped); None if not comparable."""
    if ref is None or ref.expected is None:
        return None
    values = values[~np.isnan(values)]
    if values.size < _MIN_WINDOW_VALUES:
        return None
    if ref.categorical_codes is not None:
        idx = np.searchsorted(ref.categorical_codes, values)
        idx = np.minimum(idx, len(ref.categorical_codes))
        known = idx < len(ref.categorical_codes)
        known[known] = ref.categorical_codes[idx[known]] == values[known]
        idx = np.where(known, idx, len(ref.categorical_codes))  # never-seen code: "other" bin
    else:
        idx = np.searchsorted(ref.edges, values, side="left")
    actual = np.bincount(idx, minlength=len(ref.expected)) / values.size
    return psi(actual, ref.expected)


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

def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from `positives` and `negatives`."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(max(variance, 0.0) / (positives * negatives))


def _auc(scores: np.ndarray, labels: np.ndarray, positives: int) -> float:
    """ROC AUC with ties as 1/2 (Mann-Whitney); NaN without both classes."""
    n = scores.size
    if positives == 0 or positives == n:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(n)
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * (n - positives)))


@dataclass
class _Performance:
    """Rolling window of labelled predictions: per-label loss (log loss; |error| for a regression) with
    running sums of the loss, its square and the loss the calibrated score expects (NaN: unknown)."""

    size: int
    regression: bool = False
    scores: deque = field(default_factory=deque)
    labels: deque = field(default_factory=deque)
    losses: deque = field(default_factory=deque)
    expected: deque = field(default_factory=deque)
    loss_sum: float = 0.0
    loss_sq_sum: float = 0.0
    expected_sum: float = 0.0
    positives: int = 0
    seen: int = 0

    def add(self, score: float, label: float, expected: float = math.nan) -> float:
        if self.regression:
            loss = abs(score - label)
        else:
            p = min(max(score, _LOSS_CLIP), 1.0 - _LOSS_CLIP)
            loss = -math.log(p) if label else -math.log(1.0 - p)
        self.scores.append(score)
        self.labels.append(label)
        self.losses.append(loss)
        self.expected.append(expected)
        self.loss_sum += loss
        self.loss_sq_sum += loss * loss
        self.expected_sum += expected
        self.positives += label == 1
        self.seen += 1
        if len(self.losses) > self.size:
            self.scores.popleft()
            old = self.losses.popleft()
            self.loss_sum -= old
            self.loss_sq_sum -= old * old
            self.expected_sum -= self.expected.popleft()
            self.positives -= self.labels.popleft() == 1
        if self.seen % self.size == 0:  # re-add from scratch now and then: no float drift (and NaN washes out)
            self.loss_sum = math.fsum(self.losses)
            self.loss_sq_sum = math.fsum(x * x for x in self.losses)
            self.expected_sum = math.fsum(self.expected)
        return loss

    @property
    def n(self) -> int:
        return len(self.losses)

    @property
    def full(self) -> bool:
        return len(self.losses) >= self.size

    @property
    def log_loss(self) -> float:
        return self.loss_sum / len(self.losses) if self.losses else math.nan

    mean_loss = log_loss

    @property
    def loss_std(self) -> float:
        n = len(self.losses)
        if n < 2:
            return math.nan
        mean = self.loss_sum / n
        return math.sqrt(max(self.loss_sq_sum / n - mean * mean, 0.0))

    @property
    def expected_loss(self) -> float | None:
        return _finite(self.expected_sum / len(self.losses)) if self.losses else None

    def auc(self) -> float:
        """ROC AUC with ties as 1/2 (Mann-Whitney); NaN without both classes."""
        n = len(self.labels)
        positives = self.positives
        if positives == 0 or positives == n:
            return math.nan
        return _auc(np.fromiter(self.scores, dtype=float, count=n), np.fromiter(self.labels, dtype=float, count=n),
                    positives)

    def precision_recall(self, threshold: float) -> tuple[float, float]:
        scores = np.fromiter(self.scores, dtype=float, count=len(self.scores))
        labels = np.fromiter(self.labels, dtype=float, count=len(self.labels))
        flagged = scores >= threshold
        tp = float(np.sum(flagged & (labels == 1)))
        precision = tp / float(flagged.sum()) if flagged.any() else math.nan
        recall = tp / float(self.positives) if self.positives else math.nan
        return precision, recall

    def rmse(self) -> float:
        errors = np.fromiter(self.scores, dtype=float) - np.fromiter(self.labels, dtype=float)
        return float(math.sqrt(np.mean(errors * errors))) if errors.size else math.nan


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
        decision_threshold: float | None = 0.5,
        objective: str | None = None,
    ):
        """reference_metrics: the version's holdout metrics ("auc", "log_loss"; "mae" for a regression);
        decision_threshold: the serving threshold (precision/recall statistics); objective: "binary" or
        "regression" (default: the baseline's monitoring reference, else binary)."""
        self.config = config
        self.model_name = model_name
        self.reset(baseline, model_version, reference_metrics=reference_metrics,
                   decision_threshold=decision_threshold, objective=objective)

    # -- lifecycle -------------------------------------------------------------------

    def reset(
        self,
        baseline: Mapping[str, Any],
        model_version: int,
        *,
        reference_metrics: Mapping[str, float] | None = None,
        decision_threshold: float | None = 0.5,
        objective: str | None = None,
        keep_cooldown: bool = False,
    ) -> None:
        """Start over for a new model version: new baseline, empty detectors, warm-up, no cool-down.

        keep_cooldown: the new version was trained for this monitor's last request (the drift service
        checks the version's registry reason): it answers that shift, so the cool-down continues across the
        swap (counted in predictions and event time since the request) and ends early only when the cited
        channel clears on the NEW version's evidence. Without it, a retrained version whose holdout still
        held pre-change rows (its reference lower than the changed stream gives it) asked again for the same
        shift as soon as its warm-up ended."""
        config = self.config
        carried = None
        if keep_cooldown and getattr(self, "_last_request", None) and not self._last_request.get("cleared"):
            # events since the request stay counted: the new version's predictions start again at 0
            carried = {**self._last_request, "event": self._last_request["event"] - self.predictions_seen}
        self.model_version = int(model_version)
        self.baseline = dict(baseline)
        self.monitoring: dict[str, Any] = dict(self.baseline.get(MONITORING_KEY) or {})
        self.objective = objective or self.monitoring.get("objective") or "binary"
        if self.objective not in ("binary", "regression"):
            raise ValueError(f"objective must be 'binary' or 'regression', got {self.objective!r}")
        self.reference_metrics = dict(reference_metrics or {})
        self.decision_threshold = float(decision_threshold) if decision_threshold is not None else 0.5
        wanted = config.features or tuple(name for name in baseline
                                          if name not in NOT_MONITORED_BY_DEFAULT and not name.startswith("_"))
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
        self._take = _row_getter(self._feature_columns)

        chunks = self.monitoring.get("chunks") or {}
        psi_max = chunks.get("psi_max") or {}
        self._psi_thresholds = {name: max(config.psi_threshold, SEASONAL_MARGIN * (_finite(psi_max.get(name)) or 0.0))
                                for name in self.monitored}
        importance = self.monitoring.get("importance") or {}
        self._importance = {name: float(importance.get(name, 0.0)) for name in self._feature_columns}
        self._weighted_healthy = _finite(chunks.get("weighted_psi_max")) or 0.0
        self._weighted_threshold = max(config.weighted_psi_threshold, WEIGHTED_MARGIN * self._weighted_healthy)
        self._calibration = self.monitoring.get("calibration") if self.objective == "binary" else None
        self._loss_model = self.monitoring.get("loss_model") if self.objective == "regression" else None
        self._estimate_reference = _finite(chunks.get("estimate"))
        worst = _finite(chunks.get("estimate_worst"))
        if self.objective == "regression":
            healthy = (worst / self._estimate_reference - 1.0) if worst and self._estimate_reference else 0.0
            self._estimate_threshold = max(config.estimated_mae_ratio_threshold, 1.0 + SEASONAL_MARGIN * healthy)
        else:
            healthy = (self._estimate_reference - worst) if worst is not None and self._estimate_reference else 0.0
            self._estimate_threshold = max(config.estimated_auc_drop_threshold, SEASONAL_MARGIN * healthy)
        # binary: the expected log loss of the calibrated scores (CBPE) vs the holdout's; its threshold never
        # below SEASONAL_MARGIN x the worst healthy holdout chunk's ratio (a log loss varies by factors)
        self._log_loss_reference = (_finite(chunks.get("log_loss_estimate")) if self._calibration is not None
                                    else None)
        worst_log_loss = _finite(chunks.get("log_loss_estimate_worst"))
        healthy = (worst_log_loss / self._log_loss_reference
                   if worst_log_loss is not None and self._log_loss_reference else 0.0)
        self._log_loss_threshold = max(config.estimated_logloss_ratio_threshold, SEASONAL_MARGIN * healthy)

        per_event = ("adwin" in config.detectors) or ("pagehinkley" in config.detectors)
        event_names: list[str] = []
        if per_event:
            event_names.append(SCORE)
            if config.event_features == ("all",):
                event_names += self._feature_columns
            else:
                event_names += [n for n in config.event_features if n in references]
        self._event_detectors = {n: _EventDetectors(config, references.get(n)) for n in event_names}
        self._sliding_estimate = ("estimated" in config.detectors and self._score_column is not None
                                  and config.estimate_every < config.window)
        self._event_feature_names = [n for n in event_names if n != SCORE]

        self._window_rows: list[list[float]] = []
        self._previous_scores: list[float] = []  # the last window's scores the next sliding estimate needs
        self._last_window: list[Statistic] = []
        self.windows_completed = 0
        self.predictions_seen = 0
        self.labels_seen = 0
        self._labels_since_window = 0
        self._last_event_ms = 0
        self._performance = _Performance(size=config.perf_window, regression=self.objective == "regression")
        self._loss_adwin = river_drift.ADWIN(delta=config.adwin_delta)
        self._self_reference: dict[str, float] = {}  # first label window, when the version has no metric
        self._streaks = {ESTIMATED: 0, COVARIATE: 0}
        self._latest: dict[str, str] = {}  # channel -> its latest figures, for a request's evidence
        self._last_request: dict[str, Any] | None = carried  # {"ms", "event", "channel", "cleared"}
        self._cited_quiet = 0  # consecutive evaluations in which the cited channel did not fire
        self._estimated_excess: float | None = None  # this window's estimated value / its threshold

    # -- updates -------------------------------------------------------------------------

    def update_prediction(self, features: Mapping[str, float], score: float | None, event_time_ms: int) -> list[DriftSignal]:
        """Feed one prediction; returns the drift signals it completed (usually none)."""
        self.predictions_seen += 1
        self._last_event_ms = event_time_ms
        get = features.get
        try:
            row = list(self._take(features)) if self._take is not None else []
        except KeyError:  # a feature missing from this prediction: NaN (counted in nan_fraction)
            row = [get(name, math.nan) for name in self._feature_columns]
        if self._score_column is not None:
            row.append(math.nan if score is None else score)
        self._window_rows.append(row)
        signals: list[DriftSignal] = []
        warmed_up = self.predictions_seen >= self.config.min_events
        if self._event_detectors:
            if score is not None and score == score:
                self._update_event_detectors(SCORE, score, event_time_ms, warmed_up, signals)
            for name in self._event_feature_names:
                x = get(name, math.nan)
                if x == x:  # NaN: not a value; counted in the window's nan_fraction
                    self._update_event_detectors(name, x, event_time_ms, warmed_up, signals)
        filled = len(self._window_rows)
        if filled >= self.config.window:
            window_signals = self._close_window(event_time_ms, warmed_up)
            if warmed_up:
                signals += window_signals
        elif filled % self.config.estimate_every == 0 and self._sliding_estimate:
            window_signals = self._sliding_estimated_evidence(event_time_ms, warmed_up)
            if warmed_up:
                signals += window_signals
        return signals

    def _sliding_estimated_evidence(self, at_ms: int, warmed_up: bool) -> list[DriftSignal]:
        """The estimated channel between window closes: over the last `window` scores (the end of the
        previous window and the current one so far), every `estimate_every` predictions."""
        needed = self.config.window - len(self._window_rows)
        if len(self._previous_scores) < needed:  # no previous window yet (start, or after a restart)
            return []
        column = self._score_column
        scores = np.array(self._previous_scores[len(self._previous_scores) - needed:]
                          + [row[column] for row in self._window_rows], dtype=float)
        return self._estimated_evidence(scores, scores.size, at_ms, warmed_up, [])

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

    def update_label(self, score: float | None, label: float, event_time_ms: int | None = None) -> list[DriftSignal]:
        """Feed one label joined to its prediction's score (and event time); returns performance signals."""
        if self.objective == "regression":
            if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
                raise ValueError(f"label must be a finite number for a regression, got {label!r}")
        elif label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {label!r}")
        if score is None or score != score or "performance" not in self.config.detectors:
            return []
        perf = self._performance
        score = float(score)
        expected = math.nan
        if self._calibration is not None:
            c = float(calibrate(score, self._calibration))
            s = min(max(score, _LOSS_CLIP), 1.0 - _LOSS_CLIP)
            expected = -(c * math.log(s) + (1 - c) * math.log(1 - s))
        elif self._loss_model is not None and self._loss_model.get("x"):
            expected = float(np.interp(score, self._loss_model["x"], self._loss_model["mae"]))
        loss = perf.add(score, float(label) if self.objective == "regression" else int(label), expected)
        self.labels_seen += 1
        self._labels_since_window += 1
        # the labelled prediction's event time, never before the latest prediction seen (the monitor's clock)
        at_ms = self._last_event_ms if event_time_ms is None else max(event_time_ms, self._last_event_ms)
        signals = [] if self.objective == "regression" else self._update_loss_adwin(min(loss, _LOSS_CAP_FOR_ADWIN), at_ms)
        if perf.n < max(2, self.config.perf_window // 2) or perf.seen % self._check_every:
            return signals
        return signals + self._check_performance(at_ms)

    def _update_loss_adwin(self, loss: float, at_ms: int) -> list[DriftSignal]:
        """ADWIN on the per-label log loss (recorded, not evidence of harm on its own: a rise of the
        mean loss from 0.005 to 0.01 is 'significant' to ADWIN and harmless to the model)."""
        adwin = self._loss_adwin
        before = adwin.estimation
        adwin.update(loss)
        if not adwin.drift_detected or adwin.estimation <= before:
            return []
        return [DriftSignal("adwin", None, "log_loss_mean", float(adwin.estimation), self.config.adwin_delta,
                            int(adwin.width), at_ms, float(before))]

    def _reference_metric(self, name: str) -> float | None:
        value = _finite(self.reference_metrics.get(name))
        return value if value is not None and value > 0 else None

    def _metric_reference(self, name: str, current: float) -> float | None:
        """The version's holdout metric, else the first label window's (stands in for validation)."""
        value = self._reference_metric(name)
        if value is None and math.isfinite(current):
            value = self._self_reference.setdefault(name, current)
        return value

    def _check_performance(self, at_ms: int) -> list[DriftSignal]:
        """The measured tests over the whole label window and, if they do not fire, over its most recent
        half (`perf_window // 2` labels: a shift fills it twice as fast; the same Z-standard-error bounds
        keep it a test). The evidence has cleared only when both are below CLEAR_LEVEL: right after a
        request cited the recent half, the whole window still holds pre-change labels and is low, and
        that is the same shift, not a cleared one."""
        perf = self._performance
        n = perf.n
        signals, figures, excess = self._measure(perf.scores, perf.labels, perf.losses, perf.expected,
                                                 n, at_ms)
        recent = self.config.perf_window // 2
        if not signals and n >= 2 * recent and recent >= 2:
            skip = n - recent
            part = [np.fromiter(islice(column, skip, None), dtype=float, count=recent)
                    for column in (perf.scores, perf.labels, perf.losses, perf.expected)]
            signals, recent_figures, recent_excess = self._measure(*part, recent, at_ms)
            figures.append(f"recent {recent} labels: " + "; ".join(recent_figures))
            excess = max(excess, recent_excess)
        positives = f" ({perf.positives} positives)" if self.objective == "binary" else ""
        self._latest[MEASURED] = f"measured over {n} labels{positives}: " + "; ".join(figures)
        if self.predictions_seen >= self.config.min_events:  # as the other channels: warmed-up evaluations only
            self._note_channel(MEASURED, excess)
        return signals

    def _measure(self, scores, labels, losses, expected, n: int, at_ms: int) -> tuple[list[DriftSignal], list[str], float]:
        """The measured tests over n labelled predictions: (signals, figures, the strongest test's value
        relative to its threshold, 1 = at the threshold)."""
        config = self.config
        scores = np.fromiter(scores, dtype=float, count=n) if not isinstance(scores, np.ndarray) else scores
        labels = np.fromiter(labels, dtype=float, count=n) if not isinstance(labels, np.ndarray) else labels
        losses = np.fromiter(losses, dtype=float, count=n) if not isinstance(losses, np.ndarray) else losses
        expected = np.fromiter(expected, dtype=float, count=n) if not isinstance(expected, np.ndarray) else expected
        signals: list[DriftSignal] = []
        excess = 0.0
        figures = []
        if self.objective == "binary":
            positives = int(np.count_nonzero(labels == 1))
            negatives = n - positives
            if min(positives, negatives) >= config.min_positives:
                auc = _auc(scores, labels, positives)
                reference_auc = self._metric_reference("auc", auc)
                if reference_auc is not None and not math.isnan(auc):
                    error = max(auc_standard_error(auc, positives, negatives),
                                auc_standard_error(min(reference_auc, 0.9999), positives, negatives))
                    threshold = max(config.auc_drop_threshold, Z * error)
                    drop = reference_auc - auc
                    figures.append(f"auc {auc:.4f} vs holdout {reference_auc:.4f} (drop {drop:.4f}, "
                                   f"threshold {threshold:.4f})")
                    excess = max(excess, drop / threshold)
                    if drop > threshold:
                        signals.append(DriftSignal("auc_drop", None, "auc_drop", drop, threshold, n, at_ms,
                                                   reference_auc, harm=MEASURED))
            else:
                figures.append(f"auc not measured ({positives} positives, {negatives} negatives; "
                               f"needs {config.min_positives} of each)")
            name, ratio_threshold = "log_loss", config.logloss_ratio_threshold
        else:
            name, ratio_threshold = "mae", config.mae_ratio_threshold
        mean = float(losses.mean())
        reference = self._metric_reference(name, mean)
        expected_loss = _finite(float(expected.mean()))
        effective = max(reference or 0.0, expected_loss or 0.0)
        if effective > 0:
            lower = mean - Z * float(losses.std()) / math.sqrt(n)
            value = lower / effective
            figures.append(f"{name} {mean:.4g} (lower bound {lower:.4g}) vs reference {effective:.4g} "
                           f"(holdout {reference if reference is not None else float('nan'):.4g}, expected from "
                           f"scores {expected_loss if expected_loss is not None else float('nan'):.4g})")
            excess = max(excess, (value - 1.0) / (ratio_threshold - 1.0))
            if value > ratio_threshold:
                signals.append(DriftSignal("logloss_ratio" if name == "log_loss" else "mae_ratio",
                                           None, f"{name}_ratio_lower_bound", value, ratio_threshold, n, at_ms,
                                           effective, harm=MEASURED))
        return signals, figures, excess

    # -- windowed comparison --------------------------------------------------------------

    def _close_window(self, at_ms: int, warmed_up: bool) -> list[DriftSignal]:
        config = self.config
        table = np.asarray(self._window_rows, dtype=float)
        self._window_rows = []
        if self._sliding_estimate:
            keep = config.window - config.estimate_every
            self._previous_scores = table[table.shape[0] - keep:, self._score_column].tolist()
        self.windows_completed += 1
        n = table.shape[0]
        signals: list[DriftSignal] = []
        stats: list[Statistic] = [Statistic(None, "labels", float(self._labels_since_window), None, n, at_ms)]
        self._labels_since_window = 0
        windowed = "windowed" in config.detectors
        feature_psi: dict[str, float] = {}
        for column, name in enumerate(self.monitored):
            ref = self._references[name]
            values = table[:, column]
            missing = np.isnan(values)
            nan_fraction = float(missing.mean())
            present = values[~missing]
            stats.append(Statistic(name, "nan_fraction", nan_fraction, ref.nan_fraction, n, at_ms))
            if windowed and nan_fraction - ref.nan_fraction > config.nan_fraction_threshold:
                signals.append(DriftSignal("nan_fraction", name, "nan_fraction", nan_fraction,
                                           config.nan_fraction_threshold, n, at_ms, ref.nan_fraction))
            if present.size < _MIN_WINDOW_VALUES:
                continue
            mean = float(present.mean())
            stats.append(Statistic(name, "window_mean", mean, ref.mean, n, at_ms))
            if ref.mean is not None and ref.std:
                shift = abs(mean - ref.mean) / ref.std
                stats.append(Statistic(name, "mean_shift_std", shift, 0.0, n, at_ms))
                if windowed and shift > config.mean_shift_threshold:
                    signals.append(DriftSignal("mean_shift", name, "mean_shift_std", shift,
                                               config.mean_shift_threshold, n, at_ms, ref.mean))
            value = window_psi(ref, present)
            if value is not None:
                feature_psi[name] = value
                threshold = self._psi_thresholds[name]
                stats.append(Statistic(name, "psi", value, 0.0, n, at_ms))
                if windowed and value > threshold:
                    signals.append(DriftSignal("psi", name, "psi", value, threshold, n, at_ms, 0.0))
            if ref.unknown_fraction is not None:
                unknown = float(np.mean(present == UNKNOWN_CODE))
                stats.append(Statistic(name, "unknown_rate", unknown, ref.unknown_fraction, n, at_ms))
                if windowed and unknown - ref.unknown_fraction > config.unknown_rate_threshold:
                    signals.append(DriftSignal("unknown_rate", name, "unknown_rate", unknown,
                                               config.unknown_rate_threshold, n, at_ms, ref.unknown_fraction))
        self._estimated_excess = None
        if "estimated" in config.detectors and self._score_column is not None:
            signals += self._estimated_evidence(table[:, self._score_column], n, at_ms, warmed_up, stats)
        if windowed and self.monitoring.get("importance"):
            signals += self._covariate_evidence(feature_psi, n, at_ms, warmed_up, stats)
        self._last_window = stats
        return signals

    def _persisted(self, channel: str, firing: bool, warmed_up: bool, excess: float) -> bool:
        self._streaks[channel] = self._streaks[channel] + 1 if firing and warmed_up else 0
        if warmed_up:
            self._note_channel(channel, excess)
        return self._streaks[channel] >= self.config.persist_windows

    def _covariate_evidence(self, feature_psi: dict[str, float], n: int, at_ms: int, warmed_up: bool,
                            stats: list[Statistic]) -> list[DriftSignal]:
        contributions = {name: self._importance.get(name, 0.0) * value for name, value in feature_psi.items()
                         if name != SCORE}
        weighted = float(sum(contributions.values()))
        threshold = self._weighted_threshold
        stats.append(Statistic(None, "weighted_psi", weighted, self._weighted_healthy, n, at_ms))
        top = sorted(contributions.items(), key=lambda kv: -kv[1])[:3]
        self._latest[COVARIATE] = (f"importance-weighted psi {weighted:.3f} (threshold {threshold:.3f}; top "
                                   + ", ".join(f"{k} psi {feature_psi[k]:.2f} x share {self._importance.get(k, 0):.2f}"
                                               for k, _ in top) + ")")
        # Corroboration: a drift of important features requests a retrain only when the model's own scores
        # show it too (the estimated channel at least CORROBORATION of its threshold), or when there is no
        # estimate. Measured: amounts x3 and 30% unseen categories move the weighted PSI far above any
        # threshold while the AUC stays within 0.01 (docs/drift.md).
        corroborated = self._estimated_excess is None or self._estimated_excess >= CORROBORATION
        firing = weighted > threshold
        harmful = self._persisted(COVARIATE, firing and corroborated, warmed_up, weighted / threshold)
        if not firing:
            return []
        return [DriftSignal("weighted_psi", None, "importance_weighted_psi", weighted, threshold, n, at_ms,
                            self._weighted_healthy, harm=COVARIATE if harmful else None)]

    def _estimated_evidence(self, scores: np.ndarray, n: int, at_ms: int, warmed_up: bool,
                            stats: list[Statistic]) -> list[DriftSignal]:
        """The label-free channel. Regression: the loss model's MAE / the holdout's. Binary (CBPE, the
        calibrated scores standing in for the labels): the estimated AUC's drop, and the expected log
        loss / the holdout's (a shift that leaves the ranking intact but moves many events to scores the
        calibration calls uncertain raises the loss: payments' amounts x3, AUC unchanged, log loss x1.7)."""
        reference = self._estimate_reference
        if self.objective == "regression":
            estimate = window_estimate(self.objective, self.monitoring, scores)
            if estimate is None or reference is None:
                return []
            threshold = self._estimate_threshold
            stats.append(Statistic(None, "estimated_mae", estimate, reference, n, at_ms))
            value = estimate / reference
            self._latest[ESTIMATED] = (f"estimated mae {estimate:.4g} vs holdout estimate {reference:.4g} "
                                       f"(ratio {value:.3f}, threshold {threshold:.3f})")
            tests = [("estimated_mae_ratio", value, threshold, (value - 1.0) / (threshold - 1.0), reference)]
        else:
            present = scores[~np.isnan(scores)]
            if present.size < 50 or self._calibration is None or not self._calibration.get("x"):
                return []
            probabilities = calibrate(present, self._calibration)
            tests, figures = [], []
            estimate = estimated_auc(present, probabilities)
            if reference is not None and not math.isnan(estimate):
                threshold = self._estimate_threshold
                stats.append(Statistic(None, "estimated_auc", estimate, reference, n, at_ms))
                value = reference - estimate
                figures.append(f"estimated auc {estimate:.4f} vs holdout estimate {reference:.4f} "
                               f"(drop {value:.4f}, threshold {threshold:.4f})")
                tests.append(("estimated_auc_drop", value, threshold, value / threshold, reference))
            log_loss_reference = self._log_loss_reference
            if log_loss_reference is not None:
                log_loss = estimated_log_loss(present, probabilities)
                threshold = self._log_loss_threshold
                stats.append(Statistic(None, "estimated_log_loss", log_loss, log_loss_reference, n, at_ms))
                value = log_loss / log_loss_reference
                figures.append(f"expected log loss {log_loss:.4g} vs holdout's {log_loss_reference:.4g} "
                               f"(ratio {value:.3f}, threshold {threshold:.3f})")
                tests.append(("estimated_logloss_ratio", value, threshold, (value - 1.0) / (threshold - 1.0),
                              log_loss_reference))
            if not tests:
                return []
            self._latest[ESTIMATED] = "; ".join(figures)
        firing = [t for t in tests if t[1] > t[2]]
        self._estimated_excess = max(t[3] for t in tests)
        harmful = self._persisted(ESTIMATED, bool(firing), warmed_up, self._estimated_excess)
        return [DriftSignal(detector, None, detector, value, threshold, n, at_ms, baseline,
                            harm=ESTIMATED if harmful else None)
                for detector, value, threshold, _, baseline in firing]

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> list[Statistic]:
        """Statistics of the last completed window plus the current label-window performance."""
        stats = list(self._last_window)
        perf = self._performance
        if perf.losses:
            n, at = len(perf.losses), self._last_event_ms
            if self.objective == "regression":
                stats += [Statistic(None, "mae", perf.mean_loss, self._reference_metric("mae"), n, at),
                          Statistic(None, "rmse", perf.rmse(), self._reference_metric("rmse"), n, at)]
                return stats
            precision, recall = perf.precision_recall(self.decision_threshold)
            stats += [
                Statistic(None, "log_loss", perf.log_loss, self._reference_metric("log_loss") or self._self_reference.get("log_loss"), n, at),
                Statistic(None, "auc", perf.auc(), self._reference_metric("auc") or self._self_reference.get("auc"), n, at),
                Statistic(None, "precision", precision, self._reference_metric("precision"), n, at),
                Statistic(None, "recall", recall, self._reference_metric("recall"), n, at),
                Statistic(None, "positive_rate", perf.positives / n, self._reference_metric("positive_rate"), n, at),
            ]
        return stats

    def evidence(self) -> str:
        """Every channel's latest figures, as a retrain request carries them."""
        parts = [self._latest[c] for c in (MEASURED, ESTIMATED, COVARIATE) if c in self._latest]
        return "evidence: " + (" | ".join(parts) if parts else "none")

    # -- action: retrain request and cool-down -------------------------------------------

    def should_request_retrain(self, signals: Iterable[DriftSignal], now_ms: int) -> DriftSignal | None:
        """The evidence of harm to cite in a RetrainRequest (with every channel's figures in its
        `note`), or None: no signal is evidence of harm, or still cooling down.

        Returning a signal starts the cool-down: no further request for this model version until
        `cooldown_events` predictions AND `cooldown_s` of event time have passed, or until the cited
        channel has stayed below its threshold for `clear_windows` evaluations (the breakthrough
        rule). A model swap (`reset`) ends the cool-down, unless the new version was trained for the request
        (`keep_cooldown`).
        """
        harmful = [s for s in signals if s.harm]
        if not harmful or self.in_cooldown(now_ms):
            return None
        chosen = min(harmful, key=lambda s: (CHANNEL_RANK[s.harm], -s.strength))
        last = self._last_request
        note = self.evidence()
        if last is not None and last.get("cleared") and self._cooling(last, now_ms):
            note = (f"{BREAKTHROUGH_MARK}: the {last['channel']} evidence of the request at {last['ms']} ms cleared "
                    f"for {self.config.clear_windows} evaluations; {note}")
        chosen = replace(chosen, note=note)
        self._last_request = {"ms": int(now_ms), "event": self.predictions_seen, "channel": chosen.harm,
                              "cleared": False}
        self._cited_quiet = 0
        return chosen

    def _note_channel(self, channel: str, excess: float) -> None:
        """Track whether the evidence the last request cited has cleared: below CLEAR_LEVEL of its threshold
        (hysteresis: a value hovering around the threshold is the same shift, not a new one)."""
        last = self._last_request
        if last is None or last["channel"] != channel or last.get("cleared"):
            return
        self._cited_quiet = self._cited_quiet + 1 if excess < CLEAR_LEVEL else 0
        if self._cited_quiet >= self._clear_evaluations(channel):
            last["cleared"] = True  # the cited evidence is gone: the next harm is a new shift

    def _clear_evaluations(self, channel: str) -> int:
        """Consecutive quiet evaluations after which the cited evidence has cleared: `clear_windows`, and for
        the measured channel at least one whole label window of them. Its checks come every tenth of the
        window (`_check_every`), so 3 quiet checks are mostly the same labels: on rides, whose errors follow
        the day, a retrained model's measured MAE ratio fell below half its threshold for 5 checks at night
        (1,000 labels of a 2,000-label window) and the next day's rise was taken for a new shift (a cool-down
        breakthrough). Only when every label of the window is new and quiet has the evidence gone. Checks
        before the warm-up ends (right after a swap) do not count, as for the other channels."""
        needed = self.config.clear_windows
        if channel == MEASURED:
            needed = max(needed, -(-self.config.perf_window // self._check_every))
        return needed

    @property
    def _check_every(self) -> int:
        """Labels between two measured checks."""
        return max(1, self.config.perf_window // 10)

    def _cooling(self, last: Mapping[str, Any], now_ms: int) -> bool:
        events_ok = self.predictions_seen - last["event"] >= self.config.cooldown_events
        time_ok = now_ms - last["ms"] >= self.config.cooldown_s * 1000
        return not (events_ok and time_ok)

    def in_cooldown(self, now_ms: int) -> bool:
        last = self._last_request
        if last is None or last.get("cleared"):
            return False
        events_ok = self.predictions_seen - last["event"] >= self.config.cooldown_events
        time_ok = now_ms - last["ms"] >= self.config.cooldown_s * 1000
        return not (events_ok and time_ok)

    # -- persistence (JSON; see streamscore.drift.state) ---------------------------------

    def to_state(self) -> dict[str, Any]:
        perf = self._performance
        return {
            "format": MONITOR_STATE_FORMAT,
            "version": MONITOR_STATE_VERSION,
            "config": self.config.to_json(),
            "model_name": self.model_name,
            "model_version": self.model_version,
            "objective": self.objective,
            "baseline": _json_safe(self.baseline),
            "reference_metrics": _json_safe(self.reference_metrics),
            "decision_threshold": self.decision_threshold,
            "monitored": list(self.monitored),
            "windows_completed": self.windows_completed,
            "predictions_seen": self.predictions_seen,
            "labels_seen": self.labels_seen,
            "labels_since_window": self._labels_since_window,
            "last_event_ms": int(self._last_event_ms),
            "window_rows": [[None if x != x else float(x) for x in row] for row in self._window_rows],
            "previous_scores": [None if x != x else float(x) for x in self._previous_scores],
            "last_window": [_json_safe(asdict(s)) for s in self._last_window],
            "performance": {"scores": list(perf.scores), "labels": list(perf.labels),
                            "expected": [None if x != x else x for x in perf.expected], "seen": perf.seen},
            "self_reference": dict(self._self_reference),
            "streaks": dict(self._streaks),
            "latest": dict(self._latest),
            "last_request": dict(self._last_request) if self._last_request else None,
            "cited_quiet": self._cited_quiet,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], config: DriftConfig | None = None) -> "DriftMonitor":
        """Restore `to_state` output (validated first: streamscore.drift.state). With `config`,
        thresholds may differ from the saved ones but the structure (detectors, features, window
        sizes) may not. Raises IncompatibleDriftState, naming what is wrong."""
        from streamscore.drift.state import validate_monitor_state

        saved = validate_monitor_state(state)
        try:
            saved_config = DriftConfig(**{**saved["config"], "detectors": frozenset(saved["config"]["detectors"])})
        except (TypeError, ValueError) as exc:
            raise IncompatibleDriftState(f"drift monitor state: invalid config ({exc})") from exc
        if config is not None and config.structure() != saved_config.structure():
            raise IncompatibleDriftState(
                "drift configuration changed in a way saved state cannot follow "
                f"(saved {saved_config.structure()}, now {config.structure()}); start a fresh monitor")
        try:
            monitor = cls(config or saved_config, saved["baseline"], saved["model_name"], saved["model_version"],
                          reference_metrics=saved["reference_metrics"], decision_threshold=saved["decision_threshold"],
                          objective=saved["objective"])
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise IncompatibleDriftState(f"drift monitor state: its baseline cannot be used ({exc})") from exc
        if list(monitor.monitored) != list(saved["monitored"]):
            raise IncompatibleDriftState(f"drift monitor state: monitored columns {saved['monitored']} do not "
                                         f"match the baseline's {list(monitor.monitored)}")
        width = len(monitor.monitored)
        rows = saved["window_rows"]
        if any(len(row) != width for row in rows) or len(rows) >= monitor.config.window:
            raise IncompatibleDriftState(f"drift monitor state: window rows must have {width} values and be "
                                         f"fewer than the window ({monitor.config.window})")
        monitor._window_rows = [[math.nan if x is None else float(x) for x in row] for row in rows]
        previous = saved.get("previous_scores") or []
        if len(previous) >= monitor.config.window:
            raise IncompatibleDriftState(f"drift monitor state: previous_scores must be fewer than the window "
                                         f"({monitor.config.window})")
        monitor._previous_scores = [math.nan if x is None else float(x) for x in previous]
        monitor.windows_completed = saved["windows_completed"]
        monitor.predictions_seen = saved["predictions_seen"]
        monitor.labels_seen = saved["labels_seen"]
        monitor._labels_since_window = saved["labels_since_window"]
        monitor._last_event_ms = saved["last_event_ms"]
        monitor._last_window = [Statistic(s["feature"], s["statistic"], math.nan if s["value"] is None else s["value"],
                                          s["baseline"], s["window"], s["at_ms"]) for s in saved["last_window"]]
        perf = saved["performance"]
        for score, label, expected in zip(perf["scores"], perf["labels"], perf["expected"]):
            monitor._performance.add(score, label, math.nan if expected is None else expected)
        monitor._performance.seen = perf["seen"]
        monitor._self_reference = dict(saved["self_reference"])
        monitor._streaks.update({k: v for k, v in saved["streaks"].items() if k in monitor._streaks})
        monitor._latest = {k: v for k, v in saved["latest"].items() if k in CHANNEL_RANK}
        monitor._last_request = saved["last_request"]
        monitor._cited_quiet = saved["cited_quiet"]
        return monitor

    def to_bytes(self) -> bytes:
        """The state as compact JSON (UTF-8)."""
        import json

        return json.dumps(self.to_state(), allow_nan=False, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, config: DriftConfig | None = None) -> "DriftMonitor":
        from streamscore.drift.state import parse_json

        return cls.from_state(parse_json(data, "drift monitor state"), config)


MONITOR_STATE_FORMAT = "streamscore.drift.monitor"
BREAKTHROUGH_MARK = "cool-down breakthrough"  # in a request's reason (the trainer does not take it for a replay)
MONITOR_STATE_VERSION = 2


def _row_getter(names: list[str]):
    """features -> tuple of the named values (a KeyError if one is missing); None for no features."""
    if not names:
        return None
    if len(names) == 1:
        single = operator.itemgetter(names[0])
        return lambda features: (single(features),)
    return operator.itemgetter(*names)


def _json_safe(value: Any) -> Any:
    """Plain JSON types; non-finite floats become null."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    raise TypeError(f"not JSON-able: {type(value).__name__}")


__all__ = [
    "DriftConfig", "DriftMonitor", "DriftSignal", "Statistic", "IncompatibleDriftState",
    "histogram_bins", "quantile_bins", "psi", "window_psi", "SCORE", "MEASURED", "ESTIMATED", "COVARIATE",
]
