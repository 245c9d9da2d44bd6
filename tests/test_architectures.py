"""The replicated bank's first three architectures (issue 4) as lab runs and real processes.

Every scenario starts a real cluster on loopback addresses with free ports (common/lab), breaks it
the way the issue says, and checks the outcome the architecture promises: the lab's verdict, the
replicas' final stores, the sequencer's log, the processes' STATUS. Then bad input at every
listening port, and client.py against each architecture.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.bank.state import DEPOSIT, TRANSFER, WITHDRAW, Bank, Operation
from common.lab import archs, checker
from common.lab.cluster import REPO_ROOT, Cluster, Node, free_port
from common.lab.faults import SCHEDULES, Fault
from common.lab.runner import RunOptions, RunResult, run_lab
from common.sequencer.core import entry_line
from common.sequencer.log import SequencerLog
from common.sequencer.sequencer import REPLICA_LINE_BYTES
from common.storage.store import StoreImage
from common.transport import wire
from common.transport.blocking import BlockingConnection

pytestmark = pytest.mark.slow

MAX_LINE = wire.MAX_LINE_BYTES
REPLICA_LINK_MAX_LINE = REPLICA_LINE_BYTES  # the sequencer's replica port takes long APPLIED lines


def lab_run(root: Path, architecture: str, **options) -> RunResult:
    settings = dict(architecture=architecture, ports="free", progress=False, duration_s=3.0, clients=8,
                    results_dir=root / "results", run_root=root / "runs")
    settings.update(options)
    return run_lab(RunOptions(**settings))


def assert_valid(result: RunResult) -> None:
    report = result.report
    assert report["verdict"] == "valid", (report["anomalies"], report["anomaly_examples"], report["checker_notes"])
    assert report["ops"]["ok"] > 0


def applied_rows(image: StoreImage) -> list[tuple[str, int | None, str | None]]:
    return [(row.op.op_id, row.seq, row.outcome.error) for row in image.recent]


def assert_same_store(a: StoreImage, b: StoreImage) -> None:
    """Two replicas hold the same state: balances, counters, the same operations in the same
    order with the same numbers and outcomes, and the same last applied seq."""
    assert a.balances == b.balances
    assert a.counters == b.counters
    assert applied_rows(a) == applied_rows(b)
    assert a.meta.get("last_applied_seq") == b.meta.get("last_applied_seq")


def acknowledged_write_ids(result: RunResult) -> set[str]:
    return {r.op_id for r in result.history if r.kind != "BALANCE"
            and (r.outcome == "ok" or r.error in checker.RECORDED_ERRORS)}


def log_events(path: Path, event: str) -> list[dict[str, str]]:
    """The key=value fields of each line of a process log with this event."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if f" event={event} " in line or line.endswith(f" event={event}"):
            found.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)))
    return found


# --- Lab runs: the three architectures ---------------------------------------------------------


def test_sequencer_lab_run_with_8_clients_is_valid(tmp_path):
    result = lab_run(tmp_path, "sequencer")
    assert_valid(result)
    assert result.report["architecture"] == "sequencer"
    assert_same_store(result.states["replica1"], result.states["replica2"])
    # Writes were answered with their sequence number, and reads (which name the highest seq
    # their client was told of) with the seq the replica had applied.
    assert all(type(r.seq) is int for r in result.history if r.outcome == "ok")


def test_queue_lab_run_with_8_clients_is_valid(tmp_path):
    result = lab_run(tmp_path, "queue")
    assert_valid(result)
    assert result.report["variant"] == "ack when queued"
    assert_same_store(result.states["replica1"], result.states["replica2"])
    # The seed's meaning: the RPC reply says "queued", the outcome is decided by the replicas.
    writes = [r for r in result.history if r.kind != "BALANCE" and r.outcome == "ok" and r.client >= 0]
    assert writes and all(r.accepted for r in writes)
    assert acknowledged_write_ids(result) <= {row.op.op_id for row in result.states["replica1"].recent}


def test_multicast_with_a_delayed_link_to_one_replica_shows_divergence(tmp_path):
    # Clients send each operation to both replicas, replica2's link 20 ms slower for the whole run;
    # nothing orders concurrent operations, so each replica applies them in its own arrival order.
    # Orders only matter when operations do not commute: a transfer or withdrawal that succeeds
    # on one replica and finds insufficient funds on the other. With 8 (or 4) accounts of 1000.00
    # and amounts up to 50.00 a balance seldom gets near zero, so a run may well end without
    # divergence; with 2 accounts the transfers between them walk both balances to zero again and
    # again (a few hundred INSUFFICIENT_FUNDS a run), and divergence shows in every run.
    result = lab_run(tmp_path, "multicast", accounts=2, proxies=True,
                     schedule=[Fault("delay", "replica", 0.0, 1.0, {"delay_ms": 20})])
    report = result.report
    assert report["faults"][0]["action"] == "delay" and report["faults"][0]["target"] == "replica2"
    assert report["anomalies"]["divergence"] > 0, report["anomalies"]
    assert report["verdict"] == "invalid"
    assert result.states["replica1"].balances != result.states["replica2"].balances
    # Multicast promises no total order: that check is not applied to it.
    assert report["anomalies"]["real_time_order"] == 0
    # Each replica on its own applied every operation exactly once.
    for image in result.states.values():
        ids = [row.op.op_id for row in image.recent]
        assert len(ids) == len(set(ids))
    # The client reported how many replicas applied each write.
    assert {r.applied_replicas for r in result.history if r.kind != "BALANCE" and r.client >= 0} <= {0, 1, 2}


# --- Sequencer under faults ---------------------------------------------------------------------


def test_quiet_replicas_tell_the_sequencer_their_stores_are_synced_to_the_end(tmp_path):
    """A replica acknowledges before its commit lands and syncs once per interval. Once the load
    stops, the sequencer must still learn that every replica has everything on disk, or it could
    never drop that part of its log."""
    lab = archs.build("sequencer", archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    with Cluster(tmp_path, lab.nodes, name="synced-when-quiet") as cluster:
        cluster.start(["sequencer", "replica1", "replica2"])
        for index in range(50):  # a burst, within one interval: commits that do not sync
            deposit = {"TASK": "DEPOSIT", "ID": f"burst-{index}", "ACCOUNT": "acct-a", "AMOUNT": "1.00"}
            assert cluster.request("sequencer", deposit, timeout_s=10.0)["STATUS"] == "OK"
        for index in range(3):  # then one at a time, further apart than the interval: each commit
            time.sleep(0.2)  # syncs, after the acknowledgement that went out before it
            deposit = {"TASK": "DEPOSIT", "ID": f"slow-{index}", "ACCOUNT": "acct-a", "AMOUNT": "1.00"}
            assert cluster.request("sequencer", deposit, timeout_s=10.0)["STATUS"] == "OK"
        deadline = time.monotonic() + 5.0
        while True:
            status = cluster.status("sequencer")
            if all(p["SYNCED_SEQ"] == status["DURABLE_SEQ"] == 53 for p in status["REPLICAS"].values()):
                break
            assert time.monotonic() < deadline, status["REPLICAS"]
            time.sleep(0.05)


def test_sequencer_replica_killed_mid_run_and_restarted_catches_up(tmp_path):
    result = lab_run(tmp_path, "sequencer", duration_s=4.0, schedule=[Fault("kill", "replica", 0.3, 0.6)])
    assert_valid(result)
    [fault] = result.report["faults"]
    assert fault["target"] == "replica1" and fault["until_s"] > fault["at_s"]
    # While replica1 was down, replica2 kept applying; once back, replica1 caught up to the same state.
    ran_while_down = [r for r in result.history if r.kind != "BALANCE" and r.outcome == "ok"
                      and fault["at_s"] < r.invoke_s and r.complete_s < fault["until_s"]]
    assert ran_while_down
    assert_same_store(result.states["replica1"], result.states["replica2"])
    assert acknowledged_write_ids(result) <= {row.op.op_id for row in result.states["replica1"].recent}


def test_sequencer_killed_and_restarted_loses_nothing_and_numbering_continues(tmp_path):
    # Segments larger than the run: the log keeps every entry, so the whole numbering can be read.
    result = lab_run(tmp_path, "sequencer", duration_s=4.0, schedule=[Fault("kill", "sequencer", 0.3, 0.6)],
                     extra={"segment_entries": 10**7})
    assert_valid(result)
    assert result.report["faults"][0]["target"] == "sequencer"
    assert result.report["anomalies"]["lost_write"] == 0
    acknowledged = acknowledged_write_ids(result)
    seqlog = SequencerLog(Path(result.report["run_dir"]) / "sequencer-log")
    entries, log_start = seqlog.load()
    seqlog.close()
    assert log_start == 1
    # The log: 1..N, each number once (load() refuses a gap), across the restart.
    assert [seq for seq, _id, _line in entries] == list(range(1, seqlog.last_seq + 1))
    op_at = {seq: op_id for seq, op_id, _line in entries}
    for name, image in result.states.items():
        rows = image.recent
        seqs = [row.seq for row in rows]
        # Applied in numbering order, no number applied twice, up to the log's last entry.
        assert seqs == sorted(set(seqs)), name
        assert image.meta["last_applied_seq"] == seqlog.last_seq >= seqs[-1], name
        assert all(op_at[row.seq] == row.op.op_id for row in rows), name
        # A number with no applied row is a retry numbered again after the restart: the replica
        # recognised its id, already applied under an earlier number, and changed nothing.
        first_seq_of = {}
        for row in rows:
            first_seq_of.setdefault(row.op.op_id, row.seq)
        for seq in sorted(set(op_at) - set(seqs)):
            assert first_seq_of.get(op_at[seq], seq) < seq, (name, seq, op_at[seq])
        assert acknowledged <= set(first_seq_of), name
    assert_same_store(result.states["replica1"], result.states["replica2"])


def test_a_retry_after_the_sequencer_restarts_gets_the_first_outcome(tmp_path):
    # The client of an applied operation never heard back (say the sequencer died before relaying
    # the answer) and retries with the same id once the sequencer is back.
    running = start_cluster(tmp_path, "sequencer")
    cluster = running.cluster
    try:
        operation = {"TASK": "DEPOSIT", "ID": "retry-me", "ACCOUNT": "acct-a", "AMOUNT": "5.00", "WAIT": "ALL"}
        first = cluster.request("sequencer", dict(operation), timeout_s=5.0)
        assert first["STATUS"] == "OK" and first["BALANCE"] == "105.00"
        before = running.state()
        cluster.kill("sequencer")
        cluster.restart("sequencer")
        deadline = time.monotonic() + 15
        while True:
            replicas = cluster.status("sequencer")["REPLICAS"]
            if all(replica["CONNECTED"] for replica in replicas.values()):
                break
            assert time.monotonic() < deadline, ("the replicas did not resubscribe", replicas, {
                name: cluster.log_path(name).read_text().splitlines()[-6:] for name in cluster.nodes})
            time.sleep(0.05)
        retry = cluster.request("sequencer", dict(operation), timeout_s=5.0)
        assert retry["STATUS"] == "OK" and retry["BALANCE"] == "105.00", retry
        assert cluster.status("sequencer")["WAITING_REQUESTS"] == 0
        after = running.state()
        for name in running.lab.replicas:
            assert after[name] == before[name]  # applied once, at every replica
    finally:
        cluster.close()


def wait_for_replicas_connected(cluster: Cluster, orderer: str) -> None:
    deadline = time.monotonic() + 15
    while not all(replica["CONNECTED"] for replica in cluster.status(orderer)["REPLICAS"].values()):
        assert time.monotonic() < deadline, {name: cluster.log_path(name).read_text().splitlines()[-6:] for name in cluster.nodes}
        time.sleep(0.05)


@pytest.mark.parametrize("architecture", ["queue", "sequencer"])
def test_after_the_log_is_truncated_and_after_a_restart_a_retry_gets_its_first_seq_and_a_reused_id_is_refused(tmp_path, architecture):
    """An operation applied, 60 more after it, the log truncated past it (segments of 10 entries):
    a retry of its id is told its own seq, under every WAIT, and the id with another amount is
    refused ID_REUSED at once, as before truncation; the same once the orderer restarted."""
    lab = archs.build(architecture, archs.LayoutOptions(run_dir=tmp_path, ports="free", extra={"segment_entries": 10}))
    orderer = "server" if architecture == "queue" else "sequencer"
    with Cluster(tmp_path, lab.nodes, name=f"{architecture}-ids", architecture=architecture) as cluster:
        cluster.start()
        operation = {"TASK": "DEPOSIT", "ID": "q1", "ACCOUNT": "acct-q", "AMOUNT": "5.00"}
        first = cluster.request(orderer, {**operation, "WAIT": "ALL"}, timeout_s=10.0)
        assert (first["STATUS"], first["BALANCE"]) == ("OK", "5.00"), first
        for index in range(60):
            filler = {"TASK": "DEPOSIT", "ID": f"fill-{index}", "ACCOUNT": "acct-fill", "AMOUNT": "1.00", "WAIT": "ALL"}
            assert cluster.request(orderer, filler, timeout_s=10.0)["STATUS"] == "OK"
        deadline = time.monotonic() + 15  # the log drops a prefix once a second, once the replicas synced it
        while cluster.status(orderer)["LOG_START_SEQ"] <= first["SEQ"]:
            assert time.monotonic() < deadline, cluster.status(orderer)
            time.sleep(0.1)
        applied_before = {name: cluster.status(name)["OPS_APPLIED_TOTAL"] for name in lab.replicas}

        def check_retries() -> None:
            accepted = cluster.request(orderer, {**operation, "WAIT": "SEQUENCED"}, timeout_s=10.0)
            assert (accepted["STATUS"], accepted.get("ACCEPTED"), accepted["SEQ"]) == ("OK", True, first["SEQ"]), accepted
            default = cluster.request(orderer, dict(operation), timeout_s=10.0)  # the queue: once queued
            assert (default["STATUS"], default["SEQ"]) == ("OK", first["SEQ"]), default
            applied = cluster.request(orderer, {**operation, "WAIT": "APPLIED"}, timeout_s=10.0)
            assert (applied["STATUS"], applied["BALANCE"], applied["SEQ"]) == ("OK", "5.00", first["SEQ"]), applied
            for wait in (None, "SEQUENCED", "ALL"):
                reused = {**operation, "AMOUNT": "6.00"} | ({"WAIT": wait} if wait else {})
                refused = cluster.request(orderer, reused, timeout_s=10.0)
                assert (refused["STATUS"], refused.get("ERROR")) == ("NOK", "ID_REUSED"), (wait, refused)

        check_retries()
        cluster.kill(orderer)
        cluster.restart(orderer)
        wait_for_replicas_connected(cluster, orderer)
        check_retries()
        for name in lab.replicas:  # applied once, everywhere
            assert cluster.status(name)["OPS_APPLIED_TOTAL"] == applied_before[name]
            assert cluster.request(name, {"TASK": "BALANCE", "ACCOUNT": "acct-q"})["BALANCE"] == "5.00"


def test_sequencer_replica_connection_dropped_fills_the_gap_by_retransmission(tmp_path):
    # The replica's link to the sequencer is reset three times during the run (its proxy drops
    # the connection): whatever was in flight is lost; the replica resubscribes from its last
    # applied seq and the sequencer sends it everything after that.
    result = lab_run(tmp_path, "sequencer", duration_s=4.0, schedule=SCHEDULES["drop-replica"])
    assert_valid(result)
    assert [f["action"] for f in result.report["faults"]] == ["drop", "drop", "drop"]
    assert_same_store(result.states["replica1"], result.states["replica2"])
    run_dir = Path(result.report["run_dir"])
    resubscriptions = [e for e in log_events(run_dir / "sequencer.log", "replica_subscribed")
                       if e.get("replica") == "replica1" and int(e["last_applied_seq"]) > 0]
    assert len(resubscriptions) >= 2, resubscriptions  # resumed mid-stream, not from the start
    assert result.states["replica1"].meta["last_applied_seq"] == result.states["replica2"].meta["last_applied_seq"]


# --- A real gap, delivered out of order to a replica process ------------------------------------


class FakeOrderer:
    """The test plays the sequencer (the replica connects to it) or the queue server (it connects
    to the replica's queue port and says FEED), on a plain socket."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.connection.settimeout(0.2)
        self.splitter = wire.LineSplitter(REPLICA_LINK_MAX_LINE)
        self.inbox: list[dict] = []

    def send(self, data: bytes) -> None:
        self.connection.sendall(data)

    def expect(self, predicate, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index, message in enumerate(self.inbox):
                if predicate(message):
                    return self.inbox.pop(index)
            try:
                data = self.connection.recv(65536)
            except socket.timeout:
                continue
            assert data, "the replica closed the connection"
            self.inbox.extend(m for m in wire.decode_lines(self.splitter.feed(data)) if isinstance(m, dict))
        raise AssertionError(f"no {what} within {timeout_s} s; got {self.inbox}")


GAP_ENTRIES = {
    1: Operation("gap-op-1", DEPOSIT, "alice", None, 10_000),
    2: Operation("gap-op-2", WITHDRAW, "alice", None, 8_000),
    3: Operation("gap-op-3", WITHDRAW, "alice", None, 5_000),  # after 2: insufficient funds
    4: Operation("gap-op-4", TRANSFER, "alice", "bob", 1_500),
}


@pytest.mark.parametrize("mode", ["sequencer", "queue"])
def test_a_replica_that_sees_a_gap_asks_for_a_resend_and_applies_in_order(tmp_path, mode):
    host = archs.REPLICA_HOSTS[0]
    settings = {"mode": mode, "peers": ""}
    listener = None
    if mode == "sequencer":
        listener = socket.create_server((archs.ORCHESTRATOR_HOST, 0))
        settings["sequencer"] = f"{archs.ORCHESTRATOR_HOST}:{listener.getsockname()[1]}"
    node = Node("replica1", "replica.py", host, free_port(host), settings, store=f"sqlite:///{tmp_path / 'replica1.db'}")
    with Cluster(tmp_path, [node], name="gap") as cluster:
        cluster.start()
        if listener is not None:
            listener.settimeout(10.0)
            connection, _ = listener.accept()
            listener.close()
        else:
            connection = socket.create_connection((host, node.port), timeout=5.0)
            connection.sendall(wire.encode({"TASK": "FEED", "SERVER": "test", "REPLICA": "replica1"}))
        orderer = FakeOrderer(connection)
        try:
            subscribe = orderer.expect(lambda m: m.get("TASK") == "SUBSCRIBE", 10.0, "SUBSCRIBE")
            assert subscribe == {"TASK": "SUBSCRIBE", "REPLICA": "replica1", "LAST_APPLIED_SEQ": 0}
            orderer.send(wire.encode({"TASK": "SUBSCRIBED", "SEND_RESULTS": True}))  # this replica sends outcomes
            orderer.send(entry_line(1, GAP_ENTRIES[1]) + entry_line(3, GAP_ENTRIES[3]) + entry_line(4, GAP_ENTRIES[4]))
            resend = orderer.expect(lambda m: m.get("TASK") == "RESEND", 5.0, "RESEND")
            assert (resend["FROM"], resend["TO"]) == (2, 2)
            assert orderer.expect(lambda m: m.get("TASK") == "APPLIED", 5.0, "APPLIED")["UPTO"] == 1
            status = cluster.status("replica1")
            assert status["LAST_APPLIED_SEQ"] == 1 and status["HELD_ENTRIES"] == 2 and status["GAPS_SEEN"] >= 1
            # Unanswered, the question is asked again after the resend timeout.
            again = orderer.expect(lambda m: m.get("TASK") == "RESEND", 5.0, "a second RESEND")
            assert (again["FROM"], again["TO"]) == (2, 2)
            orderer.send(entry_line(2, GAP_ENTRIES[2]))
            results = {}
            upto = 1
            while upto < 4:
                applied = orderer.expect(lambda m: m.get("TASK") == "APPLIED", 5.0, "APPLIED up to 4")
                upto = applied["UPTO"]
                results.update({seq: (error, balance) for seq, error, balance in applied["RESULTS"]})
            assert upto == 4
            assert results == {2: (None, 2_000), 3: ("INSUFFICIENT_FUNDS", None), 4: (None, 500)}
            status = cluster.status("replica1")
            assert status["LAST_APPLIED_SEQ"] == 4 and status["HELD_ENTRIES"] == 0
            assert status["OPS_APPLIED_TOTAL"] == 4
            # Bad input on the link: an error reply each, nothing applied, nothing held.
            next_entry = {"TASK": "ORDERED", "SEQ": 5, "ID": "gap-op-5", "OP": "DEPOSIT", "ACCOUNT": "bob", "AMOUNT_CENTS": 100}
            for data, code in [
                (b"\xff not even utf-8\n", "INVALID_UTF8"),
                (b"{not json}\n", "INVALID_JSON"),
                (wire.encode({**next_entry, "SEQ": "5"}), "FIELD_TYPE"),
                (wire.encode({**next_entry, "AMOUNT_CENTS": [100]}), "FIELD_INVALID"),
                (wire.encode({**next_entry, "OP": "BALANCE"}), "FIELD_INVALID"),
                (wire.encode({**next_entry, "ACCOUNT": "bob smith"}), "ACCOUNT_INVALID"),
            ]:
                orderer.send(data)
                reply = orderer.expect(lambda m: m.get("STATUS") == "NOK", 5.0, f"an error reply to {data[:40]!r}")
                assert reply["ERROR"] == code, (data, reply)
            status = cluster.status("replica1")
            assert (status["LAST_APPLIED_SEQ"], status["OPS_APPLIED_TOTAL"], status["HELD_ENTRIES"]) == (4, 4, 0)
        finally:
            connection.close()
        # The state is the in-order one (3 after 2 fails), as any replica fed in order holds.
        expected = Bank()
        for seq in sorted(GAP_ENTRIES):
            expected.apply(GAP_ENTRIES[seq], seq)
        for account in ("alice", "bob"):
            reply = cluster.request("replica1", {"TASK": "BALANCE", "ACCOUNT": account, "MIN_SEQ": 4})
            assert reply["STATUS"] == "OK" and reply["SEQ"] == 4
            assert reply["BALANCE"] == f"{expected.balances[account] / 100:.2f}"


# --- Queue under faults -------------------------------------------------------------------------


def test_queue_server_killed_mid_run_and_restarted_loses_nothing_acknowledged(tmp_path):
    result = lab_run(tmp_path, "queue", duration_s=4.0, schedule=[Fault("kill", "server", 0.3, 0.6)])
    assert_valid(result)
    [fault] = result.report["faults"]
    assert fault["target"] == "server"
    queued_before_kill = {r.op_id for r in result.history if r.kind != "BALANCE" and r.outcome == "ok"
                          and r.accepted and r.complete_s < fault["at_s"]}
    assert queued_before_kill
    for image in result.states.values():
        stored = {row.op.op_id for row in image.recent}
        assert queued_before_kill <= stored
        assert acknowledged_write_ids(result) <= stored
    assert_same_store(result.states["replica1"], result.states["replica2"])


def test_queue_replica_offline_during_part_of_the_run_converges_when_it_returns(tmp_path):
    result = lab_run(tmp_path, "queue", duration_s=4.0, schedule=[Fault("kill", "replica", 0.2, 0.7)])
    assert_valid(result)
    [fault] = result.report["faults"]
    assert fault["target"] == "replica1"
    queued_while_away = {r.op_id for r in result.history if r.kind != "BALANCE" and r.outcome == "ok"
                         and fault["at_s"] < r.invoke_s and r.complete_s < fault["until_s"]}
    assert queued_while_away <= {row.op.op_id for row in result.states["replica1"].recent}
    assert queued_while_away
    assert_same_store(result.states["replica1"], result.states["replica2"])



def test_a_queue_replica_back_behind_the_log_start_catches_up_with_one_state_transfer(tmp_path):
    """The server re-FEEDs a replica as soon as it lost its feed, also while that replica is still
    fetching and installing a snapshot: those FEEDs wait for the transfer, so one rejoin costs
    one snapshot, and nothing is applied while the image is being installed."""
    extra = {"max_log_entries": 2_000, "segment_entries": 500}
    result = lab_run(tmp_path, "queue", duration_s=5.0, extra=extra, schedule=[Fault("kill", "replica", 0.3, 3.5)])
    assert_valid(result)
    run_dir = Path(result.report["run_dir"])
    assert log_events(run_dir / "replica1.log", "snapshot_needed")
    assert len(log_events(run_dir / "replica1.log", "snapshot_installed")) == 1
    assert len(log_events(run_dir / "replica2.log", "snapshot_serving")) == 1
    assert_same_store(result.states["replica1"], result.states["replica2"])


# --- Running clusters for bad input and client.py ----------------------------------------------


class RunningCluster:
    def __init__(self, architecture: str, lab: archs.LabCluster, cluster: Cluster) -> None:
        self.architecture = architecture
        self.lab = lab
        self.cluster = cluster

    def node(self, name: str) -> Node:
        return self.cluster.nodes[name]

    def read_port_of(self, replica: str) -> tuple[str, int]:
        node = self.node(replica)
        return node.host, node.port

    def state(self) -> dict:
        """What no bad input may change: each replica's applied count and balances, and what the
        orderer has numbered."""
        state = {}
        for name in self.lab.replicas:
            status = self.cluster.status(name)
            balances = {}
            for account in ("acct-a", "acct-b"):
                reply = self.cluster.request(name, {"TASK": "BALANCE", "ACCOUNT": account})
                balances[account] = reply.get("BALANCE")
            state[name] = (status["OPS_APPLIED_TOTAL"], balances)
        for name in ("sequencer", "server"):
            if name in self.cluster.nodes:
                status = self.cluster.status(name)
                state[name] = (status["NEXT_SEQ"], status["DURABLE_SEQ"])
        return state


def start_cluster(root: Path, architecture: str) -> RunningCluster:
    extra = {"ack_replicas": 1} if architecture == "queue" else {}
    lab = archs.build(architecture, archs.LayoutOptions(run_dir=root, ports="free", extra=extra))
    cluster = Cluster(root, lab.nodes, name=f"{architecture}-test", architecture=architecture)
    lab.cluster = cluster
    try:
        cluster.start()
        # Two accounts with money in them, applied at every replica.
        if architecture == "standalone":
            writers = ["standalone"]
        elif architecture == "multicast":
            writers = list(lab.replicas)
        else:
            writers = [lab.roles.get("sequencer", lab.roles.get("server"))[0]]
        for index, account in enumerate(("acct-a", "acct-b")):
            for writer in writers:
                message = {"TASK": "DEPOSIT", "ID": f"seed-{index}", "ACCOUNT": account, "AMOUNT": "100.00"}
                if architecture == "sequencer":
                    message["WAIT"] = "ALL"
                assert cluster.request(writer, message, timeout_s=10.0)["STATUS"] == "OK"
        deadline = time.monotonic() + 10
        while any(cluster.status(n)["OPS_APPLIED_TOTAL"] < 2 for n in lab.replicas):
            assert time.monotonic() < deadline, "seeding did not reach every replica"
            time.sleep(0.05)
    except BaseException:
        cluster.close()
        raise
    return RunningCluster(architecture, lab, cluster)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    started: dict[str, RunningCluster] = {}

    def get(architecture: str) -> RunningCluster:
        if architecture not in started:
            started[architecture] = start_cluster(tmp_path_factory.mktemp(architecture), architecture)
        return started[architecture]

    yield get
    for running in started.values():
        running.cluster.close()


# --- Bad input at every listening port ----------------------------------------------------------

ORDERED_DEPOSIT = entry_line(10**6, Operation("intruder-1", DEPOSIT, "acct-a", None, 999_999)).rstrip(b"\n")
GARBAGE = [
    (b"\x00\xff\xfe garbage \x80\n", "INVALID_UTF8"),
    (b"this is not json\n", "INVALID_JSON"),
    (b'{"TASK": "DEPOSIT", "ID": "g-1", "ACCOUNT": "acct-a", "AMOUNT": "5"\n', "INVALID_JSON"),
    (b"[1, 2, 3]\n", "NOT_OBJECT"),
    (b'{"TASK":[],"ID":"g-2"}\n', "FIELD_TYPE"),  # every handler dispatches on TASK: never a list
    (b'{"TASK":{"SUBSCRIBE":1}}\n', "FIELD_TYPE"),
    (b'{"RESPONSE":["ALIVE"]}\n', "FIELD_TYPE"),
]
CLIENT_PORT_WRONG_TYPES = [
    (b'{"TASK":"DEPOSIT","ID":"t-1","ACCOUNT":"acct-a","AMOUNT":[500]}\n', "AMOUNT_TYPE"),
    (b'{"TASK":"WITHDRAW","ID":"t-2","ACCOUNT":"acct-a","AMOUNT":true}\n', "AMOUNT_BOOLEAN"),
    (b'{"TASK":"TRANSFER","ID":"t-3","FROM":7,"TO":"acct-b","AMOUNT":"1"}\n', "FIELD_TYPE"),
    (b'{"TASK":"DEPOSIT","ID":["t-4"],"ACCOUNT":"acct-a","AMOUNT":"1"}\n', "ID_INVALID"),
    (b'{"TASK":5,"ID":"t-5"}\n', "FIELD_TYPE"),
]
READ_PORT_WRONG_TYPES = [
    (b'{"TASK":"BALANCE","ACCOUNT":"acct-a","MIN_SEQ":"5"}\n', "FIELD_TYPE"),
    (b'{"TASK":"BALANCE","ACCOUNT":["acct-a"]}\n', "FIELD_TYPE"),
    (b'{"TASK":"BALANCE","ID":{"x":1},"ACCOUNT":"acct-a"}\n', "ID_INVALID"),
]

# (architecture, port name, how to find it, its line limit, wrong types, wrong-role messages)
PORTS = {
    "standalone-client": ("standalone", "standalone", "node", MAX_LINE, CLIENT_PORT_WRONG_TYPES, [
        (ORDERED_DEPOSIT + b"\n", "WRONG_ROLE"),
        (b'{"TASK":"SUBSCRIBE","REPLICA":"replica1","LAST_APPLIED_SEQ":0}\n', "WRONG_ROLE"),
        (b'{"TASK":"APPLIED","UPTO":1,"RESULTS":[]}\n', "WRONG_ROLE"),
    ]),
    "multicast-replica": ("multicast", "replica2", "node", MAX_LINE, CLIENT_PORT_WRONG_TYPES, [
        (ORDERED_DEPOSIT + b"\n", "WRONG_ROLE"),
        (b'{"TASK":"FEED","SERVER":"x","REPLICA":"replica2"}\n', "WRONG_ROLE"),
    ]),
    "queue-rpc": ("queue", "server", "node", MAX_LINE, CLIENT_PORT_WRONG_TYPES, [
        (ORDERED_DEPOSIT + b"\n", "WRONG_ROLE"),
        (b'{"TASK":"BALANCE","ID":"r-1","ACCOUNT":"acct-a"}\n', "WRONG_ROLE"),
        (b'{"TASK":"APPLIED","UPTO":1,"RESULTS":[]}\n', "WRONG_ROLE"),
    ]),
    "queue-replica": ("queue", "replica1", "node", MAX_LINE, READ_PORT_WRONG_TYPES + [
        (b'{"TASK":"FEED","SERVER":"x","REPLICA":5}\n', "FIELD_TYPE"),
        (b'{"TASK":"FEED","SERVER":"x","REPLICA":["replica1"]}\n', "FIELD_TYPE"),
        (b'{"TASK":"FEED","REPLICA":"replica1"}\n', "FIELD_TYPE"),
    ], [
        (b'{"TASK":"DEPOSIT","ID":"w-1","ACCOUNT":"acct-a","AMOUNT":"9999"}\n', "WRONG_ROLE"),
        (b'{"TASK":"WITHDRAW","ID":"w-5","ACCOUNT":"acct-a","AMOUNT":"-5"}\n', "WRONG_ROLE"),  # a write, however malformed
        (ORDERED_DEPOSIT + b"\n", "WRONG_ROLE"),
    ]),
    "sequencer-client": ("sequencer", "sequencer", "node", MAX_LINE, CLIENT_PORT_WRONG_TYPES + [
        (b'{"TASK":"DEPOSIT","ID":"t-6","ACCOUNT":"acct-a","AMOUNT":"1","WAIT":3}\n', "FIELD_INVALID"),
    ], [
        (ORDERED_DEPOSIT + b"\n", "WRONG_ROLE"),
        (b'{"TASK":"BALANCE","ID":"r-1","ACCOUNT":"acct-a"}\n', "WRONG_ROLE"),
        (b'{"TASK":"SUBSCRIBE","REPLICA":"replica1","LAST_APPLIED_SEQ":0}\n', "WRONG_ROLE"),
    ]),
    "sequencer-replica-link": ("sequencer", "sequencer", "replica_port", REPLICA_LINK_MAX_LINE, [
        (b'{"TASK":"SUBSCRIBE","REPLICA":"replica1","LAST_APPLIED_SEQ":"5"}\n', "FIELD_TYPE"),
        (b'{"TASK":"SUBSCRIBE","REPLICA":["replica1"],"LAST_APPLIED_SEQ":0}\n', "FIELD_TYPE"),
        (b'{"TASK":"SUBSCRIBE","REPLICA":"stranger","LAST_APPLIED_SEQ":0}\n', "FIELD_INVALID"),
        (b'{"TASK":"APPLIED","UPTO":"5","RESULTS":[]}\n', "FIELD_INVALID"),  # SUBSCRIBE first
        (b'{"TASK":"RESEND","FROM":"1","TO":2}\n', "FIELD_INVALID"),  # SUBSCRIBE first
    ], [
        (b'{"TASK":"DEPOSIT","ID":"w-2","ACCOUNT":"acct-a","AMOUNT":"9999"}\n', "WRONG_ROLE"),
        (b'{"TASK":"TRANSFER","ID":"w-3","FROM":"acct-a","TO":"acct-b","AMOUNT":"50"}\n', "WRONG_ROLE"),
        (ORDERED_DEPOSIT + b"\n", "FIELD_INVALID"),  # SUBSCRIBE first: only a subscribed replica acknowledges
    ]),
    "sequencer-replica-read": ("sequencer", "replica1", "node", MAX_LINE, READ_PORT_WRONG_TYPES + [
        (b'{"TASK":"FEED","SERVER":"x","REPLICA":"replica1"}\n', "WRONG_ROLE"),
    ], [
        (b'{"TASK":"DEPOSIT","ID":"w-4","ACCOUNT":"acct-a","AMOUNT":"9999"}\n', "WRONG_ROLE"),
        (b'{"TASK":"TRANSFER","ID":"w-6","FROM":"acct-a","AMOUNT":"1.234"}\n', "WRONG_ROLE"),
        (b'{"id_msg":"w-7","tipo":"SAQUE","conta_origem":"acct-a","valor":-1}\n', "WRONG_ROLE"),
        (ORDERED_DEPOSIT + b"\n", "WRONG_ROLE"),
    ]),
}


def port_address(running: RunningCluster, node_name: str, which: str) -> tuple[str, int]:
    node = running.node(node_name)
    return (node.host, node.port) if which == "node" else (node.host, int(node.settings[which]))


# The replication ports take protocol messages only from their peers' hosts (common/transport/peers.py): the
# bad input for them comes from a peer's host, so that it reaches the protocol's own checks.
PORT_SOURCE_HOSTS = {"sequencer-replica-link": archs.REPLICA_HOSTS[0], "queue-replica": archs.ORCHESTRATOR_HOST}
STRANGER_HOST = "127.0.0.1"  # no node of the lab's layouts runs there


class RawConnection:
    def __init__(self, address: tuple[str, int], source_host: str | None = None) -> None:
        self.sock = socket.create_connection(address, timeout=5.0,
                                             source_address=(source_host, 0) if source_host else None)
        self.splitter = wire.LineSplitter(REPLICA_LINK_MAX_LINE)
        self.inbox: list = []
        self.eof = False

    def reply_to(self, data: bytes, timeout_s: float = 5.0) -> dict:
        self.sock.sendall(data)
        return self.next(timeout_s)

    def next(self, timeout_s: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self.inbox:
            assert not self.eof, "the connection closed without a reply"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError(f"no reply within {timeout_s} s") from None
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
                continue
            self.inbox.extend(wire.decode_lines(self.splitter.feed(data)))
        return self.inbox.pop(0)

    def next_matching(self, predicate, timeout_s: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if isinstance(message, dict) and predicate(message):
                return message

    def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        self.sock.settimeout(timeout_s)
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("port", list(PORTS))
def test_bad_input_at_every_listening_port_gets_an_error_reply_and_changes_no_balance(clusters, port):
    architecture, node_name, which, max_line, wrong_types, wrong_role = PORTS[port]
    running = clusters(architecture)
    address = port_address(running, node_name, which)
    before = running.state()
    connection = RawConnection(address, PORT_SOURCE_HOSTS.get(port))
    try:
        for data, code in GARBAGE + wrong_types + wrong_role:
            reply = connection.reply_to(data)
            assert reply.get("STATUS") == "NOK", (data, reply)
            assert reply.get("ERROR") == code, (data, reply)
            assert reply.get("DEFINITE") is True, (data, reply)
        # Still usable after all of that: the port answers STATUS on the same connection.
        assert connection.reply_to(b'{"TASK":"STATUS","ID":"still-there"}\n')["STATUS"] == "OK"
        # A line over the port's limit: LINE_TOO_LONG, then the connection is closed.
        connection.sock.sendall(b'{"TASK":"DEPOSIT","ACCOUNT":"' + b"a" * (max_line + 1024) + b'"}\n')
        reply = connection.next()
        assert reply["STATUS"] == "NOK" and reply["ERROR"] == "LINE_TOO_LONG"
        assert connection.closed_by_peer()
    finally:
        connection.close()
    time.sleep(0.3)  # anything wrongly accepted would have been applied by now
    assert running.state() == before
    # The process is alive and serves a new connection.
    with BlockingConnection(*address) as fresh:
        assert fresh.request({"TASK": "STATUS"}, 5.0)["STATUS"] == "OK"


def test_wrong_types_from_a_subscribed_replica_get_error_replies_and_change_nothing(tmp_path):
    # A third replica name that no process uses: the test subscribes under it, then sends the
    # replica-to-sequencer messages with wrong types.
    lab = archs.build("sequencer", archs.LayoutOptions(run_dir=tmp_path, ports="free", extra={"replicas": 3}))
    with Cluster(tmp_path, lab.nodes, name="subscribed-bad-input") as cluster:
        cluster.start(["sequencer", "replica1", "replica2"])
        for index in (1, 2):
            deposit = {"TASK": "DEPOSIT", "ID": f"seed-{index}", "ACCOUNT": "acct-a", "AMOUNT": "10.00"}
            assert cluster.request("sequencer", deposit, timeout_s=10.0)["STATUS"] == "OK"
        node = cluster.nodes["sequencer"]
        connection = RawConnection((node.host, int(node.settings["replica_port"])), archs.REPLICA_HOSTS[2])
        try:
            connection.sock.sendall(wire.encode({"TASK": "SUBSCRIBE", "REPLICA": "replica3", "LAST_APPLIED_SEQ": 0}))
            assert connection.next_matching(lambda m: m.get("TASK") == "SUBSCRIBED")["SEND_RESULTS"] is False
            assert [connection.next_matching(lambda m: m.get("TASK") == "ORDERED")["SEQ"] for _ in (1, 2)] == [1, 2]
            # The real replicas sync their stores within a tick of going quiet: wait for that, so
            # that nothing but the messages below could change the sequencer's view of them.
            deadline = time.monotonic() + 10.0
            while any(cluster.status("sequencer")["REPLICAS"][name]["SYNCED_SEQ"] < 2 for name in ("replica1", "replica2")):
                assert time.monotonic() < deadline, cluster.status("sequencer")["REPLICAS"]
                time.sleep(0.05)
            before = (cluster.status("sequencer")["REPLICAS"], cluster.status("replica1")["OPS_APPLIED_TOTAL"])
            for message, code in [
                ({"TASK": "APPLIED", "UPTO": "2", "RESULTS": []}, "FIELD_TYPE"),
                ({"TASK": "APPLIED", "UPTO": 2, "RESULTS": [["2", None, 100]]}, "FIELD_INVALID"),
                ({"TASK": "APPLIED", "UPTO": 2, "RESULTS": [[2, None, "1.00"]]}, "FIELD_INVALID"),
                # An outcome with neither an error nor a balance (once stored, it broke every reply).
                ({"TASK": "APPLIED", "UPTO": 2, "RESULTS": [[2, None, None]]}, "FIELD_INVALID"),
                ({"TASK": "APPLIED", "UPTO": 2, "RESULTS": [[2, None, -100]]}, "FIELD_INVALID"),
                ({"TASK": "APPLIED", "UPTO": 10**6, "RESULTS": []}, "FIELD_INVALID"),  # beyond the log
                # One connection is one replica: a second name is refused.
                ({"TASK": "SUBSCRIBE", "REPLICA": "replica2", "LAST_APPLIED_SEQ": 0}, "FIELD_INVALID"),
                ({"TASK": "APPLIED", "UPTO": 2, "SYNCED": 3, "RESULTS": []}, "FIELD_INVALID"),  # more on disk than applied
                ({"TASK": "APPLIED", "UPTO": 2, "SYNCED": "2", "RESULTS": []}, "FIELD_INVALID"),
                ({"TASK": "RESEND", "FROM": "1", "TO": 2}, "FIELD_INVALID"),
                ({"TASK": "RESEND", "FROM": 2, "TO": 1}, "FIELD_INVALID"),
                ({"TASK": "DEPOSIT", "ID": "x-1", "ACCOUNT": "acct-a", "AMOUNT": "1"}, "WRONG_ROLE"),
                ({"TASK": "ORDERED", "SEQ": 3, "ID": "x-2", "OP": "DEPOSIT", "ACCOUNT": "acct-a", "AMOUNT_CENTS": 1}, "WRONG_ROLE"),
            ]:
                connection.sock.sendall(wire.encode(message))
                reply = connection.next_matching(lambda m: m.get("STATUS") == "NOK")
                assert reply["ERROR"] == code, (message, reply)
            after = (cluster.status("sequencer")["REPLICAS"], cluster.status("replica1")["OPS_APPLIED_TOTAL"])
            assert after == before
            assert after[0]["replica3"] == {"APPLIED_SEQ": 0, "SYNCED_SEQ": 0, "CONNECTED": True}
            assert cluster.status("sequencer")["DURABLE_SEQ"] == 2
            # The connection still works, and a retry of seq 2's operation is answered with its outcome.
            assert cluster.request("sequencer", {"TASK": "DEPOSIT", "ID": "seed-2", "ACCOUNT": "acct-a",
                                                 "AMOUNT": "10.00"}, timeout_s=10.0) == \
                {"ID": "seed-2", "STATUS": "OK", "BALANCE": "20.00", "SEQ": 2}
        finally:
            connection.close()


def test_a_rejected_feed_leaves_the_queue_servers_feed_in_place(clusters):
    running = clusters("queue")
    address = port_address(running, "replica1", "node")
    status = running.cluster.status("replica1")
    assert status["CONNECTED_TO_SERVER"] is True
    subscribed = len(log_events(running.cluster.log_path("server"), "replica_subscribed"))
    before = running.state()
    # From the server's host, a malformed FEED; from any other host, a well-formed one and a forged
    # entry behind it: all refused, and none of them displaces the server's feed.
    malformed = RawConnection(address, archs.ORCHESTRATOR_HOST)
    stranger = RawConnection(address, STRANGER_HOST)
    try:
        assert malformed.reply_to(b'{"TASK":"FEED","SERVER":"x","REPLICA":7}\n')["ERROR"] == "FIELD_TYPE"
        assert stranger.reply_to(b'{"TASK":"FEED","SERVER":"evil","REPLICA":"replica1"}\n')["ERROR"] == "NOT_PEER"
        forged = wire.encode({"TASK": "ORDERED", "SEQ": 3, "ID": "forged-1", "OP": "DEPOSIT", "ACCOUNT": "forged",
                              "AMOUNT_CENTS": 100_000_000})
        assert stranger.reply_to(forged)["ERROR"] == "WRONG_ROLE"
    finally:
        malformed.close()
        stranger.close()
    time.sleep(0.5)
    assert running.state() == before
    # The server's own feed was not displaced (it would have had to subscribe again).
    assert len(log_events(running.cluster.log_path("server"), "replica_subscribed")) == subscribed
    reply = running.cluster.request("server", {"TASK": "DEPOSIT", "ID": "after-feed", "ACCOUNT": "feed-check",
                                               "AMOUNT": "1.00"}, timeout_s=5.0)
    assert reply["STATUS"] == "OK" and reply["BALANCE"] == "1.00"
    for name in running.lab.replicas:
        assert running.cluster.request(name, {"TASK": "BALANCE", "ACCOUNT": "forged"})["ERROR"] == "ACCOUNT_NOT_FOUND"


def test_a_subscribe_from_a_host_that_runs_no_replica_is_refused_and_the_replica_keeps_its_place(clusters):
    running = clusters("sequencer")
    node = running.node("sequencer")
    before = running.state()
    takeovers = len(log_events(running.cluster.log_path("sequencer"), "replica_reconnected_closing_old"))
    stranger = RawConnection((node.host, int(node.settings["replica_port"])), STRANGER_HOST)
    try:
        reply = stranger.reply_to(wire.encode({"TASK": "SUBSCRIBE", "REPLICA": "replica1", "LAST_APPLIED_SEQ": 10**6}))
        assert reply["ERROR"] == "NOT_PEER"
        reply = stranger.reply_to(wire.encode({"TASK": "APPLIED", "UPTO": 1, "SYNCED": 1, "RESULTS": []}))
        assert reply["ERROR"] == "NOT_PEER"
        assert stranger.reply_to(b'{"TASK":"STATUS","ID":"s"}\n')["STATUS"] == "OK"  # anyone may look
    finally:
        stranger.close()
    assert len(log_events(running.cluster.log_path("sequencer"), "replica_reconnected_closing_old")) == takeovers
    assert all(replica["CONNECTED"] for replica in running.cluster.status("sequencer")["REPLICAS"].values())
    assert running.state() == before


@pytest.mark.parametrize("architecture", ["sequencer", "queue"])
def test_a_replicas_snapshot_goes_only_to_the_replicas_it_names_as_peers(clusters, architecture):
    """A SNAPSHOT is every balance and the applied history: a state transfer for a peer replica,
    not something to hand a stranger who reaches the read port."""
    running = clusters(architecture)
    replica1 = running.node("replica1")
    stranger = RawConnection((replica1.host, replica1.port), STRANGER_HOST)
    try:
        reply = stranger.reply_to(b'{"TASK":"SNAPSHOT","ID":"take-1"}\n')
        assert (reply["ERROR"], "--peers" in reply["DETAIL"]) == ("NOT_PEER", True), reply
    finally:
        stranger.close()
    peer = RawConnection((replica1.host, replica1.port), running.node("replica2").host)
    try:
        peer.sock.sendall(b'{"TASK":"SNAPSHOT","ID":"take-2"}\n')
        begin = peer.next_matching(lambda m: m.get("TASK") == "SNAPSHOT_BEGIN")
        assert begin["ID"] == "take-2", begin
    finally:
        peer.close()


def test_a_replica_without_peers_gives_its_snapshot_to_no_one(tmp_path):
    """No replica fetches from one that names no peers: a SNAPSHOT asked of it is a stranger's."""
    lab = archs.build("sequencer", archs.LayoutOptions(run_dir=tmp_path, ports="free", extra={"replicas": 1}))
    (name,) = lab.replicas
    cluster = Cluster(tmp_path, lab.nodes, name="lone-replica-test", architecture="sequencer")
    with cluster:
        cluster.start()
        replica = cluster.nodes[name]
        assert not replica.settings.get("peers")
        for source_host in (replica.host, STRANGER_HOST):
            asker = RawConnection((replica.host, replica.port), source_host)
            try:
                reply = asker.reply_to(b'{"TASK":"SNAPSHOT","ID":"take-1"}\n')
                assert (reply["ERROR"], "--peers" in reply["DETAIL"]) == ("NOT_PEER", True), reply
                assert asker.reply_to(b'{"TASK":"STATUS","ID":"s"}\n')["STATUS"] == "OK"  # still serving
            finally:
                asker.close()


# --- client.py against each architecture --------------------------------------------------------


def client_py(running: RunningCluster, *args: str, arch: bool = True) -> tuple[int, str]:
    command = [sys.executable, str(REPO_ROOT / "client.py"), "--topology", str(running.cluster.topology_path)]
    if arch:
        command += ["--arch", running.architecture]
    done = subprocess.run(command + ["--timeout", "10", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.strip()


@pytest.mark.parametrize("architecture", ["standalone", "multicast", "queue", "sequencer"])
def test_client_py_end_to_end_against_a_cluster(clusters, architecture):
    running = clusters(architecture)
    code, out = client_py(running, "deposit", "cli-1", "10")
    assert code == 0 and out.startswith("OK balance=10.00"), out
    if architecture == "multicast":
        assert "applied=2/2" in out
    assert (re.search(r"seq=(\d+)", out) is not None) == (architecture in ("queue", "sequencer")), out
    code, out = client_py(running, "transfer", "cli-1", "cli-2", "2.50")
    assert code == 0 and out.startswith("OK balance=7.50"), out
    seq = re.search(r"seq=(\d+)", out)
    code, out = client_py(running, "withdraw", "cli-1", "1000")
    assert code == 1 and out.startswith("NOK INSUFFICIENT_FUNDS"), out
    # A read names the seq it must see: the client reads its own write from a replica.
    min_seq = ["--min-seq", seq.group(1)] if seq else []
    code, out = client_py(running, "balance", "cli-2", *min_seq)
    assert code == 0 and out.startswith("OK balance=2.50"), out
    # The topology file names its architecture: --arch may be left out.
    code, out = client_py(running, "balance", "cli-1", *min_seq, arch=False)
    assert code == 0 and out.startswith("OK balance=7.50"), out
    code, out = client_py(running, "transfer", "cli-1", "cli-1", "1")
    assert code == 1 and out.startswith("NOK SAME_ACCOUNT"), out
    code, out = client_py(running, "deposit", "cli-1", "12.345")
    assert code == 1 and out.startswith("NOK AMOUNT_TOO_PRECISE"), out
    # An id names one operation: its retry gets the first outcome, another operation under it is refused.
    code, out = client_py(running, "--id", f"reused-{architecture}", "deposit", "cli-3", "5")
    assert code == 0, out
    code, out = client_py(running, "--id", f"reused-{architecture}", "deposit", "cli-3", "5")
    assert code == 0 and (architecture == "queue" or out.startswith("OK balance=5.00")), out
    for other in (["withdraw", "cli-3", "5"], ["deposit", "cli-2", "5"], ["deposit", "cli-3", "6"]):
        code, out = client_py(running, "--id", f"reused-{architecture}", *other)
        assert code == 1 and out.startswith("NOK ID_REUSED"), (other, out)
    code, out = client_py(running, "balance", "cli-3", *(["--min-seq", "1"] if seq else []))
    assert code == 0 and out.startswith("OK balance=5.00"), out
    if seq:
        # A read naming a seq no replica reached: a definite refusal once the replica's wait is over,
        # not a timeout; a read has no "unknown" outcome (it changes nothing).
        command = [sys.executable, str(REPO_ROOT / "client.py"), "--topology", str(running.cluster.topology_path),
                   "--timeout", "3", "balance", "cli-3", "--min-seq", "999999"]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stdout.startswith("NOK TOO_STALE"), done
        assert "unknown" not in done.stdout, done


def test_a_replica_takes_a_read_with_a_stray_seed_field_as_a_read(clusters):
    """A write in seed 002's form is refused at a replica whatever it holds; a field named like
    one of its keys does not make a TASK read a write."""
    running = clusters("sequencer")
    read = running.cluster.request("replica1", {"TASK": "BALANCE", "ID": "r-tipo", "ACCOUNT": "acct-a", "tipo": "SAQUE"})
    assert read.get("ERROR") != "WRONG_ROLE", read
    write = running.cluster.request("replica1", {"id_msg": "w-tipo", "tipo": "SAQUE", "conta_origem": "acct-a", "valor": 1})
    assert write["ERROR"] == "WRONG_ROLE", write


def test_a_standalone_read_naming_a_seq_it_never_reached_is_too_stale(clusters):
    running = clusters("standalone")
    applied = running.cluster.status("standalone")["OPS_APPLIED_TOTAL"]
    reached = running.cluster.request("standalone", {"TASK": "BALANCE", "ACCOUNT": "acct-a", "MIN_SEQ": applied})
    beyond = running.cluster.request("standalone", {"TASK": "BALANCE", "ACCOUNT": "acct-a", "MIN_SEQ": 10**6})
    assert reached["STATUS"] == "OK" and reached["SEQ"] >= applied, reached
    assert (beyond["STATUS"], beyond["ERROR"]) == ("NOK", "TOO_STALE"), beyond


def test_a_multicast_read_goes_to_another_replica_when_the_first_is_down():
    """Writes reach whichever replicas are up; a read must too, not keep asking a dead one."""
    import asyncio

    from common.multicast.client import MulticastClient
    from common.transport.client import execute_with_retries

    async def scenario():
        async def replica2(reader, writer):  # answers every read with a balance
            while line := await reader.readline():
                request = json.loads(line)
                writer.write(wire.encode({"ID": request["ID"], "STATUS": "OK", "BALANCE": "7.00"}))
                await writer.drain()

        server = await asyncio.start_server(replica2, "127.0.0.1", 0)
        down = ("127.0.0.1", free_port())  # replica1: nothing listens there
        up = ("127.0.0.1", server.sockets[0].getsockname()[1])
        client = MulticastClient([down, up], request_timeout_s=1.0)
        line = wire.encode({"TASK": "BALANCE", "ID": "read-1", "ACCOUNT": "alice"})
        try:
            return await execute_with_retries(client, "read-1", line, deadline_s=time.monotonic() + 5.0,
                                              is_read=True)
        finally:
            await client.close()
            server.close()

    reply, attempts, outcome = asyncio.run(scenario())
    assert outcome == "ok" and reply["BALANCE"] == "7.00" and attempts == 2, (reply, attempts)


@pytest.mark.parametrize("architecture", ["standalone", "multicast", "queue", "sequencer"])
def test_a_seed_request_gets_its_id_msg_back_on_an_error_as_on_success(clusters, architecture):
    """Seed 002's clients pipeline and match replies by id_msg, so an error must carry it too."""
    running = clusters(architecture)
    writer = {"standalone": "standalone", "multicast": "replica1", "queue": "server", "sequencer": "sequencer"}[architecture]
    bad = {"id_msg": "seed-bad-1", "tipo": "SAQUE", "conta_origem": "acct-a", "valor": "abc"}
    reply = running.cluster.request(writer, bad, timeout_s=10.0)
    assert (reply["STATUS"], reply["ERROR"], reply.get("id_msg")) == ("NOK", "AMOUNT_MALFORMED", "seed-bad-1"), reply
    good = {"id_msg": "seed-good-1", "tipo": "DEPOSITO", "conta_destino": "acct-seed", "valor": "1.00"}
    reply = running.cluster.request(writer, good, timeout_s=10.0)
    assert (reply["STATUS"], reply.get("id_msg")) == ("OK", "seed-good-1"), reply


@pytest.mark.parametrize("architecture", ["standalone", "multicast", "queue", "sequencer"])
def test_a_seed_request_with_a_numeric_id_msg_is_served_and_gets_it_back_as_it_came(clusters, architecture):
    """Seed 002 says `id_msg: str  # UUID`, and its users send 7: the operation id "7" (one
    operation with "7"), the reply carrying the number 7; an id_msg that is no id is refused, echoed."""
    running = clusters(architecture)
    writer = {"standalone": "standalone", "multicast": "replica1", "queue": "server", "sequencer": "sequencer"}[architecture]
    numeric = {"id_msg": 7, "tipo": "DEPOSITO", "conta_destino": "acct-numeric", "valor": 1}
    first = running.cluster.request(writer, numeric, timeout_s=10.0)
    assert (first["STATUS"], first.get("id_msg")) == ("OK", 7), first
    retry = running.cluster.request(writer, {**numeric, "id_msg": "7"}, timeout_s=10.0)  # the same operation
    assert (retry["STATUS"], retry.get("id_msg"), retry.get("BALANCE")) == ("OK", "7", first.get("BALANCE")), retry
    reused = running.cluster.request(writer, {**numeric, "valor": 2}, timeout_s=10.0)
    assert (reused["STATUS"], reused.get("ERROR"), reused.get("id_msg")) == ("NOK", "ID_REUSED", 7), reused
    for id_msg in (7.5, ["m-1"], True):
        refused = running.cluster.request(writer, {**numeric, "id_msg": id_msg}, timeout_s=10.0)
        assert (refused["ERROR"], refused.get("id_msg")) == ("ID_INVALID", id_msg), refused


@pytest.mark.parametrize("architecture", ["standalone", "sequencer"])
def test_client_py_status_of_every_node_prints_one_json_object_each(clusters, architecture):
    running = clusters(architecture)
    code, out = client_py(running, "--json", "status", arch=False)
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines()]
    assert {row["NODE"] for row in rows} == set(running.cluster.nodes)
    # STATUS carries fractions (UPTIME_S), which the wire decodes exactly: they print back as numbers.
    assert all(row["STATUS"] == "OK" and type(row["UPTIME_S"]) is float for row in rows), rows


def test_a_second_replica_under_the_same_name_is_told_and_the_two_do_not_push_each_other_out_without_end(clusters, tmp_path):
    running = clusters("sequencer")
    sequencer_log = running.cluster.log_path("sequencer")
    takeovers_before = len(log_events(sequencer_log, "replica_reconnected_closing_old"))
    real = running.node("replica1")
    duplicate_log = tmp_path / "duplicate.log"
    with duplicate_log.open("w") as log_file:
        duplicate = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "replica.py"), "--topology", str(running.cluster.topology_path),
             "--name", "replica1", "--port", str(free_port(real.host)), "--store", f"sqlite:///{tmp_path}/duplicate.db"],
            cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            time.sleep(8.0)
        finally:
            duplicate.terminate()
            duplicate.wait(timeout=15)
    takeovers = len(log_events(sequencer_log, "replica_reconnected_closing_old")) - takeovers_before
    # Without REPLACED and its back-off, the two took the name from each other thousands of times.
    assert 1 <= takeovers <= 6, takeovers
    told = log_events(running.cluster.log_path("replica1"), "replaced_by_another_subscriber") + \
        log_events(duplicate_log, "replaced_by_another_subscriber")
    assert told, "the replica pushed out was told why"
    # The real replica1 takes its place back, and the cluster goes on.
    deadline = time.monotonic() + 15
    while not running.cluster.status("sequencer")["REPLICAS"]["replica1"]["CONNECTED"]:
        assert time.monotonic() < deadline, "replica1 did not subscribe again"
        time.sleep(0.1)
    reply = running.cluster.request("sequencer", {"TASK": "DEPOSIT", "ID": "after-duplicate", "ACCOUNT": "dup-check",
                                                  "AMOUNT": "1.00", "WAIT": "ALL"}, timeout_s=10.0)
    assert reply["STATUS"] == "OK", reply
    assert running.cluster.request("replica1", {"TASK": "BALANCE", "ACCOUNT": "dup-check"})["BALANCE"] == "1.00"


def test_a_paused_results_source_is_replaced_and_writes_are_answered_by_the_other_replica(clusters):
    running = clusters("sequencer")
    source = running.cluster.status("sequencer")["RESULTS_SOURCE"]
    other = next(name for name in running.lab.replicas if name != source)
    pid = running.cluster.pid(source)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = running.cluster.request("sequencer", {"TASK": "DEPOSIT", "ID": "while-source-paused", "ACCOUNT": "pause-check",
                                                      "AMOUNT": "2.00", "WAIT": "APPLIED"}, timeout_s=10.0)
        waited_s = time.monotonic() - started
        assert reply["STATUS"] == "OK" and reply["BALANCE"] == "2.00", reply
        # The stall bound (0.5 s) and a tick, not the length of the pause.
        assert waited_s < 2.0, waited_s
        status = running.cluster.status("sequencer")
        assert status["RESULTS_SOURCE"] == other and status["RESULTS_SOURCE_CHANGES"] >= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    # Back, the stalled one catches up and no longer sends outcomes; the other one does.
    deadline = time.monotonic() + 10
    while running.cluster.status(source)["SENDS_RESULTS"] or \
            running.cluster.request(source, {"TASK": "BALANCE", "ACCOUNT": "pause-check"}).get("BALANCE") != "2.00":
        assert time.monotonic() < deadline, running.cluster.status(source)
        time.sleep(0.1)
    assert running.cluster.status(other)["SENDS_RESULTS"] is True
    events = log_events(running.cluster.log_path("sequencer"), "results_source_changed")
    assert any(e.get("reason") == "stalled" and e.get("stalled") == source for e in events), events


# --- Errors that say which node is missing --------------------------------------------------------


def run_client_py(topology_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "client.py"), "--topology", str(topology_path), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def orderer_cluster(root: Path, architecture: str) -> tuple[archs.LabCluster, Cluster]:
    """A sequencer or queue cluster laid out on free ports, started by the caller (the queue server
    answering once a replica applied, like the sequencer)."""
    extra = {"ack_replicas": 1} if architecture == "queue" else {}
    lab = archs.build(architecture, archs.LayoutOptions(run_dir=root, ports="free", extra=extra))
    return lab, Cluster(root, lab.nodes, name=f"{architecture}-errors", architecture=architecture)


@pytest.mark.parametrize("architecture, orderer", [("sequencer", "sequencer"), ("queue", "server")])
def test_a_write_while_no_replica_is_connected_is_told_so_and_applied_when_one_comes(tmp_path, architecture, orderer):
    lab, cluster = orderer_cluster(tmp_path, architecture)
    with cluster:
        cluster.start([orderer])  # no replica yet
        done = run_client_py(cluster.topology_path, "--timeout", "3", "deposit", "alice", "5")
        # The operation is in the log, applied when a replica comes: its outcome is unknown (exit 2),
        # and the words say why rather than a bare TIMEOUT.
        assert done.returncode == 2, done
        assert done.stdout.startswith("NOK NO_REPLICA: no replica is connected (replica1, replica2 expected): "
                                      "the operation is in the log at seq 1"), done
        op_id = re.search(r"retry with --id (\S+)\)", done.stdout).group(1)
        cluster.start(list(lab.replicas))
        done = run_client_py(cluster.topology_path, "--id", op_id, "--wait", "applied", "deposit", "alice", "5")
        assert done.returncode == 0 and done.stdout.startswith("OK balance=5.00"), done
        done = run_client_py(cluster.topology_path, "--wait", "applied", "deposit", "alice", "1")
        assert done.returncode == 0 and done.stdout.startswith("OK balance=6.00"), done


@pytest.mark.parametrize("architecture, orderer", [("sequencer", "sequencer"), ("queue", "server")])
def test_with_only_the_orderer_down_the_client_names_it_and_the_replicas_that_answer(tmp_path, architecture, orderer):
    lab, cluster = orderer_cluster(tmp_path, architecture)
    with cluster:
        cluster.start(list(lab.replicas))
        node = cluster.nodes[orderer]
        done = run_client_py(cluster.topology_path, "--timeout", "1", "deposit", "alice", "1")
        assert done.returncode == 1, done
        replicas = " and ".join(f"{name} at {cluster.nodes[name].host}:{cluster.nodes[name].port}" for name in lab.replicas)
        assert f"({orderer} at {node.host}:{node.port} does not answer; {replicas} do)" in done.stdout, done.stdout
        assert "is a cluster running there" not in done.stdout


# --- Every account at a replica: a typo's account can be seen ------------------------------------


@pytest.mark.parametrize("architecture", ["standalone", "multicast", "queue", "sequencer"])
def test_client_py_accounts_lists_every_account_so_a_misspelt_one_shows(clusters, architecture):
    running = clusters(architecture)
    code, out = client_py(running, "transfer", "acct-a", "acct-bb", "1")  # "acct-b" misspelt: a new account
    assert code == 0, out
    code, out = client_py(running, "accounts")
    assert code == 0, out
    lines = out.splitlines()
    listed = dict(line.split() for line in lines[:-1])
    assert listed["acct-bb"] == "1.00" and listed["acct-b"] == "100.00", out
    assert list(listed) == sorted(listed), out  # in name order
    assert re.fullmatch(rf"{len(listed)} accounts( at seq \d+)?", lines[-1]), lines[-1]
    # --limit shows fewer and says how to go on; --after goes on from there.
    code, out = client_py(running, "accounts", "--limit", "1")
    first = out.splitlines()[0].split()[0]
    assert code == 0 and out.splitlines()[-1].startswith(f"1 of {len(listed)} accounts"), out
    assert f"--after {first} shows the next ones" in out, out
    code, out = client_py(running, "accounts", "--after", first)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[:-1]] == list(listed)[1:], out


@pytest.mark.parametrize("architecture", ["standalone", "sequencer"])
def test_an_accounts_request_is_validated_and_paged_within_the_line_limit(clusters, architecture):
    running = clusters(architecture)
    reader = running.lab.replicas[0]
    page = running.cluster.request(reader, {"TASK": "ACCOUNTS", "ID": "page-1", "LIMIT": 1})
    assert page["STATUS"] == "OK" and len(page["ACCOUNTS"]) == 1 and page["NEXT_AFTER"] == page["ACCOUNTS"][0][0]
    assert page["ACCOUNTS_TOTAL"] >= 2 and type(page["SEQ"]) is int, page
    rest = running.cluster.request(reader, {"TASK": "ACCOUNTS", "ID": "page-2", "AFTER": page["NEXT_AFTER"]})
    assert len(rest["ACCOUNTS"]) == page["ACCOUNTS_TOTAL"] - 1 and "NEXT_AFTER" not in rest, rest
    for bad, code in [({"LIMIT": 0}, "FIELD_INVALID"), ({"LIMIT": 501}, "FIELD_INVALID"), ({"LIMIT": "5"}, "FIELD_TYPE"),
                      ({"AFTER": 5}, "FIELD_TYPE"), ({"AFTER": "no spaces"}, "ACCOUNT_INVALID"), ({"MIN_SEQ": -1}, "FIELD_TYPE")]:
        reply = running.cluster.request(reader, {"TASK": "ACCOUNTS", "ID": "bad", **bad})
        assert (reply["STATUS"], reply["ERROR"]) == ("NOK", code), (bad, reply)
    if architecture == "sequencer":  # the sequencer orders writes: accounts are read from a replica
        reply = running.cluster.request("sequencer", {"TASK": "ACCOUNTS", "ID": "at-sequencer"})
        assert reply["ERROR"] == "WRONG_ROLE" and "from a replica" in reply["DETAIL"], reply


# --- The protocol reference says what every role answers -----------------------------------------


@pytest.mark.parametrize("architecture", ["standalone", "multicast", "queue", "sequencer"])
def test_docs_protocol_names_every_status_field_of_every_role(clusters, architecture, undocumented_status_fields):
    running = clusters(architecture)
    for name in running.cluster.nodes:
        status = running.cluster.status(name)
        assert undocumented_status_fields(status) == set(), (name, status)
