"""common.storage.durable: group commit, and the relaxed sync of a log-backed replica.

A replica fed from the sequencer's log commits without waiting for the disk and flushes once per
interval; `synced_meta` must then say exactly how far its store is on stable storage, because the
sequencer forgets log entries below that point.
"""

from __future__ import annotations

import asyncio

import pytest

from common.bank.state import DEPOSIT, Bank, Operation
from common.storage.durable import DurableBank
from common.storage.store import open_store


def deposit(op_id: str, cents: int = 100) -> Operation:
    return Operation(op_id, DEPOSIT, "alice", None, cents)


async def apply_and_commit(dbank: DurableBank, op: Operation, seq: int) -> None:
    dbank.apply(op, seq)
    dbank.set_meta("last_applied_seq", seq)
    await dbank.durable()


def synchronous_level(dbank: DurableBank) -> int:
    return dbank.store._cursor().execute("PRAGMA synchronous").fetchone()[0]  # 1 normal, 2 full


async def open_bank(path, *, default_synchronous: str, sync_interval_s: float) -> DurableBank:
    store = open_store(f"sqlite:///{path}", default_synchronous=default_synchronous)
    return await DurableBank.open(store, max_accounts=100, dedup_window_ops=1_000, sync_interval_s=sync_interval_s)


def test_a_relaxed_bank_flushes_after_the_first_commit_of_each_interval_and_reports_how_far(tmp_path):
    async def scenario():
        dbank = await open_bank(tmp_path / "r.db", default_synchronous="normal", sync_interval_s=3600.0)
        assert not dbank.store.syncs_every_commit and dbank.sync_interval_s == 3600.0
        flushes_reported = []
        dbank.on_synced = lambda: flushes_reported.append(dbank.synced_meta["last_applied_seq"])
        await apply_and_commit(dbank, deposit("op-1"), 1)  # the first commit of an interval: a flush starts
        await dbank.wait_for_sync()
        assert dbank.synced_meta["last_applied_seq"] == 1 and flushes_reported == [1]
        await apply_and_commit(dbank, deposit("op-2"), 2)  # within the interval: committed, not flushed
        await apply_and_commit(dbank, deposit("op-3"), 3)
        await dbank.wait_for_sync()
        assert dbank.meta["last_applied_seq"] == 3
        assert dbank.synced_meta["last_applied_seq"] == 1
        assert synchronous_level(dbank) == 1  # every commit at the relaxed level
        assert dbank.start_sync_if_due() is False  # the interval has not passed
        assert dbank.start_sync_if_due(force=True) is True
        await dbank.wait_for_sync()
        assert dbank.synced_meta["last_applied_seq"] == 3 and flushes_reported == [1, 3]
        assert dbank.start_sync_if_due(force=True) is False  # nothing left unsynced
        assert dbank.status_fields()["SYNCED_COMMITS_TOTAL"] == 2
        await dbank.close()
        # Everything committed is in the store, synced or not.
        reopened = await open_bank(tmp_path / "r.db", default_synchronous="normal", sync_interval_s=3600.0)
        assert reopened.meta["last_applied_seq"] == 3 and reopened.synced_meta["last_applied_seq"] == 3
        assert reopened.bank.balance("alice") == 300
        await reopened.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("default_synchronous, sync_interval_s", [
    ("normal", 0.0),  # no interval: every commit is a synced one
    ("full", 3600.0),  # a store that syncs every commit ignores the interval
])
def test_every_commit_is_synced_without_an_interval_or_with_a_store_that_syncs_anyway(
        tmp_path, default_synchronous, sync_interval_s):
    async def scenario():
        dbank = await open_bank(tmp_path / "r.db", default_synchronous=default_synchronous, sync_interval_s=sync_interval_s)
        assert dbank.sync_interval_s == 0.0
        for seq in range(1, 4):
            await apply_and_commit(dbank, deposit(f"op-{seq}"), seq)
            assert dbank.synced_meta["last_applied_seq"] == seq
        assert dbank.start_sync_if_due(force=True) is False  # nothing is ever left unsynced
        await dbank.close()

    asyncio.run(scenario())


def test_an_interval_that_passed_makes_the_next_commit_start_a_flush(tmp_path):
    async def scenario():
        dbank = await open_bank(tmp_path / "r.db", default_synchronous="normal", sync_interval_s=0.05)
        await apply_and_commit(dbank, deposit("op-1"), 1)
        await dbank.wait_for_sync()
        await apply_and_commit(dbank, deposit("op-2"), 2)
        await dbank.wait_for_sync()
        assert dbank.synced_meta["last_applied_seq"] == 1
        await asyncio.sleep(0.06)
        await apply_and_commit(dbank, deposit("op-3"), 3)
        await dbank.wait_for_sync()
        assert dbank.synced_meta["last_applied_seq"] == 3
        await dbank.close()

    asyncio.run(scenario())


def test_a_state_transfer_installs_a_synced_image(tmp_path):
    async def scenario():
        source = await open_bank(tmp_path / "a.db", default_synchronous="normal", sync_interval_s=3600.0)
        for seq in range(1, 6):
            await apply_and_commit(source, deposit(f"op-{seq}"), seq)
        image = source.snapshot()
        target = await open_bank(tmp_path / "b.db", default_synchronous="normal", sync_interval_s=3600.0)
        await target.replace(image)
        assert target.synced_meta["last_applied_seq"] == 5 and target.bank.balance("alice") == 500
        assert Bank.check_invariants(target.bank) is None
        await source.close()
        await target.close()

    asyncio.run(scenario())


def test_syncing_a_quiet_store_flushes_its_log_even_while_a_reader_holds_a_snapshot(tmp_path, monkeypatch):
    """An operator's sqlite3 shell (any reader) keeps a checkpoint from running: the sync must not
    depend on one, or SYNCED would be reported ahead of the disk."""
    import os
    import sqlite3

    async def scenario():
        dbank = await open_bank(tmp_path / "r.db", default_synchronous="normal", sync_interval_s=3600.0)
        await apply_and_commit(dbank, deposit("op-1"), 1)  # the first commit of the interval: a flush
        await dbank.wait_for_sync()
        await apply_and_commit(dbank, deposit("op-2"), 2)  # relaxed
        reader = sqlite3.connect(tmp_path / "r.db")
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM applied_batches").fetchone() == (2,)  # holds a read snapshot
        flushed = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
        assert dbank.start_sync_if_due(force=True)
        await dbank.wait_for_sync()
        assert any(path.endswith("r.db-wal") for path in flushed), flushed
        assert dbank.synced_meta["last_applied_seq"] == 2
        reader.rollback()
        reader.close()
        await dbank.close()

    asyncio.run(scenario())


def test_nothing_syncs_or_applies_while_a_state_transfer_installs(tmp_path):
    """The install runs on the commit thread, on the store's one connection: the replica's tick
    must not sync into it, and nothing may be applied to the bank the install is replacing."""
    async def scenario():
        source = await open_bank(tmp_path / "a.db", default_synchronous="normal", sync_interval_s=3600.0)
        for seq in range(1, 4):
            await apply_and_commit(source, deposit(f"op-{seq}"), seq)
        target = await open_bank(tmp_path / "b.db", default_synchronous="normal", sync_interval_s=3600.0)
        await apply_and_commit(target, deposit("other-1"), 1)
        await target.wait_for_sync()
        await apply_and_commit(target, deposit("other-2"), 2)  # relaxed: a forced flush would run
        installing = asyncio.ensure_future(target.replace(source.snapshot()))
        for _ in range(1000):  # until the install is on the commit thread (bounded)
            if target.replacing:
                break
            await asyncio.sleep(0)
        assert target.replacing and not target.idle
        assert target.start_sync_if_due(force=True) is False
        with pytest.raises(AssertionError):
            target.apply(deposit("op-late"), 4)
        await installing
        assert target.idle and target.bank.balance("alice") == 300 and target.synced_meta["last_applied_seq"] == 3
        await source.close()
        await target.close()

    asyncio.run(scenario())


def test_metadata_changed_while_a_state_transfer_installs_reaches_the_disk(tmp_path):
    """Primary-backup keeps its voter record in the metadata, and a vote or lease answered during
    an install must be on disk when `durable()` says so, not dropped with the old state."""
    async def scenario():
        source = await open_bank(tmp_path / "a.db", default_synchronous="full", sync_interval_s=0.0)
        for seq in range(1, 4):
            await apply_and_commit(source, deposit(f"op-{seq}"), seq)
        target = await open_bank(tmp_path / "b.db", default_synchronous="full", sync_interval_s=0.0)
        target.set_meta("promised_epoch", 1)
        await target.durable()
        installing = asyncio.ensure_future(target.replace(source.snapshot()))
        while not target._replacing:  # the install is on the commit thread
            await asyncio.sleep(0)
        target.set_meta("promised_epoch", 2)  # a vote granted meanwhile
        await target.durable()
        await installing
        assert target.meta["promised_epoch"] == 2 and target.meta["last_applied_seq"] == 3
        await target.close()
        reopened = open_store(f"sqlite:///{tmp_path / 'b.db'}")
        assert reopened.load(1_000).meta["promised_epoch"] == 2
        reopened.close()
        await source.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("meta", [
    {"last_applied_seq": 3, "x" * 65: 1},  # longer than the store's names
    {"last_applied_seq": 2**63},  # beyond the store's integers
    {"last_applied_seq": 3, "deposited_cents_total": 10**9},  # a counter, which COUNTERS carries
])
def test_a_snapshot_whose_meta_the_store_could_not_hold_is_refused_while_it_is_read(tmp_path, meta):
    import json

    from common.bank.errors import SaldoError
    from common.storage.snapshot import SnapshotReader, image_to_lines

    async def scenario():
        source = await open_bank(tmp_path / "a.db", default_synchronous="normal", sync_interval_s=3600.0)
        for seq in range(1, 4):
            await apply_and_commit(source, deposit(f"op-{seq}"), seq)
        messages = [json.loads(line) for line in image_to_lines(source.snapshot(), "s1")]
        await source.close()
        return messages

    messages = asyncio.run(scenario())
    honest = SnapshotReader()
    for message in messages:
        honest.feed(message)
    assert honest.image(max_accounts=100, dedup_window_ops=1_000).meta["last_applied_seq"] == 3
    messages[0]["META"] = meta
    with pytest.raises(SaldoError) as refused:
        SnapshotReader().feed(messages[0])
    assert refused.value.code == "FIELD_INVALID"


def test_a_replica_whose_snapshot_install_fails_keeps_following_the_sequencer(tmp_path, monkeypatch):
    """The install is one transaction, rolled back when it fails (a full disk, say): the replica
    still holds its earlier state, so it goes back to the sequencer rather than stop following."""
    import argparse
    import json
    import sqlite3

    from common.sequencer import replica as sequenced_replica
    from common.storage.snapshot import image_to_lines
    from common.storage.store import Counters, StoreImage
    from common.transport import wire

    async def scenario():
        subscribes: asyncio.Queue = asyncio.Queue()

        async def sequencer(reader, writer):  # every SUBSCRIBE is told its replica is behind the log
            await subscribes.put(json.loads(await reader.readline()))
            writer.write(wire.encode({"TASK": "SNAPSHOT_NEEDED", "LOG_START_SEQ": 10}))
            await writer.drain()
            writer.close()

        async def peer(reader, writer):  # serves an honest snapshot at seq 5
            request = json.loads(await reader.readline())
            for line in image_to_lines(StoreImage({"bob": 500}, [], Counters(5, 500, 0), {"last_applied_seq": 5}), request["ID"]):
                writer.write(line)
            await writer.drain()

        sequencer_server = await asyncio.start_server(sequencer, "127.0.0.1", 0)
        peer_server = await asyncio.start_server(peer, "127.0.0.1", 0)
        args = argparse.Namespace(
            host="127.0.0.1", port=0, name="replica1", mode="sequencer", store=f"sqlite:///{tmp_path / 'r.db'}",
            sequencer=f"127.0.0.1:{sequencer_server.sockets[0].getsockname()[1]}",
            peers=f"127.0.0.1:{peer_server.sockets[0].getsockname()[1]}",
            sync_interval_ms=50, max_accounts=100, dedup_window=1_000)
        dbank = await sequenced_replica.open_durable_bank(args, sync_interval_s=0.05)

        def full_disk(image):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(dbank.store, "install", full_disk)
        replica = sequenced_replica.SequencedReplica(args, dbank)
        stop = asyncio.Event()
        following = asyncio.create_task(replica.follow_sequencer(stop))
        first = await asyncio.wait_for(subscribes.get(), 5.0)
        again = await asyncio.wait_for(subscribes.get(), 5.0)  # after the failed install
        assert first["LAST_APPLIED_SEQ"] == again["LAST_APPLIED_SEQ"] == 0
        assert not following.done() and replica.snapshots_installed == 0 and dbank.idle
        stop.set()
        following.cancel()
        sequencer_server.close()
        peer_server.close()
        await dbank.close()

    asyncio.run(scenario())


def test_a_snapshot_of_long_names_and_ids_stays_within_the_line_limit_and_reads_back_whole():
    # 250 failed transfers of 64-character ids between 64-character accounts once made one
    # SNAPSHOT_APPLIED line of 66 KiB: the receiver refused it (LINE_TOO_LONG) at every attempt.
    import json

    from common.bank.money import MAX_AMOUNT_CENTS
    from common.bank.state import MAX_ACCOUNT_CHARS, MAX_OP_ID_CHARS, Bank, Operation
    from common.storage.snapshot import SNAPSHOT_LINE_MAX_BYTES, SnapshotReader, image_to_lines
    from common.storage.store import StoreImage
    from common.transport import wire

    bank = Bank(max_accounts=10_000, dedup_window_ops=10_000)
    names = [f"{index:04d}".ljust(MAX_ACCOUNT_CHARS, "a") for index in range(2_000)]
    seq = 100_000
    for name in names:
        seq += 1
        bank.apply(Operation(f"d{seq}".ljust(MAX_OP_ID_CHARS, "x"), "DEPOSIT", name, None, 100), seq)
    for index in range(1_000):
        seq += 1
        transfer = Operation(f"t{seq}".ljust(MAX_OP_ID_CHARS, "x"), "TRANSFER", names[index], names[index + 1], MAX_AMOUNT_CENTS)
        outcome, _duplicate = bank.apply(transfer, seq)
        assert outcome.error == "INSUFFICIENT_FUNDS"
    image = StoreImage(dict(bank.balances), list(bank.recent_applied()), bank.counters.copy(), {"last_applied_seq": seq})

    lines = image_to_lines(image, "s1")
    assert max(len(line) for line in lines) <= SNAPSHOT_LINE_MAX_BYTES < wire.MAX_LINE_BYTES
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    reader = SnapshotReader()
    for line in lines:
        reader.feed(json.loads(line))
    assert reader.done
    copy = reader.image(max_accounts=10_000, dedup_window_ops=10_000)
    assert copy.balances == image.balances and copy.counters == image.counters and copy.meta == image.meta
    assert [(a.apply_index, a.seq, a.op, a.outcome) for a in copy.recent] == [(a.apply_index, a.seq, a.op, a.outcome) for a in image.recent]


def test_a_replica_that_becomes_the_results_source_resends_the_outcomes_of_renumbered_retries(tmp_path):
    """A retry the sequencer numbered again (seq 3 for op-1, first applied at seq 1) waits on its
    new seq. The replica applied both before it became the source: it must resend seq 3's outcome
    too, though its dedup window knows op-1 by seq 1 only."""
    import argparse

    from common.sequencer import replica as sequenced_replica
    from common.sequencer.core import parse_applied
    from common.transport import wire

    class RecordingStream:
        def __init__(self) -> None:
            self.lines: list[bytes] = []

        def send_bytes(self, data: bytes) -> None:
            self.lines.append(data)

    async def scenario():
        args = argparse.Namespace(
            host="127.0.0.1", port=0, name="replica2", mode="sequencer", store=f"sqlite:///{tmp_path / 'r.db'}",
            sequencer="127.0.0.1:1", peers="", sync_interval_ms=50, max_accounts=100, dedup_window=1_000)
        dbank = await sequenced_replica.open_durable_bank(args, sync_interval_s=0.05)
        replica = sequenced_replica.SequencedReplica(args, dbank)
        replica._deliver([(1, deposit("op-1")), (2, deposit("op-2", 50)), (3, deposit("op-1"))])
        source_link = RecordingStream()
        replica._become_results_source(source_link, 1)
        await dbank.close()
        results = []
        for line in source_link.lines:
            results += parse_applied(wire.decode_line(line.rstrip(b"\n")))[2]
        return results

    assert asyncio.run(scenario()) == [(1, None, 100), (2, None, 150), (3, None, 100)]


def test_commits_go_on_while_a_flush_runs_and_the_flush_reports_only_what_had_landed_when_it_began(tmp_path, monkeypatch):
    """The flush runs on the commit thread so that the loop (and every acknowledgement) never waits
    for the disk; what lands during it is not counted as synced until the next flush."""
    import threading

    async def scenario():
        dbank = await open_bank(tmp_path / "r.db", default_synchronous="normal", sync_interval_s=3600.0)
        flushing, release = threading.Event(), threading.Event()
        real_sync = dbank.store.sync_to_disk

        def slow_sync() -> None:
            flushing.set()
            release.wait(30)
            real_sync()

        monkeypatch.setattr(dbank.store, "sync_to_disk", slow_sync)
        await apply_and_commit(dbank, deposit("op-1"), 1)  # a flush starts, and hangs on the disk
        assert await asyncio.to_thread(flushing.wait, 10)
        await apply_and_commit(dbank, deposit("op-2"), 2)  # committed meanwhile
        await apply_and_commit(dbank, deposit("op-3"), 3)
        assert dbank.meta["last_applied_seq"] == 3 and "last_applied_seq" not in dbank.synced_meta
        assert dbank.start_sync_if_due(force=True) is False  # one flush at a time
        release.set()
        await dbank.wait_for_sync()
        assert dbank.synced_meta["last_applied_seq"] == 1  # not 2 or 3: they may have missed it
        assert dbank.start_sync_if_due(force=True) is True
        await dbank.wait_for_sync()
        assert dbank.synced_meta["last_applied_seq"] == 3
        await dbank.close()

    asyncio.run(scenario())


def test_a_flushing_commit_runs_on_the_commit_thread_unless_it_is_small_or_relaxed(tmp_path):
    """A synced SQLite commit of a whole batch waits for the disk on the commit thread while the
    loop goes on; a commit of a few operations, or a relaxed one (no flush), runs on the loop."""
    import threading

    from common.storage.durable import MIN_OPS_TO_COMMIT_ON_THREAD

    async def committed_on(dbank: DurableBank, ops: list[Operation]) -> list[str]:
        threads: list[str] = []
        persist = dbank.store.persist
        dbank.store.persist = lambda *args, **kwargs: (threads.append(threading.current_thread().name),
                                                        persist(*args, **kwargs))[1]
        for op in ops:
            dbank.apply(op)
        await dbank.durable()
        dbank.store.persist = persist
        return threads

    async def scenario():
        loop_thread = threading.current_thread().name
        synced = await open_bank(tmp_path / "full.db", default_synchronous="full", sync_interval_s=0.0)
        assert synced.store.syncs_every_commit
        big = [deposit(f"big-{index}") for index in range(MIN_OPS_TO_COMMIT_ON_THREAD)]
        [big_thread] = await committed_on(synced, big)
        assert big_thread != loop_thread and big_thread.startswith("commit")
        assert await committed_on(synced, [deposit("small-1")]) == [loop_thread]
        assert synced.bank.counters.ops_applied_total == MIN_OPS_TO_COMMIT_ON_THREAD + 1
        await synced.close()
        relaxed = await open_bank(tmp_path / "relaxed.db", default_synchronous="normal", sync_interval_s=3600.0)
        assert await committed_on(relaxed, [deposit(f"r-{index}") for index in range(50)]) == [loop_thread]
        await relaxed.close()
        reopened = open_store(f"sqlite:///{tmp_path / 'full.db'}")
        assert reopened.load().counters.ops_applied_total == MIN_OPS_TO_COMMIT_ON_THREAD + 1
        reopened.close()

    asyncio.run(scenario())


def test_a_snapshot_whose_applied_operations_are_not_the_last_ones_in_order_is_refused():
    """The store records applied operations by index range: a snapshot with a gap, a repeat or
    operations that do not end at its total would be recorded wrong, so it is refused."""
    import json

    from common.bank.errors import SaldoError
    from common.storage.snapshot import SnapshotReader, image_to_lines
    from common.storage.store import StoreImage

    bank = Bank(dedup_window_ops=1_000)
    for index in range(5):
        bank.apply(deposit(f"op-{index}"), index + 1)
    recent = list(bank.recent_applied())

    def read(applied: list) -> StoreImage:
        reader = SnapshotReader()
        for line in image_to_lines(StoreImage(dict(bank.balances), applied, bank.counters.copy(), {}), "s1"):
            reader.feed(json.loads(line))
        return reader.image(max_accounts=100, dedup_window_ops=1_000)

    assert read(recent).recent == recent
    assert read(recent[2:]).recent == recent[2:]  # the last three: fine
    for wrong in (recent[:2] + recent[3:], recent[:4], [recent[0], recent[0], *recent[2:]], recent[::-1]):
        with pytest.raises(SaldoError) as refused:
            read(wrong)
        assert refused.value.code == "FIELD_INVALID"
