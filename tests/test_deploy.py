"""The deployment, for real, on this machine: ansible-playbook deploy.yml with the local inventory.

Three "hosts" on this machine (ansible/inventory/local: 127.0.0.11-13, each with an install root
of its own under a temporary directory, every database on the test's MariaDB), ports the kernel
says are free, database and account names unique to this run. The playbook deploys code,
virtualenv, databases and accounts, topology file and units; the tests check the accounts'
privileges, let systemd-analyze judge the units, start every unit from its ExecStart (with the
stand-in for systemctl the topology's control commands use), run the lab against the cluster with
a kill fault, and run the playbook a second time. Every process started is ended by its PID, and
every database and account created is dropped.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import MYSQL_URL_ENV, REPO_ROOT

# The playbook runs twice in the first test that needs the deployment: more than the default limit on a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ANSIBLE_DIR = REPO_ROOT / "ansible"
LOCAL_INVENTORY = "inventory/local/hosts.yml"
HOSTS = {"orchestrator01": "127.0.0.11", "replica01": "127.0.0.12", "replica02": "127.0.0.13"}
# group_vars/all/main.yml's port names, each given a port free on every local host.
PORT_NAMES = ("multicast_replica", "queue_rpc", "queue_replica", "sequencer_client", "sequencer_replica", "primary_client",
              "primary_peer", "sequencer_replica_client", "witness", "farm_server", "farm_server_2", "farm_worker_status",
              "farm_worker_status_2")
PORT_RANGE = (20000, 32000)  # below the kernel's ephemeral range, so no client connection takes one meanwhile
PLAYBOOK_TIMEOUT_S = 600
READY_TIMEOUT_S = 30.0
VAULT_VARIABLES = ("vault_saldo_db_replica_password", "vault_saldo_db_farm_password", "vault_saldo_db_lab_password")
REQUIRE_DEPLOY_ENV = "SALDO_REQUIRE_DEPLOY"


def _tool(name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.exists():
        message = f"{name} is not installed in this virtualenv: pip install -r requirements-deploy.txt (make test does)"
        if os.environ.get(REQUIRE_DEPLOY_ENV) == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def _bindable(port: int) -> bool:
    for host in HOSTS.values():
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def free_port_block(count: int) -> int:
    """The first of `count` consecutive ports free on every local host."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(*PORT_RANGE)
        if all(_bindable(base + offset) for offset in range(count)):
            return base
    raise RuntimeError("no block of free ports found")


def _admin(login: dict, **extra):
    import pymysql

    return pymysql.connect(host=login["host"], port=int(login["port"]), user=login["user"], password=login["password"],
                           autocommit=True, connect_timeout=5, **extra)


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines: host -> {ok, changed, failed, ...}."""
    recap = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.MULTILINE):
        recap[host] = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", counts)}
    return recap


class LocalDeployment:
    """One run's inventory inputs, and how to run the playbook with them."""

    def __init__(self, root: Path, login: dict) -> None:
        self.root = root
        self.login = login
        self.prefix = f"sdt{secrets.token_hex(3)}"
        base = free_port_block(len(PORT_NAMES))
        ports = {name: base + index for index, name in enumerate(PORT_NAMES)}
        assert ports["farm_server_2"] == ports["farm_server"] + 1 and ports["farm_worker_status_2"] == ports["farm_worker_status"] + 1
        self.ports = {name: port for name, port in ports.items() if not name.endswith("_2")}
        self.secrets = {name: secrets.token_urlsafe(18) for name in VAULT_VARIABLES}

    def extra_vars(self, *, without: str | None = None) -> dict:
        variables = {"saldo_local_root": str(self.root), "saldo_local_ports": self.ports, "saldo_local_db_prefix": self.prefix,
                     "saldo_local_db_login": self.login, **self.secrets}
        variables.pop(without, None)
        return variables

    def playbook(self, *, without: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
        vars_file = self.root.parent / f"vars-{secrets.token_hex(4)}.json"
        vars_file.write_text(json.dumps(self.extra_vars(without=without)))
        vars_file.chmod(0o600)
        env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        started = time.monotonic()
        try:
            done = subprocess.run([str(_tool("ansible-playbook")), "-i", LOCAL_INVENTORY, "deploy.yml", "-e", f"@{vars_file}"],
                                  cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT_S)
        finally:
            vars_file.unlink()
        return done, time.monotonic() - started

    def host_root(self, host: str) -> Path:
        return self.root / host

    def topology(self) -> dict:
        return json.loads((self.host_root("orchestrator01") / "etc/saldo/topology.json").read_text())

    def drop_everything(self) -> None:
        """Every database and account this run's prefix names."""
        connection = _admin(self.login)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW DATABASES")
                for (name,) in cursor.fetchall():
                    if name.startswith(self.prefix + "_"):
                        cursor.execute(f"DROP DATABASE `{name}`")
                cursor.execute("SELECT user, host FROM mysql.user WHERE user LIKE %s", (self.prefix + "\\_%",))
                for user, host in cursor.fetchall():
                    cursor.execute(f"DROP USER '{user}'@'{host}'")
        finally:
            connection.close()

    def started_pids(self) -> list[int]:
        pids = []
        for host in HOSTS:
            started = self.host_root(host) / "run/saldo/started.pids"
            if started.exists():
                pids += [int(line) for line in started.read_text().split()]
        return pids


def _stop_pids(pids: list[int]) -> None:
    """End the processes the test (or the lab, through the control commands) started, by PID."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "Z" != _state(pid):
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


@pytest.fixture(scope="module")
def mysql_login() -> dict:
    base_url = os.environ.get(MYSQL_URL_ENV, "").strip()
    if not base_url:
        if os.environ.get("SALDO_REQUIRE_MYSQL") == "1":
            pytest.fail(f"{MYSQL_URL_ENV} is not set: the deployment test needs MariaDB", pytrace=False)
        pytest.skip(f"the deployment test needs MariaDB: set {MYSQL_URL_ENV} (make test does)")
    parsed = urllib.parse.urlsplit(base_url)
    return {"host": parsed.hostname or "127.0.0.1", "port": parsed.port or 3306,
            "user": urllib.parse.unquote(parsed.username or "root"), "password": urllib.parse.unquote(parsed.password or "")}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, mysql_login):
    """The playbook run twice on this machine's three local hosts; the timings and outputs."""
    _tool("ansible-playbook")
    work = tmp_path_factory.mktemp("deploy")
    local = LocalDeployment(work / "hosts", mysql_login)
    try:
        local.first, local.first_s = local.playbook()
        assert local.first.returncode == 0, local.first.stdout[-6000:] + local.first.stderr[-3000:]
        local.second, local.second_s = local.playbook()
        yield local
    finally:
        _stop_pids(local.started_pids())
        local.drop_everything()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def running(deployment):
    """Every unit of every host started from its rendered ExecStart, through the start command
    the topology file names for it (what the lab itself runs to restart a node)."""
    topology = deployment.topology()
    for name, control in topology["control"].items():
        for argv in control["start"]:
            subprocess.run(argv, check=True, timeout=60)
    for name, entry in topology["nodes"].items():
        _wait_status(entry["host"], entry["port"], name)
    return topology


def _status(host: str, port: int) -> dict:
    from common.transport.blocking import BlockingConnection

    with BlockingConnection(host, port, connect_timeout_s=1.0) as connection:
        return connection.request({"TASK": "STATUS"}, 2.0)


def _wait_status(host: str, port: int, name: str) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        try:
            reply = _status(host, port)
            if reply.get("STATUS") == "OK":
                return reply
            last = reply
        except OSError as error:
            last = error
        time.sleep(0.1)
    raise AssertionError(f"{name} at {host}:{port} did not answer STATUS: {last}")


def test_a_deploy_without_the_vault_variables_stops_before_any_change_naming_the_missing_one(tmp_path, mysql_login):
    _tool("ansible-playbook")
    local = LocalDeployment(tmp_path / "hosts", mysql_login)
    try:
        done, _seconds = local.playbook(without="vault_saldo_db_farm_password")
        output = done.stdout + done.stderr
        assert done.returncode != 0
        assert "vault_saldo_db_farm_password is not set" in output
        assert _recap(output) and all(counts["changed"] == 0 for counts in _recap(output).values())
        assert not local.root.exists(), "the playbook wrote files before stopping"
        connection = _admin(mysql_login)
        with connection.cursor() as cursor:
            cursor.execute("SHOW DATABASES LIKE %s", (local.prefix + "\\_%",))
            assert cursor.fetchall() == ()
            cursor.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (local.prefix + "\\_%",))
            assert cursor.fetchall() == ()
        connection.close()
    finally:
        local.drop_everything()


def test_the_deploy_playbook_deploys_every_host_and_a_second_run_changes_nothing(deployment):
    first, second = _recap(deployment.first.stdout), _recap(deployment.second.stdout)
    assert set(first) == set(HOSTS) and all(counts["failed"] == 0 and counts["changed"] > 0 for counts in first.values())
    assert second.keys() == first.keys(), deployment.second.stdout[-3000:]
    assert all(counts["changed"] == 0 and counts["failed"] == 0 for counts in second.values()), deployment.second.stdout[-6000:]
    print(f"\ndeploy.yml on three local hosts: first run {deployment.first_s:.1f} s, second run {deployment.second_s:.1f} s")
    # What each host got: the code, its virtualenv with PyMySQL, the topology, only its own secrets.
    topology = deployment.topology()
    for host in HOSTS:
        root = deployment.host_root(host)
        assert (root / "opt/saldo/app/replica.py").exists() and not (root / "opt/saldo/app/tests").exists()
        subprocess.run([str(root / "opt/saldo/venv/bin/python"), "-c", "import pymysql"], check=True)
        assert json.loads((root / "etc/saldo/topology.json").read_text()) == topology
        secrets_here = sorted(path.name for path in (root / "etc/saldo/db").iterdir())
        expected = ["farm.password", "lab.password"] if host == "orchestrator01" else ["farm.password", "replica.password"]
        assert secrets_here == expected
        assert all(oct(path.stat().st_mode & 0o777) == "0o640" for path in (root / "etc/saldo/db").iterdir())
    on_replica01 = {name for name, control in topology["control"].items() if control["host_label"] == "replica01"}
    assert on_replica01 == {"multicast-replica1", "queue-replica1", "sequencer-replica1", "pb-replica1", "worker1", "worker2"}
    on_orchestrator = {name for name, control in topology["control"].items() if control["host_label"] == "orchestrator01"}
    assert on_orchestrator == {"sequencer", "queue-server", "witness", "farm1", "farm2"}
    # Every replica's store is in its own host's database, reached from its own host's address.
    for name, entry in topology["nodes"].items():
        if entry.get("script") == "replica.py":
            assert f"bind_address={entry['host']}" in entry["store"] and f"/{deployment.prefix}_{name.replace('-', '_')}?" in entry["store"]


def _connect_as(login: dict, user: str, password: str, source: str, database: str | None = None):
    return _admin({**login, "user": user, "password": password}, bind_address=source, database=database)


def _denied(action) -> bool:
    """Whether `action` is refused for want of a privilege: at connect (1045), to a database
    (1044), a host no account names (1130), or a command on a table (1142); MariaDB may also deny a
    connection as 1698 when another host's account of that name exists."""
    import pymysql

    try:
        action()
    except (pymysql.err.OperationalError, pymysql.err.ProgrammingError) as error:
        if error.args[0] in (1044, 1045, 1130, 1142, 1698):
            return True
        raise  # refused for another reason (or not refused): the test says which
    return False


def _grants(login: dict, user: str, host: str) -> list[str]:
    connection = _admin(login)
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW GRANTS FOR '{user}'@'{host}'")
        rows = [row[0] for row in cursor.fetchall()]
    connection.close()
    return sorted(re.sub(r" IDENTIFIED BY PASSWORD '[^']*'", "", row) for row in rows)


def test_each_database_account_can_do_what_its_role_needs_and_nothing_more(deployment):
    login, prefix = deployment.login, deployment.prefix
    replica_password = deployment.secrets["vault_saldo_db_replica_password"]
    farm_password = deployment.secrets["vault_saldo_db_farm_password"]
    lab_password = deployment.secrets["vault_saldo_db_lab_password"]
    own, other = f"{prefix}_sequencer_replica1", f"{prefix}_sequencer_replica2"

    # A replica's account: its own database, from its own host, rows only.
    assert _grants(login, own, "127.0.0.12") == sorted([
        f"GRANT USAGE ON *.* TO `{own}`@`127.0.0.12`",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{own}`.* TO `{own}`@`127.0.0.12`"])
    connection = _connect_as(login, own, replica_password, "127.0.0.12", own)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO accounts (name, balance_cents) VALUES ('grant-check', 5)")
        cursor.execute("UPDATE accounts SET balance_cents = 6 WHERE name = 'grant-check'")
        cursor.execute("SELECT balance_cents FROM accounts WHERE name = 'grant-check'")
        assert cursor.fetchall() == ((6,),)
        cursor.execute("DELETE FROM accounts WHERE name = 'grant-check'")
        assert _denied(lambda: cursor.execute("CREATE TABLE extra (a INT)"))
        assert _denied(lambda: cursor.execute("DROP TABLE accounts"))
        assert _denied(lambda: cursor.execute(f"SELECT * FROM `{other}`.accounts"))
        assert _denied(lambda: cursor.execute(f"SELECT * FROM `{prefix}_farm`.accounts"))
    connection.close()
    for source in ("127.0.0.11", "127.0.0.13", "127.0.0.1"):
        assert _denied(lambda: _connect_as(login, own, replica_password, source, own)), source

    # The farm's account: the farm's database, from the cluster's three addresses only.
    farm = f"{prefix}_farm"
    for source in HOSTS.values():
        assert _grants(login, farm, source) == sorted([f"GRANT USAGE ON *.* TO `{farm}`@`{source}`",
                                                       f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{farm}`.* TO `{farm}`@`{source}`"])
        connection = _connect_as(login, farm, farm_password, source, farm)
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM replica_meta")
            assert _denied(lambda: cursor.execute(f"SELECT * FROM `{own}`.accounts"))
        connection.close()
    assert _denied(lambda: _connect_as(login, farm, farm_password, "127.0.0.1", farm))

    # The lab's reader on replica01's server: SELECT on that host's stores, from the orchestrator only.
    reader = f"{prefix}_lab_replica01"
    held = sorted(f"{prefix}_{kind}_replica1" for kind in ("multicast", "queue", "sequencer", "pb"))
    assert _grants(login, reader, "127.0.0.11") == sorted(
        [f"GRANT USAGE ON *.* TO `{reader}`@`127.0.0.11`"] + [f"GRANT SELECT ON `{db}`.* TO `{reader}`@`127.0.0.11`" for db in held])
    connection = _connect_as(login, reader, lab_password, "127.0.0.11", own)
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM accounts")
        assert _denied(lambda: cursor.execute("INSERT INTO accounts (name, balance_cents) VALUES ('x', 1)"))
        assert _denied(lambda: cursor.execute(f"SELECT * FROM `{other}`.accounts"))  # replica02's store: its own reader's
    connection.close()
    assert _denied(lambda: _connect_as(login, reader, lab_password, "127.0.0.12", own))


def _unit_files(deployment, topology: dict) -> dict[str, list[Path]]:
    """Per host, each unit instance as a file of its own (the template under the instance's name)."""
    by_host: dict[str, list[Path]] = {}
    for control in topology["control"].values():
        unit = control["unit"]
        template = re.sub(r"@.*\.service$", "@.service", unit)
        directory = deployment.root.parent / "units" / control["host_label"]
        directory.mkdir(parents=True, exist_ok=True)
        instance = directory / unit
        shutil.copyfile(deployment.host_root(control["host_label"]) / "etc/systemd/system" / template, instance)
        by_host.setdefault(control["host_label"], []).append(instance)
    return by_host


def test_systemd_analyze_verifies_every_rendered_unit_silently_and_scores_each_ok(deployment):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed to check the units"
    topology = deployment.topology()
    units = _unit_files(deployment, topology)
    assert sum(len(paths) for paths in units.values()) == len(topology["nodes"])
    for host, paths in units.items():
        done = subprocess.run([analyze, "verify", *map(str, paths)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout == "" and done.stderr == "", (host, done.stdout, done.stderr)
    templates = {path.name.split("@")[0]: path for paths in units.values() for path in paths}
    for template, path in sorted(templates.items()):
        done = subprocess.run([analyze, "security", "--offline=yes", str(path)], capture_output=True, text=True, timeout=120)
        score = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
        assert score, done.stdout[-2000:] + done.stderr
        print(f"\n{template}@.service: exposure {score.group(1)} {score.group(2)}")
        assert float(score.group(1)) <= 2.0 and score.group(2) == "OK", (template, score.group(0))


def test_the_lab_runs_against_the_deployed_cluster_through_its_control_commands(deployment, running):
    orchestrator = deployment.host_root("orchestrator01")
    python = str(orchestrator / "opt/saldo/venv/bin/python")
    app = orchestrator / "opt/saldo/app"
    topology_path = str(orchestrator / "etc/saldo/topology.json")
    # client.py against the same file, from the orchestrator's install.
    done = subprocess.run([python, "client.py", "--topology", topology_path, "deposit", "deployed-alice", "12.50"],
                          cwd=app, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("OK balance=12.50"), done.stdout + done.stderr
    before = _status(running["nodes"]["sequencer-replica1"]["host"], running["nodes"]["sequencer-replica1"]["port"])["PID"]

    done = subprocess.run([python, "lab.py", "run", "--topology", topology_path, "--arch", "sequencer", "--faults", "kill-replica",
                           "--duration", "6", "--quiet"], cwd=app, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((app / "results/latest.json").read_text())
    print("\n" + done.stdout[-1500:])
    assert report["verdict"] == "valid" and report["ops"]["ok"] > 0 and report["ops"]["unknown"] == 0
    assert [(f["action"], f["target"]) for f in report["faults"]] == [("kill", "sequencer-replica1")]
    assert report["faults"][0]["until_s"] > report["faults"][0]["at_s"]
    # The node was killed and started again by the commands the deployment wrote; the cluster runs on.
    after = _status(running["nodes"]["sequencer-replica1"]["host"], running["nodes"]["sequencer-replica1"]["port"])["PID"]
    assert after != before
    done = subprocess.run([python, "client.py", "--topology", topology_path, "balance", "deployed-alice"],
                          cwd=app, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("OK balance=12.50"), done.stdout + done.stderr


def test_make_deploy_check_passes():
    _tool("ansible-lint")
    make = shutil.which("make")
    assert make
    done = subprocess.run([make, "-s", "deploy-check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _layout_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("saldo_layout", ANSIBLE_DIR / "filter_plugins/saldo_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _group_vars() -> dict:
    yaml = pytest.importorskip("yaml")  # installed with ansible (requirements-deploy.txt)
    return yaml.safe_load((ANSIBLE_DIR / "group_vars/all/main.yml").read_text())


def test_the_deployment_listens_on_the_seed_ports_of_common_topology():
    from common.topology import DEFAULT_PORTS

    ports = _group_vars()["saldo_ports"]
    assert {name: ports[name] for name in DEFAULT_PORTS if name != "standalone"} == \
        {name: port for name, port in DEFAULT_PORTS.items() if name != "standalone"}


def test_on_real_hosts_the_lab_reaches_a_replica_host_over_ssh_as_the_control_account_allowed_exactly_those_commands():
    layout_module, group_vars = _layout_module(), _group_vars()
    hosts = {"names": ["orchestrator01", "replica01", "replica02"], "address": ["10.0.0.11", "10.0.0.12", "10.0.0.13"],
             "root": ["", "", ""], "db_address": ["10.0.0.11", "10.0.0.12", "10.0.0.13"], "local_control": [False] * 3}
    settings = {"ports": group_vars["saldo_ports"], "db_prefix": "saldo", "db_port": 3306, "config_dir": "/etc/saldo",
                "state_dir": "/var/lib/saldo", "workers_per_host": 2, "replication": "sync",
                "control_actions": group_vars["saldo_control_actions"], "control_user": "saldo-control"}
    layout = layout_module.saldo_layout("orchestrator01", ["replica01", "replica02"], hosts, settings)
    nodes = {node["name"]: node for node in layout["nodes"]}

    replica = nodes["sequencer-replica1"]
    ssh = ["ssh", "-i", "/etc/saldo/control/id_ed25519", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", "UserKnownHostsFile=/etc/saldo/control/known_hosts", "saldo-control@10.0.0.12", "sudo", "-n"]
    unit = "saldo-replica@sequencer-replica1.service"
    assert replica["control"]["kill"] == [ssh + ["/usr/bin/systemctl", "kill", "--signal=KILL", unit],
                                          ssh + ["/usr/bin/systemctl", "stop", unit]]
    assert replica["control"]["start"] == [ssh + ["/usr/bin/systemctl", "start", unit]]
    assert replica["sudo_commands"] == [f"/usr/bin/systemctl kill --signal\\=KILL {unit}", f"/usr/bin/systemctl stop {unit}",
                                        f"/usr/bin/systemctl start {unit}", f"/usr/bin/systemctl kill --signal\\=STOP {unit}",
                                        f"/usr/bin/systemctl kill --signal\\=CONT {unit}"]
    assert replica["control"]["store"] == ("mysql://saldo_lab_replica01@10.0.0.12:3306/saldo_sequencer_replica1"
                                           "?password_file=/etc/saldo/db/lab.password&bind_address=10.0.0.11")
    # On the orchestrator itself the lab runs systemctl directly, and no sudo rule is needed.
    assert nodes["sequencer"]["control"]["kill"][0] == ["/usr/bin/systemctl", "kill", "--signal=KILL", "saldo-sequencer@sequencer.service"]
    assert nodes["sequencer"]["sudo_commands"] == []
    # The farm's account from the three cluster addresses, and nothing else from anywhere.
    farm = [(user["host"], user["priv"]) for user in layout["users"] if user["name"] == "saldo_farm"]
    assert farm == [(address, "saldo_farm.*:SELECT,INSERT,UPDATE,DELETE") for address in hosts["address"]]
