"""common.bank.money: every valid amount round-trips exactly; every invalid one is refused with its own code."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bank.errors import SaldoError
from common.bank.money import (
    CENTS_PER_UNIT,
    MAX_AMOUNT_CENTS,
    MAX_AMOUNT_STRING_CHARS,
    parse_amount_cents,
    render_cents,
)
from common.transport import wire

FAST = settings(max_examples=200, deadline=None)
valid_cents = st.integers(min_value=1, max_value=MAX_AMOUNT_CENTS)


def refusal(value: object, **options: object) -> str:
    with pytest.raises(SaldoError) as caught:
        parse_amount_cents(value, **options)
    return caught.value.code


# --- Round trips --------------------------------------------------------------------------------


@FAST
@given(valid_cents)
def test_a_rendered_amount_parses_back_to_the_same_cents(cents):
    text = render_cents(cents)
    assert parse_amount_cents(text) == cents


@FAST
@given(valid_cents)
def test_a_json_number_amount_parses_to_the_same_cents(cents):
    # What the wire decoder hands over for {"AMOUNT": 12.34}: a Decimal, never a float.
    message = wire.decode_line(b'{"AMOUNT": ' + render_cents(cents).encode() + b"}")
    assert type(message["AMOUNT"]) is Decimal
    assert parse_amount_cents(message["AMOUNT"]) == cents
    assert parse_amount_cents(Decimal(render_cents(cents))) == cents


@FAST
@given(st.integers(min_value=1, max_value=MAX_AMOUNT_CENTS // CENTS_PER_UNIT))
def test_an_integer_amount_is_whole_units(units):
    assert parse_amount_cents(units) == units * CENTS_PER_UNIT
    assert parse_amount_cents(str(units)) == units * CENTS_PER_UNIT
    assert parse_amount_cents(wire.decode_line(b'{"v": %d}' % units)["v"]) == units * CENTS_PER_UNIT


@FAST
@given(valid_cents, st.integers(min_value=1, max_value=20))
def test_trailing_zeros_do_not_change_the_amount(cents, zeros):
    text = render_cents(cents) + "0" * zeros
    if len(text) <= MAX_AMOUNT_STRING_CHARS:
        assert parse_amount_cents(text) == cents
    assert parse_amount_cents(Decimal(text)) == cents


@pytest.mark.parametrize(
    "value, cents",
    [
        ("12.34", 1234),
        ("12", 1200),
        ("12.3", 1230),
        ("0.01", 1),
        ("+5", 500),
        ("007.50", 750),
        (12, 1200),
        (Decimal("12.34"), 1234),
        (Decimal("1.2E+1"), 1200),
        (Decimal("1234E-2"), 1234),
        (12.34, 1234),  # a float is read through its repr, the literal the caller typed
        (0.1, 10),
        (render_cents(MAX_AMOUNT_CENTS), MAX_AMOUNT_CENTS),
        (MAX_AMOUNT_CENTS // CENTS_PER_UNIT, MAX_AMOUNT_CENTS),
        # 40 significant digits: beyond Decimal's 28-digit context, still exact.
        (Decimal("12.34".ljust(MAX_AMOUNT_STRING_CHARS, "0")), 1234),
        ("12.34".ljust(MAX_AMOUNT_STRING_CHARS, "0"), 1234),
    ],
)
def test_accepted_forms(value, cents):
    assert parse_amount_cents(value) == cents


def test_render_cents_shows_two_decimals_and_a_sign():
    assert render_cents(12050) == "120.50"
    assert render_cents(5) == "0.05"
    assert render_cents(-5) == "-0.05"
    assert render_cents(0) == "0.00"
    assert render_cents(MAX_AMOUNT_CENTS) == "1000000000.00"


@pytest.mark.parametrize("not_int", [12.5, 12.0, Decimal("12"), "12", True, None])
def test_render_cents_refuses_anything_but_int_cents(not_int):
    with pytest.raises(AssertionError):
        render_cents(not_int)


# --- Refusals, each with its own code -----------------------------------------------------------


def test_a_missing_amount():
    assert refusal(None) == "AMOUNT_MISSING"


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_amount(value):
    assert refusal(value) == "AMOUNT_BOOLEAN"
    assert refusal(value, allow_zero=True) == "AMOUNT_BOOLEAN"


@pytest.mark.parametrize("value", [[], [1], {}, {"v": 1}, b"12", (1,), object()])
def test_an_amount_of_another_type(value):
    assert refusal(value) == "AMOUNT_TYPE"


@pytest.mark.parametrize(
    "value",
    [
        "12,34",
        "1e2",
        "1E2",
        " 1",
        "1 ",
        "",
        "abc",
        "١٢",  # Arabic-Indic digits: int() would take them, an amount must not
        "１２",  # full-width digits
        "1_000",  # int() accepts underscores
        "0x10",
        "1.",
        ".5",
        "1.2.3",
        "--1",
        "1" * (MAX_AMOUNT_STRING_CHARS + 1),
        "0" * 1000 + "1",
    ],
)
def test_a_malformed_amount_string(value):
    assert refusal(value) == "AMOUNT_MALFORMED"


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        "NaN",
        "nan",
        "Infinity",
        "-inf",
    ],
)
def test_a_non_finite_amount(value):
    assert refusal(value) == "AMOUNT_NOT_FINITE"


def test_a_json_nan_is_not_an_amount():
    # The wire refuses NaN before any handler sees it; money refuses a float NaN all the same.
    with pytest.raises(SaldoError, match="INVALID_JSON"):
        wire.decode_line(b'{"v": NaN}')
    assert refusal(float("nan")) == "AMOUNT_NOT_FINITE"


@pytest.mark.parametrize("value", ["-1", "-0.01", -1, Decimal("-0.01"), -0.5, Decimal("-1E+999999")])
def test_a_negative_amount(value):
    assert refusal(value) == "AMOUNT_NEGATIVE"
    assert refusal(value, allow_zero=True) == "AMOUNT_NEGATIVE"


@pytest.mark.parametrize("value", ["0", "0.00", "-0", 0, Decimal("0"), Decimal("0E+5"), Decimal("-0.000"), 0.0])
def test_zero_is_refused_unless_allowed(value):
    assert refusal(value) == "AMOUNT_ZERO"
    assert parse_amount_cents(value, allow_zero=True) == 0


@pytest.mark.parametrize(
    "value",
    [
        "0.001",
        "12.345",
        "12.3401",
        Decimal("0.001"),
        Decimal("1E-3"),
        # 40 digits, the third decimal nonzero: a Decimal context rounding would hide it.
        Decimal("12.34" + "1" + "0" * 35),
        Decimal("1.00" + "0" * 35 + "1"),
        0.1 + 0.2,  # repr is 0.30000000000000004
        1e-7,
    ],
)
def test_more_than_two_decimals(value):
    assert refusal(value) == "AMOUNT_TOO_PRECISE"


@FAST
@given(st.integers(min_value=0, max_value=MAX_AMOUNT_CENTS - 1), st.integers(min_value=1, max_value=9))
def test_any_third_decimal_is_too_precise(cents, digit):
    text = render_cents(cents) + str(digit)
    assert refusal(text) == "AMOUNT_TOO_PRECISE"
    assert refusal(Decimal(text)) == "AMOUNT_TOO_PRECISE"


@pytest.mark.parametrize(
    "value",
    [
        render_cents(MAX_AMOUNT_CENTS + 1),
        Decimal(render_cents(MAX_AMOUNT_CENTS + 1)),
        MAX_AMOUNT_CENTS // CENTS_PER_UNIT + 1,
        10**400,
        Decimal("1E+999999"),
        Decimal("1E+999999999"),
        1e300,
        "9" * MAX_AMOUNT_STRING_CHARS,
    ],
)
def test_an_amount_above_the_maximum(value):
    assert refusal(value) == "AMOUNT_TOO_LARGE"


@FAST
@given(st.integers(min_value=MAX_AMOUNT_CENTS + 1, max_value=MAX_AMOUNT_CENTS * 10**6))
def test_any_amount_above_the_maximum_is_too_large(cents):
    assert refusal(render_cents(cents)) == "AMOUNT_TOO_LARGE"
    assert refusal(Decimal(render_cents(cents))) == "AMOUNT_TOO_LARGE"


def test_a_huge_exponent_is_refused_quickly():
    # Must compare before scaling: expanding 1E+999999999 to digits would take minutes.
    import time

    started = time.monotonic()
    for _ in range(100):
        assert refusal(Decimal("1E+999999999")) == "AMOUNT_TOO_LARGE"
        assert refusal(Decimal("1E-999999999")) == "AMOUNT_TOO_PRECISE"
    assert time.monotonic() - started < 1.0
