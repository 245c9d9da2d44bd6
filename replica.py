#!/usr/bin/env python3
"""A saldo replica: holds a copy of the accounts in a durable store and serves it.

    python replica.py --mode standalone --port 7000 --store sqlite:///var/standalone.db
    python replica.py --topology var/local/topology.json --name replica1

Modes (one per architecture of seed 002, plus the baseline):
  standalone   one process, no replication: the baseline every architecture is compared with
  multicast    applies every operation a client sends it, on receipt (seed part 1)

This script wires flags, sockets and the store; each architecture's protocol lives in common/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common import aio, topology
from common.bank import DEFAULT_DEDUP_WINDOW_OPS, DEFAULT_MAX_ACCOUNTS
from common.durable import DurableBank
from common.log import get_logger
from common.process import add_common_flags, run
from common.standalone import BankService
from common.store import open_store, redact

log = get_logger("replica")

MODES = ("standalone", "multicast")
DEFAULT_PORT = {
    "standalone": topology.DEFAULT_PORTS["standalone"],
    "multicast": topology.DEFAULT_PORTS["multicast_replica"],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--mode", choices=MODES, default="standalone", help="architecture (default standalone)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="client port (default: the seed's port for the mode)")
    parser.add_argument("--store", help="sqlite:///path or mysql://user:pass@host:port/db (default sqlite:///var/<name>.db)")
    parser.add_argument("--max-accounts", type=int, default=DEFAULT_MAX_ACCOUNTS)
    parser.add_argument(
        "--dedup-window", type=int, default=DEFAULT_DEDUP_WINDOW_OPS,
        help="how many applied operation ids are remembered for exactly-once retries",
    )
    parser.add_argument("--max-connections", type=int, default=aio.MAX_CONNECTIONS)
    return parser


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    store = await asyncio.to_thread(open_store, args.store)
    dbank = await DurableBank.open(store, max_accounts=args.max_accounts, dedup_window_ops=args.dedup_window)
    bank = dbank.bank
    log.info(
        "store_loaded", store=redact(args.store), accounts=len(bank.balances),
        ops_applied_total=bank.counters.ops_applied_total,
    )
    service = BankService(dbank, node_name=args.name, mode=args.mode)
    server = await aio.start_server(
        service.handle, args.host, args.port, name=f"{args.mode}-clients", max_connections=args.max_connections
    )
    await stop.wait()
    log.info("stopping", ops_applied_total=bank.counters.ops_applied_total)
    await server.stop()
    await dbank.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = topology.parse_args(parser, argv)
    if args.port is None:
        args.port = DEFAULT_PORT[args.mode]
    if args.name is None:
        args.name = f"{args.mode}-{args.port}"
    if args.store is None:
        args.store = f"sqlite:///var/{args.name}.db"
    return run(lambda stop: serve(args, stop), node_name=args.name, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
