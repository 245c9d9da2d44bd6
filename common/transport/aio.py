"""The asyncio transport: a message stream over asyncio streams, a server, and a pipelined client.

Owns everything between a socket and a decoded message for the asyncio processes (replicas, the
sequencer, servers, the lab):

- `MessageStream` reads whole chunks and returns every complete message in them at once (so a
  handler can treat one read as one batch), and coalesces the writes made during one turn of the
  event loop into one send (so a pipelined peer costs one syscall per batch, not per message).
- `serve` accepts connections under a bound and runs a handler per connection.
- `Connection` is the client: many requests in flight on one connection, replies matched by "ID",
  a timeout per request that resolves to an indefinite error reply instead of an exception.
- `IOCounters` and `LoopMonitor`, the process-wide figures every asyncio process's STATUS reports
  (reads, writes, and how late its event loop runs).

The codec itself is common/transport/wire.py, shared with the blocking transport.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import os
import socket
import time
from typing import Awaitable, Callable

from common.bank.errors import SaldoError, error_reply
from common.log import get_logger
from common.transport import wire

log = get_logger("aio")

PARTIAL_LINE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1024
# Above this many unsent bytes a sender waits in drain(); below it writes never block.
WRITE_HIGH_WATER_BYTES = 4 * 1024 * 1024
CLOSE_TIMEOUT_S = 5.0
# A connection that failed is not retried sooner than this, so a dead peer costs little; each
# failure doubles the wait, up to the second figure.
RECONNECT_BACKOFF_S = (0.02, 0.5)


class IOCounters:
    """Process-wide transport counters (messages per read and per write show how well batching
    works); every process's STATUS reports them."""

    reads = 0
    messages_read = 0
    writes = 0
    bytes_written = 0

    @classmethod
    def snapshot(cls) -> dict:
        return {
            "READS": cls.reads,
            "MESSAGES_READ": cls.messages_read,
            "WRITES": cls.writes,
            "BYTES_WRITTEN": cls.bytes_written,
        }


# The loop monitor wakes this often and counts a wake-up this late as a stall: one turn of the loop
# (a long callback, a blocking call) or a wait for a core held up everything the process does. A
# stall is seen as at most one period shorter than it was. An idle process spends 1 to 2% of a
# core on the wake-ups (measured); a busy one's loop is awake anyway.
LOOP_MONITOR_PERIOD_S = 0.005
LOOP_STALL_THRESHOLD_MS = 10.0


class LoopMonitor:
    """How late the event loop ran a timer: a stall of this process, whatever its cause. Started
    by common/process.py in every asyncio process, whose STATUS reports it ("LOOP"); the lab sets
    the stalls of a run beside its latency. One timer per `LOOP_MONITOR_PERIOD_S`; the counters
    only grow."""

    stalls_total = 0
    stalled_ms_total = 0.0
    lag_max_ms = 0.0

    @classmethod
    def record(cls, lag_ms: float) -> None:
        if lag_ms > cls.lag_max_ms:
            cls.lag_max_ms = lag_ms
        if lag_ms >= LOOP_STALL_THRESHOLD_MS:
            cls.stalls_total += 1
            cls.stalled_ms_total += lag_ms

    @classmethod
    async def run(cls, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            due_s = loop.time() + LOOP_MONITOR_PERIOD_S
            await asyncio.sleep(LOOP_MONITOR_PERIOD_S)
            cls.record(max(0.0, loop.time() - due_s) * 1000.0)

    @classmethod
    def snapshot(cls) -> dict:
        return {
            "STALLS_TOTAL": cls.stalls_total,
            "STALLED_MS_TOTAL": round(cls.stalled_ms_total, 1),
            "LAG_MAX_MS": round(cls.lag_max_ms, 1),
        }


def process_figures() -> dict:
    """The STATUS members every asyncio process reports: its reads and writes, and its loop."""
    return {"IO": IOCounters.snapshot(), "LOOP": LoopMonitor.snapshot()}


class MessageStream:
    """One TCP connection carrying newline-delimited JSON messages both ways."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_line_bytes: int = wire.MAX_LINE_BYTES,
        partial_line_timeout_s: float = PARTIAL_LINE_TIMEOUT_S,
        idle_timeout_s: float | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._splitter = wire.LineSplitter(max_line_bytes)
        self.partial_line_timeout_s = partial_line_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.peer_host = normal_address(str(peer[0])) if isinstance(peer, tuple) else ""  # where it connects from
        transport = writer.transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # reset between connect and here: the socket is gone, and the first read says so

    @property
    def closed(self) -> bool:
        return self._closed

    async def read_batch(self) -> list[dict | SaldoError] | None:
        """Every message that has arrived, at least one; None once the connection is over.

        The connection is over at EOF, on a reset, on a line above the limit (answered with
        LINE_TOO_LONG first), and when the peer stalls mid-line past the partial-line timeout.
        An undecodable line is returned as a SaldoError in its place; the stream stays usable.
        """
        while True:
            lines = await self.read_lines()
            if lines is None:
                return None
            batch = wire.decode_lines(lines)
            if batch:
                return batch

    async def read_lines(self) -> list[bytes] | None:
        """Like read_batch, but the complete lines undecoded (for parsers with a fast path for the
        canonical form of their hot messages: see bank.parse_request_line)."""
        splitter = self._splitter
        while True:
            if self._closed:
                return None
            if splitter.overflowed:
                self.send(error_reply("LINE_TOO_LONG", f"a line exceeded {splitter.max_line_bytes} bytes"))
                log.warning("line_too_long", peer=self.peer, max_line_bytes=splitter.max_line_bytes)
                await self.close()
                return None
            timeout_s = self.partial_line_timeout_s if splitter.partial_bytes else self.idle_timeout_s
            try:
                if timeout_s is None:
                    data = await self._reader.read(wire.READ_CHUNK_BYTES)
                else:
                    async with asyncio.timeout(timeout_s):
                        data = await self._reader.read(wire.READ_CHUNK_BYTES)
            except TimeoutError:
                log.warning(
                    "read_timeout", peer=self.peer, partial_bytes=splitter.partial_bytes, timeout_s=timeout_s
                )
                await self.close()
                return None
            except (ConnectionError, OSError):
                await self.close()
                return None
            if not data:
                if splitter.partial_bytes:
                    log.info("eof_mid_line", peer=self.peer, partial_bytes=splitter.partial_bytes)
                await self.close()
                return None
            lines = splitter.feed(data)
            IOCounters.reads += 1
            if lines:
                IOCounters.messages_read += len(lines)
                return lines

    def send(self, message: dict) -> None:
        self.send_bytes(wire.encode(message))

    def send_bytes(self, data: bytes) -> None:
        """Queue bytes (whole lines) to send at the end of this turn of the event loop."""
        if self._closed:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Hand what is queued to the transport now, not at the end of this turn of the loop: for
        a message that must not wait behind slow work already scheduled in this turn."""
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out or self._closed:
            self._out.clear()
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        IOCounters.writes += 1
        IOCounters.bytes_written += len(data)
        self._writer.write(data)

    def unsent_bytes(self) -> int:
        """Bytes queued or in the transport's buffer, not yet taken by the kernel."""
        return sum(len(chunk) for chunk in self._out) + self._writer.transport.get_write_buffer_size()

    async def drain(self) -> bool:
        """Send what is queued and wait while the peer is slow to read. False if the peer is gone."""
        self._flush()
        if self._closed:
            return False
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            await self.close()
            return False
        return True

    async def close(self) -> None:
        """Send what is queued and close; a peer that does not take it within CLOSE_TIMEOUT_S is
        cut off, so closing never waits without end."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        try:
            self._writer.close()
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._writer.wait_closed()
        except TimeoutError:
            log.warning("close_timeout_aborting", peer=self.peer, unsent_bytes=self._writer.transport.get_write_buffer_size())
            self._writer.transport.abort()
        except (ConnectionError, OSError):
            pass

    def abort(self) -> None:
        """Drop the connection at once, without sending what is queued (used by fault injection)."""
        self._closed = True
        self._out.clear()
        self._writer.transport.abort()


Handler = Callable[[MessageStream], Awaitable[None]]


class Server:
    """A listening socket that runs `handler(stream)` for each accepted connection, under a bound."""

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        max_connections: int = MAX_CONNECTIONS,
        max_line_bytes: int = wire.MAX_LINE_BYTES,
        partial_line_timeout_s: float = PARTIAL_LINE_TIMEOUT_S,
        idle_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self._handler = handler
        self.max_connections = max_connections
        self._max_line_bytes = max_line_bytes
        self._partial_line_timeout_s = partial_line_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._server: asyncio.base_events.Server | None = None
        self.streams: set[MessageStream] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, limit=2 * wire.READ_CHUNK_BYTES, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        log.info("listening", server=self.name, host=sockname[0], port=sockname[1], pid=os.getpid())

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = MessageStream(
            reader,
            writer,
            max_line_bytes=self._max_line_bytes,
            partial_line_timeout_s=self._partial_line_timeout_s,
            idle_timeout_s=self._idle_timeout_s,
        )
        if len(self.streams) >= self.max_connections:
            stream.send(error_reply("OVERLOADED", f"{self.name} holds {self.max_connections} connections"))
            log.warning("connection_refused", server=self.name, peer=stream.peer, reason="max_connections")
            await stream.close()
            return
        self.streams.add(stream)
        try:
            await self._handler(stream)
        except asyncio.CancelledError:
            # The process is stopping (asyncio.run cancels what still runs). Nothing awaits this
            # task, and ending it cancelled makes Python 3.11's stream callback log a traceback.
            return
        except Exception as error:  # A handler bug must not take the process down with it.
            log.exception("handler_failed", server=self.name, peer=stream.peer, error=repr(error))
        finally:
            self.streams.discard(stream)
            await stream.close()

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for stream in list(self.streams):
            stream.abort()
        await self._server.wait_closed()
        self._server = None


async def open_stream(
    address: tuple[str, int], *, max_line_bytes: int, peer: str, connect_timeout_s: float = 2.0,
    source_host: str | None = None,
) -> MessageStream:
    """One connection attempt to `address` from `source_host` (the address the peer checks, see
    common/transport/peers.py). If that address cannot reach the peer (a node listening on 127.0.0.1 whose
    peer is on another machine, or another address family), it connects from wherever the system
    routes instead: the peer's --peer-hosts must then name that address. Raises OSError or
    TimeoutError when the peer cannot be reached."""
    if source_host:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*address, local_addr=(source_host, 0)), connect_timeout_s)
            return MessageStream(reader, writer, max_line_bytes=max_line_bytes)
        except (OSError, asyncio.TimeoutError) as error:
            if not _cannot_connect_from(error):
                raise
            if (peer, source_host) not in _unusable_sources:  # said once per peer, not per retry
                _unusable_sources.add((peer, source_host))
                log.warning("source_address_unusable", peer=peer, source_host=source_host, error=repr(error))
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), connect_timeout_s)
    return MessageStream(reader, writer, max_line_bytes=max_line_bytes)


# (peer, source host) pairs already reported unusable; a node has a handful of peers.
_unusable_sources: set[tuple[str, str]] = set()


async def connect_with_backoff(
    address: tuple[str, int], stop: asyncio.Event, *, max_line_bytes: int, peer: str, connect_timeout_s: float = 2.0,
    source_host: str | None = None, on_failure: Callable[[BaseException], None] | None = None,
) -> MessageStream | None:
    """A stream to `address` (see open_stream), retrying with exponential backoff
    (RECONNECT_BACKOFF_S) until it connects; None once `stop` is set. For the long-lived links
    one node keeps to another. `on_failure(error)`, when given, hears of every failed attempt and
    reports it (else this function logs them)."""
    backoff_s = RECONNECT_BACKOFF_S[0]
    failures = 0
    while not stop.is_set():
        try:
            return await open_stream(address, max_line_bytes=max_line_bytes, peer=peer,
                                     connect_timeout_s=connect_timeout_s, source_host=source_host)
        except (OSError, asyncio.TimeoutError) as error:
            failures += 1
            if on_failure is not None:
                on_failure(error)
            else:
                # Every failure at debug level; the 8th, 16th, 32nd, ... also at info, so that a
                # link that stays down leaves a trace in an ordinary log.
                report = log.info if failures >= 8 and failures & (failures - 1) == 0 else log.debug
                report("peer_unreachable", peer=peer, failures=failures, error=repr(error))
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_S[1])
    return None


async def keep_running(name: str, loop: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    """Run one of a process's long-lived loops (a link to a peer: connect, serve, reconnect; a
    periodic tick) until `stop`. A failure nobody foresaw is logged and the loop starts over after
    a pause: a loop that ended silently would leave its node cut off, or its log untrimmed, for good."""
    while not stop.is_set():
        try:
            await loop()
            return
        except Exception as error:
            log.exception("loop_failed_restarting", loop=name, error=repr(error))
            await asyncio.sleep(RECONNECT_BACKOFF_S[1])


def _cannot_connect_from(error: BaseException) -> bool:
    """Whether a connection attempt failed because of its source address (not the peer)."""
    if isinstance(error, socket.gaierror):
        return True
    if not isinstance(error, OSError) or isinstance(error, TimeoutError):
        return False
    # (asyncio says "no matching local address" without an errno when the families differ.)
    return error.errno in (errno.EINVAL, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or "local address" in str(error)


def normal_address(address: str) -> str:
    """An IP address as one spelling: an IPv4-mapped IPv6 address as its IPv4 form, IPv6 compressed.
    Anything that is not an address (a name) is returned as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


async def start_server(handler: Handler, host: str, port: int, *, name: str, **options) -> Server:
    server = Server(handler, name=name, **options)
    try:
        await server.start(host, port)
    except OSError as error:
        raise SystemExit(listen_failure(name, host, port, error)) from None
    return server


def listen_failure(name: str, host: str, port: int, error: OSError) -> str:
    """One line (logged, and the process's exit message) for a port it cannot listen on."""
    hint = {
        errno.EADDRINUSE: "another process holds it (another saldo cluster?)",
        errno.EADDRNOTAVAIL: "this machine has no such address",
    }.get(error.errno, "")
    reason = os.strerror(error.errno) if error.errno else str(error)  # (asyncio's strerror repeats the address)
    log.error("listen_failed", server=name, host=host, port=port, error=reason)
    return f"{name}: cannot listen on {host}:{port}: {reason}" + (f": {hint}" if hint else "")


def indefinite_reply(code: str, detail: str, request_id: object) -> dict:
    """The reply a client synthesizes when it cannot know the outcome (TIMEOUT, CONNECTION_LOST)."""
    return error_reply(code, detail, request_id)


ReplyCallback = Callable[[dict], None]


def future_resolver(future: asyncio.Future) -> ReplyCallback:
    """A reply callback that resolves `future`, unless its waiter gave up (cancelled) meanwhile."""

    def resolve(reply: dict) -> None:
        if not future.done():
            future.set_result(reply)

    return resolve


class Connection:
    """A client connection with many requests in flight, replies matched by "ID".

    Two ways to use it. `submit(id, line, on_reply)` is the lean one: no future, no task; the
    callback runs from the reader when the reply arrives (the lab's workload drives tens of
    thousands of operations per second this way). `request(message)` is the convenient one: it
    awaits the reply. Neither raises for a network failure: a timeout or a lost connection becomes
    an indefinite error reply (DEFINITE false), which tells the caller to retry with the same id.
    """

    _ids = itertools.count(1)

    def __init__(self, stream: MessageStream, *, request_timeout_s: float, max_in_flight: int) -> None:
        assert request_timeout_s > 0 and max_in_flight > 0
        self.stream = stream
        self.request_timeout_s = request_timeout_s
        self.max_in_flight = max_in_flight
        # id -> [(deadline, callback), ...] in send order (the same id may be in flight twice when
        # a caller retries before the first attempt timed out).
        self._pending: dict[object, list[tuple[float, ReplyCallback]]] = {}
        self._in_flight = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tag = f"c{os.getpid()}.{next(self._ids)}."
        self._next_request = itertools.count(1)
        self.unmatched_replies = 0
        self._reader_task = asyncio.create_task(self._read_replies())
        self._sweeper_task = asyncio.create_task(self._sweep_timeouts())

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        connect_timeout_s: float = 2.0,
        request_timeout_s: float = 5.0,
        max_in_flight: int = 1024,
        max_line_bytes: int = wire.MAX_LINE_BYTES,
        source_host: str | None = None,
    ) -> "Connection":
        """Connect, or raise OSError / TimeoutError."""
        async with asyncio.timeout(connect_timeout_s):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                limit=2 * wire.READ_CHUNK_BYTES,
                local_addr=(source_host, 0) if source_host else None,
            )
        stream = MessageStream(reader, writer, max_line_bytes=max_line_bytes)
        return cls(stream, request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)

    @property
    def closed(self) -> bool:
        return self.stream.closed

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def new_request_id(self) -> str:
        return f"{self._tag}{next(self._next_request)}"

    def submit(self, request_id: object, line: bytes, on_reply: ReplyCallback, timeout_s: float | None = None) -> None:
        """Send a line (a request with this "ID") now; `on_reply(reply)` runs exactly once."""
        if self.stream.closed:
            on_reply(indefinite_reply("CONNECTION_LOST", "the connection is closed", request_id))
            return
        if self._in_flight >= self.max_in_flight:
            on_reply(error_reply("OVERLOADED", f"{self._in_flight} requests in flight on this connection", request_id))
            return
        deadline = time.monotonic() + (self.request_timeout_s if timeout_s is None else timeout_s)
        waiters = self._pending.get(request_id)
        if waiters is None:
            self._pending[request_id] = [(deadline, on_reply)]
        else:
            waiters.append((deadline, on_reply))
        self._in_flight += 1
        self.stream.send_bytes(line)

    async def request(self, message: dict, *, timeout_s: float | None = None) -> dict:
        """Send one request and wait for its reply (or a synthesized indefinite error)."""
        request_id = message.get("ID")
        if request_id is None:
            request_id = message["ID"] = self.new_request_id()
        return await self.request_bytes(request_id, wire.encode(message), timeout_s=timeout_s)

    async def request_bytes(self, request_id: object, line: bytes, *, timeout_s: float | None = None) -> dict:
        """Like request(), for a line the caller encoded itself with this request id."""
        async with self._slots:
            future = asyncio.get_running_loop().create_future()
            self.submit(request_id, line, future_resolver(future), timeout_s)
            return await future

    def send(self, message: dict) -> None:
        """Send a message that expects no reply."""
        self.stream.send(message)

    async def _read_replies(self) -> None:
        pending = self._pending
        try:
            while True:
                batch = await self.stream.read_batch()
                if batch is None:
                    break
                for reply in batch:
                    if isinstance(reply, SaldoError):
                        self.unmatched_replies += 1
                        continue
                    waiters = pending.pop(reply.get("ID"), None)
                    if waiters is None:
                        self.unmatched_replies += 1
                        continue
                    self._in_flight -= len(waiters)
                    for _deadline, on_reply in waiters:
                        on_reply(reply)
                # What the callbacks sent back on this connection (a pipelining client's next
                # requests) leaves now, not after whatever else this turn of the loop runs.
                self.stream.flush()
        finally:
            self._fail_all("CONNECTION_LOST", "the connection closed before the reply")

    async def _sweep_timeouts(self) -> None:
        period_s = min(0.05, self.request_timeout_s / 4)
        pending = self._pending
        while not self.stream.closed:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            expired = []
            # Oldest first (dicts keep insertion order): stop at the first one still in time.
            for request_id, waiters in pending.items():
                if waiters[0][0] > now:
                    break
                expired.append(request_id)
            for request_id in expired:
                waiters = pending.pop(request_id)
                in_time = [w for w in waiters if w[0] > now]
                if in_time:
                    pending[request_id] = in_time  # a later retry of the same id is still waiting
                for _deadline, on_reply in waiters:
                    if _deadline <= now:
                        self._in_flight -= 1
                        on_reply(indefinite_reply("TIMEOUT", "no reply in time", request_id))

    def _fail_all(self, code: str, detail: str) -> None:
        pending, self._pending = self._pending, {}
        for request_id, waiters in pending.items():
            for _deadline, on_reply in waiters:
                on_reply(indefinite_reply(code, detail, request_id))
        self._in_flight = 0

    async def close(self) -> None:
        await self.stream.close()
        for task in (self._reader_task, self._sweeper_task):
            task.cancel()
        await asyncio.gather(self._reader_task, self._sweeper_task, return_exceptions=True)
        self._fail_all("CONNECTION_LOST", "the connection was closed by the client")
