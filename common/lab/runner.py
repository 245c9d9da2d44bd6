"""One lab run from start to verdict.

Owns the order of a run: start the cluster, seed the accounts, run the workload while the fault
injector plays its schedule, heal and wait until the cluster is quiet, read every replica's final
state, check, measure the echo reference when asked, and write the report.

    result = run_lab(RunOptions(architecture="standalone", clients=8, duration_s=10))
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from common.lab import archs, checker, deployed, report
from common.lab.cluster import REPO_ROOT, Cluster, Node, free_port, run_dir_in_use
from common.lab.faults import SCHEDULES, Fault, FaultInjector
from common.lab.workload import DEFAULT_MIX, OpRecord, Workload, WorkloadConfig, describe_mix
from common.log import get_logger
from common.storage.store import StoreImage, open_store
from common.transport import aio

log = get_logger("runner")

QUIET_TIMEOUT_S = 60.0
QUIET_STABLE_S = 0.5
# What the lab leaves on disk is bounded: a run's SQLite stores are tens of MB, and an invalid run's
# history (results/<run>.history.jsonl) about 15 MB. The stores of a valid run are deleted unless
# asked to keep them (RunOptions.keep_stores); the oldest run directories and histories beyond these
# counts are removed after each run.
MAX_RUN_DIRS = 20
MAX_HISTORY_FILES = 10
SQLITE_STORE_SUFFIXES = (".db", ".db-wal", ".db-shm")


@dataclass
class RunOptions:
    architecture: str = "standalone"
    clients: int = 8
    window: int = 16
    duration_s: float = 10.0
    accounts: int = 8
    mix: tuple[float, float, float, float] = DEFAULT_MIX  # shares of transfers, deposits, withdrawals, reads
    faults: str = "none"
    schedule: list[Fault] | None = None  # overrides `faults` (tests build their own)
    ports: str = "free"
    store: str = "sqlite"
    reference: bool = False  # measure the echo reference in the same run
    reference_duration_s: float = 5.0
    results_dir: Path = REPO_ROOT / "results"
    run_root: Path = REPO_ROOT / "var" / "lab"
    run_name: str | None = None
    seed: int = 1
    progress: bool = True
    proxies: bool | None = None  # default: when the schedule needs them
    extra: dict = field(default_factory=dict)  # architecture options (e.g. replication mode)
    keep_history: bool = False  # write results/<run>.history.jsonl even when the verdict is valid
    keep_stores: bool = False  # keep the replicas' SQLite stores of a valid run (an invalid run's are kept)
    # A deployed cluster's topology file: the run attaches to its processes and starts none
    # (common/lab/deployed.py); `ports`, `store` and `extra` then mean nothing.
    topology: Path | None = None
    attempt_timeout_s: float = 2.0
    op_deadline_s: float = 20.0
    hosts: archs.Hosts | None = None  # default: what this machine can bind (archs.detect_hosts)


@dataclass
class RunResult:
    report: dict
    history: list[OpRecord]
    states: dict[str, StoreImage]
    check: checker.CheckResult
    report_path: Path | None
    lab: archs.LabCluster


def _schedule(options: RunOptions) -> list[Fault]:
    if options.schedule is not None:
        return options.schedule
    if options.faults not in SCHEDULES:
        raise ValueError(f"unknown fault schedule {options.faults!r}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[options.faults]


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (from /proc)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S


def _cpu_snapshot(cluster: Cluster) -> dict[str, float | None]:
    snapshot = {name: _cpu_s(cluster.pid(name)) for name in cluster.nodes}
    snapshot["lab"] = time.process_time()
    return snapshot


def _peak_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _applied_counts(lab: archs.LabCluster) -> dict[str, int | None]:
    counts: dict[str, int | None] = {}
    for name in lab.replicas:
        try:
            status = await asyncio.to_thread(lab.cluster.status, name, timeout_s=2.0)
            counts[name] = status.get("OPS_APPLIED_TOTAL") if status.get("STATUS") == "OK" else None
        except OSError:
            counts[name] = None
    return counts


async def _loop_counters(lab: archs.LabCluster) -> dict[str, dict | None]:
    """Every node's loop monitor (STATUS "LOOP", common/transport/aio.py) with the pid that answered; None
    for a node that did not answer (paused, or down). Nodes without a monitor are left out. (The
    lab's own monitor is read by the caller.) The pid is the one STATUS names: a deployed node's
    may be on another machine."""
    counters: dict[str, dict | None] = {}
    for name in lab.cluster.nodes:
        if not lab.cluster.is_running(name):
            counters[name] = None
            continue
        try:
            status = await asyncio.to_thread(lab.cluster.status, name, timeout_s=1.0)
        except OSError:
            counters[name] = None
            continue
        loop = status.get("LOOP")
        if status.get("STATUS") != "OK":
            counters[name] = None
        elif isinstance(loop, dict) and type(loop.get("STALLS_TOTAL")) is int:
            counters[name] = {**loop, "PID": status.get("PID")}
    return counters


def _loop_stalls(start: dict[str, dict | None], end: dict[str, dict | None]) -> dict[str, dict | None]:
    """The stalls of each node's event loop within the run (a node restarted meanwhile, by its
    pid, counts from its restart), with the largest lag since the node started; None for a node
    whose counters could not be read at the end."""

    def ms(counters: dict, key: str) -> float:  # a number with a fraction decodes as a Decimal
        value = counters.get(key)
        return float(value) if isinstance(value, (int, float, Decimal)) else 0.0

    stalls: dict[str, dict | None] = {}
    for name, last in sorted(end.items()):
        if last is None:
            stalls[name] = None
            continue
        first = start.get(name)
        restarted = first is None or first["PID"] != last["PID"]
        if restarted:
            first = {"STALLS_TOTAL": 0}
        stalls[name] = {"stalls": last["STALLS_TOTAL"] - first["STALLS_TOTAL"],
                        "stalled_ms": round(max(0.0, ms(last, "STALLED_MS_TOTAL") - ms(first, "STALLED_MS_TOTAL")), 1),
                        "largest_lag_ms_since_start": ms(last, "LAG_MAX_MS"),
                        "restarted": restarted and name in start}
    return stalls


async def _wait_quiet(lab: archs.LabCluster, timeout_s: float = QUIET_TIMEOUT_S) -> dict[str, int | None]:
    """Until every replica answers with the same applied count, unchanged for a moment."""
    deadline = time.monotonic() + timeout_s
    previous: dict[str, int | None] = {}
    stable_since = time.monotonic()
    while True:
        counts = await _applied_counts(lab)
        if counts != previous:
            previous = counts
            stable_since = time.monotonic()
        values = set(counts.values())
        if None not in values and (len(values) == 1 or not lab.total_order) and time.monotonic() - stable_since >= QUIET_STABLE_S:
            return counts
        if time.monotonic() > deadline:
            log.warning("quiet_timeout", counts=counts)
            return counts
        await asyncio.sleep(0.1)


async def _drive(options: RunOptions, lab: archs.LabCluster, schedule: list[Fault],
                 account_prefix: str = "acct-") -> tuple[Workload, list[dict], dict, dict, float]:
    config = WorkloadConfig(
        clients=options.clients,
        window=options.window,
        accounts=options.accounts,
        mix=options.mix,
        duration_s=options.duration_s,
        read_your_writes=lab.read_your_writes,
        seed=options.seed,
        attempt_timeout_s=options.attempt_timeout_s,
        op_deadline_s=options.op_deadline_s,
        account_prefix=account_prefix,
    )
    workload = Workload(config, lambda index: lab.make_client(index, options.window), progress=options.progress)
    # The lab's own loop too: its stalls are in the latency its clients measure.
    monitor_stop = asyncio.Event()
    monitor = asyncio.create_task(aio.LoopMonitor.run(monitor_stop))
    seeder = lab.make_client(-1, 1)
    await workload.seed_accounts(seeder)
    await seeder.close()
    await _wait_quiet(lab, timeout_s=10.0)
    applied_start = await _applied_counts(lab)
    loop_start = await _loop_counters(lab)
    loop_start["lab"] = {**aio.LoopMonitor.snapshot(), "PID": os.getpid()}
    cpu_start = _cpu_snapshot(lab.cluster)
    counters_start = await asyncio.to_thread(lab.counters, lab) if lab.counters else {}
    injector = FaultInjector(lab, schedule, options.duration_s, workload.now_s)
    run_started = workload.now_s()
    workload.progress_note = injector.describe_open
    fault_task = asyncio.create_task(injector.run(run_started))
    await workload.run()
    run_ended = workload.now_s()
    cpu_end = _cpu_snapshot(lab.cluster)
    counters_end = await asyncio.to_thread(lab.counters, lab) if lab.counters else {}
    loop_end = await _loop_counters(lab)
    loop_end["lab"] = {**workload.loop_monitor_at_end, "PID": os.getpid()}
    monitor_stop.set()
    await monitor
    applied_end = await _applied_counts(lab)
    if not fault_task.done():
        fault_task.cancel()
        await asyncio.gather(fault_task, return_exceptions=True)
    elif fault_task.exception() is not None:
        raise fault_task.exception()
    await injector.heal_all()
    for name in lab.replicas + [n.name for n in lab.nodes]:
        if not lab.cluster.is_running(name):
            lab.cluster.spawn(name)
            await asyncio.to_thread(lab.cluster.wait_ready, name)
    quiet_counts = await _wait_quiet(lab)
    window_s = max(1e-9, run_ended - run_started)
    deltas = [
        (applied_end[n] or 0) - (applied_start[n] or 0) for n in lab.replicas
    ]
    cpu_s = {name: round(cpu_end[name] - cpu_start[name], 3) for name in cpu_end
             if cpu_end[name] is not None and cpu_start.get(name) is not None}
    applied = {"start": applied_start, "end": applied_end, "quiet": quiet_counts,
               "applied_ops_s": max(0.0, min(deltas) / window_s) if deltas else 0.0, "cpu_s": cpu_s,
               "loop_stalls": _loop_stalls(loop_start, loop_end),
               "counters": {name: value - counters_start[name] for name, value in counters_end.items() if name in counters_start}}
    return workload, injector.records, applied, {"run_started_s": run_started, "run_ended_s": run_ended}, window_s


async def _echo_reference(options: RunOptions, run_dir: Path, hosts: archs.Hosts) -> dict:
    """The same clients and pipelining against a bare newline-JSON echo server."""
    host = hosts.real(archs.ORCHESTRATOR_HOST)
    port = free_port(host)
    node = Node("echo", "-m common.lab.echo", host, port, role="echo")
    from common.transport.client import DirectClient

    cluster = Cluster(run_dir / "echo", [node], name="echo")
    try:
        cluster.start()
        config = WorkloadConfig(clients=options.clients, window=options.window, accounts=options.accounts,
                                mix=options.mix, duration_s=options.reference_duration_s, seed=options.seed)
        workload = Workload(
            config, lambda _i: DirectClient((host, port), max_in_flight=options.window), progress=False
        )
        history = await workload.run()
        acknowledged = sum(1 for r in history if r.outcome != "unknown")
        window_s = max(1e-9, workload.run_ended_s - workload.run_started_s)
        return {"echo_ops_s": round(acknowledged / window_s, 1), "echo_latency_ms": report.latency_summary(history),
                "duration_s": round(window_s, 3)}
    finally:
        cluster.close()


def run_lab(options: RunOptions) -> RunResult:
    schedule = _schedule(options)
    run_name = options.run_name or f"{options.architecture}-{options.clients}c-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = options.run_root / run_name
    needs_proxies = any(f.kind in ("partition", "delay", "drop") for f in schedule)
    if options.topology is not None:
        lab, cluster = deployed.attach(options.topology, options.architecture, request_timeout_s=options.attempt_timeout_s)
        proxies = False
        account_prefix = f"{run_name}-"  # the cluster keeps every earlier run's accounts
    else:
        layout = archs.LayoutOptions(
            run_dir=run_dir,
            ports=options.ports,
            proxies=needs_proxies if options.proxies is None else options.proxies,
            store=options.store,
            request_timeout_s=options.attempt_timeout_s,
            extra=options.extra,
            hosts=options.hosts,
        )
        lab = archs.build(options.architecture, layout)
        proxies = layout.proxies
        account_prefix = "acct-"
    # Refused before anything starts: a fault on a role the cluster lacks would hit some other node.
    missing = sorted({fault.role for fault in schedule} - lab.fault_roles())
    if missing:
        raise ValueError(f"{lab.architecture} has no node in role {', '.join(missing)} for the fault schedule")
    if needs_proxies and (options.topology is not None or proxies) and not any(lab.proxies_of.values()):
        raise ValueError(f"{lab.architecture} has no fault proxy for the schedule's partition, delay or drop")
    started_at = time.time()
    if options.topology is None:
        cluster = Cluster(run_dir, lab.nodes, name=run_name, architecture=lab.architecture)
    with cluster:
        lab.cluster = cluster
        cluster.start()
        before = deployed.read_images(lab) if options.topology is not None else None
        workload, faults, applied, window, window_s = asyncio.run(_drive(options, lab, schedule, account_prefix))
        peak_rss = {node.name: _peak_rss_mb(cluster.pid(node.name)) for node in lab.nodes}
        if before is not None:  # the deployed cluster keeps running: what this run changed in each store
            after = deployed.final_images(lab)
            accounts = WorkloadConfig(accounts=options.accounts, account_prefix=account_prefix).account_names()
            states = {name: deployed.run_image(before[name], after[name], accounts) for name in after}
        # Local: a clean stop, so every replica's last group commit reaches its store. Deployed:
        # whatever the run left down or paused is started or resumed; nothing is stopped.
        cluster.close()
    if before is None:
        states = {name: _load_state(url) for name, url in lab.stores().items()}
    history = workload.history
    result = checker.check(history, states, total_order=lab.total_order, read_your_writes=lab.read_your_writes,
                           failover_may_lose=lab.failover_may_lose)
    reference = asyncio.run(_echo_reference(options, run_dir, layout.hosts)) if options.reference else {}
    run_history = [r for r in history if r.client >= 0]
    _add_recovery_times(faults, run_history)
    ops = {
        "ok": sum(1 for r in run_history if r.outcome == "ok"),
        "failed": sum(1 for r in run_history if r.outcome == "failed"),
        "unknown": sum(1 for r in run_history if r.outcome == "unknown"),
    }
    acknowledged = ops["ok"] + ops["failed"]
    throughput = acknowledged / window_s
    if reference:
        reference["ratio"] = round(throughput / reference["echo_ops_s"], 3) if reference["echo_ops_s"] else None
    body = {
        "run": run_name,
        "architecture": lab.architecture,
        "variant": lab.variant,
        "clients": options.clients,
        "window": options.window,
        "accounts": options.accounts,
        "mix": describe_mix(options.mix),
        "duration_s": round(window_s, 3),
        "ops": ops,
        "ops_by_kind": {kind: sum(1 for r in run_history if r.kind == kind) for kind in ("TRANSFER", "DEPOSIT", "WITHDRAW", "BALANCE")},
        "throughput_ops_s": round(throughput, 1),
        "applied_ops_s": round(applied["applied_ops_s"], 1),
        "applied_counts": applied,
        "latency_ms": report.latency_summary(run_history),
        "faults": faults,
        **result.to_json(),
        # Only anomalies the architecture does not promise to avoid (see LabCluster.not_promised).
        "anomalies_expected": not result.valid and all(
            kind in lab.not_promised for kind, count in result.anomalies.items() if count
        ),
        "not_promised": sorted(lab.not_promised),
        "reference": reference,
        "peak_rss_mb": peak_rss,
        "cpu_us_per_op": {name: round(cpu / max(1, acknowledged) * 1e6, 1) for name, cpu in applied["cpu_s"].items()},
        "loop_stalls": applied["loop_stalls"],
        **({"counters": applied["counters"]} if applied["counters"] else {}),
        "store": options.store.split("@")[-1] if options.store != "sqlite" else "sqlite",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "run_window_s": [round(window["run_started_s"], 3), round(window["run_ended_s"], 3)],
        "run_dir": str(run_dir),
    }
    body["outages"] = report.outages(run_history, body["run_window_s"])
    points = report.timeline(run_history, body["run_window_s"])
    options.results_dir.mkdir(parents=True, exist_ok=True)
    svg_path = options.results_dir / f"{run_name}.svg"
    svg_path.write_text(report.timeline_svg(body, points))
    body["timeline_svg"] = str(svg_path)
    if options.keep_history or not result.valid:
        history_path = options.results_dir / f"{run_name}.history.jsonl"
        import json

        with history_path.open("w") as out:
            for record in history:
                out.write(json.dumps(record.to_json()) + "\n")
        body["history"] = str(history_path)
    body["stores_deleted"] = options.topology is None and options.store == "sqlite" and result.valid and not options.keep_stores
    if body["stores_deleted"]:
        for path in run_dir.iterdir():
            if path.name.endswith(SQLITE_STORE_SUFFIXES):
                path.unlink()
    run_dirs = [path for path in options.run_root.iterdir() if path.is_dir()] if options.run_root.is_dir() else []
    body["older_runs_removed"] = (
        _remove_oldest(run_dirs, MAX_RUN_DIRS, shutil.rmtree, spare=run_dir_in_use)
        + _remove_oldest(list(options.results_dir.glob("*.history.jsonl")), MAX_HISTORY_FILES, Path.unlink))
    path = report.write_report(body, options.results_dir)
    return RunResult(body, history, states, result, path, lab)


def _remove_oldest(paths: list[Path], keep: int, remove, spare=lambda _path: False) -> int:
    """Remove all but the `keep` newest of `paths` (by modification time), except those `spare`
    says to leave (a run directory a cluster runs from); how many went."""
    excess = len(paths) - keep
    doomed: list[Path] = []
    for path in sorted(paths, key=lambda path: path.stat().st_mtime):
        if len(doomed) >= excess:
            break
        if not spare(path):
            doomed.append(path)
    for path in doomed:
        remove(path)
    return len(doomed)


def _add_recovery_times(faults: list[dict], history: list[OpRecord]) -> None:
    """For each fault, how long after it started the first write was acknowledged (for a kill of
    the primary: the failover time as the clients saw it), and the longest stretch without any
    acknowledged write while it lasted. The first one counts only writes whose acknowledgement
    cannot predate the fault: invoked after it began, or retried. (A reply the killed primary sent
    just before the kill may be read by the client just after it: that is not a failover.)"""
    writes = [r for r in history if r.outcome == "ok" and r.kind != "BALANCE"]
    write_completions = sorted(r.complete_s for r in writes)
    for fault in faults:
        start = fault["at_s"]
        later = sorted(r.complete_s for r in writes if r.complete_s > start and (r.invoke_s >= start or r.attempts > 1))
        fault["first_ok_write_after_s"] = round(later[0] - start, 3) if later else None
        end = fault.get("until_s", start)
        window = [start] + [t for t in write_completions if start < t <= max(end, start)] + ([later[0]] if later else [])
        gaps = [b - a for a, b in zip(window, window[1:])]
        fault["longest_write_gap_s"] = round(max(gaps), 3) if gaps else None


def _load_state(url: str) -> StoreImage:
    store = open_store(url)
    try:
        return store.load()
    finally:
        store.close()
