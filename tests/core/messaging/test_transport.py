"""Transport semantics every ITransport keeps, run on the memory:// transport.

`TransportSemantics` holds the test bodies; a transport joins by subclassing it together with
`unittest.TestCase` and providing `make_transports`. Names are unique per test so the same
bodies can run against a shared broker.
"""

import os
import uuid

import attrs
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from ion.core.messaging.memory import MemoryBroker, MemoryTransport, topic_matches
from ion.core.process.process import given_up
from ion.core.messaging.transport import (
    HEADER_DEPTH,
    ConnectionLost,
    IConsumer,
    IDelivery,
    ITransport,
    NotFound,
    PreconditionFailed,
    Properties,
    QueueInUse,
    TransportError,
    Unroutable,
)

WAIT = 5

# (binding key, routing key, matches) as RabbitMQ decides them.
TOPIC_CASES = [
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("a.*", "a", False),
    ("a.*", "b.c", False),
    ("*.b", "a.b", True),
    ("*.b", ".b", True),
    ("*.b", "b", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "ab", False),
    ("a.#", "b.a", False),
    ("#", "a", True),
    ("#", "a.b.c.d", True),
    ("#", "", True),
    ("#.c", "c", True),
    ("#.c", "a.b.c", True),
    ("#.c", "a.c.d", False),
    ("a.#.c", "a.c", True),
    ("a.#.c", "a.x.c", True),
    ("a.#.c", "a.x.y.c", True),
    ("a.#.c", "a.x.y", False),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("#.#", "a.b", True),
    ("a.b", "a.b", True),
    ("a.b", "a.B", False),
    ("a.b", "a.b.c", False),
    ("a*.b", "ab.b", False),
    ("a*.b", "a*.b", True),
]


class Inbox:
    """A consumer callback that collects deliveries (acking them unless told not to);
    `wait(n)` fires with the first n deliveries once they have arrived, or fails after 5 s."""

    def __init__(self, ack=True):
        self.ack = ack
        self.deliveries = []
        self._waiters = []

    def __call__(self, delivery):
        self.deliveries.append(delivery)
        if self.ack:
            delivery.ack()
        self._wake()

    @property
    def bodies(self):
        return [d.body for d in self.deliveries]

    def wait(self, count):
        waiter = defer.Deferred()
        waiter.addTimeout(WAIT, reactor)
        self._waiters.append((count, waiter))
        self._wake()
        return waiter

    def _wake(self):
        for count, waiter in list(self._waiters):
            if len(self.deliveries) >= count:
                self._waiters.remove((count, waiter))
                waiter.callback(self.deliveries[:count])


class TransportSemantics:
    """Test bodies for any ITransport. Subclasses implement `make_transports`."""

    async def make_transports(self, n):
        """Return n connected transports on one broker, each with its own user, closed at
        cleanup."""
        raise NotImplementedError

    async def settle(self):
        """Let anything in flight arrive, before asserting that something did not happen."""
        for _ in range(3):
            await task.deferLater(reactor, 0, lambda: None)

    def unique(self, label):
        return f"test.{uuid.uuid4().hex[:10]}.{label}"

    async def exchange(self, transport, type="topic"):
        name = self.unique(type)
        await transport.declare_exchange(name, type)
        return name

    async def queue(self, transport, label="q", **flags):
        name = await transport.declare_queue(self.unique(label), **flags)
        self.addCleanup(self._delete_quietly, transport, name)
        return name

    async def _delete_quietly(self, transport, name):
        try:
            await transport.delete_queue(name)
        except TransportError:
            pass

    async def bound_queue(self, transport, exchange, *keys):
        name = await self.queue(transport)
        for key in keys:
            await transport.bind(name, exchange, key)
        return name

    async def assertQueueGone(self, transport, name):
        await self.assertFailure(transport.consume(name, Inbox()), NotFound)

    # Interfaces.

    async def test_provides_interfaces(self):
        """Transports, consumers and deliveries provide the interfaces layers above rely on."""
        (t,) = await self.make_transports(1)
        verifyObject(ITransport, t)
        q = await self.queue(t)
        inbox = Inbox()
        consumer = await t.consume(q, inbox)
        verifyObject(IConsumer, consumer)
        self.assertEqual(consumer.queue, q)
        await t.publish("", q, b"x")
        (delivery,) = await inbox.wait(1)
        verifyObject(IDelivery, delivery)

    # Routing.

    async def test_topic_patterns(self):
        """Topic bindings match routing keys word by word: `*` one word, `#` zero or more."""
        (t,) = await self.make_transports(1)
        for pattern, key, matches in TOPIC_CASES:
            ex = await self.exchange(t)
            await self.bound_queue(t, ex, pattern)
            d = t.publish(ex, key, b"x")
            if matches:
                await d
            else:
                error = await self.assertFailure(d, Unroutable)
                self.assertEqual((error.exchange, error.routing_key), (ex, key))

    async def test_topic_delivery(self):
        """A matching message arrives with its body, exchange and routing key."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        q = await self.bound_queue(t, ex, "sensor.*.temp")
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish(ex, "sensor.7.temp", b"21.5")
        (delivery,) = await inbox.wait(1)
        self.assertEqual(
            (delivery.body, delivery.exchange, delivery.routing_key, delivery.redelivered),
            (b"21.5", ex, "sensor.7.temp", False),
        )

    async def test_overlapping_bindings_deliver_once(self):
        """A queue bound with several matching patterns receives the message once."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        q = await self.bound_queue(t, ex, "a.b", "a.*", "#", "a.#")
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish(ex, "a.b", b"1")
        await t.publish(ex, "a.c", b"2")
        await inbox.wait(2)
        await self.settle()
        self.assertEqual(inbox.bodies, [b"1", b"2"])

    async def test_every_matching_queue_gets_a_copy(self):
        """Each matching queue receives its own copy; non-matching queues nothing."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        inboxes = {}
        for pattern in ["a.*", "*.b", "c.*"]:
            q = await self.bound_queue(t, ex, pattern)
            inboxes[pattern] = Inbox()
            await t.consume(q, inboxes[pattern])
        await t.publish(ex, "a.b", b"m")
        await inboxes["a.*"].wait(1)
        await inboxes["*.b"].wait(1)
        await self.settle()
        self.assertEqual(inboxes["c.*"].deliveries, [])

    async def test_binding_added_after_publish(self):
        """A new binding applies to the next publish, even for a key already routed."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        await self.bound_queue(t, ex, "x.*")
        await self.assertFailure(t.publish(ex, "y.z", b"1"), Unroutable)
        q = await self.bound_queue(t, ex, "y.*")
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish(ex, "y.z", b"2")
        await inbox.wait(1)
        self.assertEqual(inbox.bodies, [b"2"])

    async def test_unbind(self):
        """After unbind the queue no longer receives; unbinding a missing binding is fine."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        q = await self.bound_queue(t, ex, "a.*")
        await t.unbind(q, ex, "a.*")
        await t.unbind(q, ex, "a.*")
        await self.assertFailure(t.publish(ex, "a.b", b"x"), Unroutable)

    async def test_direct_exchange(self):
        """A direct exchange routes on the exact key; wildcards are plain characters."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t, "direct")
        q = await self.bound_queue(t, ex, "a.b", "a.*")
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish(ex, "a.b", b"1")
        await self.assertFailure(t.publish(ex, "a.c", b"2"), Unroutable)
        await t.publish(ex, "a.*", b"3")
        await inbox.wait(2)
        self.assertEqual(inbox.bodies, [b"1", b"3"])

    async def test_fanout_exchange(self):
        """A fanout exchange gives every bound queue one copy, whatever the key."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t, "fanout")
        first = Inbox()
        second = Inbox()
        await t.consume(await self.bound_queue(t, ex, "ignored", "also-ignored"), first)
        await t.consume(await self.bound_queue(t, ex, ""), second)
        await t.publish(ex, "any.key", b"event")
        await first.wait(1)
        await second.wait(1)
        await self.settle()
        self.assertEqual((first.bodies, second.bodies), ([b"event"], [b"event"]))

    async def test_default_exchange(self):
        """The default exchange '' routes to the queue named by the routing key."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish("", q, b"direct to queue")
        await inbox.wait(1)
        await self.assertFailure(t.publish("", self.unique("nobody"), b"x"), Unroutable)

    async def test_unroutable_mandatory(self):
        """A mandatory publish that reaches no queue fails with Unroutable: the caller learns
        that the receiver does not exist."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        error = await self.assertFailure(t.publish(ex, "nobody.home", b"x"), Unroutable)
        self.assertEqual(error.routing_key, "nobody.home")
        self.assertIn("nobody.home", str(error))

    async def test_unroutable_not_mandatory_dropped(self):
        """A non-mandatory publish that reaches no queue succeeds and is dropped."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        await t.publish(ex, "k", b"lost", mandatory=False)
        q = await self.bound_queue(t, ex, "k")
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish(ex, "k", b"kept", mandatory=False)
        await inbox.wait(1)
        await self.settle()
        self.assertEqual(inbox.bodies, [b"kept"])

    async def test_publish_to_missing_exchange(self):
        """Publishing to an exchange nobody declared fails with NotFound."""
        (t,) = await self.make_transports(1)
        await self.assertFailure(t.publish(self.unique("nope"), "k", b"x"), NotFound)

    # Declarations.

    async def test_exchange_type_conflict(self):
        """Redeclaring an exchange with another type is refused; the same type is a no-op."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t, "topic")
        await t.declare_exchange(ex, "topic")
        await self.assertFailure(t.declare_exchange(ex, "fanout"), TransportError)

    async def test_delete_exchange_if_unused(self):
        """With if_unused an exchange a queue is bound to is kept (the call fails) and the
        channel stays usable; once unbound it goes: publishing there fails, a queue bound to
        it before does not get it back when redeclared. Deleting a missing one is fine."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        q = await self.bound_queue(t, ex, "k")
        await self.assertFailure(t.delete_exchange(ex, if_unused=True), TransportError)
        await t.publish(ex, "k", b"still routed")
        await t.unbind(q, ex, "k")
        await t.delete_exchange(ex, if_unused=True)
        await self.assertFailure(t.publish(ex, "k", b"x"), NotFound)
        await t.delete_exchange(ex)
        await t.declare_exchange(ex)
        await self.assertFailure(t.publish(ex, "k", b"x"), Unroutable)

    async def test_delete_exchange_removes_bindings(self):
        """Without if_unused the exchange goes with its bindings."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        await self.bound_queue(t, ex, "k")
        await t.delete_exchange(ex)
        await t.declare_exchange(ex)
        await self.assertFailure(t.publish(ex, "k", b"x"), Unroutable)

    async def test_redeclare_queue_keeps_messages(self):
        """Redeclaring a queue with the same arguments changes nothing, messages included."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        await t.publish("", q, b"waiting")
        self.assertEqual(await t.declare_queue(q), q)
        inbox = Inbox()
        await t.consume(q, inbox)
        await inbox.wait(1)

    async def test_server_named_queue(self):
        """Declaring a queue without a name creates one with a fresh name."""
        (t,) = await self.make_transports(1)
        first = await t.declare_queue("", exclusive=True)
        second = await t.declare_queue("", exclusive=True)
        self.assertTrue(first)
        self.assertNotEqual(first, second)

    async def test_delete_queue_removes_bindings(self):
        """A deleted queue loses its bindings: recreating it does not bring them back."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        q = await self.bound_queue(t, ex, "k")
        await t.publish(ex, "k", b"x")
        await t.delete_queue(q)
        await self.assertFailure(t.publish(ex, "k", b"x"), Unroutable)
        await t.declare_queue(q)
        await self.assertFailure(t.publish(ex, "k", b"x"), Unroutable)

    async def test_queue_depth(self):
        """A queue's depth counts the messages waiting, not those delivered and unacked; a
        missing queue is NotFound and is not created by asking."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        self.assertEqual(await t.queue_depth(q), 0)
        for i in range(5):
            await t.publish("", q, b"%d" % i)
        self.assertEqual(await t.queue_depth(q), 5)
        inbox = Inbox(ack=False)
        await t.consume(q, inbox, prefetch=2)
        await inbox.wait(2)
        self.assertEqual(await t.queue_depth(q), 3)
        missing = self.unique("nope")
        await self.assertFailure(t.queue_depth(missing), NotFound)
        await self.assertQueueGone(t, missing)

    async def test_consume_missing_queue(self):
        """Consuming a queue that does not exist fails with NotFound."""
        (t,) = await self.make_transports(1)
        await self.assertQueueGone(t, self.unique("nope"))

    async def test_bind_missing(self):
        """Binding to a missing exchange or a missing queue fails with NotFound."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t)
        q = await self.queue(t)
        await self.assertFailure(t.bind(q, self.unique("nope"), "k"), NotFound)
        await self.assertFailure(t.bind(self.unique("nope"), ex, "k"), NotFound)

    # Consumers.

    async def test_round_robin(self):
        """Consumers of one queue (e.g. service instances in two containers) take turns:
        each message goes to exactly one of them."""
        t1, t2 = await self.make_transports(2)
        q = await self.queue(t1)
        first, second = Inbox(), Inbox()
        await t1.consume(q, first)
        await t2.consume(q, second)
        for i in range(10):
            await t1.publish("", q, b"%d" % i)
        await first.wait(5)
        await second.wait(5)
        await self.settle()
        self.assertEqual(len(first.deliveries), 5)
        self.assertEqual(sorted(first.bodies + second.bodies), sorted(b"%d" % i for i in range(10)))

    async def test_prefetch(self):
        """A consumer holds at most `prefetch` unacked messages; acking lets the next in."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        for i in range(10):
            await t.publish("", q, b"%d" % i)
        inbox = Inbox(ack=False)
        await t.consume(q, inbox, prefetch=2)
        await inbox.wait(2)
        await self.settle()
        self.assertEqual(inbox.bodies, [b"0", b"1"])
        inbox.deliveries[0].ack()
        await inbox.wait(3)
        await self.settle()
        self.assertEqual(inbox.bodies, [b"0", b"1", b"2"])
        inbox.ack = True
        for delivery in inbox.deliveries[1:]:
            delivery.ack()
        await inbox.wait(10)
        self.assertEqual(inbox.bodies, [b"%d" % i for i in range(10)])

    async def test_nack_requeue(self):
        """nack(requeue=True) puts the message back at the head, marked redelivered."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        await t.publish("", q, b"first")
        await t.publish("", q, b"second")
        inbox = Inbox(ack=False)
        await t.consume(q, inbox, prefetch=1)
        (delivery,) = await inbox.wait(1)
        self.assertFalse(delivery.redelivered)
        delivery.nack(requeue=True)
        _, again = await inbox.wait(2)
        self.assertEqual((again.body, again.redelivered), (b"first", True))
        again.ack()
        _, _, nxt = await inbox.wait(3)
        self.assertEqual((nxt.body, nxt.redelivered), (b"second", False))

    async def test_nack_without_requeue_drops(self):
        """nack(requeue=False) discards the message."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        await t.publish("", q, b"bad")
        await t.publish("", q, b"good")
        inbox = Inbox(ack=False)
        await t.consume(q, inbox, prefetch=1)
        (bad,) = await inbox.wait(1)
        bad.nack(requeue=False)
        _, good = await inbox.wait(2)
        good.ack()
        await self.settle()
        self.assertEqual(inbox.bodies, [b"bad", b"good"])

    async def test_double_ack(self):
        """Settling a delivery twice is a bug and raises TransportError."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        await t.publish("", q, b"x")
        inbox = Inbox(ack=False)
        await t.consume(q, inbox)
        (delivery,) = await inbox.wait(1)
        delivery.ack()
        self.assertRaises(TransportError, delivery.ack)
        self.assertRaises(TransportError, delivery.nack)

    async def test_cancel_requeues_unacked(self):
        """Cancelling a consumer stops its deliveries; its unacked messages go back to the
        queue, in order and marked redelivered, for the next consumer."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        for body in [b"a", b"b", b"c"]:
            await t.publish("", q, body)
        held = Inbox(ack=False)
        consumer = await t.consume(q, held, prefetch=2)
        await held.wait(2)
        await consumer.cancel()
        await t.publish("", q, b"d")
        await self.settle()
        self.assertEqual(held.bodies, [b"a", b"b"])
        after = Inbox()
        await t.consume(q, after)
        await after.wait(4)
        self.assertEqual(after.bodies, [b"a", b"b", b"c", b"d"])
        self.assertEqual([d.redelivered for d in after.deliveries], [True, True, False, False])

    async def test_close_requeues_unacked(self):
        """When a connection closes, the messages it held unacked go to other consumers."""
        t1, t2 = await self.make_transports(2)
        q = await self.queue(t2)
        await t2.publish("", q, b"job")
        held = Inbox(ack=False)
        await t1.consume(q, held)
        await held.wait(1)
        await t1.close()
        inbox = Inbox()
        await t2.consume(q, inbox)
        (delivery,) = await inbox.wait(1)
        self.assertEqual((delivery.body, delivery.redelivered), (b"job", True))

    async def test_exclusive_queue(self):
        """An exclusive queue belongs to its connection: others cannot declare, consume or
        delete it, and it disappears when its owner closes."""
        t1, t2 = await self.make_transports(2)
        q = await self.queue(t1, exclusive=True)
        await self.assertFailure(t2.declare_queue(q, exclusive=True), QueueInUse)
        await self.assertFailure(t2.declare_queue(q), QueueInUse)
        await self.assertFailure(t2.consume(q, Inbox()), QueueInUse)
        await self.assertFailure(t2.delete_queue(q), QueueInUse)
        inbox = Inbox()
        await t1.consume(q, inbox)
        await t2.publish("", q, b"others may publish")
        await inbox.wait(1)
        await t1.close()
        await self.assertQueueGone(t2, q)

    async def test_auto_delete_queue(self):
        """An auto-delete queue lives until its last consumer is cancelled, not before its
        first consumer arrives."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t, auto_delete=True)
        await t.publish("", q, b"kept until someone consumes")
        first = await t.consume(q, Inbox())
        second = await t.consume(q, Inbox())
        await first.cancel()
        await t.publish("", q, b"still there")
        await second.cancel()
        await self.assertQueueGone(t, q)

    async def test_callback_exception_drops_message(self):
        """An exception escaping a callback is logged and the message is dropped, so a poison
        message cannot loop; the consumer keeps receiving."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        inbox = Inbox()

        def callback(delivery):
            if delivery.body == b"poison":
                raise ZeroDivisionError("bad message")
            inbox(delivery)

        await t.consume(q, callback)
        await t.publish("", q, b"poison")
        await t.publish("", q, b"fine")
        (delivery,) = await inbox.wait(1)
        await self.settle()
        self.assertEqual((inbox.bodies, delivery.redelivered), ([b"fine"], False))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    async def test_async_callback_failure_drops_message(self):
        """A coroutine callback that fails before settling has its message dropped too."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        inbox = Inbox()

        async def callback(delivery):
            await task.deferLater(reactor, 0, lambda: None)
            if delivery.body == b"poison":
                raise ZeroDivisionError("bad message")
            inbox(delivery)

        await t.consume(q, callback, prefetch=1)
        await t.publish("", q, b"poison")
        await t.publish("", q, b"fine")
        await inbox.wait(1)
        await self.settle()
        self.assertEqual(inbox.bodies, [b"fine"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    # Identity and properties.

    async def test_user_id_stamped(self):
        """The receiver sees the publishing connection's user in user_id, whatever the sender
        claimed; other properties travel unchanged."""
        t1, t2 = await self.make_transports(2)
        q = await self.queue(t2)
        inbox = Inbox()
        await t2.consume(q, inbox)
        claimed = Properties(
            user_id="mallory",
            message_id="m-1",
            headers={"conv-id": "c1"},
            delivery_mode=2,
            timestamp=1700000000,
        )
        await t1.publish("", q, b"x", claimed)
        await t1.publish("", q, b"y")
        first, second = await inbox.wait(2)
        self.assertEqual(first.properties, attrs.evolve(claimed, user_id=t1.user))
        self.assertEqual(second.properties.user_id, t1.user)
        self.assertEqual((first.user_id, second.user_id), (t1.user, t1.user))
        self.assertNotEqual(t1.user, t2.user)

    async def test_header_limits(self):
        """Headers nest up to 16 levels (the headers map included) and hold up to 10,000
        values; a publish past that fails with ValueError on every transport, also 2,000
        levels deep, and the transport goes on."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        inbox = Inbox()
        await t.consume(q, inbox)
        fits = {"list": [None] * 9_984, "map": {}}  # 10,000 values
        for _ in range(HEADER_DEPTH - 2):
            fits["map"] = {"k": fits["map"]}
        await t.publish("", q, b"fits", Properties(headers=fits))
        too_deep = {"k": {}}
        for _ in range(2_000):
            too_deep = {"k": too_deep}
        for headers in ({"map": {"k": fits["map"]}}, {"list": [[fits["map"]]]}, too_deep):
            refused = t.publish("", q, b"no", Properties(headers=headers))
            await self.assertFailure(refused, ValueError)
        await self.assertFailure(
            t.publish("", q, b"no", Properties(headers={"list": [None] * 10_000})), ValueError
        )
        await t.publish("", q, b"after")
        await inbox.wait(2)
        self.assertEqual(inbox.bodies, [b"fits", b"after"])
        self.assertEqual(inbox.deliveries[0].properties.headers, fits)

    async def test_headers_are_copies(self):
        """Each receiver gets its own headers: changes by the publisher after publishing, or by
        another receiver, do not show."""
        (t,) = await self.make_transports(1)
        ex = await self.exchange(t, "fanout")
        first, second = Inbox(), Inbox()
        await t.consume(await self.bound_queue(t, ex, ""), first)
        await t.consume(await self.bound_queue(t, ex, ""), second)
        properties = Properties(headers={"hop": 1})
        await t.publish(ex, "", b"x", properties)
        properties.headers["hop"] = 99
        (one,) = await first.wait(1)
        one.properties.headers["hop"] = 2
        (other,) = await second.wait(1)
        self.assertEqual(other.properties.headers, {"hop": 1})


    async def quorum_queue(self, transport, limit):
        """A quorum queue returning a message at most C{limit} times, dead-lettering through
        the default exchange to C{<name>.dead} (declared too); returns both names."""
        name = self.unique("quorum")
        dead = await self.queue(transport, "quorum.dead", durable=True)
        arguments = {
            "x-queue-type": "quorum",
            "x-delivery-limit": limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead,
        }
        await transport.declare_queue(name, durable=True, arguments=arguments)
        self.addCleanup(self._delete_quietly, transport, name)
        return name, dead, arguments

    async def test_quorum_counts_returns_and_dead_letters_past_the_limit(self):
        """A quorum queue marks each redelivery with x-delivery-count (the returns so far)
        and, once a message was returned more than x-delivery-limit times, dead-letters it
        instead of delivering it again: a poison message cannot loop forever."""
        (t,) = await self.make_transports(1)
        name, dead, _ = await self.quorum_queue(t, limit=2)
        await t.publish("", name, b"poison", Properties(delivery_mode=2, headers={"k": "v"}))
        counts = []
        done = defer.Deferred()

        def refuse(delivery):
            counts.append(delivery.properties.headers.get("x-delivery-count", 0))
            delivery.nack(requeue=True)
            if len(counts) == 3:
                done.callback(None)

        consumer = await t.consume(name, refuse)
        await done.addTimeout(WAIT, reactor)
        graveyard = Inbox()
        await t.consume(dead, graveyard)
        (buried,) = await graveyard.wait(1)
        await consumer.cancel()
        self.assertEqual(counts, [0, 1, 2])
        self.assertEqual(buried.body, b"poison")
        self.assertEqual(buried.properties.headers["k"], "v")
        self.assertEqual(buried.properties.headers["x-first-death-queue"], name)
        self.assertEqual(buried.properties.headers["x-first-death-reason"], "delivery_limit")
        # Where it was published, as the process that moves it to its .dead queue reads it.
        self.assertEqual(given_up(buried), ("", name))
        self.assertEqual(await t.queue_depth(name), 0)

    async def test_quorum_redeclare_and_mismatch(self):
        """Declaring a quorum queue again with the same arguments is fine; asking for a
        classic queue of that name, or another limit, fails with PreconditionFailed (and
        the connection stays usable); a classic queue is not turned into a quorum one."""
        (t,) = await self.make_transports(1)
        name, _, arguments = await self.quorum_queue(t, limit=3)
        self.assertEqual(await t.declare_queue(name, durable=True, arguments=arguments), name)
        with self.assertRaises(PreconditionFailed):
            await t.declare_queue(name, durable=True)
        with self.assertRaises(PreconditionFailed):
            await t.declare_queue(name, durable=True, arguments=dict(arguments, **{
                "x-delivery-limit": 4}))
        classic = await self.queue(t, "classic", durable=True)
        with self.assertRaises(PreconditionFailed):
            await t.declare_queue(classic, durable=True, arguments={"x-queue-type": "quorum"})
        await t.publish("", classic, b"still usable")
        inbox = Inbox()
        await t.consume(classic, inbox)
        await inbox.wait(1)

    async def test_quorum_queue_must_be_durable_and_shared(self):
        """A quorum queue cannot be transient, exclusive or auto-delete: refused."""
        (t,) = await self.make_transports(1)
        quorum = {"x-queue-type": "quorum"}
        for flags in [{}, {"durable": True, "exclusive": True},
                      {"durable": True, "auto_delete": True}]:
            with self.assertRaises(PreconditionFailed):
                await t.declare_queue(self.unique("bad"), arguments=quorum, **flags)


class PropertiesTests(unittest.SynchronousTestCase):
    def test_copiedKeepsEveryField(self):
        """
        C{Properties.copied} is C{attrs.evolve} with C{user_id} and a headers dict of its
        own: every field is carried (one added later and left out of it fails here).
        """
        values = {
            field.name: f"v-{field.name}" for field in attrs.fields(Properties)
        } | {"headers": {"k": [1]}, "delivery_mode": 2, "timestamp": 7}
        original = Properties(**values)
        copy = original.copied("someone")
        self.assertEqual(copy, attrs.evolve(original, user_id="someone"))
        self.assertIsNot(copy.headers, original.headers)


class MemoryRunRecordTests(unittest.TestCase):
    """The embedded broker keeps nothing across restarts, but tells the next run when its
    previous one ended with messages of durable queues (`lost_messages`)."""

    async def run_once(self, record, durable_left=0, other_left=0, stop=True):
        broker = MemoryBroker(run_record=record)
        t = MemoryTransport(broker, reactor)
        await t.connect()
        await t.declare_queue("kept", durable=True)
        await t.declare_queue("scratch")
        for i in range(durable_left):
            await t.publish("", "kept", b"%d" % i)
        for i in range(other_left):
            await t.publish("", "scratch", b"%d" % i)
        await t.close()
        if stop:
            broker.record_stop()
        return broker

    async def test_lost_messages(self):
        record = os.path.join(self.mktemp(), "memory-broker.run")
        first = await self.run_once(record, durable_left=2)
        self.assertFalse(first.lost_messages)  # the first run lost nothing before it
        second = await self.run_once(record, other_left=3)  # non-durable ones do not count
        self.assertTrue(second.lost_messages)
        third = await self.run_once(record, stop=False)  # killed: no record of its stop
        self.assertFalse(third.lost_messages)
        fourth = await self.run_once(record)
        self.assertTrue(fourth.lost_messages)
        fifth = MemoryBroker(run_record=record)
        self.assertFalse(fifth.lost_messages)
        t = MemoryTransport(fifth, reactor)
        self.assertIs(t.lost_messages, False)
        self.assertFalse(MemoryBroker().lost_messages)  # no record kept


class MemoryTransportTests(TransportSemantics, unittest.TestCase):
    async def make_transports(self, n):
        self.broker = MemoryBroker()
        transports = []
        for i in range(n):
            transport = MemoryTransport(self.broker, reactor, user=f"user{i}")
            self.assertIs(await transport.connect(), transport)
            self.addCleanup(transport.close)
            transports.append(transport)
        return transports

    def test_topic_edge_words(self):
        """Empty words count (`a..b` has three words); the empty key has zero words."""
        cases = [
            ("a.*.b", "a..b", True),
            ("a.b", "a..b", False),
            ("a.#.b", "a..b", True),
            ("*", "", False),
            ("", "", True),
            ("a", "", False),
            ("#.#", "", True),
            ("*.*", ".", True),
            ("a.#.#.#.#.#.#.#.#.#.#.#.z", "a" + ".b" * 40, False),
        ]
        for pattern, key, expected in cases:
            self.assertEqual(topic_matches(pattern, key), expected, (pattern, key))

    def test_topic_table_matcher(self):
        """The matcher agrees with the shared table."""
        for pattern, key, expected in TOPIC_CASES:
            self.assertEqual(topic_matches(pattern, key), expected, (pattern, key))

    async def test_publish_fires_at_once(self):
        """The in-memory broker confirms a publish, or refuses it, before publish returns."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        self.assertIsNone(self.successResultOf(t.publish("", q, b"x")))
        self.failureResultOf(t.publish("", "nobody", b"x"), Unroutable)

    async def test_callbacks_are_not_reentrant(self):
        """Callbacks never run inside publish or ack, only from the reactor afterwards."""
        (t,) = await self.make_transports(1)
        q = await self.queue(t)
        inbox = Inbox(ack=False)
        await t.consume(q, inbox, prefetch=1)
        t.publish("", q, b"1")
        t.publish("", q, b"2")
        self.assertEqual(inbox.deliveries, [])
        (first,) = await inbox.wait(1)
        first.ack()
        self.assertEqual(len(inbox.deliveries), 1)
        await inbox.wait(2)

    async def test_inspection(self):
        """The broker reports queues, exchanges, bindings, depth, unacked and consumers."""
        (t,) = await self.make_transports(1)
        await t.declare_exchange("ion.test", "topic")
        await t.declare_queue("svc")
        await t.bind("svc", "ion.test", "svc.#")
        for i in range(5):
            await t.publish("ion.test", "svc.op", b"%d" % i)
        inbox = Inbox(ack=False)
        await t.consume("svc", inbox, prefetch=2)
        await inbox.wait(2)
        self.assertEqual(self.broker.queues(), ["svc"])
        self.assertEqual(self.broker.exchanges(), {"ion.test": "topic"})
        self.assertEqual(self.broker.bindings(), [("ion.test", "svc", "svc.#")])
        self.assertEqual(self.broker.queue_depth("svc"), 3)
        self.assertEqual(self.broker.unacked("svc"), 2)
        self.assertEqual(self.broker.consumer_count("svc"), 1)
        self.assertRaises(NotFound, self.broker.queue_depth, "nope")

    async def test_not_connected_and_closed(self):
        """Operations before connect() fail with TransportError, after close() with
        ConnectionLost."""
        broker = MemoryBroker()
        t = MemoryTransport(broker, reactor)
        self.failureResultOf(t.declare_queue("q"), TransportError)
        await t.connect()
        await t.close()
        self.failureResultOf(t.declare_queue("q"), ConnectionLost)
        self.failureResultOf(t.publish("", "q", b"x"), ConnectionLost)
        self.failureResultOf(t.connect(), ConnectionLost)

    async def test_ack_after_close_is_ignored(self):
        """A handler finishing after its connection closed may still ack: the message already
        went back to the queue, so the ack does nothing."""
        t1, t2 = await self.make_transports(2)
        await t2.declare_queue("jobs")
        await t2.publish("", "jobs", b"job")
        inbox = Inbox(ack=False)
        await t1.consume("jobs", inbox)
        (delivery,) = await inbox.wait(1)
        await t1.close()
        delivery.ack()
        self.assertEqual(self.broker.queue_depth("jobs"), 1)

    async def test_redeclare_with_other_flags(self):
        """Redeclaring with different durable/auto_delete flags is refused, as RabbitMQ does."""
        (t,) = await self.make_transports(1)
        await t.declare_queue("q", durable=True)
        self.failureResultOf(t.declare_queue("q"), TransportError)
        await t.declare_exchange("x", "direct", durable=True)
        self.failureResultOf(t.declare_exchange("x", "direct"), TransportError)
        self.failureResultOf(t.declare_exchange("y", "headers"), TransportError)
        self.failureResultOf(t.declare_exchange("", "direct"), TransportError)

    async def test_auto_delete_exchange(self):
        """An auto-delete exchange goes away when its last binding is removed."""
        (t,) = await self.make_transports(1)
        await t.declare_exchange("events", "fanout", auto_delete=True)
        await t.declare_queue("q")
        await t.bind("q", "events", "")
        await t.unbind("q", "events", "")
        self.assertEqual(self.broker.exchanges(), {})

    async def test_deleted_queue_stops_consumers(self):
        """Deleting a queue stops its consumers; acks of their deliveries are ignored."""
        (t,) = await self.make_transports(1)
        await t.declare_queue("q")
        await t.publish("", "q", b"x")
        inbox = Inbox(ack=False)
        consumer = await t.consume("q", inbox)
        (delivery,) = await inbox.wait(1)
        await t.delete_queue("q")
        delivery.ack()
        await consumer.cancel()
        self.assertEqual(self.broker.queues(), [])

    async def test_large_backlog(self):
        """A backlog larger than one delivery batch is delivered completely and in order."""
        (t,) = await self.make_transports(1)
        await t.declare_queue("bulk")
        count = 25_000
        for i in range(count):
            t.publish("", "bulk", b"%d" % i)
        inbox = Inbox()
        await t.consume("bulk", inbox, prefetch=0)
        await inbox.wait(count)
        self.assertEqual(inbox.bodies, [b"%d" % i for i in range(count)])
        self.assertEqual((self.broker.queue_depth("bulk"), self.broker.unacked("bulk")), (0, 0))

    async def test_bad_arguments(self):
        """A body that is not bytes, a non-callable callback or a negative prefetch is refused."""
        (t,) = await self.make_transports(1)
        await t.declare_queue("q")
        self.failureResultOf(t.publish("", "q", "text"), TypeError)
        self.successResultOf(t.publish("", "q", bytearray(b"ok")))
        self.failureResultOf(t.consume("q", None), TypeError)
        self.failureResultOf(t.consume("q", Inbox(), prefetch=-1), ValueError)
        self.assertEqual(self.broker.queue_depth("q"), 1)
