#!/usr/bin/env python3
"""The saldo sequencer: total order for the replicated bank (seed 002, part 3).

    python sequencer.py --replicas replica1,replica2
    python sequencer.py --topology var/up/sequencer/topology.json --name sequencer

Clients send operations to the client port (6002); the sequencer numbers them 1, 2, 3, ..., writes
them to its durable log (--log-dir) and broadcasts them to the replicas, which connect to the
replica port (6003) with `replica.py --mode sequencer`. The reply to a client comes once a replica
has applied the operation (or, with "WAIT": "SEQUENCED", once it is in the log). See
common/sequencer/core.py for the protocol.
"""

from __future__ import annotations

import sys

from common.launch import main as launch

MODES = {"sequencer": "common.sequencer.sequencer"}


def main(argv: list[str] | None = None) -> int:
    return launch(__doc__, MODES, "sequencer", argv)


if __name__ == "__main__":
    sys.exit(main())
