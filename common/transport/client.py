"""The client machinery every architecture's client shares, for `client.py` and the lab alike.

Owns what does not depend on how an architecture orders operations:

- `BankClient`: the interface of every architecture's client (`submit`, `execute`, `request`,
  `close`); each architecture's folder has its own (common/<architecture>/client.py), and
  common/clients.py maps an architecture's name to it.
- `DirectClient`: one address answers everything (the standalone process, the queue
  architecture's RPC server, the sequencer); the other clients are built from it.
- `execute_with_retries` and `classify`: retries with the same operation id until a conclusive
  answer or a deadline, and what an answer means (ok, failed, unknown).
- `new_op_id`, `OpIdSource`: UUIDv7 operation ids.

`execute(request_id, line)` makes one attempt and never raises: a network failure becomes an error
reply whose DEFINITE flag says whether the operation may have happened. Retrying an indefinite
failure with the same operation id is always safe (exactly-once apply) and is the caller's choice:
see `execute_with_retries`.

Requests are built by `operation_line` and friends as ready-to-send lines, without the JSON encoder
(names and ids are of a plain character set, see common/bank/state.py), because the lab sends tens
of thousands per second from one process.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from common.bank.errors import error_reply, is_definite
from common.bank.money import render_cents
from common.log import get_logger
from common.transport import wire
from common.transport.aio import RECONNECT_BACKOFF_S, Connection, future_resolver

log = get_logger("bankclient")

CONNECT_TIMEOUT_S = 1.0

# An architecture's addresses by purpose: "write" (where operations go), "read" (where reads may go).
Addresses = dict[str, list[tuple[str, int]]]


def new_op_id(rng: random.Random | None = None) -> str:
    """A new operation id: a UUID version 7 (RFC 9562), whose first 48 bits are the time in
    milliseconds. Ids made close in time sort close together, so a unique index on them (the worker
    farm's applied_ops) grows at its right edge instead of touching a random page per insert: on
    SQLite that halved the cost of recording an applied operation. `rng` makes the random part
    cheap (the lab's clients)."""
    unix_ms = time.time_ns() // 1_000_000
    random_bits = rng.getrandbits(74) if rng is not None else int.from_bytes(os.urandom(10), "big") >> 6
    rand_a = random_bits >> 62  # 12 bits
    rand_b = random_bits & ((1 << 62) - 1)
    h = f"{unix_ms & 0xFFFFFFFFFFFF:012x}{0x7000 | rand_a:04x}{(0x8000 << 48) | rand_b:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class OpIdSource:
    """UUIDv7 ids for one client, cheaply: the time prefix is formatted once per millisecond and
    the 62 random bits are a random number drawn once plus a counter (RFC 9562 allows a counter in
    the random bits; it keeps ids from one source unique and increasing within a millisecond)."""

    def __init__(self, rng: random.Random) -> None:
        self._rand_a = rng.getrandbits(12)
        self._base = (rng.getrandbits(30) << 32) | (0x8000 << 48)  # variant bits + 30 random bits
        self._counter = rng.getrandbits(32)
        self._ms = -1
        self._prefix = ""

    def next(self) -> str:
        unix_ms = time.time_ns() // 1_000_000
        if unix_ms != self._ms:
            self._ms = unix_ms
            h = f"{unix_ms & 0xFFFFFFFFFFFF:012x}"
            self._prefix = f"{h[:8]}-{h[8:12]}-{0x7000 | self._rand_a:04x}-"
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        tail = f"{self._base | self._counter:016x}"
        return f"{self._prefix}{tail[:4]}-{tail[4:]}"


def operation_line(op_id: str, kind: str, account: str, to_account: str | None, amount_cents: int, extra: str = "") -> bytes:
    """A request line for DEPOSIT / WITHDRAW / TRANSFER in saldo's own format ("ID" = op id)."""
    amount = render_cents(amount_cents)
    if kind == "TRANSFER":
        return f'{{"TASK":"TRANSFER","ID":"{op_id}","FROM":"{account}","TO":"{to_account}","AMOUNT":"{amount}"{extra}}}\n'.encode()
    return f'{{"TASK":"{kind}","ID":"{op_id}","ACCOUNT":"{account}","AMOUNT":"{amount}"{extra}}}\n'.encode()


def balance_line(request_id: str, account: str, min_seq: int | None = None) -> bytes:
    extra = "" if min_seq is None else f',"MIN_SEQ":{int(min_seq)}'
    return f'{{"TASK":"BALANCE","ID":"{request_id}","ACCOUNT":"{account}"{extra}}}\n'.encode()


class BankClient:
    """What every architecture's client offers. A subclass implements `submit` (one attempt, the
    reply through a callback, never an exception) and `close`; the awaitable forms come from it."""

    # execute_with_retries: each attempt after one that timed out waits this many times longer.
    # 1: a reply is due within one attempt's timeout, so its absence says the server is in trouble.
    retry_timeout_growth = 1.0

    def submit(self, request_id: str, line: bytes, on_reply, timeout_s: float | None = None, is_read: bool = False) -> None:
        raise NotImplementedError

    async def execute(self, request_id: str, line: bytes, timeout_s: float | None = None, is_read: bool = False) -> dict:
        """One attempt, awaited. Never raises."""
        future = asyncio.get_running_loop().create_future()
        self.submit(request_id, line, future_resolver(future), timeout_s, is_read)
        return await future

    async def request(self, message: dict, timeout_s: float | None = None) -> dict:
        """Send any message (STATUS, ...) as one attempt."""
        request_id = message.get("ID") or new_op_id()
        message["ID"] = request_id
        return await self.execute(request_id, wire.encode(message), timeout_s)

    async def close(self) -> None:
        raise NotImplementedError


class DirectClient(BankClient):
    """A client of an architecture where one address answers everything.

    `submit(id, line, on_reply)` sends at once when connected; otherwise the request waits (a
    bounded number of them) while one connection attempt runs. A failed attempt answers the waiting
    requests NOT_READY (definite: nothing was sent) and the next attempt waits a backoff.
    """

    MAX_WAITING_REQUESTS = 4096

    def __init__(
        self,
        address: tuple[str, int],
        *,
        request_timeout_s: float = 5.0,
        max_in_flight: int = 1024,
        source_host: str | None = None,
    ) -> None:
        self.address = address
        self.request_timeout_s = request_timeout_s
        self.max_in_flight = max_in_flight
        self.source_host = source_host
        self._connection: Connection | None = None
        self._waiting: list[tuple[str, bytes, object, float | None]] = []
        self._connect_task: asyncio.Task | None = None
        self._next_attempt_at = 0.0
        self._backoff_s = RECONNECT_BACKOFF_S[0]

    def submit(self, request_id: str, line: bytes, on_reply, timeout_s: float | None = None, is_read: bool = False) -> None:
        connection = self._connection
        if connection is not None and not connection.closed:
            connection.submit(request_id, line, on_reply, timeout_s)
            return
        if len(self._waiting) >= self.MAX_WAITING_REQUESTS:
            on_reply(error_reply("OVERLOADED", "too many requests waiting for a connection", request_id))
            return
        self._waiting.append((request_id, line, on_reply, timeout_s))
        if self._connect_task is None:
            self._connect_task = asyncio.get_running_loop().create_task(self._connect_and_send())

    async def _connect_and_send(self) -> None:
        try:
            wait_s = self._next_attempt_at - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            host, port = self.address
            try:
                self._connection = await Connection.open(
                    host, port, connect_timeout_s=CONNECT_TIMEOUT_S, request_timeout_s=self.request_timeout_s,
                    max_in_flight=self.max_in_flight, source_host=self.source_host,
                )
                self._backoff_s = RECONNECT_BACKOFF_S[0]
            except (OSError, TimeoutError) as error:
                self._connection = None
                self._next_attempt_at = time.monotonic() + self._backoff_s
                self._backoff_s = min(self._backoff_s * 2, RECONNECT_BACKOFF_S[1])
                failure = f"cannot connect to {host}:{port}: {error.__class__.__name__}"
                waiting, self._waiting = self._waiting, []
                for request_id, _line, on_reply, _timeout_s in waiting:
                    on_reply(error_reply("NOT_READY", failure, request_id))
                return
        finally:
            self._connect_task = None
        waiting, self._waiting = self._waiting, []
        for request_id, line, on_reply, timeout_s in waiting:
            self._connection.submit(request_id, line, on_reply, timeout_s)

    async def close(self) -> None:
        if self._connect_task is not None:
            self._connect_task.cancel()
            await asyncio.gather(self._connect_task, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


# Definite refusals that mean "not now" (nothing was done): worth retrying until the deadline.
NOT_NOW_ERRORS = frozenset({"NOT_READY", "OVERLOADED", "QUEUE_FULL", "NOT_PRIMARY", "TOO_STALE", "NO_WORKER"})

OK, FAILED, UNKNOWN = "ok", "failed", "unknown"


def classify(reply: dict, earlier_attempt_indefinite: bool) -> str:
    """ok, failed (certainly not applied, or applied as a recorded failure such as
    INSUFFICIENT_FUNDS), or unknown (may or may not have been applied)."""
    if reply.get("STATUS") == "OK":
        return OK
    code = reply.get("ERROR")
    if not is_definite(code):
        return UNKNOWN
    if code in NOT_NOW_ERRORS and earlier_attempt_indefinite:
        return UNKNOWN  # this refusal says nothing about what the earlier attempt did
    return FAILED


async def execute_with_retries(
    client, request_id: str, line: bytes, *, deadline_s: float, attempt_timeout_s: float | None = None,
    is_read: bool = False,
) -> tuple[dict, int, str]:
    """Execute until a conclusive answer or the deadline (monotonic time).

    Returns (last reply, attempts, outcome) with outcome ok / failed / unknown (see classify).
    An indefinite failure (TIMEOUT, CONNECTION_LOST, ...) and a "not now" refusal (NOT_READY,
    OVERLOADED, ...) are retried with the same id after a short backoff: exactly-once apply makes
    that safe, and the answer to a retry of an applied operation is its first outcome. After a
    TIMEOUT the next attempt may wait longer (the client's `retry_timeout_growth`). A "not now"
    that took a while to come (a farm server waits before its NO_WORKER) is not asked again when
    the deadline would cut the next attempt shorter: the answer is that refusal, not a TIMEOUT.
    """
    attempts = 0
    backoff_s = 0.01
    indefinite_seen = False
    refusal = None  # a read's last definite "not now" (TOO_STALE): says more than a final TIMEOUT
    while True:
        attempts += 1
        timeout_s = attempt_timeout_s
        if timeout_s is not None:  # no attempt outlasts the deadline
            timeout_s = max(0.05, min(timeout_s, deadline_s - time.monotonic()))
        started_s = time.monotonic()
        reply = await client.execute(request_id, line, timeout_s, is_read)
        took_s = time.monotonic() - started_s
        if reply.get("STATUS") == "OK":
            return reply, attempts, OK
        code = reply.get("ERROR")
        if code == "TIMEOUT" and attempt_timeout_s is not None:
            attempt_timeout_s *= getattr(client, "retry_timeout_growth", 1.0)
        definite = is_definite(code)
        if definite and code not in NOT_NOW_ERRORS:
            return reply, attempts, FAILED
        outcome = classify(reply, indefinite_seen)
        if is_read:
            outcome = FAILED  # a read changes nothing: without an answer it failed, it is not "unknown"
            refusal = reply if definite else refusal
        indefinite_seen = indefinite_seen or not definite
        if time.monotonic() + backoff_s + (took_s if definite else 0.0) >= deadline_s:
            return (refusal if refusal is not None and not definite else reply), attempts, outcome
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 0.25)


# A read that failed with one of these moves the client's reads to the next replica (the retry goes there).
READ_ELSEWHERE_ERRORS = frozenset({"NOT_READY", "CONNECTION_LOST", "TIMEOUT"})


def read_from_one(owner, readers: list, request_id: str, line: bytes, on_reply, timeout_s: float | None) -> None:
    """Send a read to the replica `owner._read_index` names; if that replica cannot answer, the
    next read (the caller's retry) goes to the one after it."""
    reader_index = owner._read_index

    def on_read_reply(reply: dict) -> None:
        if reply.get("STATUS") != "OK" and reply.get("ERROR") in READ_ELSEWHERE_ERRORS:
            owner._read_index = (reader_index + 1) % len(readers)
        on_reply(reply)

    readers[reader_index].submit(request_id, line, on_read_reply, timeout_s)
