"""A replica fed numbered operations in order: `replica.py --mode sequencer` and `--mode queue`.

Owns the replica's I/O in the two architectures whose replicas apply a central, numbered stream:
- sequencer: the replica connects to the sequencer's replica port (6003);
- queue: the RPC server connects to the replica's queue port (6001) and says FEED.
Either way the replica SUBSCRIBEs with its last applied number, takes ORDERED entries in and sends
APPLIED acknowledgements out. Its own port also serves reads that name the sequence number they must
see (MIN_SEQ), STATUS, and SNAPSHOT for a peer that needs a state transfer.

Entries are delivered in order by SequencedReplicaCore and applied to a DurableBank in batches; the
last applied sequence number is written in the same transaction as the balances, and APPLIED (with
the results the sequencer relays to clients) goes out as soon as a batch is applied, before its
commit lands; the store is synced to stable storage once every --sync-interval-ms, not at every
commit. Both are safe because the orderer's log is the durable record of every operation and keeps
each entry until every replica reports it SYNCED: a replica that lost applied entries (a crash
before the commit, a power loss before the sync) subscribes from what its disk kept and is sent the
rest again, and applying is deterministic: the same outcomes. A read that names MIN_SEQ waits
until that much is committed here. When the sequencer says SNAPSHOT_NEEDED, the replica copies a
peer's state (common/storage/snapshot.py) and subscribes again from there.
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
from common.bank.replies import classify_unknown
from common.bank.state import DEPOSIT, TRANSFER, WITHDRAW, AccountsQuery, Query, parse_replica_request, read_reply
from common.log import get_logger
from common.sequencer.core import (
    MAX_RESULTS_PER_ACK,
    MIN_SEQ_WAIT_S,
    SequencedReplicaCore,
    applied_line,
    parse_entry,
    parse_entry_line,
)
from common.storage.durable import DurableBank
from common.storage.replica_store import add_store_flags, open_durable_bank, prepare_store
from common.storage.snapshot import SnapshotReader, image_to_lines
from common.transport import aio, wire
from common.transport.peers import PeerCheck, resolve, source_address

log = get_logger("seqreplica")

MAX_WAITING_READS = 10_000
TICK_S = 0.25
SNAPSHOT_TIMEOUT_S = 60.0
SEQUENCER_LINE_BYTES = 1024 * 1024
WRITE_TASKS = frozenset({DEPOSIT, WITHDRAW, TRANSFER})
# Outcomes of operations delivered again under a new seq (a retry the orderer numbered again):
# the dedup window holds each operation's first seq only, so a replica that becomes the results
# source resends these from here. Renumbering is rare; the latest ones are enough.
MAX_RECENT_DUPLICATES = 4_096
# How a subscription ended; after REPLACED (another process subscribed under this replica's name),
# the replica waits this long before it subscribes again.
SUBSCRIPTION_LOST, SUBSCRIPTION_NEEDS_SNAPSHOT, SUBSCRIPTION_REPLACED = "lost", "snapshot", "replaced"
REPLACED_BACKOFF_S = 5.0
# The store is flushed at most once in this interval (one fsync, instead of one per commit); the
# orderer's log holds what is not synced yet.
DEFAULT_SYNC_INTERVAL_MS = 50


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int,
                        help="port for reads, STATUS, SNAPSHOT and (queue mode) the server's FEED (default 6007; queue 6001)")
    # Each mode lists only the flags it uses (the other stays accepted, so a topology entry may carry it).
    parser.add_argument("--sequencer", default="127.0.0.1:6003",
                        help="the sequencer's replica port, HOST:PORT (default 127.0.0.1:6003)" if mode == "sequencer"
                        else argparse.SUPPRESS)
    parser.add_argument("--peers", default="", help="other replicas' ports (host:port,...), for state transfer: fetched from them, "
                             "and given only to their hosts (none without --peers)")
    parser.add_argument("--peer-hosts", default="",
                        help="hosts the RPC server's FEED may come from, comma-separated (default: any host, "
                             "with a warning; see common/transport/peers.py)" if mode == "queue" else argparse.SUPPRESS)
    parser.add_argument("--sync-interval-ms", type=int, default=DEFAULT_SYNC_INTERVAL_MS,
                        help="sync the store to disk at most this often; the orderer's log keeps what is not synced "
                             f"(0: at every commit; default {DEFAULT_SYNC_INTERVAL_MS})")
    add_store_flags(parser)


def prepare(args: argparse.Namespace) -> None:
    if not 0 <= args.sync_interval_ms <= 60_000:
        raise SystemExit("replica.py: --sync-interval-ms must be in [0, 60000]")
    if args.port is None:
        args.port = topology.DEFAULT_PORTS["queue_replica" if args.mode == "queue" else "sequencer_replica_client"]
    if args.name is None:
        args.name = f"replica-{args.port}"
    prepare_store(args)


class SequencedReplica:
    def __init__(self, args: argparse.Namespace, dbank: DurableBank) -> None:
        self.args = args
        self.dbank = dbank
        dbank.on_synced = self._report_synced  # a flush of the store ended: the log may forget more
        last = dbank.meta.get("last_applied_seq", 0)
        self.core = SequencedReplicaCore(last_delivered_seq=last)
        self.committed_seq = last  # applied and committed (it survives a crash of this process)
        self.reported_synced_seq = last  # the SYNCED the orderer was last told on this connection
        self.sequencer_stream: aio.MessageStream | None = None
        # Queue mode: one FEED session (or the state transfer it led to) at a time; a newer FEED
        # waits for the one before it, and the latest one wins.
        self.feed_lock = asyncio.Lock()
        self.latest_feed: aio.MessageStream | None = None
        self.send_results = False  # the sequencer chose this replica to send outcomes
        self.recent_duplicates: deque = deque(maxlen=MAX_RECENT_DUPLICATES)  # (seq, error, balance_cents)
        self.read_waiters: deque = deque()  # (min_seq, deadline, stream, request_id, query)
        self.started_at = time.monotonic()
        self.snapshots_installed = 0
        self.entries_received = 0
        self.peers = [topology.parse_address(p) for p in args.peers.split(",") if p.strip()]
        self.sequencer_address = topology.parse_address(args.sequencer)
        self.source_host = source_address(args.host)  # where this replica connects from
        # Queue mode: who may FEED this replica (the port also serves reads to anyone).
        self.feeders = PeerCheck.from_flag(args.peer_hosts, role="queue replica") if args.mode == "queue" else None
        # Who may take a SNAPSHOT (every balance and the applied history): the replicas named in
        # --peers, the only ones that fetch one from here. Without --peers, no one.
        self.snapshot_takers = PeerCheck(resolve([host for host, _port in self.peers]), role="replica", flag="--peers")

    # --- The sequencer link ---------------------------------------------------------------------
    async def follow_sequencer(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            stream = await aio.connect_with_backoff(
                self.sequencer_address, stop, max_line_bytes=SEQUENCER_LINE_BYTES, peer="sequencer",
                source_host=self.source_host,
            )
            if stream is None:
                return
            self.sequencer_stream = stream
            try:
                ended = await self._run_subscription(stream)
            finally:
                self.sequencer_stream = None
                await stream.close()
            if ended == SUBSCRIPTION_NEEDS_SNAPSHOT:
                await self._state_transfer(stop)
            elif ended == SUBSCRIPTION_REPLACED:
                # Another process subscribed under this name: taking the place back at once would
                # make the two push each other out without end.
                try:
                    async with asyncio.timeout(REPLACED_BACKOFF_S):
                        await stop.wait()
                except TimeoutError:
                    pass

    async def _run_subscription(self, stream: aio.MessageStream) -> str:
        """Until the connection ends: how it ended (SUBSCRIPTION_*)."""
        await self.dbank.flush(sync=True)  # subscribe from what is on stable storage
        stream.send({"TASK": "SUBSCRIBE", "REPLICA": self.args.name, "LAST_APPLIED_SEQ": self.core.last_delivered_seq})
        self.reported_synced_seq = self.core.last_delivered_seq  # synced just now: the orderer counts it so
        log.info("subscribed", mode=self.args.mode, last_applied_seq=self.core.last_delivered_seq)
        while True:
            lines = await stream.read_lines()
            if lines is None:
                log.info("sequencer_connection_lost", last_applied_seq=self.core.last_delivered_seq)
                return SUBSCRIPTION_LOST
            entries = []
            for line in lines:
                entry = parse_entry_line(line)  # the canonical form: one regular expression
                if entry is not None:
                    entries.append(entry)
                    continue
                try:
                    message = wire.decode_line(line)
                except SaldoError as error:
                    log.warning("bad_line_from_sequencer", error=error.code, detail=error.detail)
                    # Answered like bad input at any port. (The orderer answers a NOK with one, which
                    # this loop only logs: no exchange of errors without end.)
                    stream.send(error_reply(error.code, error.detail))
                    continue
                if message is None:
                    continue
                task = message.get("TASK")
                if task == "ORDERED":
                    try:
                        entries.append(parse_entry(message))
                    except SaldoError as error:
                        log.warning("bad_entry_from_sequencer", error=error.code, detail=error.detail)
                        stream.send(error_reply(error.code, error.detail))
                elif task == "SUBSCRIBED":
                    self.send_results = message.get("SEND_RESULTS") is True
                    if self.send_results and type(message.get("RESULTS_FROM_SEQ")) is int:
                        # Outcomes clients may still await, of what this replica already applied.
                        self._become_results_source(stream, message["RESULTS_FROM_SEQ"])
                elif task == "SEND_RESULTS":
                    if entries:  # what arrived before this message is applied first
                        self._deliver(entries)
                        entries = []
                    self._become_results_source(stream, message.get("FROM_SEQ"))
                elif task == "STOP_RESULTS":  # this replica stalled; another one sends the outcomes now
                    if entries:
                        self._deliver(entries)
                        entries = []
                    self.send_results = False
                    log.info("results_source_no_longer")
                elif task == "SNAPSHOT_NEEDED":
                    log.warning("snapshot_needed", last_applied_seq=self.core.last_delivered_seq,
                                log_start_seq=message.get("LOG_START_SEQ"))
                    if entries:
                        self._deliver(entries)
                    return SUBSCRIPTION_NEEDS_SNAPSHOT
                elif task == "REPLACED":
                    log.error("replaced_by_another_subscriber", replica=self.args.name, detail=message.get("DETAIL"),
                              hint="two replicas share this --name?", retry_in_s=REPLACED_BACKOFF_S)
                    if entries:
                        self._deliver(entries)
                    return SUBSCRIPTION_REPLACED
                elif message.get("STATUS") == "NOK":
                    log.warning("sequencer_refused", error=message.get("ERROR"), detail=message.get("DETAIL"))
            if entries:
                self.entries_received += len(entries)
                self._deliver(entries)

    def _deliver(self, entries) -> None:
        deliver, resend = self.core.on_entries(entries, time.monotonic())
        if resend is not None:
            self._ask_resend(resend)
        if not deliver:
            return
        dbank = self.dbank
        results = []
        for seq, op in deliver:
            outcome, duplicate = dbank.apply(op, seq)
            result = (seq, outcome.error, outcome.balance_cents)
            results.append(result)
            if duplicate:
                self.recent_duplicates.append(result)
        upto = deliver[-1][0]
        dbank.set_meta("last_applied_seq", upto)
        # Acknowledged before the commit lands: the outcome is fixed by the log's order, and the log
        # keeps these entries until this replica reports them SYNCED. A crash before the commit
        # loses them here only; the replica subscribes from its store and applies them again, to
        # the same outcomes. A read naming MIN_SEQ still waits for the commit (see _read).
        self._acknowledge(upto, results)
        dbank.durable().add_done_callback(lambda _done: self._on_committed(upto))

    @property
    def synced_seq(self) -> int:
        return self.dbank.synced_meta.get("last_applied_seq", 0)

    def _acknowledge(self, upto: int, results) -> None:
        stream = self.sequencer_stream
        if stream is None:
            return
        synced = self.synced_seq
        if self.send_results:
            for start in range(0, len(results), MAX_RESULTS_PER_ACK):
                chunk = results[start : start + MAX_RESULTS_PER_ACK]
                upto_chunk = chunk[-1][0]
                stream.send_bytes(applied_line(upto_chunk, chunk, min(synced, upto_chunk)))
        else:
            stream.send_bytes(applied_line(upto, [], synced))
        stream.flush()  # out now: the commit this batch scheduled runs next, and takes a while
        self.reported_synced_seq = max(self.reported_synced_seq, synced)

    def _on_committed(self, upto: int) -> None:
        self.committed_seq = max(self.committed_seq, upto)
        self._answer_reads()
        self._report_synced()  # the commit may have been a synced one (no sync interval)

    def _report_synced(self) -> None:
        """Tell the orderer how far this store is on disk, when that moved since the last
        acknowledgement said (an acknowledgement leaves before its own commit lands)."""
        synced = self.synced_seq
        stream = self.sequencer_stream
        if stream is None or synced <= self.reported_synced_seq:
            return
        stream.send_bytes(applied_line(self.core.last_delivered_seq, [], synced))
        self.reported_synced_seq = synced

    def _become_results_source(self, stream: aio.MessageStream, from_seq: object) -> None:
        """The results source went away: send the outcomes of what this replica already applied
        from `from_seq` on (they are in the dedup window), then send outcomes with every ack."""
        self.send_results = True
        if type(from_seq) is not int or from_seq < 1:
            return
        applied_seq = self.core.last_delivered_seq
        results = []
        for applied in self.dbank.bank.recent_applied(newest_first=True):
            if applied.seq is None or applied.seq < from_seq:
                break
            if applied.seq <= applied_seq:
                results.append((applied.seq, applied.outcome.error, applied.outcome.balance_cents))
        results.extend(result for result in self.recent_duplicates if from_seq <= result[0] <= applied_seq)
        results.sort(key=lambda result: result[0])
        log.info("became_results_source", from_seq=from_seq, outcomes_resent=len(results))
        for start in range(0, len(results), MAX_RESULTS_PER_ACK):
            chunk = results[start : start + MAX_RESULTS_PER_ACK]
            stream.send_bytes(applied_line(applied_seq, chunk, min(self.synced_seq, applied_seq)))

    def _ask_resend(self, seq_range: tuple[int, int]) -> None:
        stream = self.sequencer_stream
        if stream is not None:
            log.info("gap_detected_asking_resend", from_seq=seq_range[0], to_seq=seq_range[1])
            stream.send({"TASK": "RESEND", "FROM": seq_range[0], "TO": seq_range[1]})

    async def tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            resend = self.core.on_tick(time.monotonic())
            if resend is not None:
                self._ask_resend(resend)
            self._expire_reads()
            self.dbank.start_sync_if_due()  # what a quiet period left unsynced (see on_synced)

    @staticmethod
    def _check_feed(message: dict) -> None:
        """A malformed FEED is refused (an error reply) before it can displace the server's feed."""
        if type(message.get("REPLICA")) is not str or type(message.get("SERVER")) is not str:
            raise SaldoError("FIELD_TYPE", "FEED needs SERVER and REPLICA (names)")

    async def _be_fed(self, stream: aio.MessageStream) -> None:
        """Queue mode: the server connected and said FEED; this connection carries the queue. The
        server reconnects whenever it lost its feed, also while this replica is still busy with a
        state transfer: such a FEED waits for it (nothing may be applied while an image is being
        installed, and one transfer at a time is enough), and only the latest FEED goes on."""
        self.latest_feed = stream
        previous = self.sequencer_stream
        if previous is not None:
            log.info("feed_replaced")
            previous.abort()
        async with self.feed_lock:
            if self.latest_feed is not stream or stream.closed:
                log.info("feed_superseded")
                await stream.close()
                return
            self.sequencer_stream = stream
            try:
                ended = await self._run_subscription(stream)
            finally:
                if self.sequencer_stream is stream:
                    self.sequencer_stream = None
            if ended == SUBSCRIPTION_NEEDS_SNAPSHOT:
                await stream.close()  # the server reconnects; that FEED waits for the transfer
                await self._state_transfer(asyncio.Event())

    # --- State transfer -------------------------------------------------------------------------
    async def _state_transfer(self, stop: asyncio.Event) -> None:
        for host, port in self.peers:
            if stop.is_set():
                return
            try:
                image = await asyncio.wait_for(self._fetch_snapshot(host, port), SNAPSHOT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, SaldoError) as error:
                log.warning("snapshot_from_peer_failed", peer=f"{host}:{port}", error=repr(error))
                continue
            seq = image.meta.get("last_applied_seq", 0)
            if seq <= self.core.last_delivered_seq:
                log.info("snapshot_not_newer", peer=f"{host}:{port}", peer_seq=seq, own_seq=self.core.last_delivered_seq)
                continue
            try:
                await self.dbank.replace(image)
            except Exception as error:
                # The install is one transaction, rolled back: disk and memory still hold the state
                # from before. Another peer, or a later attempt, may do better.
                log.error("snapshot_install_failed", peer=f"{host}:{port}", error=repr(error)[:300])
                continue
            self.core.reset(seq)
            self.committed_seq = seq
            self.snapshots_installed += 1
            log.info("snapshot_installed", peer=f"{host}:{port}", last_applied_seq=seq,
                     accounts=len(image.balances), applied_ops=len(image.recent))
            self._answer_reads()
            return
        log.warning("no_peer_gave_a_snapshot", peers=len(self.peers))
        await asyncio.sleep(1.0)

    async def _fetch_snapshot(self, host: str, port: int):
        # From this replica's own address: the peer admits SNAPSHOT from the hosts in its --peers.
        stream = await aio.open_stream((host, port), max_line_bytes=wire.MAX_LINE_BYTES, peer=f"{host}:{port}",
                                       source_host=self.source_host)
        try:
            stream.send({"TASK": "SNAPSHOT", "ID": f"snapshot-{self.args.name}"})
            reader = SnapshotReader()
            while not reader.done:
                batch = await stream.read_batch()
                if batch is None:
                    raise SaldoError("CONNECTION_LOST", "the peer closed during the snapshot")
                for message in batch:
                    if isinstance(message, SaldoError):
                        raise message
                    if message.get("STATUS") == "NOK":
                        raise SaldoError("UNAVAILABLE", f"peer refused: {message.get('ERROR')}")
                    reader.feed(message)
            bank = self.dbank.bank
            return reader.image(max_accounts=bank.max_accounts, dedup_window_ops=bank.dedup_window_ops)
        finally:
            await stream.close()

    async def _serve_snapshot(self, stream: aio.MessageStream, request_id: object) -> None:
        image = self.dbank.snapshot()
        await self.dbank.durable()  # send only what is on disk here
        log.info("snapshot_serving", last_applied_seq=image.meta.get("last_applied_seq", 0),
                 accounts=len(image.balances), applied_ops=len(image.recent))
        for line in image_to_lines(image, request_id):
            stream.send_bytes(line)
            if not await stream.drain():
                return

    # --- Clients: reads, STATUS, SNAPSHOT -------------------------------------------------------
    async def handle_client(self, stream: aio.MessageStream) -> None:
        while True:
            batch = await stream.read_batch()
            if batch is None:
                return
            for message in batch:
                if isinstance(message, SaldoError):
                    stream.send(error_reply(message.code, message.detail))
                    continue
                request_id = None
                try:
                    request_id = wire.request_id_of(message)
                    task = message.get("TASK")
                    if task == "STATUS":
                        stream.send(self.status(request_id))
                    elif task == "FEED" and self.args.mode == "queue":
                        self.feeders.check(stream, "FEED")
                        self._check_feed(message)
                        await self._be_fed(stream)
                        return
                    elif task == "SNAPSHOT":
                        self.snapshot_takers.check(stream, "SNAPSHOT")
                        await self._serve_snapshot(stream, request_id)
                    else:
                        if (type(task) is str and task in WRITE_TASKS) or (task is None and "tipo" in message):  # a write, however malformed
                            orderer = "sequencer" if self.args.mode == "sequencer" else "RPC server"
                            raise SaldoError("WRONG_ROLE", f"writes go to the {orderer}; a replica serves reads")
                        try:
                            request = parse_replica_request(message)
                        except SaldoError as error:
                            raise classify_unknown(message) if error.code == "UNKNOWN_MESSAGE" else error from None
                        assert isinstance(request, (Query, AccountsQuery)), request
                        self._read(stream, request_id, request)
                except SaldoError as error:
                    stream.send(with_id_msg(error_reply(error.code, error.detail, request_id), message))
            if not await stream.drain():
                return

    def _read(self, stream: aio.MessageStream, request_id: object, query: Query | AccountsQuery) -> None:
        min_seq = query.min_seq or 0
        if self.committed_seq >= min_seq:
            stream.send(self._read_reply(query, request_id))
            return
        if len(self.read_waiters) >= MAX_WAITING_READS:
            raise SaldoError("OVERLOADED", f"{len(self.read_waiters)} reads are waiting for sequence numbers")
        self.read_waiters.append((min_seq, time.monotonic() + MIN_SEQ_WAIT_S, stream, request_id, query))

    def _read_reply(self, query: Query | AccountsQuery, request_id: object) -> dict:
        # SEQ is what the balance reflects: every entry delivered so far. The commit may lag behind
        # (it only gates MIN_SEQ reads); what it has not written, the log gives back after a crash.
        return read_reply(self.dbank.bank, query, request_id, SEQ=self.core.last_delivered_seq)

    def _answer_reads(self) -> None:
        if not self.read_waiters:
            return
        keep = deque()
        for waiter in self.read_waiters:
            min_seq, _deadline, stream, request_id, query = waiter
            if self.committed_seq >= min_seq:
                stream.send(self._read_reply(query, request_id))
            else:
                keep.append(waiter)
        self.read_waiters = keep

    def _expire_reads(self) -> None:
        now = time.monotonic()
        keep = deque()
        for waiter in self.read_waiters:
            min_seq, deadline, stream, request_id, _query = waiter
            if deadline <= now:
                stream.send(error_reply("TOO_STALE", f"not yet at seq {min_seq} (at {self.committed_seq})", request_id))
            else:
                keep.append(waiter)
        self.read_waiters = keep

    def status(self, request_id: object = None) -> dict:
        reply = {"ID": request_id} if request_id is not None else {}
        reply.update({
            "STATUS": "OK",
            "NODE": self.args.name,
            "ROLE": "replica",
            "MODE": self.args.mode,
            "PID": os.getpid(),
            "UPTIME_S": round(time.monotonic() - self.started_at, 3),
            "LAST_APPLIED_SEQ": self.committed_seq,
            "SYNCED_SEQ": self.synced_seq,
            **self.dbank.status_fields(),
            # Fed by the sequencer (sequencer mode) or the RPC server (queue mode).
            ("CONNECTED_TO_SEQUENCER" if self.args.mode == "sequencer" else "CONNECTED_TO_SERVER"): self.sequencer_stream is not None,
            "SENDS_RESULTS": self.send_results,
            "ENTRIES_RECEIVED": self.entries_received,
            "GAPS_SEEN": self.core.gaps_seen,
            "HELD_ENTRIES": self.core.held_count,
            "SNAPSHOTS_INSTALLED": self.snapshots_installed,
            **aio.process_figures(),
        })
        return reply


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    dbank = await open_durable_bank(args, sync_interval_s=args.sync_interval_ms / 1000.0)
    replica = SequencedReplica(args, dbank)
    server = await aio.start_server(replica.handle_client, args.host, args.port, name="replica-clients")
    tasks = [asyncio.create_task(aio.keep_running("tick", partial(replica.tick, stop), stop))]
    if args.mode == "sequencer":
        tasks.append(asyncio.create_task(aio.keep_running("sequencer", partial(replica.follow_sequencer, stop), stop)))
    await stop.wait()
    log.info("stopping", last_applied_seq=replica.committed_seq, synced_seq=replica.synced_seq)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop()
    await dbank.close()
    return 0
