"""The standalone architecture: one process serves the bank, no replication.

Owns the request loop of a process that applies client operations directly: the standalone
baseline that every replicated architecture is compared with, and also what each replica of the
multicast architecture runs (multicast puts the replication in the client: every replica applies
what it receives, independently).

Per connection: read every request that has arrived, apply the operations to the in-memory Bank
in arrival order, wait until the group commit that holds them is on disk, then answer them all in
one write. Reads are answered at their place in that order, after the same wait. Replies carry the
request's "ID", so a client may pipeline.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque

from common import aio, wire
from common.aio import MessageStream
from common.bank import (
    AccountsQuery,
    Operation,
    Query,
    outcome_reply,
    parse_balance_line,
    parse_replica_request,
    parse_request_line,
    read_reply,
)
from common.durable import DurableBank
from common.errors import DETAIL_JSON, SaldoError, error_reply, with_id_msg
from common.log import get_logger
from common.money import render_cents

log = get_logger("standalone")

# Per connection: batches applied in memory whose commit is still in flight. Beyond this the
# connection stops reading until the disk catches up (TCP then slows the client down).
MAX_BATCHES_AWAITING_DISK = 64

# Tasks that belong to other roles of saldo: answered WRONG_ROLE rather than UNKNOWN_MESSAGE.
OTHER_ROLE_TASKS = frozenset(
    {"ORDERED", "REPLICATE", "HELLO", "ACK", "APPLIED", "RESEND", "SUBSCRIBE", "WORKER_REQUEST", "WORKER_RESPONSE",
     "HEARTBEAT", "COMMAND_RELEASE", "REDIRECT", "RETURN", "NO_TASK", "LEASE", "VOTE", "ENQUEUE", "SNAPSHOT"}
)



def fast_outcome_line(op_id: str, outcome, suffix: str = "") -> bytes:
    """The reply line for an applied operation whose request ID is its op id (a plain string, see
    bank.check_op_id), formatted without the JSON encoder: this is the hot path of every replica.
    `suffix` is extra members, already encoded, each starting with a comma."""
    if outcome.error is None:
        return f'{{"ID":"{op_id}","STATUS":"OK","BALANCE":"{render_cents(outcome.balance_cents)}"{suffix}}}\n'.encode()
    code = outcome.error
    return (
        f'{{"ID":"{op_id}","STATUS":"NOK","ERROR":"{code}","DETAIL":{DETAIL_JSON[code]},'
        f'"DEFINITE":true{suffix}}}\n'
    ).encode()


def fast_balance_line(request_id: str, balance_cents: int, seq: int) -> bytes:
    """The reply line for a balance read whose request ID is a plain string (see fast_outcome_line)."""
    return f'{{"ID":"{request_id}","STATUS":"OK","BALANCE":"{render_cents(balance_cents)}","SEQ":{seq}}}\n'.encode()


def reply_for_operation(message: dict, request_id: object, op: Operation, outcome, extra: dict | None = None) -> bytes:
    """Fast path for saldo's own format; the generic encoder for the seeds' formats."""
    if request_id == op.op_id and not extra and "id_msg" not in message:
        return fast_outcome_line(op.op_id, outcome)
    return wire.encode(with_id_msg(outcome_reply(outcome, request_id, **(extra or {})), message))


def classify_unknown(message: dict) -> SaldoError:
    """The error for a message this port does not serve: WRONG_ROLE if another role would."""
    task = message.get("TASK")
    if (type(task) is str and task in OTHER_ROLE_TASKS) or "WORKER" in message or "SERVER" in message:
        return SaldoError("WRONG_ROLE", "this port serves bank operations (DEPOSIT, WITHDRAW, TRANSFER, BALANCE, ACCOUNTS)")
    return SaldoError("UNKNOWN_MESSAGE", "expected TASK (DEPOSIT, WITHDRAW, TRANSFER, BALANCE, QUERY, ACCOUNTS, STATUS) "
                                         "or an Operacao")


class BankService:
    """Serves bank requests on a connection against a DurableBank (see the module docstring)."""

    def __init__(self, dbank: DurableBank, *, node_name: str, mode: str) -> None:
        self.dbank = dbank
        self.node_name = node_name
        self.mode = mode
        # Standalone's reads name the apply index they reflect (its one order); a multicast replica's
        # own index would mean nothing to a client that writes to every replica.
        self.reads_name_seq = mode == "standalone"
        self.started_at = time.monotonic()
        self.requests_total = 0

    def status(self) -> dict:
        return {
            "STATUS": "OK",
            "NODE": self.node_name,
            "ROLE": "replica",
            "MODE": self.mode,
            "PID": os.getpid(),
            "UPTIME_S": round(time.monotonic() - self.started_at, 3),
            **self.dbank.status_fields(),
            "REQUESTS_TOTAL": self.requests_total,
            **aio.process_figures(),
        }

    async def handle(self, stream: MessageStream) -> None:
        """Apply as requests arrive; send each batch's replies once the commit holding it is on
        disk. Reading goes on while a commit is in flight, so the next commit is already filling."""
        awaiting: deque[tuple[asyncio.Future, bytes]] = deque()  # replies in request order

        def send_durable_replies(_done: object = None) -> None:
            while awaiting and awaiting[0][0].done():
                stream.send_bytes(awaiting.popleft()[1])
            stream.flush()  # the client sends its next requests while this turn goes on

        while True:
            lines = await stream.read_lines()
            if lines is None:
                return
            self.requests_total += len(lines)
            replies = b"".join([self._answer_line(line) for line in lines])
            durable = self.dbank.durable()
            awaiting.append((durable, replies))
            if durable.done():
                send_durable_replies()
            else:
                durable.add_done_callback(send_durable_replies)
            while len(awaiting) > MAX_BATCHES_AWAITING_DISK:  # bound memory: wait for the disk
                await awaiting[0][0]
                send_durable_replies()
            if not await stream.drain():
                return

    def _answer_line(self, line: bytes) -> bytes:
        """A line in saldo's canonical request form is parsed by one regular expression; any other
        line is decoded and parsed in full (see bank.parse_request_line, bank.parse_balance_line)."""
        op = parse_request_line(line)
        if op is not None:
            outcome, _duplicate = self.dbank.apply(op)
            return fast_outcome_line(op.op_id, outcome)
        read = parse_balance_line(line)
        if read is not None:
            balance_cents = self.dbank.bank.balance(read[1])
            if balance_cents is not None and self.reads_name_seq:  # (else the full path answers)
                return fast_balance_line(read[0], balance_cents, self.dbank.bank.counters.ops_applied_total)
        try:
            message = wire.decode_line(line)
        except SaldoError as error:
            return wire.encode(error_reply(error.code, error.detail))
        return b"" if message is None else self._answer(message)

    def _answer(self, item: dict | SaldoError) -> bytes:
        """Apply or read one request now (in arrival order); its reply line, sent once durable."""
        if isinstance(item, SaldoError):
            return wire.encode(error_reply(item.code, item.detail))
        try:
            request_id = wire.request_id_of(item)
        except SaldoError as error:
            return wire.encode(with_id_msg(error_reply(error.code, error.detail), item))
        try:
            if item.get("TASK") == "STATUS":
                reply = self.status()
                if request_id is not None:
                    reply["ID"] = request_id
                return wire.encode(reply)
            try:
                request = parse_replica_request(item)
            except SaldoError as error:
                if error.code == "UNKNOWN_MESSAGE":
                    raise classify_unknown(item) from None
                raise
            if isinstance(request, (Query, AccountsQuery)):
                bank = self.dbank.bank
                applied = bank.counters.ops_applied_total
                if self.reads_name_seq and request.min_seq is not None and request.min_seq > applied:
                    # The client saw a seq this replica never reached (its store was replaced or
                    # lost): a balance without that write would hide it.
                    raise SaldoError("TOO_STALE", f"this replica is at seq {applied}, the read needs {request.min_seq}")
                seq = {"SEQ": applied} if self.reads_name_seq else {}
                return wire.encode(read_reply(bank, request, request_id, **seq))
            outcome, _duplicate = self.dbank.apply(request)
            return reply_for_operation(item, request_id, request, outcome)
        except SaldoError as error:
            return wire.encode(with_id_msg(error_reply(error.code, error.detail, request_id), item))
