"""What runs where in a saldo deployment: the one place that decides it (the `saldo_layout` filter).

From the inventory (which host is the orchestrator, which are replica hosts, their addresses and
install roots) and the settings in group_vars (ports, database prefix, paths, control commands),
`saldo_layout` returns:

- `nodes`: every process of the cluster, each with the host it runs on, its systemd unit, its
  entry in the topology file (common/topology.py's format: its flag values) and the commands the
  lab uses to kill, start, pause and resume it (common/lab/deployed.py);
- `databases` and `users`: the MariaDB databases and accounts, each on the database server of the
  host that holds it, each account granted only what its role needs, from the addresses its
  connections come from;
- `secrets`: which password files each host needs.

The seed's layout: the orchestrator runs the sequencer, the queue's RPC server, primary-backup's
witness, the two farm servers and the farm's shared database; each replica host runs its replica
of every architecture (multicast, queue, sequencer, primary-backup), each with its store in that
host's own database server, and farm workers.
"""

from __future__ import annotations

import re

# Privileges of an account that reads and writes one store: no DDL (the deployment creates the tables).
STORE_PRIVILEGES = "SELECT,INSERT,UPDATE,DELETE"
READ_PRIVILEGES = "SELECT"
# One replica node per architecture on every replica host: (name prefix, mode).
REPLICA_KINDS = (("multicast-replica", "multicast"), ("queue-replica", "queue"),
                 ("sequencer-replica", "sequencer"), ("pb-replica", "primary-backup"))


def _identifier(text: str) -> str:
    """A database or account name part: letters, digits and underscores."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def _sudoers_command(argv: list[str]) -> str:
    """A command with its exact arguments for a sudoers line (where , : = and \\ are escaped)."""
    return " ".join(re.sub(r"([,:=\\])", r"\\\1", arg) for arg in argv)


def saldo_layout(orchestrator: str, replica_hosts: list, host_columns: dict, settings: dict) -> dict:
    """`host_columns`: the inventory's hosts ("names") and, in the same order, each one's
    "address", "root", "db_address" and "local_control"; `settings`: ports, db_prefix, db_port,
    config_dir, state_dir, workers_per_host, replication, control_actions, control_user."""
    columns = ("address", "root", "db_address", "local_control")
    hosts = {name: {column: host_columns[column][i] for column in columns} for i, name in enumerate(host_columns["names"])}
    ports = settings["ports"]
    prefix = settings["db_prefix"]
    replica_hosts = sorted(replica_hosts)
    if not replica_hosts:
        raise ValueError("the inventory's group 'replicas' is empty")
    address = {name: hosts[name]["address"] for name in hosts}
    o_address = address[orchestrator]
    r_addresses = [address[h] for h in replica_hosts]

    def path(host: str, *parts: str) -> str:
        return hosts[host]["root"] + "/".join(parts)

    def store_url(user: str, database: str, server: str, client: str, secret: str) -> str:
        return (f"mysql://{user}@{hosts[server]['db_address']}:{settings['db_port']}/{database}"
                f"?password_file={path(client, settings['config_dir'], 'db', secret + '.password')}"
                f"&bind_address={address[client]}")

    nodes: list[dict] = []
    databases: list[dict] = []
    users: list[dict] = []
    farm_db = f"{prefix}_farm"

    def node(name: str, host: str, template: str, entry: dict, secret: str | None = None, database: str | None = None) -> None:
        nodes.append({"name": name, "host": host, "template": template, "unit": f"saldo-{template}@{name}.service",
                      "entry": entry, "secret": secret, "database": database})

    # --- The orchestrator ---
    names = {kind: [f"{kind}{i + 1}" for i in range(len(replica_hosts))] for kind, _mode in REPLICA_KINDS}
    node("sequencer", orchestrator, "sequencer", {
        "script": "sequencer.py", "host": o_address, "port": ports["sequencer_client"],
        "replica_port": ports["sequencer_replica"], "replicas": ",".join(names["sequencer-replica"]),
        "peer_hosts": ",".join(r_addresses), "log_dir": path(orchestrator, settings["state_dir"], "sequencer")})
    node("queue-server", orchestrator, "server", {
        "script": "server.py", "mode": "queue", "host": o_address, "port": ports["queue_rpc"],
        "replicas": ",".join(f"{n}={a}:{ports['queue_replica']}" for n, a in zip(names["queue-replica"], r_addresses)),
        "log_dir": path(orchestrator, settings["state_dir"], "queue-server")})
    node("witness", orchestrator, "server", {
        "script": "server.py", "mode": "witness", "host": o_address, "port": ports["witness"],
        "replicas": ",".join(names["pb-replica"]), "peer_hosts": ",".join(r_addresses),
        "state_file": path(orchestrator, settings["state_dir"], "witness", "witness.json")})
    farm_ports = [ports["farm_server"], ports["farm_server"] + 1]
    for index, port in enumerate(farm_ports):
        node(f"farm{index + 1}", orchestrator, "server", {
            "script": "server.py", "mode": "farm", "host": o_address, "port": port,
            "peers": f"{o_address}:{farm_ports[1 - index]}",
            "store": store_url(farm_db, farm_db, orchestrator, orchestrator, "farm")}, secret="farm")
    databases.append({"server": orchestrator, "name": farm_db})
    for host in [orchestrator] + replica_hosts:  # farm servers and workers: from the cluster's addresses only
        users.append({"server": orchestrator, "name": farm_db, "host": address[host],
                      "priv": f"{farm_db}.*:{STORE_PRIVILEGES}", "secret": "farm"})

    # --- Each replica host ---
    worker = 0
    for index, host in enumerate(replica_hosts):
        here = address[host]
        others = [a for a in r_addresses if a != here]
        entries = {
            "multicast-replica": {"port": ports["multicast_replica"]},
            "queue-replica": {"port": ports["queue_replica"], "peers": ",".join(f"{a}:{ports['queue_replica']}" for a in others),
                              "peer_hosts": o_address},
            "sequencer-replica": {"port": ports["sequencer_replica_client"], "sequencer": f"{o_address}:{ports['sequencer_replica']}",
                                  "peers": ",".join(f"{a}:{ports['sequencer_replica_client']}" for a in others)},
            "pb-replica": {"port": ports["primary_client"], "peer_port": ports["primary_peer"],
                           "replicas": ",".join(f"{n}@{a}:{ports['primary_peer']}" for n, a in zip(names["pb-replica"], r_addresses)),
                           "peer_hosts": ",".join(r_addresses), "witnesses": f"witness@{o_address}:{ports['witness']}",
                           "replication": settings["replication"]},
        }
        for kind, mode in REPLICA_KINDS:
            name = names[kind][index]
            database = f"{prefix}_{_identifier(name)}"
            node(name, host, "replica", {"script": "replica.py", "mode": mode, "host": here, **entries[kind],
                                         "store": store_url(database, database, host, host, "replica")},
                 secret="replica", database=database)
            databases.append({"server": host, "name": database})
            users.append({"server": host, "name": database, "host": here, "priv": f"{database}.*:{STORE_PRIVILEGES}",
                          "secret": "replica"})
        for slot in range(int(settings["workers_per_host"])):
            worker += 1
            home = farm_ports[(worker - 1) % 2]
            node(f"worker{worker}", host, "worker", {
                "script": "client.py worker", "host": here, "port": ports["farm_worker_status"] + slot,
                "server": f"{o_address}:{home}", "failover": f"{o_address}:{farm_ports[1 - (worker - 1) % 2]}",
                "worker_id": f"worker{worker}", "store": store_url(farm_db, farm_db, orchestrator, host, "farm")},
                secret="farm")

    # --- The lab's reader on each database server: SELECT on the stores the checker reads, from the orchestrator ---
    readers = {}
    for server in [orchestrator] + replica_hosts:
        held = [d["name"] for d in databases if d["server"] == server]
        readers[server] = f"{prefix}_lab_{_identifier(server)}"
        users.append({"server": server, "name": readers[server], "host": o_address,
                      "priv": "/".join(f"{d}.*:{READ_PRIVILEGES}" for d in held), "secret": "lab"})

    # --- How the lab acts on each node, and where it reads its store ---
    for entry in nodes:
        host = entry["host"]
        if host == orchestrator or hosts[host]["local_control"]:
            via: list[str] = []
        else:  # over SSH from the orchestrator, as the control account that may run exactly these commands
            control_dir = path(orchestrator, settings["config_dir"], "control")
            via = ["ssh", "-i", f"{control_dir}/id_ed25519", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                   "-o", f"UserKnownHostsFile={control_dir}/known_hosts", f"{settings['control_user']}@{address[host]}",
                   "sudo", "-n"]
        actions = {action: [via + [arg.replace("{unit}", entry["unit"]).replace("{root}", hosts[host]["root"]) for arg in argv]
                            for argv in argvs]
                   for action, argvs in settings["control_actions"].items()}
        store = None
        if entry["database"]:
            store = store_url(readers[host], entry["database"], host, orchestrator, "lab")
        elif entry["name"] == "farm1":
            store = store_url(readers[orchestrator], farm_db, orchestrator, orchestrator, "lab")
        entry["control"] = {"host_label": host, "unit": entry["unit"], **actions, **({"store": store} if store else {})}
        # The commands a control account may run on this host, as sudoers lines name them.
        entry["sudo_commands"] = [_sudoers_command(argv[len(via):]) for argvs in actions.values() for argv in argvs] if via else []

    secrets = {host: sorted({n["secret"] for n in nodes if n["host"] == host and n["secret"]} |
                            ({"lab"} if host == orchestrator else set()))
               for host in [orchestrator] + replica_hosts}
    return {"nodes": nodes, "databases": databases, "users": users, "secrets": secrets}


def saldo_topology(layout: dict, name: str) -> dict:
    """The topology file every host gets: each node's flags, and the lab's control object."""
    return {"name": name, "architecture": "sequencer",
            "nodes": {n["name"]: n["entry"] for n in layout["nodes"]},
            "control": {n["name"]: n["control"] for n in layout["nodes"]}}


def saldo_cluster_ports(ports: dict, workers_per_host: int, db_port: int) -> list[int]:
    """Every TCP port the deployment listens on: the seed's (the farm's second server on the next
    one), the farm workers' STATUS ports, and MariaDB's (the farm's workers and the lab's checker
    reach other hosts' database servers)."""
    found = set(ports.values()) | {ports["farm_server"] + 1, db_port}
    found |= {ports["farm_worker_status"] + slot for slot in range(int(workers_per_host))}
    return sorted(int(port) for port in found)


def saldo_security_rules(ports: list, group_name: str, admin_cidr: str) -> list[dict]:
    """The security group's ingress rules: each port from the group itself, SSH from the admin range."""
    rules = [{"proto": "tcp", "ports": [port], "group_name": group_name, "rule_desc": f"saldo {port} within the cluster"}
             for port in ports]
    return rules + [{"proto": "tcp", "ports": [22], "cidr_ip": admin_cidr, "rule_desc": "SSH from the admin range"}]


class FilterModule:
    def filters(self) -> dict:
        return {"saldo_layout": saldo_layout, "saldo_topology": saldo_topology,
                "saldo_cluster_ports": saldo_cluster_ports, "saldo_security_rules": saldo_security_rules}
