r"""One line per event, `key=value`, so a reader can follow a request across processes.

    ts=2026-11-22T19:48:50.123Z level=info node=replica1 comp=sequencing event=gap_detected expected_seq=41 got_seq=45

`node` names the process (set once by `configure`), `comp` the module that logged. Built on the
standard logging module, so levels and handlers behave as usual; hot paths log at debug level only.

A line always parses back to the fields it was made of (`parse_line`):
- a value is written bare when it is printable and holds no space, quote, equals sign or
  backslash; any other value (the empty one included) is quoted, with `\\`, `\"`, `\n`, `\r`, `\t`
  and `\xNN` / `\uNNNN` / `\UNNNNNNNN` for every other character that is not printable (control
  characters, line and paragraph separators, invisible spaces), so one event is always one line;
- a key is made of ASCII letters, digits and `_`: any other character is written as `_`, and a
  key that would repeat one already on the line (the line's own ts, level, node, comp and event
  among them) gets a `_` appended until it does not.
"""

from __future__ import annotations

import logging
import re
import sys
import time

_node_name = "-"

_KEY_CHAR_RE = re.compile(r"[^A-Za-z0-9_]")
_KEY_RE = re.compile(r"[A-Za-z0-9_]+")
# Characters that would read as syntax in a bare value (a space ends it, a quote opens a quoted
# one); a value holding one, or anything not printable, is quoted.
_SYNTAX_RE = re.compile(r'[ "=\\]')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNESCAPES = {escaped[1]: char for char, escaped in _ESCAPES.items()}
_QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE_RE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)", re.DOTALL)


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def format_value(value: object) -> str:
    """`value` as it is written after `key=`: bare, or quoted and escaped."""
    text = value if isinstance(value, str) else str(value)
    if text and text.isprintable() and not _SYNTAX_RE.search(text):
        return text
    return '"' + "".join(map(_escape_char, text)) + '"'


def _safe_key(key: str, taken: set[str]) -> str:
    safe = _KEY_CHAR_RE.sub("_", key) or "_"
    while safe in taken:
        safe += "_"
    taken.add(safe)
    return safe


def format_fields(fields: dict[str, object], taken: set[str] | None = None) -> str:
    """`key=value` pairs joined by spaces, keys made safe and unique among themselves and `taken`
    (the keys already on the line; the new ones are added to it)."""
    taken = set() if taken is None else taken
    return " ".join(f"{_safe_key(str(key), taken)}={format_value(value)}" for key, value in fields.items())


def _unescape(match: re.Match) -> str:
    escape = match.group(1)
    if len(escape) > 1:
        return chr(int(escape[1:], 16))
    if escape not in _UNESCAPES:
        raise ValueError(f"unknown escape \\{escape}")
    return _UNESCAPES[escape]


def parse_line(line: str) -> dict[str, str]:
    """The fields of one line this module wrote, in order, each value as the text it was written
    from. ValueError for a line it could not have written (a key without `=`, an unterminated
    quote, an unknown escape, a key twice, a stray space)."""
    line = line.removesuffix("\n")
    fields: dict[str, str] = {}
    at = 0
    while at < len(line):
        equals = line.find("=", at)
        key = line[at:equals] if equals >= 0 else ""
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"no key=value at column {at}: {line[at:at + 40]!r}")
        if key in fields:
            raise ValueError(f"key {key} twice")
        at = equals + 1
        if line.startswith('"', at):
            quoted = _QUOTED_RE.match(line, at)
            if quoted is None:
                raise ValueError(f"unterminated quote after {key}=")
            fields[key] = _ESCAPE_RE.sub(_unescape, quoted.group(1))
            at = quoted.end()
        else:
            end = line.find(" ", at)
            end = len(line) if end < 0 else end
            value = line[at:end]
            if not value or format_value(value) != value:
                raise ValueError(f"{key}: a value that should have been quoted: {value!r}")
            fields[key] = value
            at = end
        if at < len(line):
            if line[at] != " " or at + 1 == len(line):
                raise ValueError(f"no single space after {key}'s value at column {at}")
            at += 1
    return fields


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {  # the keys every line starts with, in this order
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": _node_name,
            "comp": record.name.removeprefix("saldo."),
            "event": record.getMessage(),
        }
        taken: set[str] = set()
        line = format_fields(fields, taken)
        extra = getattr(record, "fields", {})
        if record.exc_info:
            extra = {**extra, "traceback": self.formatException(record.exc_info)}
        return f"{line} {format_fields(extra, taken)}" if extra else line


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
