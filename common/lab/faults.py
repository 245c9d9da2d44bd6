"""Named fault schedules, and the injector that plays one against a running cluster.

Owns what `make chaos FAULTS=<name>` means. A schedule is a list of faults, each with a start and
an end as fractions of the run's duration (so one schedule fits a 10 s run and a 10 min run):

    kill       SIGKILL at the start, restart at the end (a crash and a recovery)
    pause      SIGSTOP at the start, SIGCONT at the end (a freeze: the sockets stay open)
    partition  the fault proxy cuts the node's links at the start, heals at the end
    delay      the fault proxy delays the node's links at the start, heals at the end
    drop       the fault proxy resets the node's connections (at the start only)

A fault names a role ("replica", "primary", "sequencer", "server"); the architecture says which
node plays it (common/lab/archs.py), and "primary" is asked of the cluster when the fault starts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from common.log import get_logger

log = get_logger("faults")


@dataclass(frozen=True)
class Fault:
    kind: str  # kill | pause | partition | delay | drop
    role: str  # replica | primary | sequencer | server | backup
    start: float  # fraction of the run
    end: float  # fraction of the run (== start for instant faults)
    params: dict = field(default_factory=dict)


SCHEDULES: dict[str, list[Fault]] = {
    "none": [],
    "kill-replica": [Fault("kill", "replica", 0.3, 0.6)],
    "pause-replica": [Fault("pause", "replica", 0.3, 0.6)],
    "partition-replica": [Fault("partition", "replica", 0.3, 0.6)],
    "delay-replica": [Fault("delay", "replica", 0.2, 0.8, {"delay_ms": 20})],
    "drop-replica": [Fault("drop", "replica", 0.25, 0.25), Fault("drop", "replica", 0.5, 0.5), Fault("drop", "replica", 0.75, 0.75)],
    "kill-sequencer": [Fault("kill", "sequencer", 0.3, 0.5)],
    "kill-server": [Fault("kill", "server", 0.3, 0.5)],
    "kill-primary": [Fault("kill", "primary", 0.3, 0.6)],
    "pause-primary": [Fault("pause", "primary", 0.3, 0.6)],
    "partition-primary": [Fault("partition", "primary", 0.3, 0.6)],
    # A replica that is a backup when the fault starts ("replica" names replica1, which may be
    # the primary or a backup, whichever the first election made it).
    "kill-backup": [Fault("kill", "backup", 0.3, 0.6)],
    "pause-backup": [Fault("pause", "backup", 0.3, 0.6)],
    "partition-backup": [Fault("partition", "backup", 0.3, 0.6)],
}


class FaultInjector:
    """Plays a schedule against a cluster while the workload runs; records what it did."""

    def __init__(self, lab, schedule: list[Fault], duration_s: float, clock) -> None:
        self.lab = lab  # common.lab.archs.LabCluster bound to a running Cluster
        self.schedule = schedule
        self.duration_s = duration_s
        self.clock = clock  # seconds since the run's t0
        self.records: list[dict] = []
        self._open: list[tuple[Fault, str, dict]] = []

    async def run(self, run_started_s: float) -> None:
        events = []
        for fault in self.schedule:
            events.append((fault.start, 0, fault))
            if fault.end > fault.start:
                events.append((fault.end, 1, fault))
        events.sort(key=lambda e: (e[0], e[1]))
        targets: dict[int, tuple[str, dict]] = {}
        for fraction, is_end, fault in events:
            at_s = run_started_s + fraction * self.duration_s
            delay = at_s - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if not is_end:
                target = await self.lab.resolve(fault.role)
                record = {"action": fault.kind, "target": target, "role": fault.role, "at_s": round(self.clock(), 3), **fault.params}
                self.records.append(record)
                targets[id(fault)] = (target, record)
                await self.lab.start_fault(fault, target)
                if fault.end == fault.start:
                    record["until_s"] = record["at_s"]
                else:
                    self._open.append((fault, target, record))
            else:
                target, record = targets[id(fault)]
                await self._end(fault, target, record)

    async def _end(self, fault: Fault, target: str, record: dict) -> None:
        started = time.monotonic()
        await self.lab.end_fault(fault, target)
        record["until_s"] = round(self.clock(), 3)
        record["end_took_s"] = round(time.monotonic() - started, 3)
        self._open = [entry for entry in self._open if entry[2] is not record]

    def describe_open(self) -> str:
        """The faults in force now, for the progress line."""
        if not self._open:
            return ""
        return "faults=" + ",".join(f"{record['action']}:{target}" for _fault, target, record in self._open)

    async def heal_all(self) -> None:
        """End every fault still open (the run ended first)."""
        for fault, target, record in list(self._open):
            await self._end(fault, target, record)
