"""The process lifecycle as a state machine (Automat).

The transitions::

    INIT --initialize--> READY --activate--> ACTIVE --deactivate--> READY
    READY, ACTIVE, INIT --terminate--> TERMINATED
    any non-final state --fail--> FAILED

TERMINATED and FAILED are final. An input that is not legal in the current state raises
L{IllegalTransition}, naming the state and the input, and leaves the state unchanged.
"""

from automat import MethodicalMachine, NoTransition

INIT = "INIT"
READY = "READY"
ACTIVE = "ACTIVE"
TERMINATED = "TERMINATED"
FAILED = "FAILED"


class IllegalTransition(Exception):
    """A lifecycle input was given in a state where it is not allowed."""

    def __init__(self, state, event):
        super().__init__(f"cannot {event} a process in state {state}")
        self.state = state
        self.event = event


def _public(name):
    """The public method for the input C{name}: IllegalTransition where Automat has none."""

    def method(self):
        before = self.state
        try:
            getattr(self, "_" + name)()
        except NoTransition:
            raise IllegalTransition(before, name) from None
        self._state = self._serialize()

    method.__name__ = name
    return method


class Lifecycle:
    """Lifecycle states of one process. L{state} is one of the names above."""

    _machine = MethodicalMachine()
    # The state's name, kept as the public inputs move it: asking Automat (its serializer)
    # costs more than the rest of checking that a process may serve a message.
    _state = INIT

    @_machine.state(initial=True, serialized=INIT)
    def _init(self):
        "Created, not yet initialized."

    @_machine.state(serialized=READY)
    def _ready(self):
        "Initialized: queue bound, not serving ops."

    @_machine.state(serialized=ACTIVE)
    def _active(self):
        "Serving ops."

    @_machine.state(serialized=TERMINATED)
    def _terminated(self):
        "Stopped for good."

    @_machine.state(serialized=FAILED)
    def _failed(self):
        "A lifecycle hook failed or the process crashed."

    @_machine.input()
    def _initialize(self):
        "Go from INIT to READY."

    @_machine.input()
    def _activate(self):
        "Go from READY to ACTIVE."

    @_machine.input()
    def _deactivate(self):
        "Go from ACTIVE back to READY."

    @_machine.input()
    def _terminate(self):
        "Stop for good."

    @_machine.input()
    def _fail(self):
        "Record a failure."

    @_machine.serializer()
    def _serialize(self, state):
        return state

    _init.upon(_initialize, enter=_ready, outputs=[])
    _ready.upon(_activate, enter=_active, outputs=[])
    _active.upon(_deactivate, enter=_ready, outputs=[])
    for _s in (_init, _ready, _active):
        _s.upon(_terminate, enter=_terminated, outputs=[])
        _s.upon(_fail, enter=_failed, outputs=[])
    del _s

    @property
    def state(self):
        return self._state

    initialize = _public("initialize")
    activate = _public("activate")
    deactivate = _public("deactivate")
    terminate = _public("terminate")
    fail = _public("fail")

    @property
    def final(self):
        return self.state in (TERMINATED, FAILED)
