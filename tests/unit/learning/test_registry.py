"""Model registry: immutable versions, numbering under concurrency, atomicity, stages, events."""
from __future__ import annotations

import json
import multiprocessing
import threading
from datetime import datetime, timezone
from pathlib import Path

import lightgbm
import numpy as np
import pytest

from streamscore.learning.registry import (
    MODEL_VERSIONS_COLUMNS,
    FeatureSetMismatch,
    ModelRegistry,
    RegistryError,
    VersionExists,
    check_feature_set,
    model_versions_row,
    registration_event,
    stage_label,
)

FEATURES = ["amount", "count_1h", "mcc_code"]
MODEL = "fraud"


@pytest.fixture(scope="module")
def booster() -> lightgbm.Booster:
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.normal(size=500), rng.poisson(2, 500), rng.integers(0, 5, 500)]).astype(float)
    y = (X[:, 0] + 0.3 * X[:, 1] + rng.normal(0, 0.5, 500) > 1).astype(float)
    data = lightgbm.Dataset(X, y, feature_name=FEATURES, categorical_feature=["mcc_code"])
    return lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1, "deterministic": True,
                           "min_data_in_leaf": 5}, data, num_boost_round=10)


def register(registry: ModelRegistry, model, **overrides):
    fields = dict(
        feature_set="fs-aaaa", feature_names=FEATURES, categorical_features=["mcc_code"], train_rows=500,
        metrics={"auc": 0.9}, baseline={"score": {"count": 1}}, threshold=0.4, params={"seed": 0},
        reason="test", train_start=1_700_000_000_000, train_end=1_700_000_360_000,
    )
    fields.update(overrides)
    return registry.register(MODEL, model, **fields)


def test_register_numbers_versions_and_round_trips_metadata(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    v1 = register(registry, booster, created_at=1_700_000_400_000)
    v2 = register(registry, booster.model_to_string(), reason="retrain: drift on amount")
    assert (v1.version, v2.version) == (1, 2)
    assert registry.get(MODEL, 1) == v1
    assert registry.get(MODEL, 2).reason == "retrain: drift on amount"
    assert [v.version for v in registry.list(MODEL)] == [1, 2]
    assert v1.created_at == 1_700_000_400_000 and v1.categorical_features == ["mcc_code"]
    assert registry.stages(MODEL)["candidate"] == 2  # a new version starts as the candidate
    assert registry.production(MODEL) is None
    assert (tmp_path / MODEL / "v1" / "model.txt").read_text() == booster.model_to_string()


def test_versions_are_immutable(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    register(registry, booster)
    with pytest.raises(VersionExists, match="model 'fraud' version 1 already exists and is immutable"):
        register(registry, booster, version=1)
    # written once, then read-only (root could still write, so check the mode rather than try)
    for name in ("metadata.json", "model.txt"):
        assert (tmp_path / MODEL / "v1" / name).stat().st_mode & 0o222 == 0


def test_load_booster_predicts_identically(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    register(registry, booster)
    loaded = registry.load_booster(MODEL, 1)
    X = np.random.default_rng(1).normal(size=(200, 3))
    X[:, 2] = np.abs(np.round(X[:, 2] * 2))
    np.testing.assert_array_equal(loaded.predict(X), booster.predict(X))
    assert loaded.feature_name() == FEATURES


def test_corrupted_model_file_is_detected(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    register(registry, booster)
    path = tmp_path / MODEL / "v1" / "model.txt"
    path.chmod(0o644)
    path.write_text(path.read_text().replace("tree", "tree ", 1))
    with pytest.raises(RegistryError, match="model 'fraud' v1: model.txt is corrupted"):
        registry.load_booster(MODEL, 1)


def test_unknown_version_error_lists_versions(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RegistryError, match="model 'fraud' has no versions in"):
        registry.get(MODEL, 1)
    register(registry, booster)
    register(registry, booster)
    with pytest.raises(RegistryError, match=r"model 'fraud' has no version 7; versions: 1, 2"):
        registry.get(MODEL, 7)
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.promote(MODEL, 7)


def _register_in_subprocess(root: str, model_text: str, count: int, queue) -> None:
    registry = ModelRegistry(Path(root))
    for _ in range(count):
        queue.put(register(registry, model_text).version)


def test_concurrent_registrations_get_distinct_versions(tmp_path, booster):
    text = booster.model_to_string()
    registry = ModelRegistry(tmp_path)
    results: list[int] = []
    lock = threading.Lock()

    def worker():
        for _ in range(5):
            version = register(registry, text).version
            with lock:
                results.append(version)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 21))

    # and across processes (spawn: no inherited locks or OpenMP state)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_register_in_subprocess, args=(str(tmp_path), text, 4, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    versions = [queue.get(timeout=60) for _ in range(8)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(versions) == list(range(21, 29))
    assert [v.version for v in registry.list(MODEL)] == list(range(1, 29))
    history = registry.stages(MODEL)["history"]
    assert sorted(h["version"] for h in history if h["action"] == "register") == list(range(1, 29))


def test_crash_leftovers_are_invisible_and_cleaned(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    register(registry, booster)
    model_dir = tmp_path / MODEL
    # a writer that died half-way: temp version dir with partial metadata, temp stages file
    crashed = model_dir / ".tmp-v2-deadbeef"
    crashed.mkdir()
    (crashed / "metadata.json").write_text('{"model_version": {"vers')
    (model_dir / ".tmp-stages.json-deadbeef").write_text("{")
    # a version directory without metadata (e.g. created by hand) is not a version either
    (model_dir / "v5").mkdir()
    assert [v.version for v in registry.list(MODEL)] == [1]
    assert registry.stages(MODEL)["candidate"] == 1
    assert register(registry, booster).version == 2
    assert not crashed.exists()


def test_promote_rollback_history(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    for _ in range(3):
        register(registry, booster)
    first = registry.promote(MODEL, 1, reason="initial")
    assert first.previous_production is None
    assert first.event == {"model_name": MODEL, "version": 1, "stage": "production", "action": "promote",
                           "feature_set": "fs-aaaa", "reason": "initial", "updated_at": first.event["updated_at"],
                           "evidence": {}}
    registry.promote(MODEL, 2)
    third = registry.promote(MODEL, 3, reason="gate passed")
    assert third.previous_production == 2
    stages = registry.stages(MODEL)
    assert (stages["production"], stages["candidate"]) == (3, None)  # the candidate graduated
    assert registry.production(MODEL).version == 3

    back = registry.rollback(MODEL, reason="bad precision")
    assert (back.model_version.version, back.previous_production) == (2, 3)
    assert back.event["action"] == "rollback" and back.event["reason"] == "bad precision"
    assert registry.rollback(MODEL).model_version.version == 1  # rollbacks unwind, they do not toggle
    with pytest.raises(RegistryError, match="production version 1 has no previous production version"):
        registry.rollback(MODEL)
    history = registry.stages(MODEL)["history"]
    assert [(h["action"], h["version"]) for h in history if h["stage"] == "production"] == [
        ("promote", 1), ("promote", 2), ("promote", 3), ("rollback", 2), ("rollback", 1)]
    assert all(isinstance(h["at"], int) for h in history)
    assert stage_label(registry.stages(MODEL), 3) == "retired"


def test_rollback_with_no_production(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RegistryError, match="model 'fraud' has no production version to roll back"):
        registry.rollback(MODEL)
    register(registry, booster)
    registry.promote(MODEL, 1)
    with pytest.raises(RegistryError, match="no previous production version"):
        registry.rollback(MODEL)
    with pytest.raises(RegistryError, match="version 1 is already production"):
        registry.promote(MODEL, 1)


def test_reject_records_failed_candidate(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    register(registry, booster)
    registry.promote(MODEL, 1)
    register(registry, booster)
    update = registry.reject(MODEL, 2, reason="candidate auc 0.6 is below the floor")
    assert update.event["action"] == "reject" and update.event["stage"] == "candidate"
    stages = registry.stages(MODEL)
    assert (stages["production"], stages["candidate"]) == (1, None)
    assert registry.rejected_versions(MODEL) == {2}
    assert stage_label(stages, 2) == "rejected"
    with pytest.raises(RegistryError, match="version 1 is in production"):
        registry.reject(MODEL, 1, reason="x")


def test_pointer_polling_is_cheap_and_notices_changes(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    assert registry.production_pointer_mtime(MODEL) is None
    assert registry.read_production_version(MODEL) is None
    register(registry, booster)
    before = registry.production_pointer_mtime(MODEL)
    registry.promote(MODEL, 1)
    assert registry.read_production_version(MODEL) == 1
    assert registry.production_pointer_mtime(MODEL) != before


def test_feature_set_mismatch_names_both_hashes(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    version = register(registry, booster)
    check_feature_set(version, "fs-aaaa")
    with pytest.raises(FeatureSetMismatch) as err:
        check_feature_set(version, "fs-bbbb")
    message = str(err.value)
    assert "'fs-aaaa'" in message and "'fs-bbbb'" in message and "v1" in message
    assert "Retrain" in message and "deploy the code version" in message


def test_events_and_model_versions_rows(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    version = register(registry, booster, created_at=1_700_000_400_000)
    event = registration_event(version)
    assert event == {"model_name": MODEL, "version": 1, "stage": "candidate", "action": "register",
                     "feature_set": "fs-aaaa", "reason": "test", "updated_at": 1_700_000_400_000, "evidence": {}}
    row = model_versions_row(version, event)
    assert tuple(row) == MODEL_VERSIONS_COLUMNS
    assert row["created_at"] == datetime(2023, 11, 14, 22, 20, tzinfo=timezone.utc)
    assert row["train_start"] == datetime.fromtimestamp(1_700_000_000, tz=timezone.utc)
    assert row["parent_version"] is None and row["train_rows"] == 500 and row["metrics"] == {"auc": 0.9}
    promoted = registry.promote(MODEL, 1, reason="first")
    row = model_versions_row(promoted.model_version, promoted.event)
    assert (row["action"], row["stage"], row["reason"]) == ("promote", "production", "first")
    # the next version's parent is the production version it was trained to replace
    assert register(registry, booster).parent_version == 1


def test_metadata_is_plain_json(tmp_path, booster):
    registry = ModelRegistry(tmp_path)
    register(registry, booster)
    data = json.loads((tmp_path / MODEL / "v1" / "metadata.json").read_text())
    assert data["format"] == 1 and data["model_version"]["feature_names"] == FEATURES
    with pytest.raises(ValueError, match=r"metrics\['auc'\] is nan; metrics must be finite"):
        register(registry, booster, metrics={"auc": float("nan")})
    assert [v.version for v in registry.list(MODEL)] == [1]


def test_invalid_model_name(tmp_path):
    with pytest.raises(ValueError, match="invalid model name '../x'"):
        ModelRegistry(tmp_path).list("../x")


def test_models_cli_list_promote_rollback(tmp_path, booster, monkeypatch):
    from typer.testing import CliRunner

    from streamscore.services.cli import app

    monkeypatch.setenv("STREAMSCORE_DATA_DIR", str(tmp_path))
    registry = ModelRegistry(tmp_path / "models")  # Settings.registry_dir default
    register(registry, booster)
    register(registry, booster)
    runner = CliRunner()
    result = runner.invoke(app, ["models", "promote", "1", "--no-publish"])
    assert result.exit_code == 0, result.output
    assert "production none -> v1" in result.output
    assert "production v1 -> v2" in runner.invoke(app, ["models", "promote", "2", "--reason", "better", "--no-publish"]).output
    listing = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "production" in listing.output and "retired" in listing.output
    assert "production v2 -> v1" in runner.invoke(app, ["models", "rollback", "--no-publish"]).output
    missing = runner.invoke(app, ["models", "show", "9"])
    assert missing.exit_code == 1
    assert registry.read_production_version(MODEL) == 1


def test_a_model_whose_columns_differ_from_the_feature_names_is_refused_naming_the_first_difference(tmp_path):
    import lightgbm

    from streamscore.learning.registry import FeatureNamesMismatch

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(300, 3)), rng.integers(0, 2, 300)
    booster = lightgbm.train({"objective": "binary", "verbose": -1},
                             lightgbm.Dataset(X, y, feature_name=["a", "c", "b"]), num_boost_round=2)
    registry = ModelRegistry(tmp_path)
    with pytest.raises(FeatureNamesMismatch, match=r"the model's feature 1 is 'c' but the feature set's is 'b'"):
        registry.register("m", booster, feature_set="fs", feature_names=["a", "b", "c"], train_rows=1,
                          metrics={}, baseline={}, threshold=0.5)
    with pytest.raises(FeatureNamesMismatch, match="feature 3 \\('d'\\) is in the feature set only"):
        registry.register("m", booster, feature_set="fs", feature_names=["a", "c", "b", "d"], train_rows=1,
                          metrics={}, baseline={}, threshold=0.5)
    version = registry.register("m", booster, feature_set="fs", feature_names=["a", "c", "b"], train_rows=1,
                                metrics={}, baseline={}, threshold=None, objective="binary",
                                vocabularies={"c": ["x", "y"]})
    assert registry.get("m", version.version).vocabularies == {"c": ["x", "y"]}
