"""The long run (issue 4): at least 200,000 operations through the sequencer architecture, with one
replica killed and restarted after the log was truncated past it.

A small log bound (max_log_entries, segment_entries) and dedup window make the long run reach the
steady state quickly: the sequencer truncates its log once it holds more than the bound, so the
killed replica comes back behind the log start, is told SNAPSHOT_NEEDED, and catches up by a state
transfer from its peer. The test drives the workload in slices (common/lab/workload.py on a
common/lab/cluster.py cluster) so that it can look at the processes between slices: the log's
size, each process's peak memory (VmHWM), the replicas' STATUS. It checks that the verdict is
valid, that the replica was restored by state transfer, and that neither the log nor any process's
memory grows with the number of operations once the bounds are reached.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from common.lab import archs, checker
from common.lab.cluster import Cluster
from common.lab.workload import Workload, WorkloadConfig
from common.storage.store import MAX_OPS_PER_BATCH_ROW, open_store

pytestmark = pytest.mark.slow

MID_SEQ = 120_000  # by then every bounded structure is full (the sequencer caches 100,000 results)
END_SEQ = 240_000  # twice as many operations through the sequencer
MAX_LOG_ENTRIES = 20_000
SEGMENT_ENTRIES = 5_000
DEDUP_WINDOW = 50_000
SLICE_S = 3.0
STATUS_TIMEOUT_S = 30.0
TIME_LIMIT_S = 200.0  # the whole drive; the machine is shared, so generous
# A log line is ~150 bytes; the log holds at most the bound plus one segment being filled and one
# not yet deleted.
LOG_ENTRIES_BOUND = MAX_LOG_ENTRIES + 2 * SEGMENT_ENTRIES
LOG_BYTES_BOUND = LOG_ENTRIES_BOUND * 256
# Truncated segments stay while the ids they hold are remembered (the dedup window), and go at the
# next truncation after that: the window, the segment holding its oldest id, and a second's worth.
IDS_BYTES_BOUND = (DEDUP_WINDOW + 2 * SEGMENT_ENTRIES) * 256
# Peak memory may rise a little after the mid-run sample (allocator noise, a busier moment), but
# not in proportion to the operations: the second half of the run adds as many as the first.
MEMORY_GROWTH_LIMIT = 0.20
MEMORY_GROWTH_SLACK_MB = 6.0


def memory_mb(pid: int | None) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


class LongRun:
    def __init__(self, root: Path) -> None:
        self.run_dir = root / "long-run"
        extra = {"max_log_entries": MAX_LOG_ENTRIES, "segment_entries": SEGMENT_ENTRIES, "dedup_window": DEDUP_WINDOW}
        self.lab = archs.build("sequencer", archs.LayoutOptions(run_dir=self.run_dir, ports="free", extra=extra))
        self.samples: list[dict] = []
        self.started = time.monotonic()

    @property
    def cluster(self) -> Cluster:
        assert self.lab.cluster is not None
        return self.lab.cluster

    def ops(self, workload: Workload) -> int:
        return sum(1 for r in workload.history if r.client >= 0)

    def store_bytes(self, name: str) -> int:
        return sum(path.stat().st_size for path in self.run_dir.glob(f"{name}.db*"))

    async def sample(self, workload: Workload, label: str) -> dict:
        statuses = {}
        for name in ("sequencer", *self.lab.replicas):
            if self.cluster.is_running(name):
                statuses[name] = await self.status(name)
        sample = {
            "label": label,
            "ops": self.ops(workload),
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "log_entries": statuses["sequencer"]["LOG_ENTRIES"],
            "log_bytes": statuses["sequencer"]["LOG_BYTES_ON_DISK"],
            "ids_bytes": statuses["sequencer"]["IDS_BYTES_ON_DISK"],
            "log_start_seq": statuses["sequencer"]["LOG_START_SEQ"],
            "durable_seq": statuses["sequencer"]["DURABLE_SEQ"],
            "replicas": {name: {key: statuses[name][key] for key in ("LAST_APPLIED_SEQ", "SNAPSHOTS_INSTALLED")}
                         for name in self.lab.replicas if name in statuses},
            "memory_mb": {name: memory_mb(self.cluster.pid(name)) for name in statuses},
            "store_bytes": {name: self.store_bytes(name) for name in self.lab.replicas},
        }
        self.samples.append(sample)
        return sample

    async def status(self, name: str, timeout_s: float = STATUS_TIMEOUT_S) -> dict:
        """`name`'s STATUS, asked again while it answers with an error: on a shared machine a busy
        process may take seconds to answer, which is not what this test checks."""
        deadline = time.monotonic() + timeout_s
        while True:
            reply = await asyncio.to_thread(self.cluster.status, name, timeout_s=5.0)
            if reply.get("STATUS") == "OK":
                return reply
            assert time.monotonic() < deadline, f"{name} did not answer STATUS: {reply}"
            await asyncio.sleep(0.5)

    async def run_until(self, workload: Workload, done, label: str) -> dict:
        """Workload slices until `done(sample)`; the last sample."""
        while True:
            workload.config.seed += 1  # each slice its own random choices
            await workload.run(SLICE_S)
            sample = await self.sample(workload, label)
            if done(sample):
                return sample
            assert time.monotonic() - self.started < TIME_LIMIT_S, f"{label}: not reached in time: {sample}"

    async def drive(self) -> tuple[Workload, dict]:
        lab = self.lab
        config = WorkloadConfig(clients=8, window=16, accounts=8, read_your_writes=True, seed=11)
        workload = Workload(config, lambda index: lab.make_client(index, config.window), progress=False)
        seeder = lab.make_client(-1, 1)
        await workload.seed_accounts(seeder)
        await seeder.close()
        await self.run_until(workload, lambda s: s["durable_seq"] >= 30_000, "warm-up")

        # replica2 goes away; the log moves on past where it stopped.
        left_at = (await self.sample(workload, "before-kill"))["replicas"]["replica2"]["LAST_APPLIED_SEQ"]
        self.cluster.kill("replica2")
        await self.run_until(workload, lambda s: s["log_start_seq"] > left_at + 1, "replica2-down")

        # It returns behind the log start: state transfer from replica1, then it follows again.
        self.cluster.spawn("replica2")
        await asyncio.to_thread(self.cluster.wait_ready, "replica2")
        mid = await self.run_until(
            workload,
            lambda s: s["replicas"]["replica2"]["SNAPSHOTS_INSTALLED"] >= 1 and s["durable_seq"] >= MID_SEQ,
            "mid",
        )
        end = await self.run_until(workload, lambda s: s["durable_seq"] >= END_SEQ, "end")
        await self.wait_level()
        return workload, {"mid": mid, "end": end}

    async def wait_level(self, timeout_s: float = 30.0) -> None:
        """Until every replica applied everything the sequencer logged."""
        deadline = time.monotonic() + timeout_s
        while True:
            durable = (await self.status("sequencer"))["DURABLE_SEQ"]
            applied = [(await self.status(name))["LAST_APPLIED_SEQ"] for name in self.lab.replicas]
            if all(seq == durable for seq in applied):
                return
            assert time.monotonic() < deadline, f"replicas at {applied}, log at {durable}"
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    run = LongRun(tmp_path_factory.mktemp("long"))
    with Cluster(run.run_dir, run.lab.nodes, name="long-run", architecture="sequencer") as cluster:
        run.lab.cluster = cluster
        cluster.start()
        workload, marks = asyncio.run(run.drive())
        final = {name: asyncio.run(run.status(name)) for name in ("sequencer", *run.lab.replicas)}
        peak_rss_mb = {name: memory_mb(cluster.pid(name))["VmHWM"] for name in final}
        cluster.close()
    states = {}
    for name, url in run.lab.stores().items():
        store = open_store(url)
        try:
            states[name] = store.load()
        finally:
            store.close()
    result = checker.check(workload.history, states, total_order=True, read_your_writes=run.lab.read_your_writes)
    report = {"ops": run.ops(workload), "peak_rss_mb": peak_rss_mb, "samples": run.samples, **result.to_json()}
    (run.run_dir / "long-run.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\nlong run:", json.dumps({k: report[k] for k in ("ops", "peak_rss_mb", "verdict")}))
    return run, workload, marks, final, states, result, report


def test_at_least_200000_operations_and_the_verdict_is_valid(long_run):
    run, workload, _marks, final, states, result, report = long_run
    writes = [r for r in workload.history if r.client >= 0 and r.kind != "BALANCE"]
    assert len(writes) >= 200_000 and final["sequencer"]["DURABLE_SEQ"] >= 200_000
    assert sum(1 for r in writes if r.outcome == "ok") >= 190_000
    assert result.valid, (result.anomalies, dict(result.examples))
    # The stores keep only the rows that hold the dedup window of applied operations (at most one
    # row more), and the checker says so.
    assert all(len(image.recent) <= DEDUP_WINDOW + MAX_OPS_PER_BATCH_ROW for image in states.values())
    assert any("dedup window" in note for note in result.notes)
    # Both replicas ended in the same state.
    replica1, replica2 = states["replica1"], states["replica2"]
    assert replica1.balances == replica2.balances and replica1.counters == replica2.counters
    assert replica1.meta["last_applied_seq"] == replica2.meta["last_applied_seq"]


def test_the_restarted_replica_caught_up_by_state_transfer(long_run):
    run, _workload, marks, final, _states, _result, _report = long_run
    assert final["replica2"]["SNAPSHOTS_INSTALLED"] >= 1
    installed = [line for line in (run.run_dir / "replica2.log").read_text().splitlines() if "event=snapshot_installed" in line]
    assert installed, "replica2's log has no snapshot_installed"
    needed = [line for line in (run.run_dir / "replica2.log").read_text().splitlines() if "event=snapshot_needed" in line]
    assert needed
    # After the transfer it followed the live stream: level with replica1 at the end.
    assert final["replica2"]["LAST_APPLIED_SEQ"] == final["replica1"]["LAST_APPLIED_SEQ"] == final["sequencer"]["DURABLE_SEQ"]
    assert marks["end"]["log_start_seq"] > 1  # the log was truncated


def test_the_log_stays_within_its_bound_while_operations_grow(long_run):
    run, _workload, marks, _final, _states, _result, _report = long_run
    for sample in run.samples:
        assert sample["log_entries"] <= LOG_ENTRIES_BOUND, sample
        assert sample["log_bytes"] <= LOG_BYTES_BOUND, sample
        assert sample["ids_bytes"] <= IDS_BYTES_BOUND, sample
    assert marks["end"]["ids_bytes"] > 0  # what the log dropped, kept for the ids it names
    # Twice the operations, not twice the log, nor twice the replicas' stores. The log's size is a
    # sawtooth (segments fill, a truncation tick deletes them), so two samples of it are not
    # comparable; what the second half must show is that truncation kept pace: the log dropped
    # everything the second half added, but for at most the bound.
    mid, end = marks["mid"], marks["end"]
    assert end["durable_seq"] >= 2 * MID_SEQ
    added = end["durable_seq"] - mid["durable_seq"]
    dropped = end["log_start_seq"] - mid["log_start_seq"]
    assert dropped >= added - LOG_ENTRIES_BOUND, (mid, end)
    for name, size in end["store_bytes"].items():
        assert size <= 1.3 * mid["store_bytes"][name] + 4 * 1024 * 1024, (name, mid["store_bytes"], end["store_bytes"])


def test_process_memory_does_not_grow_with_the_number_of_operations(long_run):
    _run, _workload, marks, _final, _states, _result, report = long_run
    mid, end = marks["mid"]["memory_mb"], marks["end"]["memory_mb"]
    for name in mid:
        allowed = mid[name]["VmHWM"] * (1 + MEMORY_GROWTH_LIMIT) + MEMORY_GROWTH_SLACK_MB
        assert end[name]["VmHWM"] <= allowed, (name, mid[name], end[name], report["samples"])
    assert set(report["peak_rss_mb"]) == {"sequencer", "replica1", "replica2"}
    assert all(0 < value < 1024 for value in report["peak_rss_mb"].values())
