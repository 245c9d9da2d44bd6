"""Primary-backup with failover (seed 002, part 4): a primary elected per epoch by a majority of
replicas and a witness, acknowledging under a lease.

Start with core.py: the rules as state machines without I/O (the voter, the primary, the replica).
Then replica.py (`replica.py --mode primary-backup`) and witness.py (`server.py --mode witness`),
the drivers that run them; client.py follows redirects to the primary. docs/primary-backup.md
tells the whole protocol.
"""
