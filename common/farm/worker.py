"""A farm worker: `python client.py worker --server HOST:PORT --store URL` (seed 000's client.py).

Owns the worker's I/O, as a plain blocking program (common/transport/blocking.py): it carries out what the
worker's core (common/farm/worker_core.py) decides, one step at a time (connect, send and read the reply,
run tasks, close and wait), and runs the tasks it is given against the farm's store. The core
decides the rest of docs/farm-protocol.md's worker side: which dialect a server speaks (saldo's
batches, or the seed's later one-message-per-connection version), how results reach it, where to
go (REDIRECT, RETURN, failover), and how long to wait after each connection ends.

Updates of one batch are applied by `Store.apply_batch` in one transaction that also records each
task's id with its outcome, so a task delivered twice (after a lease ran out, or after this worker
died between commit and report) is applied once and answered with its first outcome. Reads (QUERY)
read the accounts table after the batch's updates are committed.

A tiny STATUS port (`--port`, in a thread) lets the lab launcher and `client.py status` see it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import uuid

from common import topology
from common.bank.errors import SaldoError, error_reply
from common.bank.money import render_cents
from common.bank.state import DEFAULT_DEDUP_WINDOW_OPS, DEFAULT_MAX_ACCOUNTS, Operation, Query, parse_request
from common.cli import UsageParser
from common.farm.core import check_id
from common.farm.worker_core import (
    DEFAULT_MAX_DELIVERY_ATTEMPTS,
    Connect,
    Execute,
    Send,
    Step,
    WorkerConfig,
    WorkerCore,
)
from common.log import configure, get_logger
from common.storage.store import check_store_url, open_store, redact
from common.transport.blocking import BlockingConnection, SelectorServer, serve_in_thread

log = get_logger("farm_worker")

DEFAULT_SERVER = f"127.0.0.1:{topology.DEFAULT_PORTS['farm_server']}"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="client.py worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="this worker's node name (logs)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"home server HOST:PORT, this worker's owner (default {DEFAULT_SERVER})")
    parser.add_argument("--failover", default="", help="servers to try when home is down, HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--store", help="the farm's store: mysql://user:pass@host:port/db or sqlite:///path (default sqlite:///var/farm.db)")
    parser.add_argument("--worker-id", help="this worker's WORKER_UUID (default: a new UUID)")
    parser.add_argument("--owner-id", help="the home server's SERVER_UUID, named while lent (default: what the home "
                                           "server says, else its HOST:PORT; a seed server never says it)")
    parser.add_argument("--max-tasks", type=int, default=64, help="tasks asked for at once (one transaction)")
    parser.add_argument("--max-accounts", type=int, default=DEFAULT_MAX_ACCOUNTS)
    parser.add_argument("--dedup-window", type=int, default=DEFAULT_DEDUP_WINDOW_OPS,
                        help="applied ids the store keeps for exactly-once redelivery (same for every worker)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the STATUS port")
    parser.add_argument("--port", type=int, default=0, help="STATUS port (0: none)")
    parser.add_argument("--connect-timeout-s", type=float, default=1.0)
    parser.add_argument("--reply-timeout-s", type=float, default=10.0,
                        help="a server that answers nothing for this long is taken for dead")
    parser.add_argument("--retry-initial-s", type=float, default=0.05,
                        help="wait after a connection ends (doubles while servers fail or have nothing to do)")
    parser.add_argument("--retry-max-s", type=float, default=2.0, help="cap of that wait")
    parser.add_argument("--jitter-fraction", type=float, default=0.2, help="each wait varies by up to this share")
    parser.add_argument("--max-delivery-attempts", type=int, default=DEFAULT_MAX_DELIVERY_ATTEMPTS,
                        help="sends of one result to a seed (v2) server before it is dropped with a warning")
    parser.add_argument("--pause-after-commit-s", type=float, default=0.0,
                        help="fault injection for the lab: hold each batch's results this long after its commit")
    return parser


class FarmWorker:
    """Carries out what the worker's core (common/farm/worker_core.py) decides: connections, sends,
    waits; runs the tasks it is given against the store."""

    def __init__(self, args: argparse.Namespace, stop: threading.Event) -> None:
        self.args = args
        self.stop = stop
        self.worker_id = check_id(args.worker_id or str(uuid.uuid4()), "--worker-id")
        failover = tuple(topology.parse_address(a.strip()) for a in str(args.failover or "").split(",") if a.strip())
        self.core = WorkerCore(WorkerConfig(
            worker_id=self.worker_id, home=topology.parse_address(args.server), failover=failover, owner_id=args.owner_id,
            max_tasks=args.max_tasks, retry_initial_s=args.retry_initial_s, retry_max_s=args.retry_max_s,
            jitter_fraction=args.jitter_fraction, max_delivery_attempts=args.max_delivery_attempts,
        ), random.Random())
        self.store = None
        self.connection: BlockingConnection | None = None
        self.tasks_done_total = 0
        self.batches_total = 0
        self.duplicates_total = 0
        self.transactions_total = 0  # update transactions (apply_batch), and the time they took, lock waits included
        self.transaction_s_total = 0.0
        self.started_at = time.monotonic()

    def run(self) -> None:
        core = self.core
        step = core.start()
        try:
            while not self.stop.is_set():
                self._log_events()
                if isinstance(step, Connect):
                    step = self._connect(step.address)
                elif isinstance(step, Send):
                    step = self._exchange(step.message)
                elif isinstance(step, Execute):
                    step = core.on_executed(self.execute(step.tasks))
                else:
                    self._disconnect()
                    self.stop.wait(step.seconds)
                    step = core.on_paused()
            self._log_events()
        finally:
            self._disconnect()

    def _connect(self, address: tuple[str, int]) -> Step:
        try:
            self.connection = BlockingConnection(*address, connect_timeout_s=self.args.connect_timeout_s)
        except OSError as error:
            return self.core.on_connect_failed(error.__class__.__name__)
        return self.core.on_connected()

    def _exchange(self, message: dict) -> Step:
        """Send one message and read its reply."""
        assert self.connection is not None
        try:
            self.connection.send(message)
            reply = self.connection.receive(self.args.reply_timeout_s)
        except (ConnectionError, TimeoutError) as error:
            return self.core.on_connection_lost(error.__class__.__name__)
        if reply is None:
            return self.core.on_connection_lost("closed_by_server")
        return self.core.on_reply(reply)

    def _disconnect(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _log_events(self) -> None:
        log.record(self.core.take_events())

    # --- Running tasks ----------------------------------------------------------------------------
    def execute(self, tasks: list) -> list[dict]:
        """Run a batch: updates in one transaction (ids recorded with outcomes), then the reads."""
        results: list[dict] = []
        updates: list[tuple[object, Operation]] = []
        queries: list[tuple[object, Query]] = []
        for body in tasks:
            task_id = body.get("ID") if type(body) is dict else None
            try:
                if type(body) is not dict:
                    raise SaldoError("NOT_OBJECT", "a task is a JSON object")
                request = parse_request(body)
            except SaldoError as error:
                results.append({"ID": task_id, "STATUS": "NOK", "ERROR": error.code, "DETAIL": error.detail})
                continue
            (queries if isinstance(request, Query) else updates).append((task_id, request))
        try:
            store = self._open_store()
            if updates:
                transaction_started = time.monotonic()
                outcomes = store.apply_batch([(op, None) for _id, op in updates], max_accounts=self.args.max_accounts,
                                             dedup_window_ops=self.args.dedup_window)
                self.transactions_total += 1
                self.transaction_s_total += time.monotonic() - transaction_started
                for (task_id, _op), (outcome, duplicate) in zip(updates, outcomes):
                    self.duplicates_total += duplicate
                    if outcome.error is None:
                        results.append({"ID": task_id, "STATUS": "OK", "BALANCE": render_cents(outcome.balance_cents)})
                    else:
                        results.append({"ID": task_id, "STATUS": "NOK", "ERROR": outcome.error})
            if queries:
                balances = store.balances_of([query.account for _id, query in queries])
                for task_id, query in queries:
                    cents = balances.get(query.account)
                    if cents is None:
                        results.append({"ID": task_id, "STATUS": "NOK", "ERROR": "ACCOUNT_NOT_FOUND"})
                    else:
                        results.append({"ID": task_id, "STATUS": "OK", "BALANCE": render_cents(cents)})
        except Exception as error:  # the store failed: the server redelivers (dedup keeps it exactly-once)
            log.error("store_failed", error=repr(error)[:300], tasks=len(tasks))
            self._close_store()
            done = {r["ID"] for r in results}
            results.extend({"ID": body.get("ID"), "STATUS": "NOK", "ERROR": "UNAVAILABLE", "DETAIL": "the worker's store failed"}
                           for body in tasks if type(body) is dict and body.get("ID") not in done)
            self.stop.wait(0.1)
        self.batches_total += 1
        self.tasks_done_total += len(results)
        if self.args.pause_after_commit_s > 0:
            self.stop.wait(self.args.pause_after_commit_s)
        return results

    def _open_store(self):
        if self.store is None:
            self.store = open_store(self.args.store)
            log.info("store_opened", store=redact(self.args.store))
        return self.store

    def _close_store(self) -> None:
        if self.store is not None:
            try:
                self.store.close()
            finally:
                self.store = None

    def status(self) -> dict:
        connection = self.connection  # read once: the worker's thread replaces it
        return {
            "STATUS": "OK",
            "ROLE": "farm-worker",
            "NODE": self.args.name,
            "PID": os.getpid(),
            "WORKER_UUID": self.worker_id,
            **self.core.status(),
            "CONNECTED_TO": connection.peer if connection is not None else None,
            "TASKS_DONE_TOTAL": self.tasks_done_total,
            "BATCHES_TOTAL": self.batches_total,
            "DUPLICATES_TOTAL": self.duplicates_total,
            "TRANSACTIONS_TOTAL": self.transactions_total,
            "TRANSACTION_MS_TOTAL": round(self.transaction_s_total * 1000),
            "UPTIME_S": round(time.monotonic() - self.started_at, 3),
        }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = topology.parse_args(parser, argv)
    if args.name is None:
        args.name = f"worker-{os.getpid()}"
    if args.store is None:
        args.store = "sqlite:///var/farm.db"
    configure(args.name, args.log_level)
    try:
        topology.parse_address(args.server)
        check_id(args.worker_id or "x", "--worker-id")
        if args.owner_id is not None:
            check_id(args.owner_id, "--owner-id")
        check_store_url(args.store)
        if not 0 < args.retry_initial_s <= args.retry_max_s:
            raise ValueError("--retry-initial-s must be more than 0 and at most --retry-max-s")
        if not 0 <= args.jitter_fraction < 1:
            raise ValueError("--jitter-fraction must be from 0 to less than 1")
        if args.max_tasks < 1 or args.max_delivery_attempts < 1:
            raise ValueError("--max-tasks and --max-delivery-attempts must be at least 1")
    except (ValueError, SaldoError) as error:
        parser.error(str(error))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    worker = FarmWorker(args, stop)
    status_server = None
    if args.port:
        status_server = SelectorServer(
            lambda message: worker.status() if message.get("TASK") == "STATUS" else
            error_reply("WRONG_ROLE", "a worker's port answers STATUS only"),
            name=f"{args.name}-status",
        )
        status_server.bind(args.host, args.port)
        serve_in_thread(status_server)
    log.info("worker_started", worker=worker.worker_id, server=args.server, store=redact(args.store), max_tasks=args.max_tasks)
    try:
        worker.run()
    finally:
        if status_server is not None:
            status_server.stop()
        worker._close_store()
    log.info("exited", code=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
