"""Durable storage of a Bank: one interface, two backends chosen by URL.

    sqlite:///relative/path.db   sqlite:////absolute/path.db   sqlite:///:memory:
    mysql://user:password@host:port/database
    mysql://user@host:port/database?password_file=/etc/saldo/db/replica.password&bind_address=10.0.0.12

Owns the tables of sql/schema.sql (MySQL) and sql/schema.sqlite.sql (SQLite, kept equivalent), and
the two ways of writing them, each one transaction:

- `persist(...)`: for a process that holds the whole Bank in memory (a replica, the only writer
  of its store). It writes what a batch of applies changed: the applied operations with their ids,
  sequence numbers and outcomes, the changed balances, the counters and any metadata (such as
  last_applied_seq). Throughput comes from persisting many operations per transaction.
- `apply_batch(...)`: for processes that share one store (the worker farm's workers). It reads
  the slice of state the operations touch, locking it, runs the same Bank rules on it, and persists
  the effects, all in one transaction, so concurrent writers serialise correctly.

The two record applied operations differently, because they need different things from the disk:
- A replica remembers its dedup window in memory (common/bank/state.py) and reads it back only when it
  starts. It writes one `applied_batches` row per group commit: the batch's operations as one JSON
  array, in apply order. A row per operation with a unique index on its id cost three to five
  times as much (7.1 against 1.4 to 2.6 microseconds per operation, measured without a flush: most
  of a standalone replica's CPU).
- Shared writers know nothing but what the database tells them, so `applied_ops` holds one row per
  operation, and its unique key on op_id is what refuses an operation twice.
Each keeps only the last dedup window (a replica: the whole rows that hold it, so up to
MAX_OPS_PER_BATCH_ROW - 1 operations more); `load()` reads both tables into one apply order.

A process killed mid-transaction leaves all of it or none of it: that is the database's promise,
and the tests check it with SIGKILL. The SQLite backend runs in WAL mode with synchronous=FULL by
default (a commit is on disk before it returns); `?synchronous=normal` trades that for speed
(a committed transaction survives a process crash, not a power loss).

A replica whose operations are also kept in a durable log elsewhere (the sequencer's log, the
queue server's queues) can afford commits that are not yet on disk, as long as it says how far
its store is on disk: `persist(..., sync=False)` skips the flush where the store allows it
(`syncs_every_commit` false), `persist(..., sync=True)` and `sync_to_disk()` make everything
committed so far durable. See common/storage/durable.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from common.bank.state import AppliedOp, Bank, Counters, Operation, Outcome, applied_row
from common.log import get_logger

log = get_logger("store")

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "sql"
COUNTER_NAMES = ("ops_applied_total", "deposited_cents_total", "withdrawn_cents_total")
SCHEMA_TABLES = frozenset({"accounts", "applied_ops", "applied_batches", "replica_meta"})
# Bound on one multi-row statement's parameters (SQLite's default limit is 32766 variables).
MAX_ROWS_PER_STATEMENT = 500
MAX_META_NAME_CHARS = 64
APPLIED_COLUMNS = "apply_index, op_id, seq, kind, account, to_account, amount_cents, error, balance_cents"
APPLIED_COLUMN_COUNT = 9
# SQLite inserts applied_ops rows (the shared store's) this many to a statement: one multi-row statement costs a
# quarter less per row than the same rows through executemany, and a fixed size keeps the
# statement in sqlite3's statement cache.
SQLITE_ROWS_PER_INSERT = 64
# One applied_batches row holds at most this many operations (about 110 KB of JSON), so a large
# commit (a replica catching up, a state transfer) stays far below any packet or row limit.
MAX_OPS_PER_BATCH_ROW = 1024
_encode_json = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


@dataclass(slots=True)
class StoreImage:
    """Everything a Bank needs to resume: balances, the recent applied ops, counters, metadata."""

    balances: dict[str, int] = field(default_factory=dict)
    recent: list[AppliedOp] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    meta: dict[str, int] = field(default_factory=dict)

    def to_bank(self, bank: Bank) -> Bank:
        bank.restore(self.balances, self.recent, self.counters)
        return bank


def _row_to_applied(row: tuple) -> AppliedOp:
    apply_index, op_id, seq, kind, account, to_account, amount_cents, error, balance_cents = row
    return AppliedOp(
        int(apply_index),
        None if seq is None else int(seq),
        Operation(op_id, kind, account, to_account, int(amount_cents)),
        Outcome(error, None if balance_cents is None else int(balance_cents)),
    )


def _batch_to_applied(ops_json: str) -> list[AppliedOp]:
    return [_row_to_applied(row) for row in json.loads(ops_json)]


def _chunks(rows: list, size: int = MAX_ROWS_PER_STATEMENT):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


class Store:
    """The operations both backends offer; SQL text differs per dialect, the logic does not."""

    url: str
    commits_in_thread: bool  # whether DurableBank should run every commit on a thread of its own
    # Whether every commit is on stable storage when it returns. False: a commit survives a
    # process crash at once, a power loss only after the next sync (persist(sync=True), sync_to_disk).
    syncs_every_commit: bool = True
    _placeholder = "?"
    _lock_suffix = ""  # " FOR UPDATE" where the backend has row locks

    # --- Dialect hooks --------------------------------------------------------------------------
    def _begin(self, sync: bool = True) -> None:
        raise NotImplementedError

    def _end_write(self, sync: bool) -> None:
        """After a write transaction, committed or not (undo what _begin(sync) set up)."""

    def _commit(self) -> None:
        raise NotImplementedError

    def _rollback(self) -> None:
        raise NotImplementedError

    def _cursor(self):
        raise NotImplementedError

    _upsert_account_sql: str
    _upsert_meta_sql: str

    def close(self) -> None:
        raise NotImplementedError

    # --- Reading --------------------------------------------------------------------------------
    def load(self, dedup_window_ops: int | None = None) -> StoreImage:
        """The whole durable image (the last `dedup_window_ops` applied ops, or all)."""
        cursor = self._cursor()
        cursor.execute("SELECT name, balance_cents FROM accounts")
        balances = {name: int(cents) for name, cents in cursor.fetchall()}
        query = (
            "SELECT apply_index, op_id, seq, kind, account, to_account, amount_cents, error, balance_cents"
            " FROM applied_ops ORDER BY apply_index DESC"
        )
        if dedup_window_ops is not None:
            query += f" LIMIT {int(dedup_window_ops)}"
        cursor.execute(query)
        recent = [_row_to_applied(row) for row in cursor.fetchall()]
        recent.reverse()
        cursor.execute("SELECT ops_json FROM applied_batches ORDER BY first_apply_index DESC")
        batches: list[list[AppliedOp]] = []  # newest first
        batched_ops = 0
        for (ops_json,) in cursor:  # (pruned to about one window: see _write_effects)
            if dedup_window_ops is not None and batched_ops >= dedup_window_ops:
                break
            batch = _batch_to_applied(ops_json)
            batches.append(batch)
            batched_ops += len(batch)
        if batches:
            from_batches = [applied for batch in reversed(batches) for applied in batch]
            # (a store written by both paths, which saldo's processes never do, still loads in order)
            recent = sorted(recent + from_batches, key=lambda applied: applied.apply_index) if recent else from_batches
        if dedup_window_ops is not None:
            recent = recent[len(recent) - dedup_window_ops :] if len(recent) > dedup_window_ops else recent
        cursor.execute("SELECT name, value FROM replica_meta")
        meta = {name: int(value) for name, value in cursor.fetchall()}
        self._end_read()
        counters = Counters(*(meta.pop(name, 0) for name in COUNTER_NAMES))
        return StoreImage(balances, recent, counters, meta)

    def _end_read(self) -> None:
        """Close the read transaction a driver may have opened implicitly."""

    def get_meta(self, name: str, default: int = 0) -> int:
        cursor = self._cursor()
        cursor.execute(f"SELECT value FROM replica_meta WHERE name = {self._placeholder}", (name,))
        row = cursor.fetchone()
        self._end_read()
        return default if row is None else int(row[0])

    def balances_of(self, names: list[str]) -> dict[str, int]:
        """The balances of these accounts (an absent account is absent from the result), read
        outside any write transaction: the worker farm's QUERY tasks."""
        p = self._placeholder
        cursor = self._cursor()
        balances: dict[str, int] = {}
        for chunk in _chunks(sorted(set(names))):
            cursor.execute(f"SELECT name, balance_cents FROM accounts WHERE name IN ({', '.join([p] * len(chunk))})", chunk)
            balances.update({name: int(cents) for name, cents in cursor.fetchall()})
        self._end_read()
        return balances

    # --- Writing --------------------------------------------------------------------------------
    def persist(
        self,
        applied: list[tuple],
        balances: dict[str, int],
        counters: Counters,
        meta: dict[str, int] | None = None,
        *,
        dedup_window_ops: int,
        sync: bool = True,
        batch_rows: list[tuple[int, int, str]] | None = None,
    ) -> None:
        """Write one batch of a Bank's effects (Bank.take_effects: the applied rows and the changed
        balances) in one transaction (see the module docstring). `sync`: on stable storage before
        returning, with everything committed before it (a store that syncs every commit ignores
        False). `batch_rows`: `applied` as encode_applied gave it, if the caller encoded it already
        (on another thread than this call's)."""
        self._begin(sync)
        try:
            self._write_effects(applied, balances, counters, meta or {}, dedup_window_ops, shared=False,
                                batch_rows=batch_rows)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        finally:
            self._end_write(sync)

    def sync_to_disk(self) -> None:
        """Put everything committed so far on stable storage (nothing to do where every commit is)."""

    def set_meta(self, meta: dict[str, int]) -> None:
        self._begin(sync=True)
        try:
            self._write_meta(meta)
            self._commit()
        except BaseException:
            self._rollback()
            raise
        finally:
            self._end_write(True)

    def _write_meta(self, meta: dict[str, int]) -> None:
        for name, value in meta.items():
            assert type(value) is int and len(name) <= MAX_META_NAME_CHARS, (name, value)
        if meta:
            self._cursor().executemany(self._upsert_meta_sql, list(meta.items()))

    def _insert_applied_rows(self, rows: list[tuple]) -> None:
        """Insert applied rows (common/bank/state.py) into applied_ops, in the open transaction. PyMySQL's
        executemany already sends one multi-row INSERT per chunk."""
        p = self._placeholder
        insert = f"INSERT INTO applied_ops ({APPLIED_COLUMNS}) VALUES ({', '.join([p] * APPLIED_COLUMN_COUNT)})"
        cursor = self._cursor()
        for chunk in _chunks(rows):
            cursor.executemany(insert, chunk)

    @staticmethod
    def encode_applied(applied: list[tuple]) -> list[tuple[int, int, str]]:
        """The applied_batches rows that record `applied` (applied rows in apply order, see
        common/bank/state.py): (first apply_index, last apply_index, a JSON array of the applied rows).
        The applied rows are in applied_ops' column order already, so each applied_batches row is
        one call of the C encoder."""
        rows = []
        for chunk in _chunks(applied, MAX_OPS_PER_BATCH_ROW):
            first, last = chunk[0][0], chunk[-1][0]
            assert first <= last, (first, last)
            rows.append((first, last, _encode_json(chunk)))
        return rows

    def _insert_batch_rows(self, rows: list[tuple[int, int, str]]) -> None:
        """Insert applied_batches rows (see encode_applied) in the open transaction."""
        p = self._placeholder
        self._cursor().executemany(
            f"INSERT INTO applied_batches (first_apply_index, last_apply_index, ops_json) VALUES ({p}, {p}, {p})", rows
        )

    def _write_effects(
        self,
        applied: list[tuple],
        balances: dict[str, int],
        counters: Counters,
        meta: dict[str, int],
        dedup_window_ops: int,
        *,
        shared: bool,
        batch_rows: list[tuple[int, int, str]] | None = None,
    ) -> None:
        """`shared`: the store has many writers (apply_batch): one applied_ops row per operation;
        else one applied_batches row per commit (see the module docstring)."""
        cursor = self._cursor()
        p = self._placeholder
        if applied:
            assert applied[-1][0] == counters.ops_applied_total, (applied[-1], counters)
            if shared:
                self._insert_applied_rows(applied)
            else:
                if batch_rows is None:
                    batch_rows = self.encode_applied(applied)
                assert batch_rows[0][0] == applied[0][0] and batch_rows[-1][1] == applied[-1][0], (
                    batch_rows[0][:2], batch_rows[-1][:2], applied[0][0], applied[-1][0])
                assert len(batch_rows) == (len(applied) + MAX_OPS_PER_BATCH_ROW - 1) // MAX_OPS_PER_BATCH_ROW
                self._insert_batch_rows(batch_rows)
        if balances:
            cursor.executemany(self._upsert_account_sql, [(name, cents) for name, cents in balances.items()])
        self._write_meta(
            {
                "ops_applied_total": counters.ops_applied_total,
                "deposited_cents_total": counters.deposited_cents_total,
                "withdrawn_cents_total": counters.withdrawn_cents_total,
                **meta,
            }
        )
        forget_up_to = counters.ops_applied_total - dedup_window_ops
        if applied and forget_up_to > 0:  # keep only the dedup window, like the Bank does in memory
            if shared:
                cursor.execute(f"DELETE FROM applied_ops WHERE apply_index <= {p}", (forget_up_to,))
            else:  # whole rows: the store keeps up to one row more than the window
                cursor.execute(
                    f"DELETE FROM applied_batches WHERE first_apply_index <= {p} AND last_apply_index <= {p}",
                    (forget_up_to, forget_up_to),
                )
                # Rows a store written one per operation still holds (by an earlier version).
                cursor.execute(f"DELETE FROM applied_ops WHERE apply_index <= {p}", (forget_up_to,))

    def apply_batch(
        self,
        ops: list[tuple[Operation, int | None]],
        *,
        max_accounts: int,
        dedup_window_ops: int,
        meta: dict[str, int] | None = None,
    ) -> list[tuple[Outcome, bool]]:
        """Apply operations against the shared store in one transaction; [(outcome, duplicate)]."""
        assert ops
        p = self._placeholder
        lock = self._lock_suffix
        self._begin(sync=True)
        try:
            cursor = self._cursor()
            names = list(COUNTER_NAMES)
            cursor.execute(
                f"SELECT name, value FROM replica_meta WHERE name IN ({', '.join([p] * len(names))}){lock}", names
            )
            found = {name: int(value) for name, value in cursor.fetchall()}
            counters = Counters(*(found.get(name, 0) for name in COUNTER_NAMES))
            op_ids = list({op.op_id for op, _seq in ops})
            recent: list[AppliedOp] = []
            for chunk in _chunks(op_ids):
                cursor.execute(
                    "SELECT apply_index, op_id, seq, kind, account, to_account, amount_cents, error, balance_cents"
                    f" FROM applied_ops WHERE op_id IN ({', '.join([p] * len(chunk))})",
                    chunk,
                )
                recent.extend(_row_to_applied(row) for row in cursor.fetchall())
            accounts = sorted({op.account for op, _ in ops} | {op.to_account for op, _ in ops if op.to_account})
            balances: dict[str, int] = {}
            for chunk in _chunks(accounts):
                cursor.execute(
                    f"SELECT name, balance_cents FROM accounts WHERE name IN ({', '.join([p] * len(chunk))}){lock}",
                    chunk,
                )
                balances.update({name: int(cents) for name, cents in cursor.fetchall()})
            other_accounts = 0
            if len(balances) < len(accounts):  # some op may create an account: the bound needs the count
                cursor.execute("SELECT COUNT(*) FROM accounts")
                other_accounts = int(cursor.fetchone()[0]) - len(balances)
            bank = Bank.for_slice(
                balances,
                recent,
                counters,
                other_accounts=other_accounts,
                max_accounts=max_accounts,
                dedup_window_ops=dedup_window_ops,
            )
            outcomes = [bank.apply(op, seq) for op, seq in ops]
            applied, changed = bank.take_effects()
            self._write_effects(applied, changed, bank.counters, meta or {}, dedup_window_ops, shared=True)
            self._commit()
            return outcomes
        except BaseException:
            self._rollback()
            raise
        finally:
            self._end_write(True)

    def install(self, image: StoreImage) -> None:
        """Replace the whole content with `image` in one transaction (state transfer), on disk
        before it returns."""
        self._begin(sync=True)
        try:
            cursor = self._cursor()
            for table in ("accounts", "applied_ops", "applied_batches", "replica_meta"):
                cursor.execute(f"DELETE FROM {table}")
            counters = image.counters
            if image.balances:
                for chunk in _chunks(list(image.balances.items())):
                    cursor.executemany(self._upsert_account_sql, chunk)
            for chunk in _chunks(image.recent, MAX_OPS_PER_BATCH_ROW):  # a row at a time: memory stays flat
                self._insert_batch_rows(self.encode_applied([applied_row(applied) for applied in chunk]))
            self._write_meta(
                {
                    "ops_applied_total": counters.ops_applied_total,
                    "deposited_cents_total": counters.deposited_cents_total,
                    "withdrawn_cents_total": counters.withdrawn_cents_total,
                    **image.meta,
                }
            )
            self._commit()
        except BaseException:
            self._rollback()
            raise
        finally:
            self._end_write(True)

    def wipe(self) -> None:
        """Empty every table (tests, and `--reset` of a fresh local cluster)."""
        self.install(StoreImage())


# --- SQLite -------------------------------------------------------------------------------------


class SQLiteStore(Store):
    commits_in_thread = False  # only a flushing commit of a batch: see common/storage/durable.py
    _placeholder = "?"
    _lock_suffix = ""  # BEGIN IMMEDIATE takes the database write lock up front
    _upsert_account_sql = (
        "INSERT INTO accounts (name, balance_cents) VALUES (?, ?)"
        " ON CONFLICT(name) DO UPDATE SET balance_cents = excluded.balance_cents"
    )
    _upsert_meta_sql = (
        "INSERT INTO replica_meta (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value"
    )

    def __init__(self, url: str, path: str, synchronous: str = "full", busy_timeout_ms: int = 10_000) -> None:
        assert synchronous in ("full", "normal", "off"), synchronous
        self.url = url
        self.path = path
        self.synchronous = synchronous
        self.syncs_every_commit = synchronous == "full" or path == ":memory:"
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One writer thread at a time is the caller's promise (a replica commits from one thread).
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if path != ":memory:":
            self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._connection.executescript((SCHEMA_DIR / "schema.sqlite.sql").read_text())
        self._cursor_obj = self._connection.cursor()

    def _cursor(self):
        return self._cursor_obj

    _insert_many_rows_sql = (
        f"INSERT INTO applied_ops ({APPLIED_COLUMNS}) VALUES "
        + ", ".join(["(" + ", ".join(["?"] * APPLIED_COLUMN_COUNT) + ")"] * SQLITE_ROWS_PER_INSERT)
    )
    _insert_one_row_sql = f"INSERT INTO applied_ops ({APPLIED_COLUMNS}) VALUES ({', '.join(['?'] * APPLIED_COLUMN_COUNT)})"

    def _insert_applied_rows(self, rows: list[tuple]) -> None:
        cursor = self._cursor_obj
        whole = len(rows) - len(rows) % SQLITE_ROWS_PER_INSERT
        for start in range(0, whole, SQLITE_ROWS_PER_INSERT):
            values = [value for row in rows[start : start + SQLITE_ROWS_PER_INSERT] for value in row]
            cursor.execute(self._insert_many_rows_sql, values)
        if whole < len(rows):
            cursor.executemany(self._insert_one_row_sql, rows[whole:])

    def _begin(self, sync: bool = True) -> None:
        if sync and not self.syncs_every_commit:
            # SQLite takes the level only outside a transaction. With FULL, this commit syncs the
            # write-ahead log, and with it every frame the relaxed commits before it wrote there.
            self._cursor_obj.execute("PRAGMA synchronous = FULL")
        self._cursor_obj.execute("BEGIN IMMEDIATE")

    def _end_write(self, sync: bool) -> None:
        if sync and not self.syncs_every_commit:
            self._cursor_obj.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")

    def _commit(self) -> None:
        self._cursor_obj.execute("COMMIT")

    def sync_to_disk(self) -> None:
        if self.syncs_every_commit:
            return
        # A relaxed commit wrote its pages to the write-ahead log without flushing it; a checkpoint
        # that moved pages into the database file flushed the log before and the file after. So
        # flushing the log file puts everything committed on stable storage. (A checkpoint cannot
        # be trusted to do it: a reader on another connection can keep it from running at all.)
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no log: everything is in the database file, flushed by the last checkpoint
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _rollback(self) -> None:
        if self._connection.in_transaction:
            self._cursor_obj.execute("ROLLBACK")

    def close(self) -> None:
        self._connection.close()


# --- MySQL / MariaDB ----------------------------------------------------------------------------


class MySQLStore(Store):
    commits_in_thread = True  # a commit waits on the network, without the GIL
    _placeholder = "%s"
    _lock_suffix = " FOR UPDATE"
    _upsert_account_sql = (
        "INSERT INTO accounts (name, balance_cents) VALUES (%s, %s)"
        " ON DUPLICATE KEY UPDATE balance_cents = VALUES(balance_cents)"
    )
    _upsert_meta_sql = "INSERT INTO replica_meta (name, value) VALUES (%s, %s) ON DUPLICATE KEY UPDATE value = VALUES(value)"

    def __init__(self, url: str, host: str, port: int, user: str, password: str, database: str, connect_timeout_s: float = 5.0,
                 bind_address: str | None = None) -> None:
        import pymysql  # Imported here: SQLite-only machines run without PyMySQL installed.

        self._pymysql = pymysql
        self.url = url
        self.database = database
        options = dict(host=host, port=port, user=user, password=password, autocommit=True, connect_timeout=connect_timeout_s,
                       charset="utf8mb4", bind_address=bind_address)
        try:
            self._connection = pymysql.connect(database=database, **options)
        except pymysql.err.OperationalError as error:
            if error.args[0] != 1049:  # ER_BAD_DB_ERROR: create the database, then connect to it
                raise
            bootstrap = pymysql.connect(**options)
            with bootstrap.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
            bootstrap.close()
            self._connection = pymysql.connect(database=database, **options)
        # A store that is already complete is only read here: a deployment creates the tables with
        # an administrator's account, and a replica's own user may then hold no CREATE or INSERT
        # privilege beyond what it writes (and the lab's reader only SELECT).
        with self._connection.cursor() as cursor:
            cursor.execute("SHOW TABLES")
            tables = {row[0] for row in cursor.fetchall()}
            if not SCHEMA_TABLES <= tables:
                for statement in _split_sql((SCHEMA_DIR / "schema.sql").read_text()):
                    cursor.execute(statement)
            # apply_batch serialises writers by locking the counter rows (FOR UPDATE): they must
            # exist, or two first batches on a fresh store take gap locks and deadlock.
            cursor.execute("SELECT name FROM replica_meta WHERE name IN (%s, %s, %s)", COUNTER_NAMES)
            missing = set(COUNTER_NAMES) - {row[0] for row in cursor.fetchall()}
            if missing:
                cursor.executemany("INSERT IGNORE INTO replica_meta (name, value) VALUES (%s, 0)", [(name,) for name in sorted(missing)])
        self._cursor_obj = self._connection.cursor()

    def _cursor(self):
        return self._cursor_obj

    def _begin(self, sync: bool = True) -> None:
        self._connection.begin()  # InnoDB flushes its log at every commit (innodb_flush_log_at_trx_commit=1)

    def _commit(self) -> None:
        self._connection.commit()

    def _rollback(self) -> None:
        try:
            self._connection.rollback()
        except self._pymysql.err.Error:
            pass  # the connection is gone; the server rolls the transaction back itself

    def close(self) -> None:
        try:
            self._connection.close()
        except self._pymysql.err.Error:
            pass


def _split_sql(script: str) -> list[str]:
    """Statements of a schema file: comments dropped, split on semicolons at line ends."""
    text = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    text = re.sub(r"--[^\n]*", "", text)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


# --- Choosing a backend -------------------------------------------------------------------------

_DATABASE_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


def open_store(url: str, *, default_synchronous: str = "full") -> Store:
    """Open (and create if needed) the store named by `url`; see the module docstring.
    `default_synchronous`: SQLite's level when the URL does not name one (a log-backed replica
    asks for normal: see common/storage/durable.py)."""
    scheme, settings = _parse_store_url(url)
    if scheme == "sqlite":
        return SQLiteStore(url, settings["path"], synchronous=settings.get("synchronous", default_synchronous).lower())
    return MySQLStore(url, **settings)


def drop_store(url: str) -> bool:
    """Delete the store named by `url`: the whole MySQL database, or the SQLite file and its WAL
    companions. For a store a tool created for itself (the farm bench's); True if there was one."""
    scheme, settings = _parse_store_url(url)
    if scheme == "sqlite":
        existed = False
        for suffix in ("", "-wal", "-shm"):
            path = Path(settings["path"] + suffix)
            if path.exists():
                path.unlink()
                existed = True
        return existed
    import pymysql

    connection = pymysql.connect(host=settings["host"], port=settings["port"], user=settings["user"],
                                 password=settings["password"], autocommit=True, connect_timeout=5)
    try:
        with connection.cursor() as cursor:
            existed = cursor.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                                     (settings["database"],)) > 0
            cursor.execute(f"DROP DATABASE IF EXISTS `{settings['database']}`")  # the name is checked: [A-Za-z0-9_]
        return existed
    finally:
        connection.close()


def check_store_url(url: str) -> None:
    """Raise ValueError, with one clear line, for a store URL that cannot work: checked when a
    process starts, before it waits on the store (a worker opens its store only for its first task)."""
    scheme, _settings = _parse_store_url(url)
    if scheme == "mysql" and importlib.util.find_spec("pymysql") is None:
        raise ValueError("a mysql:// store needs PyMySQL: pip install -r requirements.txt (`make venv` does it)")


def _parse_store_url(url: str) -> tuple[str, dict]:
    parsed = urllib.parse.urlsplit(url)
    options = dict(urllib.parse.parse_qsl(parsed.query))
    if parsed.scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ValueError(f"expected sqlite:///path, got {url!r}")
        path = url[len("sqlite:///") :].split("?", 1)[0]
        if not path:
            raise ValueError("sqlite URL without a path")
        return "sqlite", {"path": path, **({"synchronous": options["synchronous"]} if "synchronous" in options else {})}
    if parsed.scheme == "mysql":
        database = parsed.path.lstrip("/")
        if not _DATABASE_NAME_RE.fullmatch(database):
            raise ValueError(f"expected mysql://user:password@host:port/database, got database {database!r}")
        unknown = sorted(set(options) - {"password_file", "bind_address"})
        if unknown:
            raise ValueError(f"mysql store URL: unknown parameter {', '.join(unknown)} (known: password_file, bind_address)")
        password = urllib.parse.unquote(parsed.password or "")
        if "password_file" in options:
            # The password kept out of the URL (and so out of topology files and process lists).
            if parsed.password is not None:
                raise ValueError("mysql store URL: a password and a password_file both given")
            try:
                password = Path(options["password_file"]).read_text().rstrip("\n")
            except OSError as error:
                raise ValueError(f"mysql store URL: password_file {options['password_file']}: {error.strerror or error}") from None
        return "mysql", {
            "host": parsed.hostname or "127.0.0.1",
            "port": parsed.port or 3306,
            "user": urllib.parse.unquote(parsed.username or "root"),
            "password": password,
            "database": database,
            # The address this host's connections come from, where a user is granted by address.
            "bind_address": options.get("bind_address"),
        }
    raise ValueError(f"unknown store URL scheme {parsed.scheme!r}: use sqlite:/// or mysql://")


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))
