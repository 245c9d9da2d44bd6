"""The bank every architecture replicates, without I/O.

state.py is the state machine (Bank, Operation, Outcome, exactly-once apply) and the parsing of
requests in every accepted format; money.py is integer cents; errors.py every error code and
whether it is definite; replies.py the reply lines every port that serves the bank sends. Start
with state.py.
"""
