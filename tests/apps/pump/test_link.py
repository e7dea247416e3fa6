"""
Tests for L{ion.apps.pump.link}: a link's state and retry bursts, on a fake clock.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ion.apps.pump.link import Link
from ion.apps.pump.outcome import Failure

DOWN = Failure(503, "connection refused")


class LinkTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.link = Link(self.clock, burst=3, gap=3, pause=30)
        self.tries = 0

    def attempt(self, outcome, gate=None):
        """Run one transfer through the link; its outcome (or None while it waits)."""

        async def work():
            self.tries += 1
            if gate is not None:
                await gate
            return ("sent" if outcome is None else None), outcome

        got = []
        Deferred.fromCoroutine(self.link.attempt(work)).addCallback(got.append)
        return got

    def test_bursts_then_pause(self):
        """
        A link that stays down is tried `burst` times `gap` apart, then after `pause`, then
        in another burst: the schedule the next tries follow.
        """
        self.assertEqual(self.link.state, "idle")
        times = []
        for _ in range(7):
            now = self.clock.seconds()
            self.attempt(DOWN)
            times.append(self.link.next_try - now)
            self.clock.advance(self.link.next_try - now)
        self.assertEqual(times, [3, 3, 30, 3, 3, 30, 3])
        self.assertEqual((self.link.state, self.tries), ("down", 7))
        self.attempt(None)
        self.assertEqual((self.link.state, self.link.tries, self.link.next_try), ("up", 0, None))

    def test_no_try_before_next_try(self):
        """
        While the link is down, a transfer before its next try is not tried: it fails at
        once, costing no try.
        """
        self.attempt(DOWN)
        self.clock.advance(2.9)
        (result,) = self.attempt(None)
        self.assertEqual(result[1].code, 503)
        self.assertIn("link down: connection refused", result[1].message)
        self.assertEqual((self.tries, self.link.tries), (1, 1))

    def test_one_probe_at_a_time(self):
        """
        Transfers falling due together: one probes the link, the others wait for its outcome;
        a failed probe sends them back untried, a successful one lets them through.
        """
        self.attempt(DOWN)
        self.clock.advance(3)
        gate = Deferred()
        probe = self.attempt(DOWN, gate)
        waiting = [self.attempt(None) for _ in range(3)]
        self.assertEqual((self.tries, probe, waiting), (2, [], [[], [], []]))
        gate.callback(None)
        self.assertEqual(self.tries, 2)
        self.assertEqual([w[0][1].code for w in waiting], [503] * 3)
        self.assertEqual(self.link.tries, 2)
        self.assertEqual(self.link.due(), self.clock.seconds() + 3)
        self.clock.advance(3)
        gate = Deferred()
        probe = self.attempt(None, gate)
        waiting = [self.attempt(None) for _ in range(3)]
        gate.callback(None)
        self.assertEqual(self.tries, 3 + 3)
        self.assertEqual([w[0] for w in waiting], [("sent", None)] * 3)
        self.assertEqual(self.link.state, "up")

    def test_blocked_until_next_try(self):
        """
        Before the next try a transfer is blocked (a sender stages nothing for it); a file
        that could not go while a probe ran comes back a gap later, never at a time past.
        """
        self.attempt(DOWN)
        self.clock.advance(2)
        self.assertEqual(self.link.blocked().code, 503)
        self.assertEqual(self.link.due(), self.clock.seconds() + 1)
        self.clock.advance(1)
        self.assertIsNone(self.link.blocked())
        gate = Deferred()
        self.attempt(DOWN, gate)
        self.assertEqual(self.link.due(), self.clock.seconds() + 3)
        gate.callback(None)

    def test_parallel_failures_one_try(self):
        """
        Transfers running in parallel when the link goes down count as one try, not one each.
        """
        gates = [Deferred() for _ in range(4)]
        for gate in gates:
            self.attempt(DOWN, gate)
        for gate in gates:
            gate.callback(None)
        self.assertEqual((self.link.state, self.link.tries), ("down", 1))
        self.assertEqual(self.link.next_try, self.clock.seconds() + 3)

    def test_server_answer_means_up(self):
        """
        A 4xx is the server's answer: the link is up; a 500 (ours) leaves it as it was.
        """
        self.attempt(DOWN)
        self.clock.advance(3)
        self.attempt(Failure(500, "disk"))
        self.assertEqual(self.link.state, "down")
        self.clock.advance(3)
        self.attempt(Failure(403, "denied"))
        self.assertEqual(self.link.state, "up")
        self.link.note(DOWN)
        self.assertEqual(self.link.describe()["link"], "down")
