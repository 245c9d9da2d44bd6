"""Where a replica's bank is kept on disk.

store.py is the SQLite and MySQL stores (balances, applied operations and metadata written in one
transaction); durable.py the bank in memory with its image in a store, written by group commit;
snapshot.py state transfer between replicas; replica_store.py a replica's store flags and opening
its DurableBank.
"""
