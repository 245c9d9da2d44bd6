"""Money as integer cents, end to end.

Owns the one way an amount enters saldo (`parse_amount_cents`) and the one way it leaves
(`render_cents`). Amounts arrive as decimal strings ("12.34") or JSON numbers with at most two
decimals; the wire decoder turns JSON numbers with a fraction into `decimal.Decimal` (see
common/transport/wire.py), so no float is ever involved in a balance. A Python float given by a caller of the
library is read through its shortest repr, which is the literal the caller typed.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from common.bank.errors import SaldoError

CENTS_PER_UNIT = 100
# One operation moves at most one billion units. Documented in README ("Money").
MAX_AMOUNT_CENTS = 1_000_000_000 * CENTS_PER_UNIT
# No balance exceeds this: far below 2**53, so a balance is exact in every JSON reader, and
# far below 2**63, so a sum of 8 balances cannot overflow a BIGINT either.
MAX_BALANCE_CENTS = 1_000_000_000_000 * CENTS_PER_UNIT
# A longer string cannot be a valid amount below the maximum; refuse it before parsing.
MAX_AMOUNT_STRING_CHARS = 40

# ASCII digits only: \d would also match other scripts' digits, which int() accepts.
_AMOUNT_RE = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]+))?")


def _cents_from_parts(negative: bool, whole: str, fraction: str, allow_zero: bool, max_cents: int) -> int:
    fraction = fraction.rstrip("0")
    if len(fraction) > 2:
        raise SaldoError("AMOUNT_TOO_PRECISE", "at most two decimal places")
    cents = int(whole) * CENTS_PER_UNIT + (int(fraction.ljust(2, "0")) if fraction else 0)
    return _check_range(-cents if negative else cents, allow_zero, max_cents)


def _check_range(cents: int, allow_zero: bool, max_cents: int) -> int:
    if cents < 0:
        raise SaldoError("AMOUNT_NEGATIVE", "the amount must be positive")
    if cents == 0 and not allow_zero:
        raise SaldoError("AMOUNT_ZERO", "the amount must be above zero")
    if cents > max_cents:
        raise SaldoError("AMOUNT_TOO_LARGE", f"the maximum is {render_cents(max_cents)}")
    return cents


def _cents_from_decimal(value: Decimal, allow_zero: bool, max_cents: int) -> int:
    if not value.is_finite():
        raise SaldoError("AMOUNT_NOT_FINITE", "NaN and Infinity are not amounts")
    if value < 0:
        raise SaldoError("AMOUNT_NEGATIVE", "the amount must be positive")
    # Compare before scaling: 1E+999999999 must not be expanded into a billion digits.
    if value > Decimal(max_cents) / CENTS_PER_UNIT:
        raise SaldoError("AMOUNT_TOO_LARGE", f"the maximum is {render_cents(max_cents)}")
    if value == 0:
        return _check_range(0, allow_zero, max_cents)
    # Exact arithmetic on the digits: Decimal multiplication would round past 28 digits.
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    digits_text = "".join(map(str, digits))
    if exponent >= -2:
        return _check_range(int(digits_text) * 10 ** (exponent + 2), allow_zero, max_cents)
    dropped = -2 - exponent  # digits below the cent
    if digits_text[-dropped:].strip("0"):
        raise SaldoError("AMOUNT_TOO_PRECISE", "at most two decimal places")
    kept = digits_text[:-dropped] or "0"
    return _check_range(int(kept), allow_zero, max_cents)


def parse_amount_cents(value: object, *, allow_zero: bool = False, max_cents: int = MAX_AMOUNT_CENTS) -> int:
    """Return the amount in cents, or raise SaldoError with the code that says what is wrong.

    Accepts "12.34", "12", "12.3", 12, Decimal("12.34") (JSON numbers), and 12.34 (a Python float,
    read via its repr). Rejects booleans, NaN/Infinity, negatives, zero (unless allow_zero), more
    than two decimals, and anything above `max_cents` (one operation's bound unless told), each
    with its own code.
    """
    if value is None:
        raise SaldoError("AMOUNT_MISSING", "an amount is required")
    if value is True or value is False:  # bool is an int subclass: test it first.
        raise SaldoError("AMOUNT_BOOLEAN", "a boolean is not an amount")
    if type(value) is str:
        if len(value) > MAX_AMOUNT_STRING_CHARS:
            raise SaldoError("AMOUNT_MALFORMED", f"at most {MAX_AMOUNT_STRING_CHARS} characters")
        match = _AMOUNT_RE.fullmatch(value)
        if match is None:
            lowered = value.strip().lower().lstrip("+-")
            if lowered in ("nan", "inf", "infinity", "snan"):
                raise SaldoError("AMOUNT_NOT_FINITE", "NaN and Infinity are not amounts")
            raise SaldoError("AMOUNT_MALFORMED", 'expected a decimal string such as "12.34"')
        sign, whole, fraction = match.groups()
        return _cents_from_parts(sign == "-", whole, fraction or "", allow_zero, max_cents)
    if type(value) is int:
        if value < 0:
            raise SaldoError("AMOUNT_NEGATIVE", "the amount must be positive")
        if value > max_cents // CENTS_PER_UNIT:
            raise SaldoError("AMOUNT_TOO_LARGE", f"the maximum is {render_cents(max_cents)}")
        return _check_range(value * CENTS_PER_UNIT, allow_zero, max_cents)
    if type(value) is Decimal:
        return _cents_from_decimal(value, allow_zero, max_cents)
    if type(value) is float:
        if not math.isfinite(value):
            raise SaldoError("AMOUNT_NOT_FINITE", "NaN and Infinity are not amounts")
        try:
            return _cents_from_decimal(Decimal(repr(value)), allow_zero, max_cents)
        except InvalidOperation:  # pragma: no cover - repr of a finite float always parses
            raise SaldoError("AMOUNT_MALFORMED", "unreadable number") from None
    raise SaldoError("AMOUNT_TYPE", f"expected a decimal string or a number, got {type(value).__name__}")


def parse_balance_cents(value: object) -> int:
    """A balance another process reports (a farm worker's SALDO): an amount from 0 up to
    MAX_BALANCE_CENTS, read as parse_amount_cents reads one; SaldoError otherwise."""
    return parse_amount_cents(value, allow_zero=True, max_cents=MAX_BALANCE_CENTS)


def render_cents(cents: int) -> str:
    """Render integer cents as a two-decimal string: 12050 -> "120.50", -5 -> "-0.05"."""
    assert type(cents) is int, cents
    sign = "-" if cents < 0 else ""
    whole, fraction = divmod(abs(cents), CENTS_PER_UNIT)
    return f"{sign}{whole}.{fraction:02d}"
