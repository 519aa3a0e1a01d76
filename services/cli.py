"""The `streamscore` command line: one entry point for operators and the demo."""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from streamscore.settings import Settings

app = typer.Typer(help="streamscore: streaming inference and logging on Kafka + ClickHouse.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
infra_app = typer.Typer(help="Local infrastructure: Kafka broker, topics, ClickHouse tables.", no_args_is_help=True)
app.add_typer(infra_app, name="infra")

console = Console()
errors = Console(stderr=True)


@app.callback()
def load_settings(ctx: typer.Context) -> None:
    """Settings come from environment variables (STREAMSCORE_*, KAFKA_BOOTSTRAP_SERVERS, CLICKHOUSE_URL); see README."""
    try:
        ctx.obj = Settings()
    except ValidationError as error:
        errors.print(f"[red]invalid configuration:[/red]\n{error}")
        raise typer.Exit(2) from error


def fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


_SPEC_OPTION = typer.Option(None, "--spec", help="Feature spec (a spec.yaml or its directory); default "
                            "STREAMSCORE_SPEC, else the payments example.")


def _with_spec(ctx: typer.Context, spec_path: Path | None = None, settings: Settings | None = None):
    """(settings, spec) for a command: --spec wins over STREAMSCORE_SPEC; a bad spec exits 2 naming file, line
    and key."""
    from streamscore.spec import SpecError, resolve

    settings = settings or ctx.obj
    if spec_path is not None:
        settings = settings.model_copy(update={"spec": spec_path})
    try:
        return resolve(settings)
    except (SpecError, OSError) as error:
        errors.print(f"[red]invalid feature spec:[/red] {error}", highlight=False)
        raise typer.Exit(2) from error


# --- infra ------------------------------------------------------------------
@infra_app.command("install")
def infra_install(ctx: typer.Context) -> None:
    """Download the Kafka broker jars once (into STREAMSCORE_CACHE_DIR); instant when already there."""
    from streamscore.dev.kafka_broker import KafkaBrokerError, LocalKafkaBroker

    settings: Settings = ctx.obj
    if not settings.uses_local_broker:
        console.print(f"external Kafka cluster configured ({settings.bootstrap_servers}): nothing to install")
        return
    broker = LocalKafkaBroker(settings)
    started = time.perf_counter()
    try:
        version = broker.install()
    except KafkaBrokerError as error:
        raise fail(str(error)) from error
    note = "" if version == settings.kafka_version else f" (fallback: {settings.kafka_version} did not resolve)"
    console.print(f"Kafka {version}{note} jars in {broker.libs_dir(version)} [{time.perf_counter() - started:.1f} s]")


# `infra up` exit codes besides 0 (all done) and 1 (failed): the broker is fine (started, restarted or
# running) but the embedded store is open in another streamscore process, so its tables were not checked.
EXIT_STORE_BUSY = 3


@infra_app.command("up")
def infra_up(ctx: typer.Context, spec_path: Path | None = _SPEC_OPTION,
             secure: bool = typer.Option(False, "--secure", help="Also give the local broker a SASL_SSL listener "
                                         "(SCRAM-SHA-512, certificates made here) and write the client settings "
                                         "file that connects to it (docs/connectivity.md).")) -> None:
    """Install and start the local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), create topics, migrate tables.

    Exit code 0: done; 1: failed; 3: the broker is up (its message says started, restarted or already
    running) but the embedded ClickHouse store is busy, held by a running `streamscore run`/`demo` that
    migrated it itself: nothing to stop or fix."""
    from confluent_kafka import KafkaException

    from streamscore.clickhouse.store import StoreError, StoreLockedError, open_store
    from streamscore.clickhouse.tables import ensure_spec_tables
    from streamscore.dev.kafka_broker import KafkaBrokerError, LocalKafkaBroker
    from streamscore.kafka.topics import ensure_topics

    settings, spec = _with_spec(ctx, spec_path)
    broker_state = "external cluster"
    store_busy = None
    try:
        if settings.uses_local_broker:
            broker = LocalKafkaBroker(settings, secure=secure)
            with _step("install Kafka jars") as note:
                note(f"Kafka {broker.install()}")
            with _step("start Kafka broker") as note:
                broker_state = broker.start_state()
                broker.start()
                note(f"{broker_state}, pid {broker.status().pid}, {settings.bootstrap_servers}, logs in {broker.log_dir}")
            if secure:
                with _step("secure listener") as note:
                    note(f"SASL_SSL (SCRAM-SHA-512) on {broker.secure_bootstrap}; client settings in "
                         f"{broker.client_properties_file}: export STREAMSCORE_KAFKA_CLIENT_PROPERTIES="
                         f"{broker.client_properties_file}")
        else:
            if secure:
                raise fail("--secure configures the local broker, but an external Kafka cluster is configured "
                           f"({settings.bootstrap_servers}); see docs/connectivity.md for its settings")
            with _step("check external Kafka cluster") as note:
                note(_check_external_kafka(settings))
        with _step("create topics") as note:
            created = ensure_topics(settings, spec=spec)
            note(f"created {', '.join(created)}" if created else "all present")
        with _step("migrate ClickHouse") as note:
            try:
                store = open_store(settings)
            except StoreLockedError as error:
                store_busy = error
                note(f"skipped, store busy: {(settings.data_dir / 'clickhouse').resolve()} is open in another "
                     "streamscore process (`run` or `demo`), which migrated it when it started")
            else:
                try:
                    applied = store.migrate()
                    evolved = ensure_spec_tables(store, spec)
                finally:
                    store.close()
                versions = ", ".join(map(str, applied)) if applied else "none (up to date)"
                note(f"{store.location} database {settings.clickhouse_database}: applied {versions}; spec "
                     f"{spec.name!r} (feature set {spec.feature_set}): " + ("; ".join(evolved) or "tables up to date"))
    except (KafkaBrokerError, StoreError, KafkaException, RuntimeError) as error:
        raise fail(str(error)) from error
    if store_busy is not None:
        errors.print(f"[yellow]store busy:[/yellow] broker {broker_state}, topics ready; the embedded ClickHouse store "
                     "is held by a running streamscore process, which reconnects to the broker by itself. Nothing "
                     f"to stop (exit code {EXIT_STORE_BUSY}).", highlight=False)
        raise typer.Exit(EXIT_STORE_BUSY)


@infra_app.command("down")
def infra_down(ctx: typer.Context) -> None:
    """Stop the local Kafka broker of STREAMSCORE_DATA_DIR (its data is kept)."""
    from streamscore.dev.kafka_broker import LocalKafkaBroker

    settings: Settings = ctx.obj
    if not settings.uses_local_broker:
        console.print(f"external Kafka cluster configured ({settings.bootstrap_servers}): nothing to stop")
        return
    with _step("stop Kafka broker") as note:
        note("stopped" if LocalKafkaBroker(settings).stop() else "was not running")


@infra_app.command("status")
def infra_status(ctx: typer.Context) -> None:
    """Show the broker, topics and ClickHouse store state."""
    from streamscore.dev.kafka_broker import LocalKafkaBroker
    from streamscore.clickhouse.shared_store import connect_store
    from streamscore.clickhouse.store import MIGRATIONS, StoreError
    from streamscore.kafka.topics import topic_names

    settings: Settings = ctx.obj
    table = Table(show_header=False, box=None)
    if settings.uses_local_broker:
        status = LocalKafkaBroker(settings).status()
        state = f"running, pid {status.pid}" if status.running else "stopped"
        table.add_row("kafka", f"local broker {status.bootstrap}: {state}; installed: {status.version or 'no'}")
        kafka_up = status.running
    else:
        try:
            table.add_row("kafka", f"external {settings.bootstrap_servers}: {_check_external_kafka(settings, timeout_s=5)}")
            kafka_up = True
        except RuntimeError as error:
            table.add_row("kafka", f"external {settings.bootstrap_servers}: [red]{error}[/red]")
            kafka_up = False
    if kafka_up:
        table.add_row("topics", _topic_summary(settings, topic_names(settings)))
    try:
        store = connect_store(settings)
        try:
            applied = [version for version, _ in store.applied_migrations()]
            latest = MIGRATIONS[-1][0]
            schema = f"schema version {max(applied)} of {latest}" if applied else "not migrated (run `streamscore infra up`)"
            table.add_row("clickhouse", f"{store.location} (ClickHouse {store.server_version()}), "
                                        f"database {settings.clickhouse_database}: {schema}")
        finally:
            store.close()
    except StoreError as error:
        table.add_row("clickhouse", f"[yellow]{error}[/yellow]")
    console.print(table)


def _check_external_kafka(settings: Settings, timeout_s: float = 10.0) -> str:
    from streamscore.kafka.config import KafkaConnectionError, check_connection

    try:
        metadata = check_connection(settings, timeout_s=timeout_s)
    except KafkaConnectionError as error:
        raise RuntimeError(str(error)) from error
    return f"answers, {len(metadata.brokers)} broker(s)"


def _topic_summary(settings: Settings, names: list[str]) -> str:
    from confluent_kafka.admin import AdminClient

    from streamscore.kafka.config import admin_config

    existing = AdminClient(admin_config(settings)).list_topics(timeout=10).topics
    present = [name for name in names if name in existing]
    missing = [name for name in names if name not in existing]
    text = f"{len(present)}/{len(names)} present"
    return text + (f"; missing: {', '.join(missing)}" if missing else "")


class _step:
    """Prints `name ... detail [seconds]` around one step of a command."""

    def __init__(self, name: str):
        self.name = name
        self.detail = ""

    def __enter__(self):
        self.started = time.perf_counter()
        return self._note

    def _note(self, detail: str) -> None:
        self.detail = detail

    def __exit__(self, exc_type, exc, tb):
        seconds = time.perf_counter() - self.started
        mark = "[green]ok[/green]" if exc_type is None else "[red]failed[/red]"
        console.print(f"{mark} {self.name}: {self.detail} [{seconds:.1f} s]", highlight=False)
        return False


def _namespace(ctx: typer.Context, demo: bool) -> Settings:
    """The settings of a look-up command: the demo's namespace with --demo (its module, which loads the whole
    training stack, imported only then: `streamscore query` answers in ~0.5 s instead of ~6)."""
    if not demo:
        return ctx.obj
    from streamscore.services.tools.demo import demo_settings

    return demo_settings(ctx.obj)


# --- query ------------------------------------------------------------------
class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command("query")
def query(
    ctx: typer.Context,
    sql: str = typer.Argument(..., help="SQL to run; unqualified tables are in STREAMSCORE_CLICKHOUSE_DATABASE."),
    output: OutputFormat | None = typer.Option(
        None, "--format", "-f",
        help="table (default), csv or json. SQL ending in ClickHouse's own FORMAT clause is printed as ClickHouse "
             "writes it instead."),
    demo: bool = typer.Option(False, "--demo", help="Query the demo's database (streamscore_demo)."),
    spec_path: Path | None = _SPEC_OPTION,
) -> None:
    """Run SQL against the ClickHouse store, also while `run`/`demo` holds it (e.g. "SELECT count() FROM predictions").

    While `streamscore run` or the demo holds the embedded store, that process answers (on its store socket)."""
    from streamscore.clickhouse.shared_store import connect_store
    from streamscore.clickhouse.store import own_output_format

    settings: Settings = _namespace(ctx, demo)
    own_format = own_output_format(sql)
    if own_format and output is not None:
        raise fail(f"the SQL names its output format (FORMAT {own_format}) and --format {output.value} was given: "
                   "keep one")
    try:
        store = connect_store(settings)
        try:
            if own_format:
                sys.stdout.buffer.write(store.query_formatted(sql))
                sys.stdout.flush()
                return
            result = store.query(sql)
        finally:
            store.close()
    except Exception as error:  # a store or SQL error: the message says what is wrong
        raise fail(str(error).strip()) from error
    if output is OutputFormat.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(result.column_names)
        writer.writerows(result.rows)
    elif output is OutputFormat.json:
        records = [dict(zip(result.column_names, map(_json_value, row))) for row in result.rows]
        sys.stdout.write(json.dumps(records, default=str) + "\n")
    else:
        table = Table(*result.column_names)
        for row in result.rows:
            table.add_row(*(str(value) for value in row))
        console.print(table)


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Infinity
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    return value


# --- models -----------------------------------------------------------------
models_app = typer.Typer(help="Model registry: list versions, show one, shadow, canary, promote, reject, roll back.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

_MODEL_OPTION = typer.Option(None, "--model", "-m", help="Model name (default: STREAMSCORE_MODEL_NAME, else the "
                             "spec's model name).")
_PUBLISH_OPTION = typer.Option(True, "--publish/--no-publish",
                               help="Publish the ModelUpdate to Kafka (model-updates topic; logged to model_versions).")


def _registry(ctx: typer.Context, model: str | None):
    """The registry and the model a `models` command is about: --model, else STREAMSCORE_MODEL_NAME, else the
    spec's model name."""
    from streamscore.learning.registry import ModelRegistry

    settings: Settings = ctx.obj
    if model is None and settings.model_name is None:
        settings, _ = _with_spec(ctx)
    return ModelRegistry(settings.registry_dir), model or settings.model_name


def _utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _metric(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    return "-" if value is None else f"{value:.4f}"


@models_app.command("list")
def models_list(ctx: typer.Context, model: str | None = _MODEL_OPTION) -> None:
    """All versions of the model with their stage, feature set and validation AUC."""
    from streamscore.learning.registry import stage_label

    registry, name = _registry(ctx, model)
    versions = registry.list(name)
    if not versions:
        console.print(f"model {name!r} has no versions in {registry.root}")
        return
    stages = registry.stages(name)
    rejected = registry.rejected_versions(name)
    from rich import box

    table = Table("version", "created (UTC)", "stage", "feature_set", "AUC / RMSE", "rows", "parent",
                  title=f"model {name} ({registry.root})", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
    for column in table.columns:
        column.no_wrap = True
    for v in versions:
        stage = stage_label(stages, v.version, rejected)
        style = {"production": "bold green", "candidate": "cyan", "rejected": "red", "shadow": "magenta"}.get(
            stage, "yellow" if stage.startswith("canary") else None)
        headline = "rmse" if v.objective == "regression" else "auc"
        table.add_row(str(v.version), _utc(v.created_at)[:16], stage, v.feature_set[:12], _metric(v.metrics, headline),
                      str(v.train_rows), "-" if v.parent_version is None else str(v.parent_version), style=style)
    console.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, version: int = typer.Argument(..., help="Version number."),
                model: str | None = _MODEL_OPTION) -> None:
    """Metadata of one version: training window, metrics, threshold, params, score baseline, history."""
    from streamscore.learning.registry import RegistryError, stage_label

    registry, name = _registry(ctx, model)
    try:
        v = registry.get(name, version)
    except RegistryError as error:
        raise fail(str(error)) from error
    stages = registry.stages(name)
    table = Table(show_header=False, box=None, title=f"model {name} v{v.version}")
    table.add_row("stage", stage_label(stages, v.version) or "-")
    table.add_row("created", _utc(v.created_at))
    table.add_row("parent", "-" if v.parent_version is None else str(v.parent_version))
    table.add_row("reason", v.reason or "-")
    table.add_row("feature_set", v.feature_set)
    table.add_row("features", ", ".join(v.feature_names))
    table.add_row("categorical", ", ".join(v.categorical_features) or "-")
    table.add_row("training window", f"{_utc(v.train_start)} .. {_utc(v.train_end)} ({v.train_rows} rows)")
    table.add_row("objective", v.objective)
    table.add_row("threshold", "-" if v.threshold is None else f"{v.threshold:.6f}")
    for feature, values in v.vocabularies.items():
        table.add_row(f"vocabulary {feature}", ", ".join(values[:20]) + (" ..." if len(values) > 20 else ""))
    table.add_row("metrics", "  ".join(f"{k}={val:.4f}" for k, val in sorted(v.metrics.items())))
    score = v.baseline.get("score", {}).get("quantiles")
    if score:
        table.add_row("score quantiles", "  ".join(f"q{k}={val:.4f}" for k, val in score.items() if val is not None))
    table.add_row("params", json.dumps(v.params, sort_keys=True))
    table.add_row("sha256", v.model_sha256 or "-")
    console.print(table)
    history = [h for h in stages["history"] if h["version"] == v.version]
    if history:
        events = Table("at (UTC)", "action", "stage", "reason", "evidence", title="history")
        for h in history:
            stage = h["stage"] + (f" {h['share']:.0%}" if h.get("share") else "")
            evidence = "  ".join(f"{k}={val:.4g}" for k, val in sorted((h.get("evidence") or {}).items())) or "-"
            events.add_row(_utc(h["at"]), h["action"], stage, h["reason"] or "-", evidence)
        console.print(events)


@models_app.command("promote")
def models_promote(ctx: typer.Context, version: int = typer.Argument(..., help="Version to serve."),
                   model: str | None = _MODEL_OPTION,
                   reason: str = typer.Option("manual promote", "--reason", help="Recorded in the history."),
                   publish: bool = _PUBLISH_OPTION) -> None:
    """Make VERSION the production model (scorers pick it up within a second)."""
    from streamscore.learning.registry import RegistryError

    registry, name = _registry(ctx, model)
    try:
        update = registry.promote(name, version, reason=reason)
    except RegistryError as error:
        raise fail(str(error)) from error
    before = "none" if update.previous_production is None else f"v{update.previous_production}"
    console.print(f"model {name}: production {before} -> v{update.model_version.version} ({reason})", highlight=False)
    if publish:
        _publish_update(ctx.obj, update.event)


@models_app.command("shadow")
def models_shadow(ctx: typer.Context, version: int = typer.Argument(..., help="Version to score in shadow."),
                  model: str | None = _MODEL_OPTION,
                  reason: str = typer.Option("manual shadow", "--reason", help="Recorded in the history."),
                  publish: bool = _PUBLISH_OPTION) -> None:
    """Score every event with VERSION too, never serving it (logged to shadow_predictions); the trainer's online
    gate then moves it on (canary or promote) or rejects it."""
    from streamscore.learning.registry import RegistryError

    registry, name = _registry(ctx, model)
    try:
        update = registry.shadow(name, version, reason=reason)
    except RegistryError as error:
        raise fail(str(error)) from error
    console.print(f"model {name}: v{version} in shadow beside production "
                  f"{'none' if update.previous_production is None else f'v{update.previous_production}'} ({reason})",
                  highlight=False)
    if publish:
        _publish_update(ctx.obj, update.event)


@models_app.command("canary")
def models_canary(ctx: typer.Context, version: int = typer.Argument(..., help="Version to serve as the canary."),
                  share: float = typer.Option(..., "--share", help="Share of entities it serves, 0 < share < 1 "
                                              "(by a hash of the entity id: the same entities every time; run again "
                                              "with a higher share to raise it)."),
                  model: str | None = _MODEL_OPTION,
                  reason: str = typer.Option("manual canary", "--reason", help="Recorded in the history."),
                  publish: bool = _PUBLISH_OPTION) -> None:
    """Serve VERSION to a sticky share of entities; production serves the rest."""
    from streamscore.learning.registry import RegistryError

    registry, name = _registry(ctx, model)
    try:
        update = registry.canary(name, version, share, reason=reason)
    except (RegistryError, ValueError) as error:
        raise fail(str(error)) from error
    console.print(f"model {name}: v{version} serves {share:.1%} of entities as the canary, production "
                  f"v{update.previous_production} the rest ({reason})", highlight=False)
    if publish:
        _publish_update(ctx.obj, update.event)


@models_app.command("reject")
def models_reject(ctx: typer.Context, version: int = typer.Argument(..., help="Version to reject."),
                  model: str | None = _MODEL_OPTION,
                  reason: str = typer.Option("manual reject", "--reason", help="Recorded in the history."),
                  publish: bool = _PUBLISH_OPTION) -> None:
    """Reject VERSION: it stops being shadowed or serving as the canary."""
    from streamscore.learning.registry import RegistryError

    registry, name = _registry(ctx, model)
    try:
        update = registry.reject(name, version, reason)
    except RegistryError as error:
        raise fail(str(error)) from error
    console.print(f"model {name}: v{version} rejected ({reason})", highlight=False)
    if publish:
        _publish_update(ctx.obj, update.event)


@models_app.command("rollback")
def models_rollback(ctx: typer.Context, model: str | None = _MODEL_OPTION,
                    reason: str = typer.Option("manual rollback", "--reason", help="Recorded in the history."),
                    canary: bool = typer.Option(False, "--canary", help="End the canary (production serves every "
                                                "entity again) instead of rolling production back."),
                    publish: bool = _PUBLISH_OPTION) -> None:
    """Serve the previous production version again (with --canary: end the canary instead)."""
    from streamscore.learning.registry import RegistryError

    registry, name = _registry(ctx, model)
    try:
        update = registry.rollback_canary(name, reason=reason) if canary else registry.rollback(name, reason=reason)
    except RegistryError as error:
        raise fail(str(error)) from error
    if canary:
        console.print(f"model {name}: canary v{update.model_version.version} rolled back, production "
                      f"v{update.previous_production} serves every entity ({reason})", highlight=False)
    else:
        console.print(f"model {name}: production v{update.previous_production} -> v{update.model_version.version} "
                      f"({reason})", highlight=False)
    if publish:
        _publish_update(ctx.obj, update.event)


@models_app.command("register")
def models_register(ctx: typer.Context,
                    model_file: Path = typer.Argument(..., exists=True, dir_okay=False,
                                                      help="A LightGBM model text file (booster.save_model)."),
                    spec_path: Path | None = _SPEC_OPTION, model: str | None = _MODEL_OPTION,
                    reference: Path | None = typer.Option(None, "--reference", exists=True, dir_okay=False,
                                                          help="CSV of the spec's features (a header row of feature "
                                                          "names) the drift baseline is computed from; default: the "
                                                          "logged data of the last --days."),
                    days: float = typer.Option(7.0, "--days", min=0,
                                               help="Without --reference: the baseline is the model's scores on the "
                                               "features of the events logged in the last N days."),
                    reason: str = typer.Option("registered from a file", "--reason", help="Recorded with the version."),
                    promote: bool = typer.Option(False, "--promote", help="Also make it the production model."),
                    publish: bool = _PUBLISH_OPTION) -> None:
    """Register a LightGBM model trained elsewhere after checking its features against the spec."""
    from streamscore.learning.external import ExternalModelError, register_external_model
    from streamscore.learning.registry import RegistryError, registration_event

    settings, spec = _with_spec(ctx, spec_path)
    registry, name = _registry(ctx, model or settings.model_name)
    try:
        version, update = register_external_model(settings, spec, registry, name, model_file.read_text(),
                                                   reference=reference, days=days, reason=reason, promote=promote)
    except (ExternalModelError, RegistryError) as error:
        raise fail(str(error)) from error
    console.print(f"model {name} v{version.version} registered from {model_file} (feature set {version.feature_set}, "
                  f"baseline from {version.params.get('baseline_source')})"
                  + (", promoted to production" if update else ""), highlight=False)
    if publish:
        _publish_update(settings, registration_event(version))
        if update:
            _publish_update(settings, update.event)


def _publish_update(settings: Settings, event: dict) -> None:
    """Announce a registry action on `model-updates`, which the logger records in
    `model_versions`. The registry change itself is already done (scorers poll the
    production pointer within 0.5 s), so a broker problem is reported, not undone."""
    from confluent_kafka import KafkaException

    from streamscore.avro.codec import AvroCodec
    from streamscore.kafka.config import schema_registry_config
    from streamscore.kafka.io import DeliveryFailed
    from streamscore.learning.model_updates import publish_model_updates
    from streamscore.settings import TOPIC_MODEL_UPDATES

    try:
        publish_model_updates(settings, AvroCodec(registry_url=settings.schema_registry_url,
                                                  registry_config=schema_registry_config(settings)), [event],
                              timeout_s=15)
    except (DeliveryFailed, KafkaException) as error:
        raise fail(f"the registry was updated, but the model update was not published to "
                   f"{settings.topic(TOPIC_MODEL_UPDATES)} ({error}); scorers still pick the change up from the "
                   "registry, the model_versions log misses it") from error


# --- services -------------------------------------------------------------------
@app.command("run")
def run(ctx: typer.Context,
        services: list[str] = typer.Argument(..., help="scorer, logger, drift, trainer, or 'all'."),
        spec_path: Path | None = _SPEC_OPTION) -> None:
    """Run services in this process until SIGTERM/SIGINT (then flush, commit and exit)."""
    from streamscore.ops.native_heap import bound_native_heap, describe_heap_limits

    heap = bound_native_heap()  # before any thread allocates: glibc fixes its arena count at its first extra arena
    from streamscore.ops.logs import configure_logging
    from streamscore.ops.metrics import MetricsServer
    from streamscore.services.runner import SERVICE_NAMES, ServiceGroup, own_processes, run_until_signalled
    from streamscore.clickhouse.store import StoreError

    settings, spec = _with_spec(ctx, spec_path)
    try:
        configure_logging(settings)
    except ValueError as error:
        raise fail(str(error)) from error
    from streamscore.kafka.config import KafkaConnectionError

    logging.getLogger("streamscore.runner").info("native heap: %s", describe_heap_limits(heap))
    names = list(SERVICE_NAMES) if services == ["all"] else services
    try:
        group = ServiceGroup(settings, names, spec=spec, processes=own_processes(settings, names))
    except (ValueError, StoreError, KafkaConnectionError) as error:
        raise fail(str(error)) from error
    # One endpoint per process, exposing every service it runs (STREAMSCORE_METRICS_PORT, 0 = off).
    metrics = None
    if settings.metrics_port:
        stats = {name: service.stats for name, service in group.services.items() if hasattr(service, "stats")}
        metrics = MetricsServer(settings, stats).start()
    try:
        run_until_signalled(group)
    finally:
        if metrics is not None:
            metrics.stop()


@app.command("simulate")
def simulate(ctx: typer.Context,
             events: int = typer.Option(10_000, "--events", min=1, help="How many events to produce."),
             rate: float = typer.Option(1_000.0, "--rate", min=0, help="Offered events/s (0 = as fast as possible)."),
             seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same stream."),
             entities: int = typer.Option(2_000, "--entities", min=1, help="Distinct entities (cards, drivers...)."),
             drift: str = typer.Option("none", "--drift", help="none, or a drift of the spec's generator (payments: "
                                       "covariate, new_categories, concept)."),
             drift_at: int = typer.Option(0, "--drift-at", min=0, help="Event index where the drift starts."),
             poison_every: int = typer.Option(0, "--poison-every", min=0, help="Add a bad message every N events."),
             spec_path: Path | None = _SPEC_OPTION) -> None:
    """Produce the spec's generated events (and delayed labels) to its events/labels topics."""
    from streamscore.avro.codec import AvroCodec, SchemaCatalog
    from streamscore.dev.generators import Drift, GeneratorError, generator_ending_now
    from streamscore.kafka.config import schema_registry_config
    from streamscore.services.tools.simulate import produce_simulation

    settings, spec = _with_spec(ctx, spec_path)
    try:
        generator = generator_ending_now(spec, seed, entities, events,
                                         None if drift == "none" else Drift(kind=drift, at_event=drift_at))
    except (GeneratorError, ValueError) as error:
        raise fail(str(error)) from error
    codec = AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                      registry_config=schema_registry_config(settings))
    report = produce_simulation(settings, spec, codec, generator, events, rate=rate or None, poison_every=poison_every)
    console.print(f"produced {report.events} events, {report.labels} labels, {report.poison} poison messages "
                  f"in {report.seconds:.1f} s ({report.events / max(report.seconds, 1e-9):,.0f} events/s)")


@app.command("train")
def train(ctx: typer.Context,
          days: float = typer.Option(0, "--days", min=0, help="Train on the last N days of events (0 = all)."),
          reason: str = typer.Option("manual training", "--reason", help="Recorded with the version."),
          wait_s: float = typer.Option(300.0, "--wait", min=1,
                                       help="While `run all` holds the embedded store: seconds to wait for its "
                                            "trainer's verdict."),
          spec_path: Path | None = _SPEC_OPTION) -> None:
    """Build the training set from ClickHouse (offline feature path), train, gate, register, maybe promote.
    While `streamscore run` holds the embedded store, its trainer does it (a request on the retrain topic)."""
    from streamscore.avro.codec import AvroCodec
    from streamscore.kafka.config import schema_registry_config
    from streamscore.learning.model_updates import publish_model_updates
    from streamscore.learning.registry import ModelRegistry
    from streamscore.learning.retraining import train_and_register
    from streamscore.clickhouse.store import StoreError, StoreLockedError, open_store
    from streamscore.learning.training import TrainingDataError

    settings, spec = _with_spec(ctx, spec_path)
    since_ms = int((time.time() - days * 86400) * 1000) if days else None
    try:
        store = open_store(settings)
    except StoreLockedError:
        if days:
            raise fail("the embedded store is held by a running `streamscore run`, whose trainer trains on its "
                       "configured window (STREAMSCORE_TRAINER_WINDOW_DAYS): drop --days, or stop it first") from None
        _train_through_the_running_trainer(settings, spec, reason, wait_s)
        return
    except StoreError as error:
        raise fail(str(error)) from error
    try:
        store.migrate()
        outcome = train_and_register(store, ModelRegistry(settings.registry_dir), settings, spec, reason,
                                     since_ms=since_ms)
    except (StoreError, TrainingDataError) as error:
        raise fail(str(error)) from error
    publish_model_updates(settings, AvroCodec(registry_url=settings.schema_registry_url,
                                              registry_config=schema_registry_config(settings)), outcome.events)
    verdict = ("in shadow for the online gate" if outcome.shadowed else
               "promoted to production" if outcome.promoted else "rejected")
    console.print(_verdict_line(settings, spec, outcome.version, verdict, outcome.gate_reason), highlight=False)


def _verdict_line(settings: Settings, spec, version, verdict: str, why: str) -> str:
    headline = "rmse" if spec.objective == "regression" else "auc"
    return (f"model {settings.model_name} v{version.version}: {version.train_rows} labelled rows, "
            f"{headline.upper()} {version.metrics.get(headline, math.nan):.3f}, {verdict}: {why}")


def _train_through_the_running_trainer(settings: Settings, spec, reason: str, wait_s: float) -> None:
    """Ask the trainer of the process holding the store, through the retrain topic, and report its verdict
    (the registry is a directory both processes read)."""
    from streamscore.avro.codec import AvroCodec, SchemaCatalog
    from streamscore.kafka.config import schema_registry_config
    from streamscore.kafka.io import DeliveryTracker, flush_or_raise, make_producer, produce
    from streamscore.learning.registry import ModelRegistry
    from streamscore.learning.retrain_requests import manual_request
    from streamscore.settings import TOPIC_RETRAIN

    registry = ModelRegistry(settings.registry_dir)
    production = registry.read_production_version(settings.model_name) or 0
    request = manual_request(settings.model_name, production, reason, int(time.time() * 1000))
    codec = AvroCodec(SchemaCatalog.for_spec(spec), registry_url=settings.schema_registry_url,
                      registry_config=schema_registry_config(settings))
    producer, delivered = make_producer(settings), DeliveryTracker()
    produce(producer, settings.topic(TOPIC_RETRAIN),
            codec.encode("retrain_request", request, topic=settings.topic(TOPIC_RETRAIN)),
            settings.model_name.encode(), on_delivery=delivered)
    flush_or_raise(producer, delivered, timeout_s=30.0)
    console.print(f"the store is held by a running `streamscore run`: asked its trainer (request "
                  f"{request['request_id']}) ...", highlight=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for version in registry.list(settings.model_name):
            if request["request_id"] in version.reason:
                if registry.read_production_version(settings.model_name) == version.version:
                    verdict = "promoted to production"
                elif version.version in registry.rollout(settings.model_name).shadows:
                    verdict = "in shadow for the online gate"
                elif version.version in registry.rejected_versions(settings.model_name):
                    verdict = "rejected by the gate (`streamscore models list` shows why)"
                else:
                    time.sleep(0.5)  # registered, verdict not written yet
                    continue
                console.print(_verdict_line(settings, spec, version, verdict, version.reason), highlight=False)
                return
        time.sleep(0.5)
    raise fail(f"no trainer answered request {request['request_id']} within {wait_s:.0f} s: is `streamscore run "
               "all` (or `run trainer`) running, and did its training fail (its log says)? `streamscore status` "
               "shows the trainer's consumer group")


@app.command("demo")
def demo(ctx: typer.Context,
         history: int | None = typer.Option(None, "--history", min=1_000,
                                            help="Events before the first model (default 30000; 16000 with --drift)."),
         events: int | None = typer.Option(None, "--events", min=1,
                                           help="Live events after v1 is serving (default 20000; 10000 with --drift)."),
         rate: float = typer.Option(2_000.0, "--rate", min=1, help="Offered live events/s."),
         seed: int = typer.Option(7, "--seed", help="Simulator seed."),
         drift: bool = typer.Option(False, "--drift", help="Also run drift + trainer, inject a drift in the live "
                                    "phase and show detection, retrain, the gate's verdict and v1 vs v2 metrics."),
         rollout: bool = typer.Option(False, "--rollout", help="A staged rollout instead: v1 serving, a retrain, "
                                      "v2 in shadow, the online gate over labelled live events, a canary, promotion; "
                                      "then worse versions rejected from shadow and rolled back from canary."),
         drift_kind: str | None = typer.Option(None, "--drift-kind",
                                               help="With --drift: a drift of the spec's generator, default its "
                                               "first (payments: concept = the fraud pattern changes, covariate = "
                                               "amounts x3, new_categories; rides: traffic, distance, new_zones)."),
         spec_path: Path | None = _SPEC_OPTION) -> None:
    """The end-to-end demo: infra, history, train v1, hot swap, live traffic, figures and SQL answers."""
    from streamscore.dev.generators import GeneratorError, drift_kinds
    from streamscore.services.tools.demo import DemoOptions, drift_options, run_demo

    settings, spec = _with_spec(ctx, spec_path)
    try:
        kinds = drift_kinds(spec)
    except GeneratorError as error:
        raise fail(str(error)) from error
    if drift and rollout:
        raise fail("--drift and --rollout are two demos: choose one")
    if rollout:
        from streamscore.services.tools.rollout_demo import ROLLOUT_DEMO_HISTORY

        options = DemoOptions(history_events=history or ROLLOUT_DEMO_HISTORY, live_events=0, rate=rate, seed=seed,
                              poison_every=0, rollout=True)
    elif drift:
        drift_kind = drift_kind or (kinds[0] if kinds else None)
        if drift_kind not in kinds:
            raise fail(f"--drift-kind {drift_kind!r}: spec {spec.name!r}'s generator has {', '.join(kinds) or 'none'}")
        options = drift_options(seed=seed, rate=rate, kind=drift_kind, history=history, live=events)
    else:
        options = DemoOptions(history_events=history or 30_000, live_events=events or 20_000, rate=rate, seed=seed)
    import logging

    # librdkafka's transient start-up notices ("coordinator load in progress") are not news in a demo.
    logging.getLogger("streamscore.kafka").setLevel(logging.ERROR)
    from streamscore.clickhouse.store import StoreError
    from streamscore.dev.kafka_broker import KafkaBrokerError

    try:
        run_demo(settings, options, console, spec=spec)
    except (KafkaBrokerError, StoreError) as error:  # the message says what to do; a traceback would bury it
        raise fail(str(error)) from error


# --- operations ---------------------------------------------------------------------
_DEMO_OPTION = typer.Option(False, "--demo", help="Look at the demo's namespace (topics demo.*, database streamscore_demo).")


@app.command("status")
def status(ctx: typer.Context, demo: bool = _DEMO_OPTION, spec_path: Path | None = _SPEC_OPTION) -> None:
    """Services alive, consumer lag per group and partition, model versions, recent drift and retrains."""
    from streamscore.services.status import show_status

    settings, _ = _with_spec(ctx, spec_path, _namespace(ctx, demo))
    show_status(settings, console)


@app.command("report")
def report(ctx: typer.Context,
           out: Path = typer.Option(Path("streamscore-report.html"), "--out", "-o", help="HTML file to write."),
           demo: bool = _DEMO_OPTION, spec_path: Path | None = _SPEC_OPTION) -> None:
    """Write a self-contained HTML report (plots + their SQL) from ClickHouse: scores, drift, online AUC, rejects, retrains."""
    from streamscore.ops.report import write_report
    from streamscore.clickhouse.shared_store import connect_store
    from streamscore.clickhouse.store import StoreError

    settings, _ = _with_spec(ctx, spec_path, _namespace(ctx, demo))
    try:
        store = connect_store(settings)
        try:
            write_report(store, settings, out)
        finally:
            store.close()
    except StoreError as error:
        raise fail(str(error)) from error
    console.print(f"report written to {out.resolve()}", highlight=False)


# --- performance ----------------------------------------------------------------------
@app.command("bench")
def bench(ctx: typer.Context,
          quick: bool = typer.Option(False, "--quick", help="Shorter runs (~2 min): fewer events, 4 s per rate, "
                                     "memory at 100k and 300k entities."),
          sections: str = typer.Option("scorer,rollout,e2e,logger,memory", "--sections",
                                       help="Comma list of scorer (with the naive baseline), rollout (the scorer "
                                       "with shadows / a canary vs production only), e2e, logger, memory."),
          rates: str = typer.Option("1000,5000", "--rates", help="Offered events/s of the end-to-end runs."),
          seconds: float = typer.Option(0, "--seconds", min=0, help="Seconds per offered rate (0 = default)."),
          repeats: int = typer.Option(0, "--repeats", min=0, help="In-process runs per figure, median (0 = default)."),
          memory_entities: str = typer.Option("", "--memory-entities",
                                              help="Comma list of entity counts (default 100000,1000000)."),
          soak: float = typer.Option(0, "--soak", min=0, help="Instead: soak `run all` for this many minutes "
                                     "(per-minute latency, memory, retrains, exactly-once counts)."),
          soak_rate: float = typer.Option(2_500.0, "--soak-rate", min=1, help="Offered events/s of the soak."),
          soak_retrain_every: float = typer.Option(120.0, "--soak-retrain-every", min=10,
                                                   help="Seconds between the soak's retrain requests."),
          recovery: int = typer.Option(0, "--recovery", min=0, help="Instead: this many rounds of kill -9 of "
                                       "`run scorer` mid-stream, restarted at once: seconds until it scores "
                                       "again.")) -> None:
    """Performance figures with ratios to a naive baseline; --soak MINUTES: `run all` per minute; --recovery N: kill -9.

    Sections: scorer in process, end to end, logger, state memory. --soak instead runs `run all` at a steady
    rate with retrains and prints per-minute latency, memory, threads and retrains, and exactly-once counts.
    --recovery kills `run scorer` mid-stream N times, restarts it at once and prints the seconds until it
    scores again (services/tools/recovery.py)."""
    from streamscore.dev.kafka_broker import LocalKafkaBroker
    from streamscore.services.tools.bench import BenchOptions, print_report, run_bench

    settings: Settings = ctx.obj
    if soak:
        _soak(settings, soak, soak_rate, soak_retrain_every)
        return
    if recovery:
        _recovery(settings, recovery)
        return
    chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
    unknown = set(chosen) - {"scorer", "rollout", "e2e", "logger", "memory"}
    if unknown:
        raise fail(f"unknown --sections {sorted(unknown)}; choose from scorer, rollout, e2e, logger, memory")
    overrides: dict = {"sections": chosen, "rates": tuple(float(r) for r in rates.split(",") if r.strip())}
    if seconds:
        overrides["seconds_per_rate"] = seconds
    if repeats:
        overrides["repeats"] = repeats
    if memory_entities:
        overrides["memory_entities"] = tuple(int(n) for n in memory_entities.split(",") if n.strip())
    options = BenchOptions.quick_options(**overrides) if quick else BenchOptions(**overrides)
    started: list[LocalKafkaBroker] = []

    def start_kafka() -> None:  # called by the bench once Kafka is needed (after the in-process sections)
        if not settings.uses_local_broker:
            return
        broker = LocalKafkaBroker(settings)
        broker.install()
        if not broker.status().running:  # else someone else's broker: leave it running
            broker.start()
            started.append(broker)

    try:
        report = run_bench(settings, options, progress=lambda text: console.print(f"[dim]{text}[/dim]"),
                           start_kafka=start_kafka)
    finally:
        for broker in started:
            broker.stop()
    print_report(report, options, Console(width=max(console.width, 160)))


@contextmanager
def _local_broker_while(settings: Settings):
    """The local broker running for the block (started, and stopped after, unless it already ran)."""
    from streamscore.dev.kafka_broker import LocalKafkaBroker

    started = None
    if settings.uses_local_broker:
        broker = LocalKafkaBroker(settings)
        broker.install()
        if not broker.status().running:  # else someone else's broker: leave it running
            broker.start()
            started = broker
    try:
        yield
    finally:
        if started is not None:
            started.stop()


def _soak(settings: Settings, minutes: float, rate: float, retrain_every_s: float) -> None:
    from streamscore.services.tools.soak import print_soak, run_soak

    with _local_broker_while(settings):
        report = run_soak(settings, minutes, rate=rate, retrain_every_s=retrain_every_s,
                          progress=lambda text: console.print(f"[dim]{text}[/dim]", highlight=False))
    print_soak(report, Console(width=max(console.width, 120)))


def _recovery(settings: Settings, rounds: int) -> None:
    from streamscore.services.tools.recovery import run_recovery

    with _local_broker_while(settings):
        results = run_recovery(settings, rounds, progress=lambda text: console.print(f"[dim]{text}[/dim]"))
    seconds = sorted(r.seconds for r in results)
    console.print(f"kill -9 -> scoring again: {' / '.join(f'{r.seconds:.2f}' for r in results)} s "
                  f"(median {seconds[len(seconds) // 2]:.2f} s; target <= 3 s)")


def main() -> None:
    app()
