"""saldo's shared code: the wire protocol, money, the bank state machine, storage, and one module
per replication architecture. The top-level scripts (server.py, client.py, replica.py,
sequencer.py) wire these to flags, sockets and stores."""
