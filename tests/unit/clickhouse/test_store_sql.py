"""Pure parts of clickhouse.store (the store itself is exercised through chDB in tests/integration)."""
from __future__ import annotations

import pytest

from streamscore.clickhouse.store import own_output_format


@pytest.mark.parametrize("sql, expected", [
    ("SELECT 1 FORMAT TSV", "TSV"),
    ("select 1 format JSONEachRow;", "JSONEachRow"),
    ("SELECT count() FROM predictions FINAL\n  FORMAT CSVWithNames  ", "CSVWithNames"),
    ("SELECT 1", None),
    ("SELECT 'FORMAT' AS word", None),
    ("SELECT formatReadableSize(1)", None),
])
def test_own_output_format_is_the_trailing_format_clause(sql, expected):
    assert own_output_format(sql) == expected
