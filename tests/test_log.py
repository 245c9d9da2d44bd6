"""Log lines: one event is one line, and a line always parses back to the fields it was made of.

Whatever an event, a key or a value holds (spaces, quotes, backslashes, equals signs, newlines,
control characters, invisible unicode), the line written by common/log.py reads back through
`parse_line` to the same event and values, under keys made of letters, digits and `_`. Every
top-level script takes --log-level, and the level it names is the one its process logs at.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import log
from common.lab.cluster import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
LINE_KEYS = ["ts", "level", "node", "comp", "event"]
SAFE_KEY = re.compile(r"[A-Za-z0-9_]+")


@contextlib.contextmanager
def captured(node_name: str) -> Iterator[io.StringIO]:
    """saldo's events, as node `node_name` logs them, into a buffer; the logging setup the test
    process had is restored afterwards."""
    root = logging.getLogger("saldo")
    saved = (list(root.handlers), root.level, root.propagate, log._node_name)
    buffer = io.StringIO()
    log.configure(node_name, "debug", stream=buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], root.level, root.propagate, log._node_name = saved


# Any text at all, lone surrogates and line separators included.
any_text = st.text(st.characters(codec=None), max_size=30)
values = st.one_of(any_text, st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())
# (`event` and `self` are the logging methods' own parameters: Python refuses them as keywords.)
field_keys = any_text.filter(lambda key: key not in ("event", "self"))


@settings(max_examples=300, deadline=None)
@given(node=any_text, component=any_text, event=any_text, fields=st.dictionaries(field_keys, values, max_size=6))
def test_every_event_is_one_line_that_parses_back_to_its_fields(node, component, event, fields):
    with captured(node) as buffer:
        log.get_logger(component).warning(event, **fields)
    text = buffer.getvalue()
    assert text.endswith("\n") and len(text.splitlines()) == 1, text
    parsed = log.parse_line(text)
    keys = list(parsed)
    assert keys[:5] == LINE_KEYS
    assert parsed["level"] == "warning" and parsed["node"] == node and parsed["comp"] == component
    assert parsed["event"] == event
    assert list(parsed.values())[5:] == [str(value) for value in fields.values()]
    # Each key as given, its odd characters written as "_", and "_"s appended where it would repeat one.
    for given_key, written in zip(fields, keys[5:]):
        base = re.sub(r"[^A-Za-z0-9_]", "_", given_key) or "_"
        assert SAFE_KEY.fullmatch(written) and written.startswith(base) and set(written[len(base):]) <= {"_"}


def test_values_that_need_it_are_quoted_and_escaped_and_plain_ones_are_not():
    with captured("replica 1") as buffer:
        log.get_logger("lab").info("odd_values", path="/var/lab/run 1", said='he said "no"', windows="C:\\saldo",
                                   sum="a=b", lines="one\ntwo", bell="\x07", nbsp="1\u00a0000", empty="", count=3)
    line = buffer.getvalue()
    assert line.split(" ", 1)[1] == (
        'level=info node="replica 1" comp=lab event=odd_values path="/var/lab/run 1" said="he said \\"no\\"" '
        'windows="C:\\\\saldo" sum="a=b" lines="one\\ntwo" bell="\\x07" nbsp="1\\xa0000" empty="" count=3\n')


def test_a_key_with_odd_characters_or_one_the_line_already_has_is_renamed():
    with captured("lab") as buffer:
        log.get_logger("cluster").info("node_started", **{"node": "replica1", "a b": 1, "a_b": 2, "é": 3, "": 4})
    parsed = log.parse_line(buffer.getvalue())
    assert parsed["node"] == "lab"
    assert {key: parsed[key] for key in list(parsed)[5:]} == {"node_": "replica1", "a_b": "1", "a_b_": "2", "_": "3", "__": "4"}


def test_a_traceback_is_one_quoted_value_on_the_events_line():
    with captured("replica1") as buffer:
        try:
            raise RuntimeError('bad "input"\nsecond line')
        except RuntimeError:
            log.get_logger("replica").exception("crashed", op_id="abc")
    text = buffer.getvalue()
    assert len(text.splitlines()) == 1
    parsed = log.parse_line(text)
    assert parsed["op_id"] == "abc"
    assert parsed["traceback"].startswith("Traceback (most recent call last):\n")
    assert parsed["traceback"].endswith('RuntimeError: bad "input"\nsecond line')


@pytest.mark.parametrize("line", [
    "ts=1 level",  # a key without a value
    'ts=1 level="info',  # an unterminated quote
    "ts=1  level=info",  # two spaces
    "ts=1 level=info ",  # a trailing space
    "ts=1 ts=2",  # a key twice
    'ts="\\q"',  # an unknown escape
    "ts=a\"b",  # a quote in a bare value
    "t s=1",  # a key with a space
    "=1",  # no key
])
def test_a_line_the_logger_could_not_have_written_is_refused(line):
    with pytest.raises(ValueError):
        log.parse_line(line)


# --- --log-level on every top-level script -------------------------------------------------------


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("command", [
    ["server.py", "--mode", "farm"], ["server.py", "--mode", "queue"], ["server.py", "--mode", "witness"],
    ["replica.py", "--mode", "standalone"], ["replica.py", "--mode", "primary-backup"], ["sequencer.py"],
    ["client.py", "worker"], ["lab.py", "run"], ["lab.py", "chaos"], ["lab.py", "up"], ["lab.py", "demo"],
])
def test_every_top_level_script_takes_a_log_level(command):
    done = run_script(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "--log-level {debug,info,warning,error}" in done.stdout, done.stdout


def started_replica_log(tmp_path: Path, level: str) -> str:
    """What a standalone replica started with --log-level `level` logs from its start to SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "replica.py", "--mode", "standalone", "--name", "replica1", "--host", "127.0.0.1",
         "--port", str(port), "--store", f"sqlite:///{tmp_path / f'{level}.db'}", "--log-level", level],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the replica did not start"
                time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    return err


def test_the_log_level_flag_sets_what_the_process_logs(tmp_path):
    chatty = [log.parse_line(line) for line in started_replica_log(tmp_path, "info").splitlines()]
    assert {"store_loaded", "listening", "stopping"} <= {fields["event"] for fields in chatty}
    assert {fields["node"] for fields in chatty} == {"replica1"}
    assert started_replica_log(tmp_path, "warning") == ""
