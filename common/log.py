"""One line per event, `key=value`, so a reader can follow a request across processes.

    ts=2026-11-22T19:48:50.123Z level=info node=replica1 comp=sequencing event=gap_detected expected_seq=41 got_seq=45

`node` names the process (set once by `configure`), `comp` the module that logged. Values with a
space, a quote or an equals sign are quoted. Built on the standard logging module, so levels and
handlers behave as usual; hot paths log at debug level only.
"""

from __future__ import annotations

import logging
import sys
import time

_node_name = "-"


def _format_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(ch in text for ch in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", {})
        parts = [
            f"ts={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"node={_node_name}",
            f"comp={record.name.removeprefix('saldo.')}",
            f"event={record.getMessage()}",
        ]
        parts.extend(f"{key}={_format_value(value)}" for key, value in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += " traceback=" + _format_value(self.formatException(record.exc_info))
        return line


# A core's event levels (common/core.py) as the logging module's.
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING}


class EventLogger:
    """`log.info("event_name", key=value, ...)`: one key=value line."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _emit(self, level: int, event: str, fields: dict, exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: object) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: object) -> None:
        self._emit(logging.ERROR, event, fields, exc_info=True)

    def record(self, events) -> None:
        """One line per event a core decided (common/core.py's Event: name, fields, level)."""
        for event in events:
            self._emit(_LEVELS[event.level], event.name, event.fields)

    def enabled(self, level: int = logging.DEBUG) -> bool:
        return self._logger.isEnabledFor(level)


def get_logger(component: str) -> EventLogger:
    return EventLogger(logging.getLogger(f"saldo.{component}"))


def configure(node_name: str, level: str = "info", stream=None) -> None:
    """Send saldo's events to stderr (or `stream`) as key=value lines, tagged with the node name."""
    global _node_name
    _node_name = node_name
    root = logging.getLogger("saldo")
    root.handlers.clear()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
