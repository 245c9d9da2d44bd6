"""Each architecture as the lab runs it: its nodes, its links, its client, its promises.

Owns the local layout of a cluster per architecture, on the seed's three "hosts" (127.0.0.11 the
orchestrator, 127.0.0.12 and 127.0.0.13 the replicas), with the seed's ports or free ones, and
routes chosen links through fault proxies. Where those loopback addresses cannot be bound (macOS
has only 127.0.0.1 without aliases), every "host" listens on 127.0.0.1 with ports of its own
(`Hosts`). A `LabCluster` also knows which node plays a role in a
fault ("replica", "primary", ...) and how to start and end each kind of fault on it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from common import topology
from common.lab.cluster import Cluster, Node, free_port
from common.lab.faults import SCHEDULES, Fault
from common.log import get_logger
from common.multicast.client import MulticastClient
from common.sequencer.client import SequencerClient
from common.transport.client import DirectClient

log = get_logger("archs")

ORCHESTRATOR_HOST = "127.0.0.11"
REPLICA_HOSTS = ("127.0.0.12", "127.0.0.13", "127.0.0.14")
SEED_HOSTS = (ORCHESTRATOR_HOST, *REPLICA_HOSTS)
ONE_HOST = "127.0.0.1"
# On one host, the seed's ports of "host" k (0: the orchestrator) are moved up by k steps: replica1
# reads on 6017, replica2 on 6027. The seed's ports are at least this far apart wherever two
# "hosts" would take the same one, and every layout's set of ports stays distinct (a test checks).
ONE_HOST_PORT_STEP = 10
# Set to 1 to lay clusters out as on a machine without the loopback aliases (to try it on Linux).
NO_ALIASES_ENV = "SALDO_NO_LOOPBACK_ALIASES"


@dataclass(frozen=True)
class Hosts:
    """Where the layout's "hosts" (SEED_HOSTS) listen: at their own addresses, or all at ONE_HOST."""

    one_host: bool = False

    def real(self, host: str) -> str:
        return ONE_HOST if self.one_host and host in SEED_HOSTS else host

    def seed_port(self, host: str, seed_port: int) -> int:
        return seed_port + ONE_HOST_PORT_STEP * SEED_HOSTS.index(host) if self.one_host and host in SEED_HOSTS else seed_port

    def notice(self) -> str:
        """One line for the person at the terminal when the layout is on one host."""
        return (f"note: {SEED_HOSTS[0]}-{SEED_HOSTS[-1].rsplit('.', 1)[1]} cannot be bound here (no loopback aliases, as "
                f"on macOS): every process listens on {ONE_HOST}, each \"host\" on ports of its own (the seed's "
                f"+{ONE_HOST_PORT_STEP} per host); `sudo ifconfig lo0 alias 127.0.0.11 up` (and .12-.14) gives the seed's layout")


def _can_bind(host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def detect_hosts() -> Hosts:
    """The seed's hosts when this machine can listen on every one of them, else ONE_HOST."""
    if os.environ.get(NO_ALIASES_ENV) == "1":
        return Hosts(one_host=True)
    return Hosts(one_host=not all(_can_bind(host) for host in SEED_HOSTS))


@dataclass
class LabCluster:
    architecture: str
    nodes: list[Node]
    replicas: list[str]  # nodes whose stores hold the bank: the checker reads them
    make_client: Callable[[int, int], object]  # (client index, window) -> client
    total_order: bool
    read_your_writes: bool = False
    variant: str = ""
    roles: dict[str, list[str]] = field(default_factory=dict)  # role -> candidate nodes
    # Anomalies this architecture does not promise to avoid (multicast's replicas may diverge;
    # async primary-backup may lose acknowledged writes): a run showing only these is "invalid" as
    # the checker says, and expected.
    not_promised: frozenset[str] = frozenset()
    # Async primary-backup: a write acknowledged by a primary that a failover replaced may be gone
    # (the checker then counts it either way for money, and reports it as failover_lost_write).
    failover_may_lose: bool = False
    proxies_of: dict[str, list[str]] = field(default_factory=dict)  # node -> proxies on its links
    # Totals read from the nodes (blocking); a run's report gives how much each grew during the run.
    counters: Callable[["LabCluster"], dict[str, int]] | None = None
    cluster: Cluster | None = None

    def stores(self) -> dict[str, str]:
        by_name = {node.name: node for node in self.nodes}
        return {name: by_name[name].store for name in self.replicas}

    # --- Faults ---------------------------------------------------------------------------------
    def fault_roles(self) -> frozenset[str]:
        """The roles a fault may name on this cluster (FAULT_ROLES says the same before a build)."""
        return frozenset(self.roles) | {"replica"}

    async def resolve(self, role: str) -> str:
        # A role the architecture lacks is refused: "primary" must not fall back to some replica.
        if role not in self.fault_roles():
            raise ValueError(f"{self.architecture} has no node in role {role!r}")
        if role == "primary":
            return await self._find_primary()
        return (self.roles.get(role) or self.replicas)[0]

    async def _find_primary(self) -> str:
        assert self.cluster is not None
        for name in self.replicas:
            try:
                status = await asyncio.to_thread(self.cluster.status, name, timeout_s=1.0)
            except OSError:
                continue
            if status.get("ROLE") == "primary":
                return name
        return self.replicas[0]

    async def start_fault(self, fault: Fault, target: str) -> None:
        cluster = self.cluster
        assert cluster is not None
        # On a thread: a deployed cluster's kill or pause is a command over SSH, which the
        # clients' event loop must not wait for.
        if fault.kind == "kill":
            await asyncio.to_thread(cluster.kill, target)
        elif fault.kind == "pause":
            await asyncio.to_thread(cluster.pause, target)
        elif fault.kind in ("partition", "delay", "drop"):
            proxies = self.proxies_of.get(target, [])
            if not proxies:
                raise ValueError(f"{target} has no proxied links; build the cluster with proxies")
            message = {"TASK": "FAULT", "ACTION": fault.kind}
            if fault.kind == "delay":
                message["DELAY_MS"] = int(fault.params.get("delay_ms", 20))
            for proxy in proxies:
                await asyncio.to_thread(cluster.request, proxy, dict(message))
        else:
            raise ValueError(f"unknown fault kind {fault.kind}")

    async def end_fault(self, fault: Fault, target: str) -> None:
        cluster = self.cluster
        assert cluster is not None
        if fault.kind == "kill":
            # Already started when a restart was cut short (the run ended while it waited for the
            # node) and the fault is ended again by heal_all: wait for it, do not start it twice.
            if not cluster.is_running(target):
                cluster.spawn(target)  # on the loop's thread: see Cluster (PR_SET_PDEATHSIG)
            await asyncio.to_thread(cluster.wait_ready, target)
        elif fault.kind == "pause":
            await asyncio.to_thread(cluster.resume, target)
        elif fault.kind in ("partition", "delay"):
            for proxy in self.proxies_of.get(target, []):
                await asyncio.to_thread(cluster.request, proxy, {"TASK": "FAULT", "ACTION": "heal"})


@dataclass
class LayoutOptions:
    run_dir: Path
    ports: str = "free"  # "seed": the seed's port numbers; "free": ports the kernel says are free
    proxies: bool = False  # route the links of replicas through fault proxies
    store: str = "sqlite"  # sqlite | mysql base URL (mysql://user:pass@host:port/prefix)
    request_timeout_s: float = 2.0
    extra: dict = field(default_factory=dict)  # architecture-specific options
    # A lab run starts from empty stores (the checker compares them with its history); `up` keeps
    # what a cluster's earlier runs left (False), and so does a layout built only to check options.
    fresh_stores: bool = True
    hosts: Hosts | None = None  # default: what this machine can bind (detect_hosts)

    def __post_init__(self) -> None:
        if self.hosts is None:
            self.hosts = detect_hosts()


class _Ports:
    """A node's port on one of the layout's "hosts" (SEED_HOSTS, named as such: see Hosts)."""

    def __init__(self, options: LayoutOptions) -> None:
        assert options.ports in ("seed", "free"), options.ports
        self.mode = options.ports
        self.hosts = options.hosts

    def get(self, host: str, seed_port: int) -> int:
        return self.hosts.seed_port(host, seed_port) if self.mode == "seed" else free_port(self.hosts.real(host))


def _store_url(options: LayoutOptions, name: str) -> str:
    if options.store == "sqlite":
        synchronous = options.extra.get("synchronous")  # e.g. normal: survives a process crash, not a power loss
        query = f"?synchronous={synchronous}" if synchronous else ""
        return f"sqlite:///{(options.run_dir / f'{name}.db').resolve()}{query}"
    assert options.store.startswith("mysql://"), options.store
    return f"{options.store}_{name.replace('-', '_')}"


def _proxy(name: str, listen: tuple[str, int], target: tuple[str, int], control_port: int) -> Node:
    return Node(
        name=name,
        script="-m common.lab.proxy",
        host="127.0.0.1",
        port=control_port,
        role="proxy",
        settings={"listen": topology.format_address(listen), "target": topology.format_address(target)},
    )


def _through_proxy(options: LayoutOptions, nodes: list[Node], proxies_of: dict[str, list[str]], owner: str,
                   proxy_name: str, listen_host: str, target: tuple[str, int]) -> tuple[str, int]:
    """Where the connecting side of a link connects: `target` itself, or, when the layout asks for
    proxies, a fault proxy listening on `listen_host` (a layout "host") in front of it, counted
    among `owner`'s links."""
    if not options.proxies:
        return target
    listen_host = options.hosts.real(listen_host)
    listen = (listen_host, free_port(listen_host))
    nodes.append(_proxy(proxy_name, listen, target, free_port("127.0.0.1")))
    proxies_of.setdefault(owner, []).append(proxy_name)
    return listen


def _int_extras(options: LayoutOptions, *keys: str) -> dict[str, int]:
    """The architecture options among `keys` that were given, as integers (node settings)."""
    return {key: int(options.extra[key]) for key in keys if key in options.extra}


def build_standalone(options: LayoutOptions) -> LabCluster:
    ports = _Ports(options)
    port = ports.get(REPLICA_HOSTS[0], topology.DEFAULT_PORTS["standalone"])
    host = options.hosts.real(REPLICA_HOSTS[0])
    node = Node("standalone", "replica.py", host, port, {"mode": "standalone"}, store=_store_url(options, "standalone"))
    nodes = [node]
    proxies_of: dict[str, list[str]] = {}
    # With proxies, clients reach the standalone process through one on the orchestrator host.
    client_address = _through_proxy(options, nodes, proxies_of, "standalone", "proxy-clients-standalone",
                                    ORCHESTRATOR_HOST, (host, port))

    def make_client(_index: int, window: int) -> DirectClient:
        return DirectClient(client_address, request_timeout_s=options.request_timeout_s, max_in_flight=max(1, window))

    return LabCluster(
        architecture="standalone",
        nodes=nodes,
        replicas=["standalone"],
        make_client=make_client,
        total_order=True,
        roles={"replica": ["standalone"], "primary": ["standalone"]},
        proxies_of=proxies_of,
    )


def build_sequencer(options: LayoutOptions) -> LabCluster:
    """The sequencer on the orchestrator host, two replicas (three with extra replicas=3)."""
    ports = _Ports(options)
    real = options.hosts.real
    replica_count = int(options.extra.get("replicas", 2))
    seq_host = real(ORCHESTRATOR_HOST)
    client_port = ports.get(ORCHESTRATOR_HOST, topology.DEFAULT_PORTS["sequencer_client"])
    replica_port = ports.get(ORCHESTRATOR_HOST, topology.DEFAULT_PORTS["sequencer_replica"])
    names = [f"replica{i + 1}" for i in range(replica_count)]
    read_ports = {name: ports.get(REPLICA_HOSTS[i], topology.DEFAULT_PORTS["sequencer_replica_client"]) for i, name in enumerate(names)}
    nodes: list[Node] = []
    proxies_of: dict[str, list[str]] = {name: [] for name in names}
    sequencer_settings = {"replica_port": replica_port, "replicas": ",".join(names),
                          "peer_hosts": ",".join(dict.fromkeys(map(real, REPLICA_HOSTS[:replica_count]))),
                          "log_dir": str(options.run_dir / "sequencer-log"),
                          # The replicas' dedup window: the sequencer remembers the same ids.
                          **_int_extras(options, "max_log_entries", "segment_entries", "dedup_window")}
    nodes.append(Node("sequencer", "sequencer.py", seq_host, client_port, sequencer_settings, role="sequencer"))
    for index, name in enumerate(names):
        # With proxies, this replica reaches the sequencer through one on its own host.
        sequencer_address = _through_proxy(options, nodes, proxies_of, name, f"proxy-{name}-sequencer", REPLICA_HOSTS[index],
                                           (seq_host, replica_port))
        peers = ",".join(f"{real(REPLICA_HOSTS[j])}:{read_ports[other]}" for j, other in enumerate(names) if other != name)
        settings = {"mode": "sequencer", "sequencer": topology.format_address(sequencer_address), "peers": peers,
                    **_int_extras(options, "dedup_window")}
        nodes.append(Node(name, "replica.py", real(REPLICA_HOSTS[index]), read_ports[name], settings,
                          store=_store_url(options, name)))
    read_addresses = [(real(REPLICA_HOSTS[i]), read_ports[name]) for i, name in enumerate(names)]

    def make_client(index: int, window: int) -> SequencerClient:
        return SequencerClient((seq_host, client_port), read_addresses, request_timeout_s=options.request_timeout_s,
                               max_in_flight=max(1, window), read_index=max(0, index))

    return LabCluster(
        architecture="sequencer",
        nodes=nodes,
        replicas=names,
        make_client=make_client,
        total_order=True,
        read_your_writes=True,
        roles={"replica": names, "sequencer": ["sequencer"]},
        proxies_of=proxies_of,
    )


def build_multicast(options: LayoutOptions) -> LabCluster:
    """Two replicas (or extra replicas=N), each applying whatever clients send it."""
    ports = _Ports(options)
    replica_count = int(options.extra.get("replicas", 2))
    names = [f"replica{i + 1}" for i in range(replica_count)]
    nodes: list[Node] = []
    proxies_of: dict[str, list[str]] = {name: [] for name in names}
    client_addresses = []
    for index, name in enumerate(names):
        port = ports.get(REPLICA_HOSTS[index], topology.DEFAULT_PORTS["multicast_replica"])
        host = options.hosts.real(REPLICA_HOSTS[index])
        nodes.append(Node(name, "replica.py", host, port, {"mode": "multicast"}, store=_store_url(options, name)))
        # With proxies, the clients' link to this replica goes through one on the orchestrator host.
        client_addresses.append(_through_proxy(options, nodes, proxies_of, name, f"proxy-clients-{name}",
                                               ORCHESTRATOR_HOST, (host, port)))

    def make_client(index: int, window: int) -> MulticastClient:
        return MulticastClient(client_addresses, request_timeout_s=options.request_timeout_s,
                               max_in_flight=max(1, window), read_index=max(0, index))

    return LabCluster(
        architecture="multicast",
        nodes=nodes,
        replicas=names,
        make_client=make_client,
        total_order=False,
        # Each replica is a correct bank on its own; nothing makes them agree.
        not_promised=frozenset({"divergence", "outcome_mismatch", "lost_write", "money"}),
        roles={"replica": names[-1:]},  # faults hit the last replica, so reads keep a reference one
        proxies_of=proxies_of,
    )


def build_queue(options: LayoutOptions) -> LabCluster:
    """The RPC server on the orchestrator host pushing to two replicas' queue ports."""
    ports = _Ports(options)
    real = options.hosts.real
    replica_count = int(options.extra.get("replicas", 2))
    server_host = real(ORCHESTRATOR_HOST)
    rpc_port = ports.get(ORCHESTRATOR_HOST, topology.DEFAULT_PORTS["queue_rpc"])
    names = [f"replica{i + 1}" for i in range(replica_count)]
    queue_ports = {name: ports.get(REPLICA_HOSTS[i], topology.DEFAULT_PORTS["queue_replica"]) for i, name in enumerate(names)}
    nodes: list[Node] = []
    proxies_of: dict[str, list[str]] = {name: [] for name in names}
    feeds = []
    for index, name in enumerate(names):
        host = real(REPLICA_HOSTS[index])
        # With proxies, the server's link to this replica goes through one on the orchestrator host.
        address = _through_proxy(options, nodes, proxies_of, name, f"proxy-server-{name}", ORCHESTRATOR_HOST,
                                 (host, queue_ports[name]))
        feeds.append(f"{name}={topology.format_address(address)}")
        peers = ",".join(f"{real(REPLICA_HOSTS[j])}:{queue_ports[other]}" for j, other in enumerate(names) if other != name)
        settings = {"mode": "queue", "peers": peers, "peer_hosts": server_host, **_int_extras(options, "dedup_window")}
        nodes.append(Node(name, "replica.py", host, queue_ports[name], settings, store=_store_url(options, name)))
    server_settings = {"mode": "queue", "replicas": ",".join(feeds), "log_dir": str(options.run_dir / "queue-server-log"),
                       "ack_replicas": int(options.extra.get("ack_replicas", 0)),
                       **_int_extras(options, "max_log_entries", "segment_entries", "dedup_window")}
    nodes.insert(0, Node("server", "server.py", server_host, rpc_port, server_settings, role="server"))
    read_addresses = [(real(REPLICA_HOSTS[i]), queue_ports[name]) for i, name in enumerate(names)]

    def make_client(index: int, window: int) -> SequencerClient:
        return SequencerClient((server_host, rpc_port), read_addresses, request_timeout_s=options.request_timeout_s,
                               max_in_flight=max(1, window), read_index=max(0, index))

    return LabCluster(
        architecture="queue",
        nodes=nodes,
        replicas=names,
        make_client=make_client,
        total_order=True,
        read_your_writes=True,
        variant=f"ack after {server_settings['ack_replicas']} replica(s)" if server_settings["ack_replicas"] else "ack when queued",
        roles={"replica": names, "server": ["server"]},
        proxies_of=proxies_of,
    )


# Architecture -> "module:function" building its LabCluster; loaded on first use, so each
# architecture's layout lives beside the others without this file knowing their details.
BUILDERS: dict[str, str] = {
    "standalone": "common.lab.archs:build_standalone",
    "sequencer": "common.lab.archs:build_sequencer",
    "multicast": "common.lab.archs:build_multicast",
    "queue": "common.lab.archs:build_queue",
    "farm": "common.lab.arch_farm:build",
    "primary-backup": "common.lab.arch_pb:build",
    "primary-backup-async": "common.lab.arch_pb:build_async",
}


# Architecture -> the roles a fault may name on it (LabCluster.fault_roles() of what it builds),
# known without building a cluster so that lab.py refuses a fault schedule before its first run.
FAULT_ROLES: dict[str, frozenset[str]] = {
    "standalone": frozenset({"replica", "primary"}),
    "sequencer": frozenset({"replica", "sequencer"}),
    "multicast": frozenset({"replica"}),
    "queue": frozenset({"replica", "server"}),
    "farm": frozenset({"replica", "server", "worker"}),
    "primary-backup": frozenset({"replica", "primary", "backup", "witness"}),
    "primary-backup-async": frozenset({"replica", "primary", "backup", "witness"}),
}


# Architectures whose layout puts no fault proxy on any link: a partition, a delay or a drop has
# nothing to act through.
NO_PROXIES = frozenset({"farm"})
PROXY_FAULTS = frozenset({"partition", "delay", "drop"})


def _unfit(architecture: str, schedule: list[Fault]) -> str | None:
    missing = sorted({fault.role for fault in schedule} - FAULT_ROLES[architecture])
    if missing:
        return f"needs a {' and a '.join(missing)}, which {architecture} does not have"
    if architecture in NO_PROXIES and any(fault.kind in PROXY_FAULTS for fault in schedule):
        return f"acts through fault proxies, which {architecture} does not have"
    return None


def schedules_for(architecture: str) -> list[str]:
    """The named fault schedules that can run on `architecture`."""
    return [name for name, schedule in SCHEDULES.items() if _unfit(architecture, schedule) is None]


def unfit_schedule(architecture: str, schedule_name: str, schedule: list[Fault]) -> str | None:
    """Why `schedule` cannot run on `architecture` (one line), or None when it can."""
    reason = _unfit(architecture, schedule)
    if reason is None:
        return None
    return f"{schedule_name} {reason}; schedules for {architecture}: {', '.join(schedules_for(architecture))}"


# Architecture -> the `--option` keys its layout reads, so a misspelt key is refused instead of
# leaving a run on its defaults. The builders in other modules declare theirs there (OPTIONS in
# arch_pb; the farm checks its own).
OPTIONS: dict[str, frozenset[str]] = {
    "standalone": frozenset({"synchronous"}),
    "sequencer": frozenset({"synchronous", "replicas", "max_log_entries", "segment_entries", "dedup_window"}),
    "multicast": frozenset({"synchronous", "replicas"}),
    "queue": frozenset({"synchronous", "replicas", "ack_replicas", "max_log_entries", "segment_entries", "dedup_window"}),
}
SQLITE_SYNCHRONOUS = ("full", "normal", "off")


def build(architecture: str, options: LayoutOptions) -> LabCluster:
    if architecture not in BUILDERS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(BUILDERS)}")
    module_name, _, function_name = BUILDERS[architecture].partition(":")
    module = importlib.import_module(module_name)
    known = OPTIONS.get(architecture) or getattr(module, "OPTIONS", None)
    unknown = sorted(set(options.extra) - known) if known is not None else []
    if unknown:
        raise ValueError(f"{architecture} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known))}")
    if options.extra.get("synchronous", "full") not in SQLITE_SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
    return getattr(module, function_name)(options)
