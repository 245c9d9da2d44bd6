"""The RPC + message queue server (`server.py --mode queue`, seed 002 part 2).

Owns the queue architecture's server: clients call it (RPC port 50051) with bank operations; it
appends each one to a durable FIFO per replica and answers once the operation is queued (the seed's
meaning: accepted, its outcome not yet known) or, with --ack-replicas K, once K replicas applied it
(with the result). It connects to each replica's queue port (6001) and pushes that replica's queue;
the replica applies in queue order and acknowledges; a replica that was away gets everything after
its last acknowledgement when it returns (at-least-once delivery + idempotent apply = exactly-once
effect).

The replicas' queues hold the same operations in the same order, so they are kept as one durable
log read from each replica's own position: an entry leaves the log once every replica consumed it.
This is the sequencer's machinery (common/sequencer/core.py, common/sequencer/sequencer.py) with the two
differences that define the architecture: the server pushes to the replicas, and it answers at
enqueue time by default.
"""

from __future__ import annotations

import argparse
import asyncio

from common import topology
from common.sequencer import sequencer as orderer
from common.sequencer.core import WAIT_ALL, WAIT_APPLIED, WAIT_SEQUENCED


def add_flags(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=topology.DEFAULT_PORTS["queue_rpc"],
                        help=f"RPC port for clients (default {topology.DEFAULT_PORTS['queue_rpc']})")
    parser.add_argument("--replicas", help="each replica's queue port, NAME=HOST:PORT comma-separated "
                        f"(e.g. replica1=127.0.0.12:{topology.DEFAULT_PORTS['queue_replica']})")
    parser.add_argument("--log-dir", help="directory of the queues (default var/<name>-queue)")
    parser.add_argument("--ack-replicas", type=int, default=0,
                        help="answer once this many replicas applied the operation (default 0: once queued)")
    orderer.add_log_flags(parser)


def prepare(args: argparse.Namespace) -> None:
    if not args.replicas:
        raise SystemExit("server.py --mode queue: --replicas NAME=HOST:PORT[,...] is required (each replica's queue port)")
    if args.name is None:
        args.name = "queue-server"
    if args.log_dir is None:
        args.log_dir = f"var/{args.name}-queue"


def parse_replicas(text: str) -> dict[str, tuple[str, int]]:
    replicas = {}
    for item in text.split(","):
        name, sep, address = item.strip().partition("=")
        if not sep or not name:
            raise SystemExit(f"--replicas: expected NAME=HOST:PORT, got {item!r}")
        replicas[name] = topology.parse_address(address, topology.DEFAULT_PORTS["queue_replica"])
    return replicas


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    replicas = parse_replicas(args.replicas)
    if not 0 <= args.ack_replicas <= len(replicas):
        raise SystemExit(f"--ack-replicas must be between 0 and {len(replicas)}")
    default_wait = {0: WAIT_SEQUENCED, 1: WAIT_APPLIED, len(replicas): WAIT_ALL}.get(args.ack_replicas)
    if default_wait is None:
        raise SystemExit("--ack-replicas must be 0, 1 or the number of replicas")
    return await orderer.run_orderer(args, stop, list(replicas), default_wait=default_wait, role="queue-server",
                                     outbound=replicas)
