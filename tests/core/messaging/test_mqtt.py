"""The MQTT v5 transport against a private Mosquitto: sr3's topic layout, confirms, manual
acks, persistent sessions, shared subscriptions, a broker restart."""

import itertools

from twisted.internet import defer, reactor
from twisted.trial import unittest

from ion.core.messaging.mqtt import MqttAddress, MqttTransport, filter_of, topic_of
from ion.core.messaging.transport import Properties, TransportError
from tests.mosquitto import get_mosquitto
from tests.waiting import until

_names = itertools.count(1)


class LayoutTests(unittest.SynchronousTestCase):
    def test_sr3_topics(self):
        """The exchange is the first topic level, then the v03 topic; patterns are shared
        subscriptions of the queue."""
        self.assertEqual(topic_of("xpublic", "v03.a.b"), "xpublic/v03/a/b")
        self.assertEqual(topic_of("xs_u", "v03.c+d"), "xs_u/v03/c%2Bd")
        self.assertEqual(filter_of("q_u.consumer.s", "xpublic", "v03.*.x.#"),
                         "$share/q_u.consumer.s/xpublic/v03/+/x/#")

    def test_urls(self):
        """Ports default to 1883 and 8883; a bad URL is one line with no password in it."""
        address = MqttAddress.parse("mqtts://u:s3cret@h/")
        self.assertEqual((address.port, address.tls, address.user), (8883, True, "u"))
        self.assertNotIn("s3cret", repr(address) + str(address))
        for url in ("mqtt://u:s3cret@h/path", "mqtt://u:s3cret@h:99999/", "http://h/"):
            with self.assertRaises(ValueError) as caught:
                MqttAddress.parse(url)
            self.assertNotIn("s3cret", str(caught.exception))


class MqttTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.mosquitto = get_mosquitto()
        self.queue = f"q_t.mqtt{next(_names)}"
        self.received = []

    async def open(self, session="a", bind=True, prefetch=100, collect=None, ack=False):
        transport = MqttTransport(
            self.mosquitto.url, reactor, session=f"{self.queue}_{session}", prefetch=prefetch
        )
        self.addCleanup(transport.close)
        await transport.connect()
        if bind:
            await transport.bind(self.queue, "xpublic", "v03.#")
        if collect is not None:
            def take(delivery):
                collect.append(delivery)
                if ack:
                    delivery.ack()

            await transport.consume(self.queue, take, prefetch)
        return transport

    async def publish(self, transport, n, start=0):
        await defer.gatherResults(
            [transport.publish("xpublic", f"v03.d{i % 3}", f"m{i}".encode(), Properties(
                content_type="application/json", headers={"k": "v"}), mandatory=False)
             for i in range(start, start + n)]
        )

    async def test_round_trip(self):
        """A message published to an exchange and key arrives with its exchange, key, content
        type and headers; acked, it does not come back."""
        got = []
        await self.open("sub", collect=got)
        publisher = await self.open("pub", bind=False)
        await self.publish(publisher, 1)
        await until(lambda: got, what="the message")
        d = got[0]
        self.assertEqual((d.exchange, d.routing_key, d.body), ("xpublic", "v03.d0", b"m0"))
        self.assertEqual(d.properties.content_type, "application/json")
        self.assertEqual(d.properties.headers, {"k": "v"})
        d.ack()

    async def test_persistent_session(self):
        """A subscriber stopped while 500 notices are published gets all 500 when it comes
        back under the same session; what it had not acked comes again (at least once: an
        ack on its way when the session closed may not count)."""
        got = []
        subscriber = await self.open("sub", collect=got)
        publisher = await self.open("pub", bind=False)
        await self.publish(publisher, 10)
        await until(lambda: len(got) == 10, what="10 messages")
        for d in got[:5]:
            d.ack()
        await subscriber.close()
        await self.publish(publisher, 500, start=10)
        again = []
        await self.open("sub", bind=False, collect=again, ack=True)
        wanted = {f"m{i}".encode() for i in range(5, 510)}
        await until(lambda: wanted <= {d.body for d in again}, timeout=20,
                    what=lambda _: f"505 messages, got {len(wanted & {d.body for d in again})}")
        self.assertTrue(all(d.redelivered for d in again if d.body in {b"m5", b"m9"}))

    async def test_shared_subscription(self):
        """Two sessions subscribed with one queue name split the messages between them."""
        first, second = [], []
        await self.open("i1", collect=first, ack=True)
        await self.open("i2", collect=second, ack=True)
        publisher = await self.open("pub", bind=False)
        await self.publish(publisher, 100)
        await until(lambda: len(first) + len(second) == 100, what="100 messages")
        self.assertTrue(first and second, (len(first), len(second)))
        self.assertEqual({d.body for d in first} & {d.body for d in second}, set())

    async def test_prefetch_and_requeue(self):
        """At most prefetch messages are in hand; one nacked with requeue comes again,
        redelivered, before the others."""
        got = []
        await self.open("sub", collect=got, prefetch=2)
        publisher = await self.open("pub", bind=False)
        await self.publish(publisher, 5)
        await until(lambda: len(got) == 2, what="2 messages")
        first = got[0]
        first.nack(requeue=True)
        await until(lambda: len(got) == 3, what="the message again")
        self.assertEqual((got[2].body, got[2].redelivered), (first.body, True))
        while len(got) < 6 or not all(d.settled for d in got):
            for d in got:
                d.ack()
            await until(lambda: True)
        self.assertEqual(len({d.body for d in got}), 5)

    async def test_broker_restart(self):
        """Mosquitto stopped and started again (it saves its sessions on the way down): every
        message it confirmed is delivered; the transports reconnect on their own."""
        got = []
        subscriber = await self.open("sub", collect=got)
        await subscriber.close()
        publisher = await self.open("pub", bind=False)
        await self.publish(publisher, 200)
        self.mosquitto.stop()
        self.mosquitto.start()
        await until(lambda: publisher._connected, timeout=15, what="the publisher back")
        await self.open("sub", bind=False, collect=got, ack=True)
        await until(lambda: len({d.body for d in got}) == 200, timeout=15,
                    what=lambda _: f"200 messages, got {len({d.body for d in got})}")

    async def test_refused_login(self):
        """A first attempt that fails is a TransportError naming the broker."""
        transport = MqttTransport(f"mqtt://127.0.0.1:{_closed_port()}/", reactor, session="x")
        self.addCleanup(transport.close)
        with self.assertRaises(TransportError) as caught:
            await transport.connect()
        self.assertIn("cannot connect to mqtt://127.0.0.1", str(caught.exception))


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
