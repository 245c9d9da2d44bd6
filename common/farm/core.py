"""The worker farm's protocol: one orchestrator server as a state machine, without I/O.

Owns what a farm server (seed 000's `server.py`) decides: which task goes to which worker, when a
task held too long goes back to the queue, which peers are up, when to ask a peer for workers, which
workers to lend, when to give borrowed workers back. It never touches a socket, a timer or the
clock, and it never logs: the driver (common/farm/server.py) feeds it messages with the time they
arrived, `now_s` (`on_message`, `on_disconnect`, `on_peer_result`, `tick`), and carries out what
it decided, taken with `take_output()` as every core's (common/core.py): replies on connections,
requests to peer servers whose answers come back through `on_peer_result`, connections to close,
and events to log. Randomness (the jitter of retries) comes from the `random.Random` it is given.
So every order of events can be scripted in a test with a fake clock (tests/test_farm_core.py). The full protocol, with the seed's message shapes and
saldo's additions, is docs/farm-protocol.md.

Tasks. A client's request becomes a task: an UPDATE (DEPOSIT, WITHDRAW, TRANSFER: its id is the
client's operation id) or a QUERY (a balance read: its id is "q#" and the request's ID, so a retry
of the same read joins it, or, for `completed_reads_memory` reads, gets its answer; a read without
an ID, or whose ID another read holds, gets an id of its own). A task is QUEUED, then HELD by one worker under a lease of `visibility_timeout_s` (or
FORWARDED to a peer, below), then DONE (the result goes to every client connection that asked for
that id). A task goes back to the queue, at its front, when its
worker's lease runs out, or at once when a saldo worker (one that keeps its connection) disconnects.
Redelivery is safe because workers apply updates through common/storage/store.py, which records each
operation id with its outcome in the same transaction: a second apply returns the first outcome.
The server also remembers the ids it has queued, handed out and (for `completed_memory` updates)
finished, so a client's retry joins the task or gets the recorded reply instead of a second run;
an id that names another operation is refused with ID_REUSED, like the store does.
The queue holds at most `max_queue` tasks; past that a client gets QUEUE_FULL. A result that is not
one (a SALDO of -5, "abc" or 1e30) is logged with its worker and the task redelivered; after
`max_task_attempts` deliveries the client gets BAD_RESULT (a read) or UNAVAILABLE (an update, which
may have been applied), naming the worker, as it gets UNAVAILABLE for other failed deliveries.

No worker here. A task that no worker present here can run (none at all, or, for an update, only
seed workers, which run QUERY only) waits `no_worker_wait_s` for one to connect or be lent. Then it
goes, once, to an up peer whose heartbeats say it has a worker for that kind of task, as a client
request with the same id, marked FORWARDED_BY: the peer never forwards it again, so a task makes at
most one hop; the peer's answer is the task's. With no such peer it is refused: NO_WORKER
(definite: nothing ran it), or UNAVAILABLE when an earlier attempt may have run an update. A
forward that gets no answer, or a "not now" refusal, puts the task back in the queue as a failed
delivery does: a forward counts as an attempt, and the id makes a second run answer the first
outcome. While workers a peer agreed to lend are on their way, nothing is forwarded.

Workers. A worker says `{"WORKER": "ALIVE", ...}` to ask for work; the server answers with work,
or holds the request (a long poll) until there is some, or answers NO_TASK after `no_task_wait_s`
(not to seed-v1 workers, which do not know that message). Three dialects are understood:
  v1     (seed 000's tables): no WORKER_UUID; one QUERY at a time; STATUS without an answer.
  v2     (the seed's later version): WORKER_UUID on every message, maybe a new connection per
         message; one QUERY at a time; STATUS answered with ACK.
  saldo  MAX_TASKS > 1 and ACCEPTS ["QUERY", "UPDATE"]: batches of tasks, results of the previous
         batch carried by the next ALIVE (one round trip per batch).
Only workers that accept UPDATE get updates: wherever the farm counts workers for a task (to run
it, to borrow, to lend, to forward, to give back), it counts those that can run that kind. A worker has an owner: the server it names in
SERVER_UUID, or this server when it names none. Ownership never moves during a loan, so no worker
is ever owned by two servers.

Peers. Each configured peer is probed with a heartbeat every `heartbeat_interval_s`. A failed probe
is retried after an exponential backoff with jitter; `heartbeat_miss_limit` failures in a row mark
the peer down (it is no longer asked for workers); the first answer marks it up again. A down peer
is probed with the same backoff, capped at `retry_max_s`. A message from a peer also counts as a
heartbeat. Heartbeats carry WORKERS_HELD: which of the receiver's workers the sender holds, so an
owner learns of a lent worker that died at the borrower; and RUNS: the kinds of task (QUERY,
UPDATE) a worker present at the sender can run, which is where forwarded tasks go.

Lending. A server whose queue stays above `lend_queue_threshold` for `overload_s` asks each up peer
for workers (WORKER_REQUEST); so does a server with tasks queued that no worker here can run,
whatever the length of its queue (nothing else would ever run them). The request names the kinds
of task it needs run (TASK_KINDS). A peer whose own queue is short lends idle workers it has at
home that can run one of those kinds, never leaving fewer than `min_own_workers` at home: it
answers ACK with their ids and sends each one REDIRECT. When the borrower's queue stays below
`return_queue_threshold` for `underload_s` (and its own workers can run what is queued), it
sends the owner COMMAND_RELEASE, the owner answers RELEASE_ACK, the borrower answers each of those workers'
next ALIVE with RETURN, and when all are home the owner sends RELEASE_COMPLETED. A worker whose
borrower dies goes home by itself (its connection breaks); a worker whose server dies goes through
its FAILOVER_LIST, and the peer that takes it in serves with it until its owner is up again.
"""

from __future__ import annotations

import math
import random
import re
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

from common.bank.errors import ERROR_CODES, SaldoError, error_reply, is_definite, with_id_msg
from common.bank.money import parse_balance_cents, render_cents
from common.bank.state import TRANSFER, Operation, Query, balance_reply, make_operation, parse_request
from common.core import WARNING, Core
from common.transport import wire

# Worker and server ids are echoed in messages and logs: a plain character set, bounded.
MAX_ID_CHARS = 64
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]+")
# Bounds on lists in one message (ids in a lending message, results in one ALIVE).
MAX_IDS_PER_MESSAGE = 1024
# A client retrying the same id on many connections: the waiters one task keeps.
MAX_WAITERS_PER_TASK = 16
# Worker records this server keeps (connected, lent out, or recently seen).
MAX_WORKERS = 4096
# Window over which TASKS_PER_S is measured.
RATE_WINDOW_S = 5

# Placement of a worker, as this server sees it.
HOME = "home"  # one of ours, here
LENT = "lent"  # one of ours, sent to a peer (REDIRECT given) or held by one
BORROWED = "borrowed"  # another server's, here

# Worker dialects (see the module docstring).
V1, V2, SALDO = "v1", "v2", "saldo"

# Peer states.
UNKNOWN, UP, DOWN = "unknown", "up", "down"

# Kinds of task, as a worker's ACCEPTS, a peer's RUNS and a WORKER_REQUEST's TASK_KINDS name them.
QUERY, UPDATE = "QUERY", "UPDATE"
TASK_KINDS = frozenset({QUERY, UPDATE})
# A peer's refusals of a forwarded task that mean "not now, nothing done": the task stays ours.
FORWARD_NOT_NOW = frozenset({"QUEUE_FULL", "OVERLOADED", "NO_WORKER", "NOT_READY"})
# A query's id from its client: a string or an integer, this long at most as text.
MAX_QUERY_ID_CHARS = 128

# Server-to-server TASK values and RESPONSE values, in every version (seed v1, v2, saldo).
PEER_TASKS = frozenset({"HEARTBEAT", "REQUEST", "RECIEVE", "WORKER_REQUEST", "WORKER_RESPONSE", "COMMAND_RELEASE"})
PEER_RESPONSES = frozenset({"ALIVE", "AVAILABLE", "UNAVAILABLE", "RELEASE_ACK", "RELEASE_COMPLETED"})


@dataclass(frozen=True)
class FarmConfig:
    """Everything a server's behaviour depends on; times in seconds, sizes in tasks or workers."""

    server_id: str
    address: tuple[str, int]  # where workers and peers reach this server
    peers: tuple[tuple[str, int], ...] = ()
    max_queue: int = 100_000
    max_batch_tasks: int = 128  # the most tasks one saldo worker holds at once
    visibility_timeout_s: float = 5.0
    no_task_wait_s: float = 1.0
    max_task_attempts: int = 5
    completed_memory: int = 100_000
    # Finished reads whose answer a retry of the same read (the same ID) gets: a client retries
    # within seconds, and that answer was read after its first attempt arrived, so it is the
    # read's own.
    completed_reads_memory: int = 10_000
    heartbeat_interval_s: float = 0.5
    heartbeat_miss_limit: int = 3
    retry_initial_s: float = 0.1
    retry_max_s: float = 5.0
    jitter_fraction: float = 0.2
    lend_queue_threshold: int = 200
    overload_s: float = 0.5
    return_queue_threshold: int = 10
    underload_s: float = 1.0
    min_own_workers: int = 1
    max_borrowed: int = 16
    request_cooldown_s: float = 1.0  # after a NACK or a failed request, before asking that peer again
    redirect_timeout_s: float = 5.0  # a lent worker not seen at the borrower by then is not expected
    worker_forget_s: float = 30.0  # a worker not heard of for this long is forgotten
    no_worker_wait_s: float = 1.0  # a task no worker here can run waits this long, then is forwarded or refused
    # How long a forwarded task's answer may take: the peer's queue, a lease or two there. A shorter
    # one only sends the task again (its id joins the first run).
    forward_timeout_s: float = 30.0
    max_forwarded: int = 256  # tasks forwarded to peers and not yet answered

    def __post_init__(self) -> None:
        check_id(self.server_id, "server_id")
        assert self.max_queue > 0 and self.max_batch_tasks > 0 and self.completed_memory > 0 and self.completed_reads_memory > 0
        assert self.visibility_timeout_s > 0 and self.no_task_wait_s > 0 and self.max_task_attempts > 0
        assert self.heartbeat_interval_s > 0 and self.heartbeat_miss_limit > 0
        assert 0 < self.retry_initial_s <= self.retry_max_s and 0 <= self.jitter_fraction < 1
        assert 0 <= self.return_queue_threshold <= self.lend_queue_threshold
        assert self.overload_s >= 0 and self.underload_s >= 0 and self.min_own_workers >= 0 and self.max_borrowed >= 0
        assert self.no_worker_wait_s > 0 and self.forward_timeout_s > 0 and self.max_forwarded > 0


# --- Validation helpers -----------------------------------------------------------------------


def check_id(value: object, field: str) -> str:
    """A worker or server id: a string of 1..64 plain characters (SaldoError otherwise)."""
    if type(value) is not str:
        raise SaldoError("FIELD_TYPE", f"{field} must be a string")
    if not 0 < len(value) <= MAX_ID_CHARS or _ID_RE.fullmatch(value) is None:
        raise SaldoError("FIELD_INVALID", f"{field} must have 1 to {MAX_ID_CHARS} of A-Z a-z 0-9 _ . : -")
    return value


def _check_id_list(value: object, field: str) -> list[str]:
    if type(value) is not list:
        raise SaldoError("FIELD_TYPE", f"{field} must be a list of ids")
    if len(value) > MAX_IDS_PER_MESSAGE:
        raise SaldoError("FIELD_INVALID", f"{field} has more than {MAX_IDS_PER_MESSAGE} ids")
    return [check_id(item, field) for item in value]


def address_key(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def address_fields(address: tuple[str, int]) -> dict:
    """An address in the seed's two spellings: v1 {"IP", "PORT"} and v2 {"ip", "port"}."""
    return {"IP": address[0], "PORT": address[1], "ip": address[0], "port": address[1]}


# --- Tasks, workers, peers --------------------------------------------------------------------


class Waiter(NamedTuple):
    """A client waiting for a task's answer: its connection, and what its request asks echoed."""

    conn: int
    request_id: object  # the request's "ID" (None: none given)
    id_msg: object  # seed 002's "id_msg", as it came (None: none given)


class Task:
    """One client request on its way through the farm."""

    __slots__ = ("task_id", "seq", "update", "query", "body", "waiters", "worker", "attempts", "submitted_at",
                 "queued_at", "forward_id", "forwarded_to", "forwarded_in", "may_have_run", "bad_result", "keyed_read")

    def __init__(self, task_id: str, seq: int, update: Operation | None, query: Query | None, body: dict,
                 now_s: float) -> None:
        self.task_id = task_id
        self.seq = seq  # submission order, to merge the two queues fairly
        self.update = update
        self.query = query
        self.body = body  # what a worker receives
        self.waiters: list[Waiter] = []  # the clients to answer
        self.worker: str | None = None
        self.attempts = 0  # deliveries to a worker and forwards to a peer
        self.submitted_at = now_s
        self.queued_at = now_s  # when it last entered the queue
        self.forward_id: object = None  # the "ID" a forward of it carries (its client's, so a peer joins retries)
        self.forwarded_to: str | None = None  # the peer's key, while forwarded
        self.forwarded_in = False  # a peer forwarded it here: it is never forwarded again
        self.may_have_run = False  # a worker got it, or a forward went unanswered: a refusal is not definite
        self.bad_result: str | None = None  # what the last malformed result was, and whose
        self.keyed_read = False  # a read known by its client's ID: its answer is kept for retries

    @property
    def kind(self) -> str:
        return UPDATE if self.update is not None else QUERY


def _task_body(task_id: str, request: Operation | Query) -> dict:
    if isinstance(request, Query):
        return {"ID": task_id, "TASK": QUERY, "USER": request.account}
    amount = render_cents(request.amount_cents)
    if request.kind == TRANSFER:
        return {"ID": task_id, "TASK": TRANSFER, "FROM": request.account, "TO": request.to_account, "AMOUNT": amount}
    return {"ID": task_id, "TASK": request.kind, "ACCOUNT": request.account, "AMOUNT": amount}


class Worker:
    """A worker as this server sees it."""

    __slots__ = (
        "worker_id", "anonymous", "owner", "dialect", "max_tasks", "accepts_updates", "conn", "placement",
        "lent_to", "held", "lease_deadline", "parked", "park_deadline", "directive", "releasing", "last_seen",
        "tasks_done", "bad_results",
    )

    def __init__(self, worker_id: str, owner: str, now_s: float) -> None:
        self.worker_id = worker_id
        self.anonymous = False  # a v1 worker without an id: known only by its connection
        self.owner = owner
        self.dialect = V1
        self.max_tasks = 1
        self.accepts_updates = False
        self.conn: int | None = None
        self.placement = HOME
        self.lent_to: str | None = None  # peer key, while LENT
        self.held: set[str] = set()
        self.lease_deadline = 0.0
        self.parked = False  # its ALIVE waits for an answer
        self.park_deadline: float | None = None  # when to answer NO_TASK (None: hold, v1)
        self.directive: dict | None = None  # REDIRECT or RETURN to give at its next ALIVE
        self.releasing = False  # borrowed, and COMMAND_RELEASE for it is on its way to the owner
        self.last_seen = now_s
        self.tasks_done = 0
        self.bad_results = 0  # results it sent that were not results (logged, redelivered)

    def can_run(self, kinds: frozenset[str]) -> bool:
        """Whether it can run a task of one of these kinds (seed workers run QUERY only)."""
        return QUERY in kinds or (UPDATE in kinds and self.accepts_updates)


class Peer:
    """A configured peer server and what is known of it."""

    __slots__ = (
        "key", "address", "uuid", "state", "last_heard", "failures", "next_probe_at", "heartbeat_outstanding",
        "request_outstanding", "cooldown_until", "queue_length", "pending_release", "pending_release_since", "runs",
    )

    def __init__(self, address: tuple[str, int]) -> None:
        self.key = address_key(address)
        self.address = address
        self.uuid = self.key  # saldo servers' default id; learned from the peer's messages
        self.state = UNKNOWN
        self.last_heard: float | None = None
        self.failures = 0
        self.next_probe_at = 0.0
        self.heartbeat_outstanding = False
        self.request_outstanding = False  # a WORKER_REQUEST or COMMAND_RELEASE awaits its reply
        self.cooldown_until = 0.0
        self.queue_length: int | None = None
        # Our workers this peer is giving back (COMMAND_RELEASE acknowledged), not yet home.
        self.pending_release: set[str] = set()
        self.pending_release_since = 0.0
        # The kinds of task a worker present there can run, from its last heartbeat (None: it never
        # said: a seed server, which is never forwarded a task).
        self.runs: frozenset[str] | None = None


# --- The server -------------------------------------------------------------------------------


class FarmCore(Core):
    """One farm server's state; see the module docstring for the rules it follows. What it decides
    comes out of `take_output()` (common/core.py): a Reply is a message on a connection the driver
    numbered (`conn`: a client's, a worker's or a peer's); `close` names connections to drop; a Send
    is a request to a peer server (its "host:port" key) whose answer, or None when there was none,
    comes back through `on_peer_result`. A Send without `timeout_s` is a control message
    (heartbeat, lending), answered within the driver's peer timeout; one with a timeout is a
    forwarded task, whose answer may take that long, so it travels on a connection of its own and
    never holds up a heartbeat. The farm persists nothing itself (its workers write the store), so
    its outputs carry no `persist`."""

    def __init__(self, config: FarmConfig, rng: random.Random, now_s: float) -> None:
        super().__init__()
        self.config = config
        self.rng = rng
        self.started_at = now_s
        self.queue_updates: deque[Task] = deque()
        self.queue_queries: deque[Task] = deque()
        self.tasks: dict[str, Task] = {}  # queued, held or forwarded, by id
        self.forwarded: dict[object, str] = {}  # a forward's "ID" -> its task's id, while the peer has it
        # update id -> (the operation, its reply without "ID"): a retry must be the same operation.
        self.completed: OrderedDict[str, tuple[Operation, dict]] = OrderedDict()
        # read task id ("q#" + its ID) -> (the read, its reply without "ID").
        self.completed_reads: OrderedDict[str, tuple[Query, dict]] = OrderedDict()
        self.workers: dict[str, Worker] = {}
        self.by_conn: dict[int, str] = {}  # connection -> worker id
        self.parked: OrderedDict[str, None] = OrderedDict()  # idle workers waiting, oldest first
        self.peers: dict[str, Peer] = {address_key(a): Peer(a) for a in config.peers}
        self._key = address_key(config.address)
        self._next_seq = 0
        self._overloaded_since: float | None = None
        self._underloaded_since: float | None = None
        self._unrunnable_since: dict[str, float] = {}  # kind -> since when no worker here can run it
        self._workers_promised_until = 0.0  # a peer lent us workers: until then, they may still come
        # Counters for STATUS and the report.
        self.tasks_completed_total = 0
        self.tasks_by_borrowed_total = 0
        self.tasks_requeued_total = 0
        self.late_results_total = 0
        self.rejected_full_total = 0
        self.loans_given_total = 0
        self.loans_received_total = 0
        self.tasks_forwarded_total = 0
        self.no_worker_total = 0
        self.bad_results_total = 0
        self._rate: deque[list[int]] = deque()  # [second, completions]
        self.status_extra: dict = {}  # what the driver adds to STATUS (node name, pid, store counter)
        self.status_probe: Callable[[], dict] | None = None  # figures the driver reads at each STATUS

    # --- The driver's side ---------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self.queue_updates) + len(self.queue_queries)

    def on_message(self, conn: int, message: dict | SaldoError, now_s: float, source_host: str = "") -> None:
        """One message that arrived on connection `conn` (from host `source_host`)."""
        if isinstance(message, SaldoError):  # undecodable line: the wire layer's error, answered
            self._reply(conn, error_reply(message.code, message.detail))
            return
        request_id = None
        try:
            request_id = wire.request_id_of(message)
            kind = classify(message)
            if kind == "peer":
                self._on_peer_message(conn, message, request_id, now_s, source_host)
            elif kind == "worker":
                self._on_worker_alive(conn, message, now_s)
            elif kind == "result":
                self._on_worker_status(conn, message, now_s)
            elif kind == "status":
                reply = self.status(now_s)
                if request_id is not None:
                    reply["ID"] = request_id
                self._reply(conn, reply)
            else:
                self._on_client_task(conn, message, request_id, now_s)
        except SaldoError as error:
            self._reply(conn, with_id_msg(error_reply(error.code, error.detail, request_id), message))

    def on_disconnect(self, conn: int, now_s: float) -> None:
        """Connection `conn` closed. A saldo worker's tasks go back to the queue at once (it kept
        its connection, so a close means it is gone); a v1/v2 worker's stay held until its lease
        ends (a v2 worker opens a connection per message, so a close says nothing)."""
        worker_id = self.by_conn.pop(conn, None)
        if worker_id is None:
            return
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        worker.conn = None
        worker.last_seen = now_s
        self._unpark(worker)
        if worker.dialect == SALDO or worker.anonymous:
            self._requeue_held(worker, "worker_disconnected", now_s)
        if worker.anonymous:
            self._forget_worker(worker)

    def pump(self, now_s: float) -> None:
        """Hand queued tasks to waiting workers; the driver calls it after each batch of input."""
        if not self.parked or not (self.queue_updates or self.queue_queries):
            return
        # One pass over the waiting workers: a worker that can take nothing queued stays parked.
        for worker_id in list(self.parked):
            if not (self.queue_updates or self.queue_queries):
                return
            worker = self.workers[worker_id]
            share = math.ceil(self.queue_length / max(1, len(self.parked)))
            batch = self._take_tasks(worker, min(worker.max_tasks, max(1, share)))
            if batch:
                self._unpark(worker)
                self._hand_out(worker, batch, now_s)

    def tick(self, now_s: float) -> None:
        """Timers: leases, long polls, heartbeats, lending and returning, tasks no worker here can
        run. Called every ~50 ms."""
        self._expire_leases(now_s)
        self._answer_long_polls(now_s)
        self._probe_peers(now_s)
        runs_here, runs_home = self.runnable_kinds(now_s)
        self._watch_load(now_s, runs_here, runs_home)
        self._serve_unrunnable(now_s, runs_here)
        self._forget_stale_workers(now_s)
        self._expire_pending_releases(now_s)
        self.pump(now_s)

    # --- Clients -------------------------------------------------------------------------------
    def _on_client_task(self, conn: int, message: dict, request_id: object, now_s: float) -> None:
        request = parse_client_request(message)
        forwarded_by = message.get("FORWARDED_BY")  # a peer that had no worker for it
        if forwarded_by is not None:
            check_id(forwarded_by, "FORWARDED_BY")
        waiter = Waiter(conn, request_id, message.get("id_msg"))  # seed 002's clients match replies by id_msg
        if isinstance(request, Operation):
            task_id = request.op_id
            done = self.completed.get(task_id)
            if done is not None:  # a retry of a finished update: its recorded answer
                if done[0] != request:
                    self._answer(waiter, _id_reused(task_id))
                else:
                    self.completed.move_to_end(task_id)
                    self._answer(waiter, done[1])
                return
            task = self.tasks.get(task_id)
            if task is not None:  # a retry of a queued, held or forwarded update: wait for the same run
                if task.update != request:
                    self._answer(waiter, _id_reused(task_id))
                else:
                    self._join(task, waiter)
                return
            forward_id: object = task_id
        else:
            task_id = _query_key(request_id)
            forward_id = request_id
            if task_id is not None:
                done = self.completed_reads.get(task_id)
                if done is not None and done[0] == request:  # a retry of a read just answered
                    self._answer(waiter, done[1])
                    return
                task = self.tasks.get(task_id)
                if task is not None and task.query == request:  # a retry of a read that runs: its answer too
                    self._join(task, waiter)
                    return
                if task is not None:
                    task_id = None  # another read holds the id
            if task_id is None:
                self._next_seq += 1
                # '#' is in no operation id (bank.OP_ID_RE) nor in a query key: no one else's id.
                task_id = forward_id = f"q#{self.config.server_id}#{self._next_seq}"
        if self.queue_length >= self.config.max_queue:
            self.rejected_full_total += 1
            self._answer(waiter, error_reply("QUEUE_FULL", f"{self.queue_length} tasks are queued, the bound"))
            return
        self._next_seq += 1
        if isinstance(request, Operation):
            task = Task(task_id, self._next_seq, request, None, _task_body(task_id, request), now_s)
            self.queue_updates.append(task)
        else:
            task = Task(task_id, self._next_seq, None, request, _task_body(task_id, request), now_s)
            self.queue_queries.append(task)
        task.forward_id = forward_id
        task.keyed_read = task.query is not None and forward_id != task_id
        task.forwarded_in = forwarded_by is not None
        task.waiters.append(waiter)
        self.tasks[task_id] = task

    def _join(self, task: Task, waiter: Waiter) -> None:
        """A retry of a task this server has: it waits for the same run."""
        if len(task.waiters) < MAX_WAITERS_PER_TASK:
            task.waiters.append(waiter)
        else:
            self._answer(waiter, error_reply("OVERLOADED", "too many retries wait for this id"))

    def _answer(self, waiter: Waiter, reply: dict) -> None:
        """A client's reply (`reply` without "ID"), with what its request asks to be echoed."""
        reply = _with_id(reply, waiter.request_id)
        if waiter.id_msg is not None:
            reply = {**reply, "id_msg": waiter.id_msg}
        self._reply(waiter.conn, reply)

    def _finish(self, task: Task, reply: dict, worker: Worker | None, now_s: float) -> None:
        """The task is done: answer every waiter and remember an update's answer."""
        del self.tasks[task.task_id]
        if worker is not None:
            worker.held.discard(task.task_id)
            worker.tasks_done += 1
            if worker.placement == BORROWED:
                self.tasks_by_borrowed_total += 1
        if task.update is not None:
            self.completed[task.task_id] = (task.update, reply)
            if len(self.completed) > self.config.completed_memory:
                self.completed.popitem(last=False)
        elif task.keyed_read:
            self.completed_reads.pop(task.task_id, None)  # (another read that had the id): newest last
            self.completed_reads[task.task_id] = (task.query, reply)
            if len(self.completed_reads) > self.config.completed_reads_memory:
                self.completed_reads.popitem(last=False)
        for waiter in task.waiters:
            self._answer(waiter, reply)
        self.tasks_completed_total += 1
        second = int(now_s)
        if self._rate and self._rate[-1][0] == second:
            self._rate[-1][1] += 1
        else:
            self._rate.append([second, 1])
            while self._rate and self._rate[0][0] <= second - RATE_WINDOW_S:
                self._rate.popleft()

    # --- Workers asking for work -----------------------------------------------------------------
    def _on_worker_alive(self, conn: int, message: dict, now_s: float) -> None:
        if message.get("WORKER") != "ALIVE":
            raise SaldoError("UNKNOWN_MESSAGE", 'a worker says {"WORKER": "ALIVE"}')
        worker_uuid = message.get("WORKER_UUID")
        if worker_uuid is not None:
            check_id(worker_uuid, "WORKER_UUID")
        owner = message.get("SERVER_UUID")
        if owner is not None:
            check_id(owner, "SERVER_UUID")
        max_tasks = message.get("MAX_TASKS")
        if max_tasks is not None and (type(max_tasks) is not int or not 0 < max_tasks <= self.config.max_batch_tasks):
            raise SaldoError("FIELD_INVALID", f"MAX_TASKS must be an integer from 1 to {self.config.max_batch_tasks}")
        accepts = _check_kinds(message.get("ACCEPTS", [QUERY]), "ACCEPTS")
        results = message.get("RESULTS")
        if results is not None and (type(results) is not list or len(results) > self.config.max_batch_tasks):
            raise SaldoError("FIELD_INVALID", f"RESULTS must be a list of at most {self.config.max_batch_tasks}")
        dialect = SALDO if max_tasks is not None else V2 if worker_uuid is not None else V1
        worker = self._bind(conn, worker_uuid, owner, dialect, now_s)
        worker.max_tasks = max_tasks or 1
        worker.accepts_updates = UPDATE in accepts
        for result in results or ():
            self._take_result(worker, result, now_s)
        # ALIVE means "I hold nothing now": anything it still holds was dropped on its side.
        self._requeue_held(worker, "worker_asked_again", now_s)
        if worker.directive is not None:
            self._give_directive(worker, now_s)
            return
        worker.parked = True
        worker.park_deadline = None if dialect == V1 else now_s + self.config.no_task_wait_s
        self.parked[worker.worker_id] = None

    def _bind(self, conn: int, worker_uuid: str | None, owner: str | None, dialect: str, now_s: float) -> Worker:
        """The worker this ALIVE comes from, bound to `conn`; raises WORKER_ID_IN_USE for an id that
        another open connection serves, without changing anything."""
        bound_id = self.by_conn.get(conn)
        if bound_id is not None:
            worker = self.workers[bound_id]
            if worker_uuid is not None and worker_uuid != bound_id:
                raise SaldoError("WORKER_ID_IN_USE", f"this connection already serves as {bound_id}")
            worker.last_seen = now_s
            return worker
        if worker_uuid is None:
            worker_uuid = f"anon-{conn}"
            anonymous = True
        else:
            anonymous = False
        worker = self.workers.get(worker_uuid)
        if worker is not None and worker.conn is not None and worker.conn != conn:
            raise SaldoError("WORKER_ID_IN_USE", f"{worker_uuid} is served by another open connection")
        if owner is None or owner == self._key:  # naming no owner, or our address, means us
            owner = self.config.server_id
        if worker is None:
            if len(self.workers) >= MAX_WORKERS:
                raise SaldoError("OVERLOADED", f"this server tracks {MAX_WORKERS} workers")
            worker = Worker(worker_uuid, owner, now_s)
            worker.anonymous = anonymous
            self.workers[worker_uuid] = worker
            self._event("worker_joined", worker=worker_uuid, owner=owner, dialect=dialect, conn=conn)
        if owner == self.config.server_id:
            self._worker_came_home(worker)
            worker.owner = owner
            worker.placement = HOME
        else:
            if worker.placement != BORROWED or worker.owner != owner:
                self.loans_received_total += 1
                self._workers_promised_until = 0.0  # what was promised arrives
                self._event("worker_borrowed", worker=worker_uuid, owner=owner, conn=conn)
            worker.owner = owner
            worker.placement = BORROWED
        worker.dialect = dialect
        worker.conn = conn
        worker.last_seen = now_s
        self.by_conn[conn] = worker_uuid
        return worker

    def _worker_came_home(self, worker: Worker) -> None:
        """One of ours is here: back from a loan, or (after our restart) back from a peer."""
        if worker.placement != HOME:
            self._event("worker_home", worker=worker.worker_id, was=worker.placement, lent_to=worker.lent_to)
        worker.lent_to = None
        worker.directive = None
        for peer in self.peers.values():
            if worker.worker_id in peer.pending_release:
                peer.pending_release.discard(worker.worker_id)
                if not peer.pending_release:
                    self._release_completed(peer)

    def _take_tasks(self, worker: Worker, count: int) -> list[Task]:
        """Up to `count` queued tasks this worker can run, oldest first across both queues."""
        updates = self.queue_updates if worker.accepts_updates else None
        queries = self.queue_queries
        batch: list[Task] = []
        while len(batch) < count:
            if updates and (not queries or updates[0].seq < queries[0].seq):
                batch.append(updates.popleft())
            elif queries:
                batch.append(queries.popleft())
            else:
                break
        return batch

    def _hand_out(self, worker: Worker, batch: list[Task], now_s: float) -> None:
        assert worker.conn is not None
        for task in batch:
            task.worker = worker.worker_id
            task.attempts += 1
            task.may_have_run = True
            worker.held.add(task.task_id)
        worker.lease_deadline = now_s + self.config.visibility_timeout_s
        if worker.dialect == SALDO:
            self._reply(worker.conn, {"TASK": "BATCH", "SERVER_UUID": self.config.server_id,
                                      "LEASE_S": self.config.visibility_timeout_s,
                                      "FAILOVER_LIST": self._failover_list(),
                                      "TASKS": [task.body for task in batch]})
        else:
            assert len(batch) == 1
            self._reply(worker.conn, batch[0].body)

    def _unpark(self, worker: Worker) -> None:
        if worker.parked:
            worker.parked = False
            self.parked.pop(worker.worker_id, None)

    def _answer_long_polls(self, now_s: float) -> None:
        for worker_id in list(self.parked):
            worker = self.workers[worker_id]
            if worker.park_deadline is not None and worker.park_deadline <= now_s and worker.conn is not None:
                self._unpark(worker)
                self._reply(worker.conn, {"TASK": "NO_TASK", "SERVER_UUID": self.config.server_id,
                                          "FAILOVER_LIST": self._failover_list()})

    # --- Workers reporting results ---------------------------------------------------------------
    def _on_worker_status(self, conn: int, message: dict, now_s: float) -> None:
        """A v1/v2 worker's STATUS for the task it holds (by ID, or its only one)."""
        worker_id = self.by_conn.get(conn)
        worker_uuid = message.get("WORKER_UUID")
        if worker_uuid is not None:
            check_id(worker_uuid, "WORKER_UUID")
            if worker_id is not None and worker_id != worker_uuid:
                raise SaldoError("WORKER_ID_IN_USE", f"this connection serves as {worker_id}")
            worker_id = worker_uuid
        worker = self.workers.get(worker_id) if worker_id is not None else None
        if worker is None:
            raise SaldoError("WRONG_ROLE", "a STATUS comes from a worker that said ALIVE first")
        if worker.conn is None and worker_uuid is not None:  # v2: a new connection per message
            if worker.dialect == SALDO:
                raise SaldoError("WORKER_ID_IN_USE", f"{worker_uuid} keeps its own connection")
            worker.conn = conn
            self.by_conn[conn] = worker.worker_id
        elif worker.conn != conn:
            raise SaldoError("WORKER_ID_IN_USE", f"{worker.worker_id} is served by another open connection")
        worker.last_seen = now_s
        self._take_result(worker, message, now_s)
        if worker_uuid is not None:  # v2 waits for an ACK; v1's table has no answer to STATUS
            self._reply(conn, {"STATUS": "ACK", "SERVER_UUID": self.config.server_id})

    def _take_result(self, worker: Worker, result: object, now_s: float) -> None:
        """One task's outcome from the worker that holds it; anything else is ignored (counted)."""
        if type(result) is not dict:
            self.late_results_total += 1
            return
        task_id = result.get("ID")
        if task_id is None and len(worker.held) == 1:
            task_id = next(iter(worker.held))
        task = self.tasks.get(task_id) if type(task_id) is str else None
        if task is None or task.worker != worker.worker_id:
            self.late_results_total += 1  # a redelivered task answered twice, or a stranger's id
            return
        try:
            reply = _client_reply(task, result)
        except SaldoError as error:  # not a result: another worker may do better; bounded by the attempts
            worker.bad_results += 1
            self.bad_results_total += 1
            task.bad_result = f"worker {worker.worker_id} sent {error.detail}"
            self._event("bad_result", WARNING, worker=worker.worker_id, task=task.task_id, attempt=task.attempts,
                        error=error.code, detail=error.detail)
            self._requeue(task, worker, "bad_result", now_s)
            return
        if reply.get("STATUS") == "NOK" and not reply["DEFINITE"]:
            self._requeue(task, worker, "result_not_final", now_s)  # e.g. the worker's database was down
            return
        self._finish(task, reply, worker, now_s)

    def _requeue(self, task: Task, worker: Worker | None, reason: str, now_s: float) -> None:
        """Back to the front of its queue, or given up after max_task_attempts attempts."""
        if worker is not None:
            worker.held.discard(task.task_id)
        task.worker = None
        if task.attempts >= self.config.max_task_attempts:
            self._give_up(task, reason)
            return
        self.tasks_requeued_total += 1
        task.queued_at = now_s
        (self.queue_updates if task.update is not None else self.queue_queries).appendleft(task)

    def _give_up(self, task: Task, reason: str) -> None:
        self._event("task_given_up", WARNING, task=task.task_id, attempts=task.attempts, reason=reason,
                    bad_result=task.bad_result)
        if task.bad_result is None and not task.may_have_run:  # every peer it went to refused it
            reply = _task_error(task, "NO_WORKER", f"no worker ran the task in {task.attempts} attempts")
        elif task.bad_result is None:
            reply = _task_error(task, "UNAVAILABLE", f"no worker completed the task in {task.attempts} attempts")
        elif task.query is not None:  # a read changed nothing: say so, and the client stops asking
            reply = _task_error(task, "BAD_RESULT", f"{task.bad_result} (the last of {task.attempts} attempts)")
        else:
            reply = _task_error(task, "UNAVAILABLE", f"no worker completed the task in {task.attempts} attempts; "
                                                     f"the last: {task.bad_result}; it may have been applied")
        self._drop(task, reply)

    def _drop(self, task: Task, reply: dict) -> None:
        """The task ends without a worker's result: every waiting client gets `reply`."""
        del self.tasks[task.task_id]
        for waiter in task.waiters:
            self._answer(waiter, reply)

    def _requeue_held(self, worker: Worker, reason: str, now_s: float) -> None:
        if not worker.held:
            return
        self._event("tasks_requeued", worker=worker.worker_id, tasks=len(worker.held), reason=reason)
        for task_id in sorted(worker.held, key=lambda t: -self.tasks[t].seq):  # newest first: front keeps order
            self._requeue(self.tasks[task_id], worker, reason, now_s)
        worker.held.clear()

    def _expire_leases(self, now_s: float) -> None:
        for worker in list(self.workers.values()):
            if worker.held and worker.lease_deadline <= now_s:
                self._event("lease_expired", WARNING, worker=worker.worker_id, tasks=len(worker.held))
                self._requeue_held(worker, "visibility_timeout", now_s)
                if worker.conn is not None:  # it stopped answering: its connection is of no use
                    self._close(worker.conn)
                    self.by_conn.pop(worker.conn, None)
                    worker.conn = None
                    self._unpark(worker)

    def _forget_stale_workers(self, now_s: float) -> None:
        limit = now_s - self.config.worker_forget_s
        for worker in list(self.workers.values()):
            if worker.conn is None and not worker.held and worker.last_seen < limit:
                self._forget_worker(worker)

    def _forget_worker(self, worker: Worker) -> None:
        self._unpark(worker)
        self.workers.pop(worker.worker_id, None)
        self._event("worker_forgotten", worker=worker.worker_id, placement=worker.placement)

    def _present(self, worker: Worker, now_s: float) -> bool:
        """Here and able to work: connected, or (v2, a connection per message) heard of lately. A
        saldo worker keeps its connection: once that closed, it is gone."""
        if worker.placement == LENT:
            return False
        if worker.conn is not None or worker.held:
            return True
        return worker.dialect == V2 and now_s - worker.last_seen < 3 * self.config.no_task_wait_s

    # --- Directives: REDIRECT (lend) and RETURN (give back) ------------------------------------
    def _give_directive(self, worker: Worker, now_s: float) -> None:
        conn = worker.conn
        assert conn is not None and worker.directive is not None and not worker.held
        self._reply(conn, worker.directive)
        self._close(conn)
        self.by_conn.pop(conn, None)
        worker.conn = None
        self._unpark(worker)
        worker.last_seen = now_s
        self._event("worker_directed", worker=worker.worker_id, directive=worker.directive["TASK"])
        if worker.directive["TASK"] == "RETURN":
            self._forget_worker(worker)  # it is its owner's again; nothing of it is ours to track
        worker.directive = None

    def _failover_list(self) -> list[dict]:
        return [address_fields(self.config.address)] + [address_fields(p.address) for p in self.peers.values()]

    def _redirect(self, peer: Peer) -> dict:
        return {
            "TASK": "REDIRECT",
            "TARGET_MASTER": address_fields(peer.address),
            "HOME_MASTER": address_fields(self.config.address),
            "FAILOVER_LIST": self._failover_list(),
            "SERVER_REDIRECT": {"ip": peer.address[0], "port": peer.address[1]},
            "SERVER_UUID": self.config.server_id,
        }

    # --- Peers: identification and incoming messages ------------------------------------------
    def _identify_peer(self, message: dict, source_host: str) -> Peer:
        """Which configured peer sent this: by its SERVER_UUID; or, for an id not yet learned (a
        peer started with its own --server-id, or restarted with a new one), by the SERVER_ADDRESS
        it names when that is a peer's address on the host the message came from; or, for a seed v1
        message without ids, by the sending host alone. This identifies, it does not authenticate."""
        uuid = message.get("SERVER_UUID")
        if uuid is not None:
            check_id(uuid, "SERVER_UUID")
            for peer in self.peers.values():
                if uuid == peer.uuid or uuid == peer.key:
                    return peer
        claimed = message.get("SERVER_ADDRESS")
        if type(claimed) is str and claimed in self.peers and self.peers[claimed].address[0] == source_host:
            peer = self.peers[claimed]
            if uuid is not None:
                self._event("peer_id_learned", peer=peer.key, uuid=uuid, was=peer.uuid)
                peer.uuid = uuid
            return peer
        if uuid is not None:
            raise SaldoError("NOT_PEER", f"{uuid} is not one of this server's peers")
        # Seed v1 messages carry no id: the sending host must be the host of exactly one peer.
        matches = [peer for peer in self.peers.values() if peer.address[0] == source_host]
        if len(matches) == 1:
            return matches[0]
        raise SaldoError("NOT_PEER", f"no SERVER_UUID, and host {source_host or '?'} is not one peer's")

    def _on_peer_message(self, conn: int, message: dict, request_id: object, now_s: float, source_host: str) -> None:
        peer = self._identify_peer(message, source_host)
        self._heard_from(peer, message, now_s)
        task = message.get("TASK")
        response = message.get("RESPONSE")
        me = self.config.server_id
        if task in ("HEARTBEAT", "REQUEST") or (message.get("SERVER") == "ALIVE" and task is None):
            self._reconcile_lent(peer, message.get("WORKERS_HELD"), now_s)
            reply = {"SERVER": "ALIVE", "TASK": "HEARTBEAT" if task != "REQUEST" else "RECIEVE", "RESPONSE": "ALIVE",
                     "SERVER_UUID": me, "QUEUE_LENGTH": self.queue_length, "WORKERS_HELD": self._held_for(peer),
                     "RUNS": sorted(self.runnable_kinds(now_s)[0])}
        elif task == "RECIEVE":  # (sic) a seed v1 heartbeat's answer sent as a message: heard, not answered
            return
        elif task == "WORKER_REQUEST":
            reply = self._lend(peer, message, now_s)
        elif task == "COMMAND_RELEASE":
            ids = _check_id_list(message.get("WORKERS_UUID"), "WORKERS_UUID")
            reply = self._accept_release(peer, ids, now_s)
        elif task == "WORKER_RESPONSE" or response in ("AVAILABLE", "UNAVAILABLE"):
            # A seed server may answer a request with a message of its own instead of a reply.
            if not peer.request_outstanding:
                raise SaldoError("UNKNOWN_MESSAGE", "no WORKER_REQUEST of this server awaits an answer")
            self._on_lend_reply(peer, message, now_s)
            reply = {"STATUS": "ACK", "SERVER_UUID": me}
        elif response == "RELEASE_COMPLETED":
            ids = _check_id_list(message.get("WORKERS_UUID", []), "WORKERS_UUID")
            self._event("release_completed", owner=peer.key, workers=len(ids))
            reply = {"STATUS": "ACK", "SERVER_UUID": me}
        else:
            raise SaldoError("UNKNOWN_MESSAGE", f"unknown server message TASK={str(task)[:40]!r} RESPONSE={str(response)[:40]!r}")
        if request_id is not None:
            reply["ID"] = request_id
        self._reply(conn, reply)

    def _heard_from(self, peer: Peer, message: dict, now_s: float) -> None:
        uuid = message.get("SERVER_UUID")
        if type(uuid) is str:
            peer.uuid = uuid
        queue_length = message.get("QUEUE_LENGTH")
        if type(queue_length) is int:
            peer.queue_length = queue_length
        if "RUNS" in message:
            try:
                peer.runs = _check_kinds(message["RUNS"], "RUNS")
            except SaldoError:
                peer.runs = None  # not a saldo server's word: never forwarded a task
        peer.last_heard = now_s
        peer.failures = 0
        if peer.state != UP:
            self._event("peer_up", peer=peer.key, uuid=peer.uuid, was=peer.state)
            peer.state = UP

    def _held_for(self, peer: Peer) -> list[str]:
        """Ids of `peer`'s workers that are here (for its reconciliation)."""
        return [w.worker_id for w in self.workers.values() if w.placement == BORROWED and w.owner in (peer.uuid, peer.key)][:MAX_IDS_PER_MESSAGE]

    def _reconcile_lent(self, peer: Peer, held: object, now_s: float) -> None:
        """The peer says which of our workers it holds: forget the lent ones it no longer has (they
        died there), and note ours it took in that we did not know of (after our restart)."""
        if type(held) is not list:
            return
        held_ids = set(_check_id_list(held, "WORKERS_HELD"))
        grace = self.config.redirect_timeout_s
        for worker in list(self.workers.values()):
            if worker.placement == LENT and worker.lent_to == peer.key:
                if worker.worker_id in held_ids:
                    worker.last_seen = now_s
                elif now_s - worker.last_seen > grace:
                    self._event("lent_worker_lost", WARNING, worker=worker.worker_id, borrower=peer.key)
                    self._forget_worker(worker)
        for worker_id in held_ids:
            if worker_id not in self.workers and len(self.workers) < MAX_WORKERS:
                worker = Worker(worker_id, self.config.server_id, now_s)
                worker.placement = LENT
                worker.lent_to = peer.key
                self.workers[worker_id] = worker

    # --- Lending (this server as the owner) ------------------------------------------------------
    def _lend(self, peer: Peer, message: dict, now_s: float) -> dict:
        needed = message.get("WORKERS_NEEDED", 1)
        if type(needed) is not int or not 0 < needed <= MAX_IDS_PER_MESSAGE:
            raise SaldoError("FIELD_INVALID", f"WORKERS_NEEDED must be an integer from 1 to {MAX_IDS_PER_MESSAGE}")
        me = self.config.server_id
        nack = {"TASK": "WORKER_RESPONSE", "STATUS": "NACK", "RESPONSE": "UNAVAILABLE", "SERVER_UUID": me,
                "MASTER": me, "WORKERS": [], "WORKERS_UUID": []}
        kinds = message.get("TASK_KINDS")  # a seed server names none: any worker helps it
        kinds = TASK_KINDS if kinds is None else _check_kinds(kinds, "TASK_KINDS")
        if self.queue_length >= self.config.return_queue_threshold:
            return nack  # busy ourselves
        home = [w for w in self.workers.values() if w.placement == HOME and self._present(w, now_s)]
        # Only workers that can run what waits there: a seed worker lent for an update is no help.
        idle = [w for w in home if w.parked and not w.anonymous and w.directive is None and w.can_run(kinds)]
        count = min(needed, len(idle), len(home) - self.config.min_own_workers)
        if count <= 0:
            return nack
        lent = idle[:count]
        for worker in lent:
            worker.directive = self._redirect(peer)
            worker.placement = LENT
            worker.lent_to = peer.key
            self._give_directive(worker, now_s)
        self.loans_given_total += count
        ids = [w.worker_id for w in lent]
        self._event("workers_lent", borrower=peer.key, workers=",".join(ids), home_left=len(home) - count)
        return {"TASK": "WORKER_RESPONSE", "STATUS": "ACK", "RESPONSE": "AVAILABLE", "SERVER_UUID": me,
                "MASTER": me, "WORKERS": ids, "WORKERS_UUID": ids}

    def _accept_release(self, peer: Peer, ids: list[str], now_s: float) -> dict:
        """The borrower gives back these workers: they are ours (a worker naming us as owner is)."""
        for worker_id in ids:
            worker = self.workers.get(worker_id)
            if worker is None or worker.placement == LENT:
                peer.pending_release.add(worker_id)
        if peer.pending_release:
            peer.pending_release_since = now_s
        self._event("release_accepted", borrower=peer.key, workers=",".join(ids))
        return {"SERVER_UUID": self.config.server_id, "RESPONSE": "RELEASE_ACK", "WORKERS_UUID": ids}

    def _release_completed(self, peer: Peer) -> None:
        self._send(peer.key, {"SERVER_UUID": self.config.server_id, "RESPONSE": "RELEASE_COMPLETED",
                              "SERVER_ADDRESS": self._key, "WORKERS_UUID": []})
        self._event("release_complete", borrower=peer.key)

    def _expire_pending_releases(self, now_s: float) -> None:
        for peer in self.peers.values():
            if peer.pending_release and now_s - peer.pending_release_since > self.config.worker_forget_s:
                self._event("release_incomplete", WARNING, borrower=peer.key,
                            missing=",".join(sorted(peer.pending_release)))
                peer.pending_release.clear()
                self._release_completed(peer)

    # --- Borrowing and giving back (this server as the borrower) --------------------------------
    def _watch_load(self, now_s: float, runs_here: frozenset[str], runs_home: frozenset[str]) -> None:
        queue_length = self.queue_length
        config = self.config
        queued = self.queued_kinds()
        # Tasks queued that no worker here can run (none at all, or only seed workers for an
        # update): however short the queue, nothing here would ever run them, so this server
        # borrows as if overloaded, and keeps what it borrowed until they ran.
        unrunnable = queued - runs_here
        overloaded = queue_length > config.lend_queue_threshold or bool(unrunnable)
        underloaded = queue_length < config.return_queue_threshold and queued <= runs_home
        self._overloaded_since = (self._overloaded_since or now_s) if overloaded else None
        self._underloaded_since = (self._underloaded_since or now_s) if underloaded else None
        if self._overloaded_since is not None and now_s - self._overloaded_since >= config.overload_s:
            self._ask_for_workers(now_s, unrunnable or queued)
        if self._underloaded_since is not None and now_s - self._underloaded_since >= config.underload_s:
            self._give_back(now_s)

    def _ask_for_workers(self, now_s: float, kinds: frozenset[str]) -> None:
        """Ask up peers for workers that can run one of `kinds` (what waits here)."""
        borrowed = sum(1 for w in self.workers.values() if w.placement == BORROWED)
        wanted = min(self.config.max_borrowed - borrowed, math.ceil(self.queue_length / max(1, self.config.lend_queue_threshold)))
        for peer in self.peers.values():
            if wanted <= 0:
                return
            if peer.state != UP or peer.request_outstanding or now_s < peer.cooldown_until:
                continue
            peer.request_outstanding = True
            self._send(peer.key, {
                "TASK": "WORKER_REQUEST", "WORKERS_NEEDED": wanted, "SERVER_UUID": self.config.server_id,
                "SERVER_ADDRESS": self._key, "TASK_KINDS": sorted(kinds),
                "REQUESTOR_INFO": {"ip": self.config.address[0], "port": self.config.address[1]},
            })
            self._event("workers_requested", peer=peer.key, needed=wanted, kinds=",".join(sorted(kinds)),
                        queue=self.queue_length)

    # --- Tasks no worker here can run: forwarded once, or refused -------------------------------
    def runnable_kinds(self, now_s: float) -> tuple[frozenset[str], frozenset[str]]:
        """The kinds of task a worker present here can run: (any worker here, own or borrowed;
        our own at home only)."""
        here: set[str] = set()
        home: set[str] = set()
        for worker in self.workers.values():
            if not self._present(worker, now_s):
                continue
            kinds = TASK_KINDS if worker.accepts_updates else (QUERY,)
            here.update(kinds)
            if worker.placement == HOME:
                home.update(kinds)
                if len(home) == len(TASK_KINDS):
                    break  # nothing left to learn: `here` holds at least as much
        return frozenset(here), frozenset(home)

    def queued_kinds(self) -> frozenset[str]:
        return frozenset(kind for kind, queue in ((UPDATE, self.queue_updates), (QUERY, self.queue_queries)) if queue)

    def _serve_unrunnable(self, now_s: float, runs_here: frozenset[str]) -> None:
        """A queued task that no worker here has been able to run for `no_worker_wait_s` (since it
        was queued, and since the last worker here that could run it left: one may connect, or be
        lent, meanwhile) goes to an up peer that says it has a worker for it, or is refused. One
        that a peer forwarded here is refused, never forwarded again: a task makes at most one hop.
        While workers a peer lent us are on their way (at most `redirect_timeout_s`), tasks wait."""
        if now_s < self._workers_promised_until:
            return
        for kind, queue in ((UPDATE, self.queue_updates), (QUERY, self.queue_queries)):
            if kind in runs_here:
                self._unrunnable_since.pop(kind, None)
                continue
            since = self._unrunnable_since.setdefault(kind, now_s)
            peer = self._forward_target(kind)
            while queue and now_s - max(queue[0].queued_at, since) >= self.config.no_worker_wait_s:
                task = queue[0]
                if peer is not None and not task.forwarded_in:
                    if len(self.forwarded) >= self.config.max_forwarded or task.forward_id in self.forwarded:
                        break  # it waits for an earlier forward's answer
                    queue.popleft()
                    self._forward(task, peer)
                else:
                    queue.popleft()
                    self._refuse_no_worker(task, runs_here)

    def _forward_target(self, kind: str) -> Peer | None:
        """The up peer with a worker for `kind` (by its heartbeats) and the shortest queue, if any."""
        best = None
        for peer in self.peers.values():
            if peer.state == UP and peer.runs is not None and kind in peer.runs:
                if best is None or (peer.queue_length or 0) < (best.queue_length or 0):
                    best = peer
        return best

    def _forward(self, task: Task, peer: Peer) -> None:
        assert task.forward_id not in self.forwarded and not task.forwarded_in
        task.forwarded_to = peer.key
        task.attempts += 1
        self.forwarded[task.forward_id] = task.task_id
        self.tasks_forwarded_total += 1
        if task.query is not None:
            message = {"ID": task.forward_id, "TASK": "BALANCE", "ACCOUNT": task.query.account}
            if task.query.min_seq is not None:
                message["MIN_SEQ"] = task.query.min_seq
        else:
            message = dict(task.body)  # saldo's bank format, its operation id as ID
        message["FORWARDED_BY"] = self.config.server_id
        self._send(peer.key, message, self.config.forward_timeout_s)
        self._event("task_forwarded", task=task.task_id, peer=peer.key, kind=task.kind, attempt=task.attempts)

    def _on_forward_result(self, peer: Peer, request: dict, reply: dict | None, now_s: float) -> None:
        """The peer's answer to a forwarded task (None: none, or an indefinite one)."""
        task_id = self.forwarded.pop(request.get("ID"), None)
        task = self.tasks.get(task_id) if task_id is not None else None
        # Nothing but this answer ends a forwarded task (no worker here holds it).
        assert task is not None and task.forwarded_to == peer.key, (request.get("ID"), peer.key)
        task.forwarded_to = None
        if reply is None:  # the peer may have run it: the id keeps a second run from applying it again
            task.may_have_run = True
            self._event("forward_unanswered", WARNING, task=task.task_id, peer=peer.key)
            self._requeue(task, None, "forward_unanswered", now_s)
            return
        if reply.get("STATUS") != "OK" and reply.get("ERROR") in FORWARD_NOT_NOW:
            self._event("forward_refused", task=task.task_id, peer=peer.key, error=reply.get("ERROR"))
            self._requeue(task, None, "forward_refused", now_s)
            return
        try:
            answer = _client_reply(task, reply)
        except SaldoError as error:
            self.bad_results_total += 1
            task.bad_result = f"peer {peer.key} answered {error.detail}"
            self._event("bad_result", WARNING, peer=peer.key, task=task.task_id, error=error.code, detail=error.detail)
            self._requeue(task, None, "bad_result", now_s)
            return
        self._finish(task, answer, None, now_s)

    def _refuse_no_worker(self, task: Task, runs_here: frozenset[str]) -> None:
        self.no_worker_total += 1
        if runs_here:
            here = "the workers here are seed workers, which run reads only"
        else:
            here = "no worker is connected here"
        if task.forwarded_in:
            elsewhere = "a peer forwarded it here for want of one"
        else:
            elsewhere = ", ".join(f"peer {p.key} {'has none' if p.state == UP else 'is ' + p.state}"
                                  for p in self.peers.values()) or "no peer is configured"
        what = "an update" if task.update is not None else "a read"
        detail = f"no worker can run {what} now: {here}; {elsewhere}"
        if task.update is not None and task.may_have_run:
            reply = _task_error(task, "UNAVAILABLE", f"{detail}; an earlier attempt may have applied it")
        else:
            reply = _task_error(task, "NO_WORKER", detail)
        self._event("no_worker", WARNING, task=task.task_id, kind=task.kind, definite=reply["DEFINITE"], detail=detail)
        self._drop(task, reply)

    def _on_lend_reply(self, peer: Peer, reply: dict, now_s: float) -> None:
        peer.request_outstanding = False
        status = reply.get("STATUS")
        if status == "ACK" or reply.get("RESPONSE") == "AVAILABLE":
            ids = _check_id_list(reply.get("WORKERS_UUID", reply.get("WORKERS", [])), "WORKERS_UUID")
            self._event("workers_promised", owner=peer.key, workers=",".join(ids))
            # They arrive by themselves (REDIRECT); until then nothing of them is ours to track,
            # but what waits for them is not forwarded (nor refused) while they are on their way.
            if ids:
                self._workers_promised_until = max(self._workers_promised_until, now_s + self.config.redirect_timeout_s)
            peer.cooldown_until = now_s + self.config.overload_s
        else:
            peer.cooldown_until = now_s + self.config.request_cooldown_s

    def _give_back(self, now_s: float) -> None:
        by_owner: dict[str, list[Worker]] = {}
        for worker in self.workers.values():
            if worker.placement == BORROWED and not worker.releasing and worker.directive is None:
                by_owner.setdefault(worker.owner, []).append(worker)
        for owner, workers in by_owner.items():
            peer = self._peer_by_uuid(owner)
            if peer is None or peer.state != UP or peer.request_outstanding:
                continue  # an owner that is down (or unknown) cannot take them: keep serving with them
            for worker in workers:
                worker.releasing = True
            peer.request_outstanding = True
            ids = [w.worker_id for w in workers]
            self._send(peer.key, {"TASK": "COMMAND_RELEASE", "SERVER_UUID": self.config.server_id,
                                  "SERVER_ADDRESS": self._key, "WORKERS_UUID": ids})
            self._event("release_requested", owner=peer.key, workers=",".join(ids), queue=self.queue_length)

    def _on_release_reply(self, peer: Peer, request: dict, reply: dict | None, now_s: float) -> None:
        peer.request_outstanding = False
        acknowledged = set()
        if reply is not None and reply.get("RESPONSE") == "RELEASE_ACK":
            try:
                acknowledged = set(_check_id_list(reply.get("WORKERS_UUID", []), "WORKERS_UUID"))
            except SaldoError:
                acknowledged = set()
        else:
            peer.cooldown_until = now_s + self.config.request_cooldown_s
        for worker_id in request["WORKERS_UUID"]:
            worker = self.workers.get(worker_id)
            if worker is None or worker.placement != BORROWED:
                continue
            worker.releasing = False
            if worker_id in acknowledged:
                worker.directive = {"TASK": "RETURN", "SERVER_RETURN": {"ip": peer.address[0], "port": peer.address[1]},
                                    "HOME_MASTER": address_fields(peer.address), "SERVER_UUID": self.config.server_id}
                if worker.parked and not worker.held and worker.conn is not None:
                    self._give_directive(worker, now_s)

    def _peer_by_uuid(self, uuid: str) -> Peer | None:
        for peer in self.peers.values():
            if uuid == peer.uuid or uuid == peer.key:
                return peer
        return None

    # --- Heartbeats (outgoing) ----------------------------------------------------------------
    def _probe_peers(self, now_s: float) -> None:
        runs: frozenset[str] | None = None
        for peer in self.peers.values():
            if peer.heartbeat_outstanding or now_s < peer.next_probe_at:
                continue
            if runs is None:
                runs = self.runnable_kinds(now_s)[0]
            peer.heartbeat_outstanding = True
            self._send(peer.key, {
                "TASK": "HEARTBEAT", "SERVER": "ALIVE", "SERVER_UUID": self.config.server_id, "SERVER_ADDRESS": self._key,
                "QUEUE_LENGTH": self.queue_length, "WORKERS_HELD": self._held_for(peer), "RUNS": sorted(runs),
            })

    def backoff_s(self, failures: int) -> float:
        """The wait before retry number `failures` (1, 2, ...): exponential, capped, with jitter."""
        config = self.config
        base = min(config.retry_max_s, config.retry_initial_s * 2 ** min(failures - 1, 30))
        return base * (1.0 + config.jitter_fraction * (2.0 * self.rng.random() - 1.0))

    def on_peer_result(self, peer_key: str, request: dict, reply: dict | None, now_s: float) -> None:
        """The answer to a Send to a peer, or None when there was none (timeout, no connection)."""
        peer = self.peers.get(peer_key)
        if peer is None:
            return
        if reply is not None and reply.get("STATUS") == "NOK" and not is_definite(reply.get("ERROR")):
            reply = None  # a synthesized TIMEOUT / CONNECTION_LOST: no answer
        if "FORWARDED_BY" in request:
            self._on_forward_result(peer, request, reply, now_s)
            return
        task = request.get("TASK")
        if task == "HEARTBEAT":
            peer.heartbeat_outstanding = False
            if reply is None or reply.get("RESPONSE") != "ALIVE":
                self._heartbeat_failed(peer, now_s)
            else:
                self._heard_from(peer, reply, now_s)
                try:
                    self._reconcile_lent(peer, reply.get("WORKERS_HELD"), now_s)
                except SaldoError as error:
                    self._event("bad_heartbeat_reply", WARNING, peer=peer.key, error=error.code)
                peer.next_probe_at = now_s + self.config.heartbeat_interval_s
        elif task == "WORKER_REQUEST":
            if reply is None:
                peer.request_outstanding = False
                peer.cooldown_until = now_s + self.config.request_cooldown_s
                return
            self._heard_from(peer, reply, now_s)
            try:
                self._on_lend_reply(peer, reply, now_s)
            except SaldoError as error:
                self._event("bad_lend_reply", WARNING, peer=peer.key, error=error.code)
        elif task == "COMMAND_RELEASE":
            if reply is not None:
                self._heard_from(peer, reply, now_s)
            self._on_release_reply(peer, request, reply, now_s)
        # RELEASE_COMPLETED is informational: its answer changes nothing.

    def _heartbeat_failed(self, peer: Peer, now_s: float) -> None:
        peer.failures += 1
        if peer.state != DOWN and peer.failures >= self.config.heartbeat_miss_limit:
            self._event("peer_down", WARNING, peer=peer.key, failures=peer.failures, last_heard=peer.last_heard)
            peer.state = DOWN
            peer.request_outstanding = False
        peer.next_probe_at = now_s + self.backoff_s(peer.failures)

    # --- Status --------------------------------------------------------------------------------
    def tasks_per_s(self, now_s: float) -> float:
        second = int(now_s)
        recent = sum(count for at, count in self._rate if second - RATE_WINDOW_S < at < second)
        return round(recent / (RATE_WINDOW_S - 1), 1)

    def worker_counts(self, now_s: float) -> dict:
        counts = {"OWN": 0, "HOME": 0, "LENT_OUT": 0, "BORROWED": 0, "IDLE": 0, "BUSY": 0}
        for worker in self.workers.values():
            if worker.placement == LENT:
                counts["OWN"] += 1
                counts["LENT_OUT"] += 1
                continue
            if not self._present(worker, now_s):
                continue
            if worker.placement == HOME:
                counts["OWN"] += 1
                counts["HOME"] += 1
            else:
                counts["BORROWED"] += 1
            counts["BUSY" if worker.held else "IDLE"] += 1
        return counts

    def status(self, now_s: float) -> dict:
        config = self.config
        runs_here = self.runnable_kinds(now_s)[0]
        return {
            "STATUS": "OK",
            **self.status_extra,
            **(self.status_probe() if self.status_probe is not None else {}),
            "ROLE": "farm-server",
            "SERVER_UUID": config.server_id,
            "ADDRESS": address_key(config.address),
            "UPTIME_S": round(now_s - self.started_at, 3),
            "QUEUE_LENGTH": self.queue_length,
            "MAX_QUEUE": config.max_queue,
            "IN_FLIGHT": len(self.tasks) - self.queue_length,
            "TASKS_PER_S": self.tasks_per_s(now_s),
            "TASKS_COMPLETED_TOTAL": self.tasks_completed_total,
            "TASKS_BY_BORROWED_TOTAL": self.tasks_by_borrowed_total,
            "TASKS_REQUEUED_TOTAL": self.tasks_requeued_total,
            "LATE_RESULTS_TOTAL": self.late_results_total,
            "QUEUE_FULL_TOTAL": self.rejected_full_total,
            "RUNS": sorted(runs_here),  # the kinds of task a worker here can run: [] = no worker
            "FORWARDED": len(self.forwarded),
            "TASKS_FORWARDED_TOTAL": self.tasks_forwarded_total,
            "NO_WORKER_TOTAL": self.no_worker_total,
            "BAD_RESULTS_TOTAL": self.bad_results_total,
            "LOANS_GIVEN_TOTAL": self.loans_given_total,
            "LOANS_RECEIVED_TOTAL": self.loans_received_total,
            "OVERLOADED_FOR_S": round(now_s - self._overloaded_since, 3) if self._overloaded_since is not None else 0.0,
            "LEND_QUEUE_THRESHOLD": config.lend_queue_threshold,
            "RETURN_QUEUE_THRESHOLD": config.return_queue_threshold,
            "MIN_OWN_WORKERS": config.min_own_workers,
            "WORKERS": self.worker_counts(now_s),
            "WORKER_LIST": [
                {"WORKER_UUID": w.worker_id, "OWNER": w.owner, "PLACEMENT": w.placement, "LENT_TO": w.lent_to,
                 "DIALECT": w.dialect, "ACCEPTS": [QUERY, UPDATE] if w.accepts_updates else [QUERY],
                 "HELD": len(w.held), "IDLE": w.parked, "TASKS_DONE": w.tasks_done, "BAD_RESULTS": w.bad_results,
                 "CONNECTED": w.conn is not None}
                for w in list(self.workers.values())[:256]
            ],
            "PEERS": [
                {"ADDRESS": p.key, "SERVER_UUID": p.uuid, "STATE": p.state, "FAILURES": p.failures,
                 "LAST_HEARTBEAT_S_AGO": None if p.last_heard is None else round(now_s - p.last_heard, 3),
                 "QUEUE_LENGTH": p.queue_length, "RUNS": None if p.runs is None else sorted(p.runs)}
                for p in self.peers.values()
            ],
        }

    def performance_report(self, now_s: float, system: dict, timestamp: str, message_id: str) -> dict:
        """The seed v2 periodic report to a supervisor (field names as that version spelled them)."""
        counts = self.worker_counts(now_s)
        return {
            "server_uuid": self.config.server_id,
            "task": "performance_report",
            "timestamp": timestamp,
            "mensage_id": message_id,
            "performance": {
                "system": system,
                "farm_state": {
                    "workers": {"total_registered": counts["OWN"] + counts["BORROWED"], "workers_utilization": counts["BUSY"],
                                "workers_alive": counts["HOME"] + counts["BORROWED"], "workers_idle": counts["IDLE"],
                                "workers_borrowed": counts["BORROWED"], "workers_recieved": counts["BORROWED"],
                                "workers_lent": counts["LENT_OUT"], "workers_failed": 0},
                    "tasks": {"tasks_pending": self.queue_length, "tasks_running": len(self.tasks) - self.queue_length,
                              "tasks_per_s": self.tasks_per_s(now_s), "tasks_completed_total": self.tasks_completed_total},
                },
            },
            "config_thresholds": {"max_queue": self.config.max_queue, "lend_queue_threshold": self.config.lend_queue_threshold},
            "neighbors": [
                {"server_uuid": p.uuid, "status": "available" if p.state == UP else "unavailable",
                 "last_heartbeat": None if p.last_heard is None else round(now_s - p.last_heard, 3)}
                for p in self.peers.values()
            ],
        }


# --- Reading messages ---------------------------------------------------------------------------


def classify(message: dict) -> str:
    """Which part of the protocol a message belongs to: peer, worker, result, status or client."""
    task = message.get("TASK")
    if task in PEER_TASKS or "SERVER" in message or message.get("RESPONSE") in PEER_RESPONSES:
        return "peer"
    if "WORKER" in message:
        return "worker"
    if "STATUS" in message:  # clients never send a STATUS key; workers answer with one
        return "result"
    if task == "STATUS":
        return "status"
    return "client"


_UPDATE_OPERATIONS = {"DEPOSIT": "DEPOSIT", "WITHDRAW": "WITHDRAW", "TRANSFER": "TRANSFER"}


def parse_client_request(message: dict) -> Operation | Query:
    """A client's task: saldo's bank requests, seed 000's QUERY, or the farm's seed-style UPDATE:
    {"TASK": "UPDATE", "ID": "<op id>", "USER": "alice", "OPERATION": "DEPOSIT"|"WITHDRAW"|"TRANSFER",
     "AMOUNT": "10.00", "TO": "bob" (TRANSFER only)}."""
    if message.get("TASK") == "UPDATE":
        operation = message.get("OPERATION")
        if type(operation) is not str or operation not in _UPDATE_OPERATIONS:
            raise SaldoError("FIELD_INVALID", "OPERATION must be DEPOSIT, WITHDRAW or TRANSFER")
        kind = _UPDATE_OPERATIONS[operation]
        return make_operation(message.get("ID"), kind, message.get("USER"), message.get("TO") if kind == TRANSFER else None,
                              message.get("AMOUNT"))
    try:
        return parse_request(message)
    except SaldoError as error:
        if error.code == "UNKNOWN_MESSAGE":
            raise SaldoError("UNKNOWN_MESSAGE", "expected a task (QUERY, UPDATE, DEPOSIT, WITHDRAW, TRANSFER, BALANCE), "
                                                "STATUS, a worker's ALIVE or a peer server's message") from None
        raise


def _query_key(request_id: object) -> str | None:
    """The task id of a read whose request carries this ID, so that its retries join it: "q#" and
    the ID; None for a read without a usable one (absent, a boolean, a float, too long, or with a
    '#', which would make it look like another read's or a server's own id)."""
    if type(request_id) is not str and type(request_id) is not int:
        return None
    text = str(request_id)
    if not 0 < len(text) <= MAX_QUERY_ID_CHARS or "#" in text:
        return None
    return f"q#{text}"


def _check_kinds(value: object, field: str) -> frozenset[str]:
    """A list of task kinds (ACCEPTS, RUNS, TASK_KINDS): drawn from "QUERY" and "UPDATE"."""
    if type(value) is not list or len(value) > len(TASK_KINDS) or not all(type(k) is str and k in TASK_KINDS for k in value):
        raise SaldoError("FIELD_INVALID", f'{field} must be a list drawn from "QUERY", "UPDATE"')
    return frozenset(value)


def _id_reused(task_id: str) -> dict:
    """A request whose id names another operation (finished or still running): refused, so no
    client is told that its operation had another's outcome; nothing changes."""
    return error_reply("ID_REUSED", f"id {task_id} names another operation; nothing changed")


def _with_id(reply: dict, request_id: object) -> dict:
    if request_id is None:
        return reply
    return {"ID": request_id, **reply}


def _task_error(task: Task, code: str, detail: str) -> dict:
    """An error reply for a task's clients (without "ID"); a read asked as seed 000 gets its TASK."""
    reply = error_reply(code, detail)
    if task.query is not None and task.query.seed_000:
        reply["TASK"] = QUERY
    return reply


def _shown(value: object) -> str:
    """A value from the network, short enough for a log line or a DETAIL."""
    return (repr(value) if type(value) is str else str(value))[:40]


def _client_reply(task: Task, result: dict) -> dict:
    """The client's answer (without "ID") from a worker's result, or from a peer's answer to a
    forwarded task (the same shapes); SaldoError, saying what is wrong, if it is not a result."""
    status = result.get("STATUS")
    if status == "OK":
        field = "BALANCE" if "BALANCE" in result else "SALDO"
        balance = result.get(field)
        cents = None
        if balance is not None:
            try:
                cents = parse_balance_cents(balance)
            except SaldoError as error:
                raise SaldoError("FIELD_INVALID", f"{field} {_shown(balance)}, not a balance: {error.detail}") from None
        if task.query is not None:
            if cents is None:  # a seed-v2 worker says OK without the balance
                return {"STATUS": "OK", "DETAIL": "the worker reported success without a balance"}
            return balance_reply(task.query, cents)
        if cents is None:
            raise SaldoError("MISSING_FIELD", "an OK without BALANCE for an update")
        return {"STATUS": "OK", "BALANCE": render_cents(cents)}
    if status == "NOK":
        code = result.get("ERROR")
        detail = result.get("DETAIL")
        if type(code) is str and code in ERROR_CODES:
            return _task_error(task, code, detail if type(detail) is str else "")
        # a seed worker's words ("User not found"): not a code of ours
        words = code if type(code) is str else detail if type(detail) is str else "no detail"
        return _task_error(task, "TASK_FAILED", words[:200])
    raise SaldoError("FIELD_INVALID", f"STATUS {_shown(status)}, where a result says OK or NOK")
