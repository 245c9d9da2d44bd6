"""A worker farm server: `server.py --mode farm` (the default mode), seed 000's orchestrator.

Wires common/farm/core.py's FarmCore to sockets and timers: one listening port serves clients, workers
and peer servers alike (the core tells them apart by their messages); one outgoing connection per
peer carries heartbeats and lending requests; a ticker drives the core's timers; optionally a
supervisor receives the seed's periodic performance report, and the farm's store is read for the
applied-operations counter that STATUS shows (the lab's checker compares it with its history).

    python server.py --port 8765 --peers 127.0.0.1:8766
    python server.py --port 8766 --peers 127.0.0.1:8765
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import time
import uuid
from functools import partial

from common import topology
from common.core import Send
from common.farm.core import FarmConfig, FarmCore, address_key
from common.log import get_logger
from common.storage.store import open_store, redact
from common.transport import aio

log = get_logger("farm_server")
# The core's events, logged under the name of the part that decided them.
core_log = get_logger("farm")

DEFAULT_PORT = topology.DEFAULT_PORTS["farm_server"]
# How often the store's applied-operations counter is read for STATUS (when --store is given).
STORE_COUNTER_PERIOD_S = 0.2

# FarmConfig fields that are flags: (field, type, help). Defaults come from FarmConfig itself.
_CONFIG_FLAGS = (
    ("max_queue", int, "tasks the queue holds; beyond it clients get QUEUE_FULL"),
    ("max_batch_tasks", int, "the most tasks one saldo worker holds at once"),
    ("visibility_timeout_s", float, "a task not answered in this time goes back to the queue"),
    ("no_task_wait_s", float, "how long a worker's ALIVE is held before NO_TASK"),
    ("max_task_attempts", int, "deliveries of one task before the client gets UNAVAILABLE"),
    ("completed_memory", int, "finished update ids whose answer is kept for retries"),
    ("completed_reads_memory", int, "finished reads (by their ID) whose answer is kept for retries"),
    ("heartbeat_interval_s", float, "seconds between heartbeats to each peer"),
    ("heartbeat_miss_limit", int, "failed heartbeats in a row that mark a peer down"),
    ("retry_initial_s", float, "first retry delay after a failed heartbeat (doubles each time)"),
    ("retry_max_s", float, "cap of the retry delay"),
    ("jitter_fraction", float, "retry delays vary by up to this fraction either way"),
    ("lend_queue_threshold", int, "a queue longer than this for --overload-s asks peers for workers"),
    ("overload_s", float, "how long the queue must stay long before asking"),
    ("return_queue_threshold", int, "a queue shorter than this for --underload-s gives borrowed workers back"),
    ("underload_s", float, "how long the queue must stay short before giving back"),
    ("min_own_workers", int, "workers this server always keeps at home (never lent)"),
    ("max_borrowed", int, "the most workers this server borrows"),
    ("request_cooldown_s", float, "wait after a refused or failed request before asking that peer again"),
    ("redirect_timeout_s", float, "grace for a lent worker to show up at the borrower"),
    ("worker_forget_s", float, "a worker not heard of for this long is forgotten"),
    ("no_worker_wait_s", float, "a task no worker here can run waits this long (for one to connect or be lent), "
                                "then goes to a peer that has one, or is refused NO_WORKER"),
    ("forward_timeout_s", float, "how long a task forwarded to a peer may take to be answered"),
    ("max_forwarded", int, "tasks forwarded to peers and not yet answered, at most"),
)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"port for clients, workers and peers (default {DEFAULT_PORT})")
    parser.add_argument("--advertise", help="HOST:PORT workers and peers use to reach this server (default host:port)")
    parser.add_argument("--server-id", help="this server's SERVER_UUID (default: its advertised HOST:PORT)")
    parser.add_argument("--peers", default="", help="peer servers, HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--store", help="the farm's store (its workers' URL); read only for STATUS's OPS_APPLIED_TOTAL")
    parser.add_argument("--supervisor", help="HOST:PORT that receives the periodic performance report")
    parser.add_argument("--report-interval-s", type=float, default=10.0, help="seconds between performance reports")
    parser.add_argument("--heartbeat-timeout-s", type=float, default=0.5, help="a heartbeat unanswered this long failed")
    parser.add_argument("--tick-s", type=float, default=0.05, help="period of the timers (leases, heartbeats, lending)")
    parser.add_argument("--max-connections", type=int, default=aio.MAX_CONNECTIONS)
    defaults = FarmConfig(server_id="x", address=("127.0.0.1", 1))
    for field, kind, text in _CONFIG_FLAGS:
        parser.add_argument(_flag(field), type=kind, default=getattr(defaults, field), help=f"{text} (default %(default)s)")


def prepare(args: argparse.Namespace) -> None:
    if args.port is None:
        args.port = DEFAULT_PORT
    if args.advertise is None:
        host = "127.0.0.1" if args.host in ("", "0.0.0.0") else args.host
        args.advertise = f"{host}:{args.port}"
    if args.server_id is None:
        args.server_id = args.advertise
    if args.name is None:
        args.name = f"farm-{args.port}"
    peers = args.peers if isinstance(args.peers, list) else [p for p in str(args.peers or "").split(",") if p.strip()]
    args.peers = [topology.parse_address(p.strip(), DEFAULT_PORT) for p in peers]


def build_config(args: argparse.Namespace) -> FarmConfig:
    return FarmConfig(
        server_id=args.server_id,
        address=topology.parse_address(args.advertise),
        peers=tuple(args.peers),
        **{field: getattr(args, field) for field, _kind, _text in _CONFIG_FLAGS},
    )


class PeerLink:
    """An outgoing connection to one peer, opened on demand and reopened after a failure."""

    def __init__(self, address: tuple[str, int], *, timeout_s: float, source_host: str | None, max_in_flight: int = 64) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.source_host = source_host
        self.max_in_flight = max_in_flight
        self._connection: aio.Connection | None = None
        self._lock = asyncio.Lock()

    async def request(self, message: dict, timeout_s: float | None = None) -> dict | None:
        """The peer's reply, or None when it cannot be reached or does not answer in `timeout_s`
        (this link's timeout when None)."""
        async with self._lock:
            if self._connection is None or self._connection.closed:
                try:
                    self._connection = await aio.Connection.open(
                        *self.address, connect_timeout_s=self.timeout_s, request_timeout_s=self.timeout_s,
                        max_in_flight=self.max_in_flight, source_host=self.source_host,
                    )
                except (OSError, TimeoutError):
                    self._connection = None
                    return None
            connection = self._connection
        reply = await connection.request(dict(message), timeout_s=timeout_s)
        if reply.get("STATUS") == "NOK" and reply.get("ERROR") in ("TIMEOUT", "CONNECTION_LOST"):
            await connection.close()  # a stalled peer: start afresh next time
            return None
        return reply

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


class FarmServer:
    """Runs one FarmCore: feeds it what arrives, carries out what it decided (common/core.py)."""

    def __init__(self, core: FarmCore, args: argparse.Namespace) -> None:
        self.core = core
        self.args = args
        self.streams: dict[int, aio.MessageStream] = {}
        self._conn_ids = itertools.count(1)
        source_host = None if args.host in ("", "0.0.0.0") else args.host
        self.links = {address_key(a): PeerLink(a, timeout_s=args.heartbeat_timeout_s, source_host=source_host)
                      for a in args.peers}
        # Forwarded tasks travel apart: a task that waits in the peer's queue holds up no heartbeat.
        self.task_links = {address_key(a): PeerLink(a, timeout_s=args.heartbeat_timeout_s, source_host=source_host,
                                                    max_in_flight=core.config.max_forwarded)
                           for a in args.peers}
        self._background: set[asyncio.Task] = set()
        self.core.status_extra = {"NODE": args.name, "PID": os.getpid()}
        self.core.status_probe = aio.process_figures

    # --- Connections ---------------------------------------------------------------------------
    async def handle(self, stream: aio.MessageStream) -> None:
        conn = next(self._conn_ids)
        self.streams[conn] = stream
        source_host = stream.peer.rpartition(":")[0]
        core = self.core
        try:
            while True:
                batch = await stream.read_batch()
                if batch is None:
                    return
                now_s = time.monotonic()
                for item in batch:
                    core.on_message(conn, item, now_s, source_host)
                core.pump(now_s)
                self.flush()
                if not await stream.drain():
                    return
        finally:
            del self.streams[conn]
            now_s = time.monotonic()
            core.on_disconnect(conn, now_s)
            core.pump(now_s)
            self.flush()

    def flush(self) -> None:
        """Carry out the core's output in the contract's order: send, reply (then close), log. The
        farm persists nothing itself (its workers write the store)."""
        output = self.core.take_output()
        assert not output.persist, "a farm server persists nothing"
        for request in output.send:  # each to a peer; its answer comes back to the core
            self._spawn(self._call_peer(request))
        streams = self.streams
        for reply in output.replies:
            stream = streams.get(reply.to)
            if stream is not None:  # (a connection that closed meanwhile: nothing to do)
                stream.send(reply.message)
        for conn in output.close:
            stream = streams.get(conn)
            if stream is not None:
                self._spawn(stream.close())
        if output.events:
            core_log.record(output.events)

    async def _call_peer(self, request: Send) -> None:
        links = self.links if request.timeout_s is None else self.task_links
        reply = await links[request.to].request(request.message, request.timeout_s)
        try:
            self.core.on_peer_result(request.to, request.message, reply, time.monotonic())
        except Exception as error:  # a bug must not stop the server; the next heartbeat starts afresh
            log.exception("peer_result_failed", peer=request.to, task=request.message.get("TASK"), error=repr(error))
        self.flush()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- Timers --------------------------------------------------------------------------------
    async def run_ticker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.args.tick_s)
            try:
                self.core.tick(time.monotonic())
            except Exception as error:  # a bug must not stop the timers for good
                log.exception("tick_failed", error=repr(error))
            self.flush()

    async def watch_store_counter(self, stop: asyncio.Event) -> None:
        """Keep STATUS's OPS_APPLIED_TOTAL: the shared store's count of applied operations."""
        store = None
        while not stop.is_set():
            try:
                if store is None:
                    store = await asyncio.to_thread(open_store, self.args.store)
                total = await asyncio.to_thread(store.get_meta, "ops_applied_total")
                self.core.status_extra["OPS_APPLIED_TOTAL"] = total
            except Exception as error:  # the store is the workers' business; STATUS just lacks the figure
                log.warning("store_counter_unreadable", store=redact(self.args.store), error=repr(error)[:200])
                if store is not None:
                    await asyncio.to_thread(store.close)
                store = None
                await asyncio.sleep(1.0)
            await asyncio.sleep(STORE_COUNTER_PERIOD_S)
        if store is not None:
            await asyncio.to_thread(store.close)

    async def send_reports(self, stop: asyncio.Event) -> None:
        """The seed's periodic performance report, one line per interval, to the supervisor."""
        host, port = topology.parse_address(self.args.supervisor)
        stream: aio.MessageStream | None = None
        while not stop.is_set():
            await asyncio.sleep(self.args.report_interval_s)
            now_s = time.monotonic()
            report = self.core.performance_report(
                now_s, system_figures(now_s - self.core.started_at),
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), str(uuid.uuid4()),
            )
            try:
                if stream is None or stream.closed:
                    async with asyncio.timeout(2.0):
                        reader, writer = await asyncio.open_connection(host, port)
                    stream = aio.MessageStream(reader, writer)
                stream.send(report)
                if not await stream.drain():
                    stream = None
            except (OSError, TimeoutError) as error:
                log.warning("report_not_sent", supervisor=self.args.supervisor, error=repr(error)[:200])
                stream = None
        if stream is not None:
            await stream.close()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for link in [*self.links.values(), *self.task_links.values()]:
            await link.close()


def system_figures(uptime_s: float) -> dict:
    """The report's "system" part: what the seed's version measured, from /proc and os."""
    figures: dict = {"uptime_s": round(uptime_s, 1), "cpu_count": os.cpu_count()}
    try:
        figures["load_average_1m"], figures["load_average_5m"], figures["load_average_15m"] = os.getloadavg()
    except OSError:
        pass
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        figures["memory_total_mb"] = int(meminfo["MemTotal"].split()[0]) // 1024
        figures["memory_available_mb"] = int(meminfo["MemAvailable"].split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        disk = shutil.disk_usage("/")
        figures["disk_free_gb"] = round(disk.free / 2**30, 1)
    except OSError:
        pass
    return figures


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    config = build_config(args)
    core = FarmCore(config, random.Random(), time.monotonic())
    server = FarmServer(core, args)
    listener = await aio.start_server(server.handle, args.host, args.port, name="farm", max_connections=args.max_connections)
    log.info("farm_server_started", server_id=config.server_id, advertise=args.advertise,
             peers=",".join(address_key(p) for p in config.peers) or "-", store=redact(args.store) if args.store else "-")
    loops = [asyncio.create_task(aio.keep_running("ticker", partial(server.run_ticker, stop), stop))]
    if args.store:
        loops.append(asyncio.create_task(aio.keep_running("store_counter", partial(server.watch_store_counter, stop), stop)))
    if args.supervisor:
        loops.append(asyncio.create_task(aio.keep_running("reports", partial(server.send_reports, stop), stop)))
    await stop.wait()
    log.info("stopping", queue=core.queue_length, tasks_completed_total=core.tasks_completed_total)
    for loop_task in loops:
        loop_task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    await listener.stop()
    await server.close()
    return 0
