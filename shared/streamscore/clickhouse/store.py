"""ClickHouse access for every service: one small `Store` over a clickhouse-connect client.

The same code and DDL run against embedded chDB (default: <data_dir>/clickhouse)
and a ClickHouse server (CLICKHOUSE_URL). chDB allows ONE data dir per process
and one process per data dir, so a process opens its Store once and its
services share it; the lock serialises their calls on the one client.

Schema changes are versioned migrations below: append a new (version, name,
statements) entry, never edit an applied one. Every statement is idempotent
(IF NOT EXISTS) so a migration interrupted halfway can simply run again.
"""
from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

import clickhouse_connect

from streamscore.settings import Settings

DEDUP_WINDOW = "non_replicated_deduplication_window = 1000"
DATABASE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # as Settings.clickhouse_database

# (version, name, statements); {db} is the validated settings.clickhouse_database. The predictions table
# and its view depend on the feature spec: clickhouse/tables.py creates and evolves them (until the
# spec, migrations 1 and 2 created a payments-shaped one, which the payments spec adopts as it is).
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial tables", [
        "CREATE DATABASE IF NOT EXISTS {db}",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.labels (
            event_id String,
            entity_id String,
            label UInt8,
            label_time DateTime64(3, 'UTC'),
            logged_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = ReplacingMergeTree
        ORDER BY event_id
        SETTINGS {DEDUP_WINDOW}""",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.rejected_events (
            source_topic LowCardinality(String),
            source_partition UInt32,
            source_offset UInt64,
            service LowCardinality(String),
            reason LowCardinality(String),
            field Nullable(String),
            detail String,
            raw String,
            event_id Nullable(String),
            rejected_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        ORDER BY (source_topic, source_partition, source_offset)
        SETTINGS {DEDUP_WINDOW}""",
        """CREATE TABLE IF NOT EXISTS {db}.drift_events (
            detected_at DateTime64(3, 'UTC'),
            model_name LowCardinality(String),
            model_version UInt32,
            kind LowCardinality(String),
            detector LowCardinality(String),
            feature String,
            statistic LowCardinality(String),
            value Float64,
            baseline Nullable(Float64),
            threshold Nullable(Float64),
            window UInt32,
            retrain_requested UInt8,
            request_id Nullable(String)
        ) ENGINE = MergeTree
        ORDER BY (model_name, detected_at)""",
        """CREATE TABLE IF NOT EXISTS {db}.model_versions (
            model_name LowCardinality(String),
            version UInt32,
            action LowCardinality(String),
            stage LowCardinality(String),
            parent_version Nullable(UInt32),
            feature_set String,
            created_at DateTime64(3, 'UTC'),
            recorded_at DateTime64(3, 'UTC'),
            train_start Nullable(DateTime64(3, 'UTC')),
            train_end Nullable(DateTime64(3, 'UTC')),
            train_rows UInt64,
            metrics Map(String, Float64),
            reason String
        ) ENGINE = MergeTree
        ORDER BY (model_name, version, recorded_at)""",
    ]),
    (2, "predictions_dedup view (now created with predictions from the spec, clickhouse/tables.py)", []),
    (3, "insert deduplication on the append-only logs", [
        # A plain MergeTree ignores insert_deduplication_token unless this window is set,
        # and FINAL cannot collapse its duplicates: without it, a logger replay of an
        # uncommitted batch wrote every model_versions / drift_events row twice.
        f"ALTER TABLE {{db}}.model_versions MODIFY SETTING {DEDUP_WINDOW}",
        f"ALTER TABLE {{db}}.drift_events MODIFY SETTING {DEDUP_WINDOW}",
    ]),
    (4, "labels of any kind (binary or numeric), feature sets", [
        "ALTER TABLE {db}.labels MODIFY COLUMN label Float64",
        "ALTER TABLE {db}.labels MODIFY COLUMN entity_id String DEFAULT ''",
        f"""CREATE TABLE IF NOT EXISTS {{db}}.feature_sets (
            feature_set String,
            spec_name LowCardinality(String),
            spec_version UInt32,
            feature_names Array(String),
            description String,
            registered_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = ReplacingMergeTree
        ORDER BY feature_set
        SETTINGS {DEDUP_WINDOW}""",
    ]),
    (5, "shadow_predictions: the scores of versions in shadow or canary that were not served", [
        # One row per (event, model version); a replayed batch collapses under FINAL like predictions.
        f"""CREATE TABLE IF NOT EXISTS {{db}}.shadow_predictions (
            event_id String,
            entity_id String,
            event_time DateTime64(3, 'UTC'),
            model_name LowCardinality(String),
            model_version UInt32,
            score Float64,
            scored_at DateTime64(3, 'UTC'),
            event_partition UInt32,
            event_offset UInt64,
            logged_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(event_time)
        ORDER BY (model_name, model_version, event_id)
        SETTINGS {DEDUP_WINDOW}""",
    ]),
]

SCHEMA_MIGRATIONS_DDL = """CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY version"""


_OWN_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z][A-Za-z0-9_]*)\s*;?\s*$", re.IGNORECASE)


def own_output_format(sql: str) -> str | None:
    """The output format a query names at its end (ordinary ClickHouse SQL), else None.

    >>> own_output_format("SELECT 1 FORMAT TSVWithNames;")
    'TSVWithNames'
    >>> own_output_format("SELECT 'FORMAT' AS word") is None
    True
    """
    match = _OWN_FORMAT.search(sql)
    return match.group(1) if match else None


class StoreError(RuntimeError):
    """The ClickHouse store cannot be opened or used; the message says what to do."""


class StoreLockedError(StoreError):
    """Another process holds the embedded ClickHouse (chDB) data dir."""


@dataclass(frozen=True)
class QueryResult:
    column_names: tuple[str, ...]
    rows: list[tuple]
    read_rows: int = 0  # rows ClickHouse read to answer (its query summary): how bounded a query is


class Store:
    """One ClickHouse client plus migrations; safe to share between threads of one process."""

    def __init__(self, client, settings: Settings):
        self._client = client
        self._lock = threading.RLock()
        self.settings = settings
        self.database = settings.clickhouse_database

    @property
    def is_embedded(self) -> bool:
        return self.settings.is_embedded_store

    @property
    def location(self) -> str:
        """Where the data lives, for humans (server URLs without credentials)."""
        if self.is_embedded:
            return self.settings.clickhouse_dsn
        url = self.settings.clickhouse_dsn
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2]}"

    # --- schema -------------------------------------------------------------
    def migrate(self) -> list[int]:
        """Apply the migrations not yet recorded in schema_migrations; returns the versions applied now."""
        db = self.database
        with self._lock:
            self._client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
            self._client.command(SCHEMA_MIGRATIONS_DDL.format(db=db))
            done = {version for version, _ in self.applied_migrations()}
            applied = []
            for version, name, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    self._client.command(statement.format(db=db))
                self._client.command(
                    f"INSERT INTO {db}.schema_migrations (version, name, applied_at) VALUES "
                    "({version:UInt32}, {name:String}, now64(3))",
                    parameters={"version": version, "name": name},
                )
                applied.append(version)
            return applied

    def applied_migrations(self) -> list[tuple[int, str]]:
        exists = self.query(
            "SELECT count() FROM system.tables WHERE database = {db:String} AND name = 'schema_migrations'",
            {"db": self.database},
        ).rows[0][0]
        if not exists:
            return []
        rows = self.query(f"SELECT version, name FROM {self.database}.schema_migrations FINAL ORDER BY version").rows
        return [(int(version), name) for version, name in rows]

    # --- data ---------------------------------------------------------------
    def insert(self, table: str, rows: Sequence[Sequence[Any]], column_names: Sequence[str],
               dedup_token: str | None = None) -> int:
        """Insert rows into <database>.<table>; returns the row count.

        With dedup_token, a retry of the same block (same token) is dropped by
        ClickHouse, so a crash between writing and committing Kafka offsets
        does not duplicate rows.
        """
        if not rows:
            return 0
        settings = {"insert_deduplication_token": dedup_token} if dedup_token else None
        # Column-oriented: clickhouse-connect writes Native format column by column, so handing it
        # columns (one zip, in C) skips its own row -> column transposition (~10% of a logger insert).
        columns = list(zip(*rows))
        with self._lock:
            self._client.insert(table, columns, column_names=list(column_names), database=self.database,
                                settings=settings, column_oriented=True)
        return len(rows)

    def insert_native(self, table: str, block: bytes, rows: int, dedup_token: str | None = None) -> int:
        """Insert a block already in ClickHouse's Native format (names and types in the block itself,
        e.g. prediction_block.PredictionBlockWriter); returns `rows`. Dedup as in `insert`.

        optimize_on_insert=0: a ReplacingMergeTree would otherwise collapse equal keys within the
        block while inserting (~55% of the insert's time for 20k predictions). A key twice in one
        block (a scorer replay) then stays until a merge, like replays across blocks: FINAL reads
        are exact either way."""
        settings = {"optimize_on_insert": 0}
        if dedup_token:
            settings["insert_deduplication_token"] = dedup_token
        with self._lock:
            self._client.raw_insert(table, None, block, settings=settings, fmt="Native")
        return rows

    def query(self, sql: str, parameters: dict | Sequence | None = None,
              column_formats: dict[str, str] | None = None) -> QueryResult:
        """Run a SELECT. String columns holding binary data (rejected_events.raw) need
        column_formats={"raw": "bytes"}, else non-UTF-8 values come back hex-encoded."""
        with self._lock:
            result = self._client.query(sql, parameters=parameters, column_formats=column_formats)
        summary = getattr(result, "summary", None) or {}
        return QueryResult(column_names=tuple(result.column_names), rows=[tuple(row) for row in result.result_rows],
                           read_rows=int(summary.get("read_rows", 0) or 0))

    @contextmanager
    def using_database(self, database: str | None):
        """Unqualified tables of the calls inside are in `database` (None: this store's own): how one process
        serves the other databases of its embedded data dir (shared_store.StoreServer)."""
        if database is None or database == self.database:
            yield self
            return
        if not DATABASE_NAME.fullmatch(database):
            raise StoreError(f"database {database!r} is not a valid name (letters, digits, _; not a digit first)")
        with self._lock:
            previous = self._client.database
            self._client.database = database
            try:
                yield self
            finally:
                self._client.database = previous

    def raw_query(self, sql: str, parameters: dict | Sequence | None = None, fmt: str | None = None) -> bytes:
        """ClickHouse's own output of `sql`: in the SQL's trailing FORMAT clause if it has one, else in `fmt`
        (default TabSeparated)."""
        with self._lock:
            return self._client.raw_query(sql, parameters=parameters, fmt=fmt)

    def native_query(self, sql: str, parameters: dict | Sequence | None = None) -> tuple[bytes, int]:
        """The result of a SELECT in ClickHouse's Native format, undecoded, and the rows it read (what the
        shared store sends another process, which decodes it there: shared_store.decode_native)."""
        with self._lock:
            if self.is_embedded:
                return _chdb_native(self._client, sql, parameters)
            return self._client.raw_query(sql, parameters=parameters, fmt="Native"), 0

    def query_formatted(self, sql: str) -> bytes:
        """Run SQL that names its own output format (`... FORMAT CSVWithNames`); ClickHouse's output as is."""
        with self._lock:
            return self._client.raw_query(sql)

    def command(self, sql: str, parameters: dict | Sequence | None = None) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters)

    def server_version(self) -> str:
        return str(self.query("SELECT version()").rows[0][0])

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _chdb_native(client, sql: str, parameters) -> tuple[bytes, int]:
    """A Native-format result and its rows read from clickhouse-connect's chDB backend. Its public raw_query
    drops chDB's statistics, so this takes the two steps raw_query takes itself; another version of the
    backend falls back to raw_query (rows read then 0)."""
    try:
        from clickhouse_connect.driver._backend.chdb_backend import _strip_param_prefix

        final, bind_params, runtime = client._prep_raw_query_runtime(sql, parameters, None, "Native", True)
        result = client._backend._run(final, "Native", params=_strip_param_prefix(bind_params),
                                      database=runtime.database)
        return result.bytes() or b"", int(result.rows_read())
    except (ImportError, AttributeError, TypeError):
        return client.raw_query(sql, parameters=parameters, fmt="Native"), 0


def open_store(settings: Settings) -> Store:
    """Connect to ClickHouse (embedded chDB unless CLICKHOUSE_URL is set) with the database as default.

    The database is created here if missing (the client needs it as its default);
    tables come from Store.migrate().
    """
    dsn = settings.clickhouse_dsn
    if settings.is_embedded_store:
        (settings.data_dir / "clickhouse").resolve().mkdir(parents=True, exist_ok=True)
    try:
        client = clickhouse_connect.get_client(dsn=dsn, **tls_options(settings))
    except Exception as error:
        raise _explain_open_error(settings, error) from error
    client.command(f"CREATE DATABASE IF NOT EXISTS {settings.clickhouse_database}")
    client.database = settings.clickhouse_database
    return Store(client, settings)


def tls_options(settings: Settings) -> dict:
    """clickhouse-connect's TLS options of a server (https CLICKHOUSE_URL): the CA to trust, whether to verify."""
    if settings.is_embedded_store:
        return {}
    options: dict = {}
    if settings.clickhouse_ca_cert is not None:
        options["ca_cert"] = str(settings.clickhouse_ca_cert)
    if not settings.clickhouse_verify:
        options["verify"] = False
    return options


def _explain_open_error(settings: Settings, error: Exception) -> Exception:
    text = str(error)
    if not settings.is_embedded_store:
        hint = ""
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            hint = (" (the server's TLS certificate is not trusted: set STREAMSCORE_CLICKHOUSE_CA_CERT to the PEM file "
                    "of its CA)")
        password = urlsplit(settings.clickhouse_url).password
        if password:
            text = text.replace(password, "***")
        return StoreError(f"cannot connect to ClickHouse at {settings.clickhouse_location}{hint}: {text}")
    path = (settings.data_dir / "clickhouse").resolve()
    if "Error initializing EmbeddedServer" in text:
        return StoreLockedError(
            f"the embedded ClickHouse data dir {path} is in use by another process (chDB allows one process per "
            "data dir). Fix: stop the other streamscore process (e.g. `streamscore run` or `streamscore demo`), "
            "or run a ClickHouse server and set CLICKHOUSE_URL so several processes can share it "
            f"(or use another STREAMSCORE_DATA_DIR). chDB said: {text}"
        )
    if "already initialized with path" in text:
        return StoreError(
            f"this process already opened embedded ClickHouse at another path, so it cannot open {path} "
            f"(chDB allows one data dir per process; open one Store and share it). chDB said: {text}"
        )
    return StoreError(f"cannot open embedded ClickHouse at {path}: {text}")
