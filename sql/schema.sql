-- saldo's store, MySQL / MariaDB dialect. The SQLite twin is sql/schema.sqlite.sql; a test keeps
-- the two equivalent (same tables, same columns, same constraints).
--
-- One database per replica (or per worker farm): it is the durable image of common/bank/state.py's Bank.
-- Every statement here is idempotent, so a process may run the whole file at each start.

-- Balances in integer cents. No balance is ever negative, whatever the code above does.
CREATE TABLE IF NOT EXISTS accounts (
    name VARCHAR(64) NOT NULL,
    balance_cents BIGINT NOT NULL,
    PRIMARY KEY (name),
    CONSTRAINT accounts_balance_non_negative CHECK (balance_cents >= 0)
) ENGINE = InnoDB;

-- The applied operations of a store shared by many writers (the worker farm), in its apply
-- order: exactly-once apply rests on op_id being unique, and a retry is answered from the outcome
-- columns. Only the last dedup window is kept.
CREATE TABLE IF NOT EXISTS applied_ops (
    apply_index BIGINT NOT NULL,          -- 1, 2, 3, ... in the order this store applied them
    op_id VARCHAR(64) NOT NULL,           -- chosen by the client (a UUID)
    seq BIGINT NULL,                      -- the orderer's sequence number, when there is an orderer
    kind VARCHAR(8) NOT NULL,             -- DEPOSIT | WITHDRAW | TRANSFER
    account VARCHAR(64) NOT NULL,         -- the account, or the source of a transfer
    to_account VARCHAR(64) NULL,          -- the destination of a transfer
    amount_cents BIGINT NOT NULL,
    error VARCHAR(32) NULL,               -- NULL when the operation succeeded
    balance_cents BIGINT NULL,            -- the balance of `account` after it, on success
    PRIMARY KEY (apply_index),
    UNIQUE KEY applied_ops_op_id (op_id),
    CONSTRAINT applied_ops_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT applied_ops_kind CHECK (kind IN ('DEPOSIT', 'WITHDRAW', 'TRANSFER'))
) ENGINE = InnoDB;

-- The applied operations of a replica, the only writer of its store, which remembers its dedup
-- window in memory and reads it from here when it starts: one row per group commit, its
-- operations as a JSON array of [apply_index, op_id, seq, kind, account, to_account, amount_cents,
-- error, balance_cents] (applied_ops' columns), in apply order. Three to five times cheaper per
-- operation than a row each with a unique index. Only the rows that hold the last dedup window are kept.
-- One operation per line: SELECT j.* FROM applied_batches,
--   JSON_TABLE(ops_json, '$[*]' COLUMNS (apply_index BIGINT PATH '$[0]', op_id VARCHAR(64) PATH '$[1]')) AS j;
CREATE TABLE IF NOT EXISTS applied_batches (
    first_apply_index BIGINT NOT NULL,    -- the apply_index of the row's first operation
    last_apply_index BIGINT NOT NULL,     -- and of its last
    ops_json MEDIUMTEXT NOT NULL,         -- at most 1,024 operations (common/storage/store.py)
    PRIMARY KEY (first_apply_index),
    CONSTRAINT applied_batches_span CHECK (first_apply_index <= last_apply_index)
) ENGINE = InnoDB;

-- Per-replica metadata, one integer per name: the counters that explain the balances
-- (ops_applied_total, deposited_cents_total, withdrawn_cents_total) and what the architectures
-- need to resume (last_applied_seq, epoch, ...). Updated in the same transaction as the balances.
CREATE TABLE IF NOT EXISTS replica_meta (
    name VARCHAR(64) NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB;
