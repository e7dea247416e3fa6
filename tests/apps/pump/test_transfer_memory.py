"""
Transfers stream: memory stays flat however big the file (L{ion.apps.pump.transfer}).
"""

import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ion.apps.pump import transfer
from tests.apps.pump.servers import pattern, settle, start_http

SIZE = 64 * 1024 * 1024
# Allowed growth of the resident set; buffering the whole file would cost 64 MiB or more.
ALLOWED = 20 * 1024 * 1024


def rss():
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ConstantMemoryTests(TestCase):
    """
    64 MiB files cross http and file:// with less than 20 MB of memory growth.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    async def test_http(self):
        """
        An http body generated on the fly goes to disk chunk by chunk.
        """
        server = start_http(self, self.dir)
        self.addCleanup(settle)
        dest = os.path.join(self.dir, "big.bin")
        before = rss()
        result = await transfer.get(reactor, f"{server.url}/generated/{SIZE}", dest)
        growth = rss() - before
        self.assertEqual(result.size, SIZE)
        self.assertLess(growth, ALLOWED, f"RSS grew by {growth / 1e6:.1f} MB")
        with open(dest, "rb") as f:
            self.assertEqual(f.read(65536 * 3), pattern(65536 * 3))

    async def test_file(self):
        """
        A sparse local file is copied chunk by chunk.
        """
        src = os.path.join(self.dir, "sparse.bin")
        with open(src, "wb") as f:
            f.truncate(SIZE)
        dest = os.path.join(self.dir, "copy.bin")
        before = rss()
        result = await transfer.get(reactor, "file://" + src, dest, cod="md5")
        growth = rss() - before
        self.assertEqual(result.size, SIZE)
        self.assertLess(growth, ALLOWED, f"RSS grew by {growth / 1e6:.1f} MB")
