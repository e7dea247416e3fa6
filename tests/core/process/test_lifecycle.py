"""The lifecycle state machine: every legal transition, and illegal ones refused."""

from twisted.trial.unittest import SynchronousTestCase

from ion.core.process.lifecycle import (
    ACTIVE,
    FAILED,
    INIT,
    READY,
    TERMINATED,
    IllegalTransition,
    Lifecycle,
)

PATHS = {
    INIT: [],
    READY: ["initialize"],
    ACTIVE: ["initialize", "activate"],
    TERMINATED: ["initialize", "terminate"],
    FAILED: ["fail"],
}
LEGAL = {
    (INIT, "initialize"): READY,
    (INIT, "terminate"): TERMINATED,
    (INIT, "fail"): FAILED,
    (READY, "activate"): ACTIVE,
    (READY, "terminate"): TERMINATED,
    (READY, "fail"): FAILED,
    (ACTIVE, "deactivate"): READY,
    (ACTIVE, "terminate"): TERMINATED,
    (ACTIVE, "fail"): FAILED,
}
EVENTS = ["initialize", "activate", "deactivate", "terminate", "fail"]


class LifecycleTests(SynchronousTestCase):
    def at(self, state):
        lc = Lifecycle()
        for event in PATHS[state]:
            getattr(lc, event)()
        self.assertEqual(lc.state, state)
        return lc

    def test_every_state_and_event(self):
        """Each (state, event) pair either moves to the documented state or is refused with
        IllegalTransition naming both, leaving the state unchanged."""
        for state in PATHS:
            for event in EVENTS:
                lc = self.at(state)
                if (state, event) in LEGAL:
                    getattr(lc, event)()
                    self.assertEqual(lc.state, LEGAL[(state, event)], (state, event))
                else:
                    e = self.assertRaises(IllegalTransition, getattr(lc, event))
                    self.assertEqual((e.state, e.event), (state, event))
                    self.assertIn(state, str(e))
                    self.assertEqual(lc.state, state)

    def test_final_states(self):
        """TERMINATED and FAILED are final; the others are not."""
        self.assertEqual(
            {s for s in PATHS if self.at(s).final}, {TERMINATED, FAILED}
        )
