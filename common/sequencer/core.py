"""Total order through a central sequencer (seed 002, part 3): the protocol, without I/O.

Owns the two state machines of the architecture and the messages between them. The I/O drivers
(common/sequencer/sequencer.py and common/sequencer/replica.py) feed them what arrives and carry
out what they return; a test can drive them with scripted message orders and no sockets.

The sequencer (`SequencerCore`):
1. gives each client operation the next sequence number (1, 2, 3, ... with no gap and no reuse,
   across restarts: the numbering continues from the durable log);
2. appends the numbered entry to its log; only once the log write is durable does it broadcast the
   entry to the replicas (a crash can then never hand out a number twice);
3. answers the client, by the client's choice ("WAIT"): once the entry is durable in the log
   (SEQUENCED), once a replica has applied it, with the result (APPLIED, the default), or once
   every replica has (ALL); while no replica is connected, a client waiting for an apply is told
   so (NO_REPLICA, indefinite: the entry stays in the log) instead of waiting in silence;
4. keeps the log from the oldest entry some replica may still need; once every replica has
   applied a prefix and has it on stable storage (SYNCED), that prefix is dropped (a lagging
   replica past the bound is dropped too, and must recover by state transfer). Memory and disk
   stay bounded.
5. remembers, for the last `dedup_window_ops` operations it numbered (`OperationIds`), each id's
   seq and a fingerprint of its operation, whether or not the log still holds the entry and across
   its own restarts (they are read back from the log and the segments kept for them, see
   common/sequencer/log.py). An id maps to one seq: a retry is answered with that seq, never numbered as
   a new operation, and the same id with another operation is refused ID_REUSED at once. The
   window counts the operations the replicas count in theirs (each entry that is not a retry is
   applied once by every replica), so while the sequencer remembers an id, so do the replicas.
6. answers a retry from what it holds: WAIT SEQUENCED at once (the entry is durable); otherwise
   with the outcome a replica sent, while it is cached; else the operation is logged once more as a
   retry entry (RETRY_OF: the seq it repeats). The replicas recognise the id and answer with the
   first outcome, changing nothing, and the client is told the first seq.

A replica (`SequencedReplicaCore`) delivers entries strictly in sequence order. An entry beyond
the next expected number means a gap: it is held (a bounded number of them) and the missing range
is asked for again (RESEND). An entry already delivered is ignored. Every replica acknowledges what it applied, and how far that is on its
disk (a replica syncs its store once in a while, not at every commit: until it has, the log keeps
what a power loss could take from it; replaying an entry gives the same outcome, since the replicas
are deterministic). One of them, the results source, also sends each operation's outcome, which the sequencer relays to the client (the
replicas are deterministic, so any one will do, and one is enough). When the results source goes
away, or stalls (no progress for `results_source_stall_s` while another replica applied what
clients await: a paused process, a cut link that has not ended yet), another replica is asked to
send the outcomes of everything still awaited. A restarted replica subscribes
with the last sequence number it applied (stored in the same transaction as the balances) and the
sequencer resends from there, or, if the log no longer holds it, says SNAPSHOT_NEEDED: the replica
then copies a peer replica's state (balances, applied ids, last sequence number) and subscribes
again from that point.

Messages (one JSON object per line, like every saldo port):
  replica -> sequencer  {"TASK": "SUBSCRIBE", "REPLICA": "replica1", "LAST_APPLIED_SEQ": 41}
  sequencer -> replica  {"TASK": "ORDERED", "SEQ": 42, "ID": "<op id>", "OP": "TRANSFER",
                         "FROM": "alice", "TO": "bob", "AMOUNT_CENTS": 150}
                        (a retry entry ends with "RETRY_OF": 13, the seq of the operation it repeats)
                        {"TASK": "SNAPSHOT_NEEDED", "LOG_START_SEQ": 9001}
                        {"TASK": "SUBSCRIBED", "SEND_RESULTS": true, "RESULTS_FROM_SEQ": 40}
                        {"TASK": "SEND_RESULTS", "FROM_SEQ": 40}
                        {"TASK": "STOP_RESULTS"}     (another replica sends the outcomes now)
                        {"TASK": "REPLACED", "DETAIL": ...}  (another connection subscribed under this
                                                              name: the replica waits before it subscribes again)
  replica -> sequencer  {"TASK": "APPLIED", "UPTO": 43, "SYNCED": 40, "RESULTS": [[42, null, 12050], [43, "INSUFFICIENT_FUNDS", null]]}
                        {"TASK": "RESEND", "FROM": 43, "TO": 45}
  client -> sequencer   a bank operation (common/bank/state.py), optionally "WAIT": "SEQUENCED" | "APPLIED" | "ALL"
  sequencer -> client   {"ID": ..., "STATUS": "OK", "BALANCE": "120.50", "SEQ": 42} (or NOK with the error)
"""

from __future__ import annotations

import json
import re
from array import array
from collections import deque
from dataclasses import InitVar, dataclass, field
from itertools import chain
from typing import Any, Iterable

from common.bank.errors import DETAIL_JSON, ERROR_CODES, SaldoError
from common.bank.money import MAX_AMOUNT_CENTS, MAX_BALANCE_CENTS, render_cents
from common.bank.state import (
    ACCOUNT_RE,
    DEFAULT_DEDUP_WINDOW_OPS,
    OP_ID_RE,
    OPERATION_KINDS,
    TRANSFER,
    Operation,
    Outcome,
)
from common.transport import wire

WAIT_SEQUENCED, WAIT_APPLIED, WAIT_ALL = "SEQUENCED", "APPLIED", "ALL"
WAIT_MODES = (WAIT_SEQUENCED, WAIT_APPLIED, WAIT_ALL)


def replicas_needed(wait: str, replica_count: int) -> int:
    """A client's WAIT as the number of replicas that must have applied the operation."""
    return {WAIT_SEQUENCED: 0, WAIT_APPLIED: 1, WAIT_ALL: replica_count}[wait]

DEFAULT_MAX_LOG_ENTRIES = 200_000
DEFAULT_MAX_WAITING_REQUESTS = 100_000
DEFAULT_RESULT_CACHE_ENTRIES = 100_000
DEFAULT_MAX_HELD_ENTRIES = 100_000
# A results source that applies nothing for this long, while another replica applied what clients
# wait for, is replaced: well above a healthy source's lag (milliseconds), well below a client's patience.
DEFAULT_RESULTS_SOURCE_STALL_S = 0.5
# Once no replica has been connected for this long, clients waiting for an apply are told so:
# longer than a replica takes to subscribe again (its reconnect backoff), shorter than a client's
# attempt timeout (2 s).
DEFAULT_NO_REPLICA_ANSWER_S = 1.0
MAX_RESULTS_PER_ACK = 4096  # bounds one APPLIED line well under the 64 KiB line limit
# A read naming MIN_SEQ waits this long at a replica that is not there yet, then gets TOO_STALE;
# a client waits longer than this for its answer.
MIN_SEQ_WAIT_S = 2.0

_RECORDED_ERRORS = frozenset({"INSUFFICIENT_FUNDS", "ACCOUNT_NOT_FOUND", "BALANCE_LIMIT", "TOO_MANY_ACCOUNTS"})


# --- Entries: the log's lines and the broadcast's lines are the same bytes ----------------------


def entry_line(seq: int, op: Operation, retry_of: int | None = None) -> bytes:
    """An ORDERED entry as one line (a retry entry names the seq it repeats). Names and ids are of a
    plain character set (validated by common/bank/state.py before an operation is sequenced), so
    formatting needs no escaping."""
    assert retry_of is None or 0 < retry_of < seq, (retry_of, seq)
    tail = "}\n" if retry_of is None else f',"RETRY_OF":{retry_of}}}\n'
    if op.kind == TRANSFER:
        return (
            f'{{"TASK":"ORDERED","SEQ":{seq},"ID":"{op.op_id}","OP":"TRANSFER","FROM":"{op.account}",'
            f'"TO":"{op.to_account}","AMOUNT_CENTS":{op.amount_cents}{tail}'
        ).encode()
    return (
        f'{{"TASK":"ORDERED","SEQ":{seq},"ID":"{op.op_id}","OP":"{op.kind}","ACCOUNT":"{op.account}",'
        f'"AMOUNT_CENTS":{op.amount_cents}{tail}'
    ).encode()


def parse_entry(message: dict) -> tuple[int, Operation]:
    """Validate an ORDERED entry from the network (or the log); raise SaldoError if it is not one."""
    seq = message.get("SEQ")
    op_id = message.get("ID")
    kind = message.get("OP")
    amount = message.get("AMOUNT_CENTS")
    if type(seq) is not int or seq < 1:
        raise SaldoError("FIELD_TYPE", "SEQ must be a positive integer")
    if type(op_id) is not str or OP_ID_RE.fullmatch(op_id) is None:
        raise SaldoError("ID_INVALID", "ID must be an operation id")
    if kind not in OPERATION_KINDS:
        raise SaldoError("FIELD_INVALID", "OP must be DEPOSIT, WITHDRAW or TRANSFER")
    if type(amount) is not int or not 0 < amount <= MAX_AMOUNT_CENTS:
        raise SaldoError("FIELD_INVALID", "AMOUNT_CENTS must be an integer in (0, max]")
    if kind == TRANSFER:
        source, target = message.get("FROM"), message.get("TO")
        if type(source) is not str or type(target) is not str or source == target:
            raise SaldoError("FIELD_INVALID", "FROM and TO must be two different accounts")
        if ACCOUNT_RE.fullmatch(source) is None or ACCOUNT_RE.fullmatch(target) is None:
            raise SaldoError("ACCOUNT_INVALID", "FROM and TO must be account names")
        return seq, Operation(op_id, kind, source, target, amount)
    account = message.get("ACCOUNT")
    if type(account) is not str or ACCOUNT_RE.fullmatch(account) is None:
        raise SaldoError("ACCOUNT_INVALID", "ACCOUNT must be an account name")
    return seq, Operation(op_id, kind, account, None, amount)


_tuple_new = tuple.__new__  # builds an Operation without its generated __new__ (hot path)
_SEQ = rb"([1-9][0-9]{0,17})"
_ID = rb"([A-Za-z0-9_.:-]{1,64})"
_NAME = rb"([A-Za-z0-9_.@-]{1,64})"
_CENTS = rb"([1-9][0-9]{0,14})"
_CANONICAL_TRANSFER_ENTRY = re.compile(
    rb'\{"TASK":"ORDERED","SEQ":' + _SEQ + rb',"ID":"' + _ID + rb'","OP":"TRANSFER","FROM":"' + _NAME
    + rb'","TO":"' + _NAME + rb'","AMOUNT_CENTS":' + _CENTS + rb"\}"
)
_CANONICAL_SINGLE_ENTRY = re.compile(
    rb'\{"TASK":"ORDERED","SEQ":' + _SEQ + rb',"ID":"' + _ID + rb'","OP":"(DEPOSIT|WITHDRAW)","ACCOUNT":"' + _NAME
    + rb'","AMOUNT_CENTS":' + _CENTS + rb"\}"
)


def parse_entry_line(line: bytes) -> tuple[int, Operation] | None:
    """An ORDERED line exactly as entry_line writes it, parsed and validated by one regular
    expression; None for anything else (decode it and use parse_entry, which gives the errors)."""
    match = _CANONICAL_TRANSFER_ENTRY.fullmatch(line)
    if match is not None:
        seq, op_id, source, target, cents = match.groups()
        amount = int(cents)
        if source == target or amount > MAX_AMOUNT_CENTS:
            return None
        return int(seq), _tuple_new(Operation, (op_id.decode(), TRANSFER, source.decode(), target.decode(), amount))
    match = _CANONICAL_SINGLE_ENTRY.fullmatch(line)
    if match is not None:
        seq, op_id, kind, account, cents = match.groups()
        amount = int(cents)
        if amount > MAX_AMOUNT_CENTS:
            return None
        return int(seq), _tuple_new(Operation, (op_id.decode(), kind.decode(), account.decode(), None, amount))
    return None


def parse_logged_entry(line: bytes) -> tuple[int, Operation, int | None]:
    """An entry as the log holds it (without its newline): (seq, operation, the seq it retries or
    None). Raises SaldoError if it is not one."""
    parsed = parse_entry_line(line)
    if parsed is not None:
        return parsed[0], parsed[1], None
    message = wire.decode_line(line)
    if message is None or message.get("TASK") != "ORDERED":
        raise SaldoError("FIELD_INVALID", "not an ORDERED entry")
    seq, op = parse_entry(message)
    retry_of = message.get("RETRY_OF")
    if retry_of is not None and (type(retry_of) is not int or not 0 < retry_of < seq):
        raise SaldoError("FIELD_INVALID", "RETRY_OF must be an earlier seq")
    return seq, op, retry_of


def fingerprint(op: Operation) -> int:
    """What a retry must repeat of an operation (kind, accounts, amount; its id is the same) as a
    64-bit hash. It is the process's own string hash, seeded afresh at each start: never written
    anywhere, computed again from the log's entries when the sequencer starts. Two different
    operations under one id pass for the same one with a chance of 2**-64."""
    return hash(op)


class OperationIds:
    """The ids of the last `window_ops` operations numbered (retry entries not counted), oldest
    first, each with its seq and its operation's fingerprint. An id maps to one seq; remembering
    one more than the window forgets the oldest.

    The sequencer looks an id up with `seq_of` (the dict's own get) for every operation, and reads
    a fingerprint only for a retry; fingerprints are kept apart, one machine word per seq in an
    array, so that remembering an id allocates nothing but its dict slot."""

    __slots__ = ("window_ops", "_seq_of", "_order", "_fingerprints", "_fingerprints_from_seq",
                 "_remembered_since_trim", "seq_of")

    def __init__(self, window_ops: int) -> None:
        assert window_ops > 0
        self.window_ops = window_ops
        self._seq_of: dict[str, int] = {}  # op id -> seq
        self._order: deque[str] = deque()  # the same ids, oldest first
        # The fingerprint of each seq from _fingerprints_from_seq on (0 for a retry entry's seq);
        # the seqs before the oldest id remembered are cut off once in a while (a memmove).
        self._fingerprints = array("q")
        self._fingerprints_from_seq = 0
        self._remembered_since_trim = 0
        self.seq_of = self._seq_of.get

    def fingerprint_at(self, seq: int) -> int:
        """The fingerprint of the operation a remembered id names at `seq`."""
        return self._fingerprints[seq - self._fingerprints_from_seq]

    def get(self, op_id: str) -> tuple[int, int] | None:
        """(seq, fingerprint) of a remembered id, or None."""
        seq = self._seq_of.get(op_id)
        return None if seq is None else (seq, self.fingerprint_at(seq))

    def remember(self, op_id: str, seq: int, op_fingerprint: int) -> None:
        """Remember an id the window does not hold (the caller looked it up), numbered after
        every id remembered so far."""
        fingerprints = self._fingerprints
        if not self._fingerprints_from_seq:
            self._fingerprints_from_seq = seq
        skipped = seq - self._fingerprints_from_seq - len(fingerprints)  # retry entries' seqs
        if skipped:
            assert skipped > 0, ("ids are remembered in seq order", op_id, seq)
            fingerprints.frombytes(bytes(fingerprints.itemsize * skipped))
        fingerprints.append(op_fingerprint)
        seq_of = self._seq_of
        seq_of[op_id] = seq
        order = self._order
        order.append(op_id)
        if len(order) > self.window_ops:
            del seq_of[order.popleft()]
        # An id maps to one seq: had it been remembered already, the dict would not have grown.
        assert len(seq_of) == len(order) <= self.window_ops, (op_id, seq)
        self._remembered_since_trim += 1
        if self._remembered_since_trim > self.window_ops // 4:
            self._trim_fingerprints()

    def _trim_fingerprints(self) -> None:
        """Forget the fingerprints of seqs before the oldest id remembered."""
        oldest = self._seq_of[self._order[0]]
        del self._fingerprints[: oldest - self._fingerprints_from_seq]
        self._fingerprints_from_seq = oldest
        self._remembered_since_trim = 0

    def oldest_seq(self) -> int | None:
        """The seq of the oldest id remembered (None when none is): the log keeps what names it."""
        return self._seq_of[self._order[0]] if self._order else None

    def __len__(self) -> int:
        return len(self._order)

    def check_invariants(self) -> None:
        """O(window): at start and in tests."""
        assert len(self._seq_of) == len(self._order) <= self.window_ops
        seqs = [self._seq_of[op_id] for op_id in self._order]
        assert all(a < b for a, b in zip(seqs, seqs[1:])), "ids are remembered in seq order, each once"
        if seqs:
            assert self._fingerprints_from_seq <= seqs[0]
            assert seqs[-1] == self._fingerprints_from_seq + len(self._fingerprints) - 1


def applied_line(upto_seq: int, results: list[tuple[int, str | None, int | None]], synced_seq: int) -> bytes:
    """A replica's acknowledgement: everything up to `upto_seq` is applied and committed here (it
    survives a crash of the process), and up to `synced_seq` it is on stable storage."""
    assert 0 <= synced_seq <= upto_seq, (synced_seq, upto_seq)
    parts = ",".join(
        f'[{seq},{"null" if error is None else chr(34) + error + chr(34)},{"null" if balance is None else balance}]'
        for seq, error, balance in results
    )
    return f'{{"TASK":"APPLIED","UPTO":{upto_seq},"SYNCED":{synced_seq},"RESULTS":[{parts}]}}\n'.encode()


def parse_applied(message: dict) -> tuple[int, int, list[tuple[int, str | None, int | None]]]:
    """(upto, synced, results). A replica that leaves SYNCED out syncs every commit: synced = upto."""
    upto = message.get("UPTO")
    synced = message.get("SYNCED", upto)
    results = message.get("RESULTS", [])
    if type(upto) is not int or upto < 0:
        raise SaldoError("FIELD_TYPE", "UPTO must be a non-negative integer")
    if type(synced) is not int or not 0 <= synced <= upto:
        raise SaldoError("FIELD_INVALID", "SYNCED must be an integer in [0, UPTO]")
    if type(results) is not list or len(results) > MAX_RESULTS_PER_ACK:
        raise SaldoError("FIELD_TYPE", f"RESULTS must be a list of at most {MAX_RESULTS_PER_ACK}")
    parsed = []
    for item in results:
        if type(item) is not list or len(item) != 3:
            raise SaldoError("FIELD_TYPE", "each result is [seq, error or null, balance_cents or null]")
        seq, error, balance = item
        if type(seq) is not int or not 0 < seq <= upto:
            raise SaldoError("FIELD_INVALID", "a result's seq must be in (0, UPTO]")
        # An outcome is an error code without a balance, or a balance without an error (Outcome).
        if error is None:
            if type(balance) is not int or not 0 <= balance <= MAX_BALANCE_CENTS:
                raise SaldoError("FIELD_INVALID", f"a result without an error needs a balance in [0, {MAX_BALANCE_CENTS}] cents")
        elif type(error) is not str or error not in ERROR_CODES or balance is not None:
            raise SaldoError("FIELD_INVALID", "a result's error must be an error code, and then its balance null")
        parsed.append((seq, error, balance))
    return upto, synced, parsed


def result_reply_line(request_id: str, seq: int, error: str | None, balance_cents: int | None) -> bytes:
    """The reply to a client whose operation was applied, with its sequence number."""
    if error is None:
        return f'{{"ID":"{request_id}","STATUS":"OK","BALANCE":"{render_cents(balance_cents)}","SEQ":{seq}}}\n'.encode()
    return (
        f'{{"ID":"{request_id}","STATUS":"NOK","ERROR":"{error}","DETAIL":{DETAIL_JSON[error]},'
        f'"DEFINITE":true,"SEQ":{seq}}}\n'
    ).encode()


def no_replica_reply_line(request_id: str, seq: int, replica_names: list[str]) -> bytes:
    """The reply to a client waiting for an apply while no replica is connected (indefinite)."""
    detail = (f"no replica is connected ({', '.join(replica_names)} expected): the operation is in the log at seq "
              f"{seq} and is applied when one connects; the same command with its id tells its outcome then")
    return (f'{{"ID":"{request_id}","STATUS":"NOK","ERROR":"NO_REPLICA","DETAIL":{json.dumps(detail)},'
            f'"DEFINITE":false,"SEQ":{seq}}}\n').encode()


def sequenced_reply_line(request_id: str, seq: int) -> bytes:
    """The reply once the operation is durably in the log/queue: accepted, its outcome not yet
    known (a WITHDRAW may still fail for INSUFFICIENT_FUNDS when a replica applies it)."""
    return f'{{"ID":"{request_id}","STATUS":"OK","ACCEPTED":true,"SEQ":{seq}}}\n'.encode()


# --- The sequencer ------------------------------------------------------------------------------


@dataclass(slots=True)
class Waiter:
    """A client waiting for an operation's answer: `client` is whatever the driver uses to reply
    (a stream); the core only hands it back. `replicas_needed`: 0 = answer once the entry is
    durable in the log; k = once k replicas applied it (with the result)."""

    client: Any
    request_id: str
    replicas_needed: int
    shown_seq: int = 0  # the seq its reply names, if not the one it waits on (a retry entry's: the first)


@dataclass(slots=True)
class ReplicaProgress:
    name: str
    applied_seq: int = 0  # committed at the replica (from its APPLIED), or what it said at SUBSCRIBE
    synced_seq: int = 0  # on the replica's stable storage: the log may forget what is below it
    connected: bool = False


@dataclass
class Reply:
    client: Any
    line: bytes


@dataclass
class SequencerStats:
    sequenced_total: int = 0
    retries_attached: int = 0
    retries_answered_from_cache: int = 0
    retry_entries: int = 0  # retries logged again to learn their first outcome
    truncated_to_seq: int = 0
    replicas_dropped_from_log: int = 0
    results_source_changes: int = 0


@dataclass
class SequencerCore:
    """See the module docstring. `next_seq` and the log come from the durable log at start, and
    `retired`, the entries before the log's start that the log kept for their ids (see
    common/sequencer/log.py), with it: the ids of the last `dedup_window_ops` operations are rebuilt from
    both."""

    replica_names: list[str]
    next_seq: int = 1
    log_start_seq: int = 1  # the first seq the log still holds
    max_log_entries: int = DEFAULT_MAX_LOG_ENTRIES
    max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS
    result_cache_entries: int = DEFAULT_RESULT_CACHE_ENTRIES
    results_source_stall_s: float = DEFAULT_RESULTS_SOURCE_STALL_S
    no_replica_answer_s: float = DEFAULT_NO_REPLICA_ANSWER_S
    dedup_window_ops: int = DEFAULT_DEDUP_WINDOW_OPS  # as the replicas' --dedup-window
    # (seq, op id, line) from log_start_seq up to the last durable entry, oldest first.
    log: deque = field(default_factory=deque)
    durable_seq: int = 0  # the log is durable up to here
    stats: SequencerStats = field(default_factory=SequencerStats)
    retired: InitVar[Iterable[tuple[int, str, bytes]]] = ()  # (seq, op id, line) before log_start_seq

    def __post_init__(self, retired: Iterable[tuple[int, str, bytes]]) -> None:
        assert self.replica_names, "a sequencer needs at least one replica name"
        self.replicas = {name: ReplicaProgress(name) for name in self.replica_names}
        self._unlogged: list[bytes] = []  # entries numbered but not yet handed to the log writer
        self._in_log_write: list[tuple[int, str, bytes]] = []
        self._pending_entries: list[tuple[int, str, bytes]] = []
        self._waiters: dict[int, list[Waiter]] = {}
        self._waiting_count = 0
        self._waiting_for_several = 0  # waiters with replicas_needed > 1 (scanned on each APPLIED)
        self._waiting_for_log = 0  # waiters with replicas_needed == 0 (answered when logged)
        self.ids = OperationIds(self.dedup_window_ops)
        # Retry entries of this run: retry seq -> the seq it repeats, and back (see _log_retry).
        self._retry_of: dict[int, int] = {}
        self._retry_entry_of: dict[int, int] = {}
        self._results: dict[int, tuple[str | None, int | None]] = {}  # seq -> result, recent
        self._results_order: deque[int] = deque()
        # Before replicas say how far they are (SUBSCRIBE), what an earlier run truncated is known to
        # be on every replica's disk: truncation never passes what they synced.
        for progress in self.replicas.values():
            progress.synced_seq = self.log_start_seq - 1
        self._highest_synced_seq = self.log_start_seq - 1  # the highest synced_seq of any replica
        self._highest_applied_seq = self.log_start_seq - 1  # by any replica (so, at least that)
        self.results_source: str | None = None  # the replica that sends outcomes with its acks
        self._source_behind_since: tuple[str, int, float] | None = None  # (source, its applied_seq, since when)
        self._no_replica_since_s: float | None = None  # when this core last saw no replica connected, first
        if self.durable_seq == 0:
            self.durable_seq = self.next_seq - 1
        self._logged_before_start = self.durable_seq  # numbered by an earlier run of the sequencer
        self._remember_logged_ids(chain(retired, self.log))

    def _remember_logged_ids(self, entries: Iterable[tuple[int, str, bytes]]) -> None:
        """Rebuild the ids from the entries an earlier run logged, oldest first: the same rule as
        submit(), so the same ids with the same seqs. A retry entry names no id; nor does an entry
        whose id is already remembered (an earlier version logged a reused id again once its first
        entry was truncated; the replicas refused it, ID_REUSED, and keep the first)."""
        expected_seq = None
        for seq, op_id, line in entries:
            assert expected_seq is None or seq == expected_seq, ("the entries run without a gap", seq, expected_seq)
            expected_seq = seq + 1
            parsed_seq, op, retry_of = parse_logged_entry(line.rstrip(b"\n"))
            assert (parsed_seq, op.op_id) == (seq, op_id), (parsed_seq, op.op_id, seq, op_id)
            if retry_of is None and self.ids.seq_of(op_id) is None:
                self.ids.remember(op_id, seq, fingerprint(op))
        assert expected_seq is None or expected_seq == self.durable_seq + 1, (expected_seq, self.durable_seq)
        self.ids.check_invariants()

    # Client operations ------------------------------------------------------------------------
    def submit(self, op: Operation, client: Any, request_id: str, needed: int = 1) -> list[Reply]:
        """Sequence `op` for a client that wants an answer once `needed` replicas applied it (0:
        once it is in the log), or attach the client to the op's earlier number. Returns replies
        that can be sent at once (a retry answered from the cache). Raises SaldoError(OVERLOADED)."""
        assert 0 <= needed <= len(self.replicas), needed
        op_fingerprint = fingerprint(op)
        first_seq = self.ids.seq_of(op.op_id)
        if first_seq is not None:
            if op_fingerprint != self.ids.fingerprint_at(first_seq):
                raise SaldoError("ID_REUSED", f"id {op.op_id} names the operation at seq {first_seq}; nothing changed")
            return self._retry(op, first_seq, client, request_id, needed)
        self._refuse_overloaded()
        seq = self.next_seq
        self.next_seq += 1
        self._pending_entries.append((seq, op.op_id, entry_line(seq, op)))
        self.ids.remember(op.op_id, seq, op_fingerprint)
        self._add_waiter(seq, Waiter(client, request_id, needed))
        self.stats.sequenced_total += 1
        return []

    def _refuse_overloaded(self) -> None:
        """Raise OVERLOADED if a client may not wait for one more entry."""
        if self._waiting_count >= self.max_waiting_requests:
            raise SaldoError("OVERLOADED", f"{self._waiting_count} requests are waiting")
        if self.next_seq - 1 - self._highest_synced_seq >= self.max_log_entries:
            # No replica has the last max_log_entries on its disk (all of them down, or stuck):
            # the log may not forget them, so it takes no more until one catches up.
            raise SaldoError("OVERLOADED", f"the log holds {self.max_log_entries} operations that no replica has on disk yet")

    def _retry(self, op: Operation, first_seq: int, client: Any, request_id: str, needed: int) -> list[Reply]:
        """A retry of the operation numbered `first_seq`: answered with that seq, whatever it takes
        to learn the outcome."""
        if needed == 0 and first_seq <= self.durable_seq:
            return [Reply(client, sequenced_reply_line(request_id, first_seq))]
        cached = self._results.get(first_seq)
        if cached is not None and self._applied_count(first_seq) >= needed:
            self.stats.retries_answered_from_cache += 1
            return [Reply(client, result_reply_line(request_id, first_seq, *cached))]
        retry_seq = self._retry_entry_of.get(first_seq)
        if retry_seq is not None or first_seq > self._highest_applied_seq or cached is not None:
            # Its answer is still coming (not applied anywhere yet, not yet by enough replicas, or
            # asked of them by a retry entry). A retry waits like a new request, under the same
            # bound: a client resending one id while replicas are away must not fill memory.
            if self._waiting_count >= self.max_waiting_requests:
                raise SaldoError("OVERLOADED", f"{self._waiting_count} requests are waiting")
            if retry_seq is None:
                self._add_waiter(first_seq, Waiter(client, request_id, needed))
            else:
                self._add_waiter(retry_seq, Waiter(client, request_id, needed, first_seq))
            self.stats.retries_attached += 1
            return []
        # Applied, and its outcome is no longer here: ask the replicas with a retry entry.
        self._refuse_overloaded()
        self._add_waiter(self._log_retry(op, first_seq), Waiter(client, request_id, needed, first_seq))
        return []

    def _log_retry(self, op: Operation, first_seq: int) -> int:
        """Number `op` again as a retry of `first_seq` (the replicas recognise its id and answer
        with the first outcome, changing nothing): the retry entry's seq. One at a time per
        operation; it is forgotten when the log drops it."""
        assert self.ids.get(op.op_id) == (first_seq, fingerprint(op)), (op, first_seq)
        assert first_seq not in self._retry_entry_of, first_seq
        seq = self.next_seq
        self.next_seq += 1
        self._pending_entries.append((seq, op.op_id, entry_line(seq, op, retry_of=first_seq)))
        self._retry_of[seq] = first_seq
        self._retry_entry_of[first_seq] = seq
        self.stats.retry_entries += 1
        self.stats.sequenced_total += 1
        return seq

    def _applied_count(self, seq: int) -> int:
        return sum(1 for progress in self.replicas.values() if progress.applied_seq >= seq)

    def _add_waiter(self, seq: int, waiter: Waiter) -> None:
        waiters = self._waiters.get(seq)
        if waiters is None:
            self._waiters[seq] = [waiter]
        else:
            waiters.append(waiter)
        self._waiting_count += 1
        if waiter.replicas_needed > 1:
            self._waiting_for_several += 1
        elif waiter.replicas_needed == 0:
            self._waiting_for_log += 1

    # The log -----------------------------------------------------------------------------------
    def take_unlogged(self) -> list[tuple[int, str, bytes]]:
        """Entries to write to the log now (the driver writes them all, durably, then calls
        on_logged with the last seq). Only one write is in flight at a time."""
        assert not self._in_log_write, "one log write at a time"
        entries, self._pending_entries = self._pending_entries, []
        self._in_log_write = entries
        return entries

    def on_logged(self, upto_seq: int) -> tuple[bytes, list[Reply]]:
        """The log is durable up to `upto_seq`: the bytes to broadcast, and SEQUENCED replies."""
        entries, self._in_log_write = self._in_log_write, []
        assert entries and entries[-1][0] == upto_seq, (upto_seq, entries[-1:])
        assert entries[0][0] == self.durable_seq + 1, "the log has no gap"
        self.durable_seq = upto_seq
        self.log.extend(entries)
        replies: list[Reply] = []
        if self._waiting_for_log:  # most clients wait for a replica's result: skip the scan then
            waiters = self._waiters
            for seq, _op_id, _line in entries:
                if seq in waiters:
                    self._release(seq, 0, None, replies)
        return b"".join(line for _seq, _op_id, line in entries), replies

    @property
    def has_unlogged(self) -> bool:
        return bool(self._pending_entries)

    # Replicas ----------------------------------------------------------------------------------
    def on_subscribe(self, replica: str, last_applied_seq: int, *, replies: list[Reply]) -> tuple[str, bytes]:
        """A replica (re)connects. ("entries", bytes from its next seq) or ("snapshot", b"").
        Clients who waited for several replicas and whose operation this replica is now known to
        have applied (its APPLIED was lost with the last connection, or it installed a snapshot)
        are answered into `replies`."""
        progress = self._replica(replica)
        if last_applied_seq > self.durable_seq:
            # It applied entries this log no longer has (the log lost its tail): refuse rather
            # than number those seqs again with other operations.
            raise SaldoError("FIELD_INVALID", f"LAST_APPLIED_SEQ {last_applied_seq} is beyond the log ({self.durable_seq})")
        progress.connected = True
        previous = progress.applied_seq
        progress.applied_seq = max(previous, last_applied_seq)
        # A replica syncs its store before it subscribes: what it names here is on its disk.
        progress.synced_seq = max(progress.synced_seq, last_applied_seq)
        self._highest_synced_seq = max(self._highest_synced_seq, progress.synced_seq)
        # Applied there already (e.g. before this process restarted): a retry of an op at or below
        # this seq will get no result from the replicas, so submit() must number it again; and
        # clients who attached to such a seq before this replica came back are renumbered now.
        self._highest_applied_seq = max(self._highest_applied_seq, last_applied_seq)
        self._renumber_orphans(last_applied_seq)
        self._release_several(previous, last_applied_seq, replies)
        if last_applied_seq + 1 < self.log_start_seq:
            return "snapshot", b""
        return "entries", self.entries_between(last_applied_seq + 1, self.durable_seq)

    def _renumber_orphans(self, applied_seq: int) -> None:
        """Waiters on seqs that a replica applied before this process started (their outcomes went
        to the previous one; no replica sends them again): log each operation again as a retry
        entry, whose outcome the replicas send (the first one, changing nothing), and move its
        waiters there; they are still told the first seq."""
        limit = min(applied_seq, self._logged_before_start)
        orphaned = [seq for seq in self._waiters if seq <= limit and seq not in self._results
                    and all(w.replicas_needed > 0 for w in self._waiters[seq])]
        for seq in sorted(orphaned):
            entry = self.entries_between(seq, seq) if seq >= self.log_start_seq else b""
            if not entry:
                continue  # no longer in the log: the clients' own retries ask again
            _seq, op, retry_of = parse_logged_entry(entry.rstrip(b"\n"))
            # Clients wait on an operation's first seq, or on a retry entry of this run (never orphaned).
            assert retry_of is None, (seq, retry_of)
            if self.ids.get(op.op_id) != (seq, fingerprint(op)) or seq in self._retry_entry_of:
                continue  # forgotten meanwhile (a window smaller than the wait): retries are new operations
            waiters = self._waiters.pop(seq)
            self._waiting_count -= len(waiters)
            self._waiting_for_several -= sum(1 for w in waiters if w.replicas_needed > 1)
            retry_seq = self._log_retry(op, seq)
            for waiter in waiters:
                waiter.shown_seq = seq
                self._add_waiter(retry_seq, waiter)

    def choose_results_source(self, replica: str) -> int | None:
        """Called once a replica subscribed: None if another connected replica sends the outcomes;
        else this one is the results source now, and the result is the first seq whose outcome it
        must send (it may have applied some of what clients still await while no source was there)."""
        current = self.results_source
        if current is None or current == replica or not self.replicas[current].connected:
            self.results_source = replica
            return min(self._waiters) if self._waiters else self.durable_seq + 1
        return None

    def on_disconnect(self, replica: str) -> tuple[str, int] | None:
        """A replica's connection ended. If it was the results source, another connected replica
        takes over: (its name, the first seq whose outcome it must send); None otherwise."""
        if replica not in self.replicas:
            return None
        self.replicas[replica].connected = False
        if self.results_source != replica:
            return None
        self.results_source = None
        connected = [p for p in self.replicas.values() if p.connected]
        if not connected:
            return None
        # The one furthest ahead: the others may be the reason the source was already replaced once.
        successor = max(connected, key=lambda p: p.applied_seq)
        self.results_source = successor.name
        from_seq = min(self._waiters) if self._waiters else self.durable_seq + 1
        return successor.name, from_seq

    def on_tick(self, now_s: float) -> tuple[str, str, int] | None:
        """Called every so often. If, for results_source_stall_s, the results source has applied
        nothing while another connected replica had applied an operation a client waits for, that
        replica takes over: (old source, new source, the first seq whose outcome the new one must
        send). None otherwise. The clock starts when the source is first seen behind and stops
        as soon as it progresses: a source idle for a while and then a millisecond late, or
        slower but moving, is not stalled."""
        source = self.results_source
        lag = self._source_lag(source) if source is not None else None
        if lag is None:
            self._source_behind_since = None
            return None
        applied_seq = self.replicas[source].applied_seq
        if self._source_behind_since is None or self._source_behind_since[:2] != (source, applied_seq):
            self._source_behind_since = (source, applied_seq, now_s)
            return None
        if now_s - self._source_behind_since[2] < self.results_source_stall_s:
            return None
        best, from_seq = lag
        self.results_source = best
        self._source_behind_since = None
        self.stats.results_source_changes += 1
        return source, best, from_seq

    def _source_lag(self, source: str) -> tuple[str, int] | None:
        """(the connected replica furthest ahead, the first awaited seq it applied and `source` did
        not), or None when no awaited outcome could come sooner from another replica."""
        applied_seq = self.replicas[source].applied_seq
        ahead = [p for p in self.replicas.values() if p.connected and p.name != source and p.applied_seq > applied_seq]
        if not ahead or self._waiting_count == self._waiting_for_log:
            return None
        best = max(ahead, key=lambda p: p.applied_seq)
        awaited = [seq for seq, waiters in self._waiters.items()
                   if applied_seq < seq <= best.applied_seq and any(w.replicas_needed > 0 for w in waiters)]
        return (best.name, min(awaited)) if awaited else None

    def answer_waiters_without_replica(self, now_s: float) -> list[Reply]:
        """Called every so often. Once no replica has been connected for no_replica_answer_s, the
        clients waiting for an apply are answered NO_REPLICA (indefinite: their operations are in
        the log, applied when a replica subscribes) rather than left to time out without a word. A
        retry attaches to its operation again, and is answered the same way at a later call."""
        if any(progress.connected for progress in self.replicas.values()):
            self._no_replica_since_s = None
            return []
        if self._no_replica_since_s is None:
            self._no_replica_since_s = now_s
        if now_s - self._no_replica_since_s < self.no_replica_answer_s or self._waiting_count == self._waiting_for_log:
            return []
        replies: list[Reply] = []
        for seq in list(self._waiters):
            keep = []
            for waiter in self._waiters[seq]:
                if waiter.replicas_needed == 0:  # answered once logged, with or without replicas
                    keep.append(waiter)
                    continue
                replies.append(Reply(waiter.client, no_replica_reply_line(waiter.request_id, seq, self.replica_names)))
                self._waiting_count -= 1
                if waiter.replicas_needed > 1:
                    self._waiting_for_several -= 1
            if keep:
                self._waiters[seq] = keep
            else:
                del self._waiters[seq]
        return replies

    def on_resend(self, replica: str, from_seq: int, to_seq: int) -> tuple[str, bytes]:
        self._replica(replica)
        if from_seq < self.log_start_seq:
            return "snapshot", b""
        return "entries", self.entries_between(from_seq, min(to_seq, self.durable_seq))

    def entries_between(self, from_seq: int, to_seq: int) -> bytes:
        if to_seq < from_seq:
            return b""
        assert from_seq >= self.log_start_seq
        offset = from_seq - self.log_start_seq
        count = to_seq - from_seq + 1
        return b"".join(self.log[i][2] for i in range(offset, min(offset + count, len(self.log))))

    def on_applied(self, replica: str, upto_seq: int, results: list[tuple[int, str | None, int | None]],
                   synced_seq: int | None = None) -> list[Reply]:
        """A replica applied (and committed) everything up to `upto_seq`, and has everything up to
        `synced_seq` (default: upto_seq) on stable storage: answer waiting clients."""
        progress = self._replica(replica)
        if upto_seq > self.durable_seq:
            raise SaldoError("FIELD_INVALID", f"UPTO {upto_seq} is beyond the log ({self.durable_seq})")
        synced_seq = upto_seq if synced_seq is None else synced_seq
        assert 0 <= synced_seq <= upto_seq, (synced_seq, upto_seq)
        previous = progress.applied_seq
        progress.applied_seq = max(previous, upto_seq)
        progress.synced_seq = max(progress.synced_seq, synced_seq)
        if progress.synced_seq > self._highest_synced_seq:
            self._highest_synced_seq = progress.synced_seq
        replies: list[Reply] = []
        waiters = self._waiters
        retry_of = self._retry_of
        for seq, error, balance in results:
            self._remember_result(seq, error, balance)
            if retry_of and seq in retry_of:  # the first outcome: later retries are answered from here
                self._remember_result(retry_of[seq], error, balance)
            if seq in waiters:
                self._release(seq, 1, (error, balance), replies)
        if upto_seq > self._highest_applied_seq:
            self._highest_applied_seq = upto_seq
        self._release_several(previous, upto_seq, replies)
        return replies

    def _release_several(self, previous_seq: int, applied_seq: int, replies: list[Reply]) -> None:
        """A replica's applied seq rose from `previous_seq` to `applied_seq`: answer the clients on
        those seqs who waited for more than one replica and now have enough."""
        if not self._waiting_for_several or applied_seq <= previous_seq:
            return
        for seq in [s for s in self._waiters if previous_seq < s <= applied_seq]:
            cached = self._results.get(seq)
            if cached is not None:  # else: applied before this process restarted; a retry renumbers it
                self._release(seq, self._applied_count(seq), cached, replies)

    def _release(self, seq: int, applied_count: int, result: tuple[str | None, int | None] | None, replies: list[Reply]) -> None:
        """Answer the clients waiting on `seq` that need at most `applied_count` replicas (with the
        result, or with "accepted" when there is none yet); the others keep waiting."""
        keep = []
        for waiter in self._waiters[seq]:
            if waiter.replicas_needed > applied_count:
                keep.append(waiter)
                continue
            shown_seq = waiter.shown_seq or seq
            if result is None:
                line = sequenced_reply_line(waiter.request_id, shown_seq)
            else:
                line = result_reply_line(waiter.request_id, shown_seq, *result)
            replies.append(Reply(waiter.client, line))
            self._waiting_count -= 1
            if waiter.replicas_needed > 1:
                self._waiting_for_several -= 1
            elif waiter.replicas_needed == 0:
                self._waiting_for_log -= 1
        if keep:
            self._waiters[seq] = keep
        else:
            del self._waiters[seq]

    def _remember_result(self, seq: int, error: str | None, balance: int | None) -> None:
        if seq in self._results:
            return
        self._results[seq] = (error, balance)
        self._results_order.append(seq)
        while len(self._results_order) > self.result_cache_entries:
            del self._results[self._results_order.popleft()]

    def _replica(self, name: str) -> ReplicaProgress:
        progress = self.replicas.get(name)
        if progress is None:
            raise SaldoError("FIELD_INVALID", f"unknown replica {name[:64]!r}; expected one of {', '.join(self.replicas)}")
        return progress

    # Truncation --------------------------------------------------------------------------------
    def truncation_point(self) -> int:
        """The first seq the log must still hold: every replica has everything before it on its
        stable storage (applied is not enough: a power loss could take it back, and then the
        replica asks the log again), except that the log never holds more than max_log_entries (a
        replica further behind recovers by state transfer from a peer). The bound never drops
        what no replica has on disk: that would lose acknowledged operations (submit() refuses
        new ones instead)."""
        everyone = min(p.synced_seq for p in self.replicas.values()) + 1
        assert self._highest_synced_seq == max(p.synced_seq for p in self.replicas.values())
        bounded = min(self.durable_seq + 1 - self.max_log_entries, self._highest_synced_seq + 1)
        point = max(self.log_start_seq, min(everyone, self.durable_seq + 1), bounded)
        assert point <= self._highest_synced_seq + 1 or point == self.log_start_seq, (point, self.replicas)
        return point

    def truncate(self, new_start_seq: int, max_entries: int | None = None) -> int:
        """Drop entries before `new_start_seq` (the driver deleted them on disk), at most
        `max_entries` of them: the driver calls again for the rest, so that no turn of its event
        loop runs long (20,000 entries take 6 ms). Returns how many; `log_start_seq` says how far."""
        assert self.log_start_seq <= new_start_seq <= self.durable_seq + 1
        assert max_entries is None or max_entries > 0
        stop_seq = new_start_seq if max_entries is None else min(new_start_seq, self.log_start_seq + max_entries)
        dropped = 0
        retry_of = self._retry_of
        while self.log and self.log[0][0] < stop_seq:
            seq, _op_id, _line = self.log.popleft()
            if retry_of and seq in retry_of:  # a later retry of the same operation asks again
                del self._retry_entry_of[retry_of.pop(seq)]
            dropped += 1
        if stop_seq == new_start_seq:
            lagging = [p.name for p in self.replicas.values() if p.synced_seq + 1 < new_start_seq]
            self.stats.replicas_dropped_from_log += len(lagging)
        self.log_start_seq = stop_seq
        self.stats.truncated_to_seq = stop_seq - 1
        assert not self.log or self.log[0][0] == self.log_start_seq, (self.log[0][0], self.log_start_seq)
        return dropped

    def ids_kept_from(self) -> int:
        """The first seq whose entry the log keeps for the ids it names (after truncation too):
        the oldest id remembered, or the next seq when none is."""
        oldest = self.ids.oldest_seq()
        return self.next_seq if oldest is None else oldest

    def status(self) -> dict:
        return {
            "NEXT_SEQ": self.next_seq,
            "DURABLE_SEQ": self.durable_seq,
            "LOG_START_SEQ": self.log_start_seq,
            "LOG_ENTRIES": len(self.log),
            "WAITING_REQUESTS": self._waiting_count,
            "REPLICAS": {
                p.name: {"APPLIED_SEQ": p.applied_seq, "SYNCED_SEQ": p.synced_seq, "CONNECTED": p.connected}
                for p in self.replicas.values()
            },
            "SEQUENCED_TOTAL": self.stats.sequenced_total,
            "IDS_REMEMBERED": len(self.ids),
            "RETRY_ENTRIES": self.stats.retry_entries,
            "RESULTS_SOURCE": self.results_source,
            "RESULTS_SOURCE_CHANGES": self.stats.results_source_changes,
        }


# --- A replica ----------------------------------------------------------------------------------


@dataclass
class SequencedReplicaCore:
    """Delivers ORDERED entries in sequence order (see the module docstring)."""

    last_delivered_seq: int
    max_held_entries: int = DEFAULT_MAX_HELD_ENTRIES
    resend_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        self._held: dict[int, Operation] = {}  # entries beyond a gap
        self._resend_asked_at: float | None = None
        self._resend_asked_upto = 0
        self.gaps_seen = 0
        self.duplicates_ignored = 0

    def on_entries(self, entries: list[tuple[int, Operation]], now_s: float) -> tuple[list[tuple[int, Operation]], tuple[int, int] | None]:
        """(entries to apply now, in order; a (from, to) range to ask again, or None)."""
        deliver: list[tuple[int, Operation]] = []
        expected = self.last_delivered_seq + 1
        held = self._held
        for seq, op in entries:
            if seq == expected:
                deliver.append((seq, op))
                expected += 1
                while expected in held:  # the gap closed: what was held follows
                    deliver.append((expected, held.pop(expected)))
                    expected += 1
            elif seq < expected:
                self.duplicates_ignored += 1
            elif seq not in held and len(held) < self.max_held_entries:
                held[seq] = op
        self.last_delivered_seq = expected - 1
        resend = None
        if held:
            first_held = min(held)
            needs_asking = self._resend_asked_at is None or now_s - self._resend_asked_at >= self.resend_timeout_s \
                or self._resend_asked_upto < first_held - 1
            if needs_asking:
                self.gaps_seen += 1
                resend = (expected, first_held - 1)
                self._resend_asked_at = now_s
                self._resend_asked_upto = first_held - 1
        else:
            self._resend_asked_at = None
        return deliver, resend

    def on_tick(self, now_s: float) -> tuple[int, int] | None:
        """Ask again for a gap whose resend did not arrive in time."""
        if self._held and self._resend_asked_at is not None and now_s - self._resend_asked_at >= self.resend_timeout_s:
            first_held = min(self._held)
            self._resend_asked_at = now_s
            return (self.last_delivered_seq + 1, first_held - 1)
        return None

    def reset(self, last_delivered_seq: int) -> None:
        """After a state transfer: continue from the snapshot's sequence number."""
        self.last_delivered_seq = last_delivered_seq
        self._held = {seq: op for seq, op in self._held.items() if seq > last_delivered_seq}
        self._resend_asked_at = None

    @property
    def held_count(self) -> int:
        return len(self._held)


def outcome_result(seq: int, outcome: Outcome) -> tuple[int, str | None, int | None]:
    return (seq, outcome.error, outcome.balance_cents)


def is_recorded_error(code: str | None) -> bool:
    return code in _RECORDED_ERRORS
