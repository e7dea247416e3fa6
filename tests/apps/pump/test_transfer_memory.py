"""
Transfers stream: memory stays flat however big the file (L{ion.apps.pump.transfer}).
"""

import os

from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from ion.apps.pump import transfer
from ion.apps.pump.transfer import Credentials
from tests.apps.pump.servers import pattern, settle, start_ftp, start_http, start_sftp, write_file

SIZE = 64 * 1024 * 1024
# Allowed growth of the resident set; buffering the whole file would cost 64 MiB or more.
ALLOWED = 20 * 1024 * 1024


def rss():
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ConstantMemoryTests(TestCase):
    """
    64 MiB files cross http, file://, sftp and ftp with less than 20 MB of memory growth.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def sparse(self, name):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.truncate(SIZE)
        return path

    async def measure(self, url, **kwargs):
        dest = os.path.join(self.dir, "out.bin")
        before = rss()
        result = await transfer.get(reactor, url, dest, **kwargs)
        growth = rss() - before
        self.assertEqual(result.size, SIZE)
        self.assertLess(growth, ALLOWED, f"RSS grew by {growth / 1e6:.1f} MB")

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

    async def test_httpThreadPool(self):
        """
        With a thread pool writing to disk, a server faster than the disk is paused rather
        than buffered, over a kept-open connection.
        """
        server = start_http(self, self.dir)
        self.addCleanup(settle)
        pool = ThreadPool(minthreads=0, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        connections = transfer.HTTPConnections(reactor)
        self.addCleanup(connections.close)
        await self.measure(
            f"{server.url}/generated/{SIZE}", pool=pool, http_connections=connections
        )
        with open(os.path.join(self.dir, "out.bin"), "rb") as f:
            self.assertEqual(f.read(65536 * 3), pattern(65536 * 3))

    async def test_fileThreadPool(self):
        """
        A local copy with a thread pool writing to disk waits for it instead of buffering.
        """
        pool = ThreadPool(minthreads=0, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        await self.measure("file://" + self.sparse("sparse.bin"), pool=pool)

    async def test_file(self):
        """
        A sparse local file is copied chunk by chunk.
        """
        await self.measure("file://" + self.sparse("sparse.bin"), cod="md5")

    async def test_sftp(self):
        """
        sftp reads are pipelined within a bounded window.
        """
        self.sparse("sparse.bin")
        server = start_sftp(self, self.dir, user="bob", password="pw")
        self.addCleanup(settle)
        known_hosts = write_file(
            os.path.join(self.dir, "known_hosts"), server.known_hosts_line().encode()
        )
        port = server.port.getHost().port
        creds = Credentials.parse(f"sftp://bob:pw@127.0.0.1:{port}/")
        await self.measure(server.url + "/sparse.bin", credentials=creds, known_hosts=known_hosts)

    async def test_ftp(self):
        """
        An ftp data connection goes to disk chunk by chunk.
        """
        self.sparse("sparse.bin")
        server = start_ftp(self, self.dir, user="carol", password="pw")
        self.addCleanup(settle)
        url = server.url.replace("carol@", "carol:pw@")
        await self.measure(url + "/sparse.bin")
