"""common.bank.state: the request formats, the rules, exactly-once apply, and money conservation."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from common.bank.errors import SaldoError
from common.bank.money import MAX_AMOUNT_CENTS, MAX_BALANCE_CENTS
from common.bank.state import (
    BALANCE,
    DEPOSIT,
    MAX_ACCOUNT_CHARS,
    MAX_OP_ID_CHARS,
    TRANSFER,
    WITHDRAW,
    AppliedOp,
    Bank,
    Counters,
    Operation,
    Outcome,
    Query,
    applied_from_row,
    balance_reply,
    outcome_reply,
    parse_request,
)
from common.transport import wire


def refusal(message: dict) -> str:
    with pytest.raises(SaldoError) as caught:
        parse_request(message)
    return caught.value.code


def deposit(op_id: str, account: str, cents: int) -> Operation:
    return Operation(op_id, DEPOSIT, account, None, cents)


def withdraw(op_id: str, account: str, cents: int) -> Operation:
    return Operation(op_id, WITHDRAW, account, None, cents)


def transfer(op_id: str, source: str, target: str, cents: int) -> Operation:
    return Operation(op_id, TRANSFER, source, target, cents)


def snapshot(bank: Bank) -> tuple:
    """Everything observable about a bank's state."""
    return (
        dict(bank.balances),
        [(applied.op.op_id, applied.apply_index, applied.op, applied.outcome) for applied in bank.recent_applied()],
        bank.counters.copy(),
    )


# --- parse_request: accepted formats ------------------------------------------------------------


def test_native_deposit_withdraw_transfer():
    assert parse_request({"TASK": "DEPOSIT", "ID": "op-1", "ACCOUNT": "alice", "AMOUNT": "12.34"}) == deposit(
        "op-1", "alice", 1234
    )
    assert parse_request({"TASK": "WITHDRAW", "ID": "op-2", "ACCOUNT": "alice", "AMOUNT": 5}) == withdraw(
        "op-2", "alice", 500
    )
    assert parse_request(
        {"TASK": "TRANSFER", "ID": "op-3", "FROM": "alice", "TO": "bob", "AMOUNT": "1.50"}
    ) == transfer("op-3", "alice", "bob", 150)


def test_native_messages_off_the_wire_with_number_amounts():
    line = b'{"TASK":"TRANSFER","ID":"a.b:c-d_9","FROM":"x@y.z","TO":"b-2","AMOUNT":0.05}'
    assert parse_request(wire.decode_line(line)) == transfer("a.b:c-d_9", "x@y.z", "b-2", 5)


def test_balance_queries():
    assert parse_request({"TASK": BALANCE, "ACCOUNT": "alice"}) == Query("alice", None)
    assert parse_request({"TASK": BALANCE, "ACCOUNT": "alice", "MIN_SEQ": 42}) == Query("alice", 42)
    assert parse_request({"TASK": BALANCE, "ACCOUNT": "alice", "MIN_SEQ": 0}) == Query("alice", 0)


def test_seed_000_query():
    assert parse_request({"TASK": "QUERY", "USER": "alice"}) == Query("alice", None, seed_000=True)


SEED_002_ID = "550e8400-e29b-41d4-a716-446655440000"


def seed_002(tipo: str, origem: object, destino: object, valor: str) -> dict:
    """An Operacao as seed 002 sends it, with `valor` written as a JSON number, decoded off the wire."""
    line = (
        '{"id_msg": "%s", "tipo": "%s", "conta_origem": %s, "conta_destino": %s, "valor": %s}'
        % (SEED_002_ID, tipo, _json(origem), _json(destino), valor)
    )
    message = wire.decode_line(line.encode())
    assert message is not None
    return message


def _json(value: object) -> str:
    return "null" if value is None else f'"{value}"'


def test_seed_002_operacao_with_number_valor():
    message = seed_002("DEPOSITO", None, "bob", "10.5")
    assert type(message["valor"]) is Decimal
    assert parse_request(message) == deposit(SEED_002_ID, "bob", 1050)
    assert parse_request(seed_002("SAQUE", "alice", None, "3")) == withdraw(SEED_002_ID, "alice", 300)
    assert parse_request(seed_002("TRANSFERENCIA", "alice", "bob", "0.25")) == transfer(
        SEED_002_ID, "alice", "bob", 25
    )


def test_seed_002_deposit_or_withdrawal_naming_the_other_account_field():
    # A deposit names its destination; one naming only the origin deposits there.
    assert parse_request(seed_002("DEPOSITO", "alice", None, "1")) == deposit(SEED_002_ID, "alice", 100)
    assert parse_request(seed_002("SAQUE", None, "alice", "1")) == withdraw(SEED_002_ID, "alice", 100)
    # Both given: a deposit goes to the destination, a withdrawal comes from the origin.
    assert parse_request(seed_002("DEPOSITO", "alice", "bob", "1")) == deposit(SEED_002_ID, "bob", 100)
    assert parse_request(seed_002("SAQUE", "alice", "bob", "1")) == withdraw(SEED_002_ID, "alice", 100)


def test_seed_002_valor_as_a_string():
    message = {"id_msg": "m1", "tipo": "DEPOSITO", "conta_destino": "bob", "valor": "7.77"}
    assert parse_request(message) == deposit("m1", "bob", 777)


def test_seed_002_numeric_id_msg_is_the_operation_id_in_decimal():
    """The seed declares id_msg a UUID string; its users send numbers too: 7 and "7" are one id."""
    message = wire.decode_line(b'{"id_msg": 7, "tipo": "DEPOSITO", "conta_destino": "bob", "valor": 1}')
    assert parse_request(message) == deposit("7", "bob", 100)
    assert parse_request({**message, "id_msg": "7"}) == parse_request(message)
    assert parse_request({**message, "id_msg": -12}).op_id == "-12"


# --- parse_request: rejections ------------------------------------------------------------------

OK_DEPOSIT = {"TASK": "DEPOSIT", "ID": "op-1", "ACCOUNT": "alice", "AMOUNT": "1"}
OK_TRANSFER = {"TASK": "TRANSFER", "ID": "op-1", "FROM": "alice", "TO": "bob", "AMOUNT": "1"}


def with_(base: dict, **changes: object) -> dict:
    message = dict(base)
    for key, value in changes.items():
        if value is _ABSENT:
            message.pop(key, None)
        else:
            message[key] = value
    return message


_ABSENT = object()


@pytest.mark.parametrize(
    "message, code",
    [
        (with_(OK_TRANSFER, TO="alice"), "SAME_ACCOUNT"),
        ({"id_msg": "m1", "tipo": "TRANSFERENCIA", "conta_origem": "a", "conta_destino": "a", "valor": 1}, "SAME_ACCOUNT"),
        (with_(OK_DEPOSIT, ACCOUNT=""), "ACCOUNT_EMPTY"),
        (with_(OK_TRANSFER, FROM=""), "ACCOUNT_EMPTY"),
        (with_(OK_DEPOSIT, ACCOUNT="a" * (MAX_ACCOUNT_CHARS + 1)), "ACCOUNT_TOO_LONG"),
        (with_(OK_TRANSFER, TO="b" * (MAX_ACCOUNT_CHARS + 1)), "ACCOUNT_TOO_LONG"),
        (with_(OK_DEPOSIT, ACCOUNT="al ice"), "ACCOUNT_INVALID"),
        (with_(OK_DEPOSIT, ACCOUNT="álice"), "ACCOUNT_INVALID"),
        (with_(OK_DEPOSIT, ACCOUNT="alice\n"), "ACCOUNT_INVALID"),
        (with_(OK_DEPOSIT, ACCOUNT="a/b"), "ACCOUNT_INVALID"),
        ({"TASK": BALANCE, "ACCOUNT": "a;drop"}, "ACCOUNT_INVALID"),
        (with_(OK_DEPOSIT, ID=_ABSENT), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID=None), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID=""), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID=17), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID=Decimal("1.5")), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID="x" * (MAX_OP_ID_CHARS + 1)), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID="has space"), "ID_INVALID"),
        (with_(OK_DEPOSIT, ID="slash/no"), "ID_INVALID"),
        ({"id_msg": None, "tipo": "DEPOSITO", "conta_destino": "a", "valor": 1}, "ID_INVALID"),
        ({"id_msg": 7.5, "tipo": "DEPOSITO", "conta_destino": "a", "valor": 1}, "ID_INVALID"),
        ({"id_msg": True, "tipo": "DEPOSITO", "conta_destino": "a", "valor": 1}, "ID_INVALID"),
        ({"id_msg": ["m1"], "tipo": "DEPOSITO", "conta_destino": "a", "valor": 1}, "ID_INVALID"),
        ({"id_msg": 10**70, "tipo": "DEPOSITO", "conta_destino": "a", "valor": 1}, "ID_INVALID"),
        ({"TASK": "PAY", "ID": "op-1"}, "UNKNOWN_MESSAGE"),
        ({"TASK": "deposit", "ID": "op-1", "ACCOUNT": "a", "AMOUNT": 1}, "UNKNOWN_MESSAGE"),
        ({}, "UNKNOWN_MESSAGE"),
        ({"ID": "op-1", "ACCOUNT": "alice"}, "UNKNOWN_MESSAGE"),
        ({"TASK": 5}, "FIELD_TYPE"),
        ({"TASK": ["DEPOSIT"]}, "FIELD_TYPE"),
        (with_(OK_DEPOSIT, ACCOUNT=5), "FIELD_TYPE"),
        (with_(OK_TRANSFER, TO=["bob"]), "FIELD_TYPE"),
        ({"TASK": BALANCE, "ACCOUNT": "alice", "MIN_SEQ": -1}, "FIELD_TYPE"),
        ({"TASK": BALANCE, "ACCOUNT": "alice", "MIN_SEQ": "3"}, "FIELD_TYPE"),
        ({"TASK": BALANCE, "ACCOUNT": "alice", "MIN_SEQ": True}, "FIELD_TYPE"),
        ({"id_msg": "m1", "tipo": 3, "valor": 1}, "FIELD_TYPE"),
        ({"id_msg": "m1", "tipo": "PIX", "conta_destino": "a", "valor": 1}, "FIELD_INVALID"),
        (with_(OK_DEPOSIT, ACCOUNT=_ABSENT), "MISSING_FIELD"),
        (with_(OK_TRANSFER, TO=_ABSENT), "MISSING_FIELD"),
        ({"TASK": "QUERY"}, "MISSING_FIELD"),
        ({"id_msg": "m1", "tipo": "SAQUE", "valor": 1}, "MISSING_FIELD"),
        (with_(OK_DEPOSIT, AMOUNT=_ABSENT), "AMOUNT_MISSING"),
        (with_(OK_DEPOSIT, AMOUNT="1.001"), "AMOUNT_TOO_PRECISE"),
        (with_(OK_DEPOSIT, AMOUNT="0"), "AMOUNT_ZERO"),
        (with_(OK_TRANSFER, AMOUNT=True), "AMOUNT_BOOLEAN"),
    ],
)
def test_rejections(message, code):
    assert refusal(message) == code


def test_rejections_carry_a_definite_code():
    with pytest.raises(SaldoError) as caught:
        parse_request(with_(OK_TRANSFER, TO="alice"))
    assert caught.value.definite is True


# --- The rules ----------------------------------------------------------------------------------


def test_deposit_creates_the_account_and_answers_the_new_balance():
    bank = Bank()
    assert bank.balance("alice") is None
    assert bank.apply(deposit("d1", "alice", 1000)) == (Outcome(None, 1000), False)
    assert bank.apply(deposit("d2", "alice", 234)) == (Outcome(None, 1234), False)
    assert bank.balance("alice") == 1234
    bank.check_invariants()


def test_insufficient_funds_changes_nothing_and_is_remembered():
    bank = Bank()
    bank.apply(deposit("d1", "alice", 1000))
    before = dict(bank.balances)
    counters_before = bank.counters.copy()

    assert bank.apply(withdraw("w1", "alice", 1001)) == (Outcome("INSUFFICIENT_FUNDS", None), False)
    assert bank.apply(transfer("t1", "alice", "bob", 1001)) == (Outcome("INSUFFICIENT_FUNDS", None), False)
    assert bank.balances == before  # bob was not created either
    assert bank.counters.deposited_cents_total == counters_before.deposited_cents_total
    assert bank.counters.withdrawn_cents_total == counters_before.withdrawn_cents_total
    # The refusal is an outcome like any other: counted, and a retry gets it again, even once
    # the balance would cover it.
    assert bank.counters.ops_applied_total == counters_before.ops_applied_total + 2
    bank.apply(deposit("d2", "alice", 5000))
    assert bank.apply(withdraw("w1", "alice", 1001)) == (Outcome("INSUFFICIENT_FUNDS", None), True)
    assert bank.balance("alice") == 6000
    bank.check_invariants()


def test_exact_balance_can_be_withdrawn_to_zero():
    bank = Bank()
    bank.apply(deposit("d1", "alice", 1000))
    assert bank.apply(withdraw("w1", "alice", 1000)) == (Outcome(None, 0), False)
    assert bank.balance("alice") == 0
    bank.check_invariants()


def test_account_not_found():
    bank = Bank()
    assert bank.apply(withdraw("w1", "ghost", 1))[0] == Outcome("ACCOUNT_NOT_FOUND", None)
    assert bank.apply(transfer("t1", "ghost", "bob", 1))[0] == Outcome("ACCOUNT_NOT_FOUND", None)
    assert bank.balances == {}
    assert balance_reply(Query("ghost"), bank.balance("ghost"))["ERROR"] == "ACCOUNT_NOT_FOUND"


def test_transfer_moves_money_and_creates_the_destination():
    bank = Bank()
    bank.apply(deposit("d1", "alice", 1000))
    assert bank.apply(transfer("t1", "alice", "bob", 300)) == (Outcome(None, 700), False)
    assert bank.balances == {"alice": 700, "bob": 300}
    assert bank.counters.deposited_cents_total == 1000
    assert bank.counters.withdrawn_cents_total == 0
    bank.check_invariants()


def test_too_many_accounts():
    bank = Bank(max_accounts=2)
    bank.apply(deposit("d1", "a", 1000))
    bank.apply(deposit("d2", "b", 1000))
    assert bank.apply(deposit("d3", "c", 1))[0] == Outcome("TOO_MANY_ACCOUNTS", None)
    assert bank.apply(transfer("t1", "a", "c", 1))[0] == Outcome("TOO_MANY_ACCOUNTS", None)
    assert bank.balances == {"a": 1000, "b": 1000}
    # Existing accounts still work, and a transfer between them too.
    assert bank.apply(deposit("d4", "a", 1))[0] == Outcome(None, 1001)
    assert bank.apply(transfer("t2", "a", "b", 1))[0] == Outcome(None, 1000)
    bank.check_invariants()


def test_balance_limit():
    bank = Bank()
    near_full = MAX_BALANCE_CENTS - 50
    bank.restore({"rich": near_full, "other": 1000}, [], Counters(2, near_full + 1000, 0))
    assert bank.apply(deposit("d1", "rich", 51))[0] == Outcome("BALANCE_LIMIT", None)
    assert bank.apply(transfer("t1", "other", "rich", 51))[0] == Outcome("BALANCE_LIMIT", None)
    assert bank.balances == {"rich": near_full, "other": 1000}
    assert bank.apply(deposit("d2", "rich", 50))[0] == Outcome(None, MAX_BALANCE_CENTS)
    bank.check_invariants()


def test_the_dedup_window_forgets_the_oldest_id():
    bank = Bank(dedup_window_ops=3)
    for index in range(1, 5):
        bank.apply(deposit(f"d{index}", "alice", 100))
    assert bank.balance("alice") == 400
    assert {applied.op.op_id for applied in bank.recent_applied()} == {"d2", "d3", "d4"}
    assert bank.apply(deposit("d4", "alice", 100)) == (Outcome(None, 400), True)
    assert bank.apply(deposit("d2", "alice", 100)) == (Outcome(None, 200), True)
    # d1 fell out of the window: the same id applies again.
    assert bank.apply(deposit("d1", "alice", 100)) == (Outcome(None, 500), False)
    assert bank.balance("alice") == 500
    assert {applied.op.op_id for applied in bank.recent_applied()} == {"d3", "d4", "d1"}
    bank.check_invariants()


def test_a_retried_id_with_other_content_is_refused_and_changes_nothing():
    bank = Bank()
    bank.apply(deposit("x", "alice", 100))
    assert bank.apply(withdraw("x", "alice", 100)) == (Outcome("ID_REUSED", None), True)
    assert bank.balance("alice") == 100


def test_take_effects_reports_what_changed_once():
    bank = Bank()
    bank.apply(deposit("d1", "a", 100))
    bank.apply(transfer("t1", "a", "b", 40))
    bank.apply(withdraw("w1", "c", 1))  # refused: recorded, no balance changed
    applied, changed = bank.take_effects()
    assert applied == [  # applied rows, in the store's column order
        (1, "d1", None, DEPOSIT, "a", None, 100, None, 100),
        (2, "t1", None, TRANSFER, "a", "b", 40, None, 60),
        (3, "w1", None, WITHDRAW, "c", None, 1, "ACCOUNT_NOT_FOUND", None),
    ]
    assert [applied_from_row(row) for row in applied] == list(bank.recent_applied())
    assert changed == {"a": 60, "b": 40}
    assert bank.take_effects() == ([], {})
    bank.apply(deposit("d1", "a", 100))  # a duplicate is no effect
    assert bank.take_effects() == ([], {})


def test_restore_refuses_an_image_that_does_not_add_up():
    with pytest.raises(AssertionError):
        Bank().restore({"a": 100}, [], Counters(1, 50, 0))
    with pytest.raises(AssertionError):
        Bank().restore({"a": -1}, [], Counters(1, 0, 1))


def test_replies():
    assert outcome_reply(Outcome(None, 1234), "r1") == {"ID": "r1", "STATUS": "OK", "BALANCE": "12.34"}
    nok = outcome_reply(Outcome("INSUFFICIENT_FUNDS", None), "r2")
    assert nok["ID"] == "r2" and nok["STATUS"] == "NOK" and nok["ERROR"] == "INSUFFICIENT_FUNDS"
    assert nok["DEFINITE"] is True and nok["DETAIL"]
    seed = balance_reply(Query("alice", seed_000=True), 500)
    assert seed == {"STATUS": "OK", "BALANCE": "5.00", "SALDO": "5.00", "USER": "alice"}
    assert balance_reply(Query("alice"), 500, "r3") == {"ID": "r3", "STATUS": "OK", "BALANCE": "5.00"}


# --- Property: a random history, retries included ----------------------------------------------

ACCOUNTS = ["a", "b", "c", "d", "e"]
amounts = st.one_of(st.integers(min_value=1, max_value=5_000), st.just(MAX_AMOUNT_CENTS))


class Model:
    """The rules restated as simply as possible, to check the Bank's outcomes against."""

    def __init__(self, max_accounts: int) -> None:
        self.max_accounts = max_accounts
        self.balances: dict[str, int] = {}
        self.deposited = 0
        self.withdrawn = 0

    def apply(self, op: Operation) -> Outcome:
        b = self.balances
        if op.kind == DEPOSIT:
            if op.account not in b and len(b) >= self.max_accounts:
                return Outcome("TOO_MANY_ACCOUNTS", None)
            b[op.account] = b.get(op.account, 0) + op.amount_cents
            self.deposited += op.amount_cents
            return Outcome(None, b[op.account])
        if op.account not in b:
            return Outcome("ACCOUNT_NOT_FOUND", None)
        if b[op.account] < op.amount_cents:
            return Outcome("INSUFFICIENT_FUNDS", None)
        if op.kind == WITHDRAW:
            b[op.account] -= op.amount_cents
            self.withdrawn += op.amount_cents
            return Outcome(None, b[op.account])
        if op.to_account not in b and len(b) >= self.max_accounts:
            return Outcome("TOO_MANY_ACCOUNTS", None)
        b[op.account] -= op.amount_cents
        b[op.to_account] = b.get(op.to_account, 0) + op.amount_cents
        return Outcome(None, b[op.account])


class BankMachine(RuleBasedStateMachine):
    MAX_ACCOUNTS = 4  # fewer than ACCOUNTS, so TOO_MANY_ACCOUNTS happens too

    @initialize()
    def setup(self):
        self.bank = Bank(max_accounts=self.MAX_ACCOUNTS, dedup_window_ops=10_000)
        self.twin = Bank(max_accounts=self.MAX_ACCOUNTS, dedup_window_ops=10_000)  # fed the same calls
        self.model = Model(self.MAX_ACCOUNTS)
        self.history: list[tuple[Operation, Outcome]] = []  # first applications, in order
        self.ids = itertools.count(1)

    def _apply_fresh(self, op: Operation) -> None:
        expected = self.model.apply(op)
        outcome, duplicate = self.bank.apply(op)
        assert self.twin.apply(op) == (outcome, duplicate)
        assert not duplicate
        assert outcome == expected, (op, outcome, expected)
        self.history.append((op, outcome))

    def _fresh_id(self) -> str:
        return f"op-{next(self.ids)}"

    @rule(account=st.sampled_from(ACCOUNTS), cents=amounts)
    def deposit(self, account, cents):
        self._apply_fresh(deposit(self._fresh_id(), account, cents))

    @rule(account=st.sampled_from(ACCOUNTS), cents=amounts)
    def withdraw(self, account, cents):
        self._apply_fresh(withdraw(self._fresh_id(), account, cents))

    @rule(pair=st.permutations(ACCOUNTS).map(lambda p: (p[0], p[1])), cents=amounts)
    def transfer(self, pair, cents):
        self._apply_fresh(transfer(self._fresh_id(), pair[0], pair[1], cents))

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def retry_one(self, data):
        op, first = data.draw(st.sampled_from(self.history))
        self._retry([(op, first)])

    @precondition(lambda self: self.history)
    @rule(data=st.data(), cents=amounts, account=st.sampled_from(ACCOUNTS))
    def reuse_an_id_for_another_operation(self, data, cents, account):
        op, first = data.draw(st.sampled_from(self.history))
        other = withdraw(op.op_id, account, cents)
        self._retry([(other, first if other == op else Outcome("ID_REUSED", None))])

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def replay_a_prefix(self, data):
        length = data.draw(st.integers(min_value=1, max_value=len(self.history)))
        self._retry(self.history[:length])

    def _retry(self, ops: list[tuple[Operation, Outcome]]) -> None:
        before = snapshot(self.bank)
        for op, first in ops:
            assert self.bank.apply(op) == (first, True)
            assert self.twin.apply(op) == (first, True)
        assert snapshot(self.bank) == before

    @invariant()
    def money_is_conserved(self):
        if not hasattr(self, "bank"):
            return
        bank = self.bank
        assert sum(bank.balances.values()) == self.model.deposited - self.model.withdrawn
        assert bank.counters.deposited_cents_total == self.model.deposited
        assert bank.counters.withdrawn_cents_total == self.model.withdrawn
        assert bank.balances == self.model.balances
        assert all(cents >= 0 for cents in bank.balances.values())
        assert bank.counters.ops_applied_total == len(self.history)
        bank.check_invariants()

    @invariant()
    def the_twin_is_identical(self):
        if hasattr(self, "bank"):
            assert snapshot(self.twin) == snapshot(self.bank)


BankMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_bank_state_machine = BankMachine.TestCase


# --- Property: determinism of a whole sequence --------------------------------------------------

operations = st.builds(
    lambda kind, pair, cents, op_id: (
        transfer(op_id, pair[0], pair[1], cents)
        if kind == TRANSFER
        else Operation(op_id, kind, pair[0], None, cents)
    ),
    st.sampled_from([DEPOSIT, WITHDRAW, TRANSFER]),
    st.permutations(ACCOUNTS[:3]).map(lambda p: (p[0], p[1])),
    st.integers(min_value=1, max_value=3_000),
    st.sampled_from([f"id{i}" for i in range(30)]),  # few ids: many repeats
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operations, max_size=60), st.integers(min_value=1, max_value=10))
def test_two_banks_fed_the_same_sequence_end_identical(ops, window):
    first = Bank(max_accounts=2, dedup_window_ops=window)
    second = Bank(max_accounts=2, dedup_window_ops=window)
    first_outcomes = [first.apply(op, seq) for seq, op in enumerate(ops)]
    second_outcomes = [second.apply(op, seq) for seq, op in enumerate(ops)]
    assert first_outcomes == second_outcomes
    assert snapshot(first) == snapshot(second)
    assert first.take_effects() == second.take_effects()
    first.check_invariants()


@settings(max_examples=100, deadline=None)
@given(st.lists(operations, max_size=60))
def test_a_restored_bank_continues_like_the_original(ops):
    half = len(ops) // 2
    original = Bank(dedup_window_ops=1_000)
    for op in ops[:half]:
        original.apply(op)
    recent: list[AppliedOp] = list(original.recent_applied())
    restored = Bank(dedup_window_ops=1_000)
    restored.restore(dict(original.balances), recent, original.counters)
    assert [original.apply(op) for op in ops[half:]] == [restored.apply(op) for op in ops[half:]]
    assert snapshot(original) == snapshot(restored)


def test_an_id_given_to_another_operation_changes_nothing_and_says_so():
    bank = Bank(max_accounts=10, dedup_window_ops=100)
    first = Operation("op-1", DEPOSIT, "alice", None, 500)
    assert bank.apply(first) == (Outcome(None, 500), False)
    assert bank.apply(first) == (Outcome(None, 500), True)  # a retry: the first outcome
    for other in (Operation("op-1", WITHDRAW, "alice", None, 500), Operation("op-1", DEPOSIT, "bob", None, 500),
                  Operation("op-1", DEPOSIT, "alice", None, 501)):
        assert bank.apply(other) == (Outcome("ID_REUSED", None), True)
    assert bank.balances == {"alice": 500} and bank.counters.ops_applied_total == 1


def test_the_dedup_window_is_out_of_the_collectors_sight_once_a_collection_has_seen_it():
    """A full collection must not walk the window: 200,000 operations would make it a long pause."""
    import gc

    bank = Bank(dedup_window_ops=1_000)
    for index in range(1_500):
        bank.apply(transfer(f"t{index}", "alice", "bob", 1) if index else deposit("d0", "alice", 10_000), index + 1)
    gc.collect()
    assert not any(gc.is_tracked(row) for row in bank._recent.values())
    # What the window gives back is what was applied, retries included.
    assert bank.applied("t1499") == AppliedOp(1500, 1500, transfer("t1499", "alice", "bob", 1), Outcome(None, 8_501))
    assert bank.apply(transfer("t1499", "alice", "bob", 1), 1501) == (Outcome(None, 8_501), True)
    assert bank.apply(transfer("t1499", "alice", "bob", 2), 1501) == (Outcome("ID_REUSED", None), True)
    assert [a.op.op_id for a in bank.recent_applied(newest_first=True)][:2] == ["t1499", "t1498"]


def test_a_full_page_of_accounts_with_the_longest_names_and_balances_fits_on_one_line():
    from common.bank.money import MAX_BALANCE_CENTS
    from common.bank.state import MAX_ACCOUNT_CHARS, MAX_ACCOUNTS_PER_PAGE, AccountsQuery, accounts_reply

    balances = {f"{index:0{MAX_ACCOUNT_CHARS}d}": MAX_BALANCE_CENTS for index in range(MAX_ACCOUNTS_PER_PAGE + 100)}
    first = accounts_reply(balances, AccountsQuery(limit=MAX_ACCOUNTS_PER_PAGE), "page-1")
    assert len(wire.encode(first)) <= wire.MAX_LINE_BYTES
    assert len(first["ACCOUNTS"]) == MAX_ACCOUNTS_PER_PAGE and first["ACCOUNTS_TOTAL"] == len(balances)
    rest = accounts_reply(balances, AccountsQuery(after=first["NEXT_AFTER"], limit=MAX_ACCOUNTS_PER_PAGE), "page-2")
    assert len(rest["ACCOUNTS"]) == 100 and "NEXT_AFTER" not in rest
    assert [name for name, _balance in first["ACCOUNTS"] + rest["ACCOUNTS"]] == sorted(balances)
