"""Processes talking through a container: rpc, send, services, lifecycle hooks, isolation.

The scenarios are written once (`ProcessScenarios`) and run on every transport: the memory
transport here, the private RabbitMQ in the AMQP test module.
"""

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from ion.core.cc.testing import call_op, make_container
from tests.broker import get_broker
from tests.waiting import until
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import (
    ApplicationError,
    ConversationTimeout,
    IllegalTransition,
    NoSuchReceiver,
    Process,
    ProcessTerminated,
    RemoteError,
    ServiceProcess,
    SpawnError,
)


class Echo(ServiceProcess):
    service = "echo"

    def op_echo(self, content, headers):
        return content

    async def op_whoami(self, content, headers):
        return self.pid

    def op_fail(self, content, headers):
        raise ApplicationError("you asked for it", code=409)

    def op_crash(self, content, headers):
        raise ZeroDivisionError("boom")

    async def op_relay(self, content, headers):
        """Calls another op while serving this one."""
        return await self.rpc(content["dest"], content["op"], content.get("content"))

    async def op_hold(self, content, headers):
        """Holds until released, to test in-flight work."""
        self.held = defer.Deferred()
        self.holding.callback(None)
        return await self.held


class Caller(Process):
    def op_note(self, content, headers):
        self.notes.append((content, headers.get("user-id")))
        if self.noted is not None:
            d, self.noted = self.noted, None
            d.callback(content)

    def on_init(self):
        self.notes = []
        self.noted = None


class Hooks(Process):
    """Records its hooks; fails the one named in args['fail']."""

    def _hook(self, name):
        self.args.setdefault("seen", []).append(name)
        if self.args.get("fail") == name:
            raise RuntimeError(f"{name} failed on purpose")
        if self.args.get("bad") == name:
            raise ValueError(f"hooks: {name} got a bad argument")

    def on_init(self):
        self._hook("init")

    async def on_activate(self):
        self._hook("activate")

    def on_deactivate(self):
        self._hook("deactivate")

    def on_terminate(self):
        self._hook("terminate")


class ProcessScenarios:
    """Scenarios every transport must pass. Subclasses set up `self.url` and `new_broker()`."""

    url = "memory://"

    def new_broker(self):
        return MemoryBroker()

    def system(self, sysname):
        """The sysname to use: tests sharing one real broker must not see each other."""
        return sysname

    async def container(self, sysname="test", **kw):
        if not hasattr(self, "_broker"):
            self._broker = self.new_broker()
        return await make_container(
            self, url=self.url, memory_broker=self._broker, sysname=self.system(sysname), **kw
        )

    async def pair(self):
        c = await self.container()
        echo = await c.spawn(Echo)
        caller = await c.spawn(Caller)
        return c, echo, caller

    @defer.inlineCallbacks
    def _d(self, coro):
        return (yield defer.Deferred.fromCoroutine(coro))

    # -- rpc -------------------------------------------------------------------------------

    async def test_rpc_to_service_and_pid(self):
        """An rpc to a service name or to a pid returns the op's return value."""
        c, echo, caller = await self.pair()
        self.assertEqual(await caller.rpc("echo", "echo", {"a": [1, 2, b"x"]}), {"a": [1, 2, b"x"]})
        self.assertEqual(await caller.rpc(echo.pid, "whoami"), echo.pid)

    async def test_remote_application_error(self):
        """An ApplicationError raised by an op reaches the caller as RemoteError with its code."""
        c, echo, caller = await self.pair()
        e = await self.assertFailure(caller.rpc("echo", "fail"), RemoteError)
        self.assertEqual((e.code, e.type, e.message), (409, "ApplicationError", "you asked for it"))

    async def test_unexpected_exception_is_500_and_process_survives(self):
        """An unexpected exception gives the caller a 500 naming its type; the traceback is
        logged by the receiver, which keeps serving."""
        c, echo, caller = await self.pair()
        e = await self.assertFailure(caller.rpc("echo", "crash"), RemoteError)
        self.assertEqual((e.code, e.type, e.message), (500, "ZeroDivisionError", "boom"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(await caller.rpc("echo", "echo", 1), 1)

    async def test_unknown_op_is_404(self):
        c, echo, caller = await self.pair()
        e = await self.assertFailure(caller.rpc("echo", "nope"), RemoteError)
        self.assertEqual(e.code, 404)
        self.assertIn("nope", e.message)

    async def test_unknown_receiver_fails_at_once(self):
        """An rpc or send to a name nobody listens on fails with NoSuchReceiver, not a timeout."""
        c, echo, caller = await self.pair()
        started = reactor.seconds()
        await self.assertFailure(caller.rpc("nobody", "echo", 1, timeout=30), NoSuchReceiver)
        await self.assertFailure(defer.ensureDeferred(caller.send("nobody", "echo", 1)), NoSuchReceiver)
        self.assertLess(reactor.seconds() - started, 1.0)

    async def test_rpc_timeout_with_clock(self):
        """A call nobody answers fails with ConversationTimeout after its timeout (task.Clock);
        the answer arriving later is dropped, not delivered."""
        clock = task.Clock()
        c = await self.container(clock=clock)
        echo = await c.spawn(Echo)
        caller = await c.spawn(Caller)
        holding = echo.holding = defer.Deferred()
        d = caller.rpc("echo", "hold", None, timeout=5)
        await holding
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        e = self.failureResultOf(d, ConversationTimeout).value
        self.assertIn("5 s", str(e))
        echo.held.callback("late")
        self.assertEqual(await caller.rpc("echo", "echo", "after", timeout=5), "after")
        self.assertEqual(len(caller.conversations), 0)

    async def test_answer_lost_with_the_connection_is_a_warning(self):
        """An answer that cannot be sent because the server's connection is gone (a broker
        lost, a container closing) is a warning naming the caller, not a logged error."""
        c = await self.container()
        echo = await c.spawn(Echo)
        other = await self.container()
        caller = await other.spawn(Caller)
        echo.holding = defer.Deferred()
        caller.rpc("echo", "hold", None, timeout=30).addErrback(lambda _: None)
        await echo.holding
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await c.transport.close()
        echo.held.callback("too late")
        await until(lambda: any("could not answer" in e.get("log_format", "") for e in events))
        warned = [e for e in events if "could not answer" in e.get("log_format", "")]
        self.assertEqual(warned[0]["log_level"], LogLevel.warn)
        self.assertIn(caller.pid, formatEvent(warned[0]))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_default_timeout_from_config(self):
        """Without an explicit timeout, rpc uses ion.core.process rpc_timeout (looked up now)."""
        clock = task.Clock()
        c = await self.container(clock=clock)
        echo = await c.spawn(Echo)
        caller = await c.spawn(Caller)
        c.config.define("ion.core.process", "rpc_timeout", 2)
        echo.holding = defer.Deferred()
        d = caller.rpc("echo", "hold")
        await echo.holding
        clock.advance(2.01)
        self.failureResultOf(d, ConversationTimeout)
        echo.held.callback(None)

    async def test_many_calls_in_flight(self):
        """Many calls from one process may be in flight at once; each gets its own answer."""
        c, echo, caller = await self.pair()
        results = await defer.gatherResults([caller.rpc("echo", "echo", i) for i in range(200)])
        self.assertEqual(results, list(range(200)))

    async def test_calls_while_serving(self):
        """A process can call others while serving a request, and gets their replies."""
        c, echo, caller = await self.pair()
        other = await c.spawn(Echo, args={"service": "other"})
        got = await caller.rpc(echo.pid, "relay", {"dest": "other", "op": "whoami"})
        self.assertEqual(got, other.pid)

    async def test_send_one_way_carries_user_id(self):
        """send delivers a one-way message; the receiver sees the broker-validated user id."""
        c, echo, caller = await self.pair()
        noted = caller.noted = defer.Deferred()
        await echo.send(caller.pid, "note", "hi")
        self.assertEqual(await noted, "hi")
        self.assertEqual(caller.notes, [("hi", c.transport.user)])

    async def test_service_round_robin(self):
        """Instances of a service share its queue: calls are spread over all of them."""
        c = await self.container()
        instances = [await c.spawn(Echo) for _ in range(3)]
        caller = await c.spawn(Caller)
        pids = [await caller.rpc("echo", "whoami") for _ in range(30)]
        self.assertEqual({p: pids.count(p) for p in pids}, {i.pid: 10 for i in instances})

    async def test_containers_isolated_by_sysname(self):
        """Two containers on one broker with different sysnames don't see each other's
        services; with the same sysname they do."""
        a = await self.container(sysname="sysa")
        b = await self.container(sysname="sysb")
        b2 = await self.container(sysname="sysb")
        await a.spawn(Echo)
        caller_b = await b.spawn(Caller)
        await self.assertFailure(caller_b.rpc("echo", "echo", 1), NoSuchReceiver)
        echo_b2 = await b2.spawn(Echo)
        self.assertEqual(await caller_b.rpc("echo", "whoami"), echo_b2.pid)

    # -- lifecycle -------------------------------------------------------------------------

    async def test_spawn_runs_hooks_and_terminate_releases(self):
        """spawn initializes and activates; terminate runs on_terminate, after which the pid no
        longer receives."""
        c, echo, caller = await self.pair()
        proc = await c.spawn(Hooks, args={})
        self.assertEqual(proc.state, "ACTIVE")
        self.assertEqual(proc.args["seen"], ["init", "activate"])
        await proc.deactivate()
        self.assertEqual(proc.state, "READY")
        e = await self.assertFailure(caller.rpc(proc.pid, "x"), RemoteError)
        self.assertEqual(e.code, 503)
        await c.terminate(proc.pid)
        self.assertEqual(proc.state, "TERMINATED")
        self.assertEqual(proc.args["seen"], ["init", "activate", "deactivate", "terminate"])
        await self.assertFailure(caller.rpc(proc.pid, "x"), NoSuchReceiver)
        self.assertNotIn(proc.pid, [row[0] for row in c.ps()])
        await self.assertFailure(defer.ensureDeferred(proc.terminate()), IllegalTransition)

    async def test_no_ops_while_stopping(self):
        """While a process stops (on_terminate closing what its ops need), a call gets 503
        rather than an op that runs against closed resources."""
        c, echo, caller = await self.pair()
        closing = defer.Deferred()
        proc = await c.spawn(Hooks, args={})
        proc.on_terminate = lambda: closing
        stopping = defer.ensureDeferred(proc.terminate())
        e = await self.assertFailure(caller.rpc(proc.pid, "ping"), RemoteError)
        self.assertEqual(e.code, 503)
        self.assertIn("stopping", str(e))
        closing.callback(None)
        await stopping

    async def test_failing_hooks(self):
        """A hook that raises moves the process to FAILED; spawn reports the error and the
        process is not left registered or listening."""
        c, echo, caller = await self.pair()
        for hook in ("init", "activate"):
            args = {"fail": hook}
            d = defer.ensureDeferred(c.spawn(Hooks, args=args))
            await self.assertFailure(d, RuntimeError)
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            self.assertEqual([r for r in c.ps() if r[2] == "Hooks"], [])
        proc = await c.spawn(Hooks, args={"fail": "terminate"})
        await proc.terminate()
        self.assertEqual(proc.state, "FAILED")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await self.assertFailure(caller.rpc(proc.pid, "x"), NoSuchReceiver)

    async def test_bad_arguments_fail_without_traceback(self):
        """A hook refusing its arguments (a ValueError, as every argument check raises) fails
        the spawn with that error and logs its message in one line, not as a traceback."""
        c, echo, caller = await self.pair()
        logged = []
        observer = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        d = defer.ensureDeferred(c.spawn(Hooks, args={"bad": "init"}))
        error = await self.assertFailure(d, ValueError)
        self.assertEqual(str(error), "hooks: init got a bad argument")
        self.assertEqual(self.flushLoggedErrors(ValueError), [])
        events = [e for e in logged if "lifecycle hook" in (e.get("log_format") or "")]
        self.assertEqual(len(events), 1, events)
        self.assertNotIn("log_failure", events[0])
        self.assertIn("on_init failed: hooks: init got a bad argument", formatEvent(events[0]))

    async def test_terminate_waits_for_in_flight_ops(self):
        """Terminating an ACTIVE process lets the ops it is serving finish and reply first."""
        c, echo, caller = await self.pair()
        echo.holding = defer.Deferred()
        call = caller.rpc(echo.pid, "hold", None, timeout=10)
        await echo.holding
        stopping = defer.ensureDeferred(echo.terminate())
        self.assertNoResult(stopping)
        echo.held.callback("finished")
        self.assertEqual(await call, "finished")
        await stopping
        self.assertEqual(echo.state, "TERMINATED")

    async def test_terminated_caller_fails_open_calls(self):
        """When the caller terminates, its open calls fail instead of hanging."""
        c, echo, caller = await self.pair()
        echo.holding = defer.Deferred()
        call = caller.rpc(echo.pid, "hold", None, timeout=10)
        await echo.holding
        await caller.terminate()
        await self.assertFailure(call, ProcessTerminated)
        echo.held.callback(None)

    async def test_children_stop_in_reverse(self):
        """A parent's children terminate before it, last spawned first."""
        c = await self.container()
        parent = await c.spawn(Hooks, args={})
        order = []
        kids = [await parent.spawn_child(Hooks, name=f"k{i}", args={}) for i in range(3)]
        for k in kids:
            k.add_exit_observer(lambda p: order.append(p.name))
        await parent.terminate()
        self.assertEqual(order, ["k2", "k1", "k0"])
        self.assertEqual(c.ps(), [r for r in c.ps() if r[1] not in ("k0", "k1", "k2")])

    async def test_call_op_directly(self):
        """call_op runs an op without messaging, for unit tests of services."""
        c, echo, caller = await self.pair()
        self.assertEqual(await call_op(echo, "echo", 5), 5)
        await self.assertFailure(defer.ensureDeferred(call_op(echo, "fail")), ApplicationError)

    async def test_bind_queue_to_another_exchange(self):
        """A subscribed queue bound to a second exchange delivers what is published there to
        the same handler, and only what matches the binding."""
        c = await self.container()
        proc = await c.spawn(Caller)
        first, second = self.system("xfirst"), self.system("xsecond")
        queue = self.system("q_bind")
        got = []
        arrived = defer.Deferred()

        def handler(delivery):
            got.append((delivery.routing_key, delivery.body))
            delivery.ack()
            if len(got) == 2:
                arrived.callback(None)

        await proc.subscribe(first, ["a.#"], handler, queue=queue, durable=False, auto_delete=True)
        await proc.bind(queue, second, ["b.#"], durable=False)
        await proc.publish(second, "c.1", b"not bound", mandatory=False)
        await proc.publish(second, "b.1", b"from second")
        await proc.publish(first, "a.1", b"from first")
        await arrived
        self.assertEqual(sorted(got), [("a.1", b"from first"), ("b.1", b"from second")])

    async def test_bad_spawn_specs(self):
        """Spawning something that is not a process says what is wrong."""
        c = await self.container()
        for spec, text in [
            ("no.such.module", "no.such"),
            ("ion.apps.hello.service:Nope", "has no 'Nope'"),
            ("ion.core.process", "process classes"),
            (42, "cannot spawn"),
        ]:
            e = await self.assertFailure(defer.ensureDeferred(c.spawn(spec)), SpawnError)
            self.assertIn(text, str(e))


class MemoryProcessTests(ProcessScenarios, unittest.TestCase):
    """The scenarios on the memory:// transport."""


class RawSubscriptionTests(unittest.TestCase):
    """Processes can consume and publish raw messages on other exchanges (the pump does)."""

    async def test_subscribe_publish_and_stop(self):
        c = await make_container(self)
        proc = await c.spawn(Caller)
        got = []
        arrived = defer.Deferred()

        def handler(delivery):
            got.append((delivery.routing_key, delivery.body, delivery.properties.content_type))
            delivery.ack()
            if len(got) == 2:
                arrived.callback(None)

        await proc.subscribe("xpublic", ["v03.a.#"], handler, queue="q_test.sub")
        for key in ("v03.a.b", "v03.x", "v03.a"):
            await proc.publish("xpublic", key, key.encode())
        await arrived
        self.assertEqual([g[0] for g in got], ["v03.a.b", "v03.a"])
        self.assertEqual(got[0][2], "application/json")
        await proc.terminate()
        # the durable queue stays (messages wait for the subscriber to come back)
        await c.transport.publish("xpublic", "v03.a.c", b"later")
        self.assertEqual(c.transport.broker.queue_depth("q_test.sub"), 1)

    async def test_unsubscribe(self):
        """Ending one subscription early stops its deliveries and hands back the messages it
        held; the process's other subscriptions go on, and it ends as before."""
        c = await make_container(self)
        proc = await c.spawn(Caller)
        held, others = [], []
        ended = await proc.subscribe("xpublic", ["v03.#"], held.append, queue="q_test.unsub")
        await proc.subscribe("xpublic", ["v03.#"], lambda d: others.append(d.ack()), durable=True)
        await proc.publish("xpublic", "v03.a", b"one")
        await until(lambda: held and others)
        await proc.unsubscribe(ended)
        await proc.unsubscribe(ended)  # ended already: nothing happens
        depth = c.transport.broker.queue_depth
        self.assertEqual(depth("q_test.unsub"), 1)  # the one it held, back
        await proc.publish("xpublic", "v03.b", b"two")
        await until(lambda: len(others) == 2)
        self.assertEqual((len(held), depth("q_test.unsub")), (1, 2))
        await proc.terminate()


class AmqpProcessTests(ProcessScenarios, unittest.TestCase):
    """The same scenarios on the private RabbitMQ node."""

    def setUp(self):
        self.url = get_broker().url

    def new_broker(self):
        return None

    def system(self, sysname):
        return f"{sysname}-{id(self):x}"
