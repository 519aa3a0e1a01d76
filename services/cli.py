"""The `streamscore` command line: one entry point for operators and the demo."""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from enum import Enum

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from streamscore.settings import Settings

app = typer.Typer(help="streamscore: streaming inference and logging on Kafka + ClickHouse.", no_args_is_help=True)
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


# --- infra ------------------------------------------------------------------
@infra_app.command("install")
def infra_install(ctx: typer.Context) -> None:
    """Download the Kafka broker jars once (into STREAMSCORE_CACHE_DIR); instant when already there."""
    from streamscore.kafka_broker import KafkaBrokerError, LocalKafkaBroker

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


@infra_app.command("up")
def infra_up(ctx: typer.Context) -> None:
    """Install and start the local broker (unless KAFKA_BOOTSTRAP_SERVERS is set), create topics, migrate tables."""
    from confluent_kafka import KafkaException

    from streamscore.kafka_broker import KafkaBrokerError, LocalKafkaBroker
    from streamscore.store import StoreError, open_store
    from streamscore.topics import ensure_topics

    settings: Settings = ctx.obj
    try:
        if settings.uses_local_broker:
            broker = LocalKafkaBroker(settings)
            with _step("install Kafka jars") as note:
                note(f"Kafka {broker.install()}")
            with _step("start Kafka broker") as note:
                was_running = broker.status().running
                broker.start()
                state = "already running" if was_running else "started"
                note(f"{state}, pid {broker.status().pid}, {settings.bootstrap_servers}, logs in {broker.log_dir}")
        else:
            with _step("check external Kafka cluster") as note:
                note(_check_external_kafka(settings))
        with _step("create topics") as note:
            created = ensure_topics(settings)
            note(f"created {', '.join(created)}" if created else "all present")
        with _step("migrate ClickHouse") as note:
            store = open_store(settings)
            try:
                applied = store.migrate()
            finally:
                store.close()
            versions = ", ".join(map(str, applied)) if applied else "none (up to date)"
            note(f"{store.location} database {settings.clickhouse_database}: applied {versions}")
    except (KafkaBrokerError, StoreError, KafkaException, RuntimeError) as error:
        raise fail(str(error)) from error


@infra_app.command("down")
def infra_down(ctx: typer.Context) -> None:
    """Stop the local Kafka broker of STREAMSCORE_DATA_DIR (its data is kept)."""
    from streamscore.kafka_broker import LocalKafkaBroker

    settings: Settings = ctx.obj
    if not settings.uses_local_broker:
        console.print(f"external Kafka cluster configured ({settings.bootstrap_servers}): nothing to stop")
        return
    with _step("stop Kafka broker") as note:
        note("stopped" if LocalKafkaBroker(settings).stop() else "was not running")


@infra_app.command("status")
def infra_status(ctx: typer.Context) -> None:
    """Show the broker, topics and ClickHouse store state."""
    from streamscore.kafka_broker import LocalKafkaBroker
    from streamscore.store import MIGRATIONS, StoreError, open_store
    from streamscore.topics import topic_names

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
        store = open_store(settings)
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
    from confluent_kafka.admin import AdminClient

    try:
        metadata = AdminClient({"bootstrap.servers": settings.bootstrap_servers}).list_topics(timeout=timeout_s)
    except Exception as error:
        raise RuntimeError(f"Kafka at {settings.bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS) does not answer: {error}") from error
    return f"answers, {len(metadata.brokers)} broker(s)"


def _topic_summary(settings: Settings, names: list[str]) -> str:
    from confluent_kafka.admin import AdminClient

    existing = AdminClient({"bootstrap.servers": settings.bootstrap_servers}).list_topics(timeout=10).topics
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


# --- query ------------------------------------------------------------------
class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command("query")
def query(
    ctx: typer.Context,
    sql: str = typer.Argument(..., help="SQL to run; unqualified tables are in STREAMSCORE_CLICKHOUSE_DATABASE."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--format", "-f", help="table, csv or json."),
) -> None:
    """Run SQL against the ClickHouse store (e.g. streamscore query "SELECT count() FROM predictions FINAL")."""
    from streamscore.store import StoreError, open_store

    settings: Settings = ctx.obj
    try:
        store = open_store(settings)
        try:
            result = store.query(sql)
        finally:
            store.close()
    except StoreError as error:
        raise fail(str(error)) from error
    except Exception as error:  # a SQL error: ClickHouse's message says what is wrong
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


def main() -> None:
    app()
