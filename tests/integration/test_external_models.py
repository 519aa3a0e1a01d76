"""Bring your own model (learning/external.py): checked against the spec; its baseline from a reference CSV or
from the feature vectors the scorer logged (through the real broker and ClickHouse)."""
from __future__ import annotations

import json

import lightgbm
import numpy as np
import pytest

from streamscore.learning.external import ExternalModelError, register_external_model
from streamscore.learning.registry import ModelRegistry
from streamscore.settings import Settings
from streamscore.spec.loader import load_spec

TRIP = {"type": "record", "name": "Trip", "namespace": "test", "fields": [
    {"name": "trip_id", "type": "string"}, {"name": "driver_id", "type": "string"},
    {"name": "requested_at", "type": "long"}, {"name": "distance_km", "type": ["null", "double"], "default": None}]}
OUTCOME = {"type": "record", "name": "Outcome", "namespace": "test", "fields": [
    {"name": "trip_id", "type": "string"}, {"name": "duration_s", "type": "double"}]}
SPEC = """format: 1
name: byom
event: {schema: trip.avsc, topic: trips, id: trip_id, entity: driver_id, time: requested_at}
label: {schema: outcome.avsc, topic: outcomes, id: trip_id, value: duration_s, kind: numeric}
features:
  - {name: distance_km, field: distance_km}
  - {name: trips_1h, aggregate: count, window: 1h}
  - {name: mean_distance_2h, aggregate: mean, field: distance_km, window: 2h}
"""


@pytest.fixture
def spec(tmp_path):
    (tmp_path / "trip.avsc").write_text(json.dumps(TRIP))
    (tmp_path / "outcome.avsc").write_text(json.dumps(OUTCOME))
    (tmp_path / "spec.yaml").write_text(SPEC)
    return load_spec(tmp_path / "spec.yaml")


def notebook_model(names: list[str], objective: str = "regression") -> tuple[str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 30, (400, len(names)))
    y = 100 + 60 * X[:, 0] + rng.normal(0, 5, 400)
    if objective == "binary":
        y = (y > np.median(y)).astype(float)
    booster = lightgbm.train({"objective": objective, "verbose": -1, "num_threads": 1},
                             lightgbm.Dataset(X, y, feature_name=names), num_boost_round=5)
    return booster.model_to_string(), X, y


def test_a_model_with_the_specs_features_registers_with_a_baseline_and_metrics_from_the_reference(spec, tmp_path):
    text, X, y = notebook_model(spec.feature_names)
    reference = tmp_path / "reference.csv"
    header = ",".join(["extra", *reversed(spec.feature_names), "label"])  # any column order, extras ignored
    rows = [",".join(["x", *map(str, reversed(row)), str(label)]) for row, label in zip(X[:200], y[:200])]
    reference.write_text("\n".join([header, *rows]) + "\n")
    registry = ModelRegistry(tmp_path / "models")
    version, update = register_external_model(Settings(data_dir=tmp_path), spec, registry, "byom", text,
                                               reference=reference, promote=True)
    assert update is not None and registry.read_production_version("byom") == version.version
    assert version.objective == "regression" and version.feature_names == list(spec.feature_names)
    assert version.params["baseline_rows"] == 200 and set(spec.feature_names) <= set(version.baseline)
    assert version.metrics["rmse"] > 0


def test_reordered_features_are_refused_naming_the_first_difference(spec, tmp_path):
    names = spec.feature_names
    text, _, _ = notebook_model([names[1], names[0], *names[2:]])
    with pytest.raises(ExternalModelError, match=rf"does not fit spec 'byom'.*{names[1]}"):
        register_external_model(Settings(data_dir=tmp_path), spec, ModelRegistry(tmp_path / "m"), "byom", text,
                                reference=tmp_path / "unused.csv")


def test_a_classifier_for_a_numeric_label_is_refused(spec, tmp_path):
    text, _, _ = notebook_model(spec.feature_names, objective="binary")
    with pytest.raises(ExternalModelError, match="objective is 'binary'.*numeric label"):
        register_external_model(Settings(data_dir=tmp_path), spec, ModelRegistry(tmp_path / "m"), "byom", text,
                                reference=tmp_path / "unused.csv")


@pytest.mark.integration
def test_without_a_reference_the_baseline_comes_from_the_logged_feature_vectors(spec, make_settings, tmp_path):
    """The scorer and logger log this spec's events (real broker, ClickHouse); the model's baseline is read back."""
    import time

    from conftest import prepare, spec_codec
    from streamscore.clickhouse.store import open_store
    from streamscore.kafka.io import DeliveryTracker, flush_or_raise, make_producer
    from streamscore.services.runner import ServiceGroup

    settings = prepare(make_settings(spec=spec.path))
    codec, now_ms = spec_codec(spec), int(time.time() * 1000)
    producer, delivered = make_producer(settings), DeliveryTracker()
    encode = codec.encoder("event")
    for i in range(300):
        event = {"trip_id": f"t{i}", "driver_id": f"d{i % 20}", "requested_at": now_ms - (300 - i) * 1000,
                 "distance_km": float(i % 30)}
        producer.produce(settings.topic(spec.event.topic), key=event["driver_id"].encode(), value=encode(event),
                         on_delivery=delivered)
    flush_or_raise(producer, delivered, timeout_s=60)
    store = open_store(settings)
    try:
        with ServiceGroup(settings, ["scorer", "logger"], store=store, spec=spec):
            deadline = time.monotonic() + 90
            while store.query("SELECT count() FROM predictions FINAL").rows[0][0] < 300:
                assert time.monotonic() < deadline, "predictions not logged"
                time.sleep(0.3)
        text, _, _ = notebook_model(spec.feature_names)
        version, _ = register_external_model(settings, spec, ModelRegistry(tmp_path / "models"), "byom", text,
                                             store=store)
    finally:
        store.close()
    assert version.params["baseline_rows"] == 300 and "logged predictions" in version.params["baseline_source"]
    assert set(spec.feature_names) <= set(version.baseline)
