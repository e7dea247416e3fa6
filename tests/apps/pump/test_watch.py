"""The watch: what it announces as a tree changes, and what it catches up with after a stop."""

import base64
import hashlib
import itertools
import os
import time

from twisted.internet import task
from twisted.trial import unittest

from ion.apps.pump import app as pump_app
from ion.apps.pump.args import WatchArgs
from ion.apps.pump.watch import Watch
from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from tests.apps.pump.fixtures import Collector
from tests.broker import get_broker, skip_or_fail_without_rabbitmq
from tests.waiting import quiet, until

_tags = itertools.count(1)


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


class WatchScenarios:
    """Scenarios run on each transport (hooks: C{url}, C{broker})."""

    async def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.exchange = f"xs_w{os.getpid()}x{next(_tags)}"
        self.c = await make_container(
            self, url=self.url, memory_broker=self.broker, clock=self.clock
        )
        self.collector = await self.c.spawn(Collector)
        await self.collector.listen(self.exchange)
        base = os.path.abspath(self.mktemp())
        self.tree = os.path.join(base, "tree")
        self.state = os.path.join(base, "state")
        os.makedirs(self.tree)

    async def start(self, **args):
        args = dict({"name": "w", "path": self.tree, "state_dir": self.state,
                     "exchange": self.exchange}, **args)
        proc = await self.c.spawn(Watch, args=args)
        self.addCleanup(lambda: None if proc.lifecycle.final else proc.terminate())
        return proc

    async def settle(self, seconds=1):
        """Let the events of what was just done arrive, then pass the coalescing time."""
        await quiet(0.1)
        self.clock.advance(seconds)
        await quiet(0.05)

    def got(self):
        return [
            (b["relPath"], b.get("fileOp"), b.get("size")) for b in self.collector.bodies()
        ]

    async def expect(self, wanted, ordered=True):
        """The notices since the last expect are C{wanted} (in that order, if C{ordered}:
        files hashed at the same time are announced in the order their hashing ends)."""
        await until(lambda: len(self.got()) >= len(wanted), what=lambda _: self.got())
        await quiet(0.1)
        got = self.got()
        self.assertEqual(got if ordered else sorted(got, key=repr), wanted)
        self.collector.got.clear()

    async def test_nested_creates_and_directories(self):
        """Files are announced (sha512, size, mtime, mode, sr3's topic) in directories made after
        the watch started, at any depth; mkdir and rmdir are announced too."""
        await self.start()
        os.makedirs(os.path.join(self.tree, "a", "b"))
        await self.settle()
        write(os.path.join(self.tree, "a", "b", "f.txt"), b"hello")
        write(os.path.join(self.tree, "top"), b"x")
        await self.settle()
        await self.expect(
            [("a", {"directory": ""}, None), ("a/b", {"directory": ""}, None),
             ("a/b/f.txt", None, 5), ("top", None, 1)],
            ordered=False,
        )
        os.remove(os.path.join(self.tree, "a", "b", "f.txt"))
        os.rmdir(os.path.join(self.tree, "a", "b"))
        await self.settle()
        await self.expect(
            [("a/b/f.txt", {"remove": ""}, None), ("a/b", {"remove": "", "directory": ""}, None)]
        )

    async def test_notice_fields(self):
        """A file's notice carries what a consumer needs to fetch and verify it."""
        await self.start(base_url="http://files.example/tree")
        write(os.path.join(self.tree, "d", "f"), b"data")
        await self.settle()
        await until(lambda: [b for b in self.collector.bodies() if "identity" in b])
        (ex, key, body), = [g for g in self.collector.got if "identity" in g[2]]
        self.assertEqual(key, "v03.d")
        self.assertEqual(body["baseUrl"], "http://files.example/tree")
        self.assertEqual(body["identity"], {"method": "sha512", "value": sha512(b"data")})
        self.assertEqual((body["size"], body["mode"]), (4, "644"))
        self.assertIn("mtime", body)

    async def test_modify_rename_delete_link(self):
        """A rewrite is announced again; a rename carries the old name; a move out of the tree
        and a delete are removals; a symlink is a link."""
        write(os.path.join(self.tree, "f"), b"one")
        await self.start()
        await self.settle()
        await self.expect([("f", None, 3)])
        write(os.path.join(self.tree, "f"), b"second")
        await self.settle()
        await self.expect([("f", None, 6)])
        os.rename(os.path.join(self.tree, "f"), os.path.join(self.tree, "g"))
        await self.settle()
        await self.expect([("g", {"rename": self.tree + "/f"}, 6)])
        os.symlink("g", os.path.join(self.tree, "ln"))
        await self.settle()
        await self.expect([("ln", {"link": "g"}, None)])
        outside = os.path.join(os.path.dirname(self.tree), "outside")
        os.rename(os.path.join(self.tree, "g"), outside)
        await self.settle()
        await self.expect([("g", {"remove": ""}, None)])
        os.remove(os.path.join(self.tree, "ln"))
        await self.settle()
        await self.expect([("ln", {"remove": ""}, None)])

    async def test_temporary_name_then_rename(self):
        """A file written under a temporary name and renamed into place is announced once, as
        created under its final name."""
        await self.start()
        write(os.path.join(self.tree, ".f.tmp"), b"abc")
        os.rename(os.path.join(self.tree, ".f.tmp"), os.path.join(self.tree, "f"))
        await self.settle()
        await self.expect([("f", None, 3)])

    async def test_directory_rename(self):
        """A renamed directory is one notice; files written in it afterwards carry the new
        path."""
        write(os.path.join(self.tree, "d", "f"), b"1")
        await self.start()
        await self.settle()
        await self.expect([("d/f", None, 1)])
        os.rename(os.path.join(self.tree, "d"), os.path.join(self.tree, "e"))
        await self.settle()
        await self.expect([("e", {"rename": self.tree + "/d", "directory": ""}, None)])
        write(os.path.join(self.tree, "e", "g"), b"22")
        os.remove(os.path.join(self.tree, "e", "f"))
        await self.settle()
        await self.expect([("e/f", {"remove": ""}, None), ("e/g", None, 2)], ordered=False)

    async def test_slow_writer_announced_once_after_close(self):
        """A file written over 3 s (coalescing time passing meanwhile) is announced once, when
        closed, with its whole content."""
        await self.start()
        with open(os.path.join(self.tree, "slow"), "wb") as f:
            for _ in range(3):
                f.write(b"x" * 1000)
                f.flush()
                await self.settle(1.1)
            self.assertEqual(self.got(), [])
        await self.settle()
        await self.expect([("slow", None, 3000)])

    async def test_coalescing(self):
        """50 rewrites of a file within the coalescing time give one notice, of the last
        content."""
        await self.start()
        path = os.path.join(self.tree, "busy")
        for i in range(50):
            write(path, b"v%d" % i)
        await self.settle()
        await until(lambda: self.got())
        await quiet(0.1)
        self.assertEqual(len(self.got()), 1)
        (body,) = self.collector.bodies()
        self.assertEqual(body["identity"]["value"], sha512(b"v49"))

    async def test_events_and_filters(self):
        """Only the events asked for are announced, only for relPaths the filters accept."""
        await self.start(events=["create"], reject=[r".*\.log"])
        write(os.path.join(self.tree, "a"), b"1")
        write(os.path.join(self.tree, "b.log"), b"1")
        os.mkdir(os.path.join(self.tree, "dir"))
        await self.settle()
        await self.expect([("a", None, 1)])
        os.remove(os.path.join(self.tree, "a"))
        write(os.path.join(self.tree, "c"), b"1")
        await self.settle()
        await self.expect([("c", None, 1)])

    async def test_unusable_names_skipped(self):
        """Names a consumer would refuse or a URL cannot carry are not announced; each is
        among the watch's last failures (422, with its name)."""
        proc = await self.start()
        for name in ("line\nbreak", "q?x", "pct%41", "ok"):
            write(os.path.join(self.tree, name), b"1")
        await self.settle()
        await self.expect([("ok", None, 1)])
        failures = (await proc.op_stats(None, {}))["last_failures"]
        self.assertEqual(sorted((f["code"], f["file"]) for f in failures),
                         [(422, "line\nbreak"), (422, "pct%41"), (422, "q?x")])

    async def test_restart_catch_up(self):
        """Files written while the watch was stopped are announced when it starts again, and
        files removed meanwhile are announced as removed; unchanged ones are not announced."""
        for name in ("keep", "gone", "changed"):
            write(os.path.join(self.tree, "sub", name), name.encode())
        proc = await self.start()
        await self.settle()
        await until(lambda: len(self.got()) == 3)
        await quiet(0.1)
        await proc.terminate()
        self.collector.got.clear()
        write(os.path.join(self.tree, "sub", "new"), b"new")
        write(os.path.join(self.tree, "sub", "changed"), b"changed again")
        os.remove(os.path.join(self.tree, "sub", "gone"))
        await self.start()
        await self.settle()
        await until(lambda: len(self.got()) >= 3, what=lambda _: self.got())
        await quiet(0.1)
        self.assertEqual(
            sorted(self.got()),
            [("sub/changed", None, 13), ("sub/gone", {"remove": ""}, None),
             ("sub/new", None, 3)],
        )

    async def test_burst_recorded_before_stop(self):
        """A burst of files announced together is recorded as announced (in a few commits,
        not one per file) even when the watch stops as soon as the broker confirmed them:
        started again, it announces none of them a second time."""
        proc = await self.start()
        names = [f"d{i % 3}/f{i:03d}" for i in range(300)]
        for name in names:
            write(os.path.join(self.tree, name), name.encode())
        await self.settle()
        await until(lambda: len(self.got()) == 3 + len(names), what=lambda _: len(self.got()))
        await proc.terminate()
        self.collector.got.clear()
        await self.start()
        await self.settle()
        await quiet(0.2)
        self.assertEqual(self.got(), [])

    async def test_publish_failure_caught_up(self):
        """Notices the broker does not take are announced by a catch-up pass a few seconds
        later: a file and a removal are not lost."""
        write(os.path.join(self.tree, "gone"), b"1")
        proc = await self.start()
        await self.settle()
        await self.expect([("gone", None, 1)])
        publish = proc.publish

        async def refused(*args, **kwargs):
            raise RuntimeError("broker away")

        proc.publish = refused
        write(os.path.join(self.tree, "new"), b"22")
        os.remove(os.path.join(self.tree, "gone"))
        await self.settle()
        await until(lambda: proc.stats["errors"] == 2)
        self.assertEqual(self.got(), [])
        # What `ion status` shows as the watch's last error (its stats' last_failures).
        (error,) = (await proc.op_stats(None, {}))["last_failures"]
        self.assertEqual((error["code"], error["times"]), (503, 2))
        self.assertIn("cannot publish to", error["reason"])
        self.assertIn("broker away", error["reason"])
        proc.publish = publish
        self.clock.advance(5)
        await self.settle()  # the file found by the catch-up pass waits `coalesce` too
        await self.expect([("gone", {"remove": ""}, None), ("new", None, 2)], ordered=False)

    async def test_not_a_directory(self):
        """A path that is not a directory stops the watch from starting, saying so."""
        with self.assertRaises(Exception) as caught:
            await self.start(path=os.path.join(self.tree, "missing"))
        self.assertIn("is not a directory", str(caught.exception))


class MemoryWatchTests(WatchScenarios, unittest.TestCase):
    url = "memory://"

    async def setUp(self):
        self.broker = MemoryBroker()
        await super().setUp()


class AmqpWatchTests(WatchScenarios, unittest.TestCase):
    timeout = 60

    async def setUp(self):
        skip_or_fail_without_rabbitmq()
        self.url, self.broker = get_broker().url, None
        await super().setUp()


class WatchArgsTests(unittest.SynchronousTestCase):
    def test_args(self):
        """Defaults, and bad args named in one line."""
        args = WatchArgs.parse({"name": "w", "path": "x"})
        self.assertEqual((args.coalesce, args.min_age, args.base_url), (1, 0, None))
        self.assertEqual(len(args.events), 7)
        for bad, said in [
            ({"name": "w"}, "path"),
            ({"name": "w", "path": "x", "events": ["explode"]}, "events"),
            ({"name": "w", "path": "x", "coalesce": -1}, "coalesce"),
            ({"name": "w", "path": "x", "base_url": "nourl"}, "base_url"),
        ]:
            e = self.assertRaises(ValueError, WatchArgs.parse, bad)
            self.assertIn(said, str(e))

    def test_plan(self):
        """The pump app starts one watch per entry, with its state under var/<app>/."""
        plan = pump_app.plan(watches=[{"name": "in", "path": "data/in"}])
        (child,) = [c for c in plan["children"] if c["spec"] == "ion.apps.pump.watch"]
        self.assertEqual(child["name"], "pump.watch.in")
        self.assertEqual(child["args"]["state_dir"], os.path.join("var", "pump", "watch-in"))
        e = self.assertRaises(
            ValueError, pump_app.plan, watches=[{"name": "a", "path": "x"}] * 2
        )
        self.assertIn("named 'a'", str(e))
