"""Conversations: the protocol tables, and rpc/request/inform between real processes.

Scenario tests run on every transport through `ConversationScenarios` (memory here; the AMQP
module adds the private RabbitMQ).
"""

import os
import re

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from ion.core.conversation import protocols as P
from ion.core.conversation.conversation import LOG_LIMIT, Conversation, Deadlines, _ids
from ion.core.cc.testing import make_container
from tests.broker import get_broker
from tests.waiting import until
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import (
    ApplicationError,
    ConversationTimeout,
    Process,
    Refused,
    RemoteError,
    ServiceProcess,
    explicit_agree,
)

EVENTS = sorted(P.PERFORMATIVES | {P.TIMEOUT, P.CANCEL})


class TableTests(unittest.SynchronousTestCase):
    def test_every_state_and_event(self):
        """Every (state, event) of every table is either a documented transition or a
        ProtocolViolation naming the state and event; final states accept nothing."""
        expected = {
            ("rpc", P.INITIATOR): {("start", "request"): "requested",
                                   ("requested", "inform_result"): "done",
                                   ("requested", "failure"): "failed",
                                   ("requested", "timeout"): "timed_out",
                                   ("requested", "cancel"): "cancelled"},
            ("rpc", P.PARTICIPANT): {("start", "request"): "received",
                                     ("received", "inform_result"): "done",
                                     ("received", "failure"): "failed",
                                     ("received", "timeout"): "timed_out"},
            ("request", P.INITIATOR): {("start", "request"): "requested",
                                       ("requested", "agree"): "agreed",
                                       ("requested", "refuse"): "refused",
                                       ("requested", "failure"): "failed",
                                       ("requested", "timeout"): "timed_out",
                                       ("requested", "cancel"): "cancelled",
                                       ("agreed", "inform_result"): "done",
                                       ("agreed", "failure"): "failed",
                                       ("agreed", "timeout"): "timed_out",
                                       ("agreed", "cancel"): "cancelled"},
            ("request", P.PARTICIPANT): {("start", "request"): "received",
                                         ("received", "agree"): "agreed",
                                         ("received", "refuse"): "refused",
                                         ("received", "failure"): "failed",
                                         ("received", "timeout"): "timed_out",
                                         ("agreed", "inform_result"): "done",
                                         ("agreed", "failure"): "failed",
                                         ("agreed", "timeout"): "timed_out"},
            ("inform", P.INITIATOR): {("start", "inform"): "done"},
            ("inform", P.PARTICIPANT): {("start", "inform"): "done"},
        }
        self.assertEqual(set(expected), set(P.TABLES))
        for (protocol, role), legal in expected.items():
            states = {"start"} | {s for s, _ in legal} | set(legal.values())
            for state in states:
                for event in EVENTS:
                    if (state, event) in legal:
                        self.assertEqual(P.next_state(protocol, role, state, event),
                                         legal[(state, event)])
                    else:
                        e = self.assertRaises(P.ProtocolViolation, P.next_state,
                                              protocol, role, state, event)
                        self.assertIn(repr(state), str(e))
            # every non-final state can time out (except the one-message inform's start)
            for state in states - P.FINAL - {"start"}:
                self.assertIn((state, "timeout"), legal, (protocol, role, state))


class _Conv:
    deadline = None


class DeadlinesTests(unittest.SynchronousTestCase):
    """Many conversations' deadlines on one clock timer."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(0.1 + 0.2)  # a time that is not a round float
        self.expired = []
        self.deadlines = Deadlines(self.clock, lambda conv, timeout: self.expired.append(
            (conv, timeout, self.clock.seconds())))

    def test_each_fires_at_its_own_time(self):
        """A deadline fires once its timeout has passed, never earlier, whatever else is
        pending, in order, with the timeout it was set with; one timer serves them all."""
        convs = [_Conv() for _ in range(5)]
        timeouts = [3, 1, 1.01, 2.5, 1.02]
        for conv, timeout in zip(convs, timeouts):
            self.deadlines.set(conv, timeout)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        start = self.clock.seconds()
        for step in [0.5, 0.5, 0.005, 0.005, 0.005, 0.005, 1.48, 0.5]:
            self.clock.advance(step)
            now = self.clock.seconds() - start
            self.assertEqual(sorted(t for _, t, _ in self.expired),
                             sorted(t for t in timeouts if t <= now + 1e-9))
        self.assertEqual([t for _, t, _ in self.expired], [1, 1.01, 1.02, 2.5, 3])
        for conv, timeout, when in self.expired:
            self.assertGreaterEqual(when - start, timeout - 1e-9)
            self.assertLess(when - start, timeout + 0.5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cleared_never_fires(self):
        """A cleared deadline (the conversation finished) never fires; others still do, and
        once none is left the clock has nothing pending."""
        first, second = _Conv(), _Conv()
        self.deadlines.set(first, 1)
        self.deadlines.set(second, 2)
        self.deadlines.clear(first)
        self.clock.advance(1)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual([c for c, _, _ in self.expired], [second])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        third = _Conv()
        self.deadlines.set(third, 5)
        self.deadlines.clear(third)
        self.clock.advance(5)
        self.assertEqual(len(self.expired), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_earlier_deadline_rearms(self):
        """A deadline set after a later one still fires on time."""
        late, soon = _Conv(), _Conv()
        self.deadlines.set(late, 10)
        self.deadlines.set(soon, 0.5)
        self.clock.advance(0.5)
        self.assertEqual([c for c, _, _ in self.expired], [soon])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stop(self):
        """Stopping forgets every deadline and leaves no timer behind."""
        for timeout in (1, 2):
            self.deadlines.set(_Conv(), timeout)
        self.deadlines.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3)
        self.assertEqual(self.expired, [])


class IdTests(unittest.SynchronousTestCase):
    def test_ids_are_random_hex(self):
        """Conversation ids are 32 hex digits (16 random bytes), never repeated, also across
        the draws from the kernel."""
        ids = [_ids.next() for _ in range(1000)]
        self.assertEqual(len(set(ids)), len(ids))
        self.assertTrue(all(re.fullmatch("[0-9a-f]{32}", i) for i in ids))

    def test_forked_child_draws_its_own(self):
        """A forked child never hands out the ids its parent will: the ids drawn ahead of use
        stay with the parent."""
        _ids.next()  # ids drawn ahead now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.write(write, "".join(_ids.next() for _ in range(3)).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            child = f.read().decode()
        os.waitpid(pid, 0)
        parent = "".join(_ids.next() for _ in range(3))
        self.assertEqual(len(child), 96)
        self.assertNotEqual(child, parent)


class LogTests(unittest.SynchronousTestCase):
    def test_log_keeps_the_last_messages(self):
        """A conversation keeps the headers (less ts) of its last LOG_LIMIT messages only."""
        owner = type("Owner", (), {"clock": task.Clock()})()
        conv = Conversation(owner, "c1", "rpc", P.INITIATOR, "peer", "op")
        for seq in range(1, LOG_LIMIT + 5):
            conv._record("out", {"conv-seq": seq, "ts": 1})
        self.assertEqual([h for _, h in conv.log],
                         [{"conv-seq": seq} for seq in range(5, LOG_LIMIT + 5)])


class Worker(ServiceProcess):
    service = "worker"

    def on_init(self):
        self.gate = None
        self.seen_users = []

    async def op_work(self, content, headers):
        if self.gate is not None:
            await self.gate
        if content == "fail":
            raise ApplicationError("cannot do that", code=422)
        return {"done": content}

    @explicit_agree
    async def op_maybe(self, content, headers):
        if content == "no":
            await self.conversation.refuse("not today")
            return None
        await self.conversation.agree()
        if self.gate is not None:
            await self.gate
        if content == "fail-after-agree":
            raise ApplicationError("broke after agreeing", code=409)
        return content

    async def op_whoami(self, content, headers):
        self.seen_users.append(headers.get("user-id"))
        if content:
            return await self.rpc(content, "whoami")
        return headers.get("user-id")


class Client(Process):
    pass


class LogCapture:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self, contains):
        return [formatEvent(e) for e in self.events if contains in formatEvent(e)]


class ConversationScenarios:
    url = "memory://"

    def new_broker(self):
        return MemoryBroker()

    async def setup(self, clock=None):
        self._broker = getattr(self, "_broker", None) or self.new_broker()
        c = await make_container(self, url=self.url, memory_broker=self._broker, clock=clock,
                                 sysname=f"conv-{id(self):x}")
        worker = await c.spawn(Worker)
        client = await c.spawn(Client)
        return c, worker, client

    async def test_request_agree_then_result(self):
        """A request is agreed first and answered later; the initiator can wait for each."""
        c, worker, client = await self.setup()
        worker.gate = defer.Deferred()
        conv = client.request("worker", "work", "job1")
        self.assertEqual(await conv.when_agreed(), True)
        self.assertNoResult(conv.when_done())
        self.assertEqual(conv.state, "agreed")
        worker.gate.callback(None)
        self.assertEqual(await conv.when_done(), {"done": "job1"})
        self.assertEqual(conv.state, "done")
        self.assertEqual([h["conv-seq"] for _, h in conv.log], [1, 2, 3])
        self.assertEqual([h["performative"] for _, h in conv.log],
                         ["request", "agree", "inform_result"])

    async def test_refuse_is_final(self):
        """An explicit refuse reaches the initiator as Refused, for agreement and result."""
        c, worker, client = await self.setup()
        conv = client.request("worker", "maybe", "no")
        e = await self.assertFailure(conv.when_agreed(), Refused)
        self.assertEqual((e.code, e.message), (403, "not today"))
        await self.assertFailure(conv.when_done(), Refused)
        self.assertEqual(conv.state, "refused")

    async def test_failure_after_agree(self):
        c, worker, client = await self.setup()
        conv = client.request("worker", "maybe", "fail-after-agree")
        self.assertTrue(await conv.when_agreed())
        e = await self.assertFailure(conv.when_done(), RemoteError)
        self.assertEqual((e.code, e.type, e.message), (409, "ApplicationError", "broke after agreeing"))
        self.assertEqual(conv.state, "failed")

    async def test_error_mapping(self):
        """Errors cross as {code, type, message}: 4xx ApplicationError, 404 unknown op."""
        c, worker, client = await self.setup()
        e = await self.assertFailure(client.rpc("worker", "work", "fail"), RemoteError)
        self.assertEqual((e.code, e.type, e.message), (422, "ApplicationError", "cannot do that"))
        e = await self.assertFailure(client.rpc("worker", "nope"), RemoteError)
        self.assertEqual(e.code, 404)

    async def test_timeout_then_late_reply_dropped(self):
        """A timed-out call fails with ConversationTimeout; the reply arriving later is dropped
        and logged at info, never delivered; the tombstone is collected after its TTL."""
        clock = task.Clock()
        c, worker, client = await self.setup(clock)
        logs = LogCapture(self)
        worker.gate = defer.Deferred()
        d = client.rpc("worker", "work", "slow", timeout=3)
        await until(lambda: len(worker.conversations) == 1)
        clock.advance(3)
        self.failureResultOf(d, ConversationTimeout)
        worker.gate.callback(None)
        await until(lambda: logs.texts("dropped inform_result for finished conversation"))
        self.assertEqual(len(client.conversations.tombstones), 1)
        clock.advance(c.config.get("ion.core.conversation", "tombstone_ttl"))
        client.conversations.collect()
        self.assertEqual(len(client.conversations.tombstones), 0)
        self.assertEqual(len(client.conversations), 0)

    async def test_timeouts_of_calls_in_flight(self):
        """Of several calls in flight, each times out at its own time, not earlier, and a
        call answered in time does not time out."""
        clock = task.Clock()
        c, worker, client = await self.setup(clock)
        worker.gate = defer.Deferred()
        calls = [client.rpc("worker", "work", n, timeout=t) for n, t in enumerate([2, 1, 3])]
        await until(lambda: len(worker.conversations) == 3)
        clock.advance(0.99)
        for d in calls:
            self.assertNoResult(d)
        clock.advance(0.01)
        self.failureResultOf(calls[1], ConversationTimeout)
        self.assertNoResult(calls[0])
        worker.gate.callback(None)
        self.assertEqual(await calls[0], {"done": 0})
        self.assertEqual(await calls[2], {"done": 2})
        clock.advance(5)

    async def test_participant_deadline(self):
        """A participant whose caller's deadline has passed does not send its answer."""
        clock = task.Clock()
        c, worker, client = await self.setup(clock)
        logs = LogCapture(self)
        worker.gate = defer.Deferred()
        d = client.rpc("worker", "work", "slow", timeout=2)
        await until(lambda: len(worker.conversations) == 1)
        clock.advance(2 + 1.5)
        self.failureResultOf(d, ConversationTimeout)
        worker.gate.callback(None)
        await until(lambda: logs.texts("outcome not sent"))
        self.assertEqual(logs.texts("dropped inform_result"), [])

    async def test_duplicate_reply_dropped(self):
        """A second reply to a finished conversation is dropped, not delivered twice."""
        c, worker, client = await self.setup()
        logs = LogCapture(self)
        conv = client._open("rpc", "worker", "work", 1, 5)
        self.assertEqual(await conv.when_done(), {"done": 1})
        dup = {"sender": worker.pid, "conv-id": conv.conv_id, "conv-seq": 2, "protocol": "rpc",
               "performative": "inform_result", "op": "work"}
        await c.messenger.send(client.pid, dup, "again")
        await until(lambda: logs.texts("for finished conversation"))
        self.assertEqual(await conv.when_done(), {"done": 1})

    async def test_cancel_ends_conversation(self):
        """Cancelling the rpc Deferred ends the conversation; the late reply is tombstoned."""
        c, worker, client = await self.setup()
        logs = LogCapture(self)
        worker.gate = defer.Deferred()
        d = client.rpc("worker", "work", "x", timeout=10)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(client.conversations), 0)
        worker.gate.callback(None)
        await until(lambda: logs.texts("for finished conversation"))

    async def test_unexpected_performative_fails_conversation(self):
        """An agree inside an rpc (not in its table) fails that conversation with a logged
        reason; the process keeps working."""
        c, worker, client = await self.setup()
        logs = LogCapture(self)
        worker.gate = defer.Deferred()
        conv = client._open("rpc", "worker", "work", "x", 10)
        bogus = {"sender": worker.pid, "conv-id": conv.conv_id, "conv-seq": 2, "protocol": "rpc",
                 "performative": "agree", "op": "work"}
        await c.messenger.send(client.pid, bogus, None)
        e = await self.assertFailure(conv.when_done(), RemoteError)
        self.assertEqual(e.type, "ProtocolViolation")
        self.assertTrue(logs.texts("is not allowed in state 'requested'"))
        worker.gate.callback(None)
        self.assertEqual(await client.rpc("worker", "work", "y"), {"done": "y"})

    async def test_malformed_headers_dropped(self):
        """A message whose conv-id, performative or protocol is not a string (a list, a map:
        anyone on the broker may send one) is dropped with one warning naming what it got;
        the process keeps serving."""
        c, worker, client = await self.setup()
        logs = LogCapture(self)
        base = {"sender": "mallory", "conv-id": "c1", "conv-seq": 1, "protocol": "rpc",
                "performative": "request", "op": "work", "reply-to": "mallory"}
        for name, value in (("conv-id", ["x"]), ("performative", {"a": 1}),
                            ("protocol", ["rpc"]), ("conv-id", None)):
            await c.messenger.send(worker.pid, dict(base, **{name: value}), "x")
        await until(lambda: len(logs.texts("must be strings")) == 4)
        self.assertIn("got list, str, str", logs.texts("must be strings")[0])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(await client.rpc("worker", "work", "y"), {"done": "y"})

    async def test_inform_is_a_conversation(self):
        """A one-way inform is logged as a finished conversation on both sides."""
        c, worker, client = await self.setup()
        await client.send("worker", "work", "fire")
        self.assertEqual(client.conversations.recent[-1].protocol, "inform")
        self.assertEqual(client.conversations.recent[-1].state, "done")

    async def test_inform_tombstone_on_receiving_side_only(self):
        """A received inform leaves a tombstone (a duplicate is not served twice); the sender
        keeps none, as nothing answers an inform."""
        c, worker, client = await self.setup()
        await client.send("worker", "work", "fire")
        conv_id = client.conversations.recent[-1].conv_id
        await until(lambda: (conv_id, P.PARTICIPANT) in worker.conversations.tombstones)
        self.assertEqual(dict(client.conversations.tombstones), {})

    async def test_identity_propagates_two_hops(self):
        """The identity a request acts for flows into the calls made while handling it."""
        c, worker, client = await self.setup()
        second = await c.spawn(Worker, args={"service": "second"})
        conv = client._open("rpc", "worker", "whoami", "second", 5)
        # The first hop acts for the broker-validated user of its caller.
        self.assertEqual(await conv.when_done(), c.transport.user)
        # A claimed identity from a peer of the same broker user is carried on...
        claims = {"sender": client.pid, "reply-to": client.pid, "conv-id": "c" * 32,
                  "conv-seq": 1, "protocol": "rpc", "performative": "request",
                  "op": "whoami", "user-id": "alice"}
        client.conversations.open[("c" * 32, P.INITIATOR)] = conv2 = type(conv)(
            client.conversations, "c" * 32, "rpc", P.INITIATOR, "worker", "whoami")
        conv2.state = "requested"
        await c.messenger.send("worker", claims, "second")
        self.assertEqual(await conv2.when_done(), "alice")
        self.assertEqual(second.seen_users[-1], "alice")



class MemoryConversationTests(ConversationScenarios, unittest.TestCase):
    """The scenarios on memory://."""


class AmqpConversationTests(ConversationScenarios, unittest.TestCase):
    """The same scenarios on the private RabbitMQ node."""

    def setUp(self):
        self.url = get_broker().url

    def new_broker(self):
        return None
