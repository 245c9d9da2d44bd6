"""The sequencer architecture's two state machines (common/sequencer/core.py), driven without sockets.

SequencerCore and SequencedReplicaCore are pure: a test plays the driver, feeding scripted message
orders and a fake clock, and checks what they hand back to send. The log is the real one
(common/sequencer/log.py) in a temporary directory where a scenario needs a restart, because "numbering
continues after a restart" is a promise about the log and the core together.
"""

from __future__ import annotations

import json
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.bank.errors import SaldoError
from common.bank.state import DEPOSIT, TRANSFER, WITHDRAW, Bank, Operation
from common.sequencer.core import (
    MAX_RESULTS_PER_ACK,
    Reply,
    SequencedReplicaCore,
    SequencerCore,
    applied_line,
    entry_line,
    fingerprint,
    parse_applied,
    parse_entry,
    parse_entry_line,
    parse_logged_entry,
    replicas_needed,
    result_reply_line,
    sequenced_reply_line,
)
from common.sequencer.log import SequencerLog
from common.transport import wire

REPLICAS = ["replica1", "replica2"]


def deposit(op_id: str, account: str = "alice", cents: int = 100) -> Operation:
    return Operation(op_id, DEPOSIT, account, None, cents)


def decode(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def seqs_in(data: bytes) -> list[int]:
    return [message["SEQ"] for message in decode(data)]


def replies_by_client(replies) -> dict[object, list[dict]]:
    by_client: dict[object, list[dict]] = {}
    for reply in replies:
        by_client.setdefault(reply.client, []).append(json.loads(reply.line))
    return by_client


def log_all(core: SequencerCore):
    """The driver's group commit, instantly durable: (broadcast bytes, replies)."""
    entries = core.take_unlogged()
    assert entries, "nothing to log"
    return core.on_logged(entries[-1][0])


def applied_results(entries_bytes: bytes, balance: int = 500) -> list[tuple[int, str | None, int | None]]:
    return [(seq, None, balance) for seq in seqs_in(entries_bytes)]


# --- Numbering ----------------------------------------------------------------------------------


def test_numbers_run_from_one_without_gap_in_submission_order():
    core = SequencerCore(REPLICAS)
    for index in range(5):
        assert core.submit(deposit(f"op-{index}"), f"client-{index}", f"op-{index}") == []
    entries = core.take_unlogged()
    assert [seq for seq, _id, _line in entries] == [1, 2, 3, 4, 5]
    assert [op_id for _seq, op_id, _line in entries] == [f"op-{i}" for i in range(5)]
    data, replies = core.on_logged(5)
    assert seqs_in(data) == [1, 2, 3, 4, 5]
    assert replies == []  # WAIT APPLIED (the default): nobody is answered by the log alone
    assert core.status()["NEXT_SEQ"] == 6 and core.status()["DURABLE_SEQ"] == 5


def test_nothing_is_broadcast_or_resent_before_the_log_write_is_durable():
    core = SequencerCore(REPLICAS)
    core.submit(deposit("op-1"), "c1", "op-1", needed=0)
    core.submit(deposit("op-2"), "c2", "op-2", needed=0)
    # Numbered, not yet handed to the log writer: a subscriber gets nothing, a resend nothing.
    assert core.on_subscribe("replica1", 0, replies=[]) == ("entries", b"")
    assert core.on_resend("replica1", 1, 2) == ("entries", b"")
    entries = core.take_unlogged()
    # Being written (fsync in flight): still nothing, and a new op waits for the next write.
    core.submit(deposit("op-3"), "c3", "op-3", needed=0)
    assert core.on_subscribe("replica2", 0, replies=[]) == ("entries", b"")
    assert core.on_resend("replica1", 1, 3) == ("entries", b"")
    with pytest.raises(AssertionError):
        core.take_unlogged()  # one log write at a time
    data, replies = core.on_logged(entries[-1][0])
    assert seqs_in(data) == [1, 2]
    assert sorted(r.client for r in replies) == ["c1", "c2"]  # op-3 is not durable yet
    assert seqs_in(core.on_subscribe("replica2", 0, replies=[])[1]) == [1, 2]
    data, replies = log_all(core)
    assert seqs_in(data) == [3] and [r.client for r in replies] == ["c3"]


def test_numbering_continues_after_a_restart_from_the_log_with_no_gap_and_no_reuse(tmp_path):
    seqlog = SequencerLog(tmp_path / "log", segment_entries=3)
    core = SequencerCore(REPLICAS)
    broadcast: list[int] = []
    for batch in ([f"a{i}" for i in range(4)], [f"b{i}" for i in range(3)]):
        for op_id in batch:
            core.submit(deposit(op_id), op_id, op_id)
        entries = core.take_unlogged()
        seqlog.append(entries)  # the driver: durable first...
        data, _ = core.on_logged(entries[-1][0])  # ...then broadcast
        broadcast += seqs_in(data)
    # Numbered but never durable when the process dies: never broadcast, never acknowledged.
    core.submit(deposit("lost-in-crash"), "c", "lost-in-crash")
    core.take_unlogged()
    seqlog.close()

    # The restart (common/sequencer/sequencer.py run_orderer): the core is rebuilt from the log.
    reopened = SequencerLog(tmp_path / "log", segment_entries=3)
    entries, log_start = reopened.load()
    restarted = SequencerCore(REPLICAS, next_seq=reopened.last_seq + 1, log_start_seq=log_start, log=deque(entries))
    assert restarted.durable_seq == 7 and restarted.next_seq == 8
    for op_id in ("c0", "c1"):
        restarted.submit(deposit(op_id), op_id, op_id)
    new_entries = restarted.take_unlogged()
    reopened.append(new_entries)
    data, _ = restarted.on_logged(new_entries[-1][0])
    broadcast += seqs_in(data)
    assert broadcast == list(range(1, 10))  # every number once, in order, across the restart
    # A retry of an operation sequenced before the restart keeps its number (no second seq).
    restarted.submit(deposit("a2"), "retry", "a2")
    assert not restarted.has_unlogged and restarted.next_seq == 10
    # What a replica that saw nothing gets: everything, each number once.
    assert seqs_in(restarted.on_subscribe("replica1", 0, replies=[])[1]) == list(range(1, 10))
    reopened.close()
    again = SequencerLog(tmp_path / "log", segment_entries=3)
    assert [seq for seq, _id, _line in again.load()[0]] == list(range(1, 10))


# --- Replies per WAIT ---------------------------------------------------------------------------


def test_replicas_needed_per_wait_mode():
    assert [replicas_needed(w, 3) for w in ("SEQUENCED", "APPLIED", "ALL")] == [0, 1, 3]


def test_wait_sequenced_is_answered_once_the_entry_is_durable_without_a_result():
    core = SequencerCore(REPLICAS)
    assert core.submit(deposit("op-1"), "c", "op-1", needed=0) == []
    core.take_unlogged()
    _data, replies = core.on_logged(1)
    assert replies_by_client(replies) == {"c": [{"ID": "op-1", "STATUS": "OK", "ACCEPTED": True, "SEQ": 1}]}
    assert core.status()["WAITING_REQUESTS"] == 0


def test_wait_applied_is_answered_with_the_first_replicas_result():
    core = SequencerCore(REPLICAS)
    core.submit(Operation("w-1", WITHDRAW, "alice", None, 500), "c", "w-1", needed=1)
    core.submit(deposit("d-1"), "d", "d-1", needed=1)
    data, replies = log_all(core)
    assert replies == []
    # replica2 applied seq 1 only (INSUFFICIENT_FUNDS): only its client is answered.
    replies = core.on_applied("replica2", 1, [(1, "INSUFFICIENT_FUNDS", None)])
    answer = replies_by_client(replies)
    assert list(answer) == ["c"]
    assert answer["c"][0]["STATUS"] == "NOK" and answer["c"][0]["ERROR"] == "INSUFFICIENT_FUNDS"
    assert answer["c"][0]["SEQ"] == 1 and answer["c"][0]["DEFINITE"] is True
    replies = core.on_applied("replica2", 2, [(2, None, 12_345)])
    assert replies_by_client(replies) == {"d": [{"ID": "d-1", "STATUS": "OK", "BALANCE": "123.45", "SEQ": 2}]}
    # The second replica's acknowledgement answers nobody twice.
    assert core.on_applied("replica1", 2, [(1, "INSUFFICIENT_FUNDS", None), (2, None, 12_345)]) == []
    assert core.status()["WAITING_REQUESTS"] == 0


def test_wait_all_is_answered_when_the_last_replica_applied():
    core = SequencerCore(["r1", "r2", "r3"])
    core.submit(deposit("op-1"), "c", "op-1", needed=3)
    log_all(core)
    assert core.on_applied("r1", 1, [(1, None, 100)]) == []
    assert core.on_applied("r3", 1, [(1, None, 100)]) == []
    replies = core.on_applied("r2", 1, [(1, None, 100)])
    assert replies_by_client(replies) == {"c": [{"ID": "op-1", "STATUS": "OK", "BALANCE": "1.00", "SEQ": 1}]}
    assert core.status()["WAITING_REQUESTS"] == 0


def test_an_acknowledgement_covering_many_entries_answers_each_waiter_once():
    core = SequencerCore(REPLICAS)
    for index in range(1, 6):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}", needed=2)
    data, _ = log_all(core)
    assert core.on_applied("replica1", 5, applied_results(data)) == []
    replies = core.on_applied("replica2", 5, applied_results(data))
    assert sorted(r.client for r in replies) == [f"c{i}" for i in range(1, 6)]
    assert core.on_applied("replica2", 5, applied_results(data)) == []


# --- Retries ------------------------------------------------------------------------------------


def test_a_retry_before_the_result_attaches_to_the_same_seq():
    core = SequencerCore(REPLICAS)
    core.submit(deposit("op-1"), "first-attempt", "op-1")
    core.submit(deposit("op-1"), "retry-before-log", "op-1")  # not even durable yet
    data, _ = log_all(core)
    core.submit(deposit("op-1"), "retry-after-log", "op-1")
    assert seqs_in(data) == [1] and core.next_seq == 2 and not core.has_unlogged
    assert core.stats.retries_attached == 2
    replies = core.on_applied("replica1", 1, [(1, None, 100)])
    assert sorted(r.client for r in replies) == ["first-attempt", "retry-after-log", "retry-before-log"]
    assert {json.loads(r.line)["SEQ"] for r in replies} == {1}


def test_a_retry_after_the_result_is_answered_from_the_cache():
    core = SequencerCore(REPLICAS)
    core.submit(deposit("op-1"), "c", "op-1")
    log_all(core)
    core.on_applied("replica1", 1, [(1, None, 100)])
    replies = core.submit(deposit("op-1"), "retry", "op-1")
    assert replies_by_client(replies) == {"retry": [{"ID": "op-1", "STATUS": "OK", "BALANCE": "1.00", "SEQ": 1}]}
    assert core.stats.retries_answered_from_cache == 1 and core.next_seq == 2
    # WAIT ALL: the cache has the result but only one replica applied it, so the retry waits...
    assert core.submit(deposit("op-1"), "retry-all", "op-1", needed=2) == []
    replies = core.on_applied("replica2", 1, [(1, None, 100)])
    assert [r.client for r in replies] == ["retry-all"]
    # ...and a WAIT SEQUENCED retry of a durable entry is answered at once.
    assert json.loads(core.submit(deposit("op-1"), "s", "op-1", needed=0)[0].line)["ACCEPTED"] is True


def test_a_retry_whose_result_is_gone_is_asked_of_the_replicas_and_told_its_first_seq():
    core = SequencerCore(REPLICAS, result_cache_entries=2)
    for index in range(1, 5):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}")
    data, _ = log_all(core)
    core.on_applied("replica1", 4, applied_results(data))  # results of 1 and 2 fall out of the cache
    assert core.submit(deposit("op-4"), "retry-4", "op-4") != []  # still cached
    assert core.submit(deposit("op-1"), "retry-1", "op-1") == []
    assert core.submit(deposit("op-1"), "retry-1-again", "op-1") == []  # waits for the same retry entry
    entries = core.take_unlogged()
    # A retry entry: the operation again under a new number, naming the one it repeats.
    assert [(seq, op_id) for seq, op_id, _line in entries] == [(5, "op-1")]
    assert decode(entries[0][2])[0]["RETRY_OF"] == 1
    data, _ = core.on_logged(5)
    # The replica recognises the id and answers with the first outcome; the clients get seq 1.
    replies = core.on_applied("replica1", 5, [(5, None, 100)])
    first = {"ID": "op-1", "STATUS": "OK", "BALANCE": "1.00", "SEQ": 1}
    assert replies_by_client(replies) == {"retry-1": [first], "retry-1-again": [first]}
    # Its outcome is cached under its first seq now: the next retry is answered at once.
    assert replies_by_client(core.submit(deposit("op-1"), "later", "op-1")) == {"later": [first]}
    assert not core.has_unlogged and core.status()["RETRY_ENTRIES"] == 1


def test_after_a_restart_a_retry_of_an_operation_the_replicas_already_applied_is_asked_again_and_told_its_seq():
    before_crash = sequenced_core(3)
    # The replicas applied 1..3; the sequencer crashed before relaying op-2's answer. Restarted
    # from its log, it knows op-2 is seq 2 but holds no result for it, and no replica will apply
    # seq 2 again: attaching the retry to seq 2 would leave it unanswered.
    restarted = SequencerCore(REPLICAS, next_seq=4, log=deque(before_crash.log))
    assert restarted.on_subscribe("replica1", 3, replies=[]) == ("entries", b"")
    assert restarted.on_subscribe("replica2", 3, replies=[]) == ("entries", b"")
    assert restarted.submit(deposit("op-2"), "retry", "op-2") == []
    assert [(seq, decode(line)[0]["RETRY_OF"]) for seq, _id, line in restarted.take_unlogged()] == [(4, 2)]
    restarted.on_logged(4)
    # The replica recognises the id and answers with the first outcome: the client is told seq 2.
    replies = restarted.on_applied("replica1", 4, [(4, None, 100)])
    assert replies_by_client(replies) == {"retry": [{"ID": "op-2", "STATUS": "OK", "BALANCE": "1.00", "SEQ": 2}]}
    assert restarted.status()["WAITING_REQUESTS"] == 0


# --- Ids beyond truncation and restarts -----------------------------------------------------------


def truncated_after(core: SequencerCore, count: int, seqlog: SequencerLog | None = None) -> None:
    """Deposits op-1 .. op-count, logged (in `seqlog` too, if given), applied and synced by both
    replicas (replica1 sends the outcomes), then the log truncated as the driver does."""
    for index in range(1, count + 1):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}", needed=0)
    entries = core.take_unlogged()
    if seqlog is not None:
        seqlog.append(entries)
    core.on_logged(entries[-1][0])
    last = core.durable_seq
    for name in REPLICAS:
        core.on_subscribe(name, 0, replies=[])
    core.choose_results_source("replica1")
    core.on_applied("replica1", last, [(seq, None, 100 * seq) for seq in range(1, last + 1)])
    core.on_applied("replica2", last, [])
    point = core.truncation_point()
    start = point if seqlog is None else seqlog.truncate_before(point, core.ids_kept_from())
    core.truncate(start)


def test_after_truncation_a_retry_is_told_its_first_seq_and_its_id_with_another_amount_is_refused_at_once():
    """The queue's reproduction: op-1 is applied, 60 more follow, the log drops them all; then
    op-1 again (the queue answers once queued: WAIT SEQUENCED), and op-1 with another amount."""
    core = SequencerCore(REPLICAS, result_cache_entries=10)
    truncated_after(core, 61)
    assert core.log_start_seq == 62 and core.status()["LOG_ENTRIES"] == 0
    assert core.submit(deposit("op-1"), "retry", "op-1", needed=0) == [Reply("retry", sequenced_reply_line("op-1", 1))]
    for needed in (0, 1, 2):
        with pytest.raises(SaldoError, match="ID_REUSED") as refused:
            core.submit(deposit("op-1", cents=999), "reused", "op-1", needed=needed)
        assert "seq 1" in refused.value.detail
    assert core.next_seq == 62 and not core.has_unlogged  # nothing numbered for either
    # WAIT APPLIED: the outcome (long out of the cache) is asked of the replicas by a retry entry.
    assert core.submit(deposit("op-1"), "retry-applied", "op-1", needed=1) == []
    entries = core.take_unlogged()
    assert [(seq, decode(line)[0]["RETRY_OF"]) for seq, _id, line in entries] == [(62, 1)]
    core.on_logged(62)
    replies = core.on_applied("replica1", 62, [(62, None, 100)])  # the first outcome, the replica's
    assert replies == [Reply("retry-applied", result_reply_line("op-1", 1, None, 100))]
    assert core.ids.get("op-1") == (1, fingerprint(deposit("op-1")))  # still one seq for the id
    core.ids.check_invariants()


def test_a_restarted_sequencer_rebuilds_its_ids_from_the_log_and_the_segments_it_kept(tmp_path):
    seqlog = SequencerLog(tmp_path / "log", segment_entries=10)
    core = SequencerCore(REPLICAS, result_cache_entries=10)
    truncated_after(core, 61, seqlog)
    # Out of the log, kept for their ids: seqs 1 .. 60 in six segments; 61 is the active one.
    assert core.log_start_seq == 61
    assert [first for first, _path in seqlog.segments("ids-")] == [1, 11, 21, 31, 41, 51]
    core.submit(deposit("op-1"), "retry", "op-1", needed=1)  # a retry entry, logged: 62 repeats 1
    retry_entries = core.take_unlogged()
    seqlog.append(retry_entries)
    core.on_logged(62)
    seqlog.close()
    for restart in range(2):
        reopened = SequencerLog(tmp_path / "log", segment_entries=10)
        entries, log_start = reopened.load()
        restarted = SequencerCore(REPLICAS, next_seq=reopened.last_seq + 1, log_start_seq=log_start,
                                  log=deque(entries), retired=reopened.retired(log_start))
        assert [restarted.ids.get(f"op-{i}") for i in range(1, 62)] == [core.ids.get(f"op-{i}") for i in range(1, 62)]
        assert restarted.ids.get("op-1")[0] == 1  # the retry entry names no id of its own
        for name in REPLICAS:
            restarted.on_subscribe(name, 62, replies=[])
        assert restarted.submit(deposit("op-1"), "c", "op-1", needed=0) == [Reply("c", sequenced_reply_line("op-1", 1))]
        with pytest.raises(SaldoError, match="ID_REUSED"):
            restarted.submit(deposit("op-1", cents=999), "c", "op-1", needed=0)
        # WAIT APPLIED after a restart: no outcome is held, a retry entry asks for it, seq 1 is told.
        restarted.submit(deposit("op-2"), "retry-2", "op-2", needed=1)
        new_entries = restarted.take_unlogged()
        assert [decode(line)[0]["RETRY_OF"] for _seq, _id, line in new_entries] == [2]
        reopened.append(new_entries)
        restarted.on_logged(new_entries[-1][0])
        replies = restarted.on_applied("replica1", new_entries[-1][0], [(new_entries[-1][0], None, 200)])
        assert replies == [Reply("retry-2", result_reply_line("op-2", 2, None, 200))]
        reopened.close()


def test_the_ids_are_bounded_by_the_window_and_the_log_keeps_only_the_segments_they_name(tmp_path):
    seqlog = SequencerLog(tmp_path / "log", segment_entries=10)
    core = SequencerCore(REPLICAS, dedup_window_ops=20)
    truncated_after(core, 61, seqlog)
    core.ids.check_invariants()
    assert len(core.ids) == core.status()["IDS_REMEMBERED"] == 20  # op-42 .. op-61
    assert core.ids.get("op-41") is None and core.ids.get("op-42") == (42, fingerprint(deposit("op-42")))
    assert core.ids_kept_from() == 42
    # Segments ending before seq 42 are deleted; 41 .. 60 still name ids (42 .. 60).
    assert [first for first, _path in seqlog.segments("ids-")] == [41, 51]
    assert [first for first, _path in seqlog.segments()] == [61]
    # A forgotten id is a new operation (the replicas have forgotten it too: same window).
    core.submit(deposit("op-1"), "again", "op-1")
    entries = core.take_unlogged()
    assert [(seq, op_id, "RETRY_OF" in decode(line)[0]) for seq, op_id, line in entries] == [(62, "op-1", False)]
    seqlog.append(entries)
    core.on_logged(62)
    assert len(core.ids) == 20 and core.ids.get("op-42") is None and core.ids.get("op-1") == (62, fingerprint(deposit("op-1")))
    seqlog.close()
    reopened = SequencerLog(tmp_path / "log", segment_entries=10)
    entries, log_start = reopened.load()
    restarted = SequencerCore(REPLICAS, next_seq=reopened.last_seq + 1, log_start_seq=log_start, dedup_window_ops=20,
                              log=deque(entries), retired=reopened.retired(log_start))
    names = ["op-1"] + [f"op-{i}" for i in range(40, 62)]
    assert [restarted.ids.get(name) for name in names] == [core.ids.get(name) for name in names]
    reopened.close()


def test_a_truncation_a_crash_left_half_done_is_finished_when_the_log_is_loaded(tmp_path):
    """Truncation renames and deletes segments without syncing the directory: a crash may keep
    some of those changes and lose others, in any order."""
    seqlog = SequencerLog(tmp_path / "log", segment_entries=10)
    core = SequencerCore(REPLICAS)
    truncated_after(core, 61, seqlog)  # every segment but the active one (61) out of the log
    seqlog.close()
    directory = tmp_path / "log"
    (directory / "ids-00000000000000000031.log").rename(directory / "seg-00000000000000000031.log")  # rename lost
    (directory / "ids-00000000000000000011.log").unlink()  # a later truncation's deletions: 11's kept, 1's lost
    reopened = SequencerLog(directory, segment_entries=10)
    entries, log_start = reopened.load()
    assert log_start == 61 and [seq for seq, _id, _line in entries] == [61]
    assert [seq for seq, _id, _line in reopened.retired(log_start)] == list(range(21, 61))
    assert sorted(path.name[:7] for path in directory.iterdir()) == ["ids-000"] * 4 + ["seg-000"]
    reopened.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.sampled_from([0, 1]), st.booleans(), st.booleans()), max_size=80))
def test_the_sequencer_remembers_an_id_while_the_replicas_do_with_the_same_seq(steps):
    """The window counts what the replicas' dedup window counts: the sequencer never renumbers an
    id a replica remembers as a new operation, nor lets a reused id reach the replicas, and every
    reply names the seq the replica applied the operation at."""
    window = 5
    core = SequencerCore(["replica1"], dedup_window_ops=window, result_cache_entries=2)
    replica = Bank(dedup_window_ops=window)
    core.on_subscribe("replica1", 0, replies=[])
    core.choose_results_source("replica1")
    for id_index, needed, other_amount, truncate in steps:
        op = deposit(f"op-{id_index}", cents=200 if other_amount else 100)
        try:
            replies = core.submit(op, "client", op.op_id, needed)
        except SaldoError as refused:
            assert refused.code == "ID_REUSED"
            assert replica.applied(op.op_id).op != op
            continue
        if core.has_unlogged:
            entries = core.take_unlogged()
            replies += core.on_logged(entries[-1][0])[1]
            results = []
            for _seq, _op_id, line in entries:
                seq, logged_op, _retry_of = parse_logged_entry(line.rstrip(b"\n"))
                outcome, _duplicate = replica.apply(logged_op, seq)
                assert outcome.error != "ID_REUSED"  # refused by the sequencer before it got here
                results.append((seq, outcome.error, outcome.balance_cents))
            replies += core.on_applied("replica1", entries[-1][0], results)
        if truncate:
            core.truncate(core.truncation_point())
        for reply in replies:
            answer = json.loads(reply.line)
            assert answer["SEQ"] == replica.applied(answer["ID"]).seq, answer
        for index in range(13):
            applied = replica.applied(f"op-{index}")
            assert core.ids.seq_of(f"op-{index}") == (None if applied is None else applied.seq)
    core.ids.check_invariants()


def test_a_retry_entry_reads_as_its_operation_at_a_replica_and_with_what_it_repeats_in_the_log():
    op = Operation("t-1", TRANSFER, "alice", "bob", 999)
    line = entry_line(62, op, retry_of=13)
    assert parse_entry_line(line.rstrip(b"\n")) is None  # not the canonical form: a replica decodes it
    assert parse_entry(wire.decode_line(line.rstrip(b"\n"))) == (62, op)
    assert parse_logged_entry(line.rstrip(b"\n")) == (62, op, 13)
    assert parse_logged_entry(entry_line(62, op).rstrip(b"\n")) == (62, op, None)
    for bad in (b'"RETRY_OF":62', b'"RETRY_OF":0', b'"RETRY_OF":"13"'):
        with pytest.raises(SaldoError):
            parse_logged_entry(line.rstrip(b"\n").replace(b'"RETRY_OF":13', bad))


def test_too_many_waiting_requests_is_refused_as_overloaded():
    core = SequencerCore(REPLICAS, max_waiting_requests=2)
    core.submit(deposit("op-1"), "c1", "op-1")
    core.submit(deposit("op-2"), "c2", "op-2")
    with pytest.raises(SaldoError) as refused:
        core.submit(deposit("op-3"), "c3", "op-3")
    assert refused.value.code == "OVERLOADED"
    assert core.next_seq == 3  # no number was spent on it


def test_one_replica_sends_the_outcomes_and_another_takes_over_when_it_goes():
    core = SequencerCore(REPLICAS)
    core.on_subscribe("replica1", 0, replies=[])
    assert core.choose_results_source("replica1") == 1  # the source; nothing awaited yet: from the next seq
    core.on_subscribe("replica2", 0, replies=[])
    assert core.choose_results_source("replica2") is None  # one results source at a time
    for index in (1, 2, 3):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}")
    log_all(core)
    assert core.on_applied("replica2", 3, []) == []  # acknowledges only: nobody is answered
    assert [r.client for r in core.on_applied("replica1", 1, [(1, None, 100)])] == ["c1"]
    assert core.on_disconnect("replica2") is None  # not the source: nothing to hand over
    core.on_subscribe("replica2", 3, replies=[])
    assert core.choose_results_source("replica2") is None
    # The source goes before sending 2 and 3: replica2 is asked for outcomes from seq 2 on.
    assert core.on_disconnect("replica1") == ("replica2", 2)
    core.on_subscribe("replica1", 1, replies=[])
    assert core.choose_results_source("replica1") is None
    replies = core.on_applied("replica2", 3, [(2, None, 200), (3, None, 300)])
    assert sorted(r.client for r in replies) == ["c2", "c3"]
    assert core.status()["WAITING_REQUESTS"] == 0
    # Nobody waiting: the next source starts with what comes next.
    assert core.on_disconnect("replica2") == ("replica1", 4)


def subscribed_core(names: list[str]) -> SequencerCore:
    """Every replica subscribed from nothing; the first one is the results source."""
    core = SequencerCore(names, results_source_stall_s=0.5)
    for name in names:
        core.on_subscribe(name, 0, replies=[])
        core.choose_results_source(name)
    return core


def test_a_results_source_that_stalls_while_another_replica_applied_is_replaced():
    core = subscribed_core(REPLICAS)
    assert core.results_source == "replica1"
    core.submit(deposit("op-1"), "c1", "op-1")
    core.submit(deposit("op-2"), "c2", "op-2")
    log_all(core)
    assert core.on_tick(10.0) is None  # nobody applied anything: nothing could come sooner
    assert core.on_applied("replica2", 2, []) == []  # replica2 applied both; replica1 (paused) nothing
    assert core.on_tick(10.1) is None  # seen behind: the clock starts
    assert core.on_tick(10.5) is None  # not stalled long enough yet
    assert core.on_tick(10.6) == ("replica1", "replica2", 1)
    assert core.results_source == "replica2" and core.status()["RESULTS_SOURCE_CHANGES"] == 1
    # replica2, asked (SEND_RESULTS from seq 1), sends what it applied: both clients answered.
    replies = core.on_applied("replica2", 2, [(1, None, 100), (2, None, 200)])
    assert sorted(r.client for r in replies) == ["c1", "c2"]
    # replica1 wakes up and sends its now late outcomes: nobody is answered twice.
    assert core.on_applied("replica1", 2, [(1, None, 100), (2, None, 200)]) == []
    assert core.status()["WAITING_REQUESTS"] == 0


def test_a_source_a_moment_late_after_a_quiet_spell_is_kept_and_a_handover_goes_to_the_most_advanced():
    core = subscribed_core(REPLICAS + ["replica3"])
    assert core.on_tick(0.0) is None
    core.submit(deposit("op-1"), "c1", "op-1")
    log_all(core)
    core.on_applied("replica2", 1, [])  # a millisecond before the source, after a quiet minute
    assert core.on_tick(60.0) is None
    assert [r.client for r in core.on_applied("replica1", 1, [(1, None, 100)])] == ["c1"]
    assert core.on_tick(60.6) is None and core.results_source == "replica1"
    # The source goes: the replica furthest ahead takes over, whatever the order of the names.
    core.submit(deposit("op-2"), "c2", "op-2")
    log_all(core)
    core.on_applied("replica3", 2, [])
    assert core.on_disconnect("replica1") == ("replica3", 2)


def test_a_results_source_is_kept_while_it_progresses_or_while_nobody_could_answer_sooner():
    core = subscribed_core(REPLICAS)
    for index in (1, 2, 3):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}")
    log_all(core)
    assert core.on_tick(0.0) is None
    # It progresses (slowly): kept, however far replica2 is ahead.
    core.on_applied("replica2", 3, [])
    core.on_applied("replica1", 1, [(1, None, 100)])
    assert core.on_tick(0.4) is None
    core.on_applied("replica1", 2, [(2, None, 200)])
    assert core.on_tick(0.8) is None
    assert core.on_tick(1.2) is None  # 0.4 s since its last progress
    # Nobody waits: nothing to gain from a change, however long it is quiet.
    core.on_applied("replica1", 3, [(3, None, 300)])
    assert core.status()["WAITING_REQUESTS"] == 0
    assert core.on_tick(5.0) is None and core.on_tick(50.0) is None
    # Waiting, stalled, but the other replica is no further: kept.
    core.submit(deposit("op-4"), "c4", "op-4")
    log_all(core)
    assert core.on_tick(60.0) is None and core.on_tick(70.0) is None
    assert core.results_source == "replica1"


# --- Replicas: subscribe, resend, snapshot ------------------------------------------------------


def sequenced_core(count: int, **options) -> SequencerCore:
    core = SequencerCore(REPLICAS, **options)
    for index in range(1, count + 1):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}")
    log_all(core)
    return core


def test_subscribe_from_an_old_seq_returns_exactly_the_missing_entries():
    core = sequenced_core(10)
    assert core.on_subscribe("replica1", 6, replies=[]) == ("entries", core.entries_between(7, 10))
    assert seqs_in(core.on_subscribe("replica1", 6, replies=[])[1]) == [7, 8, 9, 10]
    assert [m["ID"] for m in decode(core.on_subscribe("replica2", 0, replies=[])[1])] == [f"op-{i}" for i in range(1, 11)]
    assert core.on_subscribe("replica1", 10, replies=[]) == ("entries", b"")
    assert core.status()["REPLICAS"]["replica1"] == {"APPLIED_SEQ": 10, "SYNCED_SEQ": 10, "CONNECTED": True}
    core.on_disconnect("replica1")
    assert core.status()["REPLICAS"]["replica1"]["CONNECTED"] is False


def test_resend_returns_the_range_asked_for_within_the_log():
    core = sequenced_core(10)
    assert seqs_in(core.on_resend("replica1", 3, 5)[1]) == [3, 4, 5]
    assert seqs_in(core.on_resend("replica1", 9, 50)[1]) == [9, 10]  # not beyond the durable end


def test_subscribe_or_resend_before_the_log_start_asks_for_a_snapshot():
    core = sequenced_core(10)
    core.on_applied("replica1", 10, [])
    core.on_applied("replica2", 5, [])
    assert core.truncation_point() == 6
    assert core.truncate(6) == 5
    assert core.status()["LOG_START_SEQ"] == 6 and core.status()["LOG_ENTRIES"] == 5
    assert core.on_subscribe("replica2", 4, replies=[]) == ("snapshot", b"")
    assert seqs_in(core.on_subscribe("replica2", 5, replies=[])[1]) == [6, 7, 8, 9, 10]
    assert core.on_resend("replica2", 5, 7) == ("snapshot", b"")
    assert seqs_in(core.on_resend("replica2", 6, 7)[1]) == [6, 7]
    # A retry of a truncated operation, its outcome not cached: a retry entry asks the replicas.
    core.submit(deposit("op-2"), "retry", "op-2")
    assert [(seq, decode(line)[0]["RETRY_OF"]) for seq, _id, line in core.take_unlogged()] == [(11, 2)]


def test_truncation_in_chunks_drops_a_bounded_number_per_call_and_ends_where_one_call_would():
    chunked, whole = sequenced_core(10), sequenced_core(10)
    for core in (chunked, whole):
        core.on_applied("replica1", 10, [])
        core.on_applied("replica2", 8, [])
    assert whole.truncate(9) == 8
    assert chunked.truncate(9, max_entries=3) == 3 and chunked.log_start_seq == 4
    assert chunked.on_resend("replica1", 3, 4) == ("snapshot", b"")  # what a chunk dropped is gone
    assert seqs_in(chunked.on_resend("replica1", 4, 5)[1]) == [4, 5]
    assert chunked.truncate(9, max_entries=3) == 3 and chunked.truncate(9, max_entries=3) == 2
    assert chunked.status() == whole.status() and chunked.stats == whole.stats
    assert chunked.truncate(9, max_entries=3) == 0  # nothing left before 9


def test_a_replica_ahead_of_the_log_or_unknown_is_refused():
    core = sequenced_core(3)
    with pytest.raises(SaldoError) as ahead:
        core.on_subscribe("replica1", 4, replies=[])
    assert ahead.value.code == "FIELD_INVALID"
    with pytest.raises(SaldoError):
        core.on_applied("replica1", 4, [])
    with pytest.raises(SaldoError):
        core.on_subscribe("stranger", 0, replies=[])
    with pytest.raises(SaldoError):
        core.on_resend("stranger", 1, 2)


def grow_log(core: SequencerCore, last_seq: int, follower: str | None = None) -> None:
    """Deposits, each logged at once, until the log ends at `last_seq`; `follower` applies (and
    syncs) each one as soon as it is logged."""
    while core.next_seq <= last_seq:
        index = core.next_seq
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}")
        log_all(core)
        if follower is not None:
            core.on_applied(follower, index, [(index, None, 100)])


def test_truncation_point_follows_the_slowest_replica_within_the_max_log_entries_bound():
    core = SequencerCore(REPLICAS, max_log_entries=8)
    grow_log(core, 20, follower="replica1")
    assert core.truncation_point() == 13  # replica2 has nothing: only the bound (20 - 8 + 1)
    core.on_applied("replica2", 15, [])
    assert core.truncation_point() == 16  # the slowest replica still needs 16
    core.on_applied("replica2", 20, [])
    assert core.truncation_point() == 21  # everyone has everything
    unbounded = sequenced_core(20, max_log_entries=1_000)
    unbounded.on_applied("replica1", 20, [])
    unbounded.on_applied("replica2", 3, [])
    assert unbounded.truncation_point() == 4
    unbounded.truncate(4)
    assert unbounded.truncation_point() == 4  # never behind the log start
    # A replica left behind by the bound is counted when the prefix goes.
    core = SequencerCore(REPLICAS, max_log_entries=8)
    grow_log(core, 20, follower="replica1")
    core.truncate(core.truncation_point())
    assert core.stats.replicas_dropped_from_log == 1
    assert core.on_subscribe("replica2", 0, replies=[]) == ("snapshot", b"")


def test_the_bound_never_drops_what_no_replica_has_on_disk_and_a_full_log_takes_no_more():
    """The queue architecture answers a client once its operation is in the log. With every
    replica away, the log is the only copy: the bound must not drop it, so the log stops taking
    operations at the bound until a replica has caught up."""
    core = SequencerCore(REPLICAS, max_log_entries=8)
    for index in range(1, 9):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}", needed=0)
    _data, replies = log_all(core)
    assert len(replies) == 8  # all eight acknowledged: they are in the log
    with pytest.raises(SaldoError) as refused:
        core.submit(deposit("op-9"), "c9", "op-9", needed=0)
    assert refused.value.code == "OVERLOADED" and core.next_seq == 9
    assert core.truncation_point() == 1  # no replica has any of them: all stay
    # A retry of an operation the log holds is still answered.
    assert core.submit(deposit("op-3"), "c3-again", "op-3", needed=0) == [Reply("c3-again", sequenced_reply_line("op-3", 3))]
    # replica1 comes back and has five of them on disk: the log takes five more, and keeps what
    # replica2 lacks as long as the bound allows, never what nobody has.
    core.on_subscribe("replica1", 0, replies=[])
    core.on_applied("replica1", 5, [], synced_seq=5)
    for index in range(9, 14):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}", needed=0)
    log_all(core)
    with pytest.raises(SaldoError):
        core.submit(deposit("op-14"), "c14", "op-14", needed=0)
    assert core.truncation_point() == 6  # 13 - 8 + 1, and replica1 has 1..5
    core.on_applied("replica1", 13, [], synced_seq=13)
    core.submit(deposit("op-14"), "c14", "op-14", needed=0)


def test_a_restarted_orderer_counts_what_it_truncated_before_as_on_every_replicas_disk():
    """Truncation never passed what replicas synced, so the log's start is a floor for all of them
    until they subscribe: a restarted orderer takes operations at once."""
    earlier = SequencerCore(REPLICAS, max_log_entries=8)
    grow_log(earlier, 20, follower="replica1")
    earlier.on_applied("replica2", 20, [])
    earlier.truncate(earlier.truncation_point())
    restarted = SequencerCore(REPLICAS, next_seq=21, log_start_seq=earlier.log_start_seq,
                              max_log_entries=8, log=deque(earlier.log))
    assert restarted.truncation_point() == 21
    assert restarted.submit(deposit("op-21"), "c21", "op-21") == []


def test_the_log_keeps_what_a_replica_applied_until_that_replica_has_it_on_disk():
    """A replica commits without syncing and syncs once in a while: a power loss could take back
    what it applied since. The log must still hold that, so the replica can ask for it again."""
    core = sequenced_core(20)
    core.on_applied("replica1", 20, [], synced_seq=20)
    core.on_applied("replica2", 20, [], synced_seq=12)  # applied 20, only 12 of them on its disk
    assert core.truncation_point() == 13
    core.truncate(13)
    # The power goes out at replica2; its disk kept up to 12: it subscribes from there, and the
    # log still has every entry it lost.
    core.on_disconnect("replica2")
    assert seqs_in(core.on_subscribe("replica2", 12, replies=[])[1]) == list(range(13, 21))
    # Later acknowledgements move the point on; one that reports less on disk never moves it back.
    core.on_applied("replica2", 20, [], synced_seq=18)
    core.on_applied("replica2", 20, [], synced_seq=15)
    assert core.truncation_point() == 19
    assert core.status()["REPLICAS"]["replica2"]["SYNCED_SEQ"] == 18


# --- The replica core ---------------------------------------------------------------------------


def entries(*seqs: int) -> list[tuple[int, Operation]]:
    return [(seq, deposit(f"op-{seq}")) for seq in seqs]


def delivered_seqs(delivered) -> list[int]:
    return [seq for seq, _op in delivered]


@settings(max_examples=300, deadline=None)
@given(
    order=st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.permutations(list(range(1, n + 1)) * 2).map(lambda p: (n, p))
    ),
    batch_sizes=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20),
    start=st.integers(min_value=0, max_value=5),
)
def test_the_replica_delivers_in_order_whatever_the_arrival_order_and_duplicates(order, batch_sizes, start):
    count, arrivals = order
    core = SequencedReplicaCore(last_delivered_seq=start)
    # Entries up to `start` were applied before (they arrive again as duplicates).
    delivered: list[int] = []
    position = 0
    now = 0.0
    index = 0
    while position < len(arrivals):
        size = batch_sizes[index % len(batch_sizes)]
        index += 1
        batch = entries(*arrivals[position : position + size])
        position += size
        now += 0.1
        out, _resend = core.on_entries(batch, now)
        got = delivered_seqs(out)
        assert got == list(range(len(delivered) + start + 1, len(delivered) + start + 1 + len(got)))
        delivered += got
    assert delivered == list(range(start + 1, max(count, start) + 1))
    assert core.last_delivered_seq == max(count, start)
    assert core.held_count == 0
    # Copies of delivered entries are counted as ignored (copies of a held one are just dropped).
    assert core.duplicates_ignored <= 2 * count - len(delivered)


@settings(max_examples=200, deadline=None)
@given(
    copies=st.lists(st.integers(min_value=0, max_value=2), min_size=1, max_size=30),
    shuffle_seed=st.randoms(use_true_random=False),
    lost_answers=st.lists(st.booleans(), max_size=20),
    batch=st.integers(min_value=1, max_value=5),
)
def test_with_lost_entries_the_replica_gets_everything_in_order_by_asking_again(copies, shuffle_seed, lost_answers, batch):
    # Each entry arrives 0, 1 or 2 times, in any order (the last one at least once: a later entry
    # is what reveals a gap); every RESEND is answered by the "sequencer", but some answers are
    # lost too, and then the replica must ask again after its timeout.
    count = len(copies)
    copies[-1] = max(1, copies[-1])
    network = [seq for seq, times in enumerate(copies, start=1) for _ in range(times)]
    shuffle_seed.shuffle(network)
    core = SequencedReplicaCore(last_delivered_seq=0, resend_timeout_s=1.0)
    delivered: list[int] = []
    answers = iter(lost_answers)
    now = 0.0
    for _step in range(2_000):
        if not network and core.held_count == 0:
            break
        now += 0.3
        arrived, network = network[:batch], network[batch:]
        out, resend = core.on_entries(entries(*arrived), now)
        delivered += delivered_seqs(out)
        for asked in (resend, core.on_tick(now)):
            if asked is not None:
                assert asked[0] == core.last_delivered_seq + 1 and asked[0] <= asked[1] < count
                if not next(answers, False):
                    network += list(range(asked[0], asked[1] + 1))
    assert delivered == list(range(1, count + 1))
    assert core.held_count == 0


def test_a_gap_is_asked_for_once_and_again_after_the_resend_timeout():
    core = SequencedReplicaCore(last_delivered_seq=0, resend_timeout_s=1.0)
    out, resend = core.on_entries(entries(1, 4), 10.0)
    assert delivered_seqs(out) == [1] and resend == (2, 3)
    assert core.gaps_seen == 1
    out, resend = core.on_entries(entries(5, 6), 10.2)  # the same gap: not asked again yet
    assert out == [] and resend is None
    assert core.on_tick(10.9) is None
    assert core.on_tick(11.0) == (2, 3)  # the resend did not come in time: ask again
    assert core.on_tick(11.5) is None
    out, resend = core.on_entries(entries(3), 11.6)  # half the gap filled: 2 is still missing
    assert out == [] and resend is None
    assert core.on_tick(12.0) == (2, 2)
    out, resend = core.on_entries(entries(2), 12.1)
    assert delivered_seqs(out) == [2, 3, 4, 5, 6] and resend is None
    assert core.held_count == 0 and core.on_tick(20.0) is None
    # A new gap further on is a new question at once.
    out, resend = core.on_entries(entries(9), 20.1)
    assert out == [] and resend == (7, 8) and core.gaps_seen == 2


def test_the_replica_holds_at_most_max_held_entries_and_recovers_the_rest_by_resend():
    core = SequencedReplicaCore(last_delivered_seq=0, max_held_entries=3)
    out, resend = core.on_entries(entries(*range(2, 11)), 1.0)  # 1 is missing
    assert out == [] and resend == (1, 1)
    assert core.held_count == 3  # 2, 3, 4 kept; 5..10 dropped
    out, _ = core.on_entries(entries(1), 1.1)
    assert delivered_seqs(out) == [1, 2, 3, 4]
    out, resend = core.on_entries(entries(11), 1.2)  # the next live entry reveals the dropped ones
    assert out == [] and resend == (5, 10)
    out, _ = core.on_entries(entries(*range(5, 11)), 1.3)
    assert delivered_seqs(out) == list(range(5, 12))


def test_reset_after_a_snapshot_continues_from_its_seq():
    core = SequencedReplicaCore(last_delivered_seq=2, resend_timeout_s=1.0)
    core.on_entries(entries(8, 12, 13), 1.0)
    assert core.held_count == 3
    core.reset(10)  # a snapshot taken at seq 10 was installed
    assert core.last_delivered_seq == 10 and core.held_count == 2  # 8 is covered by the snapshot
    assert core.on_tick(5.0) is None  # no resend outstanding after the reset
    out, resend = core.on_entries(entries(9, 11), 5.1)
    assert delivered_seqs(out) == [11, 12, 13] and resend is None
    assert core.duplicates_ignored == 1


# --- Lines: ORDERED entries and APPLIED acknowledgements ----------------------------------------


@pytest.mark.parametrize("op", [
    Operation("0192a7c4-1b2c-7d3e-8f40-123456789abc", DEPOSIT, "alice", None, 1),
    Operation("op:1.x_y-z", WITHDRAW, "b.o-b@example_9", None, 12_345),
    Operation("t-1", TRANSFER, "alice", "bob", 999),
])
def test_entry_line_round_trips_through_the_wire_codec(op):
    line = entry_line(42, op)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    message = wire.decode_line(line.rstrip(b"\n"))
    assert message["TASK"] == "ORDERED"
    assert parse_entry(message) == (42, op)


VALID_ENTRY = {"TASK": "ORDERED", "SEQ": 7, "ID": "op-7", "OP": "DEPOSIT", "ACCOUNT": "alice", "AMOUNT_CENTS": 100}
VALID_TRANSFER = {"TASK": "ORDERED", "SEQ": 7, "ID": "op-7", "OP": "TRANSFER", "FROM": "a", "TO": "b", "AMOUNT_CENTS": 100}


@pytest.mark.parametrize("change, code", [
    ({"SEQ": "7"}, "FIELD_TYPE"),
    ({"SEQ": 0}, "FIELD_TYPE"),
    ({"SEQ": True}, "FIELD_TYPE"),
    ({"SEQ": 7.0}, "FIELD_TYPE"),
    ({"SEQ": None}, "FIELD_TYPE"),
    ({"ID": 7}, "ID_INVALID"),
    ({"ID": "has space"}, "ID_INVALID"),
    ({"ID": "x" * 65}, "ID_INVALID"),
    ({"OP": "BALANCE"}, "FIELD_INVALID"),
    ({"OP": None}, "FIELD_INVALID"),
    ({"AMOUNT_CENTS": 0}, "FIELD_INVALID"),
    ({"AMOUNT_CENTS": -5}, "FIELD_INVALID"),
    ({"AMOUNT_CENTS": "100"}, "FIELD_INVALID"),
    ({"AMOUNT_CENTS": 10**30}, "FIELD_INVALID"),
    ({"ACCOUNT": ["alice"]}, "ACCOUNT_INVALID"),
    ({"ACCOUNT": "al ice"}, "ACCOUNT_INVALID"),
    ({"ACCOUNT": None}, "ACCOUNT_INVALID"),
])
def test_parse_entry_rejects_a_malformed_entry(change, code):
    with pytest.raises(SaldoError) as rejected:
        parse_entry({**VALID_ENTRY, **change})
    assert rejected.value.code == code


@pytest.mark.parametrize("change, code", [
    ({"TO": "a"}, "FIELD_INVALID"),
    ({"TO": None}, "FIELD_INVALID"),
    ({"FROM": 5}, "FIELD_INVALID"),
    ({"TO": "b\n"}, "ACCOUNT_INVALID"),
])
def test_parse_entry_rejects_a_malformed_transfer(change, code):
    with pytest.raises(SaldoError) as rejected:
        parse_entry({**VALID_TRANSFER, **change})
    assert rejected.value.code == code


def test_applied_line_round_trips_through_the_wire_codec():
    results = [(41, None, 12_050), (42, "INSUFFICIENT_FUNDS", None), (43, "ACCOUNT_NOT_FOUND", None), (44, None, 0)]
    line = applied_line(44, results, 40)
    message = wire.decode_line(line.rstrip(b"\n"))
    assert message["TASK"] == "APPLIED"
    assert parse_applied(message) == (44, 40, results)
    assert parse_applied(wire.decode_line(applied_line(9, [], 9).rstrip(b"\n"))) == (9, 9, [])
    # A replica that does not say SYNCED has every commit on disk.
    assert parse_applied({"TASK": "APPLIED", "UPTO": 7, "RESULTS": []}) == (7, 7, [])
    # The largest acknowledgement a replica sends fits within the replica link's line limit.
    big = applied_line(10**12, [(10**12 - i, "INSUFFICIENT_FUNDS", None) for i in range(MAX_RESULTS_PER_ACK)], 10**12)
    assert len(big) < 1024 * 1024


@pytest.mark.parametrize("message, code", [
    ({"UPTO": "5", "RESULTS": []}, "FIELD_TYPE"),
    ({"UPTO": -1, "RESULTS": []}, "FIELD_TYPE"),
    ({"UPTO": None}, "FIELD_TYPE"),
    ({"UPTO": 5, "RESULTS": {"5": None}}, "FIELD_TYPE"),
    ({"UPTO": 5, "RESULTS": [[5, None]]}, "FIELD_TYPE"),
    ({"UPTO": 5, "RESULTS": [5]}, "FIELD_TYPE"),
    ({"UPTO": 5, "RESULTS": [[6, None, 1]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[0, None, 1]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [["5", None, 1]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[5, "NOT_A_CODE", None]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[5, 7, None]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[5, None, "1.00"]]}, "FIELD_INVALID"),
    # An outcome is an error without a balance or a balance without an error, never neither.
    ({"UPTO": 5, "RESULTS": [[5, None, None]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[5, None, -1]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[5, None, 10**30]]}, "FIELD_INVALID"),
    ({"UPTO": 5, "RESULTS": [[5, "INSUFFICIENT_FUNDS", 100]]}, "FIELD_INVALID"),
    ({"UPTO": 10**9, "RESULTS": [[1, None, 1]] * (MAX_RESULTS_PER_ACK + 1)}, "FIELD_TYPE"),
    ({"UPTO": 5, "SYNCED": 6, "RESULTS": []}, "FIELD_INVALID"),
    ({"UPTO": 5, "SYNCED": -1, "RESULTS": []}, "FIELD_INVALID"),
    ({"UPTO": 5, "SYNCED": "5", "RESULTS": []}, "FIELD_INVALID"),
    ({"UPTO": 5, "SYNCED": None, "RESULTS": []}, "FIELD_INVALID"),
])
def test_parse_applied_rejects_a_malformed_acknowledgement(message, code):
    with pytest.raises(SaldoError) as rejected:
        parse_applied({"TASK": "APPLIED", **message})
    assert rejected.value.code == code


def test_a_client_attached_to_an_applied_seq_before_the_replicas_return_is_renumbered_when_they_do() -> None:
    """After a restart the core does not know what the replicas applied. A retry that attaches to
    its old number must not wait forever once a replica reports it applied that number already."""
    op = Operation("retry-1", "DEPOSIT", "alice", None, 500)
    first = SequencerCore(replica_names=["r1", "r2"])
    first.submit(op, "client-a", op.op_id, 1)
    first.on_logged(first.take_unlogged()[-1][0])
    restarted = SequencerCore(replica_names=["r1", "r2"], next_seq=first.next_seq, log=deque(first.log))
    assert restarted.submit(op, "client-b", op.op_id, 1) == []  # attached to seq 1: nothing applied yet, as far as it knows
    restarted.on_subscribe("r1", last_applied_seq=1, replies=[])  # r1 applied seq 1 before the restart
    renumbered = restarted.take_unlogged()
    assert [(seq, op_id, decode(line)[0]["RETRY_OF"]) for seq, op_id, line in renumbered] == [(2, "retry-1", 1)]
    restarted.on_logged(2)
    replies = restarted.on_applied("r1", 2, [(2, None, 500)])
    assert [(reply.client, json.loads(reply.line)["SEQ"]) for reply in replies] == [("client-b", 1)]


def test_a_replica_that_becomes_the_results_source_when_none_is_left_is_asked_for_what_clients_await():
    """Both replicas went away after applying; the first to come back must send the outcomes
    of what clients still wait for, or they would wait until their own timeouts."""
    core = SequencerCore(REPLICAS)
    core.on_subscribe("replica1", 0, replies=[])
    core.choose_results_source("replica1")
    core.on_subscribe("replica2", 0, replies=[])
    for index in (1, 2, 3):
        core.submit(deposit(f"op-{index}"), f"c{index}", f"op-{index}")
    log_all(core)
    assert core.on_disconnect("replica2") is None
    assert core.on_disconnect("replica1") is None  # the source went, and nobody is left to take over
    core.on_subscribe("replica2", 3, replies=[])  # it had applied 1..3 before going
    assert core.choose_results_source("replica2") == 1  # the oldest seq a client awaits
    replies = core.on_applied("replica2", 3, [(1, None, 100), (2, None, 200), (3, None, 300)])
    assert sorted(r.client for r in replies) == ["c1", "c2", "c3"]


def test_a_client_waiting_for_every_replica_is_answered_when_the_last_one_resubscribes_past_its_seq():
    """replica2 applied op-1 but its APPLIED was lost with the connection: it names the seq when it
    subscribes again, and that is the news the client waits for."""
    core = subscribed_core(REPLICAS)
    core.submit(deposit("op-1"), "client", "op-1", needed=2)
    log_all(core)
    assert core.on_applied("replica1", 1, [(1, None, 100)]) == []  # one of two
    core.on_disconnect("replica2")
    released = []
    core.on_subscribe("replica2", 1, replies=released)
    assert [(reply.client, b'"STATUS":"OK"' in reply.line) for reply in released] == [("client", True)]
    assert core.status()["WAITING_REQUESTS"] == 0


def test_retries_of_one_operation_wait_under_the_same_bound_as_new_requests():
    core = SequencerCore(["replica1"], max_waiting_requests=10)
    core.on_subscribe("replica1", 0, replies=[])
    op = deposit("op-1")
    core.submit(op, "client", "op-1")
    log_all(core)  # numbered and logged, but the replica is away: no answer comes
    for _ in range(9):
        assert core.submit(op, "client", "op-1") == []
    with pytest.raises(SaldoError, match="OVERLOADED"):
        core.submit(op, "client", "op-1")
    assert core.status()["WAITING_REQUESTS"] == 10


def test_an_id_given_to_another_operation_is_refused_while_a_retry_of_the_same_one_waits():
    core = subscribed_core(REPLICAS)
    core.submit(deposit("op-1"), "c1", "op-1")
    for stage in ("pending", "logged"):
        with pytest.raises(SaldoError, match="ID_REUSED"):
            core.submit(deposit("op-1", cents=200), "c2", "op-1")  # another amount under the same id
        with pytest.raises(SaldoError, match="ID_REUSED"):
            core.submit(deposit("op-1", account="bob"), "c2", "op-1")
        assert core.submit(deposit("op-1"), "c3", "op-1") == []  # the same operation: a retry, it waits
        if stage == "pending":
            log_all(core)
    assert core.status()["SEQUENCED_TOTAL"] == 1


# --- The node (common/sequencer/sequencer.py) around its log, without sockets ----------------------


class FakeClient:
    """A client connection as the node sees it: what it was sent."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def send_bytes(self, line: bytes) -> None:
        self.lines.append(line)

    def flush(self) -> None:
        pass


def sequencer_node_on(seqlog: SequencerLog):
    """A SequencerNode (for two replicas) on this log; call it inside the running loop."""
    import argparse

    from common.sequencer.sequencer import SequencerNode

    args = argparse.Namespace(host="127.0.0.1", peer_hosts="127.0.0.1", name="sequencer")
    return SequencerNode(args, SequencerCore(REPLICAS), seqlog)


def test_a_log_write_does_not_wait_behind_a_truncation_that_is_deleting_segments(tmp_path, monkeypatch):
    """Deleting a segment takes the filesystem milliseconds; the writer of the next group must
    not queue behind it (it did, once a second under load)."""
    import asyncio
    import threading

    from common.sequencer.sequencer import INLINE_LOG_WRITE_MAX_ENTRIES

    async def scenario() -> None:
        seqlog = SequencerLog(tmp_path / "log", segment_entries=2)
        node = sequencer_node_on(seqlog)
        core = node.core
        deleting, release = threading.Event(), threading.Event()

        def slow_truncate_before(seq: int, ids_from_seq: int) -> int:
            deleting.set()
            release.wait(30)
            return 1

        monkeypatch.setattr(seqlog, "truncate_before", slow_truncate_before)
        monkeypatch.setattr(core, "truncation_point", lambda: 2)
        truncation = asyncio.ensure_future(node._truncate())
        assert await asyncio.to_thread(deleting.wait, 10)
        client = FakeClient()
        count = INLINE_LOG_WRITE_MAX_ENTRIES + 4  # a group large enough for the writer's thread
        for index in range(count):
            assert core.submit(deposit(f"op-{index}"), client, f"op-{index}", needed=0) == []
        node.schedule_log_write()
        for _ in range(1000):  # (at most 10 s)
            if len(client.lines) == count:
                break
            await asyncio.sleep(0.01)
        truncation_was_running = not release.is_set() and not truncation.done()
        release.set()
        await truncation
        node.executor.shutdown(wait=True)
        node.trim_executor.shutdown(wait=True)
        seqlog.close()
        assert truncation_was_running
        assert [json.loads(line)["SEQ"] for line in client.lines] == list(range(1, count + 1))

    asyncio.run(scenario())


@pytest.mark.parametrize("group", ["inline", "thread"])
def test_a_log_write_that_fails_stops_the_sequencer_before_anything_is_broadcast_or_answered(tmp_path, monkeypatch, group):
    """A failed write leaves numbers handed out that the disk may not hold: fail-stop, and a
    restart continues from what the log kept."""
    import asyncio

    from common.sequencer import sequencer as sequencer_node
    from common.storage.durable import EXIT_STORE_FAILURE

    exits: list = []
    client = FakeClient()

    async def scenario() -> None:
        seqlog = SequencerLog(tmp_path / "log")
        node = sequencer_node_on(seqlog)
        core = node.core

        def full_disk(entries) -> None:
            raise OSError(28, "No space left on device")

        def exit_now(code: int) -> None:
            exits.append(code)
            raise SystemExit(code)  # out of the loop, as the process would end

        monkeypatch.setattr(seqlog, "append", full_disk)
        monkeypatch.setattr(sequencer_node.os, "_exit", exit_now)
        count = 1 if group == "inline" else sequencer_node.INLINE_LOG_WRITE_MAX_ENTRIES + 1
        for index in range(count):
            core.submit(deposit(f"op-{index}"), client, f"op-{index}", needed=0)
        node.schedule_log_write()
        await asyncio.sleep(10)  # (the failed write ends the run long before)

    with pytest.raises(SystemExit):
        asyncio.run(scenario())
    assert exits == [EXIT_STORE_FAILURE]
    assert client.lines == []


def test_clients_waiting_for_an_apply_while_no_replica_is_connected_are_told_so_and_the_entry_stays():
    core = SequencerCore(REPLICAS, no_replica_answer_s=1.0)
    core.on_subscribe("replica1", 0, replies=[])
    core.on_disconnect("replica1")  # the last replica left
    core.submit(deposit("op-1"), "applied", "op-1")
    core.submit(deposit("op-2"), "logged", "op-2", needed=0)
    log_all(core)
    assert core.answer_waiters_without_replica(now_s=10.0) == []  # the clock starts when no replica is first seen
    assert core.answer_waiters_without_replica(now_s=10.9) == []
    replies = replies_by_client(core.answer_waiters_without_replica(now_s=11.0))
    [told] = replies.pop("applied")
    assert replies == {}  # "logged" was answered when its entry was durable
    assert (told["ERROR"], told["DEFINITE"], told["SEQ"]) == ("NO_REPLICA", False, 1)
    assert "replica1, replica2" in told["DETAIL"]
    assert core.status()["WAITING_REQUESTS"] == 0
    # A retry waits again; once a replica is back, it gets the result, and nothing is numbered twice.
    assert core.submit(deposit("op-1"), "retry", "op-1") == []
    _kind, data = core.on_subscribe("replica2", 0, replies=[])
    assert core.answer_waiters_without_replica(now_s=20.0) == []
    assert seqs_in(data) == [1, 2]
    replies = core.on_applied("replica2", 2, [(1, None, 100), (2, None, 200)])
    assert replies_by_client(replies) == {"retry": [{"ID": "op-1", "STATUS": "OK", "BALANCE": "1.00", "SEQ": 1}]}
