"""Operator experience on a real (small) run: HTML report, `status`, metrics endpoint, structured logs.

One module-scoped run feeds the tests: scorer + logger threads (ServiceGroup) on
a per-module namespace, history without a model, v1 trained through the offline
path and hot-swapped in, then live events with poison messages.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import urllib.request
import uuid
from dataclasses import dataclass
from html.parser import HTMLParser

import numpy as np
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from streamscore.avro.codec import AvroCodec
from streamscore.kafka.lag import consumer_groups_status
from streamscore.ops.logs import configure_logging
from streamscore.ops.metrics import MetricsServer
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.ops.report import build_report, choose_bucket_s, render_html, write_report
from streamscore.learning.retraining import train_and_register
from streamscore.services.tools.demo import wait_for_rows, wait_until_accounted
from streamscore.services.runner import ServiceGroup
from streamscore.dev.generators import generator_ending_now
from streamscore.services.tools.simulate import SimulationReport, produce_simulation
from streamscore.services.status import show_status
from streamscore.settings import TOPIC_EVENTS, TOPIC_PREDICTIONS, Settings
from streamscore.clickhouse.store import Store, open_store
from streamscore.kafka.topics import ensure_topics

from conftest import CACHE_DIR, example_spec, prepare, spec_codec
from conftest import wait_until as wait_for

PAYMENTS = example_spec("payments")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HISTORY_EVENTS = 4_000
LIVE_EVENTS = 1_500
POISON_EVERY = 250


@dataclass
class Run:
    settings: Settings
    store: Store
    group: ServiceGroup
    metrics: MetricsServer
    live: SimulationReport
    model_version: int


def wait_until(condition, what: str, timeout_s: float = 120.0, every_s: float = 0.2):
    return wait_for(condition, what, timeout_s=timeout_s, interval_s=every_s)


@pytest.fixture(scope="module")
def run(kafka_bootstrap, clickhouse_dsn, session_data_dir, tmp_path_factory):
    unique = uuid.uuid4().hex[:12]
    settings = Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        clickhouse_url=None if clickhouse_dsn.startswith("chdb:") else clickhouse_dsn,
        clickhouse_database=f"test_{unique}", topic_prefix=f"test-{unique}.", consumer_group_prefix=f"test-{unique}",
        data_dir=session_data_dir, cache_dir=CACHE_DIR, model_dir=tmp_path_factory.mktemp("ops-models"),
        train_num_boost_round=50,
        # an hour: the scorer checkpoints (writes state, commits) only when the events topic goes quiet
        scorer_checkpoint_interval_ms=3_600_000,
    )
    settings = prepare(settings)
    store = open_store(settings)
    codec = spec_codec(PAYMENTS, settings.schema_registry_url)
    registry = ModelRegistry(settings.registry_dir)
    simulator = generator_ending_now(PAYMENTS, seed=11, n_entities=300, n_events=HISTORY_EVENTS + LIVE_EVENTS)
    group = ServiceGroup(settings, ["scorer", "logger"], store=store).start()
    metrics = MetricsServer(settings, {name: s.stats for name, s in group.services.items()}, port=0,
                            addr="127.0.0.1", lag_interval_s=0.5).start()
    try:
        history = produce_simulation(settings, PAYMENTS, codec, simulator, HISTORY_EVENTS)
        assert wait_until_accounted(store, HISTORY_EVENTS) >= HISTORY_EVENTS
        wait_for_rows(store, "labels", history.labels)

        outcome = train_and_register(store, registry, settings, PAYMENTS, reason="test: initial model")
        events = outcome.events
        if not outcome.promoted:  # a small sample may miss the AUC gate; the report does not care
            events = [*events, registry.promote(settings.model_name, outcome.version.version, reason="test").event]
        publish_model_updates(settings, codec, events)
        scorer = group.services["scorer"]
        wait_until(lambda: scorer.pipeline.model.version == outcome.version.version, "the scorer to swap to v1")

        live = produce_simulation(settings, PAYMENTS, codec, simulator, LIVE_EVENTS, poison_every=POISON_EVERY)
        expected = HISTORY_EVENTS + LIVE_EVENTS + live.poison
        assert wait_until_accounted(store, expected) >= expected
        wait_for_rows(store, "labels", history.labels + live.labels)
        wait_for_rows(store, "model_versions", len(events))
        yield Run(settings, store, group, metrics, live, outcome.version.version)
    finally:
        metrics.stop()
        group.shutdown()
        store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        store.close()


# --- report ---------------------------------------------------------------------
class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.images: dict[str, bytes] = {}  # section id -> PNG bytes
        self.pre: list[str] = []
        self._in_pre = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "img":
            prefix = "data:image/png;base64,"
            assert attrs["src"].startswith(prefix)
            self.images[self.sections[-1]] = base64.b64decode(attrs["src"][len(prefix):])
        elif tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._in_pre:
            self.pre[-1] += data


def test_report_is_self_contained_html_with_a_plot_per_section(run, tmp_path):
    path = tmp_path / "report.html"
    write_report(run.store, run.settings, path)
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    assert parser.sections == ["scores", "drift", "online_metrics", "rejected", "retrains"]
    for section in parser.sections:
        png = parser.images.get(section)
        assert png and png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2_000, section
    # Every SQL shown under a plot runs as shown.
    assert len(parser.pre) >= 5
    for sql in parser.pre:
        run.store.query(sql)


def test_report_plots_the_runs_data(run):
    report = build_report(run.store, run.settings)
    q = lambda sql: run.store.query(sql).rows  # noqa: E731

    scores = report.sections["scores"].data
    per_version = dict(q("SELECT model_version, count() FROM predictions FINAL GROUP BY model_version"))
    assert scores["events_per_version"] == {int(v): int(n) for v, n in per_version.items()}
    assert set(scores["events_per_version"]) == {0, run.model_version}
    assert sum(scores["events_per_version"].values()) == HISTORY_EVENTS + LIVE_EVENTS
    scored = q("SELECT count() FROM predictions FINAL WHERE score IS NOT NULL")[0][0]
    assert sum(sum(bins.values()) for bins in scores["histogram"].values()) == scored
    assert all(m is None for m in scores["series"][0]["mean"])  # no model: no score
    assert any(m is not None for m in scores["series"][run.model_version]["mean"])

    metrics = report.sections["online_metrics"].data
    labelled = q("SELECT count() FROM predictions AS p FINAL INNER JOIN labels AS l FINAL ON p.event_id = l.event_id "
                 "WHERE p.score IS NOT NULL")[0][0]
    assert metrics["per_version"][run.model_version]["labelled"] == labelled > 0
    assert sum(sum(s["labelled"]) for s in metrics["series"].values()) == labelled
    pairs = np.array(q("SELECT p.score, l.label FROM predictions AS p FINAL INNER JOIN labels AS l FINAL "
                       "ON p.event_id = l.event_id WHERE p.model_version = %d" % run.model_version), dtype=float)
    ranks = pairs[:, 0].argsort().argsort() + 1.0  # scores of a 200-tree model: ties do not matter here
    positives = pairs[:, 1] == 1
    auc = (ranks[positives].sum() - positives.sum() * (positives.sum() + 1) / 2) / (positives.sum() * (~positives).sum())
    assert metrics["per_version"][run.model_version]["auc"] == pytest.approx(auc, abs=1e-3)
    loss = metrics["per_version"][run.model_version]["log_loss"]
    assert loss is not None and 0 < loss < 1

    rejected = report.sections["rejected"].data
    assert sum(rejected["by_reason"].values()) == q("SELECT count() FROM rejected_events FINAL")[0][0]
    assert sum(rejected["by_reason"].values()) >= run.live.poison > 0

    drift = report.sections["drift"].data
    assert drift["source"] == "feature_means" and drift["reference_version"] == run.model_version
    amount_means = q("SELECT avg(features['amount']) FROM predictions FINAL")[0][0]
    buckets = drift["buckets"]
    assert buckets and set(drift["means"]["amount"]) == set(buckets)
    # the per-bucket means recombine to the overall mean (each bucket weighted by its events)
    counts = dict(q(f"SELECT toStartOfInterval(event_time, INTERVAL {report.bucket_s} SECOND) AS b, count() "
                    "FROM predictions FINAL GROUP BY b"))
    overall = sum(drift["means"]["amount"][b] * counts[b] for b in buckets) / sum(counts.values())
    assert overall == pytest.approx(amount_means, rel=1e-9)

    retrains = report.sections["retrains"].data
    assert run.model_version in retrains["actions"]["register"]["version"]
    assert run.model_version in retrains["actions"]["promote"]["version"]

    html_text = render_html(report)
    assert "predictions FINAL" in html_text and html_text.count("<img") == 5


def test_bucket_choice_keeps_plots_readable():
    assert choose_bucket_s(0) == 60
    assert choose_bucket_s(48 * 60) == 60
    assert choose_bucket_s(48 * 60 + 1) == 300
    assert choose_bucket_s(30 * 86400) == 86400


# --- status ---------------------------------------------------------------------------
def test_status_shows_groups_lag_and_models(run):
    settings = run.settings
    predictions = settings.topic(TOPIC_PREDICTIONS)
    # The drift service is not running here: give its group a known committed position 7 behind the end.
    committer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": settings.group("drift"),
                          "enable.auto.commit": False})
    try:
        _, end = committer.get_watermark_offsets(TopicPartition(predictions, 0), timeout=10)
        assert end > 7
        committer.commit(offsets=[TopicPartition(predictions, 0, end - 7)], asynchronous=False)
    finally:
        committer.close()
    # With an hour's checkpoint interval the scorer still commits once the topic is quiet: its lag is 0.
    wait_until(lambda: {g.service: g for g in consumer_groups_status(settings, ["scorer"])}["scorer"].total_lag == 0,
               "scorer lag 0")

    console = Console(record=True, width=250, color_system=None)
    status = show_status(settings, console, store=run.store)
    text = console.export_text()

    groups = {g.service: g for g in status.groups}
    assert groups["scorer"].alive and groups["logger"].alive
    assert not groups["drift"].alive and not groups["trainer"].alive
    assert [(p.topic, p.partition, p.lag) for p in groups["drift"].partitions] == [(predictions, 0, 7)]
    events_partitions = {p.partition for p in groups["scorer"].partitions if p.topic == settings.topic(TOPIC_EVENTS)}
    assert events_partitions == set(range(settings.partitions))
    assert status.registry.production == run.model_version
    assert status.store_error is None and status.model_events.rows

    assert settings.group("scorer") in text and settings.group("drift") in text
    assert "alive" in text and "not running" in text
    drift_row = next(line for line in text.splitlines() if line.strip().startswith(settings.group("drift"))
                     and predictions in line)
    assert drift_row.split()[-1] == "7" and drift_row.split()[-3] == str(end - 7)
    assert f"production v{run.model_version}" in text
    assert "recent model registry events" in text


def test_status_cli_reads_the_store_through_the_process_holding_it(run):
    """This test process holds the session's embedded ClickHouse dir and runs a ServiceGroup, like a running
    `streamscore run` would: a `streamscore status` process cannot open the dir, the group's process answers
    its queries on the store socket instead, and says which of its services run."""
    import os
    import subprocess
    import sys

    if not run.settings.is_embedded_store:
        pytest.skip("only embedded ClickHouse (chDB) is single-process")
    s = run.settings
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAMSCORE_")}
    env.update(KAFKA_BOOTSTRAP_SERVERS=s.bootstrap_servers, STREAMSCORE_DATA_DIR=str(s.data_dir),
               STREAMSCORE_CLICKHOUSE_DATABASE=s.clickhouse_database, STREAMSCORE_TOPIC_PREFIX=s.topic_prefix,
               STREAMSCORE_CONSUMER_GROUP_PREFIX=s.consumer_group_prefix, STREAMSCORE_MODEL_DIR=str(s.registry_dir),
               COLUMNS="200")
    env.pop("CLICKHOUSE_URL", None)
    result = subprocess.run([sys.executable, "-c", "from streamscore.services.cli import main; main()", "status"],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert "ClickHouse not read" not in text
    assert "recent model registry events" in text and "none recorded" not in text.split("recent model registry")[1]
    assert s.group("scorer") in text and "alive" in text
    assert f"production v{run.model_version}" in text


# --- metrics -------------------------------------------------------------------------------
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_serves_every_service(run):
    scorer = run.group.services["scorer"].stats
    logger = run.group.services["logger"].stats
    events_topic = run.settings.topic(TOPIC_EVENTS)
    lag_key = ("streamscore_consumer_lag", (("partition", "0"), ("service", "scorer"), ("topic", events_topic)))

    def scrape_with_lag() -> str | None:
        text = scrape(run.metrics.port)
        return text if lag_key[0] in text and events_topic in text else None

    text = wait_until(scrape_with_lag, "consumer lag gauges")
    # One HELP/TYPE per family even though two services export the same names.
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))
    values = samples(text)
    scorer_in = values[("streamscore_events_in_total", (("service", "scorer"),))]
    assert scorer_in == scorer.events_in >= HISTORY_EVENTS + LIVE_EVENTS + run.live.poison
    assert values[("streamscore_events_out_total", (("service", "scorer"),))] == HISTORY_EVENTS + LIVE_EVENTS
    assert values[("streamscore_events_in_total", (("service", "logger"),))] == logger.events_in > 0
    assert values[("streamscore_model_version", (("service", "scorer"),))] == run.model_version
    assert values[("streamscore_batch_seconds_count", (("service", "scorer"),))] == scorer.batches > 0
    dead = {dict(labels)["reason"]: v for (name, labels), v in values.items()
            if name == "streamscore_dead_letters_total" and dict(labels)["service"] == "scorer"}
    assert dead == dict(scorer.rejections) and sum(dead.values()) == run.live.poison
    assert values[lag_key] >= 0


# --- logs ---------------------------------------------------------------------------------------
def test_logs_carry_fields_as_json_or_key_value(make_settings):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for json_format, settings in ((True, make_settings(log_level="DEBUG")), (False, make_settings())):
            configure_logging(settings, json=json_format)
            stream = io.StringIO()
            root.handlers[0].setStream(stream)
            log = logging.getLogger("streamscore.test")
            log.debug("debug line")
            log.info("model swap", extra={"model_version": 2, "previous_version": 1, "event_id": "e-1"})
            lines = stream.getvalue().splitlines()
            if json_format:
                assert [json.loads(line)["message"] for line in lines] == ["debug line", "model swap"]
                record = json.loads(lines[1])
                assert (record["level"], record["model_version"], record["previous_version"], record["event_id"]) == \
                       ("INFO", 2, 1, "e-1")
            else:  # INFO level: the debug line is dropped
                assert len(lines) == 1 and lines[0].endswith("model swap model_version=2 previous_version=1 event_id=e-1")
        with pytest.raises(ValueError, match="log_level 'LOUD'"):
            configure_logging(make_settings(log_level="LOUD"))
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


# --- deployment wiring ----------------------------------------------------------------------------
def test_prometheus_and_grafana_look_for_what_services_export():
    import re

    import yaml

    from conftest import REPO_ROOT
    from streamscore.ops.service_stats import ServiceStats

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    port = int(compose["x-streamscore"]["environment"]["STREAMSCORE_METRICS_PORT"])
    scrape = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus.yml").read_text())["scrape_configs"][0]
    discovery = scrape["dns_sd_configs"][0]
    assert discovery["port"] == port
    assert set(discovery["names"]) == {n for n, s in compose["services"].items()
                                       if s.get("command", [None])[0] == "run"}
    stats = ServiceStats("scorer")
    families = {family.name for family in stats.registry.collect()}
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "streamscore.json").read_text())
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name) for panel in dashboard["panels"]
            for target in panel["targets"] for name in re.findall(r"streamscore_[a-z_]+", target["expr"])}
    assert used and used <= families
