"""The whole pump: poll -> ingest -> consumer -> destination, over file, http and sftp sources,
as the app builds it (on memory:// and RabbitMQ) and as `twistd -n cc res/apps/pump.app` runs
it; the app's plan and its progress summary."""

import copy
import json
import hashlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types

from twisted.internet import defer, task, threads
from twisted.trial import unittest

from ion.apps.pump import app as pump_app
from ion.apps.pump.progress import Progress, human_bytes
from ion.apps.pump.transfer import sftp as sftp_scheme
from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX
from ion.apps.pump.user import pump_user
from ion.core.app.appfile import read_app, read_rel
from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Process, Supervisor
from tests.apps.pump.fixtures import Collector, delete_queues, quiet, until
from tests.apps.pump.servers import settle, start_http, start_sftp, write_file
from tests.broker import get_broker

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
RES = os.path.join(REPO, "res")
OLD = time.time() - 3600
_tags = itertools.count(1)


def digests(root):
    """{relPath: sha512 hex} of every file under root."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest = hashlib.sha512(f.read()).hexdigest()
            found[os.path.relpath(path, root).replace(os.sep, "/")] = digest
    return found


def make_tree(root, count, rng, dirs=(10, 10), max_size=3000):
    """`count` files of random bytes spread over nested directories, mtimes in the past."""
    for i in range(count):
        top, sub = i % dirs[0], (i // dirs[0]) % dirs[1]
        path = os.path.join(root, f"top{top}", f"sub{sub}", f"file{i}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_file(path, rng.randbytes(rng.randrange(max_size)))
        os.utime(path, (OLD, OLD))


def inflight_files(root):
    return [
        os.path.join(directory, name)
        for directory, _, names in os.walk(root)
        for name in names
        if name.endswith(INFLIGHT_SUFFIX)
    ]


class PumpFlowTests(unittest.TestCase):
    """The pump app on the memory broker, with real files."""

    async def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        self.dest = os.path.join(self.base, "dest")
        os.makedirs(self.src)
        self.credentials = os.path.join(self.base, "credentials.conf")
        write_file(self.credentials, b"")
        os.chmod(self.credentials, 0o600)
        self.c = await make_container(self, memory_broker=MemoryBroker())
        self.collector = await self.c.spawn(Collector)
        await self.collector.listen("xr_ion")

    async def start_pump(self, url, **poll):
        poll = dict({"name": "src", "url": url, "interval": 0.5}, **poll)
        poll.setdefault("state_dir", os.path.join(self.base, "poll"))
        self.sup = await pump_app.start(
            self.c,
            types.SimpleNamespace(name="pump"),
            polls=[poll],
            subscriptions=[
                {
                    "name": "sub",
                    "directory": self.dest,
                    "state_dir": os.path.join(self.base, "consumer"),
                }
            ],
            transfer={"workers": 2, "credentials": self.credentials},
            report_router={"state_dir": os.path.join(self.base, "router")},
        )
        self.addCleanup(self.sup.terminate)
        return self.sup

    def delivered(self):
        return self.sup.child("consumer.sub").stats["delivered"]

    def reports(self, code=201):
        return [b["relPath"] for b in self.collector.bodies() if b["report"]["code"] == code]

    async def test_file_tree_mirrored(self):
        """A tree of 1,000 files in nested directories is mirrored exactly (every sha512
        equal) and reported to its source once per file; then a modified file is delivered
        again and the unchanged ones are not."""
        make_tree(self.src, 1000, random.Random(1))
        await self.start_pump("file://" + self.src)
        self.assertEqual(
            [spec.id for spec in self.sup.child_specs],
            [
                "report_router",
                "transfer1",
                "transfer2",
                "ingest",
                "consumer.sub",
                "poll.src",
                "progress",
            ],
        )
        await until(lambda: self.delivered() == 1000, timeout=60, what="1000 deliveries")
        await until(lambda: len(self.reports()) == 1000, what="1000 reports")
        self.assertEqual(digests(self.dest), digests(self.src))
        self.assertEqual(len(set(self.reports())), 1000)
        changed = os.path.join(self.src, "top3", "sub4", "file43.bin")
        write_file(changed, b"changed content")
        await until(lambda: self.delivered() == 1001, what="the changed file")
        await until(lambda: len(self.reports()) == 1001)
        with open(os.path.join(self.dest, "top3", "sub4", "file43.bin"), "rb") as f:
            self.assertEqual(f.read(), b"changed content")
        poll = self.sup.child("poll.src")
        await poll.poll_now()
        await poll.poll_now()
        await quiet(0.2)
        self.assertEqual(self.delivered(), 1001)
        self.assertEqual(self.reports().count("top3/sub4/file43.bin"), 2)
        self.assertEqual(inflight_files(self.dest), [])

    async def test_processes_named(self):
        """Every pump process shows its name in ps() and answers `stats` by that name, as
        `ion rpc pump.consumer.sub stats` asks it."""
        await self.start_pump("file://" + self.src)
        names = {row[1] for row in self.c.ps()}
        expected = {
            "pump.report_router": "forwarded",
            "pump.ingest": None,
            "pump.consumer.sub": "delivered",
            "pump.poll.src": None,
        }
        self.assertLessEqual({*expected, "pump.progress"}, names)
        for name, field in expected.items():
            stats = await self.collector.rpc(name, "stats", timeout=5)
            self.assertIsInstance(stats, dict, name)
            if field:
                self.assertIn(field, stats)

    async def test_http_source(self):
        """A tree served over HTTP (twisted.web index pages) is mirrored."""
        make_tree(self.src, 40, random.Random(2), dirs=(3, 2))
        server = start_http(self, self.src)
        self.addCleanup(settle)
        await self.start_pump(server.url + "/files/")
        await until(lambda: self.delivered() == 40, timeout=30, what="40 deliveries")
        self.assertEqual(digests(self.dest), digests(self.src))

    async def test_sftp_source(self):
        """A tree on an SFTP server (host key checked, password from the credentials file) is
        mirrored with its mtimes."""
        make_tree(self.src, 30, random.Random(3), dirs=(3, 2))
        server = start_sftp(self, self.src, user="bob", password="sftp-secret")
        self.addCleanup(settle)
        known_hosts = write_file(
            os.path.join(self.base, "known_hosts"), server.known_hosts_line().encode()
        )
        self.patch(sftp_scheme, "DEFAULT_KNOWN_HOSTS", known_hosts)
        port = server.port.getHost().port
        write_file(self.credentials, f"sftp://bob:sftp-secret@127.0.0.1:{port}/\n".encode())
        await self.start_pump(server.url + "/")
        await until(lambda: self.delivered() == 30, timeout=30, what="30 deliveries")
        self.assertEqual(digests(self.dest), digests(self.src))
        some = os.path.join("top1", "sub1", "file4.bin")
        self.assertEqual(int(os.stat(os.path.join(self.dest, some)).st_mtime), int(OLD))


class AmqpPumpFlowTests(unittest.TestCase):
    """The pump app on the private RabbitMQ node: confirms, durable queues, user_id."""

    async def test_file_tree_mirrored(self):
        """A tree of 300 files is mirrored exactly through a real broker, and reported to the
        source named by the xs_ exchange the poll announced on."""
        broker = get_broker()
        tag = f"e2e-{os.getpid()}-{next(_tags)}"
        base = os.path.abspath(self.mktemp())
        src, dest = os.path.join(base, "src"), os.path.join(base, "dest")
        os.makedirs(base)
        credentials = write_file(os.path.join(base, "credentials.conf"), b"")
        os.chmod(credentials, 0o600)
        make_tree(src, 300, random.Random(5))
        queues = [
            f"q_{tag}.{tag}.consumer.sub",
            f"q_xreport-{tag}.report_router",
            f"q_{tag}.{tag}.report_router.sent",
            f"q_{tag}.ingest.xs_{tag}",
        ]

        async def drop_queues():
            await delete_queues(broker.url, queues)

        await drop_queues()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(drop_queues()))
        c = await make_container(self, url=broker.url, sysname=tag)
        collector = await c.spawn(Collector)
        await collector.listen(f"xr_{tag}")
        xpublic, xreport = f"xpublic-{tag}", f"xreport-{tag}"
        sup = await pump_app.start(
            c,
            types.SimpleNamespace(name="pump"),
            user=tag,
            polls=[{"name": "src", "url": "file://" + src, "state_dir": os.path.join(base, "p")}],
            ingest={"exchange": xpublic, "report_exchange": xreport},
            subscriptions=[
                {
                    "name": "sub",
                    "exchange": xpublic,
                    "report_exchange": xreport,
                    "directory": dest,
                    "state_dir": os.path.join(base, "consumer"),
                }
            ],
            transfer={"credentials": credentials},
            report_router={"exchange": xreport, "state_dir": os.path.join(base, "router")},
        )
        self.addCleanup(sup.terminate)
        consumer = sup.child("consumer.sub")
        await until(lambda: consumer.stats["delivered"] == 300, timeout=60, what="deliveries")
        await until(lambda: len(collector.bodies()) == 300, timeout=30, what="reports")
        self.assertEqual(digests(dest), digests(src))
        self.assertEqual({b["source"] for b in collector.bodies()}, {tag})

    async def test_two_pumps_one_broker(self):
        """Two pumps (two systems, two users) on one broker, both subscribed to xpublic: a file
        polled by pump A reaches both destinations, and each of the two delivery reports
        reaches the source once: the report routers share one queue."""
        broker = get_broker()
        tag = f"two-{os.getpid()}-{next(_tags)}"
        base = os.path.abspath(self.mktemp())
        src = os.path.join(base, "src")
        os.makedirs(base)
        credentials = write_file(os.path.join(base, "credentials.conf"), b"")
        os.chmod(credentials, 0o600)
        make_tree(src, 20, random.Random(7), dirs=(2, 2))
        xpublic, xreport = f"xpublic-{tag}", f"xreport-{tag}"
        pumps = [(f"alice-{tag}", f"sA-{tag}"), (f"bob-{tag}", f"sB-{tag}")]
        queues = [f"q_{xreport}.report_router"]
        for user, sysname in pumps:
            queues += [
                f"q_{user}.{sysname}.consumer.pump",
                f"q_{user}.{sysname}.report_router.sent",
                f"q_{user}.ingest.xs_{user}",
            ]

        async def drop_queues():
            await delete_queues(broker.url, queues)

        await drop_queues()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(drop_queues()))
        sups, collector = [], None
        # B first: both consumers listen before A's poll announces.
        for i, (user, sysname) in reversed(list(enumerate(pumps))):
            c = await make_container(self, url=broker.url, sysname=sysname)
            if collector is None:
                collector = await c.spawn(Collector)
                await collector.listen(f"xr_{pumps[0][0]}")
            polls = []
            if i == 0:
                polls = [{"name": "src", "url": "file://" + src,
                          "state_dir": os.path.join(base, "p")}]
            sup = await pump_app.start(
                c,
                types.SimpleNamespace(name="pump"),
                user=user,
                polls=polls,
                ingest={"exchange": xpublic, "report_exchange": xreport},
                subscriptions=[
                    {
                        "name": "pump",
                        "exchange": xpublic,
                        "report_exchange": xreport,
                        "directory": os.path.join(base, f"dest{i}"),
                        "sources": ["file://" + src + "/"],  # B fetches from A's source
                        "state_dir": os.path.join(base, f"consumer{i}"),
                    }
                ],
                transfer={"credentials": credentials},
                report_router={"exchange": xreport, "state_dir": os.path.join(base, f"r{i}")},
            )
            self.addCleanup(sup.terminate)
            sups.append(sup)
        consumers = [sup.child("consumer.pump") for sup in sups]
        self.assertNotEqual(consumers[0].queue, consumers[1].queue)
        await until(
            lambda: [c.stats["delivered"] for c in consumers] == [20, 20],
            timeout=20,
            what=lambda _: f"both pumps' deliveries: {[c.stats for c in consumers]}",
        )
        await until(lambda: len(collector.bodies()) >= 40, timeout=30, what="40 reports")
        await quiet(1.0)
        bodies = collector.bodies()
        self.assertEqual(len(bodies), 40)
        self.assertEqual(len({b["report_id"] for b in bodies}), 40)
        routed = [sup.child("report_router").stats["forwarded"] for sup in sups]
        self.assertEqual(sum(routed), 40)


class FakeConsumer(Process):
    """Answers `stats` with whatever the test sets."""

    def on_init(self):
        self.stats = {"delivered": 0, "bytes": 0, "in_hand": 0, "retrying": 0, "failures": {}}
        self.broken = False
        self.unanswered = []

    def op_stats(self, content, headers):
        if self.broken:  # answers only when the test ends
            self.unanswered.append(defer.Deferred())
            return self.unanswered[-1]
        return dict(self.stats)

    def answer_late(self):
        for d in self.unanswered:
            d.callback(dict(self.stats))


class ProgressTests(unittest.TestCase):
    async def start_progress(self, **args):
        """A supervisor over two fake consumers and a progress summary of them, on a clock."""
        clock = task.Clock()
        c = await make_container(self, memory_broker=MemoryBroker(), clock=clock)
        args["consumers"] = ["consumer.a", "consumer.b"]
        children = [
            {"id": "consumer.a", "name": "pump.consumer.a", "spec": FakeConsumer},
            {"id": "consumer.b", "spec": FakeConsumer},
            {"id": "progress", "spec": Progress, "args": args},
        ]
        sup = await c.spawn(Supervisor, args={"children": children})
        self.addCleanup(sup.terminate)
        return clock, sup

    async def test_summary_lines(self):
        """Every interval the consumers' deliveries since the last line become rates; work in
        hand or retrying keeps the lines coming; an idle pump logs one idle line, then
        nothing; a restarted consumer counting from zero again is no negative rate."""
        clock, sup = await self.start_progress()
        a, b, progress = (sup.child(i) for i in ("consumer.a", "consumer.b", "progress"))

        async def tick():
            progress.last_line = None
            clock.advance(10)
            await quiet()
            return progress.last_line

        a.stats.update(delivered=15, bytes=1_500_000, bytes_received=1_500_000, in_hand=3)
        a.stats.update(failures={"404": 1})
        b.stats.update(delivered=5, bytes=500_000, bytes_received=500_000, retrying=2, queued=40)
        b.stats.update(failures={"404": 1, "499": 2})
        line = await tick()
        self.assertEqual(
            line,
            "pump: 2.0 files/s, 200.0 kB/s; 20 delivered; 40 queued, 3 in hand, 2 retrying; "
            "failures: 404=2, 499=2",
        )
        # One big file on its way: no delivery, but its bytes make the rate.
        a.stats.update(bytes_received=4_500_000, bytes_in_flight=3_000_000, in_hand=1)
        self.assertIn(
            "0.0 files/s, 300.0 kB/s; 20 delivered; 40 queued, 1 in hand (3.0 MB received), ",
            await tick(),
        )
        # A bandwidth limit shows beside the rate.
        b.stats.update(byte_rate_max=2_000_000)
        self.assertIn("0.0 files/s, 0 B/s (limit 2.0 MB/s); 20 delivered", await tick())
        b.stats.update(byte_rate_max=None)
        a.stats.update(in_hand=0, bytes_in_flight=0)
        b.stats.update(retrying=0)
        # Nothing delivered, nothing in hand, but notices waiting on the broker: not idle.
        self.assertIn("0.0 files/s, 0 B/s; 20 delivered; 40 queued, 0 in hand", await tick())
        b.stats.update(queued=None)  # a consumer whose broker did not tell
        self.assertIn("idle; 20 delivered (2.0 MB)", await tick())
        self.assertIsNone(await tick())
        b.stats.update(delivered=1, bytes=100, bytes_received=100)
        self.assertIn("pump: 0.1 files/s, 10 B/s; 16 delivered", await tick())

    async def test_block_progress(self):
        """A file coming in blocks shows its own progress on the line."""
        clock, sup = await self.start_progress()
        a, progress = sup.child("consumer.a"), sup.child("progress")
        a.stats.update(in_hand=1, bytes_in_flight=1_288_490_188, transfers=[
            {"file": "http://h/data/big.nc", "received": 1_288_490_188, "size": 4 * 1024**3,
             "blocks": "3/16 blocks, 1.2 GiB of 4.0 GiB"},
            {"file": "http://h/data/small.nc", "received": 10, "size": 100},
        ])
        clock.advance(10)
        await quiet()
        self.assertTrue(
            progress.last_line.endswith("failures: none; big.nc: 3/16 blocks, 1.2 GiB of 4.0 GiB"),
            progress.last_line,
        )

    async def test_consumer_not_answering(self):
        """A consumer that gives no stats (broker down, stuck) is named on every line, never
        taken for an idle pump."""
        clock, sup = await self.start_progress(timeout=1)
        a, progress = sup.child("consumer.a"), sup.child("progress")
        self.addCleanup(a.answer_late)
        for _ in range(2):
            progress.last_line = None
            clock.advance(10)
            await quiet()
        self.assertIsNone(progress.last_line)  # idle once, then quiet
        a.broken = True
        for _ in range(2):
            progress.last_line = None
            clock.advance(10)
            await quiet()
            clock.advance(1)  # the stats call times out
            await quiet()
            self.assertIsNotNone(progress.last_line)
            self.assertNotIn("idle", progress.last_line)
            # By the name `ion rpc` knows it by, not the supervisor's child id.
            self.assertTrue(progress.last_line.endswith("; not answering: pump.consumer.a"))

    def test_human_bytes(self):
        self.assertEqual(
            [human_bytes(n) for n in (0, 999, 1000, 2_500_000, 3e12, 5e15)],
            ["0 B", "999 B", "1.0 kB", "2.5 MB", "3.0 TB", "5000.0 TB"],
        )


class PumpUserTests(unittest.SynchronousTestCase):
    def test_order(self):
        """Every pump process names its queues and exchanges after one user: its `user`
        arg, else the config `ion.apps.pump: user`, else the broker login of its container
        (before, polls and ingest fell back to `ion` and the rest to the login, so a pump on
        RabbitMQ as `alice` announced to `xs_ion` but queued as `q_alice`)."""
        config = {}

        def process(login):
            return types.SimpleNamespace(
                config=lambda key, default, module: config.get((module, key), default),
                container=types.SimpleNamespace(transport=types.SimpleNamespace(user=login)),
            )

        self.assertEqual(pump_user(process("alice")), "alice")
        self.assertEqual(pump_user(process("ion")), "ion")  # the embedded broker's login
        config["ion.apps.pump", "user"] = "feeder"
        self.assertEqual(pump_user(process("alice")), "feeder")
        self.assertEqual(pump_user(process("alice"), "bob"), "bob")


class QueueNameTests(unittest.TestCase):
    async def test_two_systems_never_share_a_consumer_queue(self):
        """Two pumps of one user started as two systems (-s sA, -s sB) on one broker get a
        consumer queue each, so neither takes the other's notices; in the default system
        `ion` the name stays q_<user>.consumer.<subscription>. The report routers share
        theirs."""
        broker = MemoryBroker()
        base = os.path.abspath(self.mktemp())
        found = {}
        for sysname in ("ion", "sA", "sB"):
            c = await make_container(self, memory_broker=broker, sysname=sysname)
            sup = await pump_app.start(
                c,
                types.SimpleNamespace(name="pump"),
                user="alice",
                subscriptions=[{"name": "pump", "directory": os.path.join(base, sysname),
                                "state_dir": os.path.join(base, sysname, "state")}],
                report_router={"state_dir": os.path.join(base, sysname, "router")},
            )
            self.addCleanup(sup.terminate)
            found[sysname] = (sup.child("consumer.pump").queue, sup.child("report_router").queue)
        self.assertEqual(
            {name: queues[0] for name, queues in found.items()},
            {
                "ion": "q_alice.consumer.pump",
                "sA": "q_alice.sA.consumer.pump",
                "sB": "q_alice.sB.consumer.pump",
            },
        )
        self.assertEqual({queues[1] for queues in found.values()}, {"q_xreport.report_router"})


class AppPlanTests(unittest.SynchronousTestCase):
    def test_plan_order(self):
        """Receivers first: router, transfer workers, ingest, consumers, polls, progress; the
        progress summary knows the consumers; the pump user reaches every process."""
        plan = pump_app.plan(
            polls=[{"name": "a", "url": "file:/a"}, {"name": "b", "url": "http://h/"}],
            subscriptions=[{"name": "s", "directory": "/d"}],
            transfer={"workers": 1},
            user="pumpy",
        )
        children = plan["children"]
        self.assertEqual(
            [c["id"] for c in children],
            ["report_router", "transfer1", "ingest", "consumer.s", "poll.a", "poll.b", "progress"],
        )
        self.assertEqual(plan["strategy"], "rest_for_one")
        self.assertEqual(children[-1]["args"]["consumers"], ["consumer.s"])
        for child in ("report_router", "ingest", "consumer.s", "poll.a"):
            args = next(c["args"] for c in children if c["id"] == child)
            self.assertEqual(args["user"], "pumpy", child)

    def test_state_directories_per_copy(self):
        """The pump keeps its state under var/<app name>/: var/pump/ for the app, var/pump.2/
        for the second copy of a rel's mult; a state_dir given wins."""
        kwargs = {
            "polls": [{"name": "a", "url": "file:/a"}],
            "subscriptions": [{"name": "s", "directory": "/d"}, {"name": "t", "directory": "/e",
                                                                 "state_dir": "/mine"}],
        }
        for app_name, root in (("pump", "var/pump"), ("pump.2", "var/pump.2")):
            plan = pump_app.plan(app_name, **copy.deepcopy(kwargs))
            by_id = {c["id"]: c["args"] for c in plan["children"]}
            self.assertEqual(by_id["consumer.s"]["state_dir"], f"{root}/s")
            self.assertEqual(by_id["consumer.t"]["state_dir"], "/mine")
            self.assertEqual(by_id["poll.a"]["state_dir"], f"{root}/poll-a")
            self.assertEqual(by_id["report_router"]["state_dir"], f"{root}/report_router")

    def test_bad_kwargs(self):
        """Unknown kwargs, duplicate names and bad poll args are errors naming them."""
        table = [
            ({"pols": []}, "unknown argument 'pols'"),
            ({"polls": {"name": "a"}}, "polls must be a list"),
            ({"polls": [{"name": "a", "url": "file:/a"}] * 2}, "two polls are named 'a'"),
            ({"polls": [{"name": "a"}]}, "url"),
            ({"polls": [{"name": "a", "url": "file:/a", "interval": -1}]}, "interval"),
            ({"ingest": {"users": "alice"}}, "users"),
            ({"progress": {"interval": 0}}, "interval"),
            ({"subscriptions": [{"name": "a", "directory": "/x"}] * 2}, "two subscriptions"),
        ]
        for kwargs, expected in table:
            e = self.assertRaises(ValueError, pump_app.plan, **kwargs)
            self.assertIn(expected, str(e), kwargs)

    def test_app_and_rel_files(self):
        """res/apps/pump.app polls pump/source/ into pump/destination/ with reports logged,
        and res/deploy/pump-http.rel polls an HTTP server; both make valid plans."""
        spec = read_app(os.path.join(RES, "apps", "pump.app"))
        plan = pump_app.plan(**spec.kwargs)
        by_id = {c["id"]: c["args"] for c in plan["children"]}
        self.assertEqual(by_id["poll.source"]["url"], "file:pump/source/")
        self.assertEqual(by_id["consumer.pump"]["directory"], "pump/destination/")
        self.assertTrue(by_id["report_router"]["log_path"].startswith("var/pump/"))
        rel = read_rel(os.path.join(RES, "deploy", "pump-http.rel"))
        (entry,) = rel.apps
        self.assertEqual(entry.name, "pump")
        plan = pump_app.plan(**dict(spec.kwargs, **entry.args))
        by_id = {c["id"]: c["args"] for c in plan["children"]}
        self.assertTrue(by_id["poll.web"]["url"].startswith("http://localhost:8000/"))
        self.assertNotIn("poll.source", by_id)


def start_pump_process(testcase, cwd, log_name="twistd.log", options=()):
    """`twistd -n cc res/apps/pump.app` in `cwd`, its output in `log_name` there: the process
    and a function returning the log so far."""
    env = dict(os.environ, PYTHONPATH=REPO, HOME=cwd)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    log_path = os.path.join(cwd, log_name)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [twistd, "--pidfile=", "-n", "cc", "--no-shell", *options,
             os.path.join(RES, "apps", "pump.app")],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    testcase.addCleanup(lambda: proc.poll() is None and proc.kill())

    def log_text():
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    return proc, log_text


async def stop_pump_process(testcase, proc, log_text):
    """SIGTERM, then a clean exit (status 0, no traceback); returns the log."""
    proc.send_signal(signal.SIGTERM)
    await until(lambda: proc.poll() is not None, timeout=60, what="the container to exit")
    text = log_text()
    testcase.assertEqual(proc.returncode, 0, text)
    testcase.assertNotIn("Traceback", text)
    return text


class TwistdTests(unittest.TestCase):
    """`twistd -n cc res/apps/pump.app` as a user runs it, in a fresh working directory."""

    async def test_ion_rpc_stats_by_name(self):
        """On RabbitMQ, `ion rpc pump.consumer.pump stats` (the name the progress line gives)
        answers the consumer's counters, and `ion rpc pump.poll.source stats` the poll's."""
        broker = get_broker()
        sysname = f"rpc{os.getpid()}x{next(_tags)}"
        login = "guest"
        queues = [
            f"q_{login}.{sysname}.consumer.pump",
            f"q_{login}.{sysname}.report_router.sent",
            # pump.app's own exchange names: no other test uses them on this broker.
            "q_xreport.report_router",
            f"q_{login}.ingest.xs_{login}",
        ]

        async def drop_queues():
            await delete_queues(broker.url, queues)

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(drop_queues()))
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        proc, log_text = start_pump_process(
            self, cwd, options=("--broker", broker.url, "-s", sysname)
        )
        self.addCleanup(lambda: proc.poll() is None and proc.send_signal(signal.SIGTERM))
        await until(
            lambda: "running apps" in log_text() or proc.poll() is not None,
            timeout=30,
            what="the container to start",
        )
        self.assertIsNone(proc.poll(), log_text())
        env = dict(os.environ, PYTHONPATH=REPO, HOME=cwd)
        for name, field in (("pump.consumer.pump", "delivered"), ("pump.poll.source", "passes")):
            result = await threads.deferToThread(
                subprocess.run,
                [sys.executable, "-m", "ion", "rpc", "--broker", broker.url, "-s", sysname,
                 name, "stats"],
                cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(field, json.loads(result.stdout))
        await stop_pump_process(self, proc, log_text)

    async def test_pump_app(self):
        """Files dropped into pump/source/ arrive in pump/destination/ with the same bytes,
        the report log has a line per file, the log holds no line per delivered file at the
        default levels (the progress line sums them up), and SIGTERM stops the container
        cleanly (exit 0) with no temporary files left."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        proc, log_text = start_pump_process(self, cwd)
        await until(
            lambda: "running apps" in log_text() or proc.poll() is not None,
            timeout=30,
            what="the container to start",
        )
        self.assertIsNone(proc.poll(), log_text())
        source = os.path.join(cwd, "pump", "source")
        self.assertTrue(os.path.isdir(source))
        rng = random.Random(4)
        files = {"one.txt": b"hello pump\n", "deep/er/two.bin": rng.randbytes(200_000)}
        for rel, data in files.items():
            path = os.path.join(source, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_file(path + ".tmp", data)
            os.rename(path + ".tmp", path)
        dest = os.path.join(cwd, "pump", "destination")

        def arrived():
            return all(os.path.exists(os.path.join(dest, *rel.split("/"))) for rel in files)

        await until(arrived, timeout=30, what="the files in pump/destination/")
        self.assertEqual(digests(dest), digests(source))
        reports = os.path.join(cwd, "var", "pump", "reports.jsonl")

        def reported():
            if not os.path.exists(reports):
                return 0
            with open(reports) as f:
                return f.read().count('"code": 201')

        await until(lambda: reported() >= 2, timeout=10, what="the report lines")
        text = await stop_pump_process(self, proc, log_text)
        self.assertNotIn("consumer pump: delivered", text)
        self.assertIn("poll source: announced", text)
        self.assertEqual(inflight_files(cwd), [])
        self.assertEqual(reported(), 2)

    async def test_stop_with_backlog_loses_nothing(self):
        """On the embedded broker, notices still queued when the container stops die with it;
        the next start knows (the broker's run record) and the poll announces every file
        again: all of them arrive, none twice."""
        cwd = os.path.abspath(self.mktemp())
        source = os.path.join(cwd, "pump", "source")
        make_tree(source, 3000, random.Random(6))
        proc, log_text = start_pump_process(self, cwd, "first.log")
        await until(lambda: "announced 3000" in log_text(), timeout=60, what="the announcements")
        await stop_pump_process(self, proc, log_text)
        dest = os.path.join(cwd, "pump", "destination")

        def delivered():
            return sum(
                1 for _, _, names in os.walk(dest) for name in names if not name.startswith(".")
            )

        before = delivered()
        self.assertLess(before, 3000, "no backlog at the stop: nothing was tested")
        with open(os.path.join(cwd, "var", "memory-broker.run")) as f:
            self.assertIn("messages queued", f.read())

        # Each delivered file as a line of its own (debug) tells whether one came twice.
        shutil.copytree(RES, os.path.join(cwd, "res"))
        with open(os.path.join(cwd, "res", "config", "loglevelslocal.cfg"), "w") as f:
            f.write("[('ion.apps.pump.consumer', 'debug')]\n")
        proc, log_text = start_pump_process(self, cwd, "second.log")
        await until(lambda: delivered() == 3000, timeout=90, what="every file after the restart")
        text = await stop_pump_process(self, proc, log_text)
        self.assertIn("the broker lost queued notices when it last stopped", text)
        self.assertEqual(digests(dest), digests(source))
        self.assertEqual(text.count("consumer pump: delivered"), 3000 - before)
