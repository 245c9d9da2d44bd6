"""The fault proxy: a TCP proxy on one link between two processes, with faults on command.

    python -m common.lab.proxy --listen 127.0.0.1:41001 --target 127.0.0.12:6003 --port 41002

Owns how the lab partitions, slows and breaks links on one machine. The connecting side talks to
`--listen` instead of the target; the proxy forwards each connection to `--target`. Its control
port (`--port`, newline JSON like every saldo port) takes:

    {"TASK": "FAULT", "ACTION": "partition", "DIRECTION": "both" | "up" | "down"}
    {"TASK": "FAULT", "ACTION": "delay", "DELAY_MS": 50, "DIRECTION": "both" | "up" | "down"}
    {"TASK": "FAULT", "ACTION": "drop"}        close every current connection (a reset)
    {"TASK": "FAULT", "ACTION": "heal"}        no partition, no delay
    {"TASK": "STATUS"}

"up" is the direction from the connecting side to the target, "down" the way back. A partition
is a silent stall, as on a real network: bytes in a cut direction are not forwarded (and not
lost: TCP would deliver them after healing, and so does the proxy, unless a process gave up on the
connection first); a new connection is accepted but not forwarded until the link heals, as a
connection attempt across a partition hangs. A delay holds each chunk for the given time, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time

from common import topology
from common.bank.errors import SaldoError, error_reply
from common.log import get_logger
from common.process import add_common_flags, run
from common.transport import aio, peers

log = get_logger("proxy")

CHUNK_BYTES = 64 * 1024
# Bytes a delayed direction may hold before its reader waits (backpressure, not growth).
MAX_DELAYED_BYTES = 8 * 1024 * 1024
DIRECTIONS = ("up", "down")


class _Direction:
    """The state of one direction of the link: cut or not, and its delay."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.delay_s = 0.0

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()
        self.delay_s = 0.0


class LinkProxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, name: str = "proxy") -> None:
        self.listen = listen
        self.target = target
        self.name = name
        self.directions = {direction: _Direction() for direction in DIRECTIONS}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task] = set()
        self.connections_total = 0
        self.bytes_forwarded = {direction: 0 for direction in DIRECTIONS}

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, *self.listen, reuse_address=True)
        self.listen = self._server.sockets[0].getsockname()[:2]
        log.info("proxy_listening", proxy=self.name, listen=f"{self.listen[0]}:{self.listen[1]}",
                 target=f"{self.target[0]}:{self.target[1]}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- Faults ---------------------------------------------------------------------------------
    def _selected(self, direction: str) -> list[_Direction]:
        if direction == "both":
            return list(self.directions.values())
        if direction not in self.directions:
            raise SaldoError("FIELD_INVALID", "DIRECTION must be both, up or down")
        return [self.directions[direction]]

    def partition(self, direction: str = "both") -> None:
        for state in self._selected(direction):
            state.cut()
        log.info("fault_partition", proxy=self.name, direction=direction)

    def delay(self, delay_ms: float, direction: str = "both") -> None:
        for state in self._selected(direction):
            state.delay_s = delay_ms / 1000.0
        log.info("fault_delay", proxy=self.name, direction=direction, delay_ms=delay_ms)

    def heal(self) -> None:
        for state in self.directions.values():
            state.heal()
        log.info("fault_heal", proxy=self.name)

    def drop(self) -> None:
        dropped = 0
        for client_writer, target_writer in list(self._connections):
            for writer in (client_writer, target_writer):
                if writer is not None:
                    writer.transport.abort()
            dropped += 1
        self._connections.clear()
        log.info("fault_drop", proxy=self.name, connections=dropped)

    def state(self) -> dict:
        return {
            "PARTITIONED": [d for d, s in self.directions.items() if not s.open.is_set()],
            "DELAY_MS": {d: round(s.delay_s * 1000, 3) for d, s in self.directions.items()},
            "CONNECTIONS": len(self._connections),
            "CONNECTIONS_TOTAL": self.connections_total,
            "BYTES_FORWARDED": dict(self.bytes_forwarded),
        }

    # --- Forwarding -----------------------------------------------------------------------------
    async def _on_client(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        pair: tuple = (client_writer, None)
        self._connections.add(pair)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            # Across a partition a connection attempt hangs: wait until both directions are open.
            for state in self.directions.values():
                await state.open.wait()
            if pair not in self._connections:  # dropped while waiting
                return
            try:
                # From the host it listens on: the link's own host, which the target checks.
                source = peers.source_address(self.listen[0])
                target_reader, target_writer = await asyncio.open_connection(
                    *self.target, local_addr=(source, 0) if source else None)
            except OSError:
                client_writer.transport.abort()
                return
            self._connections.discard(pair)
            pair = (client_writer, target_writer)
            self._connections.add(pair)
            await asyncio.gather(
                self._pump(client_reader, target_writer, "up"),
                self._pump(target_reader, client_writer, "down"),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            # The proxy is stopping (stop() cancels its connections): ending cancelled would make
            # Python 3.11's stream callback log a traceback (see common/transport/aio.py Server).
            return
        finally:
            self._connections.discard(pair)
            for writer in pair:
                if writer is not None:
                    writer.transport.abort()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        state = self.directions[direction]
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        queued_bytes = 0
        wake = asyncio.Event()
        done = False

        async def deliver() -> None:
            nonlocal queued_bytes
            while True:
                while not queue:
                    if done:
                        return
                    wake.clear()
                    await wake.wait()
                due_at, data = queue[0]
                now = time.monotonic()
                if due_at > now:
                    await asyncio.sleep(due_at - now)
                await state.open.wait()
                queue.popleft()
                queued_bytes -= len(data)
                writer.write(data)
                self.bytes_forwarded[direction] += len(data)
                await writer.drain()

        deliverer = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                queue.append((time.monotonic() + state.delay_s, data))
                queued_bytes += len(data)
                wake.set()
                while queued_bytes > MAX_DELAYED_BYTES and not deliverer.done():
                    await asyncio.sleep(0.005)
        finally:
            done = True
            wake.set()
            try:
                await deliverer
            finally:
                writer.transport.abort()


async def handle_control(proxy: LinkProxy, stream: aio.MessageStream) -> None:
    while True:
        batch = await stream.read_batch()
        if batch is None:
            return
        for message in batch:
            stream.send(control_reply(proxy, message))


def control_reply(proxy: LinkProxy, message: dict | SaldoError) -> dict:
    if isinstance(message, SaldoError):
        return error_reply(message.code, message.detail)
    request_id = message.get("ID") if type(message.get("ID")) in (str, int) else None
    try:
        task = message.get("TASK")
        if task == "STATUS":
            return {"ID": request_id, "STATUS": "OK", "ROLE": "proxy", "NODE": proxy.name, "PID": os.getpid(),
                    "LOOP": aio.LoopMonitor.snapshot(), **proxy.state()}
        if task != "FAULT":
            raise SaldoError("UNKNOWN_MESSAGE", "expected TASK STATUS or FAULT")
        action = message.get("ACTION")
        direction = message.get("DIRECTION", "both")
        if type(direction) is not str:
            raise SaldoError("FIELD_TYPE", "DIRECTION must be a string")
        if action == "partition":
            proxy.partition(direction)
        elif action == "delay":
            delay_ms = message.get("DELAY_MS")
            if type(delay_ms) is not int or not 0 <= delay_ms <= 60_000:
                raise SaldoError("FIELD_INVALID", "DELAY_MS must be an integer from 0 to 60000")
            proxy.delay(delay_ms, direction)
        elif action == "drop":
            proxy.drop()
        elif action == "heal":
            proxy.heal()
        else:
            raise SaldoError("FIELD_INVALID", "ACTION must be partition, delay, drop or heal")
        return {"ID": request_id, "STATUS": "OK", **proxy.state()}
    except SaldoError as error:
        return error_reply(error.code, error.detail, request_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="control address")
    parser.add_argument("--port", type=int, required=False, help="control port")
    parser.add_argument("--listen", required=False, help="host:port the connecting side uses")
    parser.add_argument("--target", required=False, help="host:port of the real destination")
    args = topology.parse_args(parser, argv)
    if not (args.port and args.listen and args.target):
        parser.error("--port, --listen and --target are required")
    name = args.name or f"proxy-{args.listen}"

    async def serve(stop: asyncio.Event) -> int:
        proxy = LinkProxy(topology.parse_address(args.listen), topology.parse_address(args.target), name=name)
        await proxy.start()
        control = await aio.start_server(lambda stream: handle_control(proxy, stream), args.host, args.port, name="proxy-control")
        await stop.wait()
        await control.stop()
        await proxy.stop()
        return 0

    return run(serve, node_name=name, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
