"""The reply lines every port that serves bank requests shares.

Owns the hot path of every replica's answers (an applied operation's or a read's reply line,
formatted without the JSON encoder, for saldo's own request format), the generic reply for the
seeds' formats, and the error for a message that belongs to another role of saldo (WRONG_ROLE).
"""

from __future__ import annotations

from common.bank.errors import DETAIL_JSON, SaldoError, with_id_msg
from common.bank.money import render_cents
from common.bank.state import Operation, outcome_reply
from common.transport import wire

# Tasks that belong to other roles of saldo: answered WRONG_ROLE rather than UNKNOWN_MESSAGE.
OTHER_ROLE_TASKS = frozenset(
    {"ORDERED", "REPLICATE", "HELLO", "ACK", "APPLIED", "RESEND", "SUBSCRIBE", "WORKER_REQUEST", "WORKER_RESPONSE",
     "HEARTBEAT", "COMMAND_RELEASE", "REDIRECT", "RETURN", "NO_TASK", "LEASE", "VOTE", "ENQUEUE", "SNAPSHOT"}
)


def fast_outcome_line(op_id: str, outcome, suffix: str = "") -> bytes:
    """The reply line for an applied operation whose request ID is its op id (a plain string, see
    bank.check_op_id), formatted without the JSON encoder: this is the hot path of every replica.
    `suffix` is extra members, already encoded, each starting with a comma."""
    if outcome.error is None:
        return f'{{"ID":"{op_id}","STATUS":"OK","BALANCE":"{render_cents(outcome.balance_cents)}"{suffix}}}\n'.encode()
    code = outcome.error
    return (
        f'{{"ID":"{op_id}","STATUS":"NOK","ERROR":"{code}","DETAIL":{DETAIL_JSON[code]},'
        f'"DEFINITE":true{suffix}}}\n'
    ).encode()


def fast_balance_line(request_id: str, balance_cents: int, seq: int) -> bytes:
    """The reply line for a balance read whose request ID is a plain string (see fast_outcome_line)."""
    return f'{{"ID":"{request_id}","STATUS":"OK","BALANCE":"{render_cents(balance_cents)}","SEQ":{seq}}}\n'.encode()


def reply_for_operation(message: dict, request_id: object, op: Operation, outcome, extra: dict | None = None) -> bytes:
    """Fast path for saldo's own format; the generic encoder for the seeds' formats."""
    if request_id == op.op_id and not extra and "id_msg" not in message:
        return fast_outcome_line(op.op_id, outcome)
    return wire.encode(with_id_msg(outcome_reply(outcome, request_id, **(extra or {})), message))


def classify_unknown(message: dict) -> SaldoError:
    """The error for a message this port does not serve: WRONG_ROLE if another role would."""
    task = message.get("TASK")
    if (type(task) is str and task in OTHER_ROLE_TASKS) or "WORKER" in message or "SERVER" in message:
        return SaldoError("WRONG_ROLE", "this port serves bank operations (DEPOSIT, WITHDRAW, TRANSFER, BALANCE, ACCOUNTS)")
    return SaldoError("UNKNOWN_MESSAGE", "expected TASK (DEPOSIT, WITHDRAW, TRANSFER, BALANCE, QUERY, ACCOUNTS, STATUS) "
                                         "or an Operacao")
