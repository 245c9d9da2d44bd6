-- saldo's store, SQLite dialect: the twin of sql/schema.sql (MySQL), kept equivalent by a test.

CREATE TABLE IF NOT EXISTS accounts (
    name VARCHAR(64) NOT NULL,
    balance_cents BIGINT NOT NULL,
    PRIMARY KEY (name),
    CONSTRAINT accounts_balance_non_negative CHECK (balance_cents >= 0)
);

CREATE TABLE IF NOT EXISTS applied_ops (
    apply_index INTEGER NOT NULL,
    op_id VARCHAR(64) NOT NULL,
    seq BIGINT NULL,
    kind VARCHAR(8) NOT NULL,
    account VARCHAR(64) NOT NULL,
    to_account VARCHAR(64) NULL,
    amount_cents BIGINT NOT NULL,
    error VARCHAR(32) NULL,
    balance_cents BIGINT NULL,
    PRIMARY KEY (apply_index),
    CONSTRAINT applied_ops_op_id UNIQUE (op_id),
    CONSTRAINT applied_ops_amount_positive CHECK (amount_cents > 0),
    -- Spelled with OR, not IN (...): SQLite evaluates this IN list by building a small table for
    -- every inserted row, which cost 40% of an applied_ops insert.
    CONSTRAINT applied_ops_kind CHECK (kind = 'DEPOSIT' OR kind = 'WITHDRAW' OR kind = 'TRANSFER')
);

-- A replica's applied operations, one row per group commit (what each table holds: sql/schema.sql).
-- One operation per line: SELECT value FROM applied_batches, json_each(ops_json);
CREATE TABLE IF NOT EXISTS applied_batches (
    first_apply_index INTEGER NOT NULL,
    last_apply_index INTEGER NOT NULL,
    ops_json TEXT NOT NULL,
    PRIMARY KEY (first_apply_index),
    CONSTRAINT applied_batches_span CHECK (first_apply_index <= last_apply_index)
);

CREATE TABLE IF NOT EXISTS replica_meta (
    name VARCHAR(64) NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name)
);
