"""common.storage.store on both backends (SQLite file, MySQL/MariaDB): one set of scenarios, run on each.

Round trips, the dedup window on disk, exactly-once apply_batch, concurrent writers, install, and a
process SIGKILLed while its transaction is in flight (the store holds all of the batch or none).
"""

from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.bank.money import MAX_BALANCE_CENTS
from common.bank.state import DEPOSIT, TRANSFER, WITHDRAW, AppliedOp, Bank, Counters, Operation, Outcome
from common.storage.store import MAX_OPS_PER_BATCH_ROW, SCHEMA_TABLES, SQLiteStore, StoreImage
from common.storage.store import open_store as open_store_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_child  # noqa: E402

CRASH_CHILD = Path(crash_child.__file__).resolve()


def deposit(op_id: str, account: str, cents: int) -> Operation:
    return Operation(op_id, DEPOSIT, account, None, cents)


def withdraw(op_id: str, account: str, cents: int) -> Operation:
    return Operation(op_id, WITHDRAW, account, None, cents)


def transfer(op_id: str, source: str, target: str, cents: int) -> Operation:
    return Operation(op_id, TRANSFER, source, target, cents)


def persist_ops(store, bank: Bank, ops: list[Operation], *, window: int, meta: dict | None = None, first_seq: int = 1):
    for seq, op in enumerate(ops, start=first_seq):
        bank.apply(op, seq)
    applied, changed = bank.take_effects()
    store.persist(applied, changed, bank.counters, meta, dedup_window_ops=window)
    return applied


def image_of(bank: Bank, meta: dict[str, int]) -> StoreImage:
    return StoreImage(dict(bank.balances), list(bank.recent_applied()), bank.counters.copy(), dict(meta))


def all_rows(store) -> list[AppliedOp]:
    return store.load().recent  # no window: every applied operation on disk


def batch_rows(store) -> list[tuple[int, int, int]]:
    """(first apply_index, last apply_index, operations) of each applied_batches row, oldest first."""
    cursor = store._cursor()
    cursor.execute("SELECT first_apply_index, last_apply_index, ops_json FROM applied_batches ORDER BY first_apply_index")
    rows = [(int(first), int(last), len(json.loads(ops_json))) for first, last, ops_json in cursor.fetchall()]
    store._end_read()
    return rows


# --- Round trips --------------------------------------------------------------------------------


def test_persist_then_load_round_trips_everything(open_store):
    store = open_store()
    bank = Bank(dedup_window_ops=1_000)
    # A balance at the maximum: needs a 64-bit column, and must come back exact.
    bank.restore({"rich": MAX_BALANCE_CENTS}, [], Counters(0, MAX_BALANCE_CENTS, 0))
    store.persist([], {"rich": MAX_BALANCE_CENTS}, bank.counters, dedup_window_ops=1_000)
    persist_ops(
        store,
        bank,
        [
            deposit("d-1", "alice", 1000),
            deposit("uuid:2.x_y-z", "b.o-b@example_9", 500),
            transfer("t-1", "alice", "b.o-b@example_9", 200),
            withdraw("w-1", "nobody", 5),  # ACCOUNT_NOT_FOUND: recorded all the same
            withdraw("w-2", "alice", 10_000),  # INSUFFICIENT_FUNDS
        ],
        window=1_000,
        meta={"last_applied_seq": 5, "epoch": 1},
    )
    persist_ops(
        store,
        bank,
        [withdraw("w-3", "alice", 800), deposit("d-2", "carol", 1)],  # alice ends at 0
        window=1_000,
        meta={"last_applied_seq": 7},
        first_seq=6,
    )

    image = open_store().load()  # a second connection: what is on disk, not what one Store holds
    assert image.balances == {"rich": MAX_BALANCE_CENTS, "alice": 0, "b.o-b@example_9": 700, "carol": 1}
    assert image.balances == bank.balances
    assert image.recent == list(bank.recent_applied())
    assert [applied.op.op_id for applied in image.recent] == ["d-1", "uuid:2.x_y-z", "t-1", "w-1", "w-2", "w-3", "d-2"]
    assert [applied.seq for applied in image.recent] == [1, 2, 3, 4, 5, 6, 7]
    assert image.recent[3].outcome == Outcome("ACCOUNT_NOT_FOUND", None)
    assert image.recent[2].op.to_account == "b.o-b@example_9"
    assert image.counters == Counters(7, MAX_BALANCE_CENTS + 1501, 800)
    assert image.meta == {"last_applied_seq": 7, "epoch": 1}
    assert store.get_meta("last_applied_seq") == 7
    assert store.get_meta("no_such_name", -1) == -1


def test_an_empty_store_loads_as_an_empty_image(open_store):
    image = open_store().load()
    assert image == StoreImage()
    assert image.to_bank(Bank()).balances == {}


def test_a_bank_restored_from_load_passes_its_invariants_and_continues_identically(open_store):
    store = open_store()
    window = 300
    live = Bank(dedup_window_ops=window)
    ops = crash_child.make_ops(1_200, seed=7)
    for start in range(0, 1_000, 100):
        persist_ops(store, live, ops[start : start + 100], window=window, meta={"last_applied_seq": start + 100})
    restored = open_store().load(window).to_bank(Bank(dedup_window_ops=window))  # runs check_invariants
    restored.check_invariants()
    assert restored.balances == live.balances
    assert restored.counters == live.counters
    assert list(restored.recent_applied()) == list(live.recent_applied())
    later = ops[1_000:] + ops[950:1_000]  # new operations, then retries inside the window
    assert [restored.apply(op) for op in later] == [live.apply(op) for op in later]
    assert restored.balances == live.balances


def test_set_meta_and_a_failed_persist_leaves_nothing(open_store):
    store = open_store()
    bank = Bank()
    persist_ops(store, bank, [deposit("d-1", "alice", 1000)], window=100)
    store.set_meta({"epoch": 4})
    before = store.load()
    assert before.meta == {"epoch": 4}
    bank.apply(deposit("d-2", "bob", 50))
    applied, _changed = bank.take_effects()
    # A negative balance is refused by the schema's CHECK: the whole transaction goes, counters too.
    with pytest.raises(Exception):
        store.persist(applied, {"bob": 50, "alice": -1}, bank.counters, {"epoch": 5}, dedup_window_ops=100)
    assert store.load() == before
    assert open_store().load() == before


def test_the_two_schema_files_define_the_same_tables(tmp_path, mysql_url):
    """sql/schema.sql and sql/schema.sqlite.sql: same tables, same columns in order, same NULLs."""
    sqlite_store = open_store_url(f"sqlite:///{tmp_path / 'schema.db'}")
    mysql_store = open_store_url(mysql_url)
    try:
        tables = ("accounts", "applied_ops", "applied_batches", "replica_meta")
        on_sqlite = {}
        for table in tables:
            rows = sqlite_store._connection.execute(f"PRAGMA table_info({table})").fetchall()
            on_sqlite[table] = [(name, not notnull, bool(pk)) for _cid, name, _type, notnull, _default, pk in rows]
        on_mysql = {}
        cursor = mysql_store._cursor()
        for table in tables:
            cursor.execute(
                "SELECT column_name, is_nullable, column_key FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (mysql_store.database, table),
            )
            on_mysql[table] = [(name, nullable == "YES", key == "PRI") for name, nullable, key in cursor.fetchall()]
        assert on_sqlite == on_mysql
        assert [name for name, _, _ in on_mysql["applied_ops"]][:2] == ["apply_index", "op_id"]
        # An existing store is opened without its schema when it has every one of these tables.
        cursor.execute("SHOW TABLES")
        assert {name for (name,) in cursor.fetchall()} == SCHEMA_TABLES == set(tables)
    finally:
        sqlite_store.close()
        mysql_store.close()


def test_the_schema_refuses_a_negative_balance(open_store):
    store = open_store()
    cursor = store._cursor()
    p = store._placeholder
    with pytest.raises(Exception):
        cursor.execute(f"INSERT INTO accounts (name, balance_cents) VALUES ({p}, {p})", ("neg", -1))
    cursor.execute(f"INSERT INTO accounts (name, balance_cents) VALUES ({p}, {p})", ("zero", 0))
    assert store.load().balances == {"zero": 0}


# --- The dedup window on disk -------------------------------------------------------------------


def test_pruning_keeps_the_rows_that_hold_the_last_window_and_no_more(open_store):
    store = open_store()
    window = 5
    bank = Bank(dedup_window_ops=window)
    total = 0
    for batch in range(4):
        ops = [deposit(f"b{batch}-{index}", "alice", 100) for index in range(4)]
        persist_ops(store, bank, ops, window=window)
        total += len(ops)
        # One row per commit, and a row goes once all of it is older than the window: here the
        # window's 5 operations span two commits of 4.
        assert batch_rows(store) == [(first, first + 3, 4) for first in range(max(1, total - 7), total, 4)]
        assert all_rows(store)[-window:] == list(bank.recent_applied())
    assert [applied.apply_index for applied in all_rows(store)] == list(range(9, 17))
    assert store.load(window).recent == list(bank.recent_applied())
    assert store.load(2).recent == all_rows(store)[-2:]
    assert store.load().counters.ops_applied_total == 16
    assert store.load().balances == {"alice": 1600}

    restored = store.load(window).to_bank(Bank(dedup_window_ops=window))
    assert restored.apply(deposit("b3-3", "alice", 100)) == (Outcome(None, 1600), True)  # still remembered
    assert restored.apply(deposit("b0-0", "alice", 100))[1] is False  # forgotten: applies again


def test_a_large_commit_is_split_into_bounded_rows_and_loads_whole(open_store):
    store = open_store()
    window = 5_000
    bank = Bank(dedup_window_ops=window)
    ops = [deposit(f"big-{index}", f"acct{index % 7}", 1 + index % 50) for index in range(MAX_OPS_PER_BATCH_ROW * 2 + 10)]
    persist_ops(store, bank, ops, window=window)
    assert batch_rows(store) == [
        (1, MAX_OPS_PER_BATCH_ROW, MAX_OPS_PER_BATCH_ROW),
        (MAX_OPS_PER_BATCH_ROW + 1, 2 * MAX_OPS_PER_BATCH_ROW, MAX_OPS_PER_BATCH_ROW),
        (2 * MAX_OPS_PER_BATCH_ROW + 1, 2 * MAX_OPS_PER_BATCH_ROW + 10, 10),
    ]
    restored = open_store().load(window).to_bank(Bank(dedup_window_ops=window))
    assert restored.balances == bank.balances
    assert list(restored.recent_applied()) == list(bank.recent_applied())


def test_operations_recorded_one_per_row_and_by_batch_load_in_one_apply_order(open_store):
    """A store that a shared writer started (applied_ops) and a replica went on with
    (applied_batches) loads as one history, in apply order."""
    store = open_store()
    store.apply_batch([(deposit("farm-1", "alice", 100), None), (deposit("farm-2", "bob", 5), None)],
                      max_accounts=100, dedup_window_ops=100)
    bank = open_store().load(100).to_bank(Bank(dedup_window_ops=100))
    persist_ops(store, bank, [transfer("rep-1", "alice", "bob", 40)], window=100)
    image = open_store().load()
    assert [(applied.apply_index, applied.op.op_id) for applied in image.recent] == [(1, "farm-1"), (2, "farm-2"), (3, "rep-1")]
    assert image.balances == {"alice": 60, "bob": 45}
    assert open_store().load(2).recent == image.recent[1:]


def test_a_replica_prunes_the_rows_an_earlier_version_wrote_one_per_operation(open_store):
    store = open_store()
    window = 4
    bank = Bank(dedup_window_ops=window)
    for index in range(3):
        bank.apply(deposit(f"old-{index}", "alice", 10))
    applied, changed = bank.take_effects()
    store._begin()  # as an earlier version wrote them: one applied_ops row each
    store._write_effects(applied, changed, bank.counters, {}, window, shared=True)
    store._commit()
    persist_ops(store, bank, [deposit(f"new-{index}", "alice", 10) for index in range(3)], window=window)
    assert [applied.op.op_id for applied in open_store().load(window).recent] == ["old-2", "new-0", "new-1", "new-2"]
    cursor = store._cursor()
    cursor.execute("SELECT op_id FROM applied_ops ORDER BY apply_index")
    assert [row[0] for row in cursor.fetchall()] == ["old-2"]  # the others left the window
    store._end_read()


def test_the_schema_comment_query_lists_one_applied_operation_per_line(open_store):
    """The query sql/schema*.sql give readers of applied_batches works on each backend."""
    store = open_store()
    bank = Bank()
    persist_ops(store, bank, [deposit("d-1", "alice", 500), transfer("t-1", "alice", "bob", 200)], window=100)
    persist_ops(store, bank, [withdraw("w-1", "bob", 900)], window=100, first_seq=3)
    cursor = store._cursor()
    if isinstance(store, SQLiteStore):
        cursor.execute("SELECT value FROM applied_batches, json_each(ops_json)")
        lines = [json.loads(value) for (value,) in cursor.fetchall()]
        assert [(line[0], line[1]) for line in lines] == [(1, "d-1"), (2, "t-1"), (3, "w-1")]
    else:
        cursor.execute(
            "SELECT j.* FROM applied_batches, JSON_TABLE(ops_json, '$[*]' COLUMNS ("
            "apply_index BIGINT PATH '$[0]', op_id VARCHAR(64) PATH '$[1]')) AS j"
        )
        lines = [(int(index), op_id) for index, op_id in cursor.fetchall()]
        assert lines == [(1, "d-1"), (2, "t-1"), (3, "w-1")]
    store._end_read()
    assert all_rows(store)[2].outcome == Outcome("INSUFFICIENT_FUNDS", None)
    assert all_rows(store)[1].op == transfer("t-1", "alice", "bob", 200)


# --- apply_batch: shared stores -----------------------------------------------------------------


def test_apply_batch_applies_exactly_once(open_store):
    store = open_store()
    ops = [
        (deposit("d-1", "alice", 1000), 1),
        (transfer("t-1", "alice", "bob", 300), 2),
        (withdraw("w-1", "bob", 500), 3),
        (deposit("d-1", "alice", 1000), 4),  # the same operation again, in the same batch
        (deposit("d-1", "alice", 999), 5),  # its id for another operation
    ]
    first = store.apply_batch(ops, max_accounts=100, dedup_window_ops=1_000)
    assert first == [
        (Outcome(None, 1000), False),
        (Outcome(None, 700), False),
        (Outcome("INSUFFICIENT_FUNDS", None), False),
        (Outcome(None, 1000), True),
        (Outcome("ID_REUSED", None), True),
    ]
    image = store.load()
    assert image.balances == {"alice": 700, "bob": 300}
    assert image.counters == Counters(3, 1000, 0)
    assert [(applied.op.op_id, applied.seq) for applied in image.recent] == [("d-1", 1), ("t-1", 2), ("w-1", 3)]

    expected_again = [(outcome, True) for outcome, _duplicate in first]
    assert store.apply_batch(ops, max_accounts=100, dedup_window_ops=1_000) == expected_again
    assert open_store().apply_batch(ops[::-1], max_accounts=100, dedup_window_ops=1_000) == expected_again[::-1]
    assert store.load() == image


def test_apply_batch_counts_accounts_outside_the_batch(open_store):
    store = open_store()
    store.apply_batch([(deposit("d-1", "a", 1), None), (deposit("d-2", "b", 1), None)], max_accounts=2, dedup_window_ops=100)
    outcomes = store.apply_batch(
        [(deposit("d-3", "c", 1), None), (transfer("t-1", "a", "c", 1), None), (deposit("d-4", "a", 1), None)],
        max_accounts=2,
        dedup_window_ops=100,
    )
    assert outcomes == [
        (Outcome("TOO_MANY_ACCOUNTS", None), False),
        (Outcome("TOO_MANY_ACCOUNTS", None), False),
        (Outcome(None, 2), False),
    ]
    assert store.load().balances == {"a": 2, "b": 1}


def test_apply_batch_prunes_the_window_like_persist(open_store):
    store = open_store()
    for batch in range(3):
        store.apply_batch(
            [(deposit(f"b{batch}-{index}", "alice", 1), None) for index in range(3)], max_accounts=10, dedup_window_ops=4
        )
    assert [applied.op.op_id for applied in all_rows(store)] == ["b1-2", "b2-0", "b2-1", "b2-2"]
    assert store.apply_batch([(deposit("b0-0", "alice", 1), None)], max_accounts=10, dedup_window_ops=4) == [
        (Outcome(None, 10), False)
    ]


def test_concurrent_apply_batch_from_two_stores_conserves_money(store_url, open_store):
    seeder = open_store()
    accounts = ["a", "b", "c", "d"]
    seed_ops = [(deposit(f"seed-{name}", name, 10_000), None) for name in accounts[:3]]
    seeder.apply_batch(seed_ops, max_accounts=10, dedup_window_ops=100_000)
    batches_per_thread, ops_per_batch = 25, 8
    results: dict[str, list[tuple[Operation, Outcome, bool]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(name: str) -> None:
        store = open_store_url(store_url)  # its own connection
        rng = random.Random(name)
        mine: list[tuple[Operation, Outcome, bool]] = []
        try:
            start.wait(5)
            for batch in range(batches_per_thread):
                ops = []
                for index in range(ops_per_batch):
                    op_id = f"{name}-{batch}-{index}"
                    source, target = rng.sample(accounts, 2)
                    roll = rng.random()
                    if roll < 0.6:  # conflicting transfers, often larger than the source holds
                        ops.append(transfer(op_id, source, target, rng.randrange(1, 8_000)))
                    elif roll < 0.8:
                        ops.append(withdraw(op_id, source, rng.randrange(1, 3_000)))
                    else:
                        ops.append(deposit(op_id, source, rng.randrange(1, 1_000)))
                outcomes = store.apply_batch([(op, None) for op in ops], max_accounts=10, dedup_window_ops=100_000)
                mine.extend((op, outcome, duplicate) for op, (outcome, duplicate) in zip(ops, outcomes))
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            store.close()
            results[name] = mine

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("w1", "w2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors

    image = seeder.load()
    applied = [entry for entries in results.values() for entry in entries]
    assert len(applied) == 2 * batches_per_thread * ops_per_batch
    assert not any(duplicate for _op, _outcome, duplicate in applied)
    # Money: what the callers were told happened adds up to what the store holds.
    deposited = 30_000 + sum(op.amount_cents for op, outcome, _ in applied if outcome.ok and op.kind == DEPOSIT)
    withdrawn = sum(op.amount_cents for op, outcome, _ in applied if outcome.ok and op.kind == WITHDRAW)
    assert image.counters == Counters(3 + len(applied), deposited, withdrawn)
    assert sum(image.balances.values()) == deposited - withdrawn
    assert all(cents >= 0 for cents in image.balances.values())
    assert any(outcome.error == "INSUFFICIENT_FUNDS" for _, outcome, _ in applied)  # the conflicts were real
    # One serial order: apply indexes 1..N without gaps, each op exactly once.
    assert [row.apply_index for row in image.recent] == list(range(1, 3 + len(applied) + 1))
    assert len({row.op.op_id for row in image.recent}) == len(image.recent)
    image.to_bank(Bank(dedup_window_ops=100_000)).check_invariants()
    # Replaying the recorded order on one Bank gives every outcome the callers got.
    replay = Bank(dedup_window_ops=100_000)
    replayed = {row.op.op_id: replay.apply(row.op)[0] for row in image.recent}
    assert replay.balances == image.balances
    assert all(replayed[op.op_id] == outcome for op, outcome, _ in applied)


def test_two_writers_starting_together_on_a_fresh_store(store_url, open_store):
    open_store()  # creates the schema; no operation applied yet
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(name: str) -> None:
        store = open_store_url(store_url)
        try:
            start.wait(5)
            for index in range(10):
                store.apply_batch([(deposit(f"{name}-{index}", f"{name}{index}", 5), None)], max_accounts=100, dedup_window_ops=100)
        except BaseException as error:  # e.g. a deadlock between the first two batches
            errors.append(error)
        finally:
            store.close()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    image = open_store().load()
    assert image.counters == Counters(20, 100, 0)
    assert len(image.balances) == 20
    assert image.meta == {}


# --- install ------------------------------------------------------------------------------------


def test_install_replaces_the_whole_content(open_store):
    store = open_store()
    bank = Bank()
    persist_ops(store, bank, [deposit("old-1", "alice", 100), deposit("old-2", "bob", 200)], window=100, meta={"epoch": 1, "x": 9})

    source = Bank(dedup_window_ops=100)
    for seq, op in enumerate([deposit("new-1", "zed", 500), transfer("new-2", "zed", "yan", 120)], start=40):
        source.apply(op, seq)
    image = image_of(source, {"epoch": 2, "last_applied_seq": 41})
    store.install(image)

    assert store.load() == image
    assert open_store().load() == image  # old accounts, ops and meta are gone, not merged
    assert store.load().to_bank(Bank()).apply(deposit("old-1", "alice", 100)) == (Outcome(None, 100), False)

    store.wipe()
    assert store.load() == StoreImage()


# --- SIGKILL while a big transaction is in flight -----------------------------------------------

CRASH_BATCH_OPS = 200_000  # 196 applied_batches rows; the half after the kill and the commit take ~0.1 s (SQLite)
BEFORE_OPS = 1_000


class ChildSteps:
    """Reads the crash child's step lines as they arrive."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for raw in process.stdout:
            self.lines.put(raw.strip())
        self.lines.put(None)

    def wait_for(self, step: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while step not in self.seen:
            item = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert item is not None, f"the child exited before {step}; it said {self.seen}"
            self.seen.append(item)

    def drain(self) -> list[str]:
        self._thread.join(10)
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return self.seen
            if item is not None:
                self.seen.append(item)


@pytest.mark.parametrize("kill_at", ["mid_write", "at_commit"])
def test_a_process_killed_mid_transaction_leaves_all_of_the_batch_or_none(store_url, open_store, kill_at):
    """A child writes one batch of 200k applied ops in one transaction and is SIGKILLed once half of
    its rows are written (mid_write) or as its commit starts (at_commit). On SQLite (WAL mode) the killed
    writer leaves frames in the -wal file without a commit record, which the next reader ignores; on
    MySQL the server rolls the transaction back when the connection drops. Either way the store must
    hold the state before the batch or the state after it, never a mixture."""
    window = CRASH_BATCH_OPS  # the batch also prunes the ops before it: part of the same transaction
    store = open_store()
    if isinstance(store, SQLiteStore):
        assert store._connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    before_bank = Bank(dedup_window_ops=window)
    persist_ops(store, before_bank, crash_child.make_ops(BEFORE_OPS, seed=1), window=window, meta={crash_child.META_NAME: 1})
    before = store.load(window)
    assert before == image_of(before_bank, {crash_child.META_NAME: 1})

    child = subprocess.Popen(
        [sys.executable, str(CRASH_CHILD), store_url, str(CRASH_BATCH_OPS), "2", str(window)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        steps = ChildSteps(child)
        steps.wait_for("BEGUN")
        if kill_at == "mid_write":
            steps.wait_for("PARTLY_WRITTEN")  # half of the rows are in the open transaction
        else:
            steps.wait_for("WRITTEN")  # the commit is starting: kill it in the race
        child.kill()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
    said = steps.drain()
    assert child.returncode == -9 or "COMMITTED" in said, (child.returncode, said)

    # What the store must hold if the batch committed: the child's own computation, made here.
    after_bank = before.to_bank(Bank(dedup_window_ops=window))
    crash_child.apply_all(after_bank, crash_child.make_ops(CRASH_BATCH_OPS, seed=2))
    after = image_of(after_bank, {crash_child.META_NAME: 2})
    assert after.counters.ops_applied_total == BEFORE_OPS + CRASH_BATCH_OPS

    found = open_store().load(window)  # a new connection; SQLite recovers its WAL here
    if found == before:
        outcome = "none"
    elif found == after:
        outcome = "all"
    else:
        pytest.fail(
            f"partial batch after SIGKILL: counters {found.counters}, {len(found.recent)} recent ops, meta {found.meta}"
        )
    if "WRITTEN" not in said:
        assert outcome == "none", "killed before the commit began, yet the batch is there"
    if "COMMITTED" in said:
        assert outcome == "all", "the commit returned, yet the batch is gone"
    if kill_at == "mid_write":
        assert "COMMITTED" not in said, "the child finished before the kill: the batch was too small to catch"

    # Everything that explains the balances agrees, and the store goes on working.
    assert found.counters.ops_applied_total in (BEFORE_OPS, BEFORE_OPS + CRASH_BATCH_OPS)
    total = found.counters.ops_applied_total
    rows = batch_rows(open_store())  # contiguous, ending at the last op, none wholly outside the window
    assert [first for first, _last, _count in rows[1:]] == [last + 1 for _first, last, _count in rows[:-1]]
    assert rows[-1][1] == total and rows[0][0] <= total - min(window, total) + 1 and rows[0][1] > total - window
    bank = found.to_bank(Bank(dedup_window_ops=window))
    bank.check_invariants()
    store = open_store()
    persist_ops(store, bank, [deposit("after-crash", "acct0", 1)], window=window)
    assert open_store().load(window).counters.ops_applied_total == found.counters.ops_applied_total + 1


def test_a_mysql_store_opened_with_row_privileges_only_names_its_password_file_and_source_address(mysql_url, tmp_path):
    """As a deployment runs it: the tables exist, the replica's account may only read and write
    rows, from its own host's address, its password in a file; the lab's reader may only SELECT."""
    import urllib.parse

    import pymysql

    parsed = urllib.parse.urlsplit(mysql_url)
    database = parsed.path.lstrip("/")
    open_store_url(mysql_url).close()  # the administrator creates the database and its tables
    admin = pymysql.connect(host=parsed.hostname, port=parsed.port or 3306, user=urllib.parse.unquote(parsed.username or "root"),
                            password=urllib.parse.unquote(parsed.password or ""), autocommit=True)
    writer, reader = f"w{database[-8:]}", f"r{database[-8:]}"
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE USER '{writer}'@'127.0.0.12' IDENTIFIED BY 'writer-secret'")
            cursor.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{database}`.* TO '{writer}'@'127.0.0.12'")
            cursor.execute(f"CREATE USER '{reader}'@'127.0.0.11' IDENTIFIED BY 'reader-secret'")
            cursor.execute(f"GRANT SELECT ON `{database}`.* TO '{reader}'@'127.0.0.11'")
        (tmp_path / "writer.password").write_text("writer-secret\n")
        (tmp_path / "reader.password").write_text("reader-secret\n")
        server = f"{parsed.hostname}:{parsed.port or 3306}/{database}"

        store = open_store_url(f"mysql://{writer}@{server}?password_file={tmp_path / 'writer.password'}&bind_address=127.0.0.12")
        bank = Bank(dedup_window_ops=100)
        persist_ops(store, bank, [deposit("d1", "alice", 500), transfer("t1", "alice", "bob", 200)], window=100)
        store.close()
        image = open_store_url(f"mysql://{reader}@{server}?password_file={tmp_path / 'reader.password'}&bind_address=127.0.0.11").load()
        assert image.balances == {"alice": 300, "bob": 200} and [row.op.op_id for row in image.recent] == ["d1", "t1"]

        with pytest.raises(pymysql.err.OperationalError):  # from another address than the one granted
            open_store_url(f"mysql://{writer}@{server}?password_file={tmp_path / 'writer.password'}&bind_address=127.0.0.13")
        with pytest.raises(ValueError, match="password and a password_file"):
            open_store_url(f"mysql://{writer}:x@{server}?password_file={tmp_path / 'writer.password'}")
        with pytest.raises(ValueError, match="unknown parameter passwd_file"):
            open_store_url(f"mysql://{writer}@{server}?passwd_file={tmp_path / 'writer.password'}")
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP USER IF EXISTS '{writer}'@'127.0.0.12'")
            cursor.execute(f"DROP USER IF EXISTS '{reader}'@'127.0.0.11'")
        admin.close()
