#!/usr/bin/env python3
"""The saldo client: bank operations against any architecture, and a status view of any process.

    python client.py deposit alice 120.50        (a standalone replica started by hand: 127.0.0.1:7000)
    python client.py --arch sequencer transfer alice bob 10
    python client.py --topology var/up/sequencer/topology.json balance alice   (after `make up`)
    python client.py status 127.0.0.1:7000

Prints what a person wants to read: `OK balance=120.50`, `NOK INSUFFICIENT_FUNDS`, or (the queue
architecture, which answers once an operation is queued) `ACCEPTED seq=3: ...`. Exit code 0 on OK or ACCEPTED,
1 when the bank said no, 2 when the outcome is unknown (no conclusive answer before --timeout; a
retry with the same --id is safe), 64 on bad usage.

Each operation gets a fresh UUID unless --id names one; an unknown outcome is retried with the same
id until --timeout, so running the same command again with that --id never applies it twice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from common import clients, topology
from common.bank.errors import SaldoError
from common.bank.money import parse_amount_cents
from common.bank.state import DEFAULT_MAX_ACCOUNTS, MAX_ACCOUNTS_PER_PAGE, check_account, check_op_id
from common.cli import EXIT_USAGE, UsageParser
from common.farm import client as farm_client
from common.sequencer.core import MIN_SEQ_WAIT_S
from common.transport import wire
from common.transport.blocking import BlockingConnection
from common.transport.client import FAILED, OK, UNKNOWN, balance_line, execute_with_retries, new_op_id, operation_line

EXIT_OK, EXIT_NOK, EXIT_UNKNOWN = 0, 1, 2


def _timeout_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 3600 seconds: {text!r}")
    return value


DEFAULT_ACCOUNTS_SHOWN = 10_000


def _account_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= DEFAULT_MAX_ACCOUNTS:
        raise argparse.ArgumentTypeError(f"must be 1 to {DEFAULT_MAX_ACCOUNTS:,} (the most accounts a bank holds): {text!r}")
    return value


def add_operation_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--timeout, --id, --json, --wait: on the main parser with their defaults, and on each
    operation's parser with none (argparse.SUPPRESS), so that there they only override."""
    none = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--timeout", type=_timeout_s, **({"default": 10.0} if defaults else none),
                        help="seconds to retry before giving up (default 10)")
    parser.add_argument("--id", help="operation id (default: a new UUID); reuse it to retry safely", **none)
    parser.add_argument("--json", action="store_true", help="print the raw reply as JSON", **none)
    parser.add_argument("--wait", choices=["sequenced", "applied", "all"], **none,
                        help="sequencer and queue: answer once the operation is in the log (sequenced), applied "
                             "by one replica, or by all (default: the server's; the queue server answers once queued)")


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(clients.ARCHITECTURES), help="architecture (default: from --topology, else standalone)")
    parser.add_argument("--topology", help="topology file of a running cluster: addresses come from it")
    parser.add_argument("--address", action="append", default=[], metavar="HOST:PORT",
                        help="where to send (repeat for several: replicas of multicast / primary-backup)")
    parser.add_argument("--read-address", action="append", default=[], metavar="HOST:PORT",
                        help="replicas to read from (sequencer architecture)")
    add_operation_flags(parser, defaults=True)
    # The same flags after an operation's name too (`deposit alice 5 --id X`): what a printed hint
    # suggests adding to a command works wherever it is added.
    after = argparse.ArgumentParser(add_help=False)
    add_operation_flags(after, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)
    amount_help = "a decimal amount with at most two places, e.g. 120.50"
    for kind, preposition in (("deposit", "into"), ("withdraw", "from")):
        sub = commands.add_parser(kind, help=f"{kind} AMOUNT {preposition} ACCOUNT", parents=[after])
        sub.add_argument("account", metavar="ACCOUNT", help="account name (letters, digits, _ . @ -)")
        sub.add_argument("amount", metavar="AMOUNT", help=amount_help)
    sub = commands.add_parser("transfer", help="move AMOUNT from SOURCE to TARGET", parents=[after])
    sub.add_argument("source", metavar="SOURCE", help="the account the money leaves")
    sub.add_argument("target", metavar="TARGET", help="the account the money goes to")
    sub.add_argument("amount", metavar="AMOUNT", help=amount_help)
    sub = commands.add_parser("balance", help="the balance of ACCOUNT", parents=[after])
    sub.add_argument("account", metavar="ACCOUNT")
    sub.add_argument("--min-seq", type=int, help="the read must reflect at least this sequence number")
    sub = commands.add_parser("accounts", help="every account and its balance at a replica (a typo made an account?)",
                              parents=[after])
    sub.add_argument("--after", metavar="NAME", help="start after this account name (names are in order)")
    sub.add_argument("--limit", type=_account_count, default=DEFAULT_ACCOUNTS_SHOWN,
                     help=f"show at most this many accounts (default {DEFAULT_ACCOUNTS_SHOWN:,})")
    sub = commands.add_parser("worker", help="run a worker of the worker farm (client.py worker --help)",
                              add_help=False, prefix_chars="+")  # every flag belongs to the worker's own parser
    sub.add_argument("worker_args", nargs=argparse.REMAINDER)
    sub = commands.add_parser("status", help="the STATUS of any saldo process, as a table")
    sub.add_argument("target", nargs="?", help="HOST:PORT (default: --address, else every node of --topology)")
    return parser


def build_request(args: argparse.Namespace) -> tuple[str, bytes]:
    """(request id, line), validated here so a typo is refused before anything is sent."""
    op_id = check_op_id(args.id) if args.id else new_op_id()
    if args.command == "balance":
        return op_id, balance_line(op_id, check_account(args.account), args.min_seq)
    amount_cents = parse_amount_cents(args.amount)
    wait = f',"WAIT":"{args.wait.upper()}"' if args.wait else ""
    if args.command == "transfer":
        source, target = check_account(args.source, "FROM"), check_account(args.target, "TO")
        if source == target:
            raise SaldoError("SAME_ACCOUNT", "SOURCE and TARGET are the same account")
        return op_id, operation_line(op_id, "TRANSFER", source, target, amount_cents, wait)
    return op_id, operation_line(op_id, args.command.upper(), check_account(args.account), None, amount_cents, wait)


CLUSTER_HINT = "is a cluster running there? `make up` starts one; --topology FILE names its addresses"
# The process a client of each architecture sends its writes to, by what it is.
WRITE_ROLES = {"sequencer": "the sequencer", "queue": "the queue server", "standalone": "the standalone replica"}
STATUS_PROBE_TIMEOUT_S = 1.0


def ask_status(address: str, timeout_s: float = 2.0) -> dict:
    """The STATUS reply of the process at HOST:PORT; UNREACHABLE when nothing answers."""
    host, port = topology.parse_address(address)
    try:
        with BlockingConnection(host, port, connect_timeout_s=timeout_s) as connection:
            return connection.request({"TASK": "STATUS"}, timeout_s=timeout_s)
    except OSError as error:
        return {"STATUS": "NOK", "ERROR": "UNREACHABLE", "DETAIL": str(error)}


def describe_reachability(arch: str, addresses: dict, topo: dict | None) -> str | None:
    """Which of the processes this client uses answer now, when some do and some do not: "the
    sequencer at 127.0.0.11:6002 does not answer; replica1 at 127.0.0.12:6007 and replica2 at
    127.0.0.13:6007 do". None when none answers (no cluster there: CLUSTER_HINT says so)."""
    names = {f"{node['host']}:{node['port']}": name for name, node in ((topo or {}).get("nodes") or {}).items()
             if isinstance(node, dict) and "host" in node and "port" in node}
    labels: dict[str, str] = {}
    for purpose in ("write", "read"):
        for address in map(topology.format_address, addresses.get(purpose, [])):
            role = WRITE_ROLES.get(arch, "the replica") if purpose == "write" else "the replica"
            labels.setdefault(address, f"{names[address]} at {address}" if address in names else f"{role} at {address}")
    answers = {address: ask_status(address, STATUS_PROBE_TIMEOUT_S).get("STATUS") == "OK" for address in labels}
    down = [labels[address] for address, up in answers.items() if not up]
    up = [labels[address] for address, up in answers.items() if up]
    if not up or not down:
        return None
    return (f"{_and_list(down)} {'does' if len(down) == 1 else 'do'} not answer; "
            f"{_and_list(up)} {'does' if len(up) == 1 else 'do'}")


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe_reply(reply: dict, outcome: str, is_read: bool = False, reachability: str | None = None) -> str:
    if reply.get("STATUS") == "OK" and reply.get("ACCEPTED") is True:
        return (f"ACCEPTED seq={reply.get('SEQ')} id={reply.get('ID')}: queued for every replica; its outcome is"
                f" decided when they apply it (the same command with --id {reply.get('ID')} --wait applied waits"
                " for that, and applies nothing twice)")
    if reply.get("STATUS") == "OK" and is_read and "BALANCE" not in reply:
        # The farm's seed-format (v2) workers report a QUERY as done without its result.
        return "OK (the worker reported no balance: a seed-format worker answers a QUERY with its STATUS only)"
    if reply.get("STATUS") == "OK":
        parts = ["OK"]
        for key, label in (("BALANCE", "balance"), ("SEQ", "seq"), ("APPLIED", "applied"), ("BEHIND", "behind")):
            if key in reply:
                value = reply[key]
                if key == "APPLIED" and "REPLICAS" in reply:
                    value = f"{value}/{reply['REPLICAS']}"
                parts.append(f"{label}={value}")
        return " ".join(parts)
    text = f"NOK {reply.get('ERROR')}"
    if reply.get("DETAIL"):
        text += f": {reply['DETAIL']}"
    if reply.get("ERROR") == "NOT_READY" and "cannot connect" in str(reply.get("DETAIL")):
        text += f" ({reachability or CLUSTER_HINT})"
    if outcome == UNKNOWN:
        text += " (outcome unknown: retry with --id " + str(reply.get("ID")) + ")"
    return text


async def run_operation(args: argparse.Namespace, arch: str, addresses: dict, topo: dict | None) -> int:
    request_id, line = build_request(args)
    request_timeout_s = min(2.0, args.timeout)
    client = clients.make_client(arch, addresses, request_timeout_s=request_timeout_s)
    is_read = args.command == "balance"
    # A read naming --min-seq may wait at the replica (MIN_SEQ_WAIT_S): each attempt waits longer.
    attempt_timeout_s = MIN_SEQ_WAIT_S + 1.0 if is_read and args.min_seq else request_timeout_s
    try:
        reply, _attempts, outcome = await execute_with_retries(
            client, request_id, line, deadline_s=time.monotonic() + args.timeout, attempt_timeout_s=attempt_timeout_s,
            is_read=is_read,
        )
    finally:
        await client.close()
    reachability = None
    if not args.json and reply.get("ERROR") == "NOT_READY" and "cannot connect" in str(reply.get("DETAIL")):
        reachability = describe_reachability(arch, addresses, topo)
    print(wire.encode(reply).decode().strip() if args.json else describe_reply(reply, outcome, is_read, reachability))
    return {OK: EXIT_OK, FAILED: EXIT_NOK}.get(outcome, EXIT_UNKNOWN)


async def run_accounts(args: argparse.Namespace, arch: str, addresses: dict) -> int:
    """Every account and balance at a replica, a page (ACCOUNTS) at a time, up to --limit of them."""
    client = clients.make_client(arch, addresses, request_timeout_s=min(2.0, args.timeout))
    deadline_s = time.monotonic() + args.timeout
    after, shown, last = (check_account(args.after, "--after") if args.after else None), 0, {}
    try:
        while shown < args.limit:
            request_id = new_op_id()
            request = {"TASK": "ACCOUNTS", "ID": request_id, "LIMIT": min(MAX_ACCOUNTS_PER_PAGE, args.limit - shown)}
            if after is not None:
                request["AFTER"] = after
            last, _attempts, outcome = await execute_with_retries(
                client, request_id, wire.encode(request), deadline_s=deadline_s, attempt_timeout_s=min(2.0, args.timeout),
                is_read=True)
            if outcome != OK:
                print(wire.encode(last).decode().strip() if args.json else describe_reply(last, outcome))
                return EXIT_NOK
            if args.json:
                print(wire.encode(last).decode().strip())
            else:
                for name, balance in last["ACCOUNTS"]:
                    print(f"{name:<24} {balance:>18}")
            shown += len(last["ACCOUNTS"])
            after = last.get("NEXT_AFTER")
            if after is None:
                break
    finally:
        await client.close()
    if not args.json:
        at = f" at seq {last['SEQ']}" if "SEQ" in last else ""
        if after is None:
            print(f"{shown:,} account{'' if shown == 1 else 's'}{at}")
        else:
            print(f"{shown:,} of {last['ACCOUNTS_TOTAL']:,} accounts{at}; --after {after} shows the next ones")
    return EXIT_OK


def run_status(args: argparse.Namespace, targets: list[tuple[str, str]]) -> int:
    rows = []
    code = EXIT_OK
    for name, address in targets:
        reply = ask_status(address)
        if reply.get("STATUS") != "OK":
            code = EXIT_NOK
        rows.append((name, address, reply))
    if args.json:
        for name, address, reply in rows:
            print(wire.encode({"NODE": name, "ADDRESS": address, **reply}).decode().strip())
        return code
    for name, address, reply in rows:
        print(f"{name} ({address})")
        if reply.get("ROLE") == "farm-server":
            print(farm_client.format_status(reply))
            continue
        for key, value in reply.items():
            if key not in ("ID",):
                print(f"  {key.lower():<24} {value}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "worker":
        from common.farm import worker as farm_worker

        return farm_worker.main(args.worker_args)
    try:
        topo = topology.load(args.topology) if args.topology else None
    except (OSError, ValueError) as error:
        parser.error(f"--topology: {error}")
    if args.command == "status":
        if args.target or args.address:
            targets = [(address, address) for address in ([args.target] if args.target else args.address)]
        elif topo:
            targets = [(name, f"{node['host']}:{node['port']}") for name, node in topo["nodes"].items()]
        else:
            parser.error("status needs HOST:PORT, --address or --topology")
        for _name, address in targets:
            try:
                topology.parse_address(address)
            except ValueError:
                parser.error(f"status: expected HOST:PORT, got {address!r}")
        return run_status(args, targets)
    arch = args.arch or clients.client_architecture((topo or {}).get("architecture") or "standalone")
    if args.wait and args.command != "accounts" and arch not in ("sequencer", "queue"):
        print(f"client.py: note: --wait is for the sequencer and queue architectures; {arch} answers once the "
              "operation is applied (and durable) anyway", file=sys.stderr)
    if getattr(args, "min_seq", None) is not None and arch in ("multicast", "farm"):
        print(f"client.py: note: {arch} reads name no sequence number (its operations are not numbered): "
              "--min-seq changes nothing there", file=sys.stderr)
    if args.command == "accounts" and arch == "farm":
        parser.fail("accounts: the worker farm has no replica to ask; its accounts are the `accounts` table of "
                    "its shared store (sqlite3 or mysql: SELECT name, balance_cents FROM accounts ORDER BY name)")
    try:
        addresses = clients.resolve_addresses(arch, topo, args.address, args.read_address)
        if args.command == "accounts":
            return asyncio.run(run_accounts(args, arch, addresses))
        return asyncio.run(run_operation(args, arch, addresses, topo))
    except SaldoError as error:
        print(f"NOK {error.code}: {error.detail}")
        return EXIT_NOK
    except ValueError as error:
        print(f"usage: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader went away (`client.py status | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is quiet
        sys.exit(EXIT_NOK)
