"""Several brokers for one container (the nodes of a cluster): how the list is written, how
each entry gets its password, and failover on a real RabbitMQ node reached through two
loopback forwarders that the tests stop and start as if they were nodes."""

import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import portforward
from twisted.trial import unittest

from ion.core.cc.container import check_broker_url
from ion.core.cc.tap import broker_url_with_password
from ion.core.messaging.amqp import AmqpTransport, split_urls
from ion.core.messaging.transport import ConnectionLost, Properties
from tests.broker import _free_port, get_broker, skip_or_fail_without_rabbitmq
from tests.core.cc.test_tap import OptionParsing
from tests.core.messaging.test_transport import Inbox
from tests.waiting import until


class BrokerListTests(OptionParsing, unittest.SynchronousTestCase):
    def test_split(self):
        """Comma-separated URLs, or hosts in one URL (same login and vhost), are brokers in
        the order given; a comma in a password is not a separator."""
        self.assertEqual(
            split_urls("amqp://u:p,w@h1:5672/v, amqps://u@h2/"),
            ["amqp://u:p,w@h1:5672/v", "amqps://u@h2/"],
        )
        self.assertEqual(
            split_urls("amqp://u:p,w@h1:1,h2:2,h3/prod"),
            ["amqp://u:p,w@h1:1/prod", "amqp://u:p,w@h2:2/prod", "amqp://u:p,w@h3/prod"],
        )
        self.assertEqual(split_urls("amqp://h"), ["amqp://h"])
        error = self.assertRaises(ValueError, split_urls, "amqp://u:sekrit@h1,,h2/")
        self.assertNotIn("sekrit", str(error))

    def test_check(self):
        """A list is of amqp:// or of amqps:// brokers; memory:// is one in-process broker."""
        self.assertEqual(check_broker_url("amqp://h1,h2"), "amqp")
        for bad in ("memory://,amqp://h", "amqp://h1/,amqps://h2/", "amqp://u:sekrit@h1,h2:x/"):
            error = self.assertRaises(ValueError, check_broker_url, bad)
            self.assertNotIn("sekrit", str(error))

    def test_transport(self):
        """A transport of several brokers is a cluster's client: all with one user (it is
        stamped on every message), passwords never shown."""
        t = AmqpTransport("amqp://bob:sekrit@h1,h2:5673/v", reactor)
        self.assertTrue(t.cluster)
        self.assertEqual([(a.host, a.port) for a in t.addresses], [("h1", 5672), ("h2", 5673)])
        self.assertNotIn("sekrit", t.brokers + repr(t))
        self.assertFalse(AmqpTransport("amqp://bob:x@h1/", reactor).cluster)
        self.assertRaises(ValueError, AmqpTransport, "amqp://bob@h1/,amqp://carl@h2/", reactor)

    def test_password_per_host(self):
        """Each broker of a list gets its password from its own line of the credentials file;
        one without a line stops the start, naming it."""
        path = self.mktemp()
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("amqp://pump:one@h1/\namqp://pump:two@h2:5673/\n")
        self.assertEqual(
            broker_url_with_password("amqp://pump@h1,h2:5673/v", path),
            "amqp://pump:one@h1/v,amqp://pump:two@h2:5673/v",
        )
        error = self.assertRaises(
            ValueError, broker_url_with_password, "amqp://pump@h1/,amqp://pump@h3/", path
        )
        self.assertIn("pump@h3", str(error))

    def test_options(self):
        """--broker repeated adds brokers to the list; --broker-host and friends change one
        URL and are refused with a list."""
        opts = self.parse("--broker", "amqp://guest@h1/", "--broker", "amqp://guest@h2:5673/")
        self.assertEqual(opts["broker_url"], "amqp://guest@h1/,amqp://guest@h2:5673/")
        line = self.bad("--broker", "amqp://guest@h1,h2/", "--broker-port", "5673")
        self.assertIn("write each broker's URL in --broker", line)
        line = self.bad("--broker", "amqp://guest:sekrit@h1/", "--broker", "memory://")
        self.assertIn("all amqp:// or all amqps://", line)
        self.assertNotIn("sekrit", line)


class _HangUp(Protocol):
    def connectionMade(self):
        self.transport.loseConnection()


class _Forwarder(portforward.ProxyFactory):
    """A TCP forwarder to the broker standing in for one node: stop() drops its listener and
    every connection through it at once (as a killed node), start() listens again."""

    def __init__(self, port, broker):
        super().__init__(broker.host, broker.port)
        self.listen_port = port  # ProxyFactory's own `port` is the broker's
        self.listening = None
        self.connections = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol

    async def start(self):
        endpoint = TCP4ServerEndpoint(reactor, self.listen_port, interface="127.0.0.1")
        self.listening = await endpoint.listen(self)

    async def stop(self):
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None
        for protocol in self.connections:
            for side in (protocol, protocol.peer):
                if side is not None and side.transport is not None:
                    side.transport.abortConnection()
        self.connections = []

    def url(self):
        return f"amqp://alice:alice@127.0.0.1:{self.listen_port}/"


class BrokerListFailoverTests(unittest.TestCase):
    def setUp(self):
        skip_or_fail_without_rabbitmq()
        self.broker = get_broker()

    async def test_failover_both_ways(self):
        """The first broker of the list is down: the transport connects to the second. When
        the second goes and the first is back, it reconnects to the first, with its queues
        and consumers restored, and nothing published before is lost."""
        first = _Forwarder(_free_port(), self.broker)
        second = _Forwarder(_free_port(), self.broker)
        await second.start()
        self.addCleanup(first.stop)
        self.addCleanup(second.stop)
        t = AmqpTransport(
            f"{first.url()},{second.url()}", reactor, retry_policy=lambda attempt: 0.1
        )
        await t.connect()
        self.addCleanup(t.close)
        self.assertEqual(t.address.port, second.listen_port)
        queue = f"test.list.{id(self):x}"
        await t.declare_queue(queue, durable=True)
        self.addCleanup(lambda: t.delete_queue(queue))
        inbox = Inbox()
        await t.consume(queue, inbox)
        await t.publish("", queue, b"one", Properties(delivery_mode=2))
        await inbox.wait(1)

        await first.start()
        lost = defer.Deferred()
        t.on_connection_lost(lambda error: lost.called or lost.callback(error))
        await second.stop()
        self.assertIsInstance(await lost.addTimeout(10, reactor), ConnectionLost)
        await t.whenConnected().addTimeout(30, reactor)
        self.assertEqual(t.address.port, first.listen_port)
        await t.publish("", queue, b"two", Properties(delivery_mode=2))
        await until(lambda: b"two" in inbox.bodies, timeout=10)
        # The ack of "one" may have been on its way when the connection was cut: it may come
        # again, marked redelivered (at least once); nothing is lost.
        fresh = [d.body for d in inbox.deliveries if not d.redelivered]
        self.assertEqual(fresh, [b"one", b"two"])
        self.assertEqual(set(inbox.bodies), {b"one", b"two"})

    async def test_first_refuses_the_handshake(self):
        """A first broker that takes the TCP connection and then drops it (a node still
        booting) does not fail the connect: the next broker of the list is tried."""
        closer = Factory.forProtocol(_HangUp)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(closer)
        self.addCleanup(port.stopListening)
        second = _Forwarder(_free_port(), self.broker)
        await second.start()
        self.addCleanup(second.stop)
        t = AmqpTransport(
            f"amqp://alice:alice@127.0.0.1:{port.getHost().port}/,{second.url()}", reactor,
            retry_policy=lambda attempt: 0.1,
        )
        await t.connect()
        self.addCleanup(t.close)
        self.assertEqual(t.address.port, second.listen_port)

    async def test_none_answers(self):
        """When no broker of the list answers, the first connect fails naming each one."""
        ports = [_free_port(), _free_port()]
        t = AmqpTransport(
            ",".join(f"amqp://alice:sekrit@127.0.0.1:{p}/" for p in ports), reactor
        )
        with self.assertRaises(ConnectionLost) as caught:
            await t.connect()
        text = str(caught.exception)
        for port in ports:
            self.assertIn(f"127.0.0.1:{port}", text)
        self.assertNotIn("sekrit", text)
