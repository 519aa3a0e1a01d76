"""Loading a feature spec: the examples load; every mistake is refused with file, line and key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, example_spec
from streamscore.spec import SpecError, load_spec

PAYMENTS_NAMES = ("amount", "log_amount", "hour_of_day", "count_1h", "sum_1h", "count_24h", "sum_24h", "mean_7d",
                  "std_7d", "secs_since_prev", "distinct_mcc_24h", "amount_to_mean_7d", "amount_zscore_7d",
                  "currency_code", "mcc_code", "channel_code", "country_code")


def test_the_payments_example_declares_the_pipeline_streamscore_shipped_with():
    spec = example_spec("payments")
    assert spec.feature_names == PAYMENTS_NAMES
    assert spec.categorical_features == ("currency_code", "mcc_code", "channel_code", "country_code")
    assert spec.objective == "binary" and spec.model.name == "fraud"
    assert spec.lateness_ms == 7 * 86_400_000 and spec.retention_ms == 14 * 86_400_000
    assert (spec.event.id_field, spec.event.entity_field, spec.event.time_field) == ("event_id", "entity_id",
                                                                                     "event_time")


def test_the_rides_example_is_a_regression_over_minutes_with_learned_encodings():
    spec = example_spec("rides")
    assert spec.objective == "regression" and spec.event.topic == "trip-requests"
    assert spec.lateness_ms == 30 * 60_000 and spec.max_window_ms == 86_400_000
    assert [f.name for f in spec.features if f.is_learned] == ["pickup_code", "dropoff_code"]
    assert spec.event.layout.field("requested_at").logical_type == "timestamp-millis"


def copy_example(tmp_path: Path, name: str = "payments") -> Path:
    target = tmp_path / name
    shutil.copytree(EXAMPLES / name, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def edited(tmp_path: Path, old: str, new: str, name: str = "payments") -> Path:
    folder = copy_example(tmp_path, name)
    spec = folder / "spec.yaml"
    text = spec.read_text()
    assert old in text, old
    spec.write_text(text.replace(old, new, 1))
    return folder


def test_the_feature_set_is_the_definitions_not_the_formatting(tmp_path):
    base = example_spec("payments").feature_set
    comment = load_spec(edited(tmp_path / "a", "# Payments fraud", "# reformatted, same definitions\n# Payments fraud"))
    assert comment.feature_set == base
    window = load_spec(edited(tmp_path / "b", "{name: count_1h, aggregate: count, window: 1h}",
                              "{name: count_1h, aggregate: count, window: 2h}"))
    assert window.feature_set != base
    version = load_spec(edited(tmp_path / "c", "version: 1", "version: 2"))
    assert version.feature_set != base
    validation = load_spec(edited(tmp_path / "d", "max: 1000000", "max: 5000"))
    assert validation.feature_set == base  # checks decide what is scored, not how features are computed


@pytest.mark.parametrize("old, new, expected", [
    ("window: 24h}", "windw: 24h}", "spec.yaml:3"),  # line checked below
    ("{name: count_1h, aggregate: count, window: 1h}", "{name: count_1h, aggregate: cont, window: 1h}",
     "'cont' is not an aggregate"),
    ("aggregate: sum, field: amount, window: 1h", "aggregate: sum, field: amount, window: 1 hour",
     "is not a duration"),
    ("aggregate: sum, field: amount, window: 1h", "aggregate: sum, field: amout, window: 1h",
     "has no field 'amout' (did you mean 'amount'?)"),
    ("{name: distinct_mcc_24h, aggregate: distinct_count, field: merchant_category",
     "{name: distinct_mcc_24h, aggregate: distinct_count, field: amount", "must be string or bytes"),
    ("{name: amount, field: amount}", "{name: amount, field: currency}", "use encode for a string field"),
    ('"NO"', "NO", "is the boolean False"),
    ("{name: sum_1h,", "{name: count_1h,", "feature 'count_1h' is already defined at features[3]"),
    ("kind: binary", "kind: yes_no", "not a label kind"),
    ("format: 1", "format: 2", "format 2 is not supported"),
    ("schema: event.avsc", "schema: evnt.avsc", "schema file 'evnt.avsc' not found"),
    ("entity: entity_id", "entity: device_id", "is nullable"),
    ("pattern: \"[A-Z]{3}\"", "pattern: \"[A-Z\"", "is not a regular expression"),
    ("min: 0, max: 1000000", "min: 10, max: 1", "min 10 is above max 1"),
    ("model:\n  name: fraud", "model:\n  name: \"fraud model\"", "not a valid model name"),
])
def test_mistakes_are_refused_naming_the_file_line_and_key(tmp_path, old, new, expected):
    if old == "window: 24h}":  # an unknown key: its line, and a suggestion
        folder = edited(tmp_path, "{name: count_24h, aggregate: count, window: 24h}",
                        "{name: count_24h, aggregate: count, windw: 24h}")
        with pytest.raises(SpecError) as error:
            load_spec(folder)
        line = next(i for i, text in enumerate((folder / "spec.yaml").read_text().splitlines(), 1) if "windw" in text)
        assert f"spec.yaml:{line}: features[5].windw: unknown key (did you mean 'window'?)" in str(error.value)
        return
    with pytest.raises(SpecError) as error:
        load_spec(edited(tmp_path, old, new))
    assert expected in str(error.value)
    assert "spec.yaml:" in str(error.value)


def test_a_schema_that_is_not_flat_is_refused_naming_the_field(tmp_path):
    folder = copy_example(tmp_path)
    schema = json.loads((folder / "event.avsc").read_text())
    schema["fields"].append({"name": "tags", "type": {"type": "array", "items": "string"}, "default": []})
    (folder / "event.avsc").write_text(json.dumps(schema))
    with pytest.raises(SpecError, match=r"event.schema: event.avsc: field 'tags' of streamscore.Event is of type "
                                        r"'array': event and label records must be flat"):
        load_spec(folder)


def test_an_input_field_may_not_take_the_name_of_a_predictions_column(tmp_path):
    folder = copy_example(tmp_path)
    schema = json.loads((folder / "event.avsc").read_text())
    schema["fields"].append({"name": "score", "type": ["null", "double"], "default": None})
    (folder / "event.avsc").write_text(json.dumps(schema))
    with pytest.raises(SpecError, match="field 'score' of streamscore.Event has the name of a predictions column"):
        load_spec(folder)


def test_lateness_defaults_to_the_longest_window_and_a_directory_means_its_spec_yaml(tmp_path):
    folder = edited(tmp_path, "validation:", "validation:", name="payments")
    assert load_spec(folder).lateness_ms == load_spec(folder / "spec.yaml").lateness_ms == 7 * 86_400_000
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nowhere")
