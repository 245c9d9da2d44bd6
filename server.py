#!/usr/bin/env python3
"""A saldo server on the orchestrator host.

    python server.py --port 8765 --peers 127.0.0.1:8766          (worker farm, seed 000)
    python server.py --mode queue --replicas replica1=127.0.0.12:6001,replica2=127.0.0.13:6001   (RPC + queue, seed 002 part 2)

Modes:
  farm    an orchestrator of the worker farm: queues balance tasks, hands them to workers
          (`client.py worker`), exchanges heartbeats with peer servers and lends idle workers
  queue   the RPC server of the replicated bank: answers clients and appends each operation to
          one durable FIFO queue per replica, which the replicas consume
  witness the third voter of primary-backup (seed 002 part 4): votes and lease grants, no data

`python server.py --mode MODE --help` lists the flags of a mode. This script wires flags, sockets
and storage; each protocol lives in common/.
"""

from __future__ import annotations

import sys

from common.launch import main as launch

MODES = {
    "farm": "common.farm.server",
    "queue": "common.sequencer.queue_server",
    "witness": "common.primary_backup.witness",
}


def main(argv: list[str] | None = None) -> int:
    return launch(__doc__, MODES, "farm", argv)


if __name__ == "__main__":
    sys.exit(main())
