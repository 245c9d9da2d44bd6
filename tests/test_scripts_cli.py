"""The top-level scripts used the wrong way: one clear line, an exit code that says so, no traceback.

client.py's exit codes mean something to scripts that call it (0 OK, 1 the bank said no, 2 the
outcome is unknown, 64 bad usage), so a typo must not exit 2. A process that cannot listen on its
port, or is given a store it cannot use, stops at once and says why.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from common.storage import store

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.parametrize("args, message", [
    (["depositt", "alice", "1"], "invalid choice: 'depositt'"),
    (["deposit", "alice"], "required"),
    (["--topology", "/nonexistent/topology.json", "balance", "alice"], "topology file /nonexistent/topology.json: No such file"),
    (["status", "nonsense"], "expected HOST:PORT, got 'nonsense'"),
    (["status"], "status needs HOST:PORT, --address or --topology"),
    (["--timeout", "0", "deposit", "alice", "1"], "argument --timeout: must be more than 0"),
    (["--timeout", "-1", "balance", "alice"], "argument --timeout: must be more than 0"),
])
def test_client_py_bad_usage_exits_64_with_one_clear_line(args, message):
    done = run_script("client.py", *args)
    assert done.returncode == 64, (done.returncode, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("args, message", [
    # argparse alone takes the misspelt flag's value for the command: "invalid choice: '127.0.0.1:1'".
    (["client.py", "--adress", "127.0.0.1:1", "deposit", "alice", "1"],
     "client.py: error: unknown flag --adress (did you mean --address?)"),
    (["client.py", "--topolgy", "var/up/sequencer/topology.json", "balance", "alice"],
     "client.py: error: unknown flag --topolgy (did you mean --topology?)"),
    (["client.py", "deposit", "alice", "1", "--address", "127.0.0.1:1"],
     "client.py: error: --address goes before the command deposit"),
    (["client.py", "--min-seq", "3", "balance", "alice"], "client.py: error: --min-seq goes after the command (balance)"),
    (["client.py", "worker", "--sever", "127.0.0.1:1"], "client.py worker: error: unknown flag --sever (did you mean --server?)"),
    (["lab.py", "up", "--arhc", "farm"], "lab.py: error: unknown flag --arhc (did you mean --arch?)"),
    (["lab.py", "--arch", "farm", "up"], "lab.py: error: --arch goes after the command (up, run, bench, chaos)"),
    (["replica.py", "--mode", "sequencer", "--sequencr", "127.0.0.1:1"],
     "replica.py: error: unknown flag --sequencr (did you mean --sequencer?)"),
    (["replica.py", "--topolgy", "var/up/sequencer/topology.json", "--name", "replica1"],
     "replica.py: error: unknown flag --topolgy (did you mean --topology?)"),
    (["server.py", "--mode", "queue", "--replicaz", "replica1=127.0.0.1:1"],
     "server.py: error: unknown flag --replicaz (did you mean --replicas?)"),
    (["sequencer.py", "--replcas", "replica1"], "sequencer.py: error: unknown flag --replcas (did you mean --replicas?)"),
    (["replica.py", "--mode", "bogus", "--port", "1"], "replica.py: error: --mode must be one of multicast, primary-backup"),
])
def test_a_misspelt_or_misplaced_flag_is_named_with_the_flag_meant_and_exits_64(args, message):
    done = run_script(*args)
    assert done.returncode == 64, (done.returncode, done.stderr)
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_client_py_against_a_port_where_nothing_listens_says_so_and_exits_1():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run_script("client.py", "--address", f"127.0.0.1:{port}", "--timeout", "1", "deposit", "alice", "1")
    assert done.returncode == 1, done
    assert done.stdout.startswith(f"NOK NOT_READY: cannot connect to 127.0.0.1:{port}") and "is a cluster running" in done.stdout
    # status takes --address too.
    done = run_script("client.py", "--address", f"127.0.0.1:{port}", "status")
    assert done.returncode == 1 and "UNREACHABLE" in done.stdout.upper(), done


def test_a_replica_whose_port_is_taken_stops_with_one_line_naming_the_address(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        done = run_script("replica.py", "--mode", "standalone", "--host", "127.0.0.1", "--port", str(port),
                          "--store", f"sqlite:///{tmp_path}/r.db")
    assert done.returncode == 1, done
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line == f"standalone-clients: cannot listen on 127.0.0.1:{port}: Address already in use: " \
                        "another process holds it (another saldo cluster?)", done.stderr
    assert "Traceback" not in done.stderr


def test_a_store_url_that_cannot_work_is_refused_before_the_process_starts(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        store.check_store_url("postgres://x/y")
    with pytest.raises(ValueError, match="database"):
        store.check_store_url("mysql://root@127.0.0.1:3306/bad-name")
    store.check_store_url(f"sqlite:///{tmp_path}/ok.db")
    # A MySQL store on a machine without PyMySQL: the worker would otherwise start and fail each task.
    monkeypatch.setattr(store.importlib.util, "find_spec", lambda name: None if name == "pymysql" else object())
    with pytest.raises(ValueError, match="needs PyMySQL: pip install -r requirements.txt"):
        store.check_store_url("mysql://root@127.0.0.1:3306/farm")


def test_replicas_of_different_architectures_get_different_default_stores():
    from argparse import Namespace

    from common.storage.replica_store import prepare_store

    stores = set()
    for mode in ("standalone", "multicast", "queue", "sequencer", "primary-backup"):
        args = Namespace(mode=mode, name="replica1", store=None)
        prepare_store(args)
        stores.add(args.store)
    assert stores == {f"sqlite:///var/{mode}/replica1.db"
                      for mode in ("standalone", "multicast", "queue", "sequencer", "primary-backup")}


def test_a_queued_operation_is_reported_with_the_id_that_waits_for_its_outcome():
    import client

    text = client.describe_reply({"ID": "op-7", "STATUS": "OK", "ACCEPTED": True, "SEQ": 3}, "ok")
    assert text.startswith("ACCEPTED seq=3 id=op-7: ") and "--id op-7 --wait applied" in text, text


def test_a_read_that_got_no_answer_failed_and_is_not_unknown():
    import asyncio
    import time

    from common.transport.client import FAILED, UNKNOWN, execute_with_retries

    class Silent:  # every attempt times out, as a replica that never answers
        async def execute(self, request_id, line, timeout_s=None, is_read=False):
            return {"ID": request_id, "STATUS": "NOK", "ERROR": "TIMEOUT", "DETAIL": "no reply in time"}

    async def attempt(is_read: bool) -> str:
        deadline_s = time.monotonic() + 0.05
        _reply, _attempts, outcome = await execute_with_retries(Silent(), "r-1", b"", deadline_s=deadline_s,
                                                               is_read=is_read)
        return outcome

    assert asyncio.run(attempt(is_read=True)) == FAILED
    assert asyncio.run(attempt(is_read=False)) == UNKNOWN  # a write may have happened


def test_a_read_refused_as_too_stale_says_so_even_if_its_last_attempt_timed_out_and_no_attempt_outlasts_the_deadline():
    import asyncio
    import time

    from common.transport.client import FAILED, execute_with_retries

    class StaleThenSilent:  # a replica behind the read's MIN_SEQ, then one that does not answer
        def __init__(self) -> None:
            self.timeouts_s: list[float] = []

        async def execute(self, request_id, line, timeout_s=None, is_read=False):
            self.timeouts_s.append(timeout_s)
            if len(self.timeouts_s) == 1:
                return {"ID": request_id, "STATUS": "NOK", "ERROR": "TOO_STALE", "DETAIL": "not yet", "DEFINITE": True}
            await asyncio.sleep(timeout_s)
            return {"ID": request_id, "STATUS": "NOK", "ERROR": "TIMEOUT", "DETAIL": "no reply in time"}

    async def scenario():
        client = StaleThenSilent()
        deadline_s = time.monotonic() + 0.3
        reply, _attempts, outcome = await execute_with_retries(
            client, "r-1", b"", deadline_s=deadline_s, attempt_timeout_s=3.0, is_read=True)
        return client, reply, outcome

    client, reply, outcome = asyncio.run(scenario())
    assert (reply["ERROR"], outcome) == ("TOO_STALE", FAILED)
    assert len(client.timeouts_s) >= 2 and all(t <= 0.3 for t in client.timeouts_s), client.timeouts_s


def test_the_flags_of_an_operation_may_follow_its_name_as_a_printed_hint_suggests():
    import client

    args = client.build_parser().parse_args(["deposit", "alice", "5", "--id", "op-9", "--wait", "applied"])
    assert (args.id, args.wait, args.timeout) == ("op-9", "applied", 10.0)
    args = client.build_parser().parse_args(["--id", "op-8", "--timeout", "3", "balance", "alice"])
    assert (args.id, args.timeout, args.json) == ("op-8", 3.0, False)  # before it, as always


def test_the_protocol_reference_lists_every_error_code_with_whether_it_is_definite():
    from common.bank.errors import ERROR_CODES

    rows = [line for line in (REPO_ROOT / "docs" / "protocol.md").read_text().splitlines() if line.startswith("| `")]
    for code, (definite, _meaning) in ERROR_CODES.items():
        row = next((row for row in rows if f"`{code}`" in row.split("|")[1]), None)
        assert row is not None, f"{code} is not in docs/protocol.md"
        assert row.split("|")[2].strip() == ("yes" if definite else "no"), row
