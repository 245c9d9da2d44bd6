"""A farm worker: `python client.py worker --server HOST:PORT --store URL` (seed 000's client.py).

Owns the worker's side of docs/farm-protocol.md, as a plain blocking program (common/blocking.py):
ask a server for work with `{"WORKER": "ALIVE", ...}`, run the batch it gets against the farm's
store, report the results with the next ALIVE, and go where the server says (REDIRECT to a borrower,
RETURN home). Updates of one batch are applied by `Store.apply_batch` in one transaction that also
records each task's id with its outcome, so a task delivered twice (after a lease ran out, or after
this worker died between commit and report) is applied once and answered with its first outcome.
Reads (QUERY) read the accounts table after the batch's updates are committed.

Where it connects: its home server (`--server`, its owner); a borrower while lent; on losing a
server it goes home first, then through its failover list (`--failover`, and the FAILOVER_LIST
servers send), waiting between attempts with exponential backoff and jitter.

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
from common.bank import DEFAULT_DEDUP_WINDOW_OPS, DEFAULT_MAX_ACCOUNTS, Operation, Query, parse_request
from common.blocking import BlockingConnection, SelectorServer, serve_in_thread
from common.cli import UsageParser
from common.errors import SaldoError, error_reply
from common.farm import check_id
from common.log import configure, get_logger
from common.money import render_cents
from common.store import check_store_url, open_store, redact

log = get_logger("farm_worker")

DEFAULT_SERVER = f"127.0.0.1:{topology.DEFAULT_PORTS['farm_server']}"
# Servers named in FAILOVER_LIST messages that a worker remembers.
MAX_FAILOVER_SERVERS = 16
# How a session with one server ended.
SERVED, LOST, REFUSED = "served", "lost", "refused"


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(prog="client.py worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="this worker's node name (logs)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"home server HOST:PORT, this worker's owner (default {DEFAULT_SERVER})")
    parser.add_argument("--failover", default="", help="servers to try when home is down, HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--store", help="the farm's store: mysql://user:pass@host:port/db or sqlite:///path (default sqlite:///var/farm.db)")
    parser.add_argument("--worker-id", help="this worker's WORKER_UUID (default: a new UUID)")
    parser.add_argument("--max-tasks", type=int, default=64, help="tasks asked for at once (one transaction)")
    parser.add_argument("--max-accounts", type=int, default=DEFAULT_MAX_ACCOUNTS)
    parser.add_argument("--dedup-window", type=int, default=DEFAULT_DEDUP_WINDOW_OPS,
                        help="applied ids the store keeps for exactly-once redelivery (same for every worker)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the STATUS port")
    parser.add_argument("--port", type=int, default=0, help="STATUS port (0: none)")
    parser.add_argument("--connect-timeout-s", type=float, default=1.0)
    parser.add_argument("--reply-timeout-s", type=float, default=10.0,
                        help="a server that answers nothing for this long is taken for dead")
    parser.add_argument("--retry-initial-s", type=float, default=0.05, help="first wait after a failed connection (doubles)")
    parser.add_argument("--retry-max-s", type=float, default=2.0, help="cap of that wait")
    parser.add_argument("--jitter-fraction", type=float, default=0.2)
    parser.add_argument("--pause-after-commit-s", type=float, default=0.0,
                        help="fault injection for the lab: hold each batch's results this long after its commit")
    return parser


class FarmWorker:
    def __init__(self, args: argparse.Namespace, stop: threading.Event) -> None:
        self.args = args
        self.stop = stop
        self.worker_id = check_id(args.worker_id or str(uuid.uuid4()), "--worker-id")
        self.home = topology.parse_address(args.server)
        self.failover = [topology.parse_address(a.strip()) for a in str(args.failover or "").split(",") if a.strip()]
        self.current = self.home
        self.owner: str | None = None  # the home server's SERVER_UUID, once it said it
        self.rng = random.Random()
        self.store = None
        self.connected_to: tuple[str, int] | None = None
        self.tasks_done_total = 0
        self.batches_total = 0
        self.duplicates_total = 0
        self.moves_total = 0
        self.started_at = time.monotonic()

    # --- Where to work ---------------------------------------------------------------------------
    def run(self) -> None:
        failures = 0
        candidates_tried = 0
        while not self.stop.is_set():
            target = self.current
            try:
                connection = BlockingConnection(*target, connect_timeout_s=self.args.connect_timeout_s)
            except OSError as error:
                failures += 1
                candidates_tried += 1
                log.info("connect_failed", server=topology.format_address(target), error=error.__class__.__name__)
                self._next_server(candidates_tried)
                self._sleep(self._backoff_s(failures))
                continue
            self.connected_to = target
            try:
                outcome = self._session(connection)
            finally:
                connection.close()
                self.connected_to = None
            if outcome == SERVED:
                failures = 0
                candidates_tried = 0
            elif outcome == REFUSED:  # the same server, a little later (e.g. it has not seen our old connection close)
                failures += 1
                self._sleep(self._backoff_s(failures))
            else:
                failures += 1
                candidates_tried += 1
                self._next_server(candidates_tried)
                self._sleep(self._backoff_s(failures))

    def _next_server(self, tried: int) -> None:
        """After losing `self.current`: home first, then the failover list in turn."""
        candidates = [self.home] + [a for a in self.failover if a != self.home]
        if self.current != self.home:
            self.current = self.home
        else:
            self.current = candidates[tried % len(candidates)]
        if self.current != self.home:
            log.info("failing_over", server=topology.format_address(self.current))

    def _backoff_s(self, failures: int) -> float:
        args = self.args
        base = min(args.retry_max_s, args.retry_initial_s * 2 ** min(failures - 1, 20))
        return base * (1.0 + args.jitter_fraction * (2.0 * self.rng.random() - 1.0))

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def _learn_failover(self, servers: object) -> None:
        if type(servers) is not list:
            return
        learned = []
        for entry in servers[:MAX_FAILOVER_SERVERS]:
            if type(entry) is dict and type(entry.get("IP")) is str and type(entry.get("PORT")) is int:
                learned.append((entry["IP"], entry["PORT"]))
        if learned:
            self.failover = learned

    # --- One connection -------------------------------------------------------------------------
    def _session(self, connection: BlockingConnection) -> str:
        """Serve on one server until it sends us elsewhere or the connection breaks: SERVED when the
        server answered at least once (a reachable server resets the backoff), LOST when it never
        did, REFUSED when it said NOK."""
        results: list[dict] = []
        answered = False
        while not self.stop.is_set():
            alive = {"WORKER": "ALIVE", "WORKER_UUID": self.worker_id, "MAX_TASKS": self.args.max_tasks,
                     "ACCEPTS": ["QUERY", "UPDATE"]}
            # Our owner: its SERVER_UUID once it said it, its address until then (a saldo server's
            # default id, and one it recognizes as itself), so no other server takes us for its own.
            alive["SERVER_UUID"] = self.owner or topology.format_address(self.home)
            if results:
                alive["RESULTS"] = results
            try:
                connection.send(alive)
                reply = connection.receive(self.args.reply_timeout_s)
            except (ConnectionError, TimeoutError) as error:
                log.warning("server_lost", server=connection.peer, error=error.__class__.__name__, results_dropped=len(results))
                return SERVED if answered else LOST
            results = []
            if reply is None:
                log.warning("server_closed", server=connection.peer)
                return SERVED if answered else LOST
            if isinstance(reply, SaldoError):
                log.warning("undecodable_reply", server=connection.peer, error=reply.code)
                continue
            answered = True
            task = reply.get("TASK")
            if self.current == self.home and type(reply.get("SERVER_UUID")) is str and task != "REDIRECT":
                self.owner = reply["SERVER_UUID"]
            if task == "BATCH":
                self._learn_failover(reply.get("FAILOVER_LIST"))
                tasks = reply.get("TASKS")
                results = self.execute(tasks if type(tasks) is list else [])
            elif task == "NO_TASK":
                self._learn_failover(reply.get("FAILOVER_LIST"))
            elif task == "REDIRECT":
                self._follow_redirect(reply)
                return SERVED
            elif task == "RETURN":
                log.info("returning_home", home=topology.format_address(self.home), borrower=connection.peer)
                self.current = self.home
                self.moves_total += 1
                return SERVED
            elif reply.get("STATUS") == "NOK":
                log.warning("server_refused", server=connection.peer, error=reply.get("ERROR"), detail=reply.get("DETAIL"))
                return REFUSED  # e.g. WORKER_ID_IN_USE while the server has not yet seen our old connection close
            elif task is not None:  # a single task in the seed's shape
                results = self.execute([reply])
        return SERVED

    def _follow_redirect(self, reply: dict) -> None:
        target = reply.get("TARGET_MASTER") or {}
        home = reply.get("HOME_MASTER") or {}
        try:
            self.current = (str(target["IP"]), int(target["PORT"]))
            if home:
                self.home = (str(home["IP"]), int(home["PORT"]))
        except (KeyError, TypeError, ValueError):
            log.warning("bad_redirect", reply=str(reply)[:200])
            return
        if type(reply.get("SERVER_UUID")) is str:
            self.owner = reply["SERVER_UUID"]  # the lender: it stays our owner while we serve elsewhere
        self._learn_failover(reply.get("FAILOVER_LIST"))
        self.moves_total += 1
        log.info("redirected", target=topology.format_address(self.current), home=topology.format_address(self.home))

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
                outcomes = store.apply_batch([(op, None) for _id, op in updates], max_accounts=self.args.max_accounts,
                                             dedup_window_ops=self.args.dedup_window)
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
            self._sleep(0.1)
        self.batches_total += 1
        self.tasks_done_total += len(results)
        if self.args.pause_after_commit_s > 0:
            self._sleep(self.args.pause_after_commit_s)
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
        return {
            "STATUS": "OK",
            "ROLE": "farm-worker",
            "NODE": self.args.name,
            "PID": os.getpid(),
            "WORKER_UUID": self.worker_id,
            "OWNER": self.owner,
            "HOME": topology.format_address(self.home),
            "CONNECTED_TO": topology.format_address(self.connected_to) if self.connected_to else None,
            "TASKS_DONE_TOTAL": self.tasks_done_total,
            "BATCHES_TOTAL": self.batches_total,
            "DUPLICATES_TOTAL": self.duplicates_total,
            "MOVES_TOTAL": self.moves_total,
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
        check_store_url(args.store)
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
