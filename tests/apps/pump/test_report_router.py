"""The report router: each report to its source's xr_ exchange only, once."""

import gc
import json
import os

from twisted.internet import defer, task
from twisted.trial import unittest

from ion.apps.pump.args import ReportRouterArgs
from ion.apps.pump.dupcache import digest
from ion.apps.pump.report_router import CATCH_UP_TIMEOUT, ReportRouter
from ion.core.cc.testing import make_container
from ion.core.messaging.transport import ConnectionLost, TransportError
from tests.apps.pump.fixtures import Collector, notice_fields, until
from tests.apps.pump.test_consumer import OnMemory, OnPrivateRabbitMQ


def report(rel_path="a/f.dat", code=201, source="alice", report_id="r1", **extra):
    fields = notice_fields("http://h/", rel_path, b"x", source=source, **extra)
    fields["report"] = {"code": code, "timeCompleted": "20260101T000000", "message": "m"}
    if report_id is not None:
        fields["report_id"] = report_id
    return fields


class _Unacked:
    """A delivery whose ack is lost."""

    def __init__(self, delivery):
        self._delivery = delivery

    def __getattr__(self, name):
        return getattr(self._delivery, name)

    def ack(self):
        pass

    def nack(self, requeue=True):
        pass


class CrashingRouter(ReportRouter):
    """Dies, in effect, once the broker took a forwarded report: the id is never written down,
    the report never acked, the copy on the sent queue never read."""

    def on_init(self):
        super().on_init()
        self.seen.add = lambda key, flush=True: None

    def _on_sent(self, delivery):
        pass

    def _on_delivery(self, delivery):
        return super()._on_delivery(_Unacked(delivery))


class UnconfirmedRouter(ReportRouter):
    """Its forwards fail as when the broker dies before confirming them; the report is not
    given back before the router goes (the connection that went would have)."""

    async def publish(self, exchange, routing_key, body, headers=None, **kw):
        if exchange.startswith("xr_"):
            raise ConnectionLost("the broker went before it confirmed")
        return await super().publish(exchange, routing_key, body, headers=headers, **kw)

    def _on_delivery(self, delivery):
        return super()._on_delivery(_Unacked(delivery))


class LateReadingRouter(ReportRouter):
    """Reads the copies on its sent queue only when a marker comes through, as if they arrived
    after the report they are copies of (the broker keeps their order, not when they come)."""

    def on_init(self):
        super().on_init()
        self.held = []

    def _on_sent(self, delivery):
        if "marker" not in delivery.properties.headers:
            self.held.append(delivery)
            return
        held, self.held = self.held, []
        for copy in held:
            super()._on_sent(copy)
        super()._on_sent(delivery)


class AckCheckingRouter(ReportRouter):
    """Notes, as each copy from its sent queue is acked, whether its report_id is in its file
    then."""

    def on_init(self):
        super().on_init()
        self.acked = []  # (report_id, in the file when acked)

    def _on_sent(self, delivery):
        router = self

        class Checked:
            def __getattr__(self, name):
                return getattr(delivery, name)

            def ack(self):
                rid = delivery.properties.headers.get("report_id")
                router.acked.append((rid, router.in_file(rid)))
                delivery.ack()

        return super()._on_sent(Checked())

    def _write_log(self, fields, delivery, source, code, outcome):
        if self.logged is not None:
            rid = (fields or {}).get("report_id")
            self.logged.append((rid, outcome, self.in_file(rid)))
        return super()._write_log(fields, delivery, source, code, outcome)

    def in_file(self, rid):
        """Whether the router's file of seen ids holds C{rid} (as its digest)."""
        with open(self.seen.path) as f:
            return digest(rid).hex() in f.read()

    logged = None  # (report_id, outcome, in the file when logged), set by a test


class RouterScenarios:
    """Scenarios every transport must pass, written against the hooks of `OnMemory` (the
    private RabbitMQ's give each test its own report exchange)."""

    def setUp(self):
        self.xreport = self.name("xreport")

    async def container(self, **kw):
        if not hasattr(self, "_broker"):
            self._broker = self.new_broker()
        kw.setdefault("sysname", self.name("test"))
        return await make_container(self, url=self.url, memory_broker=self._broker, **kw)

    async def start(self, container=None, cls=ReportRouter, **args):
        self.state = getattr(self, "state", None) or os.path.abspath(self.mktemp())
        c = container or await self.container()
        args.setdefault("state_dir", self.state)
        args.setdefault("exchange", self.xreport)
        router = await c.spawn(cls, args=args)
        self.router_queue = router.queue
        self.durable_queues.update((router.queue, router.sent_queue))
        if not hasattr(self, "collector"):
            self.collector = await c.spawn(Collector)
            for source in ("alice", "bob"):
                await self.collector.listen(f"xr_{source}")
        return router

    async def settle(self, timeout=10.0):
        """Wait until every report in the router's queue is settled."""
        seen = []

        async def settled():
            seen.append(await self.queue_counts(self.router_queue))
            return seen[-1] == (0, 0)

        await until(
            settled, timeout, lambda _: f"router queue (ready, unacked) {seen[-1]} to be (0, 0)",
            interval=self.poll,
        )

    async def test_routes_by_source(self):
        """A report goes to xr_<source> with its routing key, and to no other source; counters
        are kept per source and code."""
        router = await self.start()
        await self.collector.post(report("a/f.dat", source="alice", report_id="1"), self.xreport)
        await self.collector.post(report("b/g.dat", 404, "bob", "2"), self.xreport)
        await self.collector.post(report("b/h.dat", 201, "bob", "3"), self.xreport)
        await until(lambda: len(self.collector.got) == 3)
        await self.quiet()
        self.assertEqual(
            [
                (ex, key, body["relPath"])
                for ex, key, body in self.collector.got
                if ex == "xr_alice"
            ],
            [("xr_alice", "v03.a", "a/f.dat")],
        )
        self.assertEqual(len(self.collector.bodies("xr_bob")), 2)
        stats = await self.collector.rpc(router.pid, "stats")
        self.assertEqual(stats["by_source"], {"alice": {"201": 1}, "bob": {"404": 1, "201": 1}})
        self.assertEqual(stats["forwarded"], 3)

    async def test_duplicate_report_id_dropped(self):
        """A report whose report_id was forwarded already is dropped, also after a restart of
        the router (the ids are kept on disk); reports without an id are always forwarded."""
        router = await self.start()
        await self.collector.post(report(report_id="same"), self.xreport)
        await self.collector.post(report(report_id="same"), self.xreport)
        await self.collector.post(report(report_id=None), self.xreport)
        await self.collector.post(report(report_id=None), self.xreport)
        await until(lambda: router.stats["received"] == 4)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 3)
        self.assertEqual(router.stats["duplicates"], 1)
        await router.terminate()
        again = await self.start()
        await self.collector.post(report(report_id="same"), self.xreport)
        await until(lambda: again.stats["duplicates"] == 1)
        await self.quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 3)

    async def test_maybe_sent_reads_the_sent_queue_first(self):
        """A report marked maybe_sent (a consumer's report that may repeat one it published to
        xr_<source> itself) is decided once the sent queue is read up to now: the copy there
        makes it a duplicate, however late it is read, and is counted and logged as
        forwarded."""
        log = os.path.join(os.path.abspath(self.mktemp()), "reports.jsonl")
        router = await self.start(cls=LateReadingRouter, log_path=log)
        await router.bind(router.sent_queue, "xr_alice", "#")
        body = json.dumps(report(report_id="r1")).encode()
        direct = {"report_id": "r1", "direct": router.sent_queue}
        await self.collector.publish("xr_alice", "v03.a", body, headers=direct)
        maybe = {"report_id": "r1", "maybe_sent": True}
        await self.collector.publish(self.xreport, "v03.a", body, headers=maybe)
        await until(lambda: router.stats["duplicates"] == 1)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 1)
        self.assertEqual(router.stats["forwarded"], 1)
        self.assertEqual(router.stats["by_source"], {"alice": {"201": 1}})
        with open(log) as f:
            outcomes = [json.loads(line)["outcome"] for line in f]
        self.assertEqual(outcomes, ["forwarded", "duplicate"])

    async def publish_direct(self, router, count):
        """Publish C{count} reports to xr_alice as a consumer does itself (a copy on the
        router's sent queue, its id in C{report_id}: r0, r1...), and wait until the
        L{AckCheckingRouter} acked every copy."""
        await router.bind(router.sent_queue, "xr_alice", "#")
        for n in range(count):
            body = json.dumps(report(f"a/f{n}.dat", report_id=f"r{n}")).encode()
            direct = {"report_id": f"r{n}", "direct": router.sent_queue}
            await self.collector.publish("xr_alice", "v03.a", body, headers=direct)
        await until(lambda: len(router.acked) == count)

    async def test_copies_acked_once_written_down(self):
        """The ids of copies read from the sent queue (consumers' reports straight to their
        source) are in the router's file by the time each copy is acked, several arriving
        together as well: a crash after the ack cannot lose one."""
        router = await self.start(cls=AckCheckingRouter)
        await self.publish_direct(router, 5)
        self.assertEqual(sorted(router.acked), [(f"r{n}", True) for n in range(5)])
        self.assertEqual(router.stats["forwarded"], 5)

    async def test_copies_logged_once_written_down(self):
        """A copy is logged as forwarded only once its id is in the router's file: a router
        killed in between reads the copy again and logs it then, not twice."""
        log = os.path.join(os.path.abspath(self.mktemp()), "reports.jsonl")
        router = await self.start(cls=AckCheckingRouter, log_path=log)
        router.logged = []
        await self.publish_direct(router, 3)
        self.assertEqual(sorted(router.logged), [(f"r{n}", "forwarded", True) for n in range(3)])

    async def test_crash_after_publish(self):
        """A router dying after the broker took a forwarded report, before it wrote the id down
        or acked: the next router gets the report again, reads its sent queue up to a marker,
        finds the broker's copy there and drops the report. The source hears once."""
        crashing = await self.start(cls=CrashingRouter)
        await self.collector.post(report(report_id="once"), self.xreport)
        await until(lambda: self.collector.bodies("xr_alice"))
        await crashing.terminate()
        router = await self.start(cls=LateReadingRouter)
        await until(lambda: router.stats["duplicates"] == 1)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 1)
        self.assertEqual(router.stats["forwarded"], 0)

    async def test_unconfirmed_forward_after_restart(self):
        """A forward the broker never confirmed, its copy kept on the sent queue and not at the
        source: the next router, started on the same directory before the report came back,
        forwards it when it does (the copy proves nothing), and the source hears once."""
        failing = await self.start(cls=UnconfirmedRouter)
        await self.collector.post(report(report_id="unsure"), self.xreport)
        await until(lambda: "unsure" in failing._unsure)
        await failing.terminate()
        # What the broker kept of the forward: the copy on the sent queue, none at the source.
        body = json.dumps(report(report_id="unsure")).encode()
        await self.collector.publish(
            failing.marker_exchange, "v03.a", body, headers={"report_id": "unsure"}
        )
        router = await self.start(cls=LateReadingRouter)
        await until(lambda: router.stats["forwarded"] == 1)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 1)
        self.assertEqual(router.stats["duplicates"], 0)

    async def test_catch_up_not_published(self):
        """A marker that cannot be published (the connection went) fails the catch-up at
        once, the report going back to the queue, and leaves no wait behind to fail unheard
        when its time is up."""
        clock = task.Clock()
        router = await self.start(await self.container(clock=clock))

        async def not_connected(*args, **kwargs):
            raise TransportError("not connected (reconnecting)")

        router.publish = not_connected
        with self.assertRaises(TransportError):
            await router._catch_up()
        self.assertEqual(router._markers, {})
        clock.advance(CATCH_UP_TIMEOUT + 1)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(defer.TimeoutError), [])

    async def test_unroutable_and_invalid(self):
        """A report without a usable source, or a body that is not a report, is logged, acked
        and counted; routing carries on."""
        router = await self.start()
        await self.collector.post(report(source=None, report_id="a"), self.xreport)
        await self.collector.post(report(source="../evil", report_id="b"), self.xreport)
        await self.collector.post(b"not json", self.xreport, "v03")
        await self.collector.post({"relPath": "x", "source": "alice"}, self.xreport)
        await self.collector.post(report(report_id="c"), self.xreport)
        await until(lambda: self.collector.bodies("xr_alice"))
        await self.settle()
        self.assertEqual((router.stats["unroutable"], router.stats["invalid"]), (2, 2))
        self.assertEqual(len(self.collector.bodies("xr_alice")), 1)

    async def test_only_source_routes(self):
        """Routing follows the source field the pump's ingest stamped and nothing else: other
        fields naming another user do not copy the report to that user's exchange."""
        await self.start()
        await self.collector.post(
            report(source="alice", report_id="x", to_clusters="bob", from_cluster="bob"),
            self.xreport,
        )
        await until(lambda: self.collector.bodies("xr_alice"))
        await self.quiet()
        self.assertEqual(self.collector.bodies("xr_bob"), [])

    async def test_report_log(self):
        """With log_path, every report handled is one JSON line in the log."""
        log_path = os.path.join(os.path.abspath(self.mktemp()), "reports.log")
        router = await self.start(log_path=log_path)
        await self.collector.post(report(report_id="1"), self.xreport)
        await self.collector.post(report(report_id="1"), self.xreport)
        await self.collector.post(report(source=None, report_id="2"), self.xreport)
        await until(lambda: router.stats["received"] == 3)
        await self.settle()
        with open(log_path) as f:
            lines = [(line["source"], line["code"], line["outcome"]) for line in map(json.loads, f)]
        # Reports are handled concurrently: only a copy's order after its first is certain.
        expected = [
            ("alice", 201, "forwarded"),
            ("alice", 201, "duplicate"),
            (None, 201, "unroutable"),
        ]
        self.assertEqual(sorted(lines, key=repr), sorted(expected, key=repr))
        self.assertLess(
            lines.index(("alice", 201, "forwarded")), lines.index(("alice", 201, "duplicate"))
        )

    async def test_report_log_rotated(self):
        """The report log is rotated at log_max_bytes, keeping log_keep old files: its size
        stays bounded however long the pump runs, and no line is lost or split."""
        log_path = os.path.join(os.path.abspath(self.mktemp()), "reports.log")
        router = await self.start(log_path=log_path, log_max_bytes=400, log_keep=2)
        for n in range(12):
            await self.collector.post(report(report_id=str(n)), self.xreport)
        await until(lambda: router.stats["received"] == 12)
        await self.settle()
        directory = os.path.dirname(log_path)
        self.assertEqual(sorted(os.listdir(directory)),
                         ["reports.log", "reports.log.1", "reports.log.2"])
        ids = []
        for name in ("reports.log.2", "reports.log.1", "reports.log"):
            with open(os.path.join(directory, name)) as f:
                ids += [json.loads(line)["report_id"] for line in f]
            if name != "reports.log":
                self.assertLess(os.path.getsize(os.path.join(directory, name)), 400 + 300)
        # The newest lines are all there; only the oldest files were dropped.
        self.assertEqual(len(set(ids)), len(ids))
        self.assertLess(len(ids), 12)
        self.assertIn("11", ids)

    async def test_report_log_unencodable_text(self):
        """A relPath or message holding a lone surrogate (what undecodable bytes in a file
        name become) is written to the log escaped: its line is there, one JSON object that
        reads back as the text the report carried, and the report is still forwarded."""
        log_path = os.path.join(os.path.abspath(self.mktemp()), "reports.log")
        router = await self.start(log_path=log_path)
        odd = "s/a\udcff\ud800.txt"
        forwarded = report(odd, report_id="1")
        forwarded["report"]["message"] = "no \udcfe"
        await self.collector.post(forwarded, self.xreport)
        await self.collector.post(report(odd, source=None, report_id="2"), self.xreport)
        await until(lambda: router.stats["received"] == 2)
        await self.settle()
        with open(log_path, "rb") as f:
            lines = [json.loads(line) for line in f.read().splitlines()]
        got = sorted((line["outcome"], line["relPath"], line["message"]) for line in lines)
        self.assertEqual(got, [("forwarded", odd, "no \udcfe"), ("unroutable", odd, "m")])
        (copy,) = self.collector.bodies("xr_alice")
        self.assertEqual(copy["relPath"], odd)


class MemoryRouterTests(OnMemory, RouterScenarios, unittest.TestCase):
    """The scenarios on the memory:// transport."""


class AmqpRouterTests(OnPrivateRabbitMQ, RouterScenarios, unittest.TestCase):
    """The same scenarios on the private RabbitMQ node."""


class ArgsTests(unittest.SynchronousTestCase):
    def test_bad_args(self):
        for args, text in [
            ({"exchange": "x y"}, "exchange"),
            ({"dup_ttl": 0}, "dup_ttl"),
            ({"routes": {}}, "unknown argument 'routes'"),
        ]:
            e = self.assertRaises(ValueError, ReportRouterArgs.parse, args)
            self.assertIn(text, str(e))
