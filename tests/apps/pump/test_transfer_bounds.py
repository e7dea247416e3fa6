"""
Transfers bounded by the pump, not by the sender: C{max_size}, C{min_rate}, slots per server
that cannot starve the other servers, and idle timers that run from connect to completion for
every scheme (servers that accept a connection and never speak).
"""

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ion.apps.pump import transfer
from ion.apps.pump.transfer import Timeouts, TransferTimeout
from tests.apps.pump.hostile_servers import start_silent
from tests.apps.pump.servers import settle

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
