"""The process that test_store.py kills: it writes one big batch in one transaction, reporting each step.

    python tests/crash_child.py STORE_URL COUNT SEED WINDOW

It loads the store into a Bank, applies COUNT generated operations (deterministic in SEED, so the
parent can compute the expected result itself), then, on stdout, one line per step:
    BEGUN           the transaction is open
    PARTLY_WRITTEN  half of the applied operations' rows are written
    WRITTEN         every row is written; the commit starts now
    COMMITTED  the commit returned
The parent SIGKILLs it somewhere in between and checks the store holds all of the batch or none.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.bank.state import DEPOSIT, TRANSFER, WITHDRAW, Bank, Operation  # noqa: E402
from common.storage.store import MAX_OPS_PER_BATCH_ROW, open_store  # noqa: E402

ACCOUNTS = [f"acct{index}" for index in range(200)]
META_NAME = "crash_batch"


def make_ops(count: int, seed: int) -> list[Operation]:
    """COUNT operations with fresh ids: deposits, withdrawals and transfers, some of them refused."""
    rng = random.Random(seed)
    ops = []
    for index in range(count):
        op_id = f"s{seed}-{index}"
        account = rng.choice(ACCOUNTS)
        amount = rng.randrange(1, 20_000)
        roll = rng.random()
        if roll < 0.45:
            ops.append(Operation(op_id, DEPOSIT, account, None, amount))
        elif roll < 0.7:
            ops.append(Operation(op_id, WITHDRAW, account, None, amount))
        else:
            target = rng.choice([name for name in ACCOUNTS[:20] if name != account])
            ops.append(Operation(op_id, TRANSFER, account, target, amount))
    return ops


def apply_all(bank: Bank, ops: list[Operation]) -> tuple[list[tuple], dict[str, int]]:
    for seq, op in enumerate(ops, start=1):
        bank.apply(op, seq)
    return bank.take_effects()


def report(step: str) -> None:
    sys.stdout.write(step + "\n")
    sys.stdout.flush()


def main() -> None:
    url, count, seed, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = open_store(url)
    bank = store.load(window).to_bank(Bank(dedup_window_ops=window))
    applied, changed = apply_all(bank, make_ops(count, seed))
    batch_rows = store.encode_applied(applied)  # before the transaction, as common/storage/durable.py does
    # persist() in steps, so the parent knows where the transaction is: half of the batch's rows,
    # then the rest with the balances and counters.
    first_rows = len(batch_rows) // 2
    rest = first_rows * MAX_OPS_PER_BATCH_ROW
    store._begin()
    report("BEGUN")
    store._insert_batch_rows(batch_rows[:first_rows])
    report("PARTLY_WRITTEN")
    store._write_effects(applied[rest:], changed, bank.counters, {META_NAME: seed}, window, shared=False,
                         batch_rows=batch_rows[first_rows:])
    report("WRITTEN")
    store._commit()
    report("COMMITTED")
    store.close()


if __name__ == "__main__":
    main()
