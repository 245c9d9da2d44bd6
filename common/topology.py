"""Where every process is: default ports, and the topology file every process can read.

Owns the port layout of the seeds and the topology file format. A topology file is JSON:

    {
      "name": "local-sequencer",
      "nodes": {
        "sequencer": {"script": "sequencer.py", "host": "127.0.0.11", "port": 6002, "replica_port": 6003,
                      "log_path": "var/local/sequencer.seqlog"},
        "replica1":  {"script": "replica.py", "mode": "sequencer", "host": "127.0.0.12", "port": 6007,
                      "sequencer": "127.0.0.11:6003", "store": "sqlite:///var/local/replica1.db"}
      }
    }

A node's entry is the set of its command-line flag values (flag `--replica-port` is key
`replica_port`). `python sequencer.py --topology FILE --name sequencer` takes them as defaults;
a flag given on the command line still wins. Peer addresses are written into each node's entry by
whoever renders the file (the lab launcher, the Ansible deployment), so a link can be routed
through a fault proxy by writing the proxy's address there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The seeds' layout (seed 002 section 2.1; seed 000 servers), plus saldo's additions.
DEFAULT_PORTS = {
    "multicast_replica": 5555,  # client -> every replica (seed: PUB/SUB)
    "queue_rpc": 50051,  # client -> server RPC (seed: RPyC)
    "queue_replica": 6001,  # server -> replica queue delivery (seed: PUSH/PULL)
    "sequencer_client": 6002,  # client -> sequencer (seed: REQ/REP)
    "sequencer_replica": 6003,  # sequencer -> replicas (seed: PUB/SUB)
    "primary_client": 6004,  # client -> primary (seed: REQ/REP)
    "primary_peer": 6005,  # primary -> backups (seed: PUB/SUB)
    "sequencer_replica_client": 6007,  # client -> replica reads in the sequencer architecture (saldo)
    "witness": 6008,  # lease votes for primary-backup (saldo)
    "standalone": 7000,  # the unreplicated baseline (saldo)
    "farm_server": 8765,  # seed 000's servers: 8765 and 8766
}

MAX_TOPOLOGY_BYTES = 1024 * 1024


def parse_address(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' (or 'host' with a default port) -> (host, port); raises ValueError."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"expected host:port, got {text!r}")
        return text, default_port
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {text!r}")
    port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, port


def format_address(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def load(path: str | Path) -> dict:
    """The topology file at `path`; ValueError with one clear line when it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"topology file {path}: {error.strerror or error}") from None
    if len(data) > MAX_TOPOLOGY_BYTES:
        raise ValueError(f"topology file {path} is larger than {MAX_TOPOLOGY_BYTES} bytes")
    try:
        topology = json.loads(data)
    except ValueError as error:
        raise ValueError(f"topology file {path} is not JSON: {error}") from None
    if not isinstance(topology, dict) or not isinstance(topology.get("nodes"), dict):
        raise ValueError(f"topology file {path} has no 'nodes' object")
    return topology


def write(path: str | Path, topology: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(topology, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags, taking defaults from `--topology FILE --name NODE` when given."""
    parser.add_argument("--topology", help="topology file (JSON); this node's entry gives flag defaults")
    first, _rest = parser.parse_known_args(argv)
    if first.topology:
        try:
            topology = load(first.topology)
        except ValueError as error:
            parser.error(str(error))
        name = getattr(first, "name", None)
        if not name or name not in topology["nodes"]:
            parser.error(f"--name must be one of the nodes of {first.topology}: {', '.join(topology['nodes'])}")
        entry = dict(topology["nodes"][name])
        entry.pop("script", None)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(entry) - known)
        if unknown:
            parser.error(f"node {name} in {first.topology} has keys this script does not take: {', '.join(unknown)}")
        parser.set_defaults(**entry)
    return parser.parse_args(argv)
