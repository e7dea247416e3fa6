"""`ion status` (ion.core.cc.status): the table and --json on both transports, through the
broker (amqp) and through a container's web console (memory://), a poll's last error, and the
rates of a sample."""

import json
import os
import socket

from twisted.internet import threads
from twisted.trial import unittest

from ion.core.cc.status import _state, Sampler, counts, human, status_table
from tests.broker import get_broker
from tests.core.cc.console import RunningPump, drop_queues, get_json
from tests.core.cc.test_cli import run_cli


def consumer_line(stdout):
    (line,) = [line for line in stdout.splitlines() if "pump.consumer.sub" in line]
    return line.split()


class StatusCommandTests(unittest.TestCase):
    async def check(self, pump, *where):
        await pump.deliver("a.txt", "b.txt")
        result = await threads.deferToThread(run_cli, "status", *where, "--timeout", "10")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split()[:4], ["NAME", "KIND", "STATE", "RESTARTS"])
        self.assertTrue(any(line.startswith(pump.c.id) for line in lines), result.stdout)
        name, kind, state, restarts, queued, *_ = consumer_line(result.stdout)
        self.assertEqual((kind, state, restarts, queued), ("Consumer", "ACTIVE", "0", "0"))
        self.assertIn("2 delivered, 0 failed, 0 queued", lines[-1])
        self.assertTrue(lines[-1].startswith("1 container, 4 workers"), lines[-1])
        result = await threads.deferToThread(run_cli, "status", "--json", *where)
        self.assertEqual(result.returncode, 0, result.stderr)
        (status,) = json.loads(result.stdout)
        self.assertEqual(status["container"]["id"], pump.c.id)
        (consumer,) = [w for w in status["workers"] if w["name"] == "pump.consumer.sub"]
        self.assertEqual((consumer["delivered"], consumer["failed"]), (2, 0))

    async def test_through_the_broker(self):
        """On RabbitMQ, `ion status` asks every container of the system (cc_<id> status): one
        row per container and per worker, a total line; --json gives the same data."""
        broker = get_broker()
        tag = f"{os.getpid()}-status"
        await drop_queues(self, broker, tag)
        pump = await RunningPump().start(self, url=broker.url, tag=tag)
        await self.check(pump, "--broker", broker.url, "-s", pump.sysname)

    async def test_through_the_console(self):
        """On memory://, `ion status --web URL` reads the container's console instead."""
        pump = await RunningPump().start(self)
        await self.check(pump, "--web", pump.url)

    async def test_console_unreachable_or_refusing(self):
        """No console at the address: exit 3 and one line saying how to give one; a console
        that wants a token the credentials file does not have: exit 2, one line; with the
        token in the file, the status."""
        result = await threads.deferToThread(run_cli, "status", "--web", "http://127.0.0.1:1")
        self.assertEqual(result.returncode, 3)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("--web URL", result.stderr)
        pump = await RunningPump().start(self, host="0.0.0.0", token="tok3n")
        home = os.path.abspath(self.mktemp())
        path = os.path.join(home, "credentials.conf")
        os.makedirs(home)
        with open(path, "w") as f:
            f.write("")
        os.chmod(path, 0o600)
        where = ["--web", pump.url, "--credentials", path]
        result = await threads.deferToThread(run_cli, "status", *where)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("needs a token", result.stderr)
        with open(path, "w") as f:
            f.write(f"http://console:tok3n@127.0.0.1:{pump.console.port}/\n")
        result = await threads.deferToThread(run_cli, "status", *where)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("pump.consumer.sub", result.stdout)


def closed_port():
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PollErrors:
    """A poll that cannot list its server shows why, and how long ago, in `ion status`
    (table and --json) and in /api/status. C{where(pump)}: how `ion status` reaches it."""

    async def test_poll_cannot_list(self):
        """A poll of a closed port: its row has the last error (503, the URL, the reason)
        and its age, and counts the failed passes."""
        url = f"http://127.0.0.1:{closed_port()}/data/"
        pump = await self.start(polls=[{"name": "dead", "url": url, "interval": 0.2}])
        await pump.sampled(lambda row: row["last_error"] is not None, name="pump.poll.dead")
        status = await get_json(pump.url + "/api/status")
        (row,) = [w for w in status["workers"] if w["name"] == "pump.poll.dead"]
        self.assertEqual((row["kind"], row["state"]), ("PollService", "ACTIVE"))
        self.assertGreater(row["failed"], 0)
        error = row["last_error"]
        self.assertEqual(error["code"], 503)
        self.assertIn(f"cannot list {url}", error["reason"])
        self.assertIn("refused", error["reason"].lower())
        self.assertTrue(0 <= error["age"] < 30, error)
        (healthy,) = [w for w in status["workers"] if w["name"] == "pump.poll.src"]
        self.assertIsNone(healthy["last_error"])
        result = await threads.deferToThread(run_cli, "status", "--json", *self.where(pump))
        self.assertEqual(result.returncode, 0, result.stderr)
        (status,) = json.loads(result.stdout)
        (row,) = [w for w in status["workers"] if w["name"] == "pump.poll.dead"]
        self.assertEqual(row["last_error"]["code"], 503)
        self.assertIn(f"cannot list {url}", row["last_error"]["reason"])
        self.assertTrue(0 <= row["last_error"]["age"] < 30, row)
        result = await threads.deferToThread(run_cli, "status", *self.where(pump))
        self.assertEqual(result.returncode, 0, result.stderr)
        (line,) = [line for line in result.stdout.splitlines() if "pump.poll.dead" in line]
        self.assertIn(f"503 cannot list {url}", line)
        self.assertRegex(line, r"\(\d+ s ago\)$")


class MemoryPollErrorTests(PollErrors, unittest.TestCase):
    async def start(self, **kw):
        return await RunningPump().start(self, **kw)

    def where(self, pump):
        return ["--web", pump.url]


class AmqpPollErrorTests(PollErrors, unittest.TestCase):
    async def start(self, **kw):
        broker = get_broker()
        self.broker = broker
        tag = f"{os.getpid()}-status-poll"
        await drop_queues(self, broker, tag)
        self.pump = await RunningPump().start(self, url=broker.url, tag=tag, **kw)
        return self.pump

    def where(self, pump):
        return ["--broker", self.broker.url, "-s", pump.sysname]


class RatesTests(unittest.SynchronousTestCase):
    def sampler(self, samples):
        sampler = Sampler.__new__(Sampler)
        sampler.samples = samples
        return sampler

    def test_last_minute(self):
        """Rates are taken over the last minute of samples; a restarted worker (its counts
        went down) counts from zero; one sample is not enough to tell."""
        def stats(n, size):
            return {"c": counts({"delivered": n, "bytes_received": size})}

        sampler = self.sampler([(0, stats(0, 0)), (50, stats(100, 1000)),
                                (100, stats(160, 7000)), (110, stats(170, 8000))])
        self.assertEqual(sampler._rates("c"), (70 / 60, 7000 / 60))
        sampler = self.sampler([(0, stats(100, 1000)), (10, stats(5, 50))])
        self.assertEqual(sampler._rates("c"), (0.5, 5.0))
        self.assertEqual(self.sampler([(0, stats(1, 1))])._rates("c"), (None, None))

    def test_table(self):
        """The table has a row per container and per worker, with the last error and its
        age, and one total line; unknown values show as -."""
        worker = {"name": "pump.consumer.x", "kind": "Consumer", "state": "ACTIVE",
                  "restarts": 1, "queued": 7, "files_per_s": 2.5, "bytes_per_s": 2_500_000,
                  "done": 10, "delivered": 10, "failed": 1,
                  "last_error": {"code": 404, "reason": "gone", "age": 12.3}}
        poll = dict(worker, name="pump.poll.y", kind="PollService", queued=None, delivered=None,
                    files_per_s=None, last_error=None, failed=2)
        status = {"container": {"id": "h_1", "restarts": 1, "apps": ["a", "b"], "processes": 9},
                  "workers": [worker, poll]}
        headings, rows, total = status_table([status])
        self.assertEqual(rows[0][:3], ("h_1", "container", "running"))
        self.assertEqual(rows[1], ("  pump.consumer.x", "Consumer", "ACTIVE", 1, 7, "2.5",
                                   "2.5 MB", 10, 1, "404 gone (12 s ago)"))
        self.assertEqual(rows[2][4:6], ("-", "-"))
        self.assertEqual(total, "1 container, 2 workers: 10 delivered, 3 failed, 7 queued, "
                                "2.5 files/s, 2.5 MB/s")
        self.assertEqual((human(None), human(999), human(1234, "B")), ("-", "999.0", "1.2 kB"))

    def test_heartbeat_past_due_is_down(self):
        """A worker whose heartbeat is past due (a second's grace), or whose link is down, is
        shown down; one on time keeps its lifecycle state."""
        on_time = {"heartbeat": {"due": 100.0}, "link": "up"}
        self.assertEqual(_state("ACTIVE", on_time, 100.5), "ACTIVE")
        self.assertEqual(_state("ACTIVE", on_time, 101.5), "down (heartbeat past due)")
        self.assertEqual(_state("ACTIVE", {"link": "down"}, 0), "down (link)")
        self.assertEqual(_state("ACTIVE", {"heartbeat": None}, 1e9), "ACTIVE")
