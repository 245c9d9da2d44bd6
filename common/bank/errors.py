"""Error codes of the saldo protocol, and whether each one is definite.

Every error reply is `{"STATUS": "NOK", "ERROR": <code>, "DETAIL": <text>, "DEFINITE": <bool>}`.

- definite: the operation certainly did not happen (bad input, insufficient funds, a full queue).
  Retrying the same request gives the same answer; a client may give up.
- indefinite: the operation may or may not have happened (a timeout, a lost connection, a server
  that lost its replicas mid-request). A client that needs to know retries with the same operation
  id: exactly-once apply makes the retry safe, and its answer is the first result.

This module owns the table of codes; nothing else invents a code.
"""

from __future__ import annotations

import json

# code -> (definite, one-line meaning). The meaning is what README/PROTOCOL documentation shows.
ERROR_CODES: dict[str, tuple[bool, str]] = {
    # Framing and decoding (common/transport/wire.py).
    "LINE_TOO_LONG": (True, "a line exceeded the maximum line length; the connection is closed"),
    "INVALID_UTF8": (True, "the line is not valid UTF-8"),
    "INVALID_JSON": (True, "the line is not valid JSON"),
    "NOT_OBJECT": (True, "the line is valid JSON but not an object"),
    "UNKNOWN_MESSAGE": (True, "the message is not one this port understands"),
    "MISSING_FIELD": (True, "a required field is absent"),
    "FIELD_TYPE": (True, "a field has the wrong JSON type"),
    "FIELD_INVALID": (True, "a field has the right type but an invalid value"),
    "ID_INVALID": (True, "the operation id is missing, empty, too long or has forbidden characters"),
    # Money (common/bank/money.py).
    "AMOUNT_MISSING": (True, "the amount is absent or null"),
    "AMOUNT_TYPE": (True, "the amount is neither a decimal string nor a JSON number"),
    "AMOUNT_BOOLEAN": (True, "the amount is a boolean"),
    "AMOUNT_MALFORMED": (True, "the amount string is not a plain decimal number"),
    "AMOUNT_NOT_FINITE": (True, "the amount is NaN or infinite"),
    "AMOUNT_NEGATIVE": (True, "the amount is negative"),
    "AMOUNT_ZERO": (True, "the amount is zero"),
    "AMOUNT_TOO_PRECISE": (True, "the amount has more than two decimal places"),
    "AMOUNT_TOO_LARGE": (True, "the amount exceeds the maximum of one operation"),
    # Bank rules (common/bank/state.py).
    "ACCOUNT_EMPTY": (True, "the account name is empty"),
    "ACCOUNT_TOO_LONG": (True, "the account name is longer than the maximum"),
    "ACCOUNT_INVALID": (True, "the account name has characters outside [A-Za-z0-9_.@-]"),
    "ACCOUNT_NOT_FOUND": (True, "the account does not exist"),
    "SAME_ACCOUNT": (True, "a transfer names the same account twice"),
    "INSUFFICIENT_FUNDS": (True, "the balance is short; nothing changed"),
    "BALANCE_LIMIT": (True, "the operation would take a balance above the maximum"),
    "TOO_MANY_ACCOUNTS": (True, "the bank holds the maximum number of accounts"),
    "ID_REUSED": (True, "this id was given to another operation, which it still names; nothing changed (a new operation needs a new id)"),
    # Roles, routing and load.
    "WRONG_ROLE": (True, "this process does not accept that message in its role"),
    "NOT_PRIMARY": (True, "this replica is not the primary; see TARGET_MASTER"),
    "QUEUE_FULL": (True, "the queue is at its bound; the request was not accepted"),
    "OVERLOADED": (True, "too many requests are pending; the request was not accepted"),
    "NOT_READY": (True, "the process is starting or catching up; the request was not accepted"),
    "TOO_STALE": (True, "the replica has not yet applied the sequence number the read requires"),
    "STALE_EPOCH": (True, "the message comes from an epoch older than one this node has promised; see PROMISED_EPOCH"),
    # Worker farm (common/farm/core.py).
    "NOT_PEER": (True, "the sender is not a configured peer of this process; its protocol messages are refused"),
    "WORKER_ID_IN_USE": (True, "another open connection already serves as this WORKER_UUID"),
    "TASK_FAILED": (True, "the worker reported that the task failed; DETAIL has its words (nothing changed)"),
    "NO_WORKER": (True, "no worker of the farm can run this task now; nothing was done (another server, or later)"),
    "BAD_RESULT": (True, "the workers' results for this read were malformed; DETAIL names the worker (nothing changed)"),
    # Outcome unknown: the client must retry with the same id to learn it.
    "TIMEOUT": (False, "no answer in time; the operation may have been applied"),
    "CONNECTION_LOST": (False, "the connection closed before the answer; the operation may have been applied"),
    "NO_REPLICA": (False, "no replica is connected to apply the operation; it is in the log and is applied when one connects"),
    "UNAVAILABLE": (False, "the request was accepted but could not be completed now; it may be applied later"),
    "INTERNAL": (False, "an internal failure; the operation may have been applied"),
}


# Each code's meaning as a JSON string, for replies formatted without the encoder (hot paths).
DETAIL_JSON: dict[str, str] = {code: json.dumps(meaning) for code, (_definite, meaning) in ERROR_CODES.items()}


def is_definite(code: str) -> bool:
    """True when an error with this code means the operation certainly did not happen."""
    definite_and_meaning = ERROR_CODES.get(code)
    if definite_and_meaning is None:
        return False  # An unknown code from a peer: assume the worst.
    return definite_and_meaning[0]


class SaldoError(Exception):
    """A request failed with a protocol error code; carries what the reply needs."""

    __slots__ = ("code", "detail")

    def __init__(self, code: str, detail: str = "") -> None:
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail

    @property
    def definite(self) -> bool:
        return is_definite(self.code)


def with_id_msg(reply: dict, message: dict) -> dict:
    """Seed 002's clients match replies by their request's "id_msg": echo it on any reply to such a
    request, errors included, as it came (a number stays a number, even one refused as an id)."""
    id_msg = message.get("id_msg")
    if id_msg is not None:
        reply["id_msg"] = id_msg
    return reply


def error_reply(code: str, detail: str = "", request_id: object = None) -> dict:
    """The reply object for an error; echoes the request id when there was one."""
    assert code in ERROR_CODES, code
    reply: dict = {}
    if request_id is not None:
        reply["ID"] = request_id
    reply["STATUS"] = "NOK"
    reply["ERROR"] = code
    reply["DETAIL"] = detail or ERROR_CODES[code][1]
    reply["DEFINITE"] = ERROR_CODES[code][0]
    return reply
