"""The standalone architecture: one process serves the bank, no replication.

Owns the request loop of a process that applies client operations directly, and that process
(`replica.py --mode standalone|multicast`: its flags, its port, its store): the standalone
baseline that every replicated architecture is compared with, and also what each replica of the
multicast architecture runs (multicast puts the replication in the client: every replica applies
what it receives, independently).

Per connection: read every request that has arrived, apply the operations to the in-memory Bank
in arrival order, wait until the group commit that holds them is on disk, then answer them all in
one write. Reads are answered at their place in that order, after the same wait. Replies carry the
request's "ID", so a client may pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import deque

from common import topology
from common.bank.errors import SaldoError, error_reply, with_id_msg
from common.bank.replies import classify_unknown, fast_balance_line, fast_outcome_line, reply_for_operation
from common.bank.state import (
    AccountsQuery,
    Query,
    parse_balance_line,
    parse_replica_request,
    parse_request_line,
    read_reply,
)
from common.log import get_logger
from common.storage.durable import DurableBank
from common.storage.replica_store import add_store_flags, open_durable_bank, prepare_store
from common.transport import aio, wire
from common.transport.aio import MessageStream

log = get_logger("replica")

# Per connection: batches applied in memory whose commit is still in flight. Beyond this the
# connection stops reading until the disk catches up (TCP then slows the client down).
MAX_BATCHES_AWAITING_DISK = 64


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


# --- The process: `replica.py --mode standalone|multicast` ---------------------------------------

DEFAULT_PORT = {
    "standalone": topology.DEFAULT_PORTS["standalone"],
    "multicast": topology.DEFAULT_PORTS["multicast_replica"],
}


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="client port (default: the seed's port for the mode)")
    add_store_flags(parser)
    parser.add_argument("--max-connections", type=int, default=aio.MAX_CONNECTIONS)


def prepare(args: argparse.Namespace) -> None:
    if args.port is None:
        args.port = DEFAULT_PORT[args.mode]
    if args.name is None:
        args.name = f"{args.mode}-{args.port}"
    prepare_store(args)


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    dbank = await open_durable_bank(args)
    service = BankService(dbank, node_name=args.name, mode=args.mode)
    server = await aio.start_server(
        service.handle, args.host, args.port, name=f"{args.mode}-clients", max_connections=args.max_connections
    )
    await stop.wait()
    log.info("stopping", ops_applied_total=dbank.bank.counters.ops_applied_total)
    await server.stop()
    await dbank.close()
    return 0
