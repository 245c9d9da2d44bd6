"""A cluster the lab did not start: the processes of a deployment, named by its topology file.

Owns how the lab runs against a deployed cluster (`lab.py run --topology /etc/saldo/topology.json`).
The deployment (ansible/deploy.yml) writes one topology file for every architecture it runs. Its
`nodes` say where each process listens, as for any topology file; its `control` object says, for
each node, how to act on it and where the checker reads it:

    "control": {
      "sequencer-replica1": {
        "host_label": "replica01",
        "kill":   [["ssh", ..., "sudo", "systemctl", "kill", "--signal=KILL", "saldo-replica@sequencer-replica1.service"],
                   ["ssh", ..., "sudo", "systemctl", "stop", "saldo-replica@sequencer-replica1.service"]],
        "start":  [[...]], "pause": [[...]], "resume": [[...]],
        "store":  "mysql://saldo_lab@10.0.0.12:3306/saldo_sequencer_replica1?password_file=..."
      }, ...
    }

Each action is a list of commands run in order (argv lists, no shell). `kill` leaves the node down
until `start`, as a lab fault does on a local cluster (a unit's automatic restart is cancelled).

The architecture's nodes are found by script and mode, as `client.py --topology` finds them. A
deployed cluster keeps its state between runs, so a run names accounts of its own and the checker
is given what the run changed in each store: the store read before the run is subtracted from the
one read after it (`run_image`). Nobody else should write to the cluster while a run goes.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import topology
from common.bank.state import Counters
from common.farm.client import FarmClient
from common.lab.arch_pb import AckJournal, PBLabCluster
from common.lab.archs import LabCluster
from common.lab.cluster import READY_TIMEOUT_S, Node, StartFailed
from common.log import get_logger
from common.multicast.client import MulticastClient
from common.primary_backup.client import PrimaryBackupClient
from common.sequencer.client import SequencerClient
from common.storage.store import StoreImage, open_store
from common.transport.blocking import BlockingConnection
from common.transport.client import DirectClient

log = get_logger("deployed")

# One control command (an SSH round trip and a systemctl call) must end within this.
CONTROL_TIMEOUT_S = 60.0
# After a kill, how long the node may still answer STATUS (the command returns before the socket closes).
KILL_SETTLE_TIMEOUT_S = 10.0
# How long the stores may lag the replicas' own applied counts once the cluster is quiet.
STORE_CATCH_UP_TIMEOUT_S = 30.0
CONTROL_ACTIONS = ("kill", "start", "pause", "resume")

# Architecture -> its nodes as (role, script, mode); mode None: any.
MEMBERS: dict[str, list[tuple[str, str, str | None]]] = {
    "standalone": [("replica", "replica.py", "standalone")],
    "multicast": [("replica", "replica.py", "multicast")],
    "queue": [("server", "server.py", "queue"), ("replica", "replica.py", "queue")],
    "sequencer": [("sequencer", "sequencer.py", None), ("replica", "replica.py", "sequencer")],
    "primary-backup": [("witness", "server.py", "witness"), ("replica", "replica.py", "primary-backup")],
    "primary-backup-async": [("witness", "server.py", "witness"), ("replica", "replica.py", "primary-backup")],
    "farm": [("server", "server.py", "farm"), ("worker", "client.py worker", None)],
}


class NotDeployed(ValueError):
    """The topology file cannot serve this architecture (absent, or without control commands)."""


@dataclass(frozen=True)
class NodeControl:
    commands: dict[str, list[list[str]]]  # action -> argv lists, run in order
    store: str | None  # where the checker reads this node's store (None: it has none)
    host_label: str  # the host's name in the deployment's inventory, for messages


def _members(document: dict, architecture: str) -> dict[str, list[str]]:
    """role -> the names of the nodes that play it, in name order."""
    found: dict[str, list[str]] = {}
    for role, script, mode in MEMBERS[architecture]:
        names = sorted(name for name, entry in document["nodes"].items()
                       if entry.get("script") == script and (mode is None or entry.get("mode") == mode))
        found.setdefault(role, []).extend(names)
    return found


def _control(document: dict, path: Path, names: list[str]) -> dict[str, NodeControl]:
    control = document.get("control")
    if not isinstance(control, dict):
        raise NotDeployed(f"{path} has no 'control' object: it is not a deployment's topology file (a `lab.py up` "
                          f"cluster's file is run against with `lab.py up` itself)")
    controls = {}
    for name in names:
        entry = control.get(name)
        if not isinstance(entry, dict):
            raise NotDeployed(f"{path}: node {name} has no entry in 'control'")
        commands = {}
        for action in CONTROL_ACTIONS:
            argvs = entry.get(action)
            if not (isinstance(argvs, list) and argvs and all(isinstance(argv, list) and argv and
                                                                 all(isinstance(arg, str) for arg in argv) for argv in argvs)):
                raise NotDeployed(f"{path}: control of {name} has no '{action}' commands (a list of argv lists)")
            commands[action] = argvs
        controls[name] = NodeControl(commands, entry.get("store"), str(entry.get("host_label", name)))
    return controls


def check(path: str | Path, architecture: str) -> str | None:
    """Why `architecture` cannot run against the deployment at `path` (one line), or None."""
    try:
        _load(Path(path), architecture)
    except (ValueError, OSError) as error:
        return str(error)
    return None


def _load(path: Path, architecture: str) -> tuple[dict, dict[str, list[str]], dict[str, NodeControl]]:
    document = topology.load(path)
    if architecture not in MEMBERS:
        raise NotDeployed(f"unknown architecture {architecture!r}")
    members = _members(document, architecture)
    if not members.get("replica") and architecture != "farm":
        raise NotDeployed(f"{path} runs no {architecture} replica")
    if architecture == "farm" and not members.get("server"):
        raise NotDeployed(f"{path} runs no farm server")
    if architecture.startswith("primary-backup"):
        modes = {document["nodes"][name].get("replication", "sync") for name in members["replica"]}
        wanted = "async" if architecture == "primary-backup-async" else "sync"
        if modes != {wanted}:
            raise NotDeployed(f"{path} runs primary-backup with replication {', '.join(sorted(modes))}, not {wanted}")
    names = [name for role_names in members.values() for name in role_names]
    return document, members, _control(document, path, names)


def _address(entry: dict) -> tuple[str, int]:
    return entry["host"], int(entry["port"])


def attach(path: str | Path, architecture: str, *, request_timeout_s: float = 2.0) -> tuple[LabCluster, "DeployedCluster"]:
    """The architecture's LabCluster over the deployed processes of `path`, and the cluster that
    acts on them. Raises NotDeployed (a ValueError) when the file cannot serve it."""
    path = Path(path)
    document, members, controls = _load(path, architecture)
    entries = document["nodes"]
    names = [name for role_names in members.values() for name in role_names]
    nodes = []
    for role, role_names in members.items():
        for name in role_names:
            host, port = _address(entries[name])
            nodes.append(Node(name, entries[name].get("script", ""), host, port, role=role,
                              store=controls[name].store))
    cluster = DeployedCluster(path, nodes, controls)
    replicas = members.get("replica", [])
    read_addresses = [_address(entries[name]) for name in replicas]

    def direct(index: int, window: int):
        return DirectClient(read_addresses[0], request_timeout_s=request_timeout_s, max_in_flight=max(1, window))

    common = dict(architecture=architecture, nodes=nodes, replicas=replicas, total_order=True)
    if architecture in ("sequencer", "queue"):
        orderer = members["sequencer" if architecture == "sequencer" else "server"][0]

        def ordered(index: int, window: int) -> SequencerClient:
            return SequencerClient(_address(entries[orderer]), read_addresses, request_timeout_s=request_timeout_s,
                                   max_in_flight=max(1, window), read_index=max(0, index))

        ack_replicas = int(entries[orderer].get("ack_replicas", 0))
        variant = "" if architecture == "sequencer" else (
            f"ack after {ack_replicas} replica(s)" if ack_replicas else "ack when queued")
        lab = LabCluster(**common, make_client=ordered, read_your_writes=True, variant=variant,
                         roles={"replica": replicas, architecture if architecture == "sequencer" else "server": [orderer]})
    elif architecture == "multicast":

        def multicast(index: int, window: int) -> MulticastClient:
            return MulticastClient(read_addresses, request_timeout_s=request_timeout_s, max_in_flight=max(1, window),
                                   read_index=max(0, index))

        lab = LabCluster(**{**common, "total_order": False}, make_client=multicast, roles={"replica": replicas[-1:]},
                         not_promised=frozenset({"divergence", "outcome_mismatch", "lost_write", "money"}))
    elif architecture.startswith("primary-backup"):
        journal = AckJournal()
        replication = "async" if architecture == "primary-backup-async" else "sync"

        def primary_backup(index: int, window: int) -> PrimaryBackupClient:
            return PrimaryBackupClient(read_addresses, request_timeout_s=request_timeout_s, max_in_flight=max(1, window),
                                       observer=journal.record)

        lab = PBLabCluster(**common, make_client=primary_backup, variant=replication, journal=journal,
                           roles={"replica": replicas, "witness": members["witness"]},
                           not_promised=frozenset({"failover_lost_write"}) if replication == "async" else frozenset(),
                           failover_may_lose=replication == "async")
    elif architecture == "farm":
        servers = members["server"]
        server_addresses = [_address(entries[name]) for name in servers]

        def farm(index: int, window: int) -> FarmClient:
            return FarmClient(server_addresses, request_timeout_s=request_timeout_s, max_in_flight=max(1, window),
                              start_index=max(0, index) % len(server_addresses))

        # The farm's one store, read through its first server (see common/lab/arch_farm.py).
        lab = LabCluster(**{**common, "replicas": servers[:1]}, make_client=farm,
                         variant=f"{len(members.get('worker', []))} workers",
                         roles={"replica": servers[:1], "server": servers, "worker": members.get("worker", [])})
    else:
        lab = LabCluster(**common, make_client=direct, roles={"replica": replicas, "primary": replicas})
    missing_store = [name for name in lab.replicas if not controls[name].store]
    if missing_store:
        raise NotDeployed(f"{path}: control names no store for {', '.join(missing_store)}: the checker cannot read it")
    log.info("attached", topology=str(path), architecture=architecture, nodes=",".join(names))
    return lab, cluster


def _is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (a process there has its /proc here)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


class DeployedCluster:
    """The launcher's interface (common/lab/cluster.py's Cluster) over processes a deployment
    runs: STATUS over the network, faults through the control commands. It starts nothing at
    first and stops nothing at the end: `close()` only starts again what a run left down and
    resumes what it left paused."""

    def __init__(self, topology_path: Path, nodes: list[Node], controls: dict[str, NodeControl]) -> None:
        self.topology_path = topology_path
        self.nodes = {node.name: node for node in nodes}
        self._controls = controls
        self._down: set[str] = set()  # killed by this run and not started again yet
        self._paused: set[str] = set()
        self._last_pid: dict[str, int] = {}  # the PID each node last answered STATUS with
        self._killed_pid: dict[str, int | None] = {}
        self._starting: dict[str, tuple[threading.Thread, list[Exception]]] = {}  # start commands under way
        self._local = {name: _is_local_address(node.host) for name, node in self.nodes.items()}

    # --- What the runner reads ------------------------------------------------------------------
    def status(self, name: str, *, timeout_s: float = 5.0) -> dict:
        node = self.nodes[name]
        with BlockingConnection(node.host, node.port, connect_timeout_s=timeout_s) as connection:
            reply = connection.request({"TASK": "STATUS"}, timeout_s)
        if reply.get("STATUS") == "OK" and type(reply.get("PID")) is int:
            self._last_pid[name] = reply["PID"]
        return reply

    def request(self, name: str, message: dict, *, timeout_s: float = 2.0) -> dict:
        node = self.nodes[name]
        with BlockingConnection(node.host, node.port, connect_timeout_s=timeout_s) as connection:
            return connection.request(message, timeout_s)

    def pid(self, name: str) -> int | None:
        """The node's PID where this machine can read its /proc (its host is this machine), else None."""
        if name in self._down or not self._local[name]:
            return None
        return self._last_pid.get(name)

    def is_running(self, name: str) -> bool:
        return name not in self._down

    def log_path(self, name: str) -> str:
        return f"the journal of its unit on {self._controls[name].host_label}"

    # --- Acting on nodes ------------------------------------------------------------------------
    def _run(self, name: str, action: str) -> None:
        for argv in self._controls[name].commands[action]:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"{action} {name}: `{' '.join(argv)}` exited {done.returncode}: "
                                   f"{(done.stderr or done.stdout).strip()[-400:]}")
        log.info("node_" + action, node=name)

    def start(self, names: list[str] | None = None, *, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Attach: every node must answer STATUS (nothing is started)."""
        silent = []
        for name in names or list(self.nodes):
            try:
                reply = self.status(name, timeout_s=min(timeout_s, 5.0))
            except OSError as error:
                reply = {"ERROR": repr(error)}
            if reply.get("STATUS") != "OK":
                node = self.nodes[name]
                silent.append(f"{name} ({node.host}:{node.port} on {self._controls[name].host_label}: {reply.get('ERROR')})")
        if silent:
            raise StartFailed(f"the deployed cluster of {self.topology_path} is not all up: {'; '.join(silent)}")

    def kill(self, name: str) -> None:
        """The node's kill commands, then until it no longer answers."""
        self._killed_pid[name] = self._last_pid.get(name)
        self._run(name, "kill")
        self._down.add(name)
        self._paused.discard(name)
        deadline = time.monotonic() + KILL_SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                reply = self.status(name, timeout_s=0.5)
            except OSError:
                return
            if reply.get("PID") != self._killed_pid[name]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} still answers {KILL_SETTLE_TIMEOUT_S} s after its kill commands")

    def spawn(self, name: str) -> None:
        """Run the node's start commands on a thread of their own (wait_ready waits for them), so
        the lab's event loop, which calls this, does not wait for an SSH round trip."""
        assert name not in self._starting, f"{name} is being started"
        failure: list[Exception] = []

        def start() -> None:
            try:
                self._run(name, "start")
            except Exception as error:  # handed to wait_ready, which raises it
                failure.append(error)

        thread = threading.Thread(target=start, name=f"start-{name}", daemon=True)
        thread.start()
        self._starting[name] = (thread, failure)
        self._down.discard(name)

    def wait_ready(self, name: str, *, timeout_s: float = READY_TIMEOUT_S) -> dict:
        """Until the node answers STATUS OK with a process other than the one killed."""
        deadline = time.monotonic() + timeout_s
        starting = self._starting.pop(name, None)
        if starting is not None:
            thread, failure = starting
            thread.join(CONTROL_TIMEOUT_S * len(self._controls[name].commands["start"]))
            if thread.is_alive() or failure:
                self._down.add(name)
                raise StartFailed(str(failure[0]) if failure else f"start {name}: its commands did not end")
        last_error = "no answer"
        while time.monotonic() < deadline:
            try:
                reply = self.status(name, timeout_s=1.0)
                if reply.get("STATUS") == "OK" and reply.get("PID") != self._killed_pid.get(name):
                    return reply
                last_error = str(reply)
            except OSError as error:
                last_error = repr(error)
            time.sleep(0.05)
        raise TimeoutError(f"{name} did not answer STATUS within {timeout_s} s of its start: {last_error}")

    def pause(self, name: str) -> None:
        self._run(name, "pause")
        self._paused.add(name)

    def resume(self, name: str) -> None:
        self._run(name, "resume")
        self._paused.discard(name)

    def close(self) -> None:
        """Leave the cluster as the run found it: resume what is paused, start what is down."""
        for name in sorted(self._paused):
            self.resume(name)
        for name in sorted(self._down):
            self.spawn(name)
            self.wait_ready(name)

    def __enter__(self) -> "DeployedCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- What a run changed in a store ------------------------------------------------------------------


def read_images(lab: LabCluster) -> dict[str, StoreImage]:
    """Every replica's store as it is now (through the checker's URLs)."""
    images = {}
    for name, url in lab.stores().items():
        store = open_store(url)
        try:
            images[name] = store.load()
        finally:
            store.close()
    return images


def final_images(lab: LabCluster, timeout_s: float = STORE_CATCH_UP_TIMEOUT_S) -> dict[str, StoreImage]:
    """The stores once each holds every operation its replica reports applied (a replica answers
    before its group commit ends; the farm's servers count from the store itself)."""
    assert lab.cluster is not None
    deadline = time.monotonic() + timeout_s
    while True:
        images = read_images(lab)
        behind = {}
        for name, image in images.items():
            applied = lab.cluster.status(name, timeout_s=2.0).get("OPS_APPLIED_TOTAL")
            if type(applied) is int and image.counters.ops_applied_total < applied:
                behind[name] = (image.counters.ops_applied_total, applied)
        if not behind or time.monotonic() > deadline:
            if behind:
                log.warning("stores_behind", behind=str(behind))
            return images
        time.sleep(0.1)


def run_image(before: StoreImage, after: StoreImage, accounts: list[str]) -> StoreImage:
    """What a run did to a store: the operations applied since `before`, numbered from 1, the
    counters' growth, and the balances of the run's own accounts (which did not exist before)."""
    offset = before.counters.ops_applied_total
    recent = [row._replace(apply_index=row.apply_index - offset) for row in after.recent if row.apply_index > offset]
    counters = Counters(after.counters.ops_applied_total - offset,
                        after.counters.deposited_cents_total - before.counters.deposited_cents_total,
                        after.counters.withdrawn_cents_total - before.counters.withdrawn_cents_total)
    return StoreImage(balances={account: after.balances[account] for account in accounts if account in after.balances},
                      recent=recent, counters=counters, meta=dict(after.meta))
