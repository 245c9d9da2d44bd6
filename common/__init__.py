"""saldo's shared code, in layers: the bank (bank/), how processes talk (transport/), where a bank
is kept (storage/), then one folder per architecture (standalone/, multicast/, sequencer/,
primary_backup/, farm/), each with its protocol core(s) without I/O, its driver(s) and its client.
clients.py maps an architecture to its client; launch.py picks a driver by --mode. The top-level
scripts (server.py, client.py, replica.py, sequencer.py, lab.py) wire these to flags, sockets and
stores."""

import sys

if sys.version_info < (3, 11):  # asyncio.timeout, TaskGroup, ... : one clear line, not a traceback
    raise SystemExit(f"saldo needs Python 3.11 or newer; this is {sys.version.split()[0]} ({sys.executable})")
