"""The bank workload and its history.

Owns what the lab's clients do and what they write down. `Workload.run()` drives `clients`
concurrent clients, each with its own connection(s) and up to `window` operations in flight (a
pipelining client), against a set of accounts seeded by deposits: random transfers, some deposits
and withdrawals, and balance reads. Every operation becomes an `OpRecord` in the history: client,
id, what it was, invoke and complete times (seconds since the run started), and its outcome:

- ok: the bank applied it and said so;
- failed: the bank said no (INSUFFICIENT_FUNDS, ...) or it certainly did not happen;
- unknown: no conclusive answer (timeouts, lost connections) before its deadline.

An operation whose outcome is unknown is retried with the same id until its deadline: exactly-once
apply makes the retry safe, and resolves most unknowns into ok or failed.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from common.bank.errors import is_definite
from common.transport.aio import LoopMonitor
from common.transport.client import (
    FAILED,
    NOT_NOW_ERRORS,
    OK,
    UNKNOWN,
    OpIdSource,
    balance_line,
    classify,
    execute_with_retries,
    new_op_id,
    operation_line,
)

KINDS = ("TRANSFER", "DEPOSIT", "WITHDRAW", "BALANCE")
DEFAULT_MIX = (0.6, 0.1, 0.1, 0.2)
# Named mixes for --mix. "writes": only operations the replicas apply, for the throughput of
# applied operations without the reads beside them.
MIXES = {"mixed": DEFAULT_MIX, "writes": (0.6, 0.2, 0.2, 0.0), "reads": (0.0, 0.0, 0.0, 1.0)}
MAX_MIX_WEIGHT = 1_000_000


def parse_mix(text: str) -> tuple[float, float, float, float]:
    """A workload mix: a name from MIXES, or weights such as "transfer=60,deposit=20,withdraw=20"
    (kinds left out weigh 0). Raises ValueError with a line a person can act on."""
    text = text.strip()
    if text in MIXES:
        return MIXES[text]
    weights = dict.fromkeys(KINDS, 0.0)
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        kind = name.strip().upper()
        if not sep or kind not in weights:
            raise ValueError(f"expected a mix name ({', '.join(MIXES)}) or KIND=WEIGHT pairs with KIND one of "
                             f"{', '.join(k.lower() for k in KINDS)}; got {item.strip()!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"the weight of {name.strip()} is not a number: {value!r}") from None
        if not 0 <= weight <= MAX_MIX_WEIGHT:
            raise ValueError(f"the weight of {name.strip()} must be between 0 and {MAX_MIX_WEIGHT}")
        weights[kind] = weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("a mix needs at least one kind with a positive weight")
    return tuple(weights[kind] / total for kind in KINDS)


def describe_mix(mix: tuple[float, ...]) -> str:
    """ "transfer 60% deposit 10% withdraw 10% balance 20%" (kinds with no share left out)."""
    total = sum(mix)
    return " ".join(f"{kind.lower()} {100 * share / total:.0f}%" for kind, share in zip(KINDS, mix) if share > 0)


_tuple_new = tuple.__new__  # builds an OpRecord without its generated constructor (hot path)


class OpRecord(NamedTuple):
    """One operation of the history. A tuple, because a lab run records tens of thousands a second."""

    client: int
    op_id: str
    kind: str  # TRANSFER | DEPOSIT | WITHDRAW | BALANCE
    account: str
    to_account: str | None
    amount_cents: int | None
    invoke_s: float
    complete_s: float
    outcome: str  # ok | failed | unknown
    error: str | None = None
    balance_cents: int | None = None  # a read's balance; an operation's reply balance
    seq: int | None = None
    attempts: int = 1
    applied_replicas: int | None = None  # multicast: how many replicas applied it
    accepted: bool = False  # the reply said ACCEPTED: durably queued, outcome decided later
    epoch: int | None = None  # primary-backup: the epoch of the primary that answered

    @property
    def latency_ms(self) -> float:
        return (self.complete_s - self.invoke_s) * 1000.0

    def to_json(self) -> dict:
        return self._asdict()


@dataclass
class WorkloadConfig:
    clients: int = 8
    window: int = 16  # operations in flight per client
    accounts: int = 8
    initial_balance_cents: int = 100_000  # each account is seeded with a deposit of this much
    duration_s: float = 10.0
    # Share of each kind, in KINDS order: transfers, deposits, withdrawals, reads.
    mix: tuple[float, float, float, float] = DEFAULT_MIX
    max_amount_cents: int = 5_000
    # An operation is retried (same id) until this long after its invocation. It must stay well
    # inside the replicas' dedup horizon (--dedup-window operations applied since it), or a late
    # retry could be taken for a new operation.
    op_deadline_s: float = 20.0
    attempt_timeout_s: float = 2.0
    drain_s: float = 10.0  # after the run, in-flight operations get this long to resolve
    read_your_writes: bool = False  # send MIN_SEQ = the highest SEQ this client has seen
    seed: int = 1
    # A cluster the lab did not start may hold accounts of earlier runs: each run there names its own.
    account_prefix: str = "acct-"

    def account_names(self) -> list[str]:
        return [f"{self.account_prefix}{i}" for i in range(self.accounts)]


def _cents_from_reply(text: object) -> int | None:
    """Cents from a reply's two-decimal amount ("120.50" -> 12050); None if it is not one."""
    if type(text) is not str or len(text) < 4 or text[-3] != ".":
        return None
    try:
        return int(text[:-3] + text[-2:])
    except ValueError:
        return None


@dataclass
class Progress:
    ok: int = 0
    failed: int = 0
    unknown: int = 0
    in_flight: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # since the last progress line


class Workload:
    """Runs the clients. `make_client(index)` returns an object with `async execute(id, line,
    timeout_s)` and `async close()` (see common/transport/client.py)."""

    def __init__(self, config: WorkloadConfig, make_client: Callable[[int], object], *, progress: bool = True) -> None:
        assert config.clients > 0 and config.window > 0 and config.accounts >= 2
        self.config = config
        self.make_client = make_client
        self._history: list[OpRecord] = []
        self._max_seq_seen: dict[int, int] = {}  # client index -> the highest SEQ it was given (read your writes)
        # Completed operations not yet turned into OpRecords: (client, op, reply, complete_s,
        # outcome). A reply is filed as it is and read later (see `history`), so the work a lab
        # client does while the bank is measured stays small.
        self._completed: list[tuple] = []
        self.progress = Progress()
        self.show_progress = progress
        self.t0 = time.monotonic()
        self._stop = asyncio.Event()
        self.run_started_s = 0.0
        self.run_ended_s = 0.0
        # The lab's loop monitor as the clients finished: what the lab does after (the collection it
        # put off, the history) stalls its loop too, but no operation waits for that.
        self.loop_monitor_at_end: dict = {}
        self.progress_note: Callable[[], str] | None = None

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    async def seed_accounts(self, client) -> None:
        """Deposit the initial balance into every account (recorded in the history, client -1)."""
        config = self.config
        rng = random.Random(config.seed ^ 0x5EED)
        for account in config.account_names():
            op_id = new_op_id(rng)
            line = operation_line(op_id, "DEPOSIT", account, None, config.initial_balance_cents)
            op = _PendingOp(None, op_id, "DEPOSIT", account, None, config.initial_balance_cents, line, self.now_s(), 0.0)
            reply, op.attempts, outcome = await execute_with_retries(
                client, op_id, line,
                deadline_s=time.monotonic() + config.op_deadline_s, attempt_timeout_s=config.attempt_timeout_s,
            )
            self._record(-1, op, reply, outcome)
            if outcome != OK:
                raise RuntimeError(f"seeding {account} failed: {reply}")

    async def run(self, duration_s: float | None = None) -> list[OpRecord]:
        config = self.config
        duration_s = config.duration_s if duration_s is None else duration_s
        clients = [self.make_client(index) for index in range(config.clients)]
        for index, client in enumerate(clients):  # a client's session spans every run of the workload
            if hasattr(client, "max_seq_seen"):
                client.max_seq_seen = self._max_seq_seen.get(index, 0)
        self.run_started_s = self.now_s()
        stop_at = time.monotonic() + duration_s
        hard_deadline = stop_at + config.drain_s
        reporter = asyncio.create_task(self._report_progress()) if self.show_progress else None
        drivers = [
            _ClientDriver(self, index, clients[index], random.Random(config.seed * 1_000_003 + index), stop_at, hard_deadline)
            for index in range(config.clients)
        ]
        # No automatic garbage collection while the clients measure: the history keeps objects the
        # collector tracks (three per operation), and walking a few hundred thousand of them stops
        # every client for tens of milliseconds, which the run would report as the bank's latency.
        # The run is bounded in time, so is what it leaves to collect; collected right after.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for driver in drivers:
                driver.start()
            await asyncio.gather(*(driver.finished for driver in drivers))
        finally:
            self.loop_monitor_at_end = LoopMonitor.snapshot()
            if collecting:
                gc.enable()
            self.run_ended_s = self.now_s()
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
                self._print_progress(final=True)
            for index, client in enumerate(clients):
                if hasattr(client, "max_seq_seen"):
                    self._max_seq_seen[index] = client.max_seq_seen
                await client.close()
        return self.history

    @property
    def history(self) -> list[OpRecord]:
        """Every completed operation so far, as OpRecords (built here, not when it completed)."""
        completed = self._completed
        if completed:
            self._completed = []
            self._history.extend([_op_record(*item) for item in completed])
        return self._history

    def stop(self) -> None:
        self._stop.set()

    def _record(self, client_index: int, op: "_PendingOp", reply: dict, outcome: str) -> None:
        complete = time.monotonic() - self.t0
        self._completed.append((client_index, op, reply, complete, outcome))
        progress = self.progress
        if outcome == OK:
            progress.ok += 1
        elif outcome == FAILED:
            progress.failed += 1
        else:
            assert outcome == UNKNOWN
            progress.unknown += 1
        if len(progress.latencies_ms) < 100_000:
            progress.latencies_ms.append((complete - op.invoke_s) * 1000.0)

    async def _report_progress(self, period_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._print_progress()

    def _print_progress(self, final: bool = False) -> None:
        progress = self.progress
        latencies = sorted(progress.latencies_ms)
        progress.latencies_ms = []
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
        elapsed = self.now_s() - self.run_started_s
        note = self.progress_note() if self.progress_note is not None else ""
        line = (
            f"  t={elapsed:6.1f}s ok={progress.ok} failed={progress.failed} unknown={progress.unknown} "
            f"in_flight={progress.in_flight} last_s_ops={len(latencies)} p99={p99:.2f}ms {note}"
        )
        if sys.stderr.isatty():  # one line, rewritten in place
            sys.stderr.write("\r" + line.ljust(110) + ("\n" if final else ""))
        else:
            sys.stderr.write(line.rstrip() + "\n")
        sys.stderr.flush()


def _op_record(client_index: int, op: "_PendingOp", reply: dict, complete_s: float, outcome: str) -> OpRecord:
    seq = reply.get("SEQ")
    applied = reply.get("APPLIED")
    epoch = reply.get("EPOCH")
    return _tuple_new(OpRecord, (
        client_index, op.op_id, op.kind, op.account, op.to_account, op.amount, op.invoke_s, complete_s, outcome,
        reply.get("ERROR"), _cents_from_reply(reply.get("BALANCE")), seq if type(seq) is int else None,
        op.attempts, applied if type(applied) is int else None, reply.get("ACCEPTED") is True,
        epoch if type(epoch) is int else None,
    ))


class _PendingOp:
    """An operation in flight. Called with a reply, it hands it to its driver: the bank client's
    callback, without a closure per attempt."""

    __slots__ = ("driver", "op_id", "kind", "account", "to_account", "amount", "line", "invoke_s", "deadline",
                 "attempts", "indefinite_seen", "backoff_s")

    def __init__(self, driver, op_id, kind, account, to_account, amount, line, invoke_s, deadline) -> None:
        self.driver = driver
        self.op_id = op_id
        self.kind = kind
        self.account = account
        self.to_account = to_account
        self.amount = amount
        self.line = line
        self.invoke_s = invoke_s
        self.deadline = deadline
        self.attempts = 0
        self.indefinite_seen = False
        self.backoff_s = 0.01

    def __call__(self, reply: dict) -> None:
        self.driver._on_reply(self, reply)


class _ClientDriver:
    """One lab client: keeps `window` operations in flight on its bank client, by callbacks.

    No task or future per operation: a reply's callback records the operation and issues the next
    one (or schedules a retry), so the client's own CPU cost stays small next to the cluster's.
    """

    def __init__(self, workload: Workload, index: int, client, rng: random.Random, stop_at: float, hard_deadline: float) -> None:
        self.workload = workload
        self.index = index
        self.client = client
        self.rng = rng
        self.stop_at = stop_at
        self.hard_deadline = hard_deadline
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        self.active_slots = 0
        config = workload.config
        self.accounts = config.account_names()
        assert len(config.mix) == len(KINDS) and min(config.mix) >= 0 and sum(config.mix) > 0, config.mix
        total = sum(config.mix)
        # Cumulative shares; the kinds after the last one with a share end exactly at 1.0, so a
        # kind weighted 0 is never drawn.
        self.edges = [sum(config.mix[: index + 1]) / total for index in range(len(KINDS))]
        self.max_amount = config.max_amount_cents
        self.read_your_writes = config.read_your_writes
        self.op_deadline_s = config.op_deadline_s
        self.attempt_timeout_s = config.attempt_timeout_s
        self.op_ids = OpIdSource(rng)
        self.tracks_seq = hasattr(client, "max_seq_seen")

    def start(self) -> None:
        self.active_slots = self.workload.config.window
        for _ in range(self.active_slots):
            self._issue()

    def _issue(self) -> None:
        now = time.monotonic()
        if now >= self.stop_at or self.workload._stop.is_set():
            self.active_slots -= 1
            if self.active_slots == 0 and not self.finished.done():
                self.finished.set_result(None)
            return
        rng = self.rng
        pick = rng.random()
        edges = self.edges
        account = self.accounts[int(rng.random() * len(self.accounts))]
        op_id = self.op_ids.next()
        to_account = None
        amount = None
        if pick < edges[0]:
            kind = "TRANSFER"
            to_account = account
            while to_account == account:
                to_account = self.accounts[int(rng.random() * len(self.accounts))]
            amount = 1 + int(rng.random() * self.max_amount)
            line = operation_line(op_id, kind, account, to_account, amount)
        elif pick < edges[2]:
            kind = "DEPOSIT" if pick < edges[1] else "WITHDRAW"
            amount = 1 + int(rng.random() * self.max_amount)
            line = operation_line(op_id, kind, account, None, amount)
        else:
            kind = "BALANCE"
            min_seq = getattr(self.client, "max_seq_seen", None) if self.read_your_writes else None
            line = balance_line(op_id, account, min_seq)
        op = _PendingOp(self, op_id, kind, account, to_account, amount, line, now - self.workload.t0,
                        min(now + self.op_deadline_s, self.hard_deadline))
        self.workload.progress.in_flight += 1
        self._send(op)

    def _send(self, op: _PendingOp) -> None:
        op.attempts += 1
        self.client.submit(op.op_id, op.line, op, self.attempt_timeout_s, op.kind == "BALANCE")

    def _on_reply(self, op: _PendingOp, reply: dict) -> None:
        if reply.get("STATUS") == "OK":
            return self._finish(op, reply, OK)
        code = reply.get("ERROR")
        definite = is_definite(code)
        if definite and code not in NOT_NOW_ERRORS:
            return self._finish(op, reply, FAILED)
        outcome = classify(reply, op.indefinite_seen)
        op.indefinite_seen = op.indefinite_seen or not definite
        if time.monotonic() + op.backoff_s >= op.deadline:
            return self._finish(op, reply, outcome)
        self.loop.call_later(op.backoff_s, self._send, op)
        op.backoff_s = min(op.backoff_s * 2, 0.25)

    def _finish(self, op: _PendingOp, reply: dict, outcome: str) -> None:
        if self.tracks_seq:  # read your writes: the next read names the highest seq seen
            seq = reply.get("SEQ")
            if type(seq) is int and seq > self.client.max_seq_seen:
                self.client.max_seq_seen = seq
        self.workload.progress.in_flight -= 1
        self.workload._record(self.index, op, reply, outcome)
        self._issue()
