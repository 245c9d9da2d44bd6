"""Primary-backup replication with failover (seed 002, part 4, and issue 5): the protocol, no I/O.

Owns the rules of the primary-backup architecture as state machines that take what arrives (a
message, a timer tick with `now_s`, a commit that reached the disk) and return what to do (messages
to send, a voter record to persist first, replies that may now go out). The drivers carry it out:
common/primary_backup/replica.py for a replica, common/primary_backup/witness.py for the witness. A test drives
the same classes with a fake clock and scripted message orders (tests/test_primary_backup_core.py).

Roles. A replica is a *backup* when it starts. One replica at a time is the *primary*: it orders
client operations (sequence numbers 1, 2, 3, ... that continue across epochs), applies them, and
streams them to every backup, which applies them in the same order and acknowledges. A backup that
stops hearing from the primary becomes a *candidate* and asks the voters to make it the primary of
a new epoch.

Epochs. Every primary rules one epoch (a term); a new election is a new, higher epoch. Each entry
of the replicated log carries the epoch of the primary that created it, so two logs that hold the
same (epoch, seq) hold the same entries up to it (only one primary per epoch can create entries).
Every replication message carries the sender's epoch, and a message from an epoch older than the
one a node has promised is refused (STALE_EPOCH): a deposed primary can talk, nobody listens.

Voters. The voters are the replicas and the witness (a small process on the orchestrator host, so
two replicas plus the witness make the seed's three hosts and a majority of two). Each voter keeps
on disk the highest epoch it has promised and whom it voted for in it, so it never votes twice in an
epoch, even across a restart. A candidate first runs a *pre-vote* (would you vote for me?; nothing
is stored) and only with a majority of yeses stores its own vote and asks for real votes, so a
replica that was merely cut off cannot disturb a working primary by inflating the epoch.

Leases. A primary may acknowledge (answer a client, serve a read) only while it holds a lease: a
majority of voters (itself included) have promised, each for `lease_duration_s` from when it
received the request, not to vote for anyone else. The primary counts its lease from when it *sent*
the request, shortened by the clock-drift bound, so its lease always ends before the promises that
support it. A new primary needs a majority of votes, and every majority includes a voter whose
promise to the old primary must first run out: the old lease has ended before the new epoch can
begin, so two primaries never acknowledge at the same time. A voter that restarts does not know
what it promised before the crash, so it votes for nobody during one lease duration. The renewal
of the lease (every `heartbeat_interval_s`) is the primary's heartbeat: a backup whose promise to
the primary ran out knows the primary is gone (or cut off) and may stand for election.

Modes. `sync`: the reply to a client goes out once every replica of the *sync set* has applied the
operation durably. The sync set is the set of replicas known to hold every acknowledged operation;
voters store the newest one they were told of and vote only for its members. A backup that does not
acknowledge within `backup_timeout_s` is removed from it, but only once a majority of voters has
stored the smaller set (until then the primary keeps waiting for it); a backup that catches up joins
again (the primary waits for it from the moment it joins, and publishes the larger set once the
backup holds everything acknowledged so far). Guarantee: an acknowledged operation survives any
failure that leaves a majority of voters and one member of the sync set. `async` (the seed's):
the reply goes out once the operation is durable on the primary; the committed log is shipped to
the backups every `replication_interval_s` (a binary log shipped after commit). Guarantee: none
beyond the primary's disk; killing the primary loses the acknowledged operations the backups had
not yet received (about `replication_interval_s` of them), and the lab's checker counts them.

Rejoin. A replica that (re)joins reports its position, the (epoch, seq) of its last entry. If the
primary's log holds that same entry, the backup is a prefix of the primary and catches up by log
replay; if the backup is ahead of the primary or its last entry differs (a former primary's
operations that no new primary ever had), or it is behind the primary's in-memory log, it catches
up by state transfer (common/storage/snapshot.py), which discards what the primary never had.

Messages (one JSON object per line; peer port 6005, witness port 6008):
  candidate -> voter  {"TASK": "PRE_VOTE" | "VOTE", "ID": 7, "EPOCH": 4, "CANDIDATE": "replica2",
                       "LAST_EPOCH": 3, "LAST_SEQ": 1041}
  voter -> candidate  {"ID": 7, "STATUS": "OK", "TASK": "VOTE_REPLY", "PRE": false, "EPOCH": 4,
                       "VOTER": "witness", "GRANTED": true, "REASON": null, "PROMISED_EPOCH": 4}
                       (a replica voter adds its own LAST_EPOCH and LAST_SEQ)
  primary -> voter    {"TASK": "LEASE", "ID": 12, "EPOCH": 4, "PRIMARY": "replica2", "DURATION_MS": 1000,
                       "SYNC_SET": {"EPOCH": 4, "VERSION": 2, "MEMBERS": ["replica1", "replica2"]},
                       "CLIENT_ADDRESS": "127.0.0.13:6004", "PRIMARY_SEQ": 1090}
  voter -> primary    {"ID": 12, "STATUS": "OK", "TASK": "LEASE_REPLY", "EPOCH": 4, "VOTER": "witness",
                       "GRANTED": true, "REASON": null, "PROMISED_EPOCH": 4, "SYNC_STORED": [4, 2]}
  primary -> backup   {"TASK": "HELLO", "EPOCH": 4, "SESSION": 1, "PRIMARY": "replica2", "CLIENT_ADDRESS": "127.0.0.13:6004"}
  backup -> primary   {"TASK": "POSITION", "EPOCH": 4, "SESSION": 1, "REPLICA": "replica1", "LAST_EPOCH": 3,
                       "LAST_SEQ": 1050, "DURABLE_SEQ": 1046}
  primary -> backup   {"TASK": "APPEND", "EPOCH": 4, "FROM_SEQ": 1042, "ENTRY_EPOCH": 4, "PRIMARY_SEQ": 1090,
                       "ENTRIES": [["<op id>", "TRANSFER", "alice", "bob", 150, null], ...]}
                      or a state transfer: SNAPSHOT_BEGIN ... SNAPSHOT_END (common/storage/snapshot.py)
  primary -> backup   {"TASK": "CAUGHT_UP", "EPOCH": 4, "SEQ": 1090}  (its log is the primary's up to
                       here; from now on it may serve reads, until its link to the primary ends)
  backup -> primary   {"TASK": "ACK", "EPOCH": 4, "SEQ": 1090}
  refusal             {"STATUS": "NOK", "ERROR": "STALE_EPOCH", "DETAIL": ..., "DEFINITE": true, "PROMISED_EPOCH": 5}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from common.bank.errors import SaldoError
from common.bank.money import MAX_AMOUNT_CENTS
from common.bank.state import ACCOUNT_RE, OP_ID_RE, OPERATION_KINDS, TRANSFER, Operation

PRIMARY, BACKUP, CANDIDATE = "primary", "backup", "candidate"
SYNC, ASYNC = "sync", "async"
REPLICATION_MODES = (SYNC, ASYNC)

# Why a voter said no (REASON of VOTE_REPLY and LEASE_REPLY).
STALE_EPOCH = "STALE_EPOCH"  # the request's epoch is below the voter's promise
ALREADY_VOTED = "ALREADY_VOTED"  # the voter voted for another candidate in this epoch
EPOCH_HAS_PRIMARY = "EPOCH_HAS_PRIMARY"  # the voter already granted a lease in this epoch
LEASE_ACTIVE = "LEASE_ACTIVE"  # the voter's promise to the current primary has not run out
RESTARTED = "RESTARTED"  # the voter restarted less than a lease ago (it may have promised before)
NOT_IN_SYNC_SET = "NOT_IN_SYNC_SET"  # the candidate may lack acknowledged operations
BEHIND = "BEHIND"  # the candidate's log is older than the voter's
SERVING_AS_PRIMARY = "SERVING_AS_PRIMARY"  # the voter is the primary itself
LEASE_TOO_LONG = "LEASE_TOO_LONG"  # longer than this voter's lease duration (its restart quiet time covers no more)
UNKNOWN_NODE = "UNKNOWN_NODE"

# Where the primary stands with one backup's stream.
DISCONNECTED, HELLO_SENT, SNAPSHOT, CATCHING_UP, LIVE = "disconnected", "hello_sent", "snapshot", "catching_up", "live"
REPLAY = "replay"

DEFAULT_MAX_LOG_ENTRIES = 200_000
MAX_ENTRIES_PER_APPEND = 2_000  # keeps an APPEND line far below the peer line limit
MAX_LEASE_DURATION_S = 60.0
MAX_LEASE_ROUNDS_REMEMBERED = 64
MAX_NAME_CHARS = 64
# A live backup this close behind the commit point joins the sync set (see _manage_sync_set); one
# further behind (e.g. still installing a state transfer) first catches up without holding replies.
MAX_JOIN_LAG_ENTRIES = 1_000
_RECORDED_ERRORS = frozenset({"INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "BALANCE_LIMIT", "TOO_MANY_ACCOUNTS"})


@dataclass(frozen=True)
class Timing:
    """The protocol's clocks. Every duration is measured on the local monotonic clock of the node
    that measures it; `clock_drift` bounds how much two nodes' clock rates may differ."""

    lease_duration_s: float = 1.0
    heartbeat_interval_s: float = 0.1
    backup_timeout_s: float = 1.0
    vote_timeout_s: float = 0.3
    election_stagger_s: float = 0.1
    clock_drift: float = 0.05
    replication_interval_s: float = 0.01  # async mode: how often the stream is shipped

    def __post_init__(self) -> None:
        assert 0 < self.lease_duration_s <= MAX_LEASE_DURATION_S, self.lease_duration_s
        # At least three renewals per lease, so one lost or late renewal costs nothing.
        assert 0 < 3 * self.heartbeat_interval_s <= self.lease_duration_s, (self.heartbeat_interval_s, self.lease_duration_s)
        assert self.backup_timeout_s > 0 and self.vote_timeout_s > 0 and self.election_stagger_s >= 0
        assert 0 <= self.clock_drift < 0.5 and self.replication_interval_s >= 0

    @property
    def holder_lease_s(self) -> float:
        """How long after sending a renewal the primary may count on it."""
        return self.lease_duration_s * (1 - self.clock_drift)

    @property
    def quiet_after_restart_s(self) -> float:
        """How long a restarted voter votes for nobody: longer than any promise it made before."""
        return self.lease_duration_s * (1 + self.clock_drift)


class Position(NamedTuple):
    """A log's last entry: its epoch, then its sequence number. Tuple order is Raft's "at least as
    up to date" order: a later epoch wins, then a longer log."""

    epoch: int
    seq: int


class SyncSet(NamedTuple):
    """The replicas that hold every acknowledged operation, as proposed by the primary of `epoch`
    (its `version`-th proposal). (epoch, version) orders proposals; only one primary per epoch
    proposes, so the pair names one set."""

    epoch: int
    version: int
    members: tuple[str, ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.epoch, self.version)


def _is_newer(candidate: SyncSet, than: SyncSet | None) -> bool:
    return than is None or candidate.key > than.key


# --- Field validation (every message from the network goes through these) -----------------------


def int_field(message: dict, name: str, low: int = 0, high: int = 2**62) -> int:
    value = message.get(name)
    if type(value) is not int:
        raise SaldoError("FIELD_TYPE" if value is not None else "MISSING_FIELD", f"{name} must be an integer")
    if not low <= value <= high:
        raise SaldoError("FIELD_INVALID", f"{name} must be in [{low}, {high}]")
    return value


def member_field(message: dict, name: str, allowed: frozenset[str]) -> str:
    value = message.get(name)
    if type(value) is not str:
        raise SaldoError("FIELD_TYPE" if value is not None else "MISSING_FIELD", f"{name} must be a node name")
    if value not in allowed:
        raise SaldoError("FIELD_INVALID", f"{name} {value[:MAX_NAME_CHARS]!r} is not a member of this cluster")
    return value


def bool_field(message: dict, name: str, default: bool | None = None) -> bool:
    value = message.get(name, default)
    if type(value) is not bool:
        raise SaldoError("FIELD_TYPE", f"{name} must be true or false")
    return value


def address_field(message: dict, name: str) -> str | None:
    value = message.get(name)
    if value is None:
        return None
    if type(value) is not str or len(value) > 80 or value.count(":") != 1:
        raise SaldoError("FIELD_INVALID", f"{name} must be host:port")
    host, port = value.split(":")
    if not host or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        raise SaldoError("FIELD_INVALID", f"{name} must be host:port")
    return value


def parse_sync_set(value: object, replicas: frozenset[str]) -> SyncSet:
    if type(value) is not dict:
        raise SaldoError("FIELD_TYPE", "SYNC_SET must be an object")
    epoch = int_field(value, "EPOCH")
    version = int_field(value, "VERSION")
    members = value.get("MEMBERS")
    if type(members) is not list or not members or len(members) > len(replicas):
        raise SaldoError("FIELD_INVALID", "SYNC_SET MEMBERS must be a non-empty list of replicas")
    if any(type(m) is not str or m not in replicas for m in members) or len(set(members)) != len(members):
        raise SaldoError("FIELD_INVALID", "SYNC_SET MEMBERS must name distinct replicas of this cluster")
    return SyncSet(epoch, version, tuple(sorted(members)))


def sync_set_json(sync_set: SyncSet) -> dict:
    return {"EPOCH": sync_set.epoch, "VERSION": sync_set.version, "MEMBERS": list(sync_set.members)}


# --- The voter: the same rules at a replica and at the witness ---------------------------------


@dataclass(frozen=True)
class VoterRecord:
    """What a voter keeps on disk, written before any answer that depends on it goes out."""

    promised_epoch: int = 0
    voted_for: str | None = None  # whom it voted for in promised_epoch (None: nobody, or a lease only)
    sync_set: SyncSet | None = None  # the newest sync set it was told of


class Decision(NamedTuple):
    granted: bool
    reason: str | None


class Voter:
    """Decides votes and lease grants. `record` is what is on disk (or about to be: when a decision
    changes it, `dirty` is set and the caller persists `record` before replying). The lease promise
    (`lease_holder`, `lease_until_s`) is kept in memory only: after a restart the voter stays quiet
    for a lease duration instead (see Timing.quiet_after_restart_s)."""

    def __init__(self, name: str, replicas: list[str], record: VoterRecord, timing: Timing, started_at_s: float) -> None:
        self.name = name
        self.replicas = frozenset(replicas)
        self.record = record
        self.timing = timing
        self.lease_holder: str | None = None
        self.lease_epoch = 0
        self.lease_until_s = -math.inf
        # A voter that never promised anything (a fresh one) has nothing to wait for.
        self.quiet_until_s = started_at_s + timing.quiet_after_restart_s if record.promised_epoch > 0 else -math.inf
        self.serving_as_primary = False  # a replica's own voter while it is the primary
        self.dirty = False

    def eligible(self, candidate: str) -> bool:
        """May `candidate` become primary? Only a member of the newest sync set this voter knows
        (before any is known: every replica)."""
        sync_set = self.record.sync_set
        return sync_set is None or candidate in sync_set.members

    def lease_active(self, now_s: float) -> bool:
        return self.lease_holder is not None and now_s < self.lease_until_s

    def decide_vote(
        self, epoch: int, candidate: str, position: Position, own_position: Position | None, now_s: float, *, pre: bool
    ) -> Decision:
        """A candidate asks for this voter's vote in `epoch` (`pre`: would you, without promising).
        A granted real vote is also the winner's first lease grant."""
        record = self.record
        if candidate not in self.replicas:
            return Decision(False, UNKNOWN_NODE)
        if epoch < record.promised_epoch:
            return Decision(False, STALE_EPOCH)
        if epoch == record.promised_epoch:
            if record.voted_for == candidate:
                return Decision(True, None)  # a retransmission: the same answer
            return Decision(False, ALREADY_VOTED if record.voted_for is not None else EPOCH_HAS_PRIMARY)
        if self.serving_as_primary and candidate != self.name:
            return Decision(False, SERVING_AS_PRIMARY)
        if now_s < self.quiet_until_s:
            return Decision(False, RESTARTED)
        if self.lease_holder not in (None, candidate) and now_s < self.lease_until_s:
            return Decision(False, LEASE_ACTIVE)
        if not self.eligible(candidate):
            return Decision(False, NOT_IN_SYNC_SET)
        if own_position is not None and position < own_position:
            return Decision(False, BEHIND)
        if not pre:
            self.record = replace(record, promised_epoch=epoch, voted_for=candidate)
            self.dirty = True
            if candidate != self.name:
                self._promise(candidate, epoch, now_s + self.timing.lease_duration_s)
        return Decision(True, None)

    def decide_lease(self, epoch: int, primary: str, sync_set: SyncSet | None, duration_s: float, now_s: float) -> Decision:
        """The primary of `epoch` asks for (a renewal of) its lease, and tells its sync set."""
        record = self.record
        if primary not in self.replicas:
            return Decision(False, UNKNOWN_NODE)
        if duration_s > self.timing.lease_duration_s:
            return Decision(False, LEASE_TOO_LONG)
        if epoch < record.promised_epoch:
            return Decision(False, STALE_EPOCH)
        if self.serving_as_primary and primary != self.name:
            return Decision(False, SERVING_AS_PRIMARY)
        if self.lease_holder not in (None, primary) and self.lease_epoch >= epoch and now_s < self.lease_until_s:
            return Decision(False, LEASE_ACTIVE)  # one primary per epoch: refuse a second one
        changed = record
        if epoch > record.promised_epoch:
            changed = replace(changed, promised_epoch=epoch, voted_for=None)
        if sync_set is not None and _is_newer(sync_set, record.sync_set):
            changed = replace(changed, sync_set=sync_set)
        if changed is not record:
            self.record = changed
            self.dirty = True
        self._promise(primary, epoch, now_s + duration_s)
        return Decision(True, None)

    def _promise(self, holder: str, epoch: int, until_s: float) -> None:
        if holder != self.lease_holder or epoch != self.lease_epoch:
            self.lease_holder, self.lease_epoch, self.lease_until_s = holder, epoch, until_s
        else:
            self.lease_until_s = max(self.lease_until_s, until_s)

    def step_down(self, now_s: float) -> None:
        """This replica stops being the primary: it counted itself as a voter granting its own lease
        until now, so it keeps that promise for a lease duration."""
        self.serving_as_primary = False
        self._promise(self.name, self.lease_epoch, now_s + self.timing.lease_duration_s)

    def take_dirty(self) -> VoterRecord | None:
        if not self.dirty:
            return None
        self.dirty = False
        return self.record


# --- The primary's lease ------------------------------------------------------------------------


class Lease:
    """The primary's view of its lease: for each other voter, the send time of the newest request
    it granted, and the newest sync set it has stored. The primary itself always counts as granting
    (and storing what it has persisted)."""

    def __init__(self, holder: str, voters: list[str], timing: Timing) -> None:
        assert holder in voters
        self.majority = len(voters) // 2 + 1
        self.timing = timing
        self._granted_sent_at = {v: -math.inf for v in voters if v != holder}
        self._sync_stored: dict[str, tuple[int, int]] = {v: (0, 0) for v in voters if v != holder}
        self._rounds: dict[int, float] = {}
        self._next_round = 1
        self._expiry_s = -math.inf  # recomputed only when a grant changes (it is read once per request)
        self._recompute_expiry()

    def new_round(self, now_s: float) -> int:
        """A renewal sent now to every other voter; the request id its replies echo."""
        round_id = self._next_round
        self._next_round += 1
        self._rounds[round_id] = now_s
        if len(self._rounds) > MAX_LEASE_ROUNDS_REMEMBERED:
            del self._rounds[next(iter(self._rounds))]
        return round_id

    def on_vote(self, voter: str, sent_at_s: float) -> None:
        if voter in self._granted_sent_at:
            self._granted_sent_at[voter] = max(self._granted_sent_at[voter], sent_at_s)
            self._recompute_expiry()

    def on_reply(self, voter: str, round_id: int, granted: bool, sync_stored: tuple[int, int] | None) -> None:
        if voter not in self._granted_sent_at:
            return
        sent_at = self._rounds.get(round_id)
        if granted and sent_at is not None and sent_at > self._granted_sent_at[voter]:
            self._granted_sent_at[voter] = sent_at
            self._recompute_expiry()
        if sync_stored is not None and sync_stored > self._sync_stored[voter]:
            self._sync_stored[voter] = sync_stored

    def _recompute_expiry(self) -> None:
        """The lease ends `holder_lease_s` after the send time of the grant that completes the
        newest majority (the primary itself being the first member of it)."""
        need = self.majority - 1
        if need == 0:
            self._expiry_s = math.inf  # a one-voter cluster: nobody else could ever be elected
            return
        newest_first = sorted(self._granted_sent_at.values(), reverse=True)
        self._expiry_s = newest_first[need - 1] + self.timing.holder_lease_s

    def expiry_s(self) -> float:
        return self._expiry_s

    def valid(self, now_s: float) -> bool:
        return now_s < self._expiry_s

    def stored_by_majority(self, key: tuple[int, int], stored_here: bool) -> bool:
        count = (1 if stored_here else 0) + sum(1 for stored in self._sync_stored.values() if stored >= key)
        return count >= self.majority


# --- Elections ----------------------------------------------------------------------------------


class Election:
    """One attempt of a candidate: a pre-vote round, then (with a majority) a vote round."""

    def __init__(self, epoch: int, voters: list[str], now_s: float) -> None:
        self.epoch = epoch
        self.majority = len(voters) // 2 + 1
        self.pre = True
        self.round_started_s = now_s
        self.vote_sent_at_s = now_s
        self.grants: set[str] = set()
        self.refusals: dict[str, str] = {}
        self.better: list[tuple[str, Position]] = []  # replica voters with a more up-to-date log

    def start_vote_round(self, now_s: float) -> None:
        self.pre = False
        self.round_started_s = now_s
        self.vote_sent_at_s = now_s
        self.grants.clear()
        self.refusals.clear()

    @property
    def won(self) -> bool:
        return len(self.grants) >= self.majority


# --- The replicated log in memory ---------------------------------------------------------------


class ReplicationLog:
    """The last `max_entries` applied entries as (seq, entry epoch, text), for catch-up by replay.
    `base` is the position just before the first entry held; at start the log is empty and its
    base is the replica's durable position. Entries run from base.seq + 1 without a gap."""

    def __init__(self, base: Position, max_entries: int = DEFAULT_MAX_LOG_ENTRIES) -> None:
        assert max_entries > 0
        self.max_entries = max_entries
        self._entries: list[tuple[int, str]] = []  # (entry epoch, text); a list with a moving start
        self._start = 0
        self.base = base
        # Kept as plain attributes: the primary reads them for every operation.
        self.last_seq = base.seq
        self.last_epoch = base.epoch

    def __len__(self) -> int:
        return self.last_seq - self.base.seq

    @property
    def position(self) -> Position:
        return Position(self.last_epoch, self.last_seq)

    def append(self, seq: int, epoch: int, text: str) -> None:
        assert seq == self.last_seq + 1 and epoch >= self.last_epoch, (seq, epoch, self.position)
        self._entries.append((epoch, text))
        self.last_seq = seq
        self.last_epoch = epoch
        if seq - self.base.seq > self.max_entries:
            first_epoch, _text = self._entries[self._start]
            self._start += 1
            self.base = Position(first_epoch, self.base.seq + 1)
            if self._start > self.max_entries:  # compact: amortised O(1) per entry
                del self._entries[: self._start]
                self._start = 0

    def epoch_at(self, seq: int) -> int | None:
        """The epoch of entry `seq` (of the base, for base.seq); None if the log does not hold it."""
        if seq == self.base.seq:
            return self.base.epoch
        if self.base.seq < seq <= self.last_seq:
            return self._entries[self._start + seq - self.base.seq - 1][0]
        return None

    def runs(self, from_seq: int, to_seq: int) -> list[tuple[int, int, list[str]]]:
        """Entries from_seq..to_seq as runs of one entry epoch: [(entry epoch, first seq, texts)],
        each at most MAX_ENTRIES_PER_APPEND long."""
        assert self.base.seq < from_seq and to_seq <= self.last_seq, (from_seq, to_seq, self.base, self.last_seq)
        runs: list[tuple[int, int, list[str]]] = []
        offset = self._start - self.base.seq - 1
        entries = self._entries
        seq = from_seq
        while seq <= to_seq:
            epoch = entries[offset + seq][0]
            first = seq
            texts = []
            while seq <= to_seq and len(texts) < MAX_ENTRIES_PER_APPEND:
                entry_epoch, text = entries[offset + seq]
                if entry_epoch != epoch:
                    break
                texts.append(text)
                seq += 1
            runs.append((epoch, first, texts))
        return runs

    def reset(self, base: Position) -> None:
        """After a state transfer: the log restarts empty at the installed position."""
        self._entries = []
        self._start = 0
        self.base = base
        self.last_seq = base.seq
        self.last_epoch = base.epoch


def plan_catch_up(log: ReplicationLog, backup_position: Position) -> tuple[str, str]:
    """How a (re)joining backup catches up with this primary's log: (REPLAY, why) from its next
    seq, or (SNAPSHOT, why). Replay is possible only when the primary holds the backup's last entry
    itself (same seq, same epoch): then, by the log matching rule, the backup's log is a prefix."""
    if backup_position.seq > log.last_seq:
        return SNAPSHOT, "ahead: it holds operations this primary never had"
    epoch = log.epoch_at(backup_position.seq)
    if epoch is None:
        return SNAPSHOT, "behind the replication log held in memory"
    if epoch != backup_position.epoch:
        return SNAPSHOT, "diverged: its last operations are not this primary's"
    return REPLAY, "its log is a prefix of this primary's"


# --- Entries and their messages -----------------------------------------------------------------


def entry_text(op: Operation, error: str | None) -> str:
    """One entry of an APPEND as JSON text: [op id, kind, account, to account, cents, outcome error].
    Names and ids are of a plain character set (common/bank/state.py), so no escaping is needed; the
    error lets the backup check that it decided the same outcome."""
    to_account = "null" if op.to_account is None else f'"{op.to_account}"'
    outcome = "null" if error is None else f'"{error}"'
    return f'["{op.op_id}","{op.kind}","{op.account}",{to_account},{op.amount_cents},{outcome}]'


def append_line(epoch: int, primary_seq: int, entry_epoch: int, first_seq: int, texts: list[str]) -> bytes:
    return (
        f'{{"TASK":"APPEND","EPOCH":{epoch},"FROM_SEQ":{first_seq},"ENTRY_EPOCH":{entry_epoch},'
        f'"PRIMARY_SEQ":{primary_seq},"ENTRIES":[{",".join(texts)}]}}\n'
    ).encode()


class Append(NamedTuple):
    epoch: int
    from_seq: int
    entry_epoch: int
    primary_seq: int
    entries: list[tuple[Operation, str | None]]


def parse_append(message: dict) -> Append:
    """Validate an APPEND from the network; raise SaldoError if any part of it is not right."""
    epoch = int_field(message, "EPOCH", 1)
    from_seq = int_field(message, "FROM_SEQ", 1)
    entry_epoch = int_field(message, "ENTRY_EPOCH", 1, epoch)
    primary_seq = int_field(message, "PRIMARY_SEQ")
    items = message.get("ENTRIES")
    if type(items) is not list or not items or len(items) > MAX_ENTRIES_PER_APPEND:
        raise SaldoError("FIELD_INVALID", f"ENTRIES must be a list of 1 to {MAX_ENTRIES_PER_APPEND} entries")
    entries = []
    account_re = ACCOUNT_RE.fullmatch
    for item in items:
        if type(item) is not list or len(item) != 6:
            raise SaldoError("FIELD_INVALID", "an entry is [op id, kind, account, to account, cents, error]")
        op_id, kind, account, to_account, amount, error = item
        if type(op_id) is not str or OP_ID_RE.fullmatch(op_id) is None or kind not in OPERATION_KINDS:
            raise SaldoError("FIELD_INVALID", "an entry has a bad operation id or kind")
        if type(account) is not str or account_re(account) is None:
            raise SaldoError("ACCOUNT_INVALID", "an entry has a bad account name")
        if kind == TRANSFER:
            if type(to_account) is not str or account_re(to_account) is None or to_account == account:
                raise SaldoError("FIELD_INVALID", "a transfer entry needs a second, different account")
        elif to_account is not None:
            raise SaldoError("FIELD_INVALID", "only a transfer entry names a second account")
        if type(amount) is not int or not 0 < amount <= MAX_AMOUNT_CENTS:
            raise SaldoError("FIELD_INVALID", "an entry's cents must be an integer in (0, max]")
        if error is not None and (type(error) is not str or error not in _RECORDED_ERRORS):
            raise SaldoError("FIELD_INVALID", "an entry's error must be null or a recorded outcome")
        entries.append((Operation(op_id, kind, account, to_account, amount), error))
    if from_seq + len(entries) - 1 > primary_seq:
        raise SaldoError("FIELD_INVALID", "PRIMARY_SEQ is below the entries sent")
    return Append(epoch, from_seq, entry_epoch, primary_seq, entries)


# The canonical form of an APPEND, as append_line writes it: one regular expression for the header
# and one per entry recognise and validate a whole line without building dicts and lists (the
# backup's hot path), and give each entry's text for the backup's own log. Anything else goes
# through the JSON decoder and parse_append; both give the same Append (tests/test_primary_backup_core.py).
_CANONICAL_APPEND = re.compile(
    rb'\{"TASK":"APPEND","EPOCH":([1-9][0-9]{0,17}),"FROM_SEQ":([1-9][0-9]{0,17}),"ENTRY_EPOCH":([1-9][0-9]{0,17}),'
    rb'"PRIMARY_SEQ":([0-9]{1,18}),"ENTRIES":\[(.+)\]\}[ \t\r]*'
)
_CANONICAL_ENTRY = re.compile(
    r'\["([A-Za-z0-9_.:-]{1,64})","(DEPOSIT|WITHDRAW|TRANSFER)","([A-Za-z0-9_.@-]{1,64})",'
    r'(?:null|"([A-Za-z0-9_.@-]{1,64})"),([1-9][0-9]{0,15}),'
    r'(?:null|"(INSUFFICIENT_FUNDS|ACCOUNT_NOT_FOUND|BALANCE_LIMIT|TOO_MANY_ACCOUNTS)")\]'
)


def parse_append_line(line: bytes) -> tuple[Append, list[str]] | None:
    """An APPEND line in canonical form: (the Append, each entry's text); None for any other line
    (then decode it and use parse_append, which also says what is wrong)."""
    match = _CANONICAL_APPEND.fullmatch(line)
    if match is None:
        return None
    epoch, from_seq, entry_epoch, primary_seq = (int(x) for x in match.group(1, 2, 3, 4))
    body = match.group(5).decode("ascii", "replace")
    entries: list[tuple[Operation, str | None]] = []
    texts: list[str] = []
    entry_match = _CANONICAL_ENTRY.match
    position = 0
    end = len(body)
    while True:
        found = entry_match(body, position)
        if found is None:
            return None
        op_id, kind, account, to_account, cents, error = found.groups()
        amount = int(cents)
        if (to_account is None) != (kind != TRANSFER) or to_account == account or amount > MAX_AMOUNT_CENTS:
            return None
        entries.append((Operation(op_id, kind, account, to_account, amount), error))
        texts.append(found.group(0))
        position = found.end()
        if position == end:
            break
        if body[position] != "," or len(entries) >= MAX_ENTRIES_PER_APPEND:
            return None
        position += 1
    if entry_epoch > epoch or from_seq + len(entries) - 1 > primary_seq:
        return None
    return Append(epoch, from_seq, entry_epoch, primary_seq, entries), texts


def ack_line(epoch: int, seq: int) -> bytes:
    return f'{{"TASK":"ACK","EPOCH":{epoch},"SEQ":{seq}}}\n'.encode()


def stale_epoch_reply(promised_epoch: int, detail: str, request_id: object = None) -> dict:
    reply: dict = {} if request_id is None else {"ID": request_id}
    reply.update({"STATUS": "NOK", "ERROR": "STALE_EPOCH", "DETAIL": detail, "DEFINITE": True,
                  "PROMISED_EPOCH": promised_epoch})
    return reply


class VoteRequest(NamedTuple):
    epoch: int
    candidate: str
    position: Position
    pre: bool


def parse_vote_request(message: dict, replicas: frozenset[str]) -> VoteRequest:
    pre = message.get("TASK") == "PRE_VOTE"
    epoch = int_field(message, "EPOCH", 1)
    candidate = member_field(message, "CANDIDATE", replicas)
    position = Position(int_field(message, "LAST_EPOCH"), int_field(message, "LAST_SEQ"))
    if position.epoch >= epoch:
        raise SaldoError("FIELD_INVALID", "LAST_EPOCH must be below the EPOCH asked for")
    return VoteRequest(epoch, candidate, position, pre)


class VoteReply(NamedTuple):
    voter: str
    epoch: int
    pre: bool
    granted: bool
    reason: str | None
    promised_epoch: int
    position: Position | None  # a replica voter's own log position


def vote_reply_message(request_id: object, voter: str, request: VoteRequest, decision: Decision, promised_epoch: int,
                       position: Position | None) -> dict:
    reply = {"ID": request_id, "STATUS": "OK", "TASK": "VOTE_REPLY", "PRE": request.pre, "EPOCH": request.epoch,
             "VOTER": voter, "GRANTED": decision.granted, "REASON": decision.reason, "PROMISED_EPOCH": promised_epoch}
    if position is not None:
        reply["LAST_EPOCH"], reply["LAST_SEQ"] = position
    return reply


def parse_vote_reply(message: dict, voters: frozenset[str]) -> VoteReply:
    position = None
    if "LAST_SEQ" in message:
        position = Position(int_field(message, "LAST_EPOCH"), int_field(message, "LAST_SEQ"))
    reason = message.get("REASON")
    if reason is not None and type(reason) is not str:
        raise SaldoError("FIELD_TYPE", "REASON must be a string or null")
    return VoteReply(member_field(message, "VOTER", voters), int_field(message, "EPOCH", 1), bool_field(message, "PRE"),
                     bool_field(message, "GRANTED"), reason, int_field(message, "PROMISED_EPOCH"), position)


class LeaseRequest(NamedTuple):
    epoch: int
    primary: str
    duration_s: float
    sync_set: SyncSet | None
    client_address: str | None
    primary_seq: int


def parse_lease_request(message: dict, replicas: frozenset[str]) -> LeaseRequest:
    sync_set = message.get("SYNC_SET")
    return LeaseRequest(
        int_field(message, "EPOCH", 1),
        member_field(message, "PRIMARY", replicas),
        int_field(message, "DURATION_MS", 1, int(MAX_LEASE_DURATION_S * 1000)) / 1000.0,
        None if sync_set is None else parse_sync_set(sync_set, replicas),
        address_field(message, "CLIENT_ADDRESS"),
        int_field(message, "PRIMARY_SEQ"),
    )


def lease_reply_message(request_id: object, voter: str, epoch: int, decision: Decision, record: VoterRecord) -> dict:
    stored = record.sync_set
    return {"ID": request_id, "STATUS": "OK", "TASK": "LEASE_REPLY", "EPOCH": epoch, "VOTER": voter,
            "GRANTED": decision.granted, "REASON": decision.reason, "PROMISED_EPOCH": record.promised_epoch,
            "SYNC_STORED": None if stored is None else list(stored.key)}


class LeaseReply(NamedTuple):
    voter: str
    round_id: int
    epoch: int
    granted: bool
    reason: str | None
    promised_epoch: int
    sync_stored: tuple[int, int] | None


def parse_lease_reply(message: dict, voters: frozenset[str]) -> LeaseReply:
    stored = message.get("SYNC_STORED")
    if stored is not None:
        if type(stored) is not list or len(stored) != 2 or any(type(x) is not int or x < 0 for x in stored):
            raise SaldoError("FIELD_INVALID", "SYNC_STORED must be [epoch, version] or null")
        stored = (stored[0], stored[1])
    reason = message.get("REASON")
    if reason is not None and type(reason) is not str:
        raise SaldoError("FIELD_TYPE", "REASON must be a string or null")
    return LeaseReply(member_field(message, "VOTER", voters), int_field(message, "ID", 1), int_field(message, "EPOCH", 1),
                      bool_field(message, "GRANTED"), reason, int_field(message, "PROMISED_EPOCH"), stored)


# --- Persisting a voter record ------------------------------------------------------------------
# A replica keeps its record in its store's replica_meta (integers only); the witness in a JSON file.

RECORD_META_KEYS = ("promised_epoch", "voted_for", "sync_epoch", "sync_version", "sync_members")


def record_to_meta(record: VoterRecord, replicas: list[str]) -> dict[str, int]:
    """voted_for as 1 + its index among the sorted replica names (0: nobody); the sync set's members
    as a bit mask over the same order."""
    order = sorted(replicas)
    sync_set = record.sync_set
    return {
        "promised_epoch": record.promised_epoch,
        "voted_for": 0 if record.voted_for is None else order.index(record.voted_for) + 1,
        "sync_epoch": 0 if sync_set is None else sync_set.epoch,
        "sync_version": 0 if sync_set is None else sync_set.version,
        "sync_members": 0 if sync_set is None else sum(1 << order.index(m) for m in sync_set.members),
    }


def record_from_meta(meta: dict[str, int], replicas: list[str]) -> VoterRecord:
    order = sorted(replicas)
    voted = meta.get("voted_for", 0)
    mask = meta.get("sync_members", 0)
    if not 0 <= voted <= len(order) or not 0 <= mask < (1 << len(order)):
        raise ValueError(f"the store's voter record does not fit the replicas {order}: {meta}")
    sync_set = None
    if mask:
        sync_set = SyncSet(meta.get("sync_epoch", 0), meta.get("sync_version", 0),
                           tuple(name for index, name in enumerate(order) if mask >> index & 1))
    return VoterRecord(meta.get("promised_epoch", 0), None if voted == 0 else order[voted - 1], sync_set)


def record_to_json(record: VoterRecord) -> dict:
    return {"promised_epoch": record.promised_epoch, "voted_for": record.voted_for,
            "sync_set": None if record.sync_set is None else sync_set_json(record.sync_set)}


def record_from_json(data: object, replicas: frozenset[str]) -> VoterRecord:
    if type(data) is not dict:
        raise ValueError("a voter record must be a JSON object")
    promised = data.get("promised_epoch", 0)
    voted_for = data.get("voted_for")
    if type(promised) is not int or promised < 0 or (voted_for is not None and voted_for not in replicas):
        raise ValueError(f"bad voter record {data}")
    sync_set = data.get("sync_set")
    return VoterRecord(promised, voted_for, None if sync_set is None else parse_sync_set(sync_set, replicas))


# --- The primary's state ------------------------------------------------------------------------


@dataclass
class BackupProgress:
    """The primary's view of one backup in this epoch (nothing carries over from earlier epochs:
    a backup's position is learnt again from its POSITION)."""

    name: str
    state: str = DISCONNECTED
    session: int = 0  # the newest HELLO sent to it: only the POSITION answering that one counts
    acked_seq: int = 0  # durable at the backup, acknowledged in this epoch
    last_progress_s: float = 0.0  # when it last acknowledged something, or had nothing to acknowledge


@dataclass
class Effects:
    """What the driver does after an event, in this order: persist the voter record (if any); send
    `send` at once and `after_persist` once the record is on disk; then look at the flags."""

    send: list[tuple[str, dict]] = field(default_factory=list)
    after_persist: list[tuple[str, dict]] = field(default_factory=list)
    persist: VoterRecord | None = None
    became_primary: bool = False
    stepped_down: bool = False
    commit_advanced: bool = False
    events: list[tuple[str, dict]] = field(default_factory=list)  # decisions worth a log line


class PrimaryState:
    """Everything a replica holds only while it is the primary: its lease, its backups' progress,
    the sync set, and the commit point (the highest seq whose reply may go out)."""

    def __init__(self, core: ReplicaCore, epoch: int, now_s: float) -> None:
        self.owner = core.name
        self.epoch = epoch
        self.lease = Lease(core.name, core.voters, core.timing)
        self.backups = {name: BackupProgress(name, last_progress_s=now_s) for name in core.replicas if name != core.name}
        known = core.voter.record.sync_set
        # Until its first proposal is stored by a majority, the new primary waits for the members of
        # the newest sync set it knows: it must not answer while they are the ones voters would elect.
        self.committed = known if known is not None else SyncSet(0, 0, tuple(core.replicas))
        members = (core.name,) if core.mode == SYNC else tuple(core.replicas)
        self.proposed = SyncSet(epoch, 1, members)
        self.joining: set[str] = set()  # waited for, not yet published
        self.stored_here = (0, 0)  # the newest sync set this replica's own record has on disk
        self.durable_seq = core.durable_seq  # not its applied position: the tail may still be on its way to disk
        self.commit_seq = 0
        self.next_round_at_s = now_s
        self.acks_total = 0

    def wait_set(self) -> set[str]:
        """The backups a sync reply waits for: every member of the committed set and of the proposed
        one (a removal counts only once stored by a majority), and those joining."""
        return (set(self.committed.members) | set(self.proposed.members) | self.joining) - {self.owner}


class ReplicaCore:
    """One replica's protocol state: its role, its voter, its log position, and (as primary) its
    PrimaryState or (as candidate) its Election. See the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        replicas: list[str],
        witnesses: list[str],
        *,
        mode: str,
        timing: Timing,
        record: VoterRecord,
        position: Position,
        now_s: float,
        client_address: str,
        max_log_entries: int = DEFAULT_MAX_LOG_ENTRIES,
    ) -> None:
        assert name in replicas and mode in REPLICATION_MODES
        assert len(set(replicas) | set(witnesses)) == len(replicas) + len(witnesses), "node names must be distinct"
        self.name = name
        self.replicas = sorted(replicas)
        self.witnesses = sorted(witnesses)
        self.voters = self.replicas + self.witnesses
        self.replica_set = frozenset(self.replicas)
        self.voter_set = frozenset(self.voters)
        self.others = [v for v in self.voters if v != name]
        self.mode = mode
        self.timing = timing
        self.client_address = client_address
        self.voter = Voter(name, self.replicas, record, timing, now_s)
        self.log = ReplicationLog(position, max_log_entries)
        self.durable_seq = position.seq
        self.role = BACKUP
        self.primary: PrimaryState | None = None
        self.election: Election | None = None
        # The primary this replica follows (or last heard of): for redirects and BEHIND.
        self.primary_name: str | None = None
        self.primary_address: str | None = None
        self.primary_epoch = 0
        self.primary_seq = position.seq
        self.following_epoch = 0  # the epoch whose HELLO this replica accepted (APPENDs must match)
        self.highest_epoch_seen = record.promised_epoch
        self.retry_election_at_s = now_s
        # A primary's HELLO says it is alive before its first LEASE round reaches this replica: no
        # candidacy until it could have renewed a lease (as if that round had been granted).
        self.greeted_until_s = -math.inf
        self.installing = False  # a state transfer is being installed: no election meanwhile
        # Why this replica's last candidacy ended without it becoming primary (STATUS, logs). Often
        # ordinary: two replicas stood at once and this one gave way.
        self.last_candidacy_end = ""
        self.last_step_down = ""
        self._next_request_id = 1
        self.elections_started = 0
        self.elections_won = 0

    # --- Reading the state ----------------------------------------------------------------------
    @property
    def position(self) -> Position:
        return self.log.position

    @property
    def epoch(self) -> int:
        """The epoch this replica is in: its own as primary, else the highest it has promised."""
        return self.primary.epoch if self.primary is not None else self.voter.record.promised_epoch

    def can_acknowledge(self, now_s: float) -> bool:
        return self.primary is not None and self.primary.lease.valid(now_s)

    @property
    def commit_seq(self) -> int:
        return self.primary.commit_seq if self.primary is not None else 0

    def redirect_target(self, now_s: float) -> str | None:
        """The client address of the primary this replica believes in: the holder of a promise it
        made that has not run out (a primary whose heartbeats stopped is not advertised)."""
        if self.primary is not None:
            return self.client_address
        if self.primary_name is not None and self.voter.lease_holder == self.primary_name and self.voter.lease_active(now_s):
            return self.primary_address
        return None

    def _request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    def _rank(self) -> int:
        """Order in which replicas stand for election, the last known primary left out, so that
        two backups rarely stand at once (the pre-vote keeps the most up-to-date one)."""
        others = [r for r in self.replicas if r != self.primary_name]
        return others.index(self.name) if self.name in others else 0

    def election_due_s(self) -> float:
        voter = self.voter
        promise_ends = voter.lease_until_s if voter.lease_holder not in (None, self.name) else -math.inf
        waits_until_s = max(promise_ends, voter.quiet_until_s, self.retry_election_at_s, self.greeted_until_s)
        return waits_until_s + self._rank() * self.timing.election_stagger_s

    # --- Time -----------------------------------------------------------------------------------
    def tick(self, now_s: float) -> Effects:
        effects = Effects()
        if self.primary is not None:
            self._primary_tick(now_s, effects)
        elif self.election is not None:
            if now_s - self.election.round_started_s >= self.timing.vote_timeout_s:
                self._abandon_election(now_s, "no majority in time", effects)
        elif not self.installing and now_s >= self.election_due_s():
            self._start_election(now_s, effects)
        return effects

    # --- Standing for election ------------------------------------------------------------------
    def _start_election(self, now_s: float, effects: Effects) -> None:
        epoch = max(self.voter.record.promised_epoch, self.highest_epoch_seen) + 1
        own = self.position
        decision = self.voter.decide_vote(epoch, self.name, own, own, now_s, pre=True)
        if not decision.granted:  # not eligible, restarted recently, or promised to a primary
            self.retry_election_at_s = now_s + self.timing.lease_duration_s / 2
            return
        self.elections_started += 1
        self.role = CANDIDATE
        election = self.election = Election(epoch, self.voters, now_s)
        election.grants.add(self.name)
        effects.events.append(("election_started", {"epoch": epoch, "last_entry_epoch": own.epoch, "last_seq": own.seq}))
        message = {"TASK": "PRE_VOTE", "ID": self._request_id(), "EPOCH": epoch, "CANDIDATE": self.name,
                   "LAST_EPOCH": own.epoch, "LAST_SEQ": own.seq}
        effects.send.extend((voter, message) for voter in self.others)
        self._advance_election(now_s, effects)

    def on_vote_reply(self, reply: VoteReply, now_s: float) -> Effects:
        effects = Effects()
        self.highest_epoch_seen = max(self.highest_epoch_seen, reply.promised_epoch)
        election = self.election
        if election is None or reply.epoch != election.epoch or reply.pre != election.pre:
            return effects  # a late reply to an earlier round
        if reply.granted:
            election.grants.add(reply.voter)
        else:
            election.refusals[reply.voter] = reply.reason or "?"
        # Only a replica that could win (a member of the sync set) is worth giving way to.
        if reply.position is not None and reply.position > self.position and self.voter.eligible(reply.voter):
            election.better.append((reply.voter, reply.position))
        self._advance_election(now_s, effects)
        return effects

    def _advance_election(self, now_s: float, effects: Effects) -> None:
        election = self.election
        assert election is not None
        if election.pre:
            if election.better:
                # A reachable replica holds a longer log: let it stand first.
                self._abandon_election(now_s, "a more up-to-date replica exists", effects,
                                       extra_wait_s=self.timing.election_stagger_s)
                return
            if not election.won:
                return
            own = self.position
            decision = self.voter.decide_vote(election.epoch, self.name, own, own, now_s, pre=False)
            if not decision.granted:
                self._abandon_election(now_s, f"own vote refused: {decision.reason}", effects)
                return
            election.start_vote_round(now_s)
            election.grants.add(self.name)
            effects.persist = self.voter.take_dirty()
            message = {"TASK": "VOTE", "ID": self._request_id(), "EPOCH": election.epoch, "CANDIDATE": self.name,
                       "LAST_EPOCH": own.epoch, "LAST_SEQ": own.seq}
            effects.after_persist.extend((voter, message) for voter in self.others)
        if not election.pre and election.won:
            self._become_primary(now_s, effects)

    def _abandon_election(self, now_s: float, why: str, effects: Effects, extra_wait_s: float = 0.0) -> None:
        election = self.election
        self.election = None
        self.role = BACKUP
        self.retry_election_at_s = now_s + extra_wait_s + self.timing.election_stagger_s * (1 + self._rank())
        self.last_candidacy_end = why
        if election is not None:
            effects.events.append(("election_abandoned", {"epoch": election.epoch, "pre_vote": election.pre, "why": why,
                                                          "refusals": ",".join(f"{v}:{r}" for v, r in election.refusals.items())}))

    def _become_primary(self, now_s: float, effects: Effects) -> None:
        election = self.election
        assert election is not None and election.won and election.epoch == self.voter.record.promised_epoch
        self.election = None
        self.role = PRIMARY
        self.elections_won += 1
        primary = self.primary = PrimaryState(self, election.epoch, now_s)
        for voter in election.grants:
            primary.lease.on_vote(voter, election.vote_sent_at_s)
        self.voter.serving_as_primary = True
        self.primary_name, self.primary_address, self.primary_epoch = self.name, self.client_address, election.epoch
        self.primary_seq = self.log.last_seq
        self._propose(primary.proposed, effects)
        effects.became_primary = True
        for backup in primary.backups:
            effects.send.append((backup, self._hello(backup)))
        self._primary_tick(now_s, effects)  # the first lease round, with the first proposal

    # --- Voting (this replica as a voter) -------------------------------------------------------
    def on_vote_request(self, request: VoteRequest, request_id: object, now_s: float) -> tuple[dict, Effects]:
        effects = Effects()
        decision = self.voter.decide_vote(request.epoch, request.candidate, request.position, self.position, now_s,
                                          pre=request.pre)
        if decision.granted and not request.pre and self.election is not None and request.candidate != self.name:
            self._abandon_election(now_s, f"gave way: voted for {request.candidate} in epoch {request.epoch}", effects)
        effects.persist = self.voter.take_dirty()
        self.highest_epoch_seen = max(self.highest_epoch_seen, request.epoch if decision.granted else 0)
        reply = vote_reply_message(request_id, self.name, request, decision, self.voter.record.promised_epoch, self.position)
        return reply, effects

    def on_lease_request(self, request: LeaseRequest, request_id: object, now_s: float) -> tuple[dict, Effects]:
        effects = Effects()
        if request.epoch > self.epoch and self.role != BACKUP and request.primary != self.name:
            self._step_down(now_s, effects, f"a primary of epoch {request.epoch} exists")
        decision = self.voter.decide_lease(request.epoch, request.primary, request.sync_set, request.duration_s, now_s)
        if decision.granted:
            self._learn_primary(request.primary, request.client_address, request.epoch)
            self.primary_seq = max(self.primary_seq, request.primary_seq) if request.epoch == self.primary_epoch else request.primary_seq
        effects.persist = self.voter.take_dirty()
        reply = lease_reply_message(request_id, self.name, request.epoch, decision, self.voter.record)
        return reply, effects

    def _learn_primary(self, primary: str, client_address: str | None, epoch: int) -> None:
        if epoch >= self.primary_epoch:
            self.primary_name, self.primary_epoch = primary, epoch
            if client_address is not None:
                self.primary_address = client_address
        self.highest_epoch_seen = max(self.highest_epoch_seen, epoch)

    def on_stale(self, promised_epoch: int, now_s: float) -> Effects:
        """A peer refused this replica's message: it has promised a newer epoch."""
        effects = Effects()
        self.highest_epoch_seen = max(self.highest_epoch_seen, promised_epoch)
        if self.primary is not None and promised_epoch > self.primary.epoch:
            self._step_down(now_s, effects, f"a voter promised epoch {promised_epoch}")
        return effects

    # --- The primary ----------------------------------------------------------------------------
    def _hello(self, backup: str) -> dict:
        assert self.primary is not None
        progress = self.primary.backups[backup]
        progress.state = HELLO_SENT
        progress.session += 1
        return {"TASK": "HELLO", "EPOCH": self.primary.epoch, "SESSION": progress.session, "PRIMARY": self.name,
                "CLIENT_ADDRESS": self.client_address}

    def on_link_up(self, peer: str, now_s: float) -> Effects:
        """A connection to `peer` is (again) open: the primary greets a backup on it."""
        effects = Effects()
        if self.primary is not None and peer in self.primary.backups:
            effects.send.append((peer, self._hello(peer)))
        return effects

    def on_link_down(self, peer: str) -> None:
        if self.primary is not None and peer in self.primary.backups:
            self.primary.backups[peer].state = DISCONNECTED

    def on_position(self, backup: str, epoch: int, session: int, position: Position, durable_seq: int, diverged: bool,
                    now_s: float) -> tuple[str, str] | None:
        """A backup answered HELLO with its position (and how much of it is on its disk): how it
        catches up, or None if the answer is not to the newest HELLO of this epoch (a link that
        reconnected twice gets two answers; the older one describes a log that has moved on).
        A backup that caught itself deciding other outcomes than the primary (`diverged`) gets a
        state transfer."""
        primary = self.primary
        if primary is None or epoch != primary.epoch or backup not in primary.backups:
            return None
        if session != primary.backups[backup].session:
            return None
        plan, why = (SNAPSHOT, "it reported a divergence") if diverged else plan_catch_up(self.log, position)
        progress = primary.backups[backup]
        progress.state = CATCHING_UP if plan == REPLAY else SNAPSHOT
        # Only what is on its disk counts as acknowledged; after a state transfer, nothing until it says so.
        progress.acked_seq = min(position.seq, durable_seq) if plan == REPLAY else 0
        progress.last_progress_s = now_s
        return plan, why

    def on_caught_up(self, backup: str, now_s: float) -> Effects:
        """The driver sent a backup everything up to the log's end: it follows the live stream."""
        effects = Effects()
        primary = self.primary
        if primary is not None and backup in primary.backups:
            progress = primary.backups[backup]
            progress.state = LIVE
            progress.last_progress_s = now_s
            self._manage_sync_set(now_s, effects)
        return effects

    def on_ack(self, backup: str, epoch: int, seq: int, now_s: float) -> Effects:
        effects = Effects()
        primary = self.primary
        if primary is None or epoch != primary.epoch or backup not in primary.backups:
            return effects
        if seq > self.log.last_seq:
            raise SaldoError("FIELD_INVALID", f"ACK of seq {seq} beyond the log ({self.log.last_seq})")
        progress = primary.backups[backup]
        if seq > progress.acked_seq:
            progress.acked_seq = seq
            progress.last_progress_s = now_s
            primary.acks_total += 1
            effects.commit_advanced = self._recompute_commit()
            if progress.name in primary.joining:
                self._manage_sync_set(now_s, effects)
        return effects

    def on_lease_reply(self, reply: LeaseReply, now_s: float) -> Effects:
        effects = Effects()
        primary = self.primary
        self.highest_epoch_seen = max(self.highest_epoch_seen, reply.promised_epoch)
        if primary is None or reply.epoch != primary.epoch:
            return effects
        if reply.promised_epoch > primary.epoch:
            self._step_down(now_s, effects, f"{reply.voter} promised epoch {reply.promised_epoch}")
            return effects
        primary.lease.on_reply(reply.voter, reply.round_id, reply.granted, reply.sync_stored)
        self._manage_sync_set(now_s, effects)
        return effects

    def record_entry(self, seq: int, entry_epoch: int, text: str) -> None:
        """An entry applied here (by the primary for a client, or by a backup from the stream)."""
        self.log.append(seq, entry_epoch, text)

    def on_local_durable(self, seq: int) -> Effects:
        """Everything up to `seq` is on this replica's disk."""
        effects = Effects()
        self.durable_seq = max(self.durable_seq, seq)
        if self.primary is not None:
            self.primary.durable_seq = max(self.primary.durable_seq, seq)
            effects.commit_advanced = self._recompute_commit()
        return effects

    def on_record_persisted(self, record: VoterRecord) -> Effects:
        effects = Effects()
        primary = self.primary
        if primary is not None and record.sync_set is not None and record.sync_set.key > primary.stored_here:
            primary.stored_here = record.sync_set.key
            self._manage_sync_set(now_s=None, effects=effects)
        return effects

    def _propose(self, sync_set: SyncSet, effects: Effects) -> None:
        assert self.primary is not None and sync_set.epoch == self.primary.epoch
        effects.events.append(("sync_set_proposed", {"version": sync_set.version, "members": ",".join(sync_set.members)}))
        self.primary.proposed = sync_set
        self.voter.record = replace(self.voter.record, sync_set=sync_set)
        self.voter.dirty = True
        effects.persist = self.voter.take_dirty()

    def _recompute_commit(self) -> bool:
        """The commit point: durable here and, in sync mode, acknowledged by every replica waited
        for. It never moves back (a joining backup only holds it still until it catches up)."""
        primary = self.primary
        assert primary is not None
        commit = primary.durable_seq
        if self.mode == SYNC:
            for name in primary.wait_set():
                acked = primary.backups[name].acked_seq
                commit = min(commit, acked)
        if commit > primary.commit_seq:
            primary.commit_seq = commit
            return True
        return False

    def _manage_sync_set(self, now_s: float | None, effects: Effects) -> None:
        """Commit a proposal stored by a majority; else start at most one change: drop a backup
        that stopped acknowledging, take in one that is live and holds everything acknowledged."""
        primary = self.primary
        if primary is None:
            return
        if primary.proposed != primary.committed:
            if primary.lease.stored_by_majority(primary.proposed.key, primary.stored_here >= primary.proposed.key):
                primary.committed = primary.proposed
                effects.events.append(("sync_set_committed", {"version": primary.committed.version,
                                                              "members": ",".join(primary.committed.members)}))
                effects.commit_advanced = self._recompute_commit() or effects.commit_advanced
            else:
                return
        if self.mode != SYNC:
            return
        members = set(primary.committed.members)
        for name in sorted(primary.joining):
            progress = primary.backups[name]
            if progress.state != LIVE or (now_s is not None and now_s - progress.last_progress_s > self.timing.backup_timeout_s):
                primary.joining.discard(name)
                effects.commit_advanced = self._recompute_commit() or effects.commit_advanced
            elif progress.acked_seq >= primary.commit_seq:
                primary.joining.discard(name)
                self._propose(SyncSet(primary.epoch, primary.proposed.version + 1, tuple(sorted(members | {name}))), effects)
                return
        if now_s is not None:
            for name in sorted(members - {self.name}):
                progress = primary.backups[name]
                if progress.acked_seq >= self.log.last_seq:
                    progress.last_progress_s = now_s  # nothing to acknowledge: not late
                elif now_s - progress.last_progress_s > self.timing.backup_timeout_s:
                    self._propose(SyncSet(primary.epoch, primary.proposed.version + 1, tuple(sorted(members - {name}))), effects)
                    return
        for name, progress in primary.backups.items():
            if progress.state != LIVE or name in members or name in primary.joining:
                continue
            if progress.acked_seq >= primary.commit_seq:
                self._propose(SyncSet(primary.epoch, primary.proposed.version + 1, tuple(sorted(members | {name}))), effects)
                return
            if progress.acked_seq + MAX_JOIN_LAG_ENTRIES >= primary.commit_seq:
                # Close behind: wait for it from now on (the commit point holds still for the few
                # milliseconds it needs), and publish it once it holds everything acknowledged.
                primary.joining.add(name)

    def _primary_tick(self, now_s: float, effects: Effects) -> None:
        primary = self.primary
        assert primary is not None
        if now_s >= primary.next_round_at_s:
            primary.next_round_at_s = now_s + self.timing.heartbeat_interval_s
            message = {"TASK": "LEASE", "ID": primary.lease.new_round(now_s), "EPOCH": primary.epoch, "PRIMARY": self.name,
                       "DURATION_MS": int(self.timing.lease_duration_s * 1000), "SYNC_SET": sync_set_json(primary.proposed),
                       "CLIENT_ADDRESS": self.client_address, "PRIMARY_SEQ": self.log.last_seq}
            effects.send.extend((voter, message) for voter in self.others)
        self._manage_sync_set(now_s, effects)

    def _step_down(self, now_s: float, effects: Effects, why: str) -> None:
        if self.primary is not None:
            self.voter.step_down(now_s)
            self.primary = None
            effects.stepped_down = True
        self.election = None
        self.role = BACKUP
        self.following_epoch = 0
        if self.primary_name == self.name:  # never redirect clients to a deposed self
            self.primary_name, self.primary_address = None, None
        self.retry_election_at_s = now_s + self.timing.election_stagger_s
        self.last_step_down = why

    # --- The backup -----------------------------------------------------------------------------
    def on_hello(self, epoch: int, session: int, primary: str, client_address: str | None, now_s: float) -> tuple[dict, Effects]:
        """The primary of `epoch` greets this replica: follow it (after storing the epoch), or refuse."""
        effects = Effects()
        record = self.voter.record
        if epoch < record.promised_epoch or primary == self.name or (self.primary is not None and epoch <= self.primary.epoch):
            return stale_epoch_reply(record.promised_epoch, f"this replica has promised epoch {record.promised_epoch}"), effects
        if self.role != BACKUP:
            self._step_down(now_s, effects, f"{primary} is the primary of epoch {epoch}")
        if epoch > record.promised_epoch:
            self.voter.record = replace(record, promised_epoch=epoch, voted_for=None)
            self.voter.dirty = True
        effects.persist = self.voter.take_dirty()
        self._learn_primary(primary, client_address, epoch)
        self.following_epoch = epoch
        self.greeted_until_s = now_s + self.timing.lease_duration_s
        position = self.position
        reply = {"TASK": "POSITION", "EPOCH": epoch, "SESSION": session, "REPLICA": self.name,
                 "LAST_EPOCH": position.epoch, "LAST_SEQ": position.seq}
        return reply, effects

    def check_append(self, append: Append) -> None:
        """Raise SaldoError unless this APPEND continues this replica's log in the epoch it follows."""
        record = self.voter.record
        if append.epoch < record.promised_epoch or append.epoch != self.following_epoch:
            raise SaldoError("STALE_EPOCH", f"this replica follows epoch {self.following_epoch}, promised {record.promised_epoch}")
        if append.from_seq != self.log.last_seq + 1:
            raise SaldoError("FIELD_INVALID", f"FROM_SEQ {append.from_seq} does not follow seq {self.log.last_seq}")
        if append.entry_epoch < self.position.epoch:
            raise SaldoError("FIELD_INVALID", f"ENTRY_EPOCH {append.entry_epoch} is below the log's {self.position.epoch}")
        self.primary_seq = max(self.primary_seq, append.primary_seq)

    def on_snapshot_installed(self, position: Position) -> None:
        self.log.reset(position)
        self.durable_seq = position.seq
        self.primary_seq = max(self.primary_seq, position.seq)

    def status(self, now_s: float) -> dict:
        status = {
            "ROLE": self.role,
            "EPOCH": self.epoch,
            "PROMISED_EPOCH": self.voter.record.promised_epoch,
            "LAST_APPLIED_SEQ": self.log.last_seq,
            "LAST_ENTRY_EPOCH": self.position.epoch,
            "DURABLE_SEQ": self.durable_seq,
            "PRIMARY": self.primary_name,
            "PRIMARY_ADDRESS": self.redirect_target(now_s),
            "SYNC_SET_KNOWN": None if self.voter.record.sync_set is None else sync_set_json(self.voter.record.sync_set),
            "LOG_ENTRIES": len(self.log),
            "LOG_START_SEQ": self.log.base.seq + 1,
            "ELECTIONS_STARTED": self.elections_started,
            "ELECTIONS_WON": self.elections_won,
            "LAST_CANDIDACY_END": self.last_candidacy_end,
        }
        primary = self.primary
        if primary is not None:
            status.update({
                "LEASE_VALID": primary.lease.valid(now_s),
                "LEASE_REMAINING_S": round(max(0.0, min(primary.lease.expiry_s() - now_s, 1e9)), 3),
                "COMMIT_SEQ": primary.commit_seq,
                "SYNC_SET": sync_set_json(primary.committed),
                "SYNC_SET_PROPOSED": sync_set_json(primary.proposed),
                "JOINING": sorted(primary.joining),
                "BACKUPS": {p.name: {"STATE": p.state, "ACKED_SEQ": p.acked_seq} for p in primary.backups.values()},
            })
        else:
            status["BEHIND"] = max(0, self.primary_seq - self.log.last_seq)
        return status
