"""Who may speak a replication protocol: a check by the host a connection comes from.

Owns the rule the replication ports apply before they act on a protocol message (a queue
replica's FEED, the sequencer's SUBSCRIBE / APPLIED / RESEND, primary-backup's peer port and its
witness's votes and leases): the connection must come from one of the hosts this node's peers run
on (`--peer-hosts`; without it, any host, and a warning at start). Each node connects to its peers
from the address it listens on (`source_address`), so that is the host its peers see. Anyone may
still ask for STATUS.

This identifies peers on a network that only the cluster's hosts reach, like the worker farm's
peer check; it is not authentication: a process on a peer's host, or one that forges its source
address, is believed. What proves a role is TLS with a role in each certificate.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable

from common.bank.errors import SaldoError, error_reply
from common.log import get_logger
from common.transport import aio

log = get_logger("peers")

MAX_PEER_HOSTS = 64
# A connection refused this many messages on a peer port is closed: a stranger holds no slot long.
MAX_REFUSALS_PER_CONNECTION = 16


def source_address(listen_host: str) -> str | None:
    """The address outgoing links bind to: the one this node listens on, unless that is a wildcard
    (then the system picks, and the peers' --peer-hosts must name what it picks)."""
    if not listen_host:
        return None
    try:
        return None if ipaddress.ip_address(listen_host).is_unspecified else listen_host
    except ValueError:
        return listen_host  # a name: it resolves to this node's address


def parse_hosts(text: str | None) -> list[str]:
    """`--peer-hosts` as a list of host names or addresses ("" or None: none given)."""
    hosts = [item.strip() for item in (text or "").split(",") if item.strip()]
    if len(hosts) > MAX_PEER_HOSTS:
        raise SystemExit(f"--peer-hosts: at most {MAX_PEER_HOSTS} hosts")
    return hosts


def resolve(hosts: list[str]) -> frozenset[str]:
    """Every address the hosts resolve to (a connection's source is an address, never a name).
    Blocking: call it once, at start."""
    addresses: set[str] = set()
    for host in hosts:
        try:
            for _family, _type, _proto, _name, sockaddr in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
                addresses.add(aio.normal_address(str(sockaddr[0])))
        except socket.gaierror as error:
            raise SystemExit(f"--peer-hosts: cannot resolve {host!r}: {error}") from None
    return frozenset(addresses)


class PeerCheck:
    """The hosts a node accepts replication messages from; None: from any host (not configured)."""

    def __init__(self, allowed: frozenset[str] | None, *, role: str, flag: str = "--peer-hosts") -> None:
        self.allowed = allowed
        self.role = role
        self.flag = flag  # the flag that names the hosts, for the refusal's words
        self.refused_total = 0
        if allowed is None:
            log.warning("peer_hosts_unchecked", role=role,
                        hint="--peer-hosts: replication messages are taken from any host")

    @classmethod
    def from_flag(cls, peer_hosts: str, *, role: str) -> "PeerCheck":
        """The check a `--peer-hosts` value asks for ("": none, any host is admitted). Resolves
        host names: call it once, at start."""
        return cls(resolve(parse_hosts(peer_hosts)) if peer_hosts else None, role=role)

    def admits(self, stream: aio.MessageStream) -> bool:
        return self.allowed is None or stream.peer_host in self.allowed

    def check(self, stream: aio.MessageStream, what: str) -> None:
        """Raise NOT_PEER unless `stream` comes from a peer host."""
        if not self.admits(stream):
            self.refused_total += 1
            if self.refused_total & (self.refused_total - 1) == 0:  # 1, 2, 4, 8, ...: a flood logs little
                log.warning("not_peer_refused", role=self.role, peer=stream.peer, message=what,
                            refused_total=self.refused_total)
            raise SaldoError("NOT_PEER", f"{what} is taken only from this {self.role}'s peer hosts ({self.flag})")

    async def answer_stranger(self, stream: aio.MessageStream, status: Callable[[object], dict]) -> None:
        """Serve a whole connection from a host that is not a peer's: STATUS is answered (`status`
        makes the reply for a request id), every other message refused with NOT_PEER, unread."""
        refusals = 0
        while refusals < MAX_REFUSALS_PER_CONNECTION:
            batch = await stream.read_batch()
            if batch is None:
                return
            for message in batch:
                if refusals >= MAX_REFUSALS_PER_CONNECTION:
                    break  # the rest of what it sent goes unanswered: the connection closes
                if isinstance(message, SaldoError):
                    stream.send(error_reply(message.code, message.detail))
                    refusals += 1
                    continue
                request_id = message.get("ID") if type(message.get("ID")) in (str, int) else None
                task = message.get("TASK")
                try:
                    if task == "STATUS":
                        stream.send(status(request_id))
                    else:
                        self.check(stream, task[:32] if task else "a message")
                except SaldoError as error:
                    stream.send(error_reply(error.code, error.detail, request_id))
                    refusals += 1
            if not await stream.drain():
                return
        await stream.close()
