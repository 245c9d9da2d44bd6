"""How saldo's processes talk: newline-delimited JSON over TCP.

wire.py is the codec (one JSON object per line, bounded); aio.py the asyncio transport (servers,
message streams, pipelined client connections); blocking.py the selectors transport of simple
blocking programs (the farm worker, the lab's probes); peers.py who may speak on a replication
port; client.py the client machinery every architecture's client shares (one attempt, retries
with the same operation id, what an answer means).
"""
