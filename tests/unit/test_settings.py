"""Settings: docs/configuration.md documents every env var (and nothing else), bad values name the field,
derived properties behave."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from streamscore.dev.readme_tables import (accepted_env_vars, configuration_table, configuration_text, default_text, env_var, first_code_span, first_table,
                           readme_text, settings_env_vars)
from streamscore.services.cli import app
from streamscore.settings import Settings

REGENERATE = "regenerate with `.venv/bin/python -m streamscore.dev.readme_tables configuration --write`"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Settings read from an environment holding only what the test sets (never the developer's shell)."""
    for key in list(os.environ):
        if key.startswith("STREAMSCORE_") or key in accepted_env_vars():
            monkeypatch.delenv(key)
    return monkeypatch


def documented_configuration() -> dict[str, dict[str, str]]:
    table = first_table(configuration_text(), "Configuration")
    return {first_code_span(record["env var"]): record for record in table.records()}


# --- docs/configuration.md ---------------------------------------------------

def test_every_setting_is_documented():
    missing = sorted(set(settings_env_vars()) - set(documented_configuration()))
    assert not missing, f"docs/configuration.md lacks {missing}; {REGENERATE}"


def test_every_documented_variable_is_a_setting():
    stale = sorted(set(documented_configuration()) - set(settings_env_vars()))
    assert not stale, f"docs/configuration.md lists {stale}, which Settings does not read; {REGENERATE}"


def test_documented_defaults_are_the_real_defaults():
    documented = documented_configuration()
    wrong = {name: (documented[name]["default"], default_text(field))
             for name, field in settings_env_vars().items()
             if name in documented and documented[name]["default"] != default_text(field)}
    assert not wrong, f"README default (documented, actual): {wrong}; {REGENERATE}"


def test_documented_in_field_order():
    documented = list(documented_configuration())
    assert documented == [v for v in settings_env_vars() if v in documented], REGENERATE


def test_every_field_has_a_description():
    """The description is the README's 'meaning' column; an empty one documents nothing."""
    undocumented = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not undocumented, f"Settings fields without description: {undocumented}"


def test_generated_table_round_trips_through_the_parser():
    from streamscore.dev.readme_tables import tables

    parsed = tables(configuration_table())[0]
    assert [first_code_span(cell) for cell in parsed.column("env var")] == list(settings_env_vars())
    # a description containing `|` must stay in its cell
    assert all(len(row) == 3 for row in parsed.rows)


# --- reading the environment ----------------------------------------------------------

def test_defaults_without_environment(clean_env):
    settings = Settings()
    assert settings.partitions == 4
    assert settings.kafka_bootstrap_servers is None
    assert settings.uses_local_broker and settings.is_embedded_store


def test_prefixed_variables_are_read(clean_env):
    clean_env.setenv("STREAMSCORE_PARTITIONS", "8")
    clean_env.setenv("STREAMSCORE_DATA_DIR", "/srv/streamscore")
    clean_env.setenv("STREAMSCORE_TRAIN_ALERT_RATE", "0.02")
    settings = Settings()
    assert settings.partitions == 8
    assert settings.data_dir == Path("/srv/streamscore")
    assert settings.train_alert_rate == 0.02


@pytest.mark.parametrize("variable,field,value", [
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers", "kafka-1:9092,kafka-2:9092"),
    ("CLICKHOUSE_URL", "clickhouse_url", "http://default:secret@clickhouse:8123"),
    ("SCHEMA_REGISTRY_URL", "schema_registry_url", "http://registry:8081"),
])
def test_well_known_variables_keep_their_names(clean_env, variable, field, value):
    clean_env.setenv(variable, value)
    assert getattr(Settings(), field) == value
    assert env_var(field) == variable


def test_prefixed_spelling_of_an_aliased_field_also_works_and_the_alias_wins(clean_env):
    clean_env.setenv("STREAMSCORE_KAFKA_BOOTSTRAP_SERVERS", "prefixed:9092")
    assert Settings().kafka_bootstrap_servers == "prefixed:9092"
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "alias:9092")
    assert Settings().kafka_bootstrap_servers == "alias:9092"


# --- bad values: a ValidationError that names the field ----------------------------------

@pytest.mark.parametrize("variable,value,field", [
    ("STREAMSCORE_PARTITIONS", "zero", "partitions"),
    ("STREAMSCORE_PARTITIONS", "0", "partitions"),
    ("STREAMSCORE_KAFKA_PORT", "70000", "kafka_port"),
    ("STREAMSCORE_CLICKHOUSE_DATABASE", "prod; DROP TABLE x", "clickhouse_database"),
    ("STREAMSCORE_MODEL_NAME", "fraud model", "model_name"),
    ("STREAMSCORE_SCORER_BATCH_SIZE", "-1", "scorer_batch_size"),
    ("STREAMSCORE_GATE_MAX_RMSE_INCREASE", "-0.1", "gate_max_rmse_increase"),
    ("STREAMSCORE_LOGGER_FLUSH_INTERVAL_S", "soon", "logger_flush_interval_s"),
    ("STREAMSCORE_DRIFT_WINDOW", "10", "drift_window"),
    ("STREAMSCORE_DRIFT_ADWIN_DELTA", "1.5", "drift_adwin_delta"),
    ("STREAMSCORE_TRAIN_VALIDATION_FRACTION", "1", "train_validation_fraction"),
    ("STREAMSCORE_GATE_MIN_AUC", "1.2", "gate_min_auc"),
])
def test_bad_value_names_the_field(clean_env, variable, value, field):
    clean_env.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [(field,)]
    assert field in str(caught.value) and value in str(caught.value)


@pytest.mark.parametrize("field", [name for name, f in Settings.model_fields.items()
                                   if f.annotation in (int, float, int | None, float | None)])
def test_every_numeric_setting_rejects_text(clean_env, field):
    clean_env.setenv(env_var(field), "not-a-number")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


def test_cli_reports_bad_configuration_and_exits_2(clean_env):
    result = CliRunner().invoke(app, ["infra", "status"], env={"STREAMSCORE_PARTITIONS": "zero"})
    assert result.exit_code == 2
    assert "invalid configuration" in result.output and "partitions" in result.output


def test_settings_are_frozen():
    settings = Settings(partitions=2)
    with pytest.raises(ValidationError):
        settings.partitions = 3  # type: ignore[misc]


# --- derived properties ------------------------------------------------------------

def test_bootstrap_servers_local_broker_by_default():
    settings = Settings(kafka_bootstrap_servers=None, kafka_port=29092)
    assert settings.bootstrap_servers == "127.0.0.1:29092"
    assert settings.uses_local_broker


def test_bootstrap_servers_external_cluster_wins_over_port():
    settings = Settings(kafka_bootstrap_servers="kafka:9092", kafka_port=29092)
    assert settings.bootstrap_servers == "kafka:9092"
    assert not settings.uses_local_broker


def test_clickhouse_dsn_embedded_is_absolute_chdb_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(clickhouse_url=None, data_dir=Path("relative-data"))
    assert settings.clickhouse_dsn == f"chdb://{tmp_path / 'relative-data' / 'clickhouse'}"
    assert settings.is_embedded_store


def test_clickhouse_dsn_server_url_as_given():
    url = "https://user:pw@ch.example:8443"
    settings = Settings(clickhouse_url=url)
    assert settings.clickhouse_dsn == url
    assert not settings.is_embedded_store


def test_registry_dir_defaults_under_data_dir():
    assert Settings(data_dir=Path("/d"), model_dir=None).registry_dir == Path("/d/models")
    assert Settings(data_dir=Path("/d"), model_dir=Path("/m")).registry_dir == Path("/m")


def test_topic_and_group_names():
    settings = Settings(topic_prefix="tenant-a.", consumer_group_prefix="tenant-a")
    assert settings.topic("events") == "tenant-a.events"
    assert Settings(topic_prefix="").topic("events-dlq") == "events-dlq"
    assert settings.group("scorer") == "tenant-a-scorer"


# --- every setting is read by the code ---------------------------------------------------

def _attributes_read(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} | {
        node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_every_setting_is_read_by_the_code():
    """A documented setting that nothing reads is a lie to the user: each field must be read outside
    settings.py, directly or through a property of Settings that is."""
    import ast

    from streamscore.dev.readme_tables import REPO_ROOT

    settings_file = REPO_ROOT / "shared" / "streamscore" / "settings.py"
    sources = [p for root in ("shared", "services") for p in (REPO_ROOT / root).rglob("*.py")
               if p != settings_file]
    read: set[str] = set()
    for path in sources:
        read |= _attributes_read(path)
    tree = ast.parse(settings_file.read_text(encoding="utf-8"))
    properties = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name != "model_post_init":
            properties[node.name] = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
    unread = [name for name in Settings.model_fields
              if name not in read and not any(name in used and prop in read for prop, used in properties.items())]
    assert not unread, f"settings nothing reads (read them where they are documented, or remove them): {unread}"
