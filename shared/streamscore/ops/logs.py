"""Log lines with fields: `log.info("model swap", extra={"model_version": 3})`.

Key events (model swap, dead letter, drift, retrain) pass their facts — event
ids, model versions, reasons — as `extra` fields rather than only inside the
message, so they can be filtered and aggregated. The text format appends them
as key=value; the JSON format (settings.log_format="json", for log shippers)
writes one object per line with the fields at the top level.
"""
from __future__ import annotations

import json as jsonlib
import logging
import math
import time
from datetime import datetime, timezone

from streamscore.settings import Settings

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_ATTRIBUTES = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def record_fields(record: logging.LogRecord) -> dict:
    """The `extra` fields of a record, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRIBUTES and not k.startswith("_")}


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        line.update({k: _plain(v) for k, v in record_fields(record).items()})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return jsonlib.dumps(line)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # keep fields on the message line, before any traceback
        return head + " " + " ".join(f"{k}={v}" for k, v in fields.items()) + sep + tail


def configure_logging(settings: Settings, json: bool | None = None) -> None:
    """Root logging for a streamscore process: level from settings.log_level, format
    from settings.log_format unless `json` says otherwise. Replaces earlier handlers."""
    level = settings.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level {settings.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    use_json = settings.log_format == "json" if json is None else json
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


class RepeatedWarning:
    """A warning that may repeat for every message of a stream (a producer writing a wrong schema): the first one
    per key is logged, later ones are counted and summarised at most once per `interval_s`, so 20,000 bad
    messages make a few lines, not 20,000.

    >>> import logging; lines = []
    >>> logger = logging.getLogger("doctest.repeated"); logger.propagate = False
    >>> logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: lines.append(r.getMessage())})())
    >>> warning = RepeatedWarning(logger, interval_s=60)
    >>> for offset in range(3):
    ...     warning.warn("unknown_schema", "skipping offset %d", offset, now=10.0 + offset)
    >>> warning.warn("unknown_schema", "skipping offset %d", 99, now=75.0)
    >>> lines
    ['skipping offset 0', 'skipping offset 99 (and 2 more like it in the last 65 s)']
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # key -> (time last logged, occurrences since)

    def warn(self, key: str, message: str, *args, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is not None and last[1]:
            message = f"{message} (and {last[1]} more like it in the last {now - last[0]:.0f} s)"
        self.logger.warning(message, *args)
        self._last[key] = (now, 0)
