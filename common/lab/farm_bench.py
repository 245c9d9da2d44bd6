"""The worker farm's benchmark: what `make bench ARCH=farm` (`python lab.py farm-bench`) runs.

Owns one measurement and its clean-up. The farm (common/lab/arch_farm.py) runs the lab's bank
workload without faults with 1, 2 and 4 workers (8 clients, 16 tasks in flight each), each
combination `repeat` times; then common/lab/farm_lending.py measures how fast workers are lent
and returned. One table sums it up: tasks/s, p50/p99, tasks per worker batch, the workers' update
transactions (a second, their duration with the lock waits, how many workers are inside one on
average, read from the workers' STATUS), CPU per task of saldo's processes, and the lending times;
then a few lines say, from those figures, why more workers were or were not faster on this machine.

Every run uses one store, `<prefix>_farm`. With a MySQL prefix that database is dropped at the
end, also when a run fails or is interrupted: the bench empties it at every start, so nothing in it
outlives the bench.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from common.lab import farm_lending
from common.lab.archs import LayoutOptions, _store_url
from common.lab.report import format_table
from common.lab.runner import RunOptions, run_lab
from common.storage.store import drop_store

WORKER_COUNTS = (1, 2, 4)
CLIENTS = 8
WINDOW = 16


@dataclass
class Row:
    """The medians of one worker count's runs."""

    workers: int
    tasks_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    tasks_per_batch: float | None  # a batch: what one worker runs at once
    transactions_per_s: float | None  # update transactions (Store.apply_batch) committed a second
    transaction_ms: float | None  # the time one took, waiting for the store's locks included
    in_transaction: float | None  # workers inside a transaction, on average over the run
    cpu_us_per_task: float | None  # servers, workers and the lab's clients together
    verdicts: list[str]


def farm_store(store: str) -> str | None:
    """The database every run of the bench uses (None for SQLite: a file in each run's directory)."""
    if store == "sqlite":
        return None
    return _store_url(LayoutOptions(run_dir=Path("."), store=store), "farm")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _row(workers: int, reports: list[dict]) -> Row:
    counted = [(r["counters"], r["duration_s"]) for r in reports if r.get("counters", {}).get("worker_transactions")]
    return Row(
        workers=workers,
        tasks_per_s=_median([r["throughput_ops_s"] for r in reports]),
        p50_ms=_median([r["latency_ms"]["p50"] for r in reports]),
        p99_ms=_median([r["latency_ms"]["p99"] for r in reports]),
        tasks_per_batch=_median([c["worker_tasks"] / c["worker_batches"] for c, _s in counted]),
        transactions_per_s=_median([c["worker_transactions"] / s for c, s in counted]),
        transaction_ms=_median([c["worker_transaction_ms"] / c["worker_transactions"] for c, _s in counted]),
        in_transaction=_median([c["worker_transaction_ms"] / 1000 / s for c, s in counted]),
        cpu_us_per_task=_median([sum(r["cpu_us_per_op"].values()) for r in reports if r.get("cpu_us_per_op")]),
        verdicts=[r["verdict"] for r in reports],
    )


def _measure(workers: int, *, store: str, duration_s: float, repeat: int, ports: str, stamp: str) -> Row:
    reports = []
    for index in range(repeat):
        options = RunOptions(architecture="farm", clients=CLIENTS, window=WINDOW, duration_s=duration_s, ports=ports,
                             store=store, seed=1 + index, progress=False, extra={"workers": str(workers)},
                             run_name=f"farm-{workers}w-{stamp}-{index}")
        print(f"\n== farm, {workers} worker{'' if workers == 1 else 's'}, {CLIENTS} clients x window {WINDOW}, "
              f"{duration_s:g} s (run {index + 1}/{repeat})", flush=True)
        result = run_lab(options)
        print(format_table(result.report) + f"\n  report   {result.report_path}", flush=True)
        reports.append(result.report)
    return _row(workers, reports)


def format_summary(rows: list[Row], lending: dict, *, repeat: int, duration_s: float, cpus: int | None) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"\n== farm summary (medians of {repeat}; {CLIENTS} clients x window {WINDOW}, {duration_s:g} s each; "
             f"{cpus} CPU cores)",
             f"  {'workers':>7}{'tasks/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'tasks/batch':>12}{'txn/s':>7}{'ms/txn':>8}"
             f"{'in txn':>8}{'CPU us/task':>12}  verdicts"]
    for row in rows:
        lines.append(f"  {row.workers:>7}{fmt(row.tasks_per_s, ',.0f'):>9}{fmt(row.p50_ms, '.1f'):>8}{fmt(row.p99_ms, '.1f'):>8}"
                     f"{fmt(row.tasks_per_batch, '.1f'):>12}{fmt(row.transactions_per_s, ',.0f'):>7}"
                     f"{fmt(row.transaction_ms, '.1f'):>8}{fmt(row.in_transaction, '.2f'):>8}{fmt(row.cpu_us_per_task, '.0f'):>12}"
                     f"  {','.join(row.verdicts)}")
    lines += [f"  lending (4 workers, farm1 overloaded): overload -> a borrowed worker serving "
              f"{fmt(lending['overload_to_serving_s_median'], '.2f')} s; underload -> every worker home "
              f"{fmt(lending['underload_to_returned_s_median'], '.2f')} s (load end -> home "
              f"{fmt(lending['load_end_to_returned_s_median'], '.2f')} s)",
              "  (txn: a worker's update transaction; ms/txn includes waiting for the store's lock; in txn: workers",
              "  inside one, on average; CPU: saldo's processes per acknowledged task, MariaDB's not counted)"]
    return "\n".join(lines)


def explain(rows: list[Row], cpus: int | None) -> str:
    """Why more workers were or were not faster, in the terms of the figures above."""
    one = next((row for row in rows if row.workers == 1), None)
    most = max(rows, key=lambda row: row.workers)
    if one is None or most is one or one.tasks_per_s is None or most.tasks_per_s is None:
        return ""
    if most.tasks_per_s >= one.tasks_per_s:
        return f"\n  {most.workers} workers were faster than 1 here ({most.tasks_per_s:,.0f} against {one.tasks_per_s:,.0f} tasks/s)."
    lines = [f"\n  Why {most.workers} workers did fewer tasks/s than 1 here ({most.tasks_per_s:,.0f} against {one.tasks_per_s:,.0f}):",
             "  - Update transactions run one at a time: each first locks the store's counter rows (Store.apply_batch)."]
    if one.transactions_per_s and most.transactions_per_s:
        gain = most.transactions_per_s / one.transactions_per_s
        lines.append(f"    The store committed {one.transactions_per_s:,.0f} a second with 1 worker and "
                     f"{most.transactions_per_s:,.0f} with {most.workers}: "
                     + ("more workers added none." if gain <= 1.05 else f"{gain:.1f} times as many with {most.workers} times the workers."))
    if one.tasks_per_batch and most.tasks_per_batch and most.tasks_per_batch < one.tasks_per_batch:
        lines += ["  - Each served fewer tasks: a server splits its queue among its waiting workers "
                  f"({one.tasks_per_batch:.0f} tasks per batch",
                  f"    with 1 worker, {most.tasks_per_batch:.0f} with {most.workers})."]
    if None not in (one.transaction_ms, one.tasks_per_batch, most.tasks_per_batch, most.in_transaction) \
            and most.in_transaction >= 1 and most.transactions_per_s:
        held_ms = 1000 / most.transactions_per_s  # one transaction always in progress: each held the lock this long
        if held_ms / most.tasks_per_batch > one.transaction_ms / one.tasks_per_batch:
            lines += [f"  - A smaller transaction was not as much shorter: with {most.workers} workers one was always in progress "
                      f"({most.in_transaction:.1f} inside one,",
                      f"    on average), so each held the lock about {held_ms:.1f} ms for {most.tasks_per_batch:.0f} tasks, "
                      f"against {one.transaction_ms:.1f} ms for {one.tasks_per_batch:.0f} with 1 worker.",
                      "    The lock is held across several statements, each a round trip between a worker and MariaDB; "
                      f"with {cpus} cores",
                      "    shared by the clients, both servers, every worker and MariaDB, the holder waits for a core between "
                      "them, the longer",
                      "    the more processes want one."]
    lines += ["  More workers pay off when a task takes long outside the store (the seed's workers spend a second on each)",
              "  or when the database has cores of its own (docs/farm-protocol.md, \"Workers and cores\")."]
    return "\n".join(lines)


def run(store: str, *, duration_s: float, repeat: int, ports: str, lending_load_s: float = 5.0) -> int:
    """The whole bench; 0 when every verdict is valid. The farm's database is dropped at the end."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    database = farm_store(store)
    cpus = os.cpu_count()
    try:
        rows = [_measure(workers, store=store, duration_s=duration_s, repeat=repeat, ports=ports, stamp=stamp)
                for workers in WORKER_COUNTS]
        print(f"\n== farm lending ({repeat} run{'' if repeat == 1 else 's'})", flush=True)
        lending = farm_lending.run(store, repeat=repeat, load_s=lending_load_s, clients=CLIENTS, window=256)
    finally:
        if database is not None:
            dropped = drop_store(database)
            print(f"\n  the bench's database {database.rsplit('/', 1)[-1]} "
                  f"{'was dropped' if dropped else 'was not there'}", flush=True)
    print(format_summary(rows, lending, repeat=repeat, duration_s=duration_s, cpus=cpus))
    print(explain(rows, cpus))
    valid = all(verdict == "valid" for row in rows for verdict in row.verdicts) and \
        all(verdict == "valid" for verdict in lending["verdicts"])
    return 0 if valid else 1
