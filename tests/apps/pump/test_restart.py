"""Restart safety of the whole pump flow on the private RabbitMQ node.

The pump runs as a `twistd -n cc` child process (`PumpChild` from test_crash) in a working
directory of its own, so its state lives where a user's would: `var/pump/` under that
directory. The flow is the whole one: a poll lists a `file:` source tree -> `xs_<user>` ->
ingest -> `xpublic-<tag>` -> consumer -> transfer into the destination tree -> report ->
`xreport-<tag>` -> report router -> `xr_<source>` (and `var/pump/reports.jsonl`).

Each test moves 2,000 small files (1-4 KiB of random bytes, ten directories two levels deep).
1,200 are in the source when the pump starts; once a quarter of the 2,000 are reported, the
pump (scenario A) or the broker (scenario B) is killed with SIGKILL, the other 800 files
appear while it is down, and it is started again: the pump on the same working directory, or
the broker on the same data (the pump's container then reconnects by itself). Then:

1. every source file is at its mirrored final name with the same bytes;
2. the source's `xr_` exchange carried exactly one report per file, a 201 (read from a durable
   queue of the test's, so nothing is missed while the broker is down; a report is known by
   its `report_id`), and the router's report log logged no other code. After a container
   crash no report reached the source twice; after a broker crash a report whose forward was
   unconfirmed when the broker died may come again with its `report_id` (a publisher cannot
   know what an unconfirmed publish left in each queue);
3. a watcher thread that scanned the destination every 30 ms during the whole flow never saw
   a final (non-hidden) name with bytes other than the source file's;
4. no pump queue holds ready or unacknowledged messages (read with `rabbitmqctl`), neither
   once the flow is over nor after the restarted pump stopped cleanly;
5. no hidden `.<name>.<random>.inflight` temporary file is left in the destination;
6. the pump's log shows no message given up after a redelivery and no unhandled error.
"""

import collections
import itertools
import json
import os
import random
import signal
import threading
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX, SWEEP_MIN_AGE
from ion.core.cc.testing import make_container
from tests.apps.pump.fixtures import Collector, delete_queues, until
from tests.apps.pump.test_consumer import rabbitmq_queues, until_queue
from tests.apps.pump.test_crash import PumpChild, write_pump_app
from tests.apps.pump.test_pump_e2e import inflight_files
from tests.broker import get_broker

FILES = 2000
BEFORE_START = 1200  # in the source when the pump starts; the others appear during the outage
KILL_AFTER = FILES // 4  # reports received before the kill
WATCH_INTERVAL = 0.03
_tags = itertools.count(1)


def make_files(seed, count=FILES):
    """{relPath: bytes}: `count` files of 1-4 KiB in ten directories two levels deep."""
    rng = random.Random(seed)
    return {
        f"d{i % 5}/s{i // 5 % 2}/f{i:04d}.bin": rng.randbytes(rng.randrange(1024, 4097))
        for i in range(count)
    }


def put_files(src, staging, files):
    """Make each file appear in `src` at once: written and closed under `staging` (the same
    file system, outside the polled tree), then renamed into place. A poll never lists a
    half-written file, so any partial file seen later is the pump's doing."""
    os.makedirs(staging, exist_ok=True)
    for rel_path, data in files.items():
        target = os.path.join(src, *rel_path.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        temp = os.path.join(staging, rel_path.replace("/", "_"))
        with open(temp, "wb") as f:
            f.write(data)
        os.rename(temp, target)


def write_app(path, tag, dest, credentials, dup_ttl=None):
    """A pump .app: one poll of `src/` under the working directory (every 0.5 s, no minimum
    age), one subscription mirroring into `dest`, the test's own exchanges and queues (named
    after `tag`), state in the default places under `var/pump/`, a report log; `dup_ttl`
    (seconds) for the consumer's and the router's duplicate caches, when given."""
    kwargs = {
        "user": tag,
        "polls": [{"name": "src", "url": "file:src/", "interval": 0.5, "min_age": 0}],
        "subscriptions": [
            {
                "name": "sub",
                "exchange": f"xpublic-{tag}",
                "report_exchange": f"xreport-{tag}",
                "directory": dest,
                "mirror": True,
                "parallel": 4,
            }
        ],
        "transfer": {"workers": 2, "credentials": credentials},
        "ingest": {"exchange": f"xpublic-{tag}", "report_exchange": f"xreport-{tag}"},
        "report_router": {"exchange": f"xreport-{tag}", "log_path": "var/pump/reports.jsonl"},
        "progress": {"interval": 5},
    }
    if dup_ttl is not None:
        kwargs["subscriptions"][0]["dup_ttl"] = dup_ttl
        kwargs["report_router"]["dup_ttl"] = dup_ttl
    return write_pump_app(path, kwargs, "the pump under a restart test")


class ReportCollector(Collector):
    """Reads a source's reports from a durable queue of its own, so reports routed while this
    container is reconnecting (after a broker restart) wait for it. A report is known by its
    `report_id` header: a copy of one already taken (handed out again by the broker, or
    forwarded again by the router after a broker crash) is counted in `copies`, not as a
    report; a second report from the pump has another id and is counted."""

    def on_init(self):
        super().on_init()
        self.taken = set()
        self.copies = 0
        self.codes = collections.Counter()  # (relPath, code) -> reports
        self.ok = set()  # relPaths with a 201
        self._waiters = []  # (count, Deferred)

    def when_ok(self, count):
        """A Deferred fired as soon as `count` files have a 201 (no polling lag)."""
        waiter = defer.Deferred()
        self._waiters.append((count, waiter))
        self._wake()
        return waiter

    def _wake(self):
        for count, waiter in list(self._waiters):
            if len(self.ok) >= count:
                self._waiters.remove((count, waiter))
                waiter.callback(len(self.ok))

    async def listen_durable(self, exchange, queue):
        await self.subscribe(exchange, ["#"], self._take, queue=queue, durable=True)

    def _take(self, delivery):
        rid = (delivery.properties.headers or {}).get("report_id")
        if rid is None or rid in self.taken:
            self.copies += 1
            delivery.ack()
            return
        self.taken.add(rid)
        fields = json.loads(delivery.body)
        self.got.append((delivery.exchange, delivery.routing_key, fields))
        code = fields["report"]["code"]
        self.codes[fields["relPath"], code] += 1
        if code == 201:
            self.ok.add(fields["relPath"])
        delivery.ack()
        self._wake()


class Watcher:
    """A thread scanning `dest` every `interval` seconds for files at final (non-hidden) names
    whose bytes differ from the expected ones. Each file is read again whenever its inode,
    size or mtime changed since it was last read."""

    def __init__(self, dest, expected, interval=WATCH_INTERVAL):
        self.dest = dest
        self.expected = expected
        self.interval = interval
        self.problems = []
        self.scans = 0
        self.reads = 0
        self.hidden_seen = set()
        self._checked = {}  # path -> (inode, size, mtime_ns) last read and found right
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        self.scan()  # one last look, after everything is over

    def _run(self):
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.problems.append(f"watcher failed: {type(e).__name__}: {e}")
                return
            self._stop.wait(self.interval)

    def scan(self):
        self.scans += 1
        stack = [self.dest]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.name.startswith("."):
                    self.hidden_seen.add(entry.path)
                else:
                    self._check(entry)

    def _check(self, entry):
        rel_path = os.path.relpath(entry.path, self.dest).replace(os.sep, "/")
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._checked.get(entry.path) == signature:
            return
        expected = self.expected.get(rel_path)
        if expected is None:
            self.problems.append(f"{rel_path}: at a final name but no such source file")
            self._checked[entry.path] = signature
            return
        try:
            with open(entry.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        self.reads += 1
        if data != expected:
            same = " (same size, other bytes)" if len(data) == len(expected) else ""
            self.problems.append(
                f"{rel_path}: {len(data)} bytes at its final name, the source has "
                f"{len(expected)}{same}"
            )
        self._checked[entry.path] = signature


def tree(root):
    """{relPath: bytes} of the non-hidden files under root, and the hidden ones' relPaths."""
    found, hidden = {}, []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            rel_path = os.path.relpath(path, root).replace(os.sep, "/")
            if name.startswith("."):
                hidden.append(rel_path)
                continue
            with open(path, "rb") as f:
                found[rel_path] = f.read()
    return found, sorted(hidden)


class RestartTests(unittest.TestCase):
    """kill -9 of the pump, then of the broker, in the middle of 2,000 files."""

    timeout = 240

    async def test_kill_9_container_mid_flow(self):
        """Scenario A: the pump's container is killed with SIGKILL after a quarter of the
        files were reported and started again on the same working directory."""

        async def outage(flow):
            flow.children[-1].stop(signal.SIGKILL)
            ready, _ = await flow.settled_after_kill()
            self.assertGreater(ready, 0, "nothing was left to redeliver after the kill")
            put_files(flow.src, flow.staging, flow.later)
            await flow.start_child()

        await self.run_flow(outage, seed=11, forwarded_once=True)

    async def test_kill_9_broker_mid_flow(self):
        """Scenario B: the broker node is killed with SIGKILL after a quarter of the files
        were reported and restarted; the pump's container stays up and reconnects by itself."""

        async def outage(flow):
            await threads.deferToThread(flow.broker.kill)
            put_files(flow.src, flow.staging, flow.later)
            await threads.deferToThread(flow.broker.restart)

        # A forward unconfirmed when the broker died is forwarded again (the broker may or may
        # not have kept it): the source may see a copy, with the same report_id.
        await self.run_flow(outage, seed=12, forwarded_once=False)

    async def run_flow(self, outage, seed, forwarded_once):
        started = time.monotonic()
        flow = Flow(self, seed)
        await flow.set_up()
        put_files(flow.src, flow.staging, flow.first)
        watcher = Watcher(flow.dest, flow.files)
        self.addCleanup(watcher.stop)

        # Watched from before the start: the pump works before it logs that it runs.
        first_reports = flow.collector.when_ok(KILL_AFTER)
        await flow.start_child()
        at_kill = await first_reports.addTimeout(60, reactor)
        self.assertLess(at_kill, len(flow.first), "the first files were all done before the kill")
        await outage(flow)

        everything = set(flow.files)
        try:
            await until(lambda: flow.collector.ok == everything, timeout=90)
        except AssertionError:
            self.fail(f"not every file got its 201 ({at_kill} before the kill): {flow.missing()}")
        for queue in flow.queues:
            await flow.until_queue(queue, lambda ready, unacked: (ready, unacked) == (0, 0))
        # Anything still on its way (a second report) has had the time to arrive.
        await task.deferLater(reactor, 2, lambda: None)
        flow_seconds = time.monotonic() - started
        # The temporary files of the killed container: swept by the restarted one, those
        # changed just before the kill once they are SWEEP_MIN_AGE seconds old.
        await until(
            lambda: not inflight_files(flow.dest),
            timeout=SWEEP_MIN_AGE + 10,
            what="the killed container's temporary files swept",
        )
        watcher.stop()

        # 1. Every file at its final name with its bytes, nothing else there.
        final, hidden = tree(flow.dest)
        self.assertEqual(sorted(final), sorted(flow.files))
        wrong = sorted(p for p, data in final.items() if data != flow.files[p])
        self.assertEqual(wrong, [], "files at their final names with other bytes")

        # 2. Exactly one report per file on xr_<source>, a 201; the router's log agrees.
        counts = flow.collector.codes
        not_once = {key: n for key, n in counts.items() if n != 1}
        self.assertEqual(not_once, {}, f"reports not exactly once ({at_kill} before the kill)")
        self.assertEqual(set(counts), {(p, 201) for p in flow.files})
        forwarded = collections.Counter()
        logged = collections.defaultdict(set)
        with open(os.path.join(flow.base, "var", "pump", "reports.jsonl")) as f:
            for line in f:
                entry = json.loads(line)
                logged[entry["relPath"]].add(entry["code"])
                if entry["outcome"] == "forwarded":
                    forwarded[entry["relPath"], entry["code"]] += 1
        self.assertEqual({p: c for p, c in logged.items() if c != {201}}, {})
        self.assertEqual(sorted(logged), sorted(flow.files))
        if forwarded_once:
            self.assertEqual({k: n for k, n in forwarded.items() if n > 1}, {})
            self.assertEqual(flow.collector.copies, 0)
        else:
            self.assertEqual({k: n for k, n in forwarded.items() if n > 2}, {})

        # 3. Never a partial or foreign file at a final name while the flow ran.
        self.assertEqual(watcher.problems, [])
        self.assertGreater(watcher.scans, 50)

        # 4. Nothing left in the pump's queues, also after a clean stop.
        child = flow.children[-1]
        self.assertEqual(child.stop(), 0, child.tail())
        left = await threads.deferToThread(rabbitmq_queues, flow.broker)
        self.assertEqual({q: left.get(q) for q in flow.queues}, {q: (0, 0) for q in flow.queues})

        # 5. No temporary file left behind.
        inflight = [p for p in hidden if p.endswith(INFLIGHT_SUFFIX)]
        self.assertEqual(
            inflight,
            [],
            f"leftover temporary files ({len(watcher.hidden_seen)} hidden names seen in all)",
        )
        self.assertEqual(hidden, [])

        # And nothing given up on the way.
        with open(child.log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for sign in ("had been redelivered: moving it to", "Unhandled error"):
            self.assertNotIn(sign, text)
        print(
            f"\n{self.id()}: {FILES} files, {at_kill} reported before the kill, flow "
            f"{flow_seconds:.1f} s, {watcher.scans} scans, {watcher.reads} reads, "
            f"{flow.collector.copies} copies of reports at the source, "
            f"{sum(n - 1 for n in forwarded.values())} reports forwarded again"
        )


class Flow:
    """One test's pump: its directories, app file, queues, children and report collector."""

    def __init__(self, testcase, seed):
        self.testcase = testcase
        self.broker = get_broker()
        self.tag = f"restart{os.getpid()}x{next(_tags)}"
        self.base = os.path.abspath(testcase.mktemp())
        self.src = os.path.join(self.base, "src")
        self.dest = os.path.join(self.base, "dest")
        self.staging = os.path.join(self.base, "staging")
        os.makedirs(self.base)
        self.files = make_files(seed)
        names = sorted(self.files)
        random.Random(seed).shuffle(names)
        self.first = {p: self.files[p] for p in names[:BEFORE_START]}
        self.later = {p: self.files[p] for p in names[BEFORE_START:]}
        credentials = os.path.join(self.base, "credentials.conf")
        with open(credentials, "w"):
            pass
        os.chmod(credentials, 0o600)
        self.app_path = write_app(
            os.path.join(self.base, "restart.app"), self.tag, self.dest, credentials
        )
        self.consumer_queue = f"q_{self.tag}.{self.tag}.consumer.sub"  # user and sysname: tag
        self.router_queue = f"q_xreport-{self.tag}.report_router"
        self.queues = [
            f"q_{self.tag}.ingest.xs_{self.tag}",
            self.consumer_queue,
            self.router_queue,
            f"q_{self.tag}.{self.tag}.report_router.sent",
        ]
        self.collector_queue = f"q_{self.tag}.test.reports"
        self.children = []
        self.collector = None

    async def set_up(self):
        t = self.testcase
        await self.delete_queues()
        t.addCleanup(lambda: defer.Deferred.fromCoroutine(self.delete_queues()))
        t.addCleanup(self.kill_children)
        client = await make_container(t, url=self.broker.url, sysname=f"{self.tag}-client")
        self.collector = await client.spawn(ReportCollector)
        # Bound before any file exists: every report routed to the source is kept.
        await self.collector.listen_durable(f"xr_{self.tag}", self.collector_queue)

    async def delete_queues(self):
        if not self.broker.running:
            self.broker.start()
        await delete_queues(self.broker.url, [*self.queues, self.collector_queue])

    def kill_children(self):
        for child in self.children:
            if child.proc.poll() is None:
                child.stop(signal.SIGKILL)

    def start_child(self):
        log_path = os.path.join(self.base, "pump.log")
        child = PumpChild(self.broker.url, self.tag, self.app_path, self.base, log_path)
        self.children.append(child)
        return threads.deferToThread(child.wait_ready)

    def missing(self):
        """What is known of the files without a 201 on xr_<source>, for a failure message."""
        missing = sorted(set(self.files) - self.collector.ok)
        logged = collections.defaultdict(list)
        try:
            with open(os.path.join(self.base, "var", "pump", "reports.jsonl")) as f:
                for line in f:
                    entry = json.loads(line)
                    logged[entry["relPath"]].append((entry["code"], entry["outcome"]))
        except OSError:
            pass
        lines = [f"{len(missing)} files:"]
        for rel_path in missing[:20]:
            path = os.path.join(self.dest, *rel_path.split("/"))
            try:
                with open(path, "rb") as f:
                    there = "right bytes" if f.read() == self.files[rel_path] else "WRONG bytes"
            except FileNotFoundError:
                there = "not in the destination"
            lines.append(f"  {rel_path}: {there}; report log {logged.get(rel_path, [])}")
        if any(logged.get(p) and {o for _, o in logged[p]} == {"duplicate"} for p in missing):
            lines.append(
                "(logged as duplicates only: the router's forward was unconfirmed when the "
                "broker died, its copy on the router's sent queue survived the restart and the "
                "one on the source's queue did not: RabbitMQ keeps or loses an unconfirmed "
                "message queue by queue)"
            )
        lines.append(f"pump log:\n{self.children[-1].tail(30)}")
        return "\n".join(lines)

    async def settled_after_kill(self):
        """The broker noticed the dead connection: what it had handed out is ready again."""
        return await self.until_queue(self.consumer_queue, lambda ready, unacked: unacked == 0)

    async def until_queue(self, queue, predicate, timeout=30):
        """Wait until predicate(ready, unacked) holds for `queue` (read with rabbitmqctl)."""
        return await until_queue(self.broker, queue, predicate, timeout)
