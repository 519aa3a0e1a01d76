"""README.md vs the code: topics, ClickHouse tables, Avro schemas, CLI commands, the two commands.

Each test compares a README reference section with what the code defines, in
both directions (undocumented interface, and documentation of something that
no longer exists). The tables are compared with a freshly migrated database.
"""
from __future__ import annotations

import json
import re
import uuid

import pytest

from streamscore.dev.readme_tables import (REPO_ROOT, cli_commands, code_spans, documented_cli_commands, first_code_span,
                           first_table, readme_text, section, tables)
from streamscore.settings import Settings
from streamscore.kafka.topics import topic_names, topic_specs

SCHEMA_DIR = REPO_ROOT / "schemas"
DAY_MS = 24 * 3600 * 1000


@pytest.fixture(scope="module")
def readme() -> str:
    return readme_text()


# --- the two commands ------------------------------------------------------------------

def test_first_commands_are_run_demo_and_run_test(readme):
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert first_block, "README has no code block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert [c for c in commands if c] == ["./run demo", "./run test"]


def test_run_script_has_both_commands_and_ci_uses_it():
    script = (REPO_ROOT / "run").read_text(encoding="utf-8")
    for name in ("demo", "test"):
        assert re.search(rf"^\s*{name}\)", script, re.MULTILINE), f"./run has no `{name}` command"
    assert "./run test" in (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_readme_stays_a_users_page_and_links_the_docs(readme):
    assert len(readme.encode("utf-8")) <= 25 * 1024, "README.md is over 25 KB: move detail to docs/"
    for doc in ("architecture.md", "performance.md", "reliability.md", "configuration.md", "spec-reference.md"):
        assert (REPO_ROOT / "docs" / doc).is_file()
        assert f"docs/{doc}" in readme, f"README does not link docs/{doc}"


# --- topics ------------------------------------------------------------------------------

def test_documented_topics_are_the_topics(readme):
    settings = Settings(topic_prefix="", partitions=7)
    documented = [first_code_span(cell) for cell in first_table(readme, "Topics").column("topic")]
    assert sorted(documented) == sorted(topic_names(settings)), (
        "README's Topics table must list exactly the topics of streamscore.kafka.topics.topic_specs")
    assert len(documented) == len(set(documented))


def test_documented_topic_partitions_and_cleanup(readme):
    settings = Settings(topic_prefix="", partitions=7)  # 7: no topic has that many unless it follows the setting
    rows = {first_code_span(r["topic"]): r for r in first_table(readme, "Topics").records()}
    for spec in topic_specs(settings):
        row = rows[spec.name]
        partitions = row["partitions"]
        if spec.partitions == settings.partitions:
            assert "STREAMSCORE_PARTITIONS" in partitions, f"{spec.name}: partitions follow STREAMSCORE_PARTITIONS"
        else:
            assert partitions.strip("` ") == str(spec.partitions), f"{spec.name}: {spec.partitions} partition(s)"
        cleanup = row["retention / cleanup"].lower()
        if spec.config.get("cleanup.policy") == "compact":
            assert "compact" in cleanup, f"{spec.name} is compacted"
        if "retention.ms" in spec.config:
            days = int(spec.config["retention.ms"]) // DAY_MS
            assert f"{days} d" in cleanup, f"{spec.name}: retention {days} d"


def test_topic_value_schemas_exist(readme):
    full_names = {schema_full_name(path.stem) for path in SCHEMA_DIR.glob("*.avsc")}
    for record in first_table(readme, "Topics").records():
        named = {span for span in code_spans(record["value"]) if span.startswith("streamscore.")}
        assert named <= full_names, f"{record['topic']}: unknown record(s) {named - full_names}"


# --- ClickHouse tables -------------------------------------------------------------------

@pytest.fixture(scope="module")
def migrated_schema(clickhouse_dsn, session_data_dir):
    """{table: (engine, [column, ...])} of a database migrated from scratch by Store.migrate()."""
    from streamscore.clickhouse.store import open_store

    settings = Settings(
        clickhouse_url=None if clickhouse_dsn.startswith("chdb:") else clickhouse_dsn,
        data_dir=session_data_dir, clickhouse_database=f"test_docs_{uuid.uuid4().hex[:12]}",
    )
    store = open_store(settings)
    try:
        from conftest import example_spec
        from streamscore.clickhouse.tables import ensure_spec_tables

        store.migrate()
        ensure_spec_tables(store, example_spec("payments"))
        db = {"db": settings.clickhouse_database}
        engines = dict(store.query("SELECT name, engine FROM system.tables WHERE database = {db:String}", db).rows)
        columns: dict[str, list[str]] = {name: [] for name in engines}
        for table, column in store.query(
                "SELECT table, name FROM system.columns WHERE database = {db:String} ORDER BY table, position", db).rows:
            columns[table].append(column)
        yield {name: (engines[name], columns[name]) for name in engines}
    finally:
        store.command(f"DROP DATABASE IF EXISTS {settings.clickhouse_database}")
        store.close()


def documented_tables(readme: str) -> dict[str, dict[str, str]]:
    return {first_code_span(r["table"]): r for r in first_table(readme, "ClickHouse tables").records()}


def test_documented_tables_are_the_migrated_tables(readme, migrated_schema):
    documented = set(documented_tables(readme))
    assert documented == set(migrated_schema), (
        f"README's ClickHouse tables section: undocumented {sorted(set(migrated_schema) - documented)}, "
        f"stale {sorted(documented - set(migrated_schema))}")


def test_documented_columns_are_the_table_columns(readme, migrated_schema):
    from conftest import example_spec
    from streamscore.clickhouse.tables import alias_columns, input_columns

    payments = example_spec("payments")
    for table, row in documented_tables(readme).items():
        engine, columns = migrated_schema.get(table, ("", []))
        if engine == "View":
            assert "view" in row["engine, key"].lower(), f"{table} is a view"
            continue
        if table == "predictions":  # the fixed columns; between them the spec's input fields (here payments')
            spec_columns = {name for name, _ in input_columns(payments) + alias_columns(payments)}
            columns = [c for c in columns if c not in spec_columns]
        assert code_spans(row["columns"]) == columns, f"README columns of {table} differ from the migrated table"


def test_documented_engines(readme, migrated_schema):
    for table, row in documented_tables(readme).items():
        engine = migrated_schema.get(table, ("",))[0]
        if engine != "View":
            assert row["engine, key"].startswith(engine), f"{table} is a {engine}"


# --- Avro schemas -------------------------------------------------------------------------

def schema_full_name(stem: str) -> str:
    schema = json.loads((SCHEMA_DIR / f"{stem}.avsc").read_text(encoding="utf-8"))
    return f"{schema['namespace']}.{schema['name']}"


def test_every_avro_schema_is_documented(readme):
    table = first_table(readme, "Avro schemas")
    documented = {first_code_span(r["file"]): first_code_span(r["record"]) for r in table.records()}
    actual = {f"schemas/{path.name}": schema_full_name(path.stem) for path in sorted(SCHEMA_DIR.glob("*.avsc"))}
    assert documented == actual


def test_schema_section_explains_both_framings(readme):
    text = section(readme, "Avro schemas")
    assert "SCHEMA_REGISTRY_URL" in text and "single-object" in text.lower() and "schemas/history" in text


# --- CLI -----------------------------------------------------------------------------------

def test_every_cli_command_is_documented(readme):
    documented = documented_cli_commands(readme)
    actual = set(cli_commands())
    assert documented == actual, (
        f"README CLI section: undocumented {sorted(actual - documented)}, stale {sorted(documented - actual)}; "
        "regenerate with `.venv/bin/python -m streamscore.dev.readme_tables cli --write`")


def test_headings_are_present(readme):
    """The sections other helpers and the lead fill in must exist under these names."""
    from streamscore.dev.readme_tables import headings

    titles = [title.lower() for _, title in headings(readme)]
    for wanted in ("quick start", "architecture", "repository layout", "cli", "configuration", "topics",
                   "clickhouse tables", "avro schemas", "features", "model registry", "guarantees",
                   "drift and retraining", "benchmarks", "deployment", "development"):
        assert any(title.startswith(wanted) for title in titles), f"README has no section {wanted!r}"


def test_tables_parse(readme):
    """Every README table has as many cells per row as its header (a stray `|` breaks rendering)."""
    for table in tables(readme):
        for row in table.rows:
            assert len(row) == len(table.header), f"row {row} vs header {table.header}"
