"""`streamscore report`: one self-contained HTML file of plots, every number from ClickHouse SQL.

Each section is built in two steps that tests can check separately:
1. SQL (shown under the plot, runnable as-is with `streamscore query`) and the
   shaping of its rows into plain series (`Section.data`);
2. a matplotlib figure rendered to PNG and embedded as base64.

Sections: score distribution over time by model version; feature drift vs the
training baseline (the drift service's 'statistic' snapshots when present,
otherwise windowed feature means from `predictions.features` against the
model's baseline in the registry); online AUC / log loss from delayed labels;
rejected events by reason; retrain history with drift detections.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from streamscore.learning.registry import ModelRegistry, ModelVersion
from streamscore.settings import Settings
from streamscore.clickhouse.store import QueryResult, Store
from streamscore.spec import resolve
from streamscore.spec.model import FeatureSpec

# Time buckets are chosen so a run of minutes or of weeks both give a readable number of points.
BUCKET_CHOICES_S = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 48
MIN_METRICS_BUCKET_S = 3600  # online metrics need enough labels per point: at least hourly
DRIFT_SHIFT_CLIP = 3.0  # heatmap colour range, in baseline standard deviations


@dataclass
class Section:
    key: str
    title: str
    description: str
    sql: list[str]
    data: dict[str, Any] = field(default_factory=dict)  # the series the plot is drawn from
    png: bytes | None = None
    note: str | None = None
    table: QueryResult | None = None


@dataclass
class Report:
    generated_at: datetime
    database: str
    topic_prefix: str
    model_name: str
    bucket_s: int
    sections: dict[str, Section]


# --- helpers ---------------------------------------------------------------------
def choose_bucket_s(span_s: float, max_buckets: int = MAX_BUCKETS) -> int:
    """The smallest bucket from BUCKET_CHOICES_S giving at most max_buckets buckets over span_s."""
    for bucket in BUCKET_CHOICES_S:
        if span_s / bucket <= max_buckets:
            return bucket
    return BUCKET_CHOICES_S[-1]


def bucket_label(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min"


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _time_axis(ax) -> None:
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.tick_params(axis="x", labelsize=7)


def _reference_model(registry: ModelRegistry, model_name: str) -> ModelVersion | None:
    """The model whose training baseline live data is compared with: production, else the newest version."""
    production = registry.production(model_name)
    if production is not None:
        return production
    versions = registry.list(model_name)
    return versions[-1] if versions else None


# --- sections --------------------------------------------------------------------
def scores_sql(bucket_s: int) -> list[str]:
    return [
        f"""SELECT toStartOfInterval(event_time, INTERVAL {bucket_s} SECOND) AS bucket, model_version,
       count() AS events, countIf(score IS NOT NULL) AS scored, avg(score) AS mean_score,
       quantile(0.1)(score) AS p10, quantile(0.5)(score) AS p50, quantile(0.9)(score) AS p90
FROM predictions FINAL
GROUP BY bucket, model_version ORDER BY bucket, model_version""",
        """SELECT model_version, least(floor(score * 20) / 20, 0.95) AS bin, count() AS events
FROM predictions FINAL WHERE score IS NOT NULL
GROUP BY model_version, bin ORDER BY model_version, bin""",
    ]


def score_section(store: Store, bucket_s: int) -> Section:
    over_time_sql, histogram_sql = scores_sql(bucket_s)
    section = Section("scores", "Score distribution over time by model version",
                      f"Events per {bucket_label(bucket_s)} of event time and their score (mean and 10th-90th "
                      "percentile band) per model version; version 0 = no model yet (score NULL). "
                      "Right: score histogram per version.", [over_time_sql, histogram_sql])
    series: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for bucket, version, events, scored, mean, p10, p50, p90 in store.query(over_time_sql).rows:
        s = series[int(version)]
        s["bucket"].append(bucket)
        s["events"].append(int(events))
        s["scored"].append(int(scored))
        for name, value in (("mean", mean), ("p10", p10), ("p50", p50), ("p90", p90)):
            s[name].append(_finite(value) if scored else None)
    histogram: dict[int, dict[float, int]] = defaultdict(dict)
    for version, low, events in store.query(histogram_sql).rows:
        histogram[int(version)][round(float(low), 2)] = int(events)
    section.data = {
        "series": {v: dict(s) for v, s in sorted(series.items())},
        "events_per_version": {v: sum(s["events"]) for v, s in sorted(series.items())},
        "histogram": dict(sorted(histogram.items())),
    }
    if not series:
        section.note = "no predictions logged yet"
        return section
    figure = Figure(figsize=(11, 5.5))
    counts_ax = figure.add_subplot(2, 2, 1)
    score_ax, hist_ax = figure.add_subplot(2, 2, 3, sharex=counts_ax), figure.add_subplot(1, 2, 2)
    width = bucket_s / 86400 * 0.9  # bar width in matplotlib date units (days)
    bottoms: dict = defaultdict(int)
    for version, s in section.data["series"].items():
        counts_ax.bar(s["bucket"], s["events"], width=width, bottom=[bottoms[b] for b in s["bucket"]],
                      label=f"v{version}", align="edge")
        for b, n in zip(s["bucket"], s["events"]):
            bottoms[b] += n
        points = [(b, m, lo, hi) for b, m, lo, hi in zip(s["bucket"], s["mean"], s["p10"], s["p90"]) if m is not None]
        if points:
            bs, means, lows, highs = zip(*points)
            line, = score_ax.plot(bs, means, marker=".", label=f"v{version} mean")
            score_ax.fill_between(bs, lows, highs, alpha=0.2, color=line.get_color())
    counts_ax.set_ylabel(f"events / {bucket_label(bucket_s)}")
    counts_ax.legend(fontsize=8)
    score_ax.set_ylabel("score")
    score_ax.set_xlabel("event time (UTC)")
    if score_ax.lines:
        score_ax.legend(fontsize=8)
    for ax in (counts_ax, score_ax):
        _time_axis(ax)
    for version, bins in section.data["histogram"].items():
        total = sum(bins.values())
        hist_ax.step([b + 0.025 for b in bins], [n / total for n in bins.values()], where="mid", label=f"v{version}")
    hist_ax.set_xlabel("score (bins of 0.05)")
    hist_ax.set_ylabel("share of the version's events")
    hist_ax.set_yscale("log")
    if section.data["histogram"]:
        hist_ax.legend(fontsize=8)
    section.png = _png(figure)
    return section


DRIFT_STATISTICS_SQL = """SELECT detected_at, model_version, feature, statistic, value, baseline, threshold
FROM drift_events WHERE kind = 'statistic'
ORDER BY detected_at"""


def feature_means_sql(bucket_s: int) -> str:
    return f"""SELECT toStartOfInterval(event_time, INTERVAL {bucket_s} SECOND) AS bucket, feature,
       avg(value) AS mean, count() AS n
FROM predictions FINAL
ARRAY JOIN mapKeys(features) AS feature, mapValues(features) AS value
WHERE NOT isNaN(value)
GROUP BY bucket, feature ORDER BY bucket, feature"""


def drift_section(store: Store, registry: ModelRegistry, model_name: str, bucket_s: int) -> Section:
    statistics = store.query(DRIFT_STATISTICS_SQL)
    if statistics.rows:
        return _drift_from_statistics(statistics)
    return _drift_from_feature_means(store, registry, model_name, bucket_s)


def _drift_from_statistics(result: QueryResult) -> Section:
    section = Section("drift", "Feature drift vs the training baseline",
                      "Windowed statistics the drift service recorded (drift_events kind='statistic'), one line per "
                      "feature; dashed: the alarm threshold.", [DRIFT_STATISTICS_SQL])
    by_statistic: dict[str, dict[str, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    thresholds: dict[str, float] = {}
    for detected_at, _version, feature, statistic, value, _baseline, threshold in result.rows:
        line = by_statistic[statistic][feature]
        line["time"].append(detected_at)
        line["value"].append(_finite(value))
        if _finite(threshold) is not None:
            thresholds[statistic] = float(threshold)
    section.data = {"source": "drift_events", "statistics": {k: {f: dict(v) for f, v in d.items()}
                                                             for k, d in by_statistic.items()},
                    "thresholds": thresholds}
    names = sorted(by_statistic)
    figure = Figure(figsize=(11, 3.2 * len(names)))
    for i, statistic in enumerate(names, start=1):
        ax = figure.add_subplot(len(names), 1, i)
        # Only the features that moved most, or the plot becomes a tangle.
        ranked = sorted(by_statistic[statistic].items(),
                        key=lambda item: -max((abs(v) for v in item[1]["value"] if v is not None), default=0))
        for feature, line in ranked[:8]:
            ax.plot(line["time"], line["value"], marker=".", label=feature)
        if statistic in thresholds:
            ax.axhline(thresholds[statistic], linestyle="--", color="grey")
        ax.set_ylabel(statistic)
        ax.legend(fontsize=7, ncol=4)
        _time_axis(ax)
    section.png = _png(figure)
    return section


def _drift_from_feature_means(store: Store, registry: ModelRegistry, model_name: str, bucket_s: int) -> Section:
    sql = feature_means_sql(bucket_s)
    section = Section("drift", "Feature drift vs the training baseline",
                      f"No drift statistics were recorded, so: mean of each numeric feature per "
                      f"{bucket_label(bucket_s)} of event time from predictions.features, as a shift from the "
                      "reference model's training mean in units of its training standard deviation.", [sql])
    reference = _reference_model(registry, model_name)
    if reference is None:
        section.note = f"model {model_name!r} has no version in the registry, so there is no training baseline"
        section.data = {"source": "feature_means", "reference_version": None}
        return section
    baseline = reference.baseline
    numeric = [name for name in reference.feature_names
               if name not in reference.categorical_features and (baseline.get(name) or {}).get("std")]
    buckets: list = []
    means: dict[str, dict] = defaultdict(dict)
    for bucket, feature, mean, _n in store.query(sql).rows:
        if not buckets or buckets[-1] != bucket:
            buckets.append(bucket)
        means[feature][bucket] = float(mean)
    shifts = {name: [(means[name][b] - baseline[name]["mean"]) / baseline[name]["std"]
                     if b in means[name] else None for b in buckets] for name in numeric}
    section.data = {"source": "feature_means", "reference_version": reference.version, "buckets": buckets,
                    "means": {name: dict(means[name]) for name in numeric},
                    "baseline_mean": {name: baseline[name]["mean"] for name in numeric},
                    "shift": shifts}
    section.note = f"baseline: {model_name} v{reference.version} (trained on {reference.train_rows:,} rows)"
    if not buckets:
        section.note += "; no predictions logged yet"
        return section
    figure = Figure(figsize=(11, 0.3 * len(numeric) + 2))
    ax = figure.add_subplot(1, 1, 1)
    matrix = [[math.nan if v is None else max(-DRIFT_SHIFT_CLIP, min(DRIFT_SHIFT_CLIP, v)) for v in shifts[name]]
              for name in numeric]
    image = ax.imshow(matrix, aspect="auto", cmap="coolwarm", vmin=-DRIFT_SHIFT_CLIP, vmax=DRIFT_SHIFT_CLIP,
                      interpolation="nearest")
    ax.set_yticks(range(len(numeric)), numeric, fontsize=8)
    step = max(1, len(buckets) // 12)
    ax.set_xticks(range(0, len(buckets), step),
                  [b.strftime("%m-%d %H:%M") for b in buckets[::step]], rotation=30, fontsize=7)
    ax.set_xlabel("event time (UTC)")
    figure.colorbar(image, ax=ax, label="(window mean - baseline mean) / baseline std")
    section.png = _png(figure)
    return section


# AUC pairs each score with its label inside ONE groupArray of tuples: two separate groupArray calls
# over a JOIN came back in different orders (AUC 0.62 instead of 0.9995 on the demo's data).
_BINARY_METRICS = """count() AS labelled, sum(l.label) AS positives,
       arrayAUC(groupArray((assumeNotNull(p.score), l.label)).1, groupArray((assumeNotNull(p.score), l.label)).2) AS auc,
       avg(-(l.label * log(greatest(assumeNotNull(p.score), 1e-15))
             + (1 - l.label) * log(greatest(1 - assumeNotNull(p.score), 1e-15)))) AS log_loss"""
_REGRESSION_METRICS = """count() AS labelled, avg(l.label) AS mean_label,
       sqrt(avg(pow(assumeNotNull(p.score) - l.label, 2))) AS rmse,
       avg(abs(assumeNotNull(p.score) - l.label)) AS mae"""
# (metric columns after `labelled`, the two plotted, their axis labels) per objective
_OBJECTIVE_METRICS = {
    "binary": (_BINARY_METRICS, ("auc", "log_loss"), ("AUC", "log loss")),
    "regression": (_REGRESSION_METRICS, ("rmse", "mae"), ("RMSE", "MAE")),
}


def metric_columns(objective: str) -> str:
    """The SELECT expressions of the online metrics of `objective` over `predictions AS p JOIN labels AS l`."""
    return _OBJECTIVE_METRICS[objective][0]


def online_metrics_sql(bucket_s: int, objective: str = "binary") -> list[str]:
    metrics = metric_columns(objective)
    body = f"""{metrics}
FROM predictions AS p FINAL
INNER JOIN labels AS l FINAL ON p.event_id = l.event_id
WHERE p.score IS NOT NULL"""
    return [
        f"""SELECT toStartOfInterval(p.event_time, INTERVAL {bucket_s} SECOND) AS bucket, p.model_version AS model_version,
       {body}
GROUP BY bucket, model_version ORDER BY bucket, model_version""",
        f"""SELECT p.model_version AS model_version, {body}
GROUP BY model_version ORDER BY model_version""",
    ]


def _auc_if_defined(labelled, positives, auc) -> float | None:
    # AUC needs both classes; ClickHouse returns NaN (or 0) otherwise.
    return _finite(auc) if 0 < int(positives) < int(labelled) else None


def _metric_values(objective: str, labelled, second, first, third) -> dict[str, Any]:
    """One result row's metrics by name (`second` is positives or the mean label)."""
    if objective == "binary":
        return {"labelled": int(labelled), "positives": int(second), "auc": _auc_if_defined(labelled, second, first),
                "log_loss": _finite(third)}
    return {"labelled": int(labelled), "mean_label": _finite(second), "rmse": _finite(first), "mae": _finite(third)}


def online_metrics_section(store: Store, bucket_s: int, objective: str = "binary") -> Section:
    bucket_s = max(bucket_s, MIN_METRICS_BUCKET_S)
    over_time_sql, per_version_sql = online_metrics_sql(bucket_s, objective)
    _, plotted, axis_labels = _OBJECTIVE_METRICS[objective]
    what = ("AUC and log loss" if objective == "binary" else "RMSE and MAE")
    section = Section("online_metrics", "Online metrics from delayed labels",
                      f"Scored predictions joined with their labels: {what} per {bucket_label(bucket_s)} "
                      "of event time and model version" + (" (AUC only where both classes occur)."
                                                            if objective == "binary" else "."),
                      [over_time_sql, per_version_sql])
    series: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for bucket, version, *values in store.query(over_time_sql).rows:
        s = series[int(version)]
        s["bucket"].append(bucket)
        for name, value in _metric_values(objective, *values).items():
            s[name].append(value)
    section.table = store.query(per_version_sql)
    section.data = {
        "objective": objective,
        "series": {v: dict(s) for v, s in sorted(series.items())},
        "per_version": {int(v): _metric_values(objective, *values) for v, *values in section.table.rows},
    }
    if not series:
        section.note = "no scored prediction has a label yet"
        return section
    figure = Figure(figsize=(11, 3.5))
    axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for version, s in section.data["series"].items():
        for ax, name in zip(axes, plotted):
            ax.plot(s["bucket"], [math.nan if v is None else v for v in s[name]], marker="o", label=f"v{version}")
    for ax, label in zip(axes, axis_labels):
        ax.set_ylabel(label)
        ax.set_xlabel("event time (UTC)")
        ax.legend(fontsize=8)
        _time_axis(ax)
    section.png = _png(figure)
    return section


def _scored_metrics(score: str, prefix: str, objective: str) -> str:
    """The two plotted metrics of `score` (an expression) against l.label, named <prefix>_<metric>."""
    if objective == "binary":
        return (f"arrayAUC(groupArray(({score}, l.label)).1, groupArray(({score}, l.label)).2) AS {prefix}_auc, "
                f"avg(-(l.label * log(greatest({score}, 1e-15)) + (1 - l.label) * log(greatest(1 - {score}, 1e-15)))) "
                f"AS {prefix}_log_loss")
    return (f"sqrt(avg(pow({score} - l.label, 2))) AS {prefix}_rmse, avg(abs({score} - l.label)) AS {prefix}_mae")


def shadow_sql(objective: str = "binary") -> list[str]:
    """Per version scored in shadow and version that served the same events: both on those labelled events;
    and a sample of (shadow score, served score) pairs."""
    return [
        f"""SELECT s.model_version AS shadow_version, p.model_version AS served_version, count() AS labelled,
       {_scored_metrics("s.score", "shadow", objective)},
       {_scored_metrics("assumeNotNull(p.score)", "served", objective)}
FROM shadow_predictions AS s FINAL
INNER JOIN predictions AS p FINAL ON s.event_id = p.event_id
INNER JOIN labels AS l FINAL ON s.event_id = l.event_id
WHERE p.score IS NOT NULL
GROUP BY shadow_version, served_version ORDER BY shadow_version, served_version""",
        """SELECT s.model_version AS shadow_version, p.model_version AS served_version, s.score AS shadow_score,
       assumeNotNull(p.score) AS served_score
FROM shadow_predictions AS s FINAL
INNER JOIN predictions AS p FINAL ON s.event_id = p.event_id
WHERE p.score IS NOT NULL
ORDER BY cityHash64(s.event_id, s.model_version) LIMIT 6000""",
    ]


def shadow_section(store: Store, objective: str = "binary") -> Section:
    per_pair_sql, sample_sql = shadow_sql(objective)
    _, plotted, axis_labels = _OBJECTIVE_METRICS[objective]
    section = Section("shadow", "Shadow against production",
                      "Versions in shadow (or the canary, and production on the canary's share) scored the same "
                      "events as the version that served them: their scores side by side, and both versions' "
                      f"{' and '.join(axis_labels)} on the same labelled events (what the online gate compares).",
                      [per_pair_sql, sample_sql])
    section.table = store.query(per_pair_sql)
    sample = store.query(sample_sql).rows
    section.data = {"pairs": [dict(zip(section.table.column_names, row)) for row in section.table.rows],
                    "sample": len(sample)}
    if not sample:
        section.note = "no version was scored in shadow"
        return section
    figure = Figure(figsize=(11, 3.8))
    scatter, bars = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    by_pair: dict[tuple[int, int], list] = defaultdict(list)
    for shadow, served, shadow_score, served_score in sample:
        by_pair[(int(shadow), int(served))].append((served_score, shadow_score))
    for (shadow, served), points in sorted(by_pair.items()):
        xs, ys = zip(*points)
        scatter.scatter(xs, ys, s=4, alpha=0.4, label=f"v{shadow} (shadow) vs v{served} (served)")
    low = min(min(p) for points in by_pair.values() for p in points)
    high = max(max(p) for points in by_pair.values() for p in points)
    scatter.plot([low, high], [low, high], color="#888", linewidth=0.8)
    scatter.set_xlabel("served score")
    scatter.set_ylabel("shadow score")
    scatter.legend(fontsize=7, markerscale=3)
    metric = plotted[0]
    labels, shadow_values, served_values = [], [], []
    for pair in section.data["pairs"]:
        labels.append(f"v{pair['shadow_version']}/v{pair['served_version']}\nn={pair['labelled']}")
        shadow_values.append(_finite(pair[f"shadow_{metric}"]) or math.nan)
        served_values.append(_finite(pair[f"served_{metric}"]) or math.nan)
    positions = range(len(labels))
    bars.bar([x - 0.2 for x in positions], shadow_values, width=0.4, label="shadow version")
    bars.bar([x + 0.2 for x in positions], served_values, width=0.4, label="serving version")
    bars.set_xticks(list(positions), labels, fontsize=7)
    bars.set_ylabel(f"{axis_labels[0]} on the same events")
    bars.legend(fontsize=8)
    if metric == "auc":
        finite = [v for v in shadow_values + served_values if math.isfinite(v)]
        if finite:
            bars.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02))
    section.png = _png(figure)
    return section


REJECTED_SQL = """SELECT reason, service, count() AS events
FROM rejected_events FINAL
GROUP BY reason, service ORDER BY events DESC, reason"""


def rejected_section(store: Store) -> Section:
    section = Section("rejected", "Rejected events by reason",
                      "Messages dead-lettered (scorer) or unreadable (logger), by reason code.", [REJECTED_SQL])
    section.table = store.query(REJECTED_SQL)
    counts = {f"{reason} ({service})": int(n) for reason, service, n in section.table.rows}
    section.data = {"counts": counts, "by_reason": _sum_by_first(section.table.rows)}
    if not counts:
        section.note = "no rejected events"
        return section
    figure = Figure(figsize=(9, 0.35 * len(counts) + 1.2))
    ax = figure.add_subplot(1, 1, 1)
    labels = list(counts)[::-1]
    ax.barh(labels, [counts[k] for k in labels])
    ax.set_xlabel("messages")
    section.png = _png(figure)
    return section


def _sum_by_first(rows) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for first, *_, n in rows:
        totals[first] += int(n)
    return dict(totals)


def model_history_sql(metric: str = "auc") -> str:
    return f"""SELECT recorded_at, version, action, stage, parent_version, train_rows,
       metrics['{metric}'] AS {metric}, reason
FROM model_versions
ORDER BY recorded_at, version"""


DRIFT_DETECTIONS_SQL = """SELECT detected_at, model_version, detector, feature, statistic, value, threshold,
       retrain_requested
FROM drift_events WHERE kind = 'drift'
ORDER BY detected_at"""


def retrain_section(store: Store, objective: str = "binary") -> Section:
    metric, metric_label = ("auc", "AUC") if objective == "binary" else ("rmse", "RMSE")
    history_sql = model_history_sql(metric)
    section = Section("retrains", "Retrain history",
                      f"Registry actions logged in model_versions (validation {metric_label} of each version) and "
                      "drift detections (vertical lines; solid = retrain requested).", [history_sql, DRIFT_DETECTIONS_SQL])
    section.table = store.query(history_sql)
    detections = store.query(DRIFT_DETECTIONS_SQL)
    actions: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for recorded_at, version, action, _stage, _parent, _rows, value, _reason in section.table.rows:
        actions[action]["time"].append(recorded_at)
        actions[action]["version"].append(int(version))
        actions[action]["metric"].append(_finite(value))
    section.data = {"actions": {a: dict(s) for a, s in actions.items()},
                    "detections": [{"time": r[0], "detector": r[2], "feature": r[3], "retrain": bool(r[7])}
                                   for r in detections.rows]}
    if not actions and not detections.rows:
        section.note = "no model registered and no drift detected yet"
        return section
    figure = Figure(figsize=(11, 3.5))
    ax = figure.add_subplot(1, 1, 1)
    markers = {"register": "o", "promote": "^", "reject": "x", "rollback": "v"}
    for action, s in section.data["actions"].items():
        ax.scatter(s["time"], [math.nan if v is None else v for v in s["metric"]], marker=markers.get(action, "s"),
                   s=60, label=action)
        for t, v, value in zip(s["time"], s["version"], s["metric"]):
            if value is not None:
                ax.annotate(f"v{v}", (t, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for d in section.data["detections"]:
        ax.axvline(d["time"], color="red", alpha=0.5, linestyle="-" if d["retrain"] else ":")
    ax.set_ylabel(f"validation {metric_label}")
    ax.set_xlabel("recorded at (UTC)")
    ax.legend(fontsize=8)
    _time_axis(ax)
    section.png = _png(figure)
    if detections.rows:
        section.note = f"{len(detections.rows)} drift detection(s), " \
                       f"{sum(d['retrain'] for d in section.data['detections'])} with a retrain request"
    return section


# --- the report ---------------------------------------------------------------------
def build_report(store: Store, settings: Settings, registry: ModelRegistry | None = None,
                 spec: FeatureSpec | None = None) -> Report:
    if spec is None:
        settings, spec = resolve(settings)
    registry = registry or ModelRegistry(settings.registry_dir)
    low, high, _n = store.query("SELECT min(event_time), max(event_time), count() FROM predictions FINAL").rows[0]
    span_s = (high - low).total_seconds() if _n else 0.0
    bucket_s = choose_bucket_s(span_s)
    sections = [
        score_section(store, bucket_s),
        drift_section(store, registry, settings.model_name, bucket_s),
        online_metrics_section(store, bucket_s, spec.objective),
        rejected_section(store),
        retrain_section(store, spec.objective),
    ]
    if store.query("SELECT count() FROM shadow_predictions").rows[0][0]:  # only where a rollout ran
        sections.insert(3, shadow_section(store, spec.objective))
    return Report(generated_at=datetime.now(timezone.utc), database=settings.clickhouse_database,
                  topic_prefix=settings.topic_prefix, model_name=settings.model_name, bucket_s=bucket_s,
                  sections={s.key: s for s in sections})


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{margin-bottom:0}.meta{color:#666}section{margin:2.5em 0;border-top:1px solid #ddd}
img{max-width:100%}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px;text-align:right}
.note{color:#8a5300}"""


def _html_table(result: QueryResult, max_rows: int = 50) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4f}"
        return html.escape(str(v))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in result.column_names)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in result.rows[:max_rows])
    more = f"<p>({len(result.rows) - max_rows} more rows)</p>" if len(result.rows) > max_rows else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def render_html(report: Report) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>streamscore report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>streamscore report</h1>",
             f"<p class='meta'>generated {report.generated_at:%Y-%m-%d %H:%M:%S} UTC from ClickHouse database "
             f"<code>{html.escape(report.database)}</code>, topics <code>{html.escape(report.topic_prefix)}*</code>, "
             f"model <code>{html.escape(report.model_name)}</code>, time buckets {bucket_label(report.bucket_s)}</p>",
             "<ul>" + "".join(f"<li><a href='#{s.key}'>{html.escape(s.title)}</a></li>"
                              for s in report.sections.values()) + "</ul>"]
    for s in report.sections.values():
        parts.append(f"<section id='{s.key}'><h2>{html.escape(s.title)}</h2><p>{html.escape(s.description)}</p>")
        if s.note:
            parts.append(f"<p class='note'>{html.escape(s.note)}</p>")
        if s.png:
            parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,"
                         f"{base64.b64encode(s.png).decode()}'>")
        if s.table is not None and s.table.rows:
            parts.append(_html_table(s.table))
        for sql in s.sql:
            parts.append(f"<pre>{html.escape(sql)}</pre>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(store: Store, settings: Settings, path: Path, registry: ModelRegistry | None = None,
                 spec: FeatureSpec | None = None) -> Report:
    report = build_report(store, settings, registry, spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return report
