"""The worker farm as the lab runs it: two orchestrator servers, N workers, one shared store.

Owns the farm's local layout. Servers `farm1` (127.0.0.11) and `farm2` (127.0.0.12) listen on the
seed's ports 8765 and 8766 (or free ones) and are each other's peer. Workers `worker1..N` are owned
alternately by farm1 and farm2, each with the other server as its failover, and answer STATUS on a
small port of their own (127.0.0.13) so the launcher sees them ready. Every worker and both servers
name the same store: for the checker that store is the farm's one replica, read through farm1
(whose STATUS shows the store's applied-operations counter). A lab run starts from an empty store;
`lab.py up` keeps the store of the cluster's earlier runs (LayoutOptions.fresh_stores).

Options (`lab.py ... --option KEY=VALUE`):
    workers=4            how many workers
    max_tasks=64         tasks a worker asks for at once (one transaction)
    entry=spread|first   lab clients start at farm1 and farm2 in turn (default), or all at farm1
                         (the default with one worker)
    pause_after_commit_s=0  (fault injection) a worker's wait between commit and report
    and any farm server flag by its name, e.g. lend_queue_threshold=50 overload_s=0.2
"""

from __future__ import annotations

from common import topology
from common.farm.client import FarmClient
from common.farm.server import _CONFIG_FLAGS
from common.lab.archs import ORCHESTRATOR_HOST, LabCluster, LayoutOptions, _Ports, _store_url
from common.lab.cluster import Node, free_port
from common.storage.store import open_store

SERVER_HOSTS = (ORCHESTRATOR_HOST, "127.0.0.12")
WORKER_HOST = "127.0.0.13"
SERVER_OPTIONS = frozenset(field for field, _kind, _text in _CONFIG_FLAGS) | {"heartbeat_timeout_s", "tick_s"}
WORKER_OPTIONS = frozenset({"max_tasks", "pause_after_commit_s", "reply_timeout_s"})


def empty_store(url: str) -> None:
    """Start from nothing: earlier runs' operations would confuse the checker. Opened twice, because
    opening a MySQL store creates the counter rows that the workers' transactions lock."""
    store = open_store(url)
    try:
        store.wipe()
    finally:
        store.close()
    open_store(url).close()


def build(options: LayoutOptions) -> LabCluster:
    extra = dict(options.extra)
    worker_count = int(extra.pop("workers", 4))
    # With one worker there is one server with a worker: every client starts there.
    entry = extra.pop("entry", "spread" if worker_count >= 2 else "first")
    if entry not in ("spread", "first"):
        raise ValueError("option entry must be spread or first")
    unknown = set(extra) - SERVER_OPTIONS - WORKER_OPTIONS
    if unknown:
        raise ValueError(f"unknown farm options: {', '.join(sorted(unknown))}")
    ports = _Ports(options)
    store = _store_url(options, "farm")
    if options.fresh_stores:
        empty_store(store)
    names = ["farm1", "farm2"]
    real = options.hosts.real
    addresses = [(real(SERVER_HOSTS[i]), ports.get(SERVER_HOSTS[i], topology.DEFAULT_PORTS["farm_server"] + i)) for i in range(2)]
    server_settings = {key: value for key, value in extra.items() if key in SERVER_OPTIONS}
    nodes: list[Node] = []
    for index, name in enumerate(names):
        host, port = addresses[index]
        peer = topology.format_address(addresses[1 - index])
        nodes.append(Node(name, "server.py", host, port, {"mode": "farm", "peers": peer, **server_settings},
                          role="server", store=store))
    worker_settings = {key: value for key, value in extra.items() if key in WORKER_OPTIONS}
    workers = []
    for index in range(worker_count):
        name = f"worker{index + 1}"
        home, other = addresses[index % 2], addresses[1 - index % 2]
        nodes.append(Node(name, "-m common.farm.worker", real(WORKER_HOST), free_port(real(WORKER_HOST)), {
            "server": topology.format_address(home), "failover": topology.format_address(other),
            "worker_id": name, **worker_settings,
        }, role="worker", store=store))
        workers.append(name)

    def make_client(index: int, window: int) -> FarmClient:
        start = max(0, index) % 2 if entry == "spread" else 0
        return FarmClient(addresses, request_timeout_s=options.request_timeout_s, max_in_flight=max(1, window), start_index=start)

    def worker_totals(lab: LabCluster) -> dict[str, int]:
        """What the workers did in all: tasks and batches run, update transactions and the
        milliseconds spent in them (waiting for the store's locks included)."""
        fields = {"worker_tasks": "TASKS_DONE_TOTAL", "worker_batches": "BATCHES_TOTAL",
                  "worker_transactions": "TRANSACTIONS_TOTAL", "worker_transaction_ms": "TRANSACTION_MS_TOTAL"}
        totals = dict.fromkeys(fields, 0)
        for name in workers:
            try:
                status = lab.cluster.status(name, timeout_s=1.0)
            except OSError:
                continue
            for key, field_name in fields.items():
                totals[key] += status.get(field_name) or 0
        return totals

    return LabCluster(
        architecture="farm",
        nodes=nodes,
        replicas=["farm1"],
        make_client=make_client,
        total_order=True,  # one store serialises every transaction (they all lock its counters)
        variant=f"{worker_count} worker{'' if worker_count == 1 else 's'}",
        roles={"replica": ["farm1"], "server": names, "worker": workers},
        counters=worker_totals,
    )
