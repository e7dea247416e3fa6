"""The report router: each report to its source's xr_ exchange only, once."""

import json
import os

from twisted.trial import unittest

from ion.apps.pump.report_router import ReportRouter, check_args
from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from tests.apps.pump.fixtures import Collector, notice_fields, quiet, until


def report(rel_path="a/f.dat", code=201, source="alice", report_id="r1", **extra):
    fields = notice_fields("http://h/", rel_path, b"x", source=source, **extra)
    fields["report"] = {"code": code, "timeCompleted": "20260101T000000", "message": "m"}
    if report_id is not None:
        fields["report_id"] = report_id
    return fields


class RouterScenarios:
    """Scenarios every transport must pass. Subclasses set `url` and `new_broker()`."""

    url = "memory://"

    def new_broker(self):
        return MemoryBroker()

    async def container(self, **kw):
        if not hasattr(self, "_broker"):
            self._broker = self.new_broker()
        return await make_container(self, url=self.url, memory_broker=self._broker, **kw)

    async def start(self, container=None, **args):
        self.state = getattr(self, "state", None) or os.path.abspath(self.mktemp())
        c = container or await self.container()
        args.setdefault("state_dir", self.state)
        router = await c.spawn(ReportRouter, args=args)
        if not hasattr(self, "collector"):
            self.collector = await c.spawn(Collector)
            for source in ("alice", "bob"):
                await self.collector.listen(f"xr_{source}")
        return router

    def settled(self):
        queue = "q_ion.report_router"
        return self._broker.queue_depth(queue) == 0 and self._broker.unacked(queue) == 0

    async def test_routes_by_source(self):
        """A report goes to xr_<source> with its routing key, and to no other source; counters
        are kept per source and code."""
        router = await self.start()
        await self.collector.post(report("a/f.dat", source="alice", report_id="1"), "xreport")
        await self.collector.post(report("b/g.dat", 404, "bob", "2"), "xreport")
        await self.collector.post(report("b/h.dat", 201, "bob", "3"), "xreport")
        await until(lambda: len(self.collector.got) == 3)
        await quiet()
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
        await self.collector.post(report(report_id="same"), "xreport")
        await self.collector.post(report(report_id="same"), "xreport")
        await self.collector.post(report(report_id=None), "xreport")
        await self.collector.post(report(report_id=None), "xreport")
        await until(lambda: router.stats["received"] == 4)
        await until(self.settled)
        await quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 3)
        self.assertEqual(router.stats["duplicates"], 1)
        await router.terminate()
        again = await self.start()
        await self.collector.post(report(report_id="same"), "xreport")
        await until(lambda: again.stats["duplicates"] == 1)
        await quiet()
        self.assertEqual(len(self.collector.bodies("xr_alice")), 3)

    async def test_unroutable_and_invalid(self):
        """A report without a usable source, or a body that is not a report, is logged, acked
        and counted; routing carries on."""
        router = await self.start()
        await self.collector.post(report(source=None, report_id="a"), "xreport")
        await self.collector.post(report(source="../evil", report_id="b"), "xreport")
        await self.collector.post(b"not json", "xreport", "v03")
        await self.collector.post({"relPath": "x", "source": "alice"}, "xreport")
        await self.collector.post(report(report_id="c"), "xreport")
        await until(lambda: self.collector.bodies("xr_alice"))
        await until(self.settled)
        self.assertEqual((router.stats["unroutable"], router.stats["invalid"]), (2, 2))
        self.assertEqual(len(self.collector.bodies("xr_alice")), 1)

    async def test_only_source_routes(self):
        """Routing follows the source field the pump's ingest stamped and nothing else: other
        fields naming another user do not copy the report to that user's exchange."""
        await self.start()
        await self.collector.post(
            report(source="alice", report_id="x", to_clusters="bob", from_cluster="bob"),
            "xreport",
        )
        await until(lambda: self.collector.bodies("xr_alice"))
        await quiet()
        self.assertEqual(self.collector.bodies("xr_bob"), [])

    async def test_report_log(self):
        """With log_path, every report handled is one JSON line in the log."""
        log_path = os.path.join(os.path.abspath(self.mktemp()), "reports.log")
        router = await self.start(log_path=log_path)
        await self.collector.post(report(report_id="1"), "xreport")
        await self.collector.post(report(report_id="1"), "xreport")
        await self.collector.post(report(source=None, report_id="2"), "xreport")
        await until(lambda: router.stats["received"] == 3)
        await until(self.settled)
        with open(log_path) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual(
            [(line["source"], line["code"], line["outcome"]) for line in lines],
            [("alice", 201, "forwarded"), ("alice", 201, "duplicate"), (None, 201, "unroutable")],
        )


class MemoryRouterTests(RouterScenarios, unittest.TestCase):
    """The scenarios on the memory:// transport."""


class ArgsTests(unittest.SynchronousTestCase):
    def test_bad_args(self):
        for args, text in [
            ({"exchange": "x y"}, "exchange"),
            ({"dup_ttl": 0}, "dup_ttl"),
            ({"routes": {}}, "unknown argument 'routes'"),
        ]:
            e = self.assertRaises(ValueError, check_args, args)
            self.assertIn(text, str(e))
