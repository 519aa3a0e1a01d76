"""A training process runs at the lowest CPU priority from its start, its imports included."""
from __future__ import annotations

from pathlib import Path

from streamscore.learning.training_process import TRAINING_NICE, TrainingProcess
from streamscore.settings import Settings


def test_the_training_process_is_at_the_lowest_priority_from_its_first_import(tmp_path):
    training = TrainingProcess(Settings(data_dir=tmp_path), since_ms=None)
    try:
        # at once: the spawned interpreter is still importing, long before `_train` runs
        nice = int(Path(f"/proc/{training.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == TRAINING_NICE
    finally:
        training.abandon()
