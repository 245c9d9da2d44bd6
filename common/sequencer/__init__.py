"""Total order from a central orderer: the sequencer (seed 002, part 3) and, beside it, the RPC +
message queue server (part 2), whose replicas apply a numbered stream the same way.

Start with core.py: the sequencer's and the ordered replica's state machines (no I/O) and every
message between them. Then the drivers that run them: sequencer.py (`sequencer.py`), replica.py
(`replica.py --mode sequencer|queue`), queue_server.py (`server.py --mode queue`, the sequencer's
driver in queue mode). log.py is the orderer's durable log; client.py the client of both.
"""
