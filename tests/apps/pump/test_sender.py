"""The sender: files announced by notices pushed to sftp, ftp and file destinations, with
reports, retries and post_exchange."""

import base64
import hashlib
import itertools
import json
import os
import time

from twisted.internet import reactor, task
from twisted.trial import unittest

from ion.apps.pump import app as pump_app
from ion.apps.pump.args import SenderArgs
from ion.apps.pump.notice import block_notices
from ion.apps.pump.sender import Sender
from ion.apps.pump.transfer import sftp as sftp_scheme
from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from tests.apps.pump.fixtures import Collector, file_url, notice_fields
from tests.apps.pump.servers import (
    leftovers,
    settle,
    start_ftp,
    start_http,
    start_sftp,
    write_file,
)
from tests.broker import get_broker, skip_or_fail_without_rabbitmq
from tests.waiting import quiet, until

_tags = itertools.count(1)
BLOCK = 256 * 1024  # block sizes of the tests of sends in blocks


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


class SenderScenarios:
    """Scenarios on each transport (hooks: C{url}, C{broker})."""

    async def setUp(self):
        self.tag = f"s{os.getpid()}x{next(_tags)}"
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.c = await make_container(
            self, url=self.url, memory_broker=self.broker, clock=self.clock
        )
        self.user = self.c.transport.user
        self.xpublic, self.xreport, self.xpost = (
            f"{x}_{self.tag}" for x in ("xpublic", "xreport", "xpost")
        )
        self.collector = await self.c.spawn(Collector)
        for exchange in (self.xreport, self.xpost):
            await self.collector.listen(exchange)
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        self.remote = os.path.join(self.base, "remote")
        os.makedirs(os.path.join(self.remote, "obs"))
        self.credentials = write_file(os.path.join(self.base, "credentials.conf"), b"")
        os.chmod(self.credentials, 0o600)

    async def start(self, destination, **args):
        args = dict(
            {"name": self.tag, "exchange": self.xpublic, "destination": destination,
             "state_dir": os.path.join(self.base, "state"), "report_exchange": self.xreport,
             "post_exchange": self.xpost, "transfer": {"credentials": self.credentials},
             "retry_initial": 1, "retry_jitter": 0},
            **args,
        )
        proc = await self.c.spawn(Sender, args=args)
        self.addCleanup(lambda: None if proc.lifecycle.final else proc.terminate())
        return proc

    async def post(self, rel, data):
        """Write C{src/rel} and publish its notice (from the pump's own user, whose file: URLs
        a subscription trusts)."""
        os.makedirs(os.path.dirname(os.path.join(self.src, rel)), exist_ok=True)
        path = write_file(os.path.join(self.src, rel), data)
        fields = notice_fields(file_url(self.src), rel, data, source=self.user)
        await self.collector.post(fields, exchange=self.xpublic)
        return path

    def reports(self):
        return [(b["relPath"], b["report"]["code"]) for b in self.collector.bodies(self.xreport)]

    async def test_file_destination(self):
        """A file sent to a file: destination arrives whole under its mirrored path; its source
        gets one 201 report; post_exchange announces it where it went."""
        await self.start("file:" + self.remote + "/")
        await self.post("obs/new/a.txt", b"hello")
        await until(lambda: self.reports(), what="a report")
        await quiet(0.1)
        self.assertEqual(self.reports(), [("obs/new/a.txt", 201)])
        with open(os.path.join(self.remote, "obs", "new", "a.txt"), "rb") as f:
            self.assertEqual(f.read(), b"hello")
        (posted,) = self.collector.bodies(self.xpost)
        self.assertEqual(posted["baseUrl"], file_url(self.remote).rstrip("/"))
        self.assertEqual(posted["relPath"], "obs/new/a.txt")
        self.assertEqual(posted["identity"], {"method": "sha512", "value": sha512(b"hello")})

    async def test_block_notices_refused(self):
        """The notices of a file announced in blocks are each refused with one 422 report, and
        nothing is written at the destination: a sender sends whole files only."""
        await self.start("file:" + self.remote + "/")
        data = b"0123456789" * 1000
        os.makedirs(self.src, exist_ok=True)
        write_file(os.path.join(self.src, "big.bin"), data)
        fields = notice_fields(file_url(self.src), "big.bin", data, source=self.user)
        step = 4096
        parts = [data[i:i + step] for i in range(0, len(data), step)]
        for one in block_notices(fields, step, [(len(p), sha512(p)) for p in parts]):
            await self.collector.post(one, exchange=self.xpublic)
        await until(lambda: len(self.reports()) == len(parts), what="a report per block")
        await quiet(0.1)
        self.assertEqual(self.reports(), [("big.bin", 422)] * len(parts))
        self.assertEqual([files for _, _, files in os.walk(self.remote) if files], [])

    async def test_sftp_destination_down_then_up(self):
        """To sftp (a conch server on loopback): with the server down the file waits in the
        retry queue; once the server is up it is delivered, with one 201 report; no temporary
        file is left at the destination."""
        server = self.sftp_server()
        port = server.port.getHost().port
        await server.port.stopListening()
        proc = await self.start(f"sftp://bob@127.0.0.1:{port}/obs/", strip=1)
        await self.post("x/b.bin", b"b" * 100_000)
        await until(lambda: proc.stats["retrying"] == 1, what="a retry")
        self.assertEqual(self.reports(), [])
        server.port = reactor.listenTCP(port, server.factory, interface="127.0.0.1")
        await self.retried_until_reported()
        await quiet(0.1)
        self.assertEqual(self.reports(), [("x/b.bin", 201)])
        self.assertEqual(os.listdir(os.path.join(self.remote, "obs")), ["b.bin"])

    async def test_sftp_down_retry_bursts(self):
        """With the sftp server down, the files wait in the retry queue while the link is tried
        in bursts (3 tries 3 s apart, then a 30 s pause: no try in it), one try for all the
        files; once the server is back every file is delivered with one 201 report. The
        heartbeat says the link is down, then up, and is pushed to the destination."""
        server = self.sftp_server()
        port = server.port.getHost().port
        await server.port.stopListening()
        proc = await self.start(f"sftp://bob@127.0.0.1:{port}/obs/", strip=1, retry_burst=3,
                                retry_burst_gap=3, retry_pause=30, heartbeat=5,
                                heartbeat_remote=True)
        names = [f"x/f{n}.bin" for n in range(3)]
        for name in names:
            await self.post(name, name.encode() * 1000)
        await until(lambda: proc.stats["retrying"] == 3, what="three files waiting")
        self.assertEqual((proc.link.state, proc.link.tries), ("down", 1))
        for tries in (2, 3):
            self.clock.advance(3)
            await until(lambda: proc.link.tries == tries, what=f"try {tries}")
        for _ in range(3):  # inside the pause: nobody tries
            self.clock.advance(3)
            await quiet(0.05)
        self.assertEqual((proc.link.tries, self.reports()), (3, []))
        await until(lambda: proc.heartbeat.last and proc.heartbeat.last["link"] == "down",
                    what="a heartbeat saying the link is down")
        server.port = reactor.listenTCP(port, server.factory, interface="127.0.0.1")
        self.clock.advance(30 - 9)
        await until(lambda: len(self.reports()) == 3, what="three reports")
        await quiet(0.1)
        self.assertEqual(sorted(self.reports()), [(name, 201) for name in names])
        self.assertEqual((proc.link.state, proc.stats["retrying"]), ("up", 0))
        self.clock.advance(5)
        remote = os.path.join(self.remote, "obs", f"{self.tag}.heartbeat")

        def pushed():
            try:
                with open(remote) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None

        # (A beat written as the link came back may have gone out with 0 files done.)
        await until(lambda: (pushed() or {}).get("files_done") == 3,
                    what="the heartbeat at the destination")
        self.assertEqual(pushed()["link"], "up")
        self.assertEqual(sorted(n for n in os.listdir(os.path.join(self.remote, "obs"))
                                if n.endswith(".bin")), ["f0.bin", "f1.bin", "f2.bin"])

    async def test_sftp_file_op_retried(self):
        """A removal while the sftp server is down waits in the retry queue and is carried
        out once the server is back, with one 201 report."""
        server = self.sftp_server()
        port = server.port.getHost().port
        proc = await self.start(f"sftp://bob@127.0.0.1:{port}/")
        await self.post("r/a", b"data")
        await until(lambda: self.reports(), what="a report")
        self.collector.got.clear()
        await server.port.stopListening()
        # Down means the session kept open since the file was sent goes too.
        for protocol in list(server.factory.connections):
            protocol.transport.abortConnection()
        await until(lambda: not server.factory.connections, what="the session closed")
        fields = notice_fields(file_url(self.src), "r/a", source=self.user, fileOp={"remove": ""})
        await self.collector.post(fields, exchange=self.xpublic)
        await until(lambda: proc.stats["retrying"] == 1, what="a retry")
        server.port = reactor.listenTCP(port, server.factory, interface="127.0.0.1")
        await self.retried_until_reported()
        await quiet(0.1)
        self.assertEqual(self.reports(), [("r/a", 201)])
        self.assertEqual(os.listdir(os.path.join(self.remote, "r")), [])

    async def test_partial_upload_never_visible(self):
        """An sftp upload cut in the middle leaves nothing at the final name (only a temporary
        name); the retry delivers the whole file there."""
        server = self.sftp_server()
        obs = os.path.join(self.remote, "obs")
        proc = await self.start(f"sftp://bob@127.0.0.1:{server.port.getHost().port}/obs/",
                                strip=1)
        data = os.urandom(20_000_000)
        await self.post("x/big.bin", data)
        await until(lambda: [n for n in os.listdir(obs) if n.endswith(".inflight")],
                    what="an upload under a temporary name")
        for protocol in list(server.factory.connections):
            protocol.transport.abortConnection()
        await until(lambda: proc.stats["retrying"] == 1, what="a retry")
        self.assertNotIn("big.bin", os.listdir(obs))
        await self.retried_until_reported(tries=50)
        self.assertEqual(self.reports(), [("x/big.bin", 201)])
        with open(os.path.join(obs, "big.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    async def retried_until_reported(self, tries=20, pause=0.2):
        """Move the clock on 5 s at a time (the retry queue's turns) until a report comes,
        at most C{tries} times, then wait for it."""
        for _ in range(tries):
            self.clock.advance(5)
            if self.reports():
                break
            await quiet(pause)
        await until(lambda: self.reports(), what="a report")

    def sftp_server(self):
        """An sftp server over the remote tree, its key known and bob's login in the
        credentials file."""
        server = start_sftp(self, self.remote, user="bob", password="pw")
        self.addCleanup(settle)
        known = write_file(os.path.join(self.base, "known_hosts"),
                           server.known_hosts_line().encode())
        self.patch(sftp_scheme, "DEFAULT_KNOWN_HOSTS", known)
        port = server.port.getHost().port
        write_file(self.credentials, f"sftp://bob:pw@127.0.0.1:{port}/\n".encode())
        return server

    async def test_sftp_file_ops(self):
        """At an sftp destination, missing directories are made for a file, and a rename, a
        link, mkdir, a removal and rmdir are carried out on the server."""
        server = self.sftp_server()
        url = f"sftp://bob@127.0.0.1:{server.port.getHost().port}/"
        await self.start(url)
        await self.post("r/deep/a", b"data")
        await until(lambda: self.reports(), what="a report")
        self.assertEqual(self.reports(), [("r/deep/a", 201)])
        tree = os.path.join(self.remote, "r")
        for rel, file_op, check in [
            ("r/b", {"rename": self.src + "/r/deep/a"},
             lambda: os.path.exists(os.path.join(tree, "b"))),
            ("r/ln", {"link": "b"}, lambda: os.readlink(os.path.join(tree, "ln")) == "b"),
            ("r/m", {"directory": ""}, lambda: os.path.isdir(os.path.join(tree, "m"))),
            ("r/b", {"remove": ""}, lambda: not os.path.exists(os.path.join(tree, "b"))),
            ("r/m", {"remove": "", "directory": ""},
             lambda: not os.path.exists(os.path.join(tree, "m"))),
        ]:
            self.collector.got.clear()
            fields = notice_fields(file_url(self.src), rel, source=self.user, fileOp=file_op)
            await self.collector.post(fields, exchange=self.xpublic)
            await until(lambda: self.reports(), what=f"a report for {file_op}")
            self.assertEqual(self.reports(), [(rel, 201)], file_op)
            self.assertTrue(check(), file_op)

    async def test_ftp_destination(self):
        """To ftp: the file arrives under its final name only, in a directory made for it; a
        rename and a removal are carried out on the server; a link is refused (422)."""
        server = start_ftp(self, self.remote)
        self.addCleanup(settle)
        port = server.port.getHost().port
        write_file(self.credentials, f"ftp://carol:secret@127.0.0.1:{port}/\n".encode())
        await self.start(server.url + "/obs/", strip=1)
        await self.post("deep/new/c.txt", b"c" * 5000)
        await until(lambda: self.reports(), what="a report")
        self.assertEqual(self.reports(), [("deep/new/c.txt", 201)])
        self.assertEqual(os.listdir(os.path.join(self.remote, "obs", "new")), ["c.txt"])
        for rel, file_op, code in [
            ("deep/new/d.txt", {"rename": self.src + "/deep/new/c.txt"}, 201),
            ("deep/new/ln", {"link": "d.txt"}, 422),
            ("deep/new/d.txt", {"remove": ""}, 201),
        ]:
            self.collector.got.clear()
            fields = notice_fields(file_url(self.src), rel, source=self.user, fileOp=file_op)
            await self.collector.post(fields, exchange=self.xpublic)
            await until(lambda: self.reports(), what=f"a report for {file_op}")
            self.assertEqual(self.reports(), [(rel, code)], file_op)
        self.assertEqual(os.listdir(os.path.join(self.remote, "obs", "new")), [])

    async def test_file_ops_at_file_destination(self):
        """Renames and removals are carried out at a file: destination; a hostile rename or
        link target is refused (422) and nothing is written."""
        await self.start("file:" + self.remote + "/")
        await self.post("r/a", b"data")
        await until(lambda: self.reports(), what="a report")
        base = file_url(self.src)
        for rel, file_op in [
            ("r/b", {"rename": self.src + "/r/a"}),
            ("r/l", {"link": "../../../etc/passwd"}),
            ("r/c", {"rename": "/etc/passwd"}),
        ]:
            fields = notice_fields(base, rel, source=self.user, fileOp=file_op)
            await self.collector.post(fields, exchange=self.xpublic)
        await until(lambda: len(self.reports()) == 4, what="4 reports")
        self.assertEqual(
            sorted(self.reports()), [("r/a", 201), ("r/b", 201), ("r/c", 422), ("r/l", 422)]
        )
        self.assertEqual(os.listdir(os.path.join(self.remote, "r")), ["b"])

    async def test_http_destination(self):
        """To http(s): a PUT of the file (directory mode: the server takes one name); a file
        operation is refused (422)."""
        server = start_http(self, self.remote)
        self.addCleanup(settle)
        await self.start(server.url + "/upload/", mirror=False)
        await self.post("any/e.txt", b"e" * 300)
        await until(lambda: self.reports(), what="a report")
        self.assertEqual(self.reports(), [("any/e.txt", 201)])
        with open(os.path.join(self.remote, "e.txt"), "rb") as f:
            self.assertEqual(f.read(), b"e" * 300)
        self.collector.got.clear()
        fields = notice_fields(file_url(self.src), "any/e.txt", source=self.user,
                               fileOp={"remove": ""})
        await self.collector.post(fields, exchange=self.xpublic)
        await until(lambda: self.reports(), what="a report")
        self.assertEqual(self.reports(), [("any/e.txt", 422)])

    async def test_hostile_paths(self):
        """A relPath that would leave the destination is refused (422), nothing sent."""
        await self.start("file:" + self.remote + "/")
        fields = notice_fields(file_url(self.src), "../escape", b"x", source=self.user)
        await self.collector.post(fields, exchange=self.xpublic, routing_key="v03")
        await until(lambda: self.reports(), what="a report")
        self.assertEqual(self.reports(), [("../escape", 422)])
        self.assertEqual(sorted(os.listdir(self.base)), ["credentials.conf", "remote", "state"])


class MemorySenderTests(SenderScenarios, unittest.TestCase):
    url = "memory://"

    async def setUp(self):
        self.broker = MemoryBroker()
        await super().setUp()


    async def test_sftp_blocks(self):
        """A file over block_threshold goes to sftp in blocks, each written at its offset,
        several at a time; it arrives whole (one 201, its identity checked) and the block
        record is removed."""
        server = self.sftp_server()
        await self.start(f"sftp://bob@127.0.0.1:{server.port.getHost().port}/obs/", strip=1,
                         block_threshold=BLOCK, block_size=BLOCK, block_parallel=3)
        data = os.urandom(8 * BLOCK + 7)
        await self.post("x/big.bin", data)
        await until(lambda: self.reports(), what="a report")
        self.assertEqual(self.reports(), [("x/big.bin", 201)])
        with open(os.path.join(self.remote, "obs", "big.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(sorted(o for _, o, _ in server.writes),
                         list(range(0, len(data), BLOCK)))
        self.assertGreater(server.most_writing, 1)
        self.assertEqual(os.listdir(os.path.join(self.base, "state", "blocks")), [])

    async def test_sftp_blocks_resumed(self):
        """A send in blocks cut (the server stops answering, the transfer times out) after
        four blocks is retried from the retry queue and sends only the five missing."""
        server = self.sftp_server()
        server.stall_writes_from = 4 * BLOCK
        proc = await self.start(f"sftp://bob@127.0.0.1:{server.port.getHost().port}/obs/",
                                strip=1, block_threshold=BLOCK, block_size=BLOCK,
                                block_parallel=1, transfer_timeout=30)
        data = os.urandom(8 * BLOCK + 7)
        await self.post("x/big.bin", data)
        records = os.path.join(self.base, "state", "blocks")

        def recorded():
            names = os.listdir(records) if os.path.isdir(records) else []
            if not names:
                return 0
            with open(os.path.join(records, names[0]), "rb") as f:
                return f.read().count(b"\n") - 1

        await until(lambda: recorded() == 4, what="four blocks recorded")
        await until(lambda: [len(s.done) for s in proc.transfers.sending] == [4],
                    what="four blocks counted")
        stats = await proc.op_stats({}, {})
        (sending,) = stats["transfers"]
        self.assertTrue(sending["blocks"].startswith("4/9 blocks, "), sending)
        self.assertEqual(sending["size"], len(data))
        self.clock.advance(30)  # the transfer times out: retried later
        await until(lambda: proc.stats["retrying"] == 1, what="a retry")
        server.stall_writes_from = None
        server.writes.clear()
        await self.retried_until_reported(tries=50)
        self.assertEqual(self.reports(), [("x/big.bin", 201)])
        self.assertEqual(sorted(o for _, o, _ in server.writes),
                         list(range(4 * BLOCK, len(data), BLOCK)))
        with open(os.path.join(self.remote, "obs", "big.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.listdir(os.path.join(self.remote, "obs")), ["big.bin"])


    async def test_sftp_blocks_given_up(self):
        """A send in blocks cut after four blocks keeps its temporary file at the server
        while it is retried; given up for good past the retry horizon, it is reported failed
        and leaves nothing: neither the temporary file at the server nor the record."""
        server = self.sftp_server()
        server.stall_writes_from = 4 * BLOCK
        proc = await self.start(f"sftp://bob@127.0.0.1:{server.port.getHost().port}/obs/",
                                strip=1, block_threshold=BLOCK, block_size=BLOCK,
                                block_parallel=1, transfer_timeout=30, retry_horizon=60)
        await self.post("x/big.bin", os.urandom(8 * BLOCK + 7))
        records = os.path.join(self.base, "state", "blocks")
        obs = os.path.join(self.remote, "obs")
        await until(lambda: [len(s.done) for s in proc.transfers.sending] == [4],
                    what="four blocks sent")
        self.clock.advance(30)  # the transfer times out: retried later
        await until(lambda: proc.stats["retrying"] == 1, what="a retry")
        self.assertEqual(len(leftovers(obs)), 1)
        await self.retried_until_reported(tries=100, pause=0.1)
        ((path, code),) = self.reports()
        self.assertEqual(path, "x/big.bin")
        self.assertNotEqual(code, 201)
        await until(lambda: os.listdir(obs) == [], what="the temporary file removed")
        self.assertEqual(os.listdir(records), [])


class AmqpSenderTests(SenderScenarios, unittest.TestCase):
    timeout = 120

    async def setUp(self):
        skip_or_fail_without_rabbitmq()
        self.url, self.broker = get_broker().url, None
        await super().setUp()


class SenderArgsTests(unittest.SynchronousTestCase):
    def test_args(self):
        """A sender takes a consumer's args plus its own; bad ones are named in one line."""
        args = SenderArgs.parse({"name": "s", "destination": "sftp://u@h/d"})
        self.assertEqual(args.destination, "sftp://u@h/d/")
        for bad, said in [
            ({"name": "s"}, "destination"),
            ({"name": "s", "destination": "gopher://h/"}, "scheme"),
            ({"name": "s", "destination": "file:x", "parallel": 0}, "sender s: parallel"),
            ({"name": "s", "destination": "file:x", "directory": "y"}, "unknown argument"),
        ]:
            e = self.assertRaises(ValueError, SenderArgs.parse, bad)
            self.assertIn(said, str(e))

    def test_plan(self):
        """The pump app starts one sender per entry, after the consumers, with its state
        under var/<app>/."""
        plan = pump_app.plan(senders=[{"name": "out", "destination": "sftp://u@h/d/"}])
        (child,) = [c for c in plan["children"] if c["spec"] == "ion.apps.pump.sender"]
        self.assertEqual(child["name"], "pump.sender.out")
        self.assertEqual(child["args"]["state_dir"], os.path.join("var", "pump", "sender-out"))
        e = self.assertRaises(
            ValueError, pump_app.plan, senders=[{"name": "pump", "destination": "file:x"}]
        )
        self.assertIn("named 'pump'", str(e))


class SenderInstancesPlanTests(unittest.SynchronousTestCase):
    def test_plan_instances(self):
        """A sender with instances 2 is two children, each with its own state directory and
        the sender's as the shared one; in OS processes on a broker others reach."""
        plan = pump_app.plan(
            os_instances=True,
            senders=[{"name": "out", "destination": "sftp://u@h/d/", "instances": 2}])
        by_id = {c["id"]: c for c in plan["children"]}
        one, two = by_id["sender.out.1"], by_id["sender.out.2"]
        self.assertEqual(one["spec"], "ion.core.process.instances:OSInstance")
        self.assertEqual(one["args"]["spec"], "ion.apps.pump.sender")
        self.assertEqual(one["args"]["args"]["state_dir"], "var/pump/sender-out.1")
        self.assertEqual(two["args"]["args"]["shared_dir"], "var/pump/sender-out")
        plan = pump_app.plan(
            senders=[{"name": "out", "destination": "sftp://u@h/d/", "instances": 2}])
        by_id = {c["id"]: c for c in plan["children"]}
        self.assertEqual(by_id["sender.out.2"]["spec"], "ion.apps.pump.sender")
        self.assertEqual(by_id["sender.out.2"]["name"], "pump.sender.out.2")
