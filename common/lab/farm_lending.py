"""How fast the farm moves workers: from overload to borrowed workers serving, from underload to
their return. What `python lab.py farm-lending` (and so `make bench-farm`) runs.

Owns one measurement. A farm of two servers and four workers (common/lab/arch_farm.py, servers at
their default thresholds) gets a sustained load on farm1 only: clients keep far more tasks in flight
than farm1's two workers can finish, so its queue stays above the lending threshold. A thread polls
both servers' STATUS every POLL_S and keeps the samples. From them:

- overload -> serving: from the moment farm1's queue went above its threshold (the first sample's
  time minus the OVERLOADED_FOR_S it reports) to the first sample in which a borrowed worker has
  completed a task (TASKS_BY_BORROWED_TOTAL > 0);
- underload -> returned: from the first sample after the load ended in which farm1's queue is below
  its return threshold, to the first sample in which farm1 holds no borrowed worker and farm2 has
  all its workers at home again.

The history of the load is checked like any lab run (common/lab/checker.py): moving workers around
must not lose or double an operation.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.lab import checker
from common.lab.arch_farm import build
from common.lab.archs import LayoutOptions
from common.lab.cluster import REPO_ROOT, Cluster
from common.lab.workload import Workload, WorkloadConfig
from common.storage.store import open_store

POLL_S = 0.02
SETTLE_TIMEOUT_S = 15.0
RETURN_TIMEOUT_S = 30.0


@dataclass
class Sample:
    at: float
    farm1: dict
    farm2: dict


@dataclass
class LendingRun:
    overload_to_serving_s: float | None
    underload_to_returned_s: float | None
    load_end_to_returned_s: float | None
    borrowed_max: int
    tasks_by_borrowed: int
    tasks_completed: int
    verdict: str
    notes: list[str] = field(default_factory=list)


class Poller:
    """STATUS of both servers every POLL_S, in a thread, with monotonic timestamps."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _status(self, name: str) -> dict:
        try:
            return self.cluster.status(name, timeout_s=1.0)
        except OSError:
            return {}

    def _run(self) -> None:
        while not self._stop.is_set():
            farm1 = self._status("farm1")
            farm2 = self._status("farm2")
            self.samples.append(Sample(time.monotonic(), farm1, farm2))
            self._stop.wait(POLL_S)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _workers(status: dict) -> dict:
    return status.get("WORKERS") or {}


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout_s} s: {what}")


def measure_once(run_dir: Path, store: str, *, load_s: float, clients: int, window: int, seed: int) -> LendingRun:
    lab = build(LayoutOptions(run_dir=run_dir, ports="free", store=store, request_timeout_s=5.0,
                              extra={"workers": "4", "entry": "first"}))
    notes: list[str] = []
    with Cluster(run_dir, lab.nodes, name="farm-lending") as cluster:
        lab.cluster = cluster
        cluster.start()
        _wait(lambda: _workers(cluster.status("farm1")).get("HOME") == 2 and _workers(cluster.status("farm2")).get("HOME") == 2
              and not _workers(cluster.status("farm1")).get("BORROWED") and not _workers(cluster.status("farm2")).get("BORROWED"),
              SETTLE_TIMEOUT_S, "every worker at home")
        first_status = cluster.status("farm1")
        poller = Poller(cluster)
        config = WorkloadConfig(clients=clients, window=window, accounts=16, duration_s=load_s, attempt_timeout_s=5.0,
                                op_deadline_s=30.0, seed=seed)

        async def drive() -> tuple[list, float]:
            workload = Workload(config, lambda index: lab.make_client(index, window), progress=False)
            seeder = lab.make_client(-1, 1)
            await workload.seed_accounts(seeder)
            await seeder.close()
            poller.start()
            history = await workload.run()
            return history, time.monotonic()

        history, load_ended_at = asyncio.run(drive())
        try:
            _wait(lambda: poller.samples and poller.samples[-1].at > load_ended_at
                  and not _workers(poller.samples[-1].farm1).get("BORROWED")
                  and _workers(poller.samples[-1].farm2).get("HOME") == 2, RETURN_TIMEOUT_S, "the borrowed workers return")
        except TimeoutError as error:
            notes.append(str(error))
        poller.stop()
        cluster.close()
    image_store = open_store(lab.stores()["farm1"])
    try:
        image = image_store.load()
    finally:
        image_store.close()
    verdict = checker.check(history, {"farm": image}, total_order=True).verdict
    return _analyse(poller.samples, load_ended_at, first_status["RETURN_QUEUE_THRESHOLD"], verdict, notes)


def _analyse(samples: list[Sample], load_ended_at: float, return_threshold: int, verdict: str, notes: list[str]) -> LendingRun:
    overload_started = serving = underload = returned = None
    for sample in samples:
        farm1 = sample.farm1
        if overload_started is None and farm1.get("OVERLOADED_FOR_S"):
            overload_started = sample.at - float(farm1["OVERLOADED_FOR_S"])
        if serving is None and (farm1.get("TASKS_BY_BORROWED_TOTAL") or 0) > 0:
            serving = sample.at
        if sample.at > load_ended_at and farm1:
            if underload is None and farm1.get("QUEUE_LENGTH", 0) < return_threshold:
                underload = sample.at
            if underload is not None and returned is None and not _workers(farm1).get("BORROWED") \
                    and _workers(sample.farm2).get("HOME") == 2:
                returned = sample.at
    if overload_started is None:
        notes.append("farm1 was never overloaded: raise --clients or --window")
    last1 = next((s.farm1 for s in reversed(samples) if s.farm1), {})
    return LendingRun(
        overload_to_serving_s=None if overload_started is None or serving is None else round(serving - overload_started, 3),
        underload_to_returned_s=None if underload is None or returned is None else round(returned - underload, 3),
        load_end_to_returned_s=None if returned is None else round(returned - load_ended_at, 3),
        borrowed_max=max((_workers(s.farm1).get("BORROWED", 0) for s in samples), default=0),
        tasks_by_borrowed=last1.get("TASKS_BY_BORROWED_TOTAL", 0),
        tasks_completed=last1.get("TASKS_COMPLETED_TOTAL", 0),
        verdict=verdict,
        notes=notes,
    )


def run(store: str, *, repeat: int, load_s: float, clients: int, window: int, results_dir: Path | None = None) -> dict:
    results_dir = results_dir or REPO_ROOT / "results"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for index in range(repeat):
        run_dir = REPO_ROOT / "var" / "lab" / f"farm-lending-{stamp}-{index}"
        result = measure_once(run_dir, store, load_s=load_s, clients=clients, window=window, seed=1 + index)
        runs.append(result)
        print(f"  run {index + 1}/{repeat}: overload->serving {result.overload_to_serving_s} s, "
              f"underload->returned {result.underload_to_returned_s} s (load end->returned {result.load_end_to_returned_s} s), "
              f"borrowed at most {result.borrowed_max}, {result.tasks_by_borrowed} of {result.tasks_completed} tasks "
              f"by borrowed workers, verdict {result.verdict}" + (f", notes: {'; '.join(result.notes)}" if result.notes else ""),
              flush=True)

    def median(name: str) -> float | None:
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {
        "measurement": "farm-lending",
        "store": store.split("@")[-1] if store != "sqlite" else "sqlite",
        "load_s": load_s,
        "clients": clients,
        "window": window,
        "runs": [r.__dict__ for r in runs],
        "overload_to_serving_s_median": median("overload_to_serving_s"),
        "underload_to_returned_s_median": median("underload_to_returned_s"),
        "load_end_to_returned_s_median": median("load_end_to_returned_s"),
        "verdicts": [r.verdict for r in runs],
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"farm-lending-{stamp}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n== farm lending (medians of {repeat}): overload -> borrowed serving {summary['overload_to_serving_s_median']} s, "
          f"underload -> returned {summary['underload_to_returned_s_median']} s "
          f"(load end -> returned {summary['load_end_to_returned_s_median']} s)\n  report {path}")
    return summary
