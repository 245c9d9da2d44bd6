"""The primary-backup protocol core (common/primary_backup/core.py), without sockets or wall clocks.

Two layers of tests:

- the pieces, one rule at a time: the voter (one vote per epoch, promises, quiet after a restart,
  the sync set, the up-to-date rule), the lease arithmetic, the in-memory log, the rejoin plan, the
  message parsers and the voter record's persistence formats;
- a discrete-event simulation of a whole cluster (`Sim`) that drives the real ReplicaCore and Voter
  objects the way common/primary_backup/replica.py and common/primary_backup/witness.py do: records persisted before
  the answers that depend on them, group commits that take time, one FIFO connection per direction
  with its own delays (so messages of different links reorder), connections that break and
  reconnect, crashes that lose what was not on disk, SIGSTOP-like pauses, and clocks that run at
  slightly different rates. After every event it checks that at most one replica may acknowledge;
  whenever a replica becomes primary (sync mode) it checks that it holds every acknowledged write.
  Scripted scenarios cover failover, partitions, pauses, sync-set changes and rejoin; hypothesis
  plays random fault schedules against the same checks.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.bank.errors import SaldoError
from common.bank.state import DEPOSIT, TRANSFER, Operation
from common.primary_backup.core import (
    ALREADY_VOTED,
    ASYNC,
    BACKUP,
    BEHIND,
    CANDIDATE,
    EPOCH_HAS_PRIMARY,
    LEASE_ACTIVE,
    LEASE_TOO_LONG,
    MAX_ENTRIES_PER_APPEND,
    NOT_IN_SYNC_SET,
    PRIMARY,
    REPLAY,
    RESTARTED,
    SERVING_AS_PRIMARY,
    SNAPSHOT,
    STALE_EPOCH,
    SYNC,
    Decision,
    Effects,
    Lease,
    Position,
    ReplicaCore,
    ReplicationLog,
    SyncSet,
    Timing,
    Voter,
    VoteRequest,
    VoterRecord,
    append_line,
    entry_text,
    lease_reply_message,
    parse_append,
    parse_append_line,
    parse_lease_reply,
    parse_lease_request,
    parse_vote_reply,
    parse_vote_request,
    plan_catch_up,
    record_from_json,
    record_from_meta,
    record_to_json,
    record_to_meta,
    vote_reply_message,
)
from common.transport import wire

TIMING = Timing(lease_duration_s=1.0, heartbeat_interval_s=0.1, backup_timeout_s=0.5, vote_timeout_s=0.3,
                election_stagger_s=0.1, clock_drift=0.05, replication_interval_s=0.01)
REPLICAS = ["r1", "r2"]


# --- The voter ----------------------------------------------------------------------------------


def voter(record: VoterRecord | None = None, started_at_s: float = 0.0, name: str = "w") -> Voter:
    return Voter(name, ["r1", "r2", "r3"], record or VoterRecord(), TIMING, started_at_s)


def test_a_voter_votes_once_per_epoch_and_repeats_its_answer_to_the_same_candidate():
    v = voter()
    assert v.decide_vote(1, "r1", Position(0, 0), None, 0.0, pre=False).granted
    assert v.take_dirty() == VoterRecord(1, "r1", None)
    assert v.decide_vote(1, "r1", Position(0, 0), None, 0.1, pre=False).granted  # a retransmission
    assert v.decide_vote(1, "r2", Position(0, 0), None, 0.2, pre=False) == (False, ALREADY_VOTED)
    assert v.decide_vote(0, "r2", Position(0, 0), None, 0.2, pre=False) == (False, STALE_EPOCH)


def test_a_vote_is_a_lease_grant_so_no_other_candidate_wins_until_it_runs_out():
    v = voter()
    assert v.decide_vote(1, "r1", Position(0, 0), None, 0.0, pre=False).granted
    assert v.decide_vote(2, "r2", Position(0, 0), None, 0.99, pre=True) == (False, LEASE_ACTIVE)
    assert v.decide_vote(2, "r2", Position(0, 0), None, 1.0, pre=True).granted


def test_a_pre_vote_promises_nothing():
    v = voter()
    assert v.decide_vote(1, "r1", Position(0, 0), None, 0.0, pre=True).granted
    assert v.take_dirty() is None and v.record == VoterRecord()
    assert v.decide_vote(1, "r2", Position(0, 0), None, 0.0, pre=False).granted


def test_a_lease_renewal_extends_the_promise_and_a_newer_epoch_is_stored_first():
    v = voter()
    assert v.decide_lease(3, "r2", None, 1.0, 5.0).granted
    assert v.take_dirty() == VoterRecord(3, None, None)  # learnt epoch 3 from its primary
    assert v.decide_lease(3, "r2", None, 1.0, 5.5).granted
    assert v.take_dirty() is None  # nothing new to store
    assert v.decide_vote(3, "r1", Position(0, 0), None, 9.0, pre=False) == (False, EPOCH_HAS_PRIMARY)
    assert v.decide_vote(4, "r1", Position(0, 0), None, 6.49, pre=False) == (False, LEASE_ACTIVE)
    assert v.decide_vote(4, "r1", Position(0, 0), None, 6.5, pre=False).granted


def test_a_lease_from_an_older_epoch_or_a_second_primary_of_one_epoch_is_refused():
    v = voter()
    assert v.decide_lease(3, "r2", None, 1.0, 0.0).granted
    assert v.decide_lease(2, "r1", None, 1.0, 0.1) == (False, STALE_EPOCH)
    assert v.decide_lease(3, "r1", None, 1.0, 0.2) == (False, LEASE_ACTIVE)
    assert v.decide_lease(4, "r1", None, 1.0, 0.3).granted  # it won epoch 4 elsewhere: it is the primary now


def test_a_lease_longer_than_the_voter_honours_after_a_restart_is_refused():
    assert voter().decide_lease(1, "r1", None, TIMING.lease_duration_s + 0.001, 0.0) == (False, LEASE_TOO_LONG)


def test_a_restarted_voter_stays_quiet_for_a_lease_unless_it_never_promised_anything():
    restarted = voter(VoterRecord(5, "r1", None), started_at_s=100.0)
    quiet_s = TIMING.quiet_after_restart_s
    assert restarted.decide_vote(6, "r2", Position(5, 9), None, 100.0 + quiet_s - 0.01, pre=True) == (False, RESTARTED)
    assert restarted.decide_vote(6, "r2", Position(5, 9), None, 100.0 + quiet_s, pre=True).granted
    assert voter(VoterRecord(), started_at_s=100.0).decide_vote(1, "r2", Position(0, 0), None, 100.0, pre=True).granted


def test_only_members_of_the_newest_known_sync_set_are_eligible():
    v = voter()
    assert v.decide_lease(2, "r1", SyncSet(2, 3, ("r1",)), 1.0, 0.0).granted
    assert v.record.sync_set == SyncSet(2, 3, ("r1",))
    assert v.decide_lease(2, "r1", SyncSet(2, 2, ("r1", "r2")), 1.0, 0.1).granted  # an older proposal, late
    assert v.record.sync_set == SyncSet(2, 3, ("r1",)), "an older sync set never replaces a newer one"
    assert v.decide_vote(3, "r2", Position(2, 50), None, 5.0, pre=True) == (False, NOT_IN_SYNC_SET)
    assert v.decide_vote(3, "r1", Position(2, 50), None, 5.0, pre=True).granted


def test_a_replica_voter_refuses_a_candidate_whose_log_is_older_than_its_own():
    v = voter(name="r3")
    own = Position(4, 100)
    assert v.decide_vote(5, "r1", Position(4, 99), own, 0.0, pre=True) == (False, BEHIND)
    assert v.decide_vote(5, "r1", Position(3, 500), own, 0.0, pre=True) == (False, BEHIND)  # the epoch counts first
    assert v.decide_vote(5, "r1", Position(4, 100), own, 0.0, pre=True).granted


def test_the_primary_votes_for_nobody_and_keeps_its_promise_for_a_lease_after_stepping_down():
    v = voter(name="r1")
    v.serving_as_primary = True
    assert v.decide_vote(9, "r2", Position(9, 9), None, 0.0, pre=True) == (False, SERVING_AS_PRIMARY)
    v.step_down(10.0)
    assert v.decide_vote(9, "r2", Position(9, 9), None, 10.5, pre=True) == (False, LEASE_ACTIVE)
    assert v.decide_vote(9, "r2", Position(9, 9), None, 11.0, pre=True).granted


# --- The lease ----------------------------------------------------------------------------------


def test_the_lease_runs_from_the_send_time_of_the_grant_completing_a_majority_minus_the_drift():
    lease = Lease("r1", ["r1", "r2", "w"], TIMING)
    assert not lease.valid(0.0)
    first = lease.new_round(10.0)
    lease.on_reply("w", first, True, None)
    assert lease.expiry_s() == pytest.approx(10.0 + TIMING.lease_duration_s * (1 - TIMING.clock_drift))
    second = lease.new_round(10.1)
    lease.on_reply("r2", second, False, None)  # a refusal extends nothing
    assert lease.expiry_s() == pytest.approx(10.95)
    lease.on_reply("r2", first, True, None)  # a late grant of the first round
    lease.on_reply("w", second, True, None)
    assert lease.expiry_s() == pytest.approx(10.1 + 0.95)
    lease.on_reply("w", 999, True, None)  # a round it never sent: ignored
    assert lease.expiry_s() == pytest.approx(11.05)


def test_with_four_voters_the_lease_needs_two_other_grants():
    lease = Lease("r1", ["r1", "r2", "r3", "w"], TIMING)
    round_id = lease.new_round(0.0)
    lease.on_reply("w", round_id, True, None)
    assert not lease.valid(0.1)
    lease.on_reply("r3", round_id, True, None)
    assert lease.valid(0.1)


def test_a_sync_set_is_committed_once_a_majority_including_the_primary_has_stored_it():
    lease = Lease("r1", ["r1", "r2", "w"], TIMING)
    lease.on_reply("w", lease.new_round(0.0), True, (4, 2))
    assert not lease.stored_by_majority((4, 2), stored_here=False)
    assert lease.stored_by_majority((4, 2), stored_here=True)
    assert not lease.stored_by_majority((4, 3), stored_here=True)


# --- The log, the rejoin plan, the messages -------------------------------------------------------


def op(n: int, kind: str = DEPOSIT) -> Operation:
    if kind == TRANSFER:
        return Operation(f"op-{n}", TRANSFER, "alice", "bob", 100 + n)
    return Operation(f"op-{n}", DEPOSIT, "alice", None, 100 + n)


def test_the_log_keeps_a_bounded_suffix_and_knows_each_entrys_epoch():
    log = ReplicationLog(Position(2, 10), max_entries=5)
    assert log.epoch_at(10) == 2 and log.epoch_at(11) is None and log.position == Position(2, 10)
    for seq in range(11, 19):
        log.append(seq, 3 if seq < 15 else 4, entry_text(op(seq), None))
    assert len(log) == 5 and log.base == Position(3, 13) and log.position == Position(4, 18)
    assert [log.epoch_at(s) for s in (12, 13, 14, 15, 18, 19)] == [None, 3, 3, 4, 4, None]
    runs = log.runs(14, 18)
    assert [(epoch, first, len(texts)) for epoch, first, texts in runs] == [(3, 14, 1), (4, 15, 4)]
    with pytest.raises(AssertionError):
        log.append(20, 4, "x")  # a gap
    with pytest.raises(AssertionError):
        log.append(19, 3, "x")  # an older epoch after a newer one


def test_long_runs_are_cut_to_the_append_limit():
    log = ReplicationLog(Position(0, 0))
    for seq in range(1, MAX_ENTRIES_PER_APPEND * 2 + 2):
        log.append(seq, 1, entry_text(op(seq), None))
    assert [len(texts) for _e, _f, texts in log.runs(1, log.last_seq)] == [MAX_ENTRIES_PER_APPEND, MAX_ENTRIES_PER_APPEND, 1]


@pytest.mark.parametrize(
    "backup, plan",
    [
        (Position(0, 0), SNAPSHOT),  # behind the log held in memory
        (Position(3, 13), REPLAY),  # the log's base: a prefix
        (Position(3, 14), REPLAY),
        (Position(4, 18), REPLAY),  # level with the primary
        (Position(3, 16), SNAPSHOT),  # seq 16 is epoch 4 here: a former primary's own entries
        (Position(4, 19), SNAPSHOT),  # ahead: operations the primary never had
        (Position(5, 18), SNAPSHOT),
    ],
)
def test_rejoin_replays_only_a_prefix_of_the_primarys_log(backup, plan):
    log = ReplicationLog(Position(3, 13))
    for seq in range(14, 19):
        log.append(seq, 3 if seq < 15 else 4, entry_text(op(seq), None))
    assert plan_catch_up(log, backup)[0] == plan


def decoded(line: bytes) -> dict:
    return wire.decode_line(line.rstrip(b"\n"))


def test_append_round_trips_and_every_damage_is_refused_with_a_code():
    texts = [entry_text(op(1), None), entry_text(op(2, TRANSFER), "INSUFFICIENT_FUNDS")]
    message = decoded(append_line(7, 12, 6, 11, texts))
    append = parse_append(message)
    assert append.epoch == 7 and append.from_seq == 11 and append.entry_epoch == 6 and append.primary_seq == 12
    assert append.entries == [(op(1), None), (op(2, TRANSFER), "INSUFFICIENT_FUNDS")]
    damaged = {
        "EPOCH": ("EPOCH", 0, "FIELD_INVALID"),
        "ENTRY_EPOCH": ("ENTRY_EPOCH", 8, "FIELD_INVALID"),
        "PRIMARY_SEQ": ("PRIMARY_SEQ", 11, "FIELD_INVALID"),
        "FROM_SEQ": ("FROM_SEQ", "11", "FIELD_TYPE"),
        "ENTRIES": ("ENTRIES", [], "FIELD_INVALID"),
    }
    for field, value, code in damaged.values():
        with pytest.raises(SaldoError) as refused:
            parse_append({**message, field: value})
        assert refused.value.code == code, field
    bad_entries = [
        ["op 1", "DEPOSIT", "alice", None, 5, None],
        ["op-1", "STEAL", "alice", None, 5, None],
        ["op-1", "DEPOSIT", "al ice", None, 5, None],
        ["op-1", "DEPOSIT", "alice", "bob", 5, None],
        ["op-1", "TRANSFER", "alice", "alice", 5, None],
        ["op-1", "DEPOSIT", "alice", None, 0, None],
        ["op-1", "DEPOSIT", "alice", None, 5.5, None],
        ["op-1", "DEPOSIT", "alice", None, 5, "NOT_PRIMARY"],
        ["op-1", "DEPOSIT", "alice", None, 5],
        "op-1",
    ]
    for entry in bad_entries:
        with pytest.raises(SaldoError):
            parse_append({**message, "ENTRIES": [entry]})


NAMES = st.text(alphabet="abcXYZ019_.@-", min_size=1, max_size=8)
ENTRIES = st.lists(
    st.tuples(st.text(alphabet="abc0123456789_.:-", min_size=1, max_size=12), st.sampled_from([DEPOSIT, "WITHDRAW", TRANSFER]),
              NAMES, NAMES, st.integers(1, 10**11), st.sampled_from([None, "INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND"])),
    min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(entries=ENTRIES, epoch=st.integers(1, 9), from_seq=st.integers(1, 10**9))
def test_the_canonical_append_parser_agrees_with_the_full_one(entries, epoch, from_seq):
    ops = []
    for op_id, kind, account, other, cents, error in entries:
        if kind == TRANSFER and other == account:
            other = account + "x"
        ops.append((Operation(op_id, kind, account, other if kind == TRANSFER else None, cents), error))
    texts = [entry_text(op_, error) for op_, error in ops]
    line = append_line(epoch, from_seq + len(ops), epoch, from_seq, texts).rstrip(b"\n")
    fast = parse_append_line(line)
    full = parse_append(decoded(line))
    if any(op_.amount_cents > 100_000_000_000 for op_, _ in ops):
        assert fast is None  # above the maximum of one operation: the full parser says why
        return
    assert fast is not None and fast[0] == full and fast[1] == texts


@pytest.mark.parametrize("line", [
    b'{"TASK": "APPEND","EPOCH":1,"FROM_SEQ":1,"ENTRY_EPOCH":1,"PRIMARY_SEQ":1,"ENTRIES":[["a","DEPOSIT","x",null,1,null]]}',
    b'{"TASK":"APPEND","EPOCH":1,"FROM_SEQ":1,"ENTRY_EPOCH":2,"PRIMARY_SEQ":1,"ENTRIES":[["a","DEPOSIT","x",null,1,null]]}',
    b'{"TASK":"APPEND","EPOCH":1,"FROM_SEQ":5,"ENTRY_EPOCH":1,"PRIMARY_SEQ":1,"ENTRIES":[["a","DEPOSIT","x",null,1,null]]}',
    b'{"TASK":"APPEND","EPOCH":1,"FROM_SEQ":1,"ENTRY_EPOCH":1,"PRIMARY_SEQ":1,"ENTRIES":[["a","DEPOSIT","x","y",1,null]]}',
    b'{"TASK":"APPEND","EPOCH":1,"FROM_SEQ":1,"ENTRY_EPOCH":1,"PRIMARY_SEQ":1,"ENTRIES":[["a","TRANSFER","x","x",1,null]]}',
    b'{"TASK":"APPEND","EPOCH":1,"FROM_SEQ":1,"ENTRY_EPOCH":1,"PRIMARY_SEQ":2,"ENTRIES":[["a","DEPOSIT","x",null,1,null]["b","DEPOSIT","x",null,1,null]]}',
    b'{"TASK":"APPEND","EPOCH":1,"FROM_SEQ":1,"ENTRY_EPOCH":1,"PRIMARY_SEQ":1,"ENTRIES":[["a","DEPOSIT","x",null,0,null]]}',
    b'{"TASK":"APPEND","EPOCH":0,"FROM_SEQ":1,"ENTRY_EPOCH":1,"PRIMARY_SEQ":1,"ENTRIES":[["a","DEPOSIT","x",null,1,null]]}',
])
def test_the_canonical_append_parser_leaves_every_other_line_to_the_full_parser(line):
    assert parse_append_line(line) is None


def test_vote_and_lease_messages_round_trip_and_refuse_strangers():
    members = frozenset(["r1", "r2"])
    request = parse_vote_request({"TASK": "PRE_VOTE", "ID": 1, "EPOCH": 3, "CANDIDATE": "r2", "LAST_EPOCH": 2,
                                  "LAST_SEQ": 40}, members)
    assert request.pre and request.position == Position(2, 40)
    for bad in ({"CANDIDATE": "mallory"}, {"EPOCH": 2}, {"LAST_SEQ": -1}, {"EPOCH": True}):
        with pytest.raises(SaldoError):
            parse_vote_request({"TASK": "VOTE", "ID": 1, "EPOCH": 3, "CANDIDATE": "r2", "LAST_EPOCH": 2,
                                "LAST_SEQ": 40, **bad}, members)
    reply = json.loads(wire.encode(vote_reply_message(1, "w", request, Decision(True, None), 3, None)))
    assert parse_vote_reply(reply, frozenset(["r1", "r2", "w"])).granted
    lease = parse_lease_request({"TASK": "LEASE", "ID": 4, "EPOCH": 3, "PRIMARY": "r2", "DURATION_MS": 1000,
                                 "SYNC_SET": {"EPOCH": 3, "VERSION": 1, "MEMBERS": ["r2"]},
                                 "CLIENT_ADDRESS": "127.0.0.13:6004", "PRIMARY_SEQ": 41}, members)
    assert lease.duration_s == 1.0 and lease.sync_set == SyncSet(3, 1, ("r2",))
    for bad in ({"DURATION_MS": 0}, {"SYNC_SET": {"EPOCH": 3, "VERSION": 1, "MEMBERS": ["r9"]}},
                {"SYNC_SET": {"EPOCH": 3, "VERSION": 1, "MEMBERS": []}}, {"CLIENT_ADDRESS": "nowhere"}):
        with pytest.raises(SaldoError):
            parse_lease_request({"TASK": "LEASE", "ID": 4, "EPOCH": 3, "PRIMARY": "r2", "DURATION_MS": 1000,
                                 "PRIMARY_SEQ": 41, **bad}, members)
    granted = lease_reply_message(4, "w", 3, Decision(True, None), VoterRecord(3, None, SyncSet(3, 1, ("r2",))))
    assert parse_lease_reply(json.loads(wire.encode(granted)), frozenset(["w"])).sync_stored == (3, 1)


def test_the_voter_record_survives_both_storage_formats():
    record = VoterRecord(9, "r2", SyncSet(9, 4, ("r1", "r3")))
    replicas = ["r3", "r1", "r2"]
    assert record_from_meta(record_to_meta(record, replicas), replicas) == record
    assert record_from_meta({}, replicas) == VoterRecord()
    assert record_from_json(json.loads(json.dumps(record_to_json(record))), frozenset(replicas)) == record
    with pytest.raises(ValueError):
        record_from_meta({"voted_for": 7}, replicas)
    with pytest.raises(ValueError):
        record_from_json({"promised_epoch": 1, "voted_for": "mallory"}, frozenset(replicas))


def test_a_new_primary_commits_nothing_beyond_its_own_disk():
    """A backup elected while its last entries are still being written must not count them as
    committed: a retried operation among them would be acknowledged before it is durable."""
    core = ReplicaCore("r2", ["r1", "r2"], ["w"], mode=SYNC, timing=TIMING, record=VoterRecord(),
                       position=Position(1, 10), now_s=0.0, client_address="r2.example:6004")
    for seq in (11, 12):
        core.record_entry(seq, 1, entry_text(op(seq), None))  # applied from the stream, not yet durable
    pre_vote = core.tick(1.0)
    epoch = pre_vote.send[0][1]["EPOCH"]
    granted = {"voter": "w", "epoch": epoch, "granted": True, "reason": None, "promised_epoch": 0, "position": None}
    vote = core.on_vote_reply(parse_vote_reply_for(granted, pre=True), 1.0)
    assert vote.persist is not None and vote.after_persist
    elected = core.on_vote_reply(parse_vote_reply_for(granted, pre=False), 1.001)
    assert elected.became_primary and core.role == PRIMARY
    core.on_record_persisted(core.voter.record)
    round_id = next(m for peer, m in elected.send if peer == "w" and m["TASK"] == "LEASE")["ID"]
    core.on_lease_reply(parse_lease_reply({"ID": round_id, "STATUS": "OK", "TASK": "LEASE_REPLY", "EPOCH": epoch,
                                           "VOTER": "w", "GRANTED": True, "REASON": None, "PROMISED_EPOCH": epoch,
                                           "SYNC_STORED": [epoch, 1]}, frozenset(["r1", "r2", "w"])), 1.002)
    assert core.primary.committed.members == ("r2",)
    assert core.commit_seq == 10, "entries 11 and 12 are not on this replica's disk yet"
    assert core.on_local_durable(12).commit_advanced and core.commit_seq == 12


def test_a_backup_greeted_by_a_primary_does_not_stand_before_that_primary_could_have_renewed_its_lease():
    """A replica that joins a running primary hears its HELLO before the first LEASE round: that
    primary is alive, and standing at once would only disturb it (a candidate serves no one)."""
    core = ReplicaCore("r2", ["r1", "r2"], ["w"], mode=SYNC, timing=TIMING, record=VoterRecord(),
                       position=Position(0, 0), now_s=0.0, client_address="r2.example:6004")
    reply, _effects = core.on_hello(1, 1, "r1", "r1.example:6004", 0.0)
    assert reply["TASK"] == "POSITION" and core.role == BACKUP
    assert not core.tick(0.012).send and core.role == BACKUP
    assert not core.tick(TIMING.lease_duration_s - 0.01).send and core.role == BACKUP
    # Heard nothing since (no LEASE, no APPEND): the primary may be gone; stand, as after a lease.
    assert core.tick(TIMING.lease_duration_s + 0.01).send and core.role == CANDIDATE


def test_a_candidate_that_votes_for_another_one_reports_that_it_gave_way():
    """Two replicas standing at once is ordinary: STATUS says the one that yielded gave way."""
    core = ReplicaCore("r1", ["r1", "r2"], ["w"], mode=SYNC, timing=TIMING, record=VoterRecord(),
                       position=Position(0, 0), now_s=0.0, client_address="r1.example:6004")
    epoch = core.tick(1.0).send[0][1]["EPOCH"]  # r1 stands (a pre-vote round)
    assert core.role == CANDIDATE and core.status(1.0)["LAST_CANDIDACY_END"] == ""
    reply, _effects = core.on_vote_request(VoteRequest(epoch, "r2", Position(0, 0), pre=False), 7, 1.001)
    assert reply["GRANTED"] is True
    assert core.role == BACKUP
    assert core.status(1.001)["LAST_CANDIDACY_END"] == f"gave way: voted for r2 in epoch {epoch}"


def parse_vote_reply_for(fields: dict, *, pre: bool):
    message = {"ID": 1, "STATUS": "OK", "TASK": "VOTE_REPLY", "PRE": pre, "EPOCH": fields["epoch"], "VOTER": fields["voter"],
               "GRANTED": fields["granted"], "REASON": fields["reason"], "PROMISED_EPOCH": fields["promised_epoch"]}
    return parse_vote_reply(message, frozenset(["r1", "r2", "w"]))


# --- A whole cluster, simulated ------------------------------------------------------------------


class SimReplica:
    """One replica: a ReplicaCore plus what common/primary_backup/replica.py does around it. Its "bank" is the list of
    applied entries, (entry epoch, op id); what is durable is a prefix of it."""

    def __init__(self, sim: Sim, name: str, rate: float) -> None:
        self.sim = sim
        self.name = name
        self.rate = rate  # this node's clock runs at rate x the simulation's
        self.state: list[tuple[int, str]] = []
        self.durable_len = 0
        self.record = VoterRecord()
        self.crashed = False
        self.incarnation = 0
        self.snapshots_installed = 0
        self.core: ReplicaCore | None = None
        self.start()

    def local(self) -> float:
        return self.sim.now * self.rate

    def start(self) -> None:
        self.incarnation += 1
        self.crashed = False
        position = Position(self.state[-1][0] if self.state else 0, len(self.state))
        self.core = ReplicaCore(self.name, self.sim.replica_names, self.sim.witness_names, mode=self.sim.mode,
                                timing=self.sim.timing, record=self.record, position=position, now_s=self.local(),
                                client_address=f"{self.name}.example:6004")
        self.links = {peer: {"live": False} for peer in self.sim.replica_names if peer != self.name}
        self.pending: dict[int, str] = {}  # seq -> op id of writes this primary has not acknowledged
        self.session: str | None = None  # the primary whose HELLO this backup follows
        self.synced = False
        self.commit_scheduled = False
        self.sim.at(self.sim.now + 0.02, self, self.incarnation, self.tick)
        for peer in self.sim.all_names:
            if peer != self.name:
                self.apply(self.core.on_link_up(peer, self.local()))

    # What the driver does with the core's effects.
    def apply(self, effects: Effects, reply_to: str | None = None, reply: dict | None = None) -> None:
        core = self.core
        if effects.stepped_down:
            for link in self.links.values():
                link["live"] = False
            self.pending.clear()  # their clients get UNAVAILABLE (indefinite): never an acknowledgement
        if effects.became_primary:
            self.sim.on_became_primary(self)
            self.session = None
        for peer, message in effects.send:
            self.send(peer, message)
        if effects.persist is not None:
            record, after, incarnation = effects.persist, effects.after_persist, self.incarnation

            def persisted() -> None:
                self.record = record
                self.apply(core.on_record_persisted(record))
                for peer, message in after:
                    self.send(peer, message)
                if reply_to is not None:
                    self.sim.send(self.name, reply_to, reply)

            self.sim.at(self.sim.now + self.sim.persist_delay(), self, incarnation, persisted)
        elif reply_to is not None:
            self.sim.send(self.name, reply_to, reply)
        if effects.commit_advanced:
            self.acknowledge()

    def send(self, peer: str, message: dict) -> None:
        if message.get("TASK") == "HELLO":
            self.links[peer]["live"] = False
        self.sim.send(self.name, peer, message)

    def tick(self) -> None:
        self.apply(self.core.tick(self.local()))
        self.acknowledge()
        if self.core.primary is not None and self.sim.mode == ASYNC:
            self.ship()
        self.sim.at(self.sim.now + 0.02, self, self.incarnation, self.tick)

    # The primary.
    def client_write(self, op_id: str) -> None:
        core = self.core
        if core.primary is None or not core.can_acknowledge(self.local()):
            return  # refused: NOT_PRIMARY, nothing applied
        seq = core.log.last_seq + 1
        self.state.append((core.primary.epoch, op_id))
        core.record_entry(seq, core.primary.epoch, entry_text(Operation(op_id, DEPOSIT, "acct", None, 1), None))
        self.pending[seq] = op_id
        self.schedule_commit()
        if self.sim.mode == SYNC:
            self.ship()

    def acknowledge(self) -> None:
        core = self.core
        if core.primary is None or not self.pending or not core.can_acknowledge(self.local()):
            return
        for seq in sorted(s for s in self.pending if s <= core.commit_seq):
            self.sim.on_acknowledged(self, seq, self.pending.pop(seq))

    def ship_upto(self) -> int:
        """Sync: all that is applied; async: only what is on disk (the committed log)."""
        core = self.core
        return core.log.last_seq if self.sim.mode == SYNC else min(core.durable_seq, core.log.last_seq)

    def ship(self) -> None:
        core = self.core
        last = self.ship_upto()
        for peer, link in self.links.items():
            if link["live"] and link["sent"] < last:
                for entry_epoch, first, texts in core.log.runs(link["sent"] + 1, last):
                    self.sim.send(self.name, peer, append_line(core.primary.epoch, core.log.last_seq, entry_epoch, first, texts))
                link["sent"] = last

    def catch_up(self, peer: str, plan: str, from_seq: int) -> None:
        core = self.core
        if plan == SNAPSHOT:  # the state as on this primary's disk, then the log after it
            seq = self.durable_len
            snapshot = list(self.state[:seq])
            self.sim.send(self.name, peer, {"TASK": "SIM_SNAPSHOT", "STATE": snapshot})
            from_seq = seq
        last = max(from_seq, self.ship_upto())
        if from_seq < last:
            for entry_epoch, first, texts in core.log.runs(from_seq + 1, last):
                self.sim.send(self.name, peer, append_line(core.primary.epoch, core.log.last_seq, entry_epoch, first, texts))
        self.links[peer] = {"live": True, "sent": last}
        self.apply(core.on_caught_up(peer, self.local()))

    # Both.
    def schedule_commit(self) -> None:
        if not self.commit_scheduled:
            self.commit_scheduled = True
            upto = len(self.state)

            def committed() -> None:
                self.commit_scheduled = False
                self.durable_len = max(self.durable_len, upto)
                self.apply(self.core.on_local_durable(upto))
                if self.core.primary is None:
                    self.send_ack()
                if len(self.state) > self.durable_len:
                    self.schedule_commit()

            self.sim.at(self.sim.now + self.sim.commit_delay(), self, self.incarnation, committed)

    def send_ack(self) -> None:
        core = self.core
        if self.session is not None and self.synced and core.following_epoch:
            self.sim.send(self.name, self.session, {"TASK": "ACK", "EPOCH": core.following_epoch,
                                                    "SEQ": min(core.durable_seq, core.log.last_seq)})

    def receive(self, source: str, message: dict) -> None:
        core = self.core
        now = self.local()
        task = message.get("TASK")
        if message.get("ERROR") == "STALE_EPOCH" or message.get("REASON") == STALE_EPOCH:
            self.sim.stale_refusals += 1  # this replica learns it spoke from an old epoch
        try:
            if task in ("VOTE", "PRE_VOTE"):
                reply, effects = core.on_vote_request(parse_vote_request(message, core.replica_set), message["ID"], now)
                self.apply(effects, source, reply)
            elif task == "LEASE":
                reply, effects = core.on_lease_request(parse_lease_request(message, core.replica_set), message["ID"], now)
                self.apply(effects, source, reply)
            elif task == "HELLO":
                reply, effects = core.on_hello(message["EPOCH"], message["SESSION"], message["PRIMARY"],
                                               message["CLIENT_ADDRESS"], now)
                if reply.get("TASK") == "POSITION":
                    reply["DURABLE_SEQ"] = min(core.durable_seq, reply["LAST_SEQ"])
                    self.session, self.synced = source, False
                self.apply(effects, source, reply)
            elif task == "APPEND":
                append = parse_append(message)
                if source != self.session:
                    raise SaldoError("STALE_EPOCH", "not the session")
                core.check_append(append)
                seq = append.from_seq
                for op_, _error in append.entries:
                    self.state.append((append.entry_epoch, op_.op_id))
                    core.record_entry(seq, append.entry_epoch, entry_text(op_, None))
                    seq += 1
                self.synced = True
                self.schedule_commit()
            elif task == "SIM_SNAPSHOT":
                if source != self.session:
                    raise SaldoError("STALE_EPOCH", "not the session")
                state = [tuple(item) for item in message["STATE"]]
                self.state = state
                self.durable_len = len(state)
                self.snapshots_installed += 1
                core.on_snapshot_installed(Position(state[-1][0] if state else 0, len(state)))
                self.synced = True
                self.send_ack()
            elif task == "ACK":
                self.apply(core.on_ack(source, message["EPOCH"], message["SEQ"], now))
            elif task == "LEASE_REPLY":
                self.apply(core.on_lease_reply(parse_lease_reply(message, core.voter_set), now))
                self.acknowledge()
            elif task == "VOTE_REPLY":
                self.apply(core.on_vote_reply(parse_vote_reply(message, core.voter_set), now))
            elif task == "POSITION":
                plan = core.on_position(source, message["EPOCH"], message["SESSION"],
                                        Position(message["LAST_EPOCH"], message["LAST_SEQ"]), message["DURABLE_SEQ"], False, now)
                if plan is not None:
                    self.catch_up(source, plan[0], message["LAST_SEQ"])
            elif message.get("ERROR") == "STALE_EPOCH":
                self.apply(core.on_stale(message["PROMISED_EPOCH"], now))
        except SaldoError as error:
            if error.code == "STALE_EPOCH":
                self.sim.send(self.name, source, {"STATUS": "NOK", "ERROR": "STALE_EPOCH",
                                                  "PROMISED_EPOCH": core.voter.record.promised_epoch})
            else:
                self.sim.protocol_errors.append((self.name, source, task, error.code, error.detail))

    def on_disconnect(self, peer: str) -> None:
        """The connection with `peer` broke (a reset, the peer crashed): what the driver does."""
        self.core.on_link_down(peer)
        if peer in self.links:
            self.links[peer]["live"] = False
        if self.session == peer:
            self.session, self.synced = None, False

    def on_reconnect(self, peer: str) -> None:
        self.apply(self.core.on_link_up(peer, self.local()))


class SimWitness:
    """The witness: a Voter answering after its record is on disk (common/primary_backup/witness.py)."""

    def __init__(self, sim: Sim, name: str, rate: float) -> None:
        self.sim = sim
        self.name = name
        self.rate = rate
        self.record = VoterRecord()
        self.incarnation = 0
        self.crashed = False
        self.start()

    def local(self) -> float:
        return self.sim.now * self.rate

    def start(self) -> None:
        self.incarnation += 1
        self.crashed = False
        self.voter = Voter(self.name, self.sim.replica_names, self.record, self.sim.timing, self.local())

    def receive(self, source: str, message: dict) -> None:
        replicas = frozenset(self.sim.replica_names)
        task = message.get("TASK")
        if task in ("VOTE", "PRE_VOTE"):
            request = parse_vote_request(message, replicas)
            decision = self.voter.decide_vote(request.epoch, request.candidate, request.position, None, self.local(), pre=request.pre)
            reply = vote_reply_message(message["ID"], self.name, request, decision, self.voter.record.promised_epoch, None)
        elif task == "LEASE":
            request = parse_lease_request(message, replicas)
            decision = self.voter.decide_lease(request.epoch, request.primary, request.sync_set, request.duration_s, self.local())
            reply = lease_reply_message(message["ID"], self.name, request.epoch, decision, self.voter.record)
        else:
            return
        record = self.voter.take_dirty()
        if record is None:
            self.sim.send(self.name, source, reply)
            return

        def persisted() -> None:
            self.record = record
            self.sim.send(self.name, source, reply)

        self.sim.at(self.sim.now + self.sim.persist_delay(), self, self.incarnation, persisted)

    def on_disconnect(self, peer: str) -> None:
        pass

    def on_reconnect(self, peer: str) -> None:
        pass


class Sim:
    """Events in simulated time; one FIFO link per ordered pair of nodes."""

    def __init__(self, *, replicas: int = 2, mode: str = SYNC, seed: int = 1, rates: list[float] | None = None,
                 delay_s: tuple[float, float] = (0.0002, 0.002), timing: Timing = TIMING) -> None:
        self.now = 0.0
        self.mode = mode
        self.timing = timing
        self.random = random.Random(seed)
        self.delay_s = delay_s
        self.replica_names = [f"r{i + 1}" for i in range(replicas)]
        self.witness_names = ["w"]
        self.all_names = self.replica_names + self.witness_names
        rates = rates or [1.0] * len(self.all_names)
        self._queue: list = []
        self._order = itertools.count()
        self._link_free_at: dict[tuple[str, str], float] = {}
        self._link_generation: dict[tuple[str, str], int] = {}
        self.down: set[frozenset] = set()  # pairs whose connections are broken
        self.paused: dict[str, list] = {}  # node -> deferred events
        self.nodes: dict[str, SimReplica | SimWitness] = {}
        for name, rate in zip(self.all_names, rates):
            self.nodes[name] = (SimReplica if name in self.replica_names else SimWitness)(self, name, rate)
        self.acked: dict[str, tuple[int, int, float]] = {}  # op id -> (seq, epoch, when)
        self.ack_times: dict[int, list[float]] = {}  # epoch -> [first, last]
        self.primaries: dict[int, str] = {}  # epoch -> the replica that became its primary
        self.stale_refusals = 0
        self.protocol_errors: list = []
        self.next_op = itertools.count(1)

    def persist_delay(self) -> float:
        return self.random.uniform(0.0005, 0.003)

    def commit_delay(self) -> float:
        return self.random.uniform(0.0005, 0.004)

    # Events.
    def at(self, when: float, node, incarnation: int, action) -> None:
        heapq.heappush(self._queue, (when, next(self._order), node.name, incarnation, action))

    def send(self, source: str, target: str, message) -> None:
        if frozenset((source, target)) in self.down or self.nodes[source].crashed:
            return
        payload = message if isinstance(message, bytes) else wire.encode(message)
        link = (source, target)
        when = max(self.now + self.random.uniform(*self.delay_s), self._link_free_at.get(link, 0.0))
        self._link_free_at[link] = when  # TCP: in order on one connection
        generation = self._link_generation.get(frozenset(link), 0)
        node = self.nodes[target]

        def deliver() -> None:
            if self._link_generation.get(frozenset(link), 0) != generation:
                return  # sent on a connection that broke meanwhile
            node.receive(source, wire.decode_line(payload.rstrip(b"\n")))

        self.at(when, node, node.incarnation, deliver)

    def run_until(self, until_s: float) -> None:
        while self._queue and self._queue[0][0] <= until_s:
            when, _order, name, incarnation, action = heapq.heappop(self._queue)
            node = self.nodes[name]
            if node.crashed or node.incarnation != incarnation:
                continue
            self.now = max(self.now, when)
            if name in self.paused:
                self.paused[name].append((incarnation, action))
                continue
            action()
            self.check()
        self.now = max(self.now, until_s)

    def clients(self, until_s: float, every_s: float = 0.004) -> None:
        """Client writes at a steady pace, offered to every replica that takes itself for the primary
        (a deposed one included: it must refuse or never acknowledge)."""
        t = self.now
        while t < until_s:
            t += every_s
            self.run_until(t)
            op_id = f"op-{next(self.next_op)}"
            for node in self.replicas():
                if not node.crashed and node.name not in self.paused and node.core.primary is not None:
                    node.client_write(op_id)

    # Faults.
    def _soon(self, name: str, action) -> None:
        """Run `action` at node `name` now (or when it resumes, if it is paused)."""
        node = self.nodes[name]
        if not node.crashed:
            self.at(self.now, node, node.incarnation, action)

    def break_link(self, a: str, b: str) -> None:
        pair = frozenset((a, b))
        self.down.add(pair)
        self._link_generation[pair] = self._link_generation.get(pair, 0) + 1
        for x, y in ((a, b), (b, a)):
            self._soon(x, lambda x=x, y=y: self.nodes[x].on_disconnect(y))

    def heal_link(self, a: str, b: str) -> None:
        self.down.discard(frozenset((a, b)))
        for x, y in ((a, b), (b, a)):
            if not self.nodes[y].crashed:
                self._soon(x, lambda x=x, y=y: self.nodes[x].on_reconnect(y))

    def isolate(self, name: str) -> None:
        for other in self.all_names:
            if other != name:
                self.break_link(name, other)

    def heal_all(self) -> None:
        for pair in list(self.down):
            self.heal_link(*pair)

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        node.crashed = True
        self.paused.pop(name, None)
        if isinstance(node, SimReplica):
            node.state = node.state[: node.durable_len]  # what was not on disk is gone
        for other in self.all_names:
            if other != name:
                pair = frozenset((name, other))
                self._link_generation[pair] = self._link_generation.get(pair, 0) + 1
                self._soon(other, lambda other=other: self.nodes[other].on_disconnect(name))

    def restart(self, name: str) -> None:
        self.nodes[name].start()
        for other in self.all_names:
            if other != name and frozenset((name, other)) not in self.down:
                self._soon(other, lambda other=other: self.nodes[other].on_reconnect(name))

    def pause(self, name: str) -> None:
        self.paused.setdefault(name, [])

    def resume(self, name: str) -> None:
        """SIGCONT: what arrived and every timer that fired meanwhile run now, in order."""
        deferred = self.paused.pop(name, [])
        node = self.nodes[name]
        for incarnation, action in deferred:
            if node.incarnation == incarnation and not node.crashed:
                action()
                self.check()

    # Checks.
    def replicas(self) -> list[SimReplica]:
        return [self.nodes[name] for name in self.replica_names]

    def holders(self) -> list[str]:
        return [n.name for n in self.replicas() if not n.crashed and n.core.can_acknowledge(n.local())]

    def check(self) -> None:
        holders = self.holders()
        assert len(holders) <= 1, f"two primaries may acknowledge at t={self.now:.4f}: {holders}"

    def on_became_primary(self, node: SimReplica) -> None:
        epoch = node.core.primary.epoch
        assert epoch not in self.primaries, f"two primaries of epoch {epoch}: {self.primaries[epoch]} and {node.name}"
        self.primaries[epoch] = node.name
        if self.mode == SYNC:
            for op_id, (seq, entry_epoch, _when) in self.acked.items():
                assert seq <= len(node.state) and node.state[seq - 1] == (entry_epoch, op_id), (
                    f"{node.name}, primary of epoch {epoch}, lacks acknowledged {op_id} at seq {seq}")

    def on_acknowledged(self, node: SimReplica, seq: int, op_id: str) -> None:
        epoch = node.core.primary.epoch
        assert node.state[seq - 1] == (epoch, op_id) or node.state[seq - 1][1] == op_id
        self.acked[op_id] = (seq, node.state[seq - 1][0], self.now)
        span = self.ack_times.setdefault(epoch, [self.now, self.now])
        span[1] = self.now

    def primary(self) -> SimReplica | None:
        holders = self.holders()
        return self.nodes[holders[0]] if holders else None

    def settle(self, seconds: float = 6.0) -> None:
        """Heal everything, let the cluster converge without clients."""
        for name in list(self.paused):
            self.resume(name)
        for name in self.all_names:
            if self.nodes[name].crashed:
                self.restart(name)
        self.heal_all()
        self.run_until(self.now + seconds)

    def assert_converged(self) -> None:
        primary = self.primary()
        assert primary is not None, "no primary after healing"
        states = {n.name: n.state for n in self.replicas()}
        assert all(state == primary.state for state in states.values()), {n: len(s) for n, s in states.items()}
        for name in states:
            node = self.nodes[name]
            assert node.core.log.last_seq == len(node.state)

    def lost_acknowledged(self) -> list[str]:
        state = set(self.primary().state)
        return [op_id for op_id, (_seq, epoch, _when) in self.acked.items() if (epoch, op_id) not in state]

    def assert_epochs_never_overlap(self) -> None:
        spans = sorted(self.ack_times.items())
        for (e1, (_f1, last1)), (e2, (first2, _l2)) in itertools.pairwise(spans):
            assert last1 < first2, f"epoch {e1} acknowledged at {last1} after epoch {e2} began at {first2}"


def started(sim: Sim, seconds: float = 2.0) -> SimReplica:
    sim.clients(sim.now + seconds)
    primary = sim.primary()
    assert primary is not None, "no primary elected"
    return primary


def test_a_cold_cluster_elects_one_primary_which_serves_and_streams_to_the_backup():
    sim = Sim()
    primary = started(sim)
    backup = next(n for n in sim.replicas() if n is not primary)
    assert primary.core.role == PRIMARY and backup.core.role == BACKUP
    assert len(sim.acked) > 100
    assert backup.core.log.last_seq >= primary.core.commit_seq - 5
    assert set(primary.core.primary.committed.members) == {"r1", "r2"}, "the caught-up backup joined the sync set"
    assert sim.nodes["w"].voter.record.sync_set.members == ("r1", "r2")
    sim.settle()
    sim.assert_converged()
    assert not sim.protocol_errors


def test_kill_the_primary_the_backup_takes_over_after_the_lease_and_loses_no_acknowledged_write():
    sim = Sim()
    old = started(sim)
    killed_at = sim.now
    old_lease_end = old.core.primary.lease.expiry_s() / old.rate
    sim.crash(old.name)
    sim.clients(sim.now + 3.0)
    new = sim.primary()
    assert new is not None and new is not old
    epoch = new.core.primary.epoch
    first_ack_new = sim.ack_times[epoch][0]
    assert first_ack_new >= old_lease_end, "the new primary acknowledged inside the old lease"
    assert first_ack_new - killed_at < TIMING.lease_duration_s + 0.5
    sim.settle()
    sim.assert_converged()
    assert sim.lost_acknowledged() == []
    assert old.core.role == BACKUP and old.core.epoch == epoch, "the old primary rejoined as a backup"
    sim.assert_epochs_never_overlap()


def test_a_primary_cut_off_stops_acknowledging_before_the_new_one_starts_and_rejoins_after_healing():
    sim = Sim()
    old = started(sim)
    old_epoch = old.core.primary.epoch
    sim.isolate(old.name)
    sim.clients(sim.now + 3.0)
    new = sim.primary()
    assert new is not None and new is not old
    last_old, first_new = sim.ack_times[old_epoch][1], sim.ack_times[new.core.primary.epoch][0]
    assert last_old < first_new
    assert old.core.role == PRIMARY and not old.core.can_acknowledge(old.local()), "cut off, it cannot learn it lost"
    sim.heal_all()
    sim.clients(sim.now + 1.0)
    assert old.core.role == BACKUP
    sim.settle()
    sim.assert_converged()
    assert sim.lost_acknowledged() == []
    assert sim.stale_refusals > 0, "the old primary's messages were refused by epoch"


@pytest.mark.parametrize("mode", [SYNC, ASYNC])
def test_a_paused_primary_does_not_acknowledge_in_its_old_epoch_after_it_resumes(mode):
    sim = Sim(mode=mode)
    old = started(sim)
    old_epoch = old.core.primary.epoch
    backup = next(n for n in sim.replicas() if n is not old)
    # Writes in flight at the pause: applied, neither durable here nor acknowledged by the backup.
    sim.break_link(old.name, backup.name)
    sim.run_until(sim.now + 0.001)
    for index in range(5):
        old.client_write(f"in-flight-{index}")
    assert sum(op_id.startswith("in-flight") for op_id in old.pending.values()) == 5
    sim.pause(old.name)  # the commit and every timer of the old primary wait for SIGCONT
    paused_at = sim.now
    sim.heal_all()
    sim.clients(sim.now + 3.0)
    new = sim.primary()
    assert new is backup and new.core.primary.epoch > old_epoch
    sim.resume(old.name)
    sim.clients(sim.now + 1.0)
    assert sim.ack_times[old_epoch][1] < paused_at, "the old primary acknowledged after its pause"
    assert not any(op_id.startswith("in-flight") for op_id in sim.acked)
    assert old.core.role == BACKUP and old.core.epoch == new.core.primary.epoch
    sim.settle()
    sim.assert_converged()
    if mode == SYNC:
        assert sim.lost_acknowledged() == []


def test_a_link_that_reconnects_twice_in_a_row_is_caught_up_once_from_the_right_place():
    """Two HELLOs on one link get two POSITIONs; only the answer to the newest counts, or the
    primary would replay from a position the backup has already moved past."""
    sim = Sim()
    primary = started(sim)
    backup = next(n for n in sim.replicas() if n is not primary)
    sim.break_link(primary.name, backup.name)
    sim.clients(sim.now + 0.3)
    sim.heal_link(primary.name, backup.name)
    sim.heal_link(primary.name, backup.name)
    sim.clients(sim.now + 1.0)
    assert not sim.protocol_errors, sim.protocol_errors[:3]
    assert backup.state == primary.state[: len(backup.state)] and len(backup.state) >= primary.core.commit_seq


def test_a_voter_that_restarts_forgets_its_promise_so_it_stays_quiet_for_a_lease():
    """The primary's lease rests on the backup's grant alone (its link to the witness is down).
    The backup crashes and restarts at once: without its quiet time it would elect itself with
    the witness while the primary still counts on the grant the backup forgot."""
    sim = Sim()
    primary = started(sim)
    backup = next(n for n in sim.replicas() if n is not primary)
    sim.break_link(primary.name, "w")
    sim.clients(sim.now + 1.5)  # the witness's promise to the primary has run out
    assert sim.primary() is primary
    sim.crash(backup.name)
    sim.restart(backup.name)
    sim.run_until(sim.now + 0.5)
    assert backup.core.voter.quiet_until_s > backup.local()
    sim.clients(sim.now + 3.0)  # Sim.check: never two primaries that may acknowledge
    assert sim.primary() is not None
    sim.settle()
    sim.assert_converged()
    assert sim.lost_acknowledged() == []


def test_async_answers_before_the_backup_applies_so_a_killed_primary_loses_acknowledged_writes():
    sim = Sim(mode=ASYNC, delay_s=(0.005, 0.02))  # a slow link: the backup lags
    old = started(sim)
    old_epoch = old.core.primary.epoch
    sim.crash(old.name)
    sim.clients(sim.now + 3.0)
    sim.settle()
    sim.assert_converged()
    lost = sim.lost_acknowledged()
    assert lost, "async mode with a lagging backup should lose some acknowledged writes"
    assert all(sim.acked[op_id][1] == old_epoch for op_id in lost), "only the dead primary's epoch loses writes"
    assert old.core.role == BACKUP and old.snapshots_installed == 1, "it discarded them by state transfer"


def test_sync_mode_drops_a_silent_backup_only_once_a_majority_agrees_and_it_then_cannot_be_elected():
    sim = Sim()
    primary = started(sim)
    backup = next(n for n in sim.replicas() if n is not primary)
    sim.break_link(primary.name, backup.name)
    acked_before = len(sim.acked)
    sim.clients(sim.now + 0.3)
    assert len(sim.acked) == acked_before, "writes wait for the silent backup until it is dropped"
    sim.clients(sim.now + 1.0)
    assert primary.core.primary.committed.members == (primary.name,)
    assert sim.nodes["w"].voter.record.sync_set.members == (primary.name,)
    assert len(sim.acked) > acked_before, "once dropped (witness agreed), writes are acknowledged again"
    assert sim.primary() is primary, "the dropped backup did not take over"
    sim.crash(primary.name)
    sim.clients(sim.now + 3.0)
    assert sim.primary() is None, "the dropped backup may lack acknowledged writes: it must not be elected"
    sim.restart(primary.name)
    sim.heal_all()
    sim.clients(sim.now + 3.0)
    assert sim.primary() is primary
    assert set(primary.core.primary.committed.members) == {"r1", "r2"}, "the backup caught up and joined again"
    sim.settle()
    sim.assert_converged()
    assert sim.lost_acknowledged() == []


def test_with_three_replicas_the_most_up_to_date_backup_becomes_primary():
    sim = Sim(replicas=3)
    primary = started(sim)
    others = [n for n in sim.replicas() if n is not primary]
    # One backup stops receiving the stream (but still hears the witness and the other backup).
    laggard, leader = sorted(others, key=lambda n: n.name)
    sim.break_link(primary.name, laggard.name)
    sim.clients(sim.now + 0.2)
    assert leader.core.log.last_seq > laggard.core.log.last_seq
    sim.crash(primary.name)
    sim.clients(sim.now + 3.0)
    assert sim.primary() is leader, "the backup holding the longer log won"
    sim.settle()
    sim.assert_converged()
    assert sim.lost_acknowledged() == []


def test_a_restarted_backup_catches_up_by_replay_and_a_diverged_one_by_state_transfer():
    sim = Sim()
    primary = started(sim)
    backup = next(n for n in sim.replicas() if n is not primary)
    sim.crash(backup.name)
    sim.clients(sim.now + 1.0)
    sim.restart(backup.name)
    sim.clients(sim.now + 1.5)
    assert backup.snapshots_installed == 0 and backup.state == primary.state[: len(backup.state)]
    assert len(backup.state) >= primary.core.commit_seq, "caught up by replaying the primary's log"
    # The primary is cut off: it applies writes it can never acknowledge, and is replaced.
    old_epoch = primary.core.primary.epoch
    sim.isolate(primary.name)
    sim.clients(sim.now + 3.0)
    new = sim.primary()
    assert new is backup
    orphans = [entry for entry in primary.state if entry[0] == old_epoch and entry not in new.state]
    assert orphans, "the cut-off primary applied writes the new primary never had"
    assert not any(op_id in sim.acked for _epoch, op_id in orphans), "none of them was acknowledged"
    sim.settle()
    sim.assert_converged()
    assert primary.snapshots_installed == 1 and not any(entry in primary.state for entry in orphans)
    assert sim.lost_acknowledged() == []


# --- Random fault schedules ---------------------------------------------------------------------

FAULTS = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=8.0),
        st.sampled_from(["crash", "isolate", "break", "pause"]),
        st.integers(min_value=0, max_value=3),
        st.floats(min_value=0.05, max_value=2.5),
    ),
    max_size=6,
)


def play(sim: Sim, schedule, until_s: float = 10.0) -> None:
    """Run clients while the faults start and end on schedule."""
    events = []
    for start, kind, who, duration in schedule:
        events.append((start, "start", kind, who, duration))
        events.append((start + duration, "end", kind, who, duration))
    events.sort(key=lambda e: e[0])
    active: dict[tuple, object] = {}
    for when, phase, kind, who, _duration in events:
        sim.clients(min(when, until_s))
        names = sim.all_names
        name = names[who % len(names)]
        if phase == "start":
            if (kind, name) in active or sim.nodes[name].crashed:
                continue
            if kind == "crash":
                sim.crash(name)
            elif kind == "isolate":
                sim.isolate(name)
            elif kind == "break":
                other = names[(who + 1) % len(names)]
                sim.break_link(name, other)
                name = (name, other)
            elif kind == "pause":
                sim.pause(name)
            active[(kind, name if kind != "break" else name[0])] = name
        else:
            key = (kind, name)
            if key not in active:
                continue
            target = active.pop(key)
            if kind == "crash" and sim.nodes[name].crashed:
                sim.restart(name)
            elif kind == "isolate":
                for other in names:
                    if other != name:
                        sim.heal_link(name, other)
            elif kind == "break":
                sim.heal_link(*target)
            elif kind == "pause":
                sim.resume(name)
    sim.clients(until_s)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=FAULTS, seed=st.integers(0, 2**16), replicas=st.sampled_from([2, 3]),
       drift=st.lists(st.floats(min_value=0.985, max_value=1.015), min_size=4, max_size=4))
def test_random_faults_never_give_two_acknowledging_primaries_nor_lose_a_sync_acknowledged_write(
        schedule, seed, replicas, drift):
    sim = Sim(replicas=replicas, seed=seed, rates=drift[: replicas + 1], delay_s=(0.0002, 0.01))
    play(sim, schedule)  # Sim.check and Sim.on_became_primary assert the safety rules at every step
    sim.settle(8.0)
    sim.assert_converged()
    assert sim.lost_acknowledged() == []
    sim.assert_epochs_never_overlap()
    assert not sim.protocol_errors, sim.protocol_errors[:3]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=FAULTS, seed=st.integers(0, 2**16))
def test_random_faults_in_async_mode_still_never_give_two_acknowledging_primaries(schedule, seed):
    sim = Sim(mode=ASYNC, seed=seed, delay_s=(0.0002, 0.01))
    play(sim, schedule)
    sim.settle(8.0)
    sim.assert_converged()
    sim.assert_epochs_never_overlap()
    final_epoch = sim.primary().core.primary.epoch
    # What async loses is what a deposed primary acknowledged and never shipped: never the current one's.
    assert all(sim.acked[op_id][1] < final_epoch for op_id in sim.lost_acknowledged())
