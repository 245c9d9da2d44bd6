"""The blocking transport: plain sockets and `selectors`, for simple clients and small servers.

Owns the same behaviour as common/transport/aio.py for programs that do not want an event loop: a worker
that asks a server for tasks, a command-line client, a test peer. It shares the codec
(common/transport/wire.py), so both transports frame, limit and reject input identically:

- `BlockingConnection`: a client; `request()` sends one message and waits for the reply with the
  same "ID" (replies to other ids that arrive meanwhile are kept for their own `request()`), and
  turns a timeout or a lost connection into an indefinite error reply.
- `SelectorServer`: a single-threaded server over `selectors`; `handler(message)` returns the
  reply (or a list of replies, or None). It answers decoding errors, closes on an oversize line,
  and drops a peer that stalls mid-line.
"""

from __future__ import annotations

import itertools
import os
import selectors
import socket
import threading
import time
from typing import Callable

from common.bank.errors import SaldoError, error_reply
from common.log import get_logger
from common.transport import wire
from common.transport.aio import listen_failure

log = get_logger("blocking")

PARTIAL_LINE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256
# Replies that arrived for other ids while a request() waited: bounded, oldest dropped.
MAX_STASHED_REPLIES = 4096


class BlockingConnection:
    """A client connection over a blocking socket, with selectors for timeouts."""

    _ids = itertools.count(1)

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout_s: float = 2.0,
        max_line_bytes: int = wire.MAX_LINE_BYTES,
        source_host: str | None = None,
    ) -> None:
        self._sock = socket.create_connection(
            (host, port), timeout=connect_timeout_s, source_address=(source_host, 0) if source_host else None
        )
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._splitter = wire.LineSplitter(max_line_bytes)
        self._inbox: list[dict | SaldoError] = []
        self._stash: dict[object, dict] = {}
        self._closed = False
        self._tag = f"b{os.getpid()}.{next(self._ids)}."
        self._next_request = itertools.count(1)
        self.peer = f"{host}:{port}"

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, message: dict, timeout_s: float = 5.0) -> None:
        self.send_bytes(wire.encode(message), timeout_s)

    def send_bytes(self, data: bytes, timeout_s: float = 5.0) -> None:
        """Send all of `data`, or raise TimeoutError / ConnectionError."""
        if self._closed:
            raise ConnectionError("connection closed")
        view = memoryview(data)
        deadline = time.monotonic() + timeout_s
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self.close()
                raise ConnectionError(str(error)) from None
            view = view[sent:]
            if view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("send timed out")
                with selectors.DefaultSelector() as writable:
                    writable.register(self._sock, selectors.EVENT_WRITE)
                    writable.select(remaining)

    def receive(self, timeout_s: float) -> dict | SaldoError | None:
        """The next message (or the decoding error in its place); None once the connection is over.

        Raises TimeoutError when nothing complete arrives in time.
        """
        deadline = time.monotonic() + timeout_s
        while not self._inbox:
            if self._closed:
                return None
            if self._splitter.overflowed:
                self.close()
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message in time")
            if not self._selector.select(remaining):
                continue
            try:
                data = self._sock.recv(wire.READ_CHUNK_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                self.close()
                return None
            if not data:
                self.close()
                return None
            self._inbox.extend(wire.decode_lines(self._splitter.feed(data)))
        return self._inbox.pop(0)

    def new_request_id(self) -> str:
        return f"{self._tag}{next(self._next_request)}"

    def request(self, message: dict, timeout_s: float = 5.0) -> dict:
        """Send `message` and return the reply with its "ID", or an indefinite error reply."""
        request_id = message.get("ID")
        if request_id is None:
            request_id = message["ID"] = self.new_request_id()
        try:
            self.send(message, timeout_s)
        except (ConnectionError, TimeoutError) as error:
            return error_reply("CONNECTION_LOST", str(error), request_id)
        return self.wait_reply(request_id, timeout_s)

    def wait_reply(self, request_id: object, timeout_s: float) -> dict:
        stashed = self._stash.pop(request_id, None)
        if stashed is not None:
            return stashed
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self.receive(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return error_reply("TIMEOUT", "no reply in time", request_id)
            if reply is None:
                return error_reply("CONNECTION_LOST", "the connection closed before the reply", request_id)
            if isinstance(reply, SaldoError):
                continue
            reply_id = reply.get("ID")
            if reply_id == request_id or reply_id is None:
                return reply
            if len(self._stash) >= MAX_STASHED_REPLIES:
                self._stash.pop(next(iter(self._stash)))
            self._stash[reply_id] = reply

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._selector.close()
        finally:
            self._sock.close()

    def __enter__(self) -> "BlockingConnection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


Reply = dict | list[dict] | None


class _Peer:
    __slots__ = ("sock", "address", "splitter", "out", "mid_line_since", "closing")

    def __init__(self, sock: socket.socket, address: str, max_line_bytes: int) -> None:
        self.sock = sock
        self.address = address
        self.splitter = wire.LineSplitter(max_line_bytes)
        self.out = bytearray()
        self.mid_line_since: float | None = None
        self.closing = False


class SelectorServer:
    """A single-threaded newline-JSON server; `handler(message) -> reply | [replies] | None`."""

    def __init__(
        self,
        handler: Callable[[dict], Reply],
        *,
        name: str = "selector-server",
        max_line_bytes: int = wire.MAX_LINE_BYTES,
        partial_line_timeout_s: float = PARTIAL_LINE_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._handler = handler
        self.name = name
        self.max_line_bytes = max_line_bytes
        self.partial_line_timeout_s = partial_line_timeout_s
        self.max_connections = max_connections
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._peers: dict[int, _Peer] = {}
        self._stop = threading.Event()
        self.address: tuple[str, int] | None = None

    def bind(self, host: str, port: int) -> tuple[str, int]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as error:
            listener.close()
            raise SystemExit(listen_failure(self.name, host, port, error)) from None
        listener.listen(128)
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._listener = listener
        self.address = listener.getsockname()[:2]
        log.info("listening", server=self.name, host=self.address[0], port=self.address[1])
        return self.address

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self, poll_interval_s: float = 0.1) -> None:
        assert self._listener is not None, "bind() first"
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(poll_interval_s):
                    if key.data is None:
                        self._accept()
                    else:
                        peer = key.data
                        if events & selectors.EVENT_READ:
                            self._on_readable(peer)
                        if events & selectors.EVENT_WRITE and not self._is_gone(peer):
                            self._flush(peer)
                self._drop_stalled_peers()
        finally:
            for peer in list(self._peers.values()):
                self._drop(peer)
            self._selector.unregister(self._listener)
            self._listener.close()
            self._selector.close()

    def _is_gone(self, peer: _Peer) -> bool:
        return peer.sock.fileno() < 0 or peer.sock.fileno() not in self._peers

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, address = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        peer = _Peer(sock, f"{address[0]}:{address[1]}", self.max_line_bytes)
        if len(self._peers) >= self.max_connections:
            try:
                sock.send(wire.encode(error_reply("OVERLOADED", f"{self.name} is at its connection bound")))
            except OSError:
                pass
            sock.close()
            return
        self._peers[sock.fileno()] = peer
        self._selector.register(sock, selectors.EVENT_READ, peer)

    def _on_readable(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(wire.READ_CHUNK_BYTES)
        except BlockingIOError:
            return
        except OSError:
            self._drop(peer)
            return
        if not data:
            self._drop(peer)
            return
        if peer.closing:  # Past an oversize line nothing more is read; the error reply is on its way.
            return
        lines = peer.splitter.feed(data)
        for item in wire.decode_lines(lines):
            if isinstance(item, SaldoError):
                self._queue(peer, [error_reply(item.code, item.detail)])
                continue
            try:
                reply = self._handler(item)
            except SaldoError as error:
                reply = error_reply(error.code, error.detail, _echoable_id(item))
            except Exception as error:  # A handler bug must not take the server down.
                log.exception("handler_failed", server=self.name, peer=peer.address, error=repr(error))
                reply = error_reply("INTERNAL", "the handler failed")
            if reply is not None:
                self._queue(peer, reply if isinstance(reply, list) else [reply])
        if peer.splitter.overflowed:
            self._queue(peer, [error_reply("LINE_TOO_LONG", f"a line exceeded {self.max_line_bytes} bytes")])
            log.warning("line_too_long", server=self.name, peer=peer.address)
            peer.closing = True
        peer.mid_line_since = (peer.mid_line_since or time.monotonic()) if peer.splitter.partial_bytes else None
        self._flush(peer)

    def _queue(self, peer: _Peer, replies: list[dict]) -> None:
        peer.out += wire.encode_many(replies)

    def _flush(self, peer: _Peer) -> None:
        if peer.out:
            try:
                sent = peer.sock.send(peer.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(peer)
                return
            del peer.out[:sent]
        if peer.out:
            self._selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, peer)
            return
        if peer.closing:
            self._drop(peer)
            return
        self._selector.modify(peer.sock, selectors.EVENT_READ, peer)

    def _drop_stalled_peers(self) -> None:
        now = time.monotonic()
        for peer in list(self._peers.values()):
            if peer.mid_line_since is not None and now - peer.mid_line_since > self.partial_line_timeout_s:
                log.warning("read_timeout", server=self.name, peer=peer.address, partial_bytes=peer.splitter.partial_bytes)
                self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        fileno = peer.sock.fileno()
        if fileno >= 0 and self._peers.pop(fileno, None) is not None:
            self._selector.unregister(peer.sock)
        peer.sock.close()


def _echoable_id(message: dict) -> str | int | None:
    try:
        return wire.request_id_of(message)
    except SaldoError:
        return None


def serve_in_thread(server: SelectorServer) -> threading.Thread:
    """Run a bound SelectorServer in a daemon thread (for tests and small embedded servers)."""
    thread = threading.Thread(target=server.serve_forever, name=server.name, daemon=True)
    thread.start()
    return thread
