"""common/farm/core.py without I/O: scripted message orders against a fake clock.

Each test is a scenario: clients, workers and peer servers are connection numbers and the messages
they would send; `Net` plays the network between two servers' cores, delivering each request one
sends to a peer (a Send) to the other core and its reply back (or no reply, for a server that is down).
"""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal

import pytest

from common.bank.errors import SaldoError
from common.bank.state import check_op_id
from common.core import Output, Send
from common.farm.client import FarmClient, format_status
from common.farm.core import BORROWED, DOWN, HOME, LENT, UP, FarmConfig, FarmCore
from common.transport.client import execute_with_retries

A_ADDR = ("127.0.0.11", 8765)
B_ADDR = ("127.0.0.12", 8766)
A_KEY, B_KEY = "127.0.0.11:8765", "127.0.0.12:8766"
PEER_CONN = 9000  # the connection a peer's requests arrive on


def make_core(server_id: str = "srv-a", address=A_ADDR, peers=(B_ADDR,), now: float = 0.0, **overrides) -> FarmCore:
    return FarmCore(FarmConfig(server_id=server_id, address=address, peers=peers, **overrides), random.Random(7), now)


def sends(core: FarmCore, conn: int | None = None) -> list[dict]:
    """Messages the core sent (on `conn`, or on any connection), taking its output."""
    return [r.message for r in core.take_output().replies if conn is None or r.to == conn]


def deposit(op_id: str, account: str = "alice", amount: str = "10.00") -> dict:
    return {"TASK": "DEPOSIT", "ID": op_id, "ACCOUNT": account, "AMOUNT": amount}


def alive(worker_id: str | None = "w1", *, results=None, max_tasks: int | None = 8, owner: str | None = None) -> dict:
    message: dict = {"WORKER": "ALIVE"}
    if worker_id is not None:
        message["WORKER_UUID"] = worker_id
    if max_tasks is not None:
        message["MAX_TASKS"] = max_tasks
        message["ACCEPTS"] = ["QUERY", "UPDATE"]
    if owner is not None:
        message["SERVER_UUID"] = owner
    if results is not None:
        message["RESULTS"] = results
    return message


def ok(task_id: str, balance: str = "10.00") -> dict:
    return {"ID": task_id, "STATUS": "OK", "BALANCE": balance}


# --- Tasks ------------------------------------------------------------------------------------


def test_an_update_goes_to_a_waiting_worker_and_its_result_to_the_client():
    core = make_core()
    core.on_message(1, alive("w1"), 0.0)
    core.on_message(2, deposit("op-1"), 0.1)
    core.pump(0.1)
    (batch,) = sends(core, 1)
    assert batch["TASK"] == "BATCH" and batch["TASKS"] == [{"ID": "op-1", "TASK": "DEPOSIT", "ACCOUNT": "alice", "AMOUNT": "10.00"}]
    core.on_message(1, alive("w1", results=[ok("op-1", "10.00")]), 0.2)
    assert sends(core, 2) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]
    assert core.status(0.2)["WORKERS"] == {"OWN": 1, "HOME": 1, "LENT_OUT": 0, "BORROWED": 0, "IDLE": 1, "BUSY": 0}


def test_status_asks_the_driver_for_its_figures_at_each_request_and_they_cannot_hide_the_cores():
    core = make_core()
    reads = []
    core.status_probe = lambda: reads.append(1) or {"LOOP": {"STALLS_TOTAL": len(reads)}, "ROLE": "not-a-farm-server"}
    core.on_message(7, {"TASK": "STATUS", "ID": "s-1"}, 0.0)
    core.on_message(7, {"TASK": "STATUS", "ID": "s-2"}, 0.1)
    first, second = sends(core, 7)
    assert (first["LOOP"], second["LOOP"]) == ({"STALLS_TOTAL": 1}, {"STALLS_TOTAL": 2})  # read fresh each time
    assert first["ROLE"] == second["ROLE"] == "farm-server"


def test_client_py_status_prints_a_farm_servers_figures_and_its_event_loop():
    core = make_core()
    core.status_probe = lambda: {"LOOP": {"STALLS_TOTAL": 3, "STALLED_MS_TOTAL": 41.5, "LAG_MAX_MS": 18.0}}
    core.on_message(1, alive("w1"), 0.0)
    text = format_status(core.status(0.5))
    assert "queue                 0 of " in text and "own 1  home 1" in text
    assert "event loop            stalls 3 (41.5 ms in all), largest lag 18.0 ms" in text
    core.status_probe = None  # an older server, without the monitor: no such line
    assert "event loop" not in format_status(core.status(0.6))



def test_the_core_logs_nothing_its_driver_logs_its_events_after_carrying_out_the_rest(monkeypatch, request):
    """The core contract (common/core.py): what the core decided worth a line is an event in its
    output; the driver writes the reply, then logs the event, one key=value line."""
    import io
    import logging
    from types import SimpleNamespace

    from common import log
    from common.farm import server

    saldo_logger = logging.getLogger("saldo")  # configure's changes go away with the test
    monkeypatch.setattr(saldo_logger, "handlers", [])
    monkeypatch.setattr(saldo_logger, "propagate", saldo_logger.propagate)
    monkeypatch.setattr(log, "_node_name", log._node_name)
    level_before = saldo_logger.level
    lines = io.StringIO()
    log.configure("farm-a", stream=lines)
    request.addfinalizer(lambda: saldo_logger.setLevel(level_before))
    core = make_core(peers=())
    core.on_message(1, alive("w1"), 0.0)
    core.on_message(2, {"TASK": "STATUS", "ID": "s-1"}, 0.0)
    assert lines.getvalue() == ""  # the core decided, and wrote nothing
    farm = server.FarmServer(core, SimpleNamespace(host="127.0.0.1", peers=[], heartbeat_timeout_s=0.5, name="farm-a"))
    done = []

    class Stream:
        def send(self, message):
            done.append(("reply", message.get("ID")))

    class Log:
        def record(self, events):
            done.extend(("log", event.name) for event in events)

    farm.streams[2] = Stream()
    with monkeypatch.context() as patch:
        patch.setattr(server, "core_log", Log())
        farm.flush()
    assert done == [("reply", "s-1"), ("log", "worker_joined")]  # the reply first, then the line
    core.on_message(3, alive("w2"), 0.1)
    farm.flush()
    (line,) = lines.getvalue().splitlines()
    assert " node=farm-a comp=farm event=worker_joined worker=w2 owner=srv-a dialect=saldo conn=3" in line, line
    assert not core.take_output()  # everything decided was taken


def test_a_retry_joins_the_task_in_flight_and_a_late_retry_gets_the_recorded_answer():
    core = make_core()
    core.on_message(2, deposit("op-1"), 0.0)
    core.on_message(3, deposit("op-1"), 0.5)  # the client timed out and retried on a new connection
    core.on_message(1, alive("w1"), 0.6)
    core.pump(0.6)
    (batch,) = sends(core, 1)
    assert [t["ID"] for t in batch["TASKS"]] == ["op-1"]  # one task, not two
    core.on_message(1, alive("w1", results=[ok("op-1")]), 0.7)
    out = core.take_output()
    assert {r.to for r in out.replies if r.message.get("ID") == "op-1"} == {2, 3}
    core.on_message(4, deposit("op-1"), 9.0)
    core.pump(9.0)
    assert sends(core, 4) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]
    assert core.queue_length == 0 and not core.tasks


def test_an_id_reused_for_another_operation_is_refused_whether_its_task_runs_or_finished():
    """Telling a withdrawal that a deposit under its id succeeded would be a lie."""
    core = make_core()
    core.on_message(2, deposit("op-1"), 0.0)
    withdrawal = {"TASK": "WITHDRAW", "ID": "op-1", "ACCOUNT": "alice", "AMOUNT": "10.00"}
    core.on_message(3, withdrawal, 0.1)  # while the deposit is queued
    (refused,) = sends(core, 3)
    assert refused["STATUS"] == "NOK" and refused["ERROR"] == "ID_REUSED" and refused["DEFINITE"] is True
    core.on_message(4, deposit("op-1", amount="99.00"), 0.1)  # the same id, another amount
    assert sends(core, 4)[0]["ERROR"] == "ID_REUSED"
    core.on_message(1, alive("w1"), 0.2)
    core.pump(0.2)
    (batch,) = sends(core, 1)
    assert [t["ID"] for t in batch["TASKS"]] == ["op-1"] and batch["TASKS"][0]["TASK"] == "DEPOSIT"
    core.on_message(1, alive("w1", results=[ok("op-1")]), 0.3)
    assert sends(core, 2) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]  # only the deposit's client
    core.on_message(5, withdrawal, 1.0)  # after it finished
    assert sends(core, 5)[0]["ERROR"] == "ID_REUSED"
    core.on_message(6, deposit("op-1"), 1.1)  # a true retry still gets the recorded answer
    assert sends(core, 6) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]
    assert core.queue_length == 0 and not core.tasks


def test_a_seed_002_operation_gets_its_id_msg_back_on_its_answer_as_on_an_error():
    """Seed 002's clients match replies by id_msg: the farm echoes it like the bank's servers."""
    core = make_core()
    core.on_message(2, {"id_msg": "seed-bad-1", "tipo": "SAQUE", "conta_origem": "alice", "valor": "abc"}, 0.0)
    (refused,) = sends(core, 2)
    assert (refused["STATUS"], refused["ERROR"], refused["id_msg"]) == ("NOK", "AMOUNT_MALFORMED", "seed-bad-1")
    assert not core.tasks
    seed_deposit = {"id_msg": "seed-good-1", "tipo": "DEPOSITO", "conta_destino": "alice", "valor": "1.00"}
    core.on_message(2, seed_deposit, 0.1)
    core.on_message(1, alive("w1"), 0.2)
    core.pump(0.2)
    ((task,),) = [batch["TASKS"] for batch in sends(core, 1)]
    core.on_message(1, alive("w1", results=[ok(task["ID"], "1.00")]), 0.3)
    (answer,) = sends(core, 2)
    assert (answer["STATUS"], answer["BALANCE"], answer["id_msg"]) == ("OK", "1.00", "seed-good-1")
    core.on_message(3, seed_deposit, 0.4)  # a retry is answered from the record, id_msg again
    assert sends(core, 3)[0]["id_msg"] == "seed-good-1"


def test_a_seed_002_operation_with_a_numeric_id_msg_is_served_and_gets_it_back_as_it_came():
    """Seed 002's users send id_msg 7: the operation id "7", and the number 7 echoed."""
    core = make_core()
    core.on_message(2, {"id_msg": 7, "tipo": "DEPOSITO", "conta_destino": "alice", "valor": "1.00"}, 0.0)
    core.on_message(1, alive("w1"), 0.1)
    core.pump(0.1)
    ((task,),) = [batch["TASKS"] for batch in sends(core, 1)]
    assert task["ID"] == "7"
    core.on_message(1, alive("w1", results=[ok("7", "1.00")]), 0.2)
    (answer,) = sends(core, 2)
    assert (answer["STATUS"], answer["BALANCE"], answer["id_msg"]) == ("OK", "1.00", 7)
    core.on_message(3, {"id_msg": 7.5, "tipo": "SAQUE", "conta_origem": "alice", "valor": "1.00"}, 0.3)
    (refused,) = sends(core, 3)
    assert (refused["ERROR"], refused["id_msg"]) == ("ID_INVALID", 7.5)


def test_a_query_has_an_internal_id_that_no_client_update_can_take():
    core = make_core()
    core.on_message(2, {"TASK": "QUERY", "USER": "alice"}, 0.0)
    ((query_id, query_task),) = core.tasks.items()
    with pytest.raises(SaldoError):
        check_op_id(query_id)  # not an id a client may send
    core.on_message(3, deposit("q.srv-a.1"), 0.1)  # the form an internal id could once take
    assert sends(core, 3) == [] and len(core.tasks) == 2  # queued as its own task, not refused
    core.on_message(1, alive("w1"), 0.2)
    core.pump(0.2)
    (batch,) = sends(core, 1)
    assert sorted(t["ID"] for t in batch["TASKS"]) == sorted([query_id, "q.srv-a.1"])
    core.on_message(1, alive("w1", results=[ok(query_id, "0.00"), ok("q.srv-a.1", "10.00")]), 0.3)
    answers = {r.to: r.message for r in core.take_output().replies}
    assert answers[2]["SALDO"] == "0.00" and answers[2]["USER"] == "alice"  # the query's client
    assert answers[3] == {"ID": "q.srv-a.1", "STATUS": "OK", "BALANCE": "10.00"}  # the deposit's
    assert not core.tasks


def test_a_full_queue_refuses_with_queue_full_and_holds_no_more():
    core = make_core(max_queue=2)
    for index in range(3):
        core.on_message(2, deposit(f"op-{index}"), 0.0)
    replies = sends(core, 2)
    assert [r["ERROR"] for r in replies] == ["QUEUE_FULL"] and replies[0]["ID"] == "op-2" and replies[0]["DEFINITE"] is True
    assert core.queue_length == 2


def test_a_lease_that_runs_out_puts_the_task_back_and_the_late_result_changes_nothing():
    core = make_core(visibility_timeout_s=2.0)
    core.on_message(1, alive("w1"), 0.0)
    core.on_message(2, deposit("op-1"), 0.0)
    core.pump(0.0)
    sends(core)
    core.tick(1.9)
    assert core.queue_length == 0
    core.tick(2.1)  # w1 stopped answering: the task is queued again and w1's connection dropped
    assert core.queue_length == 1
    assert 1 in core.take_output().close
    core.on_disconnect(1, 2.1)
    core.on_message(5, alive("w2"), 2.2)
    core.pump(2.2)
    (batch,) = sends(core, 5)
    assert batch["TASKS"][0]["ID"] == "op-1"
    core.on_message(6, alive("w1", results=[ok("op-1", "10.00")]), 2.3)  # w1 comes back late
    assert sends(core, 2) == []  # the client is answered by w2's result only
    assert core.late_results_total == 1
    core.on_message(5, alive("w2", results=[ok("op-1", "10.00")]), 2.4)
    assert sends(core, 2) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]


def test_a_saldo_worker_that_disconnects_gives_its_tasks_back_at_once_but_a_v2_worker_keeps_them_until_its_lease():
    core = make_core(visibility_timeout_s=3.0)
    core.on_message(1, alive("w-saldo"), 0.0)
    core.on_message(2, deposit("op-1"), 0.0)
    core.pump(0.0)
    core.on_disconnect(1, 0.5)
    assert core.queue_length == 1
    core.take_output()
    core.on_message(3, {"WORKER": "ALIVE", "WORKER_UUID": "w-v2"}, 0.6)  # v2: queries only
    core.on_message(2, {"TASK": "QUERY", "USER": "alice", "ID": "q1"}, 0.6)
    core.pump(0.6)
    (task,) = sends(core, 3)
    assert task["TASK"] == "QUERY" and task["USER"] == "alice"
    core.on_disconnect(3, 0.7)  # v2 opens a connection per message: a close says nothing
    assert core.queue_length == 1  # only the deposit, which no v2 worker may take
    core.on_message(4, {"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": "w-v2", "SALDO": 12.5}, 1.0)
    out = core.take_output()
    assert not out.send and not out.close
    assert [(r.to, r.message) for r in out.replies] == [
        (2, {"ID": "q1", "STATUS": "OK", "BALANCE": "12.50", "SALDO": "12.50", "USER": "alice"}),
        (4, {"STATUS": "ACK", "SERVER_UUID": "srv-a"}),
    ]
    core.on_message(2, {"TASK": "QUERY", "USER": "alice", "ID": "q2"}, 1.1)
    core.on_message(4, {"WORKER": "ALIVE", "WORKER_UUID": "w-v2"}, 1.1)
    core.pump(1.1)
    assert [m["TASK"] for m in sends(core, 4)] == ["QUERY"]


def test_a_seed_v1_worker_gets_one_query_at_a_time_and_no_answer_to_its_status():
    core = make_core()
    core.on_message(1, {"WORKER": "ALIVE"}, 0.0)
    core.tick(30.0)  # a v1 worker's ALIVE is held as long as needed: it knows no NO_TASK
    assert sends(core, 1) == []
    core.on_message(2, deposit("op-1"), 30.0)
    core.on_message(2, {"TASK": "QUERY", "USER": "alice", "ID": "r1"}, 30.0)
    core.pump(30.0)
    (task,) = sends(core, 1)
    assert task["TASK"] == "QUERY" and task["USER"] == "alice"
    core.on_message(1, {"STATUS": "OK", "SALDO": 99.99}, 30.1)
    out = core.take_output()
    assert [r.to for r in out.replies] == [2] and not out.send and not out.close  # the client's answer; nothing to the worker
    assert out.replies[0].message == {"ID": "r1", "STATUS": "OK", "BALANCE": "99.99", "SALDO": "99.99", "USER": "alice"}
    core.on_message(1, {"STATUS": "NOK", "TASK": "QUERY", "ERROR": "User not found"}, 30.2)
    assert sends(core) == []  # it holds nothing: ignored, and v1 expects no answer
    assert core.queue_length == 1  # the deposit waits for a worker that accepts updates


def test_a_seed_worker_that_cannot_find_the_account_gives_the_client_its_words():
    core = make_core()
    core.on_message(1, {"WORKER": "ALIVE"}, 0.0)
    core.on_message(2, {"TASK": "QUERY", "USER": "nobody", "ID": "r1"}, 0.0)
    core.pump(0.0)
    sends(core)
    core.on_message(1, {"STATUS": "NOK", "TASK": "QUERY", "ERROR": "User not found"}, 0.1)
    (reply,) = sends(core, 2)
    assert reply["ERROR"] == "TASK_FAILED" and reply["DETAIL"] == "User not found" and reply["TASK"] == "QUERY"


def test_a_v2_worker_hears_no_task_after_the_long_poll():
    core = make_core(no_task_wait_s=1.0)
    core.on_message(1, {"WORKER": "ALIVE", "WORKER_UUID": "w-v2"}, 0.0)
    core.tick(0.9)
    assert sends(core, 1) == []
    core.tick(1.05)
    (reply,) = sends(core, 1)
    assert reply["TASK"] == "NO_TASK" and reply["FAILOVER_LIST"][0]["PORT"] == 8765


def test_a_worker_cannot_claim_the_id_of_another_connected_worker_and_nothing_changes():
    core = make_core()
    core.on_message(1, alive("w1"), 0.0)
    before = core.status(0.0)
    core.on_message(7, alive("w1"), 0.1)
    (reply,) = sends(core, 7)
    assert reply["ERROR"] == "WORKER_ID_IN_USE" and reply["DEFINITE"] is True
    core.on_message(7, {"STATUS": "OK", "WORKER_UUID": "w1", "ID": "op-x", "BALANCE": "1.00"}, 0.1)
    assert sends(core, 7)[0]["ERROR"] == "WORKER_ID_IN_USE"
    assert core.status(0.1)["WORKER_LIST"] == before["WORKER_LIST"]


@pytest.mark.parametrize("message, code", [
    ({"TASK": "FLY", "ID": "x"}, "UNKNOWN_MESSAGE"),
    ({"TASK": "DEPOSIT", "ID": "x", "ACCOUNT": "alice", "AMOUNT": "-1"}, "AMOUNT_NEGATIVE"),
    ({"TASK": "UPDATE", "ID": "x", "USER": "alice", "OPERATION": "STEAL", "AMOUNT": "1"}, "FIELD_INVALID"),
    ({"WORKER": "DEAD"}, "UNKNOWN_MESSAGE"),
    ({"WORKER": "ALIVE", "MAX_TASKS": 10_000}, "FIELD_INVALID"),
    ({"STATUS": "OK", "SALDO": 1}, "WRONG_ROLE"),
    ({"TASK": "WORKER_REQUEST", "WORKERS_NEEDED": 2, "SERVER_UUID": "intruder"}, "NOT_PEER"),
    ({"TASK": "COMMAND_RELEASE", "WORKERS_UUID": ["w1"]}, "NOT_PEER"),
    ({"WORKER": "ALIVE", "WORKER_UUID": "w9", "MAX_TASKS": 4, "ACCEPTS": [{"UPDATE": 1}]}, "FIELD_INVALID"),
    ({"TASK": "DEPOSIT", "ID": "x", "ACCOUNT": "alice", "AMOUNT": "1", "FORWARDED_BY": ["srv-b"]}, "FIELD_TYPE"),
])
def test_bad_input_gets_a_clear_error_and_changes_nothing(message, code):
    core = make_core()
    core.on_message(1, alive("w1"), 0.0)
    before = core.status(0.0)
    core.on_message(5, message, 0.1, source_host="127.0.0.99")
    (reply,) = sends(core, 5)
    assert reply["STATUS"] == "NOK" and reply["ERROR"] == code and isinstance(reply["DEFINITE"], bool)
    after = core.status(0.1)
    for key in ("QUEUE_LENGTH", "WORKERS", "WORKER_LIST", "LOANS_GIVEN_TOTAL"):
        assert after[key] == before[key]


def test_an_update_the_worker_could_not_finish_is_redelivered_and_given_up_after_max_attempts():
    core = make_core(max_task_attempts=2)
    core.on_message(2, deposit("op-1"), 0.0)
    for attempt in range(2):
        core.on_message(1, alive("w1", results=[] if attempt == 0 else [
            {"ID": "op-1", "STATUS": "NOK", "ERROR": "UNAVAILABLE"}]), 0.1 * attempt)
        core.pump(0.1 * attempt)
        assert any(m.get("TASK") == "BATCH" for m in sends(core, 1))
    core.on_message(1, alive("w1", results=[{"ID": "op-1", "STATUS": "NOK", "ERROR": "UNAVAILABLE"}]), 0.5)
    (reply,) = sends(core, 2)
    assert reply["ERROR"] == "UNAVAILABLE" and reply["DEFINITE"] is False


def test_a_retry_of_a_read_joins_its_task_by_the_id_its_client_sends():
    """A client that timed out asks again with the same ID: one task answers every attempt, even
    one that arrives after the answer. A read without an ID (seed 000's QUERY), or another read
    under an ID in use, is a task of its own."""
    core = make_core()
    read = {"TASK": "BALANCE", "ID": "r-1", "ACCOUNT": "alice"}
    core.on_message(2, dict(read), 0.0)
    core.on_message(3, dict(read), 2.0)  # the retry, on a new connection
    core.on_message(4, {"TASK": "BALANCE", "ID": "r-1", "ACCOUNT": "bob"}, 2.1)  # another read, the same ID
    core.on_message(5, {"TASK": "QUERY", "USER": "alice"}, 2.1)
    core.on_message(5, {"TASK": "QUERY", "USER": "alice"}, 2.1)
    assert core.queue_length == 4
    core.on_message(1, alive("w1"), 2.2)
    core.pump(2.2)
    (batch,) = sends(core, 1)
    assert sorted(t["USER"] for t in batch["TASKS"]) == ["alice", "alice", "alice", "bob"]
    results = [ok(t["ID"], "7.00" if t["USER"] == "alice" else "3.00") for t in batch["TASKS"]]
    core.on_message(1, alive("w1", results=results), 2.3)
    answers = [(r.to, r.message.get("ID"), r.message["BALANCE"]) for r in core.take_output().replies]
    assert sorted(answers, key=str) == sorted([(2, "r-1", "7.00"), (3, "r-1", "7.00"), (4, "r-1", "3.00"),
                                               (5, None, "7.00"), (5, None, "7.00")], key=str)
    assert not core.tasks
    core.on_message(6, dict(read), 3.0)  # a retry that arrives once its read was answered: that answer
    assert sends(core, 6) == [{"ID": "r-1", "STATUS": "OK", "BALANCE": "7.00"}] and not core.tasks


def run_seed_worker(core: FarmCore, answer: dict, client_conn: int, max_steps: int = 20) -> tuple[int, list[dict]]:
    """A seed v2 worker on connection 1 that says ALIVE, takes a QUERY and answers it with `answer`,
    over and over: (the deliveries it got, what the client on `client_conn` was sent)."""
    deliveries = 0
    to_client: list[dict] = []
    for step in range(max_steps):
        now = 0.1 * step
        core.on_message(1, {"WORKER": "ALIVE", "WORKER_UUID": "w-bad"}, now)
        core.pump(now)
        out = core.take_output().replies
        to_client += [r.message for r in out if r.to == client_conn]
        if not any(r.to == 1 and r.message.get("TASK") == "QUERY" for r in out):
            break
        deliveries += 1
        core.on_message(1, {"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": "w-bad", **answer}, now)
        to_client += [r.message for r in core.take_output().replies if r.to == client_conn]
    return deliveries, to_client


@pytest.mark.parametrize("saldo", [-5, "abc", Decimal("1E+30")])
def test_a_saldo_that_is_not_a_balance_is_redelivered_a_bounded_number_of_times_then_refused_naming_the_worker(saldo):
    core = make_core(max_task_attempts=3)
    core.on_message(2, {"TASK": "QUERY", "USER": "alice", "ID": "q-1"}, 0.0)
    deliveries, to_client = run_seed_worker(core, {"SALDO": saldo}, client_conn=2)
    assert deliveries == 3
    (reply,) = to_client
    assert (reply["ID"], reply["STATUS"], reply["ERROR"], reply["DEFINITE"], reply["TASK"]) == ("q-1", "NOK", "BAD_RESULT", True, "QUERY")
    assert "worker w-bad sent SALDO" in reply["DETAIL"] and "not a balance" in reply["DETAIL"], reply
    status = core.status(1.0)
    assert status["BAD_RESULTS_TOTAL"] == 3 and status["WORKER_LIST"][0]["BAD_RESULTS"] == 3
    assert not core.tasks


def test_an_update_whose_result_is_not_one_ends_unavailable_naming_the_worker():
    """An OK for an update means it was applied: with no readable result the outcome is unknown."""
    core = make_core(max_task_attempts=2)
    core.on_message(2, deposit("op-1"), 0.0)
    for attempt in range(2):
        core.on_message(1, alive("w1", results=[{"ID": "op-1", "STATUS": "OK", "BALANCE": "-5"}] if attempt else None), 0.1 * attempt)
        core.pump(0.1 * attempt)
        assert [m["TASK"] for m in sends(core, 1)] == ["BATCH"]
    core.on_message(1, alive("w1", results=[{"ID": "op-1", "STATUS": "OK", "BALANCE": "-5"}]), 0.3)
    (reply,) = sends(core, 2)
    assert reply["ERROR"] == "UNAVAILABLE" and reply["DEFINITE"] is False
    assert "worker w1 sent BALANCE '-5', not a balance" in reply["DETAIL"], reply


def test_a_balance_above_what_one_operation_moves_is_a_result_not_a_bad_one():
    core = make_core()
    core.on_message(2, {"TASK": "BALANCE", "ACCOUNT": "rich", "ID": "r-1"}, 0.0)
    core.on_message(1, alive("w1"), 0.0)
    core.pump(0.0)
    (batch,) = sends(core, 1)
    core.on_message(1, alive("w1", results=[ok(batch["TASKS"][0]["ID"], "5000000000.00")]), 0.1)
    assert sends(core, 2) == [{"ID": "r-1", "STATUS": "OK", "BALANCE": "5000000000.00"}]


# --- Heartbeats -------------------------------------------------------------------------------


def heartbeat_requests(core: FarmCore) -> list[Send]:
    return [s for s in core.take_output().send if s.message["TASK"] == "HEARTBEAT"]


def test_a_peer_that_misses_heartbeats_is_marked_down_after_the_limit_and_up_at_its_first_answer():
    core = make_core(heartbeat_interval_s=0.5, heartbeat_miss_limit=3, retry_initial_s=0.1, retry_max_s=2.0,
                     jitter_fraction=0.2)
    peer = core.peers[B_KEY]
    now = 0.0
    core.tick(now)
    (probe,) = heartbeat_requests(core)
    core.on_peer_result(B_KEY, probe.message, {"RESPONSE": "ALIVE", "SERVER_UUID": "srv-b"}, now)
    assert peer.state == UP and peer.uuid == "srv-b"
    waits = []
    for failure in range(1, 7):
        now = peer.next_probe_at
        core.tick(now)
        (probe,) = heartbeat_requests(core)
        core.on_peer_result(B_KEY, probe.message, None, now)
        waits.append(peer.next_probe_at - now)
        assert peer.state == (DOWN if failure >= 3 else UP)
    # Exponential backoff within the jitter band, capped.
    for failure, wait in enumerate(waits, start=1):
        base = min(2.0, 0.1 * 2 ** (failure - 1))
        assert base * 0.8 <= wait <= base * 1.2
    assert len(set(waits)) == len(waits)  # jitter: no two waits alike
    now = peer.next_probe_at
    core.tick(now)
    (probe,) = heartbeat_requests(core)
    core.on_peer_result(B_KEY, probe.message, {"RESPONSE": "ALIVE", "SERVER_UUID": "srv-b"}, now)
    assert peer.state == UP and peer.failures == 0
    assert core.status(now)["PEERS"][0]["STATE"] == "up"


# --- Lending and returning: two cores on a scripted network ------------------------------------


class Net:
    """Delivers each server's requests to a peer (its Sends) to the other server and the reply
    back; a server in `down` answers nothing. Messages to workers and clients are kept per (server,
    connection). A forwarded task (a Send with a timeout) arrives on a connection of its own, as in
    the driver, and its answer goes back whenever the other server sends it. A server's output is
    carried out in the driver's order: sends, then replies, then closes."""

    def __init__(self, cores: dict[str, FarmCore], hosts: dict[str, str]) -> None:
        self.cores = cores
        self.hosts = hosts
        self.down: set[str] = set()
        self.inbox: dict[tuple[str, int], list[dict]] = {}
        self.closed: set[tuple[str, int]] = set()
        self.forwards: dict[tuple[str, int], tuple[str, Send]] = {}  # (receiver, conn) -> (sender, request)
        self._forward_conns = iter(range(8000, 8999))
        # What a server decided while it answered a peer's request, beside that answer: carried out
        # at the next round, as its driver would once the request's turn is over.
        self.held: dict[str, list[Output]] = {}

    def run(self, now: float) -> None:
        for _round in range(20):
            moved = False
            for key, core in self.cores.items():
                for output in [*self.held.pop(key, []), core.take_output()]:
                    moved = moved or bool(output.send or output.replies or output.close)
                    for request in output.send:
                        if request.timeout_s is not None:
                            self._forward(key, request, now)
                        else:
                            self._deliver(key, request, now)
                    for reply in output.replies:
                        if (key, reply.to) in self.forwards:
                            sender, request = self.forwards.pop((key, reply.to))
                            self.cores[sender].on_peer_result(key, request.message, reply.message, now)
                        else:
                            self.inbox.setdefault((key, reply.to), []).append(reply.message)
                    self.closed.update((key, conn) for conn in output.close)
            if not moved:
                return
        raise AssertionError("the servers keep talking")

    def _deliver(self, sender: str, request: Send, now: float) -> None:
        target = self.cores.get(request.to)
        if target is None or request.to in self.down or sender in self.down:
            self.cores[sender].on_peer_result(request.to, request.message, None, now)
            return
        target.on_message(PEER_CONN, dict(request.message, ID="p1"), now, self.hosts[sender])
        output = target.take_output()
        answers = [r.message for r in output.replies if r.to == PEER_CONN]
        output.replies = [r for r in output.replies if r.to != PEER_CONN]
        self.held.setdefault(request.to, []).append(output)
        self.cores[sender].on_peer_result(request.to, request.message, answers[-1] if answers else None, now)

    def _forward(self, sender: str, request: Send, now: float) -> None:
        target = self.cores.get(request.to)
        if target is None or request.to in self.down or sender in self.down:
            self.cores[sender].on_peer_result(request.to, request.message, None, now)
            return
        conn = next(self._forward_conns)
        self.forwards[(request.to, conn)] = (sender, request)
        target.on_message(conn, dict(request.message), now, self.hosts[sender])

    def lose_forwards(self, now: float) -> None:
        """The forwards' connections break: each sender hears no answer (the receiver may still run them)."""
        lost, self.forwards = self.forwards, {}
        for (receiver, _conn), (sender, request) in lost.items():
            self.cores[sender].on_peer_result(receiver, request.message, None, now)

    def take(self, server: str, conn: int) -> list[dict]:
        return self.inbox.pop((server, conn), [])

    def tick(self, now: float) -> None:
        for key, core in self.cores.items():
            if key not in self.down:
                core.tick(now)
        self.run(now)


def two_servers(**overrides) -> tuple[Net, FarmCore, FarmCore]:
    settings = dict(lend_queue_threshold=5, overload_s=0.5, return_queue_threshold=2, underload_s=1.0,
                    min_own_workers=1, heartbeat_interval_s=0.5, no_task_wait_s=1.0)
    settings.update(overrides)
    a = make_core("srv-a", A_ADDR, (B_ADDR,), **settings)
    b = make_core("srv-b", B_ADDR, (A_ADDR,), **settings)
    net = Net({A_KEY: a, B_KEY: b}, {A_KEY: A_ADDR[0], B_KEY: B_ADDR[0]})
    net.tick(0.0)  # first heartbeats: each learns the other's id
    return net, a, b


def test_an_overloaded_server_borrows_idle_workers_and_gives_them_back_when_its_queue_is_short():
    net, a, b = two_servers()
    net.tick(0.0)
    # A has one worker; B has three, idle and waiting.
    a.on_message(1, alive("a1"), 0.0)
    for index, conn in enumerate((11, 12, 13), start=1):
        b.on_message(conn, alive(f"b{index}"), 0.0)
    for index in range(20):
        a.on_message(2, deposit(f"op-{index}"), 0.0)
    a.pump(0.0)
    net.run(0.0)
    net.tick(0.3)  # the queue is long: overloaded from now on
    net.tick(0.7)
    assert not a.peers[B_KEY].request_outstanding and not net.take(B_KEY, 11)  # not yet: it must last overload_s
    net.tick(0.85)
    # B lent two idle workers (keeping its minimum of one at home) and sent each a REDIRECT.
    redirects = {conn: net.take(B_KEY, conn) for conn in (11, 12, 13)}
    lent_conns = [conn for conn, messages in redirects.items() if messages and messages[-1]["TASK"] == "REDIRECT"]
    assert len(lent_conns) == 2
    for conn in lent_conns:
        redirect = redirects[conn][-1]
        assert redirect["TARGET_MASTER"] == {"IP": "127.0.0.11", "PORT": 8765, "ip": "127.0.0.11", "port": 8765}
        assert redirect["HOME_MASTER"]["PORT"] == 8766 and len(redirect["FAILOVER_LIST"]) == 2
        assert (B_KEY, conn) in net.closed
    status_b = b.status(0.85)
    assert status_b["WORKERS"]["LENT_OUT"] == 2 and status_b["WORKERS"]["HOME"] == 1
    # The lent workers connect to A, naming their owner.
    lent_ids = [w.worker_id for w in b.workers.values() if w.placement == LENT]
    for conn, worker_id in zip((21, 22), lent_ids):
        a.on_message(conn, alive(worker_id, owner="srv-b"), 0.9)
    a.pump(0.9)
    net.run(0.9)
    assert a.status(0.9)["WORKERS"]["BORROWED"] == 2
    # Everything is served; the borrowed workers' results count as theirs.
    for _round in range(10):
        for conn, worker_id in ((1, "a1"), (21, lent_ids[0]), (22, lent_ids[1])):
            batches = [m for m in net.take(A_KEY, conn) if m.get("TASK") == "BATCH"]
            for batch in batches:
                a.on_message(conn, alive(worker_id, owner=None if worker_id == "a1" else "srv-b",
                                         results=[ok(t["ID"]) for t in batch["TASKS"]]), 1.0)
        a.pump(1.0)
        net.run(1.0)
    assert a.tasks_completed_total == 20 and a.tasks_by_borrowed_total > 0
    # The queue stays short for underload_s: A asks B to take them back, B agrees, A says RETURN.
    net.tick(1.1)
    net.tick(2.2)
    returns: dict[int, list[dict]] = {21: [], 22: []}
    for conn, worker_id in zip((21, 22), lent_ids):
        for message in net.take(A_KEY, conn):
            if message["TASK"] == "NO_TASK":  # its long poll ended first: it asks again, as workers do
                a.on_message(conn, alive(worker_id, owner="srv-b"), 2.2)
                net.run(2.2)
                message = net.take(A_KEY, conn)[-1]
            returns[conn].append(message)
    assert all(m["TASK"] == "RETURN" for messages in returns.values() for m in messages)
    assert all(len(messages) == 1 for messages in returns.values())
    assert returns[21][0]["SERVER_RETURN"] == {"ip": "127.0.0.12", "port": 8766}
    assert a.status(2.2)["WORKERS"]["BORROWED"] == 0
    # They say ALIVE at home: B has all three at home again and tells A the release is complete.
    for conn, worker_id in zip((31, 32), lent_ids):
        b.on_message(conn, alive(worker_id, owner="srv-b"), 2.3)
    net.run(2.3)
    status_b = b.status(2.3)
    assert status_b["WORKERS"]["HOME"] == 3 and status_b["WORKERS"]["LENT_OUT"] == 0
    assert all(w.placement == HOME for w in b.workers.values())
    assert not b.peers[A_KEY].pending_release


def test_a_server_without_workers_borrows_one_for_a_single_task_and_gives_it_back_once_it_ran():
    net, a, b = two_servers(lend_queue_threshold=200)
    b.on_message(11, alive("b1"), 0.0)
    b.on_message(12, alive("b2"), 0.0)
    # A has no worker at all: one task, far below the lending threshold, would wait forever.
    a.on_message(2, deposit("op-1"), 0.0)
    a.pump(0.0)
    net.tick(0.1)
    net.tick(0.4)
    assert not net.take(B_KEY, 11) and not net.take(B_KEY, 12)  # not yet: it must last overload_s
    net.tick(0.7)
    lent = [w for w in b.workers.values() if w.placement == LENT]
    assert len(lent) == 1  # B keeps its minimum of one at home
    (conn_at_b,) = [conn for conn in (11, 12) if any(m.get("TASK") == "REDIRECT" for m in net.take(B_KEY, conn))]
    # Until the worker arrives, A has nothing to give back, and asks no one again.
    net.tick(2.0)
    assert a.status(2.0)["WORKERS"]["BORROWED"] == 0
    worker_id = lent[0].worker_id
    a.on_message(21, alive(worker_id, owner="srv-b"), 2.1)
    a.pump(2.1)
    net.run(2.1)
    (batch,) = [m for m in net.take(A_KEY, 21) if m.get("TASK") == "BATCH"]
    assert [t["ID"] for t in batch["TASKS"]] == ["op-1"]
    # A short queue with only a borrowed worker here is not a reason to give it back yet.
    net.tick(3.5)
    assert a.status(3.5)["WORKERS"]["BORROWED"] == 1
    a.on_message(21, alive(worker_id, owner="srv-b", results=[ok("op-1")]), 3.6)
    net.run(3.6)
    assert net.take(A_KEY, 2) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]
    # The queue is empty for underload_s: the worker goes home.
    net.tick(3.7)
    net.tick(4.8)
    messages = net.take(A_KEY, 21)
    if messages and messages[-1]["TASK"] == "NO_TASK":  # its long poll ended first: it asks again
        a.on_message(21, alive(worker_id, owner="srv-b"), 4.8)
        net.run(4.8)
        messages = net.take(A_KEY, 21)
    assert messages[-1]["TASK"] == "RETURN"
    assert a.status(4.8)["WORKERS"]["BORROWED"] == 0


def test_a_server_with_a_worker_of_its_own_does_not_borrow_for_a_short_queue():
    net, a, b = two_servers(lend_queue_threshold=200)
    b.on_message(11, alive("b1"), 0.0)
    b.on_message(12, alive("b2"), 0.0)
    a.on_message(1, alive("a1", max_tasks=1), 0.0)
    for index in range(3):
        a.on_message(2, deposit(f"op-{index}"), 0.0)
    a.pump(0.0)
    for now in (0.3, 0.9, 1.5):
        net.tick(now)
    assert all(w.placement == HOME for w in b.workers.values())


def test_a_server_never_lends_below_its_minimum_nor_the_same_worker_twice():
    net, a, b = two_servers(min_own_workers=2)
    b.on_message(11, alive("b1"), 0.0)
    b.on_message(12, alive("b2"), 0.0)
    b.on_message(13, alive("b3"), 0.0)
    request = {"TASK": "WORKER_REQUEST", "WORKERS_NEEDED": 5, "SERVER_UUID": "srv-a", "ID": "r1"}
    b.on_message(PEER_CONN, dict(request), 0.1, A_ADDR[0])
    reply = [m for m in sends(b, PEER_CONN)]
    assert reply[0]["STATUS"] == "ACK" and len(reply[0]["WORKERS_UUID"]) == 1
    b.on_message(PEER_CONN, dict(request, ID="r2"), 0.2, A_ADDR[0])
    (second,) = sends(b, PEER_CONN)
    assert second["STATUS"] == "NACK" and second["WORKERS_UUID"] == []
    assert b.status(0.2)["WORKERS"]["HOME"] == 2


def test_a_borrower_that_dies_loses_nothing_its_workers_go_home_and_its_owner_keeps_them():
    net, a, b = two_servers()
    b.on_message(11, alive("b1"), 0.0)
    b.on_message(12, alive("b2"), 0.0)
    request = {"TASK": "WORKER_REQUEST", "WORKERS_NEEDED": 1, "SERVER_UUID": "srv-a", "ID": "r1"}
    b.on_message(PEER_CONN, request, 0.1, A_ADDR[0])
    (lent_id,) = sends(b, PEER_CONN)[0]["WORKERS_UUID"]
    net.down.add(A_KEY)  # A is killed
    now = 0.1
    for _ in range(10):
        now += 0.5
        net.tick(now)
    assert b.peers[A_KEY].state == DOWN
    b.on_message(14, alive(lent_id, owner="srv-b"), now)  # its connection to A broke: it came home
    assert b.workers[lent_id].placement == HOME
    assert b.status(now)["WORKERS"] == {"OWN": 2, "HOME": 2, "LENT_OUT": 0, "BORROWED": 0, "IDLE": 2, "BUSY": 0}


def test_a_failed_over_worker_serves_the_peer_while_its_owner_is_down_and_goes_home_when_it_is_up():
    net, a, b = two_servers()
    net.down.add(A_KEY)
    now = 0.0
    for _ in range(10):
        now += 0.5
        net.tick(now)
    assert b.peers[A_KEY].state == DOWN
    b.on_message(15, alive("a1", owner="srv-a"), now)  # A's worker, through its failover list
    assert b.workers["a1"].placement == BORROWED

    def directives_to_a1(at: float) -> list[dict]:
        """What B tells a1 by `at`; a1 asks again after each NO_TASK, as workers do."""
        net.tick(at)
        told = []
        for message in net.take(B_KEY, 15):
            if message["TASK"] == "NO_TASK":
                b.on_message(15, alive("a1", owner="srv-a"), at)
                net.run(at)
            else:
                told.append(message)
        return told

    assert directives_to_a1(now + 2.0) == []  # kept: its owner cannot take it back
    net.down.discard(A_KEY)
    now += 10.0
    told = directives_to_a1(now) + directives_to_a1(now + 0.1)
    assert b.peers[A_KEY].state == UP
    told += directives_to_a1(now + 1.2) + directives_to_a1(now + 2.4)
    (message,) = told
    assert message["TASK"] == "RETURN" and message["SERVER_RETURN"] == {"ip": "127.0.0.11", "port": 8765}


# --- A server without a worker for a task: forwarded once, or refused -----------------------------


def batches(net: Net, server: str, conn: int) -> list[list[str]]:
    """The task ids of each BATCH the worker on `conn` at `server` was sent."""
    return [[t["ID"] for t in m["TASKS"]] for m in net.take(server, conn) if m.get("TASK") == "BATCH"]


def test_a_task_at_a_server_without_workers_is_forwarded_once_to_the_peer_that_has_one():
    """The README's farm: two servers, one worker, at B, which B keeps (min_own_workers 1). A task
    sent to A is run by B's worker and answered by A; A's client's retry joins it."""
    net, a, b = two_servers(lend_queue_threshold=200, no_task_wait_s=60.0)
    b.on_message(11, alive("b1"), 0.0)
    net.tick(0.5)  # heartbeats: A learns that B has a worker for every kind of task
    assert a.peers[B_KEY].runs == {"QUERY", "UPDATE"} and a.status(0.5)["RUNS"] == []
    a.on_message(2, deposit("op-1"), 0.5)
    net.tick(1.0)
    b.pump(1.0)
    net.run(1.0)
    assert batches(net, B_KEY, 11) == []  # it waits no_worker_wait_s first: a worker may connect meanwhile
    net.tick(1.5)  # B refused to lend its one worker; the task goes to B instead
    a.on_message(3, deposit("op-1"), 1.5)  # the client's retry, at A: it joins the forwarded task
    b.pump(1.5)
    net.run(1.5)
    assert batches(net, B_KEY, 11) == [["op-1"]]
    b.on_message(11, alive("b1", results=[ok("op-1")]), 1.6)
    net.run(1.6)
    answer = {"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}
    assert net.take(A_KEY, 2) == [answer] and net.take(A_KEY, 3) == [answer]
    status = a.status(1.6)
    assert status["TASKS_FORWARDED_TOTAL"] == 1 and status["FORWARDED"] == 0 and not a.tasks
    assert b.workers["b1"].placement == HOME  # nothing was lent


def test_a_task_no_server_of_the_farm_can_run_is_refused_no_worker_and_never_sent_back():
    net, a, b = two_servers(lend_queue_threshold=200, no_task_wait_s=60.0)
    b.on_message(11, alive("b1"), 0.0)
    net.tick(0.5)  # A hears that B has a worker
    a.on_message(2, deposit("op-1"), 0.5)
    net.tick(1.0)
    b.on_disconnect(11, 1.4)  # B's only worker goes away before A hears of it
    net.tick(1.5)
    assert a.tasks_forwarded_total == 1
    for now in (2.0, 2.5, 3.0):
        net.tick(now)
    assert net.take(A_KEY, 2) == []  # B refused it (NO_WORKER) instead of sending it back; A waits again
    assert b.no_worker_total == 1 and b.tasks_forwarded_total == 0
    net.tick(3.5)
    (reply,) = net.take(A_KEY, 2)
    assert (reply["ID"], reply["ERROR"], reply["DEFINITE"]) == ("op-1", "NO_WORKER", True)
    assert "no worker is connected here" in reply["DETAIL"] and f"peer {B_KEY} has none" in reply["DETAIL"], reply
    assert not a.tasks and not b.tasks


def test_a_forward_that_gets_no_answer_is_sent_again_under_its_id_and_applied_once():
    net, a, b = two_servers(lend_queue_threshold=200, no_task_wait_s=60.0)
    b.on_message(11, alive("b1"), 0.0)
    net.tick(0.5)
    a.on_message(2, deposit("op-1"), 0.5)
    net.tick(1.0)
    net.tick(1.5)
    b.pump(1.5)
    net.run(1.5)
    assert batches(net, B_KEY, 11) == [["op-1"]]
    net.lose_forwards(1.6)  # the link breaks: A cannot know whether B ran it
    b.on_message(11, alive("b1", results=[ok("op-1")]), 1.7)  # it did
    net.run(1.7)
    assert net.take(A_KEY, 2) == []
    for now in (2.0, 2.5, 3.0):
        net.tick(now)
    assert net.take(A_KEY, 2) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]
    assert a.tasks_forwarded_total == 2 and batches(net, B_KEY, 11) == []  # B answered from its record
    assert b.workers["b1"].tasks_done == 1


def test_an_update_at_a_server_whose_only_worker_is_a_borrowed_seed_worker_is_run_by_the_peers_saldo_worker():
    """A seed worker runs QUERY only: it does not count as a worker for a deposit."""
    net, a, b = two_servers(lend_queue_threshold=200, no_task_wait_s=60.0)
    b.on_message(11, alive("b1"), 0.0)  # B: an idle saldo worker, the one it keeps (min_own_workers 1)
    a.on_message(21, {"WORKER": "ALIVE", "WORKER_UUID": "s1", "SERVER_UUID": "srv-b"}, 0.0)  # A: B's seed worker
    net.tick(0.5)
    assert a.status(0.5)["RUNS"] == ["QUERY"]
    a.on_message(2, deposit("op-1"), 0.5)
    a.on_message(3, {"TASK": "QUERY", "USER": "alice", "ID": "r-1"}, 0.5)
    a.pump(0.5)
    net.run(0.5)
    assert [m["TASK"] for m in net.take(A_KEY, 21)] == ["QUERY"]  # the seed worker takes the read only
    net.tick(1.0)
    net.tick(1.5)
    b.pump(1.5)
    net.run(1.5)
    assert batches(net, B_KEY, 11) == [["op-1"]]
    b.on_message(11, alive("b1", results=[ok("op-1")]), 1.6)
    net.run(1.6)
    assert net.take(A_KEY, 2) == [{"ID": "op-1", "STATUS": "OK", "BALANCE": "10.00"}]


def test_a_server_short_of_a_worker_for_updates_borrows_one_that_runs_them_not_a_seed_worker():
    net, a, b = two_servers(lend_queue_threshold=200, min_own_workers=0, no_task_wait_s=60.0)
    a.on_message(21, {"WORKER": "ALIVE", "WORKER_UUID": "s-a"}, 0.0)  # A's own worker: a seed worker
    b.on_message(11, {"WORKER": "ALIVE", "WORKER_UUID": "s-b"}, 0.0)  # B's: a seed worker, idle the longest,
    b.on_message(12, alive("b1"), 0.0)  # and a saldo worker
    a.on_message(2, deposit("op-1"), 0.0)
    net.tick(0.3)
    net.tick(0.9)
    assert [w.worker_id for w in b.workers.values() if w.placement == LENT] == ["b1"]
    assert [m["TASK"] for m in net.take(B_KEY, 12)] == ["REDIRECT"] and net.take(B_KEY, 11) == []


def test_classify_keeps_client_queries_and_worker_statuses_apart():
    from common.farm.core import classify

    assert classify({"TASK": "QUERY", "USER": "alice"}) == "client"
    assert classify({"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": "w"}) == "result"
    assert classify({"WORKER": "ALIVE", "WORKER_UUID": "w", "SERVER_UUID": "s"}) == "worker"
    assert classify({"SERVER": "ALIVE", "TASK": "REQUEST"}) == "peer"
    assert classify({"SERVER_UUID": "s", "RESPONSE": "RELEASE_COMPLETED"}) == "peer"
    assert classify({"TASK": "STATUS"}) == "status"
    with pytest.raises(SaldoError):
        from common.farm.core import check_id

        check_id("has space", "WORKER_UUID")


def test_a_worker_naming_this_servers_address_as_owner_is_its_own_even_under_a_custom_id():
    core = make_core("srv-a")  # its id is not its address
    core.on_message(1, alive("w1", owner=A_KEY), 0.0)  # a worker that has not yet heard the id
    core.on_message(2, alive("w2", owner="127.0.0.99:1"), 0.0)  # someone else's
    placements = {w.worker_id: w.placement for w in core.workers.values()}
    assert placements == {"w1": HOME, "w2": BORROWED}


def test_the_supervisor_report_has_the_seed_v2_shape():
    core = make_core()
    core.on_message(1, alive("w1"), 0.0)
    core.on_message(2, deposit("op-1"), 0.0)
    core.pump(0.0)
    report = core.performance_report(1.0, {"uptime_s": 1.0}, "2026-01-01T00:00:00Z", "m-1")
    assert report["task"] == "performance_report" and report["server_uuid"] == "srv-a" and report["mensage_id"] == "m-1"
    assert report["performance"]["farm_state"]["tasks"]["tasks_running"] == 1
    assert report["performance"]["farm_state"]["workers"]["workers_utilization"] == 1
    assert report["neighbors"] == [{"server_uuid": B_KEY, "status": "unavailable", "last_heartbeat": None}]


# --- The client -------------------------------------------------------------------------------


def test_a_farm_client_waits_twice_as_long_after_each_attempt_that_timed_out():
    """A farm server answers only with a task's result, and a task may wait in a queue: a retry at
    the same fixed timeout, again and again, would only pile up attempts."""

    class Unanswered(FarmClient):
        def submit(self, request_id, line, on_reply, timeout_s=None, is_read=False):
            self.timeouts_s.append(timeout_s)
            on_reply({"ID": request_id, "STATUS": "NOK", "ERROR": "TIMEOUT", "DETAIL": "no reply in time", "DEFINITE": False})

    async def scenario() -> list[float]:
        client = Unanswered([("127.0.0.1", 9)])
        client.timeouts_s = []
        await execute_with_retries(client, "r-1", b"", deadline_s=time.monotonic() + 0.5, attempt_timeout_s=0.05,
                                   is_read=True)
        await client.close()
        return client.timeouts_s

    assert asyncio.run(scenario())[:3] == pytest.approx([0.05, 0.1, 0.2])


def test_a_refusal_that_took_a_while_is_the_answer_when_the_deadline_leaves_no_time_to_ask_again():
    """A farm server waits no_worker_wait_s before it says NO_WORKER: an attempt started too close
    to the client's deadline would only time out, and turn "no worker" into "outcome unknown"."""
    refusal_s = 0.3

    class WaitsThenRefuses:
        async def execute(self, request_id, line, timeout_s=None, is_read=False):
            await asyncio.sleep(min(refusal_s, timeout_s))
            if timeout_s < refusal_s:
                return {"ID": request_id, "STATUS": "NOK", "ERROR": "TIMEOUT", "DETAIL": "no reply in time", "DEFINITE": False}
            return {"ID": request_id, "STATUS": "NOK", "ERROR": "NO_WORKER", "DETAIL": "no worker", "DEFINITE": True}

    reply, _attempts, outcome = asyncio.run(execute_with_retries(
        WaitsThenRefuses(), "op-1", b"", deadline_s=time.monotonic() + 1.0, attempt_timeout_s=2.0))
    assert (reply["ERROR"], outcome) == ("NO_WORKER", "failed")
