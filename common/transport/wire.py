"""The wire codec: newline-delimited JSON objects, UTF-8, one message per line.

Owns framing (splitting a byte stream into lines under a length limit), decoding (bytes -> dict, or
the error code that says why not) and encoding (dict -> one line). Both transports share it: the
asyncio one (common/transport/aio.py) and the blocking selectors one (common/transport/blocking.py).

Decoding rules, each answered with its own error code by the transports:
- a line longer than the maximum: LINE_TOO_LONG, and the connection is closed (the rest of the
  stream can no longer be framed with confidence);
- bytes that are not UTF-8: INVALID_UTF8; not JSON: INVALID_JSON; JSON but not an object:
  NOT_OBJECT. These leave the connection usable.
- blank lines are skipped, so a person can type into `nc` and press Enter.
- an object whose "TASK" or "RESPONSE" (the names every protocol dispatches on) is there but not a
  string: FIELD_TYPE, so no handler ever meets a list or an object where it expects a name.

JSON numbers with a fraction or exponent decode as `decimal.Decimal`, so an amount sent as a number
is read exactly (see common/bank/money.py). Integers stay `int`. Encoding writes such a number back
as the float with the same digits (a decoded reply can be printed or forwarded); one whose digits a
float cannot hold is written as a string of them rather than changed.
"""

from __future__ import annotations

import json
from decimal import Decimal

from common.bank.errors import SaldoError

MAX_LINE_BYTES = 64 * 1024
# Bytes asked of the socket per read: large, so that one read carries many pipelined lines.
READ_CHUNK_BYTES = 256 * 1024
# A request id ("ID") is echoed in replies, so it is bounded and plain.
MAX_REQUEST_ID_CHARS = 64



def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_refuse_constant, strict=True)
_scan_once = _DECODER.scan_once


def _encode_decimal(value: object) -> float | str:
    if type(value) is not Decimal:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    if value.is_finite():
        as_float = float(value)
        if Decimal(repr(as_float)) == value:
            return as_float
    return str(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_encode_decimal)
_WHITESPACE = " \t\r"


class LineSplitter:
    """Turns a byte stream into complete lines, holding back the partial last one.

    Every line it returns is at most `max_line_bytes` long (without its newline). When the peer
    sends a longer line, complete or still arriving, the splitter returns the good lines before it
    and sets `overflowed`; from then on the stream cannot be framed with confidence and the
    transport answers LINE_TOO_LONG and closes. The held-back part never exceeds the limit, so memory
    per connection is bounded by the limit plus one read.
    """

    __slots__ = ("max_line_bytes", "overflowed", "_partial")

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        assert max_line_bytes > 0
        self.max_line_bytes = max_line_bytes
        self.overflowed = False
        self._partial = b""

    @property
    def partial_bytes(self) -> int:
        """How many bytes of an unfinished line are held; > 0 means the peer is mid-line."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        assert not self.overflowed, "feed after overflow"
        limit = self.max_line_bytes
        buffer = self._partial + data if self._partial else data
        last_newline = buffer.rfind(b"\n")
        if last_newline < 0:
            if len(buffer) > limit:
                return self._overflow([])
            self._partial = buffer
            return []
        lines = buffer[:last_newline].split(b"\n")
        # Only a span longer than the limit can hold a line longer than it: skip the scan otherwise.
        if last_newline > limit:
            for index, line in enumerate(lines):
                if len(line) > limit:
                    return self._overflow(lines[:index])
        rest = buffer[last_newline + 1 :]
        if len(rest) > limit:
            return self._overflow(lines)
        self._partial = rest
        return lines

    def _overflow(self, good_lines: list[bytes]) -> list[bytes]:
        self.overflowed = True
        self._partial = b""
        return good_lines


def decode_line(line: bytes) -> dict | None:
    """Decode one line (without its newline) into a message; None for a blank line.

    Raises SaldoError(INVALID_UTF8 | INVALID_JSON | NOT_OBJECT).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SaldoError("INVALID_UTF8", f"invalid UTF-8 at byte {error.start}") from None
    start = 0
    length = len(text)
    while start < length and text[start] in _WHITESPACE:
        start += 1
    if start == length:
        return None
    try:
        message, end = _scan_once(text, start)
    except StopIteration as stop:
        raise SaldoError("INVALID_JSON", f"expecting a value at character {stop.value}") from None
    except json.JSONDecodeError as error:
        raise SaldoError("INVALID_JSON", f"{error.msg} at character {error.pos}") from None
    except ValueError as error:  # e.g. an integer beyond the interpreter's digit limit
        raise SaldoError("INVALID_JSON", str(error)[:200]) from None
    except RecursionError:
        raise SaldoError("INVALID_JSON", "nested too deeply") from None
    while end < length and text[end] in _WHITESPACE:
        end += 1
    if end != length:
        raise SaldoError("INVALID_JSON", f"extra data at character {end}")
    if type(message) is not dict:
        raise SaldoError("NOT_OBJECT", f"expected a JSON object, got {type(message).__name__}")
    task = message.get("TASK")
    response = message.get("RESPONSE")
    if task is not None and type(task) is not str:
        raise SaldoError("FIELD_TYPE", "TASK must be a string")
    if response is not None and type(response) is not str:
        raise SaldoError("FIELD_TYPE", "RESPONSE must be a string")
    return message


def decode_lines(lines: list[bytes]) -> list[dict | SaldoError]:
    """Decode a run of lines; each item is a message or the error for that line. Blank lines vanish."""
    decoded: list[dict | SaldoError] = []
    for line in lines:
        try:
            message = decode_line(line)
        except SaldoError as error:
            decoded.append(error)
            continue
        if message is not None:
            decoded.append(message)
    return decoded


def encode(message: dict) -> bytes:
    """One message as one line, newline included. ASCII only, so no byte is ever a stray newline."""
    return (_ENCODER.encode(message) + "\n").encode("ascii")


def encode_value(value) -> bytes:
    """Any JSON value in the same form as `encode`, without the newline (a part of a line)."""
    return _ENCODER.encode(value).encode("ascii")


def encode_many(messages: list[dict]) -> bytes:
    """Several messages as consecutive lines, for one write."""
    encoder = _ENCODER.encode
    return ("\n".join([encoder(m) for m in messages]) + "\n").encode("ascii") if messages else b""


def request_id_of(message: dict) -> str | int | None:
    """The message's "ID" if it is one that may be echoed, else None.

    Raises SaldoError(ID_INVALID) for an ID of another type or an over-long one: an ID that cannot
    be echoed safely is refused rather than dropped, so the client learns why it got no match.
    """
    request_id = message.get("ID")
    if request_id is None:
        return None
    if type(request_id) is str:
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise SaldoError("ID_INVALID", f"ID is longer than {MAX_REQUEST_ID_CHARS} characters")
        return request_id
    if type(request_id) is int and -(2**53) < request_id < 2**53:
        return request_id
    raise SaldoError("ID_INVALID", "ID must be a string or an integer")
