"""The worker farm (seed 000): orchestrator servers queue tasks and hand them to workers, which
run them against one shared store; servers lend idle workers to an overloaded peer.

Start with core.py: a server's protocol as a state machine without I/O (FarmCore), handing its
decisions over by the core contract (common/core.py). server.py is its driver (`server.py --mode
farm`).
worker_core.py is a worker's protocol, worker.py its blocking driver (`client.py worker`).
client.py is the client and the STATUS table. docs/farm-protocol.md tells the whole protocol.
"""
