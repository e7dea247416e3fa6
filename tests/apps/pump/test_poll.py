"""The poll: what it announces, what it remembers across restarts, what it skips."""

import hashlib
import json
import os
import sqlite3
import threading
import time

from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web import client

from ion.apps.pump.notice import Notice, parse_time
from ion.apps.pump.args import PollArgs, root_url
from ion.apps.pump.poll import PollService, SeenFiles, unfetchable
from ion.apps.pump.transfer import http
from ion.apps.pump.transfer.blocks import sr3_block
from ion.apps.pump.transfer_service import TransferService
from ion.core.cc.testing import call_op, make_container
from ion.core.messaging.memory import MemoryBroker, MemoryTransport
from ion.core.process import ApplicationError, ServiceProcess
from tests.apps.pump.fixtures import Collector, quiet, until, write_source
from tests.apps.pump.servers import settle, start_http
from tests.broker import get_broker

OLD = time.time() - 3600


def write_old(directory, rel_path, data, mtime=OLD):
    """A source file with an mtime well in the past (min_age never holds it back)."""
    path = write_source(directory, rel_path, data)
    os.utime(path, (mtime, mtime))
    return path


def unconfirmed(testcase, *names):
    """Make the broker refuse, for the rest of C{testcase}, the announcements of the files
    named in the set returned (C{names} first; the test may change it)."""
    failing = set(names)
    original = PollService.publish

    async def publish(proc, exchange, key, body, **options):
        if Notice.from_json(body).rel_path in failing:
            raise ConnectionError("broker went away")
        await original(proc, exchange, key, body, **options)

    testcase.patch(PollService, "publish", publish)
    return failing


class FakeLister(ServiceProcess):
    """A `transfer` service whose `list` answers from `listings` {url: entries or an error
    code}; with `gate` set, every list waits for it."""

    service = "transfer"

    def on_init(self):
        self.listings = {}
        self.gate = None
        self.calls = []

    async def op_list(self, content, headers):
        self.calls.append(content["url"])
        if self.gate is not None:
            await self.gate
        answer = self.listings.get(content["url"], 404)
        if isinstance(answer, int):
            raise ApplicationError(f"listing {content['url']} failed", code=answer)
        return answer


class PageLister(FakeLister):
    """A `transfer` service answering as for index pages: asked for a `digest`, each listing
    with the digest of its entries, none (`unchanged`) when that is `unless`; `whole` the
    urls it gave entries for."""

    def on_init(self):
        super().on_init()
        self.whole = []

    async def op_list(self, content, headers):
        entries = await super().op_list(content, headers)
        if not content.get("digest"):
            return entries
        digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
        if content.get("unless") == digest:
            return {"entries": None, "bytes": 0, "digest": digest, "unchanged": True}
        self.whole.append(content["url"])
        return {"entries": entries, "bytes": 0, "digest": digest, "unchanged": False}


async def seen(store, rel_path):
    """(size, mtime) as last announced for C{rel_path}, or None."""
    rel_dir, _, name = rel_path.rpartition("/")
    return (await store.directory(rel_dir)).get(name)


def entry(name, size=1, mtime=OLD, mode=0o644, type="file"):
    return {"name": name, "size": size, "mtime": mtime, "mode": mode, "type": type}


class ArgsTests(unittest.SynchronousTestCase):
    def test_defaults(self):
        """A poll needs a name and a url; a relative file: url becomes absolute, every url
        ends with '/', and the baseUrl of announcements defaults to it."""
        args = PollArgs.parse({"name": "src", "url": "file:some/dir"})
        self.assertEqual(args["url"], "file://" + os.path.abspath("some/dir") + "/")
        self.assertEqual(args["base_url"], args["url"])
        self.assertEqual((args["interval"], args["min_age"], args["recursive"]), (2, 0, True))
        args = PollArgs.parse({"name": "w", "url": "http://h/d", "base_url": "https://mirror/d"})
        self.assertEqual((args["url"], args["base_url"]), ("http://h/d/", "https://mirror/d/"))
        self.assertEqual(root_url("file:/a b%"), "file:///a%20b%25/")

    def test_bad_args(self):
        """Bad args are errors naming the poll and the argument."""
        table = [
            ({"url": "file:x"}, "poll name"),
            ({"name": "p"}, "url"),
            ({"name": "p", "url": "gopher://h/"}, "scheme 'gopher'"),
            ({"name": "p", "url": "http://u:pw@[::1/"}, "poll p: url is malformed"),
            ({"name": "p", "url": "file:x", "interval": 0}, "interval"),
            ({"name": "p", "url": "file:x", "min_age": -1}, "min_age"),
            ({"name": "p", "url": "file:x", "batch": 0}, "batch"),
            ({"name": "p", "url": "file:x", "accept": "x"}, "accept"),
            ({"name": "p", "url": "file:x", "reject": ["("]}, "bad regex"),
            ({"name": "p", "url": "file:x", "exchange": "a b"}, "exchange"),
            ({"name": "p", "url": "file:x", "colour": 1}, "unknown argument 'colour'"),
        ]
        for args, expected in table:
            e = self.assertRaises(ValueError, PollArgs.parse, args)
            self.assertIn(expected, str(e), args)

    def test_filters(self):
        """Naming files to accept rejects the others; rejects alone accept the rest; the
        first matching rule decides."""
        accepts = PollArgs.parse({"name": "p", "url": "file:x", "accept": [r".*\.txt"]})["filter"]
        self.assertEqual(
            [accepts.accepts(p) for p in ("a.txt", "d/b.txt", "c.dat")], [True, True, False]
        )
        rejects = PollArgs.parse({"name": "p", "url": "file:x", "reject": [r".*\.tmp"]})["filter"]
        self.assertEqual([rejects.accepts(p) for p in ("a.tmp", "c.dat")], [False, True])
        ordered = PollArgs.parse(
            {"name": "p", "url": "file:x", "filters": [("accept", "keep/.*"), ("reject", ".*")]}
        )["filter"]
        self.assertEqual([ordered.accepts(p) for p in ("keep/x", "other/x")], [True, False])

    def test_plain_names_pass_every_check(self):
        """The names a poll takes without the full checks (the usual ones, for speed) are
        names the full checks accept; the others still get them."""
        import random

        from ion.apps.pump import paths, poll

        rng = random.Random(7)
        alphabet = "aZ09_.+=,@~-%?#:/\\ \x00\x7fé"
        names = [".", "..", "-", "C:", ".x.inflight", "a" * 255, "a" * 256, "%2e%2e"]
        names += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
                  for _ in range(20000)]
        taken = 0
        for name in names:
            if poll._PLAIN_NAME.fullmatch(name):
                taken += 1
                paths.safe_name(name)
                self.assertIsNone(unfetchable(name), name)
        self.assertGreater(taken, 100)

    def test_unfetchable(self):
        """Names a URL cannot carry back to the server are recognised."""
        for name in ("a?b", "a#b", "100%41"):
            self.assertIsNotNone(unfetchable(name), name)
        for name in ("plain", "100%", "a b", "%zz"):
            self.assertIsNone(unfetchable(name), name)

    def test_plain_notices_are_the_general_ones(self):
        """A usual file's notice, written by the poll's fast path, is byte for byte the
        notice the general path writes (names of any script and escapes, any mtime);
        entries it cannot write (no size, an odd mtime, a lone surrogate, a file announced
        in blocks) are left to the general path."""
        import random
        import types

        from ion.apps.pump import poll

        rng = random.Random(21)
        base = types.SimpleNamespace(base_url='https://h/a "b"\\/é/')
        now = 1764979200.25
        head = poll.notice_head(poll.format_time(now), base.base_url)
        stamps = {}
        mtimes = [0, 1.5, 0.000000001, 1764979199.9999999999, 253402300799.5, OLD]
        mtimes += [rng.uniform(0, 4e9) for _ in range(3000)] + [rng.randrange(0, 4_000_000_000)] * 3
        # Index pages give whole minutes.
        mtimes += [float(rng.randrange(0, 4_000_000_000) // 60 * 60) for _ in range(100)]
        mtimes += [1.0000000001, 2.9999999996]
        names = ["a", 'q"uote', "back\\slash", "tab\there", "é/ü/ß", "雪.dat", "\x7f\x01"]
        for mtime in mtimes:
            rel_path = rng.choice(names) + str(rng.randrange(10))
            # An index page gives no mode, some no size (rounded) or no date.
            item = entry(rel_path, size=rng.choice([rng.randrange(0, 1 << 40), None]),
                         mtime=rng.choice([mtime, mtime, None]),
                         mode=rng.choice([rng.randrange(0, 0o177777), None]))
            body = poll.plain_notice_json(head, rel_path, item, stamps, None)
            expected = Notice(PollService.notice_for(base, rel_path, item, now)).to_json()
            self.assertEqual(body, expected, (rel_path, item))
        unusual = [
            entry("a", mtime=float("nan")), entry("a", mtime=-1.5), entry("a", mtime=1e12),
            entry("a", mtime=True), entry("a", size=True), entry("a", size=1.0),
            entry("a", mode="644"), entry("a", mtime="1"),
        ]
        for item in unusual:
            self.assertIsNone(poll.plain_notice_json(head, "a", item, stamps, None), item)
        self.assertIsNone(poll.plain_notice_json(head, "\udcff", entry("x"), stamps, None))
        self.assertIsNone(poll.plain_notice_json(head, "a", entry("a", size=11), stamps, 10))
        self.assertIsNotNone(poll.plain_notice_json(head, "a", entry("a", size=10), stamps, 10))


class SeenFilesTests(unittest.TestCase):
    async def test_store(self):
        """Rows per directory survive reopening; another root starts empty; directories a
        complete pass did not visit are forgotten."""
        path = os.path.join(self.mktemp(), "seen.sqlite3")
        store = SeenFiles(path, "file:///a/", reactor)
        number = await store.start_pass()
        await store.visited("", number)
        await store.visited("d", number)
        await store.record("", [("f", 1, 2.5)])
        await store.record("d", [("g", None, None), ("h", 3, 4.0)])
        await store.close()
        store = SeenFiles(path, "file:///a/", reactor)
        self.assertFalse(store.reset)
        self.assertEqual(store.known_at_open, 3)
        self.assertEqual(await store.directory("d"), {"g": (None, None), "h": (3, 4.0)})
        self.assertEqual(await seen(store, "f"), (1, 2.5))
        number = await store.start_pass()
        await store.visited("", number)
        await store.forget_unvisited(number)
        self.assertEqual((await store.directory("d"), await store.count()), ({}, 1))
        await store.forget("", ["f"])
        self.assertEqual(await store.count(), 0)
        await store.record("", [("f", 1, 2.5)])
        await store.close()
        store = SeenFiles(path, "file:///b/", reactor)
        self.addCleanup(store.close)
        self.assertTrue(store.reset)
        self.assertEqual(await store.count(), 0)

    async def test_commits_off_the_reactor_thread(self):
        """A poll's SQLite commits run in pool threads, one at a time in the order asked for:
        the reactor does not wait for the disk."""
        store = SeenFiles(os.path.join(self.mktemp(), "seen.sqlite3"), "file:///a/", reactor)
        threads = set()
        store.db.set_trace_callback(lambda sql: threads.add(threading.current_thread()))
        writes = [store.record("", [(f"f{n}", n, 1.0)]) for n in range(5)]
        writes.append(store.forget("", ["f0"]))
        self.assertEqual(await store.directory(""), {f"f{n}": (n, 1.0) for n in range(1, 5)})
        await defer.gatherResults(writes)
        await store.close()
        self.assertTrue(threads)
        self.assertNotIn(threading.main_thread(), threads)


class PollTests(unittest.TestCase):
    """A poll over real files (file://), the transfer service and the memory broker."""

    async def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        self.state = os.path.join(self.base, "state")
        os.makedirs(self.src)
        credentials = os.path.join(self.base, "credentials.conf")
        with open(credentials, "w"):
            pass
        os.chmod(credentials, 0o600)
        self.broker = MemoryBroker()
        self.c = await make_container(self, memory_broker=self.broker)
        self.collector = await self.c.spawn(Collector)
        await self.collector.listen("xs_ion")
        self.transfer = await self.c.spawn(TransferService, args={"credentials": credentials})

    async def start_poll(self, container=None, **args):
        args.setdefault("name", "src")
        args.setdefault("url", "file://" + self.src + "/")
        args.setdefault("state_dir", self.state)
        args.setdefault("interval", 3600)
        proc = await (container or self.c).spawn(PollService, args=args)
        self.addCleanup(self.stop, proc)
        await proc.poll_now()
        await quiet()
        return proc

    async def stop(self, proc):
        if not proc.lifecycle.final:
            await proc.terminate()

    async def announced(self, proc):
        """Run a pass and return the relPaths announced since the last call, sorted."""
        await proc.poll_now()
        await quiet()
        got = sorted(body["relPath"] for body in self.collector.bodies())
        self.collector.got.clear()
        return got

    async def test_announces_tree(self):
        """Every file of the tree is announced once, as a valid v03 notice on xs_<user> with
        the routing key of its directories, its size, mtime and mode, and a cod identity."""
        write_old(self.src, "top.txt", b"top")
        path = write_old(self.src, "a/b/deep.dat", b"deep data", mtime=1700000000.5)
        os.chmod(path, 0o640)
        os.makedirs(os.path.join(self.src, "empty"))
        proc = await self.start_poll()
        await quiet()
        got = {body["relPath"]: (ex, key, body) for ex, key, body in self.collector.got}
        self.assertEqual(sorted(got), ["a/b/deep.dat", "top.txt"])
        exchange, key, body = got["a/b/deep.dat"]
        self.assertEqual((exchange, key), ("xs_ion", "v03.a.b"))
        notice = Notice(body).validate()
        self.assertEqual(notice.base_url, "file://" + self.src + "/")
        self.assertEqual((notice.size, notice.mode), (9, "640"))
        self.assertEqual(parse_time(notice.mtime), 1700000000.5)
        self.assertEqual(notice.identity, {"method": "cod", "value": "sha512"})
        self.assertIsNone(notice.source)
        self.assertEqual(notice.url(), "file://" + path)
        self.assertEqual(got["top.txt"][1], "v03")
        stats = await call_op(proc, "stats")
        self.assertEqual((stats["announced"], stats["known"], stats["passes"]), (2, 2, 1))

    async def test_byte_rate_max_paces_listings(self):
        """With byte_rate_max, a poll of a real HTTP index takes the time its listings' bytes
        need at that rate (within 10%), past the bucket's first 64 KiB; without, far less.
        Every file is announced all the same."""
        names = [f"{d}/{'n' * 60}{i:03d}.dat" for d in ("a", "b", "c") for i in range(150)]
        for rel_path in names:
            write_old(self.src, rel_path, b"x")
        server = start_http(self, self.src)
        self.addCleanup(settle)
        url = server.url + "/files/"
        agent = client.Agent(reactor)
        total = 0
        for page in ("", "a/", "b/", "c/"):
            response = await agent.request(b"GET", (url + page).encode())
            total += len(await client.readBody(response))
        burst = 64 * 1024
        # Two seconds of pacing: the rate that moves what is past the burst in that time.
        rate = (total - burst) / 2.0
        unpaced = await self.start_poll(name="unpaced", url=url, state_dir=self.state + "-u")
        self.assertEqual(len(self.collector.bodies()), len(names))
        self.collector.got.clear()
        paced = await self.start_poll(name="paced", url=url, byte_rate_max=rate)
        self.assertEqual(sorted(b["relPath"] for b in self.collector.bodies()), sorted(names))
        spent = paced.last_pass["seconds"]
        extra = unpaced.last_pass["seconds"]
        self.assertLess(extra, spent / 2)
        self.assertGreaterEqual(spent, 2.0 * 0.99)
        self.assertLessEqual(spent, 2.0 * 1.1 + extra)

    async def test_unchanged_local_directories_not_compared(self):
        """A second pass over a local tree reads no directory's rows (what it lists is what it
        listed when they were written); a file changed in place, the same size, is
        announced all the same, and its directory's rows read."""
        write_old(self.src, "top", b"t")
        path = write_old(self.src, "d/f", b"f")
        proc = await self.start_poll()
        self.collector.got.clear()
        read = []
        original = proc.store.directory

        def directory(rel_dir):
            read.append(rel_dir)
            return original(rel_dir)

        proc.store.directory = directory
        self.assertEqual(await self.announced(proc), [])
        self.assertEqual((read, proc.last_pass["unchanged"]), ([], 2))
        write_old(self.src, "d/f", b"g", mtime=OLD + 1)
        self.assertEqual(await self.announced(proc), ["d/f"])
        self.assertEqual(read, ["d"])
        self.assertEqual(await seen(proc.store, "d/f"), (1, os.stat(path).st_mtime))

    async def test_unchanged_index_pages_not_parsed(self):
        """Over an HTTP index, a second pass parses no page and announces nothing; a new
        file gets its directory's page, and only that one, parsed, and is announced."""
        write_old(self.src, "top", b"t")
        write_old(self.src, "d/f", b"f")
        server = start_http(self, self.src)
        self.addCleanup(settle)
        url = server.url + "/files/"
        parsed = []
        original = http.parse_html_index

        def parse(text, base_url):
            parsed.append(base_url)
            return original(text, base_url)

        self.patch(http, "parse_html_index", parse)
        proc = await self.start_poll(url=url)
        self.assertEqual(sorted(b["relPath"] for b in self.collector.bodies()), ["d/f", "top"])
        self.assertEqual(len(parsed), 2)
        self.collector.got.clear()
        del parsed[:]
        self.assertEqual(await self.announced(proc), [])
        self.assertEqual((parsed, proc.last_pass["unchanged"]), ([], 2))
        write_old(self.src, "d/g", b"g")
        self.assertEqual(await self.announced(proc), ["d/g"])
        self.assertEqual(parsed, [url + "d/"])

    async def test_announces_blocks(self):
        """With block_size, a listed file bigger than that is announced as one notice per
        block as sr3 writes them, each with the file's cod identity (no checksum is known)
        and read by the accept side as its block; a smaller file whole; the file is recorded
        once every block was confirmed, and not announced again."""
        size = 2 * 65536 + 1
        write_old(self.src, "d/big", os.urandom(size))
        write_old(self.src, "small", b"s")
        proc = await self.start_poll(block_size=65536)
        bodies = self.collector.bodies()
        big = sorted((b for b in bodies if b["relPath"] == "d/big"),
                     key=lambda b: b["blocks"]["number"])
        self.assertEqual([sr3_block(b["blocks"], b["size"]) for b in big],
                         [(size, 65536, 0, 65536), (size, 65536, 1, 65536), (size, 65536, 2, 1)])
        for body in big:
            Notice(body).validate()
            self.assertEqual(body["identity"], {"method": "cod", "value": "sha512"})
        [small] = [b for b in bodies if b["relPath"] == "small"]
        self.assertNotIn("blocks", small)
        self.collector.got.clear()
        self.assertEqual(await self.announced(proc), [])

    async def test_changes(self):
        """A second pass announces nothing; a file with another size or mtime is announced
        again, a new one once; a deleted file is forgotten and announced when it returns."""
        write_old(self.src, "d/same", b"same")
        write_old(self.src, "d/grows", b"1")
        write_old(self.src, "touched", b"t")
        gone = write_old(self.src, "d/gone", b"g")
        proc = await self.start_poll()
        self.collector.got.clear()
        self.assertEqual(await self.announced(proc), [])
        write_old(self.src, "d/grows", b"12")
        write_old(self.src, "touched", b"t", mtime=OLD + 1)
        write_old(self.src, "d/new", b"n")
        os.unlink(gone)
        self.assertEqual(await self.announced(proc), ["d/grows", "d/new", "touched"])
        self.assertIsNone(await seen(proc.store, "d/gone"))
        write_old(self.src, "d/gone", b"g")
        self.assertEqual(await self.announced(proc), ["d/gone"])
        self.assertEqual(proc.last_pass["unchanged"], 4)

    async def test_removed_directory_forgotten(self):
        """The files of a directory that disappeared are forgotten after a complete pass."""
        write_old(self.src, "keep/f", b"k")
        write_old(self.src, "drop/sub/f", b"d")
        proc = await self.start_poll()
        self.collector.got.clear()
        self.assertEqual(await seen(proc.store, "drop/sub/f"), (1, OLD))
        for path in ("drop/sub/f",):
            os.unlink(os.path.join(self.src, path))
        os.rmdir(os.path.join(self.src, "drop", "sub"))
        os.rmdir(os.path.join(self.src, "drop"))
        self.assertEqual(await self.announced(proc), [])
        self.assertIsNone(await seen(proc.store, "drop/sub/f"))
        self.assertEqual(await seen(proc.store, "keep/f"), (1, OLD))

    async def test_announce_removals(self):
        """With announce_removals, a file gone from the listing, also with its whole
        directory, is announced once as removed (fileOp remove) and forgotten; without it
        (the default) nothing is announced."""
        write_old(self.src, "d/gone", b"g")
        write_old(self.src, "drop/sub/f", b"d")
        write_old(self.src, "keep", b"k")
        proc = await self.start_poll(announce_removals=True)
        self.collector.got.clear()
        os.unlink(os.path.join(self.src, "d", "gone"))
        os.unlink(os.path.join(self.src, "drop", "sub", "f"))
        os.rmdir(os.path.join(self.src, "drop", "sub"))
        await proc.poll_now()
        await quiet()
        self.assertEqual(
            sorted((b["relPath"], b["fileOp"]) for b in self.collector.bodies()),
            [("d/gone", {"remove": ""}), ("drop/sub/f", {"remove": ""})],
        )
        self.assertEqual(proc.last_pass["removed"], 2)
        self.collector.got.clear()
        self.assertEqual(await self.announced(proc), [])
        await proc.terminate()
        quiet_poll = await self.start_poll(state_dir=self.state + "2")
        self.collector.got.clear()
        os.unlink(os.path.join(self.src, "keep"))
        self.assertEqual(await self.announced(quiet_poll), [])

    async def test_state_survives_restart(self):
        """A new poll process on the same state does not announce unchanged files again,
        only what changed while it was away."""
        for i in range(5):
            write_old(self.src, f"d{i % 2}/f{i}", b"x" * i)
        first = await self.start_poll()
        await quiet()
        self.assertEqual(len(self.collector.bodies()), 5)
        await first.terminate()
        self.collector.got.clear()
        write_old(self.src, "d1/f3", b"changed")
        second = await self.start_poll()
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["d1/f3"])
        self.assertEqual(second.last_pass["unchanged"], 4)

    async def test_broker_lost_notices_announces_again(self):
        """After an embedded broker whose previous run ended with messages queued (they died
        with it), a poll announces every file again, unchanged ones too; with a broker that
        lost nothing, a restart announces only what changed."""
        for i in range(3):
            write_old(self.src, f"d/f{i}", b"x" * i)
        first = await self.start_poll()
        self.assertEqual(len(self.collector.bodies()), 3)
        await first.terminate()
        self.collector.got.clear()
        self.broker.lost_messages = True  # as after a run_record saying so
        await self.start_poll()
        self.assertEqual(
            sorted(b["relPath"] for b in self.collector.bodies()), ["d/f0", "d/f1", "d/f2"]
        )

    async def test_url_change_starts_over(self):
        """Pointing a poll's state at another url announces everything there."""
        write_old(self.src, "f", b"f")
        other = os.path.join(self.base, "other")
        write_old(other, "f", b"f")
        first = await self.start_poll()
        await first.terminate()
        self.collector.got.clear()
        await self.start_poll(url="file://" + other)
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["f"])

    async def test_min_age(self):
        """A file younger than min_age waits for a pass where it is old enough."""
        write_old(self.src, "old", b"o")
        write_source(self.src, "fresh", b"f")
        proc = await self.start_poll(min_age=60)
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["old"])
        self.assertEqual(proc.last_pass["young"], 1)
        self.collector.got.clear()
        self.assertEqual(await self.announced(proc), [])
        os.utime(os.path.join(self.src, "fresh"), (OLD, OLD))
        self.assertEqual(await self.announced(proc), ["fresh"])

    async def test_accept_reject(self):
        """accept/reject regexes match the relPath; rejects tried first; with accepts, the
        unmatched files are not announced."""
        for name in ("a.txt", "b.dat", "c.tmp.txt", "sub/d.txt", "sub/e.dat"):
            write_old(self.src, name, b"x")
        proc = await self.start_poll(accept=[r".*\.txt"], reject=[r".*\.tmp\..*"])
        await quiet()
        self.assertEqual(
            sorted(b["relPath"] for b in self.collector.bodies()), ["a.txt", "sub/d.txt"]
        )
        self.assertEqual(proc.last_pass["rejected"], 3)

    async def test_not_recursive(self):
        """recursive=False announces the top directory's files only."""
        write_old(self.src, "f", b"f")
        write_old(self.src, "d/g", b"g")
        await self.start_poll(recursive=False)
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["f"])

    async def test_unusable_local_names(self):
        """Local names with control characters or URL escapes are skipped with a warning;
        symbolic links are not announced nor followed."""
        write_old(self.src, "good", b"g")
        write_old(self.src, "bad\x01name", b"b")
        write_old(self.src, "esc%41ped", b"e")
        write_old(self.base, "outside/secret", b"s")
        os.symlink(os.path.join(self.base, "outside"), os.path.join(self.src, "linkdir"))
        os.symlink(os.path.join(self.base, "outside", "secret"), os.path.join(self.src, "lf"))
        proc = await self.start_poll()
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["good"])
        self.assertEqual((proc.last_pass["unsafe"], proc.last_pass["skipped_entries"]), (2, 2))

    async def test_inflight_files_skipped_quietly(self):
        """A transfer's temporary file in the polled tree is neither announced (a consumer
        would refuse its name, and it is partial) nor warned about."""
        write_old(self.src, "good", b"g")
        write_old(self.src, "d/.f.dat.0123456789ab.inflight", b"partial")
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        proc = await self.start_poll()
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["good"])
        self.assertEqual((proc.last_pass["unsafe"], proc.last_pass["skipped_entries"]), (0, 1))
        self.assertEqual([e for e in logged if "skipped a name" in formatEvent(e)], [])

    async def test_base_url_and_exchange(self):
        """base_url replaces the polled url in announcements; exchange and user choose where
        they go."""
        write_old(self.src, "d/f", b"f")
        await self.collector.listen("xs_alice")
        await self.collector.listen("custom")
        await self.start_poll(name="a", user="alice", base_url="https://example.org/data")
        await self.start_poll(name="b", exchange="custom", state_dir=self.state + "b")
        await quiet()
        got = {ex: body for ex, _, body in self.collector.got}
        self.assertEqual(sorted(got), ["custom", "xs_alice"])
        self.assertEqual(got["xs_alice"]["baseUrl"], "https://example.org/data/")

    async def test_creates_local_directory(self):
        """A local directory to poll that does not exist is created when the poll says
        C{create} (the pump's own default source), and the log says so."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        missing = os.path.join(self.base, "not", "yet")
        await self.start_poll(url="file:" + missing, create=True)
        self.assertTrue(os.path.isdir(missing))
        lines = [formatEvent(e) for e in logged if "which did not exist" in formatEvent(e)]
        self.assertEqual(lines, [f"poll src: created {missing}/, which did not exist"])

    async def test_missing_directory_is_an_error(self):
        """A mistyped local directory is not created: each pass fails, warned about once and
        counted in the poll's stats."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        missing = os.path.join(self.base, "mistyped")
        proc = await self.start_poll(url="file:" + missing)
        await proc.poll_now()
        await proc.poll_now()
        self.assertFalse(os.path.exists(missing))
        warned = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warned), 1, warned)
        self.assertIn("no such file or directory", warned[0])
        stats = await call_op(proc, "stats")
        self.assertGreaterEqual(stats["failed_passes"], 2)

    async def test_hung_local_directory_times_out(self):
        """A local directory that does not answer (a hung network file system) fails the
        pass after list_timeout with a 504, as a remote listing that does not come would."""
        from ion.apps.pump import poll

        release = threading.Event()
        self.addCleanup(release.set)
        real = poll.list_local

        def hanging(path, shown, unless=None):
            release.wait(30)
            return real(path, shown, unless)

        self.patch(poll, "list_local", hanging)
        proc = await self.start_poll(list_timeout=0.2)
        stats = await call_op(proc, "stats")
        self.assertEqual(stats["failed_passes"], 1)
        self.assertEqual(stats["last_failures"][0]["code"], 504)
        self.assertIn("not listed in 0.2 s", stats["last_failures"][0]["reason"])

    async def test_unconfirmed_not_recorded(self):
        """A file whose announcement the broker did not confirm is not recorded: the next
        pass announces it; the ones confirmed are not announced again."""
        for name in ("a", "b", "c"):
            write_old(self.src, name, b"x")
        failing = unconfirmed(self, "b")
        proc = await self.start_poll()
        await quiet()
        self.assertEqual(sorted(b["relPath"] for b in self.collector.bodies()), ["a", "c"])
        self.assertEqual((proc.last_pass["errors"], proc.last_pass["complete"]), (1, False))
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        failing.clear()
        self.collector.got.clear()
        self.assertEqual(await self.announced(proc), ["b"])
        self.assertTrue(proc.last_pass["complete"])

    async def test_batches(self):
        """Directories are handled one at a time, in batches: a tree of many files in many
        directories is announced whole, once, and recorded."""
        for i in range(300):
            write_old(self.src, f"d{i % 12}/s{i % 5}/f{i}", b"%d" % i)
        proc = await self.start_poll(batch=7)
        await quiet()
        announced = sorted(b["relPath"] for b in self.collector.bodies())
        self.assertEqual(len(announced), 300)
        self.assertEqual(len(set(announced)), 300)
        self.assertEqual(await proc.store.count(), 300)


class FakeListingTests(unittest.TestCase):
    """A poll against a fake transfer service: hostile listings, failures, overlapping passes."""

    lister_class = FakeLister

    async def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.c = await make_container(self, memory_broker=MemoryBroker(), clock=self.clock)
        self.collector = await self.c.spawn(Collector)
        await self.collector.listen("xs_ion")
        self.lister = await self.c.spawn(self.lister_class)
        self.state = os.path.abspath(self.mktemp())

    async def start_poll(self, **args):
        args.setdefault("name", "remote")
        args.setdefault("url", "sftp://feed.example/data/")
        args.setdefault("state_dir", self.state)
        args.setdefault("interval", 10)
        proc = await self.c.spawn(PollService, args=args)
        self.addCleanup(lambda: None if proc.lifecycle.final else proc.terminate())
        return proc

    async def test_hostile_names(self):
        """Listing names that could escape the tree or confuse a path are skipped with a
        warning; the rest is announced."""
        root = "sftp://feed.example/data/"
        self.lister.listings[root] = [
            entry(".."),
            entry("../../etc/passwd"),
            entry("a/b"),
            entry("nul\x00"),
            entry("%2e%2e"),
            entry("back\\slash"),
            entry("C:"),
            entry("x" * 300),
            entry("line\nbreak"),
            entry("q?x"),
            entry(".", type="dir"),
            entry("..", type="dir"),
            entry("ok.txt"),
            entry("sub", type="dir"),
        ]
        self.lister.listings[root + "sub/"] = [entry("inner"), entry("%252e%252e", type="dir")]
        proc = await self.start_poll()
        await proc.poll_now()
        await quiet()
        self.assertEqual(
            sorted(b["relPath"] for b in self.collector.bodies()), ["ok.txt", "sub/inner"]
        )
        self.assertEqual(proc.last_pass["unsafe"], 13)
        self.assertEqual(self.lister.calls, [root, root + "sub/"])

    async def test_no_overlapping_passes(self):
        """A pass still running when the next is due makes that one skip; the pass after it
        runs again."""
        root = "sftp://feed.example/data/"
        self.lister.listings[root] = [entry("f")]
        self.lister.gate = defer.Deferred()
        proc = await self.start_poll(interval=10)
        await until(lambda: self.lister.calls)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual((proc.stats["skipped"], len(self.lister.calls)), (2, 1))
        gate, self.lister.gate = self.lister.gate, None
        gate.callback(None)
        await until(lambda: proc.stats["passes"] == 1)
        self.clock.advance(10)
        await until(lambda: proc.stats["passes"] == 2)
        self.assertEqual(len(self.lister.calls), 2)
        await quiet()
        self.assertEqual([b["relPath"] for b in self.collector.bodies()], ["f"])

    async def test_listing_failures(self):
        """A listing that fails is warned about once while it keeps failing, and what is
        known stays known; a subdirectory gone since its parent was listed is no error."""
        root = "sftp://feed.example/data/"
        self.lister.listings[root] = [entry("f"), entry("d", type="dir"), entry("gone", type="dir")]
        self.lister.listings[root + "d/"] = [entry("g")]
        proc = await self.start_poll()
        await proc.poll_now()
        self.assertEqual((await proc.store.count(), proc.last_pass["errors"]), (2, 0))
        self.lister.listings[root + "d/"] = 503
        for _ in range(3):
            self.clock.advance(10)
            await proc.poll_now()
        self.assertEqual(proc.stats["errors"], 3)
        self.assertEqual(await seen(proc.store, "d/g"), (1, OLD))
        self.lister.listings[root] = 503
        self.clock.advance(10)
        await proc.poll_now()
        self.assertEqual(await seen(proc.store, "f"), (1, OLD))

    async def test_terminate_cancels_a_stuck_pass(self):
        """Terminating a poll whose pass hangs gives it stop_grace seconds (on the container's
        clock), then cancels it."""
        self.lister.gate = defer.Deferred()
        self.lister.listings["sftp://feed.example/data/"] = [entry("f")]
        proc = await self.start_poll(stop_grace=60, list_timeout=3600)
        await until(lambda: self.lister.calls)
        stopping = defer.Deferred.fromCoroutine(proc.terminate())
        self.clock.advance(59.9)
        self.assertNoResult(stopping)
        self.clock.advance(0.1)
        await stopping.addTimeout(5, reactor)
        self.assertEqual(proc.state, "TERMINATED")
        self.lister.gate.callback(None)
        await quiet()
        self.assertEqual(self.collector.bodies(), [])

    async def test_terminate_while_publishing(self):
        """A poll stopped while the broker has not confirmed its announcements ends without
        recording them and without reporting an error."""
        self.lister.listings["sftp://feed.example/data/"] = [entry("f"), entry("g")]
        hung = []

        async def publish(proc, exchange, key, body, **options):
            d = defer.Deferred()
            hung.append(d)
            await d

        self.patch(PollService, "publish", publish)
        proc = await self.start_poll(stop_grace=60)
        await until(lambda: len(hung) == 2)
        stopping = defer.Deferred.fromCoroutine(proc.terminate())
        self.clock.advance(60)
        await stopping.addTimeout(5, reactor)
        self.assertEqual((proc.state, proc.stats["errors"]), ("TERMINATED", 0))
        store = SeenFiles(os.path.join(self.state, "seen.sqlite3"), "sftp://feed.example/data/")
        self.addCleanup(store.close)
        self.assertEqual(store.known_at_open, 0)

    async def test_unknown_sizes_and_times(self):
        """Listings without sizes or times (some HTTP index pages) announce a file once, and
        again when what they do tell changes."""
        root = "sftp://feed.example/data/"
        self.lister.listings[root] = [entry("f", size=None, mtime=None, mode=None)]
        proc = await self.start_poll(min_age=60)
        await proc.poll_now()
        await quiet()
        (body,) = self.collector.bodies()
        self.assertNotIn("size", body)
        self.assertNotIn("mtime", body)
        self.clock.advance(10)
        await proc.poll_now()
        self.lister.listings[root] = [entry("f", size=5, mtime=None, mode=None)]
        self.clock.advance(10)
        await proc.poll_now()
        await quiet()
        self.assertEqual([b.get("size") for b in self.collector.bodies()], [None, 5])


class UnchangedPageTests(unittest.TestCase):
    """A remote directory whose index page is the one read last time, every file of it
    announced then, is not read again; anything that may have left a file of it unannounced
    or its row changed makes the next pass read it."""

    lister_class = PageLister
    setUp = FakeListingTests.setUp
    start_poll = FakeListingTests.start_poll
    root = "http://feed.example/data/"

    def tree(self):
        self.lister.listings[self.root] = [entry("a"), entry("b"), entry("sub", type="dir")]
        self.lister.listings[self.root + "sub/"] = [entry("c"), entry("deep", type="dir")]
        self.lister.listings[self.root + "sub/deep/"] = [entry("d")]

    async def announced(self, proc):
        """A pass: the relPaths it announced, sorted; the urls it read whole."""
        self.collector.got.clear()
        del self.lister.whole[:]
        await proc.poll_now()
        await quiet()
        return sorted(b["relPath"] for b in self.collector.bodies()), self.lister.whole

    async def test_unchanged_pages_not_read(self):
        """A second pass reads no page whole and announces nothing, counting every file as
        unchanged and walking every directory; a changed page below an unchanged one is
        read and its change announced."""
        self.tree()
        proc = await self.start_poll(url=self.root)
        everything = ["a", "b", "sub/c", "sub/deep/d"]
        self.assertEqual((await self.announced(proc))[0], everything)
        self.assertEqual(await self.announced(proc), ([], []))
        self.assertEqual(len(self.lister.calls), 6)  # every directory listed twice
        counts = {k: proc.last_pass[k] for k in ("listed", "unchanged", "announced")}
        self.assertEqual(counts, {"listed": 6, "unchanged": 4, "announced": 0})
        self.assertTrue(proc.last_pass["complete"])
        self.lister.listings[self.root + "sub/deep/"] = [entry("d", size=2)]
        self.assertEqual(await self.announced(proc), (["sub/deep/d"], [self.root + "sub/deep/"]))
        self.assertEqual(await self.announced(proc), ([], []))

    async def test_rows_changed_since_read_again(self):
        """A page unchanged whose rows changed since it was read -- a file forgotten, one
        recorded from another poll's announcement (a standby's), every file forgotten (a
        broker that lost notices) -- is read again and what is not known announced."""
        self.tree()
        proc = await self.start_poll(url=self.root)
        await self.announced(proc)
        await proc.store.forget("sub", ["c"])
        self.assertEqual(await self.announced(proc), (["sub/c"], [self.root + "sub/"]))
        await proc.store.update({"sub/deep/d": (7, OLD)})
        self.assertEqual((await self.announced(proc))[0], ["sub/deep/d"])
        await proc.store.forget_all()
        self.assertEqual((await self.announced(proc))[0], ["a", "b", "sub/c", "sub/deep/d"])
        self.assertEqual(await self.announced(proc), ([], []))

    async def test_pass_ended_part_way_read_again(self):
        """A page some of whose files were not announced (the broker did not confirm one) is
        read again by the next pass, which announces them, even though the page is the
        same."""
        self.tree()
        failing = unconfirmed(self, "b")
        proc = await self.start_poll(url=self.root)
        self.assertEqual((await self.announced(proc))[0], ["a"])
        self.assertFalse(proc.last_pass["complete"])
        failing.clear()
        self.assertEqual((await self.announced(proc))[0], ["b", "sub/c", "sub/deep/d"])
        self.assertEqual(await self.announced(proc), ([], []))

    async def test_young_or_rejected_files_read_again(self):
        """A page with a file too young to announce is read again until it is announced;
        one with files the filters rejected is read again, so that a poll with other filters
        on the same state announces them."""
        now = self.clock.seconds()
        self.lister.listings[self.root] = [entry("old"), entry("new", mtime=now - 5)]
        proc = await self.start_poll(url=self.root, min_age=60)
        self.assertEqual((await self.announced(proc))[0], ["old"])
        self.clock.advance(10)
        self.assertEqual((await self.announced(proc))[0], [])
        self.clock.advance(60)
        self.assertEqual((await self.announced(proc))[0], ["new"])
        self.assertEqual(await self.announced(proc), ([], []))
        await proc.terminate()
        self.lister.listings[self.root].append(entry("x.tmp"))
        strict = await self.start_poll(url=self.root, reject=[r".*\.tmp"])
        self.assertEqual((await self.announced(strict))[0], [])  # "x.tmp" rejected
        self.assertEqual((await self.announced(strict))[0], [])
        await strict.terminate()
        lenient = await self.start_poll(url=self.root)
        self.assertEqual((await self.announced(lenient))[0], ["x.tmp"])

    async def test_directory_gone_and_back(self):
        """A directory gone from its parent's page is forgotten with its page: when it comes
        back, the same, its files are announced again; so are a tree's after the poll's url
        changed to another server with the same pages."""
        self.tree()
        proc = await self.start_poll(url=self.root)
        await self.announced(proc)
        sub = self.lister.listings[self.root].pop()
        self.assertEqual(await self.announced(proc), ([], [self.root]))
        self.lister.listings[self.root].append(sub)
        self.assertEqual((await self.announced(proc))[0], ["sub/c", "sub/deep/d"])
        await proc.terminate()
        other = "http://mirror.example/data/"
        for rel_dir in ("", "sub/", "sub/deep/"):
            self.lister.listings[other + rel_dir] = self.lister.listings[self.root + rel_dir]
        moved = await self.start_poll(url=other)
        self.assertEqual((await self.announced(moved))[0], ["a", "b", "sub/c", "sub/deep/d"])

    async def test_pass_by_an_older_poll(self):
        """After a pass by a version of the poll that keeps no digests (the rows it changed
        did not drop them), the next pass reads every directory whole."""
        self.tree()
        proc = await self.start_poll(url=self.root)
        await self.announced(proc)
        db = sqlite3.connect(proc.store.path)
        with db:  # as that pass would: a file forgotten, the pass counted
            db.execute("DELETE FROM files WHERE dir = 'sub' AND name = 'c'")
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'pass'")
        db.close()
        self.assertEqual(await self.announced(proc), (["sub/c"], [
            self.root, self.root + "sub/", self.root + "sub/deep/"
        ]))
        self.assertEqual(await self.announced(proc), ([], []))

    async def test_not_recursive_then_recursive(self):
        """A poll made recursive on the state of one that was not walks the subdirectories
        of the pages that are unchanged, and announces their files."""
        self.tree()
        flat = await self.start_poll(url=self.root, recursive=False)
        self.assertEqual((await self.announced(flat))[0], ["a", "b"])
        self.assertEqual(await self.announced(flat), ([], []))
        await flat.terminate()
        deep = await self.start_poll(url=self.root)
        self.assertEqual((await self.announced(deep))[0], ["sub/c", "sub/deep/d"])
        self.assertNotIn(self.root, self.lister.whole)


class PollCommandTest(unittest.TestCase):
    """Polls that cannot list their source, in the real command (`twistd -n cc pump`)."""

    def test_unreachable_and_missing_sources_one_line_each(self):
        """An sftp or ftp host that does not resolve and a mistyped local directory: each poll
        says why in one warn line (not on every pass, no traceback), the directory is not
        created, and the progress line counts the failed passes."""
        from tests.core.cc.running import run_for

        cwd = self.mktemp()
        os.makedirs(cwd)
        missing = os.path.abspath(os.path.join(cwd, "mistyped", "dir"))
        polls = [
            {"name": "s", "url": "sftp://bob@nosuchhost.invalid/x/", "interval": 0.5},
            {"name": "f", "url": "ftp://bob@nosuchhost.invalid/x/", "interval": 0.5},
            {"name": "l", "url": "file:" + missing + "/", "interval": 0.5},
        ]
        kwargs = {"polls": polls, "progress": {"interval": 1}}
        output = run_for(
            4, "--no-shell", "-a", f"apparg_pump={kwargs!r}", "pump", cwd=cwd,
            until="poll.s=",
        )
        self.assertNotIn("Traceback", output)
        self.assertNotIn("critical", output)
        for name in ("s", "f"):
            lines = [line for line in output.splitlines() if f"poll {name}:" in line]
            self.assertEqual(len(lines), 1, output)
            self.assertIn("cannot resolve host 'nosuchhost.invalid'", lines[0])
        lines = [line for line in output.splitlines() if "poll l:" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("no such file or directory", lines[0])
        self.assertFalse(os.path.exists(missing))
        progress = [line for line in output.splitlines() if "poll.s=" in line]
        self.assertTrue(progress, output)
        self.assertIn("poll.l=", progress[-1])


class SingleActiveTests(unittest.TestCase):
    """Polls of one source sharing a lease and their seen-set: one polls at a time, and
    another takes over within two intervals when it dies, announcing each file once."""

    async def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.c = await make_container(self, memory_broker=MemoryBroker(), clock=self.clock)
        self.collector = await self.c.spawn(Collector)
        await self.collector.listen("xs_ion")
        self.lister = await self.c.spawn(FakeLister)
        self.base = os.path.abspath(self.mktemp())
        self.root = "sftp://feed.example/data/"

    async def start_poll(self, i):
        proc = await self.c.spawn(PollService, args={
            "name": "remote", "url": self.root, "interval": 10, "single_active": True,
            "state_dir": os.path.join(self.base, f"remote.{i}"),
            "shared_dir": os.path.join(self.base, "remote"),
        })
        self.addCleanup(lambda: None if proc.lifecycle.final else proc.terminate())
        return proc

    async def tick(self, seconds):
        self.clock.advance(seconds)
        await until(lambda: all(p._pass is None and not p._acquiring for p in self.polls))
        await quiet()

    def announced(self):
        return sorted(body["relPath"] for body in self.collector.bodies())

    async def test_failover(self):
        self.lister.listings[self.root] = [entry("a"), entry("b")]
        self.polls = [await self.start_poll(1), await self.start_poll(2)]
        first, second = self.polls
        await self.tick(0)
        self.assertEqual(self.announced(), ["a", "b"])
        self.lister.listings[self.root].append(entry("c"))
        await self.tick(10)
        self.assertEqual(self.announced(), ["a", "b", "c"])
        # Only the holder listed; the other stood by.
        self.assertEqual((first.stats["passes"], second.stats["passes"]), (2, 0))
        self.assertGreaterEqual(second.stats["standby"], 2)
        await first.crash("killed")
        self.lister.listings[self.root].append(entry("d"))
        await self.tick(10)
        await self.tick(10)  # within two intervals
        self.assertEqual(self.announced(), ["a", "b", "c", "d"])
        self.assertGreaterEqual(second.stats["passes"], 1)
        # A restarted instance stands by while the other holds the lease.
        self.polls.append(await self.start_poll(3))
        self.lister.listings[self.root].append(entry("e"))
        await self.tick(10)
        self.assertEqual(self.announced(), ["a", "b", "c", "d", "e"])
        self.assertEqual(self.polls[2].stats["passes"], 0)

    async def test_one_polls_without_the_lease_arg_too_when_instances(self):
        """instances > 1 (as the pump app passes it to each instance) means single-active."""
        proc = await self.c.spawn(PollService, args={
            "name": "other", "url": self.root, "interval": 10, "instances": 2,
            "state_dir": os.path.join(self.base, "o1"),
        })
        self.addCleanup(proc.terminate)
        self.assertIsNotNone(proc.lease)


class StandbyScenarios:
    """Polls of one source in containers on different hosts (one broker, each poll with its
    own state directory, no shared_dir): the standby follows what the active one announces,
    so that after a takeover no file is announced twice and none is missed."""

    async def containers(self, count):
        """C{count} containers on one broker (as on different hosts), sharing C{self.clock}."""
        raise NotImplementedError

    async def post_as_another_user(self, exchange, routing_key, body):
        """Publish C{body} as a broker user other than the polls'; how many times."""
        raise NotImplementedError

    async def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.hub, *self.hosts = await self.containers(3)
        self.user = self.hub.transport.user
        self.exchange = f"xs_{self.user}"
        self.collector = await self.hub.spawn(Collector)
        await self.collector.listen(self.exchange)
        self.lister = await self.hub.spawn(FakeLister)
        self.base = os.path.abspath(self.mktemp())
        self.root = f"sftp://feed.example/{os.getpid()}.{id(self)}/"
        self.polls = []

    async def start_poll(self, host, i, **args):
        proc = await self.hosts[host].spawn(PollService, args={
            "name": "remote", "url": self.root, "interval": 10, "single_active": True,
            "batch": 2, "block_size": 64 * 1024,
            "state_dir": os.path.join(self.base, f"host{host}", f"remote.{i}"), **args,
        })
        self.addCleanup(lambda: None if proc.lifecycle.final else proc.terminate())
        self.polls.append(proc)
        return proc

    async def settle(self):
        await until(lambda: all(p._pass is None and not p._acquiring for p in self.polls))
        await quiet()

    async def tick(self, seconds):
        self.clock.advance(seconds)
        await self.settle()

    def announced(self):
        """{(relPath, block number or None): times announced}."""
        counts = {}
        for body in self.collector.bodies():
            key = (body["relPath"], (body.get("blocks") or {}).get("number"))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def listing(self, *entries):
        self.lister.listings[self.root] = [entry("sub", type="dir"), *entries]

    async def two_polls(self, **args):
        """The two polls, active one first, once the active one announced what is listed
        (after the standby began to follow it)."""
        listings, self.lister.listings = self.lister.listings, {self.root: []}
        await self.start_poll(0, 1, **args)
        await self.settle()
        await self.start_poll(1, 1, **args)
        await self.settle()
        active, standby = self.polls
        self.assertTrue(active.lease.held)
        await until(lambda: standby._following is not None, what="the standby following")
        self.lister.listings = listings
        await self.tick(10)
        return active, standby

    async def test_takeover_announces_each_file_once(self):
        """The standby records what the active poll announced (fractional mtimes, a file in
        blocks, a file in a subdirectory, changes, what is still queued when it takes over):
        after the takeover it announces only the file that is new."""
        mtime = OLD + 0.123456
        self.listing(entry("a", mtime=mtime), entry("b"), entry("big", size=200 * 1024))
        self.lister.listings[self.root + "sub/"] = [entry("c", size=7)]
        active, standby = await self.two_polls()
        self.assertEqual(active.stats["announced"], 4)
        self.listing(entry("a", mtime=mtime), entry("b", size=2), entry("big", size=200 * 1024),
                     entry("e"))
        await self.tick(10)
        self.assertEqual(active.stats["announced"], 6)
        await until(lambda: standby.store.get("e"), what="the standby following")
        self.assertEqual(standby.stats["followed"], 6)
        before = self.announced()
        self.assertEqual(before[("b", None)], 2)
        self.assertEqual(sum(before.values()), 9)  # a, b twice, c, e, big in 4 blocks
        # The next pass's announcements are still queued for the standby when it takes over:
        # its writes wait until then.
        gate = defer.Deferred()
        update = standby.store.update

        async def held_update(changes):
            await gate
            return await update(changes)

        standby.store.update = held_update
        self.lister.listings[self.root + "sub/"].extend(entry(f"n{i}") for i in range(7))
        await self.tick(10)
        await until(lambda: active.stats["announced"] == 13)
        await active.crash("killed")
        self.listing(entry("a", mtime=mtime), entry("b", size=2), entry("big", size=200 * 1024),
                     entry("e"), entry("f"))
        self.clock.advance(10)
        await until(lambda: standby.lease.held or standby.stats["standby"] > 3)
        self.clock.advance(10)
        await until(lambda: standby.lease.held, what="the takeover")
        gate.callback(None)
        await self.settle()
        self.assertGreaterEqual(standby.stats["passes"], 1)
        after = self.announced()
        self.assertEqual(after[("f", None)], 1)
        del after[("f", None)]
        self.assertEqual(
            {key: count for key, count in after.items() if count > 1}, {("b", None): 2}
        )
        self.assertEqual(standby.stats["refused"], 0)
        # And from now on it announces the new ones once.
        self.lister.listings[self.root].append(entry("g"))
        await self.tick(10)
        self.assertEqual(self.announced()[("g", None)], 1)
        self.assertEqual(sum(self.announced().values()), sum(after.values()) + 2)

    async def test_takeover_waits_for_notices_on_their_way(self):
        """Notices the broker has already handed to the standby but that are still on their
        way (a slow link: each takes 0.3 s to arrive, in order) are recorded before the
        standby polls: the queue's depth is 0 then, yet none of those files is announced
        again."""
        self.listing(entry("a"))
        self.lister.listings[self.root + "sub/"] = []
        active, standby = await self.two_polls()
        await until(lambda: standby.store.get("a"), what="the standby following")
        arriving = []
        take = standby._take_followed

        def late(delivery):
            arriving.append(delivery)
            reactor.callLater(0.3, lambda: take(arriving.pop(0)))

        standby._take_followed = late
        await standby.unsubscribe(standby._following)  # its queue goes: follow anew, slowly
        standby._following = None
        await standby._follow()
        self.lister.listings[self.root + "sub/"] = [entry(f"n{i}") for i in range(6)]
        await self.tick(10)
        self.assertEqual(active.stats["announced"], 7)
        await active.crash("killed")
        self.clock.advance(10)
        await until(lambda: standby.lease.held or standby.stats["standby"] > 3)
        self.clock.advance(10)
        await until(lambda: standby.lease.held, what="the takeover")
        await self.settle()
        self.assertGreaterEqual(standby.stats["passes"], 1)
        self.assertEqual(standby.stats["followed"], 7)
        self.assertEqual(
            {key: count for key, count in self.announced().items() if count > 1}, {}
        )

    async def test_notices_of_others_mark_nothing_seen(self):
        """A notice another broker user posts into the exchange (with the poll's baseUrl and
        a listed file's size and mtime), or one of the poll's user outside the tree, does not
        make the standby skip a file after the takeover."""
        self.listing(entry("a"))
        self.lister.listings[self.root + "sub/"] = []
        active, standby = await self.two_polls()
        fields = active.notice_for("x", entry("x"), self.clock.seconds())
        posted = await self.post_as_another_user(
            self.exchange, "v03", Notice(fields).to_json()
        )
        outside = active.notice_for("../x", entry("x"), self.clock.seconds())
        await self.collector.post(outside, self.exchange, "v03")
        # Then one of the poll's user, which the standby takes after those.
        last = active.notice_for("y", entry("y"), self.clock.seconds())
        await self.collector.post(last, self.exchange, "v03")
        await until(lambda: standby.store.get("y"), what="the standby following")
        self.assertIsNone(await standby.store.get("x"))
        self.assertEqual(standby.stats["refused"], posted + 1)
        await active.crash("killed")
        self.listing(entry("a"), entry("x"))
        await self.tick(10)
        await self.tick(10)
        self.assertTrue(standby.lease.held)
        announced = self.announced()
        self.assertEqual(announced[("x", None)], posted + 1)  # the poster's, then the poll's
        self.assertEqual(announced[("a", None)], 1)

    async def test_removal_forgets(self):
        """A file the active poll announced removed is forgotten by the standby too: when it
        comes back (the same size and mtime) after the takeover, it is announced."""
        self.listing(entry("a"), entry("b"))
        self.lister.listings[self.root + "sub/"] = []
        active, standby = await self.two_polls(announce_removals=True)
        await until(lambda: standby.store.get("b"), what="the standby following")
        self.listing(entry("a"))
        await self.tick(10)
        self.assertEqual(active.stats["removed"], 1)
        await until(
            lambda: standby.store.get("b").addCallback(lambda row: row is None),
            what="the standby forgetting b",
        )
        await active.crash("killed")
        self.listing(entry("a"), entry("b"))
        await self.tick(10)
        await self.tick(10)
        self.assertTrue(standby.lease.held)
        self.assertEqual(self.announced(), {("a", None): 1, ("b", None): 3})


class MemoryStandbyTests(StandbyScenarios, unittest.TestCase):
    async def containers(self, count):
        self.broker = MemoryBroker()
        return [
            await make_container(self, memory_broker=self.broker, clock=self.clock)
            for _ in range(count)
        ]

    async def post_as_another_user(self, exchange, routing_key, body):
        other = MemoryTransport(self.broker, reactor, user="mallory")
        await other.connect()
        try:
            await other.publish(exchange, routing_key, body)
        finally:
            await other.close()
        return 1


class AmqpStandbyTests(StandbyScenarios, unittest.TestCase):
    timeout = 120

    async def containers(self, count):
        self.broker = get_broker()
        sysname = f"standby{os.getpid()}x{id(self) % 10000}"
        return [
            await make_container(self, url=self.broker.url, sysname=sysname, clock=self.clock)
            for _ in range(count)
        ]

    async def post_as_another_user(self, exchange, routing_key, body):
        # With the user id the broker checks, and with none (nothing checked).
        await threads.deferToThread(
            self.broker.publish_raw, "alice", exchange, routing_key, body, user_id="alice"
        )
        await threads.deferToThread(self.broker.publish_raw, "alice", exchange, routing_key, body)
        return 2

    async def test_on_another_pump(self):
        """Polls announcing on another pump (C{broker}, as a restricted account there, which
        may declare only its own q_<login> queues) follow each other there."""
        self.exchange = "xs_rita"
        await self.collector.listen(self.exchange)
        self.listing(entry("a"), entry("b"))
        self.lister.listings[self.root + "sub/"] = []
        active, standby = await self.two_polls(broker=self.broker.url_for("rita"))
        self.assertTrue(standby._standby_queue.startswith("q_rita.poll.remote.standby."))
        await until(lambda: standby.store.get("b"), what="the standby following")
        await active.crash("killed")
        self.listing(entry("a"), entry("b"), entry("c"))
        await self.tick(10)
        await self.tick(10)
        self.assertTrue(standby.lease.held)
        announced = self.announced()
        self.assertEqual(announced, {("a", None): 1, ("b", None): 1, ("c", None): 1})
        self.assertEqual(standby.stats["refused"], 0)
