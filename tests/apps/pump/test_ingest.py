"""Ingest: a notice's source comes from the broker, never from its body."""

import os

from twisted.trial import unittest

from ion.apps.pump.consumer import Consumer
from ion.apps.pump.ingest import UnknownSource, source_of, stamp_source
from ion.apps.pump.notice import Notice
from ion.apps.pump.report_router import ReportRouter
from ion.apps.pump.transfer_service import TransferService
from ion.core.cc.testing import make_container
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


class Ingest(Collector):
    """What the ingest process will do, in its smallest form: take notices posted on xs_
    exchanges, stamp their source, pass them on to xpublic."""

    async def ingest(self, exchange):
        await self.subscribe(exchange, ["#"], self._stamp, durable=True)

    async def _stamp(self, delivery):
        notice = Notice.from_json(delivery.body)
        stamp_source(notice, delivery.exchange, delivery.properties.user_id)
        await self.publish("xpublic", delivery.routing_key, notice.to_json(), declare="topic")
        delivery.ack()


class SpoofTests(unittest.TestCase):
    async def test_spoofed_source(self):
        """A notice posted on xs_alice whose body claims to come from bob is delivered as
        alice's: its report reaches xr_alice and nothing reaches xr_bob."""
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
        await c.spawn(Consumer, args={"name": "sub", "directory": dest, "state_dir": state})
        ingest = await c.spawn(Ingest)
        await ingest.ingest("xs_alice")
        data = b"from alice really"
        write_source(src, "s/f.dat", data)
        fields = notice_fields(file_url(src), "s/f.dat", data, source="bob")
        await ingest.post(fields, exchange="xs_alice")
        await until(lambda: collector.bodies("xr_alice"))
        await quiet()
        (report,) = collector.bodies("xr_alice")
        self.assertEqual((report["source"], report["report"]["code"]), ("alice", 201))
        self.assertEqual(collector.bodies("xr_bob"), [])
        with open(os.path.join(dest, "s", "f.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
