"""The fixed table of clients: an architecture's name -> its client, its default addresses, and
which nodes of a topology file it talks to.

Each architecture's folder holds its client (common/<architecture>/client.py, with a `make`
function); this module imports each of them and nothing imports it back but the top-level scripts
and the lab, so there is no registry to fill at import time and no import circle.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from common.farm import client as farm
from common.multicast import client as multicast
from common.primary_backup import client as primary_backup
from common.sequencer import client as sequencer
from common.standalone import client as standalone
from common.topology import DEFAULT_PORTS, parse_address
from common.transport.client import Addresses, BankClient


class ClientEntry(NamedTuple):
    # make(addresses, *, request_timeout_s, max_in_flight): addresses by purpose ("write", "read").
    make: Callable[..., BankClient]
    # Where the architecture is reached on one machine when no address is given: the seed's ports.
    default_addresses: dict[str, list[str]]
    # Which topology nodes the client talks to: (script, mode or None for any, purpose).
    topology_roles: tuple[tuple[str, str | None, str], ...]


def _local(*ports: int, host: str = "127.0.0.1") -> list[str]:
    return [f"{host}:{port}" for port in ports]


ARCHITECTURES: dict[str, ClientEntry] = {
    "standalone": ClientEntry(standalone.make, {"write": _local(DEFAULT_PORTS["standalone"])},
                              (("replica.py", "standalone", "write"),)),
    "multicast": ClientEntry(multicast.make, {"write": _local(DEFAULT_PORTS["multicast_replica"])},
                             (("replica.py", "multicast", "write"),)),
    # The queue architecture's RPC server takes writes the way the sequencer does.
    "queue": ClientEntry(sequencer.make, {"write": _local(DEFAULT_PORTS["queue_rpc"]),
                                          "read": _local(DEFAULT_PORTS["queue_replica"])},
                         (("server.py", "queue", "write"), ("replica.py", "queue", "read"))),
    "sequencer": ClientEntry(sequencer.make, {"write": _local(DEFAULT_PORTS["sequencer_client"]),
                                              "read": _local(DEFAULT_PORTS["sequencer_replica_client"])},
                             (("sequencer.py", None, "write"), ("replica.py", "sequencer", "read"))),
    "primary-backup": ClientEntry(primary_backup.make,
                                  {"write": _local(DEFAULT_PORTS["primary_client"], host="127.0.0.12")
                                   + _local(DEFAULT_PORTS["primary_client"], host="127.0.0.13")},
                                  (("replica.py", "primary-backup", "write"),)),
    "farm": ClientEntry(farm.make, {"write": _local(DEFAULT_PORTS["farm_server"], DEFAULT_PORTS["farm_server"] + 1)},
                        (("server.py", "farm", "write"),)),
}

# Cluster architectures that differ from another one only on the servers' side (a topology file
# may name them): their client is that other architecture's.
CLIENT_OF_VARIANT: dict[str, str] = {"primary-backup-async": "primary-backup"}


def client_architecture(name: str) -> str:
    """The client architecture that talks to a cluster of architecture `name`."""
    return CLIENT_OF_VARIANT.get(name, name)


def resolve_addresses(arch: str, topo: dict | None, write: list[str], read: list[str]) -> Addresses:
    """Addresses for `arch`: the flags if given, else the topology's nodes, else the defaults."""
    entry = ARCHITECTURES.get(arch)
    if entry is None:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    found: dict[str, list[str]] = {"write": [], "read": []}
    if topo is not None:
        for node in topo["nodes"].values():
            for script, mode, purpose in entry.topology_roles:
                if node.get("script") == script and (mode is None or node.get("mode") == mode):
                    found[purpose].append(f"{node['host']}:{node['port']}")
    chosen = {
        "write": write or found["write"] or entry.default_addresses.get("write", []),
        "read": read or found["read"] or entry.default_addresses.get("read", []),
    }
    if not chosen["write"]:
        raise ValueError(f"{arch} needs --address (or --topology)")
    return {purpose: [parse_address(address) for address in addresses] for purpose, addresses in chosen.items()}


def make_client(arch: str, addresses: Addresses, *, request_timeout_s: float = 2.0,
                max_in_flight: int = 1024) -> BankClient:
    return ARCHITECTURES[arch].make(addresses, request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)
