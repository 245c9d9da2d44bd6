"""The primary-backup architecture as the lab runs it (seed 002 part 4, issue 5).

Owns the local layout: the witness on the orchestrator host (127.0.0.11:6008), two replicas on
127.0.0.12 and 127.0.0.13 (clients on :6004, peers on :6005; a third on 127.0.0.14 with extra
replicas=3), each with its own store. With proxies, every peer link of a replica goes through a
fault proxy on its own host (to each other replica and to the witness), so "partition-primary"
cuts the primary from the backup and the witness in both directions while clients still reach it.

Options (`--option KEY=VALUE`): replication=sync|async (default sync), reads=primary|backup,
replicas=2|3, and the protocol's clocks: lease_duration, heartbeat_interval, backup_timeout,
replication_interval (seconds), max_log_entries, dedup_window.

The cluster keeps an `AckJournal`: every client records, per epoch, when it received the first and
the last acknowledged write, so a test can check that no two epochs acknowledged at the same time,
and a `fault_log` (when each fault started, and the epoch its target served), so the failover time
is measured exactly: from the kill of the primary to the first write acknowledged in a later epoch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from common import topology
from common.lab.archs import (
    ORCHESTRATOR_HOST,
    REPLICA_HOSTS,
    LabCluster,
    LayoutOptions,
    _Ports,
    _store_url,
    _through_proxy,
)
from common.lab.cluster import Node
from common.primary_backup.client import PrimaryBackupClient

# Extra options passed through to every replica: option -> (flag key in the topology entry, type).
_REPLICA_SETTINGS = {
    "lease_duration": float,
    "heartbeat_interval": float,
    "backup_timeout": float,
    "replication_interval": float,
    "max_log_entries": int,
    "dedup_window": int,
}
# Every `--option` this layout reads (lab.py refuses others: see archs.build).
OPTIONS = frozenset({"synchronous", "replication", "reads", "replicas"}) | frozenset(_REPLICA_SETTINGS)


class AckJournal:
    """Per epoch: when clients received its first and last acknowledged write (monotonic seconds),
    how many, and from which replica addresses."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict] = {}
        self._current: tuple[int, tuple[str, int], dict] | None = None  # the entry written last

    def record(self, address: tuple[str, int], reply: dict) -> None:
        """On every acknowledged write of every lab client: kept cheap."""
        epoch = reply.get("EPOCH")
        now = time.monotonic()
        current = self._current
        if current is not None and current[0] == epoch and current[1] == address:
            entry = current[2]
        elif type(epoch) is int:
            entry = self.by_epoch.get(epoch)
            if entry is None:
                entry = self.by_epoch[epoch] = {"first_s": now, "last_s": now, "count": 0, "addresses": set()}
            entry["addresses"].add(address)
            self._current = (epoch, address, entry)
        else:
            return
        entry["last_s"] = now
        entry["count"] += 1


@dataclass
class PBLabCluster(LabCluster):
    journal: AckJournal = field(default_factory=AckJournal)
    fault_log: list[dict] = field(default_factory=list)
    _epoch_of: dict[str, int] = field(default_factory=dict)

    async def _statuses(self) -> dict[str, dict]:
        assert self.cluster is not None
        found = {}
        for name in self.replicas:
            try:
                found[name] = await asyncio.to_thread(self.cluster.status, name, timeout_s=1.0)
            except OSError:
                continue
            self._epoch_of[name] = found[name].get("EPOCH", 0)
        return found

    async def start_fault(self, fault, target: str) -> None:
        if target not in self._epoch_of:
            await self._statuses()
        self.fault_log.append({"kind": fault.kind, "role": fault.role, "target": target,
                               "epoch": self._epoch_of.get(target, 0), "at_monotonic_s": time.monotonic()})
        await super().start_fault(fault, target)

    def failover_s(self, index: int = 0) -> float | None:
        """From the start of fault `index` to the first write the clients saw acknowledged in a
        later epoch than the one its target served (None if none was)."""
        fault = self.fault_log[index]
        later = [entry["first_s"] for epoch, entry in self.journal.by_epoch.items() if epoch > fault["epoch"]]
        firsts = [t for t in later if t >= fault["at_monotonic_s"]]
        return round(min(firsts) - fault["at_monotonic_s"], 3) if firsts else None

    async def _find_primary(self) -> str:
        """The replica serving as primary with a valid lease, in the highest epoch."""
        statuses = await self._statuses()
        serving = [(s.get("EPOCH", 0), name) for name, s in statuses.items()
                   if s.get("ROLE") == "primary" and s.get("LEASE_VALID")]
        if serving:
            return max(serving)[1]
        return self.replicas[0]

    def fault_roles(self) -> frozenset[str]:
        return super().fault_roles() | {"primary", "backup"}  # asked of the replicas when the fault starts

    async def resolve(self, role: str) -> str:
        if role == "backup":
            primary = await self._find_primary()
            return next(name for name in self.replicas if name != primary)
        return await super().resolve(role)


def build(options: LayoutOptions) -> PBLabCluster:
    ports = _Ports(options)
    real = options.hosts.real
    extra = options.extra
    replication = str(extra.get("replication", "sync"))
    if replication not in ("sync", "async"):
        raise ValueError("primary-backup: replication must be sync or async")
    reads = str(extra.get("reads", "primary"))
    if reads not in ("primary", "backup"):
        raise ValueError("primary-backup: reads must be primary or backup")
    replica_count = int(extra.get("replicas", 2))
    if not 2 <= replica_count <= len(REPLICA_HOSTS):
        raise ValueError(f"primary-backup: replicas must be 2 to {len(REPLICA_HOSTS)}")
    names = [f"replica{i + 1}" for i in range(replica_count)]
    layout_hosts = {name: REPLICA_HOSTS[i] for i, name in enumerate(names)}  # for their ports and proxies
    hosts = {name: real(host) for name, host in layout_hosts.items()}
    client_ports = {name: ports.get(layout_hosts[name], topology.DEFAULT_PORTS["primary_client"]) for name in names}
    peer_ports = {name: ports.get(layout_hosts[name], topology.DEFAULT_PORTS["primary_peer"]) for name in names}
    witness_address = (real(ORCHESTRATOR_HOST), ports.get(ORCHESTRATOR_HOST, topology.DEFAULT_PORTS["witness"]))
    settings_common = {key: kind(extra[key]) for key, kind in _REPLICA_SETTINGS.items() if key in extra}

    nodes: list[Node] = []
    witness_settings = {"mode": "witness", "replicas": ",".join(names), "state_file": str(options.run_dir / "witness.json"),
                        "peer_hosts": ",".join(dict.fromkeys(hosts[name] for name in names))}
    if "lease_duration" in settings_common:
        witness_settings["lease_duration"] = settings_common["lease_duration"]
    nodes.append(Node("witness", "server.py", *witness_address, witness_settings, role="witness"))

    proxies_of: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        # Where this replica reaches each peer: directly, or through a proxy on its own host.
        seen: dict[str, tuple[str, int]] = {name: (hosts[name], peer_ports[name])}
        targets = {other: (hosts[other], peer_ports[other]) for other in names if other != name}
        targets["witness"] = witness_address
        for peer, address in targets.items():
            proxy_name = f"proxy-{name}-{peer}"
            seen[peer] = _through_proxy(options, nodes, proxies_of, name, proxy_name, layout_hosts[name], address)
            if options.proxies and peer in proxies_of:
                proxies_of[peer].append(proxy_name)  # the same link is the other replica's incoming one
        settings = {
            "mode": "primary-backup",
            "peer_port": peer_ports[name],
            "replicas": ",".join(f"{r}@{topology.format_address(seen[r])}" for r in names),
            # Where the other replicas connect from (with proxies, --replicas names proxy addresses).
            "peer_hosts": ",".join(dict.fromkeys(hosts[r] for r in names)),
            "witnesses": f"witness@{topology.format_address(seen['witness'])}",
            "replication": replication,
            **settings_common,
        }
        nodes.append(Node(name, "replica.py", hosts[name], client_ports[name], settings, store=_store_url(options, name)))

    client_addresses = [(hosts[name], client_ports[name]) for name in names]
    journal = AckJournal()

    def make_client(_index: int, window: int) -> PrimaryBackupClient:
        return PrimaryBackupClient(client_addresses, request_timeout_s=options.request_timeout_s,
                                   max_in_flight=max(1, window), read_from_backup=reads == "backup",
                                   observer=journal.record)

    return PBLabCluster(
        architecture="primary-backup",
        nodes=nodes,
        replicas=names,
        make_client=make_client,
        total_order=True,
        variant=replication + (", reads from backups" if reads == "backup" else ""),
        roles={"replica": names, "witness": ["witness"]},
        proxies_of=proxies_of,
        journal=journal,
        # async answers before the backup has the write: a primary's death can lose it; sync
        # promises it never does. A write lost without a failover is a bug in both.
        not_promised=frozenset({"failover_lost_write"}) if replication == "async" else frozenset(),
        failover_may_lose=replication == "async",
    )


def build_async(options: LayoutOptions) -> PBLabCluster:
    """The seed's own mode, as an architecture name of its own (so `lab.py bench --arch all` and
    its summary show both modes side by side)."""
    options.extra = {**options.extra, "replication": options.extra.get("replication", "async")}
    lab = build(options)
    lab.architecture = "primary-backup-async"
    return lab
