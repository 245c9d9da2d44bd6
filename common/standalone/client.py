"""The client of the standalone baseline: one address answers everything.

A standalone process orders, applies and answers on its own, so its client is the shared
`DirectClient` (common/transport/client.py) on that one address.
"""

from __future__ import annotations

from common.transport.client import Addresses, DirectClient


def make(addresses: Addresses, *, request_timeout_s: float, max_in_flight: int) -> DirectClient:
    """The client for common/clients.py: the first "write" address."""
    return DirectClient(addresses["write"][0], request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)
