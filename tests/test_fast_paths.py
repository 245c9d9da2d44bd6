"""The canonical-form parsers agree with the full decoder on every line.

Replicas and the sequencer read saldo's own request and entry lines with one regular expression
(bank.parse_request_line, bank.parse_balance_line, sequencing.parse_entry_line), and write the
common replies without the JSON encoder; everything else goes through the JSON decoder
and the full parsers. These properties hold the two paths to one meaning: the fast path accepts
only what the full path accepts, and returns the same operation.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bank.errors import SaldoError
from common.bank.money import MAX_AMOUNT_CENTS
from common.bank.replies import fast_balance_line
from common.bank.state import Operation, Query, balance_reply, parse_balance_line, parse_request, parse_request_line
from common.sequencer.core import entry_line, parse_entry, parse_entry_line
from common.transport import wire
from common.transport.client import balance_line, operation_line

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-", min_size=1, max_size=64)
op_ids = st.text(alphabet="abcdef0123456789-ABCDEF_.:", min_size=1, max_size=64)
amounts = st.integers(min_value=1, max_value=MAX_AMOUNT_CENTS)


@st.composite
def operations(draw) -> Operation:
    kind = draw(st.sampled_from(["DEPOSIT", "WITHDRAW", "TRANSFER"]))
    account = draw(names)
    if kind == "TRANSFER":
        target = draw(names.filter(lambda name: name != account))
        return Operation(draw(op_ids), kind, account, target, draw(amounts))
    return Operation(draw(op_ids), kind, account, None, draw(amounts))


def damage(line: bytes, position: int, replacement: bytes, cut: int) -> bytes:
    """`line` with `cut` bytes at `position` replaced by `replacement` (a typo, a lost or an extra byte)."""
    position = min(position, len(line))
    return line[:position] + replacement + line[position + cut :]


def assert_the_fast_path_accepts_only_what_the_full_path_does(fast, slow, damaged: bytes) -> None:
    """A fast parser may refuse a damaged line (None), but what it accepts must match the full path."""
    parsed = fast(damaged)
    if parsed is not None:
        assert parsed == slow(damaged)


def slow_request(line: bytes) -> Operation | None:
    """What the full path makes of a line: the Operation, or None if it refuses it."""
    try:
        message = wire.decode_line(line)
        if message is None:
            return None
        request = parse_request(message)
    except SaldoError:
        return None
    return request if isinstance(request, Operation) and message.get("ID") == request.op_id else None


def slow_balance(line: bytes) -> tuple[str, str] | None:
    """What the full path makes of a balance read: (request id, account), or None."""
    try:
        message = wire.decode_line(line)
        if message is None:
            return None
        request = parse_request(message)
        request_id = wire.request_id_of(message)
    except SaldoError:
        return None
    if not isinstance(request, Query) or request.min_seq is not None or request.seed_000 or type(request_id) is not str:
        return None
    return request_id, request.account


def slow_entry(line: bytes) -> tuple[int, Operation] | None:
    try:
        message = wire.decode_line(line)
        return None if message is None or message.get("TASK") != "ORDERED" else parse_entry(message)
    except SaldoError:
        return None


@settings(max_examples=300, deadline=None)
@given(operations())
def test_a_canonical_request_line_parses_to_the_same_operation_both_ways(op: Operation) -> None:
    line = operation_line(op.op_id, op.kind, op.account, op.to_account, op.amount_cents).rstrip(b"\n")
    assert parse_request_line(line) == op
    assert slow_request(line) == op


@settings(max_examples=300, deadline=None)
@given(op_ids, names, st.integers(min_value=0, max_value=MAX_AMOUNT_CENTS), st.integers(min_value=0, max_value=2**62))
def test_a_canonical_balance_read_parses_and_is_answered_the_same_both_ways(request_id, account, balance_cents, seq) -> None:
    line = balance_line(request_id, account).rstrip(b"\n")
    assert parse_balance_line(line) == (request_id, account) == slow_balance(line)
    fast_reply = wire.decode_line(fast_balance_line(request_id, balance_cents, seq).rstrip(b"\n"))
    assert fast_reply == balance_reply(Query(account), balance_cents, request_id, SEQ=seq)


@settings(max_examples=500, deadline=None)
@given(op_ids, names, st.integers(min_value=0, max_value=200), st.binary(min_size=0, max_size=3), st.integers(min_value=0, max_value=3))
def test_a_damaged_balance_read_is_never_accepted_by_the_fast_path_alone(request_id, account, position, replacement, cut) -> None:
    line = balance_line(request_id, account).rstrip(b"\n")
    assert_the_fast_path_accepts_only_what_the_full_path_does(
        parse_balance_line, slow_balance, damage(line, position, replacement, cut))


def test_a_balance_read_with_min_seq_or_another_spelling_is_left_to_the_full_parser() -> None:
    assert parse_balance_line(b'{"TASK":"BALANCE","ID":"r1","ACCOUNT":"x","MIN_SEQ":3}') is None
    assert parse_balance_line(b'{"TASK":"BALANCE","ACCOUNT":"x","ID":"r1"}') is None
    assert parse_balance_line(b'{"TASK":"BALANCE","ID":"r1","ACCOUNT":"x"}') == ("r1", "x")


@settings(max_examples=300, deadline=None)
@given(operations(), st.integers(min_value=1, max_value=10**15))
def test_a_canonical_entry_line_parses_to_the_same_entry_both_ways(op: Operation, seq: int) -> None:
    line = entry_line(seq, op).rstrip(b"\n")
    assert parse_entry_line(line) == (seq, op)
    assert slow_entry(line) == (seq, op)


@settings(max_examples=500, deadline=None)
@given(operations(), st.integers(min_value=0, max_value=200), st.binary(min_size=0, max_size=3), st.integers(min_value=0, max_value=3))
def test_a_damaged_request_line_is_never_accepted_by_the_fast_path_alone(op, position, replacement, cut) -> None:
    line = operation_line(op.op_id, op.kind, op.account, op.to_account, op.amount_cents).rstrip(b"\n")
    assert_the_fast_path_accepts_only_what_the_full_path_does(
        parse_request_line, slow_request, damage(line, position, replacement, cut))


@settings(max_examples=500, deadline=None)
@given(operations(), st.integers(min_value=1, max_value=10**6), st.integers(min_value=0, max_value=200),
       st.binary(min_size=0, max_size=3), st.integers(min_value=0, max_value=3))
def test_a_damaged_entry_line_is_never_accepted_by_the_fast_path_alone(op, seq, position, replacement, cut) -> None:
    line = entry_line(seq, op).rstrip(b"\n")
    assert_the_fast_path_accepts_only_what_the_full_path_does(
        parse_entry_line, slow_entry, damage(line, position, replacement, cut))


@pytest.mark.parametrize(
    "line",
    [
        b'{"TASK":"TRANSFER","ID":"a1","FROM":"x","TO":"x","AMOUNT":"1.00"}',  # same account
        b'{"TASK":"DEPOSIT","ID":"a1","ACCOUNT":"x","AMOUNT":"0.00"}',  # zero
        b'{"TASK":"DEPOSIT","ID":"a1","ACCOUNT":"x","AMOUNT":"1000000000.01"}',  # above the maximum
        b'{"TASK":"DEPOSIT","ID":"a1","ACCOUNT":"x","AMOUNT":"1.5"}',  # not two decimals: the full path decides
        b'{"TASK":"DEPOSIT","ACCOUNT":"x","ID":"a1","AMOUNT":"1.00"}',  # another key order
        b'{"TASK":"DEPOSIT","ID":"a\\u0031","ACCOUNT":"x","AMOUNT":"1.00"}',  # an escape
    ],
)
def test_lines_outside_the_canonical_form_are_left_to_the_full_parser(line: bytes) -> None:
    assert parse_request_line(line) is None


def test_the_full_parser_still_accepts_what_the_fast_path_leaves_to_it() -> None:
    assert slow_request(b'{"TASK":"DEPOSIT","ID":"a1","ACCOUNT":"x","AMOUNT":"1.5"}') == Operation("a1", "DEPOSIT", "x", None, 150)
    assert slow_request(b'{"TASK":"DEPOSIT","ACCOUNT":"x","ID":"a1","AMOUNT":"1.00"}') == Operation("a1", "DEPOSIT", "x", None, 100)
