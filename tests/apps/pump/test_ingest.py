"""Ingest: a notice's source comes from the broker, never from its body."""

import itertools
import os

from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from ion.apps.pump.args import IngestArgs
from ion.apps.pump.consumer import Consumer
from ion.apps.pump.ingest import (
    REFUSAL_LOG_INTERVAL,
    Ingest,
    NotPostedHere,
    source_of,
)
from ion.apps.pump.report_router import ReportRouter
from ion.apps.pump.transfer_service import TransferService
from ion.core.cc.container import make_transport
from ion.core.cc.testing import call_op, make_container, test_config
from ion.core.messaging.memory import MemoryBroker, MemoryTransport
from ion.core.messaging.transport import Properties, TransportError
from tests.apps.pump.fixtures import (
    Collector,
    delete_queues,
    encode,
    file_url,
    notice_fields,
    quiet,
    topic,
    until,
    write_source,
)
from tests.broker import get_broker


class SourceTests(unittest.SynchronousTestCase):
    def test_source_of(self):
        """A message is a user's when it was published to that user's xs_ exchange by that
        user (the broker-validated user id), or to the pump's own xs_ by the pump's login."""
        users = ["alice", "bob_x", "pump"]
        table = [
            ("xs_alice", "alice", "alice"),
            ("xs_bob_x", "bob_x", "bob_x"),
            ("xs_pump", "pump", "pump"),
            ("xs_pump", "guest", "pump"),  # the pump's polls, logged in as guest
        ]
        for exchange, user_id, source in table:
            got = source_of(exchange, user_id, users, pump="pump", login="guest")
            self.assertEqual(got, source, (exchange, user_id))

    def test_refused(self):
        """Anything else is refused, saying why: another exchange (what an exchange binding
        delivers), another publisher (the pump's login included), no user id on a pump with
        several users."""
        users = ["alice", "pump"]
        table = [
            ("xpublic", "guest", "exchange 'xpublic'"),
            ("xpublic", "alice", "exchange 'xpublic'"),
            ("xs_carol", "carol", "exchange 'xs_carol'"),
            ("xs_alice_feed", "alice", "exchange 'xs_alice_feed'"),
            ("xs_", None, "exchange 'xs_'"),
            (None, "alice", "exchange None"),
            ("xs_alice", "mallory", "by 'mallory', not by 'alice'"),
            ("xs_alice", "guest", "by 'guest', not by 'alice'"),
            ("xs_alice", "pump", "by 'pump', not by 'alice'"),
            ("xs_alice", None, "no user_id"),
            ("xs_pump", None, "no user_id"),
        ]
        for exchange, user_id, reason in table:
            e = self.assertRaises(
                NotPostedHere, source_of, exchange, user_id, users, pump="pump", login="guest"
            )
            self.assertIn(reason, str(e), (exchange, user_id))

    def test_single_user_without_user_id(self):
        """On a single-user pump, where only the pump may write its xs_ exchange, a message
        without a user id (clients need not set one) is the pump's."""
        self.assertEqual(source_of("xs_pump", None, ["pump"], pump="pump"), "pump")
        self.assertRaises(NotPostedHere, source_of, "xs_alice", None, ["alice"], pump="pump")


async def connect_as(testcase, broker, user):
    """A connection to the memory broker as `user` (None: messages without a user id)."""
    transport = MemoryTransport(broker, reactor, user=user)
    await transport.connect()
    testcase.addCleanup(transport.close)
    return transport


async def post_as(transport, fields, exchange, routing_key=None):
    """Publish a notice (a dict, or raw bytes with routing_key) through `transport`."""
    if isinstance(fields, dict):
        body, routing_key = encode(fields), routing_key or topic(fields["relPath"])
    else:
        body = fields
    await transport.publish(exchange, routing_key, body, Properties())


class SpoofTests(unittest.TestCase):
    async def test_spoofed_source(self):
        """A notice posted on xs_alice whose body claims to come from bob goes through the
        ingest and is delivered as alice's: its report reaches xr_alice and nothing reaches
        xr_bob."""
        base = os.path.abspath(self.mktemp())
        src, dest, state = (os.path.join(base, d) for d in ("src", "dest", "state"))
        credentials = os.path.join(base, "credentials.conf")
        os.makedirs(src)
        with open(credentials, "w"):
            pass
        os.chmod(credentials, 0o600)
        c = await make_container(self, memory_broker=MemoryBroker())
        await c.spawn(ReportRouter, args={"state_dir": os.path.join(base, "router")})
        collector = await c.spawn(Collector)
        for source in ("alice", "bob"):
            await collector.listen(f"xr_{source}")
        await c.spawn(TransferService, args={"credentials": credentials})
        # alice's file: URLs are the test's to allow (the pump's user is another).
        sub = {"name": "sub", "directory": dest, "state_dir": state, "sources": [file_url(src)]}
        await c.spawn(Consumer, args=sub)
        await c.spawn(Ingest, args={"users": ["alice"]})
        data = b"from alice really"
        write_source(src, "s/f.dat", data)
        fields = notice_fields(file_url(src), "s/f.dat", data, source="bob")
        alice = await connect_as(self, c.transport.broker, "alice")
        await post_as(alice, fields, "xs_alice")
        await until(lambda: collector.bodies("xr_alice"))
        await quiet()
        (report,) = collector.bodies("xr_alice")
        self.assertEqual((report["source"], report["report"]["code"]), ("alice", 201))
        self.assertEqual(collector.bodies("xr_bob"), [])
        with open(os.path.join(dest, "s", "f.dat"), "rb") as f:
            self.assertEqual(f.read(), data)


class IngestTests(unittest.TestCase):
    """The Ingest process: xs_<user> exchanges in, xpublic out, source from the broker."""

    async def setUp(self):
        self.broker = MemoryBroker()
        self.clock = task.Clock()
        self.c = await make_container(self, memory_broker=self.broker, clock=self.clock)
        self.collector = await self.c.spawn(Collector)
        for exchange in ("xpublic", "xreport"):
            await self.collector.listen(exchange)
        self.ingest = await self.c.spawn(Ingest, args={"users": ["alice", "bob"]})
        self.alice = await connect_as(self, self.broker, "alice")
        self.bob = await connect_as(self, self.broker, "bob")

    async def test_spoofed_source_restamped(self):
        """A notice on xs_alice claiming to be bob's reaches xpublic as alice's, with the
        routing key it was posted with; one without a source gets one."""
        spoofed = notice_fields("file:///x/", "a/f", b"d", source="bob")
        await post_as(self.alice, spoofed, "xs_alice")
        await post_as(self.bob, notice_fields("file:///x/", "b/g", b"d", source=None), "xs_bob")
        await until(lambda: len(self.collector.bodies("xpublic")) == 2)
        got = {body["relPath"]: (key, body["source"]) for _, key, body in self.collector.got}
        self.assertEqual(got, {"a/f": ("v03.a", "alice"), "b/g": ("v03.b", "bob")})
        stats = await call_op(self.ingest, "stats")
        self.assertEqual((stats["published"], stats["by_source"]), (2, {"alice": 1, "bob": 1}))

    async def test_report_exchanges_declared(self):
        """Each user's xr_ exchange exists once the ingest runs: a source, which may read it
        but not declare it (ion.core.cc.roles), can subscribe to its reports before its
        first post."""
        for user, transport in (("alice", self.alice), ("bob", self.bob)):
            queue = f"q_{user}.reports"
            await transport.declare_queue(queue, exclusive=True, auto_delete=True)
            await transport.bind(queue, f"xr_{user}", "#")

    async def test_invalid_reported_to_source(self):
        """Invalid notices are not passed on: the source named by the exchange gets a 417
        report (also for a body that is not JSON), and the message is acked."""
        bad = notice_fields("file:///x/", "a/f", b"d", size=-1, source="bob")
        await post_as(self.alice, bad, "xs_alice")
        await post_as(self.bob, b"not json", "xs_bob", routing_key="v03.z")
        await until(lambda: len(self.collector.bodies("xreport")) == 2)
        await quiet()
        self.assertEqual(self.collector.bodies("xpublic"), [])
        reports = {body["source"]: (key, body) for _, key, body in self.collector.got}
        key, report = reports["alice"]
        self.assertEqual((key, report["relPath"], report["report"]["code"]), ("v03.a", "a/f", 417))
        self.assertIn("size", report["report"]["message"])
        self.assertIsInstance(report["report_id"], str)
        key, report = reports["bob"]
        self.assertEqual((key, report["report"]["code"]), ("v03.z", 417))
        self.assertEqual(self.ingest.stats["invalid"], 2)
        # `ion status` shows the newest as the ingest's last error.
        failures = self.ingest.op_stats(None, {})["last_failures"]
        self.assertEqual([f["code"] for f in failures], [417, 417])
        self.assertIn("'v03.z' from bob", failures[-1]["reason"] + failures[0]["reason"])

    async def test_other_exchanges_ignored(self):
        """Only the configured users' exchanges are read."""
        await self.collector.post(notice_fields("file:///x/", "c/h", b"d"), "xs_carol")
        await post_as(self.alice, notice_fields("file:///x/", "a/f", b"d"), "xs_alice")
        await until(lambda: self.collector.bodies("xpublic"))
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies("xpublic")], ["a/f"])

    async def test_not_posted_by_the_user(self):
        """A notice on xs_alice is passed on only when alice published it: one from bob, from
        the pump's own login or without a user id is acked and dropped, counted as refused,
        and not reported to anyone."""
        anonymous = await connect_as(self, self.broker, None)
        fields = notice_fields("file:///x/", "a/f", b"d")
        await post_as(self.bob, fields, "xs_alice")
        await self.collector.post(fields, "xs_alice")  # as the pump's login, `ion`
        await post_as(anonymous, fields, "xs_alice")
        await until(lambda: self.ingest.stats["refused"] == 3)
        await quiet()
        self.assertEqual(self.collector.got, [])
        failures = self.ingest.op_stats(None, {})["last_failures"]
        self.assertEqual([f["code"] for f in failures], [403] * 3)
        self.assertEqual(self.ingest.stats["published"], 0)
        queue = "q_ion.ingest.xs_alice"
        self.assertEqual((self.broker.queue_depth(queue), self.broker.unacked(queue)), (0, 0))

    async def test_refusals_logged_sparingly(self):
        """A flood of refused messages (a loop, a misconfigured poster) is one log line, then
        one a minute at most saying how many more there were."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)

        def refusals():
            return [
                formatEvent(e) for e in logged if "refused" in (e.get("log_format") or "")
            ]

        fields = notice_fields("file:///x/", "a/f", b"d")
        for _ in range(50):
            await post_as(self.bob, fields, "xs_alice")
        await until(lambda: self.ingest.stats["refused"] == 50)
        (line,) = refusals()
        self.assertIn("published to xs_alice by 'bob', not by 'alice'", line)
        self.clock.advance(REFUSAL_LOG_INTERVAL)
        await post_as(self.bob, fields, "xs_alice")
        await until(lambda: self.ingest.stats["refused"] == 51)
        self.assertEqual(len(refusals()), 2)
        self.assertIn("49 more refused", refusals()[1])

    async def test_default_user(self):
        """Without `users`, the pump's own user's exchange is read: config ion.apps.pump user,
        else `ion`."""
        ingest = await self.c.spawn(Ingest)
        self.assertEqual(ingest.users, ["ion"])
        config = test_config(**{"ion.apps.pump": {"user": "pumpy"}})
        other = await make_container(self, memory_broker=MemoryBroker(), config=config)
        self.assertEqual((await other.spawn(Ingest)).users, ["pumpy"])

    def test_bad_args(self):
        """Bad args are errors naming the argument."""
        for args, expected in [
            ({"users": "alice"}, "users"),
            ({"users": ["a b"]}, "users"),
            ({"exchange": ""}, "exchange"),
            ({"prefetch": 0}, "prefetch"),
            ({"colour": 1}, "unknown argument 'colour'"),
        ]:
            e = self.assertRaises(ValueError, IngestArgs.parse, args)
            self.assertIn(expected, str(e))


_tags = itertools.count()


class AmqpIngestTests(unittest.TestCase):
    """The ingest on the private RabbitMQ node, posted to by users restricted as on a shared
    pump (rita, ross: own q_ and xs_ only, read on the public exchanges)."""

    async def setUp(self):
        self.broker = get_broker()
        tag = f"ingest{os.getpid()}n{next(_tags)}"
        # Restricted users may read exchanges named x...public, and so bind to them.
        self.public = f"x{tag}public"
        self.xreport = f"xreport{tag}"
        self.queues = [f"q_{tag}.ingest.xs_{u}" for u in self.broker.restricted_users]
        await self.delete_queues()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.delete_queues()))
        self.c = await make_container(self, url=self.broker.url, sysname=tag)
        self.collector = await self.c.spawn(Collector)
        await self.collector.listen(self.public)
        self.ingest = await self.c.spawn(
            Ingest,
            args={
                "user": tag,
                "users": list(self.broker.restricted_users),
                "exchange": self.public,
                "report_exchange": self.xreport,
            },
        )

    async def delete_queues(self):
        await delete_queues(self.broker.url, self.queues)

    async def connect(self, user):
        transport = make_transport(self.broker.url_for(user), reactor)
        await transport.connect()
        self.addCleanup(transport.close)
        return transport

    async def test_exchange_binding_makes_no_loop(self):
        """rita may bind her xs_rita to the public exchange (she writes the one and reads the
        other); the notice she then posts reaches the public exchange once, not again and
        again through the ingest."""
        self.broker.exchange_bind("rita", "xs_rita", self.public, "v03.loopme.#")
        rita = await self.connect("rita")
        fields = notice_fields("file:///x/", "loopme/f", b"d", source=None)
        await post_as(rita, fields, "xs_rita")
        await until(lambda: self.collector.got)
        await quiet(1.0)
        self.assertEqual(
            [(key, body["source"]) for _, key, body in self.collector.got],
            [("v03.loopme", "rita")],
        )
        self.assertEqual((self.ingest.stats["published"], self.ingest.stats["refused"]), (1, 1))

    async def test_only_the_user_posts_to_its_exchange(self):
        """A notice rita publishes to xs_rita is hers; ross may not publish there at all (the
        broker refuses), and one without a user id (which RabbitMQ then does not check) or
        from the pump's own login is refused by the ingest."""
        rita, ross = await self.connect("rita"), await self.connect("ross")
        await post_as(rita, notice_fields("file:///x/", "a/f", b"d", source="ross"), "xs_rita")
        await until(lambda: self.collector.got)
        refused = post_as(ross, notice_fields("file:///x/", "b/f", b"d"), "xs_rita")
        e = await self.assertFailure(defer.Deferred.fromCoroutine(refused), TransportError)
        self.assertIn("ACCESS_REFUSED", str(e))
        body = encode(notice_fields("file:///x/", "c/f", b"d"))
        await threads.deferToThread(self.broker.publish_raw, "rita", "xs_rita", "v03.c", body)
        await self.collector.post(notice_fields("file:///x/", "d/f", b"d"), "xs_rita")
        await until(lambda: self.ingest.stats["refused"] == 2)
        await quiet()
        self.assertEqual(
            [(body["relPath"], body["source"]) for body in self.collector.bodies()],
            [("a/f", "rita")],
        )

    async def test_routing_key_not_utf8(self):
        """A notice posted with a routing key that is not UTF-8 (RabbitMQ passes any bytes
        on) is an invalid notice: a 417 report to its poster, nothing passed on, no error."""
        await self.collector.listen(self.xreport)
        body = encode(notice_fields("file:///x/", "s/f", b"d"))
        await threads.deferToThread(
            self.broker.publish_raw, "rita", "xs_rita", b"v03.s\xff", body, user_id="rita"
        )
        await until(lambda: self.collector.bodies(self.xreport))
        await quiet()
        (report,) = self.collector.bodies()
        self.assertEqual((report["source"], report["report"]["code"]), ("rita", 417))
        self.assertIn("routing key", report["report"]["message"])
        self.assertEqual(self.ingest.stats["invalid"], 1)
