"""The lab against a cluster it did not start (common/lab/deployed.py), without a deployment:
what it checks of a run on a store that held earlier runs, and what it refuses before a run.
(tests/test_deploy.py runs it against a real deployment.)"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO_ROOT

from common.bank.state import DEPOSIT, TRANSFER, Bank, Operation
from common.lab import checker, deployed
from common.lab.workload import OpRecord
from common.storage.store import StoreImage


def _image(bank: Bank) -> StoreImage:
    return StoreImage(dict(bank.balances), list(bank.recent_applied()), bank.counters.copy(), {})


def _record(op_id: str, kind: str, account: str, to_account: str | None, cents: int, at_s: float) -> OpRecord:
    return OpRecord(0, op_id, kind, account, to_account, cents, at_s, at_s + 0.001, "ok")


def test_a_run_on_a_store_with_earlier_runs_is_checked_on_what_it_changed():
    bank = Bank(dedup_window_ops=1000)
    bank.apply(Operation("old-1", DEPOSIT, "acct-0", None, 700), 1)  # an earlier run's account
    bank.apply(Operation("old-2", TRANSFER, "acct-0", "acct-1", 200), 2)
    before = _image(bank)
    bank.apply(Operation("new-1", DEPOSIT, "run7-acct-0", None, 500), 3)
    bank.apply(Operation("new-2", TRANSFER, "run7-acct-0", "run7-acct-1", 125), 4)
    after = _image(bank)
    history = [_record("new-1", DEPOSIT, "run7-acct-0", None, 500, 1.0), _record("new-2", TRANSFER, "run7-acct-0", "run7-acct-1", 125, 2.0)]

    run = deployed.run_image(before, after, ["run7-acct-0", "run7-acct-1"])

    assert run.balances == {"run7-acct-0": 375, "run7-acct-1": 125}
    assert [(row.apply_index, row.op.op_id) for row in run.recent] == [(1, "new-1"), (2, "new-2")]
    assert (run.counters.ops_applied_total, run.counters.deposited_cents_total) == (2, 500)
    assert checker.check(history, {"replica1": run, "replica2": run}, total_order=True).valid
    # Against the whole store, the same history reads as money from nowhere and foreign operations.
    assert not checker.check(history, {"replica1": after}, total_order=True).valid


def test_an_operation_the_run_did_not_send_still_shows_in_what_it_changed():
    bank = Bank(dedup_window_ops=1000)
    before = _image(bank)
    bank.apply(Operation("new-1", DEPOSIT, "run7-acct-0", None, 500), 1)
    bank.apply(Operation("stray", DEPOSIT, "run7-acct-0", None, 1), 2)  # nobody in the history sent it
    run = deployed.run_image(before, _image(bank), ["run7-acct-0"])
    result = checker.check([_record("new-1", DEPOSIT, "run7-acct-0", None, 500, 1.0)], {"replica1": run}, total_order=True)
    assert result.anomalies["money"] == 1


def test_lab_run_refuses_a_topology_without_control_commands_and_faults_it_cannot_carry_out(tmp_path):
    plain = tmp_path / "up.json"  # what `lab.py up` writes: nodes only
    plain.write_text(json.dumps({"nodes": {"replica1": {"script": "replica.py", "mode": "sequencer", "host": "127.0.0.12", "port": 1}}}))
    done = subprocess.run([sys.executable, "lab.py", "run", "--topology", str(plain), "--arch", "sequencer"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and "has no 'control' object" in done.stderr  # bad usage

    control = {action: [["true"]] for action in deployed.CONTROL_ACTIONS}
    document = {"nodes": {"replica1": {"script": "replica.py", "mode": "sequencer", "host": "127.0.0.12", "port": 1},
                          "sequencer": {"script": "sequencer.py", "host": "127.0.0.11", "port": 2}},
                "control": {"replica1": {**control, "store": "sqlite:///x.db"}, "sequencer": control}}
    deployment = tmp_path / "topology.json"
    deployment.write_text(json.dumps(document))
    assert deployed.check(deployment, "sequencer") is None
    assert "runs no queue replica" in deployed.check(deployment, "queue")
    done = subprocess.run([sys.executable, "lab.py", "run", "--topology", str(deployment), "--arch", "sequencer",
                           "--faults", "partition-replica"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 64 and "a deployed cluster does not have" in done.stderr
