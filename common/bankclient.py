"""The bank client library: how a client reaches the bank in each architecture.

Owns the client side of every architecture, for `client.py` and for the lab's workload alike:

- `DirectClient`: one address answers everything: the standalone process, the queue
  architecture's RPC server, the sequencer.
- (more architectures add their client here: multicast sends to every replica, primary-backup
  follows redirects.)

`execute(request_id, line)` makes one attempt and never raises: a network failure becomes an error
reply whose DEFINITE flag says whether the operation may have happened. Retrying an indefinite
failure with the same operation id is always safe (exactly-once apply) and is the caller's choice:
see `execute_with_retries`.

Requests are built by `operation_line` and friends as ready-to-send lines, without the JSON encoder
(names and ids are of a plain character set, see common/bank.py), because the lab sends tens of
thousands per second from one process.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from common import wire
from common.aio import Connection
from common.errors import error_reply, is_definite
from common.log import get_logger
from common.money import render_cents

log = get_logger("bankclient")

CONNECT_TIMEOUT_S = 1.0
# A connection that failed is not retried sooner than this, so a dead server costs little.
RECONNECT_BACKOFF_S = (0.02, 0.5)


def new_op_id(rng: random.Random | None = None) -> str:
    """A random UUID (version 4), cheaper than uuid.uuid4() when a `rng` is given."""
    bits = (rng.getrandbits(128) if rng is not None else int.from_bytes(os.urandom(16), "big"))
    bits = (bits & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def operation_line(op_id: str, kind: str, account: str, to_account: str | None, amount_cents: int, extra: str = "") -> bytes:
    """A request line for DEPOSIT / WITHDRAW / TRANSFER in saldo's own format ("ID" = op id)."""
    amount = render_cents(amount_cents)
    if kind == "TRANSFER":
        return f'{{"TASK":"TRANSFER","ID":"{op_id}","FROM":"{account}","TO":"{to_account}","AMOUNT":"{amount}"{extra}}}\n'.encode()
    return f'{{"TASK":"{kind}","ID":"{op_id}","ACCOUNT":"{account}","AMOUNT":"{amount}"{extra}}}\n'.encode()


def balance_line(request_id: str, account: str, min_seq: int | None = None) -> bytes:
    extra = "" if min_seq is None else f',"MIN_SEQ":{int(min_seq)}'
    return f'{{"TASK":"BALANCE","ID":"{request_id}","ACCOUNT":"{account}"{extra}}}\n'.encode()


class DirectClient:
    """A client of an architecture where one address answers everything."""

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
        self._connecting: asyncio.Future | None = None
        self._next_attempt_at = 0.0
        self._backoff_s = RECONNECT_BACKOFF_S[0]

    async def _connect(self) -> Connection | None:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        if self._connecting is not None:  # another request is connecting: share its result
            return await asyncio.shield(self._connecting)
        if time.monotonic() < self._next_attempt_at:
            return None
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            host, port = self.address
            connection = await Connection.open(
                host, port, connect_timeout_s=CONNECT_TIMEOUT_S, request_timeout_s=self.request_timeout_s,
                max_in_flight=self.max_in_flight, source_host=self.source_host,
            )
            self._connection = connection
            self._backoff_s = RECONNECT_BACKOFF_S[0]
        except (OSError, TimeoutError):
            connection = None
            self._next_attempt_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, RECONNECT_BACKOFF_S[1])
        self._connecting.set_result(connection)
        self._connecting = None
        return connection

    async def execute(self, request_id: str, line: bytes, timeout_s: float | None = None) -> dict:
        """One attempt. Never raises; a failure to connect is definite (nothing was sent)."""
        connection = await self._connect()
        if connection is None:
            return error_reply("NOT_READY", f"cannot connect to {self.address[0]}:{self.address[1]}", request_id)
        return await connection.request_bytes(request_id, line, timeout_s=timeout_s)

    async def request(self, message: dict, timeout_s: float | None = None) -> dict:
        """Send any message (STATUS, ...) as one attempt."""
        request_id = message.get("ID") or new_op_id()
        message["ID"] = request_id
        return await self.execute(request_id, wire.encode(message), timeout_s)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None


# Definite refusals that mean "not now" (nothing was done): worth retrying until the deadline.
NOT_NOW_ERRORS = frozenset({"NOT_READY", "OVERLOADED", "QUEUE_FULL", "NOT_PRIMARY", "TOO_STALE"})

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
    client, request_id: str, line: bytes, *, deadline_s: float, attempt_timeout_s: float | None = None
) -> tuple[dict, int, str]:
    """Execute until a conclusive answer or the deadline (monotonic time).

    Returns (last reply, attempts, outcome) with outcome ok / failed / unknown (see classify).
    An indefinite failure (TIMEOUT, CONNECTION_LOST, ...) and a "not now" refusal (NOT_READY,
    OVERLOADED, ...) are retried with the same id after a short backoff: exactly-once apply makes
    that safe, and the answer to a retry of an applied operation is its first outcome.
    """
    attempts = 0
    backoff_s = 0.01
    indefinite_seen = False
    while True:
        attempts += 1
        reply = await client.execute(request_id, line, attempt_timeout_s)
        if reply.get("STATUS") == "OK":
            return reply, attempts, OK
        code = reply.get("ERROR")
        definite = is_definite(code)
        if definite and code not in NOT_NOW_ERRORS:
            return reply, attempts, FAILED
        outcome = classify(reply, indefinite_seen)
        indefinite_seen = indefinite_seen or not definite
        if time.monotonic() + backoff_s >= deadline_s:
            return reply, attempts, outcome
        await asyncio.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 0.25)
