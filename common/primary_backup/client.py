"""The client of the primary-backup architecture: finds the primary among the replicas.

Owns how a client reaches a replicated bank whose primary can change. `PrimaryBackupClient` knows
every replica's client address and sends writes (and up-to-date reads) to the one it believes is
the primary. When that replica answers NOT_PRIMARY, the reply says where to go in the seed's words
(`"TASK": "REDIRECT", "TARGET_MASTER": {"IP": ..., "PORT": ...}`): the client follows it at once;
without a target (an election under way) it tries the next replica. A replica it cannot connect to
is skipped for a moment. A bounded number of hops per request, then the last answer goes back to
the caller, which retries with the same operation id after a backoff (see common/transport/client.py's
execute_with_retries): a NOT_PRIMARY is definite, nothing was applied.

A read marked `"READ_FROM": "BACKUP"` (or every read, with `read_from_backup=True`) goes to a
backup instead; its reply says how far behind the primary that backup is (`BEHIND`, operations).

common/clients.py names it the client of "primary-backup" and of "primary-backup-async".
"""

from __future__ import annotations

import time

from common.log import get_logger
from common.transport.client import Addresses, BankClient, DirectClient

log = get_logger("pbclient")

# A replica that refused a connection is not tried again for this long (unless nothing else is left).
DOWN_FOR_S = 0.25
MAX_ADDRESSES = 16  # replicas named by the caller plus primaries learnt from redirects
READ_FROM_BACKUP = b',"READ_FROM":"BACKUP"'


class PrimaryBackupClient(BankClient):
    """Same interface as common/transport/client.DirectClient: submit / execute / close."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        *,
        request_timeout_s: float = 5.0,
        max_in_flight: int = 1024,
        read_from_backup: bool = False,
        start_index: int = 0,
        observer=None,
    ) -> None:
        assert addresses, "a primary-backup client needs at least one replica address"
        self.addresses: list[tuple[str, int]] = list(dict.fromkeys(addresses))[:MAX_ADDRESSES]
        self.request_timeout_s = request_timeout_s
        self.max_in_flight = max_in_flight
        self.read_from_backup = read_from_backup
        self._clients: dict[tuple[str, int], DirectClient] = {}
        self._primary = start_index % len(self.addresses)
        self._down_until: dict[tuple[str, int], float] = {}
        self.epoch_seen = 0
        # observer(address, reply): called for every OK answer to a write (the lab's ack journal).
        self.observer = observer
        self.redirects_followed = 0

    @property
    def primary_address(self) -> tuple[str, int]:
        return self.addresses[self._primary]

    def _client(self, index: int) -> DirectClient:
        address = self.addresses[index]
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = DirectClient(
                address, request_timeout_s=self.request_timeout_s, max_in_flight=self.max_in_flight
            )
        return client

    def _next_index(self, after: int) -> int:
        """The next replica after `after` that is not known to be down (or simply the next)."""
        now = time.monotonic()
        count = len(self.addresses)
        for step in range(1, count + 1):
            index = (after + step) % count
            if self._down_until.get(self.addresses[index], 0.0) <= now:
                return index
        return (after + 1) % count

    def _index_of(self, target: object) -> int | None:
        """The index of a TARGET_MASTER, adding it when it is new (bounded)."""
        if type(target) is not dict:
            return None
        host, port = target.get("IP"), target.get("PORT")
        if type(host) is not str or type(port) is not int or not 0 < port < 65536 or len(host) > 255:
            return None
        address = (host, port)
        if address in self.addresses:
            return self.addresses.index(address)
        if len(self.addresses) >= MAX_ADDRESSES:
            return None
        self.addresses.append(address)
        return len(self.addresses) - 1

    def submit(self, request_id: str, line: bytes, on_reply, timeout_s: float | None = None, is_read: bool = False) -> None:
        if is_read and (self.read_from_backup or READ_FROM_BACKUP[1:] in line):
            if READ_FROM_BACKUP[1:] not in line:
                line = line[: line.rindex(b"}")] + READ_FROM_BACKUP + b"}\n"
            self._send(self._next_index(self._primary) if len(self.addresses) > 1 else self._primary,
                       request_id, line, on_reply, timeout_s, len(self.addresses), to_backup=True)
            return
        self._send(self._primary, request_id, line, on_reply, timeout_s, 2 * len(self.addresses), to_backup=False)

    def _send(self, index: int, request_id: str, line: bytes, on_reply, timeout_s: float | None, hops_left: int,
              *, to_backup: bool) -> None:
        address = self.addresses[index]
        observer = None if to_backup else self.observer

        def on_attempt_reply(reply: dict) -> None:
            if reply.get("STATUS") == "OK":  # the common case: as little work as possible
                if observer is not None:
                    observer(address, reply)
                on_reply(reply)
                return
            epoch = reply.get("EPOCH")
            if type(epoch) is int and epoch > self.epoch_seen:
                self.epoch_seen = epoch
            code = reply.get("ERROR")
            if to_backup:
                if code in ("NOT_READY", "CONNECTION_LOST", "TIMEOUT") and hops_left > 1:
                    self._down_until[address] = time.monotonic() + DOWN_FOR_S
                    return self._send(self._next_index(index), request_id, line, on_reply, timeout_s, hops_left - 1,
                                      to_backup=True)
                on_reply(reply)
                return
            if code == "NOT_PRIMARY":
                target = self._index_of(reply.get("TARGET_MASTER"))
                if target is None or target == index or self._down_until.get(self.addresses[target], 0.0) > time.monotonic():
                    target = self._next_index(index)
                if self._primary == index:
                    self._primary = target
                if hops_left > 1 and target != index:
                    self.redirects_followed += 1
                    return self._send(target, request_id, line, on_reply, timeout_s, hops_left - 1, to_backup=False)
            elif code == "NOT_READY":
                # Nothing was sent (no connection): safe to try the next replica at once.
                self._down_until[address] = time.monotonic() + DOWN_FOR_S
                target = self._next_index(index)
                if self._primary == index:
                    self._primary = target
                if hops_left > 1 and target != index:
                    return self._send(target, request_id, line, on_reply, timeout_s, hops_left - 1, to_backup=False)
            elif code in ("CONNECTION_LOST", "TIMEOUT") and self._primary == index:
                # The outcome is unknown: the caller decides to retry (with the same id); the retry
                # goes to the next replica, which redirects it back if this one is still the primary.
                self._primary = self._next_index(index)
            on_reply(reply)

        self._client(index).submit(request_id, line, on_attempt_reply, timeout_s)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def make(addresses: Addresses, *, request_timeout_s: float, max_in_flight: int) -> PrimaryBackupClient:
    """The client for common/clients.py: every replica named, the "write" ones first."""
    return PrimaryBackupClient(addresses["write"] + [a for a in addresses.get("read", []) if a not in addresses["write"]],
                               request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)
