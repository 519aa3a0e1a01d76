"""`streamscore demo` as a newcomer runs it, and the query command it prints at its end, as printed."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import environment_without_settings
from streamscore.settings import Settings

STREAMSCORE = str(Path(sys.executable).with_name("streamscore"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def demo_env(settings: Settings, data_dir: Path) -> dict[str, str]:
    """The test's broker (and server, if any); the demo's own embedded store in a fresh data dir."""
    env = environment_without_settings()
    env.update({"KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "STREAMSCORE_DATA_DIR": str(data_dir),
                "STREAMSCORE_CACHE_DIR": str(settings.cache_dir), "COLUMNS": "200"})
    if settings.clickhouse_url:
        env["CLICKHOUSE_URL"] = settings.clickhouse_url
    return env


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("example", ["payments", "rides"])
def test_the_query_command_the_demo_prints_works_as_printed(settings, tmp_path, example):
    env = demo_env(settings, tmp_path / "data")
    spec = [] if example == "payments" else ["--spec", "examples/rides"]
    demo = subprocess.run([STREAMSCORE, "demo", "--history", "3000", "--events", "1000", "--rate", "4000", *spec],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    printed = re.search(r"^\s*\./run (query .*)$", demo.stdout, re.MULTILINE)
    assert printed, demo.stdout[-2000:]
    args = shlex.split(printed.group(1))
    assert ("--spec" in args) == (example == "rides")

    # `./run X` is `.venv/bin/streamscore X` once set up: the same binary as this test's interpreter's
    answer = subprocess.run([STREAMSCORE, *args, "--format", "csv"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    header, *rows = [line.split(",") for line in answer.stdout.strip().splitlines()]
    assert header == ["model_version", "count()"]
    counts = {int(version): int(count) for version, count in rows}
    # history scored by no model (v0), live traffic by v1; poison events are dead-lettered, not predicted
    assert set(counts) == {0, 1} and counts[0] == 3000 and 0 < counts[1] <= 1000


@pytest.mark.integration
@pytest.mark.slow
def test_the_drift_demo_of_the_regression_example_retrains_and_promotes(settings, tmp_path):
    """`demo --spec examples/rides --drift`: the traffic drift harms the duration model, one retrain is asked for and
    the better candidate is promoted (the drift service follows a regression model: no threshold, numeric labels)."""
    env = demo_env(settings, tmp_path / "data")
    demo = subprocess.run([STREAMSCORE, "demo", "--spec", "examples/rides", "--drift"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert re.search(r"v2 promoted\s+│\s+passed: candidate rmse", demo.stdout), demo.stdout[-3000:]
    assert re.search(r"retrain requests in the whole run\s+│\s+1 │", demo.stdout), demo.stdout[-3000:]
