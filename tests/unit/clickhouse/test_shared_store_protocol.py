from __future__ import annotations

from pathlib import Path

from streamscore.clickhouse.shared_store import MAX_UNIX_PATH, socket_path
from streamscore.settings import Settings


def test_socket_is_in_the_data_dir_unless_its_path_is_too_long(tmp_path):
    assert socket_path(Settings(data_dir=tmp_path)) == (tmp_path / "clickhouse.sock").resolve()
    deep = tmp_path / ("d" * 120)
    far = socket_path(Settings(data_dir=deep))
    assert len(str(far)) <= MAX_UNIX_PATH and far != socket_path(Settings(data_dir=tmp_path / ("e" * 120)))
    assert far == socket_path(Settings(data_dir=Path(str(deep))))  # stable: every process finds the same one
