"""A Bank in memory with its durable image in a Store, written by group commit.

Owns the rule that makes a replica fast and safe at once: operations are applied to the in-memory
Bank as they arrive (deterministic, microseconds), and everything applied while one transaction is
being written joins the next one. At most one transaction is in flight. A commit that waits on
the network (MySQL) or on the disk (SQLite at synchronous=FULL) runs on a dedicated thread, so the
event loop keeps reading and applying meanwhile; the applied operations are encoded for the store
on the loop first, so the thread holds the GIL as little as possible (measured: standalone at
8 x 64, 38,926 to 43,566 ops/s against 31,366 to 37,420, faster in four paired runs of four). A
relaxed SQLite commit (no flush) runs on the loop's own thread: it is all CPU under the GIL, and
handing it to a thread and back costs more than the overlap gains (measured: +6% throughput with
the sequencer architecture on two cores). So does a flushing SQLite commit of a few operations:
the loop has next to nothing to overlap with it, and the hand-off only adds latency (measured:
multicast with one client, p50 0.66 to 0.89 ms against 0.91 to 1.12 in four paired runs).

A replica whose store is the only durable copy (standalone, multicast, primary-backup) replies to
a client only after `durable()` resolves: no answer ever reports a state that a crash could take
back, and reads wait the same way, so no read sees an operation that is not yet on disk. If a
commit fails, the in-memory state is ahead of the disk and nothing can be trusted: the process
stops at once (fail-stop) and recovers from the store when restarted.

A replica fed from a durable log (the sequencer's, the queue server's) may relax that, because the
log can give back whatever a crash takes (common/sequencer/replica.py acknowledges before
the commit). With `sync_interval_s` > 0 and a store that allows it, `durable()` means committed
(it survives a process crash), and at most once every `sync_interval_s` the store's write-ahead
log is flushed to stable storage on the commit thread (`os.fsync` lets go of the GIL), while the
loop goes on applying and committing: a flush in the middle of a commit would hold the loop for
milliseconds, and every acknowledgement with it. `synced_meta` is the metadata of the last commit
that had landed when a flush began (its last_applied_seq is what the replica lets the log
forget); `on_synced` is called when it moves. One fsync per interval instead of one per commit.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common.bank.state import Bank, Operation, Outcome
from common.log import get_logger
from common.storage.store import Store, StoreImage

log = get_logger("durable")

EXIT_STORE_FAILURE = 70
# A flushing SQLite commit of fewer operations than this stays on the loop: so few means the loop
# has little else to do meanwhile, and the hand-off to the thread and back would only add latency.
MIN_OPS_TO_COMMIT_ON_THREAD = 8


class DurableBank:
    """Bank + Store with group commit. All methods run on the event loop's thread."""

    def __init__(self, store: Store, bank: Bank, meta: dict[str, int] | None = None, *,
                 sync_interval_s: float = 0.0) -> None:
        assert sync_interval_s >= 0.0
        self.store = store
        self.bank = bank
        # Metadata as persisted (e.g. last_applied_seq); updates join the next commit.
        self.meta: dict[str, int] = dict(meta or {})
        self._meta_changes: dict[str, int] = {}
        # 0, or a store that syncs every commit anyway: every commit is on stable storage.
        self.sync_interval_s = 0.0 if store.syncs_every_commit else sync_interval_s
        self.synced_meta: dict[str, int] = dict(self.meta)  # the caller syncs what it loaded: see open()
        self._committed_meta: dict[str, int] = dict(self.meta)  # as of the last commit that landed
        self._last_sync_started_s = float("-inf")
        self._unsynced = False  # a commit landed after the last flush began
        self._sync_inflight: asyncio.Future | None = None  # a flush running on the commit thread
        self.on_synced: Callable[[], None] | None = None  # called when synced_meta moves
        self.synced_commits_total = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
        self._loop = asyncio.get_running_loop()
        self._uncommitted = False
        self._replacing = False  # a state transfer's install runs on the commit thread
        self._next_commit: asyncio.Future | None = None  # resolves when the pending changes are on disk
        self._inflight_commit: asyncio.Future | None = None
        self._done = self._loop.create_future()
        self._done.set_result(None)
        self.commits_total = 0
        self.ops_committed_total = 0
        self.largest_commit_ops = 0

    @classmethod
    async def open(cls, store: Store, *, max_accounts: int, dedup_window_ops: int,
                   sync_interval_s: float = 0.0) -> "DurableBank":
        """Load the store's image into a fresh Bank (checking its invariants). What the store holds
        is synced first: a process killed before its last sync left commits the disk may not have."""
        await asyncio.to_thread(store.sync_to_disk)
        image: StoreImage = await asyncio.to_thread(store.load, dedup_window_ops)
        bank = Bank(max_accounts=max_accounts, dedup_window_ops=dedup_window_ops)
        image.to_bank(bank)
        return cls(store, bank, image.meta, sync_interval_s=sync_interval_s)

    # --- Changing state (in memory; durable later) ----------------------------------------------
    def apply(self, op: Operation, seq: int | None = None) -> tuple[Outcome, bool]:
        assert not self._replacing, "nothing is applied while a state transfer installs its image"
        outcome, duplicate = self.bank.apply(op, seq)
        if not duplicate:
            self._mark_uncommitted()
        return outcome, duplicate

    def set_meta(self, name: str, value: int) -> None:
        if self.meta.get(name) != value:
            self.meta[name] = value
            self._meta_changes[name] = value
            self._mark_uncommitted()

    def _mark_uncommitted(self) -> None:
        if not self._uncommitted:
            self._uncommitted = True
            if self._inflight_commit is None:
                self._loop.call_soon(self._start_commit)

    def status_fields(self) -> dict:
        """What a process reports in STATUS about its bank and its group commit."""
        return {
            "OPS_APPLIED_TOTAL": self.bank.counters.ops_applied_total,
            "ACCOUNTS": len(self.bank.balances),
            "COMMITS_TOTAL": self.commits_total,
            "SYNCED_COMMITS_TOTAL": self.synced_commits_total,
            "LARGEST_COMMIT_OPS": self.largest_commit_ops,
        }

    # --- Waiting for the disk -------------------------------------------------------------------
    def durable(self) -> asyncio.Future:
        """A future that resolves once everything applied so far is on disk."""
        if self._uncommitted:
            if self._next_commit is None:
                self._next_commit = self._loop.create_future()
            return self._next_commit
        if self._inflight_commit is not None:
            return self._inflight_commit
        return self._done

    @property
    def replacing(self) -> bool:
        """A state transfer is being installed: nothing may be applied until it is done."""
        return self._replacing

    @property
    def idle(self) -> bool:
        """No commit pending or running, and no install: the store's connection is free."""
        return not self._uncommitted and self._inflight_commit is None and not self._replacing

    def _start_commit(self) -> None:
        if self._inflight_commit is not None or not self._uncommitted or self._replacing:
            return  # (after an install, replace() starts what waited)
        applied, balances = self.bank.take_effects()
        meta_changes, self._meta_changes = self._meta_changes, {}
        batch_rows = self.store.encode_applied(applied)  # here: the GIL is the loop's anyway
        counters = self.bank.counters.copy()
        commit = self._next_commit if self._next_commit is not None else self._loop.create_future()
        self._next_commit = None
        self._uncommitted = False
        self._inflight_commit = commit
        ops_count = len(applied)
        window = self.bank.dedup_window_ops
        sync = self.sync_interval_s == 0.0  # relaxed: flushed later, off the loop (start_sync_if_due)
        landed_meta = dict(self.meta)  # everything in memory joins this commit, metadata too
        on_thread = self.store.commits_in_thread or (sync and ops_count >= MIN_OPS_TO_COMMIT_ON_THREAD)
        if not on_thread:  # a relaxed commit (CPU only), or a small one
            work = self._loop.create_future()
            try:
                self.store.persist(applied, balances, counters, meta_changes, dedup_window_ops=window, sync=sync,
                                   batch_rows=batch_rows)
                work.set_result(None)
            except Exception as error:  # handled (fatally) by _on_committed, like a thread's failure
                work.set_exception(error)
            self._loop.call_soon(self._on_committed, work, commit, ops_count, landed_meta, sync)
            return
        work = self._loop.run_in_executor(
            self._executor,
            lambda: self.store.persist(applied, balances, counters, meta_changes, dedup_window_ops=window, sync=sync,
                                       batch_rows=batch_rows),
        )
        work.add_done_callback(lambda done: self._on_committed(done, commit, ops_count, landed_meta, sync))

    def _on_committed(self, work: asyncio.Future, commit: asyncio.Future, ops_count: int,
                      landed_meta: dict[str, int], synced: bool) -> None:
        error = work.exception()
        if error is not None:
            # Memory is ahead of the disk: stop now; a restart recovers from the last commit.
            log.error("commit_failed_stopping", error=repr(error), ops=ops_count)
            os._exit(EXIT_STORE_FAILURE)
        self._committed_meta = landed_meta
        if synced:
            self.synced_meta = landed_meta
            self.synced_commits_total += 1
        else:
            self._unsynced = True
            self.start_sync_if_due()
        self.commits_total += 1
        self.ops_committed_total += ops_count
        if ops_count > self.largest_commit_ops:
            self.largest_commit_ops = ops_count
        self._inflight_commit = None
        if not commit.done():
            commit.set_result(None)
        if self._uncommitted:
            self._start_commit()

    async def flush(self, *, sync: bool = False) -> None:
        """Wait until nothing is pending (used before a clean stop and by state transfer);
        `sync`: and until all of it is on stable storage."""
        while not self.idle:
            await self.durable()
        if sync:
            await self.wait_for_sync()
            if self.start_sync_if_due(force=True):
                await self.wait_for_sync()

    async def wait_for_sync(self) -> None:
        """Wait until no flush is running (synced_meta then says all that the flushes covered)."""
        while self._sync_inflight is not None:  # (one flush at a time; each bounded by the disk)
            await asyncio.shield(self._sync_inflight)

    def start_sync_if_due(self, *, force: bool = False) -> bool:
        """Flush relaxed commits to stable storage on the commit thread, if some landed since the
        last flush began, none is running, and the interval has passed (or `force`). True if a
        flush started. The caller hears of its end through `on_synced`."""
        if not self._unsynced or self._sync_inflight is not None or self._replacing:
            return False
        now_s = self._loop.time()
        if not force and now_s - self._last_sync_started_s < self.sync_interval_s:
            return False
        assert not self.store.commits_in_thread, "a relaxed store commits on the loop; the thread only flushes"
        self._last_sync_started_s = now_s
        self._unsynced = False
        # What the flush covers: every commit that landed before it begins (a commit landing
        # meanwhile may or may not be covered, so it counts for the next flush).
        covered_meta = self._committed_meta
        flushing = self._loop.run_in_executor(self._executor, self.store.sync_to_disk)
        self._sync_inflight = flushing
        flushing.add_done_callback(lambda done: self._on_synced(done, covered_meta))
        return True

    def _on_synced(self, work: asyncio.Future, covered_meta: dict[str, int]) -> None:
        error = work.exception()
        if error is not None:
            log.error("sync_failed_stopping", error=repr(error))
            os._exit(EXIT_STORE_FAILURE)
        self._sync_inflight = None
        self.synced_meta = covered_meta
        self.synced_commits_total += 1
        if self.on_synced is not None:
            self.on_synced()

    async def close(self) -> None:
        await self.flush(sync=True)
        self._executor.shutdown(wait=True)
        self.store.close()

    async def replace(self, image: StoreImage) -> None:
        """Install a whole new state (a state transfer): on disk in one transaction, then in
        memory. The caller stops applying while this runs. Metadata set meanwhile (primary-backup's
        voter record: a vote or a lease answered during the install) is newer than the image's,
        so it stays, and the commit after the install writes it."""
        await self.flush()
        await self.wait_for_sync()  # a flush that ends after the install would report the old state
        assert not self._replacing
        self._replacing = True
        try:
            await self.run_in_store_thread(self.store.install, image)  # on disk when it returns
        finally:
            self._replacing = False
            if self._uncommitted:
                self._loop.call_soon(self._start_commit)
        changed_during_install = self._meta_changes
        bank = Bank(max_accounts=self.bank.max_accounts, dedup_window_ops=self.bank.dedup_window_ops)
        image.to_bank(bank)
        self.bank = bank
        self.meta = {**image.meta, **changed_during_install}
        self.synced_meta = dict(image.meta)
        self._committed_meta = dict(image.meta)
        self._unsynced = False
        self._meta_changes = changed_during_install
        assert not changed_during_install or self._uncommitted, "what changed during the install is committed next"

    def snapshot(self) -> StoreImage:
        """The in-memory state now, as an image (durable once `durable()` at this moment resolves)."""
        bank = self.bank
        return StoreImage(dict(bank.balances), list(bank.recent_applied()), bank.counters.copy(), dict(self.meta))

    async def run_in_store_thread(self, function, *args):
        """Run a store call on the commit thread, in order with the commits (e.g. install)."""
        return await self._loop.run_in_executor(self._executor, function, *args)
