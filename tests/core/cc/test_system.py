"""Several `twistd -n cc` containers on the private RabbitMQ form one system.

Each container here is a real OS process; the test talks to them from an in-process container
on the same broker and sysname, and through the `ion` command line.
"""

import json
import os
import signal
import subprocess
import sys
import threading

from twisted.internet import defer, threads
from twisted.trial import unittest

from ion.core.cc.testing import make_container
from ion.core.process import Process
from tests.broker import find_rabbitmq_server, get_broker
from tests.waiting import until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ContainerProcess:
    """A `twistd -n cc` child process; its output is collected in `lines`."""

    def __init__(self, url, sysname, *files):
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", "--broker", url, "-s", sysname, *files]
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.lines = []
        self.ready = threading.Event()
        self.container_id = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "running apps" in line:
                self.container_id = line.split("container ")[1].split()[0]
                self.ready.set()

    def wait_ready(self, timeout=30):
        if not self.ready.wait(timeout):
            raise AssertionError("container did not start:\n" + "".join(self.lines[-30:]))

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


class Client(Process):
    pass


def run_cli(*args, timeout=30):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ion", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


class SystemTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.broker = get_broker()
        self.sysname = f"sys{os.getpid()}x{id(self) % 100000}"
        self.children = []

    def tearDown(self):
        for child in self.children:
            child.stop(signal.SIGKILL)

    async def start_containers(self, n, *files):
        children = [ContainerProcess(self.broker.url, self.sysname, *files) for _ in range(n)]
        self.children.extend(children)
        for child in children:
            await threads.deferToThread(child.wait_ready)
        return children

    async def client(self):
        c = await make_container(self, url=self.broker.url, sysname=self.sysname)
        return await c.spawn(Client)

    async def test_service_shared_across_containers(self):
        """A service with instances in two containers shares calls between them; after one
        container is killed with -9, calls keep succeeding on the survivor; the `ion` command
        line reaches the service too."""
        a, b = await self.start_containers(2, "res/apps/hello.app")
        client = await self.client()
        answers = await defer.gatherResults(
            [client.rpc("hello", "hello", f"n{i}", timeout=20) for i in range(1000)]
        )
        by_container = {}
        for text in answers:
            pid = text.rsplit("(from ", 1)[1].rstrip(")!")
            cid = pid.rsplit(".", 1)[0]
            by_container[cid] = by_container.get(cid, 0) + 1
        self.assertEqual(set(by_container), {a.container_id, b.container_id})
        self.assertEqual(sum(by_container.values()), 1000)
        # Both take a real share; how even it is depends on which one works faster (with
        # 1,000 calls at once and a prefetch of 100, 800/200 was seen on a loaded machine).
        self.assertGreaterEqual(min(by_container.values()), 100, by_container)

        result = await threads.deferToThread(
            run_cli, "rpc", "--broker", self.broker.url, "-s", self.sysname,
            "hello", "hello", '"cli"')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Hello, cli!", json.loads(result.stdout))

        a.stop(signal.SIGKILL)
        answers = await defer.gatherResults(
            [client.rpc("hello", "hello", f"m{i}", timeout=20) for i in range(200)]
        )
        self.assertTrue(all(f"(from {b.container_id}." in t for t in answers))

    async def test_three_containers_know_each_other_and_stop_cleanly(self):
        """Three containers see each other through their agents (`ion containers`), remote
        spawn works (`ion spawn --container`), and a clean stop leaves no queues behind."""
        children = await self.start_containers(3)
        ids = sorted(c.container_id for c in children)
        client = await self.client()
        async def all_known():
            table = await client.rpc("ccagent", "containers", timeout=10)
            return set(ids) <= {row["container"] for row in table}

        await until(all_known, 10, f"the agents to list {ids}", interval=0.1)

        result = await threads.deferToThread(
            run_cli, "spawn", "--broker", self.broker.url, "--sysname", self.sysname,
            "ion.apps.hello.service", "--container", ids[1])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(json.loads(result.stdout).startswith(ids[1] + "."))
        reply = await client.rpc("hello", "hello", "x", timeout=10)
        self.assertIn(f"(from {ids[1]}.", reply)

        result = await threads.deferToThread(
            run_cli, "rpc", "--broker", self.broker.url, "--sysname", self.sysname,
            "--timeout", "2", "nobody", "op")
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertIn("nobody", result.stderr)

        # while they run, each container has queues on the broker...
        running = await threads.deferToThread(self.leftover_queues, ids)
        self.assertTrue(all(any(q.startswith(cid + ".") for q in running) for cid in ids), running)
        for child in children:
            self.assertEqual(await threads.deferToThread(child.stop), 0, "".join(child.lines))
        # ...and none once they stopped cleanly
        leftovers = await threads.deferToThread(self.leftover_queues, ids)
        self.assertEqual(leftovers, [])

    @property
    def rabbitmqctl(self):
        # next to the real server script (Debian's wrapper would switch to the rabbitmq user)
        return os.path.join(os.path.dirname(find_rabbitmq_server()), "rabbitmqctl")

    async def test_killed_container_leaves_peer_table(self):
        """With 1 s heartbeats, a container killed with -9 is gone from the other agents'
        tables within 3 heartbeats; `ion containers` and `ion ps` show the system."""
        a, b = await self.start_containers(2, "-D", "ion.core.cc.agent:heartbeat_interval=1")
        client = await self.client()

        async def table():
            return {row["container"] for row in await client.rpc("ccagent", "containers")}

        async def both_known():
            return {a.container_id, b.container_id} <= await table()

        await until(both_known, 10, "both containers in the peer table", interval=0.1)
        cli = ["--broker", self.broker.url, "--sysname", self.sysname]
        result = await threads.deferToThread(run_cli, "containers", "--json", *cli)
        self.assertEqual(result.returncode, 0, result.stderr)
        rows = json.loads(result.stdout)
        self.assertEqual({row["container"] for row in rows}, {a.container_id, b.container_id})
        for row in rows:
            self.assertEqual(set(row["apps"]), {"ioncore", "ccagent"}, row)
        result = await threads.deferToThread(run_cli, "containers", *cli)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["CONTAINER", "HOST", "PID", "UP", "HEARTBEAT", "APPS"])
        self.assertEqual(lines[-1], "2 containers")
        for cid in (a.container_id, b.container_id):
            (line,) = [line for line in lines if line.startswith(cid + " ")]
            self.assertTrue(line.endswith("ioncore, ccagent"), line)
        result = await threads.deferToThread(run_cli, "ps", *cli, b.container_id)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["CONTAINER", "PID", "NAME", "CLASS", "STATE", "PARENT"])
        agent = [line.split() for line in lines if "ContainerAgent" in line]
        self.assertEqual(len(agent), 1, lines)
        self.assertEqual(agent[0][0], b.container_id)
        self.assertEqual(agent[0][4], "ACTIVE")
        result = await threads.deferToThread(run_cli, "ps", "--json", *cli, b.container_id)
        self.assertIn("ContainerAgent", [row[2] for row in json.loads(result.stdout)])

        a.stop(signal.SIGKILL)
        async def gone():
            return a.container_id not in await table()

        await until(gone, 3 * 1 + 2.5, "the killed container to leave the table", interval=0.2)
        self.assertEqual(await table(), {b.container_id})

    async def test_last_container_removes_exchanges(self):
        """The system's exchanges stay while a container of the system runs and are gone once
        the last one stopped cleanly."""
        a, b = await self.start_containers(2)
        names = {f"ion.{self.sysname}", f"ion.{self.sysname}.trace"}
        self.assertEqual(names & await threads.deferToThread(self.exchanges), names)
        self.assertEqual(await threads.deferToThread(a.stop), 0, "".join(a.lines))
        self.assertEqual(names & await threads.deferToThread(self.exchanges), names)
        self.assertEqual(await threads.deferToThread(b.stop), 0, "".join(b.lines))
        self.assertEqual(names & await threads.deferToThread(self.exchanges), set())

    def exchanges(self):
        return set(self.rabbitmqctl_list("list_exchanges", "name"))

    def leftover_queues(self, ids):
        names = self.rabbitmqctl_list("list_queues", "name")
        return [n for n in names if any(n.startswith(cid + ".") for cid in ids)
                or n.startswith(self.sysname + ".hello")]

    def rabbitmqctl_list(self, *command):
        out = subprocess.run(
            [self.rabbitmqctl, "-n", self.broker.nodename, "-q", *command],
            env=self.broker._environment(), capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise AssertionError(f"rabbitmqctl failed: {out.stderr}")
        return out.stdout.split()
