#!/usr/bin/env python3
"""A saldo replica: holds a copy of the accounts in a durable store and serves it.

    python replica.py --mode standalone --port 7000 --store sqlite:///var/standalone.db
    python replica.py --topology var/up/sequencer/topology.json --name replica1

Modes (one per architecture of seed 002, plus the baseline):
  standalone       one process, no replication: the baseline every architecture is compared with
  multicast        applies every operation a client sends it, on receipt (seed part 1)
  queue            applies the RPC server's queue in order, acknowledging as it goes (seed part 2)
  sequencer        applies the sequencer's numbered operations in order (seed part 3)
  primary-backup   one primary orders, applies and streams to backups; failover by leased election (seed part 4)

`python replica.py --mode MODE --help` lists the flags of a mode. This script wires flags, sockets
and the store; each architecture's protocol lives in common/.
"""

from __future__ import annotations

import sys

from common.launch import main as launch

MODES = {
    "standalone": "common.standalone.replica",
    "multicast": "common.standalone.replica",
    "queue": "common.sequencer.replica",
    "sequencer": "common.sequencer.replica",
    "primary-backup": "common.primary_backup.replica",
}


def main(argv: list[str] | None = None) -> int:
    return launch(__doc__, MODES, "standalone", argv)


if __name__ == "__main__":
    sys.exit(main())
