"""`streamscore demo`: the whole product in one command, ending by itself.

1. infra: local broker (unless KAFKA_BOOTSTRAP_SERVERS), topics, ClickHouse tables
   — in a namespace of its own (topic prefix `demo.`, database `streamscore_demo`,
   registry <data_dir>/demo/models), wiped at the start of every run;
2. history: simulated events flow through scorer + logger with no model yet
   (score NULL, features and inputs logged), labels arrive; the scorer runs in a
   process of its own and the events come from another (SimulationProcess), as
   in production, and the clock starts once the services own their partitions;
3. train v1 from ClickHouse through the offline feature path, promote it; the
   running scorer hot-swaps to it;
4. live: events at a fixed offered rate with poison messages mixed in;
5. print throughput, latency, row counts and a few SQL answers; stop everything.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from streamscore.kafka.config import schema_registry_config
from streamscore.avro.codec import AvroCodec, SchemaCatalog
from streamscore.clickhouse.store import Store, open_store
from streamscore.clickhouse.tables import ensure_spec_tables
from streamscore.dev.generators import load_generator
from streamscore.dev.kafka_broker import LocalKafkaBroker
from streamscore.kafka.config import admin_config
from streamscore.kafka.io import admin_result
from streamscore.kafka.topics import ensure_topics, topic_names
from streamscore.learning.model_updates import publish_model_updates
from streamscore.learning.registry import ModelRegistry
from streamscore.learning.retraining import train_and_register
from streamscore.ops.report import write_report
from streamscore.services.runner import ServiceGroup, own_processes
from streamscore.services.tools.simulate import SimulationProcess, produce_simulation
from streamscore.settings import Settings
from streamscore.spec import FeatureSpec, default_spec_path, resolve

DEMO_TOPIC_PREFIX = "demo."
DEMO_DATABASE = "streamscore_demo"


def demo_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "topic_prefix": DEMO_TOPIC_PREFIX, "clickhouse_database": DEMO_DATABASE,
        "model_dir": settings.data_dir / "demo" / "models"})


@dataclass
class DemoOptions:
    history_events: int = 30_000
    live_events: int = 20_000
    rate: float = 2_000.0
    entities: int | None = None  # None: the generator's DEMO_ENTITIES (2,000 when it has none)
    seed: int = 7
    poison_every: int = 1_000
    # --drift: the closed loop (services/drift_demo.py); see drift_options() for its sizes
    drift: bool = False
    drift_kind: str = "concept"  # a simulator DriftSpec kind: concept | covariate | new_categories
    drift_at: int = 3_000  # live event index where the drift starts
    # --rollout: shadow, online gate, canary, promotion, a worse version stopped (services/tools/rollout_demo.py)
    rollout: bool = False


def drift_options(seed: int = 7, rate: float = 2_000.0, kind: str = "concept",
                  history: int | None = None, live: int | None = None) -> DemoOptions:
    """DemoOptions for `demo --drift`: 200 entities (a week of history in 16k events), no poison."""
    from streamscore.services.tools.drift_demo import DRIFT_DEMO_ENTITIES, DRIFT_DEMO_HISTORY, DRIFT_DEMO_LIVE

    return DemoOptions(history_events=history or DRIFT_DEMO_HISTORY, live_events=live or DRIFT_DEMO_LIVE,
                       rate=rate, entities=DRIFT_DEMO_ENTITIES, seed=seed, poison_every=0, drift=True,
                       drift_kind=kind)


def reset_namespace(settings: Settings, store: Store, keep_models: bool = False, spec: FeatureSpec | None = None) -> None:
    """Delete the demo's topics, tables and (unless `keep_models`) models so every run starts from nothing."""
    admin = AdminClient(admin_config(settings))
    existing = set(admin.list_topics(timeout=10).topics)
    doomed = [t for t in topic_names(settings, spec) if t in existing]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            admin_result(future)
        deadline = time.monotonic() + 30
        while set(doomed) & set(admin.list_topics(timeout=10).topics) and time.monotonic() < deadline:
            time.sleep(0.2)
    store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
    store.command(f"CREATE DATABASE {settings.clickhouse_database}")
    if not keep_models:
        shutil.rmtree(settings.registry_dir, ignore_errors=True)


REPLACING_TABLES = {"predictions", "labels", "rejected_events"}


def count_rows(store: Store, table: str) -> int:
    """Rows as analysts should count them: deduplicated (FINAL) where the table is a ReplacingMergeTree."""
    final = " FINAL" if table in REPLACING_TABLES else ""
    return int(store.query(f"SELECT count() FROM {table}{final}").rows[0][0])


def wait_for_rows(store: Store, table: str, expected: int, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = count_rows(store, table)
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def accounted_events(store: Store) -> int:
    """Events that reached ClickHouse either as a prediction or as a rejected event."""
    return count_rows(store, "predictions") + int(store.query(
        "SELECT count() FROM rejected_events FINAL WHERE service = 'scorer'").rows[0][0])


def wait_until_accounted(store: Store, expected: int, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (n := accounted_events(store)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def wait_until_ready(group: ServiceGroup, settings: Settings, timeout_s: float = 60.0) -> float:
    """Seconds until the group's scorer owns every events partition (state restored) and every other service
    owns some: the history phase then measures the pipeline's throughput, not the services' start-up."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s and not group.stop.is_set():
        owned = {name: service.stats.partitions_owned for name, service in group.services.items()}
        if all(n >= (settings.partitions if name == "scorer" else 1) for name, n in owned.items()):
            break
        time.sleep(0.05)
    return time.monotonic() - started


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


def _produce(console, settings, spec, codec, simulator, n, rate, poison_every, label):
    """Produce `n` events of `simulator` (a generator, or a SimulationProcess producing from its own process)."""
    with _progress(console) as progress:
        task = progress.add_task(label, total=n)
        update = lambda i: progress.update(task, completed=i)  # noqa: E731
        if isinstance(simulator, SimulationProcess):
            return simulator.produce(n, rate, poison_every, progress=update)
        return produce_simulation(settings, spec, codec, simulator, n, rate=rate, poison_every=poison_every,
                                  progress=update)


def _sql_table(console: Console, store: Store, title: str, sql: str) -> None:
    result = store.query(sql)
    table = Table(title=title, title_justify="left")
    for name in result.column_names:
        table.add_column(name)
    for row in result.rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)
    console.print(f"[dim]{sql}[/dim]", highlight=False)


def run_demo(base: Settings, options: DemoOptions, console: Console | None = None,
             spec: FeatureSpec | None = None) -> dict:
    console = console or Console()
    settings = demo_settings(base)
    if spec is None:
        settings, spec = resolve(settings)
    if options.drift:
        from streamscore.services.tools.drift_demo import DRIFT_DEMO_SETTINGS
        settings = settings.model_copy(update=DRIFT_DEMO_SETTINGS)
    if options.rollout:
        from streamscore.services.tools.rollout_demo import ROLLOUT_DEMO_SETTINGS
        settings = settings.model_copy(update=ROLLOUT_DEMO_SETTINGS)
    entities = options.entities or getattr(load_generator(spec), "DEMO_ENTITIES", 2_000)
    figures: dict = {"spec": spec.name, "objective": spec.objective}
    broker = LocalKafkaBroker(settings) if settings.uses_local_broker else None
    started_broker = False
    t0 = time.monotonic()
    if broker is not None:
        broker.install()
        started_broker = not broker.status().running
        broker.start()
    try:
        store = open_store(settings)
        reset_namespace(settings, store, spec=spec)
        store.migrate()
        ensure_spec_tables(store, spec)
        ensure_topics(settings, spec=spec)
        console.print(f"[bold]infra ready[/bold] in {time.monotonic() - t0:.1f} s: spec {spec.name!r} "
                      f"({len(spec.features)} features, {spec.objective}), Kafka {settings.bootstrap_servers}, "
                      f"ClickHouse {store.location} (database {settings.clickhouse_database})")
        codec = AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                          registry_config=schema_registry_config(settings))
        registry = ModelRegistry(settings.registry_dir)
        total = options.history_events + options.live_events
        if options.drift:
            from streamscore.services.tools.drift_demo import run_drift_phases
            figures.update(run_drift_phases(console, settings, spec, store, codec, options, entities))
            figures["total_seconds"] = time.monotonic() - t0
            console.print(f"demo finished in {figures['total_seconds']:.1f} s")
            return figures
        if options.rollout:
            from streamscore.services.tools.rollout_demo import run_rollout_phases
            figures.update(run_rollout_phases(console, settings, spec, store, codec, options, entities))
            report_path = settings.data_dir / "demo" / "report.html"
            write_report(store, settings, report_path)
            figures["report"] = str(report_path.resolve())
            console.print(f"HTML report (shadow against production, plots + their SQL): [bold]{figures['report']}"
                          "[/bold]", highlight=False)
            _print_how_to_query(console, spec)
            figures["total_seconds"] = time.monotonic() - t0
            console.print(f"demo finished in {figures['total_seconds']:.1f} s")
            return figures
        names = ["scorer", "logger"]
        with SimulationProcess(settings, spec, options.seed, entities, total) as simulator, \
                ServiceGroup(settings, names, store=store, spec=spec, processes=own_processes(settings, names)) as group:
            scorer = group.services["scorer"]
            # --- the services join their groups (the scorer restores its partitions' state) -------
            figures["services_ready_seconds"] = wait_until_ready(group, settings)
            console.print(f"scorer and logger ready in {figures['services_ready_seconds']:.1f} s "
                          f"(scorer {'in a process of its own' if 'scorer' in group.processes else 'as a thread'})")
            # --- history: no model yet ---------------------------------------------------
            phase = time.monotonic()
            report = _produce(console, settings, spec, codec, simulator, options.history_events, None, 0,
                              "history (no model yet)")
            wait_until_accounted(store, options.history_events)
            wait_for_rows(store, "labels", report.labels)
            logged = count_rows(store, "predictions")
            seconds = time.monotonic() - phase
            figures["history_events"] = logged
            figures["history_events_per_s"] = logged / seconds
            console.print(f"history: {report.events} events produced, {logged} scored and logged in {seconds:.1f} s "
                          f"= [bold]{logged / seconds:,.0f} events/s[/bold] end to end (as fast as possible)")

            # --- train v1 through the offline feature path ---------------------------------
            outcome = train_and_register(store, registry, settings, spec, reason="demo: initial model")
            publish_model_updates(settings, codec, outcome.events)
            headline = "rmse" if spec.objective == "regression" else "auc"
            figures[f"v1_{headline}"] = outcome.version.metrics.get(headline)
            console.print(f"trained v{outcome.version.version} on {outcome.training_rows} labelled events "
                          f"(replayed {outcome.events_replayed}) in {outcome.seconds:.1f} s: holdout "
                          f"{headline.upper()} {outcome.version.metrics.get(headline, float('nan')):.3f}; "
                          f"{'promoted' if outcome.promoted else 'rejected'} ({outcome.gate_reason})")
            swap_started = time.monotonic()
            while scorer.stats.model_version != outcome.version.version and time.monotonic() - swap_started < 30:
                time.sleep(0.05)
            figures["swap_seconds"] = time.monotonic() - swap_started
            console.print(f"scorer hot-swapped to v{scorer.stats.model_version} "
                          f"{figures['swap_seconds']:.2f} s after promotion, without a restart")

            # --- live traffic at a fixed rate, with poison mixed in ------------------------
            scorer.stats.reset_latencies()
            phase = time.monotonic()
            report = _produce(console, settings, spec, codec, simulator, options.live_events, options.rate,
                              options.poison_every, f"live at {options.rate:,.0f}/s")
            expected = options.history_events + options.live_events
            wait_until_accounted(store, expected + report.poison)
            seconds = time.monotonic() - phase
            latency = scorer.stats.latency_percentiles((50, 99, 99.9))
            figures.update(live_events=report.events, poison=report.poison, live_seconds=seconds,
                           latency_p50_ms=latency[50], latency_p99_ms=latency[99], latency_p999_ms=latency[99.9])
        figures["rows"] = {t: count_rows(store, t) for t in ("predictions", "labels", "rejected_events",
                                                               "model_versions")}
        _print_summary(console, store, figures, options, spec)
        # Written now, while this process still owns the (embedded) store.
        report_path = settings.data_dir / "demo" / "report.html"
        write_report(store, settings, report_path)
        figures["report"] = str(report_path.resolve())
        console.print(f"HTML report (plots + their SQL): [bold]{figures['report']}[/bold]", highlight=False)
        _print_how_to_query(console, spec)
        figures["total_seconds"] = time.monotonic() - t0
        console.print(f"demo finished in {figures['total_seconds']:.1f} s")
        return figures
    finally:
        if broker is not None and started_broker:
            broker.stop()


def _shown(path) -> str:
    """`path` relative to the working directory when it is below it (as a user would type it)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _print_how_to_query(console: Console, spec: FeatureSpec) -> None:
    """The demo's data stays in its own namespace; say how to look at it (the command works as printed)."""
    spec_option = "" if spec.path == default_spec_path().resolve() else f" --spec {_shown(spec.path.parent)}"
    console.print("Query the demo's data (database streamscore_demo):\n"
                  f"  [bold]./run query --demo{spec_option} \"SELECT model_version, count() FROM predictions FINAL "
                  "GROUP BY model_version\"[/bold]", highlight=False)


def _print_summary(console: Console, store: Store, figures: dict, options: DemoOptions, spec: FeatureSpec) -> None:
    table = Table(title=f"streamscore demo ({spec.name})", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("events scored (history, max speed)", f"{figures['history_events']:,}")
    table.add_row("  end-to-end events/s (produce -> ClickHouse)", f"{figures['history_events_per_s']:,.0f}")
    table.add_row(f"events scored (live, offered {options.rate:,.0f}/s)", f"{figures['live_events']:,}")
    table.add_row("  event -> prediction latency p50", f"{figures['latency_p50_ms']:.1f} ms")
    table.add_row("  event -> prediction latency p99", f"{figures['latency_p99_ms']:.1f} ms")
    table.add_row("poison messages injected", f"{figures['poison']:,}")
    for name, n in figures["rows"].items():
        table.add_row(f"rows in {name}", f"{n:,}")
    console.print(table)
    _sql_table(console, store, "score distribution by model version",
               "SELECT model_version, count() AS events, round(avg(score), 4) AS mean_score, "
               "round(quantile(0.5)(score), 4) AS p50, round(quantile(0.99)(score), 4) AS p99 "
               "FROM predictions FINAL GROUP BY model_version ORDER BY model_version")
    _sql_table(console, store, "entities with the highest scores (last model)",
               "SELECT entity_id, count() AS events, round(max(score), 4) AS max_score "
               "FROM predictions FINAL WHERE score IS NOT NULL GROUP BY entity_id ORDER BY max_score DESC LIMIT 5")
    _sql_table(console, store, "rejected events by reason",
               "SELECT reason, field, count() AS events FROM rejected_events FINAL GROUP BY reason, field "
               "ORDER BY events DESC")
    if spec.objective == "regression":
        _sql_table(console, store, "online error from delayed labels",
                   "SELECT p.model_version, count() AS labelled, round(avg(l.label), 3) AS mean_label, "
                   "round(sqrt(avg(pow(assumeNotNull(p.score) - l.label, 2))), 4) AS rmse, "
                   "round(avg(abs(assumeNotNull(p.score) - l.label)), 4) AS mae "
                   "FROM predictions AS p FINAL INNER JOIN labels AS l FINAL ON p.event_id = l.event_id "
                   "WHERE p.model_version > 0 GROUP BY p.model_version ORDER BY p.model_version")
        return
    _sql_table(console, store, "online quality from delayed labels (score >= 0.5 flags an event)",
               "SELECT p.model_version, count() AS labelled, sum(l.label) AS positives, "
               "round(arrayAUC(groupArray((assumeNotNull(p.score), l.label)).1, groupArray((assumeNotNull(p.score), l.label)).2), 4) "
               "AS auc, "
               "round(sumIf(l.label, p.score >= 0.5) / greatest(countIf(p.score >= 0.5), 1), 4) AS precision, "
               "round(sumIf(l.label, p.score >= 0.5) / greatest(sum(l.label), 1), 4) AS recall "
               "FROM predictions AS p FINAL INNER JOIN labels AS l FINAL ON p.event_id = l.event_id "
               "WHERE p.model_version > 0 GROUP BY p.model_version ORDER BY p.model_version")
