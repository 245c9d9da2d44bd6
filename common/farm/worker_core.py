"""The farm worker's protocol: where it connects, which dialect it speaks, how long it waits, without I/O.

Owns every decision of a farm worker (seed 000's client.py) other than running tasks. The driver
(common/farm/worker.py) carries out one step at a time and tells the core what came of it:

    step = core.start()
    Connect(address)  open a connection: core.on_connected(), or core.on_connect_failed(reason)
    Send(message)     send it on the open connection and read one reply: core.on_reply(reply), or
                      core.on_connection_lost(reason) when the connection ends first
    Execute(tasks)    run the tasks against the store: core.on_executed(results), one per task
    Pause(seconds)    close the connection if one is open, wait: core.on_paused()

and logs the events `take_events()` returns (common/core.py's Event). No clock, no socket, no log: the jitter of waits comes
from the `random.Random` the core is given, so a test scripts any order of replies
(tests/test_farm_worker_core.py). docs/farm-protocol.md has the messages.

Rules, in order:

1. Dialect. A server's dialect is read from its replies and remembered per address. A reply with
   saldo's marks (TASK BATCH, or a SERVER_UUID: saldo's servers name themselves in every message)
   means saldo. Any other reply that is not a refusal (a bare task such as {"TASK": "QUERY",
   "USER": ...}, NO_TASK, a REDIRECT or RETURN naming only SERVER_REDIRECT / SERVER_RETURN, an
   ACK) means v2, the seed's later version, whose servers answer one message per connection and
   then close it (so the worker, too, sends one message per connection to them). A server not yet
   heard from is sent saldo's ALIVE, which a v2 server reads as its own.
2. What the worker says. ALIVE carries WORKER_UUID; to a saldo server also MAX_TASKS, ACCEPTS and
   the results of the last batch. SERVER_UUID goes only while the worker is away from home (lent,
   or failed over): it names the owner, its SERVER_UUID as the home server said it or as
   `owner_id` gives it (a v2 server never says its own), else the home's HOST:PORT.
3. Results. A saldo server's results ride on the next ALIVE of the same connection; if that
   connection ends first they are not sent again (the server has put that connection's tasks back
   in its queue and runs them again), and the driver logs how many. A v2 server's task is answered
   by {"STATUS": "OK"|"NOK", "TASK", "WORKER_UUID"} (plus saldo's ID, SALDO or ERROR) on a new
   connection, the server's way, until it says ACK; a delivery that fails is retried to the same
   server, at most `max_delivery_attempts` times, and then dropped with a warning.
4. Where it goes. REDIRECT: to TARGET_MASTER (saldo, v1) or SERVER_REDIRECT (v2), remembering
   HOME_MASTER and the lender's SERVER_UUID when given. RETURN: home. A server that cannot be
   reached, or ends the connection before answering anything: home first, then the failover list
   in turn (`failover` and every FAILOVER_LIST a saldo server sends). A server that answered and
   then closed is tried again.
5. Waiting. Every end of a connection is followed by a pause, varied by +-`jitter_fraction`:
   `retry_initial_s` after a connection that served (tasks, an ACK, a move); doubling up to
   `retry_max_s` while servers fail (failed connects, refusals, connections lost before an answer)
   or, for a v2 server, keep answering NO_TASK (a saldo server holds an idle ALIVE itself, so
   its NO_TASK is answered at once on the same connection). So a worker opens at most
   1 / (retry_initial_s x (1 - jitter_fraction)) connections a second, whatever a server does.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NamedTuple

from common.bank.errors import SaldoError
from common.core import INFO, WARNING, Event
from common.farm.core import SALDO, V2, check_id

Address = tuple[str, int]

# Servers named in FAILOVER_LIST messages that a worker remembers.
MAX_FAILOVER_SERVERS = 16
# Servers whose dialect a worker remembers (home, failover list, borrowers it was sent to).
MAX_KNOWN_SERVERS = 64
# Sends of one result to a v2 server before it is dropped (and logged).
DEFAULT_MAX_DELIVERY_ATTEMPTS = 5
# An address in a message: a host name of at most 253 characters, a TCP port.
MAX_HOST_CHARS = 253
MAX_PORT = 65535

# How a connection ended, for the pause that follows (rule 5).
SERVED, IDLE, REFUSED, LOST = "served", "idle", "refused", "lost"


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker's decisions depend on; times in seconds."""

    worker_id: str
    home: Address  # the owner, where the worker serves unless lent
    failover: tuple[Address, ...] = ()
    owner_id: str | None = None  # the home server's SERVER_UUID when the operator names it
    max_tasks: int = 64  # tasks asked for at once (one transaction)
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    jitter_fraction: float = 0.2
    max_delivery_attempts: int = DEFAULT_MAX_DELIVERY_ATTEMPTS

    def __post_init__(self) -> None:
        check_id(self.worker_id, "worker_id")
        if self.owner_id is not None:
            check_id(self.owner_id, "owner_id")
        assert self.max_tasks > 0 and self.max_delivery_attempts > 0
        assert 0 < self.retry_initial_s <= self.retry_max_s and 0 <= self.jitter_fraction < 1


# --- What the core asks its driver to do ------------------------------------------------------


class Connect(NamedTuple):
    address: Address


class Send(NamedTuple):
    """Send on the open connection, then read one reply."""

    message: dict


class Execute(NamedTuple):
    """Run these tasks against the store; report one result per task."""

    tasks: list


class Pause(NamedTuple):
    """Close the connection if one is open, then wait."""

    seconds: float


Step = Connect | Send | Execute | Pause


class Delivery:
    """A v2 task's outcome on its way to the server that gave the task."""

    __slots__ = ("server", "message", "attempts")

    def __init__(self, server: Address, message: dict) -> None:
        self.server = server
        self.message = message
        self.attempts = 0


def format_address(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def parse_address(value: object, host_key: str, port_key: str) -> Address | None:
    """{host_key: "10.0.0.1", port_key: 8765} as an address; None when it is not one."""
    if type(value) is not dict:
        return None
    host, port = value.get(host_key), value.get(port_key)
    if type(host) is not str or not 0 < len(host) <= MAX_HOST_CHARS:
        return None
    if type(port) is not int or not 0 < port <= MAX_PORT:
        return None
    return host, port


class WorkerCore:
    """One worker's protocol state; see the module docstring for the rules it follows."""

    def __init__(self, config: WorkerConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.home = config.home
        self.failover = list(config.failover)
        self.current = config.home  # the server this worker serves
        self.learned_owner: str | None = None  # the home server's SERVER_UUID, once it said it
        self.dialects: OrderedDict[Address, str] = OrderedDict()
        self.batch_results: list[dict] = []  # saldo: to ride on the next ALIVE
        self.deliveries: deque[Delivery] = deque()  # v2: outcomes not yet acknowledged
        self.failures = 0  # connections in a row that failed (rule 5)
        self.idle_polls = 0  # NO_TASK answers in a row from a v2 server
        self.failover_turn = 0  # which failover server comes next
        self.events: list[Event] = []  # for the driver's log (common/core.py's Event)
        self._answered = False  # the open connection's server answered at least once
        self._in_flight: dict | None = None  # the message sent, whose reply is awaited
        self._executing: list | None = None
        # Counters for the worker's STATUS.
        self.connections_total = 0
        self.moves_total = 0
        self.results_delivered_total = 0
        self.results_dropped_total = 0

    # --- The driver's side ---------------------------------------------------------------------
    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def start(self) -> Step:
        return Connect(self._target())

    def on_paused(self) -> Step:
        return Connect(self._target())

    def on_connected(self) -> Step:
        self._answered = False
        self.connections_total += 1
        if self.deliveries:
            return self._send(self.deliveries[0].message)
        return self._send(self._alive())

    def on_connect_failed(self, reason: str) -> Step:
        self._event("connect_failed", server=format_address(self._target()), error=reason)
        if self.deliveries:
            return self._delivery_failed(reason)
        return self._ended(LOST)

    def on_connection_lost(self, reason: str) -> Step:
        """The connection ended (closed by the server, reset, or no reply in time) before the
        reply to what was sent."""
        sent, self._in_flight = self._in_flight, None
        server = self.current
        if sent is not None and "STATUS" in sent:
            return self._delivery_failed(reason)
        if sent is not None and sent.get("RESULTS"):
            self._event("results_not_delivered", WARNING, server=format_address(server), results=len(sent["RESULTS"]),
                        reason=reason, detail="the server runs the tasks of a closed connection again")
        self._event("connection_ended", server=format_address(server), reason=reason)
        return self._ended(SERVED if self._answered else LOST)

    def on_reply(self, reply: dict | SaldoError) -> Step:
        sent, self._in_flight = self._in_flight, None
        assert sent is not None, "a reply to nothing sent"
        self._answered = True
        server = self.current
        if isinstance(reply, SaldoError):
            self._event("undecodable_reply", WARNING, server=format_address(server), error=reply.code)
            return self._delivery_failed(reply.code) if "STATUS" in sent else self._ended(REFUSED)
        if "STATUS" in sent:
            return self._on_status_reply(reply)
        task = reply.get("TASK")
        if reply.get("STATUS") == "NOK":  # e.g. WORKER_ID_IN_USE while the server has not seen our old connection close
            self._event("server_refused", WARNING, server=format_address(server), error=reply.get("ERROR"),
                        detail=reply.get("DETAIL"))
            return self._ended(REFUSED)
        self._learn_dialect(server, SALDO if task == "BATCH" or "SERVER_UUID" in reply else V2)
        if server == self.home and task != "REDIRECT":
            self._learn_owner(reply.get("SERVER_UUID"))
        if task == "BATCH":
            self._learn_failover(reply.get("FAILOVER_LIST"))
            tasks = reply.get("TASKS")
            return self._execute(tasks[: self.config.max_tasks] if type(tasks) is list else [])
        if task == "NO_TASK":
            self._learn_failover(reply.get("FAILOVER_LIST"))
            if self.dialects[server] == SALDO:  # the server held our ALIVE as long as it wanted: ask again
                return self._send(self._alive())
            return self._ended(IDLE)
        if task == "REDIRECT":
            return self._ended(SERVED if self._follow_redirect(reply) else REFUSED)
        if task == "RETURN":
            self._event("returning_home", home=format_address(self.home), borrower=format_address(server),
                        named=self._named_return(reply))
            self.current = self.home
            self.moves_total += 1
            return self._ended(SERVED)
        if type(task) is str:  # one task in the seed's shape
            return self._execute([reply])
        self._event("unexpected_reply", WARNING, server=format_address(server), reply=str(reply)[:200])
        return self._ended(REFUSED)

    def on_executed(self, results: list[dict]) -> Step:
        tasks, self._executing = self._executing, None
        assert tasks is not None and len(results) == len(tasks), "one result per task"
        if self.dialects.get(self.current) == V2:
            # The server closed the connection after its task: the outcome goes on a new one.
            assert len(tasks) == 1, "a v2 server sends one task at a time"
            self.deliveries.append(Delivery(self.current, self._status_message(tasks[0], results[0])))
            return self._ended(SERVED)
        self.batch_results = results
        return self._send(self._alive())

    def status(self) -> dict:
        return {
            "HOME": format_address(self.home),
            "SERVING": format_address(self.current),
            "DIALECT": self.dialects.get(self.current),
            "OWNER": self.owner(),
            "CONNECTIONS_TOTAL": self.connections_total,
            "MOVES_TOTAL": self.moves_total,
            "RESULTS_PENDING": len(self.deliveries),
            "RESULTS_DELIVERED_TOTAL": self.results_delivered_total,
            "RESULTS_DROPPED_TOTAL": self.results_dropped_total,
        }

    # --- Messages ---------------------------------------------------------------------------------
    def owner(self) -> str:
        """The owner's name in SERVER_UUID (rule 2)."""
        return self.learned_owner or self.config.owner_id or format_address(self.home)

    def _alive(self) -> dict:
        message: dict = {"WORKER": "ALIVE", "WORKER_UUID": self.config.worker_id}
        if self.current != self.home:
            message["SERVER_UUID"] = self.owner()
        if self.dialects.get(self.current) != V2:
            message["MAX_TASKS"] = self.config.max_tasks
            message["ACCEPTS"] = ["QUERY", "UPDATE"]
            if self.batch_results:
                message["RESULTS"], self.batch_results = self.batch_results, []
        return message

    def _status_message(self, task: object, result: dict) -> dict:
        """A v2 STATUS for one task's result, with saldo's ID and the seed v1's SALDO / ERROR."""
        kind = task.get("TASK") if type(task) is dict else None
        message = {"STATUS": result["STATUS"], "TASK": kind if type(kind) is str else "QUERY",
                   "WORKER_UUID": self.config.worker_id}
        if result.get("ID") is not None:
            message["ID"] = result["ID"]
        if "BALANCE" in result:
            message["SALDO"] = result["BALANCE"]
        if "ERROR" in result:
            message["ERROR"] = result["ERROR"]
        return message

    def _send(self, message: dict) -> Send:
        self._in_flight = message
        return Send(message)

    def _execute(self, tasks: list) -> Execute:
        self._executing = tasks
        return Execute(tasks)

    # --- Results to a v2 server --------------------------------------------------------------------
    def _on_status_reply(self, reply: dict) -> Step:
        delivery = self.deliveries[0]
        if reply.get("STATUS") != "ACK":
            self._event("result_refused", WARNING, server=format_address(delivery.server),
                        task=delivery.message.get("ID"), reply=str(reply)[:200])
            return self._delivery_failed("not acknowledged")
        if "SERVER_UUID" not in reply:
            self._learn_dialect(delivery.server, V2)
        self.deliveries.popleft()
        self.results_delivered_total += 1
        return self._ended(SERVED)

    def _delivery_failed(self, reason: str) -> Pause:
        delivery = self.deliveries[0]
        delivery.attempts += 1
        if delivery.attempts >= self.config.max_delivery_attempts:
            self.deliveries.popleft()
            self.results_dropped_total += 1
            self._event("result_dropped", WARNING, server=format_address(delivery.server),
                        task=delivery.message.get("ID"), status=delivery.message["STATUS"], attempts=delivery.attempts,
                       reason=reason)
        self.failures += 1
        return Pause(self._backoff_s(self.failures))

    # --- Where to work -------------------------------------------------------------------------
    def _target(self) -> Address:
        return self.deliveries[0].server if self.deliveries else self.current

    def _ended(self, outcome: str) -> Pause:
        """The connection ends: how long to wait, and where to go next (rules 4 and 5)."""
        self._in_flight = None
        if outcome == SERVED:
            self.failures = self.idle_polls = 0
            return Pause(self._backoff_s(1))
        if outcome == IDLE:
            self.failures = 0
            self.idle_polls += 1
            return Pause(self._backoff_s(self.idle_polls))
        self.failures += 1
        if outcome == LOST:
            self._next_server()
        return Pause(self._backoff_s(self.failures))

    def _next_server(self) -> None:
        """After losing the current server: home if it was elsewhere, else the next failover server."""
        others = [a for a in self.failover if a != self.home]
        if self.current != self.home or not others:
            self.current = self.home
        else:
            self.current = others[self.failover_turn % len(others)]
            self.failover_turn += 1
        if self.current != self.home:
            self._event("failing_over", server=format_address(self.current))

    def _backoff_s(self, count: int) -> float:
        """The wait after the count-th such end in a row: exponential, capped, with jitter."""
        config = self.config
        base = min(config.retry_max_s, config.retry_initial_s * 2 ** min(count - 1, 30))
        return base * (1.0 + config.jitter_fraction * (2.0 * self.rng.random() - 1.0))

    def _follow_redirect(self, reply: dict) -> bool:
        target = (parse_address(reply.get("TARGET_MASTER"), "IP", "PORT")
                  or parse_address(reply.get("SERVER_REDIRECT"), "ip", "port"))
        if target is None:
            self._event("bad_redirect", WARNING, reply=str(reply)[:200])
            return False
        home = parse_address(reply.get("HOME_MASTER"), "IP", "PORT")
        if home is not None:
            self.home = home
        self._learn_owner(reply.get("SERVER_UUID"))  # only an owner lends: it stays ours while we serve elsewhere
        self._learn_failover(reply.get("FAILOVER_LIST"))
        self.current = target
        self.moves_total += 1
        self._event("redirected", target=format_address(target), home=format_address(self.home))
        return True

    def _named_return(self, reply: dict) -> str | None:
        named = (parse_address(reply.get("SERVER_RETURN"), "ip", "port")
                 or parse_address(reply.get("HOME_MASTER"), "IP", "PORT"))
        return None if named is None else format_address(named)

    def _learn_owner(self, server_id: object) -> None:
        if type(server_id) is str:
            try:
                self.learned_owner = check_id(server_id, "SERVER_UUID")
            except SaldoError:
                self._event("bad_server_uuid", WARNING, value=server_id[:80])

    def _learn_failover(self, servers: object) -> None:
        if type(servers) is not list:
            return
        addresses = (parse_address(entry, "IP", "PORT") for entry in servers[:MAX_FAILOVER_SERVERS])
        learned = [address for address in addresses if address is not None]
        if learned:
            self.failover = learned

    def _learn_dialect(self, server: Address, dialect: str) -> None:
        if self.dialects.get(server) != dialect:
            self._event("server_dialect", server=format_address(server), dialect=dialect)
        self.dialects[server] = dialect
        self.dialects.move_to_end(server)
        while len(self.dialects) > MAX_KNOWN_SERVERS:
            self.dialects.popitem(last=False)

    def _event(self, name: str, level: str = INFO, /, **fields: object) -> None:
        self.events.append(Event(name, fields, level))
