"""The consumer: filtering, destinations, duplicate suppression, retries, reports, durability.

Unit tests for the duplicate cache and the retry queue come first. The scenarios
(`ConsumerScenarios`) run a consumer, the transfer service and the report router with real
files under the test's temporary directory, once on the memory:// transport and once on the
private RabbitMQ node (`OnPrivateRabbitMQ`), where every test gets its own exchanges, sysname
and durable queues.
"""

import itertools
import json
import os
import random
import shutil
import subprocess
import threading
import time
import types

from twisted.internet import defer, task, threads
from twisted.trial import unittest

from ion.apps.pump import app as pump_app
from ion.apps.pump import consumer as consumer_module
from ion.apps.pump import dupcache, journal, paths
from ion.apps.pump.args import ConsumerArgs
from ion.apps.pump.consumer import Consumer, dup_key, make_report, report_id
from ion.apps.pump.dupcache import DupCache, digest
from ion.apps.pump.notice import Notice
from ion.apps.pump.report_router import ReportRouter
from ion.apps.pump.retryqueue import RetryQueue
from ion.apps.pump.transfer import TransferError
from ion.apps.pump.transfer.inflight import SWEEP_MIN_AGE
from ion.apps.pump.transfer.limits import MinRate
from ion.core.app.appfile import read_app
from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import ConnectionLost, returns_of
from tests.apps.pump.fixtures import (
    Collector,
    MTIME,
    delete_queues,
    file_url,
    notice_fields,
    quiet,
    topic,
    unblock_after,
    until,
    write_source,
)
from tests.apps.pump.hostile_servers import start_hostile_http
from tests.apps.pump.servers import start_http
from tests.broker import find_rabbitmq_server, get_broker

RES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "res")

# -- units --------------------------------------------------------------------------------


class ArgsTests(unittest.SynchronousTestCase):
    def test_modes(self):
        """mirror (default), directory (mirror False) and strip=N map to destination modes,
        which place files as documented."""
        root = os.path.abspath(self.mktemp())
        notice = Notice({"relPath": "a/b/c/f.dat"})
        table = [
            ({}, "mirror", "a/b/c/f.dat"),
            ({"mirror": False}, "directory", "f.dat"),
            ({"strip": 2}, "strip=2", "c/f.dat"),
            ({"strip": 9}, "strip=9", "f.dat"),
        ]
        for extra, mode, where in table:
            args = ConsumerArgs.parse(dict({"name": "t", "directory": root}, **extra))
            self.assertEqual(args["mode"], mode)
            path = paths.destination(root, notice, args["mode"])
            self.assertEqual(path, os.path.join(os.path.realpath(root), where))

    def test_bad_args(self):
        """Unknown or malformed args are refused with a message naming them."""
        for args, text in [
            ({"name": "t", "directory": "/x", "polls": []}, "unknown argument 'polls'"),
            ({"directory": "/x"}, "name"),
            ({"name": "t"}, "directory"),
            ({"name": "t", "directory": "/x", "topics": "v03.#"}, "topics"),
            ({"name": "t", "directory": "/x", "parallel": 0}, "parallel"),
            ({"name": "t", "directory": "/x", "retry_jitter": 1.5}, "retry_jitter"),
            ({"name": "t", "directory": "/x", "reannounce": {"exchange": "x"}}, "reannounce"),
            ({"name": "t", "directory": "/x", "sources": "http://h/"}, "consumer t: sources"),
            ({"name": "t", "directory": "/x", "sources": ["h/x"]}, "consumer t: a sources"),
            ({"name": "t", "directory": "/x", "max_size": "1G"}, "max_size"),
            ({"name": "t", "directory": "/x", "min_rate": {"bytes": 1}}, "min_rate"),
            (
                {"name": "t", "directory": "/x", "transfer": {"max_size": 10}},
                "max_size is a consumer argument",
            ),
        ]:
            e = self.assertRaises(ValueError, ConsumerArgs.parse, args)
            self.assertIn(text, str(e))
        self.assertTrue(ConsumerArgs.parse({"name": "t", "discard": True})["discard"])

    def test_dup_key_and_report_id(self):
        """The duplicate key is identity + relPath, or relPath + mtime + size (also for `cod`,
        whose value is not a checksum); report ids differ by subscriber, source, key and code."""
        identity = {"method": "sha512", "value": "abc"}
        a = Notice({"relPath": "a/f", "identity": identity, "mtime": "1", "size": 1})
        b = Notice({"relPath": "b/f", "identity": identity, "mtime": "1", "size": 1})
        c = Notice({"relPath": "a/f", "identity": {"method": "cod", "value": "md5"}, "size": 1})
        self.assertNotEqual(dup_key(a), dup_key(b))
        self.assertNotIn("md5", dup_key(c))
        ids = {
            report_id("u.s", "alice", "k", 201),
            report_id("u.t", "alice", "k", 201),
            report_id("u.s", "bob", "k", 201),
            report_id("u.s", "alice", "k2", 201),
            report_id("u.s", "alice", "k", 404),
        }
        self.assertEqual(len(ids), 5)
        self.assertEqual(report_id("u.s", "alice", "k", 201), report_id("u.s", "alice", "k", 201))


class ReportTests(unittest.SynchronousTestCase):
    def test_make_report(self):
        """A report is a copy of the notice with report {code, timeCompleted, message}; codes
        outside the report table (a 403 refusal) are reported as they are."""
        notice = Notice({"relPath": "a/f", "source": "alice", "extra": [1]})
        for code in (201, 403):
            reported = make_report(notice, code, "why", when=0)
            self.assertEqual(
                reported.report,
                {"code": code, "timeCompleted": "19700101T000000", "message": "why"},
            )
            self.assertEqual(reported["extra"], [1])
        self.assertNotIn("report", notice)


class DupCacheTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = os.path.join(os.path.abspath(self.mktemp()), "dup.jsonl")

    def test_ttl(self):
        """A key is a duplicate for ttl seconds after it was added."""
        cache = DupCache(self.path, 10, self.clock)
        cache.add("k")
        self.assertIn("k", cache)
        self.clock.advance(9.9)
        self.assertIn("k", cache)
        self.clock.advance(0.1)
        self.assertNotIn("k", cache)
        self.assertEqual(len(cache), 0)

    def test_expiry_in_whole_seconds(self):
        """A key added within a second lives until the next whole second after ttl: at least
        ttl, at most a second more; the keys added within one second share their expiry (one
        object in memory, not one a key)."""
        cache = DupCache(self.path, 10, self.clock)
        self.clock.advance(0.25)
        cache.add("a")
        self.clock.advance(0.5)
        cache.add("b")
        self.assertIs(cache._entries[digest("a")], cache._entries[digest("b")])
        self.clock.advance(10.2)  # 10.95: "a" was added 10.7 s ago
        self.assertIn("a", cache)
        self.clock.advance(0.05)  # 11.0
        self.assertNotIn("a", cache)
        self.assertNotIn("b", cache)
        cache.close()

    def test_added_again_outlives_its_first_batch(self):
        """A key added again is a duplicate for ttl seconds from its last add, also after the
        keys added with it the first time are forgotten."""
        cache = DupCache(self.path, 10, self.clock)
        cache.add("again")
        cache.add("once")
        self.clock.advance(5)
        cache.add("again")
        self.clock.advance(6)
        cache.add("later")  # forgets the first batch
        self.assertNotIn("once", cache)
        self.assertIn("again", cache)
        self.clock.advance(4)
        self.assertNotIn("again", cache)
        self.assertIn("later", cache)

    def test_memory_follows_the_ttl(self):
        """At a steady rate, the cache holds little more than the keys of the last ttl: an
        hour of keys, not a day's, whatever the process's age."""
        cache = DupCache(self.path, 10, self.clock)
        for second in range(30):  # 100 keys a second for three ttls
            for i in range(100):
                cache.add(f"k{second}.{i}", flush=False)
            self.clock.advance(1)
        self.assertEqual(len(cache), 900)  # added at 21 to 29 s: live at 30 s
        self.assertLessEqual(len(cache._entries), 1000 * (1 + 2 * dupcache.BATCH_SPAN))
        cache.close()

    def test_survives_restart(self):
        """Keys are read back when the cache is opened again; expired ones are dropped and a
        torn last line (a crash while writing) is skipped."""
        cache = DupCache(self.path, 10, self.clock)
        cache.add("old")
        self.clock.advance(5)
        cache.add("new")
        cache.close()
        with open(self.path, "a") as f:
            f.write('{"key": "torn", "exp')
        self.clock.advance(6)
        again = DupCache(self.path, 10, self.clock)
        self.assertNotIn("old", again)
        self.assertIn("new", again)
        self.assertEqual(again.skipped_lines, 1)
        again.close()
        with open(self.path) as f:
            self.assertEqual([json.loads(line)["id"] for line in f], [digest("new").hex()])

    def test_reads_a_cache_of_full_keys(self):
        """A cache written by an older pump (each line the whole key) still holds its keys:
        after an upgrade, files delivered before it are not fetched again."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            now = self.clock.seconds()
            f.write(json.dumps({"key": "sha512:abc\n/a/x", "expires": now + 5}) + "\n")
            f.write(json.dumps({"key": "gone", "expires": now - 1}) + "\n")
        cache = DupCache(self.path, 10, self.clock)
        self.assertIn("sha512:abc\n/a/x", cache)
        self.assertNotIn("gone", cache)
        self.assertNotIn("sha512:abd\n/a/x", cache)
        self.clock.advance(6)
        self.assertNotIn("sha512:abc\n/a/x", cache)
        cache.close()

    def test_buffered_adds(self):
        """Keys added with flush=False are known at once and reach the file at flush()."""
        cache = DupCache(self.path, 10, self.clock)
        cache.add("now")
        cache.add("later", flush=False)
        self.assertIn("later", cache)
        cache.flush()
        with open(self.path) as f:
            self.assertEqual(
                [json.loads(line)["id"] for line in f], [digest("now").hex(), digest("later").hex()]
            )
        cache.close()

    def test_compaction(self):
        """The file is rewritten with the live keys when it has grown past twice their number."""
        cache = DupCache(self.path, 10, self.clock, compact_min_lines=10)
        for i in range(30):
            cache.add("same")
            self.clock.advance(0.1)
        cache.sync()
        with open(self.path) as f:
            lines = f.readlines()
        self.assertLessEqual(len(lines), 10)
        self.assertEqual({json.loads(line)["id"] for line in lines}, {digest("same").hex()})


class RetryQueueTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.path = os.path.join(os.path.abspath(self.mktemp()), "retries.jsonl")

    def queue(self, **kw):
        kw.setdefault("jitter", 0)
        return RetryQueue(self.path, self.clock, initial=2, maximum=10, horizon=30, **kw)

    def test_backoff_cap_and_horizon(self):
        """Retries back off 2, 4, 8 s, then stay at the cap (10 s); no attempt is scheduled
        past the horizon and a failure at the horizon gives up."""
        q = self.queue()
        entry = self.successResultOf(q.add("k", {"relPath": "f"}, "v03", 503, "down"))
        dues = [entry.due]
        while True:
            self.clock.advance(entry.due - self.clock.seconds())
            self.assertEqual(q.pop_due(), [entry])
            if not q.failed_again(entry, 503, "down"):
                break
            dues.append(entry.due)
        self.assertEqual(dues, [2, 6, 14, 24, 30])
        self.assertEqual(self.clock.seconds(), 30)

    def test_jitter(self):
        """Jitter spreads each delay within ±jitter of the backoff."""
        q = self.queue(jitter=0.2, rng=random.Random(7))
        delays = [q.delay(3) for _ in range(200)]
        self.assertTrue(all(6.4 <= d <= 9.6 for d in delays))
        self.assertGreater(max(delays) - min(delays), 2)

    def test_persisted(self):
        """Entries are on disk (the add fsynced) and come back after a restart, with their
        attempts and due times; finished ones do not."""
        q = self.queue()
        a = self.successResultOf(q.add("a", {"relPath": "a"}, "v03", 503, "down"))
        b = self.successResultOf(q.add("b", {"relPath": "b"}, "v03", 504, "slow"))
        self.clock.advance(2)
        q.pop_due()
        q.failed_again(a, 499, "short")
        q.done(b)
        q.close()
        again = self.queue()
        (entry,) = list(again)
        self.assertEqual((entry.key, entry.attempts, entry.due, entry.code), ("a", 2, 6, 499))
        self.assertTrue(again.has_key("a"))
        self.assertFalse(again.has_key("b"))
        self.assertEqual(again.next_due(), 6)

    def test_due_order(self):
        """pop_due returns what is due, earliest first; next_due tells when the next one is."""
        q = self.queue()
        a = self.successResultOf(q.add("a", {}, "v03", 503, ""))
        self.clock.advance(1)
        b = self.successResultOf(q.add("b", {}, "v03", 503, ""))
        self.assertEqual(q.next_due(), 2)
        self.assertEqual(q.pop_due(), [])
        self.clock.advance(2)
        self.assertEqual(q.pop_due(), [a, b])
        self.assertIsNone(q.next_due())


# -- scenarios -----------------------------------------------------------------------------


class NoAckConsumer(Consumer):
    """Crashes (in effect) after its outcome is durable and before the ack."""

    def _ack(self, delivery):
        self.unacked = getattr(self, "unacked", 0) + 1


class UnconfirmedConsumer(Consumer):
    """Its first report to a source is kept by the broker in the report router's sent queue
    only, and its confirm never comes (in effect, as across a broker crash): the message
    comes back."""

    async def publish(self, exchange, routing_key, body, **kw):
        if exchange.startswith("xr_") and not getattr(self, "lost", False):
            self.lost = True
            # The router's marker exchange reaches its sent queue alone.
            marker_exchange = "x_" + self._copy_queue[len("q_"):]
            await super().publish(marker_exchange, routing_key, body, **kw)
            raise ConnectionLost("no confirm")
        await super().publish(exchange, routing_key, body, **kw)


class UnconfirmedThenStopped(UnconfirmedConsumer):
    """Loses its first report's confirm as L{UnconfirmedConsumer} does, then takes no more
    messages, as if killed before the message came back."""

    async def publish(self, exchange, routing_key, body, **kw):
        try:
            await super().publish(exchange, routing_key, body, **kw)
        except ConnectionLost:
            self._draining = True  # what comes now stays unsettled, back at the stop
            raise


class ForgetfulConsumer(Consumer):
    """Loses its first duplicate-cache write and its first ack: the message comes back, as
    after a crash between the report and the cache write."""

    def on_init(self):
        super().on_init()
        remember = self.dupcache.add
        self.forgotten = []

        def add(key, flush=True):
            if not self.forgotten:
                self.forgotten.append(key)
                return
            return remember(key, flush)

        self.dupcache.add = add

    def _ack(self, delivery):
        if len(self.forgotten) == 1 and not delivery.redelivered:
            delivery.nack(requeue=True)
        else:
            delivery.ack()


class FlakyConsumer(Consumer):
    """A consumer whose first `failures` transfers fail with `code` (as when the server is
    down), and every one while `down` is set."""

    failures = 0
    code = 503

    def on_init(self):
        super().on_init()
        self.calls = 0
        self.down = False

    async def _get(self, url, path, options):
        self.calls += 1
        if self.down or self.calls <= self.failures:
            raise TransferError("server unavailable", code=self.code)
        return await super()._get(url, path, options)


class AlwaysDown(FlakyConsumer):
    def on_init(self):
        super().on_init()
        self.down = True


class BuggyConsumer(Consumer):
    """A consumer with a bug on the way to every file."""

    def destination_for(self, notice):
        raise RuntimeError("a bug")


class HeldConsumer(Consumer):
    """A consumer holding every transfer until `release` fires."""

    def on_init(self):
        super().on_init()
        self.started = defer.Deferred()
        self.release = defer.Deferred()

    async def _get(self, url, path, options):
        if not self.started.called:
            self.started.callback(None)
        await self.release
        return await super()._get(url, path, options)


class _GivenBack:
    """A delivery on a connection that went: settling it does nothing (the broker has
    handed the message out again)."""

    def __init__(self, delivery):
        self._delivery = delivery
        self.settled = False

    def __getattr__(self, name):
        return getattr(self._delivery, name)

    def ack(self):
        self.settled = True

    def nack(self, requeue=True):
        self.settled = True


class ReconnectedConsumer(HeldConsumer):
    """Its first message comes again, redelivered, while its transfer is held, as when the
    connection it came on goes and the broker hands it out again; the first report then
    fails as a publish on the lost connection does."""

    def on_init(self):
        super().on_init()
        self.given_back = self.report_failed = False

    def _on_delivery(self, delivery):
        if self.given_back:
            return super()._on_delivery(delivery)
        self.given_back = True
        handling = super()._on_delivery(_GivenBack(delivery))
        delivery.nack(requeue=True)
        return handling

    async def _report(self, *args, **kwargs):
        if not self.report_failed:
            self.report_failed = True
            raise ConnectionLost("the connection went")
        return await super()._report(*args, **kwargs)


# -- two transports ----------------------------------------------------------------------


def rabbitmq_queues(broker):
    """{queue: (ready, unacked)} on the private RabbitMQ node, read with the real `rabbitmqctl`
    next to its server script (Debian's wrapper would switch to the rabbitmq user)."""
    ctl = os.path.join(os.path.dirname(find_rabbitmq_server()), "rabbitmqctl")
    columns = ["name", "messages_ready", "messages_unacknowledged"]
    out = subprocess.run(
        [ctl, "-n", broker.nodename, "-q", "list_queues", "--no-table-headers", *columns],
        env=broker._environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"rabbitmqctl list_queues failed: {out.stderr}")
    counts = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3:
            counts[fields[0]] = (int(fields[1]), int(fields[2]))
    return counts


async def until_queue(broker, queue, predicate, timeout=30):
    """Wait until predicate(ready, unacked) holds for `queue` on the private RabbitMQ node;
    returns the counts."""
    seen = [None]

    async def holds():
        seen[0] = counts = (await threads.deferToThread(rabbitmq_queues, broker)).get(queue)
        return counts if counts is not None and predicate(*counts) else None

    return await until(
        holds, timeout, lambda _: f"queue {queue}: (ready, unacked) still {seen[0]}", 0.2
    )


class OnMemory:
    """Scenario hooks for the memory:// transport: a broker of the test's own, sr3's names."""

    url = "memory://"
    poll = 0.002
    shared_queues = ()
    # How long "nothing more arrives" is watched for: a message on its way through a real
    # broker (and the report router) takes longer than through memory.
    quiet_seconds = 0.05

    def new_broker(self):
        return MemoryBroker()

    def name(self, name):
        """The name to use for an exchange, subscription or system called `name`."""
        return name

    def setUp(self):
        # Durable queues the test makes (on a shared broker they are deleted afterwards).
        self.durable_queues = set(self.shared_queues)
        return super().setUp()

    def quiet(self):
        """Let the reactor run a while, so that anything still on its way arrives."""
        return quiet(self.quiet_seconds)

    async def queue_counts(self, queue):
        """(ready, unacked) messages of `queue`."""
        return self._broker.queue_depth(queue), self._broker.unacked(queue)


_tags = itertools.count(1)


class OnPrivateRabbitMQ(OnMemory):
    """Scenario hooks for the private RabbitMQ node that every test of the run shares: each
    test gets exchanges, subscription names and a sysname of its own (sr3's exchanges are
    broker-wide, not per system), and the durable queues it made are deleted before and after
    it, so no test sees another's messages."""

    timeout = 120
    poll = 0.1
    quiet_seconds = 0.5

    def new_broker(self):
        return None

    def name(self, name):
        return f"{name}-{self.tag}"

    async def setUp(self):
        self.broker = get_broker()
        self.url = self.broker.url
        self.tag = f"t{os.getpid()}x{next(_tags)}"
        started = super().setUp()  # the scenario's own (a coroutine runs after the cleanup)
        await self.delete_queues()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(self.delete_queues()))
        if started is not None:
            await started

    async def delete_queues(self):
        await delete_queues(self.url, sorted(self.durable_queues))

    async def queue_counts(self, queue):
        counts = await threads.deferToThread(rabbitmq_queues, self.broker)
        return counts.get(queue, (0, 0))


class ConsumerScenarios:
    """Scenarios every transport must pass, written against the hooks of `OnMemory`."""

    async def container(self, **kw):
        if not hasattr(self, "_broker"):
            self._broker = self.new_broker()
        kw.setdefault("sysname", self.name("test"))
        return await make_container(self, url=self.url, memory_broker=self._broker, **kw)

    def setUp(self):
        self.xpublic = self.name("xpublic")
        self.xreport = self.name("xreport")
        self.subscription = self.name("sub")
        self.base = os.path.abspath(self.mktemp())
        for name in ("src", "dest", "state"):
            path = os.path.join(self.base, name)
            os.makedirs(path)
            setattr(self, name, path)
        self.credentials = os.path.join(self.base, "credentials.conf")
        with open(self.credentials, "w") as f:
            f.write("")
        os.chmod(self.credentials, 0o600)
        self.base_url = file_url(self.src)

    async def receivers(self, clock=None, sources=("alice", "bob")):
        """A container with the report router and a collector listening to xr_<source>."""
        c = await self.container(clock=clock)
        self.router = await c.spawn(
            ReportRouter,
            args={"state_dir": os.path.join(self.base, "router"), "exchange": self.xreport},
        )
        self.durable_queues.update((self.router.queue, self.router.sent_queue))
        self.collector = await c.spawn(Collector)
        for source in sources:
            await self.collector.listen(f"xr_{source}")
        return c

    async def spawn_consumer(self, container, cls=Consumer, **args):
        defaults = {
            "name": self.subscription,
            "directory": self.dest,
            "state_dir": self.state,
            "exchange": self.xpublic,
            "report_exchange": self.xreport,
            "retry_jitter": 0,
            "transfer": {"credentials": self.credentials},
            # The test's sources post as alice and bob: their files are this test's to allow.
            "sources": [self.base_url],
        }
        consumer = await container.spawn(cls, args=dict(defaults, **args))
        self.consumer_queue = consumer.queue
        self.durable_queues.add(consumer.queue)
        return consumer

    async def pump(self, clock=None, consumer=Consumer, **args):
        c = await self.receivers(clock)
        self.consumer = await self.spawn_consumer(c, consumer, **args)
        return c

    def reports(self, source="alice"):
        return self.collector.bodies(f"xr_{source}")

    async def wait_reports(self, n, source="alice"):
        await until(lambda: len(self.reports(source)) >= n, what=f"{n} reports for {source}")
        await self.quiet()
        return self.reports(source)

    def post(self, fields, routing_key=None):
        """Publish a notice (a dict, or bytes with a routing key) to the test's xpublic."""
        return self.collector.post(fields, self.xpublic, routing_key)

    def post_file(self, rel_path, data, **extra):
        write_source(self.src, rel_path, data)
        return self.post(notice_fields(self.base_url, rel_path, data, **extra))

    async def until_counts(self, ready, unacked, queue=None, timeout=10.0):
        """Wait until the consumer's queue (or `queue`) holds `ready` messages waiting and
        `unacked` ones delivered but not settled."""
        queue = queue or self.consumer_queue
        seen = [None]

        async def reached():
            seen[0] = await self.queue_counts(queue)
            return seen[0] == (ready, unacked)

        await until(
            reached,
            timeout,
            lambda _: f"queue {queue}: (ready, unacked) {(ready, unacked)}, still {seen[0]}",
            self.poll,
        )

    def settle(self, queue=None):
        """Wait until every message of the consumer's queue (or `queue`) is settled."""
        return self.until_counts(0, 0, queue)

    def dest_files(self):
        found = []
        for top, _, names in os.walk(self.dest):
            found.extend(os.path.relpath(os.path.join(top, n), self.dest) for n in names)
        return sorted(found)

    # -- the data path ---------------------------------------------------------------------

    async def test_end_to_end(self):
        """Files announced on xpublic land verified under the destination (mirrored, with the
        announced mtime and mode), each with exactly one 201 report to its source's xr_
        exchange and nothing to another source's."""
        await self.pump()
        files = {f"d{i % 2}/sub/f{i}.dat": os.urandom(1000 + i) for i in range(6)}
        for rel_path, data in files.items():
            await self.post_file(rel_path, data)
        reports = await self.wait_reports(6)
        self.assertEqual(self.dest_files(), sorted(files))
        for rel_path, data in files.items():
            path = os.path.join(self.dest, rel_path)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(os.stat(path).st_mtime, MTIME)
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)
        self.assertEqual(len(reports), 6)
        self.assertEqual({r["relPath"] for r in reports}, set(files))
        self.assertEqual({r["report"]["code"] for r in reports}, {201})
        self.assertEqual(len({r["report_id"] for r in reports}), 6)
        self.assertEqual(self.reports("bob"), [])
        stats = await self.collector.rpc(self.consumer.pid, "stats")
        self.assertEqual(stats["delivered"], 6)
        self.assertEqual(stats["bytes"], sum(len(d) for d in files.values()))
        self.assertEqual(stats["received"], 6)
        self.assertEqual(self.router.stats["by_source"], {"alice": {"201": 6}})
        await self.settle()

    async def test_retention_and_heartbeat(self):
        """With retention, delivered files older than after_days move to archive/YYYYMM/DD/
        at the next pass of the container's clock; with heartbeat, the heartbeat file in the
        state directory counts the files delivered and its due time is in the stats."""
        clock = task.Clock()
        clock.advance(MTIME + 10 * 86400)
        archive = os.path.join(self.base, "archive")
        await self.pump(clock=clock, retention={"after_days": 2, "archive": archive},
                        heartbeat=30)
        await self.post_file("obs/a.dat", b"a")
        await self.post_file("obs/b.dat", b"b")
        await self.wait_reports(2)
        self.assertEqual(self.dest_files(), ["obs/a.dat", "obs/b.dat"])
        clock.advance(3600)
        day = os.path.join(archive, *time.strftime("%Y%m %d", time.gmtime(MTIME)).split())
        # A move is a link then an unlink: the pass has ended once the tree is empty too.
        await until(
            lambda: os.path.exists(os.path.join(day, "obs", "b.dat")) and not self.dest_files(),
            what="the files archived",
        )
        self.assertEqual(sorted(os.listdir(os.path.join(day, "obs"))), ["a.dat", "b.dat"])
        await until(lambda: self.consumer.heartbeat.last["files_done"] == 2,
                    what="a heartbeat with the files")
        path = os.path.join(self.state, f"{self.subscription}.heartbeat")
        with open(path) as f:
            written = json.load(f)
        self.assertEqual((written["files_done"], written["link"]), (2, "up"))
        stats = await self.collector.rpc(self.consumer.pid, "stats")
        self.assertEqual(stats["heartbeat"]["due"], clock.seconds() + 30)
        await self.settle()

    async def test_end_to_end_http(self):
        """The same over http: files served by a web server are fetched and verified."""
        server = start_http(self, self.src)
        self.base_url = f"{server.url}/files/"
        await self.pump()
        for i in range(3):
            await self.post_file(f"h/f{i}.dat", os.urandom(5000))
        reports = await self.wait_reports(3)
        self.assertEqual([r["report"]["code"] for r in reports], [201] * 3)
        self.assertEqual(self.dest_files(), ["h/f0.dat", "h/f1.dat", "h/f2.dat"])

    async def test_two_sources(self):
        """Each source hears about its own files only."""
        await self.pump()
        await self.post_file("a/f.dat", b"a", source="alice")
        await self.post_file("b/f.dat", b"b", source="bob")
        await until(lambda: self.reports("alice") and self.reports("bob"))
        await self.quiet()
        self.assertEqual([r["relPath"] for r in self.reports("alice")], ["a/f.dat"])
        self.assertEqual([r["relPath"] for r in self.reports("bob")], ["b/f.dat"])

    async def test_topics_and_filters(self):
        """Only notices on the bound topics arrive; rejected URLs are acked without a report
        or a download; unmatched ones follow accept_unmatched."""
        await self.pump(
            topics=["v03.obs.#"],
            filters=[("reject", r".*/secret/.*"), ("accept", r".*\.dat")],
            accept_unmatched=False,
        )
        await self.post_file("obs/a.dat", b"1")
        await self.post_file("obs/secret/b.dat", b"2")
        await self.post_file("obs/c.txt", b"3")
        await self.post_file("model/d.dat", b"4")
        await self.wait_reports(1)
        await self.settle()
        self.assertEqual(self.dest_files(), ["obs/a.dat"])
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.consumer.stats["rejected"], 2)
        self.assertEqual(self.consumer.stats["received"], 3)

    async def test_strip_and_reannounce(self):
        """strip=N drops leading directories; in sarra mode the delivered file is announced
        again with our baseUrl and its new relPath and topic."""
        xsarra = self.name("xsarra")
        await self.pump(strip=1, reannounce={"exchange": xsarra, "base_url": "http://me/"})
        await self.collector.listen(xsarra)
        data = b"relayed"
        await self.post_file("top/mid/f.dat", data)
        await self.wait_reports(1)
        await until(lambda: self.collector.bodies(xsarra))
        self.assertEqual(self.dest_files(), ["mid/f.dat"])
        ((_, key, announced),) = [g for g in self.collector.got if g[0] == xsarra]
        self.assertEqual(key, "v03.mid")
        self.assertEqual(announced["baseUrl"], "http://me/")
        self.assertEqual(announced["relPath"], "mid/f.dat")
        self.assertEqual(announced["size"], len(data))
        self.assertNotIn("report", announced)

    async def test_directory_mode(self):
        """With mirror off, every file lands directly in the destination directory."""
        await self.pump(mirror=False)
        await self.post_file("x/y/one.dat", b"1")
        await self.post_file("z/two.dat", b"2")
        await self.wait_reports(2)
        self.assertEqual(self.dest_files(), ["one.dat", "two.dat"])

    async def test_duplicates(self):
        """The same notice twice (also while the first is being fetched, and again later): one
        download, one report; the copies are acked and counted."""
        await self.pump()
        data = b"once"
        write_source(self.src, "d/f.dat", data)
        fields = notice_fields(self.base_url, "d/f.dat", data)
        await self.post(fields)
        await self.post(fields)
        await self.wait_reports(1)
        await self.post(dict(fields, pubTime="20300101T000000"))
        await until(lambda: self.consumer.stats["duplicates"] == 2)
        await self.settle()
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.consumer.stats["delivered"], 1)

    async def test_redelivered_copy_waits_for_the_fetch_in_hand(self):
        """A notice handed out again while its first delivery is still being fetched (the
        connection it came on went) is not acked as a duplicate at once: the first fetch
        failing to report, the copy is fetched and reported. The file is reported once."""
        await self.pump(consumer=ReconnectedConsumer)
        data = b"reported in the end"
        write_source(self.src, "d/f.dat", data)
        await self.post(notice_fields(self.base_url, "d/f.dat", data))
        await until(lambda: self.consumer.started.called and self.consumer.stats["received"] == 2)
        self.consumer.release.callback(None)
        await self.wait_reports(1)
        await self.settle()
        self.assertEqual([r["relPath"] for r in self.reports()], ["d/f.dat"])
        self.assertEqual(self.consumer.stats["duplicates"], 0)
        self.assertEqual(self.consumer.stats["delivered"], 1)
        self.assertEqual(self.dest_files(), ["d/f.dat"])
        # Logged as the failure of a message settled already (here the test gave it back).
        self.assertEqual(len(self.flushLoggedErrors(ConnectionLost)), 1)

    async def test_instances_share_duplicates(self):
        """Two instances of one subscription in one container (one queue, two state
        directories): copies of one notice reaching either while the other fetches it, or
        after it delivered it, are duplicates; one download, one report."""
        c = await self.pump(consumer=HeldConsumer)
        other = await self.spawn_consumer(c, HeldConsumer, state_dir=os.path.join(self.base, "s2"))
        instances = (self.consumer, other)
        data = b"once"
        write_source(self.src, "d/f.dat", data)
        fields = notice_fields(self.base_url, "d/f.dat", data)
        await self.post(fields)
        await until(lambda: any(i.started.called for i in instances))
        # Deliveries go round robin: one of these two reaches the instance not fetching.
        await self.post(fields)
        await self.post(fields)
        await until(lambda: sum(i.stats["duplicates"] for i in instances) == 2)
        for i in instances:
            i.release.callback(None)
        await self.wait_reports(1)
        for _ in range(2):
            await self.post(dict(fields, pubTime="20300101T000000"))
        await until(lambda: sum(i.stats["duplicates"] for i in instances) == 4)
        await self.settle()
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(sum(i.stats["delivered"] for i in instances), 1)
        self.assertEqual(sum(i.stats["received"] for i in instances), 5)

    async def test_instance_started_later_shares_duplicates(self):
        """An instance started after another one has taken messages is one the other knows
        of: a copy of the notice the new one is fetching, reaching the first, is a duplicate
        there too (one download, one report)."""
        c = await self.pump(consumer=HeldConsumer)
        first = self.consumer
        first.release.callback(None)
        await self.post_file("d/a.dat", b"a")
        await self.wait_reports(1)  # the first has looked for other instances: none then
        other = await self.spawn_consumer(
            c, HeldConsumer, state_dir=os.path.join(self.base, "s2")
        )
        done = 1
        for i in range(6):  # round robin: one of these reaches the new instance, which holds it
            data = b"%d" % i
            write_source(self.src, f"d/f{i}.dat", data)
            fields = notice_fields(self.base_url, f"d/f{i}.dat", data)
            await self.post(fields)
            await until(lambda: other.started.called or len(self.reports()) > done)
            if other.started.called:
                break
            done += 1
        self.assertTrue(other.started.called)
        await self.post(fields)
        await self.post(fields)
        await until(lambda: first.stats["duplicates"] + other.stats["duplicates"] == 2)
        other.release.callback(None)
        await self.wait_reports(done + 1)
        await self.settle()
        self.assertEqual(len(self.reports()), done + 1)
        self.assertEqual(first.stats["duplicates"] + other.stats["duplicates"], 2)

    async def test_discard(self):
        """In discard mode notices are filtered, deduplicated and acked, nothing is fetched
        or reported."""
        await self.pump(discard=True, directory=None, transfer=None)
        fields = notice_fields(self.base_url, "d/f.dat", b"x")
        for _ in range(3):
            await self.post(fields)
        await self.post(notice_fields(self.base_url, "d/g.dat", b"y"))
        await until(lambda: self.consumer.stats["received"] == 4)
        await self.settle()
        self.assertEqual(self.consumer.stats["discarded"], 2)
        self.assertEqual(self.consumer.stats["duplicates"], 2)
        self.assertEqual(self.reports(), [])

    def op(self, rel_path, **file_op):
        """Post a notice of rel_path with fileOp `file_op`."""
        return self.post(notice_fields(self.base_url, rel_path, fileOp=file_op))

    async def test_file_ops(self):
        """rename (old name as sr3 writes it), link, mkdir, remove and rmdir are carried out
        under the destination, each reported 201."""
        await self.pump()
        await self.post_file("a/f1", b"one")
        await self.wait_reports(1)
        await self.op("a/f2", rename=self.src + "/a/f1")
        await self.op("a/ln", link="f2")
        await self.op("d/e", directory="")
        await self.wait_reports(4)
        self.assertEqual(os.readlink(os.path.join(self.dest, "a", "ln")), "f2")
        self.assertTrue(os.path.isdir(os.path.join(self.dest, "d", "e")))
        self.assertEqual(self.dest_files(), ["a/f2", "a/ln"])
        await self.op("a/f2", remove="")
        await self.op("d", remove="", directory="")
        reports = await self.wait_reports(6)
        self.assertEqual([r["report"]["code"] for r in reports], [201] * 6)
        self.assertIn("renamed from a/f1", [r["report"]["message"] for r in reports])
        self.assertEqual(self.dest_files(), ["a/ln"])
        self.assertEqual(self.consumer.stats["file_ops"], 5)

    async def test_rename_of_missing_file_downloads(self):
        """A rename whose old file is not at the destination fetches the new one."""
        await self.pump()
        write_source(self.src, "n/new", b"fresh")
        fields = notice_fields(self.base_url, "n/new", b"fresh", fileOp={"rename": "n/old"})
        await self.post(fields)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 201)
        self.assertEqual(self.dest_files(), ["n/new"])

    async def test_hostile_file_ops(self):
        """A link target that is absolute or leads out, or an old name outside the source's
        tree, is refused with 422 and nothing is written."""
        await self.pump()
        await self.op("l1", link="/etc/passwd")
        await self.op("a/l2", link="../../outside")
        await self.op("stolen", rename="/etc/passwd")
        await self.op("stolen2", rename="../../x")
        reports = await self.wait_reports(4)
        self.assertEqual([r["report"]["code"] for r in reports], [422] * 4)
        self.assertEqual(self.dest_files(), [])

    async def test_file_ops_not_in_events(self):
        """Operations left out of `events` are acked and counted, not carried out."""
        await self.pump(events=["create", "modify"])
        await self.post_file("k", b"keep")
        await self.wait_reports(1)
        await self.op("k", remove="")
        await until(lambda: self.consumer.stats["unsupported"] == 1)
        await self.settle()
        self.assertEqual(self.dest_files(), ["k"])

    async def test_directory_removed_between_files(self):
        """A destination directory removed after a delivery into it is made again for the
        next file, which is delivered: no failure."""
        await self.pump()
        await self.post_file("gone/f1.dat", b"first")
        await self.wait_reports(1)
        shutil.rmtree(os.path.join(self.dest, "gone"))
        await self.post_file("gone/f2.dat", b"second")
        reports = await self.wait_reports(2)
        self.assertEqual([r["report"]["code"] for r in reports], [201, 201])
        self.assertEqual(self.dest_files(), ["gone/f2.dat"])

    async def test_start_sweeps_stale_temporary_files(self):
        """Temporary files a killed earlier run left in the destination tree (nobody holds
        their lock) are removed when the consumer starts; other files stay."""
        stale = write_source(self.dest, "a/.f.dat.0123abcd.inflight", b"partial")
        os.utime(stale, (MTIME, MTIME))  # left by a run killed a while ago
        kept = write_source(self.dest, "a/f.dat", b"whole")
        await self.pump()
        await until(lambda: not os.path.exists(stale), what="the stale file removed")
        self.assertTrue(os.path.exists(kept))

    async def test_start_sweep_looks_again_at_young_files(self):
        """A temporary file nobody holds but changed a moment ago (a writer may be about to
        lock it) survives the start-up sweep, and is removed by a second look once it has
        stayed unlocked for SWEEP_MIN_AGE seconds."""
        clock = task.Clock()
        young = write_source(self.dest, "a/.g.dat.4567cdef.inflight", b"partial")
        await self.pump(clock=clock)
        await until(lambda: self.consumer._sweep_call is not None, what="the first sweep")
        self.assertTrue(os.path.exists(young))
        old = time.time() - SWEEP_MIN_AGE - 1
        os.utime(young, (old, old))  # as if SWEEP_MIN_AGE seconds had passed
        clock.advance(SWEEP_MIN_AGE)
        await until(lambda: not os.path.exists(young), what="the young file removed")

    async def test_stats_count_queued_and_in_hand(self):
        """The consumer's stats tell what waits on the broker apart from what it holds: with
        one transfer held and a prefetch of one, the other notices are queued."""
        await self.receivers()
        c = await self.container()
        consumer = await self.spawn_consumer(c, HeldConsumer, parallel=1, prefetch=1)
        for i in range(4):
            await self.post_file(f"q/f{i}.dat", b"%d" % i)
        await consumer.started
        await self.until_counts(3, 1)
        stats = await self.collector.rpc(consumer.pid, "stats")
        self.assertEqual((stats["queued"], stats["in_hand"]), (3, 1))
        consumer.release.callback(None)
        await self.wait_reports(4)
        await self.settle()
        stats = await self.collector.rpc(consumer.pid, "stats")
        self.assertEqual((stats["queued"], stats["in_hand"], stats["delivered"]), (0, 0, 4))
        self.assertEqual((stats["bytes_received"], stats["bytes_in_flight"]), (4, 0))

    async def test_stop_finishes_work_in_hand(self):
        """Stopping a consumer lets the transfers in hand finish, be reported and acked;
        messages arriving meanwhile are not started and go back to the queue."""
        await self.receivers()
        c = await self.container()
        consumer = await self.spawn_consumer(c, HeldConsumer, parallel=1)
        await self.post_file("w/f1.dat", b"1")
        await self.post_file("w/f2.dat", b"2")
        await consumer.started
        # Both are in hand (the second waits for a transfer slot) before the stop begins.
        await until(lambda: consumer.stats["received"] == 2)
        stopping = defer.ensureDeferred(consumer.terminate())
        await self.post_file("w/f3.dat", b"3")
        await self.quiet()
        self.assertNoResult(stopping)
        consumer.release.callback(None)
        await stopping
        reports = await self.wait_reports(2)
        self.assertEqual(sorted(r["relPath"] for r in reports), ["w/f1.dat", "w/f2.dat"])
        self.assertEqual(self.dest_files(), ["w/f1.dat", "w/f2.dat"])
        # The message that arrived while stopping went back to the queue, unsettled.
        await self.until_counts(1, 0)

    # -- failures and retries ----------------------------------------------------------------

    async def test_failing_twice_is_dead_lettered_and_reported(self):
        """A message the consumer fails on (a bug) comes back once; failing again, it is moved
        to the subscription's `.dead` queue and its source gets one 500 report saying so."""
        await self.pump(consumer=BuggyConsumer)
        dead = f"{self.consumer_queue}.dead"
        self.durable_queues.add(dead)
        await self.post_file("bug/f.dat", b"x")
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 500)
        message = report["report"]["message"]
        self.assertIn(f"failed 2 times, moved to {dead}: RuntimeError: a bug", message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        await self.settle()
        await self.until_counts(1, 0, queue=dead)
        self.assertEqual(self.consumer.stats["failures"], {"500": 1})
        self.assertEqual(self.dest_files(), [])

    async def test_given_up_by_its_quorum_queue_is_reported_once(self):
        """A notice whose consumer dies holding it each time is given up by the subscription's
        quorum queue once returned more than `delivery_limit` times; a consumer of the
        subscription then moves it to the `.dead` queue and its source gets one 500 report
        saying so, with the notice's topic. Nothing is fetched; nothing is left unsettled."""
        c = await self.pump(queue_type="quorum", delivery_limit=1)
        queue = self.consumer_queue
        self.durable_queues.update((f"{queue}.dead", f"{queue}.poison"))
        await self.consumer.terminate()
        await self.post_file("poison/f.dat", b"x")
        for returns in (0, 1):  # taken and abandoned, as by a consumer killed holding it
            taken = []
            consumer = await c.transport.consume(queue, taken.append)
            await until(lambda: taken, what="the notice")
            self.assertEqual(returns_of(taken[0]), returns)
            await consumer.cancel()
        await self.until_counts(1, 0, queue=f"{queue}.poison")
        self.assertEqual(self.reports(), [])

        self.consumer = await self.spawn_consumer(c, queue_type="quorum", delivery_limit=1)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 500)
        self.assertEqual(report["relPath"], "poison/f.dat")
        self.assertIn(f"failed 2 times, moved to {queue}.dead: the broker gave it up after it "
                      f"was returned more than 1 times (delivery_limit)",
                      report["report"]["message"])
        self.assertEqual([key for exchange, key, _ in self.collector.got if exchange == "xr_alice"],
                         [topic("poison/f.dat")])
        await self.until_counts(1, 0, queue=f"{queue}.dead")
        await self.settle(f"{queue}.poison")
        await self.settle()
        self.assertEqual(self.consumer.stats["failures"], {"500": 1})
        self.assertEqual(self.dest_files(), [])

    async def test_permanent_failure(self):
        """A missing file (404) gets exactly one 404 report and no retry."""
        await self.pump()
        await self.post(notice_fields(self.base_url, "gone/f.dat", b"x"))
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 404)
        await self.settle()
        self.assertEqual(len(self.consumer.retries), 0)
        self.assertEqual(self.consumer.stats["failures"], {"404": 1})
        self.assertEqual(self.dest_files(), [])

    async def test_retry_until_server_answers(self):
        """While the server is unavailable (503), the notice goes to the on-disk retry queue and
        its message is acked; retries follow the backoff (2 s, then 4 s later) on the
        container's clock, and once the server answers the file is delivered with one 201
        report."""
        clock = task.Clock()
        await self.pump(clock=clock, consumer=AlwaysDown)
        data = b"later"
        await self.post_file("r/f.dat", data)
        await until(lambda: self.consumer.stats["retrying"] == 1)
        await self.settle()
        with open(os.path.join(self.state, "retries.jsonl")) as f:
            (record,) = [json.loads(line) for line in f]
        self.assertEqual((record["op"], record["entry"]["code"]), ("add", 503))
        clock.advance(1.9)
        await self.quiet()
        self.assertEqual(self.consumer.stats["retried"], 0)
        clock.advance(0.1)
        await until(lambda: self.consumer.stats["retried"] == 1)
        (entry,) = list(self.consumer.retries)
        await until(lambda: entry.attempts == 2)
        self.assertEqual(entry.due, 6)
        self.consumer.down = False
        clock.advance(3.9)
        await self.quiet()
        self.assertEqual(self.consumer.stats["retried"], 1)
        clock.advance(0.1)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 201)
        self.assertEqual(self.dest_files(), ["r/f.dat"])
        self.assertEqual(len(self.consumer.retries), 0)
        self.assertEqual(self.consumer.stats["retrying"], 0)

    async def test_reports_stamped_from_the_container_clock(self):
        """A report's timeCompleted comes from the container's clock, like every other time
        of the pump (a task.Clock here, the reactor's wall clock in service)."""
        clock = task.Clock()
        clock.advance(1_700_000_000.25)
        await self.pump(clock=clock)
        await self.post_file("c/f.dat", b"stamped")
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["timeCompleted"], "20231114T221320.25")

    async def test_ack_waits_for_the_retry_fsync(self):
        """The message of a failed transfer is acked only once its retry entry is fsynced
        (the fsync runs in a pool thread, the reactor goes on meanwhile)."""
        reached, release = threading.Event(), threading.Event()
        fsync = journal.os.fsync

        def slow_fsync(fd):
            reached.set()
            release.wait(10)
            fsync(fd)

        self.patch(journal.os, "fsync", slow_fsync)
        self.addCleanup(release.set)
        await self.pump(clock=task.Clock(), consumer=AlwaysDown)
        await self.post_file("r/f.dat", b"later")
        await until(reached.is_set, what="the retry entry's fsync")
        await self.until_counts(0, 1)
        release.set()
        await self.settle()
        self.assertEqual(self.consumer.stats["retrying"], 1)

    async def test_transfer_timeout(self):
        """A transfer still running after transfer_timeout is given up (504, kept for a retry),
        and the message is acked: a stuck server does not hold a file forever."""
        clock = task.Clock()
        await self.pump(clock=clock, consumer=HeldConsumer, transfer_timeout=30)
        await self.post_file("t/f.dat", b"stuck")
        await self.consumer.started
        # (The transfer started in the test's turn: its deadline is set once the turn is over.)
        await until(clock.getDelayedCalls)
        clock.advance(29)
        self.assertEqual(self.consumer.stats["retrying"], 0)
        clock.advance(1)
        await until(lambda: self.consumer.stats["retrying"] == 1)
        await self.settle()
        (entry,) = list(self.consumer.retries)
        self.assertEqual((entry.code, entry.message), (504, "transfer not done after 30 s"))
        self.assertEqual(self.reports(), [])

    async def test_retry_then_success(self):
        """A transfer failing twice with 503 is retried and then delivered: one 201 report."""
        clock = task.Clock()
        flaky = type("Flaky", (FlakyConsumer,), {"failures": 2})
        await self.pump(clock=clock, consumer=flaky)
        await self.post_file("f/f.dat", b"eventually")
        await until(lambda: self.consumer.stats["retrying"] == 1)
        (entry,) = list(self.consumer.retries)
        clock.advance(2)
        await until(lambda: self.consumer.calls == 2 and entry.attempts == 2)
        self.assertEqual(self.reports(), [])
        clock.advance(4)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 201)
        self.assertEqual(self.consumer.calls, 3)

    async def test_horizon(self):
        """A transfer that keeps failing with 503 is tried at 0, 2, 6 and 10 s (the horizon),
        then gets exactly one 503 failure report, and is not tried again."""
        clock = task.Clock()
        await self.pump(clock=clock, consumer=AlwaysDown, retry_horizon=10)
        await self.post_file("h/f.dat", b"never")
        await until(lambda: self.consumer.calls == 1 and self.consumer.stats["retrying"] == 1)
        (entry,) = list(self.consumer.retries)
        for now, calls, due in ((2, 2, 6), (6, 3, 10)):
            clock.advance(now - clock.seconds())
            # The consumer has seen the failure (not just the transfer service the call)
            # before the clock moves on.
            await until(
                lambda: self.consumer.calls == calls and entry.attempts == calls,
                what=f"attempt {calls}",
            )
            self.assertEqual(entry.due, due)
        clock.advance(10 - clock.seconds())
        await until(lambda: self.consumer.calls == 4, what="attempt 4")
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 503)
        self.assertEqual(len(self.consumer.retries), 0)
        clock.advance(1000)
        await self.quiet()
        self.assertEqual(self.consumer.calls, 4)
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.consumer.stats["failures"], {"503": 1})

    async def test_retries_survive_restart(self):
        """Retry entries are on disk: a consumer started again with the same state directory
        picks them up and delivers."""
        clock = task.Clock()
        await self.receivers(clock)
        first = await self.container(clock=clock)
        consumer = await self.spawn_consumer(first, AlwaysDown)
        await self.post_file("s/f.dat", b"kept")
        await until(lambda: consumer.stats["retrying"] == 1)
        await self.settle()
        await first.stop()
        second = await self.container(clock=clock)
        restarted = await self.spawn_consumer(second)
        self.assertEqual(len(restarted.retries), 1)
        clock.advance(2)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 201)
        self.assertEqual(len(restarted.retries), 0)

    # -- hostile input -------------------------------------------------------------------------

    async def test_hostile_paths(self):
        """relPaths that could leave the destination (.., %2e%2e, absolute, NUL, backslash, a
        symbolic link in the tree pointing outside) get one 422 report each; nothing outside
        the destination changes and nothing is fetched."""
        outside = os.path.join(self.base, "outside")
        os.makedirs(outside)
        sentinel = write_source(outside, "x", b"sentinel")
        os.symlink(outside, os.path.join(self.dest, "link"))
        await self.pump()
        hostile = ["../x", "%2e%2e/x", "/etc/x", "a\x00b/x", "a\\..\\x", "link/x", "link/new/x"]
        for rel_path in hostile:
            fields = notice_fields(self.base_url, rel_path, b"evil")
            await self.post(fields, routing_key="v03.evil")
        reports = await self.wait_reports(len(hostile))
        self.assertEqual(sorted(r["relPath"] for r in reports), sorted(hostile))
        self.assertEqual({r["report"]["code"] for r in reports}, {422})
        with open(sentinel, "rb") as f:
            self.assertEqual(f.read(), b"sentinel")
        self.assertEqual(os.listdir(outside), ["x"])
        self.assertEqual(sorted(os.listdir(self.dest)), ["link"])
        self.assertEqual(self.consumer.stats["failures"], {"422": len(hostile)})

    async def test_file_urls_of_other_sources_refused(self):
        """bob's notice for a local file outside the sources (file:/// and a path, in any
        case) gets one 403 report, nothing is delivered or retried; the same notice from
        the pump's own user is delivered (its polls announce file: URLs)."""
        outside = os.path.join(self.base, "outside")
        secret = write_source(outside, "secret", b"the pump's secret")
        rel_path = secret.lstrip("/")
        await self.pump(user="alice", sources=None)
        for size, base_url in enumerate(("file:///", "FILE:///")):
            # Sizes differ so that the second is not a duplicate of the first.
            await self.post(notice_fields(base_url, rel_path, source="bob", size=size))
        reports = await self.wait_reports(2, source="bob")
        self.assertEqual([r["report"]["code"] for r in reports], [403, 403])
        self.assertEqual(self.dest_files(), [])
        self.assertEqual(self.consumer.stats["failures"], {"403": 2})
        self.assertEqual(self.consumer.stats["retrying"], 0)
        await self.post(notice_fields("file:///", rel_path, b"the pump's secret", source="alice"))
        reports = await self.wait_reports(1, source="alice")
        self.assertEqual(reports[0]["report"]["code"], 201)
        self.assertEqual(self.dest_files(), [rel_path])
        await self.settle()

    async def test_retrieve_path_checked_like_rel_path(self):
        """A retrievePath leading out of baseUrl (to the pump's credentials file, here) gets a
        422 report like an unsafe relPath, even from the pump's own user; one naming the
        file absolutely under a file:/// baseUrl is refused for another source (403)."""
        await self.pump(user="alice")
        hostile = ["../credentials.conf", "a/%2e%2e/../../credentials.conf"]
        for index, retrieve in enumerate(hostile):
            fields = notice_fields(self.base_url, f"a/innocent{index}.dat", retrievePath=retrieve)
            await self.post(fields)
        reports = await self.wait_reports(2)
        self.assertEqual([r["report"]["code"] for r in reports], [422, 422])
        await self.post(
            notice_fields(
                "file:///", "a/innocent.dat", source="bob", retrievePath=self.credentials
            )
        )
        reports = await self.wait_reports(1, source="bob")
        self.assertEqual(reports[0]["report"]["code"], 403)
        self.assertEqual(self.dest_files(), [])
        await self.settle()

    async def test_loopback_http_of_other_sources_refused(self):
        """A notice pointing at a web server on loopback is refused (403, not retried) unless
        the subscription's sources list it."""
        server = start_http(self, self.src)
        self.base_url = f"{server.url}/files/"
        await self.pump(sources=None)
        await self.post_file("h/f.dat", b"local service answer")
        reports = await self.wait_reports(1)
        self.assertEqual(reports[0]["report"]["code"], 403)
        self.assertEqual(self.dest_files(), [])
        self.assertEqual(self.consumer.stats["retrying"], 0)
        self.assertEqual(server.site.accepted, 0)
        await self.settle()

    async def test_fifo_source_refused_at_once(self):
        """A notice whose file: path is a named pipe gets a 422 report at once, and the
        consumer goes on answering and delivering: opening the pipe never waits for a writer
        (it froze the whole container). The notice comes from the pump's own user, whose
        file: URLs are allowed."""
        await self.pump(user="alice")
        fifo = os.path.join(self.src, "p", "pipe")
        os.makedirs(os.path.dirname(fifo))
        os.mkfifo(fifo)
        writer_came = unblock_after(self, fifo, 4)
        await self.post(notice_fields(self.base_url, "p/pipe"))
        await self.post_file("q/f.dat", b"delivered meanwhile")
        reports = await self.wait_reports(2)
        stats = await self.collector.rpc(self.consumer.pid, "stats")
        self.assertFalse(writer_came.is_set(), "the consumer waited for a writer")
        codes = {r["relPath"]: r["report"]["code"] for r in reports}
        self.assertEqual(codes, {"p/pipe": 422, "q/f.dat": 201})
        self.assertEqual(stats["failures"], {"422": 1})
        self.assertEqual(self.dest_files(), ["q/f.dat"])
        await self.settle()

    async def test_directory_swapped_for_link_during_fetch(self):
        """While a file is being fetched, its directory in the destination is replaced by a
        symbolic link to a directory outside: the delivery fails with 422 and nothing is
        written outside (the file used to land there, reported 201)."""
        outside = os.path.join(self.base, "outside")
        os.makedirs(outside)
        directory = os.path.join(self.dest, "a")
        os.makedirs(directory)
        await self.pump(consumer=HeldConsumer, user="alice")
        await self.post_file("a/f.dat", b"must not leave the destination")
        await self.consumer.started
        os.rename(directory, directory + ".old")
        os.symlink(outside, directory)
        self.consumer.release.callback(None)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 422)
        self.assertIn("symbolic link", report["report"]["message"])
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(os.listdir(directory + ".old"), [])
        await self.settle()

    async def test_inflight_named_relpath_refused(self):
        """A relPath named like a transfer's temporary file is refused with 422 and not
        delivered: the next start-up sweep would remove it."""
        await self.pump(user="alice")
        rel_path = "a/.x.txt.0123456789ab.inflight"
        await self.post_file(rel_path, b"would be swept")
        (report,) = await self.wait_reports(1)
        self.assertEqual((report["relPath"], report["report"]["code"]), (rel_path, 422))
        self.assertIn("temporary file", report["report"]["message"])
        self.assertEqual(self.dest_files(), [])
        await self.settle()

    async def test_invalid_messages(self):
        """Undecodable messages are dropped (no source to tell); invalid notices that name
        their source get a 417 report; the consumer keeps consuming."""
        await self.pump()
        await self.post(b"{not json", routing_key="v03.x")
        await self.post(b"[1, 2]", routing_key="v03.x")
        await self.post({"source": "alice", "relPath": "a/no_pubtime"})
        await self.post(
            notice_fields("no-scheme", "a/bad_url", b"x"), routing_key="v03.a"
        )
        await self.post({"relPath": "a/no_source"})
        await self.post_file("a/good.dat", b"good")
        reports = await self.wait_reports(3)
        codes = sorted((r["report"]["code"], r["relPath"]) for r in reports)
        self.assertEqual(codes, [(201, "a/good.dat"), (417, "a/bad_url"), (417, "a/no_pubtime")])
        self.assertIn(
            "pubTime",
            [r for r in reports if r["relPath"] == "a/no_pubtime"][0]["report"]["message"],
        )
        await self.settle()
        self.assertEqual(self.consumer.stats["invalid"], 5)

    async def test_announced_size_over_max_size(self):
        """A notice announcing 1 TB, over max_size: one 413 report, nothing fetched (no
        connection to the server, no directory made), no retry."""
        server = start_hostile_http(self, self.src)
        await self.pump(max_size=10**6, sources=[f"{server.url}/"])
        fields = notice_fields(f"{server.url}/files/", "big/f.dat", b"x", size=2**40)
        await self.post(fields)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 413)
        self.assertIn("over max_size 1000000", report["report"]["message"])
        await self.settle()
        self.assertEqual(server.site.accepted, 0)
        self.assertEqual(len(self.consumer.retries), 0)
        self.assertEqual(os.listdir(self.dest), [])  # not even its directory made

    async def test_endless_body_cut_at_max_size(self):
        """A notice without size for a body that never ends: cut once past max_size, one
        413 report, not retried, nothing left in the destination."""
        server = start_hostile_http(self, self.src)
        clock = task.Clock()
        await self.pump(clock=clock, max_size=100_000, sources=[f"{server.url}/"])
        await self.post(notice_fields(f"{server.url}/", "endless", size=None))
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 413)
        self.assertIn("more than the 100000 bytes max_size", report["report"]["message"])
        await self.settle()
        self.assertEqual(len(self.consumer.retries), 0)
        clock.advance(3600)
        await self.quiet()
        self.assertEqual(server.site.accepted, 1)
        self.assertEqual(self.dest_files(), [])

    async def test_too_slow_retried(self):
        """A server trickling a byte every 0.1 s, under the subscription's min_rate: the
        transfer fails as too slow within about a window, and goes to the retry queue."""
        server = start_hostile_http(self, self.src, trickle_interval=0.1)
        clock = task.Clock()
        await self.pump(
            clock=clock,
            min_rate={"bytes_per_s": 100, "window": 0.5},
            sources=[f"{server.url}/"],
        )
        await self.post(notice_fields(f"{server.url}/trickle/", "1000", size=None))
        await until(lambda: self.consumer.stats["retrying"] == 1, what="a retry entry")
        (entry,) = list(self.consumer.retries)
        self.assertEqual(entry.code, 504)
        self.assertIn("too slow", entry.message)
        self.assertEqual(self.dest_files(), [])

    async def test_oversized(self):
        """A message over max_notice_bytes gets a 413 report (without its bulk) when it names
        its source."""
        await self.pump(max_notice_bytes=2000)
        fields = notice_fields(self.base_url, "big/f.dat", b"x", padding="p" * 5000)
        await self.post(fields)
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 413)
        self.assertEqual(report["relPath"], "big/f.dat")
        self.assertNotIn("padding", report)
        await self.settle()

    # -- exactly once --------------------------------------------------------------------------

    async def test_crash_before_ack(self):
        """A consumer that dies after its report was published but before the ack: the message
        is redelivered to the next consumer on the same queue and state, which recognises it
        from the duplicate cache; no second report reaches the source."""
        await self.receivers()
        first = await self.container()
        crashing = await self.spawn_consumer(first, NoAckConsumer)
        await self.post_file("c/f.dat", b"once only")
        await self.wait_reports(1)
        await until(lambda: getattr(crashing, "unacked", 0) == 1)
        await self.until_counts(0, 1)
        await first.stop()
        await self.until_counts(1, 0)
        second = await self.container()
        consumer = await self.spawn_consumer(second)
        await until(lambda: consumer.stats["duplicates"] == 1)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.router.stats["duplicates"], 0)

    async def test_crash_before_cache_write(self):
        """A crash between the report and the duplicate-cache write: the message comes back,
        the file is fetched again and reported again under the same report_id, and the report
        router drops the repeat; the source hears once."""
        await self.pump(consumer=ForgetfulConsumer)
        await self.post_file("c/f.dat", b"twice fetched")
        await until(lambda: self.consumer.stats["delivered"] == 2)
        await until(lambda: self.router.stats["duplicates"] == 1)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(self.router.stats["forwarded"], 1)

    # -- reports straight to the source (report_direct, set by the pump app) -------------

    async def test_report_direct(self):
        """With report_direct each report is published once, to xr_<source> and the router's
        sent queue, never to xreport; the router counts it as forwarded."""
        await self.pump(report_direct=True)
        await self.collector.listen(self.xreport)
        files = {f"d/f{i}.dat": os.urandom(100 + i) for i in range(3)}
        for rel_path, data in files.items():
            await self.post_file(rel_path, data)
        reports = await self.wait_reports(3)
        self.assertEqual(sorted(r["relPath"] for r in reports), sorted(files))
        self.assertEqual(self.reports("bob"), [])
        self.assertEqual(self.collector.bodies(self.xreport), [])
        await until(lambda: self.router.stats["forwarded"] == 3)
        self.assertEqual(self.router.stats["by_source"], {"alice": {"201": 3}})

    async def test_report_direct_crash_before_cache_write(self):
        """With report_direct, a crash between the report and the cache write: the file is
        fetched again and its second report goes through the router, which knows the first
        from its sent queue and drops it; the source hears once."""
        await self.pump(consumer=ForgetfulConsumer, report_direct=True)
        await self.collector.listen(self.xreport)
        await self.post_file("c/f.dat", b"twice fetched")
        await until(lambda: self.consumer.stats["delivered"] == 2)
        await until(lambda: self.router.stats["duplicates"] == 1)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.reports()), 1)
        self.assertEqual(len(self.collector.bodies(self.xreport)), 1)
        self.assertEqual(self.router.stats["forwarded"], 1)

    async def assert_one_report_despite_lost_confirm(self):
        """The source gets the 201 report once, though its first publish lost its confirm."""
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 201)
        await self.settle()
        await self.quiet()
        self.assertEqual(len(self.reports()), 1)
        self.flushLoggedErrors(ConnectionLost)

    async def test_report_direct_unconfirmed_forwarded_again(self):
        """A report to xr_<source> whose confirm never came may be in the router's sent queue
        and not at the source: when the message comes back, the router forwards its report
        whatever its sent queue says, so the source gets it."""
        await self.pump(consumer=UnconfirmedConsumer, report_direct=True)
        await self.post_file("c/f.dat", b"confirm lost")
        await self.assert_one_report_despite_lost_confirm()

    async def test_report_direct_unconfirmed_survives_a_stop(self):
        """A report to xr_<source> whose confirm never came, from a consumer that stops before
        the message comes back: the next consumer on its state directory has the router
        forward the report whatever its sent queue says, so the source gets it once."""
        c = await self.pump(consumer=UnconfirmedThenStopped, report_direct=True)
        await self.post_file("c/f.dat", b"confirm lost, then the consumer")
        await until(lambda: getattr(self.consumer, "lost", False), what="the confirm lost")
        await self.consumer.terminate()
        self.consumer = await self.spawn_consumer(c, report_direct=True)
        await self.assert_one_report_despite_lost_confirm()

    async def test_report_direct_reports_go_together(self):
        """Direct reports wait for each other (REPORT_WINDOW) and go together once
        REPORT_BATCH wait: none reaches the source before, all of them after, each once, and
        every message is acked."""
        self.patch(consumer_module, "REPORT_WINDOW", 600)
        self.patch(consumer_module, "REPORT_BATCH", 3)
        await self.pump(report_direct=True)
        files = {f"b/f{i}.dat": os.urandom(50 + i) for i in range(3)}
        for rel_path, data in list(files.items())[:2]:
            await self.post_file(rel_path, data)
        await until(lambda: len(self.consumer._held_reports) == 2, what="two reports held")
        await self.quiet()
        self.assertEqual(self.reports(), [])
        rel_path, data = list(files.items())[2]
        await self.post_file(rel_path, data)
        reports = await self.wait_reports(3)
        self.assertEqual(sorted(r["relPath"] for r in reports), sorted(files))
        await self.settle()
        await until(lambda: self.router.stats["forwarded"] == 3)

    async def test_report_direct_held_reports_never_fill_the_prefetch(self):
        """Direct reports wait for at most half the prefetch: with prefetch 4, two reports
        go at once, whatever REPORT_WINDOW says, and the next messages keep coming."""
        self.patch(consumer_module, "REPORT_WINDOW", 600)
        await self.pump(report_direct=True, prefetch=4)
        files = {f"p/f{i}.dat": os.urandom(60 + i) for i in range(6)}
        for rel_path, data in files.items():
            await self.post_file(rel_path, data)
        reports = await self.wait_reports(6)
        self.assertEqual(sorted(r["relPath"] for r in reports), sorted(files))
        await self.settle()

    async def test_report_direct_held_report_goes_at_stop(self):
        """A consumer stopped while a direct report waits for others publishes it then: the
        source gets it and the message is acked, without waiting for REPORT_WINDOW."""
        self.patch(consumer_module, "REPORT_WINDOW", 600)
        await self.pump(report_direct=True)
        await self.post_file("s/f.dat", b"held")
        await until(lambda: len(self.consumer._held_reports) == 1, what="a report held")
        await self.consumer.terminate()
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["relPath"], "s/f.dat")
        await self.settle()
        await until(lambda: self.router.stats["forwarded"] == 1)

    # -- the app -----------------------------------------------------------------------------

    async def test_app(self):
        """The pump app starts one rest_for_one supervisor over the report router, the transfer
        workers, the ingest, one consumer per subscription and the progress summary; files
        are delivered end to end."""
        c = await self.container()
        collector = self.collector = await c.spawn(Collector)
        await collector.listen("xr_alice")
        sup = await pump_app.start(
            c,
            types.SimpleNamespace(name="pump"),
            subscriptions=[
                {
                    "name": self.subscription,
                    "directory": self.dest,
                    "state_dir": self.state,
                    "topics": ["v03.#"],
                    "exchange": self.xpublic,
                    "report_exchange": self.xreport,
                    "sources": [self.base_url],
                }
            ],
            transfer={"workers": 2, "credentials": self.credentials},
            report_router={
                "state_dir": os.path.join(self.base, "router"),
                "exchange": self.xreport,
            },
            ingest={
                "user": "ion",
                "users": [self.name("feed")],
                "exchange": self.xpublic,
                "report_exchange": self.xreport,
            },
        )
        self.durable_queues.add(f"q_{c.transport.user}.{c.sysname}.consumer.{self.subscription}")
        self.durable_queues.add(f"q_ion.ingest.xs_{self.name('feed')}")
        self.assertEqual(sup.strategy, "rest_for_one")
        self.assertEqual(
            [spec.id for spec in sup.child_specs],
            [
                "report_router",
                "transfer1",
                "transfer2",
                "ingest",
                f"consumer.{self.subscription}",
                "progress",
            ],
        )
        await self.post_file("app/f.dat", b"via the app")
        (report,) = await self.wait_reports(1)
        self.assertEqual(report["report"]["code"], 201)
        await sup.terminate()


    # -- partitioned transfers and the completion trigger ------------------------------------

    def hook(self, status=0, stderr=""):
        """An on_complete command (an argument list, no shell string) that appends the path
        it is given to hook.log, writes C{stderr} and exits with C{status}."""
        log = os.path.join(self.base, "hook.log")
        script = f'echo "$1" >> {log}; printf "{stderr}" >&2; exit {status}'
        return ["/bin/sh", "-c", script, "hook"], log

    async def test_partitioned_with_on_complete(self):
        """A file above block_threshold arrives in blocks over http; the on_complete command
        runs once with its path and its notice goes to complete_exchange; a command that
        fails is a 500 report carrying its last stderr line."""
        server = start_http(self, self.src)
        self.base_url = f"{server.url}/files/"
        command, log = self.hook()
        complete = self.name("xcomplete")
        c = await self.receivers()
        await self.collector.listen(complete)
        self.consumer = await self.spawn_consumer(
            c, block_threshold=256 * 1024, block_size=256 * 1024,
            on_complete={"command": command, "complete_exchange": complete, "timeout": 10},
        )
        data = os.urandom(1024 * 1024 + 3)
        await self.post_file("big/f.dat", data)
        await self.post_file("small.dat", b"small")  # below the threshold: no trigger
        reports = await self.wait_reports(2)
        self.assertEqual(sorted(r["report"]["code"] for r in reports), [201, 201])
        with open(os.path.join(self.dest, "big", "f.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
        await until(lambda: self.collector.bodies(complete), what="the completion notice")
        with open(log) as f:
            self.assertEqual(f.read(), os.path.join(os.path.realpath(self.dest), "big", "f.dat")
                             + "\n")
        self.assertEqual([n["relPath"] for n in self.collector.bodies(complete)], ["big/f.dat"])

    async def test_on_complete_failure_reported(self):
        """A command exiting non-zero is logged and reported (500) with its last stderr line;
        with all_files it runs for small files too."""
        command, log = self.hook(status=3, stderr="first\\nno space left on archive")
        await self.pump(on_complete={"command": command, "all_files": True})
        await self.post_file("f.dat", b"data")
        reports = await self.wait_reports(2)
        self.assertEqual([r["report"]["code"] for r in reports], [201, 500])
        self.assertIn("exited 3: no space left on archive", reports[1]["report"]["message"])
        with open(log) as f:
            self.assertEqual(len(f.read().splitlines()), 1)

    async def test_sr3_block_notices(self):
        """sr3's notices of one file's blocks (its v03 blocks field, a manifest) are each
        fetched as a range and reported 206, and the last one puts the file in place (201)."""
        server = start_http(self, self.src)
        self.base_url = f"{server.url}/files/"
        await self.pump()
        step = 100_000
        data = os.urandom(2 * step + 10)
        write_source(self.src, "b/f.dat", data)
        parts = [data[i:i + step] for i in range(0, len(data), step)]
        manifest = {str(n): {"size": len(p), "identity": "x"} for n, p in enumerate(parts)}
        for number in (2, 0, 1):
            fields = notice_fields(self.base_url, "b/f.dat", parts[number])
            fields["blocks"] = {"method": "inplace", "size": step, "number": number,
                                "manifest": manifest}
            await self.post(fields)
            await until(lambda: len(self.reports()) == 3 - number if number else 3)
        reports = await self.wait_reports(3)
        self.assertEqual([r["report"]["code"] for r in reports], [206, 206, 201])
        with open(os.path.join(self.dest, "b", "f.dat"), "rb") as f:
            self.assertEqual(f.read(), data)


class MemoryConsumerTests(OnMemory, ConsumerScenarios, unittest.TestCase):
    """The scenarios on the memory:// transport."""


class AmqpConsumerTests(OnPrivateRabbitMQ, ConsumerScenarios, unittest.TestCase):
    """The same scenarios on the private RabbitMQ node."""


class AppArgsTests(unittest.SynchronousTestCase):
    def test_unknown_kwarg(self):
        """An unknown app argument is a clear error naming the valid ones; so are bad
        subscriptions."""
        e = self.assertRaises(ValueError, pump_app.plan, sendres=[])
        self.assertIn("unknown argument 'sendres'", str(e))
        self.assertIn("subscriptions", str(e))
        e = self.assertRaises(
            ValueError, pump_app.plan, subscriptions=[{"name": "a", "directory": "/x"}] * 2
        )
        self.assertIn("two subscriptions", str(e))
        e = self.assertRaises(ValueError, pump_app.plan, transfer={"workers": 0})
        self.assertIn("workers", str(e))
        e = self.assertRaises(ValueError, pump_app.plan, subscriptions=[{"name": "a"}])
        self.assertIn("directory", str(e))

    def test_default_plan(self):
        """Without kwargs: one subscription `pump` on xpublic v03.# into pump/destination/,
        two transfer workers, the router first, the ingest before the consumer, the progress
        summary last."""
        plan = pump_app.plan()
        self.assertEqual(
            [c["id"] for c in plan["children"]],
            ["report_router", "transfer1", "transfer2", "ingest", "consumer.pump", "progress"],
        )
        consumer = plan["children"][-2]["args"]
        self.assertEqual(consumer["directory"], "pump/destination/")
        self.assertEqual(consumer["topics"], ["v03.#"])
        checked = ConsumerArgs.parse(consumer)
        self.assertEqual(checked.max_size, 10 * 2**30)
        self.assertEqual(checked.min_rate, MinRate(bytes_per_s=1024, window=60))

    def test_pump_bounds_are_subscription_defaults(self):
        """max_size and min_rate of the pump's transfer settings bound the transfer service
        and are the default of every subscription, which may set its own."""
        plan = pump_app.plan(
            transfer={"max_size": 5000, "min_rate": 10},
            subscriptions=[
                {"name": "a", "directory": "a"},
                {"name": "b", "directory": "b", "max_size": 7},
            ],
        )
        args = {c["id"]: c["args"] for c in plan["children"]}
        self.assertEqual(args["transfer1"]["max_size"], 5000)
        self.assertEqual(
            [(args[f"consumer.{n}"]["max_size"], args[f"consumer.{n}"]["min_rate"]) for n in "ab"],
            [(5000, 10), (7, 10)],
        )

    def test_pump_rate_and_dead_time(self):
        """The pump's byte_rate_max limits its transfer services only; its dead_time and
        host_byte_rate_max are every subscription's and sender's default."""
        plan = pump_app.plan(
            transfer={"byte_rate_max": 10**6, "host_byte_rate_max": 10**5, "dead_time": 60},
            subscriptions=[{"name": "a", "directory": "a", "byte_rate_max": 5000}],
            senders=[{"name": "s", "destination": "sftp://u@h/d/"}],
        )
        args = {c["id"]: c["args"] for c in plan["children"]}
        self.assertEqual(args["transfer1"]["byte_rate_max"], 10**6)
        for child in ("consumer.a", "sender.s"):
            self.assertEqual(args[child]["dead_time"], 60)
            self.assertEqual(args[child]["transfer"]["host_byte_rate_max"], 10**5)
            self.assertNotIn("byte_rate_max", args[child]["transfer"])
        self.assertEqual(args["consumer.a"]["byte_rate_max"], 5000)

    def test_app_file(self):
        """res/apps/pump.app passes the app checks and its kwargs make a valid plan."""
        spec = read_app(os.path.join(RES, "apps", "pump.app"))
        self.assertEqual(spec.name, "pump")
        pump_app.plan(**spec.kwargs)
