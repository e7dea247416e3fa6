"""The container as twistd runs it: a tree of services, started in order, stopped in reverse."""

import os

from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from ion.apps.hello.service import HelloService
from ion.core.cc import heap, tap
from ion.core.cc.service import AppsService, ContainerService, ProcessesService, TransportService

RES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))),
    "res",
)


class ServiceTreeTests(unittest.TestCase):
    async def boot(self):
        """A ContainerService running the hello app on memory://, booted as twistd would."""
        record = os.path.abspath(self.mktemp())
        opts = tap.Options()
        opts.parseOptions([
            "--res", RES, "--no-shell",
            "-D", f"ion.core.messaging:memory_run_record={record!r}", "hello",
        ])
        service = ContainerService(opts, reactor)
        # Running, as after twistd's startService, without its signal handlers in this process.
        Service.startService(service)
        await service.boot()
        return service

    async def test_heap_settled_once_booted(self):
        """A container booted as twistd boots it settles its heap (L{heap.settle}) once, when
        its apps run: before, the boot's objects would still be in the making."""
        running = []
        self.patch(heap, "settle", lambda: running.append(list(service.container.apps.running)))
        opts = tap.Options()
        opts.parseOptions(["--res", RES, "--no-shell", "hello"])
        service = ContainerService(opts, reactor)
        Service.startService(service)
        self.addCleanup(service.stopService)
        service._boot()
        while not running:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(running), 1)
        self.assertIn("hello", running[0])

    async def test_children_start_in_order(self):
        """Booted, the tree is the connection, the processes, then the apps, all running."""
        service = await self.boot()
        self.addCleanup(service.stopService)
        self.assertEqual(
            [type(child) for child in service],
            [TransportService, ProcessesService, AppsService],
        )
        self.assertTrue(all(child.running for child in service))
        self.assertIn("hello", service.container.apps.running)

    async def test_connection_closes_after_apps_and_processes(self):
        """An app stopping slowly still has its connection: the apps stop first, then the
        processes no app owns, and only then does the connection close."""
        service = await self.boot()
        container = service.container
        events = []
        released = defer.Deferred()
        stop_all = container.apps.stop_all

        async def slow_stop_all():
            await released
            await stop_all()
            events.append("apps stopped")

        self.patch(container.apps, "stop_all", slow_stop_all)
        stray = await container.spawn(HelloService, name="stray")
        terminate = stray.terminate

        async def recorded_terminate():
            await terminate()
            events.append("stray stopped")

        self.patch(stray, "terminate", recorded_terminate)
        close = container.transport.close

        def recorded_close():
            events.append("connection closed")
            return close()

        self.patch(container.transport, "close", recorded_close)
        stopped = service.stopService()
        self.assertEqual(events, [])
        released.callback(None)
        await stopped
        self.assertEqual(events, ["apps stopped", "stray stopped", "connection closed"])
        self.assertFalse(container.running)
