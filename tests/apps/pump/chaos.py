"""Chaos for the whole pump flow: kill -9 of broker nodes and of the pump's container at
random points, then exact accounting. Shared by `test_chaos.py` (sized for CI) and
`bench/chaos.py` (the long version and the soak).

The flow is test_restart's (a poll of a `file:` tree -> ingest -> consumer -> report router,
the pump as a `twistd -n cc` child in a working directory of its own), on one private node
or on a 3-node cluster (`tests.broker.PrivateCluster`, the pump given every node's URL, its
queues quorum queues). `ChaosFlow.run(events)` waits for each event's number of reported
files, then kills: `"container"` (SIGKILL the pump, start a new one on the same directory),
`"broker"` (SIGKILL the single node, or on a cluster the node the pump is connected to, then
start it again). Then `check()` asserts:

1. every source file at its mirrored final name with the same bytes, nothing else there, and
   a watcher thread never saw other bytes at a final name while the flow ran;
2. exactly one 201 report per file on `xr_<source>` (known by `report_id`), and the router's
   log names no other code;
3. no message ready or unacknowledged in any pump queue, none dead-lettered;
4. no temporary file left in the destination;
and returns a summary with the duplicate deliveries the consumers suppressed (their `stats`,
asked over rpc before each container kill and at the end).
"""

import collections
import json
import os
import random
import signal
import time

from twisted.internet import defer, reactor, task, threads

from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX, SWEEP_MIN_AGE
from ion.core.cc.testing import make_container
from ion.core.messaging.transport import ConnectionLost, NotFound
from ion.core.process import Process
from tests.apps.pump.fixtures import delete_queues, until
from tests.apps.pump.test_crash import PumpChild
from tests.apps.pump.test_pump_e2e import inflight_files
from tests.apps.pump.test_restart import (
    ReportCollector,
    Watcher,
    make_files,
    put_files,
    tree,
    write_app,
)
from tests.broker import PrivateCluster


class Asker(Process):
    """Asks the pump's processes for their stats, from inside the pump's system."""


def queue_counts(node):
    """{queue: (ready, unacked)} on a node (of a cluster: the whole cluster's queues)."""
    out = node.ctl("list_queues", "--no-table-headers", "name", "messages_ready",
                   "messages_unacknowledged", timeout=180)
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            counts[fields[0]] = (int(fields[1]), int(fields[2]))
    return counts


def connected_node(brokers, user):
    """The node of a cluster holding `user`'s connections (the pump's)."""
    node = brokers.running_node()
    out = node.ctl("list_connections", "--no-table-headers", "user", "port", timeout=180)
    ports = {fields[1] for fields in map(str.split, out.splitlines())
             if len(fields) == 2 and fields[0] == user}  # port: the node's AMQP port
    for candidate in brokers.nodes:
        if str(candidate.port) in ports:
            return candidate
    return None


class ChaosFlow:
    """One pump flow of `count` files on `brokers` (a PrivateBroker or a PrivateCluster);
    `testcase` gives `mktemp` and `addCleanup` (trial's, or the bench's stand-in)."""

    def __init__(self, testcase, brokers, count, seed, tag, before_start=0.6, dup_ttl=None,
                 child_env=None):
        self.testcase = testcase
        self.child_env = child_env  # more environment of the pump's process
        self.brokers = brokers
        self.cluster = isinstance(brokers, PrivateCluster)
        self.url = brokers.url  # the pump logs in as guest
        self.client_url = brokers.url_for("alice")  # the test's own connections
        self.tag = tag
        self.seed = seed
        self.base = os.path.abspath(testcase.mktemp())
        self.src = os.path.join(self.base, "src")
        self.dest = os.path.join(self.base, "dest")
        self.staging = os.path.join(self.base, "staging")
        os.makedirs(self.base)
        self.files = make_files(seed, count)
        names = sorted(self.files)
        self.rng = random.Random(seed)
        self.rng.shuffle(names)
        split = int(count * before_start)
        self.first = {p: self.files[p] for p in names[:split]}
        self.later = {p: self.files[p] for p in names[split:]}
        credentials = os.path.join(self.base, "credentials.conf")
        with open(credentials, "w"):
            pass
        os.chmod(credentials, 0o600)
        self.app_path = write_app(
            os.path.join(self.base, "chaos.app"), tag, self.dest, credentials, dup_ttl
        )
        self.consumer_queue = f"q_{tag}.{tag}.consumer.sub"
        self.queues = [
            f"q_{tag}.ingest.xs_{tag}",
            self.consumer_queue,
            f"q_xreport-{tag}.report_router",
            f"q_{tag}.{tag}.report_router.sent",
        ]
        # Dead letters: the processes' own, and those the quorum queues gave up.
        self.dead_queues = [f"{q}.{kind}" for q in self.queues for kind in ("dead", "poison")]
        self.collector_queue = f"q_{tag}.test.reports"
        self.children = []
        self.collector = self.asker = None
        self.duplicates = 0  # suppressed by the consumers of killed or stopped pumps
        self.kills = collections.Counter()
        self.log = []  # (seconds, what) of each event

    async def set_up(self):
        t = self.testcase
        await self.delete_queues()
        t.addCleanup(lambda: defer.Deferred.fromCoroutine(self.delete_queues()))
        t.addCleanup(self.kill_children)
        client = await make_container(t, url=self.client_url, sysname=f"{self.tag}-client")
        self.collector = await client.spawn(ReportCollector)
        await self.collector.listen_durable(f"xr_{self.tag}", self.collector_queue)
        ops = await make_container(t, url=self.client_url, sysname=self.tag)
        self.asker = await ops.spawn(Asker)

    async def delete_queues(self):
        nodes = self.brokers.nodes if self.cluster else [self.brokers]
        for node in nodes:
            if not node.running:
                await threads.deferToThread(node.start)
        await delete_queues(
            self.client_url, [*self.queues, *self.dead_queues, self.collector_queue]
        )

    def kill_children(self):
        for child in self.children:
            if child.proc.poll() is None:
                child.stop(signal.SIGKILL)

    def start_child(self):
        log_path = os.path.join(self.base, "pump.log")
        child = PumpChild(
            self.url, self.tag, self.app_path, self.base, log_path, env=self.child_env
        )
        self.children.append(child)
        return threads.deferToThread(child.wait_ready)

    async def stats_of(self, process):
        """The stats of the running pump's `process` ({} if it cannot tell: the broker is
        down or it is starting)."""
        try:
            return await self.asker.rpc(process, "stats", {}, timeout=5)
        except Exception:
            return {}

    async def consumer_duplicates(self):
        """The running pump's consumer's count of suppressed duplicates (0 if it cannot
        tell)."""
        return (await self.stats_of("pump.consumer.sub")).get("duplicates", 0)

    def router_log(self):
        """The entries of the report router's log (`var/pump/reports.jsonl`)."""
        with open(os.path.join(self.base, "var", "pump", "reports.jsonl")) as f:
            return [json.loads(line) for line in f]

    async def run(self, events, timeout=120):
        """Put the first files, start the pump, play `events` [(kind, reported files)] in
        order, put the other files after the first event, and wait for every 201."""
        self.started = time.monotonic()
        put_files(self.src, self.staging, self.first)
        self.watcher = Watcher(self.dest, self.files)
        self.testcase.addCleanup(self.watcher.stop)
        await self.start_child()
        later_put = False
        for kind, after in events:
            if not later_put and after > len(self.first):
                # A kill point past the first files: the others must be on their way first.
                put_files(self.src, self.staging, self.later)
                later_put = True
            await self.collector.when_ok(after).addTimeout(timeout, reactor)
            await self.kill(kind)
            if not later_put:
                put_files(self.src, self.staging, self.later)
                later_put = True
        if not later_put:
            put_files(self.src, self.staging, self.later)
        everything = set(self.files)
        try:
            await until(lambda: self.collector.ok == everything, timeout=timeout,
                        what=f"a 201 for every file ({len(everything)}; ION_CHAOS_SEED="
                        f"{self.seed} replays the kills)")
        except AssertionError as e:
            stats = await self.stats_of("pump.consumer.sub")
            counts = {k: stats.get(k) for k in ("delivered", "duplicates", "retrying", "failures")}
            routed = await self.stats_of("pump.report_router")
            raise AssertionError(
                f"{e}\nconsumer {counts}\nrouter {routed}\n"
                f"{self.diagnosis(everything - self.collector.ok)}"
            )

    def diagnosis(self, missing, shown=5):
        """What the destination, the router's log and the pump's log say of the files in
        `missing` (the first `shown` of them): for a flow that timed out."""
        lines = [f"{len(missing)} files without a 201; kills (s, reported, what) {self.log}"]
        routed = collections.defaultdict(list)
        try:
            for entry in self.router_log():
                routed[entry.get("relPath")].append(
                    (entry.get("code"), entry.get("outcome"), entry.get("report_id"))
                )
        except (OSError, ValueError) as e:
            lines.append(f"router log unreadable: {e}")
        try:
            with open(os.path.join(self.base, "pump.log"), encoding="utf-8",
                      errors="replace") as f:
                log = f.read().splitlines()
        except OSError:
            log = []
        for rel_path in sorted(missing)[:shown]:
            placed = os.path.exists(os.path.join(self.dest, *rel_path.split("/")))
            lines.append(f"{rel_path}: at its final name {placed}; router log "
                         f"{routed.get(rel_path, [])}; pump log:")
            marks = {rel_path.rsplit("/", 1)[-1]}
            marks.update(rid for _, _, rid in routed.get(rel_path, []) if rid)
            lines.extend("    " + line[:300] for line in log if any(m in line for m in marks))
        return "\n".join(lines)

    async def kill(self, kind):
        at = time.monotonic() - self.started
        reported = len(self.collector.ok)
        if kind == "container":
            self.duplicates += await self.consumer_duplicates()
            self.children[-1].stop(signal.SIGKILL)
            await self.start_child()
        elif self.cluster:
            node = await threads.deferToThread(connected_node, self.brokers, "guest")
            node = node or self.brokers.nodes[0]
            await threads.deferToThread(node.kill)
            await task.deferLater(reactor, 1, lambda: None)
            await threads.deferToThread(node.start)
            kind = f"node {node.nodename}"
        else:
            await threads.deferToThread(self.brokers.kill)
            await threads.deferToThread(self.brokers.start)
        self.kills[kind.split()[0]] += 1
        self.log.append((round(at, 1), reported, kind))

    async def ready_counts(self):
        """{queue: messages ready} of the pump's queues (0: none, or no such queue), asked
        over AMQP: milliseconds, where a `rabbitmqctl` is an Erlang VM started (seconds of
        CPU on a busy machine, a minute at worst). Right after a broker kill the asker's own
        connection may still be coming back: its queues then count as not known yet."""
        counts = {}
        for queue in self.queues + self.dead_queues:
            try:
                counts[queue] = await self.asker.queue_depth(queue)
            except NotFound:
                counts[queue] = 0
            except ConnectionLost:
                counts[queue] = "not known: the asker is reconnecting"
        return counts

    async def queues_settled(self, timeout=60):
        """Wait until no message is ready in any pump queue (over AMQP), then until the
        broker's own counts (`rabbitmqctl`) say none is ready or unacknowledged either."""
        node = self.brokers.running_node() if self.cluster else self.brokers
        wanted = self.queues + self.dead_queues
        seen = {}

        async def none_ready():
            seen.update(await self.ready_counts())
            return not any(seen.values())

        async def settled():
            counts = await threads.deferToThread(queue_counts, node)
            seen.update({q: counts.get(q) for q in wanted})
            return all(counts.get(q, (0, 0)) == (0, 0) for q in wanted)

        try:
            await until(none_ready, timeout=timeout, interval=0.2)
            await until(settled, timeout=timeout, interval=1)
        except AssertionError:
            raise AssertionError(f"messages left in the pump's queues: {seen}") from None

    async def check(self, forwarded_once=False):
        """The accounting (see the module docstring); returns a one-line summary."""
        t = self.testcase
        await self.queues_settled()
        await task.deferLater(reactor, 2, lambda: None)  # a second report would be here
        seconds = time.monotonic() - self.started
        await until(lambda: not inflight_files(self.dest), timeout=SWEEP_MIN_AGE + 10,
                    what="the killed containers' temporary files swept")
        self.watcher.stop()
        final, hidden = tree(self.dest)
        t.assertEqual(sorted(final), sorted(self.files))
        wrong = sorted(p for p, data in final.items() if data != self.files[p])
        t.assertEqual(wrong, [], "files at their final names with other bytes")
        t.assertEqual(self.watcher.problems, [])
        counts = self.collector.codes
        t.assertEqual({k: n for k, n in counts.items() if n != 1}, {},
                      f"reports not exactly once; events {self.log}")
        t.assertEqual(set(counts), {(p, 201) for p in self.files})
        logged = collections.defaultdict(set)
        for entry in self.router_log():
            logged[entry["relPath"]].add(entry["code"])
        t.assertEqual({p: c for p, c in logged.items() if c != {201}}, {})
        if forwarded_once:
            t.assertEqual(self.collector.copies, 0)
        self.duplicates += await self.consumer_duplicates()
        child = self.children[-1]
        t.assertEqual(child.stop(), 0, child.tail())
        await self.queues_settled(timeout=30)
        t.assertEqual([p for p in hidden if p.endswith(INFLIGHT_SUFFIX)], [])
        t.assertEqual(hidden, [])
        with open(child.log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for sign in ("had been redelivered: moving it to", "Unhandled error"):
            lines = [line for line in text.splitlines() if sign in line]
            t.assertEqual(lines[:3], [], f"{len(lines)} lines of the pump's log say {sign!r}")
        return (
            f"{len(self.files)} files in {seconds:.1f} s; kills {dict(self.kills)} at "
            f"(s, reported, what) {self.log}; {self.duplicates} duplicate deliveries "
            f"suppressed by the consumers, {self.collector.copies} report copies at the "
            f"source (same report_id)"
        )


def random_events(rng, count, brokers, containers, low=0.1, high=0.9):
    """`brokers` broker kills and `containers` container kills at random reported-file
    counts between `low` and `high` of `count`, in order."""
    kinds = ["broker"] * brokers + ["container"] * containers
    rng.shuffle(kinds)
    points = sorted(rng.sample(range(int(count * low), int(count * high)), len(kinds)))
    return list(zip(kinds, points))
