"""State transfer: a replica's whole state as a stream of lines, and back.

Owns the snapshot messages that a replica sends a peer that has fallen too far behind to catch up
from a log (sequencer architecture) or that rejoins after a failover (primary-backup):

    {"TASK": "SNAPSHOT_BEGIN", "ID": .., "META": {"last_applied_seq": 9001, ...},
     "COUNTERS": [ops_applied_total, deposited_cents_total, withdrawn_cents_total],
     "ACCOUNTS": 8, "APPLIED": 20000}
    {"TASK": "SNAPSHOT_ACCOUNTS", "ITEMS": [["alice", 12050], ...]}                    (chunks)
    {"TASK": "SNAPSHOT_APPLIED", "ITEMS": [[apply_index, op_id, seq, kind, account,
                                           to_account, amount_cents, error, balance_cents], ...]}
    {"TASK": "SNAPSHOT_END", "ID": ..}

Chunks are cut by size: every line stays under SNAPSHOT_LINE_MAX_BYTES, half the 64 KiB line
limit, whatever the lengths of the names and ids in it. The receiver checks every field, the
counts announced at the start, and the Bank's invariants (money explained by the counters) before
it installs anything: a bad or partial snapshot changes nothing.
"""

from __future__ import annotations

from common.bank.errors import ERROR_CODES, SaldoError
from common.bank.money import MAX_AMOUNT_CENTS, MAX_BALANCE_CENTS
from common.bank.state import (
    ACCOUNT_RE,
    MAX_ACCOUNT_CHARS,
    OP_ID_RE,
    OPERATION_KINDS,
    AppliedOp,
    Bank,
    Counters,
    Operation,
    Outcome,
)
from common.storage.store import COUNTER_NAMES, MAX_META_NAME_CHARS, StoreImage
from common.transport import wire

# A line holds as many items as fit in this many bytes (a count alone would not do: 250 applied
# operations with 64-character ids and names make more than 64 KiB).
SNAPSHOT_LINE_MAX_BYTES = wire.MAX_LINE_BYTES // 2
MAX_SNAPSHOT_ACCOUNTS = 10_000_000
MAX_SNAPSHOT_APPLIED = 10_000_000
MAX_SNAPSHOT_META_ENTRIES = 64


def image_to_lines(image: StoreImage, request_id: object = None) -> list[bytes]:
    counters = image.counters
    lines = [wire.encode({
        "TASK": "SNAPSHOT_BEGIN",
        "ID": request_id,
        "META": image.meta,
        "COUNTERS": [counters.ops_applied_total, counters.deposited_cents_total, counters.withdrawn_cents_total],
        "ACCOUNTS": len(image.balances),
        "APPLIED": len(image.recent),
    })]
    lines += _item_lines("SNAPSHOT_ACCOUNTS", ([name, cents] for name, cents in image.balances.items()))
    lines += _item_lines("SNAPSHOT_APPLIED", (
        [applied.apply_index, applied.op.op_id, applied.seq, applied.op.kind, applied.op.account,
         applied.op.to_account, applied.op.amount_cents, applied.outcome.error, applied.outcome.balance_cents]
        for applied in image.recent
    ))
    lines.append(wire.encode({"TASK": "SNAPSHOT_END", "ID": request_id}))
    return lines


def _item_lines(task: str, items) -> list[bytes]:
    """`{"TASK": task, "ITEMS": [...]}` lines, each under SNAPSHOT_LINE_MAX_BYTES."""
    head = b'{"TASK":"' + task.encode("ascii") + b'","ITEMS":['
    budget_bytes = SNAPSHOT_LINE_MAX_BYTES - len(head) - len(b"]}\n")
    lines: list[bytes] = []
    chunk: list[bytes] = []
    chunk_bytes = 0
    for item in items:
        encoded = wire.encode_value(item)
        assert len(encoded) < budget_bytes, (task, len(encoded))  # names and ids are bounded far below
        if chunk and chunk_bytes + len(encoded) + 1 > budget_bytes:
            lines.append(head + b",".join(chunk) + b"]}\n")
            chunk, chunk_bytes = [], 0
        chunk.append(encoded)
        chunk_bytes += len(encoded) + 1
    if chunk:
        lines.append(head + b",".join(chunk) + b"]}\n")
    return lines


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise SaldoError("FIELD_INVALID", f"snapshot: {what} out of range")
    return value


class SnapshotReader:
    """Feed it the snapshot's messages in order; `done` once SNAPSHOT_END arrived; `image()`."""

    def __init__(self) -> None:
        self._meta: dict[str, int] | None = None
        self._counters: Counters | None = None
        self._expected_accounts = 0
        self._expected_applied = 0
        self._balances: dict[str, int] = {}
        self._recent: list[AppliedOp] = []
        self.done = False

    def feed(self, message: dict) -> None:
        task = message.get("TASK")
        if task == "SNAPSHOT_BEGIN":
            if self._meta is not None:
                raise SaldoError("FIELD_INVALID", "snapshot: a second SNAPSHOT_BEGIN")
            meta = message.get("META")
            counters = message.get("COUNTERS")
            if type(meta) is not dict or not all(type(k) is str and type(v) is int for k, v in meta.items()):
                raise SaldoError("FIELD_TYPE", "snapshot: META must map names to integers")
            # What the store can hold, and never the counters (they travel in COUNTERS, checked
            # against the balances; a META entry would overwrite them on disk).
            if len(meta) > MAX_SNAPSHOT_META_ENTRIES:
                raise SaldoError("FIELD_INVALID", f"snapshot: more than {MAX_SNAPSHOT_META_ENTRIES} META entries")
            for name, value in meta.items():
                if not 0 < len(name) <= MAX_META_NAME_CHARS or name in COUNTER_NAMES:
                    raise SaldoError("FIELD_INVALID", f"snapshot: META name {name[:64]!r} is not allowed")
                _int(value, -(2**63), 2**63 - 1, "a META value")
            if type(counters) is not list or len(counters) != 3:
                raise SaldoError("FIELD_TYPE", "snapshot: COUNTERS must be three integers")
            self._counters = Counters(*(_int(c, 0, 2**62, "a counter") for c in counters))
            self._meta = dict(meta)
            self._expected_accounts = _int(message.get("ACCOUNTS"), 0, MAX_SNAPSHOT_ACCOUNTS, "ACCOUNTS")
            self._expected_applied = _int(message.get("APPLIED"), 0, MAX_SNAPSHOT_APPLIED, "APPLIED")
            return
        if self._meta is None:
            raise SaldoError("FIELD_INVALID", "snapshot: SNAPSHOT_BEGIN first")
        items = message.get("ITEMS")
        if task == "SNAPSHOT_ACCOUNTS":
            if type(items) is not list:
                raise SaldoError("FIELD_TYPE", "snapshot: ITEMS must be a list")
            for item in items:
                if type(item) is not list or len(item) != 2 or type(item[0]) is not str or ACCOUNT_RE.fullmatch(item[0]) is None:
                    raise SaldoError("FIELD_INVALID", "snapshot: an account is [name, cents]")
                self._balances[item[0]] = _int(item[1], 0, MAX_BALANCE_CENTS, "a balance")
            if len(self._balances) > self._expected_accounts:
                raise SaldoError("FIELD_INVALID", "snapshot: more accounts than announced")
        elif task == "SNAPSHOT_APPLIED":
            if type(items) is not list:
                raise SaldoError("FIELD_TYPE", "snapshot: ITEMS must be a list")
            for item in items:
                self._recent.append(self._applied(item))
            if len(self._recent) > self._expected_applied:
                raise SaldoError("FIELD_INVALID", "snapshot: more applied operations than announced")
        elif task == "SNAPSHOT_END":
            if len(self._balances) != self._expected_accounts or len(self._recent) != self._expected_applied:
                raise SaldoError("FIELD_INVALID", "snapshot: fewer items than announced")
            self.done = True
        else:
            raise SaldoError("UNKNOWN_MESSAGE", f"snapshot: unexpected {str(task)[:40]}")

    @staticmethod
    def _applied(item: object) -> AppliedOp:
        if type(item) is not list or len(item) != 9:
            raise SaldoError("FIELD_INVALID", "snapshot: an applied operation has 9 fields")
        apply_index, op_id, seq, kind, account, to_account, amount, error, balance = item
        if type(op_id) is not str or OP_ID_RE.fullmatch(op_id) is None or kind not in OPERATION_KINDS:
            raise SaldoError("FIELD_INVALID", "snapshot: bad operation id or kind")
        for name in (account,) + ((to_account,) if kind == "TRANSFER" else ()):
            if type(name) is not str or len(name) > MAX_ACCOUNT_CHARS or ACCOUNT_RE.fullmatch(name) is None:
                raise SaldoError("FIELD_INVALID", "snapshot: bad account name")
        if (to_account is not None) != (kind == "TRANSFER") or to_account == account:
            raise SaldoError("FIELD_INVALID", "snapshot: bad transfer target")
        if error is not None and error not in ERROR_CODES:
            raise SaldoError("FIELD_INVALID", "snapshot: bad outcome")
        return AppliedOp(
            _int(apply_index, 1, 2**62, "apply_index"),
            None if seq is None else _int(seq, 1, 2**62, "seq"),
            Operation(op_id, kind, account, to_account, _int(amount, 1, MAX_AMOUNT_CENTS, "amount")),
            Outcome(error, None if balance is None else _int(balance, 0, MAX_BALANCE_CENTS, "balance")),
        )

    def image(self, *, max_accounts: int, dedup_window_ops: int) -> StoreImage:
        """The received state, checked: a Bank restored from it must hold its invariants."""
        assert self.done and self._meta is not None and self._counters is not None
        image = StoreImage(self._balances, self._recent, self._counters, self._meta)
        # The applied operations are the last ones before the counters' total, in apply order, one
        # per index: the store records them by index range (common/storage/store.py, applied_batches).
        indexes = [applied.apply_index for applied in self._recent]
        if indexes and indexes != list(range(self._counters.ops_applied_total - len(indexes) + 1,
                                             self._counters.ops_applied_total + 1)):
            raise SaldoError("FIELD_INVALID", "snapshot: the applied operations are not the last ones, in order")
        try:
            Bank(max_accounts=max(max_accounts, len(self._balances)), dedup_window_ops=max(1, dedup_window_ops)).restore(
                image.balances, image.recent, image.counters
            )
        except AssertionError as error:
            raise SaldoError("FIELD_INVALID", f"snapshot: state fails the bank's invariants: {error}") from None
        return image
