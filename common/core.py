"""The core contract: how every protocol core hands what it decided to the driver that runs it.

A core is an architecture's protocol as a state machine without I/O (common/farm/core.py,
common/sequencer/core.py, common/primary_backup/core.py). A driver is the process around it: it
reads sockets, writes stores and logs, and carries out what the core decided. This module is the
one interface between the two, in the spirit of etcd raft's `Ready`.

The driver's recipe, the same for every architecture:

    1. Give the core one input: a message (`on_message(...)`), a timer (`tick(now_s)`), a
       connection that ended, the answer to a request it sent, a write that became durable
       (`on_persisted(...)`). Inputs return nothing.
    2. output = core.take_output(): everything the core decided since the last take, in the
       order it decided it.
    3. Carry it out, in this order:
         persist   write output.persist to the store or the log. Everything else in this output
                   waits until that write is durable.
         send      output.send: each message to the peer or connection it names, encoded by the
                   codec (common/transport/wire.py).
         reply     output.replies: each answer to the client token it names; then close the
                   connections in output.close, once what was written to them has left.
         log       output.events: one key=value line each (EventLogger.record).
    4. A write that completes later (a group commit, a log thread) is reported back with
       `core.on_persisted(...)`: an input like any other, whose output may release what waited
       for that write (step 2 again).

Why this order: a reply or a message may report a write (an acknowledged operation, a vote, a
logged entry), and an acknowledgement must never leave before the durable write it reports: a
crash in between would leave a client or a peer holding a promise that the disk does not keep.
So within one output, persistence comes first. Across outputs the core keeps the rule itself: what
depends on a write still in flight stays inside the core until `on_persisted` says that write is
durable. Messages to peers go before replies to clients, so that what the other nodes are told
never trails what a client was told (a client that reads right after its acknowledgement finds the
replicas already on their way), and so that every driver, and a simulator, carries out the same
output the same way. Logging comes last: a line says what was done, not what was about to be.

What a core may do: keep state, decide, validate and parse the messages it is given (dicts, as the
codec decoded them), assert its invariants, compute with the time it is given (`now_s`, seconds on
a monotonic clock) and draw from the `random.Random` it is given, and answer read-only questions
(its STATUS figures). What it may not: read a clock, touch a socket, a file or a thread, log,
encode bytes (encoding is the codec's, called by the driver), or call back into its driver. So a
test, or a simulator, drives a core with any order of inputs and reads exactly what it decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

# Event levels, as EventLogger (common/log.py) names them.
INFO, WARNING = "info", "warning"


class Send(NamedTuple):
    """A message the core sends of its own accord: to a peer (its name or "host:port" key) or to a
    connection the driver told it of. `timeout_s`: for a request whose answer the driver reports
    back to the core (the farm's peer requests), how long that answer may take; None: the driver's
    own timeout, or no answer expected."""

    to: Any
    message: dict
    timeout_s: float | None = None


class Reply(NamedTuple):
    """An answer to a request: to the client token the request came with (a connection id, or
    whatever the driver gave the core with that request)."""

    to: Any
    message: dict


class Event(NamedTuple):
    """Something the core decided that is worth one log line: `name` and its key=value fields."""

    name: str
    fields: dict
    level: str = INFO


@dataclass(slots=True)
class Output:
    """What the core decided since the last `take_output()`, each list in the order decided.
    The driver carries it out as the module docstring says: persist, send, reply (and close), log."""

    persist: list = field(default_factory=list)  # what to make durable; the rest of this output waits for it
    send: list[Send] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    close: list = field(default_factory=list)  # client tokens (connections) to close after their replies
    events: list[Event] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persist or self.send or self.replies or self.close or self.events)


class Core:
    """The base of every core: it accumulates one Output, which the driver takes after each input.
    A subclass decides; these methods are how it records what it decided."""

    __slots__ = ("_output",)

    def __init__(self) -> None:
        self._output = Output()

    def take_output(self) -> Output:
        """Everything decided since the last take; the core starts a new, empty output."""
        output, self._output = self._output, Output()
        return output

    def on_persisted(self, persisted: list) -> None:
        """The driver made `persisted` (an earlier output's `persist`) durable. A core that asks for
        persistence overrides this; for one that never does, being told so is a bug."""
        raise AssertionError(f"{type(self).__name__} asks for nothing to be persisted")

    # --- What a subclass calls to record its decisions ------------------------------------------
    def _persist(self, item: object) -> None:
        self._output.persist.append(item)

    def _send(self, to: object, message: dict, timeout_s: float | None = None) -> None:
        self._output.send.append(Send(to, message, timeout_s))

    def _reply(self, to: object, message: dict) -> None:
        self._output.replies.append(Reply(to, message))

    def _close(self, to: object) -> None:
        self._output.close.append(to)

    def _event(self, name: str, level: str = INFO, /, **fields: object) -> None:
        self._output.events.append(Event(name, fields, level))
