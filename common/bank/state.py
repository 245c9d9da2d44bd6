"""The bank state machine: accounts, operations, exactly-once apply. No I/O.

Owns the rules every replica must agree on. `Bank.apply(op)` is deterministic: the same operations
in the same order give the same balances and the same outcomes on every replica. Each operation
carries an id chosen by the client; applying an id a second time changes nothing and returns the
first outcome, so a client may retry an operation whose outcome it does not know.

Operations:
- DEPOSIT account amount: creates the account if it does not exist.
- WITHDRAW account amount: INSUFFICIENT_FUNDS (and no change) when the balance is short.
- TRANSFER from to amount: INSUFFICIENT_FUNDS when the source is short; creates the destination.
- BALANCE account: a query; never recorded, never changes anything.

Outcomes that depend on the state (INSUFFICIENT_FUNDS, ACCOUNT_NOT_FOUND, BALANCE_LIMIT,
TOO_MANY_ACCOUNTS) are recorded like successes: a retry returns them again. Input that is wrong in
itself (amounts, names, a transfer to the same account) is rejected by `parse_request` before it
reaches the state machine, and never recorded.

Limits: at most `max_accounts` accounts; balances within [0, MAX_BALANCE_CENTS]; the ids of the
last `dedup_window_ops` applied operations are remembered (memory and disk stay bounded), so a retry
is recognised while its id is among them.

Invariant (asserted by `check_invariants`): the sum of balances equals the cents deposited minus the
cents withdrawn, over every operation ever applied. Transfers move money and never create it.

The messages this module reads are saldo's own and the seeds':
    {"TASK": "DEPOSIT", "ID": "<op id>", "ACCOUNT": "alice", "AMOUNT": "12.34"}
    {"TASK": "WITHDRAW", "ID": "<op id>", "ACCOUNT": "alice", "AMOUNT": "5"}
    {"TASK": "TRANSFER", "ID": "<op id>", "FROM": "alice", "TO": "bob", "AMOUNT": "1.50"}
    {"TASK": "BALANCE", "ACCOUNT": "alice", "MIN_SEQ": 42}           (MIN_SEQ optional)
    {"TASK": "QUERY", "USER": "alice"}                                 (seed 000; answered with SALDO)
    {"TASK": "ACCOUNTS", "AFTER": "alice", "LIMIT": 500}              (every account and balance, a page
                                                                       at a time in name order; AFTER, LIMIT
                                                                       and MIN_SEQ optional)
    {"id_msg": "<uuid>", "tipo": "DEPOSITO"|"SAQUE"|"TRANSFERENCIA",
     "conta_origem": ..., "conta_destino": ..., "valor": 10.5}        (seed 002's Operacao)

Seed 002 declares `id_msg` a UUID string, and its users also send numbers: an integer id_msg is the
operation id written in decimal (7 and "7" name the same operation). Every reply to an Operacao
echoes its id_msg as it came (common/bank/errors.py, with_id_msg).
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from common.bank.errors import SaldoError, error_reply
from common.bank.money import MAX_AMOUNT_CENTS, MAX_BALANCE_CENTS, parse_amount_cents, render_cents
from common.transport.wire import MAX_LINE_BYTES

MAX_ACCOUNT_CHARS = 64
MAX_OP_ID_CHARS = 64
DEFAULT_MAX_ACCOUNTS = 1_000_000
DEFAULT_DEDUP_WINDOW_OPS = 200_000

DEPOSIT = "DEPOSIT"
WITHDRAW = "WITHDRAW"
TRANSFER = "TRANSFER"
BALANCE = "BALANCE"
OPERATION_KINDS = (DEPOSIT, WITHDRAW, TRANSFER)

# A plain character set: names and ids never need escaping in a log line or a JSON template.
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_.@-]{1,%d}" % MAX_ACCOUNT_CHARS)
OP_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,%d}" % MAX_OP_ID_CHARS)

_SEED_002_KINDS = {"DEPOSITO": DEPOSIT, "SAQUE": WITHDRAW, "TRANSFERENCIA": TRANSFER}


class Operation(NamedTuple):
    """A state-changing operation. `account` is the source of a TRANSFER; `to_account` its target.

    A tuple, because a replica builds tens of thousands per second; `check_operation` asserts its
    shape wherever one enters the state machine."""

    op_id: str
    kind: str
    account: str
    to_account: str | None
    amount_cents: int


def check_operation(op: Operation) -> None:
    assert op.kind in OPERATION_KINDS, op.kind
    assert type(op.amount_cents) is int and op.amount_cents > 0, op.amount_cents
    assert (op.to_account is not None) == (op.kind == TRANSFER), op
    assert op.to_account != op.account, op


@dataclass(frozen=True, slots=True)
class Query:
    """A balance read. `min_seq`: the reader must have applied at least this sequence number."""

    account: str
    min_seq: int | None = None
    seed_000: bool = False  # asked as {"TASK": "QUERY", "USER": ...}: answer with SALDO too


@dataclass(frozen=True, slots=True)
class AccountsQuery:
    """A read of every account and balance, a page at a time, in name order: the accounts named
    after `after` (from the first without it), at most `limit` of them."""

    after: str | None = None
    limit: int = 0
    min_seq: int | None = None


# An ACCOUNTS reply must fit on a client port's line (wire.MAX_LINE_BYTES, 64 KiB): an entry is at
# most ["<64 characters>","1000000000000.00"], and a page of 500 of them about 44 KB.
MAX_ACCOUNTS_PER_PAGE = 500
MAX_ACCOUNT_ENTRY_BYTES = MAX_ACCOUNT_CHARS + len(render_cents(MAX_BALANCE_CENTS)) + len('["","",')
assert MAX_ACCOUNTS_PER_PAGE * MAX_ACCOUNT_ENTRY_BYTES + 1024 <= MAX_LINE_BYTES


class Outcome(NamedTuple):
    """What applying an operation decided. `error` is None on success; `balance_cents` is the
    balance of `account` after the operation (the source, for a transfer), or None on error."""

    error: str | None
    balance_cents: int | None

    @property
    def ok(self) -> bool:
        return self.error is None


# Hot paths build these tuples without the generated __new__ (half the cost, same objects).
_tuple_new = tuple.__new__
# The outcomes that carry no balance are the same every time: one object each.
_OUTCOME_TOO_MANY_ACCOUNTS = Outcome("TOO_MANY_ACCOUNTS", None)
_OUTCOME_BALANCE_LIMIT = Outcome("BALANCE_LIMIT", None)
_OUTCOME_ACCOUNT_NOT_FOUND = Outcome("ACCOUNT_NOT_FOUND", None)
_OUTCOME_INSUFFICIENT_FUNDS = Outcome("INSUFFICIENT_FUNDS", None)
_OUTCOME_ID_REUSED = Outcome("ID_REUSED", None)


# --- Parsing requests ---------------------------------------------------------------------------


def check_account(name: object, field: str = "ACCOUNT") -> str:
    if name is None:
        raise SaldoError("MISSING_FIELD", f"{field} is required")
    if type(name) is not str:
        raise SaldoError("FIELD_TYPE", f"{field} must be a string")
    if not name:
        raise SaldoError("ACCOUNT_EMPTY", f"{field} is empty")
    if len(name) > MAX_ACCOUNT_CHARS:
        raise SaldoError("ACCOUNT_TOO_LONG", f"{field} is longer than {MAX_ACCOUNT_CHARS} characters")
    if ACCOUNT_RE.fullmatch(name) is None:
        raise SaldoError("ACCOUNT_INVALID", f"{field} may use only A-Z a-z 0-9 _ . @ -")
    return name


def check_op_id(op_id: object, field: str = "ID") -> str:
    if op_id is None:
        raise SaldoError("ID_INVALID", f"{field} (the operation id) is required")
    if type(op_id) is not str:
        raise SaldoError("ID_INVALID", f"{field} must be a string, such as a UUID")
    if not op_id or len(op_id) > MAX_OP_ID_CHARS:
        raise SaldoError("ID_INVALID", f"{field} must have 1 to {MAX_OP_ID_CHARS} characters")
    if OP_ID_RE.fullmatch(op_id) is None:
        raise SaldoError("ID_INVALID", f"{field} may use only A-Z a-z 0-9 _ . : -")
    return op_id


def _check_min_seq(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise SaldoError("FIELD_TYPE", "MIN_SEQ must be a non-negative integer")
    return value


def make_operation(op_id: object, kind: str, account: object, to_account: object, amount: object) -> Operation:
    """Validate the parts of an operation (raising SaldoError) and build it."""
    op_id = check_op_id(op_id)
    amount_cents = parse_amount_cents(amount)
    if kind == TRANSFER:
        source = check_account(account, "FROM")
        target = check_account(to_account, "TO")
        if source == target:
            raise SaldoError("SAME_ACCOUNT", "FROM and TO are the same account")
        return Operation(op_id, kind, source, target, amount_cents)
    return Operation(op_id, kind, check_account(account), None, amount_cents)


def seed_op_id(id_msg: object) -> str:
    """The operation id of seed 002's id_msg: a string as it is, an integer as its decimal string."""
    if type(id_msg) is int:
        id_msg = str(id_msg)
    elif id_msg is not None and type(id_msg) is not str:
        raise SaldoError("ID_INVALID", "id_msg must be a string (such as a UUID) or an integer")
    return check_op_id(id_msg, "id_msg")


def parse_request(message: dict) -> Operation | Query:
    """Read a bank request in any of the accepted formats; raise SaldoError if it is not one."""
    task = message.get("TASK")
    if task is not None:
        if type(task) is not str:
            raise SaldoError("FIELD_TYPE", "TASK must be a string")
        if task == TRANSFER:
            return make_operation(message.get("ID"), TRANSFER, message.get("FROM"), message.get("TO"), message.get("AMOUNT"))
        if task == DEPOSIT or task == WITHDRAW:
            return make_operation(message.get("ID"), task, message.get("ACCOUNT"), None, message.get("AMOUNT"))
        if task == BALANCE:
            return Query(check_account(message.get("ACCOUNT")), _check_min_seq(message.get("MIN_SEQ")))
        if task == "QUERY":
            return Query(check_account(message.get("USER"), "USER"), _check_min_seq(message.get("MIN_SEQ")), seed_000=True)
        raise SaldoError("UNKNOWN_MESSAGE", f"unknown TASK {task[:40]!r}")
    kind_pt = message.get("tipo")
    if kind_pt is not None:
        if type(kind_pt) is not str:
            raise SaldoError("FIELD_TYPE", "tipo must be a string")
        kind = _SEED_002_KINDS.get(kind_pt)
        if kind is None:
            raise SaldoError("FIELD_INVALID", "tipo must be DEPOSITO, SAQUE or TRANSFERENCIA")
        source = message.get("conta_origem")
        target = message.get("conta_destino")
        op_id = seed_op_id(message.get("id_msg"))
        if kind == DEPOSIT:  # money arrives at the destination; accept the origin if that is all there is
            return make_operation(op_id, kind, target if target is not None else source, None, message.get("valor"))
        if kind == WITHDRAW:
            return make_operation(op_id, kind, source if source is not None else target, None, message.get("valor"))
        return make_operation(op_id, kind, source, target, message.get("valor"))
    raise SaldoError("UNKNOWN_MESSAGE", "expected TASK (DEPOSIT, WITHDRAW, TRANSFER, BALANCE, QUERY) or an Operacao")


def parse_accounts_request(message: dict) -> AccountsQuery:
    """Read {"TASK": "ACCOUNTS", "AFTER": name, "LIMIT": n, "MIN_SEQ": seq}; raise SaldoError if
    it is not one."""
    after = message.get("AFTER")
    if after is not None:
        after = check_account(after, "AFTER")
    limit = message.get("LIMIT", MAX_ACCOUNTS_PER_PAGE)
    if type(limit) is not int:
        raise SaldoError("FIELD_TYPE", "LIMIT must be an integer")
    if not 1 <= limit <= MAX_ACCOUNTS_PER_PAGE:
        raise SaldoError("FIELD_INVALID", f"LIMIT must be 1 to {MAX_ACCOUNTS_PER_PAGE} (a page fits on one line)")
    return AccountsQuery(after, limit, _check_min_seq(message.get("MIN_SEQ")))


def parse_replica_request(message: dict) -> Operation | Query | AccountsQuery:
    """What a replica's client port reads: parse_request's requests, and ACCOUNTS."""
    if message.get("TASK") == "ACCOUNTS":
        return parse_accounts_request(message)
    return parse_request(message)


# The canonical form of saldo's own requests, as common/transport/client.operation_line writes
# them: one regular expression recognises and validates a whole line without building a dict (a
# replica's hot path). Anything else, including every other spelling of the same request, goes through the JSON
# decoder and parse_request; both give the same Operation for the same request (a test checks it).
_ID = rb"([A-Za-z0-9_.:-]{1,%d})" % MAX_OP_ID_CHARS
_NAME = rb"([A-Za-z0-9_.@-]{1,%d})" % MAX_ACCOUNT_CHARS
_AMOUNT = rb'"AMOUNT":"([0-9]{1,13})\.([0-9]{2})"'
_CANONICAL_TRANSFER = re.compile(
    rb'\{"TASK":"TRANSFER","ID":"' + _ID + rb'","FROM":"' + _NAME + rb'","TO":"' + _NAME + rb'",' + _AMOUNT + rb"\}[ \t\r]*"
)
_CANONICAL_SINGLE = re.compile(
    rb'\{"TASK":"(DEPOSIT|WITHDRAW)","ID":"' + _ID + rb'","ACCOUNT":"' + _NAME + rb'",' + _AMOUNT + rb"\}[ \t\r]*"
)


def parse_request_line(line: bytes) -> Operation | None:
    """The Operation of a line in saldo's canonical request form, or None: then decode the line and
    use parse_request (which also produces every error reply)."""
    match = _CANONICAL_TRANSFER.fullmatch(line)
    if match is not None:
        op_id, source, target, whole, fraction = match.groups()
        cents = int(whole) * 100 + int(fraction)
        if source == target or not 0 < cents <= MAX_AMOUNT_CENTS:
            return None
        return _tuple_new(Operation, (op_id.decode(), TRANSFER, source.decode(), target.decode(), cents))
    match = _CANONICAL_SINGLE.fullmatch(line)
    if match is not None:
        kind, op_id, account, whole, fraction = match.groups()
        cents = int(whole) * 100 + int(fraction)
        if not 0 < cents <= MAX_AMOUNT_CENTS:
            return None
        return _tuple_new(Operation, (op_id.decode(), DEPOSIT if kind == b"DEPOSIT" else WITHDRAW, account.decode(), None, cents))
    return None


_CANONICAL_BALANCE = re.compile(rb'\{"TASK":"BALANCE","ID":"' + _ID + rb'","ACCOUNT":"' + _NAME + rb'"\}[ \t\r]*')


def parse_balance_line(line: bytes) -> tuple[str, str] | None:
    """(request id, account) of a balance read in saldo's canonical form (common/transport/client.balance_line
    without MIN_SEQ), or None: then decode the line and use parse_request."""
    match = _CANONICAL_BALANCE.fullmatch(line)
    if match is None:
        return None
    request_id, account = match.groups()
    return request_id.decode(), account.decode()


# --- Rendering outcomes -------------------------------------------------------------------------


def outcome_reply(outcome: Outcome, request_id: object = None, **extra: object) -> dict:
    """The reply to an applied operation: {"STATUS": "OK", "BALANCE": "12.34"} or a NOK."""
    reply: dict = {}
    if request_id is not None:
        reply["ID"] = request_id
    if outcome.error is None:
        reply["STATUS"] = "OK"
        assert outcome.balance_cents is not None
        reply["BALANCE"] = render_cents(outcome.balance_cents)
    else:
        reply.update(error_reply(outcome.error))
    reply.update(extra)
    return reply


def balance_reply(query: Query, balance_cents: int | None, request_id: object = None, **extra: object) -> dict:
    if balance_cents is None:
        reply = error_reply("ACCOUNT_NOT_FOUND", f"no account {query.account}", request_id)
        if query.seed_000:
            reply["TASK"] = "QUERY"
        reply.update(extra)
        return reply
    reply = {} if request_id is None else {"ID": request_id}
    reply["STATUS"] = "OK"
    reply["BALANCE"] = render_cents(balance_cents)
    if query.seed_000:
        reply["SALDO"] = reply["BALANCE"]
        reply["USER"] = query.account
    reply.update(extra)
    return reply


def accounts_reply(balances: dict[str, int], query: AccountsQuery, request_id: object = None, **extra: object) -> dict:
    """One page of every account and balance: ACCOUNTS [[name, balance], ...] in name order,
    ACCOUNTS_TOTAL, and NEXT_AFTER (the AFTER of the next page) when more follow. It walks every
    account once (no index is kept for a read made by hand): O(accounts) per page."""
    after = query.after
    names = heapq.nsmallest(query.limit + 1, balances if after is None else (name for name in balances if name > after))
    page = names[:query.limit]
    reply = {} if request_id is None else {"ID": request_id}
    reply["STATUS"] = "OK"
    reply["ACCOUNTS"] = [[name, render_cents(balances[name])] for name in page]
    reply["ACCOUNTS_TOTAL"] = len(balances)
    if len(names) > query.limit:
        reply["NEXT_AFTER"] = page[-1]
    reply.update(extra)
    return reply


def read_reply(bank: "Bank", query: Query | AccountsQuery, request_id: object = None, **extra: object) -> dict:
    """The reply to a read (a balance, or a page of ACCOUNTS) from `bank` as it is now."""
    if isinstance(query, AccountsQuery):
        return accounts_reply(bank.balances, query, request_id, **extra)
    return balance_reply(query, bank.balance(query.account), request_id, **extra)


# --- The state machine --------------------------------------------------------------------------


class AppliedOp(NamedTuple):
    """One applied operation as persisted: its position in this bank's apply order, the sequence
    number the orderer gave it (None without an orderer), and the outcome."""

    apply_index: int
    seq: int | None
    op: Operation
    outcome: Outcome


@dataclass(slots=True)
class Counters:
    """Totals over every operation ever applied; persisted with the balances they explain."""

    ops_applied_total: int = 0
    deposited_cents_total: int = 0
    withdrawn_cents_total: int = 0

    def copy(self) -> "Counters":
        return Counters(self.ops_applied_total, self.deposited_cents_total, self.withdrawn_cents_total)


# An applied row: one applied operation as one flat tuple of plain values, in the store's column
# order (sql/schema.sql, applied_ops):
#     (apply_index, op_id, seq, kind, account, to_account, amount_cents, error, balance_cents)
# The dedup window keeps these, and take_effects() hands them to the store as they are. Not an
# AppliedOp: CPython's collector stops tracking a plain tuple of strings and numbers the first time
# a collection sees it, but it tracks a NamedTuple for as long as it lives. A window of 200,000
# AppliedOps (600,000 objects with their Operation and Outcome) made every collection that reached
# them a pause of 10 to 90 ms, most of a loaded replica's p99 latency. And a row is one object per
# operation where an AppliedOp is three.
_ROW_OP_FIELDS = slice(3, 7)  # kind, account, to_account, amount_cents: a retry must match them
_ROW_ERROR, _ROW_BALANCE = 7, 8


def applied_row(applied: AppliedOp) -> tuple:
    """The applied row of an AppliedOp (see above)."""
    op, outcome = applied.op, applied.outcome
    return (applied.apply_index, op.op_id, applied.seq, op.kind, op.account, op.to_account, op.amount_cents,
            outcome.error, outcome.balance_cents)


def applied_from_row(row: tuple | list) -> AppliedOp:
    """The AppliedOp of an applied row (a tuple, or a list as JSON gives it back)."""
    apply_index, op_id, seq, kind, account, to_account, amount_cents, error, balance_cents = row
    return AppliedOp(apply_index, seq, Operation(op_id, kind, account, to_account, amount_cents),
                     Outcome(error, balance_cents))


class Bank:
    """Balances plus the recent applied ids; apply() is the only way to change them."""

    def __init__(
        self,
        *,
        max_accounts: int = DEFAULT_MAX_ACCOUNTS,
        dedup_window_ops: int = DEFAULT_DEDUP_WINDOW_OPS,
    ) -> None:
        assert max_accounts > 0 and dedup_window_ops > 0
        self.max_accounts = max_accounts
        self.dedup_window_ops = dedup_window_ops
        self.balances: dict[str, int] = {}
        # op id -> its applied row for the last dedup_window_ops applied, oldest first;
        # `_recent_order` has the same ids, so forgetting the oldest is O(1).
        self._recent: dict[str, tuple] = {}
        self._recent_order: deque[str] = deque()
        self.counters = Counters()
        # Accounts that exist in the store but are not held here (a Bank over a slice; see for_slice).
        self._other_accounts = 0
        # What changed since the last take_effects(): for the store to persist (applied rows).
        self._new_applied: list[tuple] = []
        self._dirty_accounts: set[str] = set()

    # Loading a persisted image (store load or state transfer).
    def restore(self, balances: dict[str, int], recent: list[AppliedOp], counters: Counters) -> None:
        assert not self.balances and not self._recent, "restore into an empty bank"
        self.balances = dict(balances)
        for applied in recent[-self.dedup_window_ops :]:
            self._recent[applied.op.op_id] = applied_row(applied)
            self._recent_order.append(applied.op.op_id)
        self.counters = counters.copy()
        self.check_invariants()

    @classmethod
    def for_slice(
        cls,
        balances: dict[str, int],
        recent: list[AppliedOp],
        counters: Counters,
        *,
        other_accounts: int,
        max_accounts: int,
        dedup_window_ops: int,
    ) -> "Bank":
        """A Bank over the part of a shared store that a batch touches: its accounts, the earlier
        outcomes of its ids, and the counters. Money conservation holds for the whole store, not
        for the slice, so it is not checked here."""
        assert other_accounts >= 0
        bank = cls(max_accounts=max_accounts, dedup_window_ops=dedup_window_ops)
        bank.balances = dict(balances)
        bank._other_accounts = other_accounts
        for applied in recent:
            bank._recent[applied.op.op_id] = applied_row(applied)
            bank._recent_order.append(applied.op.op_id)
        bank.counters = counters.copy()
        return bank

    def balance(self, account: str) -> int | None:
        return self.balances.get(account)

    def applied_outcome(self, op_id: str) -> Outcome | None:
        row = self._recent.get(op_id)
        return None if row is None else Outcome(row[_ROW_ERROR], row[_ROW_BALANCE])

    def applied(self, op_id: str) -> AppliedOp | None:
        """The operation applied under `op_id`, while the dedup window remembers it."""
        row = self._recent.get(op_id)
        return None if row is None else applied_from_row(row)

    def recent_applied(self, *, newest_first: bool = False) -> Iterator[AppliedOp]:
        """The operations the dedup window remembers, in apply order (or the reverse)."""
        rows = reversed(self._recent.values()) if newest_first else iter(self._recent.values())
        for row in rows:
            yield applied_from_row(row)

    def apply(self, op: Operation, seq: int | None = None) -> tuple[Outcome, bool]:
        """Apply `op` once. Returns (outcome, duplicate): a duplicate id changes nothing and
        returns the outcome recorded the first time, or ID_REUSED when the id named another
        operation (a retry is the same operation; telling a withdrawal that a deposit under its id
        succeeded would be a lie)."""
        op_id, kind, account, to_account, amount_cents = op
        earlier = self._recent.get(op_id)
        if earlier is not None:
            if earlier[_ROW_OP_FIELDS] != (kind, account, to_account, amount_cents):
                return _OUTCOME_ID_REUSED, True
            return _tuple_new(Outcome, (earlier[_ROW_ERROR], earlier[_ROW_BALANCE])), True
        assert amount_cents > 0 and (to_account is None) == (kind != TRANSFER), op
        outcome = self._decide_and_change(op)
        counters = self.counters
        counters.ops_applied_total += 1
        row = (counters.ops_applied_total, op_id, seq, kind, account, to_account, amount_cents, outcome[0], outcome[1])
        self._recent[op_id] = row
        self._recent_order.append(op_id)
        self._new_applied.append(row)
        if len(self._recent_order) > self.dedup_window_ops:
            del self._recent[self._recent_order.popleft()]
        return outcome, False

    def _decide_and_change(self, op: Operation) -> Outcome:
        balances = self.balances
        kind = op.kind
        amount = op.amount_cents
        if kind == DEPOSIT:
            current = balances.get(op.account)
            if current is None:
                if len(balances) + self._other_accounts >= self.max_accounts:
                    return _OUTCOME_TOO_MANY_ACCOUNTS
                current = 0
            if current + amount > MAX_BALANCE_CENTS:
                return _OUTCOME_BALANCE_LIMIT
            balances[op.account] = current + amount
            self._dirty_accounts.add(op.account)
            self.counters.deposited_cents_total += amount
            return _tuple_new(Outcome, (None, current + amount))
        if kind == WITHDRAW:
            current = balances.get(op.account)
            if current is None:
                return _OUTCOME_ACCOUNT_NOT_FOUND
            if current < amount:
                return _OUTCOME_INSUFFICIENT_FUNDS
            balances[op.account] = current - amount
            self._dirty_accounts.add(op.account)
            self.counters.withdrawn_cents_total += amount
            return _tuple_new(Outcome, (None, current - amount))
        assert kind == TRANSFER
        source = balances.get(op.account)
        if source is None:
            return _OUTCOME_ACCOUNT_NOT_FOUND
        if source < amount:
            return _OUTCOME_INSUFFICIENT_FUNDS
        target = balances.get(op.to_account)  # type: ignore[arg-type]
        if target is None:
            if len(balances) + self._other_accounts >= self.max_accounts:
                return _OUTCOME_TOO_MANY_ACCOUNTS
            target = 0
        if target + amount > MAX_BALANCE_CENTS:
            return _OUTCOME_BALANCE_LIMIT
        balances[op.account] = source - amount
        balances[op.to_account] = target + amount  # type: ignore[index]
        self._dirty_accounts.add(op.account)
        self._dirty_accounts.add(op.to_account)  # type: ignore[arg-type]
        return _tuple_new(Outcome, (None, source - amount))

    def take_effects(self) -> tuple[list[tuple], dict[str, int]]:
        """What changed since the last call: the applied rows in apply order, and the changed
        balances."""
        applied, self._new_applied = self._new_applied, []
        dirty, self._dirty_accounts = self._dirty_accounts, set()
        balances = self.balances
        changed = {account: balances[account] for account in dirty}
        for account, cents in changed.items():
            assert 0 <= cents <= MAX_BALANCE_CENTS, (account, cents)
        return applied, changed

    def check_invariants(self) -> None:
        """Assert what money depends on; O(accounts), so callers run it at load and in tests."""
        counters = self.counters
        total = 0
        for account, cents in self.balances.items():
            assert type(cents) is int and 0 <= cents <= MAX_BALANCE_CENTS, (account, cents)
            total += cents
        assert total == counters.deposited_cents_total - counters.withdrawn_cents_total, (
            "money is not conserved",
            total,
            counters.deposited_cents_total,
            counters.withdrawn_cents_total,
        )
        assert len(self.balances) <= self.max_accounts
        assert len(self._recent) == len(self._recent_order) <= self.dedup_window_ops
        assert len(self._recent) <= counters.ops_applied_total


def describe(op: Operation) -> str:
    """A short human form, for logs: 'TRANSFER alice->bob 1.50'."""
    if op.kind == TRANSFER:
        return f"TRANSFER {op.account}->{op.to_account} {render_cents(op.amount_cents)}"
    return f"{op.kind} {op.account} {render_cents(op.amount_cents)}"
