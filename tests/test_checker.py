"""The lab's consistency checker (common/lab/checker.py), fed synthetic histories and replica states.

Each scenario writes down what the clients saw (OpRecord) and what the replicas hold (StoreImage),
built by hand, and asserts that the checker finds exactly the anomaly the scenario contains, with
the right count, and flags nothing else. Replica states are made by applying operations to a real
Bank (so a "healthy" replica is exactly what a replica would persist) and then, where a scenario
needs it, changed by hand the way a bug would change them.
"""

from __future__ import annotations

import pytest

from common.bank.state import DEPOSIT, TRANSFER, WITHDRAW, AppliedOp, Bank, Counters, Operation, Outcome
from common.lab import checker
from common.lab.workload import OpRecord
from common.storage.store import StoreImage

SEED_CENTS = 10_000


# --- Building histories and states --------------------------------------------------------------


def record(op_id: str, kind: str, account: str, amount: int | None = None, *, to: str | None = None,
           outcome: str = "ok", error: str | None = None, invoke: float = 0.0, complete: float | None = None,
           balance: int | None = None, accepted: bool = False, client: int = 0, seq: int | None = None,
           epoch: int | None = None) -> OpRecord:
    return OpRecord(client, op_id, kind, account, to, amount, invoke, invoke + 0.001 if complete is None else complete,
                    outcome, error, balance, seq, accepted=accepted, epoch=epoch)


def op_of(rec: OpRecord) -> Operation:
    return Operation(rec.op_id, rec.kind, rec.account, rec.to_account, rec.amount_cents)


def image_after(ops: list[Operation], *, seqs: bool = True) -> StoreImage:
    """What a healthy replica persists after applying `ops` in this order."""
    bank = Bank()
    for seq, op in enumerate(ops, start=1):
        bank.apply(op, seq if seqs else None)
    return StoreImage(dict(bank.balances), list(bank.recent_applied()), bank.counters.copy(), {})


def seeded_history() -> list[OpRecord]:
    """Two accounts seeded by deposits (the lab's seeding, client -1)."""
    return [
        record("seed-a", DEPOSIT, "a", SEED_CENTS, client=-1, invoke=0.0, complete=0.01),
        record("seed-b", DEPOSIT, "b", SEED_CENTS, client=-1, invoke=0.02, complete=0.03),
    ]


def found(result: checker.CheckResult) -> dict[str, int]:
    """The anomalies the checker reported (types with a non-zero count)."""
    return {kind: count for kind, count in result.anomalies.items() if count}


def test_every_anomaly_type_is_reported_even_when_zero():
    result = checker.check(seeded_history(), {"r1": image_after([op_of(r) for r in seeded_history()])}, total_order=True)
    assert set(result.anomalies) == set(checker.ANOMALY_TYPES)
    assert result.to_json()["verdict"] == "valid"


# --- A clean history passes ---------------------------------------------------------------------


def clean_scenario() -> tuple[list[OpRecord], list[Operation]]:
    history = seeded_history() + [
        record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0, complete=1.1),
        record("w1", WITHDRAW, "b", 500, invoke=1.2, complete=1.3),
        record("r1", "BALANCE", "b", outcome="ok", invoke=1.4, complete=1.5, balance=SEED_CENTS + 2_500),
        record("w2", WITHDRAW, "a", 999_999, outcome="failed", error="INSUFFICIENT_FUNDS", invoke=1.6, complete=1.7),
        record("d1", DEPOSIT, "c", 700, invoke=1.8, complete=1.9),
        # Refused before reaching the bank (definite, not recorded): never applied, fine.
        record("x1", DEPOSIT, "a", 100, outcome="failed", error="OVERLOADED", invoke=2.0, complete=2.1),
        # Two operations concurrent in real time may apply in either order.
        record("t2", TRANSFER, "b", 100, to="c", invoke=3.0, complete=3.5),
        record("t3", TRANSFER, "c", 50, to="a", invoke=3.1, complete=3.4),
    ]
    applied = [op_of(r) for r in history if r.kind != "BALANCE" and r.op_id != "x1"]
    applied[-2], applied[-1] = applied[-1], applied[-2]  # t3 applied before t2
    return history, applied


def test_a_clean_history_with_two_agreeing_replicas_is_valid():
    history, applied = clean_scenario()
    replicas = {"r1": image_after(applied), "r2": image_after(applied)}
    result = checker.check(history, replicas, total_order=True)
    assert found(result) == {}
    assert result.valid and result.verdict == "valid"
    assert result.notes == []


# --- One history per anomaly type ---------------------------------------------------------------


def test_divergence_replicas_that_applied_conflicting_operations_in_different_orders():
    # Two withdrawals that cannot both succeed; the clients never learned the outcomes (unknown),
    # so each replica is consistent with the history on its own, but they disagree on "a".
    history = seeded_history() + [
        record("w1", WITHDRAW, "a", 8_000, outcome="unknown", error="TIMEOUT"),
        record("w2", WITHDRAW, "a", 5_000, outcome="unknown", error="TIMEOUT"),
    ]
    seed = [op_of(r) for r in history[:2]]
    w1, w2 = op_of(history[2]), op_of(history[3])
    replicas = {"r1": image_after(seed + [w1, w2]), "r2": image_after(seed + [w2, w1])}
    assert replicas["r1"].balances["a"] == 2_000 and replicas["r2"].balances["a"] == 5_000
    result = checker.check(history, replicas, total_order=False)
    assert found(result) == {"divergence": 1}
    assert result.examples["divergence"][0]["account"] == "a"
    assert not result.valid and result.verdict == "invalid"


def test_money_a_total_that_acknowledged_deposits_and_withdrawals_do_not_allow():
    # The replica kept only its last applied operation (dedup window), so money is checked by
    # totals: the acknowledged withdrawal of 3000 is not reflected in its 20000.
    history = seeded_history() + [record("w1", WITHDRAW, "a", 3_000, invoke=1.0, complete=1.1)]
    healthy = image_after([op_of(r) for r in history[:2]])
    pruned = StoreImage(healthy.balances, healthy.recent[-1:], healthy.counters, {})
    result = checker.check(history, {"r1": pruned}, total_order=True)
    assert found(result) == {"money": 1}
    assert "allow" in result.examples["money"][0]["problem"]


def test_corrupt_state_balances_that_disagree_with_the_replicas_own_counters():
    history = seeded_history()
    healthy = image_after([op_of(r) for r in history])
    # Counters say 20000 came in; the balances hold 20000; a history-consistent total. Now the
    # counters record a withdrawal that no balance shows (pruned rows: no replay to blame).
    bad_counters = Counters(healthy.counters.ops_applied_total + 1, healthy.counters.deposited_cents_total, 1_000)
    pruned = StoreImage(healthy.balances, healthy.recent[-1:], bad_counters, {})
    result = checker.check(history, {"r1": pruned}, total_order=True)
    assert found(result) == {"corrupt_state": 1}  # not "money": no architecture may excuse it
    assert "counters" in result.examples["corrupt_state"][0]["problem"]


def test_negative_balance_read_by_a_client():
    history = seeded_history() + [record("r1", "BALANCE", "a", invoke=1.0, balance=-150)]
    result = checker.check(history, {"r1": image_after([op_of(r) for r in history[:2]])}, total_order=True)
    assert found(result) == {"negative_balance": 1}
    assert result.examples["negative_balance"][0]["read"] == "-1.50"


def test_negative_balance_stored_by_a_replica():
    history = seeded_history()
    healthy = image_after([op_of(r) for r in history])
    # Money still adds up (a lost 50.00 to b), and the rows are pruned so no replay runs: the
    # only thing wrong is the negative stored balance.
    balances = {"a": -5_000, "b": 2 * SEED_CENTS + 5_000}
    pruned = StoreImage(balances, [], healthy.counters, {})
    result = checker.check(history, {"r1": pruned}, total_order=True)
    assert found(result) == {"negative_balance": 1}
    assert result.examples["negative_balance"][0] == {"replica": "r1", "account": "a", "stored": "-50.00"}


def test_lost_write_an_acknowledged_operation_missing_from_the_final_state():
    history = seeded_history() + [
        record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0),  # acknowledged, never applied
        record("w1", WITHDRAW, "b", 99_999_999, outcome="failed", error="INSUFFICIENT_FUNDS", invoke=2.0),  # recorded failure, lost
    ]
    result = checker.check(history, {"r1": image_after([op_of(r) for r in history[:2]])}, total_order=True)
    assert found(result) == {"lost_write": 2}
    assert {e["op_id"] for e in result.examples["lost_write"]} == {"t1", "w1"}


def test_double_apply_the_same_id_twice_in_the_applied_operations():
    history = seeded_history() + [record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0)]
    healthy = image_after([op_of(r) for r in history])
    first = healthy.recent[-1]
    again = AppliedOp(first.apply_index + 1, first.seq, first.op, first.outcome)  # recorded twice
    counters = Counters(healthy.counters.ops_applied_total + 1, healthy.counters.deposited_cents_total,
                        healthy.counters.withdrawn_cents_total)
    image = StoreImage(healthy.balances, healthy.recent + [again], counters, {})
    result = checker.check(history, {"r1": image}, total_order=True)
    assert found(result) == {"double_apply": 1}
    assert result.examples["double_apply"][0] == {"replica": "r1", "op_id": "t1", "times": 2}


def test_double_apply_balances_showing_an_operations_effect_twice():
    history = seeded_history() + [record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0)]
    healthy = image_after([op_of(r) for r in history])
    twice = {"a": SEED_CENTS - 6_000, "b": SEED_CENTS + 6_000}  # the id is recorded once
    image = StoreImage(twice, healthy.recent, healthy.counters, {})
    result = checker.check(history, {"r1": image}, total_order=True)
    assert found(result) == {"double_apply": 1}
    assert result.examples["double_apply"][0]["op_id"] == "t1"


def test_corrupt_state_balances_no_replay_of_the_applied_operations_explains():
    history = seeded_history() + [record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0)]
    healthy = image_after([op_of(r) for r in history])
    shifted = {"a": healthy.balances["a"] - 1_234, "b": healthy.balances["b"] + 1_234}  # money conserved
    image = StoreImage(shifted, healthy.recent, healthy.counters, {})
    result = checker.check(history, {"r1": image}, total_order=True)
    assert found(result) == {"corrupt_state": 1}
    assert result.examples["corrupt_state"][0]["differences"] == {"a": "-12.34", "b": "12.34"}


def test_phantom_write_an_operation_the_client_was_told_did_not_happen_was_applied():
    # OVERLOADED is a definite refusal: the client was told the transfer certainly did not happen.
    history = seeded_history() + [record("t1", TRANSFER, "a", 3_000, to="b", outcome="failed", error="OVERLOADED", invoke=1.0)]
    result = checker.check(history, {"r1": image_after([op_of(r) for r in history])}, total_order=True)
    assert found(result) == {"phantom_write": 1}
    assert result.examples["phantom_write"][0]["op_id"] == "t1"


def test_outcome_mismatch_the_client_was_told_ok_but_the_replica_recorded_a_failure():
    history = seeded_history() + [record("t1", TRANSFER, "a", 50_000, to="b", invoke=1.0)]  # told OK
    image = image_after([op_of(r) for r in history])
    assert image.recent[-1].outcome == Outcome("INSUFFICIENT_FUNDS", None)
    result = checker.check(history, {"r1": image}, total_order=True)
    assert found(result) == {"outcome_mismatch": 1}
    assert result.examples["outcome_mismatch"][0]["replica_recorded"] == "INSUFFICIENT_FUNDS"


def test_real_time_order_an_operation_acknowledged_before_another_began_is_applied_after_it():
    history = seeded_history() + [
        record("first", TRANSFER, "a", 100, to="b", invoke=1.0, complete=1.1),
        record("then", TRANSFER, "b", 200, to="a", invoke=2.0, complete=2.1),
    ]
    seed = [op_of(r) for r in history[:2]]
    image = image_after(seed + [op_of(history[3]), op_of(history[2])])  # "then" applied first
    result = checker.check(history, {"r1": image}, total_order=True)
    assert found(result) == {"real_time_order": 1}
    assert result.examples["real_time_order"][0]["first"] == "first"
    assert result.examples["real_time_order"][0]["then"] == "then"
    # An architecture that does not promise a total order is not held to it.
    assert found(checker.check(history, {"r1": image}, total_order=False)) == {}


def test_concurrent_operations_may_apply_in_either_order():
    history = seeded_history() + [
        record("x", TRANSFER, "a", 100, to="b", invoke=1.0, complete=2.0),
        record("y", TRANSFER, "b", 200, to="a", invoke=1.5, complete=2.5),
    ]
    seed = [op_of(r) for r in history[:2]]
    for order in ([history[2], history[3]], [history[3], history[2]]):
        assert found(checker.check(history, {"r1": image_after(seed + [op_of(r) for r in order])}, total_order=True)) == {}


# --- Outcomes decided at the replica ------------------------------------------------------------


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_an_unknown_outcome_is_accepted_whether_the_replica_applied_it_or_not(applied):
    history = seeded_history() + [
        record("d1", DEPOSIT, "a", 777, outcome="unknown", error="TIMEOUT", invoke=1.0),
        record("w1", WITHDRAW, "b", 333, outcome="unknown", error="CONNECTION_LOST", invoke=1.1),
    ]
    ops = [op_of(r) for r in history[:2]] + ([op_of(r) for r in history[2:]] if applied else [])
    image = image_after(ops)
    result = checker.check(history, {"r1": image, "r2": image_after(ops)}, total_order=True)
    assert found(result) == {}
    # ...but an unknown deposit counts once at most: the balances may not hold it twice.
    if applied:
        doubled = dict(image.balances)
        doubled["a"] += 777
        counters = Counters(image.counters.ops_applied_total, image.counters.deposited_cents_total + 777,
                            image.counters.withdrawn_cents_total)
        bad = checker.check(history, {"r1": StoreImage(doubled, image.recent, counters, {})}, total_order=True)
        assert bad.anomalies["money"] == 1 and bad.anomalies["double_apply"] == 1


def test_accepted_operations_take_the_outcome_the_replica_recorded():
    # The queue architecture answers "accepted" (durably queued) before any replica decides: a
    # withdrawal accepted and then refused by the replica for insufficient funds is no mismatch,
    # and money counts what the replica decided.
    history = seeded_history() + [
        record("w-big", WITHDRAW, "a", 50_000, accepted=True, invoke=1.0),
        record("w-ok", WITHDRAW, "b", 2_000, accepted=True, invoke=1.1),
    ]
    image = image_after([op_of(r) for r in history])
    assert image.recent[-2].outcome.error == "INSUFFICIENT_FUNDS"
    assert found(checker.check(history, {"r1": image}, total_order=True)) == {}


def test_an_accepted_operation_missing_from_the_replica_is_a_lost_write():
    history = seeded_history() + [record("d1", DEPOSIT, "a", 500, accepted=True, invoke=1.0)]
    image = image_after([op_of(r) for r in history[:2]])
    result = checker.check(history, {"r1": image}, total_order=True)
    assert found(result) == {"lost_write": 1}


# --- A store whose applied operations were pruned by the dedup window ---------------------------


def test_a_pruned_store_skips_the_replay_and_lost_write_checks_and_says_so():
    history = seeded_history() + [
        record("t1", TRANSFER, "a", 1_000, to="b", invoke=1.0),
        record("t2", TRANSFER, "b", 400, to="a", invoke=2.0),
        record("d1", DEPOSIT, "a", 250, outcome="unknown", error="TIMEOUT", invoke=3.0),
    ]
    full = image_after([op_of(r) for r in history])
    pruned = StoreImage(full.balances, full.recent[-2:], full.counters, {})  # kept: t2 and d1
    result = checker.check(history, {"r1": pruned}, total_order=True)
    assert found(result) == {}
    assert len(result.notes) == 1
    assert "r1" in result.notes[0] and "2 of 5" in result.notes[0] and "skipped" in result.notes[0]
    # Without the rows, a missing acknowledged operation cannot be told from a pruned one...
    dropped = StoreImage(full.balances, full.recent[-1:], full.counters, {})
    assert found(checker.check(history, {"r1": dropped}, total_order=True)) == {}
    # ...while the complete store that lacks it is a lost write.
    complete = image_after([op_of(r) for r in history if r.op_id != "t2"])
    assert found(checker.check(history, {"r1": complete}, total_order=True)) == {"lost_write": 1}
    assert checker.check(history, {"r1": complete}, total_order=True).notes == []


def test_a_pruned_store_still_bounds_money_by_the_unknown_operations():
    history = seeded_history() + [record("d1", DEPOSIT, "a", 250, outcome="unknown", error="TIMEOUT", invoke=3.0)]
    full = image_after([op_of(r) for r in history])
    pruned = StoreImage(full.balances, [], full.counters, {})
    assert found(checker.check(history, {"r1": pruned}, total_order=True)) == {}
    # 1 cent more than deposits allow, even counting the unknown deposit, with counters to match.
    extra = dict(full.balances)
    extra["b"] += 1
    counters = Counters(full.counters.ops_applied_total, full.counters.deposited_cents_total + 1, 0)
    result = checker.check(history, {"r1": StoreImage(extra, [], counters, {})}, total_order=True)
    assert found(result) == {"money": 1}


# --- Reads --------------------------------------------------------------------------------------


def test_stale_read_a_client_that_does_not_read_its_own_write():
    # Client 0's deposit got seq 3; its next read was answered at seq 2, before that deposit.
    history = seeded_history() + [
        record("d1", DEPOSIT, "a", 500, invoke=1.0, complete=1.1, seq=3),
        record("r1", "BALANCE", "a", invoke=1.2, complete=1.3, balance=SEED_CENTS, seq=2),
        # Another client had not seen seq 3: the same answer is no anomaly for it.
        record("r2", "BALANCE", "a", invoke=1.2, complete=1.3, balance=SEED_CENTS, seq=2, client=1),
        # A read sent before the deposit's reply arrived may come before it too.
        record("r3", "BALANCE", "a", invoke=1.05, complete=1.3, balance=SEED_CENTS, seq=2),
    ]
    state = {"r1": image_after([op_of(r) for r in history if r.kind != "BALANCE"])}
    result = checker.check(history, state, total_order=True, read_your_writes=True)
    assert found(result) == {"stale_read": 1}
    assert result.examples["stale_read"][0] == {"op_id": "r1", "client": 0, "account": "a", "read_at_seq": 2,
                                                "client_had_seen_seq": 3}
    assert found(checker.check(history, state, total_order=True)) == {}, "not promised: not checked"


def test_read_mismatch_a_balance_that_is_not_the_accounts_balance_at_its_seq():
    history = seeded_history() + [
        record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0, complete=1.1, seq=3),
        record("r1", "BALANCE", "b", invoke=1.2, complete=1.3, balance=SEED_CENTS, seq=2),  # right at seq 2
        record("r2", "BALANCE", "b", invoke=1.2, complete=1.3, balance=SEED_CENTS + 3_000, seq=3),  # right at seq 3
        record("r3", "BALANCE", "a", invoke=1.2, complete=1.3, balance=SEED_CENTS, seq=3),  # a's seq 2 balance
    ]
    state = {"r1": image_after([op_of(r) for r in history if r.kind != "BALANCE"])}
    result = checker.check(history, state, total_order=True)
    assert found(result) == {"read_mismatch": 1}
    assert result.examples["read_mismatch"][0] == {"op_id": "r3", "account": "a", "seq": 3, "read": "100.00",
                                                   "at_that_seq": "70.00"}
    assert found(checker.check(history, state, total_order=False)) == {}, "no total order: no apply order to read at"


# --- Writes lost in a failover ------------------------------------------------------------------


def failover_history() -> list[OpRecord]:
    return seeded_history() + [
        record("d1", DEPOSIT, "a", 500, invoke=1.0, seq=3, epoch=1),  # acknowledged by the old primary, lost
        record("d2", DEPOSIT, "a", 700, invoke=2.0, seq=3, epoch=2),  # the new primary's seq 3
    ]


def test_a_write_acknowledged_in_an_epoch_a_failover_replaced_is_a_failover_lost_write():
    history = failover_history()
    survived = image_after([op_of(r) for r in history if r.op_id != "d1"])
    # Asynchronous replication: the loss is what it does not promise to avoid; money counts d1 either way.
    result = checker.check(history, {"r1": survived}, total_order=True, failover_may_lose=True)
    assert found(result) == {"failover_lost_write": 1}
    assert result.examples["failover_lost_write"][0]["op_id"] == "d1"
    # Synchronous replication: the same loss also leaves money that no acknowledged write explains.
    assert found(checker.check(history, {"r1": survived}, total_order=True)) == {"failover_lost_write": 1, "money": 1}


def test_a_write_lost_in_the_newest_epoch_is_a_lost_write_even_where_failovers_may_lose():
    history = failover_history()
    without_d2 = image_after([op_of(r) for r in history if r.op_id != "d2"])
    result = checker.check(history, {"r1": without_d2}, total_order=True, failover_may_lose=True)
    assert found(result) == {"lost_write": 1, "money": 1}
    assert result.examples["lost_write"][0]["op_id"] == "d2"


def test_read_mismatch_in_a_store_without_sequence_numbers_counts_in_apply_order():
    # Standalone: no sequencer numbers; a read names how many operations its answer reflects.
    history = seeded_history() + [
        record("t1", TRANSFER, "a", 3_000, to="b", invoke=1.0, complete=1.1),
        record("r1", "BALANCE", "b", invoke=1.2, complete=1.3, balance=SEED_CENTS + 3_000, seq=3),
        record("r2", "BALANCE", "b", invoke=1.2, complete=1.3, balance=SEED_CENTS + 3_000, seq=2),  # too early
    ]
    state = {"r1": image_after([op_of(r) for r in history if r.kind != "BALANCE"], seqs=False)}
    result = checker.check(history, state, total_order=True)
    assert found(result) == {"read_mismatch": 1}
    assert result.examples["read_mismatch"][0]["op_id"] == "r2"
