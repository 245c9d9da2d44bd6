"""The lab itself (issue 3), proven on the standalone architecture with real processes.

Each scenario starts real saldo processes on loopback addresses with free ports (common/lab/cluster.py
owns and stops them, even when a test fails), does one thing to them, and checks what the lab
reports: a clean run is valid and its report keeps the contract other tools read; a balance changed
behind the bank's back is caught; a SIGKILL in the middle of a run loses nothing acknowledged; the
fault proxy really cuts, delays and resets a link; the timeline shades the fault windows.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import socket
import sqlite3
import time
import xml.etree.ElementTree as ElementTree
from decimal import Decimal
from pathlib import Path

import pytest

from common.lab import archs, checker, runner
from common.lab import report as report_module
from common.lab.cluster import Cluster, PortInUse, RunDirInUse
from common.lab.faults import Fault, FaultInjector
from common.lab.report import REPORT_FIELDS
from common.lab.runner import RunOptions, RunResult, run_lab
from common.lab.workload import MIXES, Workload, WorkloadConfig, describe_mix, parse_mix
from common.storage.store import open_store
from common.transport.blocking import BlockingConnection

pytestmark = pytest.mark.slow

SVG = "{http://www.w3.org/2000/svg}"
FAULT_SHADE = "#f4a582"  # the fill of a fault window (class "fault") in the timeline (common/lab/report.py)


def lab_run(root: Path, **options) -> RunResult:
    """One lab run with free ports, everything written under `root`."""
    settings = dict(ports="free", progress=False, duration_s=3.0, clients=8,
                    results_dir=root / "results", run_root=root / "runs")
    settings.update(options)
    return run_lab(RunOptions(**settings))


def write_ids(result: RunResult, *, acknowledged: bool) -> set[str]:
    ids = set()
    for record in result.history:
        if record.kind == "BALANCE":
            continue
        if not acknowledged or record.outcome == "ok" or record.error in checker.RECORDED_ERRORS:
            ids.add(record.op_id)
    return ids


def shaded_rects(svg_path: Path) -> list[ElementTree.Element]:
    root = ElementTree.parse(svg_path).getroot()  # raises if the file is not well-formed XML
    assert root.tag == f"{SVG}svg"
    return [rect for rect in root.iter(f"{SVG}rect") if rect.get("class") == "fault" and rect.get("fill") == FAULT_SHADE]


@pytest.fixture(scope="module")
def standalone_run(tmp_path_factory) -> RunResult:
    # (Its store is read again below: kept, although the run is valid.)
    return lab_run(tmp_path_factory.mktemp("standalone"), architecture="standalone", run_name="standalone-clean",
                   keep_stores=True)


# --- A clean run, and its report ----------------------------------------------------------------


def test_the_standalone_architecture_passes_a_lab_run_with_8_clients(standalone_run):
    report = standalone_run.report
    assert report["verdict"] == "valid", report["anomaly_examples"]
    assert all(count == 0 for count in report["anomalies"].values())
    assert report["ops"]["ok"] > 0 and report["ops"]["unknown"] == 0
    assert {r.client for r in standalone_run.history if r.client >= 0} == set(range(8))
    # Exactly once: the store applied each acknowledged write once, and nothing else (no unknowns).
    image = standalone_run.states["standalone"]
    assert image.counters.ops_applied_total == len(write_ids(standalone_run, acknowledged=True))
    assert {row.op.op_id for row in image.recent} == write_ids(standalone_run, acknowledged=True)
    # The process's event loop was watched through the run (how many stalls depends on the machine).
    stalls = report["loop_stalls"]
    assert set(stalls) == {"standalone", "lab"}  # the lab's own loop, whose stalls its clients measure
    assert all(type(n["stalls"]) is int and n["stalls"] >= 0 and n["stalled_ms"] >= 0 for n in stalls.values())


def test_a_writes_only_mix_sends_no_read_and_every_acknowledged_operation_is_applied(tmp_path):
    result = lab_run(tmp_path, architecture="standalone", clients=4, duration_s=1.5, mix=MIXES["writes"],
                     run_name="standalone-writes")
    report = result.report
    assert report["verdict"] == "valid", report["anomaly_examples"]
    assert report["mix"] == "transfer 60% deposit 20% withdraw 20%"
    assert report["ops_by_kind"]["BALANCE"] == 0
    assert min(report["ops_by_kind"][kind] for kind in ("TRANSFER", "DEPOSIT", "WITHDRAW")) > 0
    assert re.search(r"^  mix +transfer 60% deposit 20% withdraw 20%$", report_module.format_table(report), re.M)


def test_the_collector_is_off_while_the_clients_measure_and_back_on_after_the_run():
    """A collection walking the history would stop every client: the run would report it as latency."""

    class InstantClient:  # answers at the next turn of the loop, noting whether the collector ran
        collector_on: list[bool] = []

        def submit(self, request_id, line, on_reply, timeout_s=None, is_read=False):
            self.collector_on.append(gc.isenabled())
            asyncio.get_running_loop().call_soon(on_reply, {"ID": request_id, "STATUS": "OK", "BALANCE": "1.00"})

        async def close(self):
            pass

    assert gc.isenabled()
    workload = Workload(WorkloadConfig(clients=2, window=4, duration_s=0.2), lambda _index: InstantClient(), progress=False)
    history = asyncio.run(workload.run())
    assert len(history) == len(InstantClient.collector_on) > 0
    assert not any(InstantClient.collector_on)
    assert gc.isenabled()


def test_a_mix_is_read_from_a_name_or_from_weights_and_a_kind_weighted_zero_is_never_drawn():
    assert parse_mix("mixed") == (0.6, 0.1, 0.1, 0.2)
    assert parse_mix("transfer=3, balance=1") == (0.75, 0.0, 0.0, 0.25)
    assert describe_mix(parse_mix("transfer=3,balance=1")) == "transfer 75% balance 25%"
    for text in ("transfer", "transfer=1,bogus=1", "deposit=nan", "withdraw=1e9", "balance=0"):
        with pytest.raises(ValueError):
            parse_mix(text)


def test_the_report_has_every_contract_field_and_latest_json_is_a_copy_of_it(standalone_run):
    report = standalone_run.report
    for name in REPORT_FIELDS:
        assert name in report, name
    assert report["architecture"] == "standalone"
    assert report["clients"] == 8
    assert 2.0 < report["duration_s"] < 30.0
    assert set(report["ops"]) >= {"ok", "failed", "unknown"}
    assert report["ops"]["ok"] + report["ops"]["failed"] + report["ops"]["unknown"] == len(
        [r for r in standalone_run.history if r.client >= 0])
    assert report["throughput_ops_s"] > 0 and report["applied_ops_s"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["faults"] == []
    assert set(report["anomalies"]) == set(checker.ANOMALY_TYPES)
    assert report["verdict"] in ("valid", "invalid")
    assert report["reference"] == {}  # not asked for in this run
    written = json.loads(standalone_run.report_path.read_text())
    latest = json.loads((standalone_run.report_path.parent / "latest.json").read_text())
    assert written == latest == json.loads(json.dumps(report))
    assert standalone_run.report_path.name == "standalone-clean.json"


def test_the_timeline_of_a_run_without_faults_has_no_shaded_window(standalone_run):
    svg = Path(standalone_run.report["timeline_svg"])
    assert svg.exists()
    assert shaded_rects(svg) == []


def test_a_balance_corrupted_directly_in_the_store_is_reported_invalid(standalone_run, tmp_path):
    original_url = standalone_run.lab.stores()["standalone"]
    copy_path = tmp_path / "corrupted.db"
    source = sqlite3.connect(original_url.removeprefix("sqlite:///").split("?")[0])
    with sqlite3.connect(copy_path) as target:
        source.backup(target)
    source.close()
    store = open_store(f"sqlite:///{copy_path}")
    try:
        before = store.load()
        assert checker.check(standalone_run.history, {"standalone": before}, total_order=True).valid
        cursor = store._cursor()
        cursor.execute("UPDATE accounts SET balance_cents = balance_cents + 1 WHERE name = 'acct-3'")
        after = store.load()
    finally:
        store.close()
    assert after.balances["acct-3"] == before.balances["acct-3"] + 1
    result = checker.check(standalone_run.history, {"standalone": after}, total_order=True)
    assert result.verdict == "invalid"
    assert result.anomalies["money"] >= 1  # one cent that no deposit explains
    assert result.anomalies["lost_write"] == result.anomalies["phantom_write"] == 0


# --- A crash in the middle of a run -------------------------------------------------------------


def test_sigkill_and_restart_of_the_standalone_process_loses_no_acknowledged_operation(tmp_path):
    result = lab_run(tmp_path, architecture="standalone", duration_s=4.0, run_name="standalone-kill",
                     schedule=[Fault("kill", "replica", 0.3, 0.6)])
    report = result.report
    assert report["verdict"] == "valid", report["anomaly_examples"]
    [fault] = report["faults"]
    assert fault["action"] == "kill" and fault["target"] == "standalone"
    assert fault["until_s"] > fault["at_s"]
    # The crash cut operations in flight; the clients retried them with the same id until they
    # learned their outcome, so no operation's outcome stayed unknown.
    assert any(r.attempts > 1 for r in result.history)
    assert report["ops"]["unknown"] == 0
    # Operations acknowledged before the crash and after the restart are all in the store.
    image = result.states["standalone"]
    stored = {row.op.op_id for row in image.recent}
    acknowledged = write_ids(result, acknowledged=True)
    assert acknowledged <= stored
    # (History times and fault times are on the same clock: seconds since the workload began.)
    before_crash = {r.op_id for r in result.history if r.kind != "BALANCE" and r.outcome == "ok" and r.complete_s < fault["at_s"]}
    after_restart = {r.op_id for r in result.history if r.kind != "BALANCE" and r.outcome == "ok" and r.invoke_s > fault["until_s"]}
    assert before_crash and after_restart
    assert before_crash <= stored and after_restart <= stored
    # Nothing but the history's operations, each once.
    assert stored <= write_ids(result, acknowledged=False)
    assert image.counters.ops_applied_total == len(stored)
    # The timeline shades the crash window, in both panels.
    assert len(shaded_rects(Path(report["timeline_svg"]))) == 2


def test_a_paused_process_shows_in_the_report_as_a_loop_stall_as_long_as_the_pause(tmp_path):
    result = lab_run(tmp_path, architecture="standalone", duration_s=3.0, run_name="standalone-pause",
                     schedule=[Fault("pause", "replica", 0.3, 0.6)])
    report = result.report
    assert report["verdict"] == "valid", report["anomaly_examples"]
    [fault] = report["faults"]
    paused_ms = (fault["until_s"] - fault["at_s"]) * 1000
    assert paused_ms > 500
    # Stopped, the process ran no timer; its first one after SIGCONT was as late as the pause.
    stalls = report["loop_stalls"]["standalone"]
    assert stalls["stalls"] >= 1
    assert stalls["stalled_ms"] >= paused_ms - 100
    assert stalls["largest_lag_ms_since_start"] >= paused_ms - 100
    assert re.search(r"^  loop stalls +(.*, )?standalone \d+ \([\d,]+ ms\)", report_module.format_table(report), re.M)


def test_loop_stalls_count_within_the_run_from_a_restart_and_say_which_node_could_not_be_read():
    start = {"replica1": {"STALLS_TOTAL": 3, "STALLED_MS_TOTAL": Decimal("400.5"), "LAG_MAX_MS": 200, "PID": 11},
             "replica2": {"STALLS_TOTAL": 1, "STALLED_MS_TOTAL": Decimal("12.0"), "LAG_MAX_MS": 12, "PID": 12},
             "sequencer": {"STALLS_TOTAL": 0, "STALLED_MS_TOTAL": 0, "LAG_MAX_MS": 4, "PID": 13}}
    end = {"replica1": {"STALLS_TOTAL": 5, "STALLED_MS_TOTAL": Decimal("90.0"), "LAG_MAX_MS": Decimal("30.5"), "PID": 21},
           "replica2": {"STALLS_TOTAL": 4, "STALLED_MS_TOTAL": Decimal("62.5"), "LAG_MAX_MS": 20, "PID": 12},
           "sequencer": None,  # paused when the run ended: it did not answer
           "lab": {"STALLS_TOTAL": 2, "STALLED_MS_TOTAL": 25.0, "LAG_MAX_MS": 13.0, "PID": 10}}
    stalls = runner._loop_stalls(start, end)
    # replica1 was restarted (another pid): everything its new process counted is in the run.
    assert stalls["replica1"] == {"stalls": 5, "stalled_ms": 90.0, "largest_lag_ms_since_start": 30.5, "restarted": True}
    assert stalls["replica2"] == {"stalls": 3, "stalled_ms": 50.5, "largest_lag_ms_since_start": 20.0, "restarted": False}
    assert stalls["sequencer"] is None
    assert stalls["lab"]["stalls"] == 2 and stalls["lab"]["restarted"] is False  # first seen at the end
    json.dumps(stalls)  # into the report as it is
    row = report_module._describe_stalls(stalls)
    assert row == "lab 2 (25 ms), replica1 5 (90 ms), replica2 3 (50 ms), sequencer not read"


def test_a_restart_still_in_progress_when_the_run_ends_is_finished_once(tmp_path):
    # Under load a restarted node can take longer to answer than the run has left: the run ends,
    # the fault injector is cancelled while it waits for the node, and heal_all (the runner's
    # clean-up) ends the same fault again. The node is started once and answers.
    lab = archs.build_standalone(archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    with Cluster(tmp_path, lab.nodes, name="restart-race") as cluster:
        lab.cluster = cluster
        cluster.start()
        t0 = time.monotonic()
        injector = FaultInjector(lab, [Fault("kill", "replica", 0.0, 0.1)], 1.0, lambda: time.monotonic() - t0)

        async def scenario() -> int | None:
            playing = asyncio.create_task(injector.run(0.0))
            was_killed = False
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.002)
                running = cluster.is_running("standalone")
                if was_killed and running:
                    break  # spawned again: the injector now waits for it to answer
                was_killed = was_killed or not running
            assert was_killed and not playing.done()
            restarted_pid = cluster.pid("standalone")
            playing.cancel()  # the run ended
            await asyncio.gather(playing, return_exceptions=True)
            await injector.heal_all()
            return restarted_pid

        restarted_pid = asyncio.run(scenario())
        assert restarted_pid is not None and cluster.pid("standalone") == restarted_pid
        assert cluster.status("standalone")["STATUS"] == "OK"
        [record] = injector.records
        assert record["action"] == "kill" and record["until_s"] >= record["at_s"]


# --- A port held by another process ---------------------------------------------------------------


@pytest.fixture
def held_port():
    """A listener on a free loopback port, as a cluster left running would hold it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.12", 0))
        listener.listen(1)
        yield listener.getsockname()


def test_a_cluster_whose_port_is_held_refuses_to_start_naming_the_address_and_starts_nothing(tmp_path, held_port):
    host, port = held_port
    lab = archs.build_standalone(archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    lab.nodes[0].port = port
    with Cluster(tmp_path, lab.nodes, name="held") as cluster:
        with pytest.raises(PortInUse, match=rf"{host}:{port} \(standalone\) is already in use") as caught:
            cluster.start()
        assert caught.value.addresses == [f"{host}:{port} (standalone)"]
        assert cluster.pid("standalone") is None


def test_a_second_cluster_in_a_directory_in_use_is_refused_and_the_first_keeps_its_files(tmp_path):
    first_lab = archs.build_standalone(archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    second_lab = archs.build_standalone(archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    with Cluster(tmp_path, first_lab.nodes, name="first") as first:
        topology = first.topology_path.read_text()
        with pytest.raises(RunDirInUse, match=rf"in use by another cluster \(pid {os.getpid()}: "):
            Cluster(tmp_path, second_lab.nodes, name="second")
        assert first.topology_path.read_text() == topology
    with Cluster(tmp_path, second_lab.nodes, name="second") as second:  # free once the first closed
        assert '"name": "second"' in second.topology_path.read_text()


def test_a_node_that_exits_because_its_port_is_held_says_so_rather_than_see_the_log(tmp_path, held_port):
    host, port = held_port
    lab = archs.build_standalone(archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    lab.nodes[0].port = port
    with Cluster(tmp_path, lab.nodes, name="held") as cluster:
        cluster.spawn("standalone")  # past the check start() makes: the node itself finds the port taken
        with pytest.raises(PortInUse, match=rf"{host}:{port}"):
            cluster.wait_ready("standalone", timeout_s=15.0)
        assert "exited with code 1" in cluster.describe_exit("standalone")
        assert cluster.command_line("standalone").endswith(f">> {cluster.log_path('standalone')} 2>&1")


# --- The fault proxy ----------------------------------------------------------------------------


class ProxiedStandalone:
    """A standalone process reached through a fault proxy (archs.build_standalone(proxies=True))."""

    def __init__(self, cluster: Cluster, lab: archs.LabCluster) -> None:
        self.cluster = cluster
        self.proxy = lab.proxies_of["standalone"][0]
        host, port = cluster.nodes[self.proxy].settings["listen"].rsplit(":", 1)
        self.listen = (host, int(port))

    def connect(self) -> BlockingConnection:
        return BlockingConnection(*self.listen, connect_timeout_s=2.0)

    def fault(self, action: str, **fields) -> dict:
        reply = self.cluster.request(self.proxy, {"TASK": "FAULT", "ACTION": action, **fields})
        assert reply["STATUS"] == "OK", reply
        return reply

    def balance_direct(self, account: str) -> str | None:
        """The balance as the standalone process itself says, bypassing the proxy."""
        reply = self.cluster.request("standalone", {"TASK": "BALANCE", "ACCOUNT": account})
        return reply.get("BALANCE")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("proxied")
    lab = archs.build_standalone(archs.LayoutOptions(run_dir=run_dir, ports="free", proxies=True))
    with Cluster(run_dir, lab.nodes, name="proxied") as cluster:
        cluster.start()
        yield ProxiedStandalone(cluster, lab)


@pytest.fixture
def link(proxied):
    proxied.fault("heal")
    yield proxied
    proxied.fault("heal")


def deposit(op_id: str, account: str, amount: str = "1.00") -> dict:
    return {"TASK": "DEPOSIT", "ID": op_id, "ACCOUNT": account, "AMOUNT": amount}


def test_the_proxy_really_partitions_requests_time_out_and_pass_after_healing(link):
    with link.connect() as connection:
        assert connection.request(deposit("p-1", "part"), 2.0)["BALANCE"] == "1.00"
        state = link.fault("partition")
        assert state["PARTITIONED"] == ["up", "down"]
        started = time.monotonic()
        cut = connection.request(deposit("p-2", "part"), 1.0)
        assert cut["ERROR"] == "TIMEOUT" and cut["DEFINITE"] is False
        assert time.monotonic() - started >= 0.9
        assert link.balance_direct("part") == "1.00"  # the request never reached the process
        # A new connection across the partition is accepted but goes nowhere either.
        with link.connect() as fresh:
            assert fresh.request({"TASK": "BALANCE", "ACCOUNT": "part"}, 1.0)["ERROR"] == "TIMEOUT"
        link.fault("heal")
        assert connection.request(deposit("p-3", "part"), 2.0)["STATUS"] == "OK"
        # The bytes held during the cut were delivered on healing, as TCP would: p-2 happened.
        assert link.balance_direct("part") == "3.00"
    with link.connect() as after:
        assert after.request({"TASK": "BALANCE", "ACCOUNT": "part"}, 2.0)["BALANCE"] == "3.00"


def test_a_one_direction_partition_cuts_only_that_direction(link):
    with link.connect() as connection:
        assert connection.request(deposit("o-1", "oneway"), 2.0)["STATUS"] == "OK"
        # Up (requests) cut: the request times out and the process never saw it.
        assert link.fault("partition", DIRECTION="up")["PARTITIONED"] == ["up"]
        assert connection.request(deposit("o-2", "oneway"), 1.0)["ERROR"] == "TIMEOUT"
        assert link.balance_direct("oneway") == "1.00"
        link.fault("heal")
        assert connection.wait_reply("o-2", 2.0)["BALANCE"] == "2.00"
        # Down (replies) cut: the process applies the request, the client hears nothing.
        assert link.fault("partition", DIRECTION="down")["PARTITIONED"] == ["down"]
        assert connection.request(deposit("o-3", "oneway"), 1.0)["ERROR"] == "TIMEOUT"
        assert link.balance_direct("oneway") == "3.00"
        link.fault("heal")
        assert connection.wait_reply("o-3", 2.0)["BALANCE"] == "3.00"


@pytest.mark.parametrize("direction, delay_ms, crossings", [("both", 150, 2), ("up", 250, 1), ("down", 250, 1)])
def test_a_delayed_link_holds_each_direction_at_least_the_configured_delay(link, direction, delay_ms, crossings):
    with link.connect() as connection:
        assert connection.request({"TASK": "BALANCE", "ACCOUNT": "nobody"}, 2.0)["STATUS"] == "NOK"
        state = link.fault("delay", DELAY_MS=delay_ms, DIRECTION=direction)
        assert state["DELAY_MS"][direction if direction != "both" else "up"] == delay_ms
        for attempt in range(3):
            started = time.monotonic()
            reply = connection.request({"TASK": "BALANCE", "ACCOUNT": "nobody", "ID": f"d-{direction}-{attempt}"}, 5.0)
            elapsed_s = time.monotonic() - started
            assert reply["ERROR"] == "ACCOUNT_NOT_FOUND"
            assert elapsed_s >= crossings * delay_ms / 1000.0
        link.fault("heal")
        assert link.fault("heal")["DELAY_MS"] == {"up": 0, "down": 0}
        assert connection.request({"TASK": "BALANCE", "ACCOUNT": "nobody"}, 2.0)["ERROR"] == "ACCOUNT_NOT_FOUND"


def test_a_dropped_link_resets_the_connection(link):
    with link.connect() as connection:
        assert connection.request(deposit("x-1", "dropped"), 2.0)["STATUS"] == "OK"
        assert link.fault("drop")["CONNECTIONS"] == 0
        reply = connection.request({"TASK": "BALANCE", "ACCOUNT": "dropped"}, 2.0)
        assert reply["ERROR"] == "CONNECTION_LOST" and reply["DEFINITE"] is False
    with link.connect() as fresh:  # the link itself still works for new connections
        assert fresh.request({"TASK": "BALANCE", "ACCOUNT": "dropped"}, 2.0)["BALANCE"] == "1.00"


@pytest.mark.parametrize("message, code", [
    ({"TASK": "FAULT", "ACTION": "explode"}, "FIELD_INVALID"),
    ({"TASK": "FAULT", "ACTION": "delay", "DELAY_MS": "20"}, "FIELD_INVALID"),
    ({"TASK": "FAULT", "ACTION": "delay", "DELAY_MS": 10**9}, "FIELD_INVALID"),
    ({"TASK": "FAULT", "ACTION": "partition", "DIRECTION": "sideways"}, "FIELD_INVALID"),
    ({"TASK": "FAULT", "ACTION": "partition", "DIRECTION": ["up"]}, "FIELD_TYPE"),
    ({"TASK": "DEPOSIT", "ID": "d", "ACCOUNT": "a", "AMOUNT": "1"}, "UNKNOWN_MESSAGE"),
])
def test_the_proxy_control_port_refuses_what_it_does_not_understand(link, message, code):
    reply = link.cluster.request(link.proxy, message)
    assert reply["STATUS"] == "NOK" and reply["ERROR"] == code
    assert link.cluster.status(link.proxy)["PARTITIONED"] == []


def test_the_report_table_says_when_each_fault_happened_as_a_share_of_the_run():
    fault = {"action": "kill", "target": "replica1", "role": "replica", "at_s": 2.936, "until_s": 5.819}
    assert report_module._describe_fault(fault, [0.54, 8.55]) == "kill replica1@2.936s until 5.819s (30% to 66% into the run)"
    instant = {"action": "drop", "target": "replica1", "at_s": 2.936, "until_s": 2.936}
    assert report_module._describe_fault(instant, [0.54, 8.55]) == "drop replica1@2.936s (30% into the run)"
    assert report_module._describe_fault(instant, None) == "drop replica1@2.936s"


# --- What runs leave on disk ---------------------------------------------------------------------


def test_a_valid_run_leaves_its_logs_but_not_its_stores_unless_asked_to_keep_them(tmp_path):
    deleted = lab_run(tmp_path, architecture="sequencer", duration_s=1.0, clients=2, run_name="valid-run")
    kept = lab_run(tmp_path, architecture="sequencer", duration_s=1.0, clients=2, run_name="kept-run", keep_stores=True)
    for result in (deleted, kept):
        assert result.report["verdict"] == "valid", result.report["anomalies"]
        assert {path.name for path in Path(result.report["run_dir"]).glob("*.log")} >= {"sequencer.log", "replica1.log"}
    assert deleted.report["stores_deleted"] is True and not list((tmp_path / "runs" / "valid-run").glob("*.db*"))
    assert kept.report["stores_deleted"] is False
    assert {path.name for path in (tmp_path / "runs" / "kept-run").glob("*.db")} == {"replica1.db", "replica2.db"}


def test_the_lab_keeps_a_bounded_number_of_run_directories_and_histories_and_never_one_in_use(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    results.mkdir(parents=True)
    for index in range(runner.MAX_RUN_DIRS + 5):  # older runs, oldest first
        (runs / f"old-{index:02d}").mkdir(parents=True)
        os.utime(runs / f"old-{index:02d}", (1_000_000 + index, 1_000_000 + index))
    for index in range(runner.MAX_HISTORY_FILES + 3):
        history = results / f"old-{index:02d}.history.jsonl"
        history.write_text("{}\n")
        os.utime(history, (1_000_000 + index, 1_000_000 + index))
    in_use = archs.build_standalone(archs.LayoutOptions(run_dir=runs / "old-00", ports="free"))
    with Cluster(runs / "old-00", in_use.nodes, name="in-use"):  # the oldest, but a cluster runs from it
        os.utime(runs / "old-00", (1_000_000, 1_000_000))
        result = lab_run(tmp_path, architecture="standalone", duration_s=1.0, clients=1, run_name="newest",
                         keep_history=True)
    left = sorted(path.name for path in runs.iterdir())
    # The newest ones up to the bound, the one in use among them although it is the oldest.
    assert left == ["newest", "old-00"] + [f"old-{index:02d}" for index in range(7, runner.MAX_RUN_DIRS + 5)], left
    assert len(left) == runner.MAX_RUN_DIRS
    histories = sorted(path.name for path in results.glob("*.history.jsonl"))
    assert len(histories) == runner.MAX_HISTORY_FILES and "newest.history.jsonl" in histories, histories
    assert result.report["older_runs_removed"] == 6 + 4  # old-01 to old-06; the 4 oldest histories
