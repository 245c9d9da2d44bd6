"""A replica's durable store: its flags (--store, --max-accounts, --dedup-window) and opening its DurableBank.

Shared by the replica drivers of every architecture (common/standalone/replica.py,
common/sequencer/replica.py, common/primary_backup/replica.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from common.bank.state import DEFAULT_DEDUP_WINDOW_OPS, DEFAULT_MAX_ACCOUNTS
from common.log import get_logger
from common.storage.durable import DurableBank
from common.storage.store import check_store_url, open_store, redact

log = get_logger("replica")


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="sqlite:///path or mysql://user:pass@host:port/db "
                        "(default sqlite:///var/<mode>/<name>.db)")
    parser.add_argument("--max-accounts", type=int, default=DEFAULT_MAX_ACCOUNTS)
    parser.add_argument(
        "--dedup-window", type=int, default=DEFAULT_DEDUP_WINDOW_OPS,
        help="how many applied operation ids are remembered for exactly-once retries",
    )


def prepare_store(args: argparse.Namespace) -> None:
    """--store: by default a file per mode and name, so that replicas of two architectures never
    share one (a queue replica resuming from a primary-backup store would be refused by its server);
    checked now, not when it is first used."""
    if args.store is None:
        args.store = f"sqlite:///var/{args.mode}/{args.name}.db"
        earlier = Path(f"var/{args.name}.db")
        if earlier.exists() and not Path(args.store[len("sqlite:///"):]).exists():
            print(f"replica.py: note: {earlier} (the default store of earlier versions) is not used; "
                  f"this replica starts from {args.store[len('sqlite:///'):]} (pass --store sqlite:///{earlier} "
                  "to go on from it)", file=sys.stderr)
    try:
        check_store_url(args.store)
    except ValueError as error:
        raise SystemExit(f"replica.py: --store: {error}") from None


async def open_durable_bank(args: argparse.Namespace, *, sync_interval_s: float = 0.0) -> DurableBank:
    """The replica's DurableBank. `sync_interval_s` > 0: a log-backed replica, whose SQLite store
    (unless its URL names a level) commits at synchronous=normal and syncs once per interval."""
    default_synchronous = "normal" if sync_interval_s > 0 else "full"
    store = await asyncio.to_thread(lambda: open_store(args.store, default_synchronous=default_synchronous))
    dbank = await DurableBank.open(store, max_accounts=args.max_accounts, dedup_window_ops=args.dedup_window,
                                   sync_interval_s=sync_interval_s)
    bank = dbank.bank
    log.info("store_loaded", store=redact(args.store), accounts=len(bank.balances),
             ops_applied_total=bank.counters.ops_applied_total, meta=dbank.meta,
             sync_interval_s=dbank.sync_interval_s)
    return dbank
