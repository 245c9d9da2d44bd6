"""The witness of the primary-backup architecture (`server.py --mode witness`).

Owns the third voter on the orchestrator host: with two replicas and this witness, the seed's three
hosts make a majority of two, so one replica and the witness can elect a new primary and the lease
of a primary cut off from both ends. The witness holds no data and no log: it decides votes and
lease grants with the same rules as a replica's voter (common/primary_backup/core.Voter), without the
"is the candidate's log at least as up to date as mine" test, which needs a log.

Its voter record (promised epoch, vote, newest sync set) is a small JSON file, replaced atomically
(write a temporary file, fsync it, rename it over the old one, fsync the directory) before any
answer that depends on it goes out.

    python server.py --mode witness --replicas replica1,replica2 --state-file var/witness.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import topology
from common.bank.errors import SaldoError, error_reply
from common.bank.replies import classify_unknown
from common.log import get_logger
from common.primary_backup.core import (
    Timing,
    Voter,
    VoterRecord,
    lease_reply_message,
    parse_lease_request,
    parse_vote_request,
    record_from_json,
    record_to_json,
    sync_set_json,
    vote_reply_message,
)
from common.storage.durable import EXIT_STORE_FAILURE
from common.transport import aio
from common.transport.peers import PeerCheck

log = get_logger("witness")

MAX_STATE_FILE_BYTES = 64 * 1024
BANK_TASKS = frozenset({"DEPOSIT", "WITHDRAW", "TRANSFER", "BALANCE", "QUERY"})


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=topology.DEFAULT_PORTS["witness"], help="voter port (default 6008)")
    parser.add_argument("--replicas", help="names of the replicas that may be elected, comma-separated (required)")
    parser.add_argument("--state-file", help="the voter record (default var/<name>.json)")
    parser.add_argument("--peer-hosts", default="",
                        help="hosts the replicas connect from, comma-separated: only they may ask for votes and "
                             "leases (default: any host, with a warning; see common/transport/peers.py)")
    parser.add_argument("--lease-duration", type=float, default=Timing().lease_duration_s,
                        help="the longest lease granted (at least the replicas'); also how long it stays quiet after a restart")
    parser.add_argument("--max-connections", type=int, default=aio.MAX_CONNECTIONS)


def prepare(args: argparse.Namespace) -> None:
    if not args.replicas:
        raise SystemExit("server.py --mode witness: --replicas NAME,NAME... is required")
    # Accept the replica's own flag format too (NAME@HOST:PORT): the witness needs only the names.
    args.replica_names = sorted({item.split("@", 1)[0].strip() for item in args.replicas.split(",") if item.strip()})
    if args.name is None:
        args.name = "witness"
    if args.name in args.replica_names:
        raise SystemExit(f"server.py --mode witness: the witness name {args.name} is also a replica name")
    if args.state_file is None:
        args.state_file = f"var/{args.name}.json"


def load_record(path: Path, replicas: frozenset[str]) -> VoterRecord:
    if not path.exists():
        return VoterRecord()
    data = path.read_bytes()
    if len(data) > MAX_STATE_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_STATE_FILE_BYTES} bytes")
    return record_from_json(json.loads(data), replicas)


def write_record(path: Path, record: VoterRecord) -> None:
    """Replace the file atomically and durably: a crash leaves the old record or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(record_to_json(record), sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Witness:
    def __init__(self, args: argparse.Namespace, record: VoterRecord) -> None:
        self.args = args
        self.path = Path(args.state_file)
        self.replicas = frozenset(args.replica_names)
        self.peer_check = PeerCheck.from_flag(args.peer_hosts, role="witness")
        # Leases longer than --lease-duration are refused, so the quiet time after a restart covers
        # every promise the witness may have made before it.
        timing = Timing(lease_duration_s=args.lease_duration, heartbeat_interval_s=args.lease_duration / 3)
        self.voter = Voter(args.name, args.replica_names, record, timing, time.monotonic())
        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="witness-record")
        self.started_at = time.monotonic()
        self.persisted: asyncio.Future = self.loop.create_future()
        self.persisted.set_result(None)
        self.writes = 0
        self.votes_granted = 0
        self.leases_granted = 0
        self.requests_refused = 0

    def persist(self, record: VoterRecord) -> asyncio.Future:
        """Write `record`; a future that resolves once it is on disk. Writes run one at a time on
        one thread, in the order asked, so the file never goes back to an older record."""
        done = self.loop.run_in_executor(self.executor, write_record, self.path, record)

        def check(work: asyncio.Future) -> None:
            if work.exception() is not None:
                # The promise cannot be kept on disk: stop rather than answer (fail-stop, as a replica).
                log.error("record_write_failed_stopping", error=repr(work.exception()))
                os._exit(EXIT_STORE_FAILURE)
            self.writes += 1

        done.add_done_callback(check)
        self.persisted = done
        return done

    def answer_after_persist(self, stream: aio.MessageStream, reply: dict) -> None:
        record = self.voter.take_dirty()
        if record is not None:
            self.persist(record).add_done_callback(lambda _done: stream.send(reply))
        elif not self.persisted.done():
            # An answer that repeats a decision still being written waits for that write too.
            self.persisted.add_done_callback(lambda _done: stream.send(reply))
        else:
            stream.send(reply)

    async def handle(self, stream: aio.MessageStream) -> None:
        if not self.peer_check.admits(stream):
            await self.peer_check.answer_stranger(stream, self.status)
            return
        while True:
            batch = await stream.read_batch()
            if batch is None:
                return
            for message in batch:
                if isinstance(message, SaldoError):
                    stream.send(error_reply(message.code, message.detail))
                    continue
                request_id = message.get("ID") if type(message.get("ID")) in (str, int) else None
                try:
                    self._on_message(stream, message, request_id)
                except SaldoError as error:
                    self.requests_refused += 1
                    stream.send(error_reply(error.code, error.detail, request_id))
            if not await stream.drain():
                return

    def _on_message(self, stream: aio.MessageStream, message: dict, request_id: object) -> None:
        task = message.get("TASK")
        now = time.monotonic()
        voter = self.voter
        if task in ("VOTE", "PRE_VOTE"):
            request = parse_vote_request(message, self.replicas)
            decision = voter.decide_vote(request.epoch, request.candidate, request.position, None, now, pre=request.pre)
            if decision.granted and not request.pre:
                self.votes_granted += 1
                log.info("voted", epoch=request.epoch, candidate=request.candidate)
            elif not decision.granted:
                log.debug("vote_refused", epoch=request.epoch, candidate=request.candidate, reason=decision.reason,
                          pre=request.pre)
            reply = vote_reply_message(request_id, self.args.name, request, decision, voter.record.promised_epoch, None)
            self.answer_after_persist(stream, reply)
        elif task == "LEASE":
            request = parse_lease_request(message, self.replicas)
            previous_epoch = voter.record.promised_epoch
            decision = voter.decide_lease(request.epoch, request.primary, request.sync_set, request.duration_s, now)
            if decision.granted:
                self.leases_granted += 1
                if request.epoch > previous_epoch:
                    log.info("primary_recognised", epoch=request.epoch, primary=request.primary)
            else:
                log.debug("lease_refused", epoch=request.epoch, primary=request.primary, reason=decision.reason)
            reply = lease_reply_message(request_id, self.args.name, request.epoch, decision, voter.record)
            self.answer_after_persist(stream, reply)
        elif task == "STATUS":
            stream.send(self.status(request_id))
        elif task in BANK_TASKS or "tipo" in message:
            raise SaldoError("WRONG_ROLE", "the witness only votes; send bank operations to a replica's client port")
        else:
            raise classify_unknown(message)

    def status(self, request_id: object = None) -> dict:
        voter = self.voter
        now = time.monotonic()
        record = voter.record
        reply = {"ID": request_id} if request_id is not None else {}
        reply.update({
            "STATUS": "OK",
            "NODE": self.args.name,
            "ROLE": "witness",
            "MODE": "witness",
            "PID": os.getpid(),
            "UPTIME_S": round(now - self.started_at, 3),
            "EPOCH": record.promised_epoch,
            "VOTED_FOR": record.voted_for,
            "SYNC_SET_KNOWN": None if record.sync_set is None else sync_set_json(record.sync_set),
            "LEASE_HOLDER": voter.lease_holder if voter.lease_active(now) else None,
            "LEASE_EPOCH": voter.lease_epoch,
            "LEASE_REMAINING_S": round(max(0.0, voter.lease_until_s - now), 3) if voter.lease_active(now) else 0.0,
            # A witness holds no data: it applies nothing (the lab reads these like any node's).
            "LAST_APPLIED_SEQ": 0,
            "OPS_APPLIED_TOTAL": 0,
            "RECORD_WRITES": self.writes,
            "VOTES_GRANTED": self.votes_granted,
            "LEASES_GRANTED": self.leases_granted,
            "REQUESTS_REFUSED": self.requests_refused,
            **aio.process_figures(),
        })
        return reply


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    path = Path(args.state_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = load_record(path, frozenset(args.replica_names))
    except (ValueError, OSError, SaldoError) as error:
        log.error("record_unreadable", path=str(path), error=str(error))
        return 1
    witness = Witness(args, record)
    log.info("witness_starting", path=str(path), epoch=record.promised_epoch, voted_for=record.voted_for,
             replicas=",".join(args.replica_names))
    server = await aio.start_server(witness.handle, args.host, args.port, name="witness", max_connections=args.max_connections)
    await stop.wait()
    await server.stop()
    await witness.persisted
    witness.executor.shutdown(wait=True)
    return 0
