"""Exactly once through a real crash: the pump in a `twistd -n cc` child process on the private
RabbitMQ is killed with -9 in the middle of a batch and started again on the same state
directories and durable queues.

What a source relies on, checked after the restart: every announced file is at its final name
with the announced bytes (never a partial one), the source's `xr_` exchange carries exactly one
201 report per file, and the pump's queues are empty with nothing left unacknowledged (read
with the real `rabbitmqctl`).
"""

import collections
import itertools
import os
import random
import signal
import subprocess
import sys
import threading

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX
from ion.core.cc.testing import make_container
from tests.apps.pump.fixtures import (
    Collector,
    delete_queues,
    file_url,
    notice_fields,
    topic,
    until,
    write_source,
)
from tests.apps.pump.test_consumer import rabbitmq_queues, until_queue
from tests.broker import get_broker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_tags = itertools.count(1)


class PumpChild:
    """`twistd -n cc <app>` as a child process; its output goes to `log_path`."""

    def __init__(self, url, sysname, app_path, cwd, log_path, env=None):
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", "--broker", url, "-s", sysname, app_path]
        self.log_path = log_path
        self._log = open(log_path, "a")
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if "running apps" in line:
                self.ready.set()

    def tail(self, lines=40):
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def wait_ready(self, timeout=60):
        if not self.ready.wait(timeout):
            raise AssertionError(f"the pump did not start:\n{self.tail()}")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


def write_app(path, tag, base, credentials):
    """A pump .app file: one subscription on the test's own exchanges, everything kept under
    `base`, the queues named after `tag`."""
    kwargs = {
        "user": tag,
        "subscriptions": [
            {
                "name": "sub",
                "exchange": f"xpublic-{tag}",
                "report_exchange": f"xreport-{tag}",
                "directory": os.path.join(base, "dest"),
                "state_dir": os.path.join(base, "state", "consumer"),
                "parallel": 4,
            }
        ],
        "transfer": {"workers": 2, "credentials": credentials},
        "ingest": {"exchange": f"xpublic-{tag}", "report_exchange": f"xreport-{tag}"},
        "report_router": {
            "exchange": f"xreport-{tag}",
            "state_dir": os.path.join(base, "state", "router"),
        },
    }
    return write_pump_app(path, kwargs, "the pump under a kill -9 test")


def write_pump_app(path, kwargs, description):
    """Write a pump .app file running `ion.apps.pump.app` with `kwargs`; returns `path`."""
    app = {
        "type": "application",
        "name": "pump",
        "description": description,
        "version": "0.1",
        "mod": ("ion.apps.pump.app", [], kwargs),
        "applications": ["ioncore"],
        "registered": [],
    }
    with open(path, "w") as f:
        f.write(repr(app) + "\n")
    return path


def tree(root):
    """{path relative to root: bytes} of every file under root."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
    return found


class CrashTests(unittest.TestCase):
    timeout = 300
    files = 200

    async def test_kill_9_mid_batch(self):
        """kill -9 of the whole pump (consumer, transfer service, report router) after some
        reports arrived, then a restart on the same state and queues: every file delivered
        once with the right bytes, one 201 report per file, queues empty and settled."""
        broker = get_broker()
        tag = f"crash{os.getpid()}x{next(_tags)}"
        base = os.path.abspath(self.mktemp())
        src = os.path.join(base, "src")
        os.makedirs(src)
        credentials = os.path.join(base, "credentials.conf")
        with open(credentials, "w"):
            pass
        os.chmod(credentials, 0o600)
        app_path = write_app(os.path.join(base, "crash.app"), tag, base, credentials)
        rng = random.Random(9)
        files = {
            f"d{i % 10}/sub{i % 3}/f{i:03d}.dat": rng.randbytes(rng.randrange(20_000, 120_000))
            for i in range(self.files)
        }
        for rel_path, data in files.items():
            write_source(src, rel_path, data)

        consumer_queue = f"q_{tag}.{tag}.consumer.sub"  # user and sysname both tag
        router_queue = f"q_xreport-{tag}.report_router"
        sent_queue = f"q_{tag}.{tag}.report_router.sent"
        queues = [
            consumer_queue,
            router_queue,
            sent_queue,
            f"q_{tag}.ingest.xs_{tag}",
        ]

        async def drop_queues():
            await delete_queues(broker.url, queues)

        await drop_queues()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(drop_queues()))

        children = []

        def start_child():
            child = PumpChild(broker.url, tag, app_path, base, os.path.join(base, "pump.log"))
            children.append(child)
            return threads.deferToThread(child.wait_ready)

        self.addCleanup(lambda: [c.stop(signal.SIGKILL) for c in children])

        client = await make_container(self, url=broker.url, sysname=f"{tag}-client")
        collector = await client.spawn(Collector)
        await collector.listen(f"xr_{tag}")

        def reports():
            return collector.bodies(f"xr_{tag}")

        def delivered():
            return {r["relPath"] for r in reports() if r["report"]["code"] == 201}

        await start_child()
        base_url = file_url(src)
        for rel_path, data in files.items():
            fields = notice_fields(base_url, rel_path, data, source=tag)
            await collector.post(fields, f"xpublic-{tag}", topic(rel_path))

        # Mid-batch: some reports are in, most files are still to come.
        await until(lambda: len(reports()) >= self.files // 10, timeout=60, what="first reports")
        children[0].stop(signal.SIGKILL)
        at_kill = len(reports())
        self.assertLess(at_kill, self.files, "the batch was over before the kill")
        await self.until_queue(broker, consumer_queue, lambda ready, unacked: unacked == 0)
        ready, _ = (await threads.deferToThread(rabbitmq_queues, broker))[consumer_queue]
        self.assertGreater(ready, 0, "nothing was left to redeliver after the kill")

        await start_child()
        await until(lambda: delivered() == set(files), timeout=120, what="every file reported")
        for queue in (consumer_queue, router_queue, sent_queue):
            await self.until_queue(broker, queue, lambda ready, unacked: (ready, unacked) == (0, 0))
        # Anything still on its way (a second report) has had the time to arrive.
        await task.deferLater(reactor, 2, lambda: None)

        counts = collections.Counter((r["relPath"], r["report"]["code"]) for r in reports())
        repeated = {key: n for key, n in counts.items() if n != 1}
        self.assertEqual(repeated, {}, f"reports not exactly once ({at_kill} before the kill)")
        self.assertEqual(set(counts), {(rel_path, 201) for rel_path in files})

        received = tree(os.path.join(base, "dest"))
        final = {p: data for p, data in received.items() if not p.endswith(INFLIGHT_SUFFIX)}
        self.assertEqual(sorted(final), sorted(files))
        wrong = [path for path, data in final.items() if data != files[path]]
        self.assertEqual(wrong, [], "files at their final names with other bytes")
        # Transfers cut short by the kill leave hidden temporary files, never a final name.
        for path in set(received) - set(final):
            self.assertTrue(os.path.basename(path).startswith("."), path)

        self.assertEqual(children[1].stop(), 0, children[1].tail())
        counts = await threads.deferToThread(rabbitmq_queues, broker)
        self.assertEqual(counts.get(consumer_queue), (0, 0))
        self.assertEqual(counts.get(router_queue), (0, 0))

    async def until_queue(self, broker, queue, predicate, timeout=30):
        """Wait until predicate(ready, unacked) holds for `queue` (read with rabbitmqctl)."""
        return await until_queue(broker, queue, predicate, timeout)
