"""saldo's shared code: the wire protocol, money, the bank state machine, storage, and one module
per replication architecture. The top-level scripts (server.py, client.py, replica.py,
sequencer.py) wire these to flags, sockets and stores."""

import sys

if sys.version_info < (3, 11):  # asyncio.timeout, TaskGroup, ... : one clear line, not a traceback
    raise SystemExit(f"saldo needs Python 3.11 or newer; this is {sys.version.split()[0]} ({sys.executable})")
