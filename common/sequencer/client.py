"""The client of the sequencer and of the queue architecture: writes to the orderer, reads from a replica.

Owns how a client reaches a bank whose operations one orderer numbers: the sequencer
(`sequencer.py`), or the queue architecture's RPC server (`server.py --mode queue`), which a client
talks to the same way. Writes go to that orderer; reads go to a replica and move to the next one
when a replica cannot answer.
"""

from __future__ import annotations

from common.transport.client import Addresses, BankClient, DirectClient, read_from_one


class SequencerClient(BankClient):
    """Writes go to the sequencer; reads go to a replica and name the highest sequence number this
    client has been told of (`max_seq_seen`, kept by whoever reads the replies: the lab's workload),
    so a client always reads its own writes."""

    def __init__(self, write_address: tuple[str, int], read_addresses: list[tuple[str, int]], *,
                 request_timeout_s: float = 5.0, max_in_flight: int = 1024, read_index: int = 0) -> None:
        self.writer = DirectClient(write_address, request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)
        self.readers = [DirectClient(a, request_timeout_s=request_timeout_s, max_in_flight=max_in_flight) for a in read_addresses]
        self._read_index = read_index % max(1, len(self.readers))
        self.max_seq_seen = 0

    def submit(self, request_id: str, line: bytes, on_reply, timeout_s: float | None = None, is_read: bool = False) -> None:
        if is_read and self.readers:
            read_from_one(self, self.readers, request_id, line, on_reply, timeout_s)
            return
        self.writer.submit(request_id, line, on_reply, timeout_s)

    async def close(self) -> None:
        await self.writer.close()
        for reader in self.readers:
            await reader.close()


def make(addresses: Addresses, *, request_timeout_s: float, max_in_flight: int) -> SequencerClient:
    """The client for common/clients.py: writes to the first "write" address, reads from the "read" ones."""
    return SequencerClient(addresses["write"][0], addresses["read"], request_timeout_s=request_timeout_s,
                           max_in_flight=max_in_flight)
