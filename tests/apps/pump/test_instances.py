"""Instances: a subscription with `instances: 2` runs two OS processes on the private RabbitMQ
that share its durable queue and its duplicate cache; a killed one is restarted and what it had
in hand goes to the others; they stop with their container, however it ends."""

import collections
import itertools
import os
import random
import signal
import subprocess

from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from ion.apps.pump.app import plan
from ion.core.cc.status import Sampler
from ion.core.cc.testing import make_container
from ion.core.process import Supervisor
from tests.apps.pump.fixtures import (
    Collector,
    delete_queues,
    file_url,
    notice_fields,
    topic,
    until,
    write_source,
)
from tests.apps.pump.test_consumer import until_queue
from tests.apps.pump.test_crash import PumpChild, tree, write_pump_app
from tests.broker import get_broker

_tags = itertools.count(1)


def pump_kwargs(tag, base, credentials, router="router"):
    return {
        "user": tag,
        "subscriptions": [{
            "name": "sub",
            "instances": 2,
            "exchange": f"xpublic-{tag}",
            "report_exchange": f"xreport-{tag}",
            "directory": os.path.join(base, "dest"),
            "state_dir": os.path.join(base, "state", "sub"),
            "parallel": 4,
            "prefetch": 20,
            "transfer": {"credentials": credentials},
        }],
        "transfer": {"workers": 1, "credentials": credentials},
        "ingest": {"exchange": f"xpublic-{tag}", "report_exchange": f"xreport-{tag}"},
        "report_router": {"exchange": f"xreport-{tag}",
                          "state_dir": os.path.join(base, "state", router)},
        "progress": {"interval": 3600},
    }


def instance_pids(parent_pid):
    """OS pids of the instance processes whose parent is parent_pid."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(parent_pid)],
                         capture_output=True, text=True).stdout
    return sorted(int(line.split()[0]) for line in out.splitlines()
                  if "ion.core.cc.instance" in line)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent has not reaped it yet.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


class Setup:
    def prepare(self, tag):
        self.tag = tag
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        os.makedirs(self.src)
        self.credentials = os.path.join(self.base, "credentials.conf")
        with open(self.credentials, "w"):
            pass
        os.chmod(self.credentials, 0o600)
        self.queues = [f"q_{tag}.{tag}.consumer.sub", f"q_xreport-{tag}.report_router",
                       f"q_{tag}.{tag}.report_router.sent", f"q_{tag}.ingest.xs_{tag}"]

    def files(self, n, prefix, seed):
        rng = random.Random(seed)
        files = {f"{prefix}/d{i % 5}/f{i:04d}.dat": rng.randbytes(rng.randrange(100, 4000))
                 for i in range(n)}
        for rel_path, data in files.items():
            write_source(self.src, rel_path, data)
        return files


class InstancesTests(Setup, unittest.TestCase):
    timeout = 300
    files_each = 400

    async def test_split_kill_restart(self):
        """Two instances each deliver at least 10% of the files; kill -9 of one mid-flow: it is
        restarted, what it held is delivered by the others, every file once, byte-exact, one
        201 report each; each instance is a row of the status."""
        broker = get_broker()
        tag = f"inst{os.getpid()}x{next(_tags)}"
        self.prepare(tag)
        await delete_queues(broker.url, self.queues)
        self.addCleanup(delete_queues, broker.url, self.queues)
        c = await make_container(self, url=broker.url, sysname=tag)
        collector = await c.spawn(Collector)
        await collector.listen(f"xr_{tag}")
        sup = await c.spawn(Supervisor, name="pump-sup", args=plan(
            "pump", os_instances=True, **pump_kwargs(tag, self.base, self.credentials)))
        proxies = [sup.child("consumer.sub.1"), sup.child("consumer.sub.2")]
        pids = [p.os_pid for p in proxies]
        self.assertEqual(len(set(pids)), 2)
        self.assertNotIn(os.getpid(), pids)

        def delivered():
            return collections.Counter(
                r["relPath"] for r in collector.bodies(f"xr_{tag}") if r["report"]["code"] == 201)

        async def post(files):
            for rel_path, data in files.items():
                fields = notice_fields(file_url(self.src), rel_path, data, source=tag)
                await collector.post(fields, f"xpublic-{tag}", topic(rel_path))

        first = self.files(self.files_each, "a", 1)
        await post(first)
        await until(lambda: set(delivered()) >= set(first), timeout=120, what="first batch")
        stats = []

        async def counted():
            # A report may arrive before its consumer has counted the file.
            stats[:] = [await collector.rpc(p.pid, "stats") for p in proxies]
            return sum(s["delivered"] for s in stats) == self.files_each

        await until(counted, timeout=10, what=lambda _: f"the instances' counts, {stats}")
        for s in stats:
            self.assertGreaterEqual(s["delivered"], self.files_each // 10, stats)
            self.assertEqual(s["kind"], "Consumer")
        self.assertEqual(sorted(s["os_pid"] for s in stats), sorted(pids))

        # Each instance is its own row of the status.
        sampler = Sampler(collector)
        await sampler.sample()
        rows = {w["name"]: w for w in sampler.status()["workers"]}
        for name in ("pump.consumer.sub.1", "pump.consumer.sub.2"):
            self.assertEqual(rows[name]["kind"], "Consumer")
            self.assertGreaterEqual(rows[name]["done"], self.files_each // 10)

        second = self.files(self.files_each, "b", 2)
        await post(second)
        await until(lambda: len(set(delivered()) & set(second)) >= self.files_each // 10,
                    timeout=60, what="some of the second batch")
        os.kill(pids[0], signal.SIGKILL)
        await until(lambda: sup.restarts["consumer.sub.1"] == 1
                    and sup.child("consumer.sub.1") is not None
                    and sup.child("consumer.sub.1").state == "ACTIVE",
                    timeout=60, what="the killed instance restarted")
        new_pid = sup.child("consumer.sub.1").os_pid
        self.assertNotIn(new_pid, pids)
        self.assertFalse(alive(pids[0]))
        await until(lambda: set(delivered()) >= set(second), timeout=120, what="second batch")
        for queue in self.queues[:3]:
            await until_queue(broker, queue, lambda ready, unacked: (ready, unacked) == (0, 0))
        await task.deferLater(reactor, 1, lambda: None)
        counts = delivered()
        self.assertEqual({k: n for k, n in counts.items() if n != 1}, {})
        files = dict(first, **second)
        self.assertEqual(set(counts), set(files))
        received = tree(os.path.join(self.base, "dest"))
        final = {p: d for p, d in received.items() if not os.path.basename(p).startswith(".")}
        self.assertEqual(sorted(final), sorted(files))
        self.assertEqual([p for p, d in final.items() if d != files[p]], [])

        # Stopping the supervisor stops the OS processes.
        await sup.terminate()
        await until(lambda: not any(alive(p) for p in (new_pid, pids[1])), timeout=30,
                    what="the instance processes to end")


class InstanceProcessTests(Setup, unittest.TestCase):
    timeout = 300

    async def test_no_orphans_and_ownership(self):
        """A container whose instance directories are owned by a live one refuses to start
        (exit 2, naming the directory and the owner); kill -9 of a container ends its
        instance processes; their log lines reached the container's log, named."""
        broker = get_broker()
        tag = f"orph{os.getpid()}x{next(_tags)}"
        self.prepare(tag)
        await delete_queues(broker.url, self.queues)
        self.addCleanup(delete_queues, broker.url, self.queues)
        app = write_pump_app(os.path.join(self.base, "pump.app"),
                             pump_kwargs(tag, self.base, self.credentials), "instances")
        children = []
        self.addCleanup(lambda: [c.stop(signal.SIGKILL) for c in children])
        first = PumpChild(broker.url, tag, app, self.base, os.path.join(self.base, "1.log"))
        children.append(first)
        await threads.deferToThread(first.wait_ready)
        pids = await until(lambda: len(instance_pids(first.proc.pid)) == 2
                           and instance_pids(first.proc.pid), timeout=30,
                           what="two instance processes")

        # The same subscription's state from another container: refused, one line, exit 2.
        other = write_pump_app(os.path.join(self.base, "other.app"),
                               pump_kwargs(tag, self.base, self.credentials, router="router2"),
                               "instances, again")
        second = PumpChild(broker.url, tag, other, self.base, os.path.join(self.base, "2.log"))
        children.append(second)
        code = await threads.deferToThread(second.proc.wait, 120)
        self.assertEqual(code, 2, second.tail())
        self.assertIn(f"state directory {os.path.join(self.base, 'state', 'sub.1')} is in use",
                      second.tail())
        self.assertRegex(second.tail(), r"in use by process (%s|%s)" % tuple(pids))
        self.assertNotIn("Traceback", second.tail())

        first.stop(signal.SIGKILL)
        await until(lambda: not any(alive(p) for p in pids), timeout=30,
                    what="the instance processes to end with their container")
        with open(first.log_path) as f:
            log = f.read()
        self.assertIn("[pump.consumer.sub.1]", log)


class PollInstancesTests(Setup, unittest.TestCase):
    timeout = 300

    async def test_single_active_failover(self):
        """A poll with two OS instances: one polls, the other stands by; kill -9 of the active
        one: the other announces the new files within two intervals (plus the time to list),
        and no file is announced twice."""
        broker = get_broker()
        tag = f"pinst{os.getpid()}x{next(_tags)}"
        self.prepare(tag)
        self.queues.append(f"lease.{tag}.poll.{tag}.src")
        await delete_queues(broker.url, self.queues)
        self.addCleanup(delete_queues, broker.url, self.queues)
        c = await make_container(self, url=broker.url, sysname=tag)
        collector = await c.spawn(Collector)
        await collector.listen(f"xs_{tag}")
        kwargs = pump_kwargs(tag, self.base, self.credentials)
        del kwargs["subscriptions"]
        kwargs["polls"] = [{"name": "src", "url": file_url(self.src), "interval": 1,
                            "instances": 2, "state_dir": os.path.join(self.base, "state", "src")}]
        sup = await c.spawn(Supervisor, name="pump-sup", args=plan("pump", os_instances=True,
                                                                  **kwargs))
        proxies = [sup.child("poll.src.1"), sup.child("poll.src.2")]

        def announced():
            return collections.Counter(b["relPath"] for b in collector.bodies(f"xs_{tag}"))

        first = self.files(20, "a", 3)
        await until(lambda: set(announced()) >= set(first), timeout=60, what="first files")
        stats = [await collector.rpc(p.pid, "stats") for p in proxies]
        active = [i for i, s in enumerate(stats) if s["passes"] > 0]
        self.assertEqual(len(active), 1, stats)
        standby = stats[1 - active[0]]
        self.assertGreater(standby["standby"], 0, stats)
        self.assertEqual(standby["passes"], 0, stats)

        os.kill(proxies[active[0]].os_pid, signal.SIGKILL)
        killed = reactor.seconds()
        second = self.files(10, "b", 4)
        await until(lambda: set(announced()) >= set(first) | set(second), timeout=60,
                    what="the files written after the kill")
        # Two intervals, and the time a pass takes to list and publish on a loaded machine.
        self.assertLess(reactor.seconds() - killed, 2 * 1 + 8)
        await task.deferLater(reactor, 2.5, lambda: None)
        self.assertEqual({k: n for k, n in announced().items() if n != 1}, {})
        self.assertEqual(set(announced()), set(first) | set(second))
        await sup.terminate()
