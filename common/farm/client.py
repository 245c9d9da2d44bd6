"""The worker farm's client side: architecture "farm" for client.py and the lab, and its STATUS table.

Owns how a client reaches a farm: it sends every task to one server and moves to the next server
of its list when that one cannot be reached, does not answer in time, says its queue is full or
that the farm has no worker for the task (NO_WORKER). The caller retries with the same id
(common/transport/client.execute_with_retries, the lab's workload), so the retry lands on the next
server; exactly-once holds across servers because the workers record each operation id in the one
shared store, and a server recognizes an id it already queued, handed out, forwarded or finished (a
read's too, while it runs).

A farm server answers a task only with its result, and a task may wait in a queue: a missing answer
is not yet a sign of trouble. So each attempt after one that timed out waits twice as long as that
one (`retry_timeout_growth`): a retry neither fires again and again at a server that is merely
busy, nor sends the same task to every server of the list.

    python client.py --arch farm deposit alice 10 --address 127.0.0.1:8765 --address 127.0.0.1:8766
    python client.py status 127.0.0.1:8765          (printed by format_status)
"""

from __future__ import annotations

from common.transport.client import Addresses, BankClient, DirectClient

# Replies after which the next task goes to the next server.
FAILOVER_ERRORS = frozenset({"NOT_READY", "CONNECTION_LOST", "TIMEOUT", "QUEUE_FULL", "OVERLOADED", "NO_WORKER"})


class FarmClient(BankClient):
    """Tasks to one farm server at a time, failing over along `addresses`."""

    retry_timeout_growth = 2.0

    def __init__(self, addresses: list[tuple[str, int]], *, request_timeout_s: float = 5.0, max_in_flight: int = 1024,
                 start_index: int = 0) -> None:
        assert addresses
        self.servers = [DirectClient(a, request_timeout_s=request_timeout_s, max_in_flight=max_in_flight) for a in addresses]
        self.current = start_index % len(self.servers)
        self.failovers_total = 0

    def submit(self, request_id: str, line: bytes, on_reply, timeout_s: float | None = None, is_read: bool = False) -> None:
        index = self.current

        def on_server_reply(reply: dict) -> None:
            if reply.get("STATUS") != "OK" and reply.get("ERROR") in FAILOVER_ERRORS and self.current == index:
                self.current = (index + 1) % len(self.servers)
                self.failovers_total += 1
            on_reply(reply)

        self.servers[index].submit(request_id, line, on_server_reply, timeout_s)

    async def close(self) -> None:
        for server in self.servers:
            await server.close()


def make(addresses: Addresses, *, request_timeout_s: float, max_in_flight: int) -> FarmClient:
    """The client for common/clients.py: every "write" address is a farm server."""
    return FarmClient(addresses["write"], request_timeout_s=request_timeout_s, max_in_flight=max_in_flight)


def format_status(reply: dict) -> str:
    """A farm server's STATUS as tables: the figures, its workers, its peers."""
    workers = reply.get("WORKERS") or {}
    lines = [
        f"  {'queue':<22}{reply.get('QUEUE_LENGTH')} of {reply.get('MAX_QUEUE')} (in flight {reply.get('IN_FLIGHT')})",
        f"  {'tasks/s':<22}{reply.get('TASKS_PER_S')} (completed {reply.get('TASKS_COMPLETED_TOTAL')}, "
        f"by borrowed workers {reply.get('TASKS_BY_BORROWED_TOTAL')}, requeued {reply.get('TASKS_REQUEUED_TOTAL')})",
        f"  {'workers':<22}own {workers.get('OWN')}  home {workers.get('HOME')}  lent out {workers.get('LENT_OUT')}  "
        f"borrowed {workers.get('BORROWED')}  idle {workers.get('IDLE')}  busy {workers.get('BUSY')}",
        f"  {'server':<22}{reply.get('SERVER_UUID')}  pid {reply.get('PID')}  up {reply.get('UPTIME_S')} s",
    ]
    runs = reply.get("RUNS")
    if isinstance(runs, list) and "UPDATE" not in runs:  # what a client's task meets here
        if runs:
            here = "no worker here runs updates (its workers are seed workers, which run reads): updates"
        else:
            here = "no worker is connected here: tasks"
        lines.insert(3, f"  {'no worker':<22}{here} go to a peer that has one, or are refused NO_WORKER "
                        f"(forwarded {reply.get('TASKS_FORWARDED_TOTAL')}, refused {reply.get('NO_WORKER_TOTAL')})")
    if reply.get("BAD_RESULTS_TOTAL"):
        lines.append(f"  {'bad results':<22}{reply['BAD_RESULTS_TOTAL']} (which worker: BAD column below, and the log)")
    if "OPS_APPLIED_TOTAL" in reply:
        lines.append(f"  {'store ops applied':<22}{reply['OPS_APPLIED_TOTAL']}")
    loop = reply.get("LOOP")
    if isinstance(loop, dict):
        lines.append(f"  {'event loop':<22}stalls {loop.get('STALLS_TOTAL')} ({loop.get('STALLED_MS_TOTAL')} ms in all), "
                     f"largest lag {loop.get('LAG_MAX_MS')} ms")
    rows = reply.get("WORKER_LIST") or []
    if rows:
        lines.append(f"  {'WORKER':<38}{'OWNER':<22}{'PLACEMENT':<10}{'RUNS':<14}{'HELD':>5}{'DONE':>9}{'BAD':>5}  STATE")
        for row in rows:
            place = str(row.get("PLACEMENT"))
            state = "idle" if row.get("IDLE") else "busy" if row.get("HELD") else "away" if not row.get("CONNECTED") else "-"
            lent_to = f" -> {row['LENT_TO']}" if row.get("LENT_TO") else ""
            kinds = "+".join(k.lower() for k in row.get("ACCEPTS") or [])
            lines.append(f"  {str(row.get('WORKER_UUID')):<38}{str(row.get('OWNER')):<22}{place:<10}{kinds:<14}{row.get('HELD'):>5}"
                         f"{row.get('TASKS_DONE'):>9}{row.get('BAD_RESULTS', 0):>5}  {state}{lent_to}")
    peers = reply.get("PEERS") or []
    if peers:
        lines.append(f"  {'PEER':<24}{'STATE':<9}{'LAST HEARTBEAT':>16}{'FAILURES':>10}{'QUEUE':>8}  WORKERS RUN")
        for peer in peers:
            ago = peer.get("LAST_HEARTBEAT_S_AGO")
            ago_text = "never" if ago is None else f"{ago:.2f} s ago"
            peer_runs = peer.get("RUNS")
            runs_text = "?" if peer_runs is None else "+".join(k.lower() for k in peer_runs) or "nothing (no worker)"
            lines.append(f"  {str(peer.get('ADDRESS')):<24}{str(peer.get('STATE')):<9}{ago_text:>16}"
                         f"{peer.get('FAILURES'):>10}{str(peer.get('QUEUE_LENGTH')):>8}  {runs_text}")
    return "\n".join(lines)
