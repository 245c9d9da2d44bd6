"""The lab's command line (lab.py) as a new user meets it.

A bad argument ends in one usage error naming the valid values, never a traceback; a fault schedule
the architecture cannot play is refused before any run; every command and flag explains itself; a
port held by another cluster is named; `up` keeps the cluster up when one of its processes dies,
says which and how to start it again, and stops everything on SIGTERM; a farm started again by `up`
has its store as it was; the bench summary tells the farm's worker counts apart; the farm's bench
prints one summary and leaves no database behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lab
from common.lab import archs
from common.lab.cluster import Cluster, Node, PortInUse
from common.lab.faults import SCHEDULES
from common.lab.runner import RunOptions, run_lab
from common.transport.blocking import BlockingConnection

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_TIMEOUT_S = 60.0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "lab.py"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# --- Bad arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["up", "--arch", "bogus"], ["lab.py up: error: argument --arch", "'bogus'", "'sequencer'", "'primary-backup'"]),
    (["run", "--arch", "bogus"], ["lab.py run: error: argument --arch", "'bogus'", "standalone", "primary-backup"]),
    (["run", "--arch", "standalone,bogus"], ["lab.py run: error: argument --arch", "'bogus'", "sequencer"]),
    (["run", "--faults", "bogus"], ["lab.py run: error: argument --faults", "'bogus'", "'kill-replica'"]),
    (["chaos", "--arch", "sequencer", "--faults", "kill-primary"],
     ["lab.py chaos: error: argument --faults: kill-primary needs a primary, which sequencer does not have",
      "kill-replica", "kill-sequencer"]),
    (["chaos", "--arch", "farm", "--faults", "partition-replica"],
     ["lab.py chaos: error: argument --faults: partition-replica", "farm", "kill-server"]),
    (["bench", "--faults", "kill-replica"], ["lab.py bench: error: bench runs without faults; use chaos"]),
    (["run", "--clients", "1,x"], ["lab.py run: error: argument --clients", "'x'"]),
    (["run", "--option", "replicas"], ["lab.py run: error: argument --option: expected KEY=VALUE"]),
    # A misspelt option would leave the run on its defaults (a sync run taken for an async one).
    (["run", "--arch", "primary-backup", "--option", "replcation=async"],
     ["lab.py run: error: argument --option: primary-backup has no option replcation", "replication"]),
    (["run", "--arch", "standalone", "--option", "replicas=3"], ["standalone has no option replicas"]),
    (["run", "--option", "synchronous=sometimes"], ["synchronous must be one of full, normal, off"]),
    (["run", "--accounts", "1"], ["lab.py run: error: argument --accounts: must be at least 2"]),
    (["run", "--mix", "bogus"], ["lab.py run: error: argument --mix", "mixed, writes, reads", "transfer, deposit"]),
    (["bench", "--mix", "transfer=lots"], ["lab.py bench: error: argument --mix: the weight of transfer is not a number"]),
    (["run", "--mix", "balance=0"], ["lab.py run: error: argument --mix: a mix needs at least one kind with a positive weight"]),
    (["run", "--mix", "deposit=-1"], ["lab.py run: error: argument --mix: the weight of deposit must be between 0"]),
    (["run", "--duration", "0"], ["lab.py run: error: argument --duration: must be more than 0"]),
    (["demo", "--duration", "-1"], ["lab.py demo: error: argument --duration: must be more than 0"]),
])
def test_a_bad_argument_is_one_usage_error_naming_the_valid_values(args, expected):
    result = run_cli(*args)
    assert result.returncode == 64, result  # bad usage, as in every script (common/cli.py)
    assert "Traceback" not in result.stderr
    message = last_line(result.stderr)
    for text in expected:
        assert text in message, (text, message)
    assert result.stdout == ""


def test_a_fault_schedule_the_sequencer_cannot_play_is_refused_and_the_fitting_ones_are_named():
    assert "kill-primary" not in archs.schedules_for("sequencer")
    assert {"kill-replica", "kill-sequencer"} <= set(archs.schedules_for("sequencer"))
    assert archs.unfit_schedule("sequencer", "kill-replica", SCHEDULES["kill-replica"]) is None
    reason = archs.unfit_schedule("sequencer", "kill-primary", SCHEDULES["kill-primary"])
    assert reason is not None and "kill-sequencer" in reason and "\n" not in reason


def test_a_cluster_resolves_no_role_it_does_not_have(tmp_path):
    lab_cluster = archs.build("sequencer", archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    with pytest.raises(ValueError, match="no node in role 'primary'"):
        asyncio.run(lab_cluster.resolve("primary"))  # refused before asking any node: none is running


def test_run_lab_refuses_a_schedule_with_a_missing_role_before_starting_anything(tmp_path):
    options = RunOptions(architecture="sequencer", faults="kill-primary", progress=False, duration_s=1.0,
                         results_dir=tmp_path / "results", run_root=tmp_path / "runs", run_name="refused")
    with pytest.raises(ValueError, match="primary"):
        run_lab(options)
    assert not (tmp_path / "runs" / "refused").exists()  # no cluster was even laid out on disk


@pytest.mark.parametrize("architecture", list(archs.BUILDERS))
def test_the_fault_roles_known_before_a_build_are_those_of_the_built_cluster(architecture, tmp_path):
    built = archs.build(architecture, archs.LayoutOptions(run_dir=tmp_path, ports="free"))
    assert built.fault_roles() == archs.FAULT_ROLES[architecture]
    proxied = archs.build(architecture, archs.LayoutOptions(run_dir=tmp_path, ports="free", proxies=True))
    assert any(proxied.proxies_of.values()) == (architecture not in archs.NO_PROXIES)


# --- Help ----------------------------------------------------------------------------------------


def help_text(command: str) -> str:
    _parser, subparsers = lab.build_parser()
    return subparsers[command].format_help()


@pytest.mark.parametrize("command", ["demo", "up", "run", "bench", "chaos", "farm-lending", "farm-bench"])
def test_every_command_has_a_description_and_every_flag_a_help_text(command):
    _parser, subparsers = lab.build_parser()
    parser = subparsers[command]
    assert parser.description and len(parser.description) > 100
    for action in parser._actions:
        assert action.help, (command, action.option_strings)
    assert "(default: " in help_text(command)


def test_run_bench_and_chaos_tell_themselves_apart_and_show_their_defaults():
    texts = {command: " ".join(help_text(command).split()) for command in ("run", "bench", "chaos")}
    assert len(set(texts.values())) == 3
    squashed = {command: "".join(text.split()) for command, text in texts.items()}  # help wraps at hyphens too
    assert "--faultsSCHEDULEfaultschedule" in squashed["chaos"] and "(default:kill-replica)" in squashed["chaos"]
    assert "(default:none)" in squashed["run"]
    assert re.search(r"--reference, --no-reference [^-]*\(default: True\)", texts["bench"])
    assert "kill-sequencer" in texts["chaos"]  # the schedules that fit each architecture


def test_the_up_help_says_a_dead_process_leaves_the_cluster_up():
    text = " ".join(help_text("up").split())
    assert "the others keep running" in text and "command that starts it again" in text
    assert "Ctrl-C or SIGTERM stops every process" in text


# --- Ports held by another cluster ---------------------------------------------------------------


def hold(host: str, port: int) -> socket.socket | None:
    """A listener on host:port, or None when some other process already holds it (also a clash)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        return None
    listener.listen(1)
    return listener


@pytest.mark.parametrize("args, address, advice", [
    (["demo", "--duration", "1"], "127.0.0.11:6002", "or pass --ports free (make demo PORTS=free)"),
    (["up", "--arch", "standalone"], "127.0.0.12:7000", "or pass --ports free"),
])
def test_a_seed_port_held_by_another_process_is_named_in_one_line_with_its_pid_and_the_ways_out(args, address, advice,
                                                                                               tmp_path):
    host, port = address.split(":")
    listener = hold(host, int(port))
    try:
        extra = ["--run-dir", str(tmp_path / "up")] if args[0] == "up" else []
        result = run_cli(*args, *extra)
    finally:
        if listener is not None:
            listener.close()
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    message = last_line(result.stderr)
    assert f"{address} (" in message and "already in use" in message and advice in message, message
    if listener is not None:  # held by this test's own process (else by something else on this machine)
        assert f"already in use by pid {os.getpid()} (" in message and f"kill {os.getpid()};" in message, message


def test_a_port_held_by_a_process_that_is_no_cluster_is_reported_with_its_pid_and_command_line(tmp_path):
    """A replica started again by hand, say: its pid and command line say what to stop."""
    script = tmp_path / "replica_started_by_hand.py"
    script.write_text("import socket, time\nlistener = socket.socket()\nlistener.bind(('127.0.0.1', 0))\n"
                      "listener.listen(1)\nprint(listener.getsockname()[1], flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        node = Node("standalone", "replica.py", "127.0.0.1", port, {"mode": "standalone"})
        with Cluster(tmp_path / "cluster", [node], name="clash") as cluster:
            with pytest.raises(PortInUse) as refused:
                cluster.start()
    finally:
        holder.kill()
        holder.wait()
    assert refused.value.pids == [holder.pid]
    assert f"127.0.0.1:{port} (standalone) is already in use by pid {holder.pid} (" in str(refused.value)
    assert f"({sys.executable} {script})" in str(refused.value)
    assert "saldo cluster" not in str(refused.value)  # it is not one: no guess


# --- up: a process exits, the cluster stays up ---------------------------------------------------


def wait_for(path: Path, pattern: str, timeout_s: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text() if path.exists() else "")
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {path}: {path.read_text() if path.exists() else ''}")


def answers_status(host: str, port: int, pid: int | None = None) -> bool:
    try:
        with BlockingConnection(host, port, connect_timeout_s=1.0) as connection:
            status = connection.request({"TASK": "STATUS"}, 1.0)
    except OSError:
        return False
    return status.get("STATUS") == "OK" and (pid is None or status.get("PID") == pid)


def test_up_survives_a_killed_process_names_it_and_prints_a_command_that_restarts_it(tmp_path):
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    run_dir = tmp_path / "cluster"
    with out.open("w") as stdout, err.open("w") as stderr:
        up = subprocess.Popen([sys.executable, str(REPO_ROOT / "lab.py"), "up", "--arch", "standalone", "--ports", "free",
                               "--run-dir", str(run_dir)], cwd=REPO_ROOT, stdout=stdout, stderr=stderr)
    by_hand = None
    try:
        node = wait_for(out, r"standalone\s+(\S+):(\d+)\s+pid (\d+)")
        host, port, pid = node.group(1), int(node.group(2)), int(node.group(3))
        # A second cluster in the same directory (other ports) would share its store: refused.
        topology = (run_dir / "topology.json").read_text()
        second = run_cli("up", "--arch", "standalone", "--ports", "free", "--run-dir", str(run_dir))
        assert second.returncode == 1 and "Traceback" not in second.stderr, second
        assert f"{run_dir} is in use by another cluster (pid {up.pid}:" in last_line(second.stderr), second.stderr
        assert (run_dir / "topology.json").read_text() == topology
        os.kill(pid, signal.SIGKILL)  # a process the test's own `up` started
        exited = wait_for(err, r"standalone \(pid (\d+)\) was killed by SIGKILL.*: (cd .*)\n")
        assert int(exited.group(1)) == pid
        command = exited.group(2)
        assert "--name standalone" in command and str(run_dir / "standalone.log") in command
        time.sleep(1.0)
        assert up.poll() is None, "up stopped when one of its processes died"
        assert "stopping" not in out.read_text()
        # The printed command really starts the node again (in its own session: stopped below by its group).
        by_hand = subprocess.Popen(command, shell=True, cwd=tmp_path, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20.0
        while not answers_status(host, port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answers_status(host, port)
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=20) == 0
        assert "stopping" in out.read_text()
        assert "Traceback" not in err.read_text()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=20)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        if by_hand is not None:
            try:
                os.killpg(by_hand.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            by_hand.wait(timeout=20)


def test_up_farm_keeps_its_store_between_runs(tmp_path):
    """As the other clusters do: a deposit made before Ctrl-C is there after the next `up`."""
    run_dir = tmp_path / "farm"

    def up_and_run(*command: str) -> subprocess.CompletedProcess:
        out = tmp_path / "up.out"
        with out.open("w") as stdout:
            up = subprocess.Popen([sys.executable, str(REPO_ROOT / "lab.py"), "up", "--arch", "farm", "--ports", "free",
                                   "--run-dir", str(run_dir)], cwd=REPO_ROOT, stdout=stdout, stderr=subprocess.DEVNULL)
        try:
            wait_for(out, r"saldo farm cluster is up", 60.0)
            return subprocess.run([sys.executable, str(REPO_ROOT / "client.py"), "--topology", str(run_dir / "topology.json"),
                                   *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        finally:
            up.send_signal(signal.SIGTERM)  # what Ctrl-C does
            try:
                assert up.wait(timeout=30) == 0
            finally:
                if up.poll() is None:
                    up.kill()
                    up.wait()

    deposited = up_and_run("deposit", "alice", "5")
    assert (deposited.returncode, deposited.stdout.strip()) == (0, "OK balance=5.00"), deposited
    read = up_and_run("balance", "alice")
    assert (read.returncode, read.stdout.strip()) == (0, "OK balance=5.00"), read


# --- The bench summary ---------------------------------------------------------------------------


def test_the_summary_row_names_the_variant_so_the_farms_worker_counts_differ(capsys):
    def report(workers: int) -> dict:
        return {"variant": f"{workers} worker{'' if workers == 1 else 's'}", "window": 16, "throughput_ops_s": 1000.0 * workers,
                "applied_ops_s": 900.0, "latency_ms": {"p50": 1.0, "p99": 2.0}, "reference": {}, "verdict": "valid",
                "anomalies_expected": False}

    summary = [lab._summarize("farm", 8, [report(workers)] * 3) for workers in (1, 2, 4)]
    lab._print_summary(summary)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("farm")]
    assert [row.split(")")[0].strip() for row in rows] == ["farm (1 worker", "farm (2 workers", "farm (4 workers"]
    assert len(set(rows)) == 3


def test_the_help_formatter_leaves_out_defaults_that_say_nothing():
    parser = argparse.ArgumentParser(formatter_class=lab._HelpFormatter)
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--count", type=int, default=3, help="how many")
    text = parser.format_help()
    assert "a switch\n" in text and "how many (default: 3)" in text


# --- The farm's bench ----------------------------------------------------------------------------


def database_exists(url: str) -> bool:
    import urllib.parse

    import pymysql

    parsed = urllib.parse.urlsplit(url)
    connection = pymysql.connect(host=parsed.hostname, port=parsed.port or 3306, user=parsed.username or "root",
                                 password=parsed.password or "", connect_timeout=5)
    try:
        with connection.cursor() as cursor:
            return cursor.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                                  (parsed.path.lstrip("/"),)) > 0
    finally:
        connection.close()


@pytest.mark.slow
def test_the_farm_bench_prints_one_summary_and_drops_its_database(mysql_url):
    from common.lab.farm_bench import farm_store

    done = subprocess.run([sys.executable, str(REPO_ROOT / "lab.py"), "farm-bench", "--store", mysql_url, "--duration", "1",
                           "--repeat", "1", "--lending-load-s", "2", "--ports", "free"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout[done.stdout.index("== farm summary"):]
    rows = [line.split() for line in summary.splitlines()[2:5]]
    assert [row[0] for row in rows] == ["1", "2", "4"] and all(row[-1] == "valid" for row in rows), summary
    assert "lending (4 workers, farm1 overloaded): overload -> a borrowed worker serving" in summary
    assert "was dropped" in done.stdout and not database_exists(farm_store(mysql_url))


def test_the_farm_bench_drops_its_database_when_a_run_fails(mysql_url, monkeypatch):
    from common.lab import farm_bench
    from common.storage.store import open_store

    def failing_run(options):
        open_store(farm_bench.farm_store(options.store)).close()  # the run created the database, then broke
        raise RuntimeError("a run failed")

    monkeypatch.setattr(farm_bench, "run_lab", failing_run)
    with pytest.raises(RuntimeError):
        farm_bench.run(mysql_url, duration_s=1, repeat=1, ports="free")
    assert not database_exists(farm_bench.farm_store(mysql_url))


# --- A machine without the loopback aliases (macOS) ------------------------------------------------


@pytest.mark.parametrize("architecture", list(archs.BUILDERS))
def test_on_one_host_every_layout_listens_on_127_0_0_1_with_the_seeds_ports_kept_apart(architecture, tmp_path):
    one_host = archs.Hosts(one_host=True)
    lab_cluster = archs.build(architecture, archs.LayoutOptions(run_dir=tmp_path, ports="seed", hosts=one_host))
    addresses = [address for node in lab_cluster.nodes for address in node.listen_addresses()]
    assert {host for host, _port in addresses} == {"127.0.0.1"}
    assert len(addresses) == len(set(addresses)), addresses  # no two processes on one port
    topology = " ".join(str(node.entry()) for node in lab_cluster.nodes)
    assert not re.search(r"127\.0\.0\.1[1-4]", topology), topology  # no node told to look for a seed host
    seed = archs.build(architecture, archs.LayoutOptions(run_dir=tmp_path, ports="seed", hosts=archs.Hosts()))
    first = seed.nodes[0]
    assert first.port == lab_cluster.nodes[0].port - archs.ONE_HOST_PORT_STEP * archs.SEED_HOSTS.index(first.host)


def test_the_seed_hosts_are_used_where_they_can_be_bound_and_not_where_they_cannot(monkeypatch):
    assert archs.detect_hosts() == archs.Hosts(one_host=False)  # Linux: all of 127.0.0.0/8 is there
    monkeypatch.setattr(archs, "_can_bind", lambda host: host == "127.0.0.1")  # as on macOS
    assert archs.detect_hosts() == archs.Hosts(one_host=True)


def test_up_without_the_loopback_aliases_says_so_in_one_line_and_serves_on_127_0_0_1(tmp_path):
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    env = {**os.environ, archs.NO_ALIASES_ENV: "1"}
    with out.open("w") as stdout, err.open("w") as stderr:
        up = subprocess.Popen([sys.executable, str(REPO_ROOT / "lab.py"), "up", "--arch", "sequencer", "--ports", "free",
                               "--run-dir", str(tmp_path / "cluster")], cwd=REPO_ROOT, stdout=stdout, stderr=stderr, env=env)
    try:
        wait_for(out, r"replica2\s+\S+ +pid \d+")
        notes = [line for line in err.read_text().splitlines() if "cannot be bound here" in line]
        assert len(notes) == 1 and "127.0.0.1" in notes[0] and "macOS" in notes[0], err.read_text()
        listed = re.findall(r"^  (sequencer|replica1|replica2)\s+(\S+):(\d+)", out.read_text(), re.MULTILINE)
        assert {host for _name, host, _port in listed} == {"127.0.0.1"} and len(listed) == 3, out.read_text()
        done = subprocess.run([sys.executable, str(REPO_ROOT / "client.py"), "--topology", str(tmp_path / "cluster" / "topology.json"),
                               "deposit", "alice", "5"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("OK balance=5.00"), done
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=20) == 0


def test_the_demo_run_without_the_loopback_aliases_is_valid(tmp_path):
    """What `make demo` runs (a sequencer cluster, replica1 killed and restarted), laid out on one host."""
    result = run_lab(RunOptions(architecture="sequencer", clients=8, window=16, duration_s=2.0, faults="kill-replica",
                                ports="free", progress=False, hosts=archs.Hosts(one_host=True),
                                results_dir=tmp_path / "results", run_root=tmp_path / "runs", run_name="demo-one-host"))
    assert result.report["verdict"] == "valid", result.report["anomalies"]
    assert {node.host for node in result.lab.nodes} == {"127.0.0.1"}
    assert [fault["action"] for fault in result.report["faults"]][:1] == ["kill"], result.report["faults"]


def test_on_one_host_every_architecture_can_be_up_beside_the_others_as_on_the_seeds_hosts(tmp_path):
    """`make up ARCH=queue` beside a running sequencer cluster: no two clusters want one port."""
    for hosts in (archs.Hosts(one_host=True), archs.Hosts(one_host=False)):
        taken: dict[tuple[str, int], str] = {}
        for architecture in [a for a in archs.BUILDERS if a != "primary-backup-async"]:  # (primary-backup's ports)
            layout = archs.build(architecture, archs.LayoutOptions(run_dir=tmp_path / architecture, ports="seed", hosts=hosts))
            for node in layout.nodes:
                if node.role == "worker":  # a worker's STATUS port is a free one
                    continue
                for address in node.listen_addresses():
                    assert address not in taken, (architecture, node.name, address, taken[address])
                    taken[address] = f"{architecture}/{node.name}"
