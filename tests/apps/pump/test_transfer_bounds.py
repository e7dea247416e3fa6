"""
Transfers bounded by the pump, not by the sender: C{max_size}, C{min_rate}, slots per server
that cannot starve the other servers, and idle timers that run from connect to completion for
every scheme (servers that accept a connection and never speak).
"""

import os
import time

from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ion.apps.pump import transfer
from ion.apps.pump.args import MAX_SIZE, TransferSettings
from ion.apps.pump.transfer import Timeouts, TooLarge, TransferTimeout
from ion.apps.pump.transfer.limits import HostLimiter, MinRate, RateWatch
from ion.apps.pump.transfer.worker import Transfers
from tests.apps.pump.hostile_servers import start_hostile_http, start_silent
from tests.apps.pump.servers import leftovers, settle, start_http, write_file

# How long a test waits for a transfer that should end by itself before calling it hung.
HUNG = 8


def bounded(coro):
    """C{coro} as a Deferred that fails with C{TimeoutError} after C{HUNG} s, so a transfer
    that is never cut fails its test instead of hanging it."""
    d = Deferred.fromCoroutine(coro)
    d.addTimeout(HUNG, reactor)
    return d


class SilentServerTests(TestCase):
    """
    A server that accepts the connection and never sends a byte (no FTP greeting, no SSH
    banner, no HTTP response) fails the transfer with a 504 within connect plus idle seconds.
    """

    timeouts = Timeouts(connect=0.5, idle=0.5)

    def setUp(self):
        self.silent = start_silent(self)
        self.addCleanup(settle)
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(self.local)

    async def check(self, url):
        start = time.monotonic()
        with self.assertRaises(TransferTimeout) as caught:
            await bounded(
                transfer.get(
                    reactor, url, os.path.join(self.local, "out"), timeouts=self.timeouts
                )
            )
        elapsed = time.monotonic() - start
        self.assertTrue(0.9 <= elapsed < 2.5, elapsed)
        self.assertEqual((caught.exception.code, caught.exception.transient), (504, True))
        self.assertEqual(os.listdir(self.local), [])

    async def test_ftp(self):
        """
        ftp: the transfer used to wait for ever (the login commands were never failed when
        the idle timer cut the connection).
        """
        await self.check(f"ftp://carol:pw@{self.silent.address}/data.bin")

    async def test_sftp(self):
        await self.check(f"sftp://bob:pw@{self.silent.address}/data.bin")

    async def test_http(self):
        await self.check(f"http://{self.silent.address}/data.bin")


class MaxSizeTests(TestCase):
    """
    C{max_size} bounds a get whatever the notice or the server announce: over it, the
    transfer is refused before connecting, or cut as soon as it goes past, with a permanent
    L{TooLarge} (413); more bytes than announced are refused the same way.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.local)
        write_file(os.path.join(self.root, "small.bin"), b"s" * 1000)
        self.server = start_hostile_http(self, self.root)
        self.addCleanup(settle)
        self.dest = os.path.join(self.local, "out.bin")

    def get(self, path, **kwargs):
        return bounded(transfer.get(reactor, self.server.url + path, self.dest, **kwargs))

    def assertTooLarge(self, caught, text):
        self.assertEqual((caught.exception.code, caught.exception.transient), (413, False))
        self.assertIn(text, str(caught.exception))
        self.assertEqual(os.listdir(self.local), [])

    async def test_announcedOverMaxSize(self):
        """
        A notice announcing 1 TB is refused without a connection to the server.
        """
        with self.assertRaises(TooLarge) as caught:
            await self.get("/files/small.bin", expected_size=2**40, max_size=10**6)
        self.assertTooLarge(caught, "over max_size 1000000")
        self.assertEqual(self.server.site.accepted, 0)

    async def test_serverAnnouncesOverMaxSize(self):
        """
        A Content-Length over max_size stops the transfer before its body.
        """
        with self.assertRaises(TooLarge) as caught:
            await self.get("/generated/5000000", max_size=100_000)
        self.assertTooLarge(caught, "over max_size 100000")

    async def test_endlessBodyCutAtMaxSize(self):
        """
        Without any announced size, an endless body is cut once it passes max_size; the
        server is left with a closed connection.
        """
        with self.assertRaises(TooLarge) as caught:
            await self.get("/endless", max_size=100_000)
        self.assertTooLarge(caught, "more than the 100000 bytes max_size arrived")
        await settle()
        self.assertEqual(self.server.site.connections, set())
        # Cut at once: what the server sent is max_size plus what the sockets buffer.
        self.assertLess(self.server.endless.sent, 20 * 1024 * 1024)

    async def test_moreThanAnnounced(self):
        """
        More bytes than the caller announced is a permanent 413 too (it used to be a
        transient 499, downloaded again and again).
        """
        with self.assertRaises(TooLarge) as caught:
            await self.get("/endless", expected_size=1000, max_size=10**6)
        self.assertTooLarge(caught, "more than the 1000 bytes announced arrived")

    async def test_withinMaxSize(self):
        """
        A file of max_size bytes exactly arrives.
        """
        result = await self.get("/files/small.bin", max_size=1000)
        self.assertEqual(result.size, 1000)

    async def test_transfersSetting(self):
        """
        A process's C{Transfers} apply their C{max_size} to every get.
        """
        transfers = Transfers(reactor, {"max_size": 500})
        self.addCleanup(lambda: Deferred.fromCoroutine(transfers.close()))
        with self.assertRaises(TooLarge):
            await bounded(transfers.get(self.server.url + "/files/small.bin", self.dest))
        self.assertEqual(leftovers(self.local), [])


class MinRateTests(TestCase):
    """
    A get receiving fewer than C{bytes_per_s * window} bytes in the last C{window} seconds
    fails as too slow (504, transient), even though bytes keep coming often enough for the
    idle timeout.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.local)
        write_file(os.path.join(self.root, "small.bin"), b"s" * 1000)
        # 10 bytes a second: a byte every 0.1 s keeps the idle timer (0.5 s) happy.
        self.server = start_hostile_http(self, self.root, trickle_interval=0.1)
        self.addCleanup(settle)
        self.dest = os.path.join(self.local, "out.bin")

    def transfers(self, min_rate):
        transfers = Transfers(
            reactor, {"min_rate": min_rate, "timeouts": {"connect": 1, "idle": 0.5}}
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(transfers.close()))
        return transfers

    async def test_tooSlow(self):
        """
        1 byte every 0.1 s against a minimum of 100 bytes/s over 1 s: cut after about a
        second, with how little arrived in the message.
        """
        transfers = self.transfers({"bytes_per_s": 100, "window": 1})
        start = time.monotonic()
        with self.assertRaises(TransferTimeout) as caught:
            await bounded(transfers.get(self.server.url + "/trickle/1000", self.dest))
        elapsed = time.monotonic() - start
        self.assertTrue(1 <= elapsed < 2.5, elapsed)
        self.assertEqual((caught.exception.code, caught.exception.transient), (504, True))
        self.assertRegex(str(caught.exception), r"too slow: \d+ bytes in 1 s")
        self.assertEqual(os.listdir(self.local), [])
        await settle()
        self.assertEqual(self.server.site.connections, set())

    async def test_fastEnough(self):
        """
        A transfer at the minimum rate or above is not cut, and neither is one with the
        minimum rate turned off.
        """
        transfers = self.transfers({"bytes_per_s": 5, "window": 0.4})
        result = await bounded(transfers.get(self.server.url + "/trickle/10", self.dest))
        self.assertEqual(result.size, 10)
        result = await bounded(
            self.transfers(0).get(self.server.url + "/trickle/12", self.dest)
        )
        self.assertEqual(result.size, 12)


class RateWatchTests(SynchronousTestCase):
    """
    L{RateWatch} on a clock: the growth over the last window, looked at every quarter window.
    """

    def watch(self, rate=1024, window=60):
        self.clock = task.Clock()
        self.count = 0
        self.expired = []
        watch = RateWatch(
            self.clock, MinRate(rate, window), lambda: self.count, lambda: self.expired.append(1)
        )
        return watch

    def test_trickleCutAfterOneWindow(self):
        """
        A byte every 10 s against 1 KiB/s over 60 s is cut at 60 s, not at a transfer
        timeout of 600 s.
        """
        watch = self.watch()
        for second in range(59):
            if second % 10 == 0:
                self.count += 1
            self.clock.advance(1)
        self.assertEqual(self.expired, [])
        self.clock.advance(1)
        self.assertEqual((self.expired, watch.slow), ([1], 6))
        self.clock.advance(600)
        self.assertEqual(self.expired, [1])

    def test_slowingDown(self):
        """
        A transfer fast at first is cut once a whole window went by too slowly, at most a
        quarter window later.
        """
        watch = self.watch()
        for _ in range(8):  # two minutes at 4 KiB/s
            self.count += 60 * 1024
            self.clock.advance(15)
        while not self.expired and self.clock.seconds() < 300:  # then 10 bytes in 15 s
            self.count += 10
            self.clock.advance(15)
        self.assertEqual(self.expired, [1])
        self.assertEqual(watch.slow, 40)
        self.assertEqual(self.clock.seconds(), 180)

    def test_steadyAtTheRate(self):
        """
        Exactly the minimum rate goes on; stop cancels the watch.
        """
        watch = self.watch()
        for _ in range(400):
            self.count += 1024
            self.clock.advance(1)
        self.assertEqual(self.expired, [])
        watch.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SettingsTests(SynchronousTestCase):
    """
    The bounds' settings: defaults and the forms accepted.
    """

    def test_defaults(self):
        """
        10 GiB, 1 KiB/s over 60 s.
        """
        checked = TransferSettings.parse({})
        self.assertEqual(checked.max_size, MAX_SIZE)
        self.assertEqual(MAX_SIZE, 10 * 2**30)
        self.assertEqual(checked.min_rate, MinRate(1024, 60))

    def test_forms(self):
        def min_rate(value):
            return TransferSettings.parse({"min_rate": value}).min_rate

        self.assertEqual(min_rate({"bytes_per_s": 10, "window": 5}), MinRate(10, 5))
        self.assertEqual(min_rate({"window": 5}), MinRate(1024, 5))
        self.assertEqual(min_rate(512), MinRate(512, 60))
        self.assertIsNone(min_rate(0))
        self.assertIsNone(min_rate(None))
        self.assertIsNone(TransferSettings.parse({"max_size": None}).max_size)

    def test_bad(self):
        """
        Anything else is one clear error naming the setting.
        """
        for bad in ({"rate": 1}, {"bytes_per_s": -1}, {"window": 0}, "fast", True, -5):
            with self.assertRaises(ValueError) as caught:
                TransferSettings.parse({"min_rate": bad}, "consumer x")
            self.assertIn("consumer x: min_rate must be", str(caught.exception))
        for bad in (0, -1, 1.5, "10G", True):
            with self.assertRaises(ValueError) as caught:
                TransferSettings.parse({"max_size": bad}, "consumer x")
            self.assertIn("consumer x: max_size", str(caught.exception))


class FairnessTests(TestCase):
    """
    Transfers waiting for a busy server hold none of the C{parallel} slots, and one server
    never holds them all: with a server's transfers stalled, one to another server starts at
    once.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.local)
        write_file(os.path.join(self.root, "f.bin"), b"f" * 1000)
        self.stalling = start_http(self, self.root)
        self.other = start_http(self, self.root)
        self.addCleanup(settle)

    async def check(self, settings, stalled):
        transfers = Transfers(reactor, dict(settings, timeouts={"connect": 5, "idle": 20}))
        self.addCleanup(lambda: Deferred.fromCoroutine(transfers.close()))
        hung = [
            Deferred.fromCoroutine(
                transfers.get(
                    f"{self.stalling.url}/stall/100000", os.path.join(self.local, f"s{i}")
                )
            )
            for i in range(stalled)
        ]
        for d in hung:
            d.addErrback(lambda f: f.trap(CancelledError))
        start = time.monotonic()
        try:
            result = await bounded(
                transfers.get(f"{self.other.url}/files/f.bin", os.path.join(self.local, "f"))
            )
        finally:
            for d in hung:
                d.cancel()
        self.assertEqual(result.size, 1000)
        self.assertLess(time.monotonic() - start, 2)
        return transfers

    async def test_waitersHoldNoSlot(self):
        """
        parallel 2, per_host 1: three transfers to a stalled server take one slot, not two
        (two used to: the second held its slot while waiting for the server's).
        """
        await self.check({"parallel": 2, "per_host": 1}, stalled=3)

    async def test_oneServerNeverHoldsAll(self):
        """
        parallel 2, per_host 4: per_host is lowered to 1, so the stalled server cannot take
        both slots.
        """
        transfers = await self.check({"parallel": 2, "per_host": 4}, stalled=2)
        self.assertEqual(transfers.limiter.per_host, 1)

    def test_cancelledWaiterGivesBackItsServerSlot(self):
        """
        A transfer cancelled while it waits for one of the C{parallel} slots gives back the
        slot of its server it already held.
        """
        limiter = HostLimiter(per_host=1, parallel=2)
        held = [Deferred.fromCoroutine(limiter.acquire(f"http://h{i}/")) for i in range(2)]
        waiting = Deferred.fromCoroutine(limiter.acquire("http://other/"))
        self.assertEqual(limiter.active("http://other/"), 1)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(limiter.active("http://other/"), 0)
        for d in held:
            limiter.release(self.successResultOf(d))
        self.assertEqual(limiter._semaphores, {})
        self.assertEqual(limiter._total.tokens, 2)

    def test_perHostCap(self):
        self.assertEqual(HostLimiter(4, parallel=8).per_host, 4)
        self.assertEqual(HostLimiter(8, parallel=8).per_host, 7)
        self.assertEqual(HostLimiter(4, parallel=1).per_host, 1)
        self.assertEqual(HostLimiter(4).per_host, 4)
