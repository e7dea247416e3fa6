"""What `Process.subscribe` does for every subscribing process: the failure policy (one
redelivery, then the dead-letter queue and the process's hook) and draining on terminate.

The scenarios are written once (`SubscribeScenarios`) and run on the memory transport and on
the private RabbitMQ node.
"""

from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from ion.core.cc.testing import make_container, test_config
from ion.core.messaging.memory import MemoryBroker
from ion.core.messaging.transport import NotFound
from ion.core.process import ConnectionLost, Process
from tests.broker import get_broker
from tests.waiting import until


class Subscriber(Process):
    """Hands each delivery to `self.handle` (set by the test) and records its dead letters."""

    def on_init(self):
        self.handle = None
        self.dead = []  # (routing key, reason, settled, dead queue depth) at on_dead_letter
        self.dead_lettered = defer.Deferred()

    def _on_delivery(self, delivery):
        return self.handle(delivery)

    async def on_dead_letter(self, delivery, reason):
        # Where things stand when the hook runs: the dead letter is confirmed, the original
        # not yet acked.
        depth = await self.container.transport.queue_depth(f"{self.queue}.dead")
        self.dead.append((delivery.routing_key, reason, delivery.settled, depth))
        self.dead_lettered.callback(None)


class SubscribeScenarios:
    """Scenarios every transport must pass. Subclasses set `url` and `new_broker()`."""

    url = "memory://"

    def new_broker(self):
        return MemoryBroker()

    def name(self, base):
        """A name of its own on a broker the tests share."""
        return base

    async def start(self, clock=None, config=None, durable=True, **options):
        self.broker = self.new_broker()
        self.c = await make_container(
            self,
            url=self.url,
            memory_broker=self.broker,
            sysname=self.name("test"),
            clock=clock,
            config=config,
        )
        self.exchange = self.name("xsub")
        self.queue = self.name("q_sub")
        proc = await self.c.spawn(Subscriber)
        proc.queue = self.queue
        for queue in (self.queue, f"{self.queue}.dead", f"{self.queue}.poison"):
            self.addCleanup(self.delete_queue, queue)
        await proc.subscribe(
            self.exchange, ["#"], proc._on_delivery, queue=self.queue, durable=durable, **options
        )
        return proc

    async def delete_queue(self, queue):
        """Durable queues outlive the test on RabbitMQ."""
        await self.c.transport.delete_queue(queue)

    async def post(self, proc, key, body, headers=None):
        await proc.publish(self.exchange, key, body, headers=headers)

    async def dead_letters(self, count):
        """The first `count` messages of the dead-letter queue, taken (acked)."""
        got, done = [], defer.Deferred()

        def take(delivery):
            got.append(delivery)
            delivery.ack()
            if len(got) == count:
                done.callback(None)

        consumer = await self.c.transport.consume(f"{self.queue}.dead", take)
        await done
        await consumer.cancel()
        return got

    def turn(self):
        return task.deferLater(self.c.reactor, 0, lambda: None)

    def logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    # -- the failure policy ------------------------------------------------------------------

    async def test_failure_once_redelivers(self):
        """A handler that raises on a message gets it once more, marked redelivered; handled
        then, it goes nowhere else and the hook is not told."""
        proc = await self.start()
        seen, done = [], defer.Deferred()

        def handle(delivery):
            seen.append(delivery.redelivered)
            if not delivery.redelivered:
                raise RuntimeError("not this time")
            delivery.ack()
            done.callback(None)

        proc.handle = handle
        await self.post(proc, "a.b", b"payload")
        await done
        self.assertEqual(seen, [False, True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await proc.terminate()
        self.assertEqual(proc.dead, [])
        self.assertEqual(await self.c.transport.queue_depth(self.queue), 0)

    async def test_second_failure_dead_letters(self):
        """A message whose (async) handler fails on its redelivery too goes to `<queue>.dead`
        with its body and headers and the reason, exchange and routing key in headers; the
        hook is told once the dead letter is confirmed, and the original is acked after it."""
        proc = await self.start()
        calls = []

        async def handle(delivery):
            calls.append(delivery.redelivered)
            await defer.succeed(None)
            raise ValueError(f"bad message {len(calls)}")

        proc.handle = handle
        await self.post(proc, "a.b", b"poison", headers={"trace": "t1"})
        await proc.dead_lettered
        self.assertEqual(calls, [False, True])
        self.assertEqual(proc.dead, [("a.b", "ValueError: bad message 2", False, 1)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)
        (dead,) = await self.dead_letters(1)
        self.assertEqual(dead.body, b"poison")
        headers = dead.properties.headers
        names = ("trace", "dead-reason", "dead-exchange", "dead-routing-key")
        self.assertEqual(
            {k: headers.get(k) for k in names},
            {
                "trace": "t1",
                "dead-reason": "ValueError: bad message 2",
                "dead-exchange": self.exchange,
                "dead-routing-key": "a.b",
            },
        )
        self.assertEqual(dead.properties.delivery_mode, 2)
        await proc.terminate()
        self.assertEqual(await self.c.transport.queue_depth(self.queue), 0)

    async def test_sync_failure_dead_letters_too(self):
        """A handler that raises at once follows the same policy, and the process goes on
        handling the next messages."""
        proc = await self.start()
        handled = defer.Deferred()

        def handle(delivery):
            if delivery.body == b"bad":
                raise KeyError("missing")
            delivery.ack()
            handled.callback(delivery.body)

        proc.handle = handle
        await self.post(proc, "k", b"bad")
        await proc.dead_lettered
        self.assertEqual([d[:2] for d in proc.dead], [("k", "KeyError: 'missing'")])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 2)
        await self.post(proc, "k", b"good")
        self.assertEqual(await handled, b"good")

    # -- stopping ----------------------------------------------------------------------------

    async def test_stop_drains_in_flight(self):
        """Terminate waits for the message in hand to be handled and acked; a message arriving
        meanwhile is not handled and goes back to the queue."""
        proc = await self.start()
        started, release = defer.Deferred(), defer.Deferred()
        handled = []

        async def handle(delivery):
            handled.append(delivery.body)
            if not started.called:
                started.callback(None)
            await release
            delivery.ack()

        proc.handle = handle
        await self.post(proc, "k", b"first")
        await started
        await self.turn()  # the handler returns
        self.assertEqual(proc.in_hand, 1)
        stopping = defer.ensureDeferred(proc.terminate())
        await self.post(proc, "k", b"second")
        await task.deferLater(self.c.reactor, 0.05, lambda: None)
        self.assertNoResult(stopping)
        release.callback(None)
        await stopping
        self.assertEqual((handled, proc.in_hand), ([b"first"], 0))
        self.assertEqual(await self.c.transport.queue_depth(self.queue), 1)

    async def test_stop_abandons_after_timeout(self):
        """A handler still running after `ion.core.process: terminate_timeout` seconds (on the
        container's clock) is abandoned with a log line; its message goes back to the queue."""
        clock = task.Clock()
        config = test_config(**{"ion.core.process": {"terminate_timeout": 3}})
        proc = await self.start(clock=clock, config=config)
        started = defer.Deferred()

        def handle(delivery):
            started.callback(None)
            return defer.Deferred()  # never done

        proc.handle = handle
        events = self.logged()
        await self.post(proc, "k", b"stuck")
        await started
        await self.turn()  # the handler returns
        stopping = defer.ensureDeferred(proc.terminate())
        clock.advance(2.9)
        self.assertNoResult(stopping)
        clock.advance(0.1)
        await stopping
        self.assertEqual(proc.state, "TERMINATED")
        lines = [formatEvent(e) for e in events if "abandoned" in (e.get("log_format") or "")]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("1 ops or messages still in hand after 3 s", lines[0])
        self.assertEqual(await self.c.transport.queue_depth(self.queue), 1)


    async def test_lost_connection_is_not_the_message_fault(self):
        """A handler failing because a broker connection was lost (its report could not be
        published) gets the message back however often that happens: it is not dead-lettered
        as a poison message."""
        proc = await self.start()
        calls = []

        def handle(delivery):
            calls.append(delivery.redelivered)
            if len(calls) < 4:
                raise ConnectionLost("connection lost before the broker confirmed the publish")
            delivery.ack()

        proc.handle = handle
        await self.post(proc, "a.b", b"fine")
        await until_true(lambda: len(calls) == 4)
        self.assertEqual(calls, [False, True, True, True])
        await proc.terminate()
        self.assertEqual(proc.dead, [])
        self.assertEqual(self.flushLoggedErrors(ConnectionLost), [])

    # -- quorum queues: a delivery limit --------------------------------------------------------

    async def test_quorum_poison_dead_lettered_after_the_limit(self):
        """On a quorum queue a message whose handler always fails is given back until it was
        returned `delivery_limit` times (each redelivery counted by the broker), then goes
        to `<queue>.dead` and the hook is told: it never loops forever."""
        proc = await self.start(queue_type="quorum", delivery_limit=3)
        counts = []

        def handle(delivery):
            counts.append(delivery.properties.headers.get("x-delivery-count", 0))
            raise ValueError("poison")

        proc.handle = handle
        await self.post(proc, "a.b", b"poison")
        await proc.dead_lettered
        self.assertEqual(counts, [0, 1, 2, 3])
        self.assertEqual(proc.dead, [("a.b", "ValueError: poison", False, 1)])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 4)
        (dead,) = await self.dead_letters(1)
        self.assertEqual(dead.body, b"poison")
        self.assertEqual(dead.properties.headers["dead-reason"], "ValueError: poison")
        self.assertNotIn("x-delivery-count", dead.properties.headers)
        await proc.terminate()
        self.assertEqual(await self.c.transport.queue_depth(self.queue), 0)

    async def test_quorum_message_that_kills_its_consumer(self):
        """A message whose consumer dies holding it every time (the process never gets to
        fail it) is given up by the queue itself once returned more than the limit, into
        `<queue>.poison`; a process of the subscription then moves it to `<queue>.dead` with
        a reason and the routing key it was published with, and its hook is told, once."""
        proc = await self.start(queue_type="quorum", delivery_limit=2)
        held = []
        proc.handle = held.append
        await self.post(proc, "a.b", b"killer")
        await until_true(lambda: held)
        await proc.terminate()  # unsettled: back to the queue, returns 1
        for returns in (2, 3):
            taken = []
            consumer = await self.c.transport.consume(self.queue, taken.append)
            await until_true(lambda: taken)
            self.assertEqual(taken[0].properties.headers.get("x-delivery-count"), returns - 1)
            await consumer.cancel()
        transport = self.c.transport
        await until_true(lambda: transport.queue_depth(f"{self.queue}.poison"))
        self.assertEqual(await transport.queue_depth(self.queue), 0)
        await self.assertFailure(transport.queue_depth(f"{self.queue}.dead"), NotFound)

        second = await self.c.spawn(Subscriber)
        second.queue = self.queue
        second.handle = lambda delivery: delivery.ack()
        await second.subscribe(self.exchange, ["#"], second._on_delivery, queue=self.queue,
                               queue_type="quorum", delivery_limit=2)
        await second.dead_lettered
        reason = ("the broker gave it up after it was returned more than 2 times "
                  "(delivery_limit): its consumer died or gave it back each time")
        self.assertEqual(second.dead, [("a.b", reason, False, 1)])
        (dead,) = await self.dead_letters(1)
        self.assertEqual(dead.body, b"killer")
        headers = dead.properties.headers
        self.assertEqual(headers["x-first-death-reason"], "delivery_limit")
        self.assertEqual(
            (headers["dead-reason"], headers["dead-exchange"], headers["dead-routing-key"]),
            (reason, self.exchange, "a.b"),
        )

        async def poison_empty():
            return await transport.queue_depth(f"{self.queue}.poison") == 0

        await until_true(poison_empty)  # acked once the hook returned
        await second.terminate()
        self.assertEqual(len(second.dead), 1)
        self.assertEqual(await transport.queue_depth(self.queue), 0)

    async def test_queue_type_mismatch_is_one_clear_error(self):
        """A queue that exists as a classic queue is not silently used as a quorum one: the
        subscribe fails with a ValueError naming the process and the queue, and the broker
        keeps the queue as it was."""
        await self.start()
        proc = await self.c.spawn(Subscriber)
        with self.assertRaises(ValueError) as caught:
            await proc.subscribe(
                self.exchange, ["#"], lambda d: d.ack(), queue=self.queue, queue_type="quorum"
            )
        self.assertIn(f"queue {self.queue!r} exists on the broker", str(caught.exception))
        self.assertIn("'quorum'", str(caught.exception))
        self.assertEqual(await self.c.transport.queue_depth(self.queue), 0)


async def until_true(condition):
    """Wait (bounded) for condition() on real I/O."""
    await until(condition, timeout=10)


class MemorySubscribeTests(SubscribeScenarios, unittest.TestCase):
    """The scenarios on the memory:// transport."""


class AmqpSubscribeTests(SubscribeScenarios, unittest.TestCase):
    """The same scenarios on the private RabbitMQ node."""

    def setUp(self):
        self.url = get_broker().url

    def new_broker(self):
        return None

    def name(self, base):
        return f"{base}-{id(self):x}"
