"""Leases: one holder at a time among processes of any container on one broker, freed when
the holder's connection ends."""

import os

from twisted.trial import unittest

from ion.core.cc.testing import make_container
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Lease, Process
from tests.broker import get_broker


class LeaseScenarios:
    async def containers(self):
        raise NotImplementedError

    async def test_one_holder_then_takeover(self):
        """The first to try holds it; the other does not until the holder's connection ends
        (a dead holder), and then does at its next try."""
        first, second = await self.containers()
        a = await first.spawn(Process)
        b = await second.spawn(Process)
        name = f"test.{os.getpid()}.{id(self)}"
        lease_a, lease_b = Lease(a, name), Lease(b, name)
        self.addCleanup(lease_a.release)
        self.addCleanup(lease_b.release)
        self.assertTrue(await lease_a.try_acquire())
        self.assertFalse(await lease_b.try_acquire())
        self.assertTrue(await lease_a.try_acquire())  # held already
        self.assertFalse(lease_b.held)
        # The holder's connection ends as it does when its process is killed.
        await lease_a._connection.close()
        self.assertTrue(await lease_b.try_acquire())
        await lease_b.release()
        lease_c = Lease(a, name)
        self.addCleanup(lease_c.release)
        self.assertTrue(await lease_c.try_acquire())


class MemoryLeaseTests(LeaseScenarios, unittest.TestCase):
    async def containers(self):
        broker = MemoryBroker()
        return [await make_container(self, memory_broker=broker) for _ in range(2)]


class AmqpLeaseTests(LeaseScenarios, unittest.TestCase):
    timeout = 120

    async def containers(self):
        url = get_broker().url
        sysname = f"lease{os.getpid()}"
        return [await make_container(self, url=url, sysname=sysname) for _ in range(2)]
