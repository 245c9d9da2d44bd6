"""The consistency checker: from a history and the replicas' final states, the anomalies.

Owns the verdict of a lab run. Inputs: the clients' history (common/lab/workload.py) and, for each
replica, its final durable image (balances, the applied operations in its apply order, its
counters), read from its store once the cluster is quiet. Anomaly types:

- divergence: replicas hold different balances for an account.
- money: a replica's total is not what the acknowledged deposits and withdrawals allow (operations
  of unknown outcome may count either way).
- negative_balance: a read returned, or a store holds, a negative balance.
- lost_write: an acknowledged operation is missing from a replica's applied operations.
- failover_lost_write: the same, for an operation acknowledged by a primary of an epoch that a
  later one replaced (the loss asynchronous primary-backup does not promise to avoid; with
  `failover_may_lose`, such operations count either way for money).
- double_apply: an operation's effect is in a replica's balances twice (its id twice in the
  applied operations, or the balances exceed a replay of them by exactly one operation's effect).
- corrupt_state: a replica's balances are not what replaying its own applied operations gives,
  and no single repeated operation explains the difference; or they disagree with its own
  counters (deposited minus withdrawn). No architecture excuses it: each replica is a bank.
- phantom_write: an operation the client was told certainly did not happen was applied.
- outcome_mismatch: a replica recorded a different outcome than the one the client was given.
- real_time_order (architectures that promise a total order): operation A was acknowledged before
  operation B was invoked, yet A comes after B in the apply order.
- stale_read (architectures that promise read-your-writes): a read answered at a sequence number
  below one its client had already been given when it sent the read.
- read_mismatch (total order): a read's balance is not the account's balance in the apply order
  at the sequence number the read names (`SEQ`: everything up to it applied, nothing after).

Checks that need every applied operation (lost_write, replay, read_mismatch) run only when the
replica still has all of them (its dedup window was not exceeded); otherwise the result says so
in `notes`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from common.bank.money import render_cents
from common.bank.state import Bank, Operation
from common.lab.workload import OpRecord
from common.storage.store import StoreImage

ANOMALY_TYPES = (
    "divergence",
    "money",
    "negative_balance",
    "lost_write",
    "double_apply",
    "corrupt_state",
    "phantom_write",
    "outcome_mismatch",
    "real_time_order",
    "failover_lost_write",
    "stale_read",
    "read_mismatch",
)
# Failures the bank records as the operation's outcome (a retry returns them again).
RECORDED_ERRORS = frozenset({"INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "BALANCE_LIMIT", "TOO_MANY_ACCOUNTS"})
MAX_EXAMPLES = 5


@dataclass
class CheckResult:
    anomalies: dict[str, int] = field(default_factory=lambda: {name: 0 for name in ANOMALY_TYPES})
    examples: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, example: dict, count: int = 1) -> None:
        assert kind in self.anomalies, kind
        self.anomalies[kind] += count
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(example)

    @property
    def valid(self) -> bool:
        return not any(self.anomalies.values())

    @property
    def verdict(self) -> str:
        return "valid" if self.valid else "invalid"

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "anomalies": dict(self.anomalies),
            "anomaly_examples": {k: v for k, v in self.examples.items() if v},
            "checker_notes": list(self.notes),
        }


def _is_write(record: OpRecord) -> bool:
    return record.kind != "BALANCE"


def _acknowledged(record: OpRecord) -> bool:
    """The client was told the bank took this operation: applied, recorded as a failure, or
    accepted (durably queued; its outcome is decided when the replicas apply it)."""
    return record.outcome == "ok" or (record.outcome == "failed" and record.error in RECORDED_ERRORS)


def _effect(kind: str, account: str, to_account: str | None, amount: int) -> dict[str, int]:
    if kind == "DEPOSIT":
        return {account: amount}
    if kind == "WITHDRAW":
        return {account: -amount}
    return {account: -amount, to_account: amount}


def _money_delta(kind: str, amount: int) -> int:
    return amount if kind == "DEPOSIT" else -amount if kind == "WITHDRAW" else 0


def _rows_complete(image: StoreImage) -> bool:
    rows = image.recent
    return len(rows) == image.counters.ops_applied_total and all(
        row.apply_index == index for index, row in enumerate(rows, start=1)
    )


def check(
    history: list[OpRecord],
    replicas: dict[str, StoreImage],
    *,
    total_order: bool,
    read_your_writes: bool = False,
    failover_may_lose: bool = False,
) -> CheckResult:
    result = CheckResult()
    writes = [r for r in history if _is_write(r)]
    newest_epoch = _newest_epoch(history)
    # Acknowledged in an epoch that a later primary replaced: what a failover can take.
    superseded = {r.op_id for r in writes if r.epoch is not None and r.epoch < newest_epoch} if newest_epoch else set()

    _check_negative_reads(history, result)
    _check_divergence(replicas, result)
    for name, image in replicas.items():
        _check_replica(name, image, writes, superseded, failover_may_lose, result)
    if total_order:
        _check_real_time_order(writes, replicas, result)
        _check_read_values(history, replicas, superseded_epochs_lose=failover_may_lose, result=result)
    if read_your_writes:
        _check_read_your_writes(history, result)
    return result


def _newest_epoch(history: list[OpRecord]) -> int | None:
    """The highest epoch in which a primary acknowledged a write (None: no architecture with
    epochs). Only acknowledgements count: a refusal or a backup's read names the epoch a replica
    promised, which may never have had a primary."""
    return max((r.epoch for r in history if r.epoch is not None and r.outcome == "ok" and _is_write(r)), default=None)


def _check_negative_reads(history: list[OpRecord], result: CheckResult) -> None:
    for record in history:
        if record.outcome == "ok" and record.balance_cents is not None and record.balance_cents < 0:
            result.add("negative_balance", {"op_id": record.op_id, "kind": record.kind, "account": record.account,
                                            "read": render_cents(record.balance_cents)})


def _check_divergence(replicas: dict[str, StoreImage], result: CheckResult) -> None:
    if len(replicas) < 2:
        return
    accounts = set()
    for image in replicas.values():
        accounts.update(image.balances)
    for account in sorted(accounts):
        values = {name: image.balances.get(account) for name, image in replicas.items()}
        if len(set(values.values())) > 1:
            result.add("divergence", {
                "account": account,
                "balances": {n: (None if v is None else render_cents(v)) for n, v in values.items()},
            })


def _check_replica(name: str, image: StoreImage, writes: list[OpRecord], superseded: set[str], failover_may_lose: bool,
                   result: CheckResult) -> None:
    balances = image.balances
    counters = image.counters
    for account, cents in balances.items():
        if cents < 0:
            result.add("negative_balance", {"replica": name, "account": account, "stored": render_cents(cents)})
    total = sum(balances.values())
    if total != counters.deposited_cents_total - counters.withdrawn_cents_total:
        result.add("corrupt_state", {
            "replica": name,
            "problem": "balances disagree with the replica's own counters",
            "balances_total": render_cents(total),
            "deposited_minus_withdrawn": render_cents(counters.deposited_cents_total - counters.withdrawn_cents_total),
        })

    rows = image.recent
    row_ids = Counter(row.op.op_id for row in rows)
    for op_id, times in row_ids.items():
        if times > 1:
            result.add("double_apply", {"replica": name, "op_id": op_id, "times": times}, count=times - 1)
    applied = {row.op.op_id: row for row in rows}
    complete = _rows_complete(image)

    # Money against the history: exact when every applied operation is known, a range otherwise.
    base = 0
    unknown_up = 0
    unknown_down = 0
    for record in writes:
        delta = _money_delta(record.kind, record.amount_cents)
        may_be_lost = failover_may_lose and record.op_id in superseded
        if record.outcome == "ok" and not record.accepted and not may_be_lost:
            base += delta
        elif record.outcome == "unknown" or record.accepted or (record.outcome == "ok" and may_be_lost):
            # Decided at the replica (or possibly lost in a failover): count what it recorded.
            row = applied.get(record.op_id)
            if complete:
                if row is not None and row.outcome.error is None:
                    base += delta
            elif delta > 0:
                unknown_up += delta
            else:
                unknown_down += delta
    low, high = base + unknown_down, base + unknown_up
    if not low <= total <= high:
        result.add("money", {
            "replica": name,
            "problem": "total differs from what acknowledged deposits and withdrawals allow",
            "total": render_cents(total),
            "allowed": render_cents(low) if low == high else f"{render_cents(low)}..{render_cents(high)}",
        })

    # What the client was told against what the replica recorded.
    for record in writes:
        row = applied.get(record.op_id)
        if row is None:
            if complete and _acknowledged(record):
                kind = "failover_lost_write" if record.op_id in superseded else "lost_write"
                result.add(kind, {"replica": name, "op_id": record.op_id, "kind": record.kind,
                                  "client_outcome": record.outcome, "error": record.error, "epoch": record.epoch})
            continue
        recorded_error = row.outcome.error
        if record.accepted:
            continue  # the client was told "queued", not the outcome
        if record.outcome == "failed" and record.error not in RECORDED_ERRORS:
            if recorded_error is None:
                result.add("phantom_write", {"replica": name, "op_id": record.op_id, "client_error": record.error})
            continue
        if record.outcome in ("ok", "failed") and (record.error if record.outcome == "failed" else None) != recorded_error:
            result.add("outcome_mismatch", {"replica": name, "op_id": record.op_id, "client": record.error or "OK",
                                            "replica_recorded": recorded_error or "OK"})

    if complete:
        _check_replay(name, image, result)
    else:
        result.notes.append(
            f"{name}: {len(rows)} of {counters.ops_applied_total} applied operations kept (dedup window); "
            "lost_write and replay checks skipped, money checked by counters"
        )


def _check_replay(name: str, image: StoreImage, result: CheckResult) -> None:
    """Replay the replica's applied operations from nothing; its balances must be the result."""
    bank = Bank(max_accounts=10**9, dedup_window_ops=max(1, len(image.recent)))
    for row in image.recent:
        op = row.op
        outcome, _duplicate = bank.apply(Operation(op.op_id, op.kind, op.account, op.to_account, op.amount_cents), row.seq)
        if outcome != row.outcome:
            result.add("corrupt_state", {"replica": name, "op_id": op.op_id,
                                         "problem": "replaying the applied operations gives another outcome",
                                         "recorded": row.outcome.error or "OK", "replayed": outcome.error or "OK"})
    replayed = bank.balances
    diff = {}
    for account in set(replayed) | set(image.balances):
        delta = image.balances.get(account, 0) - replayed.get(account, 0)
        if delta:
            diff[account] = delta
    if not diff:
        return
    for row in image.recent:
        if row.outcome.error is None and _effect(row.op.kind, row.op.account, row.op.to_account, row.op.amount_cents) == diff:
            result.add("double_apply", {"replica": name, "op_id": row.op.op_id, "problem": "its effect is in the balances twice"})
            return
    result.add("corrupt_state", {"replica": name, "problem": "balances differ from a replay of the applied operations",
                                 "differences": {a: render_cents(d) for a, d in sorted(diff.items())[:8]}})


def _check_real_time_order(writes: list[OpRecord], replicas: dict[str, StoreImage], result: CheckResult) -> None:
    reference = next((image for image in replicas.values() if image.recent), None)
    if reference is None:
        return
    position = {row.op.op_id: row.apply_index for row in reference.recent}
    acked = [r for r in writes if _acknowledged(r) and r.op_id in position]
    by_complete = sorted(acked, key=lambda r: r.complete_s)
    done = 0
    latest_position = -1
    latest: OpRecord | None = None
    for record in sorted(acked, key=lambda r: r.invoke_s):
        while done < len(by_complete) and by_complete[done].complete_s < record.invoke_s:
            finished = by_complete[done]
            if position[finished.op_id] > latest_position:
                latest_position = position[finished.op_id]
                latest = finished
            done += 1
        if position[record.op_id] < latest_position:
            assert latest is not None
            result.add("real_time_order", {
                "first": latest.op_id, "first_completed_s": round(latest.complete_s, 6),
                "then": record.op_id, "then_invoked_s": round(record.invoke_s, 6),
                "applied_positions": [latest_position, position[record.op_id]],
            })


def _check_read_your_writes(history: list[OpRecord], result: CheckResult) -> None:
    """Each read must be answered at or after the highest sequence number its client had been
    given (by any reply) when it sent the read: the MIN_SEQ the client names."""
    by_client: dict[int, list[OpRecord]] = defaultdict(list)
    for record in history:
        if record.seq is not None:
            by_client[record.client].append(record)
    for records in by_client.values():
        by_complete = sorted(records, key=lambda r: r.complete_s)
        done = 0
        highest_seen = 0
        for read in sorted((r for r in records if r.kind == "BALANCE" and r.outcome == "ok"), key=lambda r: r.invoke_s):
            while done < len(by_complete) and by_complete[done].complete_s <= read.invoke_s:
                highest_seen = max(highest_seen, by_complete[done].seq)
                done += 1
            if read.seq < highest_seen:
                result.add("stale_read", {"op_id": read.op_id, "client": read.client, "account": read.account,
                                          "read_at_seq": read.seq, "client_had_seen_seq": highest_seen})


def _check_read_values(history: list[OpRecord], replicas: dict[str, StoreImage], *, superseded_epochs_lose: bool,
                       result: CheckResult) -> None:
    """Each read's balance against the apply order: the account's balance once every operation up
    to the read's SEQ is applied. The order is a replica's whose applied operations are complete
    (in a total order, every replica's is the same; divergence is reported on its own)."""
    reads = [r for r in history if r.kind == "BALANCE" and r.outcome == "ok" and r.seq is not None
             and r.balance_cents is not None]
    if not reads:
        return
    if superseded_epochs_lose:  # a read of an epoch a failover replaced may have seen lost writes
        newest = _newest_epoch(history)
        reads = [r for r in reads if r.epoch is None or r.epoch == newest]
    reference = next((image for image in replicas.values() if image.recent and _rows_complete(image)), None)
    if reference is None:
        result.notes.append("no replica kept every applied operation: read values not checked")
        return
    # A read's SEQ counts in sequence numbers where the order has them, else (standalone) in
    # the replica's apply index.
    positions = [row.seq if row.seq is not None else row.apply_index for row in reference.recent]
    if any(a >= b for a, b in zip(positions, positions[1:])):
        result.notes.append("the apply order has no increasing sequence numbers: read values not checked")
        return
    rows = reference.recent
    balances: dict[str, int] = defaultdict(int)
    applied = 0
    for read in sorted(reads, key=lambda r: r.seq):
        while applied < len(rows) and positions[applied] <= read.seq:
            row = rows[applied]
            if row.outcome.error is None:
                for account, delta in _effect(row.op.kind, row.op.account, row.op.to_account, row.op.amount_cents).items():
                    balances[account] += delta
            applied += 1
        if balances[read.account] != read.balance_cents:
            result.add("read_mismatch", {"op_id": read.op_id, "account": read.account, "seq": read.seq,
                                         "read": render_cents(read.balance_cents),
                                         "at_that_seq": render_cents(balances[read.account])})
