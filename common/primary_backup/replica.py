"""A replica of the primary-backup architecture (`replica.py --mode primary-backup`).

Owns the replica's I/O around common/primary_backup/core.py's ReplicaCore:

- the client port (6004): bank operations, reads, STATUS. The primary applies an operation to its
  DurableBank at once and queues the reply; the reply goes out once the commit point covers it
  (durable here, and in sync mode at every backup of the sync set) and only while the lease holds.
  A backup answers an operation NOT_PRIMARY with the seed's redirect (TASK REDIRECT, TARGET_MASTER),
  and serves a read itself when the client asks for it ("READ_FROM": "BACKUP"), saying how far
  behind it is (BEHIND, in operations).
- the peer port (6005): what other nodes send this one: votes and lease requests (this replica is a
  voter), and, as a backup, the primary's HELLO, APPEND batches and state transfers. A backup applies
  a batch, writes it with its position (last_applied_seq, last_entry_epoch) in one group commit, and
  acknowledges (ACK) once that commit is on disk.
- one outgoing connection to every other voter (replicas and witnesses), kept open with a backoff:
  a candidate sends its votes on it, a primary its lease renewals, HELLO, and the replication stream
  (live batches, or a catch-up task that replays the in-memory log or pushes a snapshot at the pace
  the backup reads).
- the voter record (promised epoch, vote, sync set) lives in the store's replica_meta and is on disk
  before any reply that depends on it goes out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import deque
from functools import partial

from common import topology
from common.bank.errors import SaldoError, error_reply, with_id_msg
from common.bank.replies import classify_unknown, fast_outcome_line, reply_for_operation
from common.bank.state import AccountsQuery, Operation, Query, parse_replica_request, parse_request_line, read_reply
from common.log import get_logger
from common.primary_backup.core import (
    ASYNC,
    DEFAULT_MAX_LOG_ENTRIES,
    REPLAY,
    REPLICATION_MODES,
    SNAPSHOT,
    SYNC,
    Append,
    Effects,
    Position,
    ReplicaCore,
    Timing,
    ack_line,
    address_field,
    append_line,
    entry_text,
    int_field,
    member_field,
    parse_append,
    parse_append_line,
    parse_lease_reply,
    parse_lease_request,
    parse_vote_reply,
    parse_vote_request,
    record_from_meta,
    record_to_meta,
    stale_epoch_reply,
)
from common.storage.durable import DurableBank
from common.storage.replica_store import add_store_flags, open_durable_bank, prepare_store
from common.storage.snapshot import SnapshotReader, image_to_lines
from common.transport import aio, wire
from common.transport.peers import PeerCheck, source_address

log = get_logger("pbreplica")

TICK_S = 0.02
CONNECT_TIMEOUT_S = 1.0
PEER_LINE_BYTES = 1024 * 1024  # an APPEND carries up to MAX_ENTRIES_PER_APPEND entries
# A live backup whose unsent bytes exceed this is fed by a catch-up task at its own pace instead.
MAX_LIVE_BUFFER_BYTES = 8 * 1024 * 1024
# A peer link with this much unsent (a peer that stopped reading) is dropped and reconnected.
MAX_LINK_BACKLOG_BYTES = 64 * 1024 * 1024
CATCHUP_CHUNK_ENTRIES = 4_000
# Replies waiting for the commit point, per connection and in all; beyond them the connection stops
# being read (TCP then slows the client) or new writes are refused OVERLOADED.
MAX_QUEUED_REPLIES_PER_CONNECTION = 4_096
MAX_PENDING_REPLIES = 200_000
MAX_DISCARDED_IDS_LOGGED = 2_000
# A primary whose lease has been out this long answers the replies it holds UNAVAILABLE (indefinite).
LEASE_LOST_GRACE_S = 0.2
BANK_TASKS = frozenset({"DEPOSIT", "WITHDRAW", "TRANSFER", "BALANCE", "QUERY"})
PEER_REPLY_TASKS = frozenset({"VOTE_REPLY", "LEASE_REPLY", "POSITION", "ACK"})

# A voter that cannot be connected to for this long is an outage, logged at warning level: longer
# than the other processes of a cluster take to start, or one of them to restart.
UNREACHABLE_WARNING_S = 3.0

# When a queued reply may go out: at once; once the commit point covers its seq and the lease holds
# (the primary's answers); once this replica's disk holds its seq (a backup's reads).
GATE_NONE, GATE_COMMIT, GATE_DURABLE = 0, 1, 2


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    timing = Timing()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=topology.DEFAULT_PORTS["primary_client"], help="client port (default 6004)")
    parser.add_argument("--peer-port", type=int, default=topology.DEFAULT_PORTS["primary_peer"],
                        help="port for votes, leases and the replication stream (default 6005)")
    parser.add_argument("--advertise", help="host:port clients are redirected to for this replica (default --host:--port)")
    parser.add_argument("--replicas", help="every replica, this one included: NAME@HOST:PEER_PORT,... (required)")
    parser.add_argument("--witnesses", default="", help="the witnesses: NAME@HOST:PORT,... (e.g. witness@127.0.0.11:6008)")
    parser.add_argument("--peer-hosts", default="",
                        help="hosts the other replicas connect from, comma-separated: only they may use the peer "
                             "port (default: any host, with a warning; see common/transport/peers.py)")
    parser.add_argument("--replication", choices=REPLICATION_MODES, default=SYNC,
                        help="sync (the default): answer once every backup of the sync set has applied; async (the "
                             "seed's): once durable here")
    parser.add_argument("--lease-duration", type=float, default=timing.lease_duration_s, help="seconds a lease lasts")
    parser.add_argument("--heartbeat-interval", type=float, default=timing.heartbeat_interval_s,
                        help="seconds between lease renewals (the primary's heartbeat)")
    parser.add_argument("--backup-timeout", type=float, default=timing.backup_timeout_s,
                        help="sync mode: a backup silent this long leaves the sync set (once a majority agrees)")
    parser.add_argument("--replication-interval", type=float, default=timing.replication_interval_s,
                        help="async mode: seconds between shipments of the stream to the backups")
    parser.add_argument("--max-log-entries", type=int, default=DEFAULT_MAX_LOG_ENTRIES,
                        help="entries kept in memory for catch-up by replay; further behind means state transfer")
    add_store_flags(parser)
    parser.add_argument("--max-connections", type=int, default=aio.MAX_CONNECTIONS)


def parse_members(text: str) -> dict[str, tuple[str, int]]:
    """'a@host:port,b@host:port' -> {name: (host, port)}; raises ValueError."""
    members: dict[str, tuple[str, int]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, address = item.partition("@")
        if not sep or not name or name in members:
            raise ValueError(f"expected NAME@HOST:PORT, got {item!r}")
        members[name] = topology.parse_address(address)
    return members


def prepare(args: argparse.Namespace) -> None:
    if not args.replicas:
        raise SystemExit("replica.py --mode primary-backup: --replicas NAME@HOST:PEER_PORT,... is required")
    try:
        args.replica_peers = parse_members(args.replicas)
        args.witness_peers = parse_members(args.witnesses or "")
    except ValueError as error:
        raise SystemExit(f"replica.py --mode primary-backup: {error}") from None
    if args.name is None:
        args.name = f"pb-{args.port}"
    if args.name not in args.replica_peers:
        raise SystemExit(f"replica.py: --name {args.name} is not among --replicas ({', '.join(args.replica_peers)})")
    prepare_store(args)
    if args.advertise is None:
        args.advertise = f"{args.host}:{args.port}"
    args.timing = Timing(
        lease_duration_s=args.lease_duration,
        heartbeat_interval_s=args.heartbeat_interval,
        backup_timeout_s=args.backup_timeout,
        replication_interval_s=args.replication_interval,
    )


class ReplyQueue:
    """One client connection's replies, in request order, each behind its gate."""

    __slots__ = ("items", "space", "stream")

    def __init__(self, stream: aio.MessageStream) -> None:
        self.stream = stream
        self.items: deque[tuple[int, int, bytes, object]] = deque()  # (gate, seq, line, request id)
        self.space: asyncio.Future | None = None


class PeerLink:
    """This replica's outgoing connection to one other voter, and (as primary) what it has sent."""

    def __init__(self, name: str, address: tuple[str, int], role: str) -> None:
        self.name = name
        self.address = address
        self.role = role  # "replica" or "witness"
        self.stream: aio.MessageStream | None = None
        self.live = False  # the replication stream goes out as entries are applied
        self.sent_seq = 0
        self.catchup_task: asyncio.Task | None = None
        # While connection attempts fail: since when (monotonic, and wall-clock for STATUS), the
        # last error, and whether the outage was reported (once per outage).
        self.unreachable_since_s: float | None = None
        self.unreachable_since_wall_s = 0.0
        self.last_error = ""
        self.outage_reported = False


class PBReplica:
    def __init__(self, args: argparse.Namespace, dbank: DurableBank, core: ReplicaCore) -> None:
        self.args = args
        self.dbank = dbank
        self.core = core
        self.loop = asyncio.get_running_loop()
        self.started_at = time.monotonic()
        roles = {**{name: "replica" for name in args.replica_peers}, **{name: "witness" for name in args.witness_peers}}
        peers = {**args.replica_peers, **args.witness_peers}
        self.links = {name: PeerLink(name, address, roles[name]) for name, address in peers.items() if name != args.name}
        self.source_host = source_address(args.host)  # where this replica connects to its peers from
        self.peer_check = PeerCheck.from_flag(args.peer_hosts, role="primary-backup replica")
        self.waiting: set[ReplyQueue] = set()
        self.pending_replies = 0
        self.primary_stream: aio.MessageStream | None = None  # the stream of the session this backup follows
        self.session_synced = False  # this backup's log is known to be a prefix of that primary's
        self.diverged = False
        self._durable_watched = 0
        self._released: tuple[bool, int, int] | None = None  # the gates at the last flush_replies
        self._ship_scheduled = False
        self.requests_total = 0
        self.snapshots_installed = 0
        self.snapshots_sent = 0
        self.discarded_ops_total = 0
        self.divergences = 0
        self.stale_refused = 0

    # --- Carrying out the core's effects --------------------------------------------------------
    def apply(self, effects: Effects, reply_stream: aio.MessageStream | None = None, reply: dict | None = None) -> None:
        for event, fields in effects.events:
            log.info(event, **fields)
        if effects.stepped_down:
            self._on_stepped_down()
        if effects.became_primary:
            self._on_became_primary()
        for peer, message in effects.send:
            self.send_to(peer, message)
        if effects.persist is not None:
            record = effects.persist
            for name, value in record_to_meta(record, self.core.replicas).items():
                self.dbank.set_meta(name, value)
            after = effects.after_persist

            def persisted(_done: object) -> None:
                self.apply(self.core.on_record_persisted(record))
                for peer, message in after:
                    self.send_to(peer, message)
                if reply_stream is not None and reply is not None:
                    reply_stream.send(reply)

            self.dbank.durable().add_done_callback(persisted)
        else:
            for peer, message in effects.after_persist:  # the record they depend on is already on disk
                self.send_to(peer, message)
            if reply_stream is not None and reply is not None:
                reply_stream.send(reply)
        if effects.commit_advanced and self.waiting:
            self.flush_replies()

    def send_to(self, peer: str, message: dict) -> None:
        link = self.links.get(peer)
        if link is None or link.stream is None or link.stream.closed:
            return  # the peer is unreachable: a lease renewal or vote just gets no answer
        if link.stream.unsent_bytes() > MAX_LINK_BACKLOG_BYTES:
            log.warning("peer_not_reading_dropping_link", peer=peer, unsent_bytes=link.stream.unsent_bytes())
            link.stream.abort()
            return
        if message.get("TASK") == "HELLO":
            self._stop_stream(link)
        link.stream.send(message)

    def _on_became_primary(self) -> None:
        core = self.core
        log.info("became_primary", epoch=core.epoch, last_seq=core.log.last_seq, replication=core.mode,
                 sync_set=",".join(core.primary.proposed.members))
        self.primary_stream = None
        self.session_synced = False

    def _on_stepped_down(self) -> None:
        log.warning("stepped_down", epoch=self.core.voter.record.promised_epoch, why=self.core.last_step_down)
        for link in self.links.values():
            self._stop_stream(link)
        self._fail_unacknowledged()

    def _stop_stream(self, link: PeerLink) -> None:
        link.live = False
        link.sent_seq = 0
        if link.catchup_task is not None:
            link.catchup_task.cancel()
            link.catchup_task = None

    # --- Replies to clients ---------------------------------------------------------------------
    def _release_state(self) -> tuple[bool, int, int]:
        """What gates replies now: the lease, the commit point, this replica's disk."""
        core = self.core
        return core.can_acknowledge(time.monotonic()), core.commit_seq, core.durable_seq

    def flush_replies(self) -> None:
        """Send what the gates now allow, on every connection that waits. Called on every event
        that may open a gate (a commit here, a backup's ACK, a lease renewal): skipped when none
        moved since the last call, since each connection also flushes after its own requests."""
        state = self._release_state()
        if state == self._released:
            return
        self._released = state
        for queue in list(self.waiting):
            self._flush_queue(queue, state)

    def _flush_queue(self, queue: ReplyQueue, state: tuple[bool, int, int]) -> None:
        lease_ok, commit, durable = state
        items = queue.items
        out = []
        while items:
            gate, seq, line, _request_id = items[0]
            if gate == GATE_COMMIT:
                if not lease_ok:
                    self._released = None  # held by the lease alone: a renewal must release it
                    break
                if seq > commit:
                    break
                self.pending_replies -= 1
            elif gate == GATE_DURABLE and seq > durable:
                break
            out.append(line)
            items.popleft()
        if out:
            queue.stream.send_bytes(b"".join(out))
        if items:
            self.waiting.add(queue)
        else:
            self.waiting.discard(queue)
        if queue.space is not None and len(items) < MAX_QUEUED_REPLIES_PER_CONNECTION // 2 and not queue.space.done():
            queue.space.set_result(None)

    def _fail_unacknowledged(self, detail: str = "this replica stopped being the primary before the operation"
                             " was acknowledged; retry with the same id") -> None:
        """Replies this primary holds will never be sent (it stepped down, or its lease ran out and
        it may be cut off). Their operations were applied here and may or may not survive in the
        next epoch: the answer is indefinite, and the client's retry with the same id is safe."""
        failed = 0
        for queue in list(self.waiting):
            items = deque()
            for gate, seq, line, request_id in queue.items:
                if gate == GATE_COMMIT:
                    self.pending_replies -= 1
                    failed += 1
                    # The reply it replaces echoed what the request asked to be echoed (id_msg).
                    reply = with_id_msg(error_reply("UNAVAILABLE", detail, request_id), wire.decode_line(line.rstrip(b"\n")))
                    items.append((GATE_NONE, 0, wire.encode(reply), request_id))
                else:
                    items.append((gate, seq, line, request_id))
            queue.items = items
            self._flush_queue(queue, self._release_state())
        if failed:
            log.warning("unacknowledged_replies_failed", count=failed)

    def _watch_durable(self) -> None:
        """Learn when what is applied now reaches the disk (one callback per group commit)."""
        seq = self.core.log.last_seq
        if seq <= self._durable_watched:
            return
        self._durable_watched = seq
        self.dbank.durable().add_done_callback(lambda _done: self._on_durable(seq))

    def _on_durable(self, seq: int) -> None:
        self.apply(self.core.on_local_durable(seq))
        if self.core.primary is None:
            self._send_ack()
        if self.waiting:
            self.flush_replies()

    # --- The client port ------------------------------------------------------------------------
    async def handle_client(self, stream: aio.MessageStream) -> None:
        queue = ReplyQueue(stream)
        try:
            while True:
                lines = await stream.read_lines()
                if lines is None:
                    return
                self.requests_total += len(lines)
                applied_before = self.core.log.last_seq
                items = queue.items
                # Whether this replica takes writes now is decided once per batch: nothing in the
                # batch can change it, and each reply is checked against the lease again when sent.
                refusal_reason = self._refusal_reason()
                for line in lines:
                    # saldo's canonical request form is parsed by one regular expression (no dict);
                    # anything else is decoded and parsed in full (see bank.parse_request_line).
                    op = parse_request_line(line)
                    if op is not None:
                        if refusal_reason is None:
                            items.append(self._apply_write(op.op_id, op, None))
                        else:
                            items.append((GATE_NONE, 0, self._not_primary(op.op_id, refusal_reason), op.op_id))
                        continue
                    try:
                        message = wire.decode_line(line)
                    except SaldoError as error:
                        items.append((GATE_NONE, 0, wire.encode(error_reply(error.code, error.detail)), None))
                        continue
                    if message is not None:
                        items.append(self._client_request(message))
                if self.core.log.last_seq != applied_before:
                    self._after_primary_applied()
                self._flush_queue(queue, self._release_state())
                while len(queue.items) > MAX_QUEUED_REPLIES_PER_CONNECTION:
                    queue.space = self.loop.create_future()
                    await queue.space
                    queue.space = None
                if not await stream.drain():
                    return
        finally:
            if queue in self.waiting:
                self.waiting.discard(queue)
            self.pending_replies -= sum(1 for gate, *_rest in queue.items if gate == GATE_COMMIT)

    def _client_request(self, item: dict) -> tuple[int, int, bytes, object]:
        """Handle one decoded request now; its reply line with the gate it waits behind."""
        request_id = None
        try:
            request_id = wire.request_id_of(item)
            task = item.get("TASK")
            if task == "STATUS":
                return GATE_NONE, 0, wire.encode(self.status(request_id)), request_id
            try:
                request = parse_replica_request(item)
            except SaldoError as error:
                raise classify_unknown(item) if error.code == "UNKNOWN_MESSAGE" else error from None
            read_from = item.get("READ_FROM", "PRIMARY")
            if read_from not in ("PRIMARY", "BACKUP"):
                raise SaldoError("FIELD_INVALID", "READ_FROM must be PRIMARY or BACKUP")
            core = self.core
            is_read = isinstance(request, (Query, AccountsQuery))
            if is_read and read_from == "BACKUP" and core.primary is None:
                return self._backup_read(request_id, request)
            refusal_reason = self._refusal_reason()
            if refusal_reason is not None:
                return GATE_NONE, 0, self._not_primary(request_id, refusal_reason, item), request_id
            if not is_read:
                return self._apply_write(request_id, request, item)
            # Up to date: answered once everything applied before it is committed, under the lease.
            seq = core.log.last_seq
            if request.min_seq is not None and seq < request.min_seq:
                # The client saw a write this primary never got: one lost in an asynchronous
                # failover, or a number from elsewhere. Answering would hide that its write is gone.
                raise SaldoError("TOO_STALE", f"this primary is at seq {seq}, the read needs {request.min_seq}")
            reply = read_reply(self.dbank.bank, request, request_id, SEQ=seq, EPOCH=core.primary.epoch, BEHIND=0)
            self.pending_replies += 1
            return GATE_COMMIT, seq, wire.encode(reply), request_id
        except SaldoError as error:
            return GATE_NONE, 0, wire.encode(with_id_msg(error_reply(error.code, error.detail, request_id), item)), request_id

    def _refusal_reason(self) -> str | None:
        """Why this replica cannot take a write or an up-to-date read now ("" for the default words
        of a backup), or None if it can."""
        core = self.core
        if core.primary is None:
            return ""
        if not core.can_acknowledge(time.monotonic()):
            return "the primary's lease has expired: it may be cut off from the majority and cannot acknowledge"
        return None

    def _apply_write(self, request_id: object, op: Operation, message: dict | None) -> tuple[int, int, bytes, object]:
        """Apply a client's operation as the primary (the caller checked that it may); its reply
        waits for the commit point. `message` is the decoded request, or None for a canonical line
        (whose ID is the op id)."""
        if self.pending_replies >= MAX_PENDING_REPLIES:
            reply = error_reply("OVERLOADED", f"{self.pending_replies} replies wait for the backups", request_id)
            return GATE_NONE, 0, wire.encode(with_id_msg(reply, message) if message is not None else reply), request_id
        core = self.core
        dbank = self.dbank
        seq = core.log.last_seq + 1
        outcome, duplicate = dbank.apply(op, seq)
        if duplicate:
            earlier = dbank.bank.applied(op.op_id)
            assert earlier is not None, op.op_id  # a duplicate is one the window remembers
            seq = earlier.seq if earlier.seq is not None else earlier.apply_index
        else:
            assert dbank.bank.counters.ops_applied_total == seq, (dbank.bank.counters.ops_applied_total, seq)
            core.record_entry(seq, core.primary.epoch, entry_text(op, outcome.error))
        suffix = f',"SEQ":{seq},"EPOCH":{core.primary.epoch}'
        if message is None or (request_id == op.op_id and "id_msg" not in message):
            line = fast_outcome_line(op.op_id, outcome, suffix)
        else:
            line = reply_for_operation(message, request_id, op, outcome, {"SEQ": seq, "EPOCH": core.primary.epoch})
        self.pending_replies += 1
        return GATE_COMMIT, seq, line, request_id

    def _after_primary_applied(self) -> None:
        position = self.core.position
        self.dbank.set_meta("last_applied_seq", position.seq)
        self.dbank.set_meta("last_entry_epoch", position.epoch)
        self._watch_durable()
        if self.core.mode == SYNC and not self._ship_scheduled:
            self._ship_scheduled = True
            self.loop.call_soon(self.ship)

    def _backup_read(self, request_id: object, query: Query | AccountsQuery) -> tuple[int, int, bytes, object]:
        core = self.core
        if not self.session_synced or self.diverged or core.installing:
            # Until the primary confirmed this log as a prefix of its own, it may hold a tail no
            # primary kept (a former primary's unreplicated writes): a read must not show it.
            raise SaldoError("NOT_READY", "this backup is not in step with a primary now; read from the primary, "
                                          "or retry")
        seq = core.log.last_seq
        if query.min_seq is not None and seq < query.min_seq:
            raise SaldoError("TOO_STALE", f"this backup is at seq {seq}, the read needs {query.min_seq}")
        behind = max(0, core.primary_seq - seq)
        reply = read_reply(self.dbank.bank, query, request_id, SEQ=seq, EPOCH=core.epoch, BEHIND=behind, ROLE=core.role)
        return GATE_DURABLE, seq, wire.encode(reply), request_id

    def _not_primary(self, request_id: object, detail: str = "", message: dict | None = None) -> bytes:
        """The seed's redirect: where the primary is, when this replica knows."""
        core = self.core
        target = None if core.primary is not None else core.redirect_target(time.monotonic())
        if not detail:
            detail = ("this replica is a backup; writes and up-to-date reads go to the primary" if target
                      else "no primary is known here now (an election may be under way); try another replica")
        reply = error_reply("NOT_PRIMARY", detail, request_id)
        reply["TASK"] = "REDIRECT"
        if target is not None:
            host, port = topology.parse_address(target)
            reply["TARGET_MASTER"] = {"IP": host, "PORT": port}
        reply["EPOCH"] = core.epoch
        return wire.encode(with_id_msg(reply, message) if message is not None else reply)

    # --- The replication stream (as primary) ----------------------------------------------------
    def _ship_upto(self) -> int:
        """How far the stream may go. Sync: everything applied, so the backups' commits run alongside
        this primary's. Async: only what is on this primary's disk, like a binary log shipped after
        commit; replies go out when the commit lands, the stream at the next shipment."""
        core = self.core
        return core.log.last_seq if core.mode == SYNC else min(core.durable_seq, core.log.last_seq)

    def ship(self) -> None:
        """Send every live backup the entries it has not been sent."""
        self._ship_scheduled = False
        core = self.core
        primary = core.primary
        if primary is None:
            return
        last = self._ship_upto()
        for link in self.links.values():
            if not link.live or link.sent_seq >= last:
                continue
            stream = link.stream
            if stream is None or stream.closed:
                link.live = False
                continue
            for entry_epoch, first_seq, texts in core.log.runs(link.sent_seq + 1, last):
                stream.send_bytes(append_line(primary.epoch, core.log.last_seq, entry_epoch, first_seq, texts))
            link.sent_seq = last
            if stream.unsent_bytes() > MAX_LIVE_BUFFER_BYTES:
                log.warning("backup_slow_switching_to_catchup", backup=link.name, sent_seq=link.sent_seq)
                link.live = False
                self._start_catch_up(link, REPLAY, link.sent_seq)

    def _start_catch_up(self, link: PeerLink, plan: str, from_seq: int) -> None:
        if link.catchup_task is not None:
            link.catchup_task.cancel()
        link.catchup_task = asyncio.create_task(self._catch_up(link, plan, from_seq))

    async def _catch_up(self, link: PeerLink, plan: str, sent_seq: int) -> None:
        """Bring one backup to the end of the log at its own pace: a snapshot first if needed, then
        the log, chunk by chunk; then it joins the live stream."""
        core = self.core
        stream = link.stream
        epoch = core.epoch
        if stream is None:
            return

        def still_valid() -> bool:
            return core.primary is not None and core.primary.epoch == epoch and link.stream is stream and not stream.closed

        while True:
            if plan == SNAPSHOT:
                image = self.dbank.snapshot()
                position = core.position
                assert image.counters.ops_applied_total == position.seq, (image.counters, position)
                image.meta = {"last_applied_seq": position.seq, "last_entry_epoch": position.epoch}
                await self.dbank.durable()  # send only what is on disk here
                if not still_valid():
                    return
                log.info("snapshot_sending", backup=link.name, seq=position.seq, accounts=len(image.balances),
                         applied_ops=len(image.recent))
                for line in image_to_lines(image, f"snapshot-e{epoch}"):
                    stream.send_bytes(line)
                    if not await stream.drain() or not still_valid():
                        return
                self.snapshots_sent += 1
                sent_seq = position.seq
            while still_valid():
                last = self._ship_upto()
                if sent_seq >= last:
                    # Its log is now this primary's up to sent_seq (even when nothing had to be sent):
                    # from here on it may serve reads from its own state.
                    stream.send({"TASK": "CAUGHT_UP", "EPOCH": epoch, "SEQ": sent_seq})
                    link.sent_seq = sent_seq
                    link.live = True
                    self.apply(core.on_caught_up(link.name, time.monotonic()))
                    log.info("backup_live", backup=link.name, sent_seq=sent_seq)
                    return
                if sent_seq < core.log.base.seq:  # the log moved past it while it read: start over
                    plan = SNAPSHOT
                    break
                upto = min(last, sent_seq + CATCHUP_CHUNK_ENTRIES)
                for entry_epoch, first_seq, texts in core.log.runs(sent_seq + 1, upto):
                    stream.send_bytes(append_line(epoch, core.log.last_seq, entry_epoch, first_seq, texts))
                sent_seq = upto
                if not await stream.drain():
                    return
            else:
                return

    # --- Outgoing links -------------------------------------------------------------------------
    async def maintain_link(self, link: PeerLink, stop: asyncio.Event) -> None:
        while not stop.is_set():
            stream = await aio.connect_with_backoff(
                link.address, stop, max_line_bytes=PEER_LINE_BYTES, peer=link.name, connect_timeout_s=CONNECT_TIMEOUT_S,
                source_host=self.source_host, on_failure=partial(self._on_connect_failure, link),
            )
            if stream is None:
                return
            link.stream = stream
            log.info("peer_connected", peer=link.name, address=topology.format_address(link.address))
            if link.outage_reported:
                log.warning("peer_reachable_again", peer=link.name, role=link.role,
                            unreachable_s=round(time.monotonic() - link.unreachable_since_s, 3))
            link.unreachable_since_s, link.outage_reported = None, False
            try:
                self.apply(self.core.on_link_up(link.name, time.monotonic()))
                await self._read_link(link, stream)
            finally:
                link.stream = None
                self._stop_stream(link)
                self.core.on_link_down(link.name)
                await stream.close()
                log.info("peer_disconnected", peer=link.name)
            await asyncio.sleep(aio.RECONNECT_BACKOFF_S[0])

    def _on_connect_failure(self, link: PeerLink, error: BaseException) -> None:
        """A connection attempt to a voter failed: STATUS lists it as unreachable from the first
        failure; the log says so at warning level once the outage lasts UNREACHABLE_WARNING_S (a
        peer starting a moment later, or restarting, is no outage), once per outage."""
        now = time.monotonic()
        if link.unreachable_since_s is None:
            link.unreachable_since_s, link.unreachable_since_wall_s = now, time.time()
        link.last_error = repr(error)[:200]
        if not link.outage_reported and now - link.unreachable_since_s >= UNREACHABLE_WARNING_S:
            link.outage_reported = True
            log.warning("peer_unreachable", peer=link.name, role=link.role, address=topology.format_address(link.address),
                        unreachable_s=round(now - link.unreachable_since_s, 3), error=link.last_error,
                        consequence=f"this replica cannot count on the {link.role}'s vote or lease grant")

    def _unreachable(self, now: float) -> dict[str, dict]:
        """STATUS's UNREACHABLE: each voter this replica cannot connect to now, since when and why."""
        return {
            link.name: {"ROLE": link.role, "ADDRESS": topology.format_address(link.address),
                        "SINCE": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(link.unreachable_since_wall_s)),
                        "FOR_S": round(now - link.unreachable_since_s, 3), "ERROR": link.last_error}
            for link in self.links.values() if link.unreachable_since_s is not None
        }

    async def _read_link(self, link: PeerLink, stream: aio.MessageStream) -> None:
        core = self.core
        while True:
            batch = await stream.read_batch()
            if batch is None:
                return
            for message in batch:
                if isinstance(message, SaldoError):
                    log.warning("bad_line_from_peer", peer=link.name, error=message.code, detail=message.detail)
                    continue
                try:
                    self._on_link_message(link, message)
                except SaldoError as error:
                    log.warning("bad_message_from_peer", peer=link.name, error=error.code, detail=error.detail,
                                task=str(message.get("TASK"))[:40])
                if stream.closed:
                    return
            if core.primary is None and self.waiting:
                self.flush_replies()

    def _on_link_message(self, link: PeerLink, message: dict) -> None:
        core = self.core
        now = time.monotonic()
        task = message.get("TASK")
        if task == "ACK":
            self.apply(core.on_ack(link.name, int_field(message, "EPOCH", 1), int_field(message, "SEQ"), now))
        elif task == "LEASE_REPLY":
            reply = parse_lease_reply(message, core.voter_set)
            if reply.voter != link.name:
                raise SaldoError("FIELD_INVALID", f"a reply from {reply.voter} on the link to {link.name}")
            self.apply(core.on_lease_reply(reply, now))
            if self.waiting:
                self.flush_replies()  # a renewed lease may release held replies
        elif task == "VOTE_REPLY":
            reply = parse_vote_reply(message, core.voter_set)
            if reply.voter != link.name:
                raise SaldoError("FIELD_INVALID", f"a reply from {reply.voter} on the link to {link.name}")
            self.apply(core.on_vote_reply(reply, now))
        elif task == "POSITION":
            if member_field(message, "REPLICA", core.replica_set) != link.name:
                raise SaldoError("FIELD_INVALID", "POSITION names another replica")
            position = Position(int_field(message, "LAST_EPOCH"), int_field(message, "LAST_SEQ"))
            durable_seq = int_field(message, "DURABLE_SEQ", 0, position.seq)
            diverged = message.get("DIVERGED", False) is True
            epoch = int_field(message, "EPOCH", 1)
            session = int_field(message, "SESSION", 1)
            plan = core.on_position(link.name, epoch, session, position, durable_seq, diverged, now)
            if plan is not None:
                kind, why = plan
                log.info("backup_catch_up", backup=link.name, plan=kind, why=why, backup_seq=position.seq,
                         backup_entry_epoch=position.epoch, log_start_seq=core.log.base.seq + 1, last_seq=core.log.last_seq)
                self._start_catch_up(link, kind, position.seq)
        elif message.get("STATUS") == "NOK":
            if message.get("ERROR") == "STALE_EPOCH":
                promised = message.get("PROMISED_EPOCH")
                if type(promised) is int:
                    self.apply(core.on_stale(promised, now))
            else:
                log.warning("peer_refused", peer=link.name, error=message.get("ERROR"), detail=str(message.get("DETAIL"))[:200])
        elif task not in PEER_REPLY_TASKS:
            raise SaldoError("UNKNOWN_MESSAGE", "unexpected message on a link this replica opened")

    # --- The peer port (this replica as voter and backup) ---------------------------------------
    async def handle_peer(self, stream: aio.MessageStream) -> None:
        if not self.peer_check.admits(stream):
            await self.peer_check.answer_stranger(stream, self.status)
            return
        reader: SnapshotReader | None = None
        try:
            while True:
                lines = await stream.read_lines()
                if lines is None:
                    return
                applied = False
                for line in lines:
                    # The stream's APPENDs in canonical form are parsed by regular expressions (the
                    # hot path); any other line is decoded and parsed in full.
                    canonical = parse_append_line(line) if line.startswith(b'{"TASK":"APPEND"') else None
                    if canonical is not None:
                        try:
                            applied = self._on_append(stream, *canonical) or applied
                        except SaldoError as error:
                            self._refuse(stream, error, None)
                        if stream.closed:
                            return
                        continue
                    try:
                        message = wire.decode_line(line)
                    except SaldoError as error:
                        stream.send(error_reply(error.code, error.detail))
                        continue
                    if message is None:
                        continue
                    request_id = message.get("ID") if type(message.get("ID")) in (str, int) else None
                    task = message.get("TASK")
                    try:
                        if task == "APPEND":
                            applied = self._on_append(stream, parse_append(message), None) or applied
                        elif task in ("SNAPSHOT_BEGIN", "SNAPSHOT_ACCOUNTS", "SNAPSHOT_APPLIED", "SNAPSHOT_END"):
                            if task == "SNAPSHOT_BEGIN":
                                if stream is not self.primary_stream:
                                    raise SaldoError("STALE_EPOCH", "a state transfer outside the current primary's session")
                                reader = SnapshotReader()
                                self.core.installing = True
                            elif reader is None:
                                raise SaldoError("FIELD_INVALID", "SNAPSHOT_BEGIN first")
                            reader.feed(message)
                            if reader.done:
                                done, reader = reader, None
                                await self._install_snapshot(stream, done)
                        else:
                            self._on_peer_request(stream, message, request_id)
                    except SaldoError as error:
                        self._refuse(stream, error, request_id)
                        if type(task) is str and task.startswith("SNAPSHOT"):
                            reader = None  # a damaged state transfer is dropped whole
                            self.core.installing = False
                    if stream.closed:
                        return
                if applied:
                    self._watch_durable()
                if not await stream.drain():
                    return
        finally:
            if stream is self.primary_stream:
                self.primary_stream = None
                self.session_synced = False
            if reader is not None:
                self.core.installing = False

    def _refuse(self, stream: aio.MessageStream, error: SaldoError, request_id: object) -> None:
        if error.code == "STALE_EPOCH":
            self.stale_refused += 1
            stream.send(stale_epoch_reply(self.core.voter.record.promised_epoch, error.detail, request_id))
        else:
            stream.send(error_reply(error.code, error.detail, request_id))

    def _on_peer_request(self, stream: aio.MessageStream, message: dict, request_id: object) -> None:
        core = self.core
        now = time.monotonic()
        task = message.get("TASK")
        if task == "LEASE":
            request = parse_lease_request(message, core.replica_set)
            reply, effects = core.on_lease_request(request, request_id, now)
            self.apply(effects, stream, reply)
        elif task in ("VOTE", "PRE_VOTE"):
            request = parse_vote_request(message, core.replica_set)
            reply, effects = core.on_vote_request(request, request_id, now)
            if reply["GRANTED"] and not request.pre:
                log.info("voted", epoch=request.epoch, candidate=request.candidate)
            self.apply(effects, stream, reply)
        elif task == "CAUGHT_UP":
            if stream is not self.primary_stream or self.diverged:
                raise SaldoError("STALE_EPOCH", "CAUGHT_UP outside the current primary's session")
            epoch, seq = int_field(message, "EPOCH", 1), int_field(message, "SEQ")
            if epoch != core.following_epoch:
                raise SaldoError("STALE_EPOCH", f"this replica follows epoch {core.following_epoch}")
            if seq != core.log.last_seq:
                raise SaldoError("FIELD_INVALID", f"CAUGHT_UP at seq {seq}; this log ends at {core.log.last_seq}")
            self.session_synced = True
        elif task == "HELLO":
            epoch = int_field(message, "EPOCH", 1)
            session = int_field(message, "SESSION", 1)
            primary = member_field(message, "PRIMARY", core.replica_set)
            reply, effects = core.on_hello(epoch, session, primary, address_field(message, "CLIENT_ADDRESS"), now)
            if reply.get("TASK") == "POSITION":
                if self.diverged:
                    reply["DIVERGED"] = True
                reply["DURABLE_SEQ"] = min(core.durable_seq, reply["LAST_SEQ"])
                if self.primary_stream is not None and self.primary_stream is not stream:
                    self.primary_stream.abort()  # an older session: nothing more is taken from it
                self.primary_stream = stream
                self.session_synced = False
                log.info("following", primary=primary, epoch=epoch, last_seq=reply["LAST_SEQ"],
                         last_entry_epoch=reply["LAST_EPOCH"])
            self.apply(effects, stream, reply)
        elif task == "STATUS":
            stream.send(self.status(request_id))
        elif task in BANK_TASKS or "tipo" in message:
            raise SaldoError("WRONG_ROLE", "this is the peer port; send bank operations to the client port")
        elif task in PEER_REPLY_TASKS:
            raise SaldoError("WRONG_ROLE", f"{task} answers a request this replica did not send on this connection")
        else:
            raise classify_unknown(message)

    def _on_append(self, stream: aio.MessageStream, append: Append, texts: list[str] | None) -> bool:
        """Apply a batch of the primary's entries in order (`texts`: their text as received, if
        known). True if something was applied."""
        if stream is not self.primary_stream or self.diverged:
            raise SaldoError("STALE_EPOCH", "entries outside the current primary's session")
        core = self.core
        dbank = self.dbank
        if dbank.replacing:
            # A new session's entries while an earlier session's state transfer installs: they
            # follow a position this replica is about to leave. Drop the link; the primary's next
            # HELLO learns the position after the install.
            log.warning("append_during_install_dropping_link", from_seq=append.from_seq)
            stream.abort()
            return False
        core.check_append(append)
        bank = dbank.bank
        seq = append.from_seq
        entry_epoch = append.entry_epoch
        record_entry = core.record_entry
        for index, (op, error) in enumerate(append.entries):
            outcome, duplicate = dbank.apply(op, seq)
            if duplicate or outcome.error != error or bank.counters.ops_applied_total != seq:
                # The same operations in the same order must decide the same outcomes: this state
                # cannot be trusted any more. Stop taking entries; the next HELLO asks for a snapshot.
                self.divergences += 1
                self.diverged = True
                log.error("divergence_detected", seq=seq, op_id=op.op_id, duplicate=duplicate,
                          primary_outcome=error or "OK", own_outcome=outcome.error or "OK")
                stream.abort()
                return False
            record_entry(seq, entry_epoch, texts[index] if texts is not None else entry_text(op, error))
            seq += 1
        dbank.set_meta("last_applied_seq", seq - 1)
        dbank.set_meta("last_entry_epoch", entry_epoch)
        self.session_synced = True
        return True

    def _send_ack(self) -> None:
        stream = self.primary_stream
        core = self.core
        if stream is None or stream.closed or not self.session_synced or core.following_epoch == 0:
            return
        stream.send_bytes(ack_line(core.following_epoch, min(core.durable_seq, core.log.last_seq)))

    async def _install_snapshot(self, stream: aio.MessageStream, reader: SnapshotReader) -> None:
        core = self.core
        dbank = self.dbank
        try:
            bank = dbank.bank
            image = reader.image(max_accounts=bank.max_accounts, dedup_window_ops=bank.dedup_window_ops)
            seq = image.meta.get("last_applied_seq")
            entry_epoch = image.meta.get("last_entry_epoch")
            if type(seq) is not int or type(entry_epoch) is not int or seq != image.counters.ops_applied_total or entry_epoch < 0:
                raise SaldoError("FIELD_INVALID", "snapshot: last_applied_seq must equal the operations applied")
            # What this replica applied that the new state does not hold: a former primary's
            # operations that no new primary ever had. Logged, so a lost acknowledgement is traceable.
            kept = {applied.op.op_id for applied in image.recent}
            first_kept = image.recent[0].apply_index if image.recent else seq + 1
            discarded = [a.op.op_id for a in bank.recent_applied() if a.op.op_id not in kept and a.apply_index >= first_kept]
            image.meta = {"last_applied_seq": seq, "last_entry_epoch": entry_epoch,
                          **record_to_meta(core.voter.record, core.replicas)}
            previous = core.position
            await dbank.replace(image)
            core.on_snapshot_installed(Position(entry_epoch, seq))
            # The log restarts at `seq`, possibly below where it was: watch the disk from there.
            self._durable_watched = seq
        finally:
            core.installing = False
        self.snapshots_installed += 1
        self.diverged = False
        self.discarded_ops_total += len(discarded)
        log.info("snapshot_installed", seq=seq, entry_epoch=entry_epoch, previous_seq=previous.seq,
                 previous_entry_epoch=previous.epoch, accounts=len(image.balances), discarded_ops=len(discarded))
        for start in range(0, min(len(discarded), MAX_DISCARDED_IDS_LOGGED), 100):
            log.info("discarded_op_ids", ids=",".join(discarded[start : start + 100]))
        if stream is self.primary_stream:
            self.session_synced = True
            self._send_ack()

    # --- Time -----------------------------------------------------------------------------------
    async def tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            core = self.core
            was_primary = core.primary is not None
            now = time.monotonic()
            self.apply(core.tick(now))
            if was_primary and self.waiting:
                self.flush_replies()
            primary = core.primary
            if primary is not None and self.pending_replies and now - primary.lease.expiry_s() > LEASE_LOST_GRACE_S:
                # Cut off from the majority (or too slow to renew): clients should not wait for an
                # answer that may never come; they retry elsewhere with the same id.
                self._fail_unacknowledged("the primary's lease ran out before the operation was acknowledged"
                                          " (it may be cut off from the majority); retry with the same id")

    async def ship_periodically(self, stop: asyncio.Event) -> None:
        """Async mode: the stream goes out in batches, every replication_interval_s."""
        interval_s = self.core.timing.replication_interval_s
        while not stop.is_set():
            await asyncio.sleep(interval_s)
            self.ship()

    def status(self, request_id: object = None) -> dict:
        core = self.core
        now = time.monotonic()
        reply = {"ID": request_id} if request_id is not None else {}
        reply.update({
            "STATUS": "OK",
            "NODE": self.args.name,
            "MODE": "primary-backup",
            "REPLICATION": core.mode,
            "PID": os.getpid(),
            "UPTIME_S": round(now - self.started_at, 3),
            **core.status(now),
            **self.dbank.status_fields(),
            "LINKS": sorted(name for name, link in self.links.items() if link.stream is not None),
            "UNREACHABLE": self._unreachable(now),
            "SNAPSHOTS_INSTALLED": self.snapshots_installed,
            "SNAPSHOTS_SENT": self.snapshots_sent,
            "DISCARDED_OPS_TOTAL": self.discarded_ops_total,
            "DIVERGENCES": self.divergences,
            "STALE_MESSAGES_REFUSED": self.stale_refused,
            "PENDING_REPLIES": self.pending_replies,
            "REQUESTS_TOTAL": self.requests_total,
            **aio.process_figures(),
        })
        return reply


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    dbank = await open_durable_bank(args)
    replicas = sorted(args.replica_peers)
    meta = dbank.meta
    applied = dbank.bank.counters.ops_applied_total
    if meta.get("last_applied_seq", applied) != applied:
        log.error("store_position_inconsistent", last_applied_seq=meta.get("last_applied_seq"), ops_applied_total=applied)
        return 1
    try:
        record = record_from_meta(meta, replicas)
    except ValueError as error:
        log.error("store_voter_record_unreadable", error=str(error))
        return 1
    position = Position(meta.get("last_entry_epoch", 0), applied)
    core = ReplicaCore(
        args.name, replicas, sorted(args.witness_peers), mode=args.replication, timing=args.timing, record=record,
        position=position, now_s=time.monotonic(), client_address=args.advertise, max_log_entries=args.max_log_entries,
    )
    log.info("replica_starting", replication=args.replication, epoch=record.promised_epoch, last_seq=position.seq,
             last_entry_epoch=position.epoch, voters=",".join(core.voters), lease_duration_s=args.timing.lease_duration_s)
    node = PBReplica(args, dbank, core)
    clients = await aio.start_server(node.handle_client, args.host, args.port, name="pb-clients",
                                     max_connections=args.max_connections)
    peers = await aio.start_server(node.handle_peer, args.host, args.peer_port, name="pb-peers", max_line_bytes=PEER_LINE_BYTES)
    tasks = [asyncio.create_task(aio.keep_running(link.name, partial(node.maintain_link, link, stop), stop))
             for link in node.links.values()]
    tasks.append(asyncio.create_task(aio.keep_running("tick", partial(node.tick, stop), stop)))
    if args.replication == ASYNC:
        tasks.append(asyncio.create_task(aio.keep_running("ship", partial(node.ship_periodically, stop), stop)))
    await stop.wait()
    log.info("stopping", role=core.role, epoch=core.epoch, last_seq=core.log.last_seq)
    await clients.stop()
    await peers.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for link in node.links.values():
        node._stop_stream(link)
    # Let the handlers of the connections just aborted see it and return (bounded): a handler
    # still running when the loop closes is cancelled and reported as an error.
    for _ in range(50):
        if not clients.streams and not peers.streams:
            break
        await asyncio.sleep(0.01)
    await dbank.close()
    return 0
