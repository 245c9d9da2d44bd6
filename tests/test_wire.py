"""The wire codec, on real sockets, through both transports (asyncio and selectors), and its clients.

Every scenario runs against a real listening socket on 127.0.0.1 (ephemeral port), once per server
implementation; the client side is a plain blocking socket so the bytes on the wire are exactly
the ones the test writes. The documented outcomes (common/transport/wire.py, common/transport/aio.py,
common/transport/blocking.py):

- a line arriving in pieces is answered once, when its newline arrives;
- lines arriving together are answered in order;
- an oversize line: the good lines before it are answered, then LINE_TOO_LONG, then the close;
- INVALID_UTF8 / INVALID_JSON / NOT_OBJECT: answered, and the connection stays usable;
- a peer stalled mid-line is dropped after the partial-line timeout (and not before);
- blank lines are ignored, "\\r\\n" works, an ID is echoed, an ID that cannot be echoed is ID_INVALID.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bank.errors import SaldoError, error_reply
from common.transport import aio, wire
from common.transport.blocking import BlockingConnection, SelectorServer, serve_in_thread

HOST = "127.0.0.1"
SMALL_LIMIT = 1024


# --- Servers under test -------------------------------------------------------------------------


def ok_reply(message: dict) -> dict:
    """What the test servers answer to a decodable line: its ID (checked) and its N."""
    request_id = wire.request_id_of(message)  # raises ID_INVALID
    reply: dict = {} if request_id is None else {"ID": request_id}
    reply["STATUS"] = "OK"
    reply["N"] = message.get("N")
    return reply


def answer(item: dict | SaldoError) -> dict:
    if isinstance(item, SaldoError):
        return error_reply(item.code, item.detail)
    try:
        return ok_reply(item)
    except SaldoError as error:
        return error_reply(error.code, error.detail)


async def echo_handler(stream: aio.MessageStream) -> None:
    while (batch := await stream.read_batch()) is not None:
        for item in batch:
            stream.send(answer(item))


class LoopThread:
    """An asyncio event loop in a background thread, for servers the blocking tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()
        self._servers: list[aio.Server] = []

    def run(self, coroutine, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def start_server(self, handler, **options) -> tuple[str, int]:
        server = self.run(aio.start_server(handler, HOST, 0, name="test-aio", **options))
        self._servers.append(server)
        assert server.address is not None
        return server.address

    def close(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                await server.stop()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(params=["asyncio", "selectors"])
def start_server(request, loop_thread):
    """start_server(**options) -> (host, port) of an echo server of the parametrized kind."""
    selector_servers: list[tuple[SelectorServer, threading.Thread]] = []

    def start(**options) -> tuple[str, int]:
        if request.param == "asyncio":
            return loop_thread.start_server(echo_handler, **options)
        server = SelectorServer(ok_reply, name="test-selectors", **options)
        address = server.bind(HOST, 0)
        selector_servers.append((server, serve_in_thread(server)))
        return address

    yield start
    for server, thread in selector_servers:
        stop_selector_server(server, thread)


def stop_selector_server(server: SelectorServer, thread: threading.Thread) -> None:
    server.stop()
    try:  # wake its select() at once instead of waiting for the poll interval
        socket.create_connection(server.address, timeout=1).close()
    except OSError:
        pass
    thread.join(5)
    assert not thread.is_alive()


class Peer:
    """A raw client socket: writes exactly the given bytes, reads reply lines."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_pieces(self, data: bytes, piece_bytes: int = 1, pause_s: float = 0.001) -> None:
        for start in range(0, len(data), piece_bytes):
            self.sock.sendall(data[start : start + piece_bytes])
            time.sleep(pause_s)

    def reply(self, timeout_s: float = 5.0) -> dict:
        self.sock.settimeout(timeout_s)
        while b"\n" not in self._buffer:
            data = self.sock.recv(65536)
            assert data, f"connection closed while a reply was expected (buffered {self._buffer!r})"
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        message = json.loads(line)
        assert type(message) is dict
        return message

    def replies(self, count: int) -> list[dict]:
        return [self.reply() for _ in range(count)]

    def wait_closed(self, timeout_s: float = 5.0) -> float:
        """Seconds until the server closes the connection; fails if more replies arrive first."""
        started = time.monotonic()
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(65536)
        elapsed = time.monotonic() - started
        assert self._buffer == b"" and data == b"", f"expected the close, got {self._buffer + data!r}"
        return elapsed

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect():
    peers: list[Peer] = []

    def opener(address: tuple[str, int]) -> Peer:
        peer = Peer(address)
        peers.append(peer)
        return peer

    yield opener
    for peer in peers:
        peer.close()


def line(message: dict) -> bytes:
    return wire.encode(message)


def assert_error(reply: dict, code: str) -> None:
    """Every error reply: STATUS NOK, the code, a detail, and DEFINITE true for these codes."""
    assert reply["STATUS"] == "NOK", reply
    assert reply["ERROR"] == code, reply
    assert type(reply["DETAIL"]) is str and reply["DETAIL"], reply
    assert reply["DEFINITE"] is True, reply


def assert_ok(reply: dict, n: object, request_id: object = None) -> None:
    assert reply["STATUS"] == "OK", reply
    assert reply["N"] == n, reply
    assert reply.get("ID") == request_id, reply


# --- Framing on a real socket, both servers -----------------------------------------------------


def test_a_line_split_across_many_small_writes_is_answered_once(start_server, connect):
    peer = connect(start_server())
    peer.send_in_pieces(line({"ID": "split", "N": 1}), piece_bytes=1)
    peer.send_in_pieces(line({"ID": "pieces", "N": 2}), piece_bytes=5)
    peer.send(line({"ID": "after", "N": 3}))
    # Exactly one reply per line: the reply after the two split lines is the third line's.
    assert_ok(peer.reply(), 1, "split")
    assert_ok(peer.reply(), 2, "pieces")
    assert_ok(peer.reply(), 3, "after")


def test_a_newline_arriving_alone_completes_the_line(start_server, connect):
    peer = connect(start_server())
    peer.send(b'{"N": 7}')
    time.sleep(0.02)
    peer.send(b"\n")
    assert_ok(peer.reply(), 7)


def test_several_lines_in_one_write_are_each_answered_in_order(start_server, connect):
    peer = connect(start_server())
    peer.send(b"".join(line({"ID": f"r{n}", "N": n}) for n in range(200)))
    for n, reply in enumerate(peer.replies(200)):
        assert_ok(reply, n, f"r{n}")


def test_an_oversize_line_is_refused_and_the_connection_closed(start_server, connect):
    peer = connect(start_server(max_line_bytes=SMALL_LIMIT))
    peer.send(b'{"P": "' + b"x" * (2 * SMALL_LIMIT) + b'"}\n')
    assert_error(peer.reply(), "LINE_TOO_LONG")
    peer.wait_closed()


def test_an_oversize_line_still_arriving_is_refused_before_its_end(start_server, connect):
    peer = connect(start_server(max_line_bytes=SMALL_LIMIT))
    peer.send(b"x" * (SMALL_LIMIT + 1))  # no newline yet: already too long
    assert_error(peer.reply(), "LINE_TOO_LONG")
    peer.wait_closed()


def test_good_lines_before_an_oversize_one_are_answered_first(start_server, connect):
    peer = connect(start_server(max_line_bytes=SMALL_LIMIT))
    peer.send(line({"N": 1}) + line({"N": 2}) + b'{"N": 3, "P": "' + b"x" * SMALL_LIMIT + b'"}\n' + line({"N": 4}))
    assert_ok(peer.reply(), 1)
    assert_ok(peer.reply(), 2)
    assert_error(peer.reply(), "LINE_TOO_LONG")  # and nothing for N=4: the stream is abandoned
    peer.wait_closed()


def test_the_default_limit_is_64_kib(start_server, connect):
    assert wire.MAX_LINE_BYTES == 64 * 1024
    peer = connect(start_server())

    def line_of(size: int, n: int) -> bytes:
        head = b'{"N": %d, "P": "' % n
        body = head + b"x" * (size - len(head) - 2) + b'"}'
        assert len(body) == size
        return body + b"\n"

    peer.send(line_of(wire.MAX_LINE_BYTES, 1))  # exactly at the limit: fine
    assert_ok(peer.reply(), 1)
    peer.send(line_of(wire.MAX_LINE_BYTES + 1, 2))
    assert_error(peer.reply(), "LINE_TOO_LONG")
    peer.wait_closed()


@pytest.mark.parametrize(
    "bad_line, code",
    [
        (b'{"N": "\xff\xfe"}', "INVALID_UTF8"),
        (b"\xc3\x28", "INVALID_UTF8"),
        (b'{"N": 1', "INVALID_JSON"),
        (b"{'N': 1}", "INVALID_JSON"),
        (b'{"N": 1} {"N": 2}', "INVALID_JSON"),
        (b"[1]", "NOT_OBJECT"),
        (b"3", "NOT_OBJECT"),
        (b'"text"', "NOT_OBJECT"),
        (b"null", "NOT_OBJECT"),
    ],
)
def test_an_undecodable_line_is_answered_and_the_connection_stays_usable(start_server, connect, bad_line, code):
    peer = connect(start_server())
    peer.send(bad_line + b"\n")
    assert_error(peer.reply(), code)
    peer.send(line({"ID": "next", "N": 2}))
    assert_ok(peer.reply(), 2, "next")


def test_a_stalled_half_line_is_dropped_after_the_partial_line_timeout(start_server, connect):
    timeout_s = 0.3
    peer = connect(start_server(partial_line_timeout_s=timeout_s))
    peer.send(b'{"ID": "half", "N"')
    elapsed = peer.wait_closed(timeout_s=5)
    assert timeout_s * 0.8 <= elapsed <= timeout_s + 1.5, elapsed


def test_an_idle_connection_between_lines_is_not_dropped_by_the_partial_line_timeout(start_server, connect):
    peer = connect(start_server(partial_line_timeout_s=0.15))
    peer.send(line({"N": 1}))
    assert_ok(peer.reply(), 1)
    time.sleep(0.4)  # well past the partial-line timeout, but no line is half sent
    peer.send(line({"N": 2}))
    assert_ok(peer.reply(), 2)


def test_blank_lines_are_ignored(start_server, connect):
    peer = connect(start_server())
    peer.send(b"\n\n   \n\t\r\n\r\n")
    peer.send(line({"N": 1}))
    assert_ok(peer.reply(), 1)  # the first reply is the first real line's


def test_crlf_line_endings(start_server, connect):
    peer = connect(start_server())
    peer.send(b'{"ID": "crlf", "N": 1}\r\n{"N": 2}\r\n')
    assert_ok(peer.reply(), 1, "crlf")
    assert_ok(peer.reply(), 2)


@pytest.mark.parametrize("request_id", ["abc-123", "", "x" * wire.MAX_REQUEST_ID_CHARS, 42, -7, 2**53 - 1])
def test_an_id_is_echoed(start_server, connect, request_id):
    peer = connect(start_server())
    peer.send(line({"ID": request_id, "N": 5}))
    assert_ok(peer.reply(), 5, request_id)


@pytest.mark.parametrize(
    "raw_id",
    [b"1.5", b"1e3", b'"' + b"x" * 100 + b'"', b"9007199254740992", b"true", b"[1]", b'{"a": 1}'],
)
def test_an_id_that_cannot_be_echoed_is_refused(start_server, connect, raw_id):
    peer = connect(start_server())
    peer.send(b'{"ID": ' + raw_id + b', "N": 1}\n')
    reply = peer.reply()
    assert_error(reply, "ID_INVALID")
    assert "ID" not in reply
    peer.send(line({"ID": "ok", "N": 2}))
    assert_ok(peer.reply(), 2, "ok")


# --- The asyncio client: common.transport.aio.Connection -----------------------------------------


def reversing_handler(batch_sizes: list[int]):
    """A server that answers each batch it reads in reverse order."""

    async def handler(stream: aio.MessageStream) -> None:
        while (batch := await stream.read_batch()) is not None:
            batch_sizes.append(len(batch))
            for item in reversed(batch):
                stream.send(answer(item))

    return handler


async def silent_handler(stream: aio.MessageStream) -> None:
    while await stream.read_batch() is not None:
        pass


async def closing_handler(stream: aio.MessageStream) -> None:
    await stream.read_batch()  # the request arrived; the server goes away without answering
    stream.abort()


def assert_indefinite(reply: dict, code: str, request_id: object) -> None:
    assert reply["STATUS"] == "NOK", reply
    assert reply["ERROR"] == code, reply
    assert reply["DEFINITE"] is False, reply
    assert reply["ID"] == request_id, reply
    assert reply["DETAIL"]


def test_aio_connection_pipelines_and_matches_replies_answered_out_of_order(loop_thread):
    batch_sizes: list[int] = []
    host, port = loop_thread.start_server(reversing_handler(batch_sizes))

    async def scenario() -> None:
        connection = await aio.Connection.open(host, port, request_timeout_s=10, max_in_flight=1000)
        try:
            replies = await asyncio.gather(*(connection.request({"N": n}) for n in range(500)))
            for n, reply in enumerate(replies):
                assert reply["STATUS"] == "OK" and reply["N"] == n, (n, reply)
            assert len({reply["ID"] for reply in replies}) == 500
            assert connection.unmatched_replies == 0
        finally:
            await connection.close()

    asyncio.run(scenario())
    assert sum(batch_sizes) == 500
    assert max(batch_sizes) > 1, "the server never saw two requests at once: nothing was out of order"


def test_aio_connection_request_that_gets_no_reply_times_out_indefinite(loop_thread):
    host, port = loop_thread.start_server(silent_handler)

    async def scenario() -> tuple[dict, float]:
        connection = await aio.Connection.open(host, port, request_timeout_s=0.3)
        try:
            started = time.monotonic()
            reply = await connection.request({"ID": "t-1", "N": 1})
            return reply, time.monotonic() - started
        finally:
            await connection.close()

    reply, elapsed = asyncio.run(scenario())
    assert_indefinite(reply, "TIMEOUT", "t-1")
    assert 0.25 <= elapsed <= 2.0, elapsed


def test_aio_connection_lost_mid_request_is_indefinite(loop_thread):
    host, port = loop_thread.start_server(closing_handler)

    async def scenario() -> tuple[dict, dict, float]:
        connection = await aio.Connection.open(host, port, request_timeout_s=5)
        try:
            started = time.monotonic()
            first = await connection.request({"ID": "c-1", "N": 1})
            elapsed = time.monotonic() - started
            second = await connection.request({"ID": "c-2", "N": 2})  # on the closed connection
            return first, second, elapsed
        finally:
            await connection.close()

    first, second, elapsed = asyncio.run(scenario())
    assert_indefinite(first, "CONNECTION_LOST", "c-1")
    assert elapsed < 2.0, "the loss must be noticed at once, not at the request timeout"
    assert_indefinite(second, "CONNECTION_LOST", "c-2")


def test_aio_connection_talks_to_the_selectors_server():
    server = SelectorServer(ok_reply, name="test-selectors")
    host, port = server.bind(HOST, 0)
    thread = serve_in_thread(server)

    async def scenario() -> list[dict]:
        connection = await aio.Connection.open(host, port)
        try:
            return await asyncio.gather(*(connection.request({"N": n}) for n in range(100)))
        finally:
            await connection.close()

    try:
        replies = asyncio.run(scenario())
    finally:
        stop_selector_server(server, thread)
    assert [reply["N"] for reply in replies] == list(range(100))


# --- The blocking client: common.transport.blocking.BlockingConnection ---------------------------


def test_blocking_connection_matches_replies_answered_out_of_order(loop_thread):
    batch_sizes: list[int] = []
    host, port = loop_thread.start_server(reversing_handler(batch_sizes))
    with BlockingConnection(host, port) as connection:
        connection.send_bytes(wire.encode_many([{"ID": f"o{n}", "N": n} for n in range(3)]))
        # The server answers o2, o1, o0; each wait gets its own reply, the others are kept.
        assert_ok(connection.wait_reply("o0", 5), 0, "o0")
        assert_ok(connection.wait_reply("o1", 5), 1, "o1")
        assert_ok(connection.wait_reply("o2", 5), 2, "o2")
        assert batch_sizes == [3], "the three requests must reach the server together"
        for n in range(3, 50):
            message = {"N": n}
            reply = connection.request(message)  # assigns the message a fresh ID
            assert_ok(reply, n, message["ID"])


def test_blocking_connection_request_times_out_indefinite(loop_thread):
    host, port = loop_thread.start_server(silent_handler)
    with BlockingConnection(host, port) as connection:
        started = time.monotonic()
        reply = connection.request({"ID": "t-1", "N": 1}, timeout_s=0.3)
        elapsed = time.monotonic() - started
    assert_indefinite(reply, "TIMEOUT", "t-1")
    assert 0.25 <= elapsed <= 2.0, elapsed


def test_blocking_connection_lost_mid_request_is_indefinite(loop_thread):
    host, port = loop_thread.start_server(closing_handler)
    with BlockingConnection(host, port) as connection:
        started = time.monotonic()
        reply = connection.request({"ID": "c-1", "N": 1}, timeout_s=5)
        elapsed = time.monotonic() - started
        assert connection.closed
        again = connection.request({"ID": "c-2", "N": 2}, timeout_s=5)
    assert_indefinite(reply, "CONNECTION_LOST", "c-1")
    assert elapsed < 2.0
    assert_indefinite(again, "CONNECTION_LOST", "c-2")


def test_blocking_connection_talks_to_both_servers(start_server):
    host, port = start_server()
    with BlockingConnection(host, port) as connection:
        for n in range(20):
            assert_ok(connection.request({"ID": n, "N": n}), n, n)


# --- LineSplitter, directly ---------------------------------------------------------------------

LIMIT = 16
short_lines = st.lists(st.binary(max_size=LIMIT).map(lambda b: b.replace(b"\n", b"")), max_size=15)


def chop(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=200, deadline=None)
@given(short_lines, st.binary(max_size=LIMIT).map(lambda b: b.replace(b"\n", b"")), st.data())
def test_any_chopping_of_a_stream_yields_the_same_lines(lines, tail, data):
    stream = b"".join(item + b"\n" for item in lines) + tail
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
    splitter = wire.LineSplitter(LIMIT)
    seen: list[bytes] = []
    for chunk in chop(stream, cuts):
        seen.extend(splitter.feed(chunk))
        assert splitter.partial_bytes <= LIMIT
    assert seen == lines
    assert not splitter.overflowed
    assert splitter.partial_bytes == len(tail)  # the unfinished line is held, not returned


@settings(max_examples=100, deadline=None)
@given(
    short_lines,
    st.integers(min_value=LIMIT + 1, max_value=4 * LIMIT),
    st.booleans(),
    short_lines,
    st.data(),
)
def test_an_overlong_line_overflows_after_the_lines_before_it(before, long_length, finished, after, data):
    long_line = b"y" * long_length + (b"\n" if finished else b"")
    stream = b"".join(item + b"\n" for item in before) + long_line + b"".join(item + b"\n" for item in after)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=20))
    splitter = wire.LineSplitter(LIMIT)
    seen: list[bytes] = []
    for chunk in chop(stream, cuts):
        seen.extend(splitter.feed(chunk))
        assert splitter.partial_bytes <= LIMIT
        if splitter.overflowed:
            break
    assert splitter.overflowed
    assert seen == before
    assert splitter.partial_bytes == 0


def test_a_line_exactly_at_the_limit_is_fine_and_one_more_byte_is_not():
    splitter = wire.LineSplitter(LIMIT)
    assert splitter.feed(b"a" * LIMIT) == []
    assert splitter.feed(b"\n") == [b"a" * LIMIT]
    assert splitter.feed(b"b" * (LIMIT + 1)) == []
    assert splitter.overflowed
    with pytest.raises(AssertionError):
        splitter.feed(b"more")  # a transport must stop feeding after an overflow


# --- decode_line / encode -----------------------------------------------------------------------


def decode_error(data: bytes) -> str:
    with pytest.raises(SaldoError) as caught:
        wire.decode_line(data)
    return caught.value.code


def test_decode_line_skips_surrounding_whitespace_and_blank_lines():
    assert wire.decode_line(b' \t{"a": 1}\t \r') == {"a": 1}
    assert wire.decode_line(b"") is None
    assert wire.decode_line(b" \t\r") is None
    decoded = wire.decode_lines([b"", b'{"a": 1}', b"  ", b"[", b'{"b": 2}'])
    assert len(decoded) == 3  # the blank lines vanish; the bad line keeps its place
    assert decoded[0] == {"a": 1} and decoded[2] == {"b": 2}
    assert isinstance(decoded[1], SaldoError) and decoded[1].code == "INVALID_JSON"


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": 1} {"b": 2}',
        b'{"a": 1}x',
        b'{"a": 1}\x0c',
        b'{"a": 1',
        b"}",
        b'{"a": "\x01"}',  # a raw control character inside a string
        b"{'a': 1}",
        b'{"a": 1,}',
        b'{"a": ' + b"9" * 5000 + b"}",  # beyond the interpreter's integer-digit limit
        b"[" * 100_000 + b"]" * 100_000,  # nesting past the recursion limit
        b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    ],
)
def test_decode_line_refuses_what_is_not_one_json_value_without_crashing(data):
    assert decode_error(data) == "INVALID_JSON"


def test_decode_line_other_refusals():
    assert decode_error(b'{"a": "\xff"}') == "INVALID_UTF8"
    assert decode_error(b"\xed\xa0\x80") == "INVALID_UTF8"  # an encoded surrogate is not UTF-8
    assert decode_error(b"[1]") == "NOT_OBJECT"
    assert decode_error(b"3") == "NOT_OBJECT"


def test_decode_line_reads_fractions_as_decimal_and_integers_as_int():
    message = wire.decode_line(b'{"a": 10.5, "b": 1e2, "c": 7, "d": -0.10, "e": 12.345678901234567890123}')
    assert type(message["a"]) is Decimal and message["a"] == Decimal("10.5")
    assert type(message["b"]) is Decimal and message["b"] == 100
    assert type(message["c"]) is int and message["c"] == 7
    assert str(message["d"]) == "-0.10"
    assert str(message["e"]) == "12.345678901234567890123"  # every digit kept: no float in between


def test_nan_and_infinity_are_not_json_numbers():
    for data in (b'{"a": NaN}', b'{"a": Infinity}', b'{"AMOUNT": -Infinity}'):
        assert decode_error(data) == "INVALID_JSON"


def test_a_decoded_fraction_encodes_back_as_the_same_number():
    message = wire.decode_line(b'{"UPTIME_S": 3.958, "d": 1.50, "e": 12.345678901234567890123, "f": 1E+400}')
    assert wire.encode(message) == b'{"UPTIME_S":3.958,"d":1.5,"e":"12.345678901234567890123","f":"1E+400"}\n'
    with pytest.raises(TypeError):
        wire.encode({"a": object()})


def test_decode_line_reads_utf8_text():
    assert wire.decode_line('{"name": "José ✓"}'.encode()) == {"name": "José ✓"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
# (TASK and RESPONSE are left out: decode_line refuses them unless they are strings.)
@given(st.dictionaries(st.text(max_size=10).filter(lambda key: key not in ("TASK", "RESPONSE")), json_values, max_size=5))
def test_encode_is_one_ascii_line_that_decodes_back(message):
    encoded = wire.encode(message)
    assert encoded.endswith(b"\n") and encoded.count(b"\n") == 1
    assert encoded.isascii()
    assert wire.decode_line(encoded[:-1]) == message
    splitter = wire.LineSplitter(max(len(encoded), 16))
    assert splitter.feed(wire.encode_many([message, {"x": 1}, message])) == [encoded[:-1], b'{"x":1}', encoded[:-1]]


def test_encode_many_of_nothing_is_nothing():
    assert wire.encode_many([]) == b""


@pytest.mark.parametrize(
    "message, expected",
    [
        ({}, None),
        ({"ID": None}, None),
        ({"ID": "abc"}, "abc"),
        ({"ID": "x" * wire.MAX_REQUEST_ID_CHARS}, "x" * wire.MAX_REQUEST_ID_CHARS),
        ({"ID": 0}, 0),
        ({"ID": -(2**53) + 1}, -(2**53) + 1),
        ({"ID": 2**53 - 1}, 2**53 - 1),
    ],
)
def test_request_id_of_accepts_echoable_ids(message, expected):
    assert wire.request_id_of(message) == expected


@pytest.mark.parametrize(
    "request_id",
    ["x" * (wire.MAX_REQUEST_ID_CHARS + 1), 2**53, -(2**53), Decimal("1.5"), 1.5, True, [1], {"a": 1}],
)
def test_request_id_of_refuses_ids_that_cannot_be_echoed(request_id):
    with pytest.raises(SaldoError) as caught:
        wire.request_id_of({"ID": request_id})
    assert caught.value.code == "ID_INVALID"


def test_connect_with_backoff_waits_for_a_peer_that_starts_late_and_gives_up_when_stopped() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on `port` yet

    async def echo_one_line(stream: aio.MessageStream) -> None:
        batch = await stream.read_batch()
        if batch:
            stream.send(batch[0])
            await stream.drain()

    async def scenario() -> tuple[dict | None, bool]:
        stop = asyncio.Event()
        connecting = asyncio.create_task(
            aio.connect_with_backoff(("127.0.0.1", port), stop, max_line_bytes=1024, peer="late")
        )
        await asyncio.sleep(0.2)  # several refused attempts
        assert not connecting.done()
        server = await aio.start_server(echo_one_line, "127.0.0.1", port, name="late")
        stream = await asyncio.wait_for(connecting, 2.0)
        assert stream is not None
        stream.send({"TASK": "PING"})
        reply = (await stream.read_batch())[0]
        await stream.close()
        await server.stop()
        stop.set()
        gave_up = await aio.connect_with_backoff(("127.0.0.1", port), stop, max_line_bytes=1024, peer="late") is None
        return reply, gave_up

    reply, gave_up = asyncio.run(scenario())
    assert reply == {"TASK": "PING"}
    assert gave_up


# --- Links between nodes: the address they connect from --------------------------------------------


@pytest.mark.parametrize("source_host, seen_from", [
    ("127.0.0.12", "127.0.0.12"),  # the node's own address: what a peer check sees
    ("::1", "127.0.0.1"),  # another family: connect from wherever the system routes
    ("10.255.255.1", "127.0.0.1"),  # not an address of this machine: the same
])
def test_a_link_connects_from_the_nodes_address_or_else_from_wherever_it_can(source_host, seen_from):
    async def scenario() -> tuple[str, str]:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()

        async def on_connection(reader, writer):
            accepted.set_result(aio.MessageStream(reader, writer).peer_host)

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        stream = await asyncio.wait_for(aio.connect_with_backoff(
            address, asyncio.Event(), max_line_bytes=1024, peer="test", source_host=source_host), 5.0)
        assert stream is not None
        seen = await asyncio.wait_for(accepted, 5.0)
        await stream.close()
        server.close()
        return seen

    assert asyncio.run(scenario()) == seen_from


def test_an_ipv4_mapped_address_is_spelled_as_ipv4_so_that_a_peer_check_matches_it():
    assert aio.normal_address("::ffff:127.0.0.12") == "127.0.0.12"
    assert aio.normal_address("127.0.0.12") == "127.0.0.12"
    assert aio.normal_address("0:0:0:0:0:0:0:1") == "::1"
    assert aio.normal_address("replica1.example") == "replica1.example"


def test_a_connection_reset_before_its_stream_is_made_gives_a_stream_that_reads_the_end():
    # A peer that dies just as the link connects (a sequencer killed mid-accept): the socket is
    # gone by the time the stream is made. That is an ended connection, not an exception that
    # would end the task keeping the link (and leave a replica unsubscribed for good).
    async def scenario() -> object:
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.transport.abort()
        await asyncio.sleep(0)  # the transport closes its socket
        stream = aio.MessageStream(reader, writer)
        lines = await asyncio.wait_for(stream.read_lines(), 5.0)
        server.close()
        return lines

    assert asyncio.run(scenario()) is None


def test_a_link_that_fails_unexpectedly_is_started_again_not_lost():
    calls = []

    async def link() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise OSError(9, "Bad file descriptor")  # what a reset mid-connect once raised

    async def scenario() -> None:
        await asyncio.wait_for(aio.keep_running("sequencer", link, asyncio.Event()), 5.0)

    asyncio.run(scenario())
    assert len(calls) == 2 and calls[1] - calls[0] >= aio.RECONNECT_BACKOFF_S[1] * 0.9


def test_a_connection_still_served_when_the_process_stops_ends_without_an_error_logged() -> None:
    """At a stop, asyncio.run cancels the handlers still running (a replica's FEED connection):
    that is how they end, not an "Exception in callback" with a traceback in the node's log."""
    reported: list[dict] = []
    handler_waiting = []

    async def hold_the_connection(stream: aio.MessageStream) -> None:
        handler_waiting.append(True)
        await stream.read_batch()  # the client never writes: this waits until cancelled

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        server = await aio.start_server(hold_the_connection, "127.0.0.1", 0, name="held")
        client = await aio.open_stream(server.address, max_line_bytes=1024, peer="held")
        while not handler_waiting:
            await asyncio.sleep(0.01)
        client.abort()
        # Returning here leaves the handler running: asyncio.run cancels it.

    asyncio.run(scenario())
    assert handler_waiting == [True]
    assert reported == []


# --- The loop monitor -----------------------------------------------------------------------------


@pytest.fixture
def fresh_loop_monitor(monkeypatch):
    """The monitor's counters are process-wide: each test starts them from zero."""
    for name, zero in (("stalls_total", 0), ("stalled_ms_total", 0.0), ("lag_max_ms", 0.0)):
        monkeypatch.setattr(aio.LoopMonitor, name, zero)


def test_the_loop_monitor_counts_a_blocked_loop_as_one_stall_as_long_as_the_block(fresh_loop_monitor):
    before = aio.LoopMonitor.snapshot()

    async def scenario() -> None:
        stop = asyncio.Event()
        monitor = asyncio.create_task(aio.LoopMonitor.run(stop))
        await asyncio.sleep(3 * aio.LOOP_MONITOR_PERIOD_S)  # on time: no stall
        time.sleep(0.12)  # a callback that holds the loop (a blocking call)
        await asyncio.sleep(3 * aio.LOOP_MONITOR_PERIOD_S)
        stop.set()
        await monitor

    asyncio.run(scenario())
    after = aio.LoopMonitor.snapshot()
    assert after["STALLS_TOTAL"] - before["STALLS_TOTAL"] >= 1
    # The timer due during the block ran late by the rest of the block (at most one period less).
    stalled_ms = after["STALLED_MS_TOTAL"] - before["STALLED_MS_TOTAL"]
    assert 120 - 1000 * aio.LOOP_MONITOR_PERIOD_S - 5 <= stalled_ms < 1000
    assert after["LAG_MAX_MS"] >= 120 - 1000 * aio.LOOP_MONITOR_PERIOD_S - 5


def test_a_lag_under_the_threshold_is_not_a_stall(fresh_loop_monitor):
    aio.LoopMonitor.record(aio.LOOP_STALL_THRESHOLD_MS / 2)
    aio.LoopMonitor.record(0.0)
    assert aio.LoopMonitor.snapshot() == {"STALLS_TOTAL": 0, "STALLED_MS_TOTAL": 0.0,
                                          "LAG_MAX_MS": aio.LOOP_STALL_THRESHOLD_MS / 2}
    aio.LoopMonitor.record(aio.LOOP_STALL_THRESHOLD_MS)
    assert aio.LoopMonitor.snapshot() == {"STALLS_TOTAL": 1, "STALLED_MS_TOTAL": aio.LOOP_STALL_THRESHOLD_MS,
                                          "LAG_MAX_MS": aio.LOOP_STALL_THRESHOLD_MS}
