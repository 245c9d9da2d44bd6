"""common/farm/worker_core.py without I/O: a worker's side of the farm, scripted step by step.

Each test plays the servers: it answers the steps the core returns (a connection that opens or
not, a reply or a closed connection, the results of the tasks it ran) and checks what the core
says next, what it sends and how long it waits.
"""

from __future__ import annotations

import random

from common.farm.worker_core import Connect, Execute, Pause, Send, WorkerConfig, WorkerCore

HOME = ("127.0.0.11", 8765)
PEER = ("127.0.0.12", 8766)
SPARE = ("127.0.0.13", 8767)
INITIAL_S, MAX_S, JITTER = 0.05, 2.0, 0.2


def make_core(**overrides) -> WorkerCore:
    settings = dict(worker_id="w1", home=HOME, failover=(PEER,), max_tasks=8, retry_initial_s=INITIAL_S,
                    retry_max_s=MAX_S, jitter_fraction=JITTER)
    settings.update(overrides)
    return WorkerCore(WorkerConfig(**settings), random.Random(3))


def connected(core: WorkerCore, step, address=None) -> dict:
    """`step` connects (to `address` if given); the connection opens: the message sent on it."""
    assert type(step) is Connect, step
    if address is not None:
        assert step.address == address
    sent = core.on_connected()
    assert type(sent) is Send, sent
    return sent.message


def executed(core: WorkerCore, step, results: list[dict]):
    assert type(step) is Execute, step
    return core.on_executed(results)


def events(core: WorkerCore) -> list[str]:
    return [event.name for event in core.take_events()]


def seed_task(user: str = "alice") -> dict:
    return {"TASK": "QUERY", "USER": user}


def ok(task_id, balance: str = "12.34") -> dict:
    return {"ID": task_id, "STATUS": "OK", "BALANCE": balance}


def serve_one_v2_task(core: WorkerCore, step) -> object:
    """A v2 server: ALIVE on a connection gets a task and the connection ends; the STATUS goes on
    the next connection and gets ACK. Returns the step after the ACK."""
    alive = connected(core, step, HOME)
    assert alive["WORKER"] == "ALIVE"
    after = executed(core, core.on_reply(seed_task()), [ok(None)])
    assert type(after) is Pause
    status = connected(core, core.on_paused(), HOME)
    assert status == {"STATUS": "OK", "TASK": "QUERY", "WORKER_UUID": "w1", "SALDO": "12.34"}
    return core.on_reply({"STATUS": "ACK"})


# --- Dialects and results ------------------------------------------------------------------------


def test_a_saldo_servers_batch_is_answered_on_the_next_alive_of_the_same_connection():
    core = make_core()
    alive = connected(core, core.start(), HOME)
    assert alive == {"WORKER": "ALIVE", "WORKER_UUID": "w1", "MAX_TASKS": 8, "ACCEPTS": ["QUERY", "UPDATE"]}
    batch = {"TASK": "BATCH", "SERVER_UUID": "srv-a", "LEASE_S": 5.0, "TASKS": [{"ID": "t1", "TASK": "QUERY", "USER": "alice"}]}
    step = executed(core, core.on_reply(batch), [ok("t1")])
    assert step == Send({"WORKER": "ALIVE", "WORKER_UUID": "w1", "MAX_TASKS": 8, "ACCEPTS": ["QUERY", "UPDATE"],
                         "RESULTS": [ok("t1")]})
    # A saldo server holds an idle ALIVE itself: its NO_TASK is answered at once, on the same connection.
    step = core.on_reply({"TASK": "NO_TASK", "SERVER_UUID": "srv-a"})
    assert type(step) is Send and "RESULTS" not in step.message
    assert core.status()["DIALECT"] == "saldo" and core.owner() == "srv-a" and core.connections_total == 1


def test_a_seed_v2_servers_task_is_answered_by_a_status_on_a_new_connection_until_it_says_ack():
    core = make_core()
    step = serve_one_v2_task(core, core.start())
    assert type(step) is Pause and INITIAL_S * (1 - JITTER) <= step.seconds <= INITIAL_S * (1 + JITTER)
    # Now the worker speaks the server's own dialect: a bare ALIVE, no saldo fields.
    assert connected(core, core.on_paused(), HOME) == {"WORKER": "ALIVE", "WORKER_UUID": "w1"}
    assert core.status()["DIALECT"] == "v2" and core.results_delivered_total == 1 and core.connections_total == 3


def test_a_v2_result_lost_on_the_way_is_sent_again_and_given_up_with_a_warning_after_the_bound():
    core = make_core(max_delivery_attempts=3)
    connected(core, core.start(), HOME)
    step = executed(core, core.on_reply(seed_task()), [{"ID": None, "STATUS": "NOK", "ERROR": "ACCOUNT_NOT_FOUND"}])
    status = connected(core, core.on_paused(), HOME)
    assert status == {"STATUS": "NOK", "TASK": "QUERY", "WORKER_UUID": "w1", "ERROR": "ACCOUNT_NOT_FOUND"}
    step = core.on_connection_lost("closed_by_server")  # no ACK: the server did not take it
    assert connected(core, core.on_paused(), HOME) == status  # the same result again, to the same server
    assert type(core.on_reply({"STATUS": "NOK", "ERROR": "UNKNOWN_MESSAGE"})) is Pause  # not an ACK either
    events(core)
    step = core.on_connect_failed("ConnectionRefusedError")  # third attempt: the bound
    assert type(step) is Pause
    assert [e for e in core.take_events() if e.name == "result_dropped"][0].level == "warning"
    assert core.results_dropped_total == 1 and core.results_delivered_total == 0
    assert connected(core, core.on_paused(), HOME)["WORKER"] == "ALIVE"  # nothing left to deliver


def test_results_that_rode_on_a_saldo_alive_whose_connection_closed_are_logged_not_sent_again():
    core = make_core()
    connected(core, core.start(), HOME)
    batch = {"TASK": "BATCH", "SERVER_UUID": "srv-a", "TASKS": [{"ID": "t1", "TASK": "QUERY", "USER": "alice"}]}
    executed(core, core.on_reply(batch), [ok("t1")])
    step = core.on_connection_lost("closed_by_server")
    assert type(step) is Pause and "results_not_delivered" in events(core)
    assert "RESULTS" not in connected(core, core.on_paused(), HOME)  # the server runs those tasks again


# --- Owner, REDIRECT, RETURN ---------------------------------------------------------------------


def test_alive_names_the_owner_only_while_the_worker_is_away_from_home():
    core = make_core()
    assert "SERVER_UUID" not in connected(core, core.start(), HOME)
    redirect = {"TASK": "REDIRECT", "TARGET_MASTER": {"IP": PEER[0], "PORT": PEER[1]}, "HOME_MASTER": {"IP": HOME[0], "PORT": HOME[1]},
                "SERVER_REDIRECT": {"ip": PEER[0], "port": PEER[1]}, "SERVER_UUID": "srv-a"}
    assert type(core.on_reply(redirect)) is Pause
    alive = connected(core, core.on_paused(), PEER)
    assert alive["SERVER_UUID"] == "srv-a"  # the lender, its owner
    back = core.on_reply({"TASK": "RETURN", "SERVER_RETURN": {"ip": HOME[0], "port": HOME[1]}, "SERVER_UUID": "srv-b"})
    assert type(back) is Pause
    assert "SERVER_UUID" not in connected(core, core.on_paused(), HOME)
    assert core.moves_total == 2


def test_a_seed_servers_redirect_and_return_are_followed_and_the_owner_is_named_as_configured():
    core = make_core(owner_id="SERVER_1")
    connected(core, core.start(), HOME)
    step = core.on_reply({"TASK": "REDIRECT", "SERVER_REDIRECT": {"ip": PEER[0], "port": PEER[1]}})
    assert type(step) is Pause
    alive = connected(core, core.on_paused(), PEER)
    assert alive["SERVER_UUID"] == "SERVER_1"
    step = core.on_reply({"TASK": "RETURN", "SERVER_RETURN": {"ip": HOME[0], "port": HOME[1]}})
    assert type(step) is Pause and core.dialects[PEER] == "v2"
    assert "SERVER_UUID" not in connected(core, core.on_paused(), HOME)


def test_without_a_configured_owner_a_lent_worker_names_its_homes_address():
    core = make_core()
    connected(core, core.start(), HOME)
    core.on_reply({"TASK": "REDIRECT", "SERVER_REDIRECT": {"ip": PEER[0], "port": PEER[1]}})
    assert connected(core, core.on_paused(), PEER)["SERVER_UUID"] == "127.0.0.11:8765"


def test_a_redirect_without_an_address_is_refused_with_a_warning_and_the_worker_stays():
    core = make_core()
    connected(core, core.start(), HOME)
    step = core.on_reply({"TASK": "REDIRECT", "SERVER_REDIRECT": {"ip": "", "port": 70000}})
    assert type(step) is Pause and "bad_redirect" in events(core)
    assert core.on_paused() == Connect(HOME)


# --- Waiting and failover ------------------------------------------------------------------------


def test_every_end_of_a_connection_is_followed_by_a_pause_so_connections_per_second_stay_bounded():
    core = make_core()
    step = core.start()
    pauses = []
    for _ in range(50):  # a v2 server with work for ever: two connections per task
        step = serve_one_v2_task(core, step)
        assert type(step) is Pause
        pauses.append(step.seconds)
        step = core.on_paused()
    # Each pause is at least the initial wait less its jitter: at most 25 connections a second.
    assert min(pauses) >= INITIAL_S * (1 - JITTER) and core.connections_total == 100


def test_a_v2_server_with_nothing_to_do_is_asked_again_less_and_less_often_up_to_the_cap():
    core = make_core()
    step = core.start()
    pauses = []
    for _ in range(12):
        connected(core, step, HOME)
        step = core.on_reply({"TASK": "NO_TASK"})
        pauses.append(step.seconds)
        step = core.on_paused()
    assert pauses[1] > pauses[0] * (1 - JITTER) / (1 + JITTER) * 2 * 0.99
    assert MAX_S * (1 - JITTER) <= pauses[-1] <= MAX_S * (1 + JITTER)
    # A task resets it.
    assert serve_one_v2_task(core, step).seconds <= INITIAL_S * (1 + JITTER)


def test_an_unreachable_server_is_left_for_home_then_the_failover_list_with_growing_pauses():
    core = make_core(failover=(PEER, SPARE))
    step = core.start()
    tried, pauses = [], []
    for _ in range(6):
        assert type(step) is Connect
        tried.append(step.address)
        pause = core.on_connect_failed("ConnectionRefusedError")
        pauses.append(pause.seconds)
        step = core.on_paused()
    assert tried == [HOME, PEER, HOME, SPARE, HOME, PEER]
    assert all(later > earlier for earlier, later in zip(pauses, pauses[1:]))
    # A server that answers resets the pauses.
    connected(core, step, HOME)
    assert core.on_reply({"TASK": "NO_TASK", "SERVER_UUID": "srv-a"}) == Send({"WORKER": "ALIVE", "WORKER_UUID": "w1",
                                                                               "MAX_TASKS": 8, "ACCEPTS": ["QUERY", "UPDATE"]})
    assert core.on_connection_lost("closed_by_server").seconds <= INITIAL_S * (1 + JITTER)


def test_a_server_that_refuses_the_worker_is_asked_again_after_a_growing_pause():
    core = make_core()
    step = core.start()
    pauses = []
    for _ in range(3):
        connected(core, step, HOME)
        pause = core.on_reply({"STATUS": "NOK", "ERROR": "WORKER_ID_IN_USE", "DETAIL": "w1 is served by another open connection"})
        pauses.append(pause.seconds)
        step = core.on_paused()
    assert step == Connect(HOME) and pauses[0] < pauses[1] < pauses[2]
    assert "server_refused" in events(core)
