"""The report's metric sections follow the spec's objective: RMSE and MAE for a regression spec (rides)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from streamscore.ops.report import build_report, render_html
from tests.conftest import drop_database, prepare

N = 400


@pytest.fixture
def rides(make_settings, rides_spec, store_for):
    settings = prepare(make_settings(spec=rides_spec.path))
    yield settings, rides_spec, store_for(settings)
    drop_database(settings)


def test_a_regression_report_shows_rmse_and_mae_per_version(rides):
    settings, spec, store = rides
    rng = np.random.default_rng(3)
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    labels = rng.uniform(100, 1500, N)
    versions = np.where(np.arange(N) < N // 2, 1, 2)
    scores = labels + rng.normal(0, np.where(versions == 1, 50.0, 200.0))  # v2 is the worse model
    ids = [f"trip-{i}" for i in range(N)]
    times = [start + timedelta(minutes=i) for i in range(N)]
    store.insert("predictions", [[ids[i], "driver-1", times[i], times[i], spec.model.name, int(versions[i]),
                                  float(scores[i]), spec.feature_set, 0, i] for i in range(N)],
                 ["event_id", "entity_id", "event_time", "scored_at", "model_name", "model_version", "score",
                  "feature_set", "event_partition", "event_offset"])
    store.insert("labels", [[ids[i], "driver-1", float(labels[i]), times[i]] for i in range(N)],
                 ["event_id", "entity_id", "label", "label_time"])

    report = build_report(store, settings, spec=spec)
    metrics = report.sections["online_metrics"].data
    assert metrics["objective"] == "regression"
    for version in (1, 2):
        mine = versions == version
        error = scores[mine] - labels[mine]
        assert metrics["per_version"][version]["labelled"] == mine.sum()
        assert metrics["per_version"][version]["rmse"] == pytest.approx(np.sqrt(np.mean(error ** 2)), rel=1e-9)
        assert metrics["per_version"][version]["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-9)
    assert metrics["per_version"][2]["rmse"] > metrics["per_version"][1]["rmse"]
    assert sum(sum(s["labelled"]) for s in metrics["series"].values()) == N
    page = render_html(report)
    assert "RMSE and MAE" in page and "AUC and log loss" not in page
    for sql in report.sections["online_metrics"].sql:
        store.query(sql)  # the SQL shown under the plot runs as shown
