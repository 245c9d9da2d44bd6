"""The multicast architecture's rule, which lives in its client: send every write to every replica.

Seed 002's part 1 coordinates nothing: each replica applies what it receives, in the order it
receives it (a replica is common/standalone/replica.py in multicast mode). So the whole protocol is
here: a write goes to every replica and its replies are merged into one; a read asks one replica.
Nothing makes the replicas converge, which is what the lab shows.
"""

from __future__ import annotations

from common.bank.errors import is_definite
from common.transport.client import Addresses, BankClient, DirectClient, read_from_one


class _Gather:
    """One multicast write's replies, in the order they arrive; the merged reply goes to
    `on_reply` once every replica answered (or timed out: the connection answers for it)."""

    __slots__ = ("replies", "remaining", "on_reply")

    def __init__(self, count: int, on_reply) -> None:
        self.replies: list[dict] = []
        self.remaining = count
        self.on_reply = on_reply

    def __call__(self, reply: dict) -> None:
        self.replies.append(reply)
        self.remaining -= 1
        if self.remaining == 0:
            self.on_reply(_merge_multicast(self.replies))


class MulticastClient(BankClient):
    """Sends every write to every replica (seed 002 part 1: no coordination). The reply is the
    first to arrive, plus APPLIED (how many replicas answered OK), REPLICAS, and AGREE (whether
    every replica answered, with the same outcome and the same resulting balance). A replica that does not answer in time simply
    did not count: nothing makes the replicas converge, which is the point the lab shows."""

    def __init__(self, addresses: list[tuple[str, int]], *, request_timeout_s: float = 5.0, max_in_flight: int = 1024,
                 read_index: int = 0) -> None:
        assert addresses
        self.replicas = [DirectClient(a, request_timeout_s=request_timeout_s, max_in_flight=max_in_flight) for a in addresses]
        self._read_index = read_index % len(self.replicas)

    def submit(self, request_id: str, line: bytes, on_reply, timeout_s: float | None = None, is_read: bool = False) -> None:
        if is_read:  # a read asks one replica: what that replica has applied
            read_from_one(self, self.replicas, request_id, line, on_reply, timeout_s)
            return
        gather = _Gather(len(self.replicas), on_reply)
        for replica in self.replicas:
            replica.submit(request_id, line, gather, timeout_s)

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()


def _merge_multicast(replies: list[dict]) -> dict:
    """One reply from every replica's: a decided one if any replica decided, else the first."""
    count = len(replies)
    first = replies[0]
    balance = first.get("BALANCE")
    applied = agree = 0
    for reply in replies:
        if reply.get("STATUS") == "OK":
            applied += 1
            agree += reply.get("BALANCE") == balance
    if applied == count:  # the common case: every replica applied it (outcomes may still differ)
        merged = dict(first)
        merged["APPLIED"] = merged["REPLICAS"] = count
        merged["AGREE"] = agree == count
        return merged
    decided = [r for r in replies if r.get("STATUS") == "OK" or is_definite(r.get("ERROR"))]
    merged = dict(decided[0] if decided else replies[0])
    merged["APPLIED"] = applied
    merged["REPLICAS"] = count
    outcomes = {(r.get("STATUS"), r.get("ERROR")) for r in decided}
    merged["AGREE"] = len(outcomes) <= 1 and len(decided) == count
    return merged


def make(addresses: Addresses, *, request_timeout_s: float, max_in_flight: int) -> MulticastClient:
    """The client for common/clients.py: every "write" address is a replica."""
    return MulticastClient(addresses["write"], request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)
