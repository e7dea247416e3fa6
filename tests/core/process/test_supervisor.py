"""Supervisors: start and stop order, restart strategies and types, restart intensity,
escalation to a parent supervisor and to the app controller, and shutdown time limits."""

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from ion.core.cc.testing import make_container
from ion.core.process import Process, Supervisor
from ion.core.process.supervisor import ChildStartError, check_child_specs


class Worker(Process):
    """Records ("start", name) and ("stop", name) in args["events"]. args["fail_start"] (a
    dict) makes on_init fail once its "after" count of good starts is used up;
    args["hang"] makes on_terminate never finish; args["on_stop"] is awaited in on_terminate."""

    def on_init(self):
        fail = self.args.get("fail_start")
        if fail is not None:
            if fail["after"] <= 0:
                raise RuntimeError(f"{self.name} cannot start")
            fail["after"] -= 1

    def on_activate(self):
        self.args["events"].append(("start", self.name))

    async def on_terminate(self):
        self.args["events"].append(("stop", self.name))
        if self.args.get("on_stop") is not None:
            await self.args["on_stop"]()
        if self.args.get("hang"):
            await defer.Deferred()


class SupervisorTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        self.clock = task.Clock()

    async def container(self):
        return await make_container(self, clock=self.clock)

    def child(self, child_id, **kw):
        args = dict(kw.pop("args", {}), events=self.events)
        return dict({"id": child_id, "name": child_id, "spec": Worker, "args": args}, **kw)

    async def supervisor(self, children, **args):
        c = await self.container()
        sup = await c.spawn(Supervisor, name="sup", args=dict(args, children=children))
        return c, sup

    def pids(self, sup):
        return {cid: (sup.child(cid).pid if sup.child(cid) else None) for cid in sup.restarts}

    def capture_log(self):
        """The formatted log lines from now until the test ends."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def exited(self, proc):
        d = defer.Deferred()
        proc.add_exit_observer(d.callback)
        return d

    # -- start and stop ----------------------------------------------------------------------

    async def test_start_in_order_stop_in_reverse(self):
        """Children start in list order when the supervisor starts, and stop last-first, before
        the supervisor itself, when it is terminated."""
        c, sup = await self.supervisor([self.child("a"), self.child("b"), self.child("c")])
        self.assertEqual(self.events, [("start", "a"), ("start", "b"), ("start", "c")])
        self.assertEqual([p.name for p in sup.children], ["a", "b", "c"])
        self.assertEqual(sup.child("b").state, "ACTIVE")
        kids = list(sup.children)
        del self.events[:]
        await sup.terminate()
        self.assertEqual(self.events, [("stop", "c"), ("stop", "b"), ("stop", "a")])
        self.assertEqual(sup.state, "TERMINATED")
        self.assertEqual([k.state for k in kids], ["TERMINATED"] * 3)
        self.assertEqual(sup.restarts, {"a": 0, "b": 0, "c": 0})
        self.assertEqual(c.ps(), [])

    async def test_failing_child_start_stops_the_started_ones(self):
        """If a child fails to start, the ones already started are stopped in reverse and the
        supervisor fails to start with an error naming the child; later children never start."""
        c = await self.container()
        children = [
            self.child("a"),
            self.child("b"),
            self.child("c", args={"fail_start": {"after": 0}}),
            self.child("d"),
        ]
        d = defer.ensureDeferred(c.spawn(Supervisor, name="sup", args={"children": children}))
        e = await self.assertFailure(d, ChildStartError)
        self.assertIn("child 'c' failed to start", str(e))
        self.assertIn("c cannot start", str(e))
        self.assertEqual(e.child_id, "c")
        self.assertEqual(
            self.events, [("start", "a"), ("start", "b"), ("stop", "b"), ("stop", "a")]
        )
        self.assertEqual(c.ps(), [])
        self.flushLoggedErrors(RuntimeError, ChildStartError)

    async def test_bad_specs_are_refused_up_front(self):
        """Bad child specs or supervisor arguments are a ValueError saying which child and key
        (unknown keys list the valid ones); nothing starts."""
        cases = [
            (
                {"children": [{"id": "a", "spec": Worker, "restrat": "permanent"}]},
                "child spec 0 ('a'): unknown key 'restrat'; valid keys are args, id, name, "
                "restart, shutdown, spec",
            ),
            (
                {"children": [{"id": "a", "spec": Worker}, {"id": "a", "spec": Worker}]},
                "child spec 1 ('a'): duplicate id 'a'",
            ),
            (
                {"children": [{"id": "a", "spec": Worker, "restart": "always"}]},
                "key 'restart' must be one of permanent, transient, temporary, got 'always'",
            ),
            ({"children": [{"spec": Worker}]}, "child spec 0: missing key 'id'"),
            ({"children": [{"id": "a"}]}, "missing key 'spec'"),
            ({"children": [{"id": "a", "spec": Worker, "shutdown": -1}]}, "key 'shutdown'"),
            ({"children": [{"id": "a", "spec": Worker, "args": []}]}, "key 'args' must be a dict"),
            ({"children": {"id": "a"}}, "'children' must be a list"),
            ({"children": [], "strategy": "all_for_one"}, "'strategy' must be one of one_for_one"),
            ({"children": [], "intensity": -1}, "'intensity' must be an int >= 0"),
            ({"children": [], "period": 0}, "'period' must be seconds (> 0)"),
            (
                {"children": [], "stratgy": "one_for_all"},
                "unknown supervisor argument 'stratgy'; "
                "valid ones are children, intensity, period, strategy",
            ),
        ]
        c = await self.container()
        for args, expected in cases:
            d = defer.ensureDeferred(c.spawn(Supervisor, args=args))
            e = await self.assertFailure(d, ValueError)
            self.assertIn(expected, str(e))
        self.assertEqual(c.ps(), [])
        self.assertEqual(self.events, [])

    def test_check_child_specs_defaults(self):
        """A minimal child spec gets the documented defaults."""
        (spec,) = check_child_specs([{"id": "a", "spec": "ion.apps.hello.service"}])
        self.assertEqual(
            (spec.name, spec.args, spec.restart, spec.shutdown), (None, {}, "permanent", 5000)
        )

    # -- strategies --------------------------------------------------------------------------

    async def test_one_for_one(self):
        """one_for_one: a crashed child is restarted with a new pid; its siblings keep theirs."""
        c, sup = await self.supervisor([self.child("a"), self.child("b"), self.child("c")])
        before = self.pids(sup)
        del self.events[:]
        await sup.child("b").crash("boom")
        await sup.settled()
        after = self.pids(sup)
        self.assertEqual((after["a"], after["c"]), (before["a"], before["c"]))
        self.assertNotEqual(after["b"], before["b"])
        self.assertEqual(self.events, [("start", "b")])
        self.assertEqual(sup.restarts, {"a": 0, "b": 1, "c": 0})
        self.assertEqual([p.pid for p in sup.children], [after["a"], after["b"], after["c"]])
        self.assertEqual(sup.state, "ACTIVE")

    async def test_one_for_all(self):
        """one_for_all: the other children are stopped last-first, then all start again in
        order, all with new pids."""
        c, sup = await self.supervisor(
            [self.child("a"), self.child("b"), self.child("c")], strategy="one_for_all"
        )
        before = self.pids(sup)
        del self.events[:]
        await sup.child("b").crash("boom")
        await sup.settled()
        after = self.pids(sup)
        self.assertTrue(all(after[cid] != before[cid] for cid in "abc"))
        self.assertEqual(
            self.events,
            [("stop", "c"), ("stop", "a"), ("start", "a"), ("start", "b"), ("start", "c")],
        )
        self.assertEqual(sup.restarts, {"a": 1, "b": 1, "c": 1})

    async def test_rest_for_one(self):
        """rest_for_one: the children after the crashed one are stopped last-first, then it and
        they start again in order; the ones before it keep their pids."""
        c, sup = await self.supervisor(
            [self.child("a"), self.child("b"), self.child("c"), self.child("d")],
            strategy="rest_for_one",
        )
        before = self.pids(sup)
        del self.events[:]
        await sup.child("b").crash("boom")
        await sup.settled()
        after = self.pids(sup)
        self.assertEqual(after["a"], before["a"])
        self.assertTrue(all(after[cid] != before[cid] for cid in "bcd"))
        self.assertEqual(
            self.events,
            [("stop", "d"), ("stop", "c"), ("start", "b"), ("start", "c"), ("start", "d")],
        )
        self.assertEqual(sup.restarts, {"a": 0, "b": 1, "c": 1, "d": 1})

    # -- restart types -----------------------------------------------------------------------

    async def test_restart_types(self):
        """permanent children are restarted after a normal exit or a crash, transient ones only
        after a crash, temporary ones never; a child not restarted stays stopped."""
        expected = {
            ("permanent", "terminate"): True,
            ("permanent", "crash"): True,
            ("transient", "terminate"): False,
            ("transient", "crash"): True,
            ("temporary", "terminate"): False,
            ("temporary", "crash"): False,
        }
        c = await self.container()
        for (restart, how), restarted in expected.items():
            sup = await c.spawn(Supervisor, args={"children": [self.child("w", restart=restart)]})
            old = sup.child("w")
            if how == "crash":
                await old.crash("boom")
            else:
                await old.terminate()
            await sup.settled()
            new = sup.child("w")
            if restarted:
                self.assertNotEqual(new.pid, old.pid, (restart, how))
                self.assertEqual(new.state, "ACTIVE")
            else:
                self.assertIsNone(new, (restart, how))
                self.assertEqual(sup.children, [])
            self.assertEqual(sup.restarts["w"], int(restarted), (restart, how))
            await sup.terminate()
            self.assertEqual(sup.state, "TERMINATED")

    async def test_ended_child_is_not_restarted_with_its_group(self):
        """A transient child that exited normally stays stopped when a sibling's crash
        restarts everyone (one_for_all)."""
        c, sup = await self.supervisor(
            [self.child("a", restart="transient"), self.child("b")], strategy="one_for_all"
        )
        await sup.child("a").terminate()
        await sup.settled()
        del self.events[:]
        await sup.child("b").crash("boom")
        await sup.settled()
        self.assertIsNone(sup.child("a"))
        self.assertEqual(self.events, [("start", "b")])

    async def test_no_restarts_while_supervisor_stops(self):
        """While the supervisor is terminating, children that end on their own (even crash) are
        not restarted, and the supervisor still stops cleanly."""
        c = await self.container()
        holder = {}

        async def crash_a():
            await holder["sup"].child("a").crash("crashed while stopping")

        sup = await c.spawn(
            Supervisor,
            args={"children": [self.child("a"), self.child("b", args={"on_stop": crash_a})]},
        )
        holder["sup"] = sup
        a = sup.child("a")
        del self.events[:]
        await sup.terminate()
        await sup.settled()
        self.assertEqual(self.events, [("stop", "b")])
        self.assertEqual((a.state, sup.state), ("FAILED", "TERMINATED"))
        self.assertEqual(sup.restarts, {"a": 0, "b": 0})
        self.assertEqual(c.ps(), [])

    # -- intensity ---------------------------------------------------------------------------

    async def test_intensity_exceeded_supervisor_gives_up(self):
        """Up to `intensity` restarts within `period` seconds are fine; one more and the
        supervisor stops its remaining children (last first) and ends FAILED."""
        c, sup = await self.supervisor(
            [self.child("a"), self.child("b"), self.child("c")], intensity=3, period=10
        )
        ended = self.exited(sup)
        for _ in range(3):
            self.clock.advance(1)
            await sup.child("b").crash("boom")
            await sup.settled()
        self.assertEqual(sup.state, "ACTIVE")
        self.assertEqual(sup.restarts["b"], 3)
        del self.events[:]
        self.clock.advance(1)
        await sup.child("b").crash("boom")
        await sup.settled()
        self.assertIs(await ended, sup)
        self.assertEqual(sup.state, "FAILED")
        self.assertEqual(self.events, [("stop", "c"), ("stop", "a")])
        self.assertEqual(sup.children, [])
        self.assertEqual(c.ps(), [])

    async def test_restarts_spread_over_time_go_on(self):
        """Restarts spread out so that no `period` holds more than `intensity` of them go on
        for ever."""
        c, sup = await self.supervisor([self.child("a")], intensity=3, period=10)
        for _ in range(12):
            self.clock.advance(4)
            await sup.child("a").crash("boom")
            await sup.settled()
        self.assertEqual(sup.state, "ACTIVE")
        self.assertEqual(sup.restarts["a"], 12)
        self.assertEqual(sup.child("a").state, "ACTIVE")

    async def test_child_that_cannot_restart_makes_supervisor_give_up(self):
        """A child whose restart fails is retried, each try counting as a restart, so a child
        that cannot start again makes the supervisor give up instead of looping."""
        c, sup = await self.supervisor(
            [self.child("a", args={"fail_start": {"after": 1}})], intensity=2, period=10
        )
        await sup.child("a").crash("boom")
        await sup.settled()
        self.assertEqual(sup.state, "FAILED")
        self.assertEqual(sup.restarts["a"], 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    # -- escalation --------------------------------------------------------------------------

    async def test_escalation_to_parent_supervisor(self):
        """A supervisor that gives up is, to its parent supervisor, a crashed child: the parent
        restarts it (with fresh children) by its own strategy; its siblings are untouched."""
        inner = {
            "id": "inner",
            "name": "inner",
            "spec": Supervisor,
            "args": {"children": [self.child("w")], "intensity": 1, "period": 10},
            "shutdown": None,
        }
        c, outer = await self.supervisor([self.child("a"), inner])
        first_inner, first_w, a = (
            outer.child("inner"),
            outer.child("inner").child("w"),
            outer.child("a"),
        )
        ended = self.exited(first_inner)
        await first_w.crash("boom")
        await first_inner.settled()
        self.assertEqual(first_inner.state, "ACTIVE")
        await first_inner.child("w").crash("boom again")
        await first_inner.settled()
        await ended
        self.assertEqual(first_inner.state, "FAILED")
        await outer.settled()
        second_inner = outer.child("inner")
        self.assertNotEqual(second_inner.pid, first_inner.pid)
        self.assertEqual(second_inner.state, "ACTIVE")
        self.assertEqual(second_inner.child("w").state, "ACTIVE")
        self.assertEqual(second_inner.restarts, {"w": 0})
        self.assertEqual(outer.restarts, {"a": 0, "inner": 1})
        self.assertIs(outer.child("a"), a)
        await outer.terminate()
        self.assertEqual(c.ps(), [])

    async def test_failed_app_supervisor_drops_only_that_app(self):
        """When an app's top supervisor gives up, the app controller logs "app <name> failed"
        and drops it from the running apps; the other apps keep running."""
        c = await self.container()
        await c.apps.start_files(["hello"])
        self.assertEqual(list(c.apps.running), ["ioncore", "hello"])
        logged = self.capture_log()
        top = c.apps.running["hello"].state
        await top.crash("gave up")
        self.assertEqual(list(c.apps.running), ["ioncore"])
        self.assertEqual(c.apps.running["ioncore"].state.state, "ACTIVE")
        messages = [formatEvent(e) for e in logged if e.get("name") == "hello"]
        self.assertEqual(len(messages), 1)
        self.assertTrue(messages[0].startswith("app hello failed"))
        self.assertEqual([row[2] for row in c.ps()], ["ContainerProcess"])

    # -- shutdown time limit -----------------------------------------------------------------

    async def test_hanging_child_is_abandoned_after_shutdown_time(self):
        """A child whose terminate does not finish within its `shutdown` ms is abandoned as
        FAILED, and the supervisor goes on to stop the others and itself."""
        c, sup = await self.supervisor(
            [self.child("a"), self.child("b", args={"hang": True}, shutdown=2000)]
        )
        a, b = sup.child("a"), sup.child("b")
        logged = self.capture_log()
        stopping = defer.ensureDeferred(sup.terminate())
        self.clock.advance(1.9)
        self.assertNoResult(stopping)
        self.assertEqual(self.events[-1], ("stop", "b"))
        self.clock.advance(0.2)
        await stopping
        self.assertEqual((b.state, a.state, sup.state), ("FAILED", "TERMINATED", "TERMINATED"))
        self.assertEqual(self.events[-2:], [("stop", "b"), ("stop", "a")])
        abandoned = [formatEvent(e) for e in logged if e.get("id") == "b"]
        self.assertIn("did not stop within 2000 ms; abandoned", abandoned[0])
        self.assertEqual(c.ps(), [])
        self.flushLoggedErrors(defer.CancelledError)
