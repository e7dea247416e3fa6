"""Conversation protocols as data: one state table per protocol and role.

A table maps C{state -> {event: next state}}. Events are the performatives of the messages a
conversation sends or receives, plus C{timeout} and C{cancel}. Every table starts in C{start},
has a timeout transition from every non-final state, and ends in one of L{FINAL}.

The tables::

    rpc        initiator   start -request-> requested -inform_result-> done
                                                      -failure-> failed
               participant start -request-> received -inform_result-> done | -failure-> failed
    request    initiator   start -request-> requested -agree-> agreed -inform_result-> done
               (FIPA)                                 -refuse-> refused  agreed -failure-> failed
               participant the same, driven by what it sends
    inform     both        start -inform-> done   (one message, no reply)

An event that a table does not allow in the current state is a protocol violation: the
conversation ends C{failed} with the reason logged, and the process carries on.
"""

START = "start"
DONE = "done"
FAILED = "failed"
REFUSED = "refused"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"
FINAL = frozenset({DONE, FAILED, REFUSED, TIMED_OUT, CANCELLED})

# performatives
REQUEST = "request"
AGREE = "agree"
REFUSE = "refuse"
INFORM_RESULT = "inform_result"
FAILURE = "failure"
INFORM = "inform"
PERFORMATIVES = frozenset({REQUEST, AGREE, REFUSE, INFORM_RESULT, FAILURE, INFORM})
# events that are not messages
TIMEOUT = "timeout"
CANCEL = "cancel"

INITIATOR = "initiator"
PARTICIPANT = "participant"

_RPC = {
    START: {REQUEST: "requested"},
    "requested": {INFORM_RESULT: DONE, FAILURE: FAILED, TIMEOUT: TIMED_OUT, CANCEL: CANCELLED},
}
_RPC_PARTICIPANT = {
    START: {REQUEST: "received"},
    "received": {INFORM_RESULT: DONE, FAILURE: FAILED, TIMEOUT: TIMED_OUT},
}
_REQUEST = {
    START: {REQUEST: "requested"},
    "requested": {
        AGREE: "agreed",
        REFUSE: REFUSED,
        FAILURE: FAILED,
        TIMEOUT: TIMED_OUT,
        CANCEL: CANCELLED,
    },
    "agreed": {INFORM_RESULT: DONE, FAILURE: FAILED, TIMEOUT: TIMED_OUT, CANCEL: CANCELLED},
}
_REQUEST_PARTICIPANT = {
    START: {REQUEST: "received"},
    "received": {AGREE: "agreed", REFUSE: REFUSED, FAILURE: FAILED, TIMEOUT: TIMED_OUT},
    "agreed": {INFORM_RESULT: DONE, FAILURE: FAILED, TIMEOUT: TIMED_OUT},
}
_INFORM = {START: {INFORM: DONE}}

TABLES = {
    ("rpc", INITIATOR): _RPC,
    ("rpc", PARTICIPANT): _RPC_PARTICIPANT,
    ("request", INITIATOR): _REQUEST,
    ("request", PARTICIPANT): _REQUEST_PARTICIPANT,
    ("inform", INITIATOR): _INFORM,
    ("inform", PARTICIPANT): _INFORM,
}


class ProtocolViolation(Exception):
    """An event that the conversation's table does not allow in its current state."""

    def __init__(self, protocol, role, state, event):
        super().__init__(f"{protocol} {role}: {event!r} is not allowed in state {state!r}")


def next_state(protocol, role, state, event):
    """The state after event, or ProtocolViolation."""
    table = TABLES[(protocol, role)]
    try:
        return table[state][event]
    except KeyError:
        raise ProtocolViolation(protocol, role, state, event) from None
