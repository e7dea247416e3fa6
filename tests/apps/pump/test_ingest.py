"""Ingest: a notice's source comes from the broker, never from its body."""

import os

from twisted.trial import unittest

from ion.apps.pump.consumer import Consumer
from ion.apps.pump.ingest import Ingest, UnknownSource, check_args, source_of, stamp_source
from ion.apps.pump.notice import Notice
from ion.apps.pump.report_router import ReportRouter
from ion.apps.pump.transfer_service import TransferService
from ion.core.cc.testing import call_op, make_container, test_config
from ion.core.messaging.memory import MemoryBroker
from tests.apps.pump.fixtures import (
    Collector,
    file_url,
    notice_fields,
    quiet,
    until,
    write_source,
)


class StampTests(unittest.SynchronousTestCase):
    def test_source_of(self):
        """The xs_<user> exchange names the source; the broker-validated user id does when the
        exchange is not a user's (or confirms a user name holding '_')."""
        table = [
            ("xs_alice", None, "alice"),
            ("xs_alice", "alice", "alice"),
            ("xs_alice_feed", None, "alice"),
            ("xs_alice_feed", "pumpadmin", "alice"),
            ("xs_guest_sr3bench_1", "guest_sr3bench", "guest_sr3bench"),
            ("xs_alice", "mallory", "alice"),
            ("xpublic", "bob", "bob"),
            ("amq.topic", "carol", "carol"),
        ]
        for exchange, user_id, source in table:
            self.assertEqual(source_of(exchange, user_id), source, (exchange, user_id))

    def test_unknown(self):
        """Without an xs_ exchange or a usable user id there is no source: a 417 error."""
        for exchange, user_id in [("xpublic", None), ("xs_", None), ("xpublic", "a/b")]:
            e = self.assertRaises(UnknownSource, source_of, exchange, user_id)
            self.assertEqual(e.code, 417)

    def test_stamp_overwrites_body(self):
        """stamp_source replaces whatever source the body claimed (or adds one)."""
        notice = Notice({"relPath": "a/f", "source": "bob"})
        self.assertIs(stamp_source(notice, "xs_alice", "alice"), notice)
        self.assertEqual(notice.source, "alice")
        bare = stamp_source(Notice({"relPath": "a/f"}), "xpublic", "carol")
        self.assertEqual(bare.source, "carol")


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
        await collector.post(fields, exchange="xs_alice")
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
        self.c = await make_container(self, memory_broker=MemoryBroker())
        self.collector = await self.c.spawn(Collector)
        for exchange in ("xpublic", "xreport"):
            await self.collector.listen(exchange)
        self.ingest = await self.c.spawn(Ingest, args={"users": ["alice", "bob"]})

    async def test_spoofed_source_restamped(self):
        """A notice on xs_alice claiming to be bob's reaches xpublic as alice's, with the
        routing key it was posted with; one without a source gets one."""
        await self.collector.post(
            notice_fields("file:///x/", "a/f", b"d", source="bob"), "xs_alice"
        )
        await self.collector.post(notice_fields("file:///x/", "b/g", b"d", source=None), "xs_bob")
        await until(lambda: len(self.collector.bodies("xpublic")) == 2)
        got = {body["relPath"]: (key, body["source"]) for _, key, body in self.collector.got}
        self.assertEqual(got, {"a/f": ("v03.a", "alice"), "b/g": ("v03.b", "bob")})
        stats = await call_op(self.ingest, "stats")
        self.assertEqual((stats["published"], stats["by_source"]), (2, {"alice": 1, "bob": 1}))

    async def test_invalid_reported_to_source(self):
        """Invalid notices are not passed on: the source named by the exchange gets a 417
        report (also for a body that is not JSON), and the message is acked."""
        bad = notice_fields("file:///x/", "a/f", b"d", size=-1, source="bob")
        await self.collector.post(bad, "xs_alice")
        await self.collector.post(b"not json", "xs_bob", routing_key="v03.z")
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

    async def test_other_exchanges_ignored(self):
        """Only the configured users' exchanges are read."""
        await self.collector.post(notice_fields("file:///x/", "c/h", b"d"), "xs_carol")
        await self.collector.post(notice_fields("file:///x/", "a/f", b"d"), "xs_alice")
        await until(lambda: self.collector.bodies("xpublic"))
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies("xpublic")], ["a/f"])

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
            e = self.assertRaises(ValueError, check_args, args)
            self.assertIn(expected, str(e))
