"""`./run setup` on a fresh checkout, as a newcomer's first command does it: quiet, then idempotent."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_first_setup_prints_no_warnings_and_a_second_one_installs_nothing(tmp_path):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    checkout = tmp_path / "checkout"
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    # an external cluster is "configured": setup then skips the Kafka jars (their install is tested elsewhere)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    first = subprocess.run(["./run", "setup"], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    assert output.strip() == "==> installing streamscore and its dependencies into .venv"
    assert (checkout / ".venv" / "install.log").stat().st_size > 0  # pip's own chatter went there

    second = subprocess.run(["./run", "setup"], cwd=checkout, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and second.stdout + second.stderr == ""
