"""The worker farm as processes on MariaDB: lending, worker and server crashes, a seed-000 worker,
bad input. Each test starts real servers and workers (common/lab/arch_farm.py's layout: farm1 and
farm2, workers owned alternately by them) on loopback addresses, does one thing, and checks what
the servers say (STATUS) and what the shared store holds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pytest

from common import topology
from common.bank.state import DEPOSIT, Operation
from common.lab import checker
from common.lab.arch_farm import build
from common.lab.archs import LayoutOptions
from common.lab.cluster import REPO_ROOT, Cluster
from common.lab.workload import Workload, WorkloadConfig
from common.storage.store import open_store
from common.transport import wire
from common.transport.blocking import BlockingConnection

pytestmark = pytest.mark.slow


def start_farm(tmp_path, store_url: str, **options) -> tuple[Cluster, object]:
    lab = build(LayoutOptions(run_dir=tmp_path, ports="free", store=store_url, request_timeout_s=2.0,
                              extra={key: str(value) for key, value in options.items()}))
    cluster = Cluster(tmp_path, lab.nodes, name="farm-test")
    lab.cluster = cluster
    cluster.start()
    # A worker that starts before its home server listens serves the other one until it is given
    # back: begin each scenario once every worker is at home, idle.
    workers = int(options.get("workers", 4))
    homes = {"farm1": (workers + 1) // 2, "farm2": workers // 2}
    for name, count in homes.items():
        wait_for(lambda: (w := cluster.status(name)["WORKERS"])["HOME"] == count and w["BORROWED"] == 0 and w["IDLE"] == count,
                 15, f"{name} has its {count} workers at home")
    return cluster, lab


def address(cluster: Cluster, name: str) -> tuple[str, int]:
    node = cluster.nodes[name]
    return node.host, node.port


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def run_tasks(server: tuple[str, int], messages: list[dict], timeout_s: float = 30.0) -> dict[str, dict]:
    """Send every message at once on one connection (pipelined); the reply to each, by ID."""
    deadline = time.monotonic() + timeout_s
    with BlockingConnection(*server) as connection:
        connection.send_bytes(b"".join(wire.encode(m) for m in messages), timeout_s)
        return {m["ID"]: connection.wait_reply(m["ID"], max(0.0, deadline - time.monotonic())) for m in messages}


def client_py(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """client.py as a user runs it: its printed line and its exit code."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "client.py"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def deposit(account: str, amount: str = "1.00") -> dict:
    return {"TASK": "DEPOSIT", "ID": str(uuid.uuid4()), "ACCOUNT": account, "AMOUNT": amount}


def store_url_of(lab) -> str:
    return lab.stores()["farm1"]


def applied_rows(store_url: str, op_id: str) -> int:
    store = open_store(store_url)
    try:
        return sum(1 for row in store.load().recent if row.op.op_id == op_id)
    finally:
        store.close()


class StatusWatch:
    """Polls a server's STATUS in a thread and keeps the largest figures seen."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.max_borrowed = 0
        self.first_borrowed_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.cluster.status(self.name, timeout_s=1.0)
            except OSError:
                status = {}
            borrowed = (status.get("WORKERS") or {}).get("BORROWED", 0)
            if borrowed and self.first_borrowed_at is None:
                self.first_borrowed_at = time.monotonic()
            self.max_borrowed = max(self.max_borrowed, borrowed)
            self._stop.wait(0.05)

    def __enter__(self) -> "StatusWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)


# Small thresholds and slow workers (4 tasks per batch, 50 ms between commit and report), so that
# a burst of a few hundred tasks overloads one server for a few seconds.
LENDING = dict(workers=4, max_tasks=4, pause_after_commit_s=0.05, lend_queue_threshold=20, overload_s=0.2,
               return_queue_threshold=5, underload_s=0.5, min_own_workers=1, heartbeat_interval_s=0.2)


def test_a_burst_on_one_server_borrows_workers_completes_every_task_and_returns_them(tmp_path, mysql_url):
    cluster, lab = start_farm(tmp_path, mysql_url, **LENDING)
    with cluster:
        accounts = [f"acct-{i}" for i in range(10)]
        burst = [deposit(accounts[i % 10]) for i in range(600)]
        with StatusWatch(cluster, "farm1") as watch:
            replies = run_tasks(address(cluster, "farm1"), burst)
        assert all(reply["STATUS"] == "OK" for reply in replies.values()), [r for r in replies.values() if r["STATUS"] != "OK"][:3]
        assert watch.max_borrowed >= 1  # farm2 lent a worker while farm1's queue was long
        farm1 = cluster.status("farm1")
        assert farm1["TASKS_BY_BORROWED_TOTAL"] > 0 and farm1["LOANS_RECEIVED_TOTAL"] >= 1
        # Like every asyncio process, a server reports its transport and its event loop.
        assert farm1["IO"]["MESSAGES_READ"] > 600 and type(farm1["LOOP"]["STALLS_TOTAL"]) is int
        # The right balances: 60 deposits of 1.00 into each account, read through the farm too.
        store = open_store(store_url_of(lab))
        try:
            assert store.balances_of(accounts) == {account: 6000 for account in accounts}
        finally:
            store.close()
        read = run_tasks(address(cluster, "farm1"), [{"TASK": "QUERY", "USER": "acct-3", "ID": "q-1"}])["q-1"]
        assert read["STATUS"] == "OK" and read["SALDO"] == "60.00"
        # The load is over: the borrowed worker goes home and farm2 has both of its own again.
        wait_for(lambda: cluster.status("farm1")["WORKERS"]["BORROWED"] == 0, 10, "farm1 gives its borrowed workers back")
        wait_for(lambda: cluster.status("farm2")["WORKERS"]["HOME"] == 2 and cluster.status("farm2")["WORKERS"]["LENT_OUT"] == 0,
                 10, "farm2's workers are home")


def test_a_single_task_at_a_server_without_workers_is_run_by_a_borrowed_one(tmp_path, mysql_url):
    # One worker, at farm1; farm2 has none. One task at farm2 is far below its lending threshold,
    # but nothing else would ever run it: farm2 borrows the worker, then gives it back.
    cluster, _lab = start_farm(tmp_path, mysql_url, workers=1, min_own_workers=0, overload_s=0.2, underload_s=0.5,
                               heartbeat_interval_s=0.2)
    with cluster:
        assert cluster.status("farm2")["WORKERS"]["HOME"] == 0
        started = time.monotonic()
        reply = run_tasks(address(cluster, "farm2"), [deposit("alone", "2.50")], timeout_s=15.0)
        (only,) = reply.values()
        assert only["STATUS"] == "OK" and only["BALANCE"] == "2.50", only
        assert time.monotonic() - started < 10.0
        assert cluster.status("farm2")["TASKS_BY_BORROWED_TOTAL"] == 1
        wait_for(lambda: cluster.status("farm1")["WORKERS"]["HOME"] == 1 and cluster.status("farm2")["WORKERS"]["BORROWED"] == 0,
                 10, "the worker is home again")


def test_a_worker_killed_between_commit_and_report_is_replaced_and_the_task_applied_once(tmp_path, mysql_url):
    # worker1 and worker3 belong to farm1; each holds its results 1.5 s after committing.
    cluster, lab = start_farm(tmp_path, mysql_url, workers=3, pause_after_commit_s=1.5)
    with cluster:
        task = deposit("alice", "12.34")
        result: dict = {}
        sender = threading.Thread(target=lambda: result.update(run_tasks(address(cluster, "farm1"), [task], 20.0)))
        sender.start()
        holder = wait_for(lambda: next((w["WORKER_UUID"] for w in cluster.status("farm1")["WORKER_LIST"] if w["HELD"]), None),
                          10, "a worker holds the task")
        wait_for(lambda: applied_rows(store_url_of(lab), task["ID"]) == 1, 10, "the task is committed")
        cluster.kill(holder)  # before it could report
        sender.join(25)
        reply = result[task["ID"]]
        assert reply["STATUS"] == "OK" and reply["BALANCE"] == "12.34"
        assert applied_rows(store_url_of(lab), task["ID"]) == 1
        store = open_store(store_url_of(lab))
        try:
            image = store.load()
        finally:
            store.close()
        assert image.balances == {"alice": 1234} and image.counters.deposited_cents_total == 1234
        farm1 = cluster.status("farm1")
        assert farm1["TASKS_REQUEUED_TOTAL"] >= 1
        assert next(w for w in farm1["WORKER_LIST"] if w["WORKER_UUID"] != holder)["TASKS_DONE"] == 1


def test_when_the_borrowing_server_is_killed_its_borrowed_workers_go_home_and_serve_their_owner(tmp_path, mysql_url):
    cluster, lab = start_farm(tmp_path, mysql_url, **LENDING)
    with cluster:
        burst = [deposit(f"acct-{i % 10}") for i in range(1500)]
        sender = threading.Thread(target=lambda: run_tasks(address(cluster, "farm1"), burst, 20.0), daemon=True)
        sender.start()
        wait_for(lambda: cluster.status("farm1")["WORKERS"]["BORROWED"] >= 1, 10, "farm1 borrows from farm2")
        lent = [w["WORKER_UUID"] for w in cluster.status("farm2")["WORKER_LIST"] if w["PLACEMENT"] == "lent"]
        assert lent
        cluster.kill("farm1")
        wait_for(lambda: all(w["PLACEMENT"] == "home" and w["CONNECTED"]
                             for w in cluster.status("farm2")["WORKER_LIST"] if w["WORKER_UUID"] in lent)
                 and all(any(w["WORKER_UUID"] == name for w in cluster.status("farm2")["WORKER_LIST"]) for name in lent),
                 10, "the lent workers are home at farm2")
        before = {w["WORKER_UUID"]: w["TASKS_DONE"] for w in cluster.status("farm2")["WORKER_LIST"]}
        replies = run_tasks(address(cluster, "farm2"), [deposit("bob") for _ in range(200)], 20.0)
        assert all(reply["STATUS"] == "OK" for reply in replies.values())
        after = {w["WORKER_UUID"]: w["TASKS_DONE"] for w in cluster.status("farm2")["WORKER_LIST"]}
        assert sum(after[name] - before.get(name, 0) for name in lent) > 0  # the returned ones serve their owner
        sender.join(25)


def test_when_a_server_is_killed_its_workers_fail_over_and_no_acknowledged_task_is_lost(tmp_path, mysql_url):
    cluster, lab = start_farm(tmp_path, mysql_url, workers=4, entry="first", heartbeat_interval_s=0.2)
    with cluster:
        config = WorkloadConfig(clients=4, window=8, accounts=6, duration_s=4.0, attempt_timeout_s=1.0, op_deadline_s=20.0)

        async def drive() -> list:
            workload = Workload(config, lambda index: lab.make_client(index, config.window), progress=False)
            seeder = lab.make_client(-1, 1)
            await workload.seed_accounts(seeder)
            await seeder.close()
            loop = asyncio.get_running_loop()
            loop.call_later(1.5, cluster.kill, "farm1")
            return await workload.run()

        history = asyncio.run(drive())
        # farm1's own workers are at farm2 now, still naming farm1 as their owner.
        farm2 = wait_for(lambda: (s := cluster.status("farm2"))["WORKERS"]["BORROWED"] == 2 and s, 10,
                         "farm1's workers serve farm2")
        assert {w["OWNER"] for w in farm2["WORKER_LIST"] if w["PLACEMENT"] == "borrowed"} == {cluster.nodes["farm1"].host + ":" + str(cluster.nodes["farm1"].port)}
        outcomes = [record.outcome for record in history]
        assert outcomes.count("unknown") == 0 and outcomes.count("ok") > 100
        cluster.close()
        store = open_store(store_url_of(lab))
        try:
            image = store.load()
        finally:
            store.close()
        result = checker.check(history, {"farm": image}, total_order=True)
        assert result.valid, result.to_json()


def _seed_worker(server: tuple[str, int], stop: threading.Event, alive: bytes, answer, *, acknowledged: bool) -> None:
    """A worker in seed 000's dialect: it says `alive`, takes a QUERY, sends `answer(task)` (a dict),
    and again, at most 1000 times, until `stop`; with `acknowledged` (v2) it reads the server's ACK
    after each answer."""
    with socket.create_connection(server, timeout=0.2) as sock:
        pending = b""

        def read_line() -> bytes | None:
            """One line from the server, waiting as long as it takes (None once stopped or closed)."""
            nonlocal pending
            while b"\n" not in pending:
                if stop.is_set():
                    return None
                try:
                    data = sock.recv(65536)
                except (TimeoutError, socket.timeout):
                    continue
                if not data:
                    return None
                pending += data
            line, _, pending = pending.partition(b"\n")
            return line

        for _ in range(1000):
            sock.sendall(alive)
            line = read_line()
            if line is None:
                return
            task = json.loads(line)
            if task.get("TASK") != "QUERY":
                continue
            sock.sendall(answer(task))
            if acknowledged and read_line() is None:
                return


def _seed_000_worker(server: tuple[str, int], mysql_url: str, stop: threading.Event, served: list) -> None:
    """A worker written from seed 000's tables only: ALIVE, then a QUERY, then STATUS OK with SALDO
    (or NOK with an ERROR text); it reads the balance from MySQL itself."""
    import pymysql

    parsed = urllib.parse.urlsplit(mysql_url)
    database = pymysql.connect(host=parsed.hostname, port=parsed.port or 3306, user=parsed.username or "root",
                               password=parsed.password or "", database=parsed.path.lstrip("/"), autocommit=True)

    def answer(task: dict) -> bytes:
        with database.cursor() as cursor:
            cursor.execute("SELECT balance_cents FROM accounts WHERE name = %s", (task["USER"],))
            row = cursor.fetchone()
        served.append(task["USER"])
        if row is None:
            return (json.dumps({"STATUS": "NOK", "TASK": "QUERY", "ERROR": "User not found"}) + "\n").encode()
        return (json.dumps({"STATUS": "OK", "SALDO": row[0] / 100}) + "\n").encode()

    with database:
        _seed_worker(server, stop, b'{"WORKER": "ALIVE"}\n', answer, acknowledged=False)


def test_a_worker_that_speaks_only_seed_000s_tables_completes_tasks(tmp_path, mysql_url):
    cluster, lab = start_farm(tmp_path, mysql_url, workers=0)
    with cluster:
        store = open_store(store_url_of(lab))
        try:
            store.apply_batch([(Operation("seed-alice", DEPOSIT, "alice", None, 9999), None)], max_accounts=100,
                              dedup_window_ops=100)
        finally:
            store.close()
        stop = threading.Event()
        served: list[str] = []
        worker = threading.Thread(target=_seed_000_worker,
                                  args=(address(cluster, "farm1"), store_url_of(lab), stop, served), daemon=True)
        worker.start()
        try:
            wait_for(lambda: cluster.status("farm1")["WORKERS"]["IDLE"] == 1, 10, "the seed worker waits for work")
            replies = run_tasks(address(cluster, "farm1"), [
                {"TASK": "QUERY", "USER": "alice", "ID": "q-alice"},
                {"TASK": "QUERY", "USER": "nobody", "ID": "q-nobody"},
                {"TASK": "BALANCE", "ACCOUNT": "alice", "ID": "b-alice"},
            ], 10.0)
        finally:
            stop.set()
        assert replies["q-alice"] == {"ID": "q-alice", "STATUS": "OK", "BALANCE": "99.99", "SALDO": "99.99", "USER": "alice"}
        assert replies["q-nobody"]["STATUS"] == "NOK" and replies["q-nobody"]["ERROR"] == "TASK_FAILED"
        assert replies["q-nobody"]["DETAIL"] == "User not found"
        assert replies["b-alice"]["BALANCE"] == "99.99"
        assert served == ["alice", "nobody", "alice"]
        worker.join(5)


def test_bad_input_on_the_server_port_gets_a_clear_error_and_changes_nothing(tmp_path, mysql_url):
    cluster, lab = start_farm(tmp_path, mysql_url, workers=1)
    with cluster:
        farm1 = address(cluster, "farm1")
        before = cluster.status("farm1")
        cases = [
            (b"this is not json\n", "INVALID_JSON"),
            (b'["a", "list"]\n', "NOT_OBJECT"),
            (b'{"TASK": "LAUNCH", "ID": "t1"}\n', "UNKNOWN_MESSAGE"),
            (b'{"RESPONSE": ["ALIVE"]}\n', "FIELD_TYPE"),
            (b'{"TASK": {"WORKER_REQUEST": 1}}\n', "FIELD_TYPE"),
            (b'{"TASK": "DEPOSIT", "ID": "t2", "ACCOUNT": "a b", "AMOUNT": "1"}\n', "ACCOUNT_INVALID"),
            (b'{"WORKER": "ALIVE", "WORKER_UUID": "worker1", "MAX_TASKS": 4, "ACCEPTS": ["UPDATE"]}\n', "WORKER_ID_IN_USE"),
            (b'{"TASK": "WORKER_REQUEST", "WORKERS_NEEDED": 2, "SERVER_UUID": "intruder"}\n', "NOT_PEER"),
            (b'{"TASK": "COMMAND_RELEASE", "WORKERS_UUID": ["worker1"]}\n', "NOT_PEER"),
            (b'{"SERVER": "ALIVE", "TASK": "REQUEST"}\n', "NOT_PEER"),
        ]
        for line, code in cases:
            with BlockingConnection(*farm1) as connection:
                connection.send_bytes(line)
                reply = connection.receive(5.0)
            assert reply["STATUS"] == "NOK" and reply["ERROR"] == code and isinstance(reply["DEFINITE"], bool), (line, reply)
            assert reply["DETAIL"]
        with BlockingConnection(*farm1) as connection:  # an oversize line: LINE_TOO_LONG, then closed
            connection.send_bytes(b'{"TASK": "QUERY", "USER": "' + b"x" * (wire.MAX_LINE_BYTES + 10) + b'"}\n', 5.0)
            reply = connection.receive(5.0)
            assert reply["ERROR"] == "LINE_TOO_LONG"
            assert connection.receive(5.0) is None
        after = cluster.status("farm1")
        for key in ("QUEUE_LENGTH", "WORKERS", "LOANS_GIVEN_TOTAL", "TASKS_COMPLETED_TOTAL"):
            assert after[key] == before[key], key
        assert [(w["WORKER_UUID"], w["PLACEMENT"], w["CONNECTED"]) for w in after["WORKER_LIST"]] == [("worker1", "home", True)]
        # Still serving.
        task = deposit("carol", "5.00")
        assert run_tasks(farm1, [task], 10.0)[task["ID"]]["BALANCE"] == "5.00"


def test_an_id_retried_at_the_other_server_answers_the_first_outcome_and_an_id_reused_changes_nothing(tmp_path, mysql_url):
    """The servers share one store: a retry is recognised wherever it arrives, and an id that names
    another operation is refused (ID_REUSED) without touching a balance."""
    cluster, lab = start_farm(tmp_path, mysql_url, workers=2)
    with cluster:
        farm1, farm2 = address(cluster, "farm1"), address(cluster, "farm2")
        first = deposit("dora", "7.00")
        assert run_tasks(farm1, [first], 10.0)[first["ID"]]["BALANCE"] == "7.00"
        retry = dict(first)  # the same operation, the same id, at the other server
        assert run_tasks(farm2, [retry], 10.0)[first["ID"]]["BALANCE"] == "7.00"
        reused = {"TASK": "WITHDRAW", "ID": first["ID"], "ACCOUNT": "dora", "AMOUNT": "2.00"}
        reply = run_tasks(farm1, [reused], 10.0)[first["ID"]]
        assert reply["STATUS"] == "NOK" and reply["ERROR"] == "ID_REUSED", reply
        query = {"TASK": "QUERY", "ID": "q-dora", "USER": "dora"}
        assert run_tasks(farm2, [query], 10.0)["q-dora"]["BALANCE"] == "7.00"
        assert applied_rows(store_url_of(lab), first["ID"]) == 1


def test_the_readmes_farm_serves_a_task_sent_to_the_server_without_a_worker_and_says_so_when_none_is_left(tmp_path, mysql_url):
    """The README's example: two servers and one worker, which its server keeps (--min-own-workers
    1, the default). A task sent to the other server is run by that worker; once it is gone, the
    client hears NO_WORKER, not a timeout."""
    cluster, _lab = start_farm(tmp_path, mysql_url, workers=1)
    with cluster:
        farm1, farm2 = (topology.format_address(address(cluster, name)) for name in ("farm1", "farm2"))
        served = client_py("--arch", "farm", "--address", farm2, "deposit", "alice", "5")
        assert (served.returncode, served.stdout.strip()) == (0, "OK balance=5.00"), served
        assert cluster.status("farm2")["TASKS_FORWARDED_TOTAL"] == 1
        assert cluster.status("farm1")["WORKERS"]["HOME"] == 1  # the worker stayed where it was
        status = client_py("status", farm2)
        assert "no worker is connected here: tasks go to a peer that has one" in status.stdout, status.stdout
        cluster.kill("worker1")
        wait_for(lambda: cluster.status("farm1")["RUNS"] == [], 10, "farm1 knows its worker is gone")
        started = time.monotonic()
        refused = client_py("--arch", "farm", "--address", farm1, "--address", farm2, "deposit", "bob", "1")
        assert refused.returncode == 1, refused  # the bank said no: nothing was done
        assert refused.stdout.startswith("NOK NO_WORKER: no worker can run an update now: no worker is connected here"), refused
        assert time.monotonic() - started < 15.0


def test_a_read_retried_while_its_task_waits_for_a_slow_worker_is_run_once(tmp_path, mysql_url):
    """Each balance command times out its first attempt (the only worker takes 2.5 s per batch) and
    asks again, at the other server: the retry joins the task, so each command runs one task."""
    cluster, lab = start_farm(tmp_path, mysql_url, workers=1, pause_after_commit_s=2.5)
    with cluster:
        farm1, farm2 = (topology.format_address(address(cluster, name)) for name in ("farm1", "farm2"))
        seeded = deposit("alice", "7.00")
        assert run_tasks(address(cluster, "farm1"), [seeded], 15.0)[seeded["ID"]]["STATUS"] == "OK"
        before = cluster.status("worker1")["TASKS_DONE_TOTAL"]
        commands = 3
        for _ in range(commands):
            read = client_py("--arch", "farm", "--address", farm1, "--address", farm2, "balance", "alice")
            assert (read.returncode, read.stdout.strip()) == (0, "OK balance=7.00"), read
        assert cluster.status("worker1")["TASKS_DONE_TOTAL"] - before == commands


def _bad_seed_worker(server: tuple[str, int], saldo: bytes, stop: threading.Event, deliveries: list) -> None:
    """A seed v2 worker whose every answer carries `saldo`, a SALDO that is not a balance."""

    def answer(_task: dict) -> bytes:
        deliveries.append(time.monotonic())
        return b'{"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": "seed-bad", "SALDO": ' + saldo + b"}\n"

    _seed_worker(server, stop, b'{"WORKER": "ALIVE", "WORKER_UUID": "seed-bad"}\n', answer, acknowledged=True)


def test_a_worker_whose_saldo_is_not_a_balance_is_named_and_the_read_refused_after_a_few_deliveries(tmp_path, mysql_url):
    cluster, _lab = start_farm(tmp_path, mysql_url, workers=0, max_task_attempts=3)
    with cluster:
        farm1 = address(cluster, "farm1")
        stop = threading.Event()
        deliveries: list[float] = []
        worker = threading.Thread(target=_bad_seed_worker, args=(farm1, b"1e30", stop, deliveries), daemon=True)
        worker.start()
        try:
            wait_for(lambda: cluster.status("farm1")["WORKERS"]["IDLE"] == 1, 10, "the seed worker waits for work")
            read = client_py("--arch", "farm", "--address", topology.format_address(farm1), "balance", "alice")
        finally:
            stop.set()
            worker.join(5)
        assert read.returncode == 1, read
        assert read.stdout.startswith("NOK BAD_RESULT: worker seed-bad sent SALDO 1E+30, not a balance"), read.stdout
        assert len(deliveries) == 3  # max_task_attempts, and the client did not ask again
        farm = cluster.status("farm1")
        assert farm["BAD_RESULTS_TOTAL"] == 3 and farm["WORKER_LIST"][0]["BAD_RESULTS"] == 3


def _seed_v2_worker(server: tuple[str, int], stop: threading.Event, served: list) -> None:
    """A worker of the seed's later version: a new connection for each message, ALIVE with its
    WORKER_UUID, and for a QUERY a STATUS without the balance (that version reports none)."""

    def exchange(message: dict) -> dict | None:
        with socket.create_connection(server, timeout=5.0) as sock:
            sock.sendall((json.dumps(message) + "\n").encode())
            line = sock.makefile("rb").readline()
        return json.loads(line) if line else None

    for _ in range(100):
        if stop.is_set():
            return
        task = exchange({"WORKER": "ALIVE", "WORKER_UUID": "seed-v2-worker"})
        if task is None or task.get("TASK") != "QUERY":
            continue
        exchange({"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": "seed-v2-worker"})
        served.append(task["USER"])


def test_client_py_says_so_when_a_seed_worker_answered_a_balance_without_one(tmp_path, mysql_url):
    cluster, _lab = start_farm(tmp_path, mysql_url, workers=0)
    with cluster:
        farm1 = address(cluster, "farm1")
        stop = threading.Event()
        served: list[str] = []
        worker = threading.Thread(target=_seed_v2_worker, args=(farm1, stop, served), daemon=True)
        worker.start()
        try:
            done = subprocess.run([sys.executable, "client.py", "--arch", "farm", "--address", f"{farm1[0]}:{farm1[1]}",
                                   "balance", "alice"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        finally:
            stop.set()
        worker.join(10)
        assert served == ["alice"]
        assert done.returncode == 0, done
        assert done.stdout.strip() == ("OK (the worker reported no balance: a seed-format worker answers a QUERY with its "
                                       "STATUS only)")
