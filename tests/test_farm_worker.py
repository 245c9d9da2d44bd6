"""saldo's worker process against servers of the seed's later version (v2).

`SeedServer` behaves as the seed 000 authors' own server (their server/run_server.py) does: a
thread per connection, one message read, one reply in the v2 shapes of docs/farm-protocol.md, then
the connection is closed; REDIRECT and RETURN name only SERVER_REDIRECT / SERVER_RETURN; a STATUS
is answered with ACK. Each test starts the real worker (`client.py worker`, a SQLite store holding
alice's balance) against one or two of them and checks what the servers saw.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.bank.state import DEPOSIT, Operation
from common.storage.store import open_store

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_ID = "w-seed"
# Connections one SeedServer accepts before it closes each new one at once (a bound for the test).
MAX_CONNECTIONS = 5000
# A worker connects at most 1 / (0.05 s x 0.8) = 25 times a second, so more than 30 a second over
# a few seconds is a reconnection storm.
MAX_CONNECTIONS_PER_S = 30


class SeedServer:
    """A v2 farm server that hands out `tasks` QUERY tasks for alice (None: as many as asked for)."""

    def __init__(self, tasks: int | None, *, after_tasks: dict | None = None, acknowledge: bool = True) -> None:
        self.tasks_left = tasks
        self.acknowledge = acknowledge  # False: a STATUS is read, and the connection closed without ACK
        self.after_tasks = after_tasks  # the reply to the first ALIVE once every task was answered
        self.directives: dict[str, dict] = {}  # worker id -> REDIRECT or RETURN for its next ALIVE
        self.connected_at: list[float] = []
        self.alives: list[dict] = []
        self.statuses: list[dict] = []
        self.tasks_given = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def address_fields(self) -> dict:
        return {"ip": self.address[0], "port": self.address[1]}

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _peer = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connected_at.append(time.monotonic())
                too_many = len(self.connected_at) > MAX_CONNECTIONS
            if too_many:
                connection.close()
                continue
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:  # one line in, one line out, then closed: the seed server's way
            connection.settimeout(5.0)
            try:
                line = connection.makefile("rb").readline()
            except OSError:
                return
            if not line:
                return
            reply = self._reply(json.loads(line))
            if reply is not None:
                connection.sendall((json.dumps(reply) + "\n").encode())

    def _reply(self, message: dict) -> dict | None:
        worker_id = message.get("WORKER_UUID")
        with self._lock:
            if message.get("WORKER") == "ALIVE" and worker_id:
                self.alives.append(message)
                if worker_id in self.directives:
                    return self.directives.pop(worker_id)
                if self.tasks_left is None or self.tasks_left > 0:
                    if self.tasks_left is not None:
                        self.tasks_left -= 1
                    self.tasks_given += 1
                    return {"TASK": "QUERY", "USER": "alice"}
                if self.after_tasks is not None and len(self.statuses) == self.tasks_given:
                    reply, self.after_tasks = self.after_tasks, None
                    return reply
                return {"TASK": "NO_TASK"}
            if "STATUS" in message and worker_id:
                self.statuses.append(message)
                return {"STATUS": "ACK"} if self.acknowledge else None
        return None

    def connections_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for at in self.connected_at if start <= at < end)

    def stop_listening(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s: {what}")


class WorkerProcess:
    """`client.py worker` with a SQLite store in which alice has 12.34; its log in a file."""

    def __init__(self, tmp_path: Path, home: tuple[str, int], *extra: str) -> None:
        store_url = f"sqlite:///{tmp_path / 'farm.db'}"
        store = open_store(store_url)
        try:
            store.apply_batch([(Operation("seed-alice", DEPOSIT, "alice", None, 1234), None)], max_accounts=100,
                              dedup_window_ops=100)
        finally:
            store.close()
        self.log_path = tmp_path / "worker.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "client.py", "worker", "--server", f"{home[0]}:{home[1]}", "--store", store_url,
                 "--worker-id", WORKER_ID, "--name", "worker", *extra],
                cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def test_every_result_reaches_a_seed_v2_server_as_a_status_on_a_new_connection(tmp_path):
    server = SeedServer(tasks=10)
    try:
        with WorkerProcess(tmp_path, server.address):
            wait_for(lambda: len(server.statuses) >= 10, 30, "the server has the ten results")
        assert server.statuses == [{"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": WORKER_ID, "SALDO": "12.34"}] * 10
        # At home, a worker names no owner: the seed server would log it as borrowed.
        assert server.alives and not [alive for alive in server.alives if "SERVER_UUID" in alive]
    finally:
        server.stop_listening()


def test_a_worker_reconnects_to_a_server_that_closes_after_each_reply_at_a_bounded_rate(tmp_path):
    server = SeedServer(tasks=None)  # always a task: the worker never waits for lack of work
    try:
        with WorkerProcess(tmp_path, server.address):
            wait_for(lambda: server.tasks_given >= 1, 30, "the worker takes a task")
            start = time.monotonic()
            time.sleep(3.0)
            connections = server.connections_between(start, start + 3.0)
            results = len(server.statuses)
        assert connections <= 3.0 * MAX_CONNECTIONS_PER_S, f"{connections} connections in 3 s"
        assert results >= 6  # and it still works at that pace
    finally:
        server.stop_listening()


def test_a_seed_servers_redirect_is_followed_to_the_borrower_and_its_return_home(tmp_path):
    home = SeedServer(tasks=0)
    borrower = SeedServer(tasks=3, after_tasks={"TASK": "RETURN", "SERVER_RETURN": home.address_fields()})
    home.directives[WORKER_ID] = {"TASK": "REDIRECT", "SERVER_REDIRECT": borrower.address_fields()}
    try:
        with WorkerProcess(tmp_path, home.address):
            wait_for(lambda: len(borrower.statuses) == 3, 30, "the borrower has its three results")
            wait_for(lambda: len(home.alives) >= 2, 30, "the worker is back home")
        # While lent it names its owner (its home's address: a seed server never says its id); at home, nobody.
        assert {alive.get("SERVER_UUID") for alive in borrower.alives} == {f"{home.address[0]}:{home.address[1]}"}
        assert not [alive for alive in home.alives if "SERVER_UUID" in alive]
        assert [status["STATUS"] for status in borrower.statuses] == ["OK"] * 3
    finally:
        home.stop_listening()
        borrower.stop_listening()


def test_a_result_the_server_never_acknowledges_is_sent_again_a_bounded_number_of_times_then_logged(tmp_path):
    server = SeedServer(tasks=1, acknowledge=False)
    try:
        with WorkerProcess(tmp_path, server.address, "--max-delivery-attempts", "3") as worker:
            wait_for(lambda: "event=result_dropped" in worker.log(), 30, "the worker says it dropped the result")
            time.sleep(0.5)  # time enough for a fourth attempt, if there were one
        dropped = next(line for line in worker.log().splitlines() if "event=result_dropped" in line)
        assert "level=warning" in dropped and "attempts=3" in dropped and "status=OK" in dropped
        assert len(server.statuses) == 3
    finally:
        server.stop_listening()
