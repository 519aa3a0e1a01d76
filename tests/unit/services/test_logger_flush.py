"""When the logger writes its buffered rows (logger_batch_rows, logger_flush_interval_s, a quiet stream)."""
from streamscore.services.logger.service import flush_due

ROWS, INTERVAL = 20_000, 1.0


def test_rows_or_age_make_a_write_due():
    assert flush_due(ROWS, 0.0, quiet=False, batch_rows=ROWS, interval_s=INTERVAL)
    assert flush_due(1, INTERVAL, quiet=False, batch_rows=ROWS, interval_s=INTERVAL)
    assert not flush_due(ROWS - 1, 0.9, quiet=False, batch_rows=ROWS, interval_s=INTERVAL)


def test_a_quiet_stream_writes_its_tail_after_a_quarter_interval():
    assert not flush_due(200, 0.3, quiet=False, batch_rows=ROWS, interval_s=INTERVAL)  # traffic flowing: wait
    assert flush_due(200, 0.3, quiet=True, batch_rows=ROWS, interval_s=INTERVAL)  # went quiet: write the tail
    assert not flush_due(200, 0.1, quiet=True, batch_rows=ROWS, interval_s=INTERVAL)  # rows just arrived
