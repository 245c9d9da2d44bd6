"""The sequencer process (`sequencer.py`): SequencerCore on sockets, with its log on disk.

Owns the sequencer's I/O. Clients connect to the client port (6002) and send bank operations;
replicas connect to the replica port (6003), SUBSCRIBE, receive ORDERED entries and acknowledge
with APPLIED. The log is written by group commit on one thread: while one write (and its fsync) is
in flight, new operations are numbered and wait for the next write; only entries already durable
are broadcast. A replica that falls behind (its socket buffer fills) is switched from the live
stream to a catch-up sender that feeds it from the log at its own pace, so one slow replica never
holds the others back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from common import topology
from common.bank.errors import SaldoError, error_reply, with_id_msg
from common.bank.replies import classify_unknown
from common.bank.state import (
    DEFAULT_DEDUP_WINDOW_OPS,
    AccountsQuery,
    Operation,
    Query,
    parse_replica_request,
    parse_request_line,
)
from common.log import get_logger
from common.sequencer.core import (
    DEFAULT_MAX_LOG_ENTRIES,
    DEFAULT_MAX_WAITING_REQUESTS,
    WAIT_APPLIED,
    WAIT_MODES,
    SequencerCore,
    parse_applied,
    replicas_needed,
)
from common.sequencer.log import DEFAULT_SEGMENT_ENTRIES, SequencerLog
from common.storage.durable import EXIT_STORE_FAILURE
from common.transport import aio, wire
from common.transport.peers import PeerCheck, source_address

log = get_logger("sequencer")

# A live replica whose unsent bytes exceed this is moved to catch-up (fed from the log).
MAX_LIVE_BUFFER_BYTES = 16 * 1024 * 1024
CATCHUP_CHUNK_ENTRIES = 2_000
TRUNCATE_INTERVAL_S = 1.0
TRUNCATE_CHUNK_ENTRIES = 1_000  # entries dropped from memory per turn of the loop (about 0.3 ms)
RESULTS_WATCH_INTERVAL_S = 0.1
REPLICA_LINE_BYTES = 1024 * 1024  # APPLIED lines carry up to 4096 results
INLINE_LOG_WRITE_MAX_ENTRIES = 4
BANK_TASKS = frozenset({"DEPOSIT", "WITHDRAW", "TRANSFER", "BALANCE", "QUERY"})


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=topology.DEFAULT_PORTS["sequencer_client"], help="client port (default 6002)")
    parser.add_argument("--replica-port", type=int, default=topology.DEFAULT_PORTS["sequencer_replica"], help="replica port (default 6003)")
    parser.add_argument("--replicas", required=False, help="names of the replicas, comma-separated (e.g. replica1,replica2)")
    parser.add_argument("--peer-hosts", default="",
                        help="hosts the replicas connect from, comma-separated: others may not SUBSCRIBE "
                             "(default: any host, with a warning; see common/transport/peers.py)")
    parser.add_argument("--log-dir", help="directory of the log (default var/<name>-log)")
    add_log_flags(parser)


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the durable log and its bounds (the sequencer's and the queue server's)."""
    parser.add_argument("--max-log-entries", type=int, default=DEFAULT_MAX_LOG_ENTRIES,
                        help="entries kept for replicas that lag; one further behind recovers by state transfer")
    parser.add_argument("--segment-entries", type=int, default=DEFAULT_SEGMENT_ENTRIES)
    parser.add_argument("--max-waiting-requests", type=int, default=DEFAULT_MAX_WAITING_REQUESTS)
    parser.add_argument("--dedup-window", type=int, default=DEFAULT_DEDUP_WINDOW_OPS,
                        help="how many operation ids are remembered (with their seq) for retries: the replicas' "
                             f"--dedup-window (default {DEFAULT_DEDUP_WINDOW_OPS})")
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True,
                        help="fsync each log write (default on; off survives a process crash, not a power loss)")
    parser.add_argument("--max-connections", type=int, default=aio.MAX_CONNECTIONS)


def prepare(args: argparse.Namespace) -> None:
    if not args.replicas:
        raise SystemExit("sequencer.py: --replicas NAME[,NAME...] is required (the replicas that will subscribe)")
    if args.name is None:
        args.name = "sequencer"
    if args.log_dir is None:
        args.log_dir = f"var/{args.name}-log"


class ClientRef:
    """A waiting client whose request was not in saldo's own format (seed 002's Operacao, or an
    ID other than the operation id): its reply is re-encoded with what it expects."""

    __slots__ = ("stream", "request_id", "id_msg")

    def __init__(self, stream: aio.MessageStream, request_id: object, id_msg: object) -> None:
        self.stream = stream
        self.request_id = request_id
        self.id_msg = id_msg  # echoed as it came (None: none given)


class ReplicaLink:
    """The sequencer's side of one replica's connection."""

    def __init__(self, name: str, stream: aio.MessageStream, sent_upto: int) -> None:
        self.name = name
        self.stream = stream
        self.sent_upto = sent_upto
        self.live = False
        self.catchup_task: asyncio.Task | None = None


class SequencerNode:
    def __init__(self, args: argparse.Namespace, core: SequencerCore, seqlog: SequencerLog, *,
                 default_wait: str = WAIT_APPLIED, role: str = "sequencer") -> None:
        self.args = args
        self.default_wait = default_wait
        self.role = role
        self.core = core
        self.seqlog = seqlog
        self.loop = asyncio.get_running_loop()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqlog")
        # Deleting a segment takes milliseconds (the filesystem frees its blocks): on the writer's
        # thread it held up the log write behind it, once a second, by 10 to 18 ms under load.
        self.trim_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seqlog-trim")
        self.writing = False
        self.truncating = False
        self.links: dict[str, ReplicaLink] = {}
        self.closing_streams: set[asyncio.Future] = set()  # replaced links, closing (bounded by their timeout)
        self.started_at = time.monotonic()
        self.log_writes = 0
        self.source_host = source_address(args.host)  # the queue server connects to replicas from here
        # The sequencer: who may subscribe on the replica port. (The queue server connects out to
        # its replicas, which check it instead.)
        self.replica_check = PeerCheck.from_flag(args.peer_hosts, role="sequencer") if role == "sequencer" else None

    # --- The log: group commit ------------------------------------------------------------------
    def schedule_log_write(self) -> None:
        if self.writing or not self.core.has_unlogged:
            return
        self.writing = True
        entries = self.core.take_unlogged()
        upto = entries[-1][0]
        if len(entries) <= INLINE_LOG_WRITE_MAX_ENTRIES:
            # A small group (light load): write and fsync here; a thread's round trip would cost
            # more than the 0.2 ms the loop waits. A large group is written by the thread, so the
            # loop goes on numbering the next group meanwhile.
            self.loop.call_soon(self._on_log_written, self._append(entries), upto)
            return
        self.executor.submit(self._append_in_thread, entries, upto)

    def _append(self, entries: list) -> BaseException | None:
        """Write and fsync a group; the failure, if any, as a value (the loop stops on it)."""
        try:
            self.seqlog.append(entries)
        except Exception as error:
            return error
        return None

    def _append_in_thread(self, entries: list, upto: int) -> None:
        # Straight back to the loop: through an asyncio future, the news would take one more
        # turn of the loop (its done callbacks are scheduled, not run, when it resolves).
        self.loop.call_soon_threadsafe(self._on_log_written, self._append(entries), upto)

    def _on_log_written(self, error: BaseException | None, upto: int) -> None:
        if error is not None:
            log.error("log_write_failed_stopping", error=repr(error), upto_seq=upto)
            os._exit(EXIT_STORE_FAILURE)
        self.log_writes += 1
        data, replies = self.core.on_logged(upto)
        if len(self.core.log) > self.core.max_log_entries + self.seqlog.segment_entries and not self.truncating:
            # Over the bound (a replica is far behind): truncate now, not at the next tick, so the
            # log never holds more than the bound plus a segment, whatever the rate.
            asyncio.ensure_future(self._truncate())
        for link in self.links.values():
            self._send_live(link, data, upto)
        self._send_replies(replies)
        self.writing = False
        self.schedule_log_write()

    # --- Replicas -------------------------------------------------------------------------------
    def _send_live(self, link: ReplicaLink, data: bytes, upto: int) -> None:
        if not link.live:
            return
        if link.stream.unsent_bytes() > MAX_LIVE_BUFFER_BYTES:
            log.warning("replica_slow_switching_to_catchup", replica=link.name, sent_upto=link.sent_upto)
            link.live = False
            self._start_catchup(link)
            return
        link.stream.send_bytes(data)
        link.stream.flush()  # the replicas start applying while this turn goes on
        link.sent_upto = upto

    def _start_catchup(self, link: ReplicaLink) -> None:
        if link.catchup_task is None or link.catchup_task.done():
            link.catchup_task = asyncio.create_task(self._catch_up(link))

    async def _catch_up(self, link: ReplicaLink) -> None:
        """Feed a replica from the log, at the pace it reads, until it is level; then go live."""
        core = self.core
        while link.sent_upto < core.durable_seq:
            if link.sent_upto + 1 < core.log_start_seq:
                link.stream.send({"TASK": "SNAPSHOT_NEEDED", "LOG_START_SEQ": core.log_start_seq})
                log.warning("replica_behind_log_start", replica=link.name, sent_upto=link.sent_upto,
                            log_start_seq=core.log_start_seq)
                await link.stream.drain()
                await link.stream.close()
                return
            upto = min(core.durable_seq, link.sent_upto + CATCHUP_CHUNK_ENTRIES)
            link.stream.send_bytes(core.entries_between(link.sent_upto + 1, upto))
            link.sent_upto = upto
            if not await link.stream.drain():
                return
        link.live = True
        log.info("replica_live", replica=link.name, sent_upto=link.sent_upto)

    async def handle_replica(self, stream: aio.MessageStream, expected_name: str | None = None) -> None:
        link: ReplicaLink | None = None
        try:
            while True:
                batch = await stream.read_batch()
                if batch is None:
                    return
                for message in batch:
                    if stream.closed or (link is not None and self.links.get(link.name) is not link):
                        return  # replaced by a newer subscription: nothing more from this one counts
                    link = self._on_replica_message(stream, link, message, expected_name)
        finally:
            if link is not None and self.links.get(link.name) is link:
                del self.links[link.name]
                handover = self.core.on_disconnect(link.name)
                if link.catchup_task is not None:
                    link.catchup_task.cancel()
                log.info("replica_disconnected", replica=link.name, applied_seq=self.core.replicas[link.name].applied_seq)
                if handover is not None and handover[0] in self.links:
                    new_source, from_seq = handover
                    self.links[new_source].stream.send({"TASK": "SEND_RESULTS", "FROM_SEQ": from_seq})
                    log.info("results_source_changed", replica=new_source, from_seq=from_seq)

    def _on_replica_message(self, stream: aio.MessageStream, link: ReplicaLink | None, message,
                            expected_name: str | None = None) -> ReplicaLink | None:
        if isinstance(message, SaldoError):
            stream.send(error_reply(message.code, message.detail))
            return link
        task = message.get("TASK")
        try:
            if task == "STATUS":
                stream.send(self.status(wire.request_id_of(message)))
            elif task in BANK_TASKS or "tipo" in message:
                raise SaldoError("WRONG_ROLE", "this is the replica port; send bank operations to the client port")
            elif expected_name is None and self.replica_check is not None and not self.replica_check.admits(stream):
                self.replica_check.check(stream, str(task)[:32] if task else "a message")
            elif task == "SUBSCRIBE":
                if expected_name is not None and message.get("REPLICA") != expected_name:
                    raise SaldoError("FIELD_INVALID", f"this connection feeds {expected_name}")
                return self._subscribe(stream, link, message)
            elif link is None:
                raise SaldoError("FIELD_INVALID", "SUBSCRIBE first")
            elif task == "APPLIED":
                upto, synced, results = parse_applied(message)
                self._send_replies(self.core.on_applied(link.name, upto, results, synced))
            elif task == "RESEND":
                first, last = message.get("FROM"), message.get("TO")
                if type(first) is not int or type(last) is not int or not 0 < first <= last:
                    raise SaldoError("FIELD_INVALID", "RESEND needs integers 0 < FROM <= TO")
                kind, data = self.core.on_resend(link.name, first, last)
                if kind == "snapshot":
                    stream.send({"TASK": "SNAPSHOT_NEEDED", "LOG_START_SEQ": self.core.log_start_seq})
                else:
                    log.info("resend", replica=link.name, from_seq=first, to_seq=last)
                    stream.send_bytes(data)
            else:
                raise classify_unknown(message)
        except SaldoError as error:
            request_id = message.get("ID") if type(message.get("ID")) in (str, int) else None
            stream.send(with_id_msg(error_reply(error.code, error.detail, request_id), message))
        return link

    def _subscribe(self, stream: aio.MessageStream, link: ReplicaLink | None, message: dict) -> ReplicaLink:
        name = message.get("REPLICA")
        last = message.get("LAST_APPLIED_SEQ")
        if type(name) is not str or type(last) is not int or last < 0:
            raise SaldoError("FIELD_TYPE", "SUBSCRIBE needs REPLICA (a name) and LAST_APPLIED_SEQ (an integer)")
        if link is not None and link.name != name:
            # One connection, one replica: a second name would leave the first one's link behind,
            # counted as connected (holding back truncation) after this connection ends.
            raise SaldoError("FIELD_INVALID", f"this connection subscribed as {link.name[:64]}")
        released: list = []
        kind, _data = self.core.on_subscribe(name, last, replies=released)
        self._send_replies(released)
        previous = self.links.get(name)
        if previous is not None and previous.stream is not stream:
            # Usually the same replica back on a new connection, the old one not yet seen to end.
            # If a second process uses the name, REPLACED tells the one pushed out to back off.
            log.info("replica_reconnected_closing_old", replica=name)
            if previous.catchup_task is not None:
                previous.catchup_task.cancel()
            previous.live = False
            previous.stream.send({"TASK": "REPLACED", "DETAIL": f"another connection subscribed as {name}"})
            closing = asyncio.ensure_future(previous.stream.close())  # (bounded: CLOSE_TIMEOUT_S)
            self.closing_streams.add(closing)
            closing.add_done_callback(self.closing_streams.discard)
        link = ReplicaLink(name, stream, last)
        self.links[name] = link
        log.info("replica_subscribed", replica=name, last_applied_seq=last, durable_seq=self.core.durable_seq,
                 log_start_seq=self.core.log_start_seq, needs_snapshot=kind == "snapshot")
        if kind == "snapshot":
            stream.send({"TASK": "SNAPSHOT_NEEDED", "LOG_START_SEQ": self.core.log_start_seq})
        else:
            results_from = self.core.choose_results_source(name)
            subscribed = {"TASK": "SUBSCRIBED", "SEND_RESULTS": results_from is not None}
            if results_from is not None:
                subscribed["RESULTS_FROM_SEQ"] = results_from
            stream.send(subscribed)
            self._start_catchup(link)
        self.schedule_log_write()  # operations the subscription made renumber (see SequencerCore)
        return link

    async def push_to_replica(self, name: str, address: tuple[str, int], stop: asyncio.Event) -> None:
        """The queue server's side: connect to the replica's queue port, say FEED, and serve the
        replica's SUBSCRIBE / APPLIED / RESEND on that connection; reconnect when it ends."""
        while not stop.is_set():
            stream = await aio.connect_with_backoff(address, stop, max_line_bytes=REPLICA_LINE_BYTES, peer=name,
                                                    source_host=self.source_host)
            if stream is None:
                return
            stream.send({"TASK": "FEED", "SERVER": self.args.name, "REPLICA": name})
            log.info("feeding_replica", replica=name, address=topology.format_address(address))
            await self.handle_replica(stream, expected_name=name)
            await stream.close()

    async def watch_results_source(self) -> None:
        """Replace a results source that stalls while another replica could answer (see on_tick);
        tell the clients waiting for an apply when no replica is connected."""
        while True:
            await asyncio.sleep(RESULTS_WATCH_INTERVAL_S)
            self._send_replies(self.core.answer_waiters_without_replica(time.monotonic()))
            change = self.core.on_tick(time.monotonic())
            if change is None:
                continue
            old_source, new_source, from_seq = change
            log.warning("results_source_changed", replica=new_source, from_seq=from_seq, reason="stalled",
                        stalled=old_source, stalled_applied_seq=self.core.replicas[old_source].applied_seq)
            if old_source in self.links:
                self.links[old_source].stream.send({"TASK": "STOP_RESULTS"})
            if new_source in self.links:
                self.links[new_source].stream.send({"TASK": "SEND_RESULTS", "FROM_SEQ": from_seq})

    async def truncate_periodically(self) -> None:
        while True:
            await asyncio.sleep(TRUNCATE_INTERVAL_S)
            await self._truncate()

    async def _truncate(self) -> None:
        """Drop the log's prefix that every replica applied (or that exceeds the bound); on disk,
        what still names a remembered id stays, out of the log (see common/sequencer/log.py)."""
        if self.truncating:
            return
        point = self.core.truncation_point()
        if point <= self.core.log_start_seq:
            return
        self.truncating = True
        dropped = 0
        try:
            start = await self.loop.run_in_executor(self.trim_executor, self.seqlog.truncate_before, point,
                                                    self.core.ids_kept_from())
            while self.core.log_start_seq < start:  # a segment's entries, a chunk per turn of the loop
                dropped += self.core.truncate(start, max_entries=TRUNCATE_CHUNK_ENTRIES)
                await asyncio.sleep(0)
        finally:
            self.truncating = False
        if dropped:
            log.info("log_prefix_dropped", entries=dropped, log_start_seq=self.core.log_start_seq)

    # --- Clients --------------------------------------------------------------------------------
    async def handle_client(self, stream: aio.MessageStream) -> None:
        core = self.core
        default_needed = replicas_needed(self.default_wait, len(core.replicas))
        while True:
            lines = await stream.read_lines()
            if lines is None:
                return
            for line in lines:
                op = parse_request_line(line)  # saldo's canonical form: no dict, no second parse
                if op is not None:
                    try:
                        self._send_replies(core.submit(op, stream, op.op_id, default_needed))
                    except SaldoError as error:
                        stream.send(error_reply(error.code, error.detail, op.op_id))
                    continue
                try:
                    message = wire.decode_line(line)
                except SaldoError as error:
                    stream.send(error_reply(error.code, error.detail))
                    continue
                if message is not None:
                    self._handle_client_message(stream, message)
            self.schedule_log_write()
            if not await stream.drain():
                return

    def _handle_client_message(self, stream: aio.MessageStream, message: dict) -> None:
        core = self.core
        try:
            request_id = wire.request_id_of(message)
        except SaldoError as error:
            stream.send(with_id_msg(error_reply(error.code, error.detail), message))
            return
        try:
            if message.get("TASK") == "STATUS":
                stream.send(self.status(request_id))
                return
            try:
                request = parse_replica_request(message)
            except SaldoError as error:
                raise classify_unknown(message) if error.code == "UNKNOWN_MESSAGE" else error from None
            if isinstance(request, (Query, AccountsQuery)):
                raise SaldoError("WRONG_ROLE", f"the {self.role} orders writes; read balances and accounts from a replica")
            wait = message.get("WAIT", self.default_wait)
            if wait not in WAIT_MODES:
                raise SaldoError("FIELD_INVALID", "WAIT must be SEQUENCED, APPLIED or ALL")
            client = self._client_ref(stream, message, request_id, request)
            needed = replicas_needed(wait, len(core.replicas))
            self._send_replies(core.submit(request, client, request.op_id, needed))
        except SaldoError as error:
            stream.send(with_id_msg(error_reply(error.code, error.detail, request_id), message))

    @staticmethod
    def _client_ref(stream: aio.MessageStream, message: dict, request_id: object, op: Operation):
        id_msg = message.get("id_msg")
        if request_id == op.op_id and id_msg is None:
            return stream
        return ClientRef(stream, request_id, id_msg)

    def _send_replies(self, replies) -> None:
        if not replies:
            return
        streams = set()
        for reply in replies:
            client = reply.client
            if type(client) is ClientRef:
                message = json.loads(reply.line)
                message.pop("ID", None)
                if client.request_id is not None:
                    message = {"ID": client.request_id, **message}
                if client.id_msg is not None:
                    message["id_msg"] = client.id_msg
                client.stream.send(message)
                streams.add(client.stream)
            else:
                client.send_bytes(reply.line)
                streams.add(client)
        for stream in streams:  # the clients send their next requests while this turn goes on
            stream.flush()

    def status(self, request_id: object = None) -> dict:
        reply = {"ID": request_id} if request_id is not None else {}
        reply.update({
            "STATUS": "OK",
            "NODE": self.args.name,
            "ROLE": self.role,
            "PID": os.getpid(),
            "UPTIME_S": round(time.monotonic() - self.started_at, 3),
            "LOG_WRITES": self.log_writes,
            "LOG_BYTES_ON_DISK": self.seqlog.disk_bytes(),
            "IDS_BYTES_ON_DISK": self.seqlog.disk_bytes(retired=True),  # truncated segments kept for their ids
            "LIVE_REPLICAS": sorted(n for n, link in self.links.items() if link.live),
            **self.core.status(),
            **aio.process_figures(),
        })
        return reply


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    names = [name.strip() for name in args.replicas.split(",") if name.strip()]
    return await run_orderer(args, stop, names, default_wait=WAIT_APPLIED, role="sequencer", outbound={})


async def run_orderer(args: argparse.Namespace, stop: asyncio.Event, replica_names: list[str], *, default_wait: str,
                      role: str, outbound: dict[str, tuple[str, int]]) -> int:
    """Run a SequencerCore with its log: the sequencer (replicas connect in) or the queue server
    (`outbound`: it connects to each replica's queue port and pushes)."""
    if args.dedup_window < 1:
        raise SystemExit("--dedup-window must be at least 1")
    seqlog = SequencerLog(args.log_dir, segment_entries=args.segment_entries, fsync=args.fsync)

    def load() -> tuple[list, int, list]:
        entries, log_start_seq = seqlog.load()
        return entries, log_start_seq, seqlog.retired(log_start_seq)

    entries, log_start_seq, retired = await asyncio.to_thread(load)
    core = SequencerCore(
        replica_names=replica_names,
        next_seq=seqlog.last_seq + 1,
        log_start_seq=log_start_seq,
        max_log_entries=args.max_log_entries,
        max_waiting_requests=args.max_waiting_requests,
        dedup_window_ops=args.dedup_window,
        log=deque(entries),
        retired=retired,
    )
    log.info("log_loaded", log_dir=args.log_dir, entries=len(entries), log_start_seq=log_start_seq, next_seq=core.next_seq,
             retired_entries=len(retired), ids_remembered=len(core.ids))
    del retired  # read for the ids only
    node = SequencerNode(args, core, seqlog, default_wait=default_wait, role=role)
    clients = await aio.start_server(node.handle_client, args.host, args.port, name=f"{role}-clients",
                                     max_connections=args.max_connections)
    tasks = [asyncio.create_task(aio.keep_running("truncate", node.truncate_periodically, stop)),
             asyncio.create_task(aio.keep_running("results_source", node.watch_results_source, stop))]
    replicas = None
    if outbound:
        tasks += [asyncio.create_task(aio.keep_running(name, partial(node.push_to_replica, name, address, stop), stop))
                  for name, address in outbound.items()]
    else:
        replicas = await aio.start_server(node.handle_replica, args.host, args.replica_port, name=f"{role}-replicas",
                                          max_line_bytes=REPLICA_LINE_BYTES)
    await stop.wait()
    log.info("stopping", next_seq=core.next_seq, durable_seq=core.durable_seq)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await clients.stop()
    if replicas is not None:
        await replicas.stop()
    while node.writing:  # let the write in flight land
        await asyncio.sleep(0.01)
    node.executor.shutdown(wait=True)
    node.trim_executor.shutdown(wait=True)
    seqlog.close()
    return 0
