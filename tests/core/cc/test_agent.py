"""Container agents: containers of one system see each other, spawn remotely, drop the dead."""

from twisted.internet import task
from twisted.trial import unittest

from ion.core.cc.agent import ContainerAgent
from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Process, RemoteError
from tests.waiting import quiet, until


class Client(Process):
    pass


class AgentTests(unittest.TestCase):
    async def system(self, n=2):
        self.clock = task.Clock()
        broker = MemoryBroker()
        containers = []
        for _ in range(n):
            c = await make_container(self, memory_broker=broker, sysname="agents", clock=self.clock)
            await c.spawn(ContainerAgent)
            containers.append(c)
        return containers

    def agent(self, container):
        return next(p for p in container.registry if isinstance(p, ContainerAgent))

    async def test_containers_see_each_other(self):
        """Each agent's table lists every container of the system, itself included."""
        a, b = await self.system(2)
        await until(lambda: len(self.agent(a).peers) == 2 and len(self.agent(b).peers) == 2)
        client = await a.spawn(Client)
        table = await client.rpc("ccagent", "containers")
        self.assertEqual(sorted(row["container"] for row in table), sorted([a.id, b.id]))

    async def test_remote_spawn(self):
        """spawn through a container's agent starts the process in that container."""
        a, b = await self.system(2)
        client = await a.spawn(Client)
        pid = await client.rpc(f"ccagent_{b.id}", "spawn", {"module": "ion.apps.hello.service"})
        self.assertTrue(pid.startswith(b.id + "."))
        self.assertIn(pid, [row[0] for row in b.ps()])
        self.assertIn("Hello, Ann", await client.rpc("hello", "hello", "Ann"))
        e = await self.assertFailure(
            client.rpc(f"ccagent_{b.id}", "spawn", {"module": "no.such"}), RemoteError)
        self.assertEqual(e.code, 422)

    async def test_silent_peer_dropped_after_three_heartbeats(self):
        """A container that stops answering (no leave message) is dropped after 3 missed
        heartbeats; one that stops cleanly leaves at once."""
        a, b, c = await self.system(3)
        agent_a = self.agent(a)
        await until(lambda: len(agent_a.peers) == 3)
        # b dies without a word: its heartbeats stop and its queues vanish.
        self.agent(b)._beat.stop()
        await b.transport.close()
        for _ in range(3):
            self.clock.advance(5)
            await quiet()  # heartbeats get delivered
        self.assertIn(b.id, agent_a.peers)
        self.clock.advance(5.1)
        await until(lambda: b.id not in agent_a.peers)
        self.assertIn(c.id, agent_a.peers)
        await c.stop()
        await until(lambda: c.id not in agent_a.peers)

    async def test_shell_helpers(self):
        """In the shell, containers() tables the system and spawn(..., container=id) spawns
        in that container."""
        from ion.core.cc.shell import ShellHelpers

        a, b = await self.system(2)
        await until(lambda: len(self.agent(a).peers) == 2)
        printed = []
        helpers = ShellHelpers(a, printed.append)
        pending = helpers.containers()
        await pending.when_done()
        self.assertIn(b.id, printed[-1])
        self.assertTrue(printed[-1].startswith("CONTAINER"))
        pending = helpers.spawn("ion.apps.hello.service", container=b.id)
        await pending.when_done()
        self.assertTrue(pending.result.startswith(b.id + "."))
        self.assertIn(pending.result, [row[0] for row in b.ps()])
